/* Datagram rsockets (SOCK_DGRAM) through rsocket.h: echo with random sizes and verified
 * contents, EMSGSIZE above the path's largest datagram, three calling styles (blocking,
 * non-blocking + rpoll, non-blocking + kernel epoll on the descriptor), MSG_PEEK, MSG_TRUNC,
 * rsendmsg/rrecvmsg, connect; multicast with two receivers and a drop; the errno on iWARP.
 *
 *   dgram -s -b ADDR -p PORT -n N                 echo server: echoes N datagrams, then exits
 *   dgram -c SERVER -b LOCAL -p PORT -n N -M MAX -m block|rpoll|epoll [-r SEED]
 *   dgram -R NAME -g GROUP -i IFACE -p PORT -n N -k M -d DIR -M MAX [-D]
 *                                                 multicast receiver (-D: drops after N)
 *   dgram -T -g GROUP -b LOCAL -p PORT -n N -k M -d DIR -M MAX
 *                                                 multicast sender
 *   dgram -O -b ADDR -p PORT -n N -d DIR          overload: a receiver with 16 slots that
 *                                                 reads only after N datagrams were sent;
 *                                                 the drops are counted (SO_RXQ_OVFL)
 *   dgram -P SERVER -b LOCAL -p PORT -n N -d DIR -M MAX   the overload's sender
 *   dgram -E                                      rsocket(AF_INET, SOCK_DGRAM) must fail
 *                                                 with ESOCKTNOSUPPORT (iWARP only)
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <rsocket.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define die(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, " (errno %d %s)\n", errno, strerror(errno)); exit(1); } while (0)

static uint64_t rng;
static uint32_t next_rand(void)
{
	rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
	return (uint32_t) (rng >> 33);
}

/* The byte at offset i of datagram seq: every datagram's bytes differ from every other's. */
static uint8_t pattern(uint32_t seq, size_t i)
{
	return (uint8_t) (seq * 131u + i * 7u + (i >> 8) + 1);
}

static void fill(uint8_t *b, size_t len, uint32_t seq)
{
	for (size_t i = 0; i < len; i++)
		b[i] = pattern(seq, i);
}

static int check(const uint8_t *b, size_t len, uint32_t seq)
{
	for (size_t i = 0; i < len; i++)
		if (b[i] != pattern(seq, i)) {
			fprintf(stderr, "datagram %u: byte %zu is %u, want %u\n", seq, i, b[i],
				pattern(seq, i));
			return -1;
		}
	return 0;
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

enum mode { BLOCK, RPOLL, EPOLL };
static enum mode mode;
static int ep = -1;
/* rpoll waits that found a datagram only when they ran out (see wait_in). */
static int late_wakes;

/* Waits until fd is readable in the chosen style (blocking calls need no wait). */
static void wait_in(int fd, int ms)
{
	if (mode == RPOLL) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		int n = rpoll(&p, 1, ms);
		if (n < 0)
			die("rpoll");
		if (n == 1 && !(p.revents & POLLIN))
			die("rpoll revents %#x", p.revents);
		/* The peer answers at once: a datagram found only when the wait ran out (rpoll
		 * looks once more then) had come while it slept, and the wakeup was lost (the
		 * service thread took the completion event the call slept on). */
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (n == 1 && (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000 >= ms)
			late_wakes++;
	} else if (mode == EPOLL) {
		struct epoll_event ev;
		if (epoll_wait(ep, &ev, 1, ms) < 0 && errno != EINTR)
			die("epoll_wait");
	}
}

/* One datagram, waiting for it in the chosen style; -1 if none came in 5 s. */
static ssize_t recv_one(int fd, void *buf, size_t len, int flags, struct sockaddr_in *from)
{
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		socklen_t alen = sizeof *from;
		ssize_t n = from ? rrecvfrom(fd, buf, len, flags, (struct sockaddr *) from, &alen) :
				   rrecv(fd, buf, len, flags);
		if (n >= 0)
			return n;
		if (errno != EAGAIN)
			die("rrecv");
		if (mode == BLOCK)
			die("blocking rrecv returned EAGAIN");
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 5)
			return -1;
		wait_in(fd, 1000);
	}
}

