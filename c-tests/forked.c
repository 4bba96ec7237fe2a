/*
 * forked: the service thread across fork(). The client streams small messages on one
 * connection (staged: the parent's service thread posts them), forks, and the child opens its
 * own connection and streams small messages there too (the child has no thread of the parent's:
 * its first job starts its own service thread), then exits with exit(3), which waits for its
 * close to finish lingering on iWARP. The parent goes on streaming on its connection meanwhile.
 * The server takes both connections in turn and checks every byte of each.
 *
 *   server: forked -s -b SERVER -p PORT
 *   client: forked -c SERVER -b CLIENT -p PORT
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>
#include <rsocket.h>

#define MSGS 20000
#define MAXLEN 61

static const char *who = "forked";

static void die(const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", who, what, strerror(errno));
	exit(1);
}

/* Message i of stream `seed`: 1 + i % MAXLEN bytes. */
static size_t msg(uint8_t *b, unsigned i, unsigned seed)
{
	size_t n = 1 + i % MAXLEN;
	for (size_t k = 0; k < n; k++)
		b[k] = (uint8_t)(i * 7 + k * 131 + seed);
	return n;
}

static void addr_of(struct sockaddr_in *a, const char *ip, int port)
{
	memset(a, 0, sizeof *a);
	a->sin_family = AF_INET;
	a->sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, ip, &a->sin_addr) != 1) {
		fprintf(stderr, "%s: bad address %s\n", who, ip);
		exit(2);
	}
}

static int dial(const char *dst, const char *src, int port)
{
	struct sockaddr_in a, b;
	int s = rsocket(AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		die("rsocket");
	addr_of(&b, src, 0);
	if (rbind(s, (struct sockaddr *)&b, sizeof b))
		die("rbind");
	addr_of(&a, dst, port);
	if (rconnect(s, (struct sockaddr *)&a, sizeof a))
		die("rconnect");
	return s;
}

/* Streams messages [from, to) of stream `seed`, one rsend each. */
static void stream(int s, unsigned from, unsigned to, unsigned seed)
{
	uint8_t b[MAXLEN];
	for (unsigned i = from; i < to; i++) {
		size_t n = msg(b, i, seed), off = 0;
		while (off < n) {
			ssize_t r = rsend(s, b + off, n - off, MSG_NOSIGNAL);
			if (r <= 0)
				die("rsend");
			off += (size_t)r;
		}
	}
}

/* Receives one whole stream (the first byte says which) and checks every byte. */
static void check_stream(int s)
{
	uint8_t want[MAXLEN], got[MAXLEN * 64];
	size_t have = 0, used = 0;
	unsigned seed = 0, i = 0;
	size_t total = 0, k = 0;
	for (;;) {
		if (used == have) {
			ssize_t r = rrecv(s, got, sizeof got, 0);
			if (r < 0)
				die("rrecv");
			if (r == 0)
				break;
			have = (size_t)r;
			used = 0;
		}
		if (i == 0 && total == 0)
			seed = got[used]; /* message 0, byte 0 is the seed */
		size_t n = msg(want, i, seed);
		while (k < n && used < have) {
			if (got[used] != want[k]) {
				fprintf(stderr, "%s: stream %u: wrong byte at message %u byte %zu (got %#x, want %#x)\n", who,
					seed, i, k, got[used], want[k]);
				exit(1);
			}
			k++, used++, total++;
		}
		if (k == n) {
			k = 0;
			i++;
		}
	}
	if (i != MSGS) {
		fprintf(stderr, "%s: stream %u: %u of %u messages\n", who, seed, i, MSGS);
		exit(1);
	}
	printf("%s: stream %u: %u messages, %zu bytes, every byte checked\n", who, seed, i, total);
}

static void *serve(void *arg)
{
	int s = (int)(intptr_t)arg;
	check_stream(s);
	rclose(s);
	return NULL;
}

int main(int argc, char **argv)
{
	const char *srv = NULL, *cli = NULL, *bind_ip = NULL;
	int port = 0, opt;
	while ((opt = getopt(argc, argv, "s:c:b:p:")) != -1) {
		switch (opt) {
		case 's': srv = optarg; break;
		case 'c': cli = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		default: return 2;
		}
	}
	if (srv) {
		struct sockaddr_in a;
		int l = rsocket(AF_INET, SOCK_STREAM, 0);
		if (l < 0)
			die("rsocket");
		addr_of(&a, srv, port);
		if (rbind(l, (struct sockaddr *)&a, sizeof a) || rlisten(l, 2))
			die("listen");
		/* Both connections at once: the child connects while the parent still streams. */
		pthread_t th[2];
		for (int c = 0; c < 2; c++) {
			int s = raccept(l, NULL, NULL);
			if (s < 0)
				die("raccept");
			if (pthread_create(&th[c], NULL, serve, (void *)(intptr_t)s))
				die("pthread_create");
		}
		for (int c = 0; c < 2; c++)
			pthread_join(th[c], NULL);
		rclose(l);
		return 0;
	}
	if (!cli || !bind_ip)
		return 2;
	/* Parent's stream: seed 1 (message 0 byte 0 = 0*7 + 0 + seed). */
	int s = dial(cli, bind_ip, port);
	stream(s, 0, MSGS / 2, 1);
	pid_t pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		who = "forked(child)";
		int t = dial(cli, bind_ip, port);
		stream(t, 0, MSGS, 2);
		if (rclose(t))
			die("rclose");
		exit(0);
	}
	stream(s, MSGS / 2, MSGS, 1);
	if (rclose(s))
		die("rclose");
	int st;
	if (waitpid(pid, &st, 0) != pid)
		die("waitpid");
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		fprintf(stderr, "%s: child failed (status %#x)\n", who, st);
		return 1;
	}
	printf("%s: parent and child streams sent\n", who);
	return 0;
}
