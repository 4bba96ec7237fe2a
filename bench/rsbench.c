/*
 * rsbench: one stream-socket benchmark, built three ways from this one source:
 *
 *   rsbench          against rsocket-rs (installed <rsocket.h>, pkg-config rsocket-rs)
 *   rsbench-rdmacm   -DIMPL_LIBRDMACM: against librdmacm's rsockets (<rdma/rsocket.h>, -lrdmacm)
 *   rsbench-tcp      -DIMPL_TCP: the r* calls mapped to kernel sockets (TCP_NODELAY)
 *
 *   server: rsbench -s ADDR [-p PORT] [-m MODE] [-T SECS]
 *   client: rsbench -c SERVER [-b LOCAL] [-p PORT] [-t TEST[,TEST..]] [-S BYTES] [-N ITERS]
 *                   [-z SIZES] [-B BYTES] [-w WARMUP] [-W SLOTS] [-m MODE] [-T SECS]
 *
 * The client drives the server over one connection: per test it sends a header (test, size,
 * iterations), the test runs, the server answers with its verified byte count and its CPU time.
 *
 * Tests (-t):
 *   pingpong  S bytes client->server, S bytes back, N times; per-iteration latency (p50/p99/mean)
 *   stream    N messages of S bytes client->server back to back; the server receives every byte
 *             (one rrecv per message, like rstream) and answers with a 4-byte ack at the end
 *   sweep     pingpong and stream for every size of -z (iterations scaled down by the -B budget)
 *   iowrite   riowrite (not tcp): the server riomaps a window of W slots of S bytes (PROT_WRITE);
 *             the client riowrites N times S bytes into slot i % W, then rsends an 8-byte note;
 *             on the note the server checks the slot and answers with an 8-byte ack, which frees
 *             the slot (at most W writes ahead of the server)
 *   ioread    rioread (rsocket-rs only): the server riomaps W slots of S pattern bytes with
 *             PROT_READ; the client rioreads slot i % W N times into a buffer it registered
 *             (riomap PROT_NONE) and checks every byte
 *   zcsend    rsend(MSG_ZEROCOPY) (rsocket-rs only): SO_ZEROCOPY on, the client registers W slots
 *             of S pattern bytes (riomap PROT_NONE) and sends slot i % W N times, each slot again
 *             only after the notices (rrecvmsg MSG_ERRQUEUE) of its last send; the server
 *             receives like stream and checks every byte
 *   calls     what the calls themselves cost (spin mode): a pingpong of N x S bytes timing, per
 *             iteration, the rsend and the rrecv that found the reply (TSC, medians), and
 *             halfway through it M rrecv(MSG_DONTWAIT) calls that find nothing (the server waits
 *             for the next ping): the state a busy-polling program is in; reported in ns
 *   -t takes a list (-t iowrite,ioread); -W sets the slots (default 4 MiB / S, 2 .. 16)
 *
 * Data: byte o of each direction's stream is pat(o) (a pseudo-random table with a prime period);
 * the receiver compares every byte and exits 2 on a mismatch. iowrite's windows carry the
 * stream's next S bytes; ioread's and zcsend's slot k holds pat(k * S ..), so consecutive slots
 * differ and a transfer that did not happen (stale data) shows too.
 *
 * Modes (-m), both sides should use the same:
 *   spin   (default) O_NONBLOCK, retry at once on EAGAIN (librdmacm rstream's default mode)
 *   poll   O_NONBLOCK, rpoll() on EAGAIN
 *   block  blocking calls
 *   epoll  O_NONBLOCK, the kernel's epoll_wait on the descriptor on EAGAIN (rsocket-rs and TCP:
 *          librdmacm's descriptors do not become readable with data)
 *
 * CPU: getrusage(RUSAGE_SELF) user+sys over each timed section (all threads of the process), on
 * both sides; the server sends its figure to the client, which reports both and their sum.
 *
 * Output (client): one JSON object per result on stdout, plus a human line starting with "#".
 * Exit status: 0 ok, 1 error, 2 data mismatch, 3 timeout, 64 usage.
 * -X OFFSET (either side): flips one byte of what this side sends, to show the check catches it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#if defined(IMPL_TCP)
#define IMPL "tcp"
#define rsocket socket
#define rbind bind
#define rlisten listen
#define raccept accept
#define rconnect connect
#define rsend send
#define rrecv recv
#define rpoll poll
#define rfcntl fcntl
#define rsetsockopt setsockopt
#define rgetsockopt getsockopt
#define rshutdown shutdown
#define rclose close
#elif defined(IMPL_LIBRDMACM)
#include <rdma/rsocket.h>
#define IMPL "librdmacm"
#define HAVE_RIOWRITE 1
#else
#include <linux/errqueue.h>
#include <rsocket.h>
#define IMPL "rsocket-rs"
#define HAVE_RIOWRITE 1
#define HAVE_RIOREAD 1   /* our extension */
#define HAVE_ZEROCOPY 1  /* MSG_ZEROCOPY from riomap'd memory */
#endif

#define MAGIC 0x52534231u /* "RSB1" */
#define PERIOD 65521u     /* prime: a lost or repeated chunk of any power-of-two size shows */

enum { CMD_PINGPONG = 1, CMD_STREAM = 2, CMD_QUIT = 3, CMD_IOWRITE = 4, CMD_IOREAD = 5, CMD_ZCSEND = 6 };
enum { MODE_SPIN, MODE_POLL, MODE_BLOCK, MODE_EPOLL };
static const char *mode_names[] = { "spin", "poll", "block", "epoll" };

struct hdr {
	uint32_t magic, cmd;
	uint64_t size, iters, warmup; /* warmup: pingpong; the slots of a window: iowrite, ioread, zcsend */
};
struct result {
	uint32_t magic, status;
	uint64_t verified; /* bytes the server compared with the pattern */
	uint64_t cpu_ns;   /* server user+sys over the timed section */
};

static int mode = MODE_SPIN;
static unsigned timeout_s = 60;
static const char *phase = "start";
static uint8_t *pat;       /* pattern table, PERIOD + max size bytes: pat[o % PERIOD + k] = pat(o + k) */
static size_t max_size;
static uint64_t tx_off, rx_off; /* stream offsets of pattern bytes, per direction */
static uint64_t rx_verified;

static void on_alarm(int sig)
{
	(void)sig;
	char msg[256];
	int n = snprintf(msg, sizeof msg,
			 "rsbench(%s): timed out after %u s during %s (pattern bytes sent %llu, received %llu)\n", IMPL,
			 timeout_s, phase, (unsigned long long)tx_off, (unsigned long long)rx_off);
	if (write(2, msg, (size_t)n) < 0) {
	}
	_exit(3);
}

