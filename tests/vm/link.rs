//! Lost links: a connection whose peer can no longer answer (its link is down) ends blocked
//! calls with an error, with keepalive within TCP's bound, on Soft-RoCE and Soft-iWARP.

use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rsocket::Error;
use rsocket::socket::{self, StreamSocket};

use super::{connect, kpoll, listener, next_port, poll1, send_all, set_int, testnet};

/// TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT of the tests (the issue's: 2 s, 1 s, 3).
const IDLE: i32 = 2;
const INTVL: i32 = 1;
const CNT: i32 = 3;

/// How a blocked call waits, and for what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Blocked {
    /// rrecv on a blocking socket.
    Recv,
    /// rrecv with MSG_DONTWAIT, retried on EAGAIN.
    RecvNonblocking,
    /// rpoll(POLLIN), then rrecv.
    RecvRpoll,
    /// poll(2) on the descriptor (POLLIN), then rrecv.
    RecvDescriptor,
    /// rsend on a blocking socket, out of credits (the peer reads nothing).
    Send,
    /// rsend with MSG_DONTWAIT, retried on EAGAIN.
    SendNonblocking,
    /// rpoll(POLLOUT), then rsend.
    SendRpoll,
}

impl Blocked {
    /// Whether it sends (else it receives).
    pub(super) fn sends(self) -> bool {
        matches!(
            self,
            Blocked::Send | Blocked::SendNonblocking | Blocked::SendRpoll
        )
    }
}

pub(super) const ALL: [Blocked; 7] = [
    Blocked::Recv,
    Blocked::RecvNonblocking,
    Blocked::RecvRpoll,
    Blocked::RecvDescriptor,
    Blocked::Send,
    Blocked::SendNonblocking,
    Blocked::SendRpoll,
];

/// One call on `c` in way `how`, with `b` (the bytes to send, or room for those received).
fn call_once(c: &StreamSocket, how: Blocked, b: &mut [u8]) -> Result<usize, Error> {
    let fd = c.fd();
    match how {
        Blocked::Recv => c.recv(b, 0),
        Blocked::RecvNonblocking => c.recv(b, libc::MSG_DONTWAIT),
        Blocked::RecvRpoll => {
            poll1(fd, libc::POLLIN, -1);
            c.recv(b, libc::MSG_DONTWAIT)
        }
        Blocked::RecvDescriptor => {
            kpoll(fd, libc::POLLIN, -1);
            c.recv(b, libc::MSG_DONTWAIT)
        }
        Blocked::Send => c.send(b, libc::MSG_NOSIGNAL),
        Blocked::SendNonblocking => c.send(b, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL),
        Blocked::SendRpoll => {
            poll1(fd, libc::POLLOUT, -1);
            c.send(b, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        }
    }
}

/// Runs `how` on `c` until a call fails or ends the stream; returns that and when.
pub(super) fn block(c: &StreamSocket, how: Blocked) -> Ended {
    let mut b = vec![0u8; 1 << 16];
    loop {
        match call_once(c, how, &mut b) {
            Err(Error::WouldBlock) => thread::sleep(Duration::from_millis(1)),
            // Sends go on until the peer's buffer is full, receives while the peer sends.
            Ok(n) if n > 0 => {}
            other => return (other, Instant::now()),
        }
    }
}

/// What a blocked call ended with, and when (see [`block`]).
pub(super) type Ended = (Result<usize, Error>, Instant);

/// A blocked call's thread.
pub(super) type Caller = thread::JoinHandle<Ended>;

/// Waits until every caller (the `i`th blocked in way `ALL[i]` on `clients[i]`) returned or
/// `give_up` passed. Each way's result and when it came, or, for a call still blocked, what
/// its socket looks like.
pub(super) fn outcomes(
    callers: Vec<Caller>,
    clients: &[Arc<StreamSocket>],
    give_up: Instant,
) -> Vec<(Blocked, Result<Ended, String>)> {
    while callers.iter().any(|t| !t.is_finished()) && Instant::now() < give_up {
        thread::sleep(Duration::from_millis(10));
    }
    callers
        .into_iter()
        .zip(ALL)
        .enumerate()
        .map(|(i, (t, how))| {
            if t.is_finished() {
                (how, Ok(t.join().unwrap()))
            } else {
                (
                    how,
                    Err(format!(
                        "{how:?}: still blocked ({})",
                        clients[i].describe()
                    )),
                )
            }
        })
        .collect()
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}

fn tc(args: &[&str]) {
    let st = Command::new("tc").args(args).status().expect("tc");
    assert!(st.success(), "tc {args:?}");
}

/// How the peer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Every packet dropped both ways (netem), the links up: the peer just goes silent, as
    /// behind a failed switch. Only keepalive can tell.
    Silent,
    /// The server's link down (`ip link set down`): the devices see it (siw's connections end
    /// at once).
    Down,
}

