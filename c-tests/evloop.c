/*
 * evloop: an event loop that waits on rsocket descriptors with the kernel's own epoll, poll or
 * select, next to a pipe and a timerfd. The only r-calls in the loop are raccept, rconnect,
 * rsend, rrecv (and rshutdown/rclose at the end of a connection); no rpoll, no rselect.
 *
 *   server: evloop -s -b 10.10.0.1 -p 7000 [-m epoll|poll|select] [-n conns]
 *   client: evloop -c 10.10.0.1 -b 10.10.0.2 -p 7000 [-m epoll|poll|select] [-n conns]
 *   -K: the same over kernel TCP sockets (to check the test itself; under the preload,
 *      bin/rsocket-run, these plain calls are what it turns into RDMA)
 *   -X (client, one connection): read until the peer dies; poll() must report POLLERR or
 *      POLLHUP and rrecv ECONNRESET
 *   -I: EINTR. SIGALRM every ALRM_US to the loop's thread, its handler installed without
 *      SA_RESTART, interrupts epoll_wait/poll/select and the blocking calls (waitpid, the
 *      blocking sends of -X, the poll(2) checks); every site counts EINTR and carries on, and
 *      a server that never saw one fails (client and -X: counted only). -B (client, with -I): a blocking recv on a connection the
 *      peer sends nothing on yet must fail with EINTR (a kernel socket's answer to a handler
 *      without SA_RESTART), within PROBE_S seconds.
 *   -D (with -K): dup'ed descriptors; connection i is served through a copy of its descriptor
 *      (see use_copy: dup, dup3 onto a number in use, F_DUPFD_CLOEXEC with both kept).
 *   -F (with -K): fork while connections are live (see maybe_fork): a child that _exits at
 *      once, one that execs this program's check mode (-Z: the close-on-exec descriptors are
 *      gone, the others open, nothing else leaked), one that execs /bin/sh -c 'exit 0', one
 *      that closes every inherited connection before it _exits; the loop and the data must not
 *      notice. Half the connections are made SOCK_CLOEXEC (socket, accept4).
 *
 * Each client connection sends a header (its seed and length) and then a stream in random
 * chunk sizes, keeping at most WINDOW bytes unanswered; the server checks the stream and
 * echoes it; the client checks the echo. Then the client shuts down its side (the server must
 * see EPOLLRDHUP/POLLRDHUP and end of stream), the server echoes the rest and closes, and the
 * client must see end of stream and POLLHUP. Non-blocking connects wait for POLLOUT.
 *
 * With epoll, connection i is registered level triggered (i % 4 == 0, reading one chunk per
 * wake-up so that only the level brings it back), edge triggered (1: everything until EAGAIN),
 * one-shot (2: re-armed after each wake-up), or in a nested epoll set (3). The listener, a pipe
 * (a byte per finished connection, counted) and a timerfd (the watchdog: no progress for
 * STALL_S seconds fails the run) are in the same set.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <rsocket.h>

#define MAXC 256
#define WINDOW (64 * 1024)
#define BUFSZ (WINDOW + 16)
#define STALL_S 20
#define ALRM_US 2000 /* -I: the SIGALRM period */
#define PROBE_S 5    /* -B: how long a blocking recv may ignore the signals */
#define CHILD_S 30   /* -F: how long a forked child may take to exit */

static int (*s_socket)(int, int, int) = rsocket;
static int (*s_bind)(int, const struct sockaddr *, socklen_t) = rbind;
static int (*s_listen)(int, int) = rlisten;
static int (*s_accept)(int, struct sockaddr *, socklen_t *) = raccept;
static int (*s_connect)(int, const struct sockaddr *, socklen_t) = rconnect;
static ssize_t (*s_send)(int, const void *, size_t, int) = rsend;
static ssize_t (*s_recv)(int, void *, size_t, int) = rrecv;
static int (*s_shutdown)(int, int) = rshutdown;
static int (*s_close)(int) = rclose;
static int (*s_fcntl)(int, int, ...) = rfcntl;
static const char *impl = "rsocket-rs";

enum { M_EPOLL, M_POLL, M_SELECT };
static int mode = M_EPOLL;
static const char *mode_name[] = { "epoll", "poll", "select" };

struct conn {
	int fd;  /* waited on and read from */
	int wfd; /* written and shut down through: fd, or with -D variant 3 another copy */
	int cx, wcx; /* -F: FD_CLOEXEC expected on fd, on wfd */
	int idx;
	int kind; /* epoll: 0 level, 1 edge, 2 one-shot, 3 nested */
	int connecting;
	uint32_t seed;
	uint64_t total;      /* stream bytes after the header */
	uint64_t sent, rcvd; /* client: header + stream sent / echo received and checked */
	/* server: bytes received (header included) and the echo backlog */
	uint8_t buf[BUFSZ];
	size_t blen, boff;
	int got_hdr;
	int eof, done;
	uint8_t hdr[8];
};

static struct conn *conns[MAXC];
static int nconn = 16, ndone, server, xmode, next_idx;
static int kmode, opt_eintr, opt_block, opt_dup, opt_fork;
static struct sockaddr_in peer;
static uint64_t progress;
static unsigned rnd_state = 12345;

static unsigned rnd(void)
{
	rnd_state = rnd_state * 1103515245u + 12345u;
	return rnd_state >> 8;
}

static void die(const char *what)
{
	fprintf(stderr, "evloop %s %s: %s: %s\n", impl, server ? "server" : "client", what, strerror(errno));
	exit(1);
}

static void fail(const char *fmt, int a, long long b)
{
	fprintf(stderr, "evloop %s %s: FAIL: ", impl, server ? "server" : "client");
	fprintf(stderr, fmt, a, b);
	fprintf(stderr, "\n");
	exit(1);
}

/* ---- -I: signals ------------------------------------------------------------------------- */
static volatile sig_atomic_t signals, probing, probe_ticks;
static long eintr_wait, eintr_block, eintr_io; /* EINTR seen: waits, blocking calls, socket I/O */

