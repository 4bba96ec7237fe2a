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
 *
 * The client sends S bytes, the server verifies and echoes them, the client verifies the echo;
 * C times. Then the client shuts down and the server must read end-of-stream (0).
 */
#include <arpa/inet.h>
#include <errno.h>
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

static void die(const char *what)
{
	fprintf(stderr, "rsping(%s): %s: %s\n", IMPL, what, strerror(errno));
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
		ssize_t r = rsend(s, b + off, n - off, 0);
		if (r <= 0)
			die("rsend");
		off += (size_t)r;
	}
}

static void recv_all(int s, uint8_t *b, size_t n)
{
	size_t off = 0;
	while (off < n) {
		ssize_t r = rrecv(s, b + off, n - off, 0);
		if (r == 0) {
			fprintf(stderr, "rsping(%s): early end of stream after %zu of %zu bytes\n", IMPL, off, n);
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
	int port = 7000, is_server = 0, expect_refused = 0, opt, iters = 1;
	size_t size = 1 << 20;

	while ((opt = getopt(argc, argv, "sc:b:p:S:C:E")) != -1) {
		switch (opt) {
		case 's': is_server = 1; break;
		case 'c': server = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'S': size = strtoul(optarg, NULL, 0); break;
		case 'C': iters = atoi(optarg); break;
		case 'E': expect_refused = 1; break;
		default:
			fprintf(stderr, "usage: rsping -s|-c SERVER [-b ADDR] [-p PORT] [-S BYTES] [-C N] [-E]\n");
			return 2;
		}
	}
	uint8_t *buf = malloc(size ? size : 1);
	if (!buf)
		die("malloc");

	int s = rsocket(AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		die("rsocket");
	int one = 1;
	if (rsetsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one))
		die("rsetsockopt SO_REUSEADDR");
	if (rsetsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one))
		die("rsetsockopt TCP_NODELAY");

	if (is_server) {
		struct sockaddr_in a, peer;
		socklen_t plen = sizeof peer;
		addr_of(&a, bind_ip ? bind_ip : "0.0.0.0", port);
		if (rbind(s, (struct sockaddr *)&a, sizeof a))
			die("rbind");
		if (rlisten(s, 4))
			die("rlisten");
		int c = raccept(s, (struct sockaddr *)&peer, &plen);
		if (c < 0)
			die("raccept");
		char ip[64];
		inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
		for (int i = 0; i < iters; i++) {
			recv_all(c, buf, size);
			size_t bad = mismatch(buf, size, (unsigned)i);
			if (bad) {
				fprintf(stderr, "rsping(%s): server: data mismatch at byte %zu\n", IMPL, bad - 1);
				return 1;
			}
			send_all(c, buf, size);
		}
		ssize_t r = rrecv(c, buf, 1, 0);
		if (r != 0) {
			fprintf(stderr, "rsping(%s): server: expected end of stream, got %zd (%s)\n", IMPL, r,
				strerror(errno));
			return 1;
		}
		printf("rsping(%s) server: %d x %zu bytes from %s verified and echoed; EOF seen\n", IMPL, iters,
		       size, ip);
		rclose(c);
		rclose(s);
		return 0;
	}

	if (!server) {
		fprintf(stderr, "rsping: -s or -c SERVER required\n");
		return 2;
	}
	if (bind_ip) {
		struct sockaddr_in l;
		addr_of(&l, bind_ip, 0);
		if (rbind(s, (struct sockaddr *)&l, sizeof l))
			die("rbind");
	}
	struct sockaddr_in d;
	addr_of(&d, server, port);
	int r = rconnect(s, (struct sockaddr *)&d, sizeof d);
	if (expect_refused) {
		if (r == 0 || errno != ECONNREFUSED) {
			fprintf(stderr, "rsping(%s): expected ECONNREFUSED, got %d (%s)\n", IMPL, r, strerror(errno));
			return 1;
		}
		printf("rsping(%s): connect to a port without listener: ECONNREFUSED as expected\n", IMPL);
		rclose(s);
		return 0;
	}
	if (r)
		die("rconnect");
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
			fprintf(stderr, "rsping(%s): client: echo mismatch at byte %zu\n", IMPL, bad - 1);
			return 1;
		}
	}
	double dt = now() - t0;
	printf("rsping(%s) client: %d x %zu bytes sent, echoed and verified in %.3f s: %.1f MB/s each way\n", IMPL,
	       iters, size, dt, (double)size * iters / dt / 1e6);
	if (rshutdown(s, SHUT_RDWR))
		die("rshutdown");
	rclose(s);
	free(echo);
	free(buf);
	return 0;
}
