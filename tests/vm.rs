//! RDMA integration tests. They need Soft-RoCE/Soft-iWARP devices, which only exist inside the
//! project's QEMU VM: run on the host, this binary boots the VM once per device type (rxe, then
//! siw) and runs itself inside; run inside the VM, it runs the tests.
//!
//! Addresses (vm/testnet): server 10.10.0.1 (rxe0/siw0), client 10.10.0.2 (rxe1/siw1); they exist only in the
//! guest.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rsocket::Error;
use rsocket::net::{RdmaListener, RdmaStream};
use rsocket::socket::{self, StreamSocket, options};
use tokio::io::unix::AsyncFd;

#[path = "vm/death.rs"]
mod death;
#[path = "vm/hostile.rs"]
mod hostile;
#[path = "vm/link.rs"]
mod link;
#[path = "vm/soak.rs"]
mod soak;

/// The test network (vm/testnet, shared with the C suites and the benchmark).
const TESTNET: &str = include_str!("../vm/testnet");

fn testnet(key: &str) -> &'static str {
    TESTNET
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.split_whitespace().next().unwrap_or(""))
        .unwrap_or_else(|| panic!("vm/testnet has no {key}"))
}

fn ip4(key: &str) -> [u8; 4] {
    let a: std::net::Ipv4Addr = testnet(key).parse().expect("an IPv4 address");
    a.octets()
}

/// The server's address (its device: rxe0/siw0).
fn server_ip() -> [u8; 4] {
    ip4("RS_SERVER")
}

/// The client's address (rxe1/siw1).
fn client_ip() -> [u8; 4] {
    ip4("RS_CLIENT")
}

static PORT: AtomicU16 = AtomicU16::new(0);

fn next_port() -> u16 {
    if PORT.load(Ordering::SeqCst) == 0 {
        // Distinct ports per run (rxe and siw runs, repeated runs) avoid any lingering state.
        let block: u16 = testnet("RS_PORTS_RUST").parse().expect("a port");
        let base = block + (std::process::id() % 9000) as u16;
        let _ = PORT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    }
    PORT.fetch_add(1, Ordering::SeqCst)
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(131).wrapping_add(seed) ^ (i >> 13) as u8)
        .collect()
}

fn new_socket() -> Arc<StreamSocket> {
    let fd = socket::socket(libc::AF_INET, libc::SOCK_STREAM, 0).expect("rsocket");
    socket::lookup(fd).expect("lookup")
}

fn listener(port: u16) -> Arc<StreamSocket> {
    let l = new_socket();
    l.bind(&addr(server_ip(), port).into()).expect("bind");
    l.listen(4).expect("listen");
    l
}

fn connect(port: u16) -> Arc<StreamSocket> {
    let c = new_socket();
    c.bind(&addr(client_ip(), 0).into()).expect("bind client");
    c.connect(&addr(server_ip(), port).into()).expect("connect");
    c
}

/// `c` bound to the client's address and connected to a fresh port of the server's, and the
/// server's end, accepted by a one-connection listener that is closed again.
fn connected_pair_from(c: Arc<StreamSocket>) -> (Arc<StreamSocket>, Arc<StreamSocket>) {
    let port = next_port();
    let l = listener(port);
    let t = thread::spawn(move || {
        let s = l.accept().expect("accept");
        close(l);
        s
    });
    c.bind(&addr(client_ip(), 0).into()).expect("bind client");
    c.connect(&addr(server_ip(), port).into()).expect("connect");
    (c, t.join().unwrap())
}

/// A new connection: (client end, server end), see [`connected_pair_from`].
fn connected_pair() -> (Arc<StreamSocket>, Arc<StreamSocket>) {
    connected_pair_from(new_socket())
}

fn send_all(s: &StreamSocket, mut b: &[u8]) {
    while !b.is_empty() {
        let n = s.send(b, 0).expect("send");
        assert!(n > 0);
        b = &b[n..];
    }
}

fn recv_exact(s: &StreamSocket, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let r = s.recv(&mut out[got..], 0).expect("recv");
        assert!(r > 0, "early end of stream after {got} of {n} bytes");
        got += r;
    }
    out
}

fn close(s: Arc<StreamSocket>) {
    socket::close(s.fd()).expect("close");
}

/// Blocking calls, both directions, sizes from 1 byte to 16 MiB, verified byte for byte.
fn transfer_sizes_both_directions() {
    let port = next_port();
    let l = listener(port);
    let sizes = [
        1usize,
        7,
        64,
        65,
        2047,
        2048,
        4096,
        65536 + 7,
        300_001,
        1 << 20,
        16 << 20,
    ];
    let server = thread::spawn(move || {
        let c = l.accept().expect("accept");
        for (i, &n) in sizes.iter().enumerate() {
            let got = recv_exact(&c, n);
            assert!(
                got == pattern(n, i as u8),
                "server: {n}-byte message differs"
            );
            send_all(&c, &pattern(n, 100 + i as u8));
        }
        close_plain(&c);
        close(l);
    });
    let c = connect(port);
    for (i, &n) in sizes.iter().enumerate() {
        // Send while the peer may still be sending to us: the two directions overlap.
        send_all(&c, &pattern(n, i as u8));
        let got = recv_exact(&c, n);
        assert!(
            got == pattern(n, 100 + i as u8),
            "client: {n}-byte echo differs"
        );
    }
    server.join().expect("server thread");
    close(c);
}

fn close_plain(s: &StreamSocket) {
    s.close().expect("close accepted");
}

/// Many small messages back to back: credits and target-buffer windows must recycle.
fn many_small_messages() {
    let port = next_port();
    let l = listener(port);
    const N: usize = 20_000;
    let server = thread::spawn(move || {
        let c = l.accept().expect("accept");
        let got = recv_exact(&c, N * 10);
        assert!(got == pattern(N * 10, 9));
        c.close().unwrap();
    });
    let c = connect(port);
    let data = pattern(N * 10, 9);
    let pkts = || {
        std::fs::read_to_string("/sys/class/infiniband/rxe1/ports/1/hw_counters/sent_pkts")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let before = pkts();
    for chunk in data.chunks(10) {
        send_all(&c, chunk);
    }
    // The client goes idle here: gathered sends must still leave (the flusher posts them).
    server.join().expect("server");
    if let (Some(a), Some(b)) = (before, pkts()) {
        // Information only (no assertion on a count that depends on timing).
        println!(
            "    {N} sends of 10 B: {} RoCE packets from the client",
            b - a
        );
    }
    close(c);
}

/// Small sends back to back are staged and posted by the flusher (see `stream/stage.rs`):
/// mixed with larger sends and non-blocking ones, and followed at once by SHUT_WR, every byte
/// must arrive, in order, before the end of stream.
fn staged_sends_keep_order_through_shutdown() {
    let port = next_port();
    let l = listener(port);
    // Sizes from a fixed LCG: mostly small (staged), now and then past the staging limit.
    let mut x = 12345u32;
    let sizes: Vec<usize> = (0..20_000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if (x >> 16).is_multiple_of(50) {
                2048 + (x >> 8) as usize % 6000
            } else {
                1 + (x >> 8) as usize % 200
            }
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let data = pattern(total, 77);
    let expect = data.clone();
    let server = thread::spawn(move || {
        let c = l.accept().expect("accept");
        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0u8; 65536];
        loop {
            let n = c.recv(&mut buf, 0).expect("recv");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), total, "bytes before the end of stream");
        if let Some(i) = got.iter().zip(&expect).position(|(a, b)| a != b) {
            panic!("server: stream differs at byte {i} of {total}");
        }
        send_all(&c, &(got.len() as u64).to_le_bytes());
        c.close().unwrap();
        close(l);
    });
    let c = connect(port);
    let mut off = 0;
    for (i, &n) in sizes.iter().enumerate() {
        let mut b = &data[off..off + n];
        while !b.is_empty() {
            let flags = if i.is_multiple_of(7) {
                libc::MSG_DONTWAIT
            } else {
                0
            };
            match c.send(b, flags) {
                Ok(k) => b = &b[k..],
                Err(Error::WouldBlock) => thread::yield_now(),
                Err(e) => panic!("send: {e:?}"),
            }
        }
        off += n;
    }
    c.shutdown(libc::SHUT_WR).expect("shutdown");
    let n = u64::from_le_bytes(recv_exact(&c, 8).try_into().unwrap());
    assert_eq!(n as usize, total);
    server.join().expect("server");
    close(c);
}

