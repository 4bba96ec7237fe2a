//! Soak: many connect/transfer/close cycles in one process with flat descriptors, RDMA
//! resources and memory; many concurrent verified connections; rclose racing calls blocked in
//! other threads. Counts are short in `make test`; `RSOCKET_SOAK_CYCLES` and
//! `RSOCKET_SOAK_CONNS` make the long runs (scripts/soak).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rsocket::Error;
use rsocket::socket::{self, StreamSocket};

use super::{
    close, connect, connected_pair, listener, next_port, open_fds, pattern, rdma_resources,
    recv_exact, send_all,
};

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident set size in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// What the process holds: descriptors, the RDMA resource summary, RSS.
fn held() -> (usize, String, u64) {
    (open_fds(), rdma_resources(), rss_kib())
}

/// Connect, move a size-varying verified message each way, close both ends; `cycles` times
/// on one listener. After a warm-up the descriptors and RDMA resources are exactly as before
/// and RSS has not grown by more than 8 MiB.
pub(super) fn connect_transfer_close_cycles_hold_nothing() {
    let cycles = env_count("RSOCKET_SOAK_CYCLES", 300);
    let port = next_port();
    let l = listener(port);
    let server = {
        let l = l.clone();
        thread::spawn(move || {
            for i in 0..cycles {
                let s = l.accept().expect("accept");
                let n = 1 + (i * 7919) % 20_000;
                let got = recv_exact(&s, n);
                assert_eq!(got, pattern(n, i as u8), "cycle {i}: data");
                send_all(&s, &got);
                let mut b = [0u8; 1];
                assert_eq!(s.recv(&mut b, 0).unwrap(), 0, "cycle {i}: end of stream");
                s.close().unwrap();
            }
        })
    };
    let warm = 20.min(cycles);
    let mut base = None;
    let t0 = Instant::now();
    for i in 0..cycles {
        if i == warm {
            // Let the warm-up's closes finish (iWARP lingers up to LINGER).
            thread::sleep(rsocket::proto::stream::LINGER + Duration::from_millis(500));
            base = Some(held());
        }
        if i > warm && i % 1000 == 0 {
            // The long runs (scripts/soak): whether RSS grows with the cycles or levels off.
            println!("    cycle {i}: RSS {} KiB", rss_kib());
        }
        let c = connect(port);
        let n = 1 + (i * 7919) % 20_000;
        let data = pattern(n, i as u8);
        send_all(&c, &data);
        assert_eq!(recv_exact(&c, n), data, "cycle {i}: echo");
        c.shutdown(libc::SHUT_WR).unwrap();
        close(c);
    }
    server.join().expect("server");
    let took = t0.elapsed();
    thread::sleep(rsocket::proto::stream::LINGER + Duration::from_millis(500));
    let (fds, res, rss) = held();
    println!("    {cycles} cycles in {took:.1?}; after: {fds} fds, {res}, RSS {rss} KiB");
    if let Some((fds0, res0, rss0)) = base {
        println!("    after the warm-up: {fds0} fds, {res0}, RSS {rss0} KiB");
        assert_eq!(fds, fds0, "descriptors leaked");
        assert_eq!(res, res0, "RDMA resources leaked");
        assert!(rss < rss0 + 8 * 1024, "RSS grew from {rss0} to {rss} KiB");
    }
    close(l);
}

/// Many connections at once in one process, each moving verified data both ways from its
/// own thread pair.
pub(super) fn many_concurrent_verified_connections() {
    let conns = env_count("RSOCKET_SOAK_CONNS", 64);
    // An rsocket holds several descriptors (its CM and completion channels, its waker, its
    // readiness pair): 2 x 256 of them (scripts/soak) pass the default soft limit of 1024.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer, then the same struct in.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let fds0 = open_fds();
    let port = next_port();
    let l = listener(port);
    let acceptor = {
        let l = l.clone();
        thread::spawn(move || {
            (0..conns)
                .map(|_| l.accept().expect("accept"))
                .collect::<Vec<_>>()
        })
    };
    let clients: Vec<Arc<StreamSocket>> = (0..conns).map(|_| connect(port)).collect();
    let servers = acceptor.join().unwrap();
    let n = 64 * 1024;
    let mut threads = Vec::new();
    for (i, (c, s)) in clients.iter().zip(&servers).enumerate() {
        let (c, s) = (c.clone(), s.clone());
        threads.push(thread::spawn(move || {
            let d = pattern(n, i as u8);
            send_all(&s, &d);
            assert_eq!(recv_exact(&s, n), pattern(n, !(i as u8)), "server {i}");
        }));
        let c2 = c.clone();
        threads.push(thread::spawn(move || {
            assert_eq!(recv_exact(&c2, n), pattern(n, i as u8), "client {i}");
            send_all(&c2, &pattern(n, !(i as u8)));
        }));
    }
    for t in threads {
        t.join().expect("a connection failed");
    }
    println!(
        "    {conns} connections, 64 KiB each way verified; {} descriptors for {} sockets; {}",
        open_fds() - fds0,
        2 * conns + 1,
        rdma_resources()
    );
    for c in clients {
        socket::close(c.fd()).unwrap();
    }
    for s in servers {
        s.close().unwrap();
    }
    close(l);
}

/// rclose of a socket while other threads are blocked in rrecv and in rsend on it: both
/// calls return (an error or end of stream), nothing hangs or crashes, and the peer sees the
/// connection end.
pub(super) fn rclose_races_blocked_calls() {
    for round in 0..4 {
        let (c, s) = connected_pair();
        let (c1, c2) = (c.clone(), c.clone());
        // The peer reads nothing: the sender runs out of credits and blocks; the receiver
        // gets nothing.
        let rx = thread::spawn(move || {
            let mut b = [0u8; 4096];
            c1.recv(&mut b, 0)
        });
        let tx = thread::spawn(move || {
            let b = vec![1u8; 1 << 16];
            loop {
                if let Err(e) = c2.send(&b, libc::MSG_NOSIGNAL) {
                    return e;
                }
            }
        });
        thread::sleep(Duration::from_millis(300 + 100 * round));
        assert!(!rx.is_finished() && !tx.is_finished(), "both calls blocked");
        socket::close(c.fd()).expect("close while calls are blocked");
        let t0 = Instant::now();
        while !(rx.is_finished() && tx.is_finished()) && t0.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(rx.is_finished(), "rrecv still blocked after rclose");
        assert!(tx.is_finished(), "rsend still blocked after rclose");
        let r = rx.join().unwrap();
        let e = tx.join().unwrap();
        println!("    round {round}: rrecv {r:?}, rsend {e:?} after rclose");
        assert!(!matches!(r, Ok(n) if n > 0), "rrecv got data");
        assert!(!matches!(e, Error::WouldBlock));
        // The peer drains what arrived, then sees the end (or a reset).
        let mut b = vec![0u8; 1 << 16];
        let t0 = Instant::now();
        loop {
            match s.recv(&mut b, 0) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the peer never saw the end"
            );
        }
        let _ = s.close();
    }
}
