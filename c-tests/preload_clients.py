#!/usr/bin/env python3
"""Clients and servers for c-tests/preload.sh; each checks every byte it gets back.

  echo-server HOST PORT                  asyncio echo server (one client, then exit)
  echo-client HOST PORT SEED             asyncio client: random sizes, verified echoes
  memcache HOST PORT SEED                set/get random values over memcached's text protocol
  redis HOST PORT SEED                   SET/GET/LPUSH/LRANGE random values over RESP
  memcache-bench HOST PORT N             N set/get pairs (100 B), one at a time: ops per second
  select-echo-server HOST PORT           non-blocking echo server on selectors (epoll, level-
                                         triggered), one client, then exit
  timeout-check HOST PORT SEED           against an echo server: SO_RCVTIMEO set before the
                                         connect ends a receive with nothing to read in
                                         EAGAIN (not before the timeout, not never), as
                                         getsockopt reports it; echoes still verified after
  idle-check HOST PORT SEED              against an echo server: 500 verified 64 B ping-pongs, then
                                         3 s idle, during which the server (found by its port)
                                         must not spin: under 1 s of CPU; then one more echo
  hook-check HOST PORT SEED              against an epoll echo server: verified echoes of random
                                         sizes (every other one sent by sendmsg in three
                                         buffers) waited for in epoll (the socket's completion
                                         channel in the set), then in poll and select with the
                                         socket still in the epoll set, then in epoll again; the
                                         rsocket service threads of both ends must sleep through
                                         the epoll rounds (under one wake-up per 4 echoes)
"""
import asyncio, os, random, socket, sys


def fail(msg):
    print("FAIL:", msg, file=sys.stderr)
    sys.exit(1)


async def echo_server(host, port):
    done = asyncio.Event()

    async def serve(r, w):
        while True:
            b = await r.read(65536)
            if not b:
                break
            w.write(b)
            await w.drain()
        w.close()
        done.set()

    srv = await asyncio.start_server(serve, host, port)
    async with srv:
        await done.wait()


async def echo_client(host, port, seed):
    rng = random.Random(seed)
    r, w = await asyncio.open_connection(host, port)
    total = 0
    for i in range(300):
        n = rng.choice([1, 7, 100, 1500, 4096, 65536, rng.randint(1, 300000)])
        d = rng.randbytes(n)
        w.write(d)
        await w.drain()
        got = await r.readexactly(n)
        if got != d:
            fail(f"echo {i}: {n} bytes differ")
        total += n
    w.close()
    print(f"asyncio echo: {total} bytes verified")


def line(f):
    l = f.readline()
    if not l:
        fail("connection closed")
    return l


def memcache(host, port, seed):
    rng = random.Random(seed)
    s = socket.create_connection((host, port))
    f = s.makefile("rb")
    vals = {}
    for i in range(400):
        k = f"k{i % 50}"
        v = rng.randbytes(rng.randint(1, 200000))
        s.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (k.encode(), len(v), v))
        if line(f) != b"STORED\r\n":
            fail("set")
        vals[k] = v
        k2 = f"k{rng.randrange(50)}"
        s.sendall(b"get %s\r\n" % k2.encode())
        h = line(f)
        if k2 not in vals:
            if h != b"END\r\n":
                fail("get of an unset key")
            continue
        n = int(h.split()[3])
        data = f.read(n + 2)[:-2]
        if data != vals[k2] or line(f) != b"END\r\n":
            fail(f"get {k2}: value differs")
    print(f"memcached: 400 sets and gets verified")


def memcache_bench(host, port, n):
    """n set/get pairs of a 100-byte value, one at a time: operations per second."""
    import time
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    v = bytes(range(100))
    t = time.perf_counter()
    for i in range(n):
        s.sendall(b"set k%d 0 0 100\r\n%s\r\n" % (i % 64, v))
        if line(f) != b"STORED\r\n":
            fail("set")
        s.sendall(b"get k%d\r\n" % (i % 64))
        if line(f).split()[:2] != [b"VALUE", b"k%d" % (i % 64)] or f.read(102)[:-2] != v:
            fail("get")
        if line(f) != b"END\r\n":
            fail("get end")
    dt = time.perf_counter() - t
    print(f"memcached: ops_per_s={2 * n / dt:.0f}")


