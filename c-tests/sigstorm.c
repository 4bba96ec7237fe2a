/*
 * rsocket, rbind, rlisten and rclose under a storm of SIGALRM (every 200 us, a handler without
 * SA_RESTART): none may fail with EINTR (the kernel's socket, bind and listen never do), the
 * first rsocket of the process included, and every signal must land in the program's own
 * thread, never in a thread of the library.
 *   sigstorm ADDR PORT ROUNDS
 * Exit 0 when all held; each failure is printed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>
#include <rsocket.h>

static volatile sig_atomic_t sigs, elsewhere;
static pid_t main_tid;

static void on_alarm(int s)
{
	(void)s;
	sigs++;
	if (gettid() != main_tid)
		elsewhere++;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: sigstorm ADDR PORT ROUNDS\n");
		return 2;
	}
	int port = atoi(argv[2]), rounds = atoi(argv[3]), failed = 0;
	main_tid = gettid();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = { { 0, 200 }, { 0, 200 } };
	setitimer(ITIMER_REAL, &it, NULL);
	for (int i = 0; i < rounds; i++) {
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port + i) };
		inet_pton(AF_INET, argv[1], &a.sin_addr);
		int fd = rsocket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0) {
			printf("round %d: rsocket: %s\n", i, strerror(errno));
			failed++;
			continue;
		}
		if (rbind(fd, (struct sockaddr *)&a, sizeof(a))) {
			printf("round %d: rbind: %s\n", i, strerror(errno));
			failed++;
		} else if (rlisten(fd, 16)) {
			printf("round %d: rlisten: %s\n", i, strerror(errno));
			failed++;
		}
		if (rclose(fd)) {
			printf("round %d: rclose: %s\n", i, strerror(errno));
			failed++;
		}
	}
	struct itimerval off = { { 0, 0 }, { 0, 0 } };
	setitimer(ITIMER_REAL, &off, NULL);
	printf("sigstorm: %d rounds, %d signals (%d in another thread), %d failed calls\n", rounds,
	       (int)sigs, (int)elsewhere, failed);
	return failed || elsewhere || !sigs;
}
