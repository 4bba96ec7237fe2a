#!/usr/bin/env bash
# Outside the VM there is no RDMA: rsocket() must fail with a clear errno, never crash or hang.
set -euo pipefail
cd "$(dirname "$0")"
. ../vm/testnet   # RS_SERVER, RS_CLIENT, port blocks
if [ -e /dev/infiniband/rdma_cm ]; then echo "host-errno: rdma_cm present, skipping the no-device check on this host"; exit 0; fi
out=$(timeout 20 bin/rsping -c $RS_SERVER -p 7000 2>&1) && { echo "host-errno: rsping succeeded without RDMA?" >&2; exit 1; }
echo "$out" | grep -qE "rsocket: (No such device|No such file or directory)" || { echo "host-errno: unexpected: $out" >&2; exit 1; }
echo "host-errno: $out"