static void on_alarm(int sig)
{
	(void)sig;
	signals++;
	/* -B: the blocking recv is still blocked after PROBE_S seconds of signals; nothing but
	 * _exit can end it from here (async-signal-safe calls only). */
	if (probing && ++probe_ticks > PROBE_S * (1000000 / ALRM_US)) {
		static const char m[] = "evloop: FAIL: a blocking recv was not interrupted by SIGALRM (no EINTR)\n";
		if (write(2, m, sizeof(m) - 1) < 0)
			_exit(4);
		_exit(3);
	}
}

static void start_alarm(void)
{
	/* No SA_RESTART: every slow call the signal lands in fails with EINTR. */
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = 0 };
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGALRM, &sa, NULL))
		die("sigaction");
	/* To this thread, the one that runs the loop: a process-wide SIGALRM goes to any thread
	 * that does not block it, the library's own among them, and the loop then saw no EINTR in
	 * about half the runs. */
	struct sigevent sev;
	memset(&sev, 0, sizeof sev);
	sev.sigev_notify = SIGEV_THREAD_ID;
	sev.sigev_signo = SIGALRM;
	sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
	timer_t t;
	struct itimerspec it = { .it_interval = { 0, ALRM_US * 1000 }, .it_value = { 0, ALRM_US * 1000 } };
	if (timer_create(CLOCK_MONOTONIC, &sev, &t) || timer_settime(t, 0, &it, NULL))
		die("timer_create/timer_settime");
}

/* poll(2) on one descriptor, retried after EINTR (counted as a blocking call's) for what is left
 * of ms: restarted whole, a bound would never expire under a signal every ALRM_US. */
static int poll1(struct pollfd *p, int ms)
{
	struct timespec t0, t;
	int n, left = ms;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	while ((n = poll(p, 1, left)) < 0 && errno == EINTR) {
		eintr_block++;
		if (ms < 0)
			continue;
		clock_gettime(CLOCK_MONOTONIC, &t);
		long spent = (t.tv_sec - t0.tv_sec) * 1000L + (t.tv_nsec - t0.tv_nsec) / 1000000L;
		left = spent >= ms ? 0 : ms - (int)spent;
	}
	return n;
}

/* Byte `off` of the stream of connection `seed` (the header is bytes 0..7). */
static uint8_t pat(uint32_t seed, uint64_t off)
{
	uint64_t x = (off + 1) * 0x9E3779B97F4A7C15ull ^ seed;
	x ^= x >> 29;
	return (uint8_t)(x * 0xBF58476D1CE4E5B9ull >> 56);
}

static uint8_t stream_byte(struct conn *c, uint64_t off)
{
	if (off < 8)
		return c->hdr[off];
	return pat(c->seed, off - 8);
}

/* ---- the wait set ---------------------------------------------------------------------- */
static int ep = -1, inner = -1, pipefd[2], tfd, lfd = -1;
static int nested_registered;

static uint32_t wanted(struct conn *c)
{
	uint32_t ev = 0;
	if (c->done)
		return 0;
	if (c->connecting)
		return EPOLLOUT;
	if (!c->eof)
		ev |= EPOLLIN | EPOLLRDHUP;
	if (server) {
		if (c->blen > c->boff)
			ev |= EPOLLOUT;
	} else if (c->sent < c->total + 8 && c->sent - c->rcvd < WINDOW) {
		ev |= EPOLLOUT;
	}
	return ev;
}

static void ep_ctl(int set, int op, int fd, uint32_t ev, uint64_t data)
{
	struct epoll_event e = { .events = ev, .data.u64 = data };
	if (epoll_ctl(set, op, fd, &e))
		die("epoll_ctl");
}

/* Registers a connection (op EPOLL_CTL_ADD) or, after handling it, re-registers what it waits
 * for (EPOLL_CTL_MOD), in the way of its kind. */
static void ep_conn(struct conn *c, int op)
{
	if (mode != M_EPOLL || c->done)
		return;
	uint32_t ev = wanted(c);
	switch (c->kind) {
	case 1: /* edge triggered: registered once for everything */
		if (op == EPOLL_CTL_ADD)
			ep_ctl(ep, op, c->fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, c->idx);
		break;
	case 2:
		ep_ctl(ep, op, c->fd, ev | EPOLLONESHOT, c->idx);
		break;
	case 3:
		ep_ctl(inner, op, c->fd, ev, c->idx);
		break;
	default:
		ep_ctl(ep, op, c->fd, ev, c->idx);
	}
}

static void del_conn(struct conn *c)
{
	if (mode != M_EPOLL)
		return;
	if (epoll_ctl(c->kind == 3 ? inner : ep, EPOLL_CTL_DEL, c->fd, NULL))
		die("epoll_ctl del");
}

#define ID_LISTEN 1000
#define ID_PIPE 1001
#define ID_TIMER 1002
#define ID_INNER 1003
#define ID_CHILD 1004

/* ---- connections ------------------------------------------------------------------------ */
static void finish(struct conn *c)
{
	del_conn(c);
	if (s_close(c->fd) || (c->wfd != c->fd && s_close(c->wfd)))
		die("rclose");
	c->done = 1;
	ndone++;
	while (write(pipefd[1], "x", 1) != 1)
		if (errno != EINTR)
			die("write pipe");
}

/* End of stream was read: the descriptor shows it (POLLIN|POLLRDHUP), to poll(2) itself. */
static void check_rdhup(struct conn *c)
{
	struct pollfd p = { .fd = c->fd, .events = POLLIN | POLLRDHUP };
	if (poll1(&p, 20000) != 1 || (p.revents & (POLLIN | POLLRDHUP)) != (POLLIN | POLLRDHUP))
		fail("conn %d: end of stream read, but revents %#llx", c->idx, p.revents);
}

/* ---- -D: descriptor copies ------------------------------------------------------------------ */
static int devnull = -1;