static void die(const char *what)
{
	fprintf(stderr, "rsbench(%s): %s failed during %s: %s\n", IMPL, what, phase, strerror(errno));
	exit(1);
}

static void arm(const char *what)
{
	phase = what;
	alarm(timeout_s);
}

static void make_pattern(size_t maxsz)
{
	max_size = maxsz;
	pat = malloc(PERIOD + maxsz);
	if (!pat)
		die("malloc");
	uint32_t x = 2463534242u;
	for (size_t i = 0; i < PERIOD; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		pat[i] = (uint8_t)(x >> 24);
	}
	for (size_t i = PERIOD; i < PERIOD + maxsz; i++)
		pat[i] = pat[i - PERIOD];
}

/* Wait until fd is ready for `events` (poll mode) or just retry (spin mode). */
static void wait_ready(int fd, short events)
{
	if (mode == MODE_EPOLL) {
		/* One level-triggered set for the process; the descriptor's interest follows the call. */
		static int ep = -1, in_set = -1;
		static uint32_t interest;
		uint32_t want = (events & POLLIN ? EPOLLIN : 0) | (events & POLLOUT ? EPOLLOUT : 0);
		if (ep < 0 && (ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
			die("epoll_create1");
		if (in_set != fd || interest != want) {
			struct epoll_event e = { .events = want, .data.fd = fd };
			/* The descriptor may be new, or a closed one's number again (closing left the set). */
			if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e) &&
			    (errno != ENOENT || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e)))
				die("epoll_ctl");
			in_set = fd;
			interest = want;
		}
		struct epoll_event out;
		if (epoll_wait(ep, &out, 1, -1) < 0 && errno != EINTR) /* the alarm bounds it */
			die("epoll_wait");
		return;
	}
	if (mode != MODE_POLL)
		return;
	struct pollfd p = { .fd = fd, .events = events };
	int r = rpoll(&p, 1, -1); /* the alarm bounds it */
	if (r < 0 && errno != EINTR)
		die("rpoll");
}

static void send_bytes(int fd, const void *b, size_t n)
{
	const uint8_t *p = b;
	while (n) {
		ssize_t r = rsend(fd, p, n, MSG_NOSIGNAL);
		if (r > 0) {
			p += r;
			n -= (size_t)r;
		} else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			wait_ready(fd, POLLOUT);
		} else if (r < 0 && errno == EINTR) {
			continue;
		} else {
			if (r == 0)
				errno = EIO;
			die("rsend");
		}
	}
}

/* Receives exactly n bytes; 0 at once on end of stream before any byte, if eof_ok. */
static size_t recv_bytes(int fd, void *b, size_t n, int eof_ok)
{
	uint8_t *p = b;
	size_t got = 0;
	while (got < n) {
		ssize_t r = rrecv(fd, p + got, n - got, 0);
		if (r > 0) {
			got += (size_t)r;
		} else if (r == 0) {
			if (eof_ok && got == 0)
				return 0;
			fprintf(stderr, "rsbench(%s): peer closed the connection during %s (%zu of %zu bytes)\n", IMPL,
				phase, got, n);
			exit(1);
		} else if (errno == EAGAIN || errno == EWOULDBLOCK) {
			wait_ready(fd, POLLIN);
		} else if (errno != EINTR) {
			die("rrecv");
		}
	}
	return got;
}

static uint64_t corrupt_at = UINT64_MAX; /* -X: fault injection, flip this byte of the sent stream */

/* The next n pattern bytes to send (one byte flipped by -X): the table, or *copy (free it). */
static const uint8_t *pattern_to_send(size_t n, uint8_t **copy)
{
	const uint8_t *src = pat + tx_off % PERIOD;
	*copy = NULL;
	if (corrupt_at >= tx_off && corrupt_at - tx_off < n) {
		*copy = malloc(n);
		if (!*copy)
			die("malloc");
		memcpy(*copy, src, n);
		(*copy)[corrupt_at - tx_off] ^= 0x5a;
		return *copy;
	}
	return src;
}

static void send_pattern(int fd, size_t n)
{
	uint8_t *copy;
	send_bytes(fd, pattern_to_send(n, &copy), n);
	free(copy);
	tx_off += n;
}

/* Checks that buf holds the n pattern bytes from pattern offset off (n <= max_size); `where`
 * names buf's place in the message. */
static void check_pattern(const uint8_t *buf, size_t n, uint64_t off, const char *where, uint64_t base)
{
	const uint8_t *want = pat + off % PERIOD;
	if (memcmp(buf, want, n)) {
		size_t i = 0;
		while (buf[i] == want[i])
			i++;
		fprintf(stderr, "rsbench(%s): DATA MISMATCH during %s at %s %llu: expected 0x%02x, got 0x%02x\n",
			IMPL, phase, where, (unsigned long long)(base + i), want[i], buf[i]);
		exit(2);
	}
}

/* Receives n pattern bytes into buf and checks every one of them. */
static void recv_pattern(int fd, uint8_t *buf, size_t n)
{
	recv_bytes(fd, buf, n, 0);
	check_pattern(buf, n, rx_off, "stream offset", rx_off);
	rx_off += n;
	rx_verified += n;
}

static uint64_t cpu_ns(void)
{
	struct rusage ru;
	if (getrusage(RUSAGE_SELF, &ru))
		die("getrusage");
	return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000ull +
	       (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000ull;
}

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void addr_of(struct sockaddr_in *a, const char *ip, int port)
{
	memset(a, 0, sizeof *a);
	a->sin_family = AF_INET;
	a->sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, ip, &a->sin_addr) != 1) {
		fprintf(stderr, "rsbench: bad IPv4 address %s\n", ip);
		exit(64);
	}
}

static void set_opts(int fd)
{
	int one = 1;
	if (rsetsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one))
		die("rsetsockopt TCP_NODELAY");
}

static void set_mode(int fd)
{
	if (mode == MODE_BLOCK)
		return;
	int fl = rfcntl(fd, F_GETFL, 0);
	if (fl < 0 || rfcntl(fd, F_SETFL, fl | O_NONBLOCK))
		die("rfcntl O_NONBLOCK");
}

/* ---- riowrite, rioread, MSG_ZEROCOPY: windows of `slots` slots of `size` bytes ---- */

#ifdef HAVE_RIOWRITE
static uint8_t *alloc_window(size_t len)
{
	uint8_t *p = aligned_alloc(4096, (len + 4095) / 4096 * 4096);
	if (!p)
		die("aligned_alloc");
	return p;
}