def resp(f):
    l = line(f)
    t, rest = l[:1], l[1:-2]
    if t in b"+-:":
        if t == b"-":
            fail(rest.decode())
        return rest
    if t == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if t == b"*":
        return [resp(f) for _ in range(int(rest))]
    fail(f"bad reply {l!r}")


def cmd(s, *a):
    s.sendall(b"*%d\r\n" % len(a) + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in a))


def redis(host, port, seed):
    rng = random.Random(seed)
    s = socket.create_connection((host, port))
    f = s.makefile("rb")
    cmd(s, b"DEL", b"list")
    resp(f)
    items = []
    for i in range(300):
        v = rng.randbytes(rng.randint(1, 100000))
        cmd(s, b"SET", b"key%d" % i, v)
        resp(f)
        cmd(s, b"GET", b"key%d" % i)
        if resp(f) != v:
            fail(f"GET key{i} differs")
        it = rng.randbytes(rng.randint(1, 3000))
        cmd(s, b"LPUSH", b"list", it)
        resp(f)
        items.insert(0, it)
    cmd(s, b"LRANGE", b"list", b"0", b"-1")
    if resp(f) != items:
        fail("LRANGE differs")
    print("redis: 300 SET/GET and LPUSH, LRANGE verified")


def select_echo_server(host, port, ls=None):
    import selectors
    sel = selectors.DefaultSelector()
    if ls is None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen()
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is ls:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
                continue
            try:
                d = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if not d:
                return
            key.fileobj.setblocking(True)
            key.fileobj.sendall(d)
            key.fileobj.setblocking(False)


def cred_echo_server(host, port):
    """A forking server whose worker changes its credentials three times, 0.1 s apart (the
    same ones: setgid, setgroups, setuid, as a server dropping privileges does), then serves
    select_echo_server's loop on the listener it inherited. The parent waits for it."""
    import time
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen()
    pid = os.fork()
    if pid:
        ls.close()
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    os.setgid(os.getgid())
    time.sleep(0.1)
    os.setgroups(os.getgroups())
    time.sleep(0.1)
    os.setuid(os.getuid())
    select_echo_server(host, port, ls)


def timeout_check(host, port, seed):
    import struct, time
    rng = random.Random(seed)
    s = socket.socket()
    tv = struct.pack("ll", 0, 300000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    s.connect((host, port))
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(tv)) != tv:
        fail("SO_RCVTIMEO reads back differently")
    for round in range(3):
        t0 = time.monotonic()
        try:
            b = s.recv(100)
            fail(f"recv with nothing sent returned {b!r}")
        except BlockingIOError:
            pass
        took = time.monotonic() - t0
        if not 0.25 <= took < 10:
            fail(f"the receive timeout took {took:.3f} s, set to 0.3 s")
        d = rng.randbytes(rng.randint(1, 2000))
        s.sendall(d)
        got = b""
        while len(got) < len(d):
            got += s.recv(len(d) - len(got))
        if got != d:
            fail("echo differs")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
    s.close()
    print("timeout check: SO_RCVTIMEO 0.3 s ended 3 empty receives with EAGAIN; echoes verified")


def server_cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(port):
    """The pid of the process listening on port (found with ss)."""
    import re, subprocess
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    m = re.search(r"pid=(\d+)", out)
    if not m:
        fail(f"no server found on port {port}: {out!r}")
    return int(m.group(1))


