/* Our header must stand alone (no other include first), in C99 and in C++. */
#include <rsocket.h>

int main(void)
{
	int (*calls[])(void) = {0};
	(void)calls;
	return SOL_RDMA == 0x10000 && RDMA_ROUTE == 4 ? 0 : 1;
}