static int server(const char *bind_ip, int port, int n)
{
	int fd = rsocket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("rsocket");
	struct sockaddr_in a = addr_of(bind_ip, port);
	if (rbind(fd, (struct sockaddr *) &a, sizeof a))
		die("rbind");
	static uint8_t buf[65536];
	for (int i = 0; i < n; i++) {
		struct sockaddr_in from;
		socklen_t alen = sizeof from;
		ssize_t len = rrecvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *) &from, &alen);
		if (len < 0)
			die("rrecvfrom");
		if (alen != sizeof from || from.sin_family != AF_INET)
			die("source address length %u", alen);
		if (rsendto(fd, buf, len, 0, (struct sockaddr *) &from, alen) != len)
			die("rsendto %zd", len);
	}
	printf("server: echoed %d datagrams\n", n);
	return rclose(fd) ? 1 : 0;
}

static int client(const char *srv_ip, const char *bind_ip, int port, int n, int max)
{
	int fd = rsocket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("rsocket");
	struct sockaddr_in local = addr_of(bind_ip, 0), srv = addr_of(srv_ip, port);
	if (rbind(fd, (struct sockaddr *) &local, sizeof local))
		die("rbind");
	if (mode != BLOCK && rfcntl(fd, F_SETFL, O_NONBLOCK))
		die("rfcntl");
	if (mode == EPOLL) {
		ep = epoll_create1(0);
		struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
			die("epoll_ctl on the rsocket descriptor");
	}
	static uint8_t out[4096], in[4096];
	/* Above the largest datagram: EMSGSIZE, and nothing sent. */
	if (rsendto(fd, out, max + 1, 0, (struct sockaddr *) &srv, sizeof srv) != -1 || errno != EMSGSIZE)
		die("a %d-byte datagram (max %d) did not fail with EMSGSIZE", max + 1, max);
	uint32_t sent = 0, got = 0;
	size_t sizes[8];
	int connected = 0, peeks = 0, truncs = 0, msgs = 0;
	while (got < (uint32_t) n) {
		/* Up to 1-4 in flight; the first and last datagrams are the largest. Now and
		 * then a pause first (20 ms, two of the service thread's ticks): the socket is
		 * watched again, and the reply races the service thread's look. */
		int window = 1 + next_rand() % 4;
		if (next_rand() % 8 == 0)
			usleep(20000);
		while (sent < (uint32_t) n && sent - got < (uint32_t) window) {
			size_t len = (sent == 0 || sent == (uint32_t) n - 1) ? (size_t) max :
				     1 + next_rand() % max;
			if (next_rand() % 8 == 0)
				len = 1 + next_rand() % 16;
			sizes[sent % 8] = len;
			fill(out, len, sent);
			ssize_t r;
			if (sent == (uint32_t) n / 2 && !connected) {
				/* The second half: connected, rsend/rrecv and rsendmsg/rrecvmsg. */
				if (rconnect(fd, (struct sockaddr *) &srv, sizeof srv))
					die("rconnect");
				connected = 1;
			}
			if (connected && next_rand() % 2) {
				size_t cut = len / 3;
				struct iovec iov[2] = { { out, cut }, { out + cut, len - cut } };
				struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };
				r = rsendmsg(fd, &m, 0);
				msgs++;
			} else if (connected) {
				r = rsend(fd, out, len, 0);
			} else {
				r = rsendto(fd, out, len, 0, (struct sockaddr *) &srv, sizeof srv);
			}
			if (r != (ssize_t) len)
				die("send of datagram %u (%zu bytes) returned %zd", sent, len, r);
			sent++;
		}
		size_t want = sizes[got % 8];
		struct sockaddr_in from;
		ssize_t r;
		if (next_rand() % 8 == 0) {
			/* MSG_PEEK leaves it queued. */
			r = recv_one(fd, in, sizeof in, MSG_PEEK, &from);
			if (r != (ssize_t) want || check(in, r, got))
				die("peek of datagram %u: %zd bytes, want %zu", got, r, want);
			peeks++;
		}
		if (want > 4 && next_rand() % 8 == 0) {
			/* A short buffer: MSG_TRUNC gives the full length, the rest is dropped. */
			r = recv_one(fd, in, want / 2, MSG_TRUNC, &from);
			if (r != (ssize_t) want || check(in, want / 2, got))
				die("truncated receive of datagram %u: %zd, want %zu", got, r, want);
			truncs++;
		} else if (connected && next_rand() % 2) {
			struct iovec iov[2] = { { in, 7 }, { in + 7, sizeof in - 7 } };
			struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2, .msg_name = &from,
					    .msg_namelen = sizeof from };
			for (;;) {
				r = rrecvmsg(fd, &m, 0);
				if (r >= 0 || errno != EAGAIN)
					break;
				wait_in(fd, 1000);
			}
			if (m.msg_flags & MSG_TRUNC)
				die("rrecvmsg: MSG_TRUNC on a datagram that fit");
			if (r != (ssize_t) want || check(in, r, got))
				die("rrecvmsg of datagram %u: %zd bytes, want %zu", got, r, want);
		} else {
			r = recv_one(fd, in, sizeof in, 0, &from);
			if (r < 0)
				die("datagram %u never came back (lost)", got);
			if (r != (ssize_t) want || check(in, r, got))
				die("datagram %u: %zd bytes, want %zu", got, r, want);
		}
		if (from.sin_addr.s_addr != srv.sin_addr.s_addr || from.sin_port != srv.sin_port)
			die("datagram %u from %s:%u, not the server", got, inet_ntoa(from.sin_addr),
			    ntohs(from.sin_port));
		got++;
	}
	/* Nothing more is queued. */
	if (mode != BLOCK && rrecv(fd, in, sizeof in, MSG_DONTWAIT) != -1)
		die("a datagram more than sent");
	/* One could be a datagram that came just then; the lost wakeups this catches came by
	 * the dozen in a run. */
	if (late_wakes > 1)
		die("%d rpoll waits of 1 s found the reply only when they ran out (lost wakeups)",
		    late_wakes);
	printf("client: %d datagrams of 1-%d bytes verified (%d peeked, %d truncated, %d by rsendmsg)\n",
	       n, max, peeks, truncs, msgs);
	return rclose(fd) ? 1 : 0;
}

