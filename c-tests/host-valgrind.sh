#!/usr/bin/env bash
# The C programs under valgrind on the host: no invalid access (reads and writes out of bounds, of
# freed or uninitialised memory, bad frees) and no definite leak, in the library or the program.
# Without an RDMA device, what runs is each program's start and rsocket-rs's failing rsocket()
# (ENODEV, as in host-errno.sh); rsping and evloop also run whole over kernel TCP (-K) on
# loopback, with librsocket-rs loaded. Still-reachable memory at exit is not a leak.
# leak_canary first: valgrind must catch its leak and its overflow, or this check proves nothing.
set -uo pipefail
cd "$(dirname "$0")"
. ../vm/testnet   # RS_SERVER, RS_CLIENT, port blocks
BIN=$PWD/bin
VG_RC=99          # valgrind's exit status when it found an error
command -v valgrind >/dev/null || { echo "host-valgrind: valgrind is not installed (make deps)" >&2; exit 1; }
VG=(valgrind -q --error-exitcode=$VG_RC --leak-check=full --errors-for-leak-kinds=definite
    --show-leak-kinds=definite --track-origins=yes --num-callers=30)
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
pass=0; fail=0

# vg NAME WANT_RC CMD...: CMD under valgrind must exit WANT_RC (valgrind's own status is VG_RC).
vg() {
  local name=$1 want=$2; shift 2
  timeout 120 "${VG[@]}" --log-file="$log/vg" "$@" >"$log/out" 2>&1
  local rc=$?
  if [ $rc -eq "$want" ] && { [ "$want" -eq $VG_RC ] || [ ! -s "$log/vg" ]; }; then
    pass=$((pass + 1)); echo "ok   $name (exit $rc)"
  else
    fail=$((fail + 1)); echo "FAIL $name (exit $rc, want $want)"
    sed 's/^/  out| /' "$log/out"; sed 's/^/  vg| /' "$log/vg"
  fi
}

vg "valgrind catches a definite leak (leak_canary leak)" $VG_RC "$BIN/leak_canary" leak
vg "valgrind catches a read past a heap block (leak_canary overflow)" $VG_RC "$BIN/leak_canary" overflow
vg "leak_canary without a fault" 0 "$BIN/leak_canary"

if [ -e /dev/infiniband/rdma_cm ]; then
  echo "host-valgrind: rdma_cm present, skipping the no-device runs on this host"
else
  # Each fails with ENODEV at its first rsocket() (exit 1; rsstress: 1 as well).
  P=$((RS_PORTS_C + 1000 + RANDOM % 900))
  vg "rsping client, no device" 1 "$BIN/rsping" -c $RS_SERVER -b $RS_CLIENT -p $P
  vg "rsping server, no device" 1 "$BIN/rsping" -s -b $RS_SERVER -p $P
  vg "api_calls, no device (bad-descriptor errnos, then ENODEV)" 1 "$BIN/api_calls" $RS_SERVER $RS_CLIENT $P
  vg "iomap client, no device" 1 "$BIN/iomap" -c $RS_SERVER -b $RS_CLIENT -p $P
  vg "zerocopy server, no device" 1 "$BIN/zerocopy" -s -b $RS_SERVER -p $P
  vg "evloop client, no device" 1 "$BIN/evloop" -c $RS_SERVER -b $RS_CLIENT -p $P
  vg "rsstress server, no device" 1 "$BIN/rsstress" -s $RS_SERVER -p $P -r 1
fi

# vg_pair NAME "SERVER ARGS" "CLIENT ARGS" (one program, both under valgrind, loopback TCP).
vg_pair() {
  local name=$1 prog=$2 srv=$3 cli=$4
  local p=$((RS_PORTS_C + 1000 + RANDOM % 900))
  timeout 120 "${VG[@]}" --log-file="$log/vg-srv" "$BIN/$prog" $srv -p $p >"$log/srv" 2>&1 &
  local spid=$!
  # valgrind takes about a second to start the server: wait until it listens.
  for _ in $(seq 100); do
    ss -Htln "sport = :$p" 2>/dev/null | grep -q . && break
    sleep 0.1
  done
  timeout 120 "${VG[@]}" --log-file="$log/vg-cli" "$BIN/$prog" $cli -p $p >"$log/cli" 2>&1
  local crc=$?
  wait $spid
  local src=$?
  if [ $src -eq 0 ] && [ $crc -eq 0 ] && [ ! -s "$log/vg-srv" ] && [ ! -s "$log/vg-cli" ]; then
    pass=$((pass + 1)); echo "ok   $name"
  else
    fail=$((fail + 1)); echo "FAIL $name (server exit $src, client exit $crc)"
    sed 's/^/  srv| /' "$log/srv" "$log/vg-srv"; sed 's/^/  cli| /' "$log/cli" "$log/vg-cli"
  fi
}

vg "rsping -K -E: refused connect (kernel TCP)" 0 "$BIN/rsping" -K -E -c 127.0.0.1 -p $((RS_PORTS_C + 1900 + RANDOM % 99))
vg_pair "rsping -K (kernel TCP, librsocket-rs loaded), 1 MiB x 3" rsping "-K -s -b 127.0.0.1 -C 3" "-K -c 127.0.0.1 -C 3"
vg_pair "evloop -K, epoll, 16 connections" evloop "-K -s -b 127.0.0.1 -n 16" "-K -c 127.0.0.1 -n 16"
# SIGALRM without SA_RESTART (EINTR counted and survived) and dup'ed descriptors; not -F, whose
# pidfd_open valgrind does not know (it warns in its log).
vg_pair "evloop -K -I -D, select, 16 connections" evloop "-K -I -D -m select -s -b 127.0.0.1 -n 16" \
  "-K -I -B -D -m select -c 127.0.0.1 -n 16"

echo "host-valgrind: $pass passed, $fail failed"
[ $fail -eq 0 ]
