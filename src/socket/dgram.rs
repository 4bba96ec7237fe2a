//! Datagram rsockets (`SOCK_DGRAM`): UDP semantics over unreliable-datagram queue pairs, on the
//! wire librdmacm uses (`proto::dgram`), with address handles RoCE accepts and multicast.
//!
//! A socket owns a kernel UDP socket (its port; the introductions between queue pairs) and one
//! UD queue pair per local address it sends from or receives on, each with a registered buffer
//! of receive slots (GRH + 2048 bytes) and send slots. A destination is first reached over UDP;
//! its answer names its queue pair, and from then on datagrams go queue pair to queue pair.
//! Datagrams wait in their receive slots until read (no copy until then); a socket holding
//! `rx_limit` unread datagrams drops new ones and counts them, like a full UDP receive buffer.
//!
//! The service thread watches each socket's completion channels and UDP socket: it answers
//! introductions, builds address handles, and shows readiness on the socket's number (POLLIN
//! when a datagram waits; POLLOUT always, as a UDP socket's).
//!
//! iWARP devices have no unreliable datagrams: on a host with only those, `rsocket` fails with
//! ESOCKTNOSUPPORT, and so does binding or sending through an iWARP device's address.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proto::dgram::{self as wire, DsHeader, GRH_LEN, SLOT, UDP_QKEY, UdpHeader, UdpOp};
use crate::socket::config::Config;
use crate::socket::options::{
    RDMA_INLINE, RDMA_RQSIZE, RDMA_SQSIZE, SOL_RDMA, copy_out, int, size,
};
use crate::socket::service::{self, Jobs, Serviced, Wait};
use crate::socket::spin::Spin;
use crate::trace::{trace, trace_verbose};
use crate::verbs::{
    Access, Ah, CmId, CmOption, Endpoint, EventChannel, MrId, PortInfo, ReadyFd, SockAddr, UdpSock,
    poll_fds, pollin, resolve_ah_attr, source_for, ticks, wait_event,
};

/// Bytes of a receive slot: the GRH, then one message.
const RSLOT: usize = GRH_LEN + SLOT;
/// Work request ids of sends have this bit (receives are the slot index).
const SEND_BIT: u64 = 1 << 32;
/// Receive slots kept posted however many datagrams wait unread: beyond `rq - RESERVE` unread,
/// new datagrams are dropped (and counted) by us rather than silently by the device.
const RESERVE: usize = 4;
/// Smallest and largest queue sizes.
const QUEUE_MIN: u32 = 16;
const QUEUE_MAX: u32 = 4096;
/// The largest datagram to a plain UDP destination (IPv4's).
const PLAIN_MAX: usize = 65507;
/// How long a route resolution or a multicast join may take.
const CM_TIMEOUT_MS: i32 = 2000;

/// Wasted service wake-ups (less twice the useful ones) after which a socket is self-driven.
const WASTED_MAX: u8 = 16;
/// How often the service thread looks at a self-driven socket. A datagram socket that is not
/// watched while its application sleeps on the descriptor (it reads in bursts after select or
/// epoll, and so keeps calling) holds what arrives unseen until the next look, and drops
/// beyond its slots: iperf3 -u -b 20M -l 1000 into 16 slots lost up to 15% that way. A 1 ms
/// tick avoided it but slowed librdmacm's udpong past its 1 ms resend timeout.
const TICK: Duration = Duration::from_millis(10);

/// The watch job alone.
const WATCH: Jobs = Jobs {
    flush: false,
    keepalive: false,
    linger: false,
    watch: true,
    nudge: false,
    persist: false,
};

fn os(errno: i32) -> Error {
    Error::Os(std::io::Error::from_raw_os_error(errno))
}

/// One UD queue pair, bound to a local address and the socket's port.
struct Qp {
    /// Owns the QP: destroyed first (before the CQ, the MRs and the PD of `ep`).
    id: CmId,
    ep: Endpoint,
    /// The CM channel of `id` (multicast join events); dropped after it.
    ch: EventChannel,
    /// The address datagrams from this queue pair carry as their source.
    src: SocketAddr,
    mr: MrId,
    rq: usize,
    free: Vec<usize>,
    port: PortInfo,
    device: usize,
}

impl Qp {
    fn send_off(&self, slot: usize) -> usize {
        self.rq * RSLOT + slot * SLOT
    }
}

/// Where an unread datagram's bytes are.
enum Body {
    /// In receive slot `slot` of queue pair `qp`, `len` bytes at `off` of its region.
    Slot {
        qp: usize,
        slot: usize,
        off: usize,
        len: usize,
    },
    /// Copied (a datagram that came over UDP with an introduction).
    Owned(Vec<u8>),
}

struct Rx {
    src: SocketAddr,
    body: Body,
}

/// A destination: the queue pair we reach it from, and its address handle and queue pair once
/// it introduced itself.
struct Dest {
    qp: usize,
    ah: Option<Ah>,
    qpn: u32,
    /// Reached by plain UDP: a loopback address, or a kernel UDP socket that sent us a
    /// datagram without the rsocket header (under the preload, a converted server keeps its
    /// plain clients).
    plain: bool,
}

/// A multicast group: joined as a member (receiving), or for sending only.
struct Group {
    qp: usize,
    ah: Ah,
    qpn: u32,
    qkey: u32,
    member: bool,
    addr: SockAddr,
}

#[derive(Debug, Clone, Copy)]
struct Mcast {
    looped: bool,
    ttl: u8,
    ifaddr: Option<IpAddr>,
}

struct Inner {
    // Address handles first: they go before the protection domains of `qps`.
    dests: HashMap<SocketAddr, Dest>,
    groups: HashMap<IpAddr, Group>,
    rx: VecDeque<Rx>,
    qps: Vec<Qp>,
    udp: Option<UdpSock>,
    ready: Option<ReadyFd>,
    bound: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    nonblocking: bool,
    cloexec: bool,
    reuseaddr: bool,
    sq_size: u32,
    rq_size: u32,
    sq_inline: u32,
    tos: u8,
    drops: u64,
    mcast: Mcast,
    shut_rd: bool,
    shut_wr: bool,
    closed: bool,
    /// The service thread no longer arms the CQs (see [`DgramSocket::serve`]).
    self_driven: bool,
    /// Wasted service wake-ups, less twice the useful ones.
    wasted: u8,
    /// `DgramSocket::calls` when the service thread last looked.
    last_calls: u64,
    /// How long a blocking receive busy-polls before sleeping (adaptive, as a stream's).
    spin: Spin,
    /// SO_RXQ_OVFL: receives report the drop count.
    rxq_ovfl: bool,
    /// The UDP socket's receive buffer (see `process_udp`).
    udp_buf: Vec<u8>,
}