static int exists(const char *dir, const char *name)
{
	char p[512];
	struct stat st;
	snprintf(p, sizeof p, "%s/%s", dir, name);
	return stat(p, &st) == 0;
}

static void touch(const char *dir, const char *name)
{
	char p[512];
	snprintf(p, sizeof p, "%s/%s", dir, name);
	FILE *f = fopen(p, "w");
	if (!f)
		die("create %s", p);
	fclose(f);
}

static void await(const char *dir, const char *name)
{
	for (int i = 0; i < 3000 && !exists(dir, name); i++)
		usleep(10000);
	if (!exists(dir, name))
		die("waited 30 s for %s/%s", dir, name);
}

/* Multicast datagram seq has size 1 + (seq * 97) % max. */
static size_t mc_size(uint32_t seq, int max)
{
	return 1 + (seq * 97u) % (unsigned) max;
}

static int mc_receiver(const char *name, const char *group, const char *iface, int port, int n,
		       int more, const char *dir, int drops, int max)
{
	int fd = rsocket(AF_INET, SOCK_DGRAM, 0), one = 1;
	if (fd < 0)
		die("rsocket");
	if (rsetsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one))
		die("SO_REUSEADDR");
	struct sockaddr_in a = addr_of("0.0.0.0", port);
	if (rbind(fd, (struct sockaddr *) &a, sizeof a))
		die("rbind");
	struct ip_mreq mr;
	inet_pton(AF_INET, group, &mr.imr_multiaddr);
	inet_pton(AF_INET, iface, &mr.imr_interface);
	if (rsetsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mr, sizeof mr))
		die("IP_ADD_MEMBERSHIP");
	if (rsetsockopt(fd, IPPROTO_IP, IP_ADD_MEMBERSHIP, &mr, sizeof mr) != -1 || errno != EADDRINUSE)
		die("a second IP_ADD_MEMBERSHIP did not fail with EADDRINUSE");
	char flag[64];
	snprintf(flag, sizeof flag, "joined-%s", name);
	touch(dir, flag);
	static uint8_t in[4096];
	mode = RPOLL;
	if (rfcntl(fd, F_SETFL, O_NONBLOCK))
		die("rfcntl");
	int total = drops ? n : n + more;
	for (int i = 0; i < total; i++) {
		struct sockaddr_in from;
		ssize_t r = recv_one(fd, in, sizeof in, 0, &from);
		if (r < 0)
			die("%s: multicast datagram %d never came", name, i);
		if ((size_t) r != mc_size(i, max))
			die("%s: datagram %d has %zd bytes, want %zu", name, i, r, mc_size(i, max));
		/* The sender numbers them: the first 4 bytes. */
		uint32_t seq;
		if (r < 4) {
			seq = i; /* too short to carry a number: checked by size and pattern */
		} else {
			memcpy(&seq, in, 4);
		}
		if (seq != (uint32_t) i)
			die("%s: datagram %u where %d was expected (lost or reordered)", name, seq, i);
		if (r >= 4 ? check(in + 4, r - 4, seq) : check(in, r, seq))
			die("%s: datagram %u corrupted", name, seq);
	}
	if (drops) {
		if (rsetsockopt(fd, IPPROTO_IP, IP_DROP_MEMBERSHIP, &mr, sizeof mr))
			die("IP_DROP_MEMBERSHIP");
		if (rsetsockopt(fd, IPPROTO_IP, IP_DROP_MEMBERSHIP, &mr, sizeof mr) != -1 ||
		    errno != EADDRNOTAVAIL)
			die("a second IP_DROP_MEMBERSHIP did not fail with EADDRNOTAVAIL");
		touch(dir, "dropped");
		await(dir, "sent2");
		usleep(500000);
		ssize_t r = rrecv(fd, in, sizeof in, MSG_DONTWAIT);
		if (r >= 0 || errno != EAGAIN)
			die("%s: a datagram arrived after IP_DROP_MEMBERSHIP (%zd)", name, r);
		printf("%s: %d multicast datagrams verified, then dropped the group: nothing more came\n",
		       name, n);
	} else {
		printf("%s: %d multicast datagrams verified\n", name, n + more);
	}
	return rclose(fd) ? 1 : 0;
}

