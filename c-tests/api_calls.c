/*
 * api_calls: every stream call of rsocket.h, through the installed header and library, in one
 * process (server thread + client), with results checked.
 *
 *   api_calls SERVER_IP CLIENT_IP PORT
 *
 * Covers rsocket rbind rlisten raccept rconnect rshutdown rclose rrecv rrecvfrom rrecvmsg rsend
 * rsendto rsendmsg rread rreadv rwrite rwritev rpoll rselect rgetpeername rgetsockname
 * rsetsockopt rgetsockopt rfcntl, plus the errno of calls on bad descriptors.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <rsocket.h>

static int failures;
#define CHECK(cond, ...)                                                                 \
	do {                                                                             \
		if (!(cond)) {                                                           \
			failures++;                                                      \
			fprintf(stderr, "FAIL %s:%d: %s (errno %s): ", __FILE__, __LINE__, #cond, \
				strerror(errno));                                        \
			fprintf(stderr, __VA_ARGS__);                                    \
			fprintf(stderr, "\n");                                           \
		}                                                                        \
	} while (0)

static struct sockaddr_in server_addr;
static int listen_fd;

static void addr_of(struct sockaddr_in *a, const char *ip, int port)
{
	memset(a, 0, sizeof *a);
	a->sin_family = AF_INET;
	a->sin_port = htons((uint16_t)port);
	inet_pton(AF_INET, ip, &a->sin_addr);
}

static size_t read_full(int s, char *b, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = rread(s, b + got, n - got);
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	return got;
}

/* The server echoes what the client sends in several shapes, then checks end of stream. */
static void *server(void *arg)
{
	(void)arg;
	struct sockaddr_in peer;
	socklen_t plen = sizeof peer;
	struct pollfd p = { .fd = listen_fd, .events = POLLIN };
	CHECK(rpoll(&p, 1, 20000) == 1 && (p.revents & POLLIN), "listener POLLIN");
	int c = raccept(listen_fd, (struct sockaddr *)&peer, &plen);
	CHECK(c >= 0, "raccept");
	CHECK(plen == sizeof peer && peer.sin_family == AF_INET, "raccept address");

	/* rreadv must fill every iovec (librdmacm fills only the first). */
	char a[10], b[20], d[30];
	struct iovec iov[3] = { { a, sizeof a }, { b, sizeof b }, { d, sizeof d } };
	size_t got = 0;
	while (got < 60) {
		struct iovec rest[3];
		int n = 0;
		size_t skip = got;
		for (int i = 0; i < 3; i++) {
			if (skip >= iov[i].iov_len) {
				skip -= iov[i].iov_len;
				continue;
			}
			rest[n].iov_base = (char *)iov[i].iov_base + skip;
			rest[n].iov_len = iov[i].iov_len - skip;
			skip = 0;
			n++;
		}
		ssize_t r = rreadv(c, rest, n);
		CHECK(r > 0, "rreadv");
		if (r <= 0)
			break;
		got += (size_t)r;
	}
	char all[60];
	memcpy(all, a, 10);
	memcpy(all + 10, b, 20);
	memcpy(all + 30, d, 30);
	for (int i = 0; i < 60; i++)
		CHECK(all[i] == (char)('A' + i % 26), "rwritev/rreadv byte %d", i);

	/* rrecvmsg into two iovecs, then echo with rsendmsg. */
	char m1[5], m2[7];
	struct iovec miov[2] = { { m1, 5 }, { m2, 7 } };
	struct msghdr mh = { .msg_iov = miov, .msg_iovlen = 2 };
	ssize_t r = rrecvmsg(c, &mh, MSG_WAITALL);
	CHECK(r == 12 && !memcmp(m1, "hello", 5) && !memcmp(m2, " world", 6), "rrecvmsg got %zd", r);
	r = rsendmsg(c, &mh, 0);
	CHECK(r == 12, "rsendmsg %zd", r);

	/* rrecvfrom reports the peer; rsendto on a connected stream ignores the address. */
	struct sockaddr_in from;
	socklen_t flen = sizeof from;
	char x[4];
	r = rrecvfrom(c, x, sizeof x, MSG_WAITALL, (struct sockaddr *)&from, &flen);
	CHECK(r == 4 && !memcmp(x, "ping", 4), "rrecvfrom %zd", r);
	CHECK(from.sin_addr.s_addr == peer.sin_addr.s_addr, "rrecvfrom address");
	r = rsendto(c, "pong", 4, 0, NULL, 0);
	CHECK(r == 4, "rsendto");

	/* rselect sees the next message. */
	fd_set rd;
	FD_ZERO(&rd);
	FD_SET(c, &rd);
	struct timeval tv = { 20, 0 };
	CHECK(rselect(c + 1, &rd, NULL, NULL, &tv) == 1 && FD_ISSET(c, &rd), "rselect readable");
	char big[100000];
	CHECK(read_full(c, big, sizeof big) == sizeof big, "rread");
	for (size_t i = 0; i < sizeof big; i++)
		if (big[i] != (char)(i * 7)) {
			CHECK(0, "rread byte %zu", i);
			break;
		}
	CHECK(rwrite(c, big, sizeof big) == (ssize_t)sizeof big, "rwrite");

	/* After the client's SHUT_WR: end of stream, and we can still send. */
	CHECK(rrecv(c, x, 1, 0) == 0, "end of stream after SHUT_WR");
	CHECK(rsend(c, "bye", 3, 0) == 3, "send after peer's SHUT_WR");
	CHECK(rclose(c) == 0, "rclose accepted");
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: api_calls SERVER_IP CLIENT_IP PORT\n");
		return 2;
	}
	int port = atoi(argv[3]), one = 1, v;
	socklen_t len;

	/* Errors on things that are not rsockets. */
	CHECK(rsend(12345, "x", 1, 0) == -1 && errno == EBADF, "rsend on a bad descriptor");
	CHECK(rclose(12345) == -1 && errno == EBADF, "rclose on a bad descriptor");
	CHECK(rsocket(AF_UNIX, SOCK_STREAM, 0) == -1 && errno == EAFNOSUPPORT, "AF_UNIX");

	listen_fd = rsocket(AF_INET, SOCK_STREAM, 0);
	if (listen_fd < 0) {
		/* No device (the host): nothing below can work; stop cleanly (host-valgrind.sh). */
		fprintf(stderr, "api_calls: rsocket: %s\n", strerror(errno));
		return 1;
	}
	CHECK(rsetsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0, "SO_REUSEADDR");
	addr_of(&server_addr, argv[1], port);
	CHECK(rbind(listen_fd, (struct sockaddr *)&server_addr, sizeof server_addr) == 0, "rbind");
	CHECK(rlisten(listen_fd, 4) == 0, "rlisten");
	struct sockaddr_in la;
	len = sizeof la;
	CHECK(rgetsockname(listen_fd, (struct sockaddr *)&la, &len) == 0 && la.sin_port == htons(port),
	      "rgetsockname of the listener");
	pthread_t t;
	pthread_create(&t, NULL, server, NULL);

	int s = rsocket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	CHECK(s >= 0, "rsocket SOCK_NONBLOCK");
	CHECK((rfcntl(s, F_GETFL) & O_NONBLOCK) != 0, "F_GETFL shows O_NONBLOCK");
	CHECK(rsetsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0, "TCP_NODELAY");
	v = 64;
	CHECK(rsetsockopt(s, SOL_RDMA, RDMA_INLINE, &v, sizeof v) == 0, "RDMA_INLINE");
	len = sizeof v;
	CHECK(rgetsockopt(s, SOL_RDMA, RDMA_INLINE, &v, &len) == 0 && v == 64 && len == sizeof v,
	      "RDMA_INLINE read back");
	CHECK(rsetsockopt(s, SOL_SOCKET, SO_BROADCAST, &one, sizeof one) == -1 && errno == ENOPROTOOPT,
	      "unknown option: ENOPROTOOPT");
	struct sockaddr_in ca;
	addr_of(&ca, argv[2], 0);
	CHECK(rbind(s, (struct sockaddr *)&ca, sizeof ca) == 0, "rbind client");
	int r = rconnect(s, (struct sockaddr *)&server_addr, sizeof server_addr);
	CHECK(r == 0 || errno == EINPROGRESS, "non-blocking rconnect");
	struct pollfd p = { .fd = s, .events = POLLOUT };
	CHECK(rpoll(&p, 1, 20000) == 1 && (p.revents & POLLOUT), "POLLOUT after connect");
	int err = -1;
	len = sizeof err;
	CHECK(rgetsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0, "SO_ERROR 0");
	char x[8];
	CHECK(rrecv(s, x, sizeof x, 0) == -1 && errno == EAGAIN, "non-blocking rrecv: EAGAIN");
	CHECK(rfcntl(s, F_SETFL, 0) == 0 && !(rfcntl(s, F_GETFL) & O_NONBLOCK), "back to blocking");
	struct sockaddr_in pa;
	len = sizeof pa;
	CHECK(rgetpeername(s, (struct sockaddr *)&pa, &len) == 0 && pa.sin_port == htons(port),
	      "rgetpeername");

	char alpha[60];
	for (int i = 0; i < 60; i++)
		alpha[i] = (char)('A' + i % 26);
	struct iovec wiov[3] = { { alpha, 25 }, { alpha + 25, 5 }, { alpha + 30, 30 } };
	CHECK(rwritev(s, wiov, 3) == 60, "rwritev");
	struct iovec siov[2] = { { "hello", 5 }, { " world!", 7 } };
	struct msghdr mh = { .msg_iov = siov, .msg_iovlen = 2 };
	CHECK(rsendmsg(s, &mh, 0) == 12, "rsendmsg");
	char echo[12];
	CHECK(rrecv(s, echo, 12, MSG_WAITALL) == 12 && !memcmp(echo, "hello world!", 12), "echo of rsendmsg");
	CHECK(rsend(s, "ping", 4, 0) == 4, "rsend");
	CHECK(rrecv(s, x, 4, MSG_WAITALL) == 4 && !memcmp(x, "pong", 4), "pong");
	static char big[100000], back[100000];
	for (size_t i = 0; i < sizeof big; i++)
		big[i] = (char)(i * 7);
	CHECK(rwrite(s, big, sizeof big) == (ssize_t)sizeof big, "rwrite");
	CHECK(read_full(s, back, sizeof back) == sizeof back && !memcmp(big, back, sizeof big), "rread echo");
	CHECK(rshutdown(s, SHUT_WR) == 0, "rshutdown SHUT_WR");
	CHECK(rsend(s, "x", 1, MSG_NOSIGNAL) == -1 && errno == EPIPE, "EPIPE after SHUT_WR");
	CHECK(rrecv(s, x, 3, MSG_WAITALL) == 3 && !memcmp(x, "bye", 3), "half-close keeps reading");
	pthread_join(t, NULL);
	CHECK(rclose(s) == 0, "rclose");
	CHECK(rclose(listen_fd) == 0, "rclose listener");
	CHECK(rclose(s) == -1 && errno == EBADF, "double rclose: EBADF");
	if (failures) {
		fprintf(stderr, "api_calls: %d checks failed\n", failures);
		return 1;
	}
	printf("api_calls: every stream call of rsocket.h exercised and checked\n");
	return 0;
}
