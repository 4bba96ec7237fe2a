//! Connection setup over rdma_cm: bind, listen, accept, connect, and the CM events that
//! drive a connect or accept in progress.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{Conn, TRANSPORT_RETRIES};
use super::settings::Options;
use super::wait::wait_readable;
use super::{CM_WAIT, Inner, State, StreamSocket, errno_error};
use crate::error::{Error, Result};
use crate::proto::wire::ConnData;
use crate::socket::service::Jobs;
use crate::trace::trace;
use crate::verbs::{CmEvent, CmEventKind, CmId, CmOption, ConnParam, EventChannel, SockAddr};

/// How long connection setup steps may take before ETIMEDOUT.
const RESOLVE_TIMEOUT_MS: i32 = 2000;
/// Other local ports an unbound connect tries when the first is taken (see `connect`).
const ADDRINUSE_RETRIES: usize = 8;

/// Maps a failed connection-setup event to the errno a TCP socket would give.
fn cm_failure(ev: &CmEvent) -> Error {
    match ev.kind() {
        CmEventKind::Rejected => Error::ConnectionRefused,
        CmEventKind::Unreachable | CmEventKind::ResolveError => match -ev.status() {
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENODEV | libc::EADDRNOTAVAIL => {
                Error::Os(std::io::Error::from_raw_os_error(libc::EHOSTUNREACH))
            }
            libc::ECONNREFUSED => Error::ConnectionRefused,
            _ => Error::TimedOut,
        },
        CmEventKind::ConnectError => Error::ConnectionRefused,
        _ => Error::Protocol(format!(
            "unexpected connection manager event {:?}",
            ev.kind()
        )),
    }
}

/// Waits for the event `want`, skipping unrelated ones; maps failures like TCP.
fn expect_event(channel: &EventChannel, want: CmEventKind, timeout: Duration) -> Result<CmEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let ev = match channel.get_event() {
            Ok(ev) => ev,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::TimedOut);
                }
                wait_readable(&[channel.fd()], Some(deadline - now))?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let k = ev.kind();
        if k == want {
            return Ok(ev);
        }
        if matches!(k, CmEventKind::Other(_)) {
            continue;
        }
        return Err(cm_failure(&ev));
    }
}

impl StreamSocket {
    /// An AF_INET socket takes only IPv4 addresses; AF_INET6 takes IPv6 (and IPv4-mapped).
    pub(super) fn check_family(&self, a: &SockAddr) -> Result<()> {
        match (self.domain, a.family()) {
            (libc::AF_INET, libc::AF_INET)
            | (libc::AF_INET6, libc::AF_INET6)
            | (libc::AF_IB, _) => Ok(()),
            _ => Err(Error::Unsupported(libc::EAFNOSUPPORT)),
        }
    }

    /// How this socket reports an address: IPv4 as IPv4-mapped on AF_INET6 sockets.
    pub(super) fn report(&self, a: SockAddr) -> SockAddr {
        if self.domain == libc::AF_INET6 {
            a.map_v4()
        } else {
            a
        }
    }