/// A datagram rsocket.
pub struct DgramSocket {
    domain: i32,
    number: RawFd,
    /// This socket, for the service thread's registry.
    me: Weak<DgramSocket>,
    /// Calls the application made (receives, sends, rpoll's looks).
    calls: AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DgramSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DgramSocket(fd {})", self.number)
    }
}

/// What a receive returns.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes copied into the buffer.
    pub copied: usize,
    /// The datagram's full length (larger than `copied` when it was truncated).
    pub len: usize,
    /// Its source.
    pub src: SocketAddr,
    /// With SO_RXQ_OVFL on: the datagrams this socket dropped so far (a full receive queue,
    /// or a header that was not valid), as the kernel reports them in a control message.
    pub drops: Option<u32>,
}

fn queue_size(bytes: u32) -> u32 {
    (bytes / SLOT as u32).clamp(QUEUE_MIN, QUEUE_MAX)
}

impl DgramSocket {
    /// A new datagram socket of `domain` (AF_INET or AF_INET6).
    pub fn new(domain: i32, nonblocking: bool, cloexec: bool) -> Result<Arc<Self>> {
        if domain != libc::AF_INET && domain != libc::AF_INET6 {
            return Err(Error::Unsupported(libc::EAFNOSUPPORT));
        }
        if !crate::verbs::ud_device_present() {
            return Err(Error::Unsupported(libc::ESOCKTNOSUPPORT));
        }
        let c = Config::get();
        let ready = ReadyFd::new(cloexec)?;
        let number = ready.fd();
        let udp = UdpSock::new(domain)?;
        let s = Arc::new_cyclic(|me| DgramSocket {
            domain,
            number,
            me: me.clone(),
            calls: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                dests: HashMap::new(),
                groups: HashMap::new(),
                rx: VecDeque::new(),
                qps: Vec::new(),
                udp: Some(udp),
                ready: Some(ready),
                bound: None,
                peer: None,
                nonblocking,
                cloexec,
                reuseaddr: false,
                sq_size: c.sqsize_default.min(queue_size(c.wmem_default)),
                rq_size: c.rqsize_default.min(queue_size(c.mem_default)),
                sq_inline: c.inline_default,
                tos: 0,
                drops: 0,
                mcast: Mcast {
                    looped: true,
                    ttl: 1,
                    ifaddr: None,
                },
                shut_rd: false,
                shut_wr: false,
                closed: false,
                self_driven: false,
                wasted: 0,
                last_calls: 0,
                spin: crate::socket::stream::new_spin(),
                rxq_ovfl: false,
                udp_buf: Vec::new(),
            }),
        });
        s.watch();
        Ok(s)
    }

    /// (Re)registers the watch job: the service thread sleeps on the descriptors the socket
    /// has now (a new queue pair brings a completion channel).
    fn watch(&self) {
        if let Some(me) = self.me.upgrade() {
            let svc: Arc<dyn Serviced> = me;
            service::add(&svc, WATCH);
        }
    }

    /// Runs `f` on the locked state; the service thread learns of queue pairs `f` made.
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.lock();
        let before = g.qps.len();
        let r = f(&mut g);
        let grew = g.qps.len() != before;
        drop(g);
        if grew {
            self.watch();
        }
        r
    }

    /// The socket's number.
    pub fn fd(&self) -> RawFd {
        self.number
    }

    /// The address family.
    pub fn domain(&self) -> i32 {
        self.domain
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock, for a call of the application (counted).
    fn call(&self) -> MutexGuard<'_, Inner> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.lock()
    }

    fn addr(&self, a: &SockAddr) -> Result<SocketAddr> {
        let a = a.to_std().ok_or(Error::Unsupported(libc::EAFNOSUPPORT))?;
        let ok = match a {
            SocketAddr::V4(_) => self.domain == libc::AF_INET,
            SocketAddr::V6(_) => self.domain == libc::AF_INET6,
        };
        if ok {
            Ok(a)
        } else {
            Err(Error::Unsupported(libc::EAFNOSUPPORT))
        }
    }

    /// bind(2): the UDP socket takes the address (port 0 picks one); queue pairs are made on
    /// first use, on the address's device (every device's, for a wildcard address).
    pub fn bind(&self, a: &SockAddr) -> Result<()> {
        let a = self.addr(a)?;
        self.with(|g| g.bind(self.domain, a))
    }

    /// connect(2): the default destination, and the only source datagrams are taken from
    /// (AF_UNSPEC dissolves it).
    pub fn connect(&self, a: &SockAddr) -> Result<()> {
        if a.family() == libc::AF_UNSPEC {
            self.lock().peer = None;
            return Ok(());
        }
        let a = self.addr(a)?;
        self.with(|g| {
            g.ensure_bound(self.domain)?;
            if !a.ip().is_multicast() {
                g.dest(a)?;
            }
            g.peer = Some(a);
            Ok(())
        })
    }

    /// getsockname(2).
    pub fn local_addr(&self) -> Result<SockAddr> {
        let g = self.lock();
        let a = g.bound.unwrap_or(match self.domain {
            libc::AF_INET => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            _ => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        });
        Ok(a.into())
    }

    /// getpeername(2).
    pub fn peer_addr(&self) -> Result<SockAddr> {
        self.lock().peer.map(Into::into).ok_or(Error::NotConnected)
    }

    /// shutdown(2): a connected socket stops sending (EPIPE) or receiving (reads return 0).
    pub fn shutdown(&self, how: i32) -> Result<()> {
        let mut g = self.lock();
        if g.peer.is_none() {
            return Err(Error::NotConnected);
        }
        match how {
            libc::SHUT_RD => g.shut_rd = true,
            libc::SHUT_WR => g.shut_wr = true,
            libc::SHUT_RDWR => {
                g.shut_rd = true;
                g.shut_wr = true;
            }
            _ => return Err(Error::InvalidArgument),
        }
        g.publish();
        Ok(())
    }

    /// close: the number goes at once; groups are left and the queue pairs destroyed.
    pub fn close(&self) -> Result<()> {
        let mut g = self.lock();
        g.closed = true;
        g.ready = None;
        let groups: Vec<Group> = g.groups.drain().map(|(_, gr)| gr).collect();
        for gr in groups {
            let _ = g.qps[gr.qp].id.leave_multicast(&gr.addr);
        }
        g.dests.clear();
        g.rx.clear();
        g.qps.clear();
        g.udp = None;
        trace!("{self:?}: closed ({} datagrams dropped)", g.drops);
        Ok(())
    }

    /// Datagrams dropped because the socket held too many unread ones.
    pub fn drops(&self) -> u64 {
        self.lock().drops
    }

    /// The largest datagram this socket can send to `to` (or to its peer) now.
    pub fn max_payload(&self, to: Option<&SockAddr>) -> Result<usize> {
        let to = match to {
            Some(a) => Some(self.addr(a)?),
            None => None,
        };
        self.with(|g| {
            let dst = to.or(g.peer).ok_or(os(libc::EDESTADDRREQ))?;
            g.ensure_bound(self.domain)?;
            let ip = g.src_ip_for(dst)?;
            let qi = g.qp_for(ip)?;
            Ok(wire::max_payload(
                g.qps[qi].port.mtu,
                dst.is_ipv4(),
                dst.ip().is_multicast(),
            ))
        })
    }

    /// sendto(2): one datagram of `data` to `to` (or to the peer). EMSGSIZE above the largest
    /// datagram the path carries (one packet: the port's MTU, at most 2048 bytes with the
    /// header).
    pub fn send_to(&self, data: &[u8], flags: i32, to: Option<&SockAddr>) -> Result<usize> {
        let to = match to {
            Some(a) => Some(self.addr(a)?),
            None => None,
        };
        let nonblocking = flags & libc::MSG_DONTWAIT != 0;
        let mut g = self.call();
        if g.closed {
            return Err(Error::BadDescriptor);
        }
        if g.shut_wr {
            return Err(Error::BrokenPipe);
        }
        let dst = match (to, g.peer) {
            (Some(a), None) => a,
            (Some(a), Some(p)) if a == p => a,
            (Some(_), Some(_)) => return Err(Error::IsConnected),
            (None, Some(p)) => p,
            (None, None) => return Err(os(libc::EDESTADDRREQ)),
        };
        let before = g.qps.len();
        let nonblocking = nonblocking || g.nonblocking;
        let r = g.ensure_bound(self.domain).and_then(|()| {
            if dst.ip().is_multicast() {
                g.send_mcast(data, dst, nonblocking)
            } else {
                g.send_unicast(data, dst, nonblocking)
            }
        });
        g.finish();
        let grew = g.qps.len() != before;
        drop(g);
        if grew {
            self.watch();
        }
        r
    }

    /// recvfrom(2): the next datagram into `buf` (the rest of a longer one is discarded unless
    /// MSG_PEEK); MSG_DONTWAIT, MSG_PEEK; the caller reports MSG_TRUNC from the lengths.
    pub fn recv_from(&self, buf: &mut [u8], flags: i32) -> Result<Received> {
        let mut g = self.call();
        let nonblocking = flags & libc::MSG_DONTWAIT != 0 || g.nonblocking;
        let mut t0 = None;
        let mut slept = false;
        let mut woke = false;
        loop {
            if g.closed {
                return Err(Error::BadDescriptor);
            }
            g.take_events();
            g.poll_cqs();
            if g.rx.is_empty() && woke {
                // Introductions are the service thread's, and ours after a sleep (which the
                // UDP socket may have ended): not a syscall on every poll.
                g.process_udp();
            }
            woke = false;
            if let Some(r) = g.take(buf, flags & libc::MSG_PEEK != 0) {
                if let Some(t0) = t0 {
                    g.spin.record(ticks().wrapping_sub(t0), slept);
                }
                g.finish();
                return Ok(r);
            }
            if g.shut_rd {
                return Ok(Received {
                    drops: None,
                    copied: 0,
                    len: 0,
                    src: g
                        .peer
                        .unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
                });
            }
            if nonblocking {
                g.finish();
                if !g.rx.is_empty() {
                    continue;
                }
                return Err(Error::WouldBlock);
            }
            let now = ticks();
            let start = *t0.get_or_insert(now);
            if now.wrapping_sub(start) < g.spin.window() {
                continue;
            }
            g = self.sleep(g, -1)?;
            woke = true;
            slept = true;
        }
    }

    /// Sleeps until something may have arrived: the CQs armed, on the completion channels,
    /// the UDP socket and the socket's number (which the service thread makes readable when
    /// it took what arrived first).
    fn sleep<'a>(&'a self, mut g: MutexGuard<'a, Inner>, ms: i32) -> Result<MutexGuard<'a, Inner>> {
        g.arm();
        g.poll_cqs();
        if !g.rx.is_empty() {
            return Ok(g);
        }
        g.publish();
        let mut fds = g.sleep_fds();
        drop(g);
        poll_fds(&mut fds, ms)?;
        Ok(self.lock())
    }

    /// For rpoll: the readiness now (POLLIN when a datagram waits, POLLOUT), and with
    /// `arm`, the CQs armed and the descriptors to sleep on.
    pub fn poll_state(&self, arm: bool) -> Result<(i16, Vec<RawFd>)> {
        let mut g = self.call();
        if g.closed {
            return Ok((libc::POLLNVAL, Vec::new()));
        }
        g.take_events();
        g.poll_cqs();
        if arm && g.rx.is_empty() {
            g.process_udp();
        }
        if arm && g.rx.is_empty() {
            g.arm();
            g.poll_cqs();
        }
        g.finish();
        let fds = if arm {
            g.sleep_fds().iter().map(|p| p.fd).collect()
        } else {
            Vec::new()
        };
        Ok((g.revents(), fds))
    }

    /// Sets the blocking mode (O_NONBLOCK).
    pub fn set_nonblocking(&self, on: bool) {
        self.lock().nonblocking = on;
    }

    /// rfcntl: F_GETFL/F_SETFL (O_NONBLOCK) and F_GETFD/F_SETFD (FD_CLOEXEC).
    pub fn fcntl(&self, cmd: i32, arg: i64) -> Result<i32> {
        let mut g = self.lock();
        match cmd {
            libc::F_GETFL => Ok(libc::O_RDWR | if g.nonblocking { libc::O_NONBLOCK } else { 0 }),
            libc::F_SETFL => {
                g.nonblocking = arg as i32 & libc::O_NONBLOCK != 0;
                Ok(0)
            }
            libc::F_GETFD => Ok(g.cloexec as i32),
            libc::F_SETFD => {
                g.cloexec = arg as i32 & libc::FD_CLOEXEC != 0;
                if let Some(r) = &g.ready {
                    r.set_cloexec(g.cloexec);
                }
                Ok(0)
            }
            _ => Err(Error::InvalidArgument),
        }
    }

    /// rsetsockopt for datagram sockets: SO_REUSEADDR, SO_RCVBUF, SO_SNDBUF, IP_TOS, the
    /// multicast options (IP_ADD_MEMBERSHIP, IP_DROP_MEMBERSHIP, IP_MULTICAST_LOOP,
    /// IP_MULTICAST_TTL, IP_MULTICAST_IF and their IPv6 counterparts) and SOL_RDMA's queue
    /// sizes. Sizes apply to queue pairs made afterwards. Anything else is ENOPROTOOPT.
    pub fn set_option(&self, level: i32, name: i32, v: &[u8]) -> Result<()> {
        self.with(|g| self.set_locked(g, level, name, v))
    }

    fn set_locked(&self, g: &mut Inner, level: i32, name: i32, v: &[u8]) -> Result<()> {
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) | (libc::SOL_SOCKET, libc::SO_REUSEPORT) => {
                let on = int(v)? != 0;
                g.udp()?.set_int(libc::SOL_SOCKET, name, on as i32)?;
                g.reuseaddr = on;
            }
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => g.rq_size = queue_size(size(v)?),
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => g.sq_size = queue_size(size(v)?),
            (libc::SOL_SOCKET, libc::SO_BROADCAST) => {
                // No broadcast over UD: accepted, as the flag alone changes nothing.
                int(v)?;
            }
            (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => g.rxq_ovfl = int(v)? != 0,
            (libc::IPPROTO_IP, libc::IP_TOS) | (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                g.tos = int(v)? as u8
            }
            (libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP)
            | (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP) => g.mcast.looped = int(v)? != 0,
            (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL)
            | (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS) => {
                let t = int(v)?;
                g.mcast.ttl = if t < 0 { 1 } else { t.min(255) as u8 };
            }
            (libc::IPPROTO_IP, libc::IP_MULTICAST_IF) => {
                // struct in_addr, or struct ip_mreqn (whose imr_address is the interface).
                let a = match v.len() {
                    4..=7 => ipv4(&v[0..4]),
                    n if n >= 8 => ipv4(&v[4..8]),
                    _ => return Err(Error::InvalidArgument),
                };
                g.mcast.ifaddr = (!a.is_unspecified()).then_some(IpAddr::V4(a));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF) => {
                // An interface index: the route decides the address (accepted).
                int(v)?;
            }
            (libc::IPPROTO_IP, libc::IP_ADD_MEMBERSHIP)
            | (libc::IPPROTO_IP, libc::IP_DROP_MEMBERSHIP) => {
                // struct ip_mreq { group, interface } or ip_mreqn { group, address, index }.
                if v.len() < 8 {
                    return Err(Error::InvalidArgument);
                }
                let group = IpAddr::V4(ipv4(&v[0..4]));
                let iface = ipv4(&v[4..8]);
                let iface = (!iface.is_unspecified()).then_some(IpAddr::V4(iface));
                if name == libc::IP_ADD_MEMBERSHIP {
                    g.join(self.domain, group, iface)?;
                } else {
                    g.leave(group)?;
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_ADD_MEMBERSHIP)
            | (libc::IPPROTO_IPV6, libc::IPV6_DROP_MEMBERSHIP) => {
                // struct ipv6_mreq { group, interface index }.
                if v.len() < 16 {
                    return Err(Error::InvalidArgument);
                }
                let group = IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&v[0..16]).expect("16 bytes"),
                ));
                if name == libc::IPV6_ADD_MEMBERSHIP {
                    g.join(self.domain, group, None)?;
                } else {
                    g.leave(group)?;
                }
            }
            (SOL_RDMA, RDMA_SQSIZE) => g.sq_size = size(v)?.clamp(QUEUE_MIN, QUEUE_MAX),
            (SOL_RDMA, RDMA_RQSIZE) => g.rq_size = size(v)?.clamp(QUEUE_MIN, QUEUE_MAX),
            (SOL_RDMA, RDMA_INLINE) => g.sq_inline = size(v)?.min(SLOT as u32),
            _ => return Err(Error::Unsupported(libc::ENOPROTOOPT)),
        }
        Ok(())
    }

    /// rgetsockopt for datagram sockets; returns the bytes written to `out`.
    pub fn get_option(&self, level: i32, name: i32, out: &mut [u8]) -> Result<usize> {
        let g = self.lock();
        let v: i32 = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_DGRAM,
            (libc::SOL_SOCKET, libc::SO_PROTOCOL) => libc::IPPROTO_UDP,
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => self.domain,
            (libc::SOL_SOCKET, libc::SO_ERROR) => 0,
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) | (libc::SOL_SOCKET, libc::SO_REUSEPORT) => {
                g.reuseaddr as i32
            }
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => (g.rq_size as usize * SLOT) as i32,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => (g.sq_size as usize * SLOT) as i32,
            (libc::SOL_SOCKET, libc::SO_BROADCAST) => 0,
            (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => g.rxq_ovfl as i32,
            (libc::IPPROTO_IP, libc::IP_TOS) | (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                g.tos as i32
            }
            (libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP)
            | (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP) => g.mcast.looped as i32,
            (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL)
            | (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS) => g.mcast.ttl as i32,
            (libc::IPPROTO_IP, libc::IP_MULTICAST_IF) => {
                let a = match g.mcast.ifaddr {
                    Some(IpAddr::V4(a)) => a,
                    _ => Ipv4Addr::UNSPECIFIED,
                };
                return Ok(copy_out(&a.octets(), out));
            }
            (SOL_RDMA, RDMA_SQSIZE) => g.sq_size as i32,
            (SOL_RDMA, RDMA_RQSIZE) => g.rq_size as i32,
            (SOL_RDMA, RDMA_INLINE) => g.sq_inline as i32,
            _ => return Err(Error::Unsupported(libc::ENOPROTOOPT)),
        };
        Ok(copy_out(&v.to_ne_bytes(), out))
    }
}

