//! Turning kernel TCP sockets into rsockets: connect, listen, accept, and fork.
//!
//! **Connect.** A candidate connecting to an address that is not loopback first tries RDMA: an
//! rsocket with the candidate's options and bound address connects, for at most
//! `RSOCKET_PRELOAD_CONNECT_MS`. Once connected, it is duplicated onto the application's
//! descriptor number (`dup3`, the kernel socket goes), so the number the application holds now
//! shows the rsocket's readiness. If RDMA cannot serve (no RDMA device on the route, nobody
//! listening over RDMA there, as for a plain TCP server, or no answer in time) the candidate
//! connects over the kernel as if the preload were not there, blocking or not (EINPROGRESS).
//!
//! **Listen.** The kernel socket listens as asked (plain TCP clients reach it), and an RDMA
//! listener on the same address and port sits beside it. A per-process acceptor thread accepts
//! RDMA connections as they come, as the kernel completes TCP handshakes before accept(), and
//! for each makes a *token*: a loopback TCP connection from 127.77.77.77 to the kernel
//! listener, carrying a 16-byte tag (magic, pid, token id). The token makes the kernel
//! listener readable, so the application's epoll, poll or select wakes as for any client, and
//! its accept() takes the token and puts the RDMA connection in its place (same descriptor
//! number). A token another process accepted (children of a forking server share the kernel
//! listener) is closed there, and the owner makes a new one.
//!
//! **Private routes.** A listener the application puts in an epoll set gets a loopback
//! listener of this process alone in the same set, with the same events and data
//! ([`epoll_mirror`]), and tokens go there: a forking server's workers share the kernel
//! listener and the kernel wakes one of them (EPOLLEXCLUSIVE), not necessarily the owner of the
//! RDMA connection. accept() looks at the route first. A token not taken there within
//! [`ROUTE_WAIT`] goes to the kernel listener.
//!
//! **Fork.** RDMA resources cannot be shared: an rsocket made before fork stays with the
//! parent, and in the child every call on it fails with ENOTCONN (closing it there only closes
//! the child's descriptor). A listener whose RDMA side never accepted anything before the fork
//! (a master that forks its workers) hands the RDMA side to the first child: the parent drops
//! it, the child listens again on the same port. A child that inherits an active listener
//! serves its plain TCP clients only.
//!
//! **Credentials.** After setuid and the like, the RDMA side listens again from a new
//! acceptor thread (see [`credentials_changed`]).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use libc::{c_int, sockaddr, sockaddr_storage, socklen_t};
use rsocket as rs_core;
use rsocket_rs as rs;

use crate::policy::{self, Place, place};
use crate::real;
use crate::table::{self, Slot, SpinLock};
use crate::trace;

/// The source address of tokens (loopback, never an application's client).
const TOKEN_SRC: [u8; 4] = [127, 77, 77, 77];
const TOKEN_MAGIC: [u8; 8] = *b"rspreld\x01";
const TOKEN_LEN: usize = 16;
/// A token consumed by another process this many times gives up (its connection is closed).
const TOKEN_TRIES: u32 = 256;

fn errno() -> c_int {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// A socket address with its length.
#[derive(Clone, Copy)]
pub struct Addr {
    /// The address.
    pub ss: sockaddr_storage,
    /// Its length.
    pub len: socklen_t,
}

impl Addr {
    fn empty() -> Self {
        Addr {
            // SAFETY: sockaddr_storage is plain old data; all zeroes is AF_UNSPEC.
            ss: unsafe { std::mem::zeroed() },
            len: std::mem::size_of::<sockaddr_storage>() as socklen_t,
        }
    }

    /// Copies `len` bytes from `addr`.
    ///
    /// # Safety
    /// `addr` points to `len` readable bytes.
    pub unsafe fn from_raw(addr: *const sockaddr, len: socklen_t) -> Self {
        let mut a = Addr::empty();
        let n = (len as usize).min(std::mem::size_of::<sockaddr_storage>());
        // SAFETY: the caller's n readable bytes into our storage of at least n bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(addr as *const u8, &mut a.ss as *mut _ as *mut u8, n)
        };
        a.len = n as socklen_t;
        a
    }

    /// An IPv4 address and port (host order).
    fn v4(ip: [u8; 4], port: u16) -> Self {
        let mut a = Addr::empty();
        // SAFETY: our storage is large enough for a sockaddr_in.
        let s = unsafe { &mut *(a.mut_ptr() as *mut libc::sockaddr_in) };
        s.sin_family = libc::AF_INET as _;
        s.sin_port = port.to_be();
        s.sin_addr.s_addr = u32::from_ne_bytes(ip);
        a.len = std::mem::size_of::<libc::sockaddr_in>() as socklen_t;
        a
    }

    fn ptr(&self) -> *const sockaddr {
        &self.ss as *const _ as *const sockaddr
    }

    fn mut_ptr(&mut self) -> *mut sockaddr {
        &mut self.ss as *mut _ as *mut sockaddr
    }

    fn place(&self) -> Place {
        // SAFETY: our own storage of len bytes.
        unsafe { place(self.ptr(), self.len) }
    }

    fn port(&self) -> u16 {
        // sin_port and sin6_port sit at the same offset.
        // SAFETY: storage is large enough for a sockaddr_in.
        u16::from_be(unsafe { (*(self.ptr() as *const libc::sockaddr_in)).sin_port })
    }

    /// The IPv4 address (an IPv4-mapped one too), if it is one.
    fn ipv4(&self) -> Option<[u8; 4]> {
        match self.ss.ss_family as c_int {
            libc::AF_INET => {
                // SAFETY: an AF_INET address in storage large enough for it.
                let a = unsafe { &*(self.ptr() as *const libc::sockaddr_in) };
                Some(a.sin_addr.s_addr.to_ne_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address in storage large enough for it.
                let a = unsafe { &*(self.ptr() as *const libc::sockaddr_in6) };
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr)
                    .to_ipv4_mapped()
                    .map(|v| v.octets())
            }
            _ => None,
        }
    }

    fn is_token_source(&self) -> bool {
        match self.ss.ss_family as c_int {
            libc::AF_INET => {
                // SAFETY: an AF_INET address in storage large enough for it.
                let a = unsafe { &*(self.ptr() as *const libc::sockaddr_in) };
                a.sin_addr.s_addr.to_ne_bytes() == TOKEN_SRC
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address in storage large enough for it.
                let a = unsafe { &*(self.ptr() as *const libc::sockaddr_in6) };
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).to_ipv4_mapped()
                    == Some(std::net::Ipv4Addr::from(TOKEN_SRC))
            }
            _ => false,
        }
    }

    /// Writes the address out as accept(2) and getpeername(2) do (truncating, true length).
    ///
    /// # Safety
    /// `addr`/`len` are null or as accept(2) takes them.
    pub unsafe fn copy_out(&self, addr: *mut sockaddr, len: *mut socklen_t) {
        if addr.is_null() || len.is_null() {
            return;
        }
        // SAFETY: len is a valid pointer (C contract).
        let room = unsafe { *len } as usize;
        let n = room.min(self.len as usize);
        // SAFETY: addr has room writable bytes (C contract); we copy at most that.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr() as *const u8, addr as *mut u8, n);
            *len = self.len;
        }
    }
}

