/*
 * idleconns: many idle connections in one process, and the memory they register with the RDMA
 * device (what an idle connection pins). Built twice: against rsocket-rs (bin/idleconns) and,
 * with -DUSE_LIBRDMACM, against librdmacm's rsockets (bin/idleconns-rdmacm), so the same run
 * compares both.
 *
 *   server: idleconns -s ADDR -p PORT -n N
 *           accepts N connections; on each, reads one byte and answers it plus one; then reads
 *           each connection to its end (the client's close) and exits 0.
 *   client: idleconns -c ADDR -p PORT -n N
 *           opens N connections, one byte each way on every one (the answer is checked), then,
 *           with all N open and idle, reads the device's table of memory regions
 *           (`rdma resource show mr`) and sums those of this process. Prints
 *             idleconns IMPL connections N mrs M registered BYTES per_connection BYTES
 *           and closes everything. Exit 0 only if every connection worked and the table named
 *           this process.
 *
 * Either side that makes no progress (same connection, same call) for STALL_S seconds says so
 * on stderr, once ("no progress for ... in rrecv"): the suite ends a run where both sides say
 * so (a hang: Soft-iWARP's first-message hang) at once, rather than at its timeout.
 */
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#ifdef USE_LIBRDMACM
#include <rdma/rsocket.h>
#define IMPL "librdmacm"
#else
#include <rsocket.h>
#define IMPL "rsocket-rs"
#endif

/* Where this side is, for a failure's message and for SIGTERM (the suite's timeout): the
 * connection it works on and the call it is in. */
static volatile sig_atomic_t at_conn = -1;
static const char *volatile at_call = "start";

static void die(const char *what)
{
	fprintf(stderr, "idleconns %s: connection %d: %s: %s\n", IMPL, (int)at_conn, what,
		strerror(errno));
	exit(1);
}

/* Seconds without progress after which a side says it is stuck. A connection takes tens of
 * milliseconds, a connect retried for a busy port at most 10 s. */
#define STALL_S 30

/* Watches at_conn and at_call; says once when neither changed for STALL_S seconds. */
static void *watchdog(void *arg)
{
	(void)arg;
	int conn = at_conn, still = 0;
	const char *call = at_call;
	for (;;) {
		sleep(1);
		if (at_conn != conn || at_call != call) {
			conn = at_conn;
			call = at_call;
			still = 0;
		} else if (++still == STALL_S) {
			fprintf(stderr, "idleconns %s: no progress for %d s at connection %d, in %s\n", IMPL,
				STALL_S, conn, call);
		}
	}
	return NULL;
}

static void on_term(int sig)
{
	char msg[160];
	int n = snprintf(msg, sizeof msg, "idleconns %s: terminated at connection %d, in %s\n", IMPL,
			 (int)at_conn, at_call);
	if (n > 0 && write(2, msg, (size_t)n) < 0)
		_exit(128 + sig);
	_exit(128 + sig);
}

static struct addrinfo *resolve(const char *host, const char *port, int passive)
{
	struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM };
	struct addrinfo *ai;
	if (passive)
		hints.ai_flags = AI_PASSIVE;
	int rc = getaddrinfo(host, port, &hints, &ai);
	if (rc) {
		fprintf(stderr, "idleconns: %s: %s\n", host, gai_strerror(rc));
		exit(1);
	}
	return ai;
}

/* Descriptors for every connection (each holds a few): as many as the process may have, and
 * more when it may raise its hard limit (root in the test VM, whose default is 1024). */
static void raise_fd_limit(int n)
{
	struct rlimit r;
	rlim_t want = (rlim_t)n * 8 + 64;
	if (getrlimit(RLIMIT_NOFILE, &r) != 0)
		return;
	if (r.rlim_max < want) {
		struct rlimit more = { want, want };
		if (setrlimit(RLIMIT_NOFILE, &more) == 0)
			return;
	}
	if (r.rlim_cur < r.rlim_max) {
		r.rlim_cur = r.rlim_max;
		setrlimit(RLIMIT_NOFILE, &r);
	}
}

static int one(int fd, char *b, int send)
{
	for (;;) {
		ssize_t n = send ? rsend(fd, b, 1, 0) : rrecv(fd, b, 1, 0);
		if (n == 1)
			return 0;
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0)
			errno = ECONNRESET;
		return -1;
	}
}

