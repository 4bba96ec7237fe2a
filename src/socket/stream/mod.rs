//! Stream rsockets: connection setup over rdma_cm, the data path over one RC QP, blocking and
//! non-blocking waits.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::proto::stream::StreamError;
use crate::socket::config::Config;
use crate::verbs::{CmEvent, CmId, EventChannel, ReadyFd, SockAddr, Waker};

mod close;
mod conn;
mod data;
mod endpoint;
mod handshake;
mod iomap;
mod jobs;
mod ready;
mod settings;
mod short;
mod stage;
mod wait;
mod zerocopy;

use conn::Conn;

/// Every stream socket created (weak references, pruned as they die): what
/// [`StreamSocket::live`] lists.
static LIVE: Mutex<Vec<Weak<StreamSocket>>> = Mutex::new(Vec::new());
pub use conn::new_spin;
pub use settings::Options;
pub use zerocopy::ZeroCopyNotice;

const CM_WAIT: Duration = Duration::from_secs(30);

/// The persist job alone.
const PERSIST: crate::socket::service::Jobs = crate::socket::service::Jobs {
    flush: false,
    keepalive: false,
    linger: false,
    watch: false,
    nudge: false,
    persist: true,
};

/// The flush job alone.
const FLUSH: crate::socket::service::Jobs = crate::socket::service::Jobs {
    flush: true,
    keepalive: false,
    linger: false,
    watch: false,
    nudge: false,
    persist: false,
};

enum State {
    /// Created, maybe bound.
    Idle { id: CmId, bound: bool },
    /// Connect request sent; waiting for the reply.
    Connecting(Box<Conn>),
    /// Accepted and replied to; waiting for the peer's confirmation (the core is ready).
    Accepting(Box<Conn>),
    /// Listening; connect requests already taken off the channel wait in `pending`.
    Listening {
        id: CmId,
        pending: VecDeque<CmEvent>,
        /// Dual stack where the device's IPv6 wildcard listener does not take IPv4 (iWARP):
        /// a second listener on 0.0.0.0 at the same port, on the same channel.
        v4: Option<CmId>,
    },
    /// Connected (or was: the core knows whether it still is).
    Connected(Box<Conn>),
    /// A failed connect consumed the id (SO_ERROR tells why).
    Failed,
}

struct Inner {
    state: State,
    opts: Options,
    /// One thread sleeps on the descriptors; the others wait on the condvar.
    sleeping: bool,
    /// Pending SO_ERROR.
    so_error: i32,
    /// RDMA_ROUTE set by the application (`struct ibv_path_data[]`), used instead of resolving.
    route: Option<Vec<u8>>,
    /// The descriptor that is the socket's number and shows its readiness (None once closed).
    ready: Option<ReadyFd>,
    /// How the descriptor is kept up to date (see `ready`).
    watch: ready::Watch,
    /// The address the application bound to, when it let the port be chosen (port 0): a
    /// connect that finds the chosen port taken may bind there again with another.
    any_port_bind: Option<crate::verbs::SockAddr>,
}