fn sockname(fd: RawFd) -> Option<Addr> {
    let mut a = Addr::empty();
    // SAFETY: our storage and its length.
    (unsafe { real::getsockname(fd, a.mut_ptr(), &mut a.len) } == 0).then_some(a)
}

fn fd_flags(fd: RawFd) -> (bool, bool) {
    // SAFETY: fcntl queries with no memory argument.
    let fl = unsafe { real::fcntl(fd, libc::F_GETFL, 0) };
    // SAFETY: as above.
    let fdfl = unsafe { real::fcntl(fd, libc::F_GETFD, 0) };
    (
        fl >= 0 && fl & libc::O_NONBLOCK != 0,
        fdfl >= 0 && fdfl & libc::FD_CLOEXEC != 0,
    )
}

/// The candidate gives up on conversion: a kernel socket from now on.
pub fn give_up(fd: RawFd) {
    table::with(|d| d.candidates.remove(&fd));
    table::set_slot(fd, Slot::Kernel);
}

/// Puts rsocket `r` in place of the application's descriptor `fd` (the kernel socket there
/// goes). On error `r` is closed.
fn adopt(
    fd: RawFd,
    r: RawFd,
    domain: c_int,
    nonblocking: bool,
    cloexec: bool,
) -> Result<(), c_int> {
    rs::rfcntl(
        r,
        libc::F_SETFL,
        if nonblocking {
            libc::O_NONBLOCK as _
        } else {
            0
        },
    );
    // SAFETY: dup3 of two descriptors; fd is the application's, replaced on purpose.
    if unsafe { real::dup3(r, fd, if cloexec { libc::O_CLOEXEC } else { 0 }) } < 0 {
        let e = errno();
        rs::rclose(r);
        return Err(e);
    }
    table::with(|d| {
        d.candidates.remove(&fd);
        *d.rsocket_refs.entry(r).or_insert(0) += 1;
        d.rsocket_domain.insert(r, domain);
    });
    table::set_slot(fd, Slot::Rsocket { rs: r, ours: true });
    Ok(())
}

/// Sets the preload's size variables and the candidate's saved options on a new rsocket.
fn configure(r: RawFd, cand: &table::Candidate) {
    let p = policy::get();
    for (name, v) in [
        (rs::RDMA_SQSIZE, p.sq_size),
        (rs::RDMA_RQSIZE, p.rq_size),
        (rs::RDMA_INLINE, p.inline),
    ] {
        if let Some(v) = v {
            // SAFETY: a local int and its size.
            unsafe { rs::rsetsockopt(r, rs::SOL_RDMA, name, &v as *const i32 as *const _, 4) };
        }
    }
    for o in &cand.options {
        let (v, len) = (o.value.as_ptr() as *const _, o.value.len() as socklen_t);
        if crate::calls::set_timeout(r, o.level, o.name, v, len).is_some() {
            continue;
        }
        // SAFETY: the saved value bytes and their length.
        let ret = unsafe {
            rs::rsetsockopt(
                r,
                o.level,
                o.name,
                o.value.as_ptr() as *const _,
                o.value.len() as socklen_t,
            )
        };
        if ret != 0 {
            trace!(
                "option {}/{} not carried to the rsocket (errno {})",
                o.level,
                o.name,
                errno()
            );
        }
    }
}

/// Waits up to `ms` for the rsocket's connect to finish: Some(0) connected, Some(errno)
/// failed, None still under way.
fn wait_connected(r: RawFd, ms: c_int) -> Option<c_int> {
    let mut p = libc::pollfd {
        fd: r,
        events: libc::POLLOUT,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms.max(0) as u64);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // SAFETY: one pollfd.
        let n = unsafe { rs::rpoll(&mut p, 1, left.as_millis() as c_int) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n == 0 {
            return None;
        }
        let mut err: c_int = 0;
        let mut len = 4 as socklen_t;
        // SAFETY: a local int and its length.
        if unsafe {
            rs::rgetsockopt(
                r,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut c_int as *mut _,
                &mut len,
            )
        } != 0
        {
            return Some(errno());
        }
        return Some(err);
    }
}

/// connect(2) on a candidate.
///
/// # Safety
/// `addr` points to `len` readable bytes.
pub unsafe fn connect(fd: RawFd, addr: *const sockaddr, len: socklen_t) -> c_int {
    if is_dgram_candidate(fd) {
        // SAFETY: C contract.
        return unsafe { connect_dgram(fd, addr, len) };
    }
    // SAFETY: C contract.
    if unsafe { place(addr, len) } != Place::Other {
        give_up(fd);
        // SAFETY: C contract.
        return unsafe { real::connect(fd, addr, len) };
    }
    let Some(cand) = table::with(|d| d.candidates.get(&fd).cloned()) else {
        // SAFETY: C contract.
        return unsafe { real::connect(fd, addr, len) };
    };
    // SAFETY: C contract.
    let dst = unsafe { Addr::from_raw(addr, len) };
    match try_connect(fd, &cand, &dst) {
        Ok(()) => 0,
        Err(e) => {
            trace!(
                "connect over RDMA to port {} failed (errno {e}): kernel TCP",
                dst.port()
            );
            give_up(fd);
            // SAFETY: C contract.
            unsafe { real::connect(fd, addr, len) }
        }
    }
}

fn try_connect(fd: RawFd, cand: &table::Candidate, dst: &Addr) -> Result<(), c_int> {
    let (nonblocking, cloexec) = fd_flags(fd);
    // The rsocket's own number is the library's, never the application's: close-on-exec, or
    // every exec'd program inherits it (the application's number gets its own flag in adopt).
    let r = rs::rsocket(
        cand.domain,
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0,
    );
    if r < 0 {
        return Err(errno());
    }
    configure(r, cand);
    if let Some(local) = sockname(fd).filter(|a| a.port() != 0 || a.place() == Place::Other) {
        // SAFETY: our address and its length.
        if unsafe { rs::rbind(r, local.ptr(), local.len) } != 0 {
            let e = errno();
            rs::rclose(r);
            return Err(e);
        }
    }
    // SAFETY: our address and its length.
    if unsafe { rs::rconnect(r, dst.ptr(), dst.len) } != 0 && errno() != libc::EINPROGRESS {
        let e = errno();
        rs::rclose(r);
        return Err(e);
    }
    match wait_connected(r, policy::get().connect_ms) {
        Some(0) => {}
        Some(e) => {
            rs::rclose(r);
            return Err(e);
        }
        None => {
            rs::rclose(r);
            return Err(libc::ETIMEDOUT);
        }
    }
    adopt(fd, r, cand.domain, nonblocking, cloexec)?;
    trace!(
        "fd {fd}: connected over RDMA (rsocket {r}) to port {}",
        dst.port()
    );
    Ok(())
}