static int server(const char *host, const char *port, int n)
{
	struct addrinfo *ai = resolve(host, port, 1);
	int l = rsocket(AF_INET, SOCK_STREAM, 0);
	int on = 1;
	if (l < 0)
		die("rsocket");
	rsetsockopt(l, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
	if (rbind(l, ai->ai_addr, ai->ai_addrlen) || rlisten(l, 128))
		die("rbind/rlisten");
	int *fds = calloc(n, sizeof *fds);
	for (int i = 0; i < n; i++) {
		char b;
		at_conn = i;
		at_call = "raccept";
		fds[i] = raccept(l, NULL, NULL);
		if (fds[i] < 0)
			die("raccept");
		at_call = "rrecv";
		if (one(fds[i], &b, 0))
			die("rrecv");
		b++;
		at_call = "rsend";
		if (one(fds[i], &b, 1))
			die("rsend");
	}
	at_call = "rrecv (end of stream)";
	for (int i = 0; i < n; i++) {
		char b;
		ssize_t r;
		at_conn = i;
		do
			r = rrecv(fds[i], &b, 1, 0);
		while (r < 0 && errno == EINTR);
		if (r != 0) {
			fprintf(stderr, "idleconns %s: connection %d: %zd at the end, not EOF\n", IMPL, i, r);
			return 1;
		}
		rclose(fds[i]);
	}
	rclose(l);
	printf("idleconns %s server: %d connections served\n", IMPL, n);
	return 0;
}

/* Sums the memory regions of this process in `rdma resource show mr`. */
static int registered(long *mrs, long long *bytes)
{
	FILE *f = popen("rdma resource show mr 2>&1", "r");
	char line[1024];
	int seen = 0;
	*mrs = 0;
	*bytes = 0;
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f)) {
		long pid = -1;
		long long len = -1;
		char *tok, *save = NULL;
		for (tok = strtok_r(line, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
			char *v = strtok_r(NULL, " \t\n", &save);
			if (!v)
				break;
			if (!strcmp(tok, "pid"))
				pid = atol(v);
			else if (!strcmp(tok, "mrlen"))
				len = atoll(v);
		}
		if (pid == (long)getpid() && len >= 0) {
			(*mrs)++;
			*bytes += len;
			seen = 1;
		}
	}
	pclose(f);
	return seen ? 0 : -1;
}

static int client(const char *host, const char *port, int n)
{
	struct addrinfo *ai = resolve(host, port, 0);
	int *fds = calloc(n, sizeof *fds);
	for (int i = 0; i < n; i++) {
		at_conn = i;
		at_call = "rconnect";
		fds[i] = rsocket(AF_INET, SOCK_STREAM, 0);
		if (fds[i] < 0)
			die("rsocket");
		int tries = 0;
		while (rconnect(fds[i], ai->ai_addr, ai->ai_addrlen)) {
			/* The first connect may race the server's start, a later one a full backlog;
			 * on Soft-iWARP librdmacm's connect fails with EADDRINUSE when the CM's port is
			 * still taken in TCP (TIME_WAIT after earlier tests): another socket, another
			 * port (rsocket-rs retries so by itself). */
			if ((errno != ECONNREFUSED && errno != EADDRINUSE) || ++tries > 100)
				die("rconnect");
			rclose(fds[i]);
			usleep(100000);
			fds[i] = rsocket(AF_INET, SOCK_STREAM, 0);
			if (fds[i] < 0)
				die("rsocket");
		}
		char b = (char)i, want = (char)(i + 1);
		at_call = "rsend";
		if (one(fds[i], &b, 1))
			die("rsend");
		at_call = "rrecv";
		if (one(fds[i], &b, 0))
			die("rrecv");
		if ((i + 1) % 100 == 0 || getenv("IDLE_VERBOSE"))
			fprintf(stderr, "idleconns %s: %d connections\n", IMPL, i + 1);
		if (b != want) {
			fprintf(stderr, "idleconns %s: connection %d answered %d, not %d\n", IMPL, i, b, want);
			return 1;
		}
	}
	long mrs;
	long long bytes;
	at_conn = -1;
	at_call = "rdma resource show mr";
	if (registered(&mrs, &bytes)) {
		fprintf(stderr, "idleconns %s: no memory region of pid %d in `rdma resource show mr`\n",
			IMPL, (int)getpid());
		return 1;
	}
	printf("idleconns %s connections %d mrs %ld registered %lld per_connection %lld\n", IMPL, n,
	       mrs, bytes, bytes / n);
	fflush(stdout);
	for (int i = 0; i < n; i++)
		rclose(fds[i]);
	return 0;
}

int main(int argc, char **argv)
{
	const char *host = NULL, *port = "7471";
	int srv = -1, n = 100, c;
	while ((c = getopt(argc, argv, "s:c:p:n:")) != -1) {
		switch (c) {
		case 's': srv = 1; host = optarg; break;
		case 'c': srv = 0; host = optarg; break;
		case 'p': port = optarg; break;
		case 'n': n = atoi(optarg); break;
		default: srv = -1; break;
		}
	}
	if (srv < 0 || n < 1) {
		fprintf(stderr, "usage: idleconns -s|-c ADDR [-p PORT] [-n CONNECTIONS]\n");
		return 2;
	}
	raise_fd_limit(n);
	signal(SIGTERM, on_term);
	pthread_t w;
	if (pthread_create(&w, NULL, watchdog, NULL) == 0)
		pthread_detach(w);
	return srv ? server(host, port, n) : client(host, port, n);
}