/// The peer lost for the life of the value, back after.
struct Lost(Loss);

impl Lost {
    fn new(how: Loss) -> Lost {
        let (server, client) = (testnet("RS_SERVER_DEV"), testnet("RS_CLIENT_DEV"));
        match how {
            Loss::Silent => {
                for dev in [server, client] {
                    tc(&["qdisc", "add", "dev", dev, "root", "netem", "loss", "100%"]);
                }
            }
            Loss::Down => ip(&["link", "set", server, "down"]),
        }
        Lost(how)
    }
}

impl Drop for Lost {
    fn drop(&mut self) {
        let (server, client) = (testnet("RS_SERVER_DEV"), testnet("RS_CLIENT_DEV"));
        match self.0 {
            Loss::Silent => {
                for dev in [server, client] {
                    tc(&["qdisc", "del", "dev", dev, "root"]);
                }
            }
            Loss::Down => {
                ip(&["link", "set", server, "up"]);
                // The route the test network needs (see vm/), gone with the link.
                let client = format!("{}/32", testnet("RS_CLIENT"));
                let _ = Command::new("ip")
                    .args(["route", "replace", &client, "dev", server, "table", "100"])
                    .status();
            }
        }
    }
}

/// Connections with SO_KEEPALIVE (2 s, 1 s, 3), a call blocked on each in every way
/// ([`Blocked`]), then the peer lost (`how`); with `live_first`, they first stay up past the
/// keepalive bound while the peer is there (its device answers the probes: on iWARP a write
/// would complete without it, so the probe is an RDMA read). Every call ends with an error
/// (ETIMEDOUT for a silent peer) within idle + interval x count + 2 s, and the descriptor
/// shows POLLERR.
fn lose_peer_under_blocked_calls(how: Loss, live_first: bool) {
    let port = next_port();
    let l = listener(port);
    let n = ALL.len();
    let acceptor = thread::spawn(move || {
        let v: Vec<_> = (0..n).map(|_| l.accept().expect("accept")).collect();
        socket::close(l.fd()).unwrap();
        v
    });
    let clients: Vec<Arc<StreamSocket>> = (0..n).map(|_| connect(port)).collect();
    let servers = acceptor.join().unwrap();
    for c in &clients {
        // The first message makes the connection fully up on both ends.
        send_all(c, b"!");
        set_int(c, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, IDLE).unwrap();
        set_int(c, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, INTVL).unwrap();
        set_int(c, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, CNT).unwrap();
        set_int(c, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).unwrap();
    }
    for s in &servers {
        let mut b = [0u8; 1];
        assert_eq!(s.recv(&mut b, 0).unwrap(), 1);
    }
    let threads: Vec<_> = clients
        .iter()
        .zip(ALL)
        .map(|(c, how)| {
            let c = c.clone();
            thread::spawn(move || block(&c, how))
        })
        .collect();
    let limit = Duration::from_secs((IDLE + INTVL * CNT) as u64);
    // Longer than the keepalive bound: a live peer answers every probe. (Otherwise long
    // enough for the senders to run out of credits.)
    thread::sleep(if live_first {
        limit + Duration::from_secs(2)
    } else {
        Duration::from_secs(1)
    });
    for (t, how) in threads.iter().zip(ALL) {
        assert!(
            !t.is_finished(),
            "{how:?}: the call ended while the peer was there"
        );
    }
    let lost = Lost::new(how);
    let t0 = Instant::now();
    let bound = limit + Duration::from_secs(2);
    let give_up = t0 + bound + Duration::from_secs(20);
    let mut late = Vec::new();
    for (i, (blocked, o)) in outcomes(threads, &clients, give_up).into_iter().enumerate() {
        let (r, at) = match o {
            Ok(done) => done,
            Err(still) => {
                late.push(still);
                continue;
            }
        };
        let took = at - t0;
        println!("    {how:?}, {blocked:?}: {r:?} after {took:.1?}");
        match (how, &r) {
            (_, Err(Error::TimedOut)) | (Loss::Down, Err(Error::ConnectionReset)) => {}
            _ => panic!("{how:?}, {blocked:?}: {r:?}"),
        }
        if took > bound {
            late.push(format!("{blocked:?}: after {took:?}"));
        }
        assert!(kpoll(clients[i].fd(), libc::POLLIN, 0) & libc::POLLERR != 0);
    }
    drop(lost);
    assert!(late.is_empty(), "{how:?}: later than {bound:?}: {late:?}");
    for c in clients {
        socket::close(c.fd()).unwrap();
    }
    drop(servers);
}

