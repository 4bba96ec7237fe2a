//! Thin owning wrappers over libibverbs and librdmacm (through `rdma-sys`).
//!
//! Every raw pointer and every `unsafe` call of the crate's RDMA side lives here. Each wrapper owns
//! one object and releases it on drop; the socket layer composes them in an order that drops
//! dependants first (QP before CQ and MRs, MRs before the PD, the CM id before its channel).

use std::io;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};

use rdma_sys as sys;

/// `syscall!`-style helper: librdmacm/libibverbs calls return -1 (or non-zero) and set errno.
fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else if ret > 0 {
        // ibv_* verbs return a positive errno instead of setting errno.
        Err(io::Error::from_raw_os_error(ret))
    } else {
        Err(last_error())
    }
}

fn last_error() -> io::Error {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(0) | None => io::Error::from_raw_os_error(libc::EIO),
        _ => e,
    }
}

fn non_null<T>(p: *mut T) -> io::Result<NonNull<T>> {
    NonNull::new(p).ok_or_else(|| {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // No RDMA device or module: report it as such, not as "success".
            Some(0) | None => io::Error::from_raw_os_error(libc::ENODEV),
            _ => e,
        }
    })
}

/// Sets or clears O_NONBLOCK on a descriptor.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an integer descriptor has no memory-safety requirements.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if new != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An eventfd used to wake a thread sleeping in `poll` on a socket's descriptors.
#[derive(Debug)]
pub struct Waker(std::os::fd::OwnedFd);

impl Waker {
    /// Creates a non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(Waker(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// The descriptor to poll for input.
    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    /// Makes the descriptor readable.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd; a full counter only means "awake".
        unsafe { libc::write(self.fd(), &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Clears a pending wake-up.
    pub fn reset(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a local; non-blocking, EAGAIN when not woken.
        unsafe { libc::read(self.fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

/// poll(2) over `fds` (events and revents as in libc). EINTR counts as a wake-up with no events.
/// `timeout_ms` < 0 waits forever.
pub fn poll_fds(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: fds is a valid, exclusively borrowed array of fds.len() entries.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// A cheap tick counter for comparing short intervals with each other (not calibrated to any
/// unit): the time-stamp counter on x86_64, nanoseconds from a process-wide epoch elsewhere.
/// The clock syscalls are avoided because where the clock source is not in the vDSO (the test
/// VM's HPET) a read costs microseconds.
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86_64 CPU, takes no operands and touches no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

/// [`ticks`] per microsecond, measured once per process (on x86_64 against the monotonic clock
/// over about 200 µs; elsewhere ticks are nanoseconds). At least 1.
pub fn ticks_per_us() -> u64 {
    static TPU: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TPU.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1000;
        }
        let t0 = std::time::Instant::now();
        let k0 = ticks();
        let mut dt = t0.elapsed();
        while dt < std::time::Duration::from_micros(200) {
            dt = t0.elapsed();
        }
        let k = ticks().wrapping_sub(k0);
        (k / (dt.as_micros() as u64).max(1)).max(1)
    })
}

/// Raises SIGPIPE in the calling thread, as a write to a shut-down kernel socket does.
pub fn raise_sigpipe() {
    // SAFETY: raise has no memory arguments.
    unsafe { libc::raise(libc::SIGPIPE) };
}

/// Runs `f` when the process exits normally (exit(3) or a return from main), after the
/// handlers registered later. Returns false if it could not be registered.
pub fn run_at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: `f` is a plain function with no arguments; atexit only stores the pointer.
    unsafe { libc::atexit(f) == 0 }
}

// ------------------------------------------------------------------------------------ rdma_cm

/// An rdma_cm event channel: one per rsocket; its fd is the rsocket's descriptor number.
#[derive(Debug)]
pub struct EventChannel(NonNull<sys::rdma_event_channel>);

// SAFETY: the channel is a kernel fd wrapper; librdmacm calls on it are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: as above.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    /// Opens a channel (fails with ENODEV when the kernel has no rdma_cm). Its fd is
    /// non-blocking: waits are done with poll, so a read never sleeps.
    pub fn new() -> io::Result<Self> {
        // SAFETY: no arguments; returns NULL with errno on failure.
        let p = unsafe { sys::rdma_create_event_channel() };
        let ch = EventChannel(non_null(p)?);
        // CLOEXEC like the kernel sockets an rsocket stands for.
        // SAFETY: fd belongs to the channel we own.
        unsafe { libc::fcntl(ch.fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        set_nonblocking(ch.fd(), true)?;
        Ok(ch)
    }

    /// The channel's file descriptor (readable when an event is queued).
    pub fn fd(&self) -> RawFd {
        // SAFETY: the pointer is valid while self lives.
        unsafe { self.0.as_ref().fd }
    }

    /// Takes the next event; with a non-blocking fd, `WouldBlock` when none is queued.
    pub fn get_event(&self) -> io::Result<CmEvent> {
        let mut ev: *mut sys::rdma_cm_event = ptr::null_mut();
        // SAFETY: valid channel, out-pointer to a local.
        cvt(unsafe { sys::rdma_get_cm_event(self.0.as_ptr(), &mut ev) })?;
        Ok(CmEvent(non_null(ev)?))
    }

    fn as_ptr(&self) -> *mut sys::rdma_event_channel {
        self.0.as_ptr()
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on this channel was destroyed or migrated before (owners drop ids first).
        unsafe { sys::rdma_destroy_event_channel(self.0.as_ptr()) };
    }
}

/// Kinds of connection-manager events we act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEventKind {
    /// Address resolved.
    AddrResolved,
    /// Route resolved.
    RouteResolved,
    /// A peer asks to connect (on a listening id).
    ConnectRequest,
    /// Connection established.
    Established,
    /// The peer rejected us (no listener, or refused).
    Rejected,
    /// The peer could not be reached.
    Unreachable,
    /// Address or route resolution failed.
    ResolveError,
    /// Connection failed while being set up.
    ConnectError,
    /// The peer disconnected.
    Disconnected,
    /// The device went away.
    DeviceRemoval,
    /// Anything else (timewait exit, address change, ...).
    Other(u32),
}

/// One rdma_cm event; acknowledged when dropped.
#[derive(Debug)]
pub struct CmEvent(NonNull<sys::rdma_cm_event>);

impl CmEvent {
    fn raw(&self) -> &sys::rdma_cm_event {
        // SAFETY: valid until acked in drop.
        unsafe { self.0.as_ref() }
    }

    /// What happened.
    pub fn kind(&self) -> CmEventKind {
        use sys::rdma_cm_event_type::*;
        match self.raw().event {
            RDMA_CM_EVENT_ADDR_RESOLVED => CmEventKind::AddrResolved,
            RDMA_CM_EVENT_ROUTE_RESOLVED => CmEventKind::RouteResolved,
            RDMA_CM_EVENT_CONNECT_REQUEST => CmEventKind::ConnectRequest,
            RDMA_CM_EVENT_ESTABLISHED => CmEventKind::Established,
            RDMA_CM_EVENT_REJECTED => CmEventKind::Rejected,
            RDMA_CM_EVENT_UNREACHABLE => CmEventKind::Unreachable,
            RDMA_CM_EVENT_ADDR_ERROR | RDMA_CM_EVENT_ROUTE_ERROR => CmEventKind::ResolveError,
            RDMA_CM_EVENT_CONNECT_ERROR => CmEventKind::ConnectError,
            RDMA_CM_EVENT_DISCONNECTED => CmEventKind::Disconnected,
            RDMA_CM_EVENT_DEVICE_REMOVAL => CmEventKind::DeviceRemoval,
            other => CmEventKind::Other(other),
        }
    }

    /// The event's status (0, a negative errno, or a transport-specific code).
    pub fn status(&self) -> i32 {
        self.raw().status
    }

    /// Copy of the private data carried by connect requests and replies.
    pub fn private_data(&self) -> Vec<u8> {
        // SAFETY: conn is the active union member for connection events; the pointer and length
        // come from librdmacm and stay valid until the event is acked.
        unsafe {
            let conn = &self.raw().param.conn;
            if conn.private_data.is_null() {
                return Vec::new();
            }
            std::slice::from_raw_parts(
                conn.private_data as *const u8,
                conn.private_data_len as usize,
            )
            .to_vec()
        }
    }

    /// Connection parameters a connect request asked for (responder resources, retries).
    pub fn conn_param(&self) -> ConnParam {
        // SAFETY: conn is the union member for connect requests.
        let c = unsafe { &self.raw().param.conn };
        ConnParam {
            responder_resources: c.responder_resources,
            initiator_depth: c.initiator_depth,
            flow_control: c.flow_control,
            retry_count: c.retry_count,
            rnr_retry_count: c.rnr_retry_count,
        }
    }

    /// Takes ownership of the new id of a connect request.
    pub fn take_request_id(&self) -> Option<CmId> {
        if self.kind() != CmEventKind::ConnectRequest {
            return None;
        }
        NonNull::new(self.raw().id).map(|id| CmId { id, has_qp: false })
    }
}

// SAFETY: an event is a heap record of librdmacm; acking it from another thread is allowed.
unsafe impl Send for CmEvent {}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: each event is acked exactly once.
        unsafe { sys::rdma_ack_cm_event(self.0.as_ptr()) };
    }
}

/// Connection parameters for connect/accept.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnParam {
    /// RDMA reads the peer may have outstanding against us.
    pub responder_resources: u8,
    /// RDMA reads we may have outstanding.
    pub initiator_depth: u8,
    /// Whether end-to-end flow control is used.
    pub flow_control: u8,
    /// Transport retries.
    pub retry_count: u8,
    /// Receiver-not-ready retries (7 = infinite).
    pub rnr_retry_count: u8,
}

