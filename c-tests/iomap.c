/*
 * iomap: riomap / riowrite / rioread / riounmap checked byte for byte, with the refusals.
 *
 * Built against rsocket-rs and, with -DUSE_LIBRDMACM, against librdmacm (which has no rioread
 * and maps PROT_WRITE windows only), so either end can be the other implementation.
 *
 *   server: iomap -s -b 10.10.0.1 -p PORT
 *   client: iomap -c 10.10.0.1 -b 10.10.0.2 -p PORT [-n ROUNDS] [-r SEED]
 *
 * The server offers window W (1 MiB at offset 0, PROT_WRITE), and, on rsocket-rs, window R
 * (1 MiB at offset 16 MiB, PROT_READ, filled with a pattern) and window RW (64 KiB at offset
 * 32 MiB, PROT_READ|PROT_WRITE). W sits between guard pages. The client riowrites random ranges
 * of W and keeps its own image of W; it rioreads random ranges of R and RW and compares them. It
 * checks the refusals (outside or straddling a window, wrong protection, rioread towards
 * librdmacm) and sends its image; the server compares it with W and checks the guards. Then the
 * server unmaps W and the client's next riowrite there must be refused.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef USE_LIBRDMACM
#include <rdma/rsocket.h>
#define IMPL "librdmacm"
#else
#include <rsocket.h>
#define IMPL "rsocket-rs"
#endif

#define W_OFF 0
#define W_LEN (1 << 20)
#define R_OFF (16 << 20)
#define R_LEN (1 << 20)
#define RW_OFF (32 << 20)
#define RW_LEN (64 << 10)
#define GUARD 4096

static int checks;

static void die(const char *what)
{
	fprintf(stderr, "iomap(%s): %s: %s\n", IMPL, what, strerror(errno));
	exit(1);
}

static void fail(const char *what)
{
	fprintf(stderr, "iomap(%s): FAILED: %s\n", IMPL, what);
	exit(1);
}

static uint8_t pat(uint64_t off, unsigned seed)
{
	return (uint8_t)(off * 131 + (off >> 11) + seed);
}

static void send_all(int fd, const void *buf, size_t n)
{
	const uint8_t *p = buf;
	while (n) {
		ssize_t r = rsend(fd, p, n, 0);
		if (r <= 0)
			die("rsend");
		p += r;
		n -= r;
	}
}

static void recv_all(int fd, void *buf, size_t n)
{
	uint8_t *p = buf;
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

static void set_iomap_size(int fd)
{
	int n = 4;
	if (rsetsockopt(fd, SOL_RDMA, RDMA_IOMAPSIZE, &n, sizeof n))
		die("RDMA_IOMAPSIZE");
}

/* A call that must fail with errno `want`. */
#define REFUSED(call, want, what)                                                          \
	do {                                                                               \
		errno = 0;                                                                 \
		if ((call) != (__typeof__(call))-1 || errno != (want)) {                  \
			fprintf(stderr, "iomap(%s): %s: expected errno %d, got %d (%s)\n", \
				IMPL, what, want, errno, strerror(errno));                 \
			exit(1);                                                           \
		}                                                                          \
		checks++;                                                                  \
	} while (0)

