/*
 * evloop: an event loop that waits on rsocket descriptors with the kernel's own epoll, poll or
 * select, next to a pipe and a timerfd. The only r-calls in the loop are raccept, rconnect,
 * rsend, rrecv (and rshutdown/rclose at the end of a connection); no rpoll, no rselect.
 *
 *   server: evloop -s -b 10.10.0.1 -p 7000 [-m epoll|poll|select] [-n conns]
 *   client: evloop -c 10.10.0.1 -b 10.10.0.2 -p 7000 [-m epoll|poll|select] [-n conns]
 *   -K: the same over kernel TCP sockets (to check the test itself)
 *   -X (client, one connection): read until the peer dies; poll() must report POLLERR or
 *      POLLHUP and rrecv ECONNRESET
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
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include <rsocket.h>

#define MAXC 256
#define WINDOW (64 * 1024)
#define BUFSZ (WINDOW + 16)
#define STALL_S 20

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
	int fd;
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
static int nconn = 16, ndone, server, xmode;
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

/* ---- connections ------------------------------------------------------------------------ */
static void finish(struct conn *c)
{
	del_conn(c);
	if (s_close(c->fd))
		die("rclose");
	c->done = 1;
	ndone++;
	if (write(pipefd[1], "x", 1) != 1)
		die("write pipe");
}

/* End of stream was read: the descriptor shows it (POLLIN|POLLRDHUP), to poll(2) itself. */
static void check_rdhup(struct conn *c)
{
	struct pollfd p = { .fd = c->fd, .events = POLLIN | POLLRDHUP };
	if (poll(&p, 1, 20000) != 1 || (p.revents & (POLLIN | POLLRDHUP)) != (POLLIN | POLLRDHUP))
		fail("conn %d: end of stream read, but revents %#llx", c->idx, p.revents);
}

/* Server: read what fits, check it, echo it. `once`: one read per call (level triggered). */
static void serve(struct conn *c, int once)
{
	int more = 1;
	while (more) {
		more = 0;
		if (!c->eof && c->blen < BUFSZ) {
			if (c->boff == c->blen)
				c->boff = c->blen = 0;
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
			} else if (errno != EAGAIN) {
				die("rrecv");
			}
		}
		if (c->blen > c->boff) {
			ssize_t n = s_send(c->fd, c->buf + c->boff, c->blen - c->boff, MSG_NOSIGNAL);
			if (n > 0) {
				c->boff += n;
				progress += n;
				more = more || !once;
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
		if (s_connect(c->fd, (struct sockaddr *)&peer, sizeof(peer)) && errno != EISCONN)
			die("non-blocking rconnect");
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
			ssize_t r = s_send(c->fd, b, n, MSG_NOSIGNAL);
			if (r > 0) {
				c->sent += r;
				progress += r;
				more = !once;
				if (c->sent == end && s_shutdown(c->fd, SHUT_WR))
					die("rshutdown");
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
			} else if (errno != EAGAIN) {
				die("rrecv");
			}
		}
	}
	if (c->eof) {
		/* The server closed: a hang-up, seen by poll(2) itself. */
		struct pollfd p = { .fd = c->fd, .events = 0 };
		if (poll(&p, 1, 20000) != 1 || !(p.revents & POLLHUP))
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

static struct conn *new_conn(int fd)
{
	static int next;
	struct conn *c = calloc(1, sizeof(*c));
	if (!c)
		die("calloc");
	c->fd = fd;
	c->idx = next++;
	c->kind = c->idx % 4;
	conns[c->idx] = c;
	return c;
}

static void accept_all(void)
{
	for (;;) {
		int fd = s_accept(lfd, NULL, NULL);
		if (fd < 0) {
			if (errno == EAGAIN)
				return;
			die("raccept");
		}
		set_nonblock(fd);
		ep_conn(new_conn(fd), EPOLL_CTL_ADD);
		progress++;
	}
}

/* ---- the loop ----------------------------------------------------------------------------- */
static int stalled_ticks;

static void timer_tick(void)
{
	static uint64_t last;
	uint64_t n;
	if (read(tfd, &n, sizeof(n)) != sizeof(n))
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
				fprintf(stderr, "  conn %d kind %d: sent %llu rcvd %llu blen %zu boff %zu eof %d connecting %d revents %#x\n",
					c->idx, c->kind, (unsigned long long)c->sent, (unsigned long long)c->rcvd,
					c->blen, c->boff, c->eof, c->connecting, p.revents);
			}
		}
		fail("no progress for %d s (%lld connections done)", STALL_S, (long long)ndone);
	}
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
	return ndone == nconn;
}