static int mc_sender(const char *group, const char *bind_ip, int port, int n, int more,
		     const char *dir, int max)
{
	int fd = rsocket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("rsocket");
	struct sockaddr_in local = addr_of(bind_ip, 0), g = addr_of(group, port);
	if (rbind(fd, (struct sockaddr *) &local, sizeof local))
		die("rbind");
	unsigned char ttl = 4;
	if (rsetsockopt(fd, IPPROTO_IP, IP_MULTICAST_TTL, &ttl, sizeof ttl))
		die("IP_MULTICAST_TTL");
	await(dir, "joined-A");
	await(dir, "joined-B");
	static uint8_t out[4096];
	if (rsendto(fd, out, max + 1, 0, (struct sockaddr *) &g, sizeof g) != -1 || errno != EMSGSIZE)
		die("a %d-byte multicast datagram did not fail with EMSGSIZE", max + 1);
	for (int i = 0; i < n + more; i++) {
		if (i == n) {
			await(dir, "dropped");
			usleep(100000);
		}
		size_t len = mc_size(i, max);
		if (len >= 4) {
			uint32_t seq = i;
			memcpy(out, &seq, 4);
			fill(out + 4, len - 4, i);
		} else {
			fill(out, len, i);
		}
		if (rsendto(fd, out, len, 0, (struct sockaddr *) &g, sizeof g) != (ssize_t) len)
			die("multicast rsendto %d", i);
		usleep(2000);
	}
	touch(dir, "sent2");
	printf("sender: %d multicast datagrams of 1-%d bytes sent\n", n + more, max);
	return rclose(fd) ? 1 : 0;
}

static int overload_receiver(const char *ip, int port, int n, const char *dir)
{
	int fd = rsocket(AF_INET, SOCK_DGRAM, 0), small = 16 * 2048, on = 1;
	if (fd < 0)
		die("rsocket");
	if (rsetsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small) ||
	    rsetsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &on, sizeof on))
		die("rsetsockopt");
	struct sockaddr_in a = addr_of(ip, port);
	if (rbind(fd, (struct sockaddr *) &a, sizeof a))
		die("rbind");
	touch(dir, "ready");
	await(dir, "sent");
	usleep(300000);
	static uint8_t in[4096];
	char ctl[CMSG_SPACE(sizeof(uint32_t))];
	uint32_t drops = 0, last = 0;
	int got = 0;
	for (;;) {
		struct iovec iov = { in, sizeof in };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
				    .msg_controllen = sizeof ctl };
		ssize_t r = rrecvmsg(fd, &m, MSG_DONTWAIT);
		if (r < 0) {
			if (errno != EAGAIN)
				die("rrecvmsg");
			break;
		}
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SO_RXQ_OVFL)
			die("no SO_RXQ_OVFL control message");
		memcpy(&drops, CMSG_DATA(c), sizeof drops);
		uint32_t seq;
		if (r < 4)
			die("short datagram");
		memcpy(&seq, in, 4);
		if ((got > 0 && seq <= last) || seq >= (uint32_t) n || check(in + 4, r - 4, seq))
			die("datagram %u (after %u) wrong", seq, last);
		last = seq;
		got++;
	}
	printf("overload: %d sent into 16 slots, %d received intact, %u dropped and counted, %d lost uncounted\n",
	       n, got, drops, n - got - (int) drops);
	if (got < 1 || drops < 1 || got + (int) drops > n)
		die("overload accounting: %d received + %u dropped of %d", got, drops, n);
	return rclose(fd) ? 1 : 0;
}