#endif

#ifdef HAVE_RIOREAD
/* ioread's and zcsend's slot k holds pat(k * size ..): consecutive slots differ (prime period). */
static void fill_slots(uint8_t *w, size_t size, uint64_t slots)
{
	for (uint64_t k = 0; k < slots; k++)
		memcpy(w + k * size, pat + (k * size) % PERIOD, size);
}
#endif

static uint64_t default_slots(size_t size)
{
	uint64_t n = (4u << 20) / size;
	return n < 2 ? 2 : n > 16 ? 16 : n;
}

#ifdef HAVE_RIOWRITE
static void iowrite_all(int fd, const uint8_t *p, size_t n, off_t off)
{
	while (n) {
		size_t r = riowrite(fd, p, n, off, 0);
		if (r != (size_t)-1 && r > 0) {
			p += r;
			n -= r;
			off += (off_t)r;
		} else if (r == (size_t)-1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			wait_ready(fd, POLLOUT);
		} else if (r == (size_t)-1 && errno == EINTR) {
			continue;
		} else {
			if (r == 0)
				errno = EIO;
			die("riowrite");
		}
	}
}

/* Server: window of h->warmup slots (PROT_WRITE at offset 0); for each note i from the client,
 * check slot i % slots against the stream's next bytes and ack it. */
static void serve_iowrite(int fd, const struct hdr *h, uint64_t *c0, uint64_t *c1)
{
	size_t size = h->size, len = size * h->warmup;
	uint8_t *w = alloc_window(len);
	memset(w, 0, len);
	arm("iowrite riomap");
	if (riomap(fd, w, len, PROT_WRITE, 0, 0) != 0)
		die("riomap PROT_WRITE");
	uint32_t ready = MAGIC;
	send_bytes(fd, &ready, sizeof ready); /* librdmacm announces the window with the next send */
	arm("iowrite");
	*c0 = cpu_ns();
	for (uint64_t i = 0; i < h->iters; i++) {
		uint64_t note, ack = i + 1;
		recv_bytes(fd, &note, sizeof note, 0);
		if (note != i) {
			fprintf(stderr, "rsbench(%s): server: iowrite note %llu, expected %llu\n", IMPL,
				(unsigned long long)note, (unsigned long long)i);
			exit(1);
		}
		check_pattern(w + (i % h->warmup) * size, size, rx_off, "stream offset", rx_off);
		rx_off += size;
		rx_verified += size;
		send_bytes(fd, &ack, sizeof ack);
	}
	*c1 = cpu_ns();
	if (riounmap(fd, w, len))
		die("riounmap");
	free(w);
}
#endif

#ifdef HAVE_RIOREAD
static void ioread_all(int fd, uint8_t *p, size_t n, off_t off)
{
	while (n) {
		size_t r = rioread(fd, p, n, off, 0);
		if (r != (size_t)-1 && r > 0) {
			p += r;
			n -= r;
			off += (off_t)r;
		} else if (r == (size_t)-1 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
			continue; /* not expected: rioread returns once the data is there */
		} else {
			if (r == 0)
				errno = EIO;
			die("rioread");
		}
	}
}

/* Server: window of h->warmup pattern slots (PROT_READ at offset 0) until the client is done. */
static void serve_ioread(int fd, const struct hdr *h, uint64_t *c0, uint64_t *c1)
{
	size_t len = h->size * h->warmup;
	uint8_t *w = alloc_window(len);
	fill_slots(w, h->size, h->warmup);
	arm("ioread riomap");
	if (riomap(fd, w, len, PROT_READ, 0, 0) != 0)
		die("riomap PROT_READ");
	uint32_t m = MAGIC;
	send_bytes(fd, &m, sizeof m);
	arm("ioread");
	*c0 = cpu_ns();
	recv_bytes(fd, &m, sizeof m, 0);
	*c1 = cpu_ns();
	if (m != MAGIC) {
		fprintf(stderr, "rsbench(%s): server: bad ioread end 0x%08x\n", IMPL, m);
		exit(1);
	}
	if (riounmap(fd, w, len))
		die("riounmap");
	free(w);
}
#endif

/* Server of zcsend (any build: it only receives): message i is slot i % slots, pat(k * size ..). */
static void serve_zcsend(int fd, const struct hdr *h, uint8_t *buf, uint64_t *c0, uint64_t *c1)
{
	uint32_t ack = MAGIC;
	arm("zcsend");
	*c0 = cpu_ns();
	for (uint64_t i = 0; i < h->iters; i++) {
		recv_bytes(fd, buf, h->size, 0);
		check_pattern(buf, h->size, (i % h->warmup) * h->size, "received byte", i * h->size);
		rx_verified += h->size;
	}
	send_bytes(fd, &ack, sizeof ack);
	*c1 = cpu_ns();
}

/* ---- server ---- */

