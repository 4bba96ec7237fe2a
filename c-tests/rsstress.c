/*
 * rsstress: randomized stress of the stream data path, every byte checked.
 *
 * Built twice from this source, like bench/rsbench.c:
 *   rsstress          against rsocket-rs (installed <rsocket.h>, pkg-config rsocket-rs)
 *   rsstress-rdmacm   -DUSE_LIBRDMACM: against librdmacm's rsockets (<rdma/rsocket.h>, -lrdmacm)
 *
 *   server: rsstress -s ADDR -p PORT -r SEED [options]
 *   client: rsstress -c SERVER [-b LOCAL] -p PORT -r SEED [options]
 *
 * Both sides take the same seed and options; each derives from them, deterministically, what
 * both directions do, so a failure is reproduced by running the same two commands again.
 *
 *   -m thread   blocking socket, a sender thread and a receiver thread on it (default); the
 *               librdmacm build's two threads take turns on a non-blocking socket instead
 *               (librdmacm's send and receive race on its send ring's counters: see `turn`)
 *   -m poll     one thread, non-blocking (O_NONBLOCK or MSG_DONTWAIT on every call, chosen by the
 *               seed), driven by rpoll
 *   -n BYTES    bytes in each direction (default 4 MiB)
 *   -O          random socket options before connecting (SO_RCVBUF, SO_SNDBUF, RDMA_SQSIZE,
 *               RDMA_RQSIZE, RDMA_INLINE), each side its own, from the seed
 *   -I          no riowrite (default: riowrite into the peer's riomap'd window, interleaved)
 *   -u          the integrity issue's stream: client to server only, sizes 1, 10, 37, ... (each
 *               x3+7, back to 1 above 300,000), rsend only; the server reads 64 KiB at a time
 *   -T SECS     give up after SECS (default 120): exit 3, printing where each direction stood
 *   -q          quiet: only the summary line
 *   -W          the device is Soft-iWARP: the librdmacm build keeps sends of up to 32 bytes
 *               inline (keep_short_sends_inline: a kernel bug no receiver can undo)
 *
 * What each direction does (the sender's plan, from the seed):
 *   sends of sizes from a heavy-tailed mix (1 B to 1 MiB): small ones, sizes next to inline
 *   limits, the 24-byte short-transfer limit, buffer and ring sizes, powers of two and their
 *   neighbours, log-uniform ones, and runs of one small size; through rsend, rwrite, rwritev (up
 *   to 24 iovecs, empty ones too) and rsendmsg; random pauses; riowrite of random sizes into the
 *   peer's window (each region written once), checked by the peer once stream bytes sent after
 *   it arrived.
 * The receiver's plan: reads of random sizes through rrecv, rread, rreadv, rrecvmsg (iovecs
 * with empty ones), MSG_PEEK followed by a read of what it saw, MSG_WAITALL; random pauses.
 *
 * Data: byte o of direction d is pat_d(o), a seeded pseudo-random table with a prime period
 * (1,000,003), so data from anywhere else in the stream (a stale window, a reused ring slot)
 * shows. Every received byte and every riowrite'd byte is compared.
 * On a mismatch: "MISMATCH seed S dir D offset O ..." with the receive call's position in the
 * plan, the first bad offset, how many bytes of that call were wrong, and which of the peer's
 * planned sends carried that offset. Exit status: 0 ok, 1 error, 2 data mismatch, 3 timeout,
 * 64 usage.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef USE_LIBRDMACM
#include <rdma/rsocket.h>
#define IMPL "librdmacm"
#else
#include <rsocket.h>
#define IMPL "rsocket-rs"
#endif

#define PERIOD 1000003u
#define WINDOW (512u * 1024)
#define MAX_IOV 24
#define MAX_SEND (1u << 20)

/* ------------------------------------------------------------------ randomness, pattern */

struct rng {
	uint64_t s;
};