static void run_epoll(void)
{
	struct epoll_event evs[32];
	while (!all_done() || pipe_count < nconn) {
		int n = epoll_wait(ep, evs, 32, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
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
			else if (id == ID_INNER) {
				struct epoll_event ie[32];
				int m = epoll_wait(inner, ie, 32, 0);
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
	struct pollfd p[MAXC + 3];
	int who[MAXC + 3];
	while (!all_done() || pipe_count < nconn) {
		int n = 0;
		p[n] = (struct pollfd){ .fd = pipefd[0], .events = POLLIN };
		who[n++] = ID_PIPE;
		p[n] = (struct pollfd){ .fd = tfd, .events = POLLIN };
		who[n++] = ID_TIMER;
		if (lfd >= 0) {
			p[n] = (struct pollfd){ .fd = lfd, .events = POLLIN };
			who[n++] = ID_LISTEN;
		}
		for (int i = 0; i < MAXC; i++) {
			struct conn *c = conns[i];
			if (c && !c->done) {
				p[n] = (struct pollfd){ .fd = c->fd, .events = to_poll(wanted(c)) };
				who[n++] = i;
			}
		}
		if (poll(p, n, -1) < 0) {
			if (errno == EINTR)
				continue;
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
			else if (!conns[who[i]]->done)
				handle(conns[who[i]], from_poll(p[i].revents));
		}
	}
}

static void run_select(void)
{
	while (!all_done() || pipe_count < nconn) {
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
			if (errno == EINTR)
				continue;
			die("select");
		}
		if (FD_ISSET(pipefd[0], &r))
			pipe_ready();
		if (FD_ISSET(tfd, &r))
			timer_tick();
		if (lfd >= 0 && FD_ISSET(lfd, &r))
			accept_all();
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

/* -X: read until the peer is killed; poll(2) must report it and rrecv give ECONNRESET. */
static int peer_killed(int fd)
{
	char b[65536];
	for (;;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, 30000) != 1)
			fail("no readiness within 30 s after the peer died (%d, %lld)", 0, 0);
		ssize_t n = s_recv(fd, b, sizeof(b), 0);
		if (n > 0)
			continue;
		if (n < 0 && errno == EAGAIN)
			continue;
		if (n == 0)
			fail("end of stream instead of ECONNRESET (%d, %lld)", 0, 0);
		if (errno != ECONNRESET)
			die("rrecv after the peer died (want ECONNRESET)");
		if (!(p.revents & (POLLERR | POLLHUP)))
			fail("ECONNRESET but revents %#x (%lld)", p.revents, 0);
		printf("peer killed: poll revents %#x, rrecv ECONNRESET (%s)\n", p.revents, impl);
		return 0;
	}
}

int main(int argc, char **argv)
{
	const char *bind_ip = NULL, *dst = NULL;
	int port = 7000, opt;
	while ((opt = getopt(argc, argv, "sc:b:p:m:n:KX")) != -1) {
		switch (opt) {
		case 's': server = 1; break;
		case 'c': dst = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'n': nconn = atoi(optarg); break;
		case 'X': xmode = 1; nconn = 1; break;
		case 'm':
			mode = !strcmp(optarg, "poll") ? M_POLL : !strcmp(optarg, "select") ? M_SELECT : M_EPOLL;
			break;
		case 'K':
			s_socket = socket; s_bind = bind; s_listen = listen; s_accept = accept;
			s_connect = connect; s_send = send; s_recv = recv; s_shutdown = shutdown;
			s_close = close; s_fcntl = fcntl; impl = "kernel TCP";
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
			/* Stream to the one client until killed. */
			int fd;
			struct pollfd p = { .fd = lfd, .events = POLLIN };
			while ((fd = s_accept(lfd, NULL, NULL)) < 0) {
				if (errno != EAGAIN)
					die("raccept");
				poll(&p, 1, -1);
			}
			static char b[65536];
			for (;;)
				if (s_send(fd, b, sizeof(b), MSG_NOSIGNAL) < 0 && errno != EAGAIN)
					die("rsend");
		}
	} else {
		inet_pton(AF_INET, dst, &a.sin_addr);
		peer = a;
		for (int i = 0; i < nconn; i++) {
			int fd = s_socket(AF_INET, SOCK_STREAM, 0);
			if (fd < 0)
				die("rsocket");
			if (bind_ip) {
				struct sockaddr_in b = { .sin_family = AF_INET };
				inet_pton(AF_INET, bind_ip, &b.sin_addr);
				if (s_bind(fd, (struct sockaddr *)&b, sizeof(b)))
					die("rbind");
			}
			set_nonblock(fd);
			struct conn *c = new_conn(fd);
			c->seed = rnd();
			c->total = xmode ? 0 : 20000 + rnd() % 300000;
			memcpy(c->hdr, &c->seed, 4);
			uint32_t t = (uint32_t)c->total;
			memcpy(c->hdr + 4, &t, 4);
			if (s_connect(fd, (struct sockaddr *)&a, sizeof(a))) {
				if (errno != EINPROGRESS)
					die("rconnect");
				c->connecting = 1;
			}
			if (xmode)
				return peer_killed(fd);
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
	uint64_t bytes = 0;
	for (int i = 0; i < MAXC; i++)
		if (conns[i])
			bytes += conns[i]->rcvd;
	printf("evloop %s %s (%s): %d connections, %llu bytes verified\n", impl, server ? "server" : "client",
	       mode_name[mode], nconn, (unsigned long long)bytes);
	if (lfd >= 0)
		s_close(lfd);
	return 0;
}