static int serve(const char *addr, int port)
{
	struct sockaddr_in a;
	addr_of(&a, addr, port);
	arm("listen");
	int ls = rsocket(AF_INET, SOCK_STREAM, 0);
	if (ls < 0)
		die("rsocket");
	int one = 1;
	if (rsetsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one))
		die("rsetsockopt SO_REUSEADDR");
	if (rbind(ls, (struct sockaddr *)&a, sizeof a))
		die("rbind");
	if (rlisten(ls, 1))
		die("rlisten");
	printf("READY %s %s:%d mode %s\n", IMPL, addr, port, mode_names[mode]);
	fflush(stdout);
	arm("accept");
	int fd = raccept(ls, NULL, NULL);
	if (fd < 0)
		die("raccept");
	set_opts(fd);
	set_mode(fd);
	uint8_t *buf = NULL;
	unsigned tests = 0;
	for (;;) {
		struct hdr h;
		arm("wait for the next test");
		if (recv_bytes(fd, &h, sizeof h, 1) == 0)
			break; /* client gone without QUIT: fine if it had finished */
		if (h.magic != MAGIC) {
			fprintf(stderr, "rsbench(%s): server: bad header (magic 0x%08x)\n", IMPL, h.magic);
			return 1;
		}
		if (h.cmd == CMD_QUIT)
			break;
		if (h.size == 0 || h.size > (64u << 20)) {
			fprintf(stderr, "rsbench(%s): server: bad size %llu\n", IMPL, (unsigned long long)h.size);
			return 1;
		}
		if (h.cmd >= CMD_IOWRITE && (h.warmup == 0 || h.warmup > 4096 || h.size * h.warmup > (256u << 20))) {
			fprintf(stderr, "rsbench(%s): server: bad slot count %llu\n", IMPL, (unsigned long long)h.warmup);
			return 1;
		}
		if (!buf || h.size > max_size) { /* grow the pattern and buffer to the biggest size yet */
			free(pat);
			free(buf);
			uint64_t keep_tx = tx_off, keep_rx = rx_off;
			make_pattern(h.size);
			tx_off = keep_tx;
			rx_off = keep_rx;
			buf = malloc(h.size);
			if (!buf)
				die("malloc");
		}
		uint64_t v0 = rx_verified, c0, c1;
		struct result res = { .magic = MAGIC };
		if (h.cmd == CMD_PINGPONG) {
			arm("pingpong warm-up");
			for (uint64_t i = 0; i < h.warmup; i++) {
				recv_pattern(fd, buf, h.size);
				send_pattern(fd, h.size);
			}
			arm("pingpong");
			c0 = cpu_ns();
			for (uint64_t i = 0; i < h.iters; i++) {
				recv_pattern(fd, buf, h.size);
				send_pattern(fd, h.size);
			}
			c1 = cpu_ns();
		} else if (h.cmd == CMD_STREAM) {
			arm("stream");
			uint32_t ack = MAGIC;
			c0 = cpu_ns();
			for (uint64_t i = 0; i < h.iters; i++)
				recv_pattern(fd, buf, h.size);
			send_bytes(fd, &ack, sizeof ack);
			c1 = cpu_ns();
		} else if (h.cmd == CMD_ZCSEND) {
			serve_zcsend(fd, &h, buf, &c0, &c1);
#ifdef HAVE_RIOWRITE
		} else if (h.cmd == CMD_IOWRITE) {
			serve_iowrite(fd, &h, &c0, &c1);
#endif
#ifdef HAVE_RIOREAD
		} else if (h.cmd == CMD_IOREAD) {
			serve_ioread(fd, &h, &c0, &c1);
#endif
		} else {
			fprintf(stderr, "rsbench(%s): server: unknown or unsupported test %u\n", IMPL, h.cmd);
			return 1;
		}
		res.verified = rx_verified - v0;
		res.cpu_ns = c1 - c0;
		arm("send result");
		send_bytes(fd, &res, sizeof res);
		tests++;
	}
	alarm(0);
	printf("rsbench(%s) server: %u tests, %llu bytes received and verified\n", IMPL, tests,
	       (unsigned long long)rx_verified);
	rclose(fd);
	rclose(ls);
	free(buf);
	return 0;
}

/* ---- client ---- */