/// An rdma_cm identifier (the RDMA analogue of a socket).
#[derive(Debug)]
pub struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    has_qp: bool,
}

// SAFETY: rdma_cm ids are used under the owning socket's lock; librdmacm is thread-safe.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

/// A socket address as bytes plus length (IPv4/IPv6/AF_IB).
#[derive(Clone, Copy)]
pub struct SockAddr {
    /// Storage.
    pub storage: libc::sockaddr_storage,
    /// Meaningful length.
    pub len: libc::socklen_t,
}

impl std::fmt::Debug for SockAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SockAddr(family {}, len {})",
            self.storage.ss_family, self.len
        )
    }
}

impl From<std::net::SocketAddr> for SockAddr {
    fn from(a: std::net::SocketAddr) -> Self {
        // SAFETY: zeroed sockaddr_storage is valid; the sockaddr_in/in6 written fit inside it.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            std::net::SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*v4.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: storage is larger than and suitably aligned for sockaddr_in.
                unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo().to_be(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: storage is larger than and suitably aligned for sockaddr_in6.
                unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

impl SockAddr {
    /// The address as a std one, for IPv4/IPv6.
    pub fn to_std(&self) -> Option<std::net::SocketAddr> {
        match self.family() {
            libc::AF_INET => {
                // SAFETY: family says the storage holds a sockaddr_in.
                let sin = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in) };
                Some(std::net::SocketAddr::from((
                    std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: family says the storage holds a sockaddr_in6.
                let sin6 = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in6) };
                Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    u32::from_be(sin6.sin6_flowinfo),
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address rdma_cm understands;
    /// anything else unchanged.
    pub fn unmap_v4(&self) -> SockAddr {
        match self.to_std() {
            Some(std::net::SocketAddr::V6(v6)) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => std::net::SocketAddr::from((v4, v6.port())).into(),
                None => *self,
            },
            _ => *self,
        }
    }

    /// An IPv4 address as IPv4-mapped IPv6, the way an AF_INET6 socket reports it.
    pub fn map_v4(&self) -> SockAddr {
        match self.to_std() {
            Some(std::net::SocketAddr::V4(v4)) => {
                std::net::SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())).into()
            }
            _ => *self,
        }
    }

    /// Copies a caller's address after checking its length against its family.
    ///
    /// # Safety
    /// `addr` must point to `len` readable bytes.
    pub unsafe fn from_raw(addr: *const libc::sockaddr, len: libc::socklen_t) -> io::Result<Self> {
        if addr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let len_us = len as usize;
        if len_us < std::mem::size_of::<libc::sa_family_t>()
            || len_us > std::mem::size_of::<libc::sockaddr_storage>()
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: zeroed storage is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: caller guarantees len readable bytes; storage is larger (checked above).
        unsafe {
            ptr::copy_nonoverlapping(addr as *const u8, &mut storage as *mut _ as *mut u8, len_us)
        };
        let need = match storage.ss_family as i32 {
            libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
            libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
            libc::AF_IB => len_us,
            _ => return Err(io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
        };
        if len_us < need {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(SockAddr { storage, len })
    }

    fn from_storage(storage: libc::sockaddr_storage) -> Self {
        let len = match storage.ss_family as i32 {
            libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
            libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
            _ => std::mem::size_of::<libc::sockaddr_storage>(),
        } as libc::socklen_t;
        SockAddr { storage, len }
    }

    /// Address family.
    pub fn family(&self) -> i32 {
        self.storage.ss_family as i32
    }

    fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        &mut self.storage as *mut _ as *mut libc::sockaddr
    }

    /// Copies into a caller's buffer with socket semantics (truncate, report full length).
    ///
    /// # Safety
    /// `addr` must point to `*addrlen` writable bytes and `addrlen` must be valid.
    pub unsafe fn copy_out(&self, addr: *mut libc::sockaddr, addrlen: *mut libc::socklen_t) {
        if addr.is_null() || addrlen.is_null() {
            return;
        }
        // SAFETY: caller guarantees both pointers.
        unsafe {
            let n = (*addrlen).min(self.len) as usize;
            ptr::copy_nonoverlapping(&self.storage as *const _ as *const u8, addr as *mut u8, n);
            *addrlen = self.len;
        }
    }
}

impl CmId {
    /// Creates a TCP-port-space id on `channel`.
    pub fn new(channel: &EventChannel) -> io::Result<Self> {
        let mut id: *mut sys::rdma_cm_id = ptr::null_mut();
        // SAFETY: valid channel and out-pointer.
        cvt(unsafe {
            sys::rdma_create_id(
                channel.as_ptr(),
                &mut id,
                ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        })?;
        Ok(CmId {
            id: non_null(id)?,
            has_qp: false,
        })
    }

    fn raw(&self) -> &sys::rdma_cm_id {
        // SAFETY: valid while self lives.
        unsafe { self.id.as_ref() }
    }

    /// Binds to a local address (port 0 picks one).
    pub fn bind(&self, addr: &SockAddr) -> io::Result<()> {
        let mut a = *addr;
        // SAFETY: valid id; address copied to a local buffer.
        cvt(unsafe { sys::rdma_bind_addr(self.id.as_ptr(), a.as_mut_ptr()) })
    }

    /// Starts listening.
    pub fn listen(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: valid id.
        cvt(unsafe { sys::rdma_listen(self.id.as_ptr(), backlog) })
    }

    /// Starts address resolution (completes with an event).
    pub fn resolve_addr(
        &self,
        src: Option<&SockAddr>,
        dst: &SockAddr,
        timeout_ms: i32,
    ) -> io::Result<()> {
        let mut d = *dst;
        let mut s = src.copied();
        let sp = s.as_mut().map_or(ptr::null_mut(), |s| s.as_mut_ptr());
        // SAFETY: valid id; addresses are local copies.
        cvt(unsafe { sys::rdma_resolve_addr(self.id.as_ptr(), sp, d.as_mut_ptr(), timeout_ms) })
    }

    /// Starts route resolution (completes with an event).
    pub fn resolve_route(&self, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: valid id.
        cvt(unsafe { sys::rdma_resolve_route(self.id.as_ptr(), timeout_ms) })
    }

    fn raw_param(private: &[u8], p: &ConnParam) -> sys::rdma_conn_param {
        sys::rdma_conn_param {
            private_data: private.as_ptr() as *const libc::c_void,
            private_data_len: private.len() as u8,
            responder_resources: p.responder_resources,
            initiator_depth: p.initiator_depth,
            flow_control: p.flow_control,
            retry_count: p.retry_count,
            rnr_retry_count: p.rnr_retry_count,
            srq: 0,
            qp_num: 0,
        }
    }

    /// Sends the connect request with our private data.
    pub fn connect(&self, private: &[u8], p: &ConnParam) -> io::Result<()> {
        let mut param = Self::raw_param(private, p);
        // SAFETY: valid id; param points at `private`, which outlives the call (copied by the kernel).
        cvt(unsafe { sys::rdma_connect(self.id.as_ptr(), &mut param) })
    }

    /// Accepts a connect request with our private data.
    pub fn accept(&self, private: &[u8], p: &ConnParam) -> io::Result<()> {
        let mut param = Self::raw_param(private, p);
        // SAFETY: as in connect.
        cvt(unsafe { sys::rdma_accept(self.id.as_ptr(), &mut param) })
    }

    /// Rejects a connect request.
    pub fn reject(&self) {
        // SAFETY: valid id; no private data.
        unsafe { sys::rdma_reject(self.id.as_ptr(), ptr::null(), 0) };
    }

    /// Starts a disconnect (DREQ); errors are irrelevant on teardown.
    pub fn disconnect(&self) {
        // SAFETY: valid id.
        unsafe { sys::rdma_disconnect(self.id.as_ptr()) };
    }

    /// rdma_set_option.
    pub fn set_option(&self, opt: CmOption, value: &[u8]) -> io::Result<()> {
        let (level, name) = opt.level_name();
        // SAFETY: valid id; librdmacm reads value.len() bytes from the slice.
        cvt(unsafe {
            sys::rdma_set_option(
                self.id.as_ptr(),
                level,
                name,
                value.as_ptr() as *mut libc::c_void,
                value.len(),
            )
        })
    }

    /// Path MTU of the resolved route in bytes, if there is one (IB MTU enum 1..5 = 256..4096).
    pub fn path_mtu(&self) -> Option<u32> {
        let r = &self.raw().route;
        if r.num_paths <= 0 || r.path_rec.is_null() {
            return None;
        }
        // SAFETY: num_paths > 0 records live at path_rec while the id does.
        let mtu = unsafe { (*r.path_rec).mtu } as u32;
        (1..=5).contains(&mtu).then(|| 1 << (7 + mtu))
    }

    /// Moves the id (and its future events) to another channel.
    pub fn migrate(&self, channel: &EventChannel) -> io::Result<()> {
        // SAFETY: both valid.
        cvt(unsafe { sys::rdma_migrate_id(self.id.as_ptr(), channel.as_ptr()) })
    }

    /// Our bound/resolved local address.
    pub fn local_addr(&self) -> SockAddr {
        // SAFETY: the storage member spans the whole union; reading it as bytes is always valid.
        SockAddr::from_storage(unsafe { self.raw().route.addr.src_addr_union.src_storage })
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SockAddr {
        // SAFETY: as above.
        SockAddr::from_storage(unsafe { self.raw().route.addr.dst_addr_union.dst_storage })
    }

    /// Whether the id is bound to a device yet.
    pub fn has_device(&self) -> bool {
        !self.raw().verbs.is_null()
    }

    /// Whether the id's device is an iWARP device (the id must be bound to one).
    fn is_iwarp(&self) -> bool {
        let ctx = self.raw().verbs;
        // SAFETY: callers checked ctx is a live device context; ctx->device is valid for the
        // context's lifetime.
        unsafe { (*(*ctx).device).transport_type == sys::ibv_transport_type::IBV_TRANSPORT_IWARP }
    }

    /// Device facts needed to size an endpoint.
    pub fn device_info(&self) -> io::Result<DeviceInfo> {
        let ctx = self.raw().verbs;
        if ctx.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        // SAFETY: zeroed attr struct is valid output storage; ctx is a live device context.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        cvt(unsafe { sys::ibv_query_device(ctx, &mut attr) })?;
        Ok(DeviceInfo {
            max_qp_wr: attr.max_qp_wr.max(0) as u32,
            max_cqe: attr.max_cqe.max(0) as u32,
            iwarp: self.is_iwarp(),
            max_rd_atom: attr.max_qp_rd_atom.min(attr.max_qp_init_rd_atom).max(0) as u8,
        })
    }

    /// Creates the RC endpoint (PD, completion channel, one CQ for both queues, QP).
    pub fn create_endpoint(
        &mut self,
        sq_size: u32,
        rq_size: u32,
        sq_inline: u32,
    ) -> io::Result<Endpoint> {
        let ctx = self.raw().verbs;
        if ctx.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        // SAFETY: ctx is a live device context.
        let pd = ProtectionDomain(non_null(unsafe { sys::ibv_alloc_pd(ctx) })?);
        // SAFETY: as above.
        let comp = CompChannel(non_null(unsafe { sys::ibv_create_comp_channel(ctx) })?);
        set_nonblocking(comp.fd(), true)?;
        // SAFETY: ctx and channel valid; no cq_context.
        let cq = unsafe {
            sys::ibv_create_cq(
                ctx,
                (sq_size + rq_size) as i32,
                ptr::null_mut(),
                comp.0.as_ptr(),
                0,
            )
        };
        let cq = CompletionQueue(non_null(cq)?);
        // SAFETY: zeroed init attr is valid; fields set below.
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.0.as_ptr();
        attr.recv_cq = cq.0.as_ptr();
        attr.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 1;
        attr.cap.max_send_wr = sq_size;
        attr.cap.max_recv_wr = rq_size;
        attr.cap.max_send_sge = 2;
        attr.cap.max_recv_sge = 1;
        attr.cap.max_inline_data = sq_inline;
        // SAFETY: valid id, pd and attr; on success librdmacm stores the QP in id->qp and
        // writes back the granted caps.
        cvt(unsafe { sys::rdma_create_qp(self.id.as_ptr(), pd.0.as_ptr(), &mut attr) })?;
        self.has_qp = true;
        Ok(Endpoint {
            qp: self.raw().qp,
            sq_inline: attr.cap.max_inline_data,
            split_short: self.is_iwarp(),
            mrs: Vec::new(),
            user_mrs: Vec::new(),
            sends_posted: std::cell::Cell::new(0),
            sends_completed: std::cell::Cell::new(0),
            armed: std::cell::Cell::new(false),
            cq,
            comp,
            pd,
        })
    }

    /// Destroys the QP (before the endpoint's CQ and PD go).
    pub fn destroy_qp(&mut self) {
        if self.has_qp {
            // SAFETY: the QP was created on this id and is destroyed once.
            unsafe { sys::rdma_destroy_qp(self.id.as_ptr()) };
            self.has_qp = false;
        }
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        self.destroy_qp();
        // SAFETY: destroyed once; events for it were acked by their owners.
        unsafe { sys::rdma_destroy_id(self.id.as_ptr()) };
    }
}

/// Options of an rdma_cm id (`rdma_set_option`, rdma_cma.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmOption {
    /// `RDMA_OPTION_ID_TOS`: u8 type of service.
    Tos,
    /// `RDMA_OPTION_ID_REUSEADDR`: int, like SO_REUSEADDR.
    ReuseAddr,
    /// `RDMA_OPTION_ID_AFONLY`: int, like IPV6_V6ONLY.
    AfOnly,
    /// `RDMA_OPTION_IB_PATH`: `struct ibv_path_data[]`, the route to use.
    IbPath,
}

impl CmOption {
    fn level_name(self) -> (i32, i32) {
        const ID: i32 = 0;
        const IB: i32 = 1;
        match self {
            CmOption::Tos => (ID, 0),
            CmOption::ReuseAddr => (ID, 1),
            CmOption::AfOnly => (ID, 2),
            CmOption::IbPath => (IB, 1),
        }
    }
}

/// What an endpoint needs to know about its device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    /// Largest queue depth.
    pub max_qp_wr: u32,
    /// Largest CQ.
    pub max_cqe: u32,
    /// iWARP transport: no immediate data on RDMA writes.
    pub iwarp: bool,
    /// RDMA reads a QP may have outstanding, as initiator and as responder (the smaller).
    pub max_rd_atom: u8,
}

// ------------------------------------------------------------------------------------ verbs

#[derive(Debug)]
struct ProtectionDomain(NonNull<sys::ibv_pd>);

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: the endpoint drops its MRs and QP first.
        unsafe { sys::ibv_dealloc_pd(self.0.as_ptr()) };
    }
}

#[derive(Debug)]
struct CompChannel(NonNull<sys::ibv_comp_channel>);

impl CompChannel {
    fn fd(&self) -> RawFd {
        // SAFETY: valid while self lives.
        unsafe { self.0.as_ref().fd }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: the CQ using it is destroyed first (field order in Endpoint).
        unsafe { sys::ibv_destroy_comp_channel(self.0.as_ptr()) };
    }
}

#[derive(Debug)]
struct CompletionQueue(NonNull<sys::ibv_cq>);

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: the QP using it is destroyed first (CmId::destroy_qp before Endpoint drops).
        unsafe { sys::ibv_destroy_cq(self.0.as_ptr()) };
    }
}