static uint64_t next64(struct rng *r)
{
	/* splitmix64 */
	uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint32_t below(struct rng *r, uint32_t n)
{
	return n ? (uint32_t)(next64(r) % n) : 0;
}

static struct rng rng_for(uint64_t seed, uint64_t stream)
{
	struct rng r = { seed * 0x100000001b3ull ^ (stream + 1) * 0xcbf29ce484222325ull };
	next64(&r);
	return r;
}

static uint8_t *pat[2];

static void make_pattern(uint64_t seed)
{
	for (int d = 0; d < 2; d++) {
		struct rng r = rng_for(seed, 100 + d);
		pat[d] = malloc(PERIOD + MAX_SEND + 8);
		for (uint32_t i = 0; i < PERIOD; i += 8) {
			uint64_t v = next64(&r);
			memcpy(pat[d] + i, &v, 8);
		}
		/* The table repeats past its end, so any offset has MAX_SEND contiguous bytes. */
		for (uint32_t i = PERIOD; i < PERIOD + MAX_SEND; i++)
			pat[d][i] = pat[d][i - PERIOD];
	}
}

static const uint8_t *pat_at(int d, uint64_t off)
{
	return pat[d] + off % PERIOD;
}

/* riowrite region k of direction d carries the table from a place no stream offset nearby uses. */
static const uint8_t *io_pat(int d, uint32_t k)
{
	return pat_at(d, 500009ull + (uint64_t)k * 7919);
}

/* ------------------------------------------------------------------ plans */

enum send_call { S_RSEND, S_RWRITE, S_RWRITEV, S_RSENDMSG, S_NCALLS };
enum recv_call { R_RRECV, R_RREAD, R_RREADV, R_RRECVMSG, R_PEEK, R_WAITALL, R_NCALLS };
static const char *send_name[] = { "rsend", "rwrite", "rwritev", "rsendmsg" };
static const char *recv_name[] = { "rrecv", "rread", "rreadv", "rrecvmsg", "peek+read", "waitall" };

enum op_kind { OP_SEND, OP_IOWRITE, OP_PAUSE, OP_END };

struct op {
	enum op_kind kind;
	uint32_t size;
	int call;
	int niov;
	uint32_t iov[MAX_IOV];
	uint32_t win_off; /* OP_IOWRITE: offset in the peer's window */
	uint32_t io_k;	  /* OP_IOWRITE: region number */
	uint32_t pause_us;
};

/* The sender's plan of one direction; the peer regenerates it to find riowrites and to name
 * the send that carried a bad offset. */
struct plan {
	struct rng r;
	uint64_t total, planned; /* bytes of the direction, bytes planned so far */
	uint64_t index;		 /* ops generated */
	int uneven;
	uint32_t uneven_size;
	int iowrite;
	uint32_t win_used, io_k;
	uint32_t run_left, run_size; /* a run of one small size */
	uint32_t sq_inline_hint;
};

static uint32_t special_size(struct rng *r)
{
	static const uint32_t base[] = { 4, 8, 16, 23, 24, 25, 32, 63, 64, 65, 100, 128, 2047, 2048,
					 2049, 4095, 4096, 4097, 8192, 16384, 32767, 32768,
					 65535, 65536, 65537, 131071, 131072, 131073, 262144,
					 524288, 1048576 };
	uint32_t s = base[below(r, sizeof base / sizeof base[0])];
	if (below(r, 3) == 0)
		s += below(r, 5) - 2;
	return s ? s : 1;
}

static uint32_t draw_size(struct plan *p)
{
	struct rng *r = &p->r;
	if (p->run_left) {
		p->run_left--;
		return p->run_size;
	}
	switch (below(r, 20)) {
	case 0 ... 5: /* small */
		return 1 + below(r, 64);
	case 6 ... 8: /* next to the limits that matter */
		return special_size(r);
	case 9 ... 10: /* a run of one small size (gathered and staged sends) */
		p->run_size = 1 + below(r, 3000);
		p->run_left = 5 + below(r, 200);
		return p->run_size;
	case 11:
		return 1 + below(r, 24);
	default: { /* log-uniform over 1 B .. 1 MiB: heavy tail */
		uint32_t bits = below(r, 21);
		uint32_t lo = 1u << bits;
		return lo + below(r, lo);
	}
	}
}

static int iowrites_in(int dir, int iowrite);

static void plan_init(struct plan *p, uint64_t seed, int dir, uint64_t total, int uneven, int iowrite)
{
	iowrite = iowrites_in(dir, iowrite);
	memset(p, 0, sizeof *p);
	p->r = rng_for(seed, dir);
	p->total = total;
	p->uneven = uneven;
	p->uneven_size = 1;
	p->iowrite = iowrite;
}

/* The next op of the plan; OP_END once `total` bytes are planned. */
static void plan_next(struct plan *p, struct op *o)
{
	memset(o, 0, sizeof *o);
	p->index++;
	if (p->planned >= p->total) {
		o->kind = OP_END;
		return;
	}
	if (p->uneven) {
		o->kind = OP_SEND;
		o->call = S_RSEND;
		o->size = p->uneven_size;
		if (o->size > p->total - p->planned)
			o->size = p->total - p->planned;
		p->uneven_size = p->uneven_size * 3 + 7;
		if (p->uneven_size > 300000)
			p->uneven_size = 1;
		p->planned += o->size;
		return;
	}
	struct rng *r = &p->r;
	/* The first op is always a send, and never a riowrite last (it is checked once stream bytes
	 * sent after it arrived). */
	uint32_t what = p->index == 1 ? 99 : below(r, 100);
	if (what < 3) {
		o->kind = OP_PAUSE;
		o->pause_us = below(r, 4) == 0 ? 1000 + below(r, 20000) : below(r, 300);
		return;
	}
	if (what < 9 && p->iowrite) {
		uint32_t sz = below(r, 4) == 0 ? special_size(r) : 1 + below(r, 4096);
		if (sz > 65536)
			sz = 1 + sz % 65536;
		if (p->win_used + sz <= WINDOW) {
			o->kind = OP_IOWRITE;
			o->size = sz;
			o->win_off = p->win_used;
			o->io_k = p->io_k++;
			p->win_used += sz;
			/* Random gaps between regions: untouched bytes must stay zero. */
			p->win_used += below(r, 3) == 0 ? below(r, 64) : 0;
			return;
		}
	}
	o->kind = OP_SEND;
	o->size = draw_size(p);
	if (o->size > MAX_SEND)
		o->size = MAX_SEND;
	if (o->size > p->total - p->planned)
		o->size = p->total - p->planned;
	o->call = below(r, S_NCALLS);
	if (o->call == S_RWRITEV || o->call == S_RSENDMSG) {
		o->niov = 1 + below(r, MAX_IOV);
		uint32_t left = o->size;
		for (int i = 0; i < o->niov; i++) {
			uint32_t n = i == o->niov - 1 ? left : (below(r, 4) == 0 ? 0 : below(r, left + 1));
			if (below(r, 2) && i != o->niov - 1)
				n = n / 8;
			o->iov[i] = n;
			left -= n;
		}
	}
	p->planned += o->size;
}

struct rop {
	int call;
	uint32_t size;
	int niov;
	uint32_t iov[MAX_IOV];
	uint32_t pause_us;
};

static void recv_next(struct rng *r, int uneven, struct rop *o)
{
	memset(o, 0, sizeof *o);
	if (uneven) {
		o->call = R_RRECV;
		o->size = 65536;
		return;
	}
	if (below(r, 60) == 0)
		o->pause_us = below(r, 4) == 0 ? 1000 + below(r, 20000) : below(r, 300);
	o->call = below(r, R_NCALLS);
	switch (below(r, 4)) {
	case 0:
		o->size = 1 + below(r, 64);
		break;
	case 1:
		o->size = special_size(r);
		break;
	default:
		o->size = 1u << below(r, 21);
		o->size += below(r, o->size);
	}
	if (o->size > MAX_SEND)
		o->size = MAX_SEND;
	if (o->call == R_RREADV || o->call == R_RRECVMSG) {
		o->niov = 1 + below(r, MAX_IOV);
		uint32_t left = o->size;
		for (int i = 0; i < o->niov; i++) {
			uint32_t n = i == o->niov - 1 ? left : (below(r, 4) == 0 ? 0 : below(r, left + 1));
			o->iov[i] = n;
			left -= n;
		}
	}
}

/* ------------------------------------------------------------------ state */

static struct {
	int server, mode_poll, options, iowrite, uneven, quiet;
	int peer_librdmacm; /* -P lib: the peer runs librdmacm */
	int siw;	    /* -W: the device is Soft-iWARP (see keep_short_sends_inline) */
	uint64_t seed, bytes;
	unsigned timeout;
	const char *addr, *local;
	int port;
} cfg = { .bytes = 4u << 20, .timeout = 120, .iowrite = 1 };

static int fd = -1;
static int me; /* 0 client, 1 server: direction `me` is what this side sends */
static uint8_t *window; /* our riomap'd window (the peer riowrites into it) */
static _Atomic uint64_t received, sent;
static _Atomic uint64_t send_index, recv_index; /* plan positions, for reports */
static uint64_t send_calls, recv_calls, iowrites, iowrite_bytes, io_checked;
static int nonblock_flag; /* poll mode: MSG_DONTWAIT on every call instead of O_NONBLOCK */
static char optdesc[200];

/*
 * librdmacm's two threads take turns. Its rsend and rrecv may run at once, but both change the
 * send ring's free byte count (and free send queue entries) without a common lock: rsend under
 * its send lock, and rrecv, when it polls the completion queue, under the CQ lock. An update
 * lost that way lets rsend reuse ring bytes whose write has not left (the receiver gets data
 * from one ring length later) or copy past the ring's end (malloc aborts with its heap
 * corrupted). Seen on rxe with librdmacm on both ends (seed 13: 2 of 30 runs) and gone with the
 * two counters updated atomically (0 of 82 against rsocket-rs). So in thread mode a librdmacm
 * socket is non-blocking and each call is made under one mutex; a call that would block lets
 * the other thread in and tries again shortly. rsocket-rs's threads never take turns.
 */
#ifdef USE_LIBRDMACM
static pthread_mutex_t turn = PTHREAD_MUTEX_INITIALIZER;
static int taking_turns;
static void turn_take(void)
{
	if (taking_turns)
		pthread_mutex_lock(&turn);
}
/* Keeps errno: the caller still has to look at the call's. */
static void turn_give(void)
{
	int err = errno;
	if (taking_turns)
		pthread_mutex_unlock(&turn);
	errno = err;
}
/* After a call that would have blocked: let the other thread in before trying again. */
static void turn_wait(void)
{
	if (taking_turns)
		usleep(50);
}
#else
static void turn_take(void) {}
static void turn_give(void) {}
static void turn_wait(void) {}
#endif

/*
 * Whether direction `dir`'s sender interleaves riowrites. Not when it runs librdmacm: on
 * Soft-iWARP librdmacm's sender then delivers wrong stream bytes now and then (data from one
 * send-ring length later: its ring reused before the write left), with librdmacm on both ends
 * too, so it would only measure librdmacm. A librdmacm receiver still takes rsocket-rs's.
 */
static int iowrites_in(int dir, int iowrite)
{
#ifdef USE_LIBRDMACM
	int lib = dir == me ? 1 : cfg.peer_librdmacm;
#else
	int lib = dir == me ? 0 : cfg.peer_librdmacm;
#endif
	return iowrite && !lib;
}

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "rsstress %s %s seed %llu: ", IMPL, me ? "server" : "client",
		(unsigned long long)cfg.seed);
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, " (errno %d: %s)\n", errno, strerror(errno));
	va_end(ap);
	exit(1);
}