static int connect_to(const char *server, const char *local, int port, int iomap_entries)
{
	struct sockaddr_in d;
	addr_of(&d, server, port);
	arm("connect");
	/* Retry refused connects for a few seconds: the server may still be starting. */
	for (int attempt = 0;; attempt++) {
		int fd = rsocket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0)
			die("rsocket");
#ifdef HAVE_RIOWRITE
		/* Entries for the server's windows (announced into ours): only for the io tests. */
		if (iomap_entries && rsetsockopt(fd, SOL_RDMA, RDMA_IOMAPSIZE, &iomap_entries, sizeof iomap_entries))
			die("rsetsockopt RDMA_IOMAPSIZE");
#else
		(void)iomap_entries;
#endif
		if (local) {
			struct sockaddr_in l;
			addr_of(&l, local, 0);
			if (rbind(fd, (struct sockaddr *)&l, sizeof l))
				die("rbind");
		}
		if (rconnect(fd, (struct sockaddr *)&d, sizeof d) == 0) {
			set_opts(fd);
			set_mode(fd);
			return fd;
		}
		if (errno != ECONNREFUSED || attempt >= 40)
			die("rconnect");
		rclose(fd);
		usleep(250000);
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void get_result(int fd, struct result *r, uint64_t want_verified)
{
	arm("receive result");
	recv_bytes(fd, r, sizeof *r, 0);
	if (r->magic != MAGIC) {
		fprintf(stderr, "rsbench(%s): bad result from server\n", IMPL);
		exit(1);
	}
	if (r->verified != want_verified) {
		fprintf(stderr, "rsbench(%s): server verified %llu bytes, expected %llu\n", IMPL,
			(unsigned long long)r->verified, (unsigned long long)want_verified);
		exit(2);
	}
}

static void run_pingpong(int fd, size_t size, uint64_t iters, uint64_t warmup, uint8_t *buf, uint64_t *lat)
{
	struct hdr h = { MAGIC, CMD_PINGPONG, size, iters, warmup };
	struct result r;
	uint64_t v0 = rx_verified;
	arm("pingpong header");
	send_bytes(fd, &h, sizeof h);
	arm("pingpong warm-up");
	for (uint64_t i = 0; i < warmup; i++) {
		send_pattern(fd, size);
		recv_pattern(fd, buf, size);
	}
	arm("pingpong");
	uint64_t c0 = cpu_ns(), t0 = now_ns(), t = t0;
	for (uint64_t i = 0; i < iters; i++) {
		send_pattern(fd, size);
		recv_pattern(fd, buf, size);
		uint64_t t1 = now_ns();
		lat[i] = t1 - t;
		t = t1;
	}
	uint64_t c1 = cpu_ns();
	get_result(fd, &r, (warmup + iters) * size);
	double total_us = (double)(t - t0) / 1e3, sum = 0;
	for (uint64_t i = 0; i < iters; i++)
		sum += (double)lat[i];
	qsort(lat, iters, sizeof *lat, cmp_u64);
	double p50 = (double)lat[(iters - 1) / 2] / 1e3, p99 = (double)lat[(iters * 99 + 99) / 100 - 1] / 1e3;
	double p90 = (double)lat[(iters * 90 + 99) / 100 - 1] / 1e3;
	double mean = sum / (double)iters / 1e3;
	/* The tail (what a mean, as rstream's usec/xfer, also counts): round trips of 1 ms or
	 * more, how many and their share of the time. */
	uint64_t slow = 0;
	double slow_ns = 0;
	for (uint64_t i = iters; i > 0 && lat[i - 1] >= 1000000; i--, slow++)
		slow_ns += (double)lat[i - 1];
	double msgs = 2.0 * (double)iters;
	double ccpu = (double)(c1 - c0) / 1e3 / msgs, scpu = (double)r.cpu_ns / 1e3 / msgs;
	printf("{\"impl\":\"%s\",\"mode\":\"%s\",\"test\":\"pingpong\",\"size\":%zu,\"iters\":%llu,"
	       "\"p50_us\":%.3f,\"p90_us\":%.3f,\"p99_us\":%.3f,\"mean_us\":%.3f,\"slow_1ms\":%llu,"
	       "\"slow_share\":%.3f,\"total_us\":%.1f,"
	       "\"cpu_client_us_per_msg\":%.3f,\"cpu_server_us_per_msg\":%.3f,\"cpu_us_per_msg\":%.3f,"
	       "\"verified_client_bytes\":%llu,\"verified_server_bytes\":%llu,\"verified\":true}\n",
	       IMPL, mode_names[mode], size, (unsigned long long)iters, p50, p90, p99, mean, (unsigned long long)slow,
	       sum > 0 ? slow_ns / sum : 0.0, total_us, ccpu, scpu,
	       ccpu + scpu, (unsigned long long)(rx_verified - v0), (unsigned long long)r.verified);
	printf("# %-10s %-5s pingpong %8zu B x %-6llu p50 %9.2f us  p99 %9.2f us  mean %9.2f us  cpu %7.2f us/msg "
	       "(client %.2f + server %.2f)\n",
	       IMPL, mode_names[mode], size, (unsigned long long)iters, p50, p99, mean, ccpu + scpu, ccpu, scpu);
	fflush(stdout);
}

#if defined(__x86_64__)
#include <x86intrin.h>
static uint64_t tsc(void) { return __rdtsc(); }
#else
static uint64_t tsc(void) { return now_ns(); }
#endif

/* Per-call costs (see "calls" above): the pingpong with the rsend and the hitting rrecv timed,
 * and halfway through it the misses, while the server waits for the next ping (after N / 2
 * round trips the connection is in the state a busy-polling program keeps it in). In TSC
 * ticks, converted with the clock over the whole test. */
static void run_calls(int fd, size_t size, uint64_t iters, uint8_t *buf, uint64_t *lat)
{
	struct hdr h = { MAGIC, CMD_PINGPONG, size, iters, 1 };
	struct result r;
	const char *m_env = getenv("RSBENCH_MISSES"); /* for profiling the miss path */
	const uint64_t misses = m_env ? strtoull(m_env, NULL, 10) : 20000;
	arm("calls header");
	send_bytes(fd, &h, sizeof h);
	arm("calls");
	uint64_t ns0 = now_ns(), k0 = tsc(), km0 = 0, km1 = 0;
	send_pattern(fd, size); /* the server's warm-up iteration */
	recv_pattern(fd, buf, size);
	uint64_t *snd = malloc(iters * sizeof *snd), *hit = malloc(iters * sizeof *hit), spins = 0;
	if (!snd || !hit)
		die("malloc");
	for (uint64_t i = 0; i < iters; i++) {
		if (i == iters / 2) {
			km0 = tsc();
			for (uint64_t m = 0; m < misses; m++) {
				ssize_t n = rrecv(fd, buf, size, MSG_DONTWAIT);
				if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
					die("rrecv on an idle connection");
			}
			km1 = tsc();
		}
		uint64_t a = tsc();
		send_pattern(fd, size);
		uint64_t b = tsc(), c = b;
		size_t got = 0;
		while (got < size) {
			c = tsc();
			ssize_t n = rrecv(fd, buf + got, size - got, MSG_DONTWAIT);
			if (n > 0)
				got += (size_t)n;
			else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
				die("rrecv");
			else
				spins++;
		}
		uint64_t d = tsc();
		check_pattern(buf, size, rx_off, "stream offset", rx_off);
		rx_off += size;
		rx_verified += size;
		snd[i] = b - a;
		hit[i] = d - c;
		lat[i] = d - a;
	}
	uint64_t k2 = tsc(), ns1 = now_ns();
	get_result(fd, &r, (iters + 1) * size);
	double per = (double)(ns1 - ns0) / (double)(k2 - k0); /* ns per tick */
	qsort(snd, iters, sizeof *snd, cmp_u64);
	qsort(hit, iters, sizeof *hit, cmp_u64);
	qsort(lat, iters, sizeof *lat, cmp_u64);
	double miss_ns = (double)(km1 - km0) / (double)misses * per, send_ns = (double)snd[(iters - 1) / 2] * per,
	       hit_ns = (double)hit[(iters - 1) / 2] * per, rtt_us = (double)lat[(iters - 1) / 2] * per / 1e3;
	printf("{\"impl\":\"%s\",\"mode\":\"%s\",\"test\":\"calls\",\"size\":%zu,\"iters\":%llu,"
	       "\"miss_ns\":%.0f,\"send_ns\":%.0f,\"hit_ns\":%.0f,\"misses_per_iter\":%.1f,\"p50_us\":%.3f,"
	       "\"verified\":true}\n",
	       IMPL, mode_names[mode], size, (unsigned long long)iters, miss_ns, send_ns, hit_ns,
	       (double)spins / (double)iters, rtt_us);
	printf("# %-10s calls %6zu B: miss %6.0f ns  send %6.0f ns  hit %6.0f ns  (p50; %.1f misses per reply, "
	       "round trip p50 %.2f us)\n",
	       IMPL, size, miss_ns, send_ns, hit_ns, (double)spins / (double)iters, rtt_us);
	fflush(stdout);
	free(snd);
	free(hit);
}

static void run_stream(int fd, size_t size, uint64_t iters)
{
	struct hdr h = { MAGIC, CMD_STREAM, size, iters, 0 };
	struct result r;
	uint32_t ack;
	arm("stream header");
	send_bytes(fd, &h, sizeof h);
	arm("stream");
	uint64_t c0 = cpu_ns(), t0 = now_ns();
	for (uint64_t i = 0; i < iters; i++)
		send_pattern(fd, size);
	recv_bytes(fd, &ack, sizeof ack, 0);
	uint64_t t1 = now_ns(), c1 = cpu_ns();
	if (ack != MAGIC) {
		fprintf(stderr, "rsbench(%s): bad stream ack 0x%08x\n", IMPL, ack);
		exit(1);
	}
	get_result(fd, &r, iters * size);
	double secs = (double)(t1 - t0) / 1e9, n = (double)iters;
	double mbps = (double)size * n / secs / 1e6, us_msg = secs * 1e6 / n, msgs_s = n / secs;
	double ccpu = (double)(c1 - c0) / 1e3 / n, scpu = (double)r.cpu_ns / 1e3 / n;
	printf("{\"impl\":\"%s\",\"mode\":\"%s\",\"test\":\"stream\",\"size\":%zu,\"iters\":%llu,"
	       "\"seconds\":%.6f,\"MBps\":%.3f,\"Gbps\":%.4f,\"us_per_msg\":%.3f,\"msgs_per_s\":%.1f,"
	       "\"cpu_client_us_per_msg\":%.3f,\"cpu_server_us_per_msg\":%.3f,\"cpu_us_per_msg\":%.3f,"
	       "\"verified_server_bytes\":%llu,\"verified\":true}\n",
	       IMPL, mode_names[mode], size, (unsigned long long)iters, secs, mbps, mbps * 8 / 1e3, us_msg, msgs_s,
	       ccpu, scpu, ccpu + scpu, (unsigned long long)r.verified);
	printf("# %-10s %-5s stream   %8zu B x %-6llu %9.2f MB/s  %9.2f us/msg  %10.0f msg/s  cpu %7.2f us/msg "
	       "(client %.2f + server %.2f)\n",
	       IMPL, mode_names[mode], size, (unsigned long long)iters, mbps, us_msg, msgs_s, ccpu + scpu, ccpu, scpu);
	fflush(stdout);
}

#ifdef HAVE_RIOWRITE
/* One bandwidth result of iowrite, ioread or zcsend (`extra`: more JSON members, or ""). */
static void report_bw(const char *test, size_t size, uint64_t iters, uint64_t slots, uint64_t ns, uint64_t ccpu_ns,
		      uint64_t scpu_ns, uint64_t vserver, uint64_t vclient, const char *extra)
{
	double secs = (double)ns / 1e9, n = (double)iters;
	double mbps = (double)size * n / secs / 1e6, us_msg = secs * 1e6 / n, msgs_s = n / secs;
	double ccpu = (double)ccpu_ns / 1e3 / n, scpu = (double)scpu_ns / 1e3 / n;
	printf("{\"impl\":\"%s\",\"mode\":\"%s\",\"test\":\"%s\",\"size\":%zu,\"iters\":%llu,\"slots\":%llu,"
	       "\"seconds\":%.6f,\"MBps\":%.3f,\"Gbps\":%.4f,\"us_per_msg\":%.3f,\"msgs_per_s\":%.1f,"
	       "\"cpu_client_us_per_msg\":%.3f,\"cpu_server_us_per_msg\":%.3f,\"cpu_us_per_msg\":%.3f,"
	       "\"verified_server_bytes\":%llu,\"verified_client_bytes\":%llu%s,\"verified\":true}\n",
	       IMPL, mode_names[mode], test, size, (unsigned long long)iters, (unsigned long long)slots, secs, mbps,
	       mbps * 8 / 1e3, us_msg, msgs_s, ccpu, scpu, ccpu + scpu, (unsigned long long)vserver,
	       (unsigned long long)vclient, extra);
	printf("# %-10s %-5s %-8s %8zu B x %-6llu %9.2f MB/s  %9.2f us/msg  %10.0f msg/s  cpu %7.2f us/msg "
	       "(client %.2f + server %.2f), %llu slots\n",
	       IMPL, mode_names[mode], test, size, (unsigned long long)iters, mbps, us_msg, msgs_s, ccpu + scpu, ccpu,
	       scpu, (unsigned long long)slots);
	fflush(stdout);
}

static void start_io_test(int fd, uint32_t cmd, const char *what, size_t size, uint64_t iters, uint64_t slots)
{
	struct hdr h = { MAGIC, cmd, size, iters, slots };
	uint32_t ready;
	arm(what);
	send_bytes(fd, &h, sizeof h);
	if (cmd == CMD_ZCSEND)
		return;
	recv_bytes(fd, &ready, sizeof ready, 0); /* the server's window is mapped (and announced) */
	if (ready != MAGIC) {
		fprintf(stderr, "rsbench(%s): bad ready word 0x%08x\n", IMPL, ready);
		exit(1);
	}
}

static void recv_ack(int fd, uint64_t *acked)
{
	uint64_t a;
	recv_bytes(fd, &a, sizeof a, 0);
	if (a != *acked + 1) {
		fprintf(stderr, "rsbench(%s): iowrite ack %llu after %llu\n", IMPL, (unsigned long long)a,
			(unsigned long long)*acked);
		exit(1);
	}
	*acked = a;
}

/* riowrite S bytes into slot i % slots, an 8-byte note by rsend, at most `slots` not yet acked. */
static void run_iowrite(int fd, size_t size, uint64_t iters, uint64_t slots)
{
	struct result r;
	start_io_test(fd, CMD_IOWRITE, "iowrite: wait for the server's window", size, iters, slots);
	arm("iowrite");
	uint64_t acked = 0, c0 = cpu_ns(), t0 = now_ns();
	for (uint64_t i = 0; i < iters; i++) {
		while (i - acked >= slots)
			recv_ack(fd, &acked);
		uint8_t *copy;
		iowrite_all(fd, pattern_to_send(size, &copy), size, (off_t)((i % slots) * size));
		free(copy);
		tx_off += size;
		send_bytes(fd, &i, sizeof i);
	}
	while (acked < iters)
		recv_ack(fd, &acked);
	uint64_t t1 = now_ns(), c1 = cpu_ns();
	get_result(fd, &r, iters * size);
	report_bw("iowrite", size, iters, slots, t1 - t0, c1 - c0, r.cpu_ns, r.verified, 0, "");
}
#endif

#ifdef HAVE_RIOREAD
/* rioread slot i % slots into one registered buffer, checking every byte. */
static void run_ioread(int fd, size_t size, uint64_t iters, uint64_t slots)
{
	struct result r;
	uint8_t *dst = alloc_window(size);
	memset(dst, 0, size);
	start_io_test(fd, CMD_IOREAD, "ioread: wait for the server's window", size, iters, slots);
	if (riomap(fd, dst, size, PROT_NONE, 0, -1) == -1)
		die("riomap PROT_NONE (rioread destination)");
	arm("ioread");
	uint64_t verified = 0, c0 = cpu_ns(), t0 = now_ns();
	for (uint64_t i = 0; i < iters; i++) {
		uint64_t k = i % slots;
		ioread_all(fd, dst, size, (off_t)(k * size));
		check_pattern(dst, size, k * size, "byte of the window", k * size);
		verified += size;
	}
	uint64_t t1 = now_ns(), c1 = cpu_ns();
	uint32_t end = MAGIC;
	send_bytes(fd, &end, sizeof end);
	get_result(fd, &r, 0);
	if (riounmap(fd, dst, size))
		die("riounmap");
	free(dst);
	report_bw("ioread", size, iters, slots, t1 - t0, c1 - c0, r.cpu_ns, 0, verified, "");
}
#endif

#ifdef HAVE_ZEROCOPY
#define ZC_RING 65536 /* MSG_ZEROCOPY calls in flight at most */
static struct {
	uint64_t next_id, low; /* ids handed out on this connection; every id below low was notified */
	uint64_t notices, copied; /* of the current test */
	uint8_t done[ZC_RING];
} zc;

/* Reads the notices that wait (rrecvmsg MSG_ERRQUEUE); with `wait`, at least one. */
static void zc_reap(int fd, int wait)
{
	for (;;) {
		char control[128];
		struct msghdr msg;
		memset(&msg, 0, sizeof msg);
		msg.msg_control = control;
		msg.msg_controllen = sizeof control;
		if (rrecvmsg(fd, &msg, MSG_ERRQUEUE) < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				if (!wait)
					return;
				if (mode != MODE_SPIN) { /* POLLERR while a notice waits */
					struct pollfd p = { .fd = fd, .events = 0 };
					if (rpoll(&p, 1, -1) < 0 && errno != EINTR)
						die("rpoll for POLLERR");
				}
				continue;
			}
			if (errno == EINTR)
				continue;
			die("rrecvmsg(MSG_ERRQUEUE)");
		}
		struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
		struct sock_extended_err e;
		if (!cm || cm->cmsg_level != SOL_IP || cm->cmsg_type != IP_RECVERR) {
			fprintf(stderr, "rsbench(%s): MSG_ERRQUEUE message without IP_RECVERR\n", IMPL);
			exit(1);
		}
		memcpy(&e, CMSG_DATA(cm), sizeof e);
		if (e.ee_origin != SO_EE_ORIGIN_ZEROCOPY || e.ee_errno != 0 || e.ee_data < e.ee_info) {
			fprintf(stderr, "rsbench(%s): not a zero-copy notice: origin %u errno %u ids %u..%u\n", IMPL,
				e.ee_origin, e.ee_errno, e.ee_info, e.ee_data);
			exit(1);
		}
		zc.notices++;
		for (uint64_t id = e.ee_info; id <= e.ee_data; id++) {
			if (id < zc.low || id >= zc.next_id || zc.done[id % ZC_RING]) {
				fprintf(stderr, "rsbench(%s): notice for id %llu, not in flight (%llu..%llu)\n", IMPL,
					(unsigned long long)id, (unsigned long long)zc.low,
					(unsigned long long)zc.next_id);
				exit(1);
			}
			zc.done[id % ZC_RING] = 1;
			if (e.ee_code == SO_EE_CODE_ZEROCOPY_COPIED)
				zc.copied++;
		}
		while (zc.low < zc.next_id && zc.done[zc.low % ZC_RING])
			zc.done[zc.low++ % ZC_RING] = 0;
		wait = 0;
	}
}