/* Connection c is served through a copy of its descriptor, by variant (idx / 4) % 4, so that
 * every epoll kind (idx % 4) meets every variant:
 *   0: the original;
 *   1: dup(), the original closed (the copy does not inherit FD_CLOEXEC);
 *   2: dup3(O_CLOEXEC) onto a number in use (a copy of /dev/null, as a shell redirects stdin),
 *      the original closed;
 *   3: fcntl(F_DUPFD_CLOEXEC), both kept: the copy is waited on and read from, the original
 *      written and shut down through, until one of them is closed mid-connection (drop_one):
 *      the connection must go on through the other, as a socket goes on until its last
 *      descriptor is closed. */
static void use_copy(struct conn *c, int variant)
{
	int n;
	switch (variant) {
	case 1:
		if ((n = dup(c->fd)) < 0 || close(c->fd))
			die("dup");
		c->fd = c->wfd = n;
		c->cx = c->wcx = 0;
		break;
	case 2:
		if ((n = fcntl(devnull, F_DUPFD, 0)) < 0 || dup3(c->fd, n, O_CLOEXEC) != n || close(c->fd))
			die("dup3");
		c->fd = c->wfd = n;
		c->cx = c->wcx = 1;
		break;
	case 3:
		if ((n = fcntl(c->fd, F_DUPFD_CLOEXEC, 0)) < 0)
			die("fcntl F_DUPFD_CLOEXEC");
		c->wfd = c->fd;
		c->wcx = c->cx;
		c->fd = n;
		c->cx = 1;
		break;
	}
}

/* Variant 3, half way: the server closes the copy it read from once it read end of stream (and
 * echoes the rest through the original), the client closes the original once it shut it down
 * (and reads the rest of the echo from the copy). A copy leaves an epoll set only when every
 * descriptor of its socket is closed, so it is taken out first. */
static void drop_one(struct conn *c)
{
	if (c->fd == c->wfd)
		return;
	if (server) {
		del_conn(c);
		if (close(c->fd))
			die("close copy");
		c->fd = c->wfd;
		c->cx = c->wcx;
		ep_conn(c, EPOLL_CTL_ADD);
	} else {
		if (close(c->wfd))
			die("close original");
		c->wfd = c->fd;
		c->wcx = c->cx;
	}
}

/* Server: read what fits, check it, echo it. `once`: one read per call (level triggered). */
static void serve(struct conn *c, int once)
{
	int more = 1;
	while (more) {
		more = 0;
		/* Everything echoed: the buffer starts over (also when the last read filled it to the
		 * end, else it would never read again). */
		if (c->boff == c->blen)
			c->boff = c->blen = 0;
		if (!c->eof && c->blen < BUFSZ) {
			size_t room = BUFSZ - c->blen;
			size_t want = 1 + rnd() % room;
			ssize_t n = s_recv(c->fd, c->buf + c->blen, want, 0);
			if (n > 0) {
				for (ssize_t i = 0; i < n; i++) {
					uint64_t off = c->rcvd + i;
					uint8_t b = c->buf[c->blen + i];
					if (off < 8) {
						c->hdr[off] = b;
					} else {
						if (!c->got_hdr) {
							memcpy(&c->seed, c->hdr, 4);
							uint32_t t;
							memcpy(&t, c->hdr + 4, 4);
							c->total = t;
							c->got_hdr = 1;
						}
						if (b != pat(c->seed, off - 8))
							fail("conn %d: wrong byte at %lld", c->idx, (long long)off);
					}
				}
				c->rcvd += n;
				c->blen += n;
				progress += n;
				more = !once;
			} else if (n == 0) {
				check_rdhup(c);
				if (c->rcvd != c->total + 8)
					fail("conn %d: end of stream after %lld bytes", c->idx, (long long)c->rcvd);
				c->eof = 1;
				drop_one(c);
			} else if (errno == EINTR) {
				eintr_io++;
				more = 1; /* again: an edge must not be lost */
			} else if (errno != EAGAIN) {
				die("rrecv");
			}
		}
		if (c->blen > c->boff) {
			ssize_t n = s_send(c->wfd, c->buf + c->boff, c->blen - c->boff, MSG_NOSIGNAL);
			if (n > 0) {
				c->boff += n;
				progress += n;
				more = more || !once;
			} else if (n < 0 && errno == EINTR) {
				eintr_io++;
				more = 1;
			} else if (n < 0 && errno != EAGAIN) {
				die("rsend");
			}
		}
	}
	if (c->eof && c->blen == c->boff)
		finish(c);
}

static void client_io(struct conn *c, uint32_t ev, int once)
{
	uint8_t b[16384];
	int more = 1;
	if (c->connecting) {
		if (!(ev & EPOLLOUT))
			return;
		/* A second connect tells how it went (EISCONN: connected). */
		while (s_connect(c->fd, (struct sockaddr *)&peer, sizeof(peer)) && errno != EISCONN) {
			if (errno != EINTR)
				die("non-blocking rconnect");
			eintr_io++;
		}
		c->connecting = 0;
		progress++;
	}
	while (more) {
		more = 0;
		uint64_t end = c->total + 8;
		if (c->sent < end && c->sent - c->rcvd < WINDOW) {
			size_t n = 1 + rnd() % 9000;
			if (n > end - c->sent)
				n = end - c->sent;
			if (n > WINDOW - (c->sent - c->rcvd))
				n = WINDOW - (c->sent - c->rcvd);
			for (size_t i = 0; i < n; i++)
				b[i] = stream_byte(c, c->sent + i);
			ssize_t r = s_send(c->wfd, b, n, MSG_NOSIGNAL);
			if (r > 0) {
				c->sent += r;
				progress += r;
				more = !once;
				if (c->sent == end) {
					if (s_shutdown(c->wfd, SHUT_WR))
						die("rshutdown");
					drop_one(c);
				}
			} else if (r < 0 && errno == EINTR) {
				eintr_io++;
				more = 1;
			} else if (r < 0 && errno != EAGAIN) {
				die("rsend");
			}
		}
		if (!c->eof) {
			ssize_t r = s_recv(c->fd, b, 1 + rnd() % sizeof(b), 0);
			if (r > 0) {
				for (ssize_t i = 0; i < r; i++)
					if (b[i] != stream_byte(c, c->rcvd + i))
						fail("conn %d: wrong echo byte at %lld", c->idx, (long long)(c->rcvd + i));
				c->rcvd += r;
				progress += r;
				more = more || !once;
			} else if (r == 0) {
				if (c->rcvd != end)
					fail("conn %d: end of stream after %lld echoed bytes", c->idx, (long long)c->rcvd);
				check_rdhup(c);
				c->eof = 1;
			} else if (errno == EINTR) {
				eintr_io++;
				more = 1;
			} else if (errno != EAGAIN) {
				die("rrecv");
			}
		}
	}
	if (c->eof) {
		/* The server closed: a hang-up, seen by poll(2) itself. */
		struct pollfd p = { .fd = c->fd, .events = 0 };
		if (poll1(&p, 20000) != 1 || !(p.revents & POLLHUP))
			fail("conn %d: no POLLHUP after the peer closed (revents %lld)", c->idx, p.revents);
		finish(c);
	}
}

