#!/usr/bin/env bash
# The README's main job, run inside the VM by `make demo`: two rsockets talking over Soft-RoCE,
# first our rping-style program moving verified data, then librdmacm's rstream benchmark run on
# rsocket-rs (LD_PRELOAD) and on librdmacm itself, side by side in this one VM run.
set -uo pipefail
cd "$(dirname "$0")"
. ../vm/testnet   # RS_SERVER, RS_CLIENT, port blocks
LIB=$(PKG_CONFIG_PATH=$PWD/../build/stage/lib/pkgconfig pkg-config --variable=libdir rsocket-rs)/librsocket-rs.so
PORT=$((RS_PORTS_C + 1500 + RANDOM % 400))
out=$(mktemp -d)
counters() { cat /sys/class/infiniband/rxe1/ports/1/hw_counters/sent_pkts; }

echo "== rsocket-rs demo on $(ls /sys/class/infiniband | tr '\n' ' ')(server $RS_SERVER, client $RS_CLIENT)"
before=$(counters)
PORT=$((PORT + 1))
timeout 120 bin/rsping -s -b $RS_SERVER -p $PORT -S 8388608 -C 4 >"$out/s" 2>&1 &
sleep 1.5
timeout 120 bin/rsping -c $RS_SERVER -b $RS_CLIENT -p $PORT -S 8388608 -C 4 >"$out/c" 2>&1
rc=$?; wait; cat "$out/s" "$out/c"
[ $rc -eq 0 ] || { echo "demo: transfer failed"; exit 1; }
echo "   RoCE packets sent by rxe1 during the transfer: $(( $(counters) - before )) (the data went over RDMA)"

# run_rstream LABEL PRELOAD OPTS -> prints the client's result line
run_rstream() {
  local pre=$2 opts=$3
  PORT=$((PORT + 1))
  env ${pre:+LD_PRELOAD=$pre} timeout 120 rstream -b $RS_SERVER -p $PORT $opts >/dev/null 2>&1 &
  sleep 1.5
  env ${pre:+LD_PRELOAD=$pre} timeout 120 rstream -s $RS_SERVER -b $RS_CLIENT -p $PORT $opts 2>&1 | tail -1
  wait
}
echo
echo "== librdmacm's rstream, same VM run: rsocket-rs (LD_PRELOAD) vs librdmacm 44"
printf '%-44s %-12s %s\n' "test" "impl" "name bytes xfers iters total time Gb/sec usec/xfer"
for t in "64 B ping-pong|-S 64 -C 1 -I 2000 -T b" "64 KiB streaming|-S 65536 -C 100 -I 5 -T b" "1 MiB streaming|-S 1048576 -C 10 -I 5 -T b"; do
  name=${t%%|*}; opts=${t#*|}
  printf '%-44s %-12s %s\n' "$name ($opts)" "rsocket-rs" "$(run_rstream x "$LIB" "$opts")"
  printf '%-44s %-12s %s\n' "" "librdmacm" "$(run_rstream x "" "$opts")"
done
rm -rf "$out"