/* rsend(MSG_ZEROCOPY) of all n bytes; every call that sends something gets the next id. */
static void zc_send(int fd, const uint8_t *p, size_t n)
{
	while (n) {
		if (zc.next_id - zc.low >= ZC_RING)
			zc_reap(fd, 1);
		ssize_t r = rsend(fd, p, n, MSG_ZEROCOPY | MSG_NOSIGNAL);
		if (r > 0) {
			zc.next_id++;
			p += r;
			n -= (size_t)r;
		} else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			zc_reap(fd, 0); /* else rpoll would see POLLERR at once */
			wait_ready(fd, POLLOUT);
		} else if (r < 0 && errno == EINTR) {
			continue;
		} else {
			if (r == 0)
				errno = EIO;
			die("rsend(MSG_ZEROCOPY)");
		}
	}
}

/* rsend(MSG_ZEROCOPY) slot i % slots of a riomap'd (PROT_NONE) buffer, each slot again only
 * once the notices of its last send came; the time ends at the server's ack and the last notice. */
static void run_zcsend(int fd, size_t size, uint64_t iters, uint64_t slots)
{
	struct result r;
	int one = 1;
	uint32_t ack;
	size_t len = size * slots;
	uint8_t *src = alloc_window(len);
	uint64_t *last = calloc(slots, sizeof *last); /* per slot: the id after its last send's */
	if (!last)
		die("calloc");
	fill_slots(src, size, slots);
	arm("zcsend set-up");
	if (rsetsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one))
		die("rsetsockopt SO_ZEROCOPY");
	if (riomap(fd, src, len, PROT_NONE, 0, -1) == -1)
		die("riomap PROT_NONE (zero-copy source)");
	zc.notices = zc.copied = 0; /* the ids go on from the last zcsend on this connection */
	uint64_t id0 = zc.next_id;
	start_io_test(fd, CMD_ZCSEND, "zcsend header", size, iters, slots);
	arm("zcsend");
	uint64_t c0 = cpu_ns(), t0 = now_ns();
	for (uint64_t i = 0; i < iters; i++) {
		uint64_t k = i % slots;
		while (zc.low < last[k])
			zc_reap(fd, 1);
		zc_send(fd, src + k * size, size);
		last[k] = zc.next_id;
	}
	while (zc.low < zc.next_id)
		zc_reap(fd, 1);
	recv_bytes(fd, &ack, sizeof ack, 0);
	uint64_t t1 = now_ns(), c1 = cpu_ns();
	if (ack != MAGIC) {
		fprintf(stderr, "rsbench(%s): bad zcsend ack 0x%08x\n", IMPL, ack);
		exit(1);
	}
	get_result(fd, &r, iters * size);
	if (zc.copied) {
		fprintf(stderr,
			"rsbench(%s): %llu of %llu MSG_ZEROCOPY calls were copied (SO_EE_CODE_ZEROCOPY_COPIED), "
			"though the buffer is riomap'd\n",
			IMPL, (unsigned long long)zc.copied, (unsigned long long)(zc.next_id - id0));
		exit(1);
	}
	if (riounmap(fd, src, len))
		die("riounmap");
	free(src);
	free(last);
	char extra[96];
	snprintf(extra, sizeof extra, ",\"zc_calls\":%llu,\"zc_notices\":%llu", (unsigned long long)(zc.next_id - id0),
		 (unsigned long long)zc.notices);
	report_bw("zcsend", size, iters, slots, t1 - t0, c1 - c0, r.cpu_ns, r.verified, 0, extra);
}
#endif

