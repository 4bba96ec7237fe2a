/*
 * doorbell.so: times every doorbell of a process on Soft-RoCE, the 32-byte write(2) to the
 * verbs device (/dev/infiniband/uverbs*) that rxe's post_send makes; the kernel runs the whole
 * path of the post in it (packet, the peer's reception, the ACK, our send completion). At exit
 * it prints the count and the p25/p50/p75 in microseconds (TSC, converted with the monotonic
 * clock over the process's life) on stderr.
 *
 *   cc -O2 -shared -fPIC -o doorbell.so doorbell.c -ldl
 *   LD_PRELOAD=$PWD/doorbell.so bench/bin/rsbench ...      (both ends, in the VM)
 *
 * A measurement aid for bench/README.md ("Where a ping-pong's time goes"); not built by make.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

static ssize_t (*real_write)(int, const void *, size_t);
static uint64_t *samples;
static size_t count;
static const size_t cap = 1 << 20;
static signed char is_verbs[1024]; /* 0 unknown, 1 verbs device, -1 other */
static uint64_t tsc0;
static struct timespec t0;

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

__attribute__((destructor)) static void report(void)
{
	if (!count)
		return;
	struct timespec t1;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	uint64_t tsc1 = __rdtsc();
	double ns_per_tick = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / (double)(tsc1 - tsc0);
	qsort(samples, count, sizeof *samples, cmp);
	fprintf(stderr, "doorbell[%d]: %zu writes, p25 %.2f p50 %.2f p75 %.2f us\n", getpid(), count,
		samples[count / 4] * ns_per_tick / 1e3, samples[count / 2] * ns_per_tick / 1e3,
		samples[count * 3 / 4] * ns_per_tick / 1e3);
}

ssize_t write(int fd, const void *buf, size_t n)
{
	if (!real_write) {
		real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
		samples = malloc(cap * sizeof *samples);
		tsc0 = __rdtsc();
		clock_gettime(CLOCK_MONOTONIC, &t0);
	}
	if (fd >= 0 && fd < 1024 && !is_verbs[fd]) {
		char path[64], target[128];
		snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
		ssize_t r = readlink(path, target, sizeof target - 1);
		target[r > 0 ? r : 0] = 0;
		is_verbs[fd] = strstr(target, "uverbs") ? 1 : -1;
	}
	if (fd >= 0 && fd < 1024 && is_verbs[fd] == 1 && n == 32 && samples) {
		uint64_t a = __rdtsc();
		ssize_t r = real_write(fd, buf, n);
		uint64_t b = __rdtsc();
		if (count < cap)
			samples[count++] = b - a;
		return r;
	}
	return real_write(fd, buf, n);
}
