/*
 * leak_canary: the control for the memory checks (host-valgrind.sh, the ASan section of
 * run-vm-tests.sh). Each check must report this program, or it could not see the real ones.
 *
 *   leak_canary leak       loses the only pointer to a heap block (a definite leak), exits 0
 *   leak_canary overflow   reads one byte past the end of a heap block, exits 0
 *   leak_canary            neither: must pass every check
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* volatile: the compiler must not drop the allocation or the access. */
static char *volatile sink;

int main(int argc, char **argv)
{
	const char *what = argc > 1 ? argv[1] : "";
	char *p = malloc(48);
	if (!p)
		return 1;
	memset(p, 'x', 48);
	sink = p;
	if (!strcmp(what, "leak")) {
		sink = NULL;
		p = NULL;
		printf("leak_canary: 48 bytes lost\n");
		return 0;
	}
	if (!strcmp(what, "overflow")) {
		volatile char c = sink[48];
		printf("leak_canary: read one byte past a 48-byte block (%d)\n", c != 0);
	}
	free(sink);
	return 0;
}
