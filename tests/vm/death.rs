//! Peer death: the peer process is killed (SIGKILL) mid-transfer, and the survivor's call,
//! whichever way it waits and whichever way the data flows, ends within a second with
//! ECONNRESET, EPIPE or end of stream, never a hang. A peer process that exits with its
//! connections open leaves nothing behind in the survivor.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rsocket::Error;
use rsocket::socket::{self, StreamSocket};

use super::link::{ALL, block, outcomes};
use super::{
    close, connect, listener, next_port, open_fds, pattern, rdma_resources, recv_exact, send_all,
};

/// The environment variable that makes this test binary the peer: `PORT` to listen on.
pub(super) const PEER_ENV: &str = "RSOCKET_TEST_PEER";

/// The peer (run as a child process, see [`PEER_ENV`]): accepts connections on `port` and,
/// per connection, reads what comes if its first byte is `S` (the survivor sends) or sends
/// without end if it is `R`. Prints READY once listening; runs until killed.
pub(super) fn run_peer(port: u16) -> ! {
    let l = listener(port);
    println!("READY");
    std::io::stdout().flush().unwrap();
    loop {
        let s = l.accept().expect("peer: accept");
        thread::spawn(move || {
            let mut role = [0u8; 1];
            let _ = s.recv(&mut role, libc::MSG_WAITALL);
            let mut b = vec![0x5au8; 1 << 16];
            loop {
                let r = if role[0] == b'S' {
                    s.recv(&mut b, 0)
                } else {
                    s.send(&b, libc::MSG_NOSIGNAL)
                };
                if !matches!(r, Ok(n) if n > 0) {
                    return;
                }
            }
        });
    }
}

/// The environment variable that makes this test binary the exiting peer: `PORT`.
pub(super) const EXITING_PEER_ENV: &str = "RSOCKET_TEST_EXITING_PEER";

/// Connections the exiting peer opens.
const EXITING_CONNS: usize = 8;

/// Bytes the exiting peer sends on its connection `i` (less than the send and receive
/// buffers hold: we read only once it is gone).
fn exiting_len(i: usize) -> usize {
    1 + i * 37_111 % 100_000
}

/// The exiting peer (a child process, see [`EXITING_PEER_ENV`]): opens [`EXITING_CONNS`]
/// connections to `port`, sends [`exiting_len`] bytes of [`pattern`] on each and exits
/// without closing any of them.
pub(super) fn run_exiting_peer(port: u16) -> ! {
    let conns: Vec<_> = (0..EXITING_CONNS)
        .map(|i| {
            let c = connect(port);
            let data = pattern(exiting_len(i), i as u8);
            // Odd connections in small sends (they gather, and the last ones may still wait
            // in the send ring when the process exits).
            let piece = if i % 2 == 1 { 5 + i } else { data.len() };
            for p in data.chunks(piece) {
                send_all(&c, p);
            }
            c
        })
        .collect();
    // Held, not closed: exit(3), as a return from main does it.
    std::mem::forget(conns);
    std::process::exit(0)
}

fn spawn_peer(port: u16) -> Child {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .env(PEER_ENV, port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("peer process");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .expect("peer's READY");
    assert_eq!(line.trim(), "READY", "peer: {line:?}");
    child
}

/// A connection per way of waiting and direction ([`Blocked`]) to a peer process, data
/// flowing on each; the peer killed: every call ends within 1 s with ECONNRESET, EPIPE (a
/// send) or end of stream (a receive), and the socket closes cleanly.
pub(super) fn survivor_of_a_killed_peer_gets_an_error_in_time() {
    let port = super::next_port();
    let mut peer = spawn_peer(port);
    let clients: Vec<Arc<StreamSocket>> = ALL
        .iter()
        .map(|how| {
            let c = connect(port);
            send_all(&c, if how.sends() { b"S" } else { b"R" });
            c
        })
        .collect();
    let threads: Vec<_> = clients
        .iter()
        .zip(ALL)
        .map(|(c, how)| {
            let c = c.clone();
            thread::spawn(move || block(&c, how))
        })
        .collect();
    // Mid-transfer: data flows on every connection.
    thread::sleep(Duration::from_secs(1));
    for (t, how) in threads.iter().zip(ALL) {
        assert!(!t.is_finished(), "{how:?}: ended before the peer died");
    }
    peer.kill().expect("SIGKILL the peer");
    let t0 = Instant::now();
    peer.wait().unwrap();
    let give_up = t0 + Duration::from_secs(30);
    let mut late = Vec::new();
    for (how, o) in outcomes(threads, &clients, give_up) {
        let (r, at) = match o {
            Ok(done) => done,
            Err(still) => {
                late.push(still);
                continue;
            }
        };
        let took = at - t0;
        println!("    {how:?}: {r:?} after {took:.1?}");
        let fine = match r {
            Err(Error::ConnectionReset) => true,
            Err(Error::BrokenPipe) => how.sends(),
            Ok(0) => !how.sends(),
            _ => false,
        };
        assert!(fine, "{how:?}: {r:?}");
        if took > Duration::from_secs(1) {
            late.push(format!("{how:?}: after {took:?}"));
        }
    }
    assert!(late.is_empty(), "later than 1 s: {late:?}");
    for c in clients {
        socket::close(c.fd()).expect("close after the peer died");
    }
}

/// A peer process opens connections, sends on each and exits without closing them: each of
/// our accepted sockets reads all the data, then end of stream (the exit closed them, as the
/// kernel closes a TCP socket's, see `socket::stream::close`), and closes;
/// then this process holds the descriptors it held before and the devices the RDMA
/// resources they held before (nothing of the peer's and nothing of ours is left).
pub(super) fn a_peer_that_exits_with_open_connections_leaves_nothing_behind() {
    let port = next_port();
    let l = listener(port);
    // Warm up once (process-wide state created on first use is not counted).
    let w = {
        let l = l.clone();
        thread::spawn(move || l.accept().unwrap())
    };
    close(connect(port));
    drop(w.join().unwrap());
    thread::sleep(rsocket::proto::stream::LINGER + Duration::from_millis(500));
    let before = (open_fds(), rdma_resources());
    let mut peer = Command::new(std::env::current_exe().expect("test binary"))
        .env(EXITING_PEER_ENV, port.to_string())
        .spawn()
        .expect("peer process");
    let accepted: Vec<_> = (0..EXITING_CONNS).map(|_| l.accept().unwrap()).collect();
    let st = peer.wait().unwrap();
    assert!(st.success(), "exiting peer: {st:?}");
    let t0 = Instant::now();
    let mut ends = Vec::new();
    for (i, s) in accepted.into_iter().enumerate() {
        let n = exiting_len(i);
        let got = recv_exact(&s, n);
        assert!(got == pattern(n, i as u8), "connection {i}: data");
        let mut b = [0u8; 1];
        let end = s.recv(&mut b, 0);
        assert!(
            matches!(end, Ok(0)),
            "connection {i}: after the data: {end:?}"
        );
        ends.push(end);
        s.close().unwrap();
    }
    println!(
        "    {EXITING_CONNS} connections: {ends:?} within {:.1?}",
        t0.elapsed()
    );
    thread::sleep(rsocket::proto::stream::LINGER + Duration::from_millis(500));
    let after = (open_fds(), rdma_resources());
    println!("    before: {before:?}; after: {after:?}");
    assert_eq!(after, before, "left behind");
    close(l);
}