/// Whether candidate `fd` is a UDP socket.
pub fn is_dgram_candidate(fd: RawFd) -> bool {
    table::with(|d| d.candidates.get(&fd).is_some_and(|c| c.dgram))
}

/// Whether rsocket `r` is a datagram rsocket.
pub fn is_dgram_rsocket(r: RawFd) -> bool {
    matches!(
        rs_core::socket::lookup_any(r),
        Ok(rs_core::socket::Socket::Dgram(_))
    )
}

/// Errors that say RDMA cannot carry a UDP socket's traffic there (no RDMA device on that
/// address or route, or one without unreliable datagrams: iWARP): the kernel socket goes on.
fn not_rdma(e: c_int) -> bool {
    matches!(
        e,
        libc::EADDRNOTAVAIL
            | libc::ENODEV
            | libc::ESOCKTNOSUPPORT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EAFNOSUPPORT
            | libc::EPROTONOSUPPORT
            | libc::ENOSYS
    )
}

/// A datagram rsocket for UDP candidate `fd`, with its saved options.
fn new_dgram(cand: &table::Candidate) -> Result<RawFd, c_int> {
    let r = rs::rsocket(
        cand.domain,
        libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0,
    );
    if r < 0 {
        return Err(errno());
    }
    configure(r, cand);
    Ok(r)
}