static int server(const char *bind_ip, int port)
{
	int l = rsocket(AF_INET, SOCK_STREAM, 0);
	if (l < 0)
		die("rsocket");
	set_iomap_size(l);
	struct sockaddr_in a = addr(bind_ip, port);
	if (rbind(l, (struct sockaddr *)&a, sizeof a) || rlisten(l, 1))
		die("bind/listen");
	int fd = raccept(l, NULL, NULL);
	if (fd < 0)
		die("raccept");

	/* W between two guard pages the peer must never touch. */
	uint8_t *area = mmap(NULL, W_LEN + 2 * GUARD, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		die("mmap");
	memset(area, 0xEE, W_LEN + 2 * GUARD);
	uint8_t *w = area + GUARD;
	memset(w, 0, W_LEN);
	if (riomap(fd, w, W_LEN, PROT_WRITE, 0, W_OFF) != W_OFF)
		die("riomap W");
#ifndef USE_LIBRDMACM
	uint8_t *r = malloc(R_LEN), *rw = malloc(RW_LEN);
	for (size_t i = 0; i < R_LEN; i++)
		r[i] = pat(i, 7);
	for (size_t i = 0; i < RW_LEN; i++)
		rw[i] = pat(i, 9);
	/* PROT_READ cannot be offered to a librdmacm peer. */
	int peer_rs = 1;
	if (riomap(fd, r, R_LEN, PROT_READ, 0, R_OFF) != R_OFF) {
		if (errno != EOPNOTSUPP)
			die("riomap R");
		peer_rs = 0;
		checks++;
	}
	if (peer_rs && riomap(fd, rw, RW_LEN, PROT_READ | PROT_WRITE, 0, RW_OFF) != RW_OFF)
		die("riomap RW");
	/* Local refusals: bad protection, overlapping window, all entries taken. */
	REFUSED(riomap(fd, rw, 10, PROT_EXEC, 0, 64 << 20), EINVAL, "riomap PROT_EXEC");
	REFUSED(riomap(fd, rw, 10, PROT_WRITE, 0, W_OFF + 100), EINVAL, "riomap overlapping W");
	REFUSED(riounmap(fd, rw, 11), EINVAL, "riounmap of an unknown range");
	if (peer_rs) {
		if (riomap(fd, rw, 10, PROT_WRITE, 0, 48 << 20) != 48 << 20)
			die("riomap 4th");
		REFUSED(riomap(fd, rw + 16, 10, PROT_WRITE, 0, 50 << 20), ENOMEM,
			"riomap 5th of 4");
		if (riounmap(fd, rw, 10))
			die("riounmap 4th");
	}
#endif
	char go = 'g';
	send_all(fd, &go, 1);

	/* The client's image of W, then the comparison. */
	uint8_t *img = malloc(W_LEN);
	recv_all(fd, img, W_LEN);
	if (memcmp(img, w, W_LEN)) {
		size_t i = 0, n = 0, last = 0;
		while (img[i] == w[i])
			i++;
		for (size_t k = i; k < W_LEN; k++)
			if (img[k] != w[k])
				n++, last = k;
		fprintf(stderr, "first difference at %zu (image %u, W %u), last at %zu, %zu bytes differ\n",
			i, img[i], w[i], last, n);
		fail("W differs from the client's image");
	}
	for (size_t i = 0; i < GUARD; i++)
		if (area[i] != 0xEE || area[GUARD + W_LEN + i] != 0xEE)
			fail("a guard byte around W changed");
	checks += 2;
#ifndef USE_LIBRDMACM
	/* RW was written too: its first 4 KiB by the client with seed 3. */
	for (size_t i = 0; peer_rs && i < 4096; i++)
		if (rw[i] != pat(i, 3))
			fail("RW differs");
	checks++;
#endif
	/* Unmap W; the client's next riowrite there must be refused and change nothing. */
	if (riounmap(fd, w, W_LEN))
		die("riounmap W");
	memset(w, 0x55, W_LEN);
	send_all(fd, &go, 1);
	recv_all(fd, &go, 1);
	for (size_t i = 0; i < W_LEN; i++)
		if (w[i] != 0x55)
			fail("W changed after riounmap");
	checks++;
	if (rclose(fd) || rclose(l))
		die("rclose");
	free(img);
#ifndef USE_LIBRDMACM
	free(rw);
	free(r);
#endif
	munmap(area, W_LEN + 2 * GUARD);
	printf("iomap(%s) server: OK, %d checks\n", IMPL, checks);
	return 0;
}

static uint64_t rng;
static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static int client(const char *dst, const char *bind_ip, int port, int rounds)
{
	int fd = rsocket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		die("rsocket");
	set_iomap_size(fd);
	struct sockaddr_in b = addr(bind_ip, 0), a = addr(dst, port);
	if (rbind(fd, (struct sockaddr *)&b, sizeof b))
		die("rbind");
	if (rconnect(fd, (struct sockaddr *)&a, sizeof a))
		die("rconnect");
	char go;
	recv_all(fd, &go, 1);
	/* Is the peer rsocket-rs? Its R window answers rioread; librdmacm's cannot. */
	int peer_rs = 1;
#ifndef USE_LIBRDMACM
	{
		uint8_t probe[16];
		size_t n = rioread(fd, probe, sizeof probe, R_OFF, 0);
		if (n == (size_t)-1) {
			if (errno != EOPNOTSUPP)
				die("rioread probe");
			peer_rs = 0;
			checks++;
			REFUSED(rioread(fd, probe, 16, W_OFF, 0), EOPNOTSUPP,
				"rioread towards librdmacm");
		}
	}
#else
	peer_rs = 0;
#endif
	uint8_t *img = calloc(1, W_LEN), *src = malloc(W_LEN);
#ifndef USE_LIBRDMACM
	uint8_t *rd = malloc(R_LEN);
#endif
	for (size_t i = 0; i < W_LEN; i++)
		src[i] = pat(i, 5);
	size_t wrote = 0, read = 0;
	for (int i = 0; i < rounds; i++) {
		uint64_t off = next() % W_LEN;
		uint64_t len = 1 + next() % (next() % 4 ? 4096 : W_LEN - off);
		if (len > W_LEN - off)
			len = W_LEN - off;
		const uint8_t *from = src + (next() % (W_LEN - len + 1));
		size_t n = riowrite(fd, from, len, W_OFF + off, 0);
		if (n != len)
			die("riowrite");
		memcpy(img + off, from, len);
		wrote += len;
#ifndef USE_LIBRDMACM
		if (peer_rs) {
			uint64_t ro = next() % R_LEN;
			uint64_t rl = 1 + next() % (next() % 4 ? 4096 : R_LEN - ro);
			if (rl > R_LEN - ro)
				rl = R_LEN - ro;
			memset(rd, 0, rl);
			if (rioread(fd, rd, rl, R_OFF + ro, 0) != rl)
				die("rioread");
			for (uint64_t k = 0; k < rl; k++)
				if (rd[k] != pat(ro + k, 7))
					fail("rioread data differs");
			read += rl;
		}
#endif
	}
	checks += rounds;
#ifndef USE_LIBRDMACM
	/* Refusals: nothing may be posted for them (librdmacm hangs on the first one). */
	REFUSED(riowrite(fd, src, 20, W_OFF + W_LEN - 10, 0), EINVAL, "riowrite past W's end");
	REFUSED(riowrite(fd, src, 1, 8 << 20, 0), EINVAL, "riowrite to an unmapped offset");
	REFUSED(riowrite(fd, src, 1, -5, 0), EINVAL, "riowrite at a negative offset");
	if (peer_rs) {
		REFUSED(riowrite(fd, src, 10, R_OFF, 0), EACCES, "riowrite to a PROT_READ window");
		REFUSED(rioread(fd, rd, 10, W_OFF, 0), EACCES, "rioread from a PROT_WRITE window");
		REFUSED(rioread(fd, rd, 20, R_OFF + R_LEN - 10, 0), EINVAL, "rioread past R's end");
		REFUSED(rioread(fd, rd, 1, 8 << 20, 0), EINVAL, "rioread from an unmapped offset");
		/* RW: write 4 KiB (seed 3), read them back; the rest keeps the server's seed 9. */
		uint8_t buf[8192];
		for (int k = 0; k < 4096; k++)
			buf[k] = pat(k, 3);
		if (riowrite(fd, buf, 4096, RW_OFF, 0) != 4096)
			die("riowrite RW");
		if (rioread(fd, buf, 8192, RW_OFF, 0) != 8192)
			die("rioread RW");
		for (int k = 0; k < 8192; k++)
			if (buf[k] != pat(k, k < 4096 ? 3 : 9))
				fail("RW read back differs");
		checks++;
	}
#endif
	/* The image goes after the riowrites on the same socket: the server sees them first. */
	send_all(fd, img, W_LEN);
	recv_all(fd, &go, 1);
	if (peer_rs)
		REFUSED(riowrite(fd, src, 10, W_OFF, 0), EINVAL, "riowrite after riounmap");
	send_all(fd, &go, 1);
	printf("iomap(%s) client: OK, %d checks, %zu bytes riowritten, %zu rioread%s\n", IMPL,
	       checks, wrote, read,
#ifdef USE_LIBRDMACM
	       " (librdmacm has no rioread)"
#else
	       peer_rs ? "" : " (peer is librdmacm: rioread refused)"
#endif
	);
	rshutdown(fd, SHUT_RDWR);
	rclose(fd);
#ifndef USE_LIBRDMACM
	free(rd);
#endif
	free(src);
	free(img);
	return 0;
}

int main(int argc, char **argv)
{
	const char *dst = NULL, *bind_ip = NULL;
	int port = 7471, srv = 0, rounds = 200, opt;
	rng = 0x9E3779B97F4A7C15ull;
	while ((opt = getopt(argc, argv, "sc:b:p:n:r:")) != -1) {
		switch (opt) {
		case 's': srv = 1; break;
		case 'c': dst = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'n': rounds = atoi(optarg); break;
		case 'r': rng = strtoull(optarg, NULL, 0) | 1; break;
		default: fail("usage: iomap -s -b ADDR -p PORT | -c SERVER -b ADDR -p PORT [-n N] [-r SEED]");
		}
	}
	if (!bind_ip || (!srv && !dst))
		fail("usage: iomap -s -b ADDR -p PORT | -c SERVER -b ADDR -p PORT [-n N] [-r SEED]");
	return srv ? server(bind_ip, port) : client(dst, bind_ip, port, rounds);
}