static void on_alarm(int sig)
{
	(void)sig;
	char b[300];
	int n = snprintf(b, sizeof b,
			 "rsstress %s %s seed %llu: TIMEOUT after %u s: sent %llu of %llu (op %llu), "
			 "received %llu of %llu (op %llu)\n",
			 IMPL, me ? "server" : "client", (unsigned long long)cfg.seed, cfg.timeout,
			 (unsigned long long)sent, (unsigned long long)(cfg.uneven && me ? 0 : cfg.bytes),
			 (unsigned long long)send_index, (unsigned long long)received,
			 (unsigned long long)(cfg.uneven && !me ? 0 : cfg.bytes),
			 (unsigned long long)recv_index);
	if (write(2, b, n) < 0)
		_exit(3);
	/* Where every thread stood, when gdb is there (make test installs it). */
	char pid[16];
	snprintf(pid, sizeof pid, "%d", (int)getpid());
	pid_t g = fork();
	if (g == 0) {
		dup2(2, 1);
		execlp("gdb", "gdb", "-batch", "-nx", "-p", pid, "-ex", "thread apply all bt 12", (char *)NULL);
		_exit(127);
	}
	if (g > 0)
		waitpid(g, NULL, 0);
	_exit(3);
}

static uint64_t dir_bytes(int d)
{
	if (cfg.uneven)
		return d == 0 ? cfg.bytes : 0;
	return cfg.bytes;
}

