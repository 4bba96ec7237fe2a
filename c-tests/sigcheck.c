/*
 * Signature check: upstream's <rdma/rsocket.h> first, then ours. C rejects a redeclaration with
 * an incompatible prototype, so this compiles only if every shared call has the same type.
 * The _Static_asserts pin our extension's type and the shared constants' values.
 */
#include <rdma/rsocket.h>
#include <rsocket.h>

_Static_assert(__builtin_types_compatible_p(__typeof__(&rioread),
		size_t (*)(int, void *, size_t, off_t, int)), "rioread mirrors riowrite");
_Static_assert(__builtin_types_compatible_p(__typeof__(&riowrite),
		size_t (*)(int, const void *, size_t, off_t, int)), "riowrite");
_Static_assert(__builtin_types_compatible_p(__typeof__(&rfcntl), int (*)(int, int, ...)), "rfcntl is variadic");
_Static_assert(SOL_RDMA == 0x10000, "SOL_RDMA");
_Static_assert(RDMA_SQSIZE == 0 && RDMA_RQSIZE == 1 && RDMA_INLINE == 2 && RDMA_IOMAPSIZE == 3 &&
	       RDMA_ROUTE == 4, "RDMA_* option names");

int main(void)
{
	return 0;
}