static void handle(struct conn *c, uint32_t ev)
{
	int once = mode != M_EPOLL || c->kind == 0;
	if (c->kind == 1 && mode == M_EPOLL)
		once = 0;
	if (server)
		serve(c, once);
	else
		client_io(c, ev, once);
	if (!c->done)
		ep_conn(c, EPOLL_CTL_MOD);
}

static void set_nonblock(int fd)
{
	int fl = s_fcntl(fd, F_GETFL);
	if (fl < 0 || s_fcntl(fd, F_SETFL, fl | O_NONBLOCK))
		die("rfcntl O_NONBLOCK");
}

static struct conn *new_conn(int fd, int cloexec)
{
	struct conn *c = calloc(1, sizeof(*c));
	if (!c)
		die("calloc");
	c->fd = c->wfd = fd;
	c->cx = c->wcx = cloexec;
	c->idx = next_idx++;
	c->kind = c->idx % 4;
	conns[c->idx] = c;
	return c;
}

/* A client's socket, bound to -b's address if given, non-blocking. */
static int client_socket(const char *bind_ip, int cloexec)
{
	int fd = s_socket(AF_INET, SOCK_STREAM | (cloexec ? SOCK_CLOEXEC : 0), 0);
	if (fd < 0)
		die("rsocket");
	if (bind_ip) {
		struct sockaddr_in b = { .sin_family = AF_INET };
		inet_pton(AF_INET, bind_ip, &b.sin_addr);
		if (s_bind(fd, (struct sockaddr *)&b, sizeof(b)))
			die("rbind");
	}
	set_nonblock(fd);
	return fd;
}

/* -F: half the connections are close-on-exec (mixed with the epoll kinds and copy variants). */
static int cloexec_for(int idx)
{
	return opt_fork && (idx + idx / 4) % 2;
}

static void accept_all(void)
{
	for (;;) {
		int cx = cloexec_for(next_idx);
		int fd = kmode ? accept4(lfd, NULL, NULL, cx ? SOCK_CLOEXEC : 0) : s_accept(lfd, NULL, NULL);
		if (fd < 0) {
			if (errno == EAGAIN)
				return;
			if (errno == EINTR) {
				eintr_io++;
				continue;
			}
			die("raccept");
		}
		set_nonblock(fd);
		struct conn *c = new_conn(fd, cx);
		if (opt_dup)
			use_copy(c, (c->idx / 4) % 4);
		ep_conn(c, EPOLL_CTL_ADD);
		progress++;
	}
}

/* ---- the loop ----------------------------------------------------------------------------- */
static int stalled_ticks;
static int child_pidfd = -1; /* -F: the exec'd check child's, while it runs */

static void timer_tick(void)
{
	static uint64_t last;
	uint64_t n;
	ssize_t r;
	while ((r = read(tfd, &n, sizeof(n))) < 0 && errno == EINTR)
		eintr_io++;
	if (r != sizeof(n))
		die("read timerfd");
	if (progress != last) {
		last = progress;
		stalled_ticks = 0;
		return;
	}
	stalled_ticks += (int)n;
	if (stalled_ticks >= STALL_S * 10) {
		for (int i = 0; i < MAXC; i++) {
			struct conn *c = conns[i];
			if (c && !c->done) {
				struct pollfd p = { .fd = c->fd, .events = POLLIN | POLLOUT | POLLRDHUP };
				poll(&p, 1, 0);
				fprintf(stderr, "  conn %d kind %d fd %d/%d: sent %llu rcvd %llu blen %zu boff %zu eof %d connecting %d revents %#x\n",
					c->idx, c->kind, c->fd, c->wfd, (unsigned long long)c->sent, (unsigned long long)c->rcvd,
					c->blen, c->boff, c->eof, c->connecting, p.revents);
			}
		}
		if (child_pidfd >= 0)
			fprintf(stderr, "  the exec'd check child (-F) has not exited\n");
		fail("no progress for %d s (%lld connections done)", STALL_S, (long long)ndone);
	}
}

/* ---- -F: fork, and fork then exec ----------------------------------------------------------- */
static int fork_stage, nforks;
static pid_t child_pid;
static char allowed_fds[4096]; /* what this process had open at start (inherited): may stay open */
static char self_path[4096];   /* this program (resolved at start: under valgrind /proc/self/exe is valgrind) */

/* Waits for the child (a blocking poll on its pidfd, then waitpid; EINTR retried, counted); it
 * must exit 0 within CHILD_S seconds: a child stuck in a library call after fork fails the run
 * instead of hanging it. Without pidfds (valgrind) a plain blocking waitpid. */
static void reap(pid_t pid, const char *what)
{
	int st, pfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pfd >= 0) {
		struct pollfd p = { .fd = pfd, .events = POLLIN };
		int n = poll1(&p, CHILD_S * 1000);
		close(pfd);
		if (n == 0) {
			kill(pid, SIGKILL);
			fprintf(stderr, "evloop: forked child (%s) did not exit\n", what);
			fail("child %d still running after %lld s (killed)", (int)pid, CHILD_S);
		}
	}
	while (waitpid(pid, &st, 0) < 0) {
		if (errno != EINTR)
			die("waitpid");
		eintr_block++;
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st)) {
		fprintf(stderr, "evloop: forked child (%s) failed\n", what);
		fail("child %d: exit status %lld", (int)pid, (long long)(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st)));
	}
}

