/*
 * forked: a forking server whose parent used RDMA before the fork, as a prefork server's master
 * or a server that forks per job does.
 *
 *   server: forked -s -b 10.10.0.1 -p PORT
 *   client: forked -c 10.10.0.1 -b 10.10.0.2 -p PORT
 *
 * The server accepts connection A on PORT and then forks. The child listens on PORT+1, accepts
 * connection B and echoes it; the parent echoes A at the same time, then waits for the child.
 * The client sends a seeded stream of random-sized chunks on A and on B and checks every echoed
 * byte. The child never touches A: a connection belongs to the process that made it.
 *
 * What it guards: the kernel refuses the write()-based verbs commands (Soft-RoCE's and
 * Soft-iWARP's doorbell) on a device file that another process opened, so a child that made its
 * QP on the context its parent had opened connected and then failed its first post with EACCES.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <rsocket.h>

#define TOTAL (1u << 20)
#define MAXCHUNK 65536

static const char *addr, *local;
static int port;

static void die(const char *what)
{
	fprintf(stderr, "forked[%d]: %s: %s\n", getpid(), what, strerror(errno));
	exit(1);
}

static struct sockaddr_in sa(const char *ip, int p)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons(p);
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", ip);
		exit(64);
	}
	return a;
}

static int listen_on(int p)
{
	struct sockaddr_in a = sa(addr, p);
	int one = 1, l = rsocket(AF_INET, SOCK_STREAM, 0);
	if (l < 0)
		die("rsocket");
	rsetsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (rbind(l, (struct sockaddr *)&a, sizeof a) || rlisten(l, 4))
		die("listen");
	return l;
}

/* Echoes everything until end of stream. */
static void echo(int c)
{
	static char buf[MAXCHUNK];
	for (;;) {
		ssize_t n = rrecv(c, buf, sizeof buf, 0);
		if (n == 0)
			return;
		if (n < 0)
			die("rrecv");
		for (ssize_t o = 0; o < n;) {
			ssize_t w = rsend(c, buf + o, n - o, 0);
			if (w < 0)
				die("rsend");
			o += w;
		}
	}
}

static int server(void)
{
	int l = listen_on(port);
	int a = raccept(l, NULL, NULL);
	if (a < 0)
		die("raccept A");
	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		int l2 = listen_on(port + 1);
		int b = raccept(l2, NULL, NULL);
		if (b < 0)
			die("raccept B (child)");
		echo(b);
		rclose(b);
		rclose(l2);
		printf("child %d: connection B echoed\n", getpid());
		_exit(0);
	}
	echo(a);
	rclose(a);
	rclose(l);
	int st;
	if (waitpid(child, &st, 0) != child)
		die("waitpid");
	printf("parent: connection A echoed, child exit status %d\n", st);
	return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}

static int dial(int p, int tries)
{
	struct sockaddr_in b = sa(local, 0), d = sa(addr, p);
	for (;;) {
		int s = rsocket(AF_INET, SOCK_STREAM, 0);
		if (s < 0)
			die("rsocket");
		if (rbind(s, (struct sockaddr *)&b, sizeof b))
			die("rbind");
		if (!rconnect(s, (struct sockaddr *)&d, sizeof d))
			return s;
		if (errno != ECONNREFUSED || --tries <= 0)
			die("rconnect");
		rclose(s);
		usleep(100000); /* the child is not listening yet */
	}
}

/* Sends TOTAL seeded bytes in random chunks, each read back and compared. */
static void exchange(int s, unsigned seed, const char *name)
{
	static char out[MAXCHUNK], in[MAXCHUNK];
	unsigned r = seed;
	for (size_t done = 0; done < TOTAL;) {
		size_t n = 1 + rand_r(&r) % MAXCHUNK;
		if (n > TOTAL - done)
			n = TOTAL - done;
		for (size_t i = 0; i < n; i++)
			out[i] = (char)((done + i) * 31 + seed);
		for (size_t o = 0; o < n;) {
			ssize_t w = rsend(s, out + o, n - o, 0);
			if (w < 0)
				die("rsend");
			o += w;
		}
		for (size_t o = 0; o < n;) {
			ssize_t g = rrecv(s, in + o, n - o, 0);
			if (g <= 0)
				die(g ? "rrecv" : "rrecv: early end of stream");
			o += g;
		}
		if (memcmp(in, out, n)) {
			fprintf(stderr, "forked: connection %s: echo differs at stream offset %zu\n", name,
				done);
			exit(2);
		}
		done += n;
	}
	rshutdown(s, SHUT_WR);
	char x;
	if (rrecv(s, &x, 1, 0) != 0)
		die("end of stream after the echo");
	rclose(s);
	printf("connection %s: %u bytes echoed and checked\n", name, TOTAL);
}

static int client(void)
{
	int a = dial(port, 1);
	int b = dial(port + 1, 100);
	exchange(b, 7, "B (the forked child's)");
	exchange(a, 3, "A (made before the fork)");
	return 0;
}

int main(int argc, char **argv)
{
	int c, srv = -1;
	while ((c = getopt(argc, argv, "s:c:b:p:")) != -1) {
		switch (c) {
		case 's':
			srv = 1;
			addr = optarg;
			break;
		case 'c':
			srv = 0;
			addr = optarg;
			break;
		case 'b':
			local = optarg;
			break;
		case 'p':
			port = atoi(optarg);
			break;
		default:
			goto usage;
		}
	}
	if (srv < 0 || !port || (!srv && !local))
		goto usage;
	return srv ? server() : client();
usage:
	fprintf(stderr, "usage: forked -s ADDR -p PORT | forked -c SERVER -b LOCAL -p PORT\n");
	return 64;
}