fn ipv4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

impl Inner {
    fn udp(&self) -> Result<&UdpSock> {
        self.udp.as_ref().ok_or(Error::BadDescriptor)
    }

    fn bind(&mut self, domain: i32, a: SocketAddr) -> Result<()> {
        if self.bound.is_some() {
            return Err(Error::InvalidArgument);
        }
        self.udp()?.bind(&a.into())?;
        let b = self
            .udp()?
            .local_addr()?
            .to_std()
            .ok_or(Error::InvalidArgument)?;
        self.bound = Some(b);
        if !b.ip().is_unspecified() && !b.ip().is_multicast() {
            // A specific address: its queue pair now, so that an address without an RDMA
            // device (or on iWARP) fails here, and the port is taken in the RDMA port space.
            if let Err(e) = self.qp_for(b.ip()) {
                self.bound = None;
                // The UDP socket keeps the address: start over with a fresh one.
                self.udp = Some(UdpSock::new(domain)?);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Binds to the wildcard address and a free port if the socket is not bound yet (as a
    /// UDP socket does on its first send).
    fn ensure_bound(&mut self, domain: i32) -> Result<()> {
        if self.bound.is_none() {
            let any = match domain {
                libc::AF_INET => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
                _ => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
            };
            self.udp()?.bind(&any.into())?;
            self.bound = self.udp()?.local_addr()?.to_std();
        }
        Ok(())
    }

    fn port(&self) -> u16 {
        self.bound.map_or(0, |b| b.port())
    }

    /// The local address datagrams to `dst` leave from: the bound one, the multicast
    /// interface, or the route's.
    fn src_ip_for(&self, dst: SocketAddr) -> Result<IpAddr> {
        if dst.ip().is_multicast()
            && let Some(a) = self.mcast.ifaddr
        {
            return Ok(a);
        }
        if let Some(b) = self.bound
            && !b.ip().is_unspecified()
        {
            return Ok(b.ip());
        }
        let s = source_for(&dst.into())?;
        Ok(s.to_std().ok_or(Error::InvalidArgument)?.ip())
    }

    /// The queue pair on local address `ip` (made on first use).
    fn qp_for(&mut self, ip: IpAddr) -> Result<usize> {
        if let Some(i) = self.qps.iter().position(|q| q.src.ip() == ip) {
            return Ok(i);
        }
        let src = SocketAddr::new(ip, self.port());
        let ch = EventChannel::new()?;
        let mut id = CmId::new_udp(&ch)?;
        if self.reuseaddr {
            id.set_option(CmOption::ReuseAddr, &1i32.to_ne_bytes())?;
        }
        id.bind(&src.into())?;
        if !id.has_device() {
            // An address of no RDMA device.
            return Err(os(libc::EADDRNOTAVAIL));
        }
        if id.on_iwarp() {
            return Err(Error::Unsupported(libc::ESOCKTNOSUPPORT));
        }
        let port = id.port_info()?;
        let (sq, rq) = (self.sq_size as usize, self.rq_size as usize);
        let mut ep = id.create_ud_endpoint(sq as u32, rq as u32, self.sq_inline)?;
        let mr = ep.register(rq * RSLOT + sq * SLOT, Access::Local)?;
        for i in 0..rq {
            ep.post_recv_at(i as u64, mr, i * RSLOT, RSLOT)?;
        }
        let device = id.device();
        trace!(
            "datagram queue pair {} on {src} (mtu {}, {} receives, {} sends)",
            ep.qp_num(),
            port.mtu,
            rq,
            sq
        );
        self.qps.push(Qp {
            id,
            ep,
            ch,
            src,
            mr,
            rq,
            free: (0..sq).rev().collect(),
            port,
            device,
        });
        Ok(self.qps.len() - 1)
    }

    /// The destination `dst` (made on first use, with the queue pair it is reached from).
    fn dest(&mut self, dst: SocketAddr) -> Result<&mut Dest> {
        if !self.dests.contains_key(&dst) {
            let plain = dst.ip().is_loopback();
            let qp = if plain {
                usize::MAX
            } else {
                let ip = self.src_ip_for(dst)?;
                self.qp_for(ip)?
            };
            self.dests.insert(
                dst,
                Dest {
                    qp,
                    ah: None,
                    qpn: 0,
                    plain,
                },
            );
        }
        Ok(self.dests.get_mut(&dst).expect("inserted"))
    }

    /// `src` sent a datagram without the rsocket header: a kernel UDP socket, answered the
    /// same way.
    fn learn_plain(&mut self, src: SocketAddr) {
        self.dests.entry(src).or_insert(Dest {
            qp: usize::MAX,
            ah: None,
            qpn: 0,
            plain: true,
        });
    }

    /// An address handle from queue pair `qi` to `dst`, through a resolved route.
    fn route_ah(&self, qi: usize, dst: SocketAddr) -> Result<Ah> {
        let qp = &self.qps[qi];
        let src = SocketAddr::new(qp.src.ip(), 0);
        let (attr, dev) = resolve_ah_attr(&src.into(), &dst.into(), CM_TIMEOUT_MS)?;
        if dev != qp.device {
            return Err(os(libc::EHOSTUNREACH));
        }
        Ok(qp.ep.create_ah(&attr)?)
    }

    fn send_unicast(&mut self, data: &[u8], dst: SocketAddr, nonblocking: bool) -> Result<usize> {
        let d = self.dest(dst)?;
        if d.plain {
            if data.len() > PLAIN_MAX {
                return Err(os(libc::EMSGSIZE));
            }
            self.udp()?.send_to(&[data], &dst.into())?;
            return Ok(data.len());
        }
        let qi = d.qp;
        let max = wire::max_payload(self.qps[qi].port.mtu, dst.is_ipv4(), false);
        if data.len() > max {
            return Err(os(libc::EMSGSIZE));
        }
        if self.dests[&dst].ah.is_none() {
            // Not introduced yet: over UDP, naming our queue pair; the answer names theirs.
            let h = UdpHeader {
                op: UdpOp::Data,
                qpn: self.qps[qi].ep.qp_num(),
                addr: self.qps[qi].src.ip(),
            }
            .encode();
            self.udp()?.send_to(&[&h, data], &dst.into())?;
            return Ok(data.len());
        }
        let hdr = DsHeader {
            src: self.qps[qi].src,
            mcast_port: None,
        };
        let slot = self.send_slot(qi, nonblocking)?;
        let d = &self.dests[&dst];
        let (ah, qpn) = (d.ah.as_ref().expect("introduced"), d.qpn);
        post(&self.qps[qi], slot, &hdr, data, ah, qpn, UDP_QKEY)?;
        Ok(data.len())
    }

    fn send_mcast(&mut self, data: &[u8], dst: SocketAddr, nonblocking: bool) -> Result<usize> {
        let group = dst.ip();
        if !self.groups.contains_key(&group) {
            let ip = self.src_ip_for(dst)?;
            let qi = self.qp_for(ip)?;
            let gr = self.join_on(qi, group, true)?;
            self.groups.insert(group, gr);
        }
        let qi = self.groups[&group].qp;
        let max = wire::max_payload(self.qps[qi].port.mtu, dst.is_ipv4(), true);
        if data.len() > max {
            return Err(os(libc::EMSGSIZE));
        }
        let hdr = DsHeader {
            src: self.qps[qi].src,
            mcast_port: Some(dst.port()),
        };
        let slot = self.send_slot(qi, nonblocking)?;
        let gr = &self.groups[&group];
        post(&self.qps[qi], slot, &hdr, data, &gr.ah, gr.qpn, gr.qkey)?;
        Ok(data.len())
    }

    /// A free send slot of queue pair `qi`, waiting for one unless `nonblocking`.
    fn send_slot(&mut self, qi: usize, nonblocking: bool) -> Result<usize> {
        loop {
            if let Some(slot) = self.qps[qi].free.pop() {
                return Ok(slot);
            }
            self.take_events();
            self.poll_cqs();
            if !self.qps[qi].free.is_empty() {
                continue;
            }
            if nonblocking {
                return Err(Error::WouldBlock);
            }
            // Sends complete quickly: wait on the completion channel (the lock is held, so
            // nobody else takes the completions meanwhile).
            self.arm();
            self.poll_cqs();
            if self.qps[qi].free.is_empty() {
                let mut fds = self.wait_fds();
                poll_fds(&mut fds, 10)?;
            }
        }
    }

    /// Joins `group` on queue pair `qi` (send-only: an address handle, nothing attached).
    fn join_on(&mut self, qi: usize, group: IpAddr, send_only: bool) -> Result<Group> {
        let addr: SockAddr = SocketAddr::new(group, 0).into();
        let qp = &self.qps[qi];
        qp.id.join_multicast(&addr, send_only)?;
        let ev = wait_event(&qp.ch, Duration::from_millis(CM_TIMEOUT_MS as u64 * 2))?;
        let (mut attr, qpn, qkey) = match ev.multicast() {
            Some(r) => r?,
            None => return Err(os(libc::EIO)),
        };
        drop(ev);
        attr.set_hop_limit(self.mcast.ttl);
        let ah = match qp.ep.create_ah(&attr) {
            Ok(ah) => ah,
            Err(e) => {
                let _ = qp.id.leave_multicast(&addr);
                return Err(e.into());
            }
        };
        trace!(
            "joined {group} on {} (send only: {send_only}, qpn {qpn:#x})",
            qp.src
        );
        Ok(Group {
            qp: qi,
            ah,
            qpn,
            qkey,
            member: !send_only,
            addr,
        })
    }

    /// IP_ADD_MEMBERSHIP: the queue pair on the interface's address (or the route's to the
    /// group) joins it and receives what is sent to it at this socket's port.
    fn join(&mut self, domain: i32, group: IpAddr, iface: Option<IpAddr>) -> Result<()> {
        if !group.is_multicast() {
            return Err(Error::InvalidArgument);
        }
        self.ensure_bound(domain)?;
        let ip = match iface {
            Some(ip) => ip,
            None => self.src_ip_for(SocketAddr::new(group, self.port()))?,
        };
        if let Some(gr) = self.groups.get(&group) {
            if gr.member {
                return Err(os(libc::EADDRINUSE));
            }
            // Joined for sending only: join again as a member.
            let gr = self.groups.remove(&group).expect("present");
            let _ = self.qps[gr.qp].id.leave_multicast(&gr.addr);
        }
        let qi = self.qp_for(ip)?;
        let gr = self.join_on(qi, group, false)?;
        self.groups.insert(group, gr);
        Ok(())
    }

    /// IP_DROP_MEMBERSHIP: detaches the queue pair; nothing sent to the group arrives after.
    fn leave(&mut self, group: IpAddr) -> Result<()> {
        match self.groups.get(&group) {
            Some(gr) if gr.member => {}
            _ => return Err(os(libc::EADDRNOTAVAIL)),
        }
        let gr = self.groups.remove(&group).expect("present");
        self.qps[gr.qp].id.leave_multicast(&gr.addr)?;
        trace!("left {group}");
        Ok(())
    }

    /// Takes the completion channels' events (each acknowledged; the CQs are disarmed).
    fn take_events(&mut self) {
        for q in &self.qps {
            // An event can be pending only on an armed CQ (no read(2) otherwise).
            while q.ep.is_armed(true) && q.ep.take_cq_event() {}
        }
    }

    fn arm(&mut self) {
        for q in &self.qps {
            let _ = q.ep.arm(true);
        }
    }

    fn wait_fds(&self) -> Vec<libc::pollfd> {
        let mut fds: Vec<libc::pollfd> = self.qps.iter().map(|q| pollin(q.ep.comp_fd())).collect();
        if let Some(u) = &self.udp {
            fds.push(pollin(u.fd()));
        }
        fds
    }

    /// What an application's call sleeps on: [`Inner::wait_fds`] and the socket's number, where
    /// the service thread shows what it took first (the completion event or the UDP datagram
    /// the call would have woken for). Not the service thread's own set: it makes the number
    /// readable itself.
    fn sleep_fds(&self) -> Vec<libc::pollfd> {
        let mut fds = self.wait_fds();
        if let Some(r) = &self.ready {
            fds.push(pollin(r.fd()));
        }
        fds
    }

    fn revents(&self) -> i16 {
        let mut r = libc::POLLOUT;
        if !self.rx.is_empty() || self.shut_rd {
            r |= libc::POLLIN;
        }
        r
    }

    /// Ends a call: the CQs armed again if the call took their events (the service thread
    /// sleeps on the channels: a disarmed CQ would never wake it), then the readiness shown.
    fn finish(&mut self) {
        if !self.self_driven && self.qps.iter().any(|q| !q.ep.is_armed(true)) {
            self.arm();
            // What completed before the arming raises no event: look once more.
            self.poll_cqs();
        }
        self.publish();
    }

    /// Whether the number shows POLLIN.
    fn shown_in(&self) -> bool {
        self.ready
            .as_ref()
            .is_some_and(|r| r.shown() & libc::POLLIN != 0)
    }

    /// A self-driven socket's watch: the UDP socket, and a look one tick on.
    fn tick_wait(&self, now: Instant) -> Wait {
        Wait {
            jobs: WATCH,
            fds: self.udp.iter().map(|u| u.fd()).collect(),
            deadline: Some(now + TICK),
        }
    }

    /// Shows the readiness on the socket's number.
    fn publish(&mut self) {
        let want = self.revents();
        if let Some(r) = &mut self.ready {
            let _ = r.show(want);
        }
    }

    /// Whether a datagram from `src` is one this socket sent (multicast loopback).
    fn is_own(&self, src: SocketAddr) -> bool {
        src.port() == self.port() && self.qps.iter().any(|q| q.src.ip() == src.ip())
    }

    /// Whether a datagram from `src` may be queued now (connected sockets take only their
    /// peer's); counts a drop when the queue is full.
    fn admit(&mut self, src: SocketAddr) -> bool {
        if self.peer.is_some_and(|p| p != src) {
            trace_verbose!("datagram from {src} dropped: connected to {:?}", self.peer);
            return false;
        }
        let limit = self
            .qps
            .iter()
            .map(|q| q.rq.saturating_sub(RESERVE))
            .max()
            .unwrap_or(QUEUE_MIN as usize);
        if self.rx.len() >= limit {
            self.drops += 1;
            return false;
        }
        true
    }

    /// Polls every CQ: received datagrams are checked and queued (or dropped and their slot
    /// posted again), completed sends free their slots.
    fn poll_cqs(&mut self) {
        for qi in 0..self.qps.len() {
            loop {
                let mut comps = Vec::new();
                if self.qps[qi].ep.poll(32, |c| comps.push(c)).is_err() {
                    break;
                }
                if comps.is_empty() {
                    break;
                }
                for c in comps {
                    if c.wr_id & SEND_BIT != 0 {
                        if !c.ok {
                            trace!("datagram send failed (status {})", c.status);
                        }
                        self.qps[qi].free.push((c.wr_id & !SEND_BIT) as usize);
                        continue;
                    }
                    let slot = c.wr_id as usize;
                    if !c.ok {
                        // Flushed (the QP is going) or failed: nothing to deliver.
                        continue;
                    }
                    self.received(qi, slot, c.byte_len as usize);
                }
            }
        }
    }

    /// A receive completed into `slot` of queue pair `qi` with `byte_len` bytes (GRH
    /// included): queue it, or post the slot again.
    fn received(&mut self, qi: usize, slot: usize, byte_len: usize) {
        let off = slot * RSLOT + GRH_LEN;
        let len = byte_len.saturating_sub(GRH_LEN).min(SLOT);
        let mut head = [0u8; 28];
        let n = len.min(head.len());
        self.qps[qi].ep.read(self.qps[qi].mr, off, &mut head[..n]);
        let keep = match DsHeader::decode(&head[..n]) {
            None => {
                trace_verbose!("datagram with an invalid header dropped ({byte_len} bytes)");
                self.drops += 1;
                None
            }
            Some(h) if h.mcast_port.is_some_and(|p| p != self.port()) => None,
            Some(h) if h.mcast_port.is_some() && !self.mcast.looped && self.is_own(h.src) => None,
            Some(h) => self.admit(h.src).then_some(h),
        };
        match keep {
            Some(h) => self.rx.push_back(Rx {
                src: h.src,
                body: Body::Slot {
                    qp: qi,
                    slot,
                    off: off + h.len(),
                    len: len - h.len(),
                },
            }),
            None => self.repost(qi, slot),
        }
    }

    fn repost(&mut self, qi: usize, slot: usize) {
        let q = &self.qps[qi];
        if let Err(e) = q.ep.post_recv_at(slot as u64, q.mr, slot * RSLOT, RSLOT) {
            trace!("datagram receive not posted again: {e}");
        }
    }

    /// Copies the next datagram into `buf` and, unless `peek`, frees it.
    fn take(&mut self, buf: &mut [u8], peek: bool) -> Option<Received> {
        let rx = self.rx.front()?;
        let src = rx.src;
        let (copied, len) = match &rx.body {
            Body::Slot { qp, off, len, .. } => {
                let n = (*len).min(buf.len());
                let q = &self.qps[*qp];
                q.ep.read(q.mr, *off, &mut buf[..n]);
                (n, *len)
            }
            Body::Owned(v) => {
                let n = v.len().min(buf.len());
                buf[..n].copy_from_slice(&v[..n]);
                (n, v.len())
            }
        };
        if !peek {
            let rx = self.rx.pop_front().expect("front");
            if let Body::Slot { qp, slot, .. } = rx.body {
                self.repost(qp, slot);
            }
        }
        let drops = self.rxq_ovfl.then_some(self.drops as u32);
        Some(Received {
            copied,
            len,
            src,
            drops,
        })
    }

    /// Serves the UDP socket: introductions are answered and give destinations their
    /// address handles; the datagrams they carry are queued.
    fn process_udp(&mut self) {
        // One buffer for the socket's life (a UDP datagram can be 64 KiB; not allocated and
        // zeroed at every look).
        let mut buf = std::mem::take(&mut self.udp_buf);
        if buf.is_empty() {
            buf = vec![0u8; PLAIN_MAX + 64];
        }
        self.process_udp_into(&mut buf);
        self.udp_buf = buf;
    }

    fn process_udp_into(&mut self, buf: &mut [u8]) {
        loop {
            let Some(udp) = &self.udp else { return };
            let (n, from) = match udp.recv_from(buf) {
                Ok(r) => r,
                Err(_) => return,
            };
            let Some(src) = from.to_std() else { continue };
            let Some((h, at)) = UdpHeader::decode(&buf[..n], src.is_ipv4()) else {
                // A kernel UDP socket's datagram: delivered as it is.
                trace_verbose!("plain UDP datagram of {n} bytes from {src}");
                self.learn_plain(src);
                if self.admit(src) {
                    self.rx.push_back(Rx {
                        src,
                        body: Body::Owned(buf[..n].to_vec()),
                    });
                }
                continue;
            };
            if let Err(e) = self.introduced(src, h) {
                trace!("introduction from {src} failed: {e}");
                continue;
            }
            if h.op == UdpOp::Data && self.admit(src) {
                self.rx.push_back(Rx {
                    src,
                    body: Body::Owned(buf[at..n].to_vec()),
                });
            }
        }
    }

    /// `src` introduced its queue pair: answer a data introduction with ours, and make (or
    /// remake, for a new queue pair) its address handle.
    fn introduced(&mut self, src: SocketAddr, h: UdpHeader) -> Result<()> {
        if self.dests.get(&src).is_some_and(|d| d.plain) {
            // An rsocket after all (it spoke plain UDP first): over RDMA from now on.
            self.dests.remove(&src);
        }
        let qi = self.dest(src)?.qp;
        if qi == usize::MAX {
            return Err(os(libc::EADDRNOTAVAIL));
        }
        if h.op == UdpOp::Data {
            let ctrl = UdpHeader {
                op: UdpOp::Ctrl,
                qpn: self.qps[qi].ep.qp_num(),
                addr: self.qps[qi].src.ip(),
            }
            .encode();
            self.udp()?.send_to(&[&ctrl], &src.into())?;
        }
        let d = &self.dests[&src];
        if d.ah.is_none() || d.qpn != h.qpn {
            let ah = self.route_ah(qi, src)?;
            let d = self.dests.get_mut(&src).expect("present");
            d.ah = Some(ah);
            d.qpn = h.qpn;
            trace!("{src} is queue pair {:#x}", h.qpn);
        }
        Ok(())
    }
}

/// Copies the header and the payload into send slot `slot` and posts the send.
fn post(
    qp: &Qp,
    slot: usize,
    hdr: &DsHeader,
    data: &[u8],
    ah: &Ah,
    qpn: u32,
    qkey: u32,
) -> Result<()> {
    let off = qp.send_off(slot);
    let mut h = [0u8; 28];
    let hl = hdr.encode(&mut h);
    qp.ep.write(qp.mr, off, &h[..hl]);
    qp.ep.write(qp.mr, off + hl, data);
    qp.ep.post_ud_send(
        SEND_BIT | slot as u64,
        qp.mr,
        off,
        hl + data.len(),
        ah,
        qpn,
        qkey,
    )?;
    Ok(())
}

impl Serviced for DgramSocket {
    /// The watch job (as a stream socket's, `stream::ready`): shows what arrives while the
    /// application is outside a call. An application that keeps calling finds its datagrams
    /// before the service thread could show them; after [`WASTED_MAX`] such wake-ups more than
    /// twice the useful ones the socket is *self-driven*: its CQs are no longer armed for the
    /// service thread, which looks every [`TICK`] (showing what came, and answering
    /// introductions) and watches again once a tick passed with no call.
    fn serve(&self, _jobs: Jobs, now: Instant, _ready: &[RawFd]) -> Wait {
        let calls = self.calls.load(Ordering::Relaxed);
        let mut g = self.lock();
        if g.closed {
            return Wait::default();
        }
        // Calls since the last look: the application is busy with the socket (an application
        // asleep on the descriptor makes none).
        let active = calls != g.last_calls;
        g.last_calls = calls;
        if g.self_driven {
            g.process_udp();
            if active {
                g.publish();
                return g.tick_wait(now);
            }
            trace_verbose!("{self:?}: no call for a tick: watched again");
            g.self_driven = false;
            g.wasted = 0;
        }
        let before = g.shown_in();
        g.take_events();
        g.poll_cqs();
        g.process_udp();
        g.arm();
        g.poll_cqs();
        g.publish();
        if !active && g.shown_in() && !before {
            // Shown to an application that made no call since: what the watch is for.
            g.wasted = g.wasted.saturating_sub(2);
        } else if active {
            g.wasted = g.wasted.saturating_add(1);
            if g.wasted > WASTED_MAX {
                trace_verbose!("{self:?}: self-driven (its calls find what arrives)");
                g.self_driven = true;
                return g.tick_wait(now);
            }
        }
        Wait {
            jobs: WATCH,
            fds: g.wait_fds().iter().map(|p| p.fd).collect(),
            deadline: None,
        }
    }

    fn job_failed(&self, _jobs: Jobs) {
        let mut g = self.lock();
        g.closed = true;
        g.ready = None;
    }
}
