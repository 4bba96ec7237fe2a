/*
 * zerocopy: the zero-copy API of rsocket-rs, as an example and a check.
 *
 *   server: zerocopy -s -b 10.10.0.1 -p PORT
 *   client: zerocopy -c 10.10.0.1 -b 10.10.0.2 -p PORT
 *
 * Client: SO_ZEROCOPY on, one 4 MiB buffer registered once with riomap(PROT_NONE), then
 * rsend(MSG_ZEROCOPY) of 64 chunks of 64 KiB from it, one riowrite(MSG_ZEROCOPY) of 1 MiB into
 * the server's window, and one rsend(MSG_ZEROCOPY) from unregistered memory (copied). It waits
 * for the notices with rpoll (POLLERR) and reads them with rrecvmsg(MSG_ERRQUEUE): every id
 * 0..65 exactly once, in order, only the last one marked SO_EE_CODE_ZEROCOPY_COPIED. The
 * server verifies the stream bytes and its window.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <rsocket.h>

#define CHUNK (64 << 10)
#define CHUNKS 64
#define BUF (CHUNK * CHUNKS)
#define WIN (1 << 20)
#define SMALL 3000

static void die(const char *what)
{
	fprintf(stderr, "zerocopy: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "zerocopy: FAILED: %s\n", what);
	exit(1);
}

static uint8_t pat(uint64_t i, unsigned seed)
{
	return (uint8_t)(i * 7 + (i >> 12) + seed);
}

static void recv_all(int fd, uint8_t *p, size_t n)
{
	while (n) {
		ssize_t r = rrecv(fd, p, n, 0);
		if (r <= 0)
			die("rrecv");
		p += r;
		n -= r;
	}
}

static struct sockaddr_in addr(const char *ip, int port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
		fail("bad address");
	return a;
}

static int server(const char *ip, int port)
{
	int l = rsocket(AF_INET, SOCK_STREAM, 0), n = 2;
	struct sockaddr_in a = addr(ip, port);
	if (l < 0 || rsetsockopt(l, SOL_RDMA, RDMA_IOMAPSIZE, &n, sizeof n) ||
	    rbind(l, (struct sockaddr *)&a, sizeof a) || rlisten(l, 1))
		die("listen");
	int fd = raccept(l, NULL, NULL);
	if (fd < 0)
		die("raccept");
	uint8_t *win = calloc(1, WIN), *got = malloc(BUF);
	if (riomap(fd, win, WIN, PROT_WRITE, 0, 0) != 0)
		die("riomap");
	char c = 'g';
	if (rsend(fd, &c, 1, 0) != 1)
		die("rsend");
	recv_all(fd, got, BUF);
	for (size_t i = 0; i < BUF; i++)
		if (got[i] != pat(i, 1))
			fail("stream bytes differ");
	recv_all(fd, got, SMALL);
	for (size_t i = 0; i < SMALL; i++)
		if (got[i] != pat(i, 2))
			fail("copied bytes differ");
	recv_all(fd, (uint8_t *)&c, 1);
	for (size_t i = 0; i < WIN; i++)
		if (win[i] != pat(i, 1))
			fail("window bytes differ");
	if (rsend(fd, &c, 1, 0) != 1)
		die("rsend");
	printf("zerocopy server: %d bytes streamed and %d in the window verified\n", BUF + SMALL, WIN);
	rclose(fd);
	rclose(l);
	free(got);
	free(win);
	return 0;
}

/* Reads every notice that waits; marks ids seen. Returns how many ids it covered. */
static int read_notices(int fd, int *seen, int total, int copied_id)
{
	int got = 0;
	for (;;) {
		char control[128];
		struct msghdr msg;
		memset(&msg, 0, sizeof msg);
		msg.msg_control = control;
		msg.msg_controllen = sizeof control;
		if (rrecvmsg(fd, &msg, MSG_ERRQUEUE) < 0) {
			if (errno == EAGAIN)
				return got;
			die("rrecvmsg(MSG_ERRQUEUE)");
		}
		struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
		if (!cm || cm->cmsg_level != SOL_IP || cm->cmsg_type != IP_RECVERR)
			fail("notice without an IP_RECVERR control message");
		struct sock_extended_err e;
		memcpy(&e, CMSG_DATA(cm), sizeof e);
		if (e.ee_origin != SO_EE_ORIGIN_ZEROCOPY || e.ee_errno != 0)
			fail("notice is not a zero-copy completion");
		for (uint32_t id = e.ee_info; id <= e.ee_data; id++) {
			if ((int)id >= total || seen[id])
				fail("notice id out of range or repeated");
			int copied = e.ee_code == SO_EE_CODE_ZEROCOPY_COPIED;
			if (copied != ((int)id == copied_id))
				fail("wrong SO_EE_CODE_ZEROCOPY_COPIED");
			seen[id] = 1;
			got++;
		}
	}
}