/* ------------------------------------------------------------------ checking */

/* The peer's plan, regenerated: riowrites to check and the send that carried an offset. */
static struct plan shadow;
static struct op shadow_op;
static uint64_t shadow_off; /* stream offset where shadow_op starts */

static void check_window(uint64_t upto)
{
	/* A riowrite is checked once a stream byte the peer sent after it arrived (`upto` bytes
	 * received): on one RC queue pair the write was placed before that byte. */
	while (shadow_op.kind != OP_END) {
		if (shadow_op.kind == OP_SEND) {
			shadow_off += shadow_op.size;
		} else if (shadow_op.kind == OP_IOWRITE) {
			if (shadow_off >= upto)
				return;
			const uint8_t *want = io_pat(!me, shadow_op.io_k);
			const uint8_t *got = window + shadow_op.win_off;
			if (memcmp(got, want, shadow_op.size)) {
				uint32_t i = 0;
				while (got[i] == want[i])
					i++;
				fprintf(stderr,
					"MISMATCH seed %llu riowrite region %u (peer op #%llu, %u B at window "
					"offset %u, before stream offset %llu): first bad byte %u (got %02x "
					"want %02x)\n",
					(unsigned long long)cfg.seed, shadow_op.io_k,
					(unsigned long long)shadow.index, shadow_op.size, shadow_op.win_off,
					(unsigned long long)shadow_off, i, got[i], want[i]);
				exit(2);
			}
			io_checked++;
		}
		plan_next(&shadow, &shadow_op);
	}
}

/* Which of the peer's planned sends carries stream offset `off` (for the report). */
static void describe_peer_send(uint64_t off, char *out, size_t n)
{
	struct plan p;
	struct op o;
	uint64_t at = 0;
	plan_init(&p, cfg.seed, !me, dir_bytes(!me), cfg.uneven, cfg.iowrite);
	for (;;) {
		plan_next(&p, &o);
		if (o.kind == OP_END) {
			snprintf(out, n, "beyond the peer's plan");
			return;
		}
		if (o.kind != OP_SEND)
			continue;
		if (off < at + o.size) {
			snprintf(out, n, "peer op #%llu: %s of %u B at stream offset %llu (byte %llu of it)",
				 (unsigned long long)p.index, send_name[o.call], o.size,
				 (unsigned long long)at, (unsigned long long)(off - at));
			return;
		}
		at += o.size;
	}
}

static void verify(const uint8_t *buf, size_t len, uint64_t off, const char *what)
{
	const uint8_t *want = pat_at(!me, off);
	if (off + len > dir_bytes(!me)) {
		fprintf(stderr, "MISMATCH seed %llu dir %d: %s returned %zu bytes at offset %llu, past "
				"the %llu the peer sends\n",
			(unsigned long long)cfg.seed, !me, what, len, (unsigned long long)off,
			(unsigned long long)dir_bytes(!me));
		exit(2);
	}
	if (memcmp(buf, want, len) == 0)
		return;
	size_t i = 0, bad = 0, last = 0;
	while (buf[i] == want[i])
		i++;
	for (size_t j = i; j < len; j++)
		if (buf[j] != want[j]) {
			bad++;
			last = j;
		}
	char peer[200];
	describe_peer_send(off + i, peer, sizeof peer);
	/* Where the wrong bytes came from: the stream's pattern elsewhere (stale or later data), or
	 * a riowrite region's. */
	size_t k = len - i < 16 ? len - i : 16;
	for (int d = 0; d < 2; d++) {
		const uint8_t *hit = memmem(pat[d], PERIOD + MAX_SEND, buf + i, k);
		if (hit) {
			uint64_t at = (uint64_t)(hit - pat[d]);
			long long delta = (long long)at - (long long)((off + i) % PERIOD);
			fprintf(stderr, "  the wrong bytes are direction %d's pattern at table offset %llu "
					"(%+lld from the right place%s)\n",
				d, (unsigned long long)at, delta,
				d == !me && at >= 500009 ? "; riowrite regions start at 500009" : "");
		}
	}
	/* The bytes around the wrong ones, as received and as planned (at most 64 of each). */
	size_t from = i >= 8 ? i - 8 : 0, to = last + 1 - from > 64 ? from + 64 : last + 1;
	fprintf(stderr, "  got  @%llu:", (unsigned long long)(off + from));
	for (size_t j = from; j < to; j++)
		fprintf(stderr, " %02x", buf[j]);
	fprintf(stderr, "\n  want @%llu:", (unsigned long long)(off + from));
	for (size_t j = from; j < to; j++)
		fprintf(stderr, " %02x", want[j]);
	fprintf(stderr, "\n");
	fprintf(stderr,
		"MISMATCH seed %llu dir %d (%s): receive op #%llu (%s of %zu B at stream offset %llu): "
		"first bad offset %llu (got %02x want %02x), %zu bad bytes up to offset %llu; %s\n",
		(unsigned long long)cfg.seed, !me, me ? "client->server" : "server->client",
		(unsigned long long)recv_index, what, len, (unsigned long long)off,
		(unsigned long long)(off + i), buf[i], want[i], bad, (unsigned long long)(off + last),
		peer);
	exit(2);
}