/* Appends descriptor fd to a comma-separated list. */
static void add_fd(char *list, size_t room, int fd)
{
	size_t n = strlen(list);
	if ((size_t)snprintf(list + n, room - n, "%s%d", n ? "," : "", fd) >= room - n)
		fail("descriptor list too long (%d, %lld)", fd, 0);
}

/* Puts descriptor fd in the list of those that must be gone after exec (cx) or still open, after
 * checking that its FD_CLOEXEC is what the call that made it asked for. */
static void expect_fd(char *closed, char *open, size_t room, int fd, int cx)
{
	int fl = fcntl(fd, F_GETFD);
	if (fl < 0)
		die("fcntl F_GETFD");
	if (!!(fl & FD_CLOEXEC) != cx)
		fail("descriptor %d: FD_CLOEXEC is %lld, not what it was made with", fd, (long long)!!(fl & FD_CLOEXEC));
	add_fd(cx ? closed : open, room, fd);
}

/* The stages run one at a time as the bytes moved pass 4 KiB steps, in the first rounds of the
 * loop, so all of them run while connections are live (some connecting, most mid-stream; the
 * later stages do not wait for the check child):
 *   0: the child _exits at once; waited for (blocking waitpid);
 *   1: the child execs this program in check mode (-Z) with the descriptors that must be gone
 *      and those that must be open; reaped when its pidfd becomes readable in the wait set, while
 *      the loop goes on;
 *   2: the child execs /bin/sh -c 'exit 0'; waited for;
 *   3: the child closes every connection descriptor and the listener, then _exits; waited for.
 * The parent's connections must not notice any of it (the data is checked as always). */
static void maybe_fork(void)
{
	if (!opt_fork || fork_stage > 3 || ndone == nconn || progress < (uint64_t)(fork_stage + 1) * 4096)
		return;
	static char closed[8192], open[8192];
	static char *argv[] = { "evloop", "-Z", closed, open, allowed_fds, NULL };
	if (fork_stage == 1) {
		closed[0] = open[0] = 0;
		for (int i = 0; i < MAXC; i++) {
			struct conn *c = conns[i];
			if (!c || c->done)
				continue;
			expect_fd(closed, open, sizeof(closed), c->fd, c->cx);
			if (c->wfd != c->fd)
				expect_fd(closed, open, sizeof(closed), c->wfd, c->wcx);
		}
		/* The rest of the set: all made close-on-exec but the listener (plain socket()). */
		int cloexec_fds[] = { pipefd[0], pipefd[1], tfd, ep, inner, devnull };
		for (size_t i = 0; i < sizeof(cloexec_fds) / sizeof(cloexec_fds[0]); i++)
			if (cloexec_fds[i] >= 0)
				expect_fd(closed, open, sizeof(closed), cloexec_fds[i], 1);
		if (lfd >= 0)
			expect_fd(closed, open, sizeof(closed), lfd, 0);
	}
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		switch (fork_stage) {
		case 0:
			_exit(0);
		case 1:
			execv(self_path, argv);
			_exit(126);
		case 2:
			execl("/bin/sh", "sh", "-c", "exit 0", (char *)NULL);
			_exit(126);
		default:
			for (int i = 0; i < MAXC; i++) {
				struct conn *c = conns[i];
				if (c && !c->done && (close(c->fd) || (c->wfd != c->fd && close(c->wfd))))
					_exit(5);
			}
			if (lfd >= 0 && close(lfd))
				_exit(5);
			_exit(0);
		}
	}
	nforks++;
	if (fork_stage == 1) {
		child_pid = pid;
		/* The check child is not bounded by reap's CHILD_S while the loop runs: the watchdog
		 * (no progress) still is, and once the connections are done the loop waits for it. */
		child_pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
		if (child_pidfd < 0 && errno == ENOSYS) /* no pidfd (valgrind): waited for */
			reap(pid, "fork, exec check mode (-Z)");
		else if (child_pidfd < 0)
			die("pidfd_open");
		else if (mode == M_EPOLL)
			ep_ctl(ep, EPOLL_CTL_ADD, child_pidfd, EPOLLIN, ID_CHILD);
	} else {
		reap(pid, fork_stage == 0 ? "fork, _exit" : fork_stage == 2 ? "fork, exec /bin/sh" : "fork, close all, _exit");
	}
	fork_stage++;
}

/* The check child's pidfd is readable: it exited. */
static void child_exited(void)
{
	if (mode == M_EPOLL && epoll_ctl(ep, EPOLL_CTL_DEL, child_pidfd, NULL))
		die("epoll_ctl del pidfd");
	close(child_pidfd);
	child_pidfd = -1;
	reap(child_pid, "fork, exec check mode (-Z)");
}

/* -Z CLOSED OPEN ALLOWED (comma-separated descriptor lists), exec'd by a forked evloop: the
 * descriptors in CLOSED (made with SOCK_CLOEXEC, accept4 SOCK_CLOEXEC, F_DUPFD_CLOEXEC, dup3
 * O_CLOEXEC ...) must be gone, those in OPEN still open sockets (or the set's other kinds), and
 * nothing else may be open but 0-2 and ALLOWED (what the parent inherited itself): a library
 * descriptor that leaks into exec'd programs shows up here. */