/// A registered buffer owned by its endpoint, addressed by offsets. The NIC may write it at any
/// time, so it is only ever accessed through raw copies, never through references.
#[derive(Debug)]
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    buf: NonNull<u8>,
    len: usize,
}

/// Handle to a region of an [`Endpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MrId(usize);

/// Application memory registered with the device (riomap). The application owns the memory;
/// we only hold the registration.
#[derive(Debug)]
struct UserRegion {
    mr: NonNull<sys::ibv_mr>,
    addr: u64,
    len: usize,
}

impl Drop for UserRegion {
    fn drop(&mut self) {
        // SAFETY: registered once in Endpoint::register_user; deregistered once here.
        unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// Application memory to be handed to the device (riomap'd buffers, rioread destinations).
#[derive(Debug, Clone, Copy)]
pub struct UserMemory {
    addr: *mut u8,
    len: usize,
}

// SAFETY: only an address range; whoever made it vouched for the memory (see `new`).
unsafe impl Send for UserMemory {}

impl UserMemory {
    /// Describes `[addr, addr + len)`.
    ///
    /// # Safety
    /// The range is application memory that stays mapped while it is registered, and no Rust
    /// reference covers it while the device may read or write it (a registration lets the
    /// device write it at any time: RDMA READ results, the peer's RDMA writes).
    pub unsafe fn new(addr: *mut u8, len: usize) -> Self {
        UserMemory { addr, len }
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Handle to application memory registered with [`Endpoint::register_user`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMrId(usize);

/// A range of registered application memory, checked to lie within its registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserSeg {
    /// Start address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// Local key of the registration.
    pub lkey: u32,
}

/// Access a region grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Local use only (send buffers).
    Local,
    /// The peer may RDMA-write into it.
    RemoteWrite,
}

impl MemoryRegion {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), 4096).expect("region size fits a layout")
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered once; the QP that used it is gone (endpoint field order).
        unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        // SAFETY: allocated in Endpoint::register with this layout.
        unsafe { std::alloc::dealloc(self.buf.as_ptr(), Self::layout(self.len)) };
    }
}