/// A stream rsocket.
pub struct StreamSocket {
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Threads waiting on `cv`: notifying costs a syscall, so only when someone waits.
    waiters: AtomicU32,
    /// Threads blocked on `inner`'s mutex (see `lock`).
    contenders: AtomicU32,
    /// Wakes the thread sleeping in `wait_conn` when another thread consumed its wake-up.
    waker: Waker,
    /// Address family given to rsocket (SO_DOMAIN).
    domain: i32,
    /// The socket's own handle, for the service thread (set at creation).
    me: std::sync::OnceLock<std::sync::Weak<StreamSocket>>,
    /// The service thread has this socket's flush job (adding it again would cost a wake-up
    /// per send).
    pub(crate) in_flusher: std::sync::atomic::AtomicBool,
    /// Test builds: the next service job for this socket panics (see `inject_job_panic`).
    #[cfg(debug_assertions)]
    panic_in_job: std::sync::atomic::AtomicBool,
    /// Test builds: calls that took a short path (`short`): receives that found nothing,
    /// receives that found data, sends, looks of rpoll.
    #[cfg(debug_assertions)]
    short_calls: [std::sync::atomic::AtomicU64; 4],
    /// Small sends of a streaming application, for the flush job to post (see `stage`).
    stage: stage::Stage,
    /// `opts.nonblocking`, readable without the lock (every send and receive asks).
    nonblocking: std::sync::atomic::AtomicBool,
    /// The socket's number: the user end of its readiness descriptor.
    number: RawFd,
    /// The process that made the socket: a forked child's exit leaves its parent's alone.
    pid: u32,
    /// Calls in progress (the service thread leaves a socket in use to its caller).
    in_call: AtomicU32,
    /// Ticks when the last call returned.
    last_exit: std::sync::atomic::AtomicU64,
    /// rpoll looks without a wait that found nothing the caller asked for: the application
    /// polls by itself (as with EAGAIN returns, see `ready`).
    poll_misses: AtomicU32,
    /// The descriptor is not kept up to date by every call (see `ready`).
    self_driven: std::sync::atomic::AtomicBool,
    /// Looks of the service thread in a row that found the self-driven socket in use (the
    /// time to the next look doubles with each, see `ready::TICK_MAX`).
    busy_looks: std::sync::atomic::AtomicU8,
    /// Wait sets of the application that sleep on the completion channel themselves (see
    /// `ready`, [`StreamSocket::hook`]): the service thread leaves the channel to them.
    hooked: AtomicU32,
    /// Other waits on a hooked socket's descriptor in progress (poll, select): the service
    /// thread watches the completion channel for them (see [`StreamSocket::hold_watch`]).
    guests: AtomicU32,
    // Declared last: dropped after the CM id that uses it.
    channel: EventChannel,
}

/// Readiness of one rsocket for rpoll, and what to sleep on when it is not ready.
#[derive(Debug, Clone, Copy)]
pub struct PollState {
    /// POLLIN/POLLOUT/POLLHUP/POLLERR as for a kernel TCP socket.
    pub revents: i16,
    /// Descriptors that become readable when the state may have changed (after `arm`).
    pub wait_fds: [RawFd; 3],
    /// How many of `wait_fds` are valid.
    pub n_wait: usize,
}

impl std::fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamSocket(fd {})", self.number)
    }
}

impl StreamSocket {
    /// A new unconnected stream rsocket.
    pub fn new(domain: i32, nonblocking: bool) -> Result<Arc<Self>> {
        let channel = EventChannel::new()?;
        let id = CmId::new(&channel)?;
        let mut opts = Options::from_config(Config::get());
        opts.nonblocking = nonblocking;
        Self::from_parts(channel, State::Idle { id, bound: false }, opts, domain)
    }