static uint64_t scaled(uint64_t iters, uint64_t budget, size_t size, uint64_t floor)
{
	uint64_t n = budget / size;
	if (n > iters)
		n = iters;
	return n < floor ? floor : n;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: rsbench -s ADDR [-p PORT] [-m spin|poll|block] [-T SECS]\n"
		"       rsbench -c SERVER [-b LOCAL] [-p PORT] [-t TEST[,TEST...]] [-S BYTES] [-N ITERS]\n"
		"               [-z SIZE,SIZE,...] [-B BUDGET_BYTES] [-w WARMUP] [-W SLOTS] [-m spin|poll|block] [-T SECS]\n"
		"       TEST: pingpong, calls, stream, sweep, iowrite (riowrite; not tcp), ioread (rioread) and zcsend\n"
		"             (rsend MSG_ZEROCOPY): the last two rsocket-rs only\n"
		"       -X OFFSET (either side): fault injection, flip byte OFFSET of what this side sends\n");
	exit(64);
}

static size_t parse_size(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (*end == 'k' || *end == 'K')
		v <<= 10, end++;
	else if (*end == 'm' || *end == 'M')
		v <<= 20, end++;
	if (errno || end == s || *end || v == 0 || v > (64u << 20)) {
		fprintf(stderr, "rsbench: bad size '%s' (1 .. 64M)\n", s);
		exit(64);
	}
	return (size_t)v;
}