/* ------------------------------------------------------------------ one call each */

static int call_flags(void)
{
	return cfg.mode_poll && nonblock_flag ? MSG_DONTWAIT : 0;
}

/* Sends what is left of `o` from byte `done`; returns bytes sent, 0 on EAGAIN. */
static ssize_t do_send(const struct op *o, uint64_t stream_off, uint32_t done)
{
	const uint8_t *src = pat_at(me, stream_off);
	ssize_t r;
	send_calls++;
	int call = o->call;
	/* rwrite and rwritev take no flags: with MSG_DONTWAIT on a blocking socket they would
	 * block the one thread that also has to read. */
	if (call_flags() && call == S_RWRITE)
		call = S_RSEND;
	if (call_flags() && call == S_RWRITEV)
		call = S_RSENDMSG;
	turn_take();
	switch (call) {
	case S_RSEND:
		r = rsend(fd, src + done, o->size - done, call_flags() | MSG_NOSIGNAL);
		break;
	case S_RWRITE:
		r = rwrite(fd, src + done, o->size - done);
		break;
	default: {
		struct iovec iov[MAX_IOV];
		int n = 0;
		uint32_t at = 0;
		for (int i = 0; i < o->niov; i++) {
			uint32_t a = at, b = at + o->iov[i];
			at = b;
			/* Skip what went already; empty iovecs stay where they were planned. */
			if (b <= done && !(o->iov[i] == 0 && a >= done))
				continue;
			if (a < done)
				a = done;
			iov[n].iov_base = (void *)(src + a);
			iov[n].iov_len = b - a;
			n++;
		}
		if (call == S_RWRITEV) {
			r = rwritev(fd, iov, n);
		} else {
			struct msghdr m = { .msg_iov = iov, .msg_iovlen = n };
			r = rsendmsg(fd, &m, call_flags() | MSG_NOSIGNAL);
		}
	}
	}
	turn_give();
	if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
		turn_wait();
		return 0;
	}
	if (r < 0)
		die("%s of %u bytes (op %llu, at %u)", send_name[o->call], o->size,
		    (unsigned long long)send_index, done);
	if (r == 0 && o->size > done)
		die("%s returned 0", send_name[o->call]);
	return r;
}

static ssize_t do_iowrite(const struct op *o, uint32_t done)
{
	send_calls++;
	turn_take();
	size_t r = riowrite(fd, io_pat(me, o->io_k) + done, o->size - done, o->win_off + done,
			    call_flags());
	turn_give();
	if (r == (size_t)-1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
		turn_wait();
		return 0;
	}
	if (r == (size_t)-1)
		die("riowrite of %u bytes at window offset %u", o->size, o->win_off);
	return (ssize_t)r;
}

static uint8_t *rbuf;

/* One receive; returns bytes (verified and counted), 0 on EAGAIN, -1 at end of stream. */
static ssize_t do_recv(const struct rop *o)
{
	uint64_t want_total = dir_bytes(!me);
	uint64_t off = received;
	uint32_t size = o->size;
	if (o->call == R_WAITALL && size > want_total - off)
		size = want_total - off ? want_total - off : 1;
	ssize_t r;
	int fl = call_flags();
	recv_calls++;
	int call = o->call;
	if (fl && call == R_RREAD)
		call = R_RRECV;
	if (fl && call == R_RREADV)
		call = R_RRECVMSG;
	turn_take();
	switch (call) {
	case R_RRECV:
		r = rrecv(fd, rbuf, size, fl);
		break;
	case R_RREAD:
		r = rread(fd, rbuf, size);
		break;
	case R_WAITALL:
		r = rrecv(fd, rbuf, size, fl | MSG_WAITALL);
		break;
	case R_PEEK:
		r = rrecv(fd, rbuf, size, fl | MSG_PEEK);
		if (r > 0) {
			verify(rbuf, r, off, "MSG_PEEK");
			/* What was seen must be there to read. */
			uint8_t *again = rbuf + MAX_SEND;
			ssize_t k = rrecv(fd, again, r, fl);
			if (k != r) {
				fprintf(stderr,
					"MISMATCH seed %llu: rrecv after a MSG_PEEK of %zd bytes returned %zd "
					"(errno %d) at offset %llu\n",
					(unsigned long long)cfg.seed, r, k, errno, (unsigned long long)off);
				exit(2);
			}
			memcpy(rbuf, again, r);
		}
		break;
	default: {
		struct iovec iov[MAX_IOV];
		uint32_t at = 0;
		for (int i = 0; i < o->niov; i++) {
			iov[i].iov_base = rbuf + at;
			iov[i].iov_len = o->iov[i];
			at += o->iov[i];
		}
		struct iovec *v = iov;
		int nv = o->niov;
#ifdef USE_LIBRDMACM
		/* librdmacm fills only the first iovec: an empty one would read as end of stream. */
		while (nv > 1 && v->iov_len == 0) {
			v++;
			nv--;
		}
#endif
		if (call == R_RREADV) {
			r = rreadv(fd, v, nv);
		} else {
			struct msghdr m = { .msg_iov = v, .msg_iovlen = nv };
#ifdef USE_LIBRDMACM
			/* librdmacm's rrecvmsg passes msg_flags instead of its flags argument, so
			 * MSG_DONTWAIT alone would be lost and the call would block. */
			m.msg_flags = fl;
#endif
			r = rrecvmsg(fd, &m, fl);
		}
	}
	}
	turn_give();
	if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
		turn_wait();
		return 0;
	}
	if (r < 0)
		die("%s of %u bytes at offset %llu", recv_name[o->call], size, (unsigned long long)off);
	if (r == 0)
		return -1;
	verify(rbuf, r, off, recv_name[o->call]);
	received = off + r;
	if (cfg.iowrite)
		check_window(received);
	return r;
}