fn refused_connect() {
    let c = new_socket();
    c.bind(&addr(client_ip(), 0).into()).unwrap();
    let e = c
        .connect(&addr(server_ip(), next_port()).into())
        .unwrap_err();
    assert!(matches!(e, Error::ConnectionRefused), "got {e:?}");
    // As on Linux, a blocking connect reports its error once; SO_ERROR is clear afterwards.
    assert_eq!(c.take_error(), 0);
    close(c);
    // Non-blocking: EINPROGRESS (or the error at once), then POLLOUT|POLLERR and SO_ERROR.
    let c = new_socket();
    c.set_options(|o| o.nonblocking = true);
    c.bind(&addr(client_ip(), 0).into()).unwrap();
    match c.connect(&addr(server_ip(), next_port()).into()) {
        Err(Error::InProgress) => {
            let r = poll1(c.fd(), libc::POLLOUT, 20_000);
            assert_ne!(r & libc::POLLOUT, 0, "revents {r:#x}");
            assert_ne!(r & libc::POLLERR, 0, "revents {r:#x}");
            assert_eq!(c.take_error(), libc::ECONNREFUSED);
        }
        Err(Error::ConnectionRefused) => {}
        other => panic!("non-blocking refused connect: {other:?}"),
    }
    close(c);
}

/// poll(2) itself (not rpoll) on a descriptor.
/// A non-blocking socket bound to the client's address whose connect to `port` of the server's
/// is under way (or done).
fn connect_nonblocking(port: u16) -> Arc<StreamSocket> {
    let c = new_socket();
    c.set_options(|o| o.nonblocking = true);
    c.bind(&addr(client_ip(), 0).into()).unwrap();
    match c.connect(&addr(server_ip(), port).into()) {
        Err(Error::InProgress) | Ok(()) => {}
        other => panic!("non-blocking connect: {other:?}"),
    }
    c
}

fn kpoll(fd: i32, events: i16, timeout_ms: i32) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents
}

/// The socket's number is a real descriptor, and poll(2) on it (no rpoll, no call on the socket
/// while it waits) sees what rpoll reports: a pending connection on a listener, a finished
/// non-blocking connect, data, end of stream (POLLRDHUP), the peer's close (POLLHUP), and a
/// refused connect (POLLERR until SO_ERROR is read).
fn descriptor_shows_readiness() {
    const IN: i16 = libc::POLLIN;
    const OUT: i16 = libc::POLLOUT;
    let port = next_port();
    let l = listener(port);
    assert_eq!(kpoll(l.fd(), IN, 0), 0, "a listener with nothing pending");
    let (tx, rx) = std::sync::mpsc::channel();
    let client = thread::spawn(move || {
        let c = connect_nonblocking(port);
        let r = kpoll(c.fd(), OUT, 20_000);
        assert_eq!(r & (OUT | libc::POLLERR), OUT, "connected: revents {r:#x}");
        assert_eq!(c.take_error(), 0);
        let r = kpoll(c.fd(), IN, 20_000);
        assert_eq!(r & IN, IN, "data: revents {r:#x}");
        let mut b = [0u8; 16];
        let n = c.recv(&mut b, 0).expect("recv after POLLIN");
        assert_eq!(&b[..n], b"hello");
        assert_eq!(kpoll(c.fd(), IN, 0), 0, "everything read");
        tx.send(()).unwrap();
        let r = kpoll(c.fd(), IN | libc::POLLRDHUP, 20_000);
        assert_eq!(
            r & (IN | libc::POLLRDHUP),
            IN | libc::POLLRDHUP,
            "end of stream: revents {r:#x}"
        );
        assert_eq!(c.recv(&mut b, 0).unwrap(), 0);
        // Waiting for nothing but a hang-up (poll always reports POLLHUP).
        let r = kpoll(c.fd(), 0, 20_000);
        assert_ne!(r & libc::POLLHUP, 0, "peer closed: revents {r:#x}");
        close(c);
    });
    let r = kpoll(l.fd(), IN, 20_000);
    assert_eq!(r, IN, "a pending connection");
    let s = l.accept().expect("accept");
    assert_eq!(kpoll(l.fd(), IN, 0), 0, "nothing pending after accept");
    // What rpoll on the listener would sleep on is quiet too: a wake-up the service thread
    // passed on for the request the accept took is used up (left set, every rpoll on the
    // listener returned at once and a thread accepting in an rpoll loop spun).
    let ps = l.poll_state(Some(IN)).expect("listener poll state");
    assert_eq!(ps.revents, 0);
    for &fd in &ps.wait_fds[..ps.n_wait] {
        assert_eq!(
            kpoll(fd, IN, 0),
            0,
            "listener wait descriptor {fd} after accept"
        );
    }
    assert_eq!(
        kpoll(s.fd(), OUT, 20_000) & OUT,
        OUT,
        "accepted socket writable"
    );
    send_all(&s, b"hello");
    rx.recv().unwrap();
    s.shutdown(libc::SHUT_WR).unwrap();
    thread::sleep(Duration::from_millis(200));
    s.close().unwrap();
    client.join().expect("client");
    close(l);
    // A refused non-blocking connect: POLLOUT|POLLERR|POLLHUP, cleared by SO_ERROR.
    let c = new_socket();
    c.set_options(|o| o.nonblocking = true);
    c.bind(&addr(client_ip(), 0).into()).unwrap();
    if let Err(Error::InProgress) = c.connect(&addr(server_ip(), next_port()).into()) {
        let r = kpoll(c.fd(), OUT, 20_000);
        assert_eq!(
            r & (libc::POLLERR | libc::POLLHUP),
            libc::POLLERR | libc::POLLHUP,
            "refused: revents {r:#x}"
        );
        // POLLOUT may follow the error by a moment (the kernel wakes pollers before it frees
        // what kept the descriptor from being writable). A poll returns at once with the
        // error shown, so it is asked again until POLLOUT comes (or 20 s pass).
        let until = Instant::now() + Duration::from_secs(20);
        let mut r = kpoll(c.fd(), OUT, 0);
        while r & OUT == 0 && Instant::now() < until {
            thread::sleep(Duration::from_millis(1));
            r = kpoll(c.fd(), OUT, 0);
        }
        assert_ne!(r & OUT, 0, "refused: revents {r:#x}");
        assert_eq!(c.take_error(), libc::ECONNREFUSED);
        assert_eq!(kpoll(c.fd(), OUT, 0) & libc::POLLERR, 0, "SO_ERROR read");
    }
    close(c);
}

/// The environment variable that makes this test binary the delayed sender of
/// [`connect_completed_by_a_call_is_watched`]: `PORT`.
const DELAYED_SENDER_ENV: &str = "RSOCKET_TEST_DELAYED_SENDER";
/// Connections of [`connect_completed_by_a_call_is_watched`].
const DELAYED_ROUNDS: usize = 12;

/// The delayed sender (a child process): accepts [`DELAYED_ROUNDS`] connections on `port`;
/// on each, waits a moment, sends a pattern and waits for the client to close. Prints READY
/// once listening.
fn run_delayed_sender(port: u16) -> ! {
    let l = listener(port);
    println!("READY");
    std::io::Write::flush(&mut std::io::stdout()).unwrap();
    for i in 0..DELAYED_ROUNDS {
        let s = l.accept().expect("accept");
        thread::sleep(Duration::from_millis(30));
        send_all(&s, &pattern(100 + i, i as u8));
        let mut b = [0u8; 1];
        let _ = s.recv(&mut b, 0);
        s.close().expect("close accepted");
    }
    close(l);
    std::process::exit(0)
}