    /// A socket with its handle set: from birth the service thread can reach it, so every
    /// socket takes the same path (staging, gathering, keepalive, lingering close).
    fn from_parts(
        channel: EventChannel,
        state: State,
        opts: Options,
        domain: i32,
    ) -> Result<Arc<Self>> {
        let ready = ReadyFd::new(opts.cloexec)?;
        let s = Arc::new(StreamSocket {
            nonblocking: std::sync::atomic::AtomicBool::new(opts.nonblocking),
            number: ready.fd(),
            pid: std::process::id(),
            in_call: AtomicU32::new(0),
            last_exit: std::sync::atomic::AtomicU64::new(0),
            poll_misses: AtomicU32::new(0),
            self_driven: std::sync::atomic::AtomicBool::new(false),
            busy_looks: std::sync::atomic::AtomicU8::new(0),
            hooked: AtomicU32::new(0),
            guests: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                state,
                opts,
                sleeping: false,
                so_error: 0,
                route: None,
                ready: Some(ready),
                watch: ready::Watch::default(),
                any_port_bind: None,
            }),
            cv: Condvar::new(),
            waiters: AtomicU32::new(0),
            contenders: AtomicU32::new(0),
            waker: Waker::new()?,
            domain,
            me: std::sync::OnceLock::new(),
            in_flusher: std::sync::atomic::AtomicBool::new(false),
            #[cfg(debug_assertions)]
            panic_in_job: std::sync::atomic::AtomicBool::new(false),
            #[cfg(debug_assertions)]
            short_calls: Default::default(),
            stage: stage::Stage::default(),
            channel,
        });
        s.set_handle(Arc::downgrade(&s));
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        if live.len() >= 64 && live.len().is_power_of_two() {
            live.retain(|w| w.strong_count() > 0);
        }
        live.push(Arc::downgrade(&s));
        drop(live);
        // Registered once (atexit handlers survive fork, as this flag does).
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        AT_EXIT.call_once(|| {
            crate::verbs::run_at_exit(close::at_exit);
        });
        Ok(s)
    }

    /// Lets the socket hand itself to the service thread (see `from_parts`).
    fn set_handle(&self, me: std::sync::Weak<StreamSocket>) {
        let _ = self.me.set(me);
    }

    /// Address family (SO_DOMAIN).
    pub fn domain(&self) -> i32 {
        self.domain
    }

    /// Whether the socket listens (SO_ACCEPTCONN).
    pub fn is_listening(&self) -> bool {
        matches!(self.lock().state, State::Listening { .. })
    }

    /// The descriptor number: a real descriptor (a socket) whose readiness follows the
    /// socket's, for poll(2), select(2) and epoll (see `ready`).
    pub fn fd(&self) -> RawFd {
        self.number
    }

    /// Wakes the threads waiting on the condvar, if any (call with the lock held).
    fn notify(&self) {
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.cv.notify_all();
        }
    }

    /// The lock if no other thread holds it now (a poisoned one is taken, as by `lock`).
    fn try_lock_now(&self) -> Option<MutexGuard<'_, Inner>> {
        match self.inner.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the protocol state half-updated in a way
        // that matters more than losing the socket; keep serving.
        self.try_lock_now().unwrap_or_else(|| {
            // Counted, so that a thread busy-polling under the lock lets us in.
            self.contenders.fetch_add(1, Ordering::Relaxed);
            let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            self.contenders.fetch_sub(1, Ordering::Relaxed);
            g
        })
    }

    /// Current options.
    pub fn options(&self) -> Options {
        self.lock().opts
    }

    /// Changes options (only sizes before connecting take effect, as upstream).
    pub fn set_options(&self, f: impl FnOnce(&mut Options)) {
        let mut g = self.lock();
        let cloexec = g.opts.cloexec;
        f(&mut g.opts);
        if g.opts.cloexec != cloexec
            && let Some(r) = &g.ready
        {
            r.set_cloexec(g.opts.cloexec);
        }
        self.nonblocking
            .store(g.opts.nonblocking, Ordering::Relaxed);
    }

    /// O_NONBLOCK is set.
    fn is_nonblocking(&self) -> bool {
        self.nonblocking.load(Ordering::Relaxed)
    }

    /// Whether the socket is self-driven (its application polls by itself, see `ready`), for
    /// tests and diagnostics.
    pub fn is_self_driven(&self) -> bool {
        self.self_driven.load(Ordering::Relaxed)
    }

    /// Test builds: how many calls took a short path (see `short`): receives that found
    /// nothing, receives that found data, sends, looks of rpoll.
    #[cfg(debug_assertions)]
    pub fn short_calls(&self) -> [u64; 4] {
        self.short_calls
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed))
    }

    /// Whether a connection exists (or is being set up).
    pub fn is_connected(&self) -> bool {
        matches!(
            self.lock().state,
            State::Connected(_) | State::Connecting(_) | State::Accepting(_)
        )
    }

    /// Local address.
    pub fn local_addr(&self) -> Result<SockAddr> {
        let a = match &self.lock().state {
            State::Idle { id, .. } | State::Listening { id, .. } => id.local_addr(),
            State::Connected(c) | State::Connecting(c) | State::Accepting(c) => c.id.local_addr(),
            State::Failed => return Err(Error::NotConnected),
        };
        Ok(self.report(a))
    }

    /// Peer address.
    pub fn peer_addr(&self) -> Result<SockAddr> {
        match &self.lock().state {
            State::Connected(c) | State::Accepting(c) => Ok(self.report(c.id.peer_addr())),
            _ => Err(Error::NotConnected),
        }
    }

    /// A one-line description of the socket's state, for diagnostics.
    pub fn describe(&self) -> String {
        self.describe_locked(&self.lock())
    }

    /// Every stream socket still alive, the safe API's accepted ones (which no descriptor
    /// table names) included. For diagnostics (`socket::describe_all`).
    pub fn live() -> Vec<Arc<StreamSocket>> {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|w| w.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    }

    /// [`StreamSocket::describe`] without waiting: None while another thread holds the lock (a
    /// diagnostic must not hang on the socket it looks at).
    pub fn try_describe(&self) -> Option<String> {
        match self.inner.try_lock() {
            Ok(g) => Some(self.describe_locked(&g)),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                Some(self.describe_locked(&p.into_inner()))
            }
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn describe_locked(&self, g: &Inner) -> String {
        match &g.state {
            State::Idle { bound, .. } => format!("idle (bound {bound})"),
            State::Connecting(_) => "connecting".into(),
            State::Accepting(_) => "accepting".into(),
            State::Listening { pending, v4, .. } => format!(
                "listening ({} pending{})",
                pending.len(),
                if v4.is_some() { ", IPv4 companion" } else { "" }
            ),
            State::Connected(c) => format!(
                "connected ({}, {} calls in, CQ {}armed, {}sleeping, {} bytes staged, \
                 shown {:#x}, revents {:#x}): {:?}",
                if self.self_driven.load(Ordering::Relaxed) {
                    "self-driven"
                } else {
                    "watched"
                },
                self.in_call.load(Ordering::Relaxed),
                if c.link.t.is_armed(false) { "" } else { "not " },
                if g.sleeping { "" } else { "not " },
                self.stage.len(),
                g.ready.as_ref().map_or(0, |r| r.shown()),
                c.revents(),
                c.link.core
            ),
            State::Failed => format!("failed (so_error {})", g.so_error),
        }
    }

    /// Takes the pending socket error (SO_ERROR); drives a connect in progress first.
    pub fn take_error(&self) -> i32 {
        let mut g = self.lock();
        self.advance_connect(&mut g);
        if g.so_error == 0
            && let State::Connected(c) = &g.state
            && let Some(e) = c.link.core.error()
        {
            return broken(e).errno();
        }
        if let Some(r) = &g.ready {
            // As reading SO_ERROR clears a TCP socket's pending error (and its POLLERR).
            r.clear_error();
        }
        std::mem::take(&mut g.so_error)
    }
}

/// What a broken connection reports, as TCP would: a keepalive that went unanswered is
/// ETIMEDOUT, our own failure (a service job that panicked) EIO, anything else (reset, failed
/// transfer, protocol violation) ECONNRESET.
pub(super) fn broken(e: &StreamError) -> Error {
    match e {
        StreamError::KeepaliveTimeout | StreamError::RetriesExceeded => Error::TimedOut,
        StreamError::Internal => Error::Os(std::io::Error::from_raw_os_error(libc::EIO)),
        _ => Error::ConnectionReset,
    }
}

/// An error from a saved errno (SO_ERROR of a failed connect).
pub(super) fn errno_error(e: i32) -> Error {
    Error::from(std::io::Error::from_raw_os_error(if e == 0 {
        libc::EIO
    } else {
        e
    }))
}