/// A silent peer (every packet dropped, links up): keepalive ends every blocked call with
/// ETIMEDOUT in time, and not while the peer answers.
pub(super) fn keepalive_ends_blocked_calls_when_the_peer_goes_silent() {
    lose_peer_under_blocked_calls(Loss::Silent, true);
}

/// The server's link down: every blocked call ends with an error in time.
pub(super) fn blocked_calls_end_when_the_link_goes_down() {
    lose_peer_under_blocked_calls(Loss::Down, false);
}

/// Sets a sysctl for the life of the value, back after.
struct Sysctl(&'static str, String);

impl Sysctl {
    fn set(path: &'static str, v: &str) -> Sysctl {
        let old = std::fs::read_to_string(path).expect("sysctl");
        std::fs::write(path, v).expect("sysctl");
        Sysctl(path, old.trim().to_string())
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, &self.1);
    }
}

/// Without keepalive: a sender whose writes are in flight when the peer goes silent gets an
/// error once the device gives up on them (rxe: its retries; siw: its TCP's retransmissions,
/// net.ipv4.tcp_retries2, lowered here to 4 so that it gives up in seconds, not 15 minutes).
pub(super) fn a_device_that_gives_up_ends_a_blocked_send() {
    let _retries = Sysctl::set("/proc/sys/net/ipv4/tcp_retries2", "4");
    let port = next_port();
    let l = listener(port);
    let reader = thread::spawn(move || {
        let s = l.accept().expect("accept");
        socket::close(l.fd()).unwrap();
        // The server's end would stay half-open for ever, as TCP's without keepalive: it
        // sends nothing, so nothing tells it that the client's end failed.
        set_int(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1).unwrap();
        set_int(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1).unwrap();
        set_int(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).unwrap();
        let mut b = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            match s.recv(&mut b, 0) {
                Ok(0) | Err(_) => return (s, got),
                Ok(n) => got += n as u64,
            }
        }
    });
    let c = connect(port);
    let c2 = c.clone();
    let sender = thread::spawn(move || {
        let b = vec![7u8; 1 << 16];
        loop {
            if let Err(e) = c2.send(&b, libc::MSG_NOSIGNAL) {
                return (e, Instant::now());
            }
        }
    });
    thread::sleep(Duration::from_secs(1));
    assert!(!sender.is_finished());
    let lost = Lost::new(Loss::Silent);
    let t0 = Instant::now();
    while !sender.is_finished() && t0.elapsed() < Duration::from_secs(90) {
        thread::sleep(Duration::from_millis(100));
    }
    let finished = sender.is_finished();
    drop(lost);
    assert!(
        finished,
        "the send still blocked after 90 s ({})",
        c.describe()
    );
    let (e, at) = sender.join().unwrap();
    println!("    send: {e:?} after {:.1?}", at - t0);
    // rxe: ETIMEDOUT (its retries exceeded, as TCP's retransmission timeout); siw: its TCP
    // connection fails and the CM reports the disconnect.
    assert!(
        matches!(e, Error::TimedOut | Error::ConnectionReset),
        "{e:?}"
    );
    socket::close(c.fd()).unwrap();
    let (s, got) = reader.join().unwrap();
    assert!(got > 0);
    drop(s);
}

/// The stream byte at `offset` of the persist test's senders.
fn stream_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(131) >> 3) as u8
}