/// A connected RC endpoint: QP (owned by the CM id), one CQ with its completion channel, a PD and
/// the registered buffers. Field order is drop order.
#[derive(Debug)]
pub struct Endpoint {
    qp: *mut sys::ibv_qp,
    sq_inline: u32,
    /// The device mistransmits short transfers that cross a page (see [`short_page_split`]).
    split_short: bool,
    mrs: Vec<MemoryRegion>,
    user_mrs: Vec<Option<UserRegion>>,
    /// Send work requests posted and completed (every one is signalled, and an RC send
    /// queue completes in order, so `completed >= n` means the first `n` are done).
    sends_posted: std::cell::Cell<u64>,
    sends_completed: std::cell::Cell<u64>,
    /// The CQ is armed and its event not taken yet (arming again would be a wasted syscall).
    armed: std::cell::Cell<bool>,
    cq: CompletionQueue,
    comp: CompChannel,
    pd: ProtectionDomain,
}

// SAFETY: used only under the owning socket's mutex; verbs objects are thread-safe.
unsafe impl Send for Endpoint {}

/// A completion, decoded.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The work request id.
    pub wr_id: u64,
    /// Success.
    pub ok: bool,
    /// Raw status (for diagnostics).
    pub status: u32,
    /// Immediate data (host order) if the completion carried one.
    pub imm: Option<u32>,
    /// Bytes received.
    pub byte_len: u32,
}

