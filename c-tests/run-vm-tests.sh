#!/usr/bin/env bash
# C and interop tests; runs inside the VM (vm/run-in-vm -- c-tests/run-vm-tests.sh), on the
# Soft-RoCE pair or, with --siw given to run-in-vm, the Soft-iWARP pair.
# Server $RS_SERVER, client $RS_CLIENT (vm/testnet). Every pair checks data and both exit codes.
# The AddressSanitizer builds (bin/*-asan) run last; `run-vm-tests.sh --asan` runs only them.
set -uo pipefail
cd "$(dirname "$0")"
. ../vm/testnet   # RS_SERVER, RS_CLIENT, port blocks
BIN=$PWD/bin
LIB=$(PKG_CONFIG_PATH=$PWD/../build/stage/lib/pkgconfig pkg-config --variable=libdir rsocket-rs)/librsocket-rs.so
DEV=$(ls /sys/class/infiniband | tr '\n' ' ')
PORT=$((RS_PORTS_C + RANDOM % 1000))
pass=0; fail=0
log=$(mktemp -d)

# listening PORT: something listens on PORT: a kernel TCP listener, a bound UDP socket, or an
# RDMA CM listener (rdma_cm's, which ss does not show).
listening() {
  ss -Hltun "sport = :$1" | grep -q . ||
    rdma res show cm_id 2>/dev/null | grep -qE "state LISTEN .*:$1 "
}

# wait_listen PORT: until the server listens on PORT, at most 1.5 s (a server that listens
# elsewhere, or never, gets the fixed wait every server once had).
wait_listen() {
  local until=$((${EPOCHREALTIME/./} + 1500000))
  while [ "${EPOCHREALTIME/./}" -lt $until ]; do
    listening "$1" && return 0
    sleep 0.05
  done
  return 1
}

