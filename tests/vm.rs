//! RDMA integration tests. They need Soft-RoCE/Soft-iWARP devices, which only exist inside the
//! project's QEMU VM: run on the host, this binary boots the VM once per device type (rxe, then
//! siw) and runs itself inside; run inside the VM, it runs the tests.
//!
//! Addresses: server 10.10.0.1 (rxe0/siw0), client 10.10.0.2 (rxe1/siw1); they exist only in the
//! guest.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread;
use std::time::Duration;

use rsocket::Error;
use rsocket::socket::{self, StreamSocket};

const SERVER: [u8; 4] = [10, 10, 0, 1];
const CLIENT: [u8; 4] = [10, 10, 0, 2];

static PORT: AtomicU16 = AtomicU16::new(0);

fn next_port() -> u16 {
    if PORT.load(Ordering::SeqCst) == 0 {
        // Distinct ports per run (rxe and siw runs, repeated runs) avoid any lingering state.
        let base = 20000 + (std::process::id() % 20000) as u16;
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
    l.bind(&addr(SERVER, port).into()).expect("bind");
    l.listen(4).expect("listen");
    l
}

fn connect(port: u16) -> Arc<StreamSocket> {
    let c = new_socket();
    c.bind(&addr(CLIENT, 0).into()).expect("bind client");
    c.connect(&addr(SERVER, port).into()).expect("connect");
    c
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

/// Both directions at once, sizes from 1 byte to 4 MiB, verified byte for byte.
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
        4 << 20,
    ];
    let server = thread::spawn(move || {
        let c = Arc::new(l.accept().expect("accept"));
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
    for chunk in data.chunks(10) {
        send_all(&c, chunk);
    }
    server.join().expect("server");
    close(c);
}

fn refused_connect() {
    let c = new_socket();
    c.bind(&addr(CLIENT, 0).into()).unwrap();
    let e = c.connect(&addr(SERVER, next_port()).into()).unwrap_err();
    assert!(matches!(e, Error::ConnectionRefused), "got {e:?}");
    assert_eq!(c.take_error(), libc::ECONNREFUSED);
    close(c);
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
    assert!(matches!(c.send(b"x", 0), Err(Error::BrokenPipe)));
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
        assert_eq!(peer.ip(), std::net::IpAddr::from(CLIENT));
        assert_eq!(
            c.local_addr().unwrap().to_std().unwrap(),
            addr(SERVER, port)
        );
        let _ = recv_exact(&c, 1);
        c.close().unwrap();
    });
    let c = connect(port);
    assert_eq!(c.peer_addr().unwrap().to_std().unwrap(), addr(SERVER, port));
    assert_eq!(
        c.local_addr().unwrap().to_std().unwrap().ip(),
        std::net::IpAddr::from(CLIENT)
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
        let c = Arc::new(l.accept().expect("accept"));
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

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    (
        "transfer_sizes_both_directions",
        transfer_sizes_both_directions,
    ),
    ("many_small_messages", many_small_messages),
    ("refused_connect", refused_connect),
    ("half_close", half_close),
    ("nonblocking_and_peek", nonblocking_and_peek),
    ("addresses", addresses),
    ("concurrent_send_and_recv", concurrent_send_and_recv),
];

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
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in TESTS {
        if !filter.is_empty() && !filter.iter().any(|p| name.contains(p.as_str())) {
            continue;
        }
        let r = catch_unwind(AssertUnwindSafe(f));
        if r.is_ok() {
            passed += 1;
            println!("test {name} ... ok");
        } else {
            failed += 1;
            println!("test {name} ... FAILED");
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