/// A non-blocking connect that the application itself completes (it polls the socket's state
/// at once, as rpoll does, so its call rather than the service thread may take the CM event),
/// then sleeps in poll(2) on the descriptor for data the peer (another process: nothing else
/// wakes this process's service thread) sends a moment later: the descriptor must show it.
/// The service thread used to stay asleep on the CM channel alone when the call took the
/// event, and the sleeper waited for ever (redis-benchmark under the preload). A race, so it
/// runs several times.
fn connect_completed_by_a_call_is_watched() {
    use std::io::BufRead;
    let port = next_port();
    let mut peer = Command::new(std::env::current_exe().expect("test binary"))
        .env(DELAYED_SENDER_ENV, port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("peer process");
    let mut line = String::new();
    std::io::BufReader::new(peer.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .expect("peer's READY");
    assert_eq!(line.trim(), "READY", "peer: {line:?}");
    for i in 0..DELAYED_ROUNDS {
        let c = connect_nonblocking(port);
        let end = Instant::now() + Duration::from_secs(20);
        while c
            .poll_state(Some(libc::POLLOUT))
            .expect("poll state")
            .revents
            & libc::POLLOUT
            == 0
        {
            assert!(Instant::now() < end, "round {i}: connect never completed");
        }
        assert_eq!(c.take_error(), 0);
        let r = kpoll(c.fd(), libc::POLLIN, 10_000);
        if r & libc::POLLIN == 0 {
            let _ = peer.kill();
            panic!("round {i}: the data never showed on the descriptor");
        }
        c.set_options(|o| o.nonblocking = false);
        assert_eq!(
            recv_exact(&c, 100 + i),
            pattern(100 + i, i as u8),
            "round {i}"
        );
        close(c);
    }
    assert!(peer.wait().expect("peer").success(), "peer failed");
}

/// Reads into `buf` once the descriptor says so (tokio's AsyncFd: edge-triggered epoll on the
/// rsocket's descriptor, retried on WouldBlock).
async fn aread(s: &AsyncFd<RdmaStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    loop {
        let mut ready = s.readable().await?;
        if let Ok(r) = ready.try_io(|s| s.get_ref().read(buf)) {
            return r;
        }
    }
}

async fn awrite_all(s: &AsyncFd<RdmaStream>, mut buf: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    while !buf.is_empty() {
        let mut ready = s.writable().await?;
        if let Ok(r) = ready.try_io(|s| s.get_ref().write(buf)) {
            buf = &buf[r?..];
        }
    }
    Ok(())
}

/// An async echo server and client over the safe API (`rsocket::net`) under tokio: 8
/// connections at once on each side, random chunk sizes, every echoed byte checked, then
/// half-close and end of stream. No rsocket call waits: tokio's epoll on the descriptors does.
fn async_echo_over_the_safe_api() {
    const CONNS: usize = 8;
    let port = next_port();
    let l = RdmaListener::bind(addr(server_ip(), port)).expect("bind");
    l.set_nonblocking(true).unwrap();
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .unwrap()
    };
    let server = thread::spawn(move || {
        rt().block_on(async move {
            // SAFETY: the listener owns the descriptor it lends until it is dropped.
            let l = unsafe { AsyncFd::register(l) }.unwrap();
            let mut tasks = Vec::new();
            while tasks.len() < CONNS {
                let mut ready = l.readable().await.unwrap();
                let Ok(r) = ready.try_io(|l| l.get_ref().accept()) else {
                    continue;
                };
                let (s, _) = r.expect("accept");
                s.set_nonblocking(true).unwrap();
                tasks.push(tokio::spawn(async move {
                    // SAFETY: as for the listener.
                    let s = unsafe { AsyncFd::register(s) }.unwrap();
                    let mut buf = vec![0u8; 70_000];
                    let mut total = 0;
                    loop {
                        let n = aread(&s, &mut buf).await.expect("server read");
                        if n == 0 {
                            break total;
                        }
                        total += n;
                        awrite_all(&s, &buf[..n]).await.expect("echo");
                    }
                }));
            }
            let mut echoed = 0;
            for t in tasks {
                echoed += t.await.unwrap();
            }
            echoed
        })
    });
    let sent: usize = rt().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..CONNS {
            tasks.push(tokio::spawn(async move {
                let c =
                    RdmaStream::connect_from(Some(addr(client_ip(), 0)), addr(server_ip(), port))
                        .expect("connect");
                c.set_nonblocking(true).unwrap();
                // SAFETY: as for the listener.
                let c = unsafe { AsyncFd::register(c) }.unwrap();
                let len = 50_000 + i * 37_777;
                let data = pattern(len, i as u8);
                let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut sent = 0;
                let mut got = Vec::with_capacity(len);
                let mut buf = vec![0u8; 65_536];
                while sent < len {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = (1 + (x % 20_000) as usize).min(len - sent);
                    awrite_all(&c, &data[sent..sent + n]).await.expect("send");
                    sent += n;
                    // Read back what is echoed so far (at least one byte).
                    while got.len() < sent {
                        let k = aread(&c, &mut buf).await.expect("read echo");
                        assert!(k > 0, "early end of stream");
                        got.extend_from_slice(&buf[..k]);
                    }
                }
                c.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
                let k = aread(&c, &mut buf).await.expect("read end");
                assert_eq!(k, 0, "end of stream after the echo");
                assert!(got == data, "connection {i}: echo differs");
                len
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await.unwrap();
        }
        sent
    });
    assert_eq!(server.join().expect("server"), sent);
    println!("    {CONNS} async connections, {sent} bytes echoed and checked");
}

/// SHUT_WR: the peer reads the data, then end of stream, and can still answer.
fn half_close() {
    let port = next_port();
    let l = listener(port);
    let server = thread::spawn(move || {
        let c = l.accept().expect("accept");
        let got = recv_exact(&c, 5000);
        assert!(got == pattern(5000, 3));
        let mut b = [0u8; 16];
        assert_eq!(
            c.recv(&mut b, 0).expect("recv after shutdown"),
            0,
            "end of stream"
        );
        send_all(&c, b"still talking");
        c.close().unwrap();
    });
    let c = connect(port);
    send_all(&c, &pattern(5000, 3));
    c.shutdown(libc::SHUT_WR).expect("shutdown");
    assert!(matches!(
        c.send(b"x", libc::MSG_NOSIGNAL),
        Err(Error::BrokenPipe)
    ));
    let got = recv_exact(&c, 13);
    assert_eq!(&got, b"still talking");
    let mut b = [0u8; 4];
    assert_eq!(c.recv(&mut b, 0).unwrap(), 0);
    server.join().expect("server");
    close(c);
}

/// MSG_DONTWAIT and O_NONBLOCK give EAGAIN instead of waiting; MSG_PEEK does not consume.
fn nonblocking_and_peek() {
    let port = next_port();
    let l = listener(port);
    let server = thread::spawn(move || {
        let c = l.accept().expect("accept");
        let mut b = [0u8; 8];
        assert!(matches!(
            c.recv(&mut b, libc::MSG_DONTWAIT),
            Err(Error::WouldBlock)
        ));
        c.set_options(|o| o.nonblocking = true);
        assert!(matches!(c.recv(&mut b, 0), Err(Error::WouldBlock)));
        c.set_options(|o| o.nonblocking = false);
        let n = c.recv(&mut b, libc::MSG_PEEK | libc::MSG_WAITALL).unwrap();
        assert!(n > 0 && b[..n] == b"peekaboo"[..n]);
        let all = recv_exact(&c, 8);
        assert_eq!(&all, b"peekaboo");
        c.close().unwrap();
    });
    let c = connect(port);
    thread::sleep(Duration::from_millis(300));
    send_all(&c, b"peekaboo");
    server.join().expect("server");
    close(c);
}

/// Addresses reported by getsockname/getpeername are the ones in use.
fn addresses() {
    let port = next_port();
    let l = listener(port);
    let server = thread::spawn(move || {
        let c = l.accept().expect("accept");
        let peer = c.peer_addr().unwrap().to_std().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::from(client_ip()));
        assert_eq!(
            c.local_addr().unwrap().to_std().unwrap(),
            addr(server_ip(), port)
        );
        let _ = recv_exact(&c, 1);
        c.close().unwrap();
    });
    let c = connect(port);
    assert_eq!(
        c.peer_addr().unwrap().to_std().unwrap(),
        addr(server_ip(), port)
    );
    assert_eq!(
        c.local_addr().unwrap().to_std().unwrap().ip(),
        std::net::IpAddr::from(client_ip())
    );
    send_all(&c, b"!");
    server.join().expect("server");
    close(c);
}

/// One thread sends while another receives on the same socket.
fn concurrent_send_and_recv() {
    let port = next_port();
    let l = listener(port);
    const N: usize = 3 << 20;
    let server = thread::spawn(move || {
        let c = l.accept().expect("accept");
        let c2 = c.clone();
        let tx = thread::spawn(move || send_all(&c2, &pattern(N, 77)));
        let got = recv_exact(&c, N);
        assert!(got == pattern(N, 55));
        tx.join().unwrap();
        let mut b = [0u8; 1];
        assert_eq!(c.recv(&mut b, 0).unwrap(), 0);
        c.close().unwrap();
    });
    let c = connect(port);
    let c2 = c.clone();
    let tx = thread::spawn(move || send_all(&c2, &pattern(N, 55)));
    let got = recv_exact(&c, N);
    assert!(got == pattern(N, 77));
    tx.join().unwrap();
    c.shutdown(libc::SHUT_RDWR).unwrap();
    server.join().expect("server");
    close(c);
}

/// A send that waits for room while another thread of the same socket sleeps in a receive:
/// room comes with our sends' completions, which a receive does not sleep for (their CQ is
/// armed only for who needs them). The send must still be woken: it waited forever (rsstress
/// thread mode on siw, a 4 KiB send buffer), its writes' completions in a CQ nobody armed.
fn a_send_waiting_for_room_beside_a_sleeping_receive() {
    const N: usize = 2 << 20;
    let c = new_socket();
    c.set_options(|o| {
        o.sbuf_size = 4096;
        o.sbuf_start = 4096;
    });
    let (c, s) = connected_pair_from(c);
    // The receive sleeps until the server has read everything and answers with one byte.
    let c2 = c.clone();
    let rx = thread::spawn(move || {
        let mut b = [0u8; 1];
        let n = c2.recv(&mut b, 0).expect("recv");
        (n, b[0])
    });
    thread::sleep(Duration::from_millis(200));
    let (done, finished) = std::sync::mpsc::channel();
    let c3 = c.clone();
    let tx = thread::spawn(move || {
        send_all(&c3, &pattern(N, 9));
        done.send(()).unwrap();
    });
    let srv = thread::spawn(move || {
        let got = recv_exact(&s, N);
        assert!(got == pattern(N, 9), "the server got other bytes");
        send_all(&s, &[42]);
        s
    });
    if finished.recv_timeout(Duration::from_secs(60)).is_err() {
        panic!(
            "the send waited 60 s for room while a receive slept; socket: {}",
            c.describe()
        );
    }
    tx.join().unwrap();
    let s = srv.join().unwrap();
    assert_eq!(rx.join().unwrap(), (1, 42));
    socket::close(socket::insert(s)).expect("close");
    close(c);
}

fn poll1(fd: i32, events: i16, timeout_ms: i32) -> i16 {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    let n = socket::poll::poll(&mut p, timeout_ms).expect("rpoll");
    assert_eq!(n, (p[0].revents != 0) as usize);
    p[0].revents
}

/// Ping-pong between two threads on non-blocking sockets that wait in rpoll(POLLIN, no timeout)
/// on EAGAIN while the socket is writable: rpoll must arm for POLLIN although POLLOUT is ready
/// (it did not, and slept forever; found by bench/rsbench -m poll).
fn rpoll_pingpong_waits_for_pollin() {
    let port = next_port();
    let l = listener(port);
    /// rpoll without a timeout, as the test means it; a wait that lasts far beyond any
    /// round trip is a lost wake-up, reported with the socket's state rather than hung.
    fn wait_for(s: &StreamSocket, events: i16, v: u8) {
        if poll1(s.fd(), events, 60_000) == 0 {
            // Whether what it waits for was there without a wake-up (the completion queue
            // holds it: a lost completion event) or never came at all.
            let before = s.describe();
            let again = poll1(s.fd(), events, 0);
            panic!(
                "round {v}: rpoll({events:#x}) slept 60 s; socket: {before}; a look at the \
                 completion queue then: revents {again:#x}, socket: {}",
                s.describe()
            );
        }
    }
    fn send64(s: &StreamSocket, v: u8) {
        let b = [v; 64];
        let mut sent = 0;
        while sent < 64 {
            match s.send(&b[sent..], 0) {
                Ok(n) => sent += n,
                Err(Error::WouldBlock) => wait_for(s, libc::POLLOUT, v),
                Err(e) => panic!("send: {e}"),
            }
        }
    }
    fn recv64(s: &StreamSocket, v: u8) {
        let mut b = [0u8; 64];
        let mut got = 0;
        while got < 64 {
            match s.recv(&mut b[got..], 0) {
                Ok(0) => panic!("early end of stream"),
                Ok(n) => got += n,
                Err(Error::WouldBlock) => wait_for(s, libc::POLLIN, v),
                Err(e) => panic!("recv: {e}"),
            }
        }
        assert!(b.iter().all(|&x| x == v), "round {v}: wrong bytes");
    }
    let server = thread::spawn(move || {
        // Through the descriptor table, as raccept does: rpoll finds rsockets there.
        let s = socket::lookup(socket::insert(l.accept().expect("accept"))).unwrap();
        s.set_options(|o| o.nonblocking = true);
        for i in 0..300 {
            recv64(&s, i as u8);
            send64(&s, i as u8);
        }
        close(s);
        close(l);
    });
    let c = connect(port);
    c.set_options(|o| o.nonblocking = true);
    for i in 0..300 {
        send64(&c, i as u8);
        recv64(&c, i as u8);
    }
    server.join().expect("server");
    close(c);
}

/// Non-blocking connect (EINPROGRESS, POLLOUT, SO_ERROR 0), then one thread drives both ends
/// of the connection with rpoll only: random sizes from 1 byte to 16 MiB in both directions at
/// once, non-blocking sends and receives, verified byte for byte.
fn rpoll_driven_nonblocking_transfers() {
    let port = next_port();
    let l = listener(port);
    l.set_options(|o| o.nonblocking = true);
    assert!(matches!(l.accept(), Err(Error::WouldBlock)));
    let c = new_socket();
    c.set_options(|o| o.nonblocking = true);
    c.bind(&addr(client_ip(), 0).into()).unwrap();
    match c.connect(&addr(server_ip(), port).into()) {
        Err(Error::InProgress) | Ok(()) => {}
        Err(e) => panic!("non-blocking connect: {e:?}"),
    }
    // The listener becomes readable, then accept works without blocking.
    assert_ne!(poll1(l.fd(), libc::POLLIN, 20_000) & libc::POLLIN, 0);
    // Through the descriptor table, as raccept does: rpoll finds rsockets there.
    let s = socket::lookup(socket::insert(l.accept().expect("accept after POLLIN"))).unwrap();
    s.set_options(|o| o.nonblocking = true);
    assert_ne!(poll1(c.fd(), libc::POLLOUT, 20_000) & libc::POLLOUT, 0);
    assert_eq!(c.take_error(), 0);

    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ port as u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut sizes = vec![1usize, 16 << 20];
    for _ in 0..10 {
        let r = rnd();
        // Log-uniform between 1 B and 4 MiB.
        sizes.push(1 + (r % (1 << (r >> 59).min(22))) as usize);
    }
    let total: usize = sizes.iter().sum();
    let a_data = pattern(total, 11);
    let b_data = pattern(total, 22);
    let ends = [c.clone(), s.clone()];
    let outs = [&a_data, &b_data];
    let mut sent = [0usize; 2];
    let mut got = [Vec::with_capacity(total), Vec::with_capacity(total)];
    let mut buf = vec![0u8; 1 << 20];
    while got[0].len() < total || got[1].len() < total {
        let mut pfds: Vec<libc::pollfd> = ends
            .iter()
            .enumerate()
            .map(|(i, e)| libc::pollfd {
                fd: e.fd(),
                events: libc::POLLIN | if sent[i] < total { libc::POLLOUT } else { 0 },
                revents: 0,
            })
            .collect();
        let n = socket::poll::poll(&mut pfds, 20_000).expect("rpoll");
        if n == 0 {
            eprintln!("client: {}\nserver: {}", c.describe(), s.describe());
        }
        assert!(
            n > 0,
            "rpoll timed out: sent {sent:?}, got {} {}",
            got[0].len(),
            got[1].len()
        );
        for i in 0..2 {
            let r = pfds[i].revents;
            assert_eq!(
                r & (libc::POLLERR | libc::POLLHUP),
                0,
                "end {i} failed: {r:#x}"
            );
            if r & libc::POLLOUT != 0 && sent[i] < total {
                // Send message by message so every size boundary is exercised.
                let mut off = 0;
                let end = sizes
                    .iter()
                    .map(|&z| {
                        off += z;
                        off
                    })
                    .find(|&e| e > sent[i])
                    .unwrap_or(total);
                match ends[i].send(&outs[i][sent[i]..end], 0) {
                    Ok(k) => sent[i] += k,
                    Err(Error::WouldBlock) => {}
                    Err(e) => panic!("send: {e:?}"),
                }
            }
            if r & libc::POLLIN != 0 {
                match ends[i].recv(&mut buf, 0) {
                    Ok(0) => panic!("unexpected end of stream"),
                    Ok(k) => got[i].extend_from_slice(&buf[..k]),
                    Err(Error::WouldBlock) => {}
                    Err(e) => panic!("recv: {e:?}"),
                }
            }
        }
    }
    assert!(got[0] == b_data, "client received a different stream");
    assert!(got[1] == a_data, "server received a different stream");
    // Nothing more to read: rpoll with a timeout returns 0 and leaves revents clear.
    assert_eq!(poll1(c.fd(), libc::POLLIN, 50), 0);
    c.shutdown(libc::SHUT_WR).unwrap();
    assert_ne!(poll1(s.fd(), libc::POLLIN, 20_000) & libc::POLLIN, 0);
    let mut b = [0u8; 1];
    assert_eq!(s.recv(&mut b, 0).unwrap(), 0, "POLLIN with end of stream");
    close(s);
    close(c);
    close(l);
}

/// Sends all of `b` as a busy-polling program does: MSG_DONTWAIT, retried at once.
fn spin_send(s: &StreamSocket, mut b: &[u8]) {
    while !b.is_empty() {
        match s.send(b, libc::MSG_DONTWAIT) {
            Ok(n) => b = &b[n..],
            Err(Error::WouldBlock) => {}
            Err(e) => panic!("send: {e:?}"),
        }
    }
}

/// Receives exactly `n` bytes as a busy-polling program does (MSG_DONTWAIT, retried at once);
/// None on end of stream before any byte.
fn spin_recv(s: &StreamSocket, n: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while got < n || n == 0 {
        match s.recv(&mut out[got..], libc::MSG_DONTWAIT) {
            Ok(0) if got == 0 => return None,
            Ok(0) => panic!("end of stream after {got} of {n} bytes"),
            Ok(k) => got += k,
            Err(Error::WouldBlock) => assert!(Instant::now() < end, "no data for 60 s"),
            Err(e) => panic!("recv: {e:?}"),
        }
    }
    Some(out)
}

/// Busy-polling ends (MSG_DONTWAIT retried at once, rstream's default loop, and rpoll without a
/// wait, rstream -T a) become self-driven, and their calls take the short paths (`short`): a
/// ping-pong of random sizes and then an uneven one-way stream arrive whole and in order, end of
/// stream is seen (not EAGAIN for ever), and the other direction still works after it.
fn busy_polling_ends_get_every_byte() {
    let (c, s) = connected_pair();
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ next_port() as u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Ping-pong: sizes 1 B to 3 KiB, then a one-way stream in pieces of 1 B to 128 KiB.
    let pp: Vec<usize> = (0..400).map(|_| 1 + (rnd() % 3072) as usize).collect();
    let mut pieces = Vec::new();
    let mut total = 0;
    while total < 6 << 20 {
        let r = rnd();
        let z = 1 + (r % (1 << (r >> 59).clamp(1, 17))) as usize;
        pieces.push(z);
        total += z;
    }
    let pp_total: usize = pp.iter().sum();
    let a = pattern(pp_total + total, 31);
    let b = pattern(pp_total, 32);
    let server = {
        let (s, a, pp) = (s.clone(), a.clone(), pp.clone());
        let b = b.clone();
        std::thread::spawn(move || {
            let mut off = 0;
            for &z in &pp {
                let got = spin_recv(&s, z).expect("early end of stream");
                assert!(got == a[off..off + z], "ping of {z} bytes at {off} differs");
                spin_send(&s, &b[off..off + z]);
                off += z;
            }
            let driven = s.is_self_driven() && s.short_calls()[..3].iter().all(|&n| n > 0);
            let mut n = 0;
            let mut buf = vec![0u8; 128 << 10];
            loop {
                let k = match s.recv(&mut buf[..1 + n % (128 << 10)], libc::MSG_DONTWAIT) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(Error::WouldBlock) => continue,
                    Err(e) => panic!("recv: {e:?}"),
                };
                assert!(
                    buf[..k] == a[pp_total + n..pp_total + n + k],
                    "stream bytes at {n} differ"
                );
                n += k;
            }
            assert_eq!(
                n,
                a.len() - pp_total,
                "end of stream before the whole stream"
            );
            spin_send(&s, b"after");
            (s, driven)
        })
    };
    let mut off = 0;
    for (i, &z) in pp.iter().enumerate() {
        spin_send(&c, &a[off..off + z]);
        if i % 2 == 1 {
            // rstream -T a: rpoll without a wait until the data is there.
            let mut p = [libc::pollfd {
                fd: c.fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            while socket::poll::poll(&mut p, 0).expect("rpoll") == 0 {}
            assert_ne!(p[0].revents & libc::POLLIN, 0, "rpoll woke without data");
        }
        let got = spin_recv(&c, z).expect("early end of stream");
        assert!(got == b[off..off + z], "pong of {z} bytes at {off} differs");
        off += z;
    }
    let driven = c.is_self_driven() && c.short_calls().iter().all(|&n| n > 0);
    for &z in &pieces {
        spin_send(&c, &a[off..off + z]);
        off += z;
    }
    c.shutdown(libc::SHUT_WR).unwrap();
    assert_eq!(spin_recv(&c, 5).as_deref(), Some(&b"after"[..]));
    let (s, server_driven) = server.join().expect("server end");
    assert!(
        driven && server_driven,
        "busy-polling ends not self-driven or a short path never taken (client {driven}, server \
         {server_driven})"
    );
    close_plain(&s);
    close(c);
}

/// Busy-polling ends turn self-driven, and one that then sleeps in poll(2) on its descriptor
/// is watched again and woken for what the peer sends: twice, each after a busy-polling burst
/// (MSG_DONTWAIT retried at once, then rpoll without a wait, rstream -T a); then one that keeps
/// looking with rpoll for POLLIN and POLLOUT sees the data come.
/// (A look found a program idle right after the machine stalled, under emulation, and watched
/// it again: now a second look must agree.)
fn a_busy_polling_end_that_then_sleeps_on_its_descriptor_is_woken() {
    let (c, s) = connected_pair();
    // The server echoes 64-byte messages; one that starts with 0xFF asks it to answer five
    // bytes after 300 ms instead.
    let server = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut driven = 0;
            while let Some(m) = spin_recv(&s, 64) {
                if m[0] == 0xFF {
                    driven += s.is_self_driven() as u32;
                    std::thread::sleep(Duration::from_millis(300));
                    spin_send(&s, &[m[1]; 5]);
                } else {
                    spin_send(&s, &m);
                }
            }
            driven
        })
    };
    for round in 0..3u8 {
        for i in 0..2000u32 {
            if i >= 100 && c.is_self_driven() {
                break;
            }
            let m = [(i as u8 & 0x7F) ^ round; 64];
            spin_send(&c, &m);
            if round >= 1 {
                // rstream -T a: rpoll without a wait until the reply is there.
                let mut p = [libc::pollfd {
                    fd: c.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                while socket::poll::poll(&mut p, 0).expect("rpoll") == 0 {}
            }
            assert_eq!(
                spin_recv(&c, 64).as_deref(),
                Some(&m[..]),
                "round {round}: pong {i}"
            );
        }
        assert!(
            c.is_self_driven(),
            "round {round}: the busy-polling end not self-driven after 2000 round trips"
        );
        let mut ask = [0u8; 64];
        ask[0] = 0xFF;
        ask[1] = round;
        spin_send(&c, &ask);
        if round < 2 {
            let r = kpoll(c.fd(), libc::POLLIN, 60_000);
            assert_ne!(
                r & libc::POLLIN,
                0,
                "round {round}: poll(2) woke without POLLIN ({r:#x})"
            );
            assert!(
                !c.is_self_driven(),
                "round {round}: the sleeper is watched again"
            );
        } else {
            // rpoll without a wait for both POLLIN and POLLOUT: room to send is there at each
            // look, and the data must still come (a look that stopped at POLLOUT never took
            // it).
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let mut p = [libc::pollfd {
                    fd: c.fd(),
                    events: libc::POLLIN | libc::POLLOUT,
                    revents: 0,
                }];
                socket::poll::poll(&mut p, 0).expect("rpoll");
                if p[0].revents & libc::POLLIN != 0 {
                    break;
                }
                assert_ne!(p[0].revents & libc::POLLOUT, 0, "no room to send");
                assert!(Instant::now() < end, "no POLLIN for 60 s");
            }
        }
        assert_eq!(spin_recv(&c, 5).as_deref(), Some(&[round; 5][..]));
    }
    c.shutdown(libc::SHUT_WR).unwrap();
    let driven = server.join().expect("server end");
    assert_eq!(
        driven, 3,
        "the busy-polling server end self-driven in every round"
    );
    close(c);
    close_plain(&s);
}