int main(int argc, char **argv)
{
	const char *server_addr = NULL, *peer = NULL, *local = NULL, *test = "pingpong", *sizes = NULL;
	int port = 7471, opt;
	size_t size = 64;
	uint64_t iters = 1000, budget = 64ull << 20, warmup = (uint64_t)-1, slots = 0;

	while ((opt = getopt(argc, argv, "s:c:b:p:t:S:N:z:B:w:W:m:T:X:h")) != -1) {
		switch (opt) {
		case 's': server_addr = optarg; break;
		case 'c': peer = optarg; break;
		case 'b': local = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 't': test = optarg; break;
		case 'S': size = parse_size(optarg); break;
		case 'N': iters = strtoull(optarg, NULL, 0); break;
		case 'z': sizes = optarg; break;
		case 'B': budget = parse_size(optarg); break;
		case 'w': warmup = strtoull(optarg, NULL, 0); break;
		case 'W':
			slots = strtoull(optarg, NULL, 0);
			if (slots < 2 || slots > 4096)
				usage();
			break;
		case 'T': timeout_s = (unsigned)atoi(optarg); break;
		case 'X': corrupt_at = strtoull(optarg, NULL, 0); break;
		case 'm':
			if (!strcmp(optarg, "spin"))
				mode = MODE_SPIN;
			else if (!strcmp(optarg, "poll"))
				mode = MODE_POLL;
			else if (!strcmp(optarg, "block"))
				mode = MODE_BLOCK;
			else if (!strcmp(optarg, "epoll"))
				mode = MODE_EPOLL;
			else
				usage();
			break;
		default: usage();
		}
	}
	if (optind != argc || !!server_addr == !!peer || iters == 0 || timeout_s == 0 || port <= 0 || port > 65535)
		usage();

	struct sigaction sa = { .sa_handler = on_alarm };
	sigaction(SIGALRM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN); /* a dead peer shows as EPIPE from rsend, reported by die() */

	if (server_addr) {
		make_pattern(64);
		return serve(server_addr, port);
	}

	/* The list of (test, size) pairs to run. */
	size_t list[32];
	int nsizes = 0, do_pp = 0, do_calls = 0, do_st = 0, do_sweep = 0, do_iow = 0, do_ior = 0, do_zc = 0;
	char *tests = strdup(test);
	for (char *tok = strtok(tests, ","); tok; tok = strtok(NULL, ",")) {
		if (!strcmp(tok, "pingpong"))
			do_pp = 1;
		else if (!strcmp(tok, "calls"))
			do_calls = 1;
		else if (!strcmp(tok, "stream"))
			do_st = 1;
		else if (!strcmp(tok, "sweep"))
			do_sweep = do_pp = do_st = 1;
		else if (!strcmp(tok, "iowrite"))
			do_iow = 1;
		else if (!strcmp(tok, "ioread"))
			do_ior = 1;
		else if (!strcmp(tok, "zcsend"))
			do_zc = 1;
		else
			usage();
	}
	free(tests);
	const char *missing = NULL;
#ifndef HAVE_RIOWRITE
	if (do_iow)
		missing = "iowrite (riowrite)";
#endif
#ifndef HAVE_RIOREAD
	if (do_ior)
		missing = "ioread (rioread)";
#endif
#ifndef HAVE_ZEROCOPY
	if (do_zc)
		missing = "zcsend (MSG_ZEROCOPY from riomap'd memory)";
#endif
	if (missing) {
		fprintf(stderr, "rsbench(%s): test %s is not available for %s\n", IMPL, missing, IMPL);
		exit(64);
	}
	if (do_sweep || sizes) {
		char *copy = strdup(sizes ? sizes : "16,64,256,1k,4k,16k,64k,256k,1m");
		for (char *tok = strtok(copy, ","); tok; tok = strtok(NULL, ",")) {
			if (nsizes == 32)
				usage();
			list[nsizes++] = parse_size(tok);
		}
		free(copy);
	} else {
		list[nsizes++] = size;
	}
	size_t biggest = 0;
	for (int i = 0; i < nsizes; i++)
		if (list[i] > biggest)
			biggest = list[i];
	make_pattern(biggest);
	uint8_t *buf = malloc(biggest);
	uint64_t *lat = malloc(iters * sizeof *lat);
	if (!buf || !lat)
		die("malloc");

	int fd = connect_to(peer, local, port, do_iow || do_ior ? 2 : 0);
	for (int i = 0; i < nsizes; i++) {
		size_t s = list[i];
		int sweep = nsizes > 1 || do_sweep;
		uint64_t n = sweep ? scaled(iters, budget, s, 20) : iters, w = slots ? slots : default_slots(s);
		(void)w; /* tcp: no io tests */
		if (do_pp) {
			uint64_t n = sweep ? scaled(iters, budget / 4, s, 20) : iters;
			uint64_t w = warmup != (uint64_t)-1 ? warmup : (n / 10 < 100 ? n / 10 : 100);
			if (w == 0)
				w = 1;
			run_pingpong(fd, s, n, w, buf, lat);
		}
		if (do_calls)
			run_calls(fd, s, n, buf, lat);
		if (do_st)
			run_stream(fd, s, n);
#ifdef HAVE_RIOWRITE
		if (do_iow)
			run_iowrite(fd, s, n, w);
#endif
#ifdef HAVE_RIOREAD
		if (do_ior)
			run_ioread(fd, s, n, w);
#endif
#ifdef HAVE_ZEROCOPY
		if (do_zc)
			run_zcsend(fd, s, n, w);
#endif
	}
	struct hdr q = { MAGIC, CMD_QUIT, 0, 0, 0 };
	arm("quit");
	send_bytes(fd, &q, sizeof q);
	alarm(0);
	rclose(fd);
	free(buf);
	free(lat);
	free(pat);
	return 0;
}