static void pause_us(uint32_t us)
{
	if (us)
		usleep(us);
}

static void end_of_stream(void)
{
	if (received != dir_bytes(!me)) {
		fprintf(stderr, "MISMATCH seed %llu dir %d: end of stream after %llu of %llu bytes\n",
			(unsigned long long)cfg.seed, !me, (unsigned long long)received,
			(unsigned long long)dir_bytes(!me));
		exit(2);
	}
	if (cfg.iowrite)
		check_window(received + 1);
}

/* ------------------------------------------------------------------ the two drivers */

/*
 * On iWARP without MPA peer-to-peer mode the accepting side must not send before the initiator
 * did: Soft-iWARP fails a connection whose first frame from the acceptor arrives before the
 * initiator read the MPA reply. rsocket-rs holds its accepted sockets' sends until the peer
 * spoke; librdmacm does not, so a librdmacm server waits for the client's first bytes.
 */
static int may_send(void)
{
#ifdef USE_LIBRDMACM
	return !me || received > 0 || dir_bytes(!me) == 0;
#else
	return 1;
#endif
}

static void shut_wr(void)
{
	turn_take();
	int r = rshutdown(fd, SHUT_WR);
	turn_give();
	if (r)
		die("rshutdown(SHUT_WR)");
}

static void *sender(void *arg)
{
	(void)arg;
	struct plan p;
	struct op o;
	plan_init(&p, cfg.seed, me, dir_bytes(me), cfg.uneven, cfg.iowrite);
	while (!may_send())
		usleep(100);
	for (;;) {
		plan_next(&p, &o);
		send_index = p.index;
		if (o.kind == OP_END)
			break;
		if (o.kind == OP_PAUSE) {
			pause_us(o.pause_us);
			continue;
		}
		if (o.kind == OP_IOWRITE) {
			/* The peer's window is known once its first bytes arrived (it mapped before). */
			while (received == 0 && dir_bytes(!me))
				usleep(100);
			for (uint32_t done = 0; done < o.size;)
				done += do_iowrite(&o, done);
			iowrites++;
			iowrite_bytes += o.size;
			continue;
		}
		for (uint32_t done = 0; done < o.size;)
			done += do_send(&o, sent, done);
		sent += o.size;
	}
	shut_wr();
	return NULL;
}

static void *receiver(void *arg)
{
	(void)arg;
	struct rng r = rng_for(cfg.seed, 2 + !me);
	struct rop o;
	for (;;) {
		recv_next(&r, cfg.uneven, &o);
		recv_index++;
		pause_us(o.pause_us);
		ssize_t n;
		while ((n = do_recv(&o)) == 0)
			; /* would block (librdmacm taking turns): the same receive again */
		if (n < 0)
			break;
	}
	end_of_stream();
	return NULL;
}

static void run_threads(void)
{
	pthread_t s, r;
#ifdef USE_LIBRDMACM
	int fl = rfcntl(fd, F_GETFL);
	if (fl < 0 || rfcntl(fd, F_SETFL, fl | O_NONBLOCK))
		die("rfcntl(O_NONBLOCK)");
	taking_turns = 1;
#endif
	pthread_create(&r, NULL, receiver, NULL);
	pthread_create(&s, NULL, sender, NULL);
	pthread_join(s, NULL);
	pthread_join(r, NULL);
}

static void run_poll(void)
{
	struct plan p;
	struct op o;
	struct rop ro;
	struct rng rr = rng_for(cfg.seed, 2 + !me);
	/* Scheduling draws depend on timing: kept apart from the plans, which must not. */
	struct rng sched = rng_for(cfg.seed, 30 + me);
	plan_init(&p, cfg.seed, me, dir_bytes(me), cfg.uneven, cfg.iowrite);
	plan_next(&p, &o);
	send_index = p.index;
	recv_next(&rr, cfg.uneven, &ro);
	recv_index = 1;
	uint32_t done = 0;
	int sending = 1, receiving = 1;
	while (sending || receiving) {
		int progress = 0;
		while (sending && may_send()) {
			if (o.kind == OP_END) {
				shut_wr();
				sending = 0;
				break;
			}
			if (o.kind == OP_PAUSE) {
				pause_us(o.pause_us);
			} else if (o.kind == OP_IOWRITE) {
				if (received == 0 && dir_bytes(!me))
					break;
				ssize_t n = do_iowrite(&o, done);
				if (n == 0)
					break;
				done += n;
				if (done < o.size)
					continue;
				iowrites++;
				iowrite_bytes += o.size;
			} else {
				ssize_t n = do_send(&o, sent, done);
				if (n == 0)
					break;
				progress = 1;
				done += n;
				if (done < o.size)
					continue;
				sent += o.size;
			}
			done = 0;
			plan_next(&p, &o);
			send_index = p.index;
			/* Let the receive side in now and then. */
			if (below(&sched, 4) == 0)
				break;
		}
		while (receiving) {
			pause_us(ro.pause_us);
			ro.pause_us = 0;
			ssize_t n = do_recv(&ro);
			if (n == 0)
				break;
			if (n < 0) {
				end_of_stream();
				receiving = 0;
				break;
			}
			progress = 1;
			recv_next(&rr, cfg.uneven, &ro);
			recv_index++;
			if (below(&sched, 3) == 0)
				break;
		}
		if (progress || (!sending && !receiving))
			continue;
		struct pollfd pf = { .fd = fd, .events = (receiving ? POLLIN : 0) | (sending ? POLLOUT : 0) };
		int k = rpoll(&pf, 1, 1000);
		if (k < 0)
			die("rpoll");
		if (k == 1 && (pf.revents & (POLLERR | POLLNVAL)) && !(pf.revents & POLLIN))
			die("rpoll revents %#x with %llu of %llu received", pf.revents,
			    (unsigned long long)received, (unsigned long long)dir_bytes(!me));
	}
}