    /// Sets an rdma_cm option on the id while it is not connected (later changes are kept
    /// for getsockopt only, as upstream).
    pub fn set_cm_option(&self, opt: CmOption, value: &[u8]) -> Result<()> {
        match &self.lock().state {
            State::Idle { id, .. } | State::Listening { id, .. } => match id.set_option(opt, value)
            {
                // Options the device or kernel lacks (e.g. REUSEADDR on some transports) are
                // kept as settings, like librdmacm does.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::ENOTSUP)) => {
                    Ok(())
                }
                r => r.map_err(Error::from),
            },
            _ => Ok(()),
        }
    }

    /// Path MTU of the connection's route (TCP_MAXSEG).
    pub fn path_mtu(&self) -> Option<u32> {
        match &self.lock().state {
            State::Idle { id, .. } | State::Listening { id, .. } => id.path_mtu(),
            State::Connected(c) | State::Connecting(c) | State::Accepting(c) => c.id.path_mtu(),
            State::Failed => None,
        }
    }

    /// Sets RDMA_ROUTE (used by the next connect instead of route resolution).
    pub fn set_route(&self, route: Vec<u8>) {
        self.lock().route = Some(route);
    }

    /// The route set with RDMA_ROUTE.
    pub fn route(&self) -> Option<Vec<u8>> {
        self.lock().route.clone()
    }

    /// Binds to a local address.
    pub fn bind(&self, addr: &SockAddr) -> Result<()> {
        let mut g = self.lock();
        match &mut g.state {
            State::Idle { id, bound } => {
                if *bound {
                    return Err(Error::InvalidArgument);
                }
                self.check_family(addr)?;
                if let Some(std::net::SocketAddr::V6(v6)) = addr.to_std()
                    && v6.ip().is_unspecified()
                {
                    // Dual stack is done with a separate IPv4 listener (see v4_companion), the
                    // same way on every transport: the IPv6 id takes IPv6 only.
                    let _ = id.set_option(CmOption::AfOnly, &1i32.to_ne_bytes());
                }
                id.bind(&addr.unmap_v4())
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ENODEV) => {
                            Error::Os(std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))
                        }
                        _ => e.into(),
                    })?;
                *bound = true;
                g.any_port_bind = addr
                    .to_std()
                    .is_some_and(|a| a.port() == 0)
                    .then(|| addr.unmap_v4());
                Ok(())
            }
            _ => Err(Error::InvalidArgument),
        }
    }

    /// Starts listening.
    pub fn listen(&self, backlog: i32) -> Result<()> {
        let _call = self.call();
        let mut g = self.lock();
        let st = std::mem::replace(&mut g.state, State::Failed);
        match st {
            State::Idle { id, bound } => match id.listen(backlog.max(1)) {
                Ok(()) => {
                    let v4 = if g.opts.v6only {
                        None
                    } else {
                        self.v4_companion(&id, backlog)
                    };
                    g.state = State::Listening {
                        id,
                        pending: VecDeque::new(),
                        v4,
                    };
                    drop(g);
                    self.start_watch();
                    Ok(())
                }
                Err(e) => {
                    g.state = State::Idle { id, bound };
                    Err(e.into())
                }
            },
            s @ State::Listening { .. } => {
                g.state = s;
                Ok(())
            }
            s => {
                g.state = s;
                Err(Error::InvalidArgument)
            }
        }
    }

    /// For an AF_INET6 listener on the wildcard address: an IPv4 wildcard listener on the same
    /// port (the IPv6 id was bound IPv6-only, since iWARP's IPv6 wildcard does not take IPv4).
    fn v4_companion(&self, id: &CmId, backlog: i32) -> Option<CmId> {
        let local = id.local_addr().to_std()?;
        match local {
            std::net::SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
                let v4 = CmId::new(&self.channel).ok()?;
                let any = std::net::SocketAddr::from(([0, 0, 0, 0], v6.port()));
                v4.bind(&any.into()).ok()?;
                v4.listen(backlog.max(1)).ok()?;
                Some(v4)
            }
            _ => None,
        }
    }

    /// Moves connect requests from the channel into the listener's queue.
    ///
    /// A channel that fails otherwise than with EAGAIN fails the listener (POLLERR, SO_ERROR):
    /// the kernel refuses a CM file's commands once the process's credentials changed after
    /// it was opened (EACCES after setuid or setgid, even to the same ids, as a server's worker
    /// does after fork), and a listener that can take no request would only leave its clients
    /// waiting. The application can listen again.
    /// Returns how many requests it moved.
    pub(super) fn collect_requests(&self, g: &mut Inner) -> usize {
        let mut failed = None;
        let mut moved = 0;
        if let State::Listening { pending, .. } = &mut g.state {
            loop {
                let ev = match self.channel.get_event() {
                    Ok(ev) => ev,
                    Err(e) => {
                        if e.raw_os_error() != Some(libc::EAGAIN) {
                            trace!("fd {}: listener failed: {e}", self.channel.fd());
                            failed = Some(e.raw_os_error().unwrap_or(libc::EIO));
                        }
                        break;
                    }
                };
                trace!(
                    "fd {}: listener event {:?} status {}",
                    self.channel.fd(),
                    ev.kind(),
                    ev.status()
                );
                if ev.kind() == CmEventKind::ConnectRequest {
                    pending.push_back(ev);
                    moved += 1;
                }
            }
        }
        if let Some(e) = failed {
            g.so_error = e;
            g.state = State::Failed;
        }
        moved
    }

    /// Accepts one connection (blocking unless non-blocking).
    pub fn accept(&self) -> Result<Arc<StreamSocket>> {
        let _call = self.call();
        loop {
            // A wake-up the service thread passed on (it took a request off the channel) is
            // used up by this look at the queue; left set, it would keep every later rpoll on
            // the listener awake with nothing to take. Cleared before the look, so one that
            // comes after it stays.
            self.waker.reset();
            let mut g = self.lock();
            if !matches!(g.state, State::Listening { .. }) {
                return Err(Error::InvalidArgument);
            }
            self.collect_requests(&mut g);
            let opts = g.opts;
            let next = match &mut g.state {
                State::Listening { pending, .. } => pending.pop_front(),
                _ => None,
            };
            drop(g);
            let Some(ev) = next else {
                if opts.nonblocking {
                    return Err(Error::WouldBlock);
                }
                // The waker too: the service thread may take the request and pass it on.
                wait_readable(&[self.channel.fd(), self.waker.fd()], None)?;
                continue;
            };
            let private = ev.private_data();
            let param = ev.conn_param();
            let Some(id) = ev.take_request_id() else {
                continue;
            };
            // The event must be acked before the id can migrate to its own channel.
            drop(ev);
            match Self::accept_one(id, &private, param, opts, self.domain) {
                Ok(s) => {
                    s.start_watch();
                    return Ok(s);
                }
                // A bad request or a peer that vanished mid-handshake is not the caller's
                // problem: take the next one (non-blocking callers get EAGAIN).
                Err(e) => {
                    trace!("fd {}: accept failed: {e}", self.channel.fd());
                    if opts.nonblocking {
                        return Err(Error::WouldBlock);
                    }
                }
            }
        }
    }

    fn accept_one(
        id: CmId,
        private: &[u8],
        req: ConnParam,
        opts: Options,
        domain: i32,
    ) -> Result<Arc<StreamSocket>> {
        let peer = match ConnData::decode(private) {
            Ok(p) => p,
            Err(e) => {
                id.reject();
                return Err(Error::Protocol(e.to_string()));
            }
        };
        let channel = EventChannel::new()?;
        id.migrate(&channel)?;
        let mut conn = Conn::setup(id, &opts, opts.iomap_size)?;
        conn.start(&peer, true);
        let param = ConnParam {
            responder_resources: req.responder_resources.min(conn.io.rd_atom.max(1)),
            initiator_depth: req.initiator_depth.min(conn.io.rd_atom.max(1)),
            flow_control: req.flow_control,
            retry_count: TRANSPORT_RETRIES,
            rnr_retry_count: 7,
        };
        conn.id.accept(&conn.conn_data(), &param)?;
        // Like librdmacm, the connection completes when the peer's confirmation (ESTABLISHED)
        // is seen by the next call on the socket: a single-threaded program may be the peer.
        Self::from_parts(channel, State::Accepting(Box::new(conn)), opts, domain)
    }

    /// Connects to `dst`. Address and route resolution are local and done here; a non-blocking
    /// socket then returns EINPROGRESS, rpoll reports POLLOUT when the connect finished and
    /// SO_ERROR tells how.
    pub fn connect(&self, dst: &SockAddr) -> Result<()> {
        let _call = self.call();
        let mut g = self.lock();
        let st = std::mem::replace(&mut g.state, State::Failed);
        let (id, bound) = match st {
            State::Idle { id, bound } => (id, bound),
            s @ (State::Connecting(_) | State::Accepting(_)) => {
                g.state = s;
                return Err(Error::Already);
            }
            s @ State::Connected(_) => {
                g.state = s;
                return Err(Error::IsConnected);
            }
            s => {
                g.state = s;
                return Err(Error::InvalidArgument);
            }
        };
        if let Err(e) = self.check_family(dst) {
            g.state = State::Idle { id, bound: false };
            return Err(e);
        }
        let dst = &dst.unmap_v4();
        let opts = g.opts;
        let route = g.route.clone();
        let start = |id: CmId| -> Result<Conn> {
            id.resolve_addr(None, dst, RESOLVE_TIMEOUT_MS)?;
            expect_event(&self.channel, CmEventKind::AddrResolved, CM_WAIT)?;
            match &route {
                Some(r) => id.set_option(CmOption::IbPath, r)?,
                None => id.resolve_route(RESOLVE_TIMEOUT_MS)?,
            }
            expect_event(&self.channel, CmEventKind::RouteResolved, CM_WAIT)?;
            let conn = Conn::setup(id, &opts, opts.iomap_size)?;
            conn.id.connect(&conn.conn_data(), &conn.conn_param())?;
            Ok(conn)
        };
        let mut started = start(id);
        // On iWARP the connection is a kernel TCP connection from the port the CM picked; that
        // port may still be taken in TCP (a connection of an earlier socket in TIME_WAIT), and
        // the connect fails with EADDRINUSE. A socket whose port the application did not choose
        // (not bound, or bound to port 0) tries other ports, as a TCP connect from an
        // ephemeral port would never fail so.
        let any_port = g.any_port_bind;
        for _ in 0..ADDRINUSE_RETRIES {
            match &started {
                Err(e) if (!bound || any_port.is_some()) && e.errno() == libc::EADDRINUSE => {
                    trace!("{self:?}: connect: local port in use, another one");
                    let id = CmId::new(&self.channel)?;
                    if opts.tos != 0 {
                        id.set_option(CmOption::Tos, &[opts.tos])?;
                    }
                    if let Some(a) = &any_port {
                        id.bind(a)?;
                    }
                    started = start(id);
                }
                _ => break,
            }
        }
        g.state = State::Connecting(Box::new(started?));
        let deadline = Instant::now() + CM_WAIT;
        loop {
            self.advance_connect(&mut g);
            match g.state {
                State::Connected(_) => {
                    drop(g);
                    self.start_watch();
                    return Ok(());
                }
                State::Failed => return Err(errno_error(std::mem::take(&mut g.so_error))),
                _ if opts.nonblocking => {
                    drop(g);
                    self.start_watch();
                    return Err(Error::InProgress);
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                g.state = State::Failed;
                return Err(Error::TimedOut);
            }
            drop(g);
            wait_readable(&[self.channel.fd(), self.waker.fd()], Some(deadline - now))?;
            self.waker.reset();
            g = self.lock();
        }
    }

    /// Drives a connect or accept in progress with the CM events queued (never blocks).
    pub(super) fn advance_connect(&self, g: &mut Inner) {
        while matches!(g.state, State::Connecting(_) | State::Accepting(_)) {
            let ev = match self.channel.get_event() {
                Ok(ev) => ev,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return,
                Err(e) => {
                    g.so_error = e.raw_os_error().unwrap_or(libc::EIO);
                    g.state = State::Failed;
                    return;
                }
            };
            let kind = ev.kind();
            trace!(
                "fd {}: {} event {kind:?} status {}",
                self.channel.fd(),
                if matches!(g.state, State::Accepting(_)) {
                    "accept"
                } else {
                    "connect"
                },
                ev.status()
            );
            if matches!(kind, CmEventKind::Other(_)) {
                continue;
            }
            let st = std::mem::replace(&mut g.state, State::Failed);
            let was_accepting = matches!(st, State::Accepting(_));
            let next: Result<State> = match (st, kind) {
                (State::Connecting(mut conn), CmEventKind::Established) => {
                    let peer = ConnData::decode(&ev.private_data())
                        .map_err(|e| Error::Protocol(e.to_string()));
                    drop(ev);
                    peer.and_then(|p| conn.establish(&p))
                        .map(|()| State::Connected(conn))
                }
                (State::Accepting(mut conn), CmEventKind::Established) => {
                    drop(ev);
                    conn.progress().map(|_| State::Connected(conn))
                }
                (st, _) => {
                    let e = if matches!(st, State::Accepting(_)) {
                        // The peer gave up on a connection we were accepting.
                        Error::ConnectionReset
                    } else {
                        cm_failure(&ev)
                    };
                    // The event goes (acked) before the id it names.
                    drop(ev);
                    drop(st);
                    Err(e)
                }
            };
            let initiated = matches!(kind, CmEventKind::Established) && !was_accepting;
            match next {
                Ok(s) => {
                    g.state = s;
                    if initiated
                        && let State::Connected(c) = &g.state
                        && c.link.config().msg_send
                    {
                        // iWARP: the peer waits for our first message, which Soft-iWARP may
                        // leave unread at first (see `nudge_job`).
                        self.add_jobs(Jobs {
                            nudge: true,
                            ..Jobs::default()
                        });
                    }
                    if g.opts.keepalive && matches!(g.state, State::Connected(_)) {
                        // SO_KEEPALIVE set before the connection existed (or inherited from
                        // the listener): its timer starts now.
                        self.add_jobs(Jobs {
                            keepalive: true,
                            ..Jobs::default()
                        });
                    }
                }
                Err(e) => {
                    trace!("fd {}: connection failed: {e}", self.channel.fd());
                    g.so_error = e.errno();
                    g.state = State::Failed;
                }
            }
            // The watch job sleeps on what the old state could bring (the CM channel only),
            // and this call, not the service thread, may be the one that took the event: it is
            // told, or a connection set up by the application's own call (rpoll, a connect)
            // would go unwatched and its descriptor never show what arrives.
            self.start_watch();
        }
    }
}