def idle_check(host, port, seed):
    import time
    pid = server_pid(port)
    rng = random.Random(seed)
    s = socket.create_connection((host, port))
    for i in range(500):
        d = rng.randbytes(64)
        s.sendall(d)
        got = b""
        while len(got) < len(d):
            b = s.recv(len(d) - len(got))
            if not b:
                fail(f"echo {i}: connection closed")
            got += b
        if got != d:
            fail(f"echo {i}: bytes differ")
    c0 = server_cpu(pid)
    time.sleep(3)
    used = server_cpu(pid) - c0
    if used >= 1.0:
        fail(f"the server spun while its client was idle: {used:.2f} s of CPU in 3 s")
    s.sendall(b"after idle")
    if s.recv(64) != b"after idle":
        fail("echo after idle differs")
    s.close()
    print(f"idle check: 500 echoes verified; server CPU while idle {used:.2f} s of 3 s")


def service_wakeups(pid):
    """Voluntary context switches of process pid's rsocket service threads."""
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            if open(f"/proc/{pid}/task/{t}/comm").read().strip() != "rsocket-service":
                continue
            for l in open(f"/proc/{pid}/task/{t}/status"):
                if l.startswith("voluntary_ctxt_switches"):
                    n += int(l.split()[1])
        except OSError:
            pass
    return n


def hook_check(host, port, seed):
    import select, selectors
    pid = server_pid(port)
    rng = random.Random(seed)
    s = socket.create_connection((host, port))
    s.setblocking(False)
    sel = selectors.EpollSelector()
    sel.register(s, selectors.EVENT_READ)

    def wait(how):
        if how == "epoll":
            return bool(sel.select(10))
        if how == "poll":
            p = select.poll()
            p.register(s, select.POLLIN)
            return bool(p.poll(10000))
        return bool(select.select([s], [], [], 10)[0])

    def echoes(n, how):
        for i in range(n):
            d = rng.randbytes(rng.randint(1, 3000))
            s.setblocking(True)
            if i % 2:
                # One message in three buffers (a header, a value, a trailer).
                a = rng.randint(0, len(d))
                b = rng.randint(a, len(d))
                if s.sendmsg([d[:a], d[a:b], d[b:]]) != len(d):
                    fail(f"{how}: echo {i}: short sendmsg")
            else:
                s.sendall(d)
            s.setblocking(False)
            got = b""
            while len(got) < len(d):
                if not wait(how):
                    fail(f"{how}: echo {i}: no readiness in 10 s ({len(got)} of {len(d)} bytes)")
                try:
                    b = s.recv(len(d) - len(got))
                except BlockingIOError:
                    continue
                if not b:
                    fail(f"{how}: echo {i}: connection closed")
                got += b
            if got != d:
                fail(f"{how}: echo {i}: bytes differ")

    echoes(20, "epoll")
    w0 = (service_wakeups(pid), service_wakeups(os.getpid()))
    echoes(400, "epoll")
    w1 = (service_wakeups(pid), service_wakeups(os.getpid()))
    woke = (w1[0] - w0[0], w1[1] - w0[1])
    if max(woke) >= 100:
        fail(f"service threads woke {woke[0]} (server) and {woke[1]} (client) times for 400 epoll echoes")
    echoes(100, "poll")
    echoes(100, "select")
    echoes(100, "epoll")
    s.close()
    print(f"hook check: 720 echoes verified (epoll, poll, select, epoll); service wake-ups "
          f"for 400 epoll echoes: server {woke[0]}, client {woke[1]}")


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    if mode == "echo-server":
        asyncio.run(echo_server(host, port))
    elif mode == "select-echo-server":
        select_echo_server(host, port)
    elif mode == "cred-echo-server":
        cred_echo_server(host, port)
    elif mode == "echo-client":
        asyncio.run(echo_client(host, port, seed))
    elif mode == "memcache":
        memcache(host, port, seed)
    elif mode == "memcache-bench":
        memcache_bench(host, port, seed)
    elif mode == "redis":
        redis(host, port, seed)
    elif mode == "timeout-check":
        timeout_check(host, port, seed)
    elif mode == "idle-check":
        idle_check(host, port, seed)
    elif mode == "hook-check":
        hook_check(host, port, seed)
    else:
        fail(f"unknown mode {mode}")


main()
