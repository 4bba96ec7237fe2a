#!/usr/bin/env python3
"""Writes extra-code.c: an LD_PRELOAD wrapper that runs extra code before every rsend and rrecv
of the program (librdmacm's rsbench, say), to see what more code per call costs under TCG.
EXTRA=blocks: 300 branchy statements (about 600 distinct translation blocks); EXTRA=loop: the
same instruction count as a tight loop (a few blocks); unset: nothing.

  bench/probes/extra-code.py /tmp/extra-code.c
  cc -O1 -shared -fPIC -o /tmp/extra-code.so /tmp/extra-code.c -ldl

A measurement aid for bench/README.md ("Where a ping-pong's time goes"); not built by make."""
import sys

N = 300
out = ["#define _GNU_SOURCE", "#include <dlfcn.h>", "#include <stdint.h>", "#include <stdlib.h>",
       "#include <sys/types.h>", "", "static volatile uint64_t sink;", "",
       "__attribute__((noinline)) static uint64_t blocks(uint64_t x)", "{"]
for k in range(N):
    out.append('\tif ((x >> %d) & 1) { x = x * 3 + %d; __asm__ volatile("" ::: "memory"); } '
               'else { x ^= %d; __asm__ volatile("" ::: "memory"); }' % (k % 61, k, k * 7 + 1))
out += ["\treturn x;", "}", "",
        "__attribute__((noinline)) static uint64_t loop(uint64_t x)", "{",
        '\tfor (int i = 0; i < %d; i++) { x = x * 3 + i; __asm__ volatile("" ::: "memory"); }' % N,
        "\treturn x;", "}", "", """static void extra(void)
{
	static int mode = -1;
	static uint64_t s = 0x9e3779b97f4a7c15ull;
	if (mode < 0) {
		const char *m = getenv("EXTRA");
		mode = !m ? 0 : m[0] == 'b' ? 1 : m[0] == 'l' ? 2 : 0;
	}
	if (mode == 1)
		s = blocks(s + 1);
	else if (mode == 2)
		s = loop(s + 1);
	sink = s;
}

ssize_t rsend(int fd, const void *b, size_t n, int f)
{
	static ssize_t (*r)(int, const void *, size_t, int);
	if (!r)
		r = (ssize_t (*)(int, const void *, size_t, int))dlsym(RTLD_NEXT, "rsend");
	extra();
	return r(fd, b, n, f);
}

ssize_t rrecv(int fd, void *b, size_t n, int f)
{
	static ssize_t (*r)(int, void *, size_t, int);
	if (!r)
		r = (ssize_t (*)(int, void *, size_t, int))dlsym(RTLD_NEXT, "rrecv");
	extra();
	return r(fd, b, n, f);
}"""]
with open(sys.argv[1] if len(sys.argv) > 1 else "extra-code.c", "w") as f:
    f.write("\n".join(out) + "\n")