#define FDMAP 65536
static int check_mode(char **lists)
{
	static char is_open[FDMAP], is_allowed[FDMAP];
	int bad = 0, nclosed = 0, nopen = 0;
	for (int l = 0; l < 3; l++) {
		for (char *p = lists[l]; *p;) {
			int fd = (int)strtol(p, &p, 10);
			if (*p == ',')
				p++;
			if (fd < 0 || fd >= FDMAP)
				continue;
			if (l == 0) {
				nclosed++;
				if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF) {
					fprintf(stderr, "evloop check: descriptor %d is close-on-exec but open after exec\n", fd);
					bad = 1;
				}
			} else if (l == 1) {
				struct stat st;
				nopen++;
				is_open[fd] = 1;
				if (fstat(fd, &st)) {
					fprintf(stderr, "evloop check: descriptor %d (not close-on-exec) is gone after exec\n", fd);
					bad = 1;
				} else if (!S_ISSOCK(st.st_mode)) {
					fprintf(stderr, "evloop check: descriptor %d is not a socket after exec (mode %#o)\n", fd,
						(unsigned)st.st_mode);
					bad = 1;
				}
			} else {
				is_allowed[fd] = 1;
			}
		}
	}
	DIR *d = opendir("/proc/self/fd");
	if (!d) {
		perror("evloop check: /proc/self/fd");
		return 1;
	}
	struct dirent *e;
	while ((e = readdir(d))) {
		int fd = atoi(e->d_name);
		if (e->d_name[0] == '.' || fd <= 2 || fd == dirfd(d) || (fd < FDMAP && (is_open[fd] || is_allowed[fd])))
			continue;
		char path[64], target[256];
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		ssize_t n = readlink(path, target, sizeof(target) - 1);
		target[n > 0 ? n : 0] = 0;
		fprintf(stderr, "evloop check: descriptor %d (%s) leaked into the exec'd program\n", fd, target);
		bad = 1;
	}
	closedir(d);
	if (!bad)
		printf("evloop check (exec'd child): %d close-on-exec descriptors gone, %d others open, nothing else\n",
		       nclosed, nopen);
	return bad;
}

/* The descriptors open before anything is made (the ones inherited from the caller). */
static void snapshot_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		die("opendir /proc/self/fd");
	struct dirent *e;
	while ((e = readdir(d)))
		if (e->d_name[0] != '.' && atoi(e->d_name) > 2 && atoi(e->d_name) != dirfd(d))
			add_fd(allowed_fds, sizeof(allowed_fds), atoi(e->d_name));
	closedir(d);
}

static int pipe_count;

static void pipe_ready(void)
{
	char b[64];
	ssize_t n = read(pipefd[0], b, sizeof(b));
	if (n > 0)
		pipe_count += (int)n;
}

static int all_done(void)
{
	return ndone == nconn && pipe_count >= nconn && child_pidfd < 0;
}

static void run_epoll(void)
{
	struct epoll_event evs[32];
	while (!all_done()) {
		maybe_fork();
		int n = epoll_wait(ep, evs, 32, -1);
		if (n < 0) {
			if (errno == EINTR) {
				eintr_wait++;
				continue;
			}
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			uint64_t id = evs[i].data.u64;
			if (id == ID_LISTEN)
				accept_all();
			else if (id == ID_PIPE)
				pipe_ready();
			else if (id == ID_TIMER)
				timer_tick();
			else if (id == ID_CHILD)
				child_exited();
			else if (id == ID_INNER) {
				struct epoll_event ie[32];
				int m = epoll_wait(inner, ie, 32, 0);
				if (m < 0 && errno != EINTR)
					die("epoll_wait (nested)");
				/* EINTR: the nested set stays readable, the next round comes back here. */
				eintr_wait += m < 0;
				for (int j = 0; j < m; j++)
					if (conns[ie[j].data.u64] && !conns[ie[j].data.u64]->done)
						handle(conns[ie[j].data.u64], ie[j].events);
			} else if (conns[id] && !conns[id]->done) {
				handle(conns[id], evs[i].events);
			}
		}
	}
}

static short to_poll(uint32_t ev)
{
	short p = 0;
	if (ev & EPOLLIN)
		p |= POLLIN;
	if (ev & EPOLLOUT)
		p |= POLLOUT;
	if (ev & EPOLLRDHUP)
		p |= POLLRDHUP;
	return p;
}

static uint32_t from_poll(short p)
{
	uint32_t ev = 0;
	if (p & POLLIN)
		ev |= EPOLLIN;
	if (p & POLLOUT)
		ev |= EPOLLOUT;
	if (p & POLLRDHUP)
		ev |= EPOLLRDHUP;
	if (p & POLLHUP)
		ev |= EPOLLHUP;
	if (p & POLLERR)
		ev |= EPOLLERR;
	return ev;
}

static void run_poll(void)
{
	struct pollfd p[MAXC + 4];
	int who[MAXC + 4];
	while (!all_done()) {
		maybe_fork();
		int n = 0;
		p[n] = (struct pollfd){ .fd = pipefd[0], .events = POLLIN };
		who[n++] = ID_PIPE;
		p[n] = (struct pollfd){ .fd = tfd, .events = POLLIN };
		who[n++] = ID_TIMER;
		if (lfd >= 0) {
			p[n] = (struct pollfd){ .fd = lfd, .events = POLLIN };
			who[n++] = ID_LISTEN;
		}
		if (child_pidfd >= 0) {
			p[n] = (struct pollfd){ .fd = child_pidfd, .events = POLLIN };
			who[n++] = ID_CHILD;
		}
		for (int i = 0; i < MAXC; i++) {
			struct conn *c = conns[i];
			if (c && !c->done) {
				p[n] = (struct pollfd){ .fd = c->fd, .events = to_poll(wanted(c)) };
				who[n++] = i;
			}
		}
		if (poll(p, n, -1) < 0) {
			if (errno == EINTR) {
				eintr_wait++;
				continue;
			}
			die("poll");
		}
		for (int i = 0; i < n; i++) {
			if (!p[i].revents)
				continue;
			if (who[i] == ID_PIPE)
				pipe_ready();
			else if (who[i] == ID_TIMER)
				timer_tick();
			else if (who[i] == ID_LISTEN)
				accept_all();
			else if (who[i] == ID_CHILD)
				child_exited();
			else if (!conns[who[i]]->done)
				handle(conns[who[i]], from_poll(p[i].revents));
		}
	}
}