/// Data source for a send: inline bytes copied at post time, or ranges of a registered region.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Nothing (0-byte message).
    Empty,
    /// Inline from this slice (must be ≤ the QP's inline size).
    Inline(&'a [u8]),
    /// Up to two (offset, len) ranges of a region.
    Region(MrId, [(u32, u32); 2], usize),
    /// Registered application memory (zero-copy).
    User(UserSeg),
}

/// Longest transfer that Soft-iWARP sends from its packet-header path.
///
/// Linux's siw (`siw_qp_tx.c`, `siw_try_1seg`; the 6.1 kernel of the test VM, and the same code
/// in every later version we read) copies a WRITE, SEND or READ response of at most this many
/// bytes that one SGE describes straight behind the packet header. When that SGE crosses a page
/// boundary it copies the wrong lengths: it reads past the end of the first page and from the
/// wrong place in the second, and the peer receives other bytes with no error on either side (`MAX_HDR_INLINE`: 24 bytes on x86-64). Inline data
/// and transfers with two SGEs take other paths and are right.
pub const SHORT_TRANSFER: u32 = 24;

/// Page granularity for [`short_page_split`]: a range that crosses a boundary of any larger page
/// size crosses a 4 KiB boundary at the same address.
const SPLIT_PAGE: u64 = 4096;

