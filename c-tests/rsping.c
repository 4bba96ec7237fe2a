/*
 * rsping: an rping-style rsockets client/server that moves a buffer and verifies it.
 *
 * Built twice from this source: against rsocket-rs (installed rsocket.h + pkg-config) and, with
 * -DUSE_LIBRDMACM, against librdmacm's <rdma/rsocket.h> -lrdmacm, so either end can be the other
 * implementation.
 *
 *   server: rsping -s -b 10.10.0.1 -p 7000 [-S bytes] [-C iterations]
 *   client: rsping -c 10.10.0.1 -b 10.10.0.2 -p 7000 [-S bytes] [-C iterations]
 *   refused-connect check: rsping -c 10.10.0.1 -b 10.10.0.2 -p 7999 -E
 *   peer-killed check (client): -X  sends and receives until the peer dies, expects ECONNRESET
 *   write-after-shutdown check (client): -P  expects EPIPE, and SIGPIPE unless MSG_NOSIGNAL
 *   keepalive against a live peer (client): -A SECS  SO_KEEPALIVE with TCP_KEEPIDLE,
 *     TCP_KEEPINTVL and TCP_KEEPCNT 1 (given up after 2 s unanswered), idle SECS, then the
 *     transfer: the peer's device answers the probes, so the connection must still work
 *   -K: the same program over kernel TCP sockets, for errno parity
 *
 * The client sends S bytes, the server verifies and echoes them, the client verifies the echo;
 * C times. Then the client shuts down and the server must read end-of-stream (0).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>
#ifdef USE_LIBRDMACM
#include <rdma/rsocket.h>
#define IMPL "librdmacm"
#else
#include <rsocket.h>
#define IMPL "rsocket-rs"
#endif

/* The socket calls, rsockets by default, kernel sockets with -K. */
static int (*s_socket)(int, int, int) = rsocket;
static int (*s_bind)(int, const struct sockaddr *, socklen_t) = rbind;
static int (*s_listen)(int, int) = rlisten;
static int (*s_accept)(int, struct sockaddr *, socklen_t *) = raccept;
static int (*s_connect)(int, const struct sockaddr *, socklen_t) = rconnect;
static ssize_t (*s_send)(int, const void *, size_t, int) = rsend;
static ssize_t (*s_recv)(int, void *, size_t, int) = rrecv;
static int (*s_setsockopt)(int, int, int, const void *, socklen_t) = rsetsockopt;
static int (*s_getsockopt)(int, int, int, void *, socklen_t *) = rgetsockopt;
static int (*s_shutdown)(int, int) = rshutdown;
static int (*s_close)(int) = rclose;
static const char *impl = IMPL;

static void use_kernel_sockets(void)
{
	s_socket = socket;
	s_bind = bind;
	s_listen = listen;
	s_accept = accept;
	s_connect = connect;
	s_send = send;
	s_recv = recv;
	s_setsockopt = setsockopt;
	s_getsockopt = getsockopt;
	s_shutdown = shutdown;
	s_close = close;
	impl = "kernel-tcp";
}

static volatile sig_atomic_t sigpipes;
static void on_sigpipe(int sig)
{
	(void)sig;
	sigpipes++;
}

static void die(const char *what)
{
	fprintf(stderr, "rsping(%s): %s: %s\n", impl, what, strerror(errno));
	exit(1);
}

static void fill(uint8_t *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (uint8_t)(i * 131 + seed + (i >> 12));
}

static size_t mismatch(const uint8_t *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		if (b[i] != (uint8_t)(i * 131 + seed + (i >> 12)))
			return i + 1;
	return 0;
}

static void send_all(int s, const uint8_t *b, size_t n)
{
	size_t off = 0;
	while (off < n) {
		ssize_t r = s_send(s, b + off, n - off, MSG_NOSIGNAL);
		if (r <= 0)
			die("rsend");
		off += (size_t)r;
	}
}