/* ------------------------------------------------------------------ setup */

/*
 * Soft-iWARP (Linux 6.1 siw_try_1seg) sends a transfer of at most 32 bytes described by one SGE
 * that crosses a page with the wrong bytes when its worker thread, not the posting syscall,
 * transmits it: from the page boundary on, the payload holds what follows the first page in the
 * kernel's mapping, and its last bytes hold the first bytes of the next page. rsocket-rs splits
 * such sends at the page; librdmacm does not, and sends of more than its inline limit from its
 * send ring hit the bug (seen: a 24-byte rsendmsg from librdmacm with inline=8 arrived with bytes
 * 7-23 wrong, bytes 17-23 equal to the right bytes 7-13). No receiver can repair that, so on siw
 * the librdmacm build keeps every transfer of up to 32 bytes inline, where siw copies it at post
 * time: what it sends us is then what the program sent.
 */
static void keep_short_sends_inline(void)
{
#ifdef USE_LIBRDMACM
	int v = 0;
	socklen_t len = sizeof v;
	if (!cfg.siw)
		return;
	if (rgetsockopt(fd, SOL_RDMA, RDMA_INLINE, &v, &len))
		die("getsockopt RDMA_INLINE");
	if (v < 32) {
		v = 32;
		if (rsetsockopt(fd, SOL_RDMA, RDMA_INLINE, &v, sizeof v))
			die("RDMA_INLINE 32");
		if (!cfg.quiet)
			fprintf(stderr, "rsstress %s: inline raised to 32 (Soft-iWARP, see -W)\n", IMPL);
	}
#endif
}

static void set_options(void)
{
	if (!cfg.options) {
		snprintf(optdesc, sizeof optdesc, "default");
		keep_short_sends_inline();
		return;
	}
	struct rng r = rng_for(cfg.seed, 10 + me);
	static const int rcv[] = { 0, 8192, 32768, 100000, 262144 };
	static const int snd[] = { 0, 4096, 20000, 65536, 1048576 };
	static const int sq[] = { 0, 16, 33, 100, 384 };
	static const int rq[] = { 0, 16, 40, 384 };
	static const int inl[] = { 0, 8, 16, 23, 32, 64 };
	int v[5] = { rcv[below(&r, 5)], snd[below(&r, 5)], sq[below(&r, 5)], rq[below(&r, 4)],
		     inl[below(&r, 6)] };
	if (v[0] && rsetsockopt(fd, SOL_SOCKET, SO_RCVBUF, &v[0], sizeof v[0]))
		die("SO_RCVBUF");
	if (v[1] && rsetsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v[1], sizeof v[1]))
		die("SO_SNDBUF");
	if (v[2] && rsetsockopt(fd, SOL_RDMA, RDMA_SQSIZE, &v[2], sizeof v[2]))
		die("RDMA_SQSIZE");
	if (v[3] && rsetsockopt(fd, SOL_RDMA, RDMA_RQSIZE, &v[3], sizeof v[3]))
		die("RDMA_RQSIZE");
	if (v[4] && rsetsockopt(fd, SOL_RDMA, RDMA_INLINE, &v[4], sizeof v[4]))
		die("RDMA_INLINE");
	snprintf(optdesc, sizeof optdesc, "rcvbuf=%d,sndbuf=%d,sq=%d,rq=%d,inline=%d", v[0], v[1],
		 v[2], v[3], v[4]);
	if (!cfg.quiet)
		fprintf(stderr, "rsstress %s %s: options %s\n", IMPL, me ? "server" : "client", optdesc);
	keep_short_sends_inline();
}

static void prepare(int s)
{
	if (cfg.iowrite) {
		int n = 1;
		if (rsetsockopt(s, SOL_RDMA, RDMA_IOMAPSIZE, &n, sizeof n))
			die("RDMA_IOMAPSIZE");
	}
}