static int overload_sender(const char *srv, const char *bind_ip, int port, int n, const char *dir,
			   int max)
{
	int fd = rsocket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0)
		die("rsocket");
	struct sockaddr_in local = addr_of(bind_ip, 0), s = addr_of(srv, port);
	if (rbind(fd, (struct sockaddr *) &local, sizeof local) ||
	    rconnect(fd, (struct sockaddr *) &s, sizeof s))
		die("rbind/rconnect");
	await(dir, "ready");
	static uint8_t out[4096];
	for (int i = 0; i < n; i++) {
		size_t len = 4 + next_rand() % (max - 4);
		uint32_t seq = i;
		memcpy(out, &seq, 4);
		fill(out + 4, len - 4, seq);
		if (rsend(fd, out, len, 0) != (ssize_t) len)
			die("rsend %d", i);
		if (i == 0)
			usleep(200000); /* the first goes by UDP: let the introduction finish */
	}
	touch(dir, "sent");
	printf("overload sender: %d datagrams sent back to back\n", n);
	return rclose(fd) ? 1 : 0;
}

int main(int argc, char **argv)
{
	const char *bind_ip = NULL, *srv = NULL, *group = NULL, *iface = NULL, *dir = NULL, *name = NULL;
	int port = 0, n = 100, more = 50, max = 1000, op, role = 0, drops = 0;
	rng = 1;
	while ((op = getopt(argc, argv, "sc:b:p:n:M:m:r:R:Tg:i:k:d:DEOP:")) != -1) {
		switch (op) {
		case 's': role = 's'; break;
		case 'c': role = 'c'; srv = optarg; break;
		case 'b': bind_ip = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'n': n = atoi(optarg); break;
		case 'M': max = atoi(optarg); break;
		case 'm':
			mode = !strcmp(optarg, "rpoll") ? RPOLL : !strcmp(optarg, "epoll") ? EPOLL : BLOCK;
			break;
		case 'r': rng = strtoull(optarg, NULL, 0); break;
		case 'R': role = 'R'; name = optarg; break;
		case 'T': role = 'T'; break;
		case 'g': group = optarg; break;
		case 'i': iface = optarg; break;
		case 'k': more = atoi(optarg); break;
		case 'd': dir = optarg; break;
		case 'D': drops = 1; break;
		case 'E': role = 'E'; break;
		case 'O': role = 'O'; break;
		case 'P': role = 'P'; srv = optarg; break;
		default: return 2;
		}
	}
	if (max > 4000)
		die("max too large");
	switch (role) {
	case 's': return server(bind_ip, port, n);
	case 'c': return client(srv, bind_ip, port, n, max);
	case 'R': return mc_receiver(name, group, iface, port, n, more, dir, drops, max);
	case 'T': return mc_sender(group, bind_ip, port, n, more, dir, max);
	case 'O': return overload_receiver(bind_ip, port, n, dir);
	case 'P': return overload_sender(srv, bind_ip, port, n, dir, max);
	case 'E': {
		int fd = rsocket(AF_INET, SOCK_DGRAM, 0);
		if (fd >= 0 || errno != ESOCKTNOSUPPORT)
			die("rsocket(AF_INET, SOCK_DGRAM) on iWARP returned %d", fd);
		printf("rsocket(AF_INET, SOCK_DGRAM): %s, as documented for iWARP\n", strerror(errno));
		return 0;
	}
	}
	return 2;
}