/// Where to split the range `[addr, addr + len)` so that no part is a short transfer crossing a
/// page (see [`SHORT_TRANSFER`]): the length of the first part, or `None` if it needs no split.
pub fn short_page_split(addr: u64, len: u32) -> Option<u32> {
    if !(2..=SHORT_TRANSFER).contains(&len) {
        return None;
    }
    let to_boundary = SPLIT_PAGE - addr % SPLIT_PAGE;
    (to_boundary < len as u64).then_some(to_boundary as u32)
}

/// The scatter/gather list of a send: a single short SGE that crosses a page becomes two SGEs
/// split at the page boundary when `split_short` (an iWARP device, see [`SHORT_TRANSFER`]).
fn sg_list(mut sges: [sys::ibv_sge; 2], n: usize, split_short: bool) -> ([sys::ibv_sge; 2], usize) {
    if split_short
        && n == 1
        && let Some(first) = short_page_split(sges[0].addr, sges[0].length)
    {
        sges[1] = sys::ibv_sge {
            addr: sges[0].addr + first as u64,
            length: sges[0].length - first,
            lkey: sges[0].lkey,
        };
        sges[0].length = first;
        return (sges, 2);
    }
    (sges, n)
}

impl Endpoint {
    /// Inline size the device granted.
    pub fn sq_inline(&self) -> u32 {
        self.sq_inline
    }

    /// Completion channel fd (readable after an armed CQ got a completion).
    pub fn comp_fd(&self) -> RawFd {
        self.comp.fd()
    }