static struct sockaddr_in sin_of(const char *a, int port)
{
	struct sockaddr_in s = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (inet_pton(AF_INET, a, &s.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", a);
		exit(64);
	}
	return s;
}

static void client_socket(void)
{
	fd = rsocket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		die("rsocket");
	set_options();
	prepare(fd);
	if (cfg.local) {
		struct sockaddr_in b = sin_of(cfg.local, 0);
		if (rbind(fd, (struct sockaddr *)&b, sizeof b))
			die("rbind");
	}
}

static void connect_or_accept(void)
{
	if (cfg.server) {
		int l = rsocket(AF_INET, SOCK_STREAM, 0);
		if (l < 0)
			die("rsocket");
		int one = 1;
		rsetsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		fd = l;
		set_options(); /* inherited by the accepted socket */
		prepare(l);
		struct sockaddr_in a = sin_of(cfg.addr, cfg.port);
		if (rbind(l, (struct sockaddr *)&a, sizeof a))
			die("rbind");
		if (rlisten(l, 1))
			die("rlisten");
		fd = raccept(l, NULL, NULL);
		if (fd < 0)
			die("raccept");
		rclose(l);
	} else {
		client_socket();
		struct sockaddr_in a = sin_of(cfg.addr, cfg.port);
		int tries = 0;
		while (rconnect(fd, (struct sockaddr *)&a, sizeof a)) {
			/* The server may not listen yet: retry a refused connect for a few seconds. */
			if (errno != ECONNREFUSED || ++tries > 50)
				die("rconnect");
			rclose(fd);
			usleep(100000);
			client_socket();
		}
	}
	if (cfg.iowrite) {
		window = mmap(NULL, WINDOW, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (window == MAP_FAILED)
			die("mmap");
		if (riomap(fd, window, WINDOW, PROT_WRITE, 0, 0) != 0)
			die("riomap");
	}
	if (cfg.mode_poll) {
		struct rng r = rng_for(cfg.seed, 20 + me);
		nonblock_flag = below(&r, 2);
		if (!nonblock_flag && rfcntl(fd, F_SETFL, rfcntl(fd, F_GETFL) | O_NONBLOCK))
			die("O_NONBLOCK");
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: rsstress -s ADDR | -c SERVER [-b LOCAL]  -p PORT -r SEED [-m thread|poll] "
			"[-n BYTES] [-O] [-I] [-u] [-T SECS] [-q] [-P rs|lib] [-W]\n");
	exit(64);
}

int main(int argc, char **argv)
{
	int c, have_seed = 0;
	while ((c = getopt(argc, argv, "s:c:b:p:r:m:n:OIuT:qP:W")) != -1) {
		switch (c) {
		case 's':
			cfg.server = 1;
			cfg.addr = optarg;
			break;
		case 'c':
			cfg.addr = optarg;
			break;
		case 'b':
			cfg.local = optarg;
			break;
		case 'p':
			cfg.port = atoi(optarg);
			break;
		case 'r':
			cfg.seed = strtoull(optarg, NULL, 0);
			have_seed = 1;
			break;
		case 'm':
			if (!strcmp(optarg, "poll"))
				cfg.mode_poll = 1;
			else if (strcmp(optarg, "thread"))
				usage();
			break;
		case 'n':
			cfg.bytes = strtoull(optarg, NULL, 0);
			break;
		case 'O':
			cfg.options = 1;
			break;
		case 'I':
			cfg.iowrite = 0;
			break;
		case 'u':
			cfg.uneven = 1;
			break;
		case 'T':
			cfg.timeout = atoi(optarg);
			break;
		case 'q':
			cfg.quiet = 1;
			break;
		case 'P':
			cfg.peer_librdmacm = !strcmp(optarg, "lib");
			break;
		case 'W':
			cfg.siw = 1;
			break;
		default:
			usage();
		}
	}
	if (!cfg.addr || !cfg.port || !have_seed)
		usage();
	if (cfg.uneven)
		cfg.iowrite = 0;
	me = cfg.server;
	signal(SIGALRM, on_alarm);
	signal(SIGPIPE, SIG_IGN);
	alarm(cfg.timeout);
	make_pattern(cfg.seed);
	rbuf = malloc(2 * MAX_SEND);
	plan_init(&shadow, cfg.seed, !me, dir_bytes(!me), cfg.uneven, cfg.iowrite);
	plan_next(&shadow, &shadow_op);
	connect_or_accept();
	if (cfg.mode_poll)
		run_poll();
	else
		run_threads();
	/* Untouched bytes of the window stay zero: nothing landed where nobody wrote. */
	if (cfg.iowrite) {
		struct plan p;
		struct op o;
		uint8_t *seen = calloc(WINDOW, 1);
		plan_init(&p, cfg.seed, !me, dir_bytes(!me), cfg.uneven, cfg.iowrite);
		for (plan_next(&p, &o); o.kind != OP_END; plan_next(&p, &o))
			if (o.kind == OP_IOWRITE)
				memset(seen + o.win_off, 1, o.size);
		for (uint32_t i = 0; i < WINDOW; i++)
			if (!seen[i] && window[i]) {
				fprintf(stderr, "MISMATCH seed %llu: window byte %u written, no riowrite covers it\n",
					(unsigned long long)cfg.seed, i);
				exit(2);
			}
	}
	/* librdmacm's rclose never returns while a window is still mapped (it loops in riounmap). */
	if (cfg.iowrite && riounmap(fd, window, WINDOW))
		die("riounmap");
	rclose(fd);
	printf("rsstress ok %s %s seed=%llu mode=%s%s opts=%s sent=%llu received=%llu send_calls=%llu "
	       "recv_calls=%llu iowrites=%llu iowrite_bytes=%llu io_checked=%llu\n",
	       IMPL, me ? "server" : "client", (unsigned long long)cfg.seed,
	       cfg.mode_poll ? (nonblock_flag ? "poll/dontwait" : "poll/nonblock") : "thread",
	       cfg.uneven ? ",uneven" : "", optdesc, (unsigned long long)sent,
	       (unsigned long long)received, (unsigned long long)send_calls,
	       (unsigned long long)recv_calls, (unsigned long long)iowrites,
	       (unsigned long long)iowrite_bytes, (unsigned long long)io_checked);
	return 0;
}
