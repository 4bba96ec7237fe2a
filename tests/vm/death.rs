//! Peer death: the peer process is killed (SIGKILL) mid-transfer, and the survivor's call,
//! whichever way it waits and whichever way the data flows, ends within a second with
//! ECONNRESET, EPIPE or end of stream, never a hang.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rsocket::Error;
use rsocket::socket::{self, StreamSocket};

use super::link::{ALL, block, outcomes};
use super::{connect, listener, send_all};

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
