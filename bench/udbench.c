/* udbench: datagram ping-pong latency and one-way streaming rate, on rsocket-rs datagram
 * rsockets (default build) or kernel UDP sockets (-DIMPL_UDP), from one source.
 *
 *   udbench -s -b ADDR -p PORT                     server: echoes ping-pong datagrams; counts
 *                                                  a stream and reports it to the client
 *   udbench -c SERVER -b LOCAL -p PORT -S SIZE -n N -m pingpong|stream [-w WARMUP]
 *
 * ping-pong: N round trips of SIZE bytes, one outstanding, blocking calls; prints the mean
 * round trip / 2 in microseconds. stream: N datagrams sent back to back (blocking sends), then
 * an end marker (retried until answered); prints datagrams/s and MB/s received and the loss.
 * UD and UDP are unreliable: the stream's received count is what the server saw.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifdef IMPL_UDP
#define S_(f) f
#define rs_poll poll
#else
#include <rsocket.h>
#define S_(f) r##f
#define rs_poll rpoll
#endif

#define die(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, " (%s)\n", strerror(errno)); exit(1); } while (0)

/* Control datagrams (1 byte): stream end, and the server's answer carries the count. */
#define OP_END 0xE5

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static struct sockaddr_in addr_of(const char *ip, int port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
		die("bad address %s", ip);
	return a;
}

static int open_bound(const char *ip, int port)
{
	int fd = S_(socket)(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	int big = 1 << 20;
	S_(setsockopt)(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
	S_(setsockopt)(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
	struct sockaddr_in a = addr_of(ip, port);
	if (S_(bind)(fd, (struct sockaddr *) &a, sizeof a))
		die("bind");
	return fd;
}

static int server(const char *ip, int port)
{
	int fd = open_bound(ip, port);
	static uint8_t buf[65536];
	uint64_t count = 0, bytes = 0;
	for (;;) {
		struct sockaddr_in from;
		socklen_t alen = sizeof from;
		ssize_t n = S_(recvfrom)(fd, buf, sizeof buf, 0, (struct sockaddr *) &from, &alen);
		if (n < 0)
			die("recvfrom");
		if (n == 1 && buf[0] == OP_END) {
			/* End of a stream: answer with what was counted, then start over. */
			uint64_t r[2] = { count, bytes };
			S_(sendto)(fd, r, sizeof r, 0, (struct sockaddr *) &from, alen);
			count = bytes = 0;
			continue;
		}
		if (n >= 1 && buf[0] == 'P') {
			if (S_(sendto)(fd, buf, n, 0, (struct sockaddr *) &from, alen) != n)
				die("sendto");
			continue;
		}
		count++;
		bytes += n;
	}
}

int main(int argc, char **argv)
{
	const char *bind_ip = NULL, *srv = NULL, *mode = "pingpong";
	int port = 0, size = 64, n = 10000, warm = 100, op, is_server = 0;
	while ((op = getopt(argc, argv, "sc:b:p:S:n:m:w:")) != -1) {
		switch (op) {
		case 's': is_server = 1; break;
		case 'c': srv = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'S': size = atoi(optarg); break;
		case 'n': n = atoi(optarg); break;
		case 'm': mode = optarg; break;
		case 'w': warm = atoi(optarg); break;
		default: return 2;
		}
	}
	if (is_server)
		return server(bind_ip, port);
	if (size < 1 || size > 65000)
		die("bad size");
	int fd = open_bound(bind_ip, 0);
	struct sockaddr_in s = addr_of(srv, port);
	if (S_(connect)(fd, (struct sockaddr *) &s, sizeof s))
		die("connect");
	static uint8_t buf[65536], in[65536];
	memset(buf, 'P', size);
	if (!strcmp(mode, "pingpong")) {
		double t0 = 0;
		for (int i = 0; i < warm + n; i++) {
			if (i == warm)
				t0 = now_us();
			if (S_(send)(fd, buf, size, 0) != size)
				die("send");
			/* A lost datagram would stall: wait 1 s, then send again. */
			struct pollfd p = { .fd = fd, .events = POLLIN };
			while (rs_poll(&p, 1, 1000) == 0)
				if (S_(send)(fd, buf, size, 0) != size)
					die("send");
			if (S_(recv)(fd, in, sizeof in, 0) != size)
				die("recv");
		}
		double us = (now_us() - t0) / n / 2;
		printf("pingpong size %d n %d one-way %.2f us\n", size, n, us);
	} else {
		buf[0] = 'D';
		double t0 = now_us();
		for (int i = 0; i < n; i++)
			if (S_(send)(fd, buf, size, 0) != size)
				die("send %d", i);
		uint8_t end = OP_END;
		uint64_t r[2];
		for (;;) {
			S_(send)(fd, &end, 1, 0);
			struct pollfd p = { .fd = fd, .events = POLLIN };
			if (rs_poll(&p, 1, 200) == 1 && S_(recv)(fd, r, sizeof r, 0) == sizeof r)
				break;
		}
		double us = now_us() - t0;
		printf("stream size %d sent %d received %llu (%.1f%% lost) %.0f msg/s %.2f MB/s\n",
		       size, n, (unsigned long long) r[0], 100.0 * (n - (double) r[0]) / n,
		       r[0] / us * 1e6, r[1] / us);
	}
	return S_(close)(fd) ? 1 : 0;
}