/// bind(2) of a UDP candidate: to the wildcard or an address of an RDMA device with
/// unreliable datagrams, the socket becomes a datagram rsocket bound there (its peers reached
/// over RDMA where they are rsockets on such a route, by plain UDP elsewhere); to loopback or
/// an address of another device, it stays a kernel socket.
///
/// # Safety
/// `addr` points to `len` readable bytes (C contract of bind).
pub unsafe fn bind_dgram(fd: RawFd, addr: *const sockaddr, len: socklen_t) -> c_int {
    let cand = table::with(|d| d.candidates.get(&fd).cloned());
    // SAFETY: C contract.
    let place = unsafe { place(addr, len) };
    let Some(cand) = cand.filter(|_| matches!(place, Place::Other | Place::Wildcard)) else {
        give_up(fd);
        // SAFETY: C contract.
        return unsafe { real::bind(fd, addr, len) };
    };
    let r = match new_dgram(&cand) {
        Ok(r) => r,
        Err(e) => {
            trace!("fd {fd}: no datagram rsocket (errno {e}): kernel UDP");
            give_up(fd);
            // SAFETY: C contract.
            return unsafe { real::bind(fd, addr, len) };
        }
    };
    // SAFETY: C contract.
    if unsafe { rs::rbind(r, addr, len) } != 0 {
        let e = errno();
        rs::rclose(r);
        if not_rdma(e) {
            trace!("fd {fd}: UDP bind not on an RDMA device (errno {e}): kernel UDP");
            give_up(fd);
            // SAFETY: C contract.
            return unsafe { real::bind(fd, addr, len) };
        }
        set_errno(e);
        return -1;
    }
    let (nonblocking, cloexec) = fd_flags(fd);
    match adopt(fd, r, cand.domain, nonblocking, cloexec) {
        Ok(()) => {
            trace!("fd {fd}: UDP socket bound as datagram rsocket {r}");
            0
        }
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// connect(2) of an unbound UDP candidate: a datagram rsocket if the route to `addr` leads to
/// an RDMA device with unreliable datagrams, else the kernel socket.
///
/// # Safety
/// `addr` points to `len` readable bytes (C contract of connect).
pub unsafe fn connect_dgram(fd: RawFd, addr: *const sockaddr, len: socklen_t) -> c_int {
    let cand = table::with(|d| d.candidates.get(&fd).cloned());
    // SAFETY: C contract.
    let Some(cand) = cand.filter(|_| unsafe { place(addr, len) } == Place::Other) else {
        give_up(fd);
        // SAFETY: C contract.
        return unsafe { real::connect(fd, addr, len) };
    };
    let r = match new_dgram(&cand) {
        Ok(r) => r,
        Err(_) => {
            give_up(fd);
            // SAFETY: C contract.
            return unsafe { real::connect(fd, addr, len) };
        }
    };
    // SAFETY: C contract.
    if unsafe { rs::rconnect(r, addr, len) } != 0 {
        let e = errno();
        rs::rclose(r);
        if not_rdma(e) {
            trace!("fd {fd}: UDP connect not routed to an RDMA device (errno {e}): kernel UDP");
            give_up(fd);
            // SAFETY: C contract.
            return unsafe { real::connect(fd, addr, len) };
        }
        set_errno(e);
        return -1;
    }
    let (nonblocking, cloexec) = fd_flags(fd);
    match adopt(fd, r, cand.domain, nonblocking, cloexec) {
        Ok(()) => {
            trace!("fd {fd}: UDP socket connected as datagram rsocket {r}");
            0
        }
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// The first send of an unbound UDP candidate to `addr`: as [`connect_dgram`] decides, the
/// datagram leaves by the rsocket (`send`) or the kernel socket (`kernel`).
///
/// # Safety
/// `addr` is NULL or points to `len` readable bytes.
pub unsafe fn send_dgram(
    fd: RawFd,
    addr: *const sockaddr,
    len: socklen_t,
    send: impl FnOnce(RawFd) -> isize,
    kernel: impl FnOnce() -> isize,
) -> isize {
    let cand = table::with(|d| d.candidates.get(&fd).cloned());
    // SAFETY: the caller's contract.
    let Some(cand) = cand.filter(|_| unsafe { place(addr, len) } == Place::Other) else {
        if !addr.is_null() {
            give_up(fd);
        }
        return kernel();
    };
    let Ok(r) = new_dgram(&cand) else {
        give_up(fd);
        return kernel();
    };
    let n = send(r);
    if n < 0 {
        let e = errno();
        rs::rclose(r);
        if not_rdma(e) {
            trace!("fd {fd}: UDP destination not routed to an RDMA device (errno {e}): kernel UDP");
            give_up(fd);
            return kernel();
        }
        set_errno(e);
        return -1;
    }
    let (nonblocking, cloexec) = fd_flags(fd);
    if adopt(fd, r, cand.domain, nonblocking, cloexec).is_ok() {
        trace!("fd {fd}: UDP socket sends as datagram rsocket {r}");
    }
    n
}

/// A listener's RDMA side.
struct Listener {
    /// The RDMA listener rsocket (None: released to a child, or not listening over RDMA).
    rs: Option<RawFd>,
    /// Where tokens connect: the kernel listener's address (the wildcard as 127.0.0.1).
    target: Addr,
    /// The address the RDMA side listens on.
    local: Addr,
    domain: c_int,
    backlog: c_int,
    /// RDMA connections the application accepted in this process.
    accepted: u64,
    /// Times the RDMA side failed and listened again (see `listen_again`).
    failures: u32,
}

/// A listener whose RDMA side failed this many times serves kernel TCP clients only.
const LISTEN_FAILURES: u32 = 3;

/// A listener's private token route: a loopback listener of this process alone, in every
/// epoll set of this process that the application put the listener in, with the same events
/// and data. Tokens go there rather than to the kernel listener, which other processes (a
/// forking server's workers) share: the kernel wakes only one of the workers waiting on it
/// (EPOLLEXCLUSIVE, as nginx waits), often the same one, which could not take another's
/// tokens; the route wakes the owner's epoll as if its listener were readable, and its accept
/// looks there first.
struct Route {
    fd: RawFd,
    port: u16,
    /// The epoll sets it is in.
    epfds: Vec<RawFd>,
}

/// A token routed privately that the application did not take within this long goes to the
/// kernel listener instead (an epoll set closed without a word, say).
const ROUTE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An accepted RDMA connection waiting for the application's accept.
struct Pending {
    listener: u32,
    /// The rsocket (taken by the accept that claims it).
    conn: Option<RawFd>,
    /// The token's client end (the acceptor watches it for the end of the token).
    token: RawFd,
    /// The token's source port.
    port: u16,
    tries: u32,
    /// When the token was sent over the listener's private route (None: over the kernel
    /// listener, or not sent yet).
    routed: Option<std::time::Instant>,
    /// Never route it privately again (it waited there too long).
    shared_only: bool,
}

#[derive(Default)]
struct Listeners {
    by_id: HashMap<u32, Listener>,
    next_id: u32,
    pending: HashMap<u32, Pending>,
    next_token: u32,
    /// The acceptor's wake-up eventfd in this process (-1: no acceptor yet).
    wake: RawFd,
    /// The process that runs the acceptor.
    acceptor_pid: u32,
    /// Bumped when a new acceptor replaces the running one (after a credential change): an
    /// acceptor whose generation is not this one's ends.
    acceptor_gen: u64,
    /// Listeners the parent handed over at fork (the child listens on them again).
    to_claim: Vec<u32>,
    /// Private token routes of this process's listeners (see [`epoll_mirror`]).
    routes: HashMap<u32, Route>,
}

static LISTENERS: SpinLock<Option<Listeners>> = SpinLock::new(None);

fn listeners<R>(f: impl FnOnce(&mut Listeners) -> R) -> R {
    let mut g = LISTENERS.lock();
    f(g.get_or_insert_with(|| Listeners {
        wake: -1,
        ..Default::default()
    }))
}

/// listen(2) on a candidate or a listener.
pub fn listen(fd: RawFd, backlog: c_int) -> c_int {
    // SAFETY: listen has no memory arguments.
    let ret = unsafe { real::listen(fd, backlog) };
    if ret != 0 || table::slot(fd) != Slot::Candidate {
        return ret;
    }
    let cand = table::with(|d| d.candidates.get(&fd).cloned()).unwrap_or_default();
    match start_listener(fd, &cand, backlog) {
        Ok(id) => {
            table::with(|d| {
                d.candidates.remove(&fd);
                *d.listener_refs.entry(id).or_insert(0) += 1;
            });
            table::set_slot(fd, Slot::Listener { id });
        }
        Err(e) => {
            trace!("fd {fd}: listening over the kernel only (errno {e})");
            give_up(fd);
        }
    }
    0
}

fn v6only(fd: RawFd) -> bool {
    let mut v: c_int = 0;
    let mut len = 4 as socklen_t;
    // SAFETY: a local int and its length.
    let r = unsafe {
        real::getsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &mut v as *mut c_int as *mut _,
            &mut len,
        )
    };
    r == 0 && v != 0
}

fn start_listener(fd: RawFd, cand: &table::Candidate, backlog: c_int) -> Result<u32, c_int> {
    let local = sockname(fd).ok_or_else(errno)?;
    let mut target = local;
    match local.place() {
        Place::Other => {}
        Place::Wildcard => {
            if local.ss.ss_family as c_int == libc::AF_INET6 && v6only(fd) {
                return Err(libc::EAFNOSUPPORT);
            }
            // The wildcard takes loopback connections: tokens go to 127.0.0.1 (mapped for v6).
            target = loopback_of(&local);
        }
        _ => return Err(libc::EADDRNOTAVAIL),
    }
    let r = rdma_listen(cand.domain, &local, backlog, Some(cand))?;
    let id = listeners(|l| {
        let id = l.next_id;
        l.next_id += 1;
        l.by_id.insert(
            id,
            Listener {
                rs: Some(r),
                target,
                local,
                domain: cand.domain,
                backlog,
                accepted: 0,
                failures: 0,
            },
        );
        id
    });
    ensure_acceptor();
    trace!(
        "fd {fd}: listening over RDMA too (rsocket {r}, port {})",
        local.port()
    );
    Ok(id)
}

fn loopback_of(a: &Addr) -> Addr {
    let mut t = *a;
    if a.ss.ss_family as c_int == libc::AF_INET {
        // SAFETY: an AF_INET address in our storage.
        let s = unsafe { &mut *(t.mut_ptr() as *mut libc::sockaddr_in) };
        s.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    } else {
        // SAFETY: an AF_INET6 address in our storage.
        let s = unsafe { &mut *(t.mut_ptr() as *mut libc::sockaddr_in6) };
        s.sin6_addr.s6_addr = std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets();
    }
    t
}

fn rdma_listen(
    domain: c_int,
    local: &Addr,
    backlog: c_int,
    cand: Option<&table::Candidate>,
) -> Result<RawFd, c_int> {
    // Close-on-exec as in try_connect; the connections it accepts take its options, so
    // their own numbers are close-on-exec too.
    let r = rs::rsocket(
        domain,
        libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        0,
    );
    if r < 0 {
        return Err(errno());
    }
    if let Some(c) = cand {
        configure(r, c);
    }
    let one: c_int = 1;
    // SAFETY: a local int and its size.
    unsafe {
        rs::rsetsockopt(
            r,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const c_int as *const _,
            4,
        )
    };
    // SAFETY: our address and its length.
    if unsafe { rs::rbind(r, local.ptr(), local.len) } != 0 || rs::rlisten(r, backlog.max(16)) != 0
    {
        let e = errno();
        rs::rclose(r);
        return Err(e);
    }
    Ok(r)
}

fn ensure_acceptor() {
    let pid = std::process::id();
    let start = listeners(|l| {
        if l.acceptor_pid == pid && l.wake >= 0 {
            return None;
        }
        // SAFETY: eventfd has no memory arguments.
        l.wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        l.acceptor_pid = pid;
        l.acceptor_gen += 1;
        Some(l.acceptor_gen)
    });
    match start {
        Some(generation) => {
            // The program's signals are for its own threads (see without_signals).
            let h = rs_core::verbs::os::without_signals(|| {
                std::thread::Builder::new()
                    .name("rspreload-accept".into())
                    .spawn(move || acceptor(generation))
            });
            if let Some(old) = ACCEPTOR.lock().replace((pid, h.ok())) {
                // A forked parent's thread: not ours to join or detach.
                std::mem::forget(old);
            }
        }
        None => wake_acceptor(),
    }
}

/// The running acceptor thread and the process it runs in (joined when a new one replaces
/// it; a forked child's copy names a thread of its parent).
type AcceptorThread = (u32, Option<std::thread::JoinHandle<()>>);
static ACCEPTOR: SpinLock<Option<AcceptorThread>> = SpinLock::new(None);

fn wake_acceptor() {
    signal(listeners(|l| l.wake));
}

/// Wakes the acceptor that sleeps on eventfd `w` (none if `w` < 0).
fn signal(w: RawFd) {
    if w >= 0 {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local.
        unsafe { real::write(w, &one as *const u64 as *const _, 8) };
    }
}

/// The acceptor thread: accepts RDMA connections, makes their tokens, renews consumed ones.
fn acceptor(generation: u64) {
    let pid = std::process::id();
    let mut claim_deadline: Option<std::time::Instant> = None;
    let replaced = || listeners(|l| l.acceptor_pid != pid || l.acceptor_gen != generation);
    loop {
        let routed = reroute_stale_tokens();
        let (wake, mut fds, to_claim) = listeners(|l| {
            let mut v = Vec::new();
            for (&id, li) in &l.by_id {
                if let Some(r) = li.rs {
                    v.push((
                        libc::pollfd {
                            fd: r,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        Some(id),
                        None,
                    ));
                }
            }
            for (&t, p) in &l.pending {
                v.push((
                    libc::pollfd {
                        fd: p.token,
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    None,
                    Some(t),
                ));
            }
            (l.wake, v, !l.to_claim.is_empty())
        });
        if replaced() {
            // A forked child's copy of the state (its own acceptor runs there), or a new
            // acceptor took over after a credential change.
            return;
        }
        if to_claim {
            let deadline = *claim_deadline.get_or_insert_with(|| {
                std::time::Instant::now() + std::time::Duration::from_secs(3)
            });
            claim(std::time::Instant::now() >= deadline);
        } else {
            claim_deadline = None;
        }
        let mut pfds: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        }];
        pfds.extend(fds.iter().map(|f| f.0));
        let timeout = if to_claim {
            20
        } else if routed {
            250
        } else {
            1000
        };
        // SAFETY: pfds is a valid array of pfds.len() pollfds.
        let n = unsafe { rs::rpoll(pfds.as_mut_ptr(), pfds.len() as _, timeout) };
        if replaced() {
            // What it polled may be the new acceptor's by now (numbers are reused).
            return;
        }
        if n <= 0 {
            continue;
        }
        if pfds[0].revents != 0 {
            let mut b = 0u64;
            // SAFETY: reads 8 bytes into a local.
            unsafe { real::read(wake, &mut b as *mut u64 as *mut _, 8) };
        }
        for (i, f) in fds.iter_mut().enumerate() {
            f.0.revents = pfds[i + 1].revents;
        }
        for (p, listener, token) in fds {
            if p.revents == 0 {
                continue;
            }
            if let Some(id) = listener {
                if p.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    listen_again(id, p.fd);
                } else {
                    accept_rdma(id, p.fd);
                }
            } else if let Some(t) = token {
                token_ended(t);
            }
        }
    }
}

/// Tokens that waited at a private route longer than [`ROUTE_WAIT`] go to the kernel listener
/// instead. Returns whether privately routed tokens still wait (to be looked at again soon).
fn reroute_stale_tokens() -> bool {
    let (stale, waiting) = listeners(|l| {
        let mut stale = Vec::new();
        let mut waiting = false;
        for (&t, p) in l.pending.iter_mut() {
            let Some(t0) = p.routed.filter(|_| p.conn.is_some()) else {
                continue;
            };
            if t0.elapsed() < ROUTE_WAIT {
                waiting = true;
                continue;
            }
            p.routed = None;
            p.shared_only = true;
            stale.push((t, std::mem::replace(&mut p.token, -1)));
        }
        (stale, waiting)
    });
    for (t, k) in stale {
        trace!("token {t}: not taken at the private route, sent to the kernel listener");
        if k >= 0 {
            // SAFETY: our own token descriptor.
            unsafe { real::close(k) };
        }
        issue_token(t);
    }
    waiting
}

/// The process's credentials changed (setuid and the like, as a server's worker does after
/// fork, nginx's among them). Every RDMA file opened before is refused from now on, in every
/// thread (see `listen_again`), and so is every file opened by a thread that existed before
/// the change (each thread got credentials of its own). So the listeners' RDMA sides and
/// pending connections go, the acceptor is replaced by a new one started from this thread
/// (threads made from it share its credentials, as does the library's new service thread),
/// and that one listens again over RDMA (`claim`). Connections made before stay broken: a
/// server changes its credentials before it serves.
pub fn credentials_changed() {
    rs_core::socket::credentials_changed();
    // The running acceptor ends first (its generation is no longer current), and only then
    // are the listeners looked at: a claim it had under way (a listener handed over at fork,
    // or one a previous change of credentials let go, as nginx's setgid, setgroups and setuid
    // come one after the other) would otherwise set a listener opened with the old
    // credentials after the look, and take it off the list to claim, so that no acceptor
    // would serve it: RDMA clients waited for the connect timeout, then went over TCP.
    let old_wake = listeners(|l| {
        l.acceptor_gen += 1;
        std::mem::replace(&mut l.wake, -1)
    });
    signal(old_wake);
    let previous = ACCEPTOR.lock().take();
    match previous {
        Some((pid, Some(h)))
            if pid == std::process::id() && h.thread().id() != std::thread::current().id() =>
        {
            // Before anything it polled closes (numbers are reused), and before the new one
            // starts: one acceptor at a time.
            let _ = h.join();
        }
        other => std::mem::forget(other),
    }
    if old_wake >= 0 {
        // SAFETY: the old acceptor's eventfd; that thread has ended.
        unsafe { real::close(old_wake) };
    }
    let (old, pending) = listeners(|l| {
        let mut old = Vec::new();
        for (&id, li) in l.by_id.iter_mut() {
            let had = li.rs.is_some() || l.to_claim.contains(&id);
            if let Some(r) = li.rs.take() {
                old.push(r);
            }
            if had && li.failures < LISTEN_FAILURES {
                li.failures = 0;
                if !l.to_claim.contains(&id) {
                    l.to_claim.push(id);
                }
            }
        }
        let pending: Vec<u32> = l.pending.keys().copied().collect();
        (old, pending)
    });
    for t in pending {
        drop_pending(t);
    }
    for r in old {
        rs::rclose(r);
    }
    if listeners(|l| !l.to_claim.is_empty()) {
        ensure_acceptor();
        trace!("credentials changed: listening again over RDMA from a new acceptor");
    }
}

/// The RDMA side of listener `id` failed (rsocket `r`): it listens again, at most
/// [`LISTEN_FAILURES`] times, then the listener serves kernel TCP clients only (RDMA clients
/// are refused at once and continue over TCP).
///
/// What fails it: the kernel serves a CM or verbs file's write(2) commands only to a thread
/// whose credentials are the very ones the file was opened with (`ib_safe_file_access`). A
/// process that calls setuid or setgid (nginx's workers, even to the same user) gives every
/// thread its own new credentials, so a file opened before, or by another of its threads
/// (the rsocket service thread), is refused with EACCES from then on.
fn listen_again(id: u32, r: RawFd) {
    let again = listeners(|l| {
        let li = l.by_id.get_mut(&id)?;
        if li.rs != Some(r) {
            return None;
        }
        li.rs = None;
        li.failures += 1;
        let again = li.failures < LISTEN_FAILURES;
        if again {
            l.to_claim.push(id);
        }
        Some(again)
    });
    if let Some(again) = again {
        rs::rclose(r);
        if again {
            trace!("listener {id}: the RDMA side failed (rsocket {r}), listening again");
        } else {
            trace!("listener {id}: the RDMA side failed {LISTEN_FAILURES} times: kernel only");
        }
    }
}

/// Accepts every RDMA connection waiting at listener `id` and makes its token.
fn accept_rdma(id: u32, r: RawFd) {
    loop {
        // SAFETY: no address wanted.
        let c = unsafe { rs::raccept(r, std::ptr::null_mut(), std::ptr::null_mut()) };
        if c < 0 {
            return;
        }
        let t = listeners(|l| {
            let t = l.next_token;
            l.next_token = l.next_token.wrapping_add(1);
            l.pending.insert(
                t,
                Pending {
                    listener: id,
                    conn: Some(c),
                    token: -1,
                    port: 0,
                    tries: 0,
                    routed: None,
                    shared_only: false,
                },
            );
            t
        });
        issue_token(t);
    }
}

/// Makes (again) the token of pending connection `t`; drops the connection if it cannot.
fn issue_token(t: u32) {
    let Some((target, tries, private)) = listeners(|l| {
        let p = l.pending.get(&t)?;
        let private = l
            .routes
            .get(&p.listener)
            .filter(|r| !r.epfds.is_empty() && !p.shared_only)
            .map(|r| Addr::v4([127, 0, 0, 1], r.port));
        Some((l.by_id.get(&p.listener)?.target, p.tries, private))
    }) else {
        drop_pending(t);
        return;
    };
    if tries >= TOKEN_TRIES {
        trace!("token {t}: consumed elsewhere {tries} times, connection dropped");
        drop_pending(t);
        return;
    }
    match connect_token(private.as_ref().unwrap_or(&target), t) {
        Ok((k, port)) => listeners(|l| {
            if let Some(p) = l.pending.get_mut(&t) {
                p.token = k;
                p.port = port;
                p.tries += 1;
                p.routed = private.map(|_| std::time::Instant::now());
            }
        }),
        Err(e) => {
            trace!("token {t}: cannot reach the kernel listener (errno {e}), connection dropped");
            drop_pending(t);
        }
    }
}

fn drop_pending(t: u32) {
    if let Some(p) = listeners(|l| l.pending.remove(&t)) {
        if let Some(c) = p.conn {
            rs::rclose(c);
        }
        if p.token >= 0 {
            // SAFETY: our own token descriptor.
            unsafe { real::close(p.token) };
        }
    }
}

/// Connects a token to `target`: its descriptor and source port.
fn connect_token(target: &Addr, t: u32) -> Result<(RawFd, u16), c_int> {
    // SAFETY: socket has no memory arguments.
    let k = unsafe { real::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if k < 0 {
        return Err(errno());
    }
    let fail = |k| {
        let e = errno();
        // SAFETY: our own descriptor.
        unsafe { real::close(k) };
        Err(e)
    };
    // Loopback-delivered targets take tokens from TOKEN_SRC; a listener on an interface
    // address gets them from that address (a loopback source cannot reach it when policy
    // routing sends it over the wire), told apart by the token's port.
    let from = match target.ipv4() {
        Some(ip) if ip[0] != 127 => ip,
        _ => TOKEN_SRC,
    };
    let src = Addr::v4(from, 0);
    // A dual-stack listener takes the IPv4 token at the mapped address's IPv4.
    let dst = Addr::v4(target.ipv4().unwrap_or([127, 0, 0, 1]), target.port());
    // SAFETY: our address and its length.
    if unsafe { real::bind(k, src.ptr(), src.len) } != 0 {
        return fail(k);
    }
    // The port is known before the connect, so an accept that races ahead recognises it.
    let port = sockname(k).map_or(0, |a| a.port());
    listeners(|l| {
        if let Some(p) = l.pending.get_mut(&t) {
            p.port = port;
        }
    });
    // SAFETY: our address and its length.
    if unsafe { real::connect(k, dst.ptr(), dst.len) } != 0 {
        return fail(k);
    }
    let mut tag = [0u8; TOKEN_LEN];
    tag[..8].copy_from_slice(&TOKEN_MAGIC);
    tag[8..12].copy_from_slice(&std::process::id().to_ne_bytes());
    tag[12..].copy_from_slice(&t.to_ne_bytes());
    // SAFETY: writes our 16-byte tag.
    if unsafe { real::send(k, tag.as_ptr() as *const _, TOKEN_LEN, libc::MSG_NOSIGNAL) }
        != TOKEN_LEN as isize
    {
        return fail(k);
    }
    Ok((k, port))
}

/// A token's connection ended: claimed here (done), or consumed by another process (renew).
fn token_ended(t: u32) {
    let claimed = listeners(|l| {
        let p = l.pending.get_mut(&t)?;
        let k = std::mem::replace(&mut p.token, -1);
        let claimed = p.conn.is_none();
        if claimed {
            l.pending.remove(&t);
        }
        Some((k, claimed))
    });
    let Some((k, claimed)) = claimed else {
        return;
    };
    if k >= 0 {
        // SAFETY: our own token descriptor.
        unsafe { real::close(k) };
    }
    if !claimed {
        issue_token(t);
    }
}

/// Reads a token's tag from an accepted kernel connection (waits up to 2 s for it).
fn read_tag(k: RawFd) -> Option<(u32, u32)> {
    let mut tag = [0u8; TOKEN_LEN];
    let mut got = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while got < TOKEN_LEN {
        let mut p = libc::pollfd {
            fd: k,
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline
            .saturating_duration_since(std::time::Instant::now())
            .as_millis() as c_int;
        // SAFETY: one pollfd.
        if unsafe { libc::poll(&mut p, 1, left) } <= 0 {
            return None;
        }
        // SAFETY: reads into the rest of our tag buffer.
        let n = unsafe {
            real::recv(
                k,
                tag[got..].as_mut_ptr() as *mut _,
                TOKEN_LEN - got,
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            if n < 0 && matches!(errno(), libc::EAGAIN | libc::EINTR) {
                continue;
            }
            return None;
        }
        got += n as usize;
    }
    (tag[..8] == TOKEN_MAGIC).then(|| {
        (
            u32::from_ne_bytes(tag[8..12].try_into().expect("4 bytes")),
            u32::from_ne_bytes(tag[12..].try_into().expect("4 bytes")),
        )
    })
}

/// Whether the connection `k` that listener `id` accepted from `peer` is a token (ours or
/// another process's) rather than an application's client.
fn is_token(peer: &Addr, id: u32, k: RawFd) -> bool {
    if peer.is_token_source() {
        return true;
    }
    let Some(ip) = peer.ipv4() else {
        return false;
    };
    let (local, ours) = listeners(|l| {
        let local = l.by_id.get(&id).and_then(|li| li.local.ipv4());
        let port = peer.port();
        (
            local,
            l.pending
                .values()
                .any(|p| p.listener == id && p.port == port),
        )
    });
    if local != Some(ip) {
        return false;
    }
    if ours {
        return true;
    }
    // From the listener's own address but not one of our tokens: another process's token
    // shows its tag right after the connect (one send), a local client whatever it sends. What
    // has come so far is looked at; while it is a beginning of the tag, more is waited for (a
    // token accepted before its tag arrived must not be served as a client), at most
    // TAG_WAIT_MS (a local client that sends nothing first, or a few bytes that happen to
    // match, waits that long once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(TAG_WAIT_MS);
    loop {
        let mut tag = [0u8; TOKEN_LEN];
        // SAFETY: peeks into our buffer.
        let n = unsafe {
            real::recv(
                k,
                tag.as_mut_ptr() as *mut _,
                TOKEN_LEN,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return false; // closed before anything came: nobody's token
        }
        if n > 0 {
            let m = (n as usize).min(TOKEN_MAGIC.len());
            if tag[..m] != TOKEN_MAGIC[..m] {
                return false;
            }
            if n as usize == TOKEN_LEN {
                return true;
            }
        } else if !matches!(errno(), libc::EAGAIN | libc::EINTR) {
            return false;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut p = libc::pollfd {
            fd: k,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd. A short sleep when data is there but not all of it yet.
        unsafe { libc::poll(&mut p, 1, (left.as_millis() as c_int).clamp(1, 5)) };
    }
}

/// How long an accepted connection from the listener's own address may take to show whether
/// it is another process's token.
const TAG_WAIT_MS: u64 = 200;

/// accept4(2) on a listener.
///
/// # Safety
/// `addr`/`len` as accept4(2) takes them.
pub unsafe fn accept(
    fd: RawFd,
    id: u32,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // This process's own tokens first (its private route), then the kernel listener.
    while let Some(k) = accept_routed(id) {
        // SAFETY: C contract of accept.
        if let Some(r) = unsafe { take_token(k, id, addr, len, flags) } {
            return r;
        }
    }
    loop {
        let mut peer = Addr::empty();
        // SAFETY: our storage and its length.
        let k = unsafe { real::accept4(fd, peer.mut_ptr(), &mut peer.len, flags) };
        if k < 0 {
            return k;
        }
        if !is_token(&peer, id, k) {
            table::set_slot(k, Slot::Kernel);
            // SAFETY: C contract of accept.
            unsafe { peer.copy_out(addr, len) };
            return k;
        }
        // SAFETY: C contract of accept.
        if let Some(r) = unsafe { take_token(k, id, addr, len, flags) } {
            return r;
        }
    }
}

/// A token waiting at listener `id`'s private route, accepted (None: none waits).
fn accept_routed(id: u32) -> Option<RawFd> {
    let route = listeners(|l| l.routes.get(&id).map(|r| r.fd))?;
    // SAFETY: no address wanted; the route is non-blocking.
    let k = unsafe {
        real::accept4(
            route,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    (k >= 0).then_some(k)
}

/// Puts the RDMA connection of token `k` (accepted at listener `id`) in the token's place and
/// returns accept's result; None when it is not one of this process's pending tokens (then
/// closed: its owner makes a new one).
///
/// # Safety
/// `addr`/`len` as accept4(2) takes them.
unsafe fn take_token(
    k: RawFd,
    id: u32,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> Option<c_int> {
    let claimed = read_tag(k).and_then(|(pid, t)| {
        if pid != std::process::id() {
            return None;
        }
        listeners(|l| {
            let p = l.pending.get_mut(&t)?;
            let c = p.conn.take()?;
            if let Some(li) = l.by_id.get_mut(&id) {
                li.accepted += 1;
            }
            Some((
                c,
                l.by_id
                    .get(&p.listener)
                    .map_or(libc::AF_INET, |li| li.domain),
            ))
        })
    });
    let Some((c, domain)) = claimed else {
        // Someone else's token (or a stale one): its owner makes a new one.
        // SAFETY: the descriptor accept just gave us.
        unsafe { real::close(k) };
        return None;
    };
    let nonblocking = flags & libc::SOCK_NONBLOCK != 0;
    let cloexec = flags & libc::SOCK_CLOEXEC != 0;
    match adopt(k, c, domain, nonblocking, cloexec) {
        Ok(()) => {
            if !addr.is_null() && !len.is_null() {
                // SAFETY: C contract of accept.
                unsafe { rs::rgetpeername(c, addr, len) };
            }
            trace!("fd {k}: accepted over RDMA (rsocket {c})");
            Some(k)
        }
        Err(e) => {
            // SAFETY: the token's descriptor; the connection is gone.
            unsafe { real::close(k) };
            set_errno(e);
            Some(-1)
        }
    }
}

/// The application changed listener `id`'s registration in epoll set `epfd` (`op`, with
/// `ev`): the listener's private token route follows (made at the first registration).
/// Failures leave the tokens on the kernel listener, as without a route.
///
/// # Safety
/// `ev` is valid for EPOLL_CTL_ADD and EPOLL_CTL_MOD.
pub unsafe fn epoll_mirror(epfd: RawFd, op: c_int, id: u32, ev: *mut libc::epoll_event) {
    if op == libc::EPOLL_CTL_ADD && listeners(|l| !l.routes.contains_key(&id)) {
        let Some((fd, port)) = new_route() else {
            return;
        };
        let lost = listeners(|l| {
            l.routes
                .insert(
                    id,
                    Route {
                        fd,
                        port,
                        epfds: Vec::new(),
                    },
                )
                .map(|r| r.fd)
        });
        if let Some(old) = lost {
            // SAFETY: a route descriptor of ours that lost the race above.
            unsafe { real::close(old) };
        }
    }
    let Some(route) = listeners(|l| l.routes.get(&id).map(|r| r.fd)) else {
        return;
    };
    // SAFETY: C contract for ev; the route is our descriptor.
    let ok = unsafe { real::epoll_ctl(epfd, op, route, ev) } == 0;
    listeners(|l| {
        if let Some(r) = l.routes.get_mut(&id) {
            match op {
                libc::EPOLL_CTL_ADD if ok => r.epfds.push(epfd),
                libc::EPOLL_CTL_DEL => r.epfds.retain(|&e| e != epfd),
                libc::EPOLL_CTL_MOD if !ok => r.epfds.retain(|&e| e != epfd),
                _ => {}
            }
        }
    });
    trace!("listener {id}: epoll set {epfd} op {op}: private token route ok={ok}");
}

/// A loopback listener on a free port: its descriptor (non-blocking, close-on-exec) and port.
fn new_route() -> Option<(RawFd, u16)> {
    // SAFETY: socket has no memory arguments.
    let fd = unsafe {
        real::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    let a = Addr::v4([127, 0, 0, 1], 0);
    // SAFETY: our address and its length; listen has no memory arguments.
    let ok =
        unsafe { real::bind(fd, a.ptr(), a.len) } == 0 && unsafe { real::listen(fd, 128) } == 0;
    match sockname(fd).map(|a| a.port()) {
        Some(port) if ok => Some((fd, port)),
        _ => {
            // SAFETY: our own descriptor.
            unsafe { real::close(fd) };
            None
        }
    }
}

/// The last application descriptor of listener `id` closed: its RDMA side goes too.
pub fn close_listener(id: u32) {
    let (r, tokens) = listeners(|l| {
        if let Some(route) = l.routes.remove(&id) {
            // SAFETY: our route descriptor (leaves every epoll set with it).
            unsafe { real::close(route.fd) };
        }
        let r = l.by_id.remove(&id).and_then(|li| li.rs);
        let tokens: Vec<u32> = l
            .pending
            .iter()
            .filter(|(_, p)| p.listener == id)
            .map(|(&t, _)| t)
            .collect();
        (r, tokens)
    });
    for t in tokens {
        drop_pending(t);
    }
    if let Some(r) = r {
        rs::rclose(r);
    }
    wake_acceptor();
}

/// Listeners handed from parent to child at this fork (decided in `prepare`).
static HANDING_OVER: SpinLock<Vec<u32>> = SpinLock::new(Vec::new());
static IN_FORK: AtomicBool = AtomicBool::new(false);

/// Before fork: decides which listeners go to the child, then holds the locks over the fork.
pub fn fork_prepare() {
    let hand: Vec<u32> = listeners(|l| {
        l.by_id
            .iter()
            .filter(|(id, li)| {
                li.rs.is_some()
                    && li.accepted == 0
                    && !l.pending.values().any(|p| p.listener == **id)
            })
            .map(|(&id, _)| id)
            .collect()
    });
    *HANDING_OVER.lock() = hand;
    IN_FORK.store(true, Ordering::Relaxed);
    LISTENERS.lock_raw();
    table::DETAILS.lock_raw();
}

/// After fork, in the parent: drops the RDMA side of the listeners handed to the child.
pub fn fork_parent() {
    table::DETAILS.force_unlock();
    LISTENERS.force_unlock();
    IN_FORK.store(false, Ordering::Relaxed);
    let hand = std::mem::take(&mut *HANDING_OVER.lock());
    for id in hand {
        if let Some(r) = listeners(|l| l.by_id.get_mut(&id).and_then(|li| li.rs.take())) {
            rs::rclose(r);
            trace!("listener {id}: RDMA side handed to the forked child");
        }
    }
    wake_acceptor();
}

/// After fork, in the child: the parent's rsockets and pending connections are not ours; the
/// listeners handed over listen again here.
pub fn fork_child() {
    table::DETAILS.force_unlock();
    LISTENERS.force_unlock();
    IN_FORK.store(false, Ordering::Relaxed);
    table::forked();
    table::with(crate::hook::forked);
    let hand = std::mem::take(&mut *HANDING_OVER.lock());
    let (tokens, routes): (Vec<RawFd>, Vec<RawFd>) = listeners(|l| {
        for li in l.by_id.values_mut() {
            li.rs = None;
        }
        let tokens = l
            .pending
            .drain()
            .map(|(_, p)| p.token)
            .filter(|&k| k >= 0)
            .collect();
        l.wake = -1;
        l.acceptor_pid = 0;
        l.to_claim = hand.clone();
        // The parent's routes: the child makes its own when it registers its listeners.
        let routes: Vec<RawFd> = l.routes.drain().map(|(_, r)| r.fd).collect();
        (tokens, routes)
    });
    for fd in routes {
        // SAFETY: the child's copy of a route descriptor.
        unsafe { real::close(fd) };
    }
    for k in tokens {
        // SAFETY: the child's copy of a token descriptor (the parent keeps its own).
        unsafe { real::close(k) };
    }
    if !hand.is_empty() {
        ensure_acceptor();
    }
}

/// In a child that was handed listeners: listens on them over RDMA once the parent let go
/// (`give_up`: stop trying).
fn claim(give_up_now: bool) {
    let ids = listeners(|l| l.to_claim.clone());
    for id in ids {
        let Some((domain, local, backlog)) =
            listeners(|l| l.by_id.get(&id).map(|li| (li.domain, li.local, li.backlog)))
        else {
            listeners(|l| l.to_claim.retain(|&x| x != id));
            continue;
        };
        let listened = rdma_listen(domain, &local, backlog, None);
        let delay = policy::get().claim_delay_ms;
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        match listened {
            Ok(r) => {
                listeners(|l| {
                    if let Some(li) = l.by_id.get_mut(&id) {
                        li.rs = Some(r);
                    }
                    l.to_claim.retain(|&x| x != id);
                });
                trace!("listener {id}: listening over RDMA in the forked child (rsocket {r})");
            }
            Err(e) if give_up_now => {
                trace!("listener {id}: the child cannot listen over RDMA (errno {e}): kernel only");
                listeners(|l| l.to_claim.retain(|&x| x != id));
            }
            Err(_) => {}
        }
    }
}