/// Sends the offset-numbered stream ([`stream_byte`]) on `c` in way `how` until a send fails;
/// `sent` counts what the sends took. Returns the failure and when it came.
fn send_stream(c: &StreamSocket, how: Blocked, sent: &std::sync::atomic::AtomicU64) -> Ended {
    use std::sync::atomic::Ordering;
    assert!(how.sends(), "{how:?}: a sending way");
    let mut b = vec![0u8; 3 * 8192 + 1000];
    loop {
        let at = sent.load(Ordering::Relaxed);
        for (i, x) in b.iter_mut().enumerate() {
            *x = stream_byte(at + i as u64);
        }
        match call_once(c, how, &mut b) {
            Err(Error::WouldBlock) => thread::sleep(Duration::from_millis(1)),
            Ok(n) if n > 0 => {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            other => return (other, Instant::now()),
        }
    }
}

/// Without keepalive: a send that waits for the peer's room (the peer stopped reading, so
/// every write of ours was acknowledged and none is in flight) ends with an error once the
/// link dies. Only the peer's credit update ends such a wait, so nothing else would tell: the
/// persist job's probes are work requests the device gives up on (rxe: its retries; siw: its
/// TCP's, net.ipv4.tcp_retries2 lowered to 4). First the peer pauses past two probes and then
/// reads on: the probes cost nothing (every byte arrives, in order). Each sending way: a
/// blocking send, MSG_DONTWAIT retried on EAGAIN, rpoll(POLLOUT) then MSG_DONTWAIT.
pub(super) fn a_send_waiting_for_the_peers_room_ends_when_the_link_dies() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let _retries = Sysctl::set("/proc/sys/net/ipv4/tcp_retries2", "4");
    let ways = [Blocked::Send, Blocked::SendNonblocking, Blocked::SendRpoll];
    let port = next_port();
    let l = listener(port);
    let acceptor = thread::spawn(move || {
        let v: Vec<_> = (0..3).map(|_| l.accept().expect("accept")).collect();
        socket::close(l.fd()).unwrap();
        v
    });
    let clients: Vec<Arc<StreamSocket>> = (0..3).map(|_| connect(port)).collect();
    let servers = acceptor.join().unwrap();
    let counts: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let senders: Vec<_> = clients
        .iter()
        .zip(ways)
        .zip(&counts)
        .map(|((c, how), n)| {
            let (c, n) = (c.clone(), n.clone());
            thread::spawn(move || send_stream(&c, how, &n))
        })
        .collect();
    // Every sender still sending, its wait for the peer's room watched by the persist job.
    let all_waiting = |senders: &[thread::JoinHandle<Ended>]| {
        for ((t, c), how) in senders.iter().zip(&clients).zip(ways) {
            assert!(
                !t.is_finished(),
                "{how:?}: the send ended while the peer was there"
            );
            assert!(
                c.service_jobs().persist,
                "{how:?}: a send waits for the peer's room, not watched ({})",
                c.describe()
            );
        }
    };
    // The peer reads nothing for 4 s: each send waits for its room, probed after 1 s and 3 s.
    thread::sleep(Duration::from_secs(4));
    all_waiting(&senders);
    // Then it reads on, every byte checked, while the senders go on.
    let mut got = [0u64; 3];
    for (i, s) in servers.iter().enumerate() {
        let mut b = vec![0u8; 1 << 16];
        while got[i] < 1 << 20 {
            let n = s.recv(&mut b, 0).expect("recv");
            assert!(n > 0, "{:?}: end of stream", ways[i]);
            for (k, &x) in b[..n].iter().enumerate() {
                let at = got[i] + k as u64;
                assert_eq!(x, stream_byte(at), "{:?}: byte {at}", ways[i]);
            }
            got[i] += n as u64;
        }
    }
    // It stops reading; once the senders wait again with nothing in flight, the link dies.
    thread::sleep(Duration::from_secs(2));
    all_waiting(&senders);
    for (n, how) in counts.iter().zip(ways) {
        assert!(
            n.load(Ordering::Relaxed) > 1 << 20,
            "{how:?}: sends went on"
        );
    }
    let lost = Lost::new(Loss::Silent);
    let t0 = Instant::now();
    let give_up = t0 + Duration::from_secs(90);
    while senders.iter().any(|t| !t.is_finished()) && Instant::now() < give_up {
        thread::sleep(Duration::from_millis(100));
    }
    let still: Vec<String> = senders
        .iter()
        .zip(&clients)
        .zip(ways)
        .filter(|((t, _), _)| !t.is_finished())
        .map(|((_, c), how)| format!("{how:?}: {}", c.describe()))
        .collect();
    drop(lost);
    assert!(still.is_empty(), "still blocked after 90 s: {still:?}");
    for (t, how) in senders.into_iter().zip(ways) {
        let (r, at) = t.join().unwrap();
        println!("    {how:?}: {r:?} after {:.1?}", at - t0);
        assert!(
            matches!(r, Err(Error::TimedOut | Error::ConnectionReset)),
            "{how:?}: {r:?}"
        );
    }
    for c in clients {
        socket::close(c.fd()).unwrap();
    }
    drop(servers);
}