    /// Allocates and registers a zeroed buffer.
    pub fn register(&mut self, len: usize, access: Access) -> io::Result<MrId> {
        let layout = MemoryRegion::layout(len);
        // SAFETY: non-zero size layout.
        let buf = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let acc = match access {
            Access::Local => sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
            Access::RemoteWrite => {
                (sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                    .0
            }
        };
        // SAFETY: buf is a live allocation of len bytes, pd valid.
        let mr =
            unsafe { sys::ibv_reg_mr(self.pd.0.as_ptr(), buf.as_ptr() as *mut _, len, acc as i32) };
        match NonNull::new(mr) {
            Some(mr) => {
                self.mrs.push(MemoryRegion { mr, buf, len });
                Ok(MrId(self.mrs.len() - 1))
            }
            None => {
                let e = last_error();
                // SAFETY: allocated just above with this layout.
                unsafe { std::alloc::dealloc(buf.as_ptr(), layout) };
                Err(e)
            }
        }
    }

    /// Registers application memory for local access and, as asked, for the peer's RDMA reads
    /// and writes, until [`Endpoint::deregister_user`] or the endpoint's drop (the contract of
    /// [`UserMemory::new`] covers that time).
    pub fn register_user(
        &mut self,
        mem: UserMemory,
        remote_read: bool,
        remote_write: bool,
    ) -> io::Result<UserMrId> {
        let (addr, len) = (mem.addr, mem.len);
        if addr.is_null() || len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut acc = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if remote_read {
            acc |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        if remote_write {
            acc |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        // SAFETY: pd valid; the device checks the range is mapped (EFAULT otherwise); whoever
        // made `mem` vouched for the rest (UserMemory::new).
        let mr = unsafe { sys::ibv_reg_mr(self.pd.0.as_ptr(), addr as *mut _, len, acc as i32) };
        let mr = NonNull::new(mr).ok_or_else(last_error)?;
        let r = UserRegion {
            mr,
            addr: addr as u64,
            len,
        };
        if let Some(i) = self.user_mrs.iter().position(Option::is_none) {
            self.user_mrs[i] = Some(r);
            Ok(UserMrId(i))
        } else {
            self.user_mrs.push(Some(r));
            Ok(UserMrId(self.user_mrs.len() - 1))
        }
    }

    /// Drops a registration made with [`Endpoint::register_user`].
    pub fn deregister_user(&mut self, id: UserMrId) {
        if let Some(slot) = self.user_mrs.get_mut(id.0) {
            *slot = None;
        }
    }

    /// (address, rkey) of a registration, for the peer.
    pub fn user_remote_handle(&self, id: UserMrId) -> Option<(u64, u32)> {
        let r = self.user_mrs.get(id.0)?.as_ref()?;
        // SAFETY: mr valid while registered.
        Some((r.addr, unsafe { r.mr.as_ref().rkey }))
    }

    /// The registered range `[addr, addr + len)` of `id`, if it lies inside the registration.
    pub fn user_seg(&self, id: UserMrId, addr: u64, len: u32) -> Option<UserSeg> {
        let r = self.user_mrs.get(id.0)?.as_ref()?;
        let end = addr.checked_add(len as u64)?;
        if addr < r.addr || end > r.addr + r.len as u64 {
            return None;
        }
        Some(UserSeg {
            addr,
            len,
            // SAFETY: mr valid while registered.
            lkey: unsafe { r.mr.as_ref().lkey },
        })
    }

    /// Whether reads must not be short ranges crossing a page of the peer's memory (the peer's
    /// device answers them from its header path too, see [`SHORT_TRANSFER`]): the caller caps
    /// each read with [`short_page_split`] of the remote address.
    pub fn splits_short(&self) -> bool {
        self.split_short
    }

    /// Posts an RDMA READ of `dst.len` bytes from the peer's `remote` (address, rkey) into `dst`.
    pub fn post_read(&self, wr_id: u64, dst: UserSeg, remote: (u64, u32)) -> io::Result<()> {
        let mut sge = sys::ibv_sge {
            addr: dst.addr,
            length: dst.len,
            lkey: dst.lkey,
        };
        // SAFETY: zeroed send WR is valid; fields set below.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
        wr.wr.rdma = sys::rdma_t {
            remote_addr: remote.0,
            rkey: remote.1,
        };
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: valid QP; wr and sge live across the call; dst lies in a registration
        // (UserSeg is only made by user_seg) whose memory the application vouched for.
        cvt(unsafe { sys::ibv_post_send(self.qp, &mut wr, &mut bad) })?;
        self.sends_posted.set(self.sends_posted.get() + 1);
        Ok(())
    }

    /// Send work requests posted so far (a sequence number for [`Endpoint::sends_completed`]).
    pub fn sends_posted(&self) -> u64 {
        self.sends_posted.get()
    }

    /// Send work requests completed so far (successfully or not).
    pub fn sends_completed(&self) -> u64 {
        self.sends_completed.get()
    }

    fn mr(&self, id: MrId) -> &MemoryRegion {
        &self.mrs[id.0]
    }

    /// (address, rkey) of a region, for the peer.
    pub fn remote_handle(&self, id: MrId) -> (u64, u32) {
        let m = self.mr(id);
        // SAFETY: mr valid while registered.
        (m.buf.as_ptr() as u64, unsafe { m.mr.as_ref().rkey })
    }

    /// Copies region bytes out. Panics on an out-of-range request (a bug, not peer input).
    pub fn read(&self, id: MrId, offset: usize, out: &mut [u8]) {
        let m = self.mr(id);
        assert!(
            offset.checked_add(out.len()).is_some_and(|e| e <= m.len),
            "read outside region"
        );
        // SAFETY: range checked against the allocation; raw copy because the NIC may write.
        unsafe {
            ptr::copy_nonoverlapping(m.buf.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
    }

    /// Copies bytes into a region. Panics on an out-of-range request.
    pub fn write(&self, id: MrId, offset: usize, data: &[u8]) {
        let m = self.mr(id);
        assert!(
            offset.checked_add(data.len()).is_some_and(|e| e <= m.len),
            "write outside region"
        );
        // SAFETY: range checked against the allocation.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), m.buf.as_ptr().add(offset), data.len()) };
    }

    /// Posts `n` receives: zero-SGE ones (data arrives by RDMA write with immediate), or on
    /// iWARP 4-byte receives into `msg_area` at slots `first_slot..` (wrapping at `slots`).
    pub fn post_recvs(
        &self,
        n: u32,
        msg_area: Option<(MrId, usize, u32)>,
        first_slot: &mut u32,
    ) -> io::Result<()> {
        for _ in 0..n {
            let mut sge = sys::ibv_sge {
                addr: 0,
                length: 0,
                lkey: 0,
            };
            // SAFETY: zeroed recv WR is valid; fields set below.
            let mut wr: sys::ibv_recv_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = crate::proto::stream::WR_ID_RECV;
            if let Some((id, base, slots)) = msg_area {
                let m = self.mr(id);
                let slot = *first_slot;
                *first_slot = (slot + 1) % slots;
                sge.addr = m.buf.as_ptr() as u64 + (base + slot as usize * 4) as u64;
                sge.length = 4;
                // SAFETY: mr valid.
                sge.lkey = unsafe { m.mr.as_ref().lkey };
                wr.wr_id |= slot as u64;
                wr.sg_list = &mut sge;
                wr.num_sge = 1;
            }
            let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
            // SAFETY: valid QP; wr and sge live across the call.
            cvt(unsafe { sys::ibv_post_recv(self.qp, &mut wr, &mut bad) })?;
        }
        Ok(())
    }

    /// Posts an RDMA write (optionally with immediate data) or, with `remote == None`, a SEND.
    pub fn post_send(
        &self,
        wr_id: u64,
        payload: Payload<'_>,
        remote: Option<(u64, u32)>,
        imm: Option<u32>,
    ) -> io::Result<()> {
        let mut sges = [sys::ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        }; 2];
        let mut nsge = 0;
        let mut flags = 0;
        match payload {
            Payload::Empty => {}
            Payload::Inline(b) => {
                if b.len() > self.sq_inline as usize {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                sges[0] = sys::ibv_sge {
                    addr: b.as_ptr() as u64,
                    length: b.len() as u32,
                    lkey: 0,
                };
                nsge = 1;
                flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
            }
            Payload::Region(id, ranges, n) => {
                let m = self.mr(id);
                for (i, &(off, len)) in ranges[..n].iter().enumerate() {
                    assert!(off as usize + len as usize <= m.len, "send outside region");
                    sges[i] = sys::ibv_sge {
                        addr: m.buf.as_ptr() as u64 + off as u64,
                        length: len,
                        // SAFETY: mr valid.
                        lkey: unsafe { m.mr.as_ref().lkey },
                    };
                }
                nsge = n;
            }
            Payload::User(seg) => {
                sges[0] = sys::ibv_sge {
                    addr: seg.addr,
                    length: seg.len,
                    lkey: seg.lkey,
                };
                nsge = 1;
            }
        }
        if flags & sys::ibv_send_flags::IBV_SEND_INLINE.0 == 0 {
            (sges, nsge) = sg_list(sges, nsge, self.split_short);
        }
        // SAFETY: zeroed send WR is valid; fields set below.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = sges.as_mut_ptr();
        wr.num_sge = nsge as i32;
        wr.send_flags = flags;
        match remote {
            Some((addr, rkey)) => {
                wr.opcode = if imm.is_some() {
                    sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
                } else {
                    sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE
                };
                wr.wr.rdma = sys::rdma_t {
                    remote_addr: addr,
                    rkey,
                };
            }
            None => wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND,
        }
        if let Some(imm) = imm {
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: valid QP; wr, sges and inline data live across the call (inline data is copied).
        cvt(unsafe { sys::ibv_post_send(self.qp, &mut wr, &mut bad) })?;
        self.sends_posted.set(self.sends_posted.get() + 1);
        Ok(())
    }

    /// Polls up to `out.len()` completions.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> io::Result<()> {
        // Not zeroed: this runs on every call of the fast path, and the CQ writes what it returns.
        let mut wcs: [std::mem::MaybeUninit<sys::ibv_wc>; 32] =
            [const { std::mem::MaybeUninit::uninit() }; 32];
        let want = max.min(32) as i32;
        // SAFETY: valid CQ and output array of `want` entries.
        let n = unsafe {
            sys::ibv_poll_cq(
                self.cq.0.as_ptr(),
                want,
                wcs.as_mut_ptr() as *mut sys::ibv_wc,
            )
        };
        if n < 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for wc in &wcs[..n as usize] {
            // SAFETY: ibv_poll_cq initialised the first n entries.
            let wc = unsafe { wc.assume_init_ref() };
            if wc.wr_id & crate::proto::stream::WR_ID_RECV == 0 {
                self.sends_completed.set(self.sends_completed.get() + 1);
            }
            let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            out.push(Completion {
                wr_id: wc.wr_id,
                ok: wc.status == sys::ibv_wc_status::IBV_WC_SUCCESS,
                status: wc.status,
                // SAFETY: imm_data is the active member when IBV_WC_WITH_IMM is set.
                imm: with_imm
                    .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
                byte_len: wc.byte_len,
            });
        }
        Ok(())
    }

    /// Arms the CQ: the completion channel fd becomes readable at the next completion.
    pub fn arm(&self) -> io::Result<()> {
        if self.armed.get() {
            // Still armed: the next completion raises the event (or raised it already and the
            // channel stays readable until the event is taken).
            return Ok(());
        }
        // SAFETY: valid CQ.
        cvt(unsafe { sys::ibv_req_notify_cq(self.cq.0.as_ptr(), 0) })?;
        self.armed.set(true);
        Ok(())
    }

    /// Consumes a completion-channel event if one is pending (non-blocking). Returns whether
    /// one was consumed; each is acknowledged at once.
    pub fn take_cq_event(&self) -> bool {
        let mut cq: *mut sys::ibv_cq = ptr::null_mut();
        let mut ctx: *mut libc::c_void = ptr::null_mut();
        // SAFETY: valid channel; the fd is non-blocking so this never sleeps.
        let r = unsafe { sys::ibv_get_cq_event(self.comp.0.as_ptr(), &mut cq, &mut ctx) };
        if r == 0 {
            // An event disarms the CQ.
            self.armed.set(false);
            // SAFETY: cq is ours; one event to ack.
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sge(addr: u64, length: u32) -> sys::ibv_sge {
        sys::ibv_sge {
            addr,
            length,
            lkey: 7,
        }
    }

    fn ranges(list: ([sys::ibv_sge; 2], usize)) -> Vec<(u64, u32)> {
        list.0[..list.1]
            .iter()
            .map(|s| (s.addr, s.length))
            .collect()
    }

    /// The integrity issue's stream: a gathered 13-byte write whose ring bytes start 2 bytes
    /// before a page boundary. Soft-iWARP sent bytes 2..13 of it wrong; it must leave as two SGEs.
    #[test]
    fn short_write_across_a_page_is_split_on_iwarp() {
        let base = 0x7f00_0000_0000u64;
        let one = [sge(base + 4094, 13), sge(0, 0)];
        assert_eq!(
            ranges(sg_list(one, 1, true)),
            [(base + 4094, 2), (base + 4096, 11)]
        );
        // Not on RoCE, not when it stays in one page, not past the header path's limit, and a
        // two-SGE list (a ring wrap) is left alone.
        assert_eq!(ranges(sg_list(one, 1, false)), [(base + 4094, 13)]);
        let inside = [sge(base + 4000, 24), sge(0, 0)];
        assert_eq!(ranges(sg_list(inside, 1, true)), [(base + 4000, 24)]);
        let long = [sge(base + 4090, SHORT_TRANSFER + 1), sge(0, 0)];
        assert_eq!(ranges(sg_list(long, 1, true)), [(base + 4090, 25)]);
        let two = [sge(base + 4094, 2), sge(base, 11)];
        assert_eq!(
            ranges(sg_list(two, 2, true)),
            [(base + 4094, 2), (base, 11)]
        );
        // Every placement of every short length: no part of a short single SGE crosses a page.
        for len in 1..=SHORT_TRANSFER {
            for off in 4096 - 30..4096 + 2 {
                let (list, n) = sg_list([sge(base + off, len), sge(0, 0)], 1, true);
                let total: u32 = list[..n].iter().map(|s| s.length).sum();
                assert_eq!(total, len);
                assert_eq!(list[0].addr, base + off);
                for s in &list[..n] {
                    let crosses = s.addr / 4096 != (s.addr + s.length as u64 - 1) / 4096;
                    assert!(
                        !(n == 1 && crosses),
                        "len {len} at {off} left crossing a page"
                    );
                }
            }
        }
    }

    #[test]
    fn read_caps_stop_at_the_page() {
        assert_eq!(short_page_split(4090, 10), Some(6));
        assert_eq!(short_page_split(4096, 10), None);
        assert_eq!(short_page_split(4095, 1), None);
        assert_eq!(short_page_split(4095, 2), Some(1));
        assert_eq!(short_page_split(4090, 64), None);
    }
}