/// rpoll mixes rsockets and kernel descriptors.
fn rpoll_with_regular_fds() {
    let port = next_port();
    let l = listener(port);
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let mut p = [
        libc::pollfd {
            fd: l.fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: fds[0],
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    assert_eq!(socket::poll::poll(&mut p, 30).unwrap(), 0);
    // SAFETY: writes one byte from a static buffer to our pipe.
    assert_eq!(
        unsafe { libc::write(fds[1], b"x".as_ptr() as *const _, 1) },
        1
    );
    assert_eq!(socket::poll::poll(&mut p, 10_000).unwrap(), 1);
    assert_eq!(p[0].revents, 0);
    assert_eq!(p[1].revents, libc::POLLIN);
    let t = thread::spawn(move || connect(port));
    p[1].fd = -1;
    assert_eq!(socket::poll::poll(&mut p, 20_000).unwrap(), 1);
    assert_eq!(p[0].revents, libc::POLLIN);
    let s = l.accept().unwrap();
    let c = t.join().unwrap();
    s.close().unwrap();
    close(c);
    close(l);
    // SAFETY: closing our own pipe descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

fn get_int(s: &StreamSocket, level: i32, name: i32) -> i32 {
    let mut b = [0u8; 4];
    assert_eq!(options::get(s, level, name, &mut b).expect("getsockopt"), 4);
    i32::from_ne_bytes(b)
}

fn set_int(s: &Arc<StreamSocket>, level: i32, name: i32, v: i32) -> Result<(), Error> {
    options::set(s, level, name, &v.to_ne_bytes())
}

/// Socket options: what is set is read back, sizes take effect on the connection, SOL_RDMA
/// after connecting is EINVAL, unknown options are ENOPROTOOPT.
fn socket_options() {
    let port = next_port();
    let l = listener(port);
    let c = new_socket();
    for (level, name, v) in [
        (libc::SOL_SOCKET, libc::SO_REUSEADDR, 1),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::SOL_SOCKET, libc::SO_OOBINLINE, 1),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        (libc::IPPROTO_IP, libc::IP_TOS, 0x10),
        (options::SOL_RDMA, options::RDMA_SQSIZE, 64),
        (options::SOL_RDMA, options::RDMA_RQSIZE, 32),
        (options::SOL_RDMA, options::RDMA_INLINE, 32),
        (options::SOL_RDMA, options::RDMA_IOMAPSIZE, 8),
    ] {
        set_int(&c, level, name, v).unwrap_or_else(|e| panic!("set {level}/{name}: {e:?}"));
        assert_eq!(get_int(&c, level, name), v, "option {level}/{name}");
    }
    set_int(&c, libc::SOL_SOCKET, libc::SO_RCVBUF, 32768).unwrap();
    assert_eq!(
        get_int(&c, libc::SOL_SOCKET, libc::SO_RCVBUF),
        65536,
        "doubled like the kernel"
    );
    set_int(&c, libc::SOL_SOCKET, libc::SO_SNDBUF, 8192).unwrap();
    assert_eq!(get_int(&c, libc::SOL_SOCKET, libc::SO_SNDBUF), 16384);
    let linger = [1i32.to_ne_bytes(), 7i32.to_ne_bytes()].concat();
    options::set(&c, libc::SOL_SOCKET, libc::SO_LINGER, &linger).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(
        options::get(&c, libc::SOL_SOCKET, libc::SO_LINGER, &mut b).unwrap(),
        8
    );
    assert_eq!(&b[..], &linger[..]);
    assert!(matches!(
        set_int(&c, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 0),
        Err(Error::InvalidArgument)
    ));
    assert_eq!(
        get_int(&c, libc::SOL_SOCKET, libc::SO_TYPE),
        libc::SOCK_STREAM
    );
    assert_eq!(
        get_int(&c, libc::SOL_SOCKET, libc::SO_DOMAIN),
        libc::AF_INET
    );
    assert_eq!(get_int(&l, libc::SOL_SOCKET, libc::SO_ACCEPTCONN), 1);
    let e = set_int(&c, libc::SOL_SOCKET, libc::SO_BROADCAST, 1).unwrap_err();
    assert_eq!(e.errno(), libc::ENOPROTOOPT);
    let e = options::get(&c, libc::IPPROTO_TCP, libc::TCP_INFO, &mut [0u8; 256]).unwrap_err();
    assert_eq!(e.errno(), libc::ENOPROTOOPT);

    let server = thread::spawn(move || {
        let s = l.accept().expect("accept");
        let got = recv_exact(&s, 200_000);
        assert!(got == pattern(200_000, 8));
        s.close().unwrap();
        close(l);
    });
    c.bind(&addr(client_ip(), 0).into()).unwrap();
    c.connect(&addr(server_ip(), port).into()).unwrap();
    // Small queues and buffers still move data correctly.
    send_all(&c, &pattern(200_000, 8));
    assert!(matches!(
        set_int(&c, options::SOL_RDMA, options::RDMA_SQSIZE, 128),
        Err(Error::InvalidArgument)
    ));
    assert!(get_int(&c, libc::IPPROTO_TCP, libc::TCP_MAXSEG) >= 256);
    server.join().unwrap();
    close(c);
}

/// `rdma resource show` totals (qp, cq, mr, pd, cm_id) of every device.
fn rdma_resources() -> String {
    let out = Command::new("rdma")
        .args(["resource", "show"])
        .output()
        .expect("rdma tool");
    // One summary line per device: ours, and the peer's (client and server use one each).
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .collect::<Vec<_>>()
        .join("; ")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Connect, transfer, close, many times: no QP, CQ, MR, PD, CM id or descriptor is left over.
fn close_releases_everything() {
    // Warm up once so lazily created process-wide state is not counted.
    let warm = |port| {
        let l = listener(port);
        let t = thread::spawn(move || {
            let s = l.accept().unwrap();
            let _ = recv_exact(&s, 1000);
            s.close().unwrap();
            close(l);
        });
        let c = connect(port);
        send_all(&c, &pattern(1000, 1));
        t.join().unwrap();
        close(c);
    };
    warm(next_port());
    thread::sleep(Duration::from_millis(200));
    let (res0, fds0) = (rdma_resources(), open_fds());
    for _ in 0..10 {
        warm(next_port());
    }
    // A listener closed with a connection never accepted, and a socket never connected.
    let l = listener(next_port());
    close(l);
    close(new_socket());
    thread::sleep(Duration::from_millis(200));
    assert_eq!(open_fds(), fds0, "descriptors leaked");
    assert_eq!(rdma_resources(), res0, "RDMA resources leaked");
}

/// A closed iWARP socket keeps its connection while the peer may still send (a reset would
/// drop the tail of our data, see `socket::stream::close`): until the peer is done, at most
/// `proto::stream::LINGER`, without blocking `close`. On Soft-RoCE nothing lingers.
fn close_lingers_until_the_peer_is_done() {
    let iwarp = !rdma_devices().iter().any(|d| d.starts_with("rxe"));
    for peer_closes in [true, false] {
        let (c, s) = connected_pair();
        let s = socket::lookup(socket::insert(s)).unwrap();
        let data = pattern(50_000, 7);
        send_all(&s, &data);
        socket::close(s.fd()).expect("close");
        assert_eq!(
            s.is_lingering(),
            iwarp,
            "lingers on iWARP only, and only while the peer may send"
        );
        assert_eq!(recv_exact(&c, data.len()), data);
        let mut b = [0u8; 1];
        assert_eq!(c.recv(&mut b, 0).expect("end of stream"), 0);
        if peer_closes {
            close(c);
            // The peer's disconnect ends the linger, well before the bound.
            let mut waited = Duration::ZERO;
            while s.is_lingering() && waited < rsocket::proto::stream::LINGER / 2 {
                thread::sleep(Duration::from_millis(20));
                waited += Duration::from_millis(20);
            }
            assert!(!s.is_lingering(), "still lingering after the peer closed");
        } else {
            thread::sleep(rsocket::proto::stream::LINGER + Duration::from_secs(1));
            assert!(!s.is_lingering(), "lingered past the bound");
            close(c);
        }
    }
}

fn socket6() -> Arc<StreamSocket> {
    let fd = socket::socket(libc::AF_INET6, libc::SOCK_STREAM, 0).expect("rsocket AF_INET6");
    socket::lookup(fd).unwrap()
}

/// One message each way between `c` (connecting to `dst`) and the listener `l`; returns the
/// peer address the accepted socket reports.
fn exchange(l: Arc<StreamSocket>, c: &StreamSocket, dst: SocketAddr) -> SocketAddr {
    let t = thread::spawn(move || {
        let s = l.accept().expect("accept");
        let got = recv_exact(&s, 3000);
        send_all(&s, &got);
        let peer = s.peer_addr().unwrap().to_std().unwrap();
        s.close().unwrap();
        close(l);
        peer
    });
    c.connect(&dst.into()).expect("connect");
    send_all(c, &pattern(3000, 4));
    assert!(recv_exact(c, 3000) == pattern(3000, 4));
    t.join().unwrap()
}

/// IPv4-mapped IPv6 (which librdmacm lacks) in both directions, and family checks.
fn ipv6_and_v4_mapped() {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let mapped = |ip: [u8; 4]| Ipv4Addr::from(ip).to_ipv6_mapped();
    // An AF_INET6 listener on :: takes an IPv4 client and reports it as ::ffff:10.10.0.2.
    let port = next_port();
    let l = socket6();
    l.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())
        .unwrap();
    l.listen(4).unwrap();
    let c = new_socket();
    c.bind(&addr(client_ip(), 0).into()).unwrap();
    let peer = exchange(l, &c, addr(server_ip(), port));
    assert_eq!(peer.ip(), std::net::IpAddr::V6(mapped(client_ip())));
    close(c);
    // An AF_INET6 client reaches an IPv4 listener through ::ffff:10.10.0.1.
    let port = next_port();
    let l = listener(port);
    let c = socket6();
    c.bind(&SocketAddr::from((mapped(client_ip()), 0)).into())
        .unwrap();
    exchange(l, &c, SocketAddr::from((mapped(server_ip()), port)));
    assert_eq!(
        c.peer_addr().unwrap().to_std().unwrap(),
        SocketAddr::from((mapped(server_ip()), port))
    );
    // IPv4 addresses on an AF_INET6 socket and IPv6 on AF_INET are refused like the kernel does.
    let e = socket6().bind(&addr(client_ip(), 0).into()).unwrap_err();
    assert_eq!(e.errno(), libc::EAFNOSUPPORT);
    close(c);
}

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// One service thread does the background work of every socket: keepalive on some
/// connections, staged small sends on others, and (iWARP) closes that linger, all at once, with
/// one `rsocket-service` thread in the process and no other thread of ours. A panic injected
/// into one socket's job (test builds) fails that socket with EIO, waking its blocked reader,
/// while the other sockets and their jobs go on.
fn one_service_thread_serves_many_sockets() {
    let iwarp = !rdma_devices().iter().any(|d| d.starts_with("rxe"));
    let ours = || {
        let names = thread_names();
        let service = names.iter().filter(|n| *n == "rsocket-service").count();
        let others = names
            .iter()
            .filter(|n| n.starts_with("rsocket-") && *n != "rsocket-service")
            .count();
        (service, others)
    };
    // Keepalive on the clients of pairs 0-2, probing every second: set on a connection (0, 1)
    // or before connecting (2: the timer starts with the connection).
    let keepalive = |c: &Arc<StreamSocket>| {
        set_int(c, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1).unwrap();
        set_int(c, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1).unwrap();
        c.set_keepalive(true);
    };
    let mut pairs = Vec::new();
    for i in 0..6 {
        let c = new_socket();
        if i == 2 {
            keepalive(&c);
        }
        pairs.push(connected_pair_from(c));
    }
    for (c, _) in &pairs[..2] {
        keepalive(c);
    }
    for (c, _) in &pairs[..3] {
        assert!(c.service_jobs().keepalive);
    }
    let reader = |c: &Arc<StreamSocket>| {
        let c = c.clone();
        thread::spawn(move || {
            let mut b = [0u8; 16];
            c.recv(&mut b, 0)
        })
    };
    let (r0, r1) = (reader(&pairs[0].0), reader(&pairs[1].0));
    // Small sends streamed on pairs 3 and 4 (staged and flushed by the service thread), and
    // the server of pair 5 closing right after its data (it lingers on iWARP).
    let msgs: Vec<Vec<u8>> = (0..4000).map(|i| pattern(1 + i % 61, i as u8)).collect();
    let total: usize = msgs.iter().map(Vec::len).sum();
    let want: Vec<u8> = msgs.concat();
    let mut senders = Vec::new();
    for (_, s) in &pairs[3..5] {
        let (s, msgs) = (s.clone(), msgs.clone());
        senders.push(thread::spawn(move || {
            for m in &msgs {
                send_all(&s, m);
            }
        }));
    }
    let tail = pattern(300_000, 9);
    let tail_reader = {
        let (c, n) = (pairs[5].0.clone(), tail.len());
        thread::spawn(move || recv_exact(&c, n))
    };
    send_all(&pairs[5].1, &tail);
    socket::close(socket::insert(pairs[5].1.clone())).expect("close");
    let lingered = pairs[5].1.is_lingering();
    for (c, _) in &pairs[3..5] {
        assert!(recv_exact(c, total) == want, "staged stream intact");
    }
    for t in senders {
        t.join().unwrap();
    }
    let staged: u64 = pairs[3..5].iter().map(|(_, s)| s.staged_bytes()).sum();
    assert!(
        tail_reader.join().unwrap() == tail,
        "the lingering close's data intact"
    );
    assert_eq!(lingered, iwarp, "a close lingers on iWARP only");
    let (service, others) = ours();
    assert_eq!(
        (service, others),
        (1, 0),
        "one service thread and no other of ours: {:?}",
        thread_names()
    );
    println!("    {staged} bytes staged, lingering close {lingered}, threads ok");
    assert!(staged > 0, "the streams used the stage");
    // Probes are acknowledged: the connections with keepalive stay up.
    thread::sleep(Duration::from_millis(2500));
    assert!(!r0.is_finished() && !r1.is_finished());
    // A panic in pair 0's keepalive job fails that socket, and only it.
    pairs[0].0.inject_job_panic();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !r0.is_finished() && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(r0.is_finished(), "the failed socket's reader still waits");
    let e = r0.join().unwrap();
    assert!(
        matches!(&e, Err(Error::Os(o)) if o.raw_os_error() == Some(libc::EIO)),
        "got {e:?}"
    );
    assert_eq!(pairs[0].0.take_error(), libc::EIO);
    assert!(pairs[0].0.service_jobs().is_empty(), "its jobs are gone");
    thread::sleep(Duration::from_millis(2500));
    assert!(!r1.is_finished(), "the other keepalive connections stay up");
    assert!(pairs[1].0.service_jobs().keepalive && pairs[2].0.service_jobs().keepalive);
    send_all(&pairs[1].1, b"still here");
    assert!(matches!(r1.join().unwrap(), Ok(10)));
    assert_eq!(ours(), (1, 0), "{:?}", thread_names());
    for (i, (c, s)) in pairs.into_iter().enumerate() {
        if i != 5 {
            s.close().expect("close");
        }
        close(c);
    }
}

/// Many rsockets in many threads at once, each pair moving its own verified data.
fn many_sockets_many_threads() {
    let handles: Vec<_> = (0..8u8)
        .map(|k| {
            thread::spawn(move || {
                let port = next_port();
                let l = listener(port);
                let n = 300_000 + k as usize * 1000;
                let t = thread::spawn(move || {
                    let s = l.accept().expect("accept");
                    let got = recv_exact(&s, n);
                    assert!(got == pattern(n, k), "pair {k}: data differs");
                    send_all(&s, &got[..1000]);
                    s.close().unwrap();
                    close(l);
                });
                let c = connect(port);
                send_all(&c, &pattern(n, k));
                assert!(recv_exact(&c, 1000) == pattern(1000, k));
                t.join().unwrap();
                close(c);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("pair thread");
    }
}

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    (
        "transfer_sizes_both_directions",
        transfer_sizes_both_directions,
    ),
    (
        "a_send_waiting_for_room_beside_a_sleeping_receive",
        a_send_waiting_for_room_beside_a_sleeping_receive,
    ),
    ("many_small_messages", many_small_messages),
    (
        "staged_sends_keep_order_through_shutdown",
        staged_sends_keep_order_through_shutdown,
    ),
    ("refused_connect", refused_connect),
    ("descriptor_shows_readiness", descriptor_shows_readiness),
    (
        "connect_completed_by_a_call_is_watched",
        connect_completed_by_a_call_is_watched,
    ),
    ("async_echo_over_the_safe_api", async_echo_over_the_safe_api),
    ("half_close", half_close),
    ("nonblocking_and_peek", nonblocking_and_peek),
    ("addresses", addresses),
    ("concurrent_send_and_recv", concurrent_send_and_recv),
    (
        "rpoll_driven_nonblocking_transfers",
        rpoll_driven_nonblocking_transfers,
    ),
    ("rpoll_with_regular_fds", rpoll_with_regular_fds),
    (
        "busy_polling_ends_get_every_byte",
        busy_polling_ends_get_every_byte,
    ),
    (
        "a_busy_polling_end_that_then_sleeps_on_its_descriptor_is_woken",
        a_busy_polling_end_that_then_sleeps_on_its_descriptor_is_woken,
    ),
    (
        "rpoll_pingpong_waits_for_pollin",
        rpoll_pingpong_waits_for_pollin,
    ),
    ("many_sockets_many_threads", many_sockets_many_threads),
    ("socket_options", socket_options),
    ("close_releases_everything", close_releases_everything),
    (
        "close_lingers_until_the_peer_is_done",
        close_lingers_until_the_peer_is_done,
    ),
    ("ipv6_and_v4_mapped", ipv6_and_v4_mapped),
    (
        "one_service_thread_serves_many_sockets",
        one_service_thread_serves_many_sockets,
    ),
    // Last: it takes a link down and up again.
    (
        "keepalive_ends_blocked_calls_when_the_peer_goes_silent",
        link::keepalive_ends_blocked_calls_when_the_peer_goes_silent,
    ),
    (
        "blocked_calls_end_when_the_link_goes_down",
        link::blocked_calls_end_when_the_link_goes_down,
    ),
    (
        "a_device_that_gives_up_ends_a_blocked_send",
        link::a_device_that_gives_up_ends_a_blocked_send,
    ),
    (
        "a_send_waiting_for_the_peers_room_ends_when_the_link_dies",
        link::a_send_waiting_for_the_peers_room_ends_when_the_link_dies,
    ),
    (
        "survivor_of_a_killed_peer_gets_an_error_in_time",
        death::survivor_of_a_killed_peer_gets_an_error_in_time,
    ),
    (
        "a_peer_that_exits_with_open_connections_leaves_nothing_behind",
        death::a_peer_that_exits_with_open_connections_leaves_nothing_behind,
    ),
    (
        "hostile_peer_ends_only_its_own_connection",
        hostile::hostile_peer_ends_only_its_own_connection,
    ),
    (
        "hostile_peer_cannot_reach_outside_its_grants",
        hostile::hostile_peer_cannot_reach_outside_its_grants,
    ),
    (
        "connect_transfer_close_cycles_hold_nothing",
        soak::connect_transfer_close_cycles_hold_nothing,
    ),
    (
        "many_concurrent_verified_connections",
        soak::many_concurrent_verified_connections,
    ),
    (
        "rclose_races_blocked_calls",
        soak::rclose_races_blocked_calls,
    ),
];

/// Prints the kernel TCP sockets with bytes queued (`ss -tn`): on iWARP each connection is one
/// (Soft-iWARP's), and bytes a peer sent that wait in a receive queue nobody reads say that
/// the device never took them.
fn tcp_queues() {
    let Ok(out) = Command::new("ss").args(["-tna"]).output() else {
        println!("(no ss: no TCP queues)");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let queued: Vec<&str> = text
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && (f[1] != "0" || f[2] != "0") && f[1].parse::<u64>().is_ok()
        })
        .collect();
    println!(
        "  TCP sockets with bytes queued (state, recv-q, send-q, local, peer): {}",
        queued.len()
    );
    for l in queued {
        println!("  tcp {l}");
    }
}

/// Prints every thread's stack (gdb, when installed) so that a hang says where it hangs:
/// compactly (the innermost frame and this project's frames, a few per thread), so that the
/// end of a CI log, which is all that may be kept of it, still holds every thread.
fn dump_threads() {
    let pid = std::process::id().to_string();
    let out = Command::new("gdb")
        .args(["-p", &pid, "-batch", "-nx", "-ex", "thread apply all bt"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(out) = out else {
        println!("(no gdb: no stacks)");
        return;
    };
    let mut frames = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with("Thread ") {
            println!("{line}");
            frames = 0;
        } else if line.starts_with('#') {
            // "#3  0x0000... in rsocket::x::y (args) at src/x.rs:10" (the address and "in"
            // missing in an inlined frame): the function and place.
            let f = line.split_once(" in ").map_or_else(
                || line.split_once("  ").map_or(line, |(_, f)| f),
                |(_, f)| f,
            );
            let name = f.split(" (").next().unwrap_or(f);
            let ours = name.starts_with("rsocket::") || name.starts_with("vm::");
            if line.starts_with("#0 ") || (ours && frames < 8) {
                let at = f.rsplit_once(" at ").map(|(_, a)| a);
                println!(
                    "  {name}{}",
                    at.map(|a| format!(" at {a}")).unwrap_or_default()
                );
                frames += 1;
            }
        }
    }
}

fn rdma_devices() -> Vec<String> {
    std::fs::read_dir("/sys/class/infiniband")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn main() -> ExitCode {
    if let Ok(port) = std::env::var(death::PEER_ENV) {
        death::run_peer(port.parse().expect("a port"));
    }
    if let Ok(port) = std::env::var(DELAYED_SENDER_ENV) {
        run_delayed_sender(port.parse().expect("a port"));
    }
    if let Ok(port) = std::env::var(death::EXITING_PEER_ENV) {
        death::run_exiting_peer(port.parse().expect("a port"));
    }
    let args: Vec<String> = std::env::args().collect();
    let filter: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let devices = rdma_devices();
    if devices.is_empty() {
        if std::env::var_os("RSOCKET_IN_VM").is_some() {
            eprintln!("vm tests: no RDMA device inside the VM");
            return ExitCode::FAILURE;
        }
        if args.iter().any(|a| a == "--list") {
            for (name, _) in TESTS {
                println!("{name}: test");
            }
            return ExitCode::SUCCESS;
        }
        // On the host: run this binary inside the VM, on Soft-RoCE and then on Soft-iWARP.
        let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/run-in-vm");
        let mut ok = true;
        for variant in [None, Some("--siw")] {
            let mut cmd = Command::new(&vm);
            cmd.args(variant)
                .arg("--")
                .arg(&args[0])
                .args(&args[1..])
                .env("RSOCKET_IN_VM", "1");
            let st = cmd
                .status()
                .expect("vm/run-in-vm runs (run `make vm-setup` first)");
            ok &= st.success();
        }
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    println!("vm tests on {}", devices.join(", "));
    // Every panic's message and place, also those of threads a test joins, so that a failed
    // test's reasons are repeated at the end: a CI log may keep only its end.
    let panics: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    {
        let panics = panics.clone();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let place = info
                .location()
                .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            let thread = thread::current().name().unwrap_or("?").to_string();
            if let Ok(mut p) = panics.lock() {
                p.push(format!("thread '{thread}' panicked{place}: {msg}"));
            }
            default(info);
        }));
    }
    let mut failures = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    let watchdog = Duration::from_secs(
        std::env::var("RSOCKET_TEST_WATCHDOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    for (name, f) in TESTS {
        if !filter.is_empty() && !filter.iter().any(|p| name.contains(p.as_str())) {
            continue;
        }
        // A hang is a failure too: name the test and stop instead of waiting for the VM's
        // own timeout.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = {
            let done = done.clone();
            thread::spawn(move || {
                let start = std::time::Instant::now();
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if start.elapsed() > watchdog {
                        println!("test {name} ... FAILED (still running after {watchdog:?})");
                        for line in rsocket::socket::describe_all() {
                            println!("  socket {line}");
                        }
                        tcp_queues();
                        dump_threads();
                        std::process::exit(1);
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let started = Instant::now();
        panics.lock().map(|mut p| p.clear()).ok();
        let r = catch_unwind(AssertUnwindSafe(f));
        let took = started.elapsed().as_secs_f64();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        watch.join().expect("watchdog");
        if r.is_ok() {
            passed += 1;
            println!("test {name} ... ok ({took:.1} s)");
        } else {
            failed += 1;
            println!("test {name} ... FAILED ({took:.1} s)");
            let why = panics.lock().map(|p| p.clone()).unwrap_or_default();
            failures.push((name, why));
        }
    }
    if !failures.is_empty() {
        println!("\nfailures on {}:", devices.join(", "));
        for (name, why) in &failures {
            println!("  {name}:");
            for line in why {
                println!("    {line}");
            }
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out"
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