static int client(const char *dst, const char *ip, int port)
{
	int fd = rsocket(AF_INET, SOCK_STREAM, 0), one = 1, n = 2;
	struct sockaddr_in b = addr(ip, 0), a = addr(dst, port);
	if (fd < 0 || rsetsockopt(fd, SOL_RDMA, RDMA_IOMAPSIZE, &n, sizeof n) ||
	    rbind(fd, (struct sockaddr *)&b, sizeof b) || rconnect(fd, (struct sockaddr *)&a, sizeof a))
		die("connect");
	if (rsetsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one))
		die("SO_ZEROCOPY");
	uint8_t *buf = aligned_alloc(4096, BUF), small[SMALL];
	for (size_t i = 0; i < BUF; i++)
		buf[i] = pat(i, 1);
	for (size_t i = 0; i < SMALL; i++)
		small[i] = pat(i, 2);
	/* Register once, for local use: zero-copy sends come from here. */
	if (riomap(fd, buf, BUF, PROT_NONE, 0, -1) == -1)
		die("riomap PROT_NONE");
	char c;
	recv_all(fd, (uint8_t *)&c, 1);

	int total = CHUNKS + 2, seen[CHUNKS + 2] = {0}, done = 0, calls = 0;
	for (int i = 0; i < CHUNKS; i++) {
		size_t off = 0;
		while (off < CHUNK) {
			ssize_t r = rsend(fd, buf + i * CHUNK + off, CHUNK - off, MSG_ZEROCOPY);
			if (r <= 0)
				die("rsend(MSG_ZEROCOPY)");
			off += r;
			calls++;
		}
	}
	if (riowrite(fd, buf, WIN, 0, MSG_ZEROCOPY) != WIN)
		die("riowrite(MSG_ZEROCOPY)");
	if (rsend(fd, small, SMALL, MSG_ZEROCOPY) != SMALL)
		die("rsend(MSG_ZEROCOPY) from unregistered memory");
	total = calls + 2;
	if (total > CHUNKS + 2)
		fail("a zero-copy rsend was split (ids would not match this check)");
	while (done < total) {
		struct pollfd p = {.fd = fd, .events = 0};
		int r = rpoll(&p, 1, 10000);
		if (r <= 0)
			fail("no POLLERR for the notices within 10 s");
		if (!(p.revents & POLLERR))
			fail("rpoll woke without POLLERR");
		done += read_notices(fd, seen, total, total - 1);
	}
	/* The buffer is ours again: reuse it, then tell the server to check its window. */
	memset(buf, 0, BUF);
	c = 'd';
	if (rsend(fd, &c, 1, 0) != 1)
		die("rsend");
	recv_all(fd, (uint8_t *)&c, 1);
	if (riounmap(fd, buf, BUF))
		die("riounmap");
	printf("zerocopy client: %d zero-copy calls, %d notices' ids all seen once, 1 copied\n",
	       total, done);
	rclose(fd);
	free(buf);
	return 0;
}

int main(int argc, char **argv)
{
	const char *dst = NULL, *ip = NULL;
	int port = 7480, srv = 0, opt;
	while ((opt = getopt(argc, argv, "sc:b:p:")) != -1) {
		switch (opt) {
		case 's': srv = 1; break;
		case 'c': dst = optarg; break;
		case 'b': ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		default: fail("usage: zerocopy -s -b ADDR -p PORT | -c SERVER -b ADDR -p PORT");
		}
	}
	if (!ip || (!srv && !dst))
		fail("usage: zerocopy -s -b ADDR -p PORT | -c SERVER -b ADDR -p PORT");
	return srv ? server(ip, port) : client(dst, ip, port);
}