static void run_select(void)
{
	while (!all_done()) {
		maybe_fork();
		fd_set r, w;
		FD_ZERO(&r);
		FD_ZERO(&w);
		int maxfd = pipefd[0] > tfd ? pipefd[0] : tfd;
		FD_SET(pipefd[0], &r);
		FD_SET(tfd, &r);
		if (lfd >= 0) {
			FD_SET(lfd, &r);
			if (lfd > maxfd)
				maxfd = lfd;
		}
		int child = child_pidfd; /* child_exited() below clears child_pidfd */
		if (child >= 0) {
			FD_SET(child, &r);
			if (child > maxfd)
				maxfd = child;
		}
		for (int i = 0; i < MAXC; i++) {
			struct conn *c = conns[i];
			if (!c || c->done)
				continue;
			if (c->fd >= FD_SETSIZE)
				fail("descriptor %d too large for select (%lld)", c->fd, 0);
			uint32_t ev = wanted(c);
			if (ev & EPOLLIN)
				FD_SET(c->fd, &r);
			if (ev & EPOLLOUT)
				FD_SET(c->fd, &w);
			if (c->fd > maxfd)
				maxfd = c->fd;
		}
		if (select(maxfd + 1, &r, &w, NULL, NULL) < 0) {
			if (errno == EINTR) {
				eintr_wait++;
				continue;
			}
			die("select");
		}
		if (FD_ISSET(pipefd[0], &r))
			pipe_ready();
		if (FD_ISSET(tfd, &r))
			timer_tick();
		if (lfd >= 0 && FD_ISSET(lfd, &r))
			accept_all();
		if (child >= 0 && FD_ISSET(child, &r))
			child_exited();
		for (int i = 0; i < MAXC; i++) {
			struct conn *c = conns[i];
			if (!c || c->done)
				continue;
			uint32_t ev = (FD_ISSET(c->fd, &r) ? EPOLLIN : 0) | (FD_ISSET(c->fd, &w) ? EPOLLOUT : 0);
			if (ev)
				handle(c, ev);
		}
	}
}

/* -B: a blocking recv on connection c, which the peer sends nothing on before it hears from us,
 * must end with EINTR at the next signal, as on a kernel socket whose handler has no
 * SA_RESTART. A library that retries inside the call instead never returns: the handler ends
 * the run after PROBE_S seconds. */
static void blocking_probe(struct conn *c)
{
	char b;
	int fl = s_fcntl(c->fd, F_GETFL);
	if (fl < 0 || s_fcntl(c->fd, F_SETFL, fl & ~O_NONBLOCK))
		die("rfcntl ~O_NONBLOCK");
	probe_ticks = 0;
	probing = 1;
	ssize_t n = s_recv(c->fd, &b, 1, MSG_PEEK);
	probing = 0;
	if (n >= 0 || errno != EINTR)
		fail("conn %d: blocking recv gave %lld, not EINTR", c->idx, (long long)n);
	eintr_block++;
	if (s_fcntl(c->fd, F_SETFL, fl))
		die("rfcntl O_NONBLOCK");
	printf("blocking recv: EINTR at signal %d (%s)\n", (int)probe_ticks, impl);
}

/* -X: read until the peer is killed; poll(2) must report it and rrecv give ECONNRESET. */
static int peer_killed(int fd)
{
	char b[65536];
	unsigned long long got = 0;
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll1(&p, 30000) != 1)
			fail("no readiness within 30 s after the peer died (%d, %lld)", 0, 0);
		ssize_t n = s_recv(fd, b, sizeof(b), 0);
		if (n > 0) {
			got += n;
			continue;
		}
		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			eintr_io += errno == EINTR;
			continue;
		}
		if (n == 0)
			fail("end of stream instead of ECONNRESET (%d, %lld)", 0, 0);
		if (errno != ECONNRESET)
			die("rrecv after the peer died (want ECONNRESET)");
		if (!(p.revents & (POLLERR | POLLHUP)))
			fail("ECONNRESET but revents %#x (%lld)", p.revents, 0);
		printf("peer killed: poll revents %#x, rrecv ECONNRESET after %llu bytes (%s)", p.revents, got, impl);
		if (opt_eintr)
			printf("; EINTR %ld (signals %d)", eintr_wait + eintr_block + eintr_io, (int)signals);
		printf("\n");
		return 0;
	}
}