# pair NAME "SERVER CMD" "CLIENT CMD": server first, client once it listens (at most 1.5 s
# later); both must exit 0.
pair() {
  local name=$1 srv=$2 cli=$3
  PORT=$((PORT + 1))
  srv=${srv//@PORT@/$PORT}; cli=${cli//@PORT@/$PORT}
  timeout 120 bash -c "$srv" >"$log/srv" 2>&1 &
  local spid=$!
  wait_listen $PORT
  timeout 120 bash -c "$cli" >"$log/cli" 2>&1
  local crc=$?
  wait $spid
  local src=$?
  last_src=$src
  if [ $crc -eq 0 ] && [ $src -eq 0 ]; then
    pass=$((pass + 1)); echo "ok   $name"
    sed 's/^/       /' "$log/srv" "$log/cli" | grep -vE '^\s*$' | grep -iE 'verified|checked|gb/sec|refused|shut_wr|[0-9]+k? +[0-9]+ +' | head -4
  else
    fail=$((fail + 1)); echo "FAIL $name (server rc $src, client rc $crc)"
    sed 's/^/  srv| /' "$log/srv"; sed 's/^/  cli| /' "$log/cli"
  fi
}

# bound_to_us LOGFILE: LD_DEBUG proves the r* calls bound to rsocket-rs, not librdmacm.
bound_to_us() {
  local from="binding file [^ ]*${2:-rstream} [^:]* to [^ ]*"
  grep -hE "${from}librsocket-rs[^:]*: normal symbol \`(rsend|rrecv)'" "$1"* >/dev/null 2>&1 &&
    ! grep -hE "${from}librdmacm[^:]*: normal symbol \`(rsend|rrecv)'" "$1"* >/dev/null 2>&1
}

# kill_peer NAME SERVER CLIENT: the server is killed (SIGKILL) mid-transfer; the client must
# report ECONNRESET (rsping -X checks the errno) and must not hang.
kill_peer() {
  local name=$1 srv=$2 cli=$3
  PORT=$((PORT + 1))
  srv=${srv//@PORT@/$PORT}; cli=${cli//@PORT@/$PORT}
  $srv >"$log/srv" 2>&1 &
  local spid=$!
  wait_listen $PORT
  timeout 60 bash -c "$cli" >"$log/cli" 2>&1 &
  local cpid=$!
  sleep 2
  kill -9 $spid; wait $spid 2>/dev/null
  wait $cpid; local crc=$?
  if [ $crc -eq 0 ]; then
    pass=$((pass + 1)); echo "ok   $name"; sed 's/^/       /' "$log/cli"
  else
    fail=$((fail + 1)); echo "FAIL $name (client rc $crc)"; sed 's/^/  cli| /' "$log/cli"
  fi
}

# ---- AddressSanitizer and LeakSanitizer -------------------------------------------------------
# The programs built with -fsanitize=address (c-tests/Makefile, bin/*-asan): an invalid access in
# them (out of bounds on the heap, stack or a global, use after free, double or bad free) ends the
# process with a report; at exit LeakSanitizer reports every block no longer reachable, the
# library's too (librsocket-rs's Rust heap, libibverbs and its providers all allocate through
# ASan's malloc). Memory still reachable at exit (the service thread, global state) is no leak.
# Either report exits 23; a report in the output fails the pair whatever the exit status.
# The runtime (libasan.so.8, gcc's) comes from the host's /usr/lib, which the guest shares.
# No suppressions: nothing outside our code has reported a leak so far.
ASAN_ENV="ASAN_OPTIONS=detect_leaks=1:exitcode=23:abort_on_error=0:detect_stack_use_after_return=1:strict_string_checks=1"
asan_report() { grep -hE "ERROR: (AddressSanitizer|LeakSanitizer)|SUMMARY: (AddressSanitizer|LeakSanitizer)" "$@"; }
# asan_clean BEFORE LOG...: the test just run passed (fail is still BEFORE) but a sanitizer
# report is in its output: it fails after all.
asan_clean() {
  local before=$1; shift
  if [ $fail -eq "$before" ] && asan_report "$@" >/dev/null; then
    pass=$((pass - 1)); fail=$((fail + 1)); echo "FAIL   (a sanitizer report, though the exit status was 0)"
    sed 's/^/  | /' "$@"
  fi
}
# asan_pair NAME SERVER CLIENT: pair(), and no sanitizer report on either side.
asan_pair() {
  local before=$fail
  pair "$@"
  asan_clean $before "$log/srv" "$log/cli"
}
# asan_one NAME WANT_RC WANT_REPORT CMD: one process; exit WANT_RC, and a report matching
# WANT_REPORT (a grep -E pattern), or none when WANT_REPORT is empty.
asan_one() {
  local name=$1 want=$2 report=$3
  timeout 120 bash -c "$4" >"$log/one" 2>&1
  local rc=$?
  local ok=0
  if [ -z "$report" ]; then
    [ $rc -eq "$want" ] && ! asan_report "$log/one" >/dev/null && ok=1
  else
    [ $rc -eq "$want" ] && grep -qE "$report" "$log/one" && ok=1
  fi
  if [ $ok -eq 1 ]; then
    pass=$((pass + 1)); echo "ok   $name"
  else
    fail=$((fail + 1)); echo "FAIL $name (exit $rc, want $want)"; sed 's/^/  | /' "$log/one"
  fi
}
asan_tests() {
  local A="$ASAN_ENV $BIN"
  echo "-- AddressSanitizer + LeakSanitizer builds"
  # The control: the runtime must load and catch a lost block and an overflow here in the guest.
  asan_one "ASan build: LeakSanitizer reports a lost block (leak_canary)" 23 \
    "ERROR: LeakSanitizer: detected memory leaks" "$A/leak_canary-asan leak"
  asan_one "ASan build: AddressSanitizer reports a heap overflow (leak_canary)" 23 \
    "ERROR: AddressSanitizer: heap-buffer-overflow" "$A/leak_canary-asan overflow"
  PORT=$((PORT + 1))
  asan_one "ASan: every rsocket.h stream call (api_calls)" 0 "" "$A/api_calls-asan $RS_SERVER $RS_CLIENT $PORT"
  asan_pair "ASan: rsping <-> rsping, 1 MiB x 3" "$A/rsping-asan -s -b $RS_SERVER -p @PORT@ -C 3" \
    "$A/rsping-asan -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -C 3"
  asan_pair "ASan: rsping refused connect (ECONNREFUSED)" "true" \
    "$A/rsping-asan -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -E"
  # The library's teardown after a reset: the peer is killed mid-transfer (the client is checked).
  local before=$fail
  kill_peer "ASan: peer killed mid-transfer: rsping gives ECONNRESET" \
    "$BIN/rsping -s -b $RS_SERVER -p @PORT@ -S 1048576 -C 100000" \
    "$A/rsping-asan -X -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -S 1048576 -C 100000"
  asan_clean $before "$log/cli"
  asan_pair "ASan: riomap/riowrite/rioread (iomap)" "$A/iomap-asan -s -b $RS_SERVER -p @PORT@" \
    "$A/iomap-asan -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -n 100"
  asan_pair "ASan: zero-copy rsend/riowrite and their notices (zerocopy)" \
    "$A/zerocopy-asan -s -b $RS_SERVER -p @PORT@" "$A/zerocopy-asan -c $RS_SERVER -b $RS_CLIENT -p @PORT@"
  asan_pair "ASan: kernel epoll on rsocket descriptors, 16 connections (evloop)" \
    "$A/evloop-asan -n 16 -s -b $RS_SERVER -p @PORT@" "$A/evloop-asan -n 16 -c $RS_SERVER -b $RS_CLIENT -p @PORT@"
}
flaky=0
summary() {
  rm -rf "$log"
  echo
  echo "$pass passed, $fail failed$([ $flaky -gt 0 ] && echo ", $flaky retried (FLAKY above)")"
  [ $fail -eq 0 ]
}

echo "c-tests in the VM on: $DEV"
if [ "${1:-}" = --asan ]; then
  asan_tests
  summary
  exit
fi
PORT=$((PORT + 1))
if timeout 120 "$BIN/api_calls" $RS_SERVER $RS_CLIENT $PORT >"$log/api" 2>&1; then
  pass=$((pass + 1)); echo "ok   every rsocket.h stream call (api_calls)"
else
  fail=$((fail + 1)); echo "FAIL every rsocket.h stream call (api_calls)"; sed 's/^/  | /' "$log/api"
fi
# A program's timer signal (every 200 us, no SA_RESTART) during rsocket/rbind/rlisten/rclose:
# no EINTR (the first rsocket of a process once failed with it, and the preload then left the
# listener to kernel TCP), every signal in the program's thread. Six fresh processes (the first
# call sets up the most), then one of 100 rounds.
storm_ok=1
: >"$log/storm"
for n in 1 1 1 1 1 1 100; do
  timeout 60 "$BIN/sigstorm" $RS_SERVER $PORT $n >>"$log/storm" 2>&1 || storm_ok=0
  PORT=$((PORT + n))
done
if [ $storm_ok = 1 ]; then
  pass=$((pass + 1)); echo "ok   rsocket/rbind/rlisten/rclose under a storm of signals (sigstorm)"
  tail -1 "$log/storm" | sed 's/^/       /'
else
  fail=$((fail + 1)); echo "FAIL rsocket/rbind/rlisten/rclose under a storm of signals (sigstorm)"; sed 's/^/  | /' "$log/storm"
fi
S="$BIN/rsping -s -b $RS_SERVER -p @PORT@"
C_ARGS="-c $RS_SERVER -b $RS_CLIENT"
C="$BIN/rsping $C_ARGS -p @PORT@"
pair "rsping rsocket-rs <-> rsocket-rs, 1 MiB x 3" "$S -C 3" "$C -C 3"
pair "rsping static client <-> rsocket-rs server, 4 MiB" "$S -S 4194304" "$BIN/rsping-static -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -S 4194304"
pair "rsping rsocket-rs client -> librdmacm server" "$BIN/rsping-rdmacm -s -b $RS_SERVER -p @PORT@ -C 3" "$C -C 3"
pair "rsping librdmacm client -> rsocket-rs server" "$S -C 3" "$BIN/rsping-rdmacm -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -C 3"
# Keepalive probes are answered by the peer's device (on iWARP an RDMA read), librdmacm's too:
# 4 s idle against a 2 s bound, then the transfer.
pair "keepalive: probes answered by a librdmacm server" "$BIN/rsping-rdmacm -s -b $RS_SERVER -p @PORT@" "$C -A 4"
pair "keepalive: probes answered by an rsocket-rs server" "$S" "$C -A 4"
pair "refused connect gives ECONNREFUSED (kernel TCP)" "true" "$BIN/rsping -K -E $C_ARGS -p @PORT@"
pair "refused connect gives ECONNREFUSED (rsocket-rs)" "true" "$C -E"
pair "refused connect gives ECONNREFUSED (librdmacm)" "true" "$BIN/rsping-rdmacm -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -E"

K="-S 1048576 -C 100000"
kill_peer "peer killed mid-transfer: kernel TCP gives ECONNRESET" "$BIN/rsping -K -s -b $RS_SERVER -p @PORT@ $K" "$BIN/rsping -K -X $C_ARGS -p @PORT@ $K"
kill_peer "peer killed mid-transfer: rsocket-rs gives ECONNRESET" "$S $K" "$C -X $K"
kill_peer "librdmacm peer killed mid-transfer: rsocket-rs gives ECONNRESET" "$BIN/rsping-rdmacm -s -b $RS_SERVER -p @PORT@ $K" "$C -X $K"
pair "send after SHUT_WR: kernel TCP gives EPIPE + SIGPIPE" "$BIN/rsping -K -s -b $RS_SERVER -p @PORT@ -S 0" "$BIN/rsping -K -P $C_ARGS -p @PORT@"
pair "send after SHUT_WR: rsocket-rs gives EPIPE + SIGPIPE" "$S -S 0" "$C -P"

# librdmacm's own rstream; our side is the same binary with LD_PRELOAD=librsocket-rs.so.
RS="rstream -b $RS_SERVER -p @PORT@"
RC="rstream -s $RS_SERVER -b $RS_CLIENT -p @PORT@"
# -T a (rpoll) runs with our client only: librdmacm's rpoll reports POLLHUP while data is
# still queued once the peer's DISCONNECT arrived, and rstream treats POLLHUP as failure, so a
# librdmacm client fails when the server's last data and its disconnect arrive together (seen
# with librdmacm on both ends too: 1 run in 6 on siw under load). Ours reports POLLHUP once the
# data is read, as a TCP socket after FIN.
# On Soft-iWARP our client against librdmacm's server loses the tail of the last response about
# once in 18 runs (7 of 114 with -S 1000000 -C 20, then 1 of 30 on 2026-11-29): the server has
# finished and closed (exit 0), and our client's receives are flushed with the data still missing
# (ECONNRESET). The guest's TCP counters show why: the run that failed counted
# TcpExtTCPAbortOnData, a reset sent by a socket that was already closed when data reached it.
# librdmacm's server closes its siw connection once its last writes have completed, which on siw
# means handed to TCP, not delivered; a credit update (all a client sends while it receives) sent
# while that tail is still on its way reaches a closed socket, and the server's kernel answers
# with a reset and drops what it had not sent yet. librdmacm's own client runs into the same
# race: the counters moved in 3 of its 40 runs (3 of 30 of ours), and in one of them it lost the
# tail too and hung until the 120 s timeout (1 of 64 runs in all), where ours fails at once.
# Our server used to close the same way: librdmacm's client against it hung with that symptom
# once in clean-clone CI (-S 100000 -C 50 -T n), and in 30 runs of -S 1000000 -C 20 the counters
# moved twice and the client hung once (server exit 0). Our close now lingers on iWARP until the
# peer sends nothing more (src/socket/linger.rs): in 90 runs after that change (30 of
# -S 1000000 -C 20, then 60 over the four option sets below) the counters did not move and no
# client hung, so that direction is not retried any more.
# A failure of our client against librdmacm's server is retried once, reported as FLAKY, and a
# second failure fails the suite.
pair_retry_siw() {
  local before=$fail
  pair "$@"
  if siw_flake "$before" "known siw close race" "$1" lost_tail; then pair "$@"; fi
}
# The client lost the tail after the server finished: ours says ECONNRESET.
lost_tail() { [ "$last_src" -eq 0 ] && grep -q "Connection reset by peer" "$log/cli"; }

# siw_flake BEFORE WHAT NAME CHECK...: true if the test NAME, begun with $fail at BEFORE,
# failed on Soft-iWARP in the way the command CHECK recognizes as the known kernel race WHAT;
# the failure is then forgiven, counted as flaky and reported, and the caller retries once.
siw_flake() {
  local before=$1 what=$2 name=$3
  shift 3
  [ "$fail" -gt "$before" ] && [[ "$DEV" == *siw* ]] && "$@" || return 1
  fail=$before; flaky=$((flaky + 1))
  echo "FLAKY ($what, retrying once): $name"
}
for opts in "-S 1000000 -C 20 -T v" "-S 64 -C 2000 -T v" "-S 65536 -C 100 -T b -T v" "-S 100000 -C 50 -T a -T v"; do
  pair_retry_siw "rstream rsocket-rs client -> librdmacm rstream server ($opts)" "$RS $opts" \
    "LD_DEBUG=bindings LD_DEBUG_OUTPUT=$log/bind-c LD_PRELOAD=$LIB $RC $opts"
  if ! bound_to_us "$log/bind-c"; then fail=$((fail + 1)); echo "FAIL   (client did not run on rsocket-rs)"; fi
  rm -f "$log"/bind-c*
  opts=${opts/-T a/-T n}
  pair "rstream librdmacm client -> rsocket-rs rstream server ($opts)" \
    "LD_DEBUG=bindings LD_DEBUG_OUTPUT=$log/bind-s LD_PRELOAD=$LIB $RS $opts" "$RC $opts"
  if ! bound_to_us "$log/bind-s"; then fail=$((fail + 1)); echo "FAIL   (server did not run on rsocket-rs)"; fi
  rm -f "$log"/bind-s*
done

# riomap/riowrite/rioread (iomap.c), ours on both ends and against librdmacm both ways.
IS="$BIN/iomap -s -b $RS_SERVER -p @PORT@"
IC="$BIN/iomap -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -n 300"
pair "riowrite/rioread rsocket-rs <-> rsocket-rs, random ranges verified, refusals" "$IS" "$IC"
pair "riowrite rsocket-rs client -> librdmacm server (rioread refused: EOPNOTSUPP)" \
  "$BIN/iomap-rdmacm -s -b $RS_SERVER -p @PORT@" "$IC"
pair "riowrite librdmacm client -> rsocket-rs server" "$IS" \
  "$BIN/iomap-rdmacm -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -n 300"
pair "zero-copy API: rsend/riowrite MSG_ZEROCOPY, POLLERR + MSG_ERRQUEUE notices (zerocopy.c)" \
  "$BIN/zerocopy -s -b $RS_SERVER -p @PORT@" "$BIN/zerocopy -c $RS_SERVER -b $RS_CLIENT -p @PORT@"
# A server that used RDMA forks: the child accepts its own connection (on a device context of
# its own: the kernel refuses the parent's), the parent's goes on; both echoes checked.
pair "fork: the child of a server with a live connection accepts and echoes its own (forked.c)" \
  "$BIN/forked -s $RS_SERVER -p @PORT@" "$BIN/forked -c $RS_SERVER -b $RS_CLIENT -p @PORT@"
PORT=$((PORT + 1)) # forked.c's child listens on the next port

# The descriptor is pollable: 64 connections, a pipe and a timerfd in one kernel epoll set
# (level, edge, one-shot, nested), then in poll(2) and select(2); no rpoll (evloop.c).
EV="$BIN/evloop -n 64"
for m in epoll poll select; do
  pair "kernel $m on rsocket descriptors: 64 connections + pipe + timerfd, echo verified" \
    "$EV -m $m -s -b $RS_SERVER -p @PORT@" "$EV -m $m -c $RS_SERVER -b $RS_CLIENT -p @PORT@"
done
pair "the same epoll loop over kernel TCP (the test's control)" \
  "$EV -K -s -b $RS_SERVER -p @PORT@" "$EV -K -c $RS_SERVER -b $RS_CLIENT -p @PORT@"
# SIGALRM every 2 ms, its handler without SA_RESTART (-I): the waits fail with EINTR, counted,
# and the loop goes on with no byte lost (the run fails if no call ever saw EINTR).
pair "kernel epoll on rsocket descriptors, SIGALRM without SA_RESTART: EINTR seen and survived" \
  "$EV -I -s -b $RS_SERVER -p @PORT@" "$EV -I -c $RS_SERVER -b $RS_CLIENT -p @PORT@"
kill_peer "peer killed: poll(2) on the descriptor wakes, rrecv gives ECONNRESET" \
  "$BIN/evloop -X -s -b $RS_SERVER -p @PORT@" "$BIN/evloop -X -c $RS_SERVER -b $RS_CLIENT -p @PORT@"

# librdmacm's riostream, our side under LD_PRELOAD, both ways.
IOS="riostream -b $RS_SERVER -p @PORT@"
IOC="riostream -s $RS_SERVER -b $RS_CLIENT -p @PORT@"
for opts in "-S 65536 -C 50 -T v" "-S 1000 -C 200 -T b -T v"; do
  pair "riostream rsocket-rs client -> librdmacm riostream server ($opts)" "$IOS $opts" \
    "LD_DEBUG=bindings LD_DEBUG_OUTPUT=$log/bind-c LD_PRELOAD=$LIB $IOC $opts"
  if ! bound_to_us "$log/bind-c" riostream; then fail=$((fail + 1)); echo "FAIL   (client did not run on rsocket-rs)"; fi
  rm -f "$log"/bind-c*
  pair "riostream librdmacm client -> rsocket-rs riostream server ($opts)" \
    "LD_DEBUG=bindings LD_DEBUG_OUTPUT=$log/bind-s LD_PRELOAD=$LIB $IOS $opts" "$IOC $opts"
  if ! bound_to_us "$log/bind-s" riostream; then fail=$((fail + 1)); echo "FAIL   (server did not run on rsocket-rs)"; fi
  rm -f "$log"/bind-s*
done

# ---- Registered memory of idle connections (idleconns.c) --------------------------------------
# N connections in one process, one byte each way on each, then the client's memory regions
# summed from `rdma resource show mr`: rsocket-rs's rings start small and grow with traffic, so
# an idle connection must register at most a quarter of what librdmacm's does, measured in the
# same run. The server is ours for both clients (what a client registers does not depend on the
# server): librdmacm's own server hangs in raccept at its 6th connection here (its CM thread and
# raccept wait on each other), with either client.
# Both ends of the last pair said they stopped in rrecv (idleconns writes it to stderr, which
# goes to the trace files).
both_in_rrecv() {
  grep -qs "terminated at connection .*in rrecv" "$log/srv" "$log/trace-srv" &&
    grep -qs "terminated at connection .*in rrecv" "$log/cli" "$log/trace-cli"
}
# The kernel TCP sockets holding bytes not yet read or not yet acknowledged (and ss's header).
tcp_queued() { ss -tn | awk 'NR == 1 || $2 > 0 || $3 > 0'; }

idle_tests() {
  local n=${RS_IDLE_CONNS:-1000} impl per ours=0 theirs=0
  for impl in idleconns idleconns-rdmacm; do
    # Our ends trace their connection setup and teardown (RSOCKET_DEBUG, to a file of their
    # own): a failure shows the events and errors that led to it, not the thousands of lines.
    local before=$fail try sspid stuckpid
    for try in 1 2; do
      rm -f "$log"/trace-* "$log/ss"
      # Soft-iWARP runs over kernel TCP sockets: shortly before the timeout, those holding
      # bytes not yet read or not yet acknowledged are noted (printed on a failure).
      (sleep 110; tcp_queued >"$log/ss") &
      sspid=$!
      # Both sides stuck (idleconns says "no progress" after 30 s): ended now, as the
      # timeout would end them (SIGTERM: each says where it was), not 90 s later.
      (for i in $(seq 120); do
         sleep 1
         grep -qs "no progress" "$log/trace-srv" && grep -qs "no progress" "$log/trace-cli" || continue
         tcp_queued >"$log/ss"
         pkill -TERM -f "^$BIN/idleconns"; break
       done) &
      stuckpid=$!
      pair "$n idle connections in one process, $impl client: every connection answered" \
        "RSOCKET_DEBUG=1 $BIN/idleconns -s $RS_SERVER -p @PORT@ -n $n 2>>$log/trace-srv" \
        "RSOCKET_DEBUG=1 $BIN/$impl -c $RS_SERVER -p @PORT@ -n $n 2>>$log/trace-cli"
      kill $sspid $stuckpid 2>/dev/null; wait $sspid $stuckpid 2>/dev/null
      if [ "$fail" -gt "$before" ]; then
        [ -s "$log/ss" ] && sed 's/^/  ss| /' "$log/ss"
        for side in srv cli; do
          grep -vE '^rsocket-rs\[' "$log/trace-$side" | sed "s/^/  $side| /"
          grep -iE 'fail|in use|reject|error|unreach|status -[1-9]' "$log/trace-$side" | tail -40 |
            sed "s/^/  $side trace| /"
          echo "  $side trace| (last lines)"; grep -E '^rsocket-rs\[' "$log/trace-$side" | tail -15 | sed "s/^/  $side trace| /"
        done
      fi
      # Soft-iWARP's first-message hang (see nudge_job in src/socket/stream/jobs.rs): the
      # initiator's first bytes left unread at the acceptor, both ends asleep in rrecv until
      # the timeout. Our initiator nudges it away; librdmacm's does not, and our acceptor
      # cannot (a READ, the nudge, is refused by librdmacm's initiator, which grants none).
      # CI met it in idleconns-rdmacm (conn 45; conn 233, ss showing the acceptor's socket with
      # 116 bytes unread). Retried once, reported FLAKY. idleconns says where it stopped on
      # stderr, which goes to the trace files.
      [ $try -eq 1 ] && siw_flake "$before" "Soft-iWARP first-message hang, both ends in rrecv" \
        "$impl" both_in_rrecv && continue
      break
    done
    grep -h 'per_connection' "$log/cli" | sed 's/^/       /'
    per=$(awk '/per_connection/ {print $NF}' "$log/cli")
    if [ "$impl" = idleconns ]; then ours=${per:-0}; else theirs=${per:-0}; fi
  done
  if [ "$ours" -gt 0 ] && [ "$theirs" -gt 0 ] && [ $((ours * 4)) -le "$theirs" ]; then
    pass=$((pass + 1)); echo "ok   registered memory per idle connection: rsocket-rs $ours B, librdmacm $theirs B ($(awk "BEGIN {printf \"%.3f\", $ours / $theirs}")x)"
  else
    fail=$((fail + 1)); echo "FAIL registered memory per idle connection: rsocket-rs $ours B, librdmacm $theirs B (want at most a quarter)"
  fi
}
idle_tests

asan_tests

# ---- Datagram rsockets (c-tests/dgram.c; librdmacm's udpong) -----------------------------------
# Last: the udpong run raises the veth MTU. iWARP has no unreliable datagrams: there the socket
# call itself must fail with the documented errno.
dgram_tests() {
  local D="$BIN/dgram"
  if [[ "$DEV" == *siw* ]]; then
    PORT=$((PORT + 1))
    if timeout 30 "$D" -E >"$log/one" 2>&1; then
      pass=$((pass + 1)); echo "ok   datagram rsocket on iWARP: ESOCKTNOSUPPORT"; sed 's/^/       /' "$log/one"
    else
      fail=$((fail + 1)); echo "FAIL datagram rsocket on iWARP: ESOCKTNOSUPPORT"; sed 's/^/  | /' "$log/one"
    fi
    return
  fi
  local mtu max dev=${DEV%% *}
  mtu=$(ibv_devinfo -d "$dev" | awk '/active_mtu/ {print $2}')
  max=$((mtu - 8)) # one packet: the path MTU less the 8-byte datagram header (IPv4)
  local c0 c1
  c0=$(cat /sys/class/infiniband/$dev/ports/1/hw_counters/rcvd_pkts)
  for m in block rpoll epoll; do
    pair "datagram echo ($m): 400 datagrams of 1-$max bytes verified, EMSGSIZE at $((max + 1))" \
      "$D -s -b $RS_SERVER -p @PORT@ -n 400" \
      "$D -c $RS_SERVER -b $RS_CLIENT -p @PORT@ -n 400 -M $max -m $m -r $RANDOM"
  done
  c1=$(cat /sys/class/infiniband/$dev/ports/1/hw_counters/rcvd_pkts)
  # The server's device received them over RDMA (UD packets), not the kernel's UDP.
  if [ $((c1 - c0)) -ge 1150 ]; then
    pass=$((pass + 1)); echo "ok   the datagrams crossed $dev: rcvd_pkts +$((c1 - c0)) (>= 1150 of 1200: the first datagrams of each run go by UDP)"
  else
    fail=$((fail + 1)); echo "FAIL the datagrams did not cross $dev: rcvd_pkts +$((c1 - c0))"
  fi
  # One sender (10.10.0.2), two receivers in other processes (10.10.0.1, same port); B drops
  # the group after 100 and must get nothing of the next 60.
  local dir; dir=$(mktemp -d)
  PORT=$((PORT + 1))
  local M="-g 239.7.$((RANDOM % 250)).1 -p $PORT -n 100 -k 60 -d $dir -M $((max - 4))"
  timeout 90 "$D" -R A -i $RS_SERVER $M >"$log/ra" 2>&1 &
  local pa=$!
  timeout 90 "$D" -R B -i $RS_SERVER $M -D >"$log/rb" 2>&1 &
  local pb=$!
  timeout 90 "$D" -T -b $RS_CLIENT $M >"$log/tx" 2>&1
  local tx=$?
  wait $pa; local ra=$?; wait $pb; local rb=$?
  if [ $tx -eq 0 ] && [ $ra -eq 0 ] && [ $rb -eq 0 ]; then
    pass=$((pass + 1)); echo "ok   multicast: one sender, two receivers verified; after the drop nothing more"
    sed 's/^/       /' "$log/ra" "$log/rb" "$log/tx"
  else
    fail=$((fail + 1)); echo "FAIL multicast (sender $tx, A $ra, B $rb)"
    sed 's/^/  tx| /' "$log/tx"; sed 's/^/  A| /' "$log/ra"; sed 's/^/  B| /' "$log/rb"
  fi
  rm -rf "$dir"
  # Overload: 400 datagrams sent back to back into a receiver with 16 slots that reads only
  # afterwards: no hang, the intact ones in order, the drops counted (SO_RXQ_OVFL).
  dir=$(mktemp -d)
  PORT=$((PORT + 1))
  timeout 60 "$D" -O -b $RS_SERVER -p $PORT -n 400 -d $dir >"$log/srv" 2>&1 &
  local po=$!
  timeout 60 "$D" -P $RS_SERVER -b $RS_CLIENT -p $PORT -n 400 -d $dir -M $max >"$log/cli" 2>&1
  local so=$?
  wait $po; local ro=$?
  if [ $so -eq 0 ] && [ $ro -eq 0 ]; then
    pass=$((pass + 1)); echo "ok   overload: drops counted, never a hang"; sed 's/^/       /' "$log/srv"
  else
    fail=$((fail + 1)); echo "FAIL overload (sender $so, receiver $ro)"
    sed 's/^/  tx| /' "$log/cli"; sed 's/^/  rx| /' "$log/srv"
  fi
  rm -rf "$dir"
  # librdmacm's udpong, every size and both tests (echoed latency, one-way bandwidth) of its
  # default run (64-1536 bytes), our library under both ends; it needs 2 KiB datagrams: a
  # 4200-byte MTU gives the ports 4096. librdmacm alone fails here (its address handles lack
  # the GRH RoCE needs).
  ip link set $RS_SERVER_DEV mtu 4200 && ip link set $RS_CLIENT_DEV mtu 4200
  sleep 1
  # Each size is its own udpong run, with fewer transfers than the default run's: udpong's
  # client sends again when no reply came within 1 ms, and again for every stale reply, so
  # each such timeout leaves one more duplicate in flight for the rest of the run (and of the
  # next sizes: a default run once took 3.5 ms per transfer at 512 bytes and ran out of time
  # on CI, twice). The emulated VM has such waits: 1 to 23 in 20,000 round trips of 64 or 768
  # bytes, measured with udpong's calls (rpoll for 1 ms, then rrecv) against a server that
  # spins in rrecvfrom as udpong's does. A run that fails is retried once and reported FLAKY.
  local us uc try size mode n lines=0 bad=""
  for mode in lat bw; do
    for size in 64 128 192 256 384 512 768 1024 1536; do
      n=2000; [ $mode = bw ] && n=10000
      for try in 1 2; do
        PORT=$((PORT + 1))
        LD_PRELOAD=$LIB timeout 60 udpong -b $RS_SERVER -p $PORT >"$log/srv" 2>&1 &
        us=$!
        wait_listen $PORT
        LD_PRELOAD=$LIB timeout 50 udpong -s $RS_SERVER -b $RS_CLIENT -p $PORT -S $size -C $n \
          $([ $mode = lat ] && echo -T e) >"$log/cli" 2>&1
        uc=$?
        kill $us 2>/dev/null; wait $us 2>/dev/null
        # udpong exits 0 after its test, which prints one result line.
        [ $uc -eq 0 ] && [ "$(grep -cE '^custom ' "$log/cli")" -eq 1 ] && break
        [ $try -eq 1 ] && { flaky=$((flaky + 1)); echo "FLAKY (udpong $mode $size B, rc $uc: $(tail -n 1 "$log/cli"); retrying once)"; }
      done
      if [ $uc -eq 0 ] && [ "$(grep -cE '^custom ' "$log/cli")" -eq 1 ]; then
        lines=$((lines + 1))
        [ $size = 64 ] || [ $size = 1536 ] && grep -E '^custom ' "$log/cli" | awk -v n="${size}_$mode" '{$1 = n; print "       " $0}'
      else
        bad="$bad $mode/$size"
        sed "s/^/  cli $mode $size| /" "$log/cli"; sed "s/^/  srv $mode $size| /" "$log/srv"
      fi
    done
  done
  if [ -z "$bad" ]; then
    pass=$((pass + 1)); echo "ok   librdmacm udpong, the 18 tests of its default run (64-1536 B; latency 2000, bandwidth 10000 transfers each), rsocket-rs on both ends"
  else
    fail=$((fail + 1)); echo "FAIL librdmacm udpong:$bad ($lines of 18 passed)"
  fi
  # The control: librdmacm on both ends, same MTU, fails (rconnect: its address handle has no
  # GRH). If it ever passes, the claim above is stale.
  PORT=$((PORT + 1))
  timeout 20 udpong -b $RS_SERVER -p $PORT >"$log/srv" 2>&1 &
  us=$!
  sleep 1.5
  timeout 15 udpong -s $RS_SERVER -b $RS_CLIENT -p $PORT -S 64 -C 10 >"$log/cli" 2>&1
  uc=$?
  kill $us 2>/dev/null; wait $us 2>/dev/null
  if [ $uc -ne 0 ]; then
    pass=$((pass + 1)); echo "ok   control: librdmacm's udpong alone fails on $dev (rc $uc: $(head -1 "$log/cli"))"
  else
    fail=$((fail + 1)); echo "FAIL control: librdmacm's udpong alone passed on $dev"; sed 's/^/  cli| /' "$log/cli"
  fi
  ip link set $RS_SERVER_DEV mtu 1500 && ip link set $RS_CLIENT_DEV mtu 1500
}
dgram_tests
summary