static void recv_all(int s, uint8_t *b, size_t n)
{
	size_t off = 0;
	while (off < n) {
		ssize_t r = s_recv(s, b + off, n - off, 0);
		if (r == 0) {
			fprintf(stderr, "rsping(%s): early end of stream after %zu of %zu bytes\n", impl, off, n);
			exit(1);
		}
		if (r < 0)
			die("rrecv");
		off += (size_t)r;
	}
}

static void addr_of(struct sockaddr_in *a, const char *ip, int port)
{
	memset(a, 0, sizeof *a);
	a->sin_family = AF_INET;
	a->sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, ip, &a->sin_addr) != 1) {
		fprintf(stderr, "rsping: bad address %s\n", ip);
		exit(2);
	}
}

static double now(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return tv.tv_sec + tv.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
	const char *server = NULL, *bind_ip = NULL;
	int port = 7000, is_server = 0, expect_refused = 0, expect_reset = 0, expect_pipe = 0, opt, iters = 1;
	int keepalive_idle = 0;
	size_t size = 1 << 20;

	while ((opt = getopt(argc, argv, "sc:b:p:S:C:EXPKA:")) != -1) {
		switch (opt) {
		case 's': is_server = 1; break;
		case 'c': server = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'S': size = strtoul(optarg, NULL, 0); break;
		case 'C': iters = atoi(optarg); break;
		case 'E': expect_refused = 1; break;
		case 'X': expect_reset = 1; break;
		case 'P': expect_pipe = 1; break;
		case 'K': use_kernel_sockets(); break;
		case 'A': keepalive_idle = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: rsping -s|-c SERVER [-b ADDR] [-p PORT] [-S BYTES] [-C N] [-E]\n");
			return 2;
		}
	}
	uint8_t *buf = malloc(size ? size : 1);
	if (!buf)
		die("malloc");

	int s = s_socket(AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		die("rsocket");
	int one = 1;
	if (s_setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one))
		die("rsetsockopt SO_REUSEADDR");
	if (s_setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one))
		die("rsetsockopt TCP_NODELAY");

	if (is_server) {
		struct sockaddr_in a, peer;
		socklen_t plen = sizeof peer;
		addr_of(&a, bind_ip ? bind_ip : "0.0.0.0", port);
		if (s_bind(s, (struct sockaddr *)&a, sizeof a))
			die("rbind");
		if (s_listen(s, 4))
			die("rlisten");
		int c = s_accept(s, (struct sockaddr *)&peer, &plen);
		if (c < 0)
			die("raccept");
		char ip[64];
		inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
		for (int i = 0; i < iters; i++) {
			recv_all(c, buf, size);
			size_t bad = mismatch(buf, size, (unsigned)i);
			if (bad) {
				fprintf(stderr, "rsping(%s): server: data mismatch at byte %zu\n", impl, bad - 1);
				free(buf);
				return 1;
			}
			send_all(c, buf, size);
		}
		ssize_t r = s_recv(c, buf, 1, 0);
		if (r != 0) {
			fprintf(stderr, "rsping(%s): server: expected end of stream, got %zd (%s)\n", impl, r,
				strerror(errno));
			free(buf);
			return 1;
		}
		printf("rsping(%s) server: %d x %zu bytes from %s verified and echoed; EOF seen\n", impl, iters,
		       size, ip);
		s_close(c);
		s_close(s);
		free(buf);
		return 0;
	}

	if (!server) {
		fprintf(stderr, "rsping: -s or -c SERVER required\n");
		free(buf);
		return 2;
	}
	if (bind_ip) {
		struct sockaddr_in l;
		addr_of(&l, bind_ip, 0);
		if (s_bind(s, (struct sockaddr *)&l, sizeof l))
			die("rbind");
	}
	struct sockaddr_in d;
	addr_of(&d, server, port);
	int r = s_connect(s, (struct sockaddr *)&d, sizeof d);
	if (expect_refused) {
		free(buf);
		if (r == 0 || errno != ECONNREFUSED) {
			fprintf(stderr, "rsping(%s): expected ECONNREFUSED, got %d (%s)\n", impl, r, strerror(errno));
			return 1;
		}
		printf("rsping(%s): connect to a port without listener: ECONNREFUSED as expected\n", impl);
		s_close(s);
		return 0;
	}
	if (r)
		die("rconnect");
	if (keepalive_idle > 0) {
		int on = 1, one_s = 1;
		if (s_setsockopt(s, IPPROTO_TCP, TCP_KEEPIDLE, &one_s, sizeof one_s) ||
		    s_setsockopt(s, IPPROTO_TCP, TCP_KEEPINTVL, &one_s, sizeof one_s) ||
		    s_setsockopt(s, IPPROTO_TCP, TCP_KEEPCNT, &one_s, sizeof one_s) ||
		    s_setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on))
			die("rsetsockopt keepalive");
		sleep(keepalive_idle);
		int err = 0;
		socklen_t elen = sizeof err;
		if (s_getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &elen) || err) {
			fprintf(stderr, "rsping(%s): after %d s idle with keepalive: SO_ERROR %s\n", impl,
				keepalive_idle, strerror(err));
			free(buf);
			return 1;
		}
		printf("rsping(%s): %d s idle with keepalive (given up after 2 s unanswered): still up\n",
		       impl, keepalive_idle);
	}
	if (expect_reset) {
		/* Stream without reading the echo: the peer stalls with unread data, so its death is
		 * an abortive close (a TCP reset), not an orderly end of stream. */
		for (int i = 0;; i++) {
			fill(buf, size, (unsigned)i);
			ssize_t n = s_send(s, buf, size, MSG_NOSIGNAL);
			if (n == 0) {
				printf("rsping(%s): peer killed: end of stream (no reset)\n", impl);
				free(buf);
				return 1;
			}
			if (n < 0) {
				int e = errno;
				printf("rsping(%s): peer killed mid-transfer: %s\n", impl, strerror(e));
				free(buf);
				return e == ECONNRESET ? 0 : 1;
			}
		}
	}
	if (expect_pipe) {
		free(buf);
		if (s_shutdown(s, SHUT_WR))
			die("shutdown");
		ssize_t n = s_send(s, "x", 1, MSG_NOSIGNAL);
		int e1 = errno;
		signal(SIGPIPE, on_sigpipe);
		ssize_t m = s_send(s, "x", 1, 0);
		int e2 = errno;
		printf("rsping(%s): send after SHUT_WR: %zd %s with MSG_NOSIGNAL; %zd %s and %d SIGPIPE without\n",
		       impl, n, strerror(e1), m, strerror(e2), (int)sigpipes);
		s_close(s);
		return (n == -1 && e1 == EPIPE && m == -1 && e2 == EPIPE && sigpipes == 1) ? 0 : 1;
	}
	uint8_t *echo = malloc(size ? size : 1);
	if (!echo)
		die("malloc");
	double t0 = now();
	for (int i = 0; i < iters; i++) {
		fill(buf, size, (unsigned)i);
		send_all(s, buf, size);
		recv_all(s, echo, size);
		size_t bad = mismatch(echo, size, (unsigned)i);
		if (bad) {
			fprintf(stderr, "rsping(%s): client: echo mismatch at byte %zu\n", impl, bad - 1);
			free(echo);
			free(buf);
			return 1;
		}
	}
	double dt = now() - t0;
	printf("rsping(%s) client: %d x %zu bytes sent, echoed and verified in %.3f s: %.1f MB/s each way\n", impl,
	       iters, size, dt, (double)size * iters / dt / 1e6);
	if (s_shutdown(s, SHUT_RDWR))
		die("rshutdown");
	s_close(s);
	free(echo);
	free(buf);
	return 0;
}