int main(int argc, char **argv)
{
	const char *bind_ip = NULL, *dst = NULL;
	int port = 7000, opt;
	if (argc == 5 && !strcmp(argv[1], "-Z"))
		return check_mode(argv + 2);
	while ((opt = getopt(argc, argv, "sc:b:p:m:n:KXIBDF")) != -1) {
		switch (opt) {
		case 's': server = 1; break;
		case 'c': dst = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'n': nconn = atoi(optarg); break;
		case 'X': xmode = 1; nconn = 1; break;
		case 'I': opt_eintr = 1; break;
		case 'B': opt_block = 1; break;
		case 'D': opt_dup = 1; break;
		case 'F': opt_fork = 1; break;
		case 'm':
			mode = !strcmp(optarg, "poll") ? M_POLL : !strcmp(optarg, "select") ? M_SELECT : M_EPOLL;
			break;
		case 'K':
			s_socket = socket; s_bind = bind; s_listen = listen; s_accept = accept;
			s_connect = connect; s_send = send; s_recv = recv; s_shutdown = shutdown;
			s_close = close; s_fcntl = fcntl; impl = "kernel TCP";
			kmode = 1;
			break;
		default:
			fprintf(stderr, "usage: see the comment at the top of evloop.c\n");
			return 2;
		}
	}
	if (nconn < 1 || nconn > MAXC || (!server && !dst)) {
		fprintf(stderr, "evloop: -s or -c ADDR; 1 <= -n <= %d\n", MAXC);
		return 2;
	}
	/* Copies and children are the C library's business: the rsocket API has no dup, and an
	 * rsocket is not shared with a child. */
	if (((opt_dup || opt_fork) && !kmode) || (opt_block && (!opt_eintr || server || xmode)) ||
	    (opt_fork && xmode)) {
		fprintf(stderr, "evloop: -D and -F need -K (-F not with -X); -B needs -I and a client\n");
		return 2;
	}
	if (opt_fork) {
		snapshot_fds();
		ssize_t n = readlink("/proc/self/exe", self_path, sizeof(self_path) - 1);
		if (n <= 0)
			die("readlink /proc/self/exe");
		self_path[n] = 0;
	}
	if (opt_dup && (devnull = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
		die("open /dev/null");
	if (opt_eintr)
		start_alarm();
	rnd_state ^= (unsigned)getpid();
	if (pipe2(pipefd, O_NONBLOCK | O_CLOEXEC))
		die("pipe2");
	tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	struct itimerspec its = { .it_interval = { 0, 100000000 }, .it_value = { 0, 100000000 } };
	if (tfd < 0 || timerfd_settime(tfd, 0, &its, NULL))
		die("timerfd");
	if (mode == M_EPOLL) {
		ep = epoll_create1(EPOLL_CLOEXEC);
		inner = epoll_create1(EPOLL_CLOEXEC);
		if (ep < 0 || inner < 0)
			die("epoll_create1");
		ep_ctl(ep, EPOLL_CTL_ADD, pipefd[0], EPOLLIN, ID_PIPE);
		ep_ctl(ep, EPOLL_CTL_ADD, tfd, EPOLLIN, ID_TIMER);
		ep_ctl(ep, EPOLL_CTL_ADD, inner, EPOLLIN, ID_INNER);
		nested_registered = 1;
	}
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (server) {
		lfd = s_socket(AF_INET, SOCK_STREAM, 0);
		if (lfd < 0)
			die("rsocket");
		int one = 1;
		if (!strcmp(impl, "kernel TCP"))
			setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		inet_pton(AF_INET, bind_ip ? bind_ip : "0.0.0.0", &a.sin_addr);
		if (s_bind(lfd, (struct sockaddr *)&a, sizeof(a)) || s_listen(lfd, MAXC))
			die("rbind/rlisten");
		set_nonblock(lfd);
		if (mode == M_EPOLL)
			ep_ctl(ep, EPOLL_CTL_ADD, lfd, EPOLLIN, ID_LISTEN);
		if (xmode) {
			/* Stream to the one client until killed (blocking sends: -I interrupts them). */
			int fd;
			struct pollfd p = { .fd = lfd, .events = POLLIN };
			while ((fd = s_accept(lfd, NULL, NULL)) < 0) {
				if (errno != EAGAIN && errno != EINTR)
					die("raccept");
				poll1(&p, -1);
			}
			static char b[65536];
			for (;;)
				if (s_send(fd, b, sizeof(b), MSG_NOSIGNAL) < 0 && errno != EAGAIN && errno != EINTR)
					die("rsend");
		}
	} else {
		inet_pton(AF_INET, dst, &a.sin_addr);
		peer = a;
		for (int i = 0; i < nconn; i++) {
			int cx = cloexec_for(next_idx);
			int fd = client_socket(bind_ip, cx);
			struct conn *c = new_conn(fd, cx);
			c->seed = rnd();
			c->total = xmode ? 0 : 20000 + rnd() % 300000;
			memcpy(c->hdr, &c->seed, 4);
			uint32_t t = (uint32_t)c->total;
			memcpy(c->hdr + 4, &t, 4);
			int r;
			/* The first connect may come before the server listens (the pairs start the
			 * client 1.5 s after the server, which may be slower than that to listen under
			 * -I's signals: seen on Soft-iWARP, where the refusal is immediate). */
			for (int tries = 0; (r = s_connect(fd, (struct sockaddr *)&a, sizeof(a))) &&
					    errno == ECONNREFUSED && i == 0 && tries < 100;
			     tries++) {
				s_close(fd);
				usleep(100000);
				fd = client_socket(bind_ip, cx);
				c->fd = c->wfd = fd;
			}
			if (r) {
				/* EINTR: the connect goes on in the background, as EINPROGRESS. */
				if (errno != EINPROGRESS && errno != EINTR)
					die("rconnect");
				eintr_io += errno == EINTR;
				c->connecting = 1;
			}
			/* Copied once connected (the preload converts a socket at connect: a copy made
			 * before would keep it a kernel socket). -X reads through a dup, the original
			 * closed. */
			if (opt_dup)
				use_copy(c, xmode ? 1 : (c->idx / 4) % 4);
			if (xmode)
				return peer_killed(c->fd);
			if (opt_block && i == 0)
				blocking_probe(c);
			ep_conn(c, EPOLL_CTL_ADD);
		}
	}
	if (mode == M_EPOLL)
		run_epoll();
	else if (mode == M_POLL)
		run_poll();
	else
		run_select();
	if (pipe_count != nconn)
		fail("pipe counted %d of %lld connections", pipe_count, nconn);
	long eintr = eintr_wait + eintr_block + eintr_io;
	/* The server sleeps in its waits between requests, where the signals land (hundreds of
	 * EINTR a run); the client, always with something to send, is rarely inside a wait when
	 * one comes (0 to 9 a run, 0 in about 1 run of 3), so only the server must have seen one. */
	if (opt_eintr && !eintr && server)
		fail("-I: no call saw EINTR (%d signals, %lld)", (int)signals, 0);
	if (opt_fork && fork_stage != 4)
		fail("-F: %d of 4 forks ran while connections were live (%lld)", fork_stage, 0);
	uint64_t bytes = 0;
	for (int i = 0; i < MAXC; i++)
		if (conns[i])
			bytes += conns[i]->rcvd;
	printf("evloop %s %s (%s): %d connections, %llu bytes verified", impl, server ? "server" : "client",
	       mode_name[mode], nconn, (unsigned long long)bytes);
	if (opt_eintr)
		printf("; EINTR %ld (waits %ld, blocking calls %ld, I/O %ld; %d signals)", eintr, eintr_wait,
		       eintr_block, eintr_io, (int)signals);
	if (opt_dup)
		printf("; descriptor copies");
	if (opt_fork)
		printf("; %d forks, exec'd check passed", nforks);
	printf("\n");
	if (lfd >= 0)
		s_close(lfd);
	return 0;
}
