#!/usr/bin/env bash
# Unmodified Debian programs under the preload (bin/rsocket-run), in the VM on rxe: every pair
# checks its data and both exit codes, and the rxe packet counters must show that RDMA carried
# it (at least PKTS packets more than before). Also: preloaded clients against plain TCP
# servers and plain clients against preloaded servers (those must work, over the kernel).
set -uo pipefail
cd "$(dirname "$0")"
. ../vm/testnet
STAGE=$PWD/../build/stage
RUN=$STAGE/bin/rsocket-run
PY="python3 $PWD/preload_clients.py"
S=$RS_SERVER
PORT=$((RS_PORTS_C + 1500 + RANDOM % 400))
# The preload says why a socket left RDMA (shown for a failed test, see app).
export RSOCKET_PRELOAD_DEBUG=${RSOCKET_PRELOAD_DEBUG:-1}
pass=0; fail=0; failed=() # the names of the failed tests, repeated at the end
log=$(mktemp -d)
pkts() { cat /sys/class/infiniband/*/ports/1/hw_counters/sent_pkts 2>/dev/null | awk '{s+=$1} END {print s+0}'; }

# show_failure: the last lines of both ends' output, then the preload's decisions to leave RDMA
# (its RSOCKET_PRELOAD_DEBUG lines naming kernel TCP, failures, listening again), wherever
# they are in the logs.
show_failure() {
  local side
  for side in srv cli; do tail -30 "$log/$side" | sed "s/^/  $side| /"; done
  for side in srv cli; do
    grep -hE '^rspreload\[.*(kernel|fail|again)' "$log/$side" | head -20 | sed "s/^/  $side trace| /"
  done
}

# app NAME MIN_PKTS "SERVER CMD" "CLIENT CMD": the server runs until the client is done (then
# SIGTERM unless it exits by itself); both must succeed; MIN_PKTS: RDMA packets expected (0:
# the kernel must carry it, so fewer than 100; -1: either may). SERVER_EXITS=1: the server ends
# by itself and is waited for, never stopped (a SIGTERM'd server counts as a pass, which would
# hide the checks it makes last); its summary lines are shown too.
app() {
  local name=$1 min=$2 srv=$3 cli=$4
  PORT=$((PORT + 1))
  [[ $name =~ ${RSOCKET_PRELOAD_ONLY:-.} ]] || return 0
  srv=${srv//@PORT@/$PORT}; cli=${cli//@PORT@/$PORT}
  local before; before=$(pkts)
  timeout 150 bash -c "exec $srv" >"$log/srv" 2>&1 &
  local spid=$! i
  # Until the server listens on TCP or, a UDP server, has its socket bound (python takes
  # seconds to start in the emulated VM). Both: iperf3 -u listens on TCP first (its control
  # connection) and binds its UDP socket only once a client came.
  for i in $(seq 100); do ss -Hltun "sport = :$PORT" | grep -q . && break; sleep 0.2; done
  timeout 120 bash -c "$cli" >"$log/cli" 2>&1
  local crc=$?
  if [ -z "${SERVER_EXITS:-}" ]; then
    sleep 0.5
    kill -TERM $spid 2>/dev/null
  fi
  wait $spid; local src=$?
  # A server stopped by our SIGTERM is fine (143); any other failure is not.
  [ $src -eq 143 ] && src=0
  local moved=$(( $(pkts) - before ))
  local ok=1
  [ $crc -eq 0 ] && [ $src -eq 0 ] || ok=0
  if [ "$min" -gt 0 ]; then [ $moved -ge "$min" ] || ok=0; elif [ "$min" -eq 0 ]; then [ $moved -lt 100 ] || ok=0; fi
  if [ $ok = 1 ]; then
    pass=$((pass + 1)); echo "ok   $name ($moved RDMA packets)"
    local show=("$log/cli"); [ -n "${SERVER_EXITS:-}" ] && show=("$log/srv" "$log/cli")
    cat "${show[@]}" | tr '\r' '\n' | grep -iE 'verified|requests per second|sender|receiver|latency is|sha256 ok|blocking recv' | head -8 | sed 's/^/       /'
  else
    fail=$((fail + 1)); failed+=("$name")
    echo "FAIL $name (server rc $src, client rc $crc, $moved RDMA packets, wanted ${min:-<100})"
    show_failure
    [ -f "${www:-}/error.log" ] && tail -20 "$www/error.log" | sed 's/^/  nginx| /'
  fi
}

# app_killed NAME MIN_PKTS "SERVER CMD" "CLIENT CMD": the server streams to the client until it
# is killed (SIGKILL, once MIN_PKTS RDMA packets moved, or after 30 s); the client must see the
# connection reset (exit 0), and MIN_PKTS RDMA packets must have moved.
app_killed() {
  local name=$1 min=$2 srv=$3 cli=$4
  PORT=$((PORT + 1))
  [[ $name =~ ${RSOCKET_PRELOAD_ONLY:-.} ]] || return 0
  srv=${srv//@PORT@/$PORT}; cli=${cli//@PORT@/$PORT}
  local before; before=$(pkts)
  # No timeout wrapper: $! must be the server itself (bash, env and rsocket-run exec it). The
  # preload's trace lines (a few per connection) say, on a failure, how each end connected.
  bash -c "exec env RSOCKET_PRELOAD_DEBUG=1 $srv" >"$log/srv" 2>&1 &
  local spid=$! i
  for i in $(seq 100); do ss -Hltun "sport = :$PORT" | grep -q . && break; sleep 0.2; done
  RSOCKET_PRELOAD_DEBUG=1 timeout 90 bash -c "$cli" >"$log/cli" 2>&1 &
  local cpid=$!
  for i in $(seq 150); do [ $(( $(pkts) - before )) -ge "$min" ] && break; sleep 0.2; done
  sleep 0.5
  kill -KILL $spid 2>/dev/null; wait $spid 2>/dev/null
  wait $cpid; local crc=$?
  local moved=$(( $(pkts) - before ))
  if [ $crc -eq 0 ] && [ $moved -ge "$min" ]; then
    pass=$((pass + 1)); echo "ok   $name ($moved RDMA packets)"; grep -v '^rspreload\[' "$log/cli" | sed 's/^/       /'
  else
    fail=$((fail + 1)); failed+=("$name")
    echo "FAIL $name (client rc $crc, $moved RDMA packets, wanted $min)"
    show_failure
  fi
}

# evloop -K (evloop.c): one event loop over the plain socket calls, which the preload turns into
# RDMA: kernel epoll (level, edge, one-shot and nested, by connection), poll and select on the
# converted descriptors next to a pipe, a timerfd and a child's pidfd, 16 connections echoed and
# checked, end of stream seen as EPOLLRDHUP/POLLRDHUP, the peer's close as POLLHUP. With -I a
# SIGALRM without SA_RESTART every 2 ms: EINTR must be seen (counted) and survived; -D: served
# through dup/dup3/F_DUPFD_CLOEXEC copies, one of two copies closed mid-connection; -F: forks
# while connections are live (_exit at once; exec of evloop's check mode, which finds the
# close-on-exec descriptors gone and nothing leaked; exec of sh; closing everything inherited).
EV="$PWD/bin/evloop -K -I -D -F -n 16"
for m in epoll poll select; do
  SERVER_EXITS=1 app "evloop -K $m: mixed LT/ET/ONESHOT/nested + pipe/timerfd/pidfd, EINTR, dup, fork+exec" 1000 \
    "$RUN $EV -m $m -s -b $S -p @PORT@" "$RUN $EV -m $m -c $S -b $RS_CLIENT -p @PORT@"
done
# The test's control: the same without the preload (kernel TCP, no RDMA); -B: a blocking recv
# is interrupted too. (Under the preload the blocking recv is not: rsocket-rs retries inside the
# call on EINTR, so -B is left out there.)
SERVER_EXITS=1 app "evloop -K epoll without the preload (control: kernel TCP), blocking recv EINTR" 0 \
  "$EV -s -b $S -p @PORT@" "$EV -B -c $S -b $RS_CLIENT -p @PORT@"
# The peer is killed mid-stream: poll(2) on the (dup'ed) descriptor wakes with POLLERR/POLLHUP and
# recv gives ECONNRESET, signals arriving all along.
app_killed "evloop -K -X: peer killed, ECONNRESET + POLLHUP/POLLERR, EINTR, dup" 1000 \
  "$RUN $PWD/bin/evloop -K -I -X -s -b $S -p @PORT@" "$RUN $PWD/bin/evloop -K -I -D -X -c $S -b $RS_CLIENT -p @PORT@"

# asyncio echo server and client, both preloaded.
app "python asyncio echo" 1000 "$RUN $PY echo-server $S @PORT@" "$RUN $PY echo-client $S @PORT@ 7"
# A request/response server asleep in epoll whose client goes idle must sleep too: a POLLIN
# left shown after the data was read made it spin at full speed (3.1 s of CPU in 3 s).
# SO_RCVTIMEO (the rsocket core has none): the preload bounds a blocking receive, as the kernel.
app "SO_RCVTIMEO on a preloaded client" 4 "$RUN $PY select-echo-server $S @PORT@" "$RUN $PY timeout-check $S @PORT@ 3"
app "epoll echo server idles without spinning" 500 "$RUN $PY select-echo-server $S @PORT@" "$RUN $PY idle-check $S @PORT@ 5"
# A forked worker that changes its credentials three times (setgid, setgroups, setuid, 0.1 s
# apart) while it claims the RDMA listener handed over at fork, each claim slowed to 0.3 s (a
# test knob): a claim still under way at the next change left the listener to no acceptor, and
# RDMA clients waited 10 s for the connect, then went over TCP (nginx's workers, now and then).
# The client starts once the last claim is done.
SERVER_EXITS=1 app "credentials changed while the listener handed over at fork is claimed" 500 \
  "env RSOCKET_PRELOAD_TEST_CLAIM_DELAY_MS=300 $RUN $PY cred-echo-server $S @PORT@" \
  "sleep 3; $RUN $PY echo-client $S @PORT@ 11"
# A program asleep in epoll is woken by its rsockets' completion channels directly (the preload
# puts them in its epoll sets): the service threads sleep through the messages. poll and select
# on a socket that is in an epoll set still see everything.
app "epoll wakes the program directly; poll and select too" 700 "$RUN $PY select-echo-server $S @PORT@" "$RUN $PY hook-check $S @PORT@ 7"

# redis-server: redis-benchmark (PING, SET, GET, LPUSH, LRANGE) and a verifying client.
app "redis-server + redis-benchmark" 1000 \
  "$RUN redis-server --bind $S --port @PORT@ --save '' --appendonly no --protected-mode no" \
  "$RUN redis-benchmark -h $S -p @PORT@ -n 2000 -c 4 -t ping,set,get,lpush,lrange -q && $RUN $PY redis $S @PORT@ 3"

# memcached with a verifying client.
app "memcached" 1000 "$RUN memcached -u root -l $S -p @PORT@ -U 0 -t 2" "$RUN $PY memcache $S @PORT@ 5"

# iperf3 (control and data connections).
app "iperf3" 1000 "$RUN iperf3 -s -1 -B $S -p @PORT@" "$RUN iperf3 -c $S -B $RS_CLIENT -p @PORT@ -n 32M"

# sockperf TCP ping-pong.
app "sockperf ping-pong" 1000 "$RUN sockperf sr --tcp -i $S -p @PORT@" "$RUN sockperf pp --tcp -i $S -p @PORT@ -t 3"

# UDP: sockperf's default (UDP) ping-pong; both ends' sockets become datagram rsockets (the
# server's at bind, the client's at its first send), and the rxe counters show RDMA carried it.
app "sockperf UDP ping-pong (datagram rsockets)" 1000 "$RUN sockperf sr -i $S -p @PORT@" "$RUN sockperf pp -i $S -p @PORT@ -t 3"
# iperf3 -u: its TCP control connection and its UDP data stream (1000-byte datagrams).
app "iperf3 UDP (-u, control over RDMA streams, data over datagram rsockets)" 1000 \
  "$RUN iperf3 -s -1 -B $S -p @PORT@" "$RUN iperf3 -c $S -B $RS_CLIENT -p @PORT@ -u -b 20M -l 1000 -n 4M"

# nginx, two workers, sendfile: large files fetched by curl, checked by checksum.
www=$(mktemp -d); chmod 755 "$www"; mkdir -m 777 "$www/tmp"
head -c $((5 * 1024 * 1024 + 12345)) /dev/urandom > "$www/big.bin"
head -c 777777 /dev/urandom > "$www/mid.bin"
(cd "$www" && sha256sum big.bin mid.bin > sums && chmod 644 big.bin mid.bin sums)
nginx_conf() { # nginx_conf PORT WORKERS
  cat > "$www/nginx.conf" <<CONF
worker_processes ${2:-1};
daemon off;
master_process $([ "${2:-1}" -gt 1 ] && echo on || echo off);
pid $www/nginx.pid;
error_log $www/error.log info;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  client_body_temp_path $www/tmp; proxy_temp_path $www/tmp; fastcgi_temp_path $www/tmp;
  uwsgi_temp_path $www/tmp; scgi_temp_path $www/tmp;
  server { listen $S:$1; root $www; }
}
CONF
}
fetch() { # fetch PREFIX PORT: six fetches, every one checked
  local p=$1 port=$2 i
  for i in 1 2 3 4 5 6; do
    for f in big.bin mid.bin; do
      $p curl -sf --interface $RS_CLIENT -o "$www/got" "http://$S:$port/$f" || { echo "curl $f failed"; return 1; }
      [ "$(sha256sum < "$www/got" | cut -d' ' -f1)" = "$(grep " $f" "$www/sums" | cut -d' ' -f1)" ] ||
        { echo "$f: checksum differs"; return 1; }
    done
  done
  echo "nginx: 12 files, sha256 ok"
}
export -f fetch; export www S RS_CLIENT
nginx_conf $((PORT + 1)) 1
app "nginx, one process, sendfile, preloaded curl" 1000 "$RUN nginx -c $www/nginx.conf" "fetch $RUN @PORT@"
# Two workers (master process on): the RDMA listener is handed to the first worker at fork.
# A worker drops its privileges (setgid, setgroups, setuid), after which the kernel refuses
# every RDMA file opened before, and every one opened by a thread older than the change: the
# worker listens again over RDMA from a new acceptor thread. Its tokens take its private
# route (nginx waits with EPOLLEXCLUSIVE on the listener both workers share, and the kernel
# wakes one of them, not necessarily the owner). RDMA must carry the files.
nginx_conf $((PORT + 1)) 2
app "nginx, 2 workers, sendfile, preloaded curl" 1000 "$RUN nginx -c $www/nginx.conf" "fetch $RUN @PORT@"
# Plain clients reach preloaded servers (over the kernel), preloaded clients plain servers.
nginx_conf $((PORT + 1)) 2
app "plain curl -> preloaded nginx" 0 "$RUN nginx -c $www/nginx.conf" "fetch '' @PORT@"
app "preloaded curl -> plain http.server" 0 "python3 -m http.server --bind $S --directory $www @PORT@" "fetch $RUN @PORT@"
app "preloaded asyncio client -> plain asyncio server" 0 "$PY echo-server $S @PORT@" "$RUN $PY echo-client $S @PORT@ 9"

# The failures again, by name: their output above can be long enough to be cut from a summary.
for name in "${failed[@]}"; do echo "failed: $name"; done
echo "preload: $pass passed, $fail failed"
rm -rf "$log" "$www"
[ $fail -eq 0 ]
