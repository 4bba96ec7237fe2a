//! The connection manager (librdmacm): event channels, events, CM ids and their options.

use std::io;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};

use rdma_sys as sys;

use super::addr::SockAddr;
use super::endpoint::{CompChannel, CompletionQueue, Endpoint, ProtectionDomain};
use super::os::{set_nonblocking, without_signals};
use super::{cvt, non_null};

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
        // librdmacm opens its device contexts in this process from now on (see `contexts`).
        contexts::first_use();
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

    pub(super) fn as_ptr(&self) -> *mut sys::rdma_event_channel {
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
    pub(super) fn raw(&self) -> &sys::rdma_cm_event {
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
    pub(super) id: NonNull<sys::rdma_cm_id>,
    pub(super) has_qp: bool,
}

// SAFETY: rdma_cm ids are used under the owning socket's lock; librdmacm is thread-safe.
unsafe impl Send for CmId {}
// SAFETY: as above.
unsafe impl Sync for CmId {}

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

    pub(super) fn raw(&self) -> &sys::rdma_cm_id {
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
        without_signals(|| cvt(unsafe { sys::rdma_listen(self.id.as_ptr(), backlog) }))
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
        without_signals(|| cvt(unsafe { sys::rdma_connect(self.id.as_ptr(), &mut param) }))
    }

    /// Accepts a connect request with our private data.
    pub fn accept(&self, private: &[u8], p: &ConnParam) -> io::Result<()> {
        let mut param = Self::raw_param(private, p);
        // SAFETY: as in connect.
        without_signals(|| cvt(unsafe { sys::rdma_accept(self.id.as_ptr(), &mut param) }))
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

    /// The id's device context, made one this process may create verbs objects on: in a
    /// forked child, or after the process's credentials changed, librdmacm hands out contexts
    /// opened under other credentials, whose commands the kernel refuses (see `contexts`); the
    /// id then takes this process's own context of the same device, on which librdmacm
    /// creates and moves its QP as on its own.
    pub(super) fn context(&mut self) -> io::Result<*mut sys::ibv_context> {
        let ctx = self.raw().verbs;
        if ctx.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        let own = contexts::usable(ctx)?;
        if own != ctx {
            // SAFETY: the id is ours and valid; `verbs` is the public field librdmacm reads
            // back for the QP (rdma_create_qp requires the PD's context to equal it), and `own`
            // is a live context of the same device that lives as long as the process.
            unsafe { (*self.id.as_ptr()).verbs = own };
        }
        Ok(own)
    }

    /// Whether the id's device is an iWARP device (the id must be bound to one).
    pub(super) fn is_iwarp(&self) -> bool {
        let ctx = self.raw().verbs;
        // SAFETY: callers checked ctx is a live device context; ctx->device is valid for the
        // context's lifetime.
        unsafe { (*(*ctx).device).transport_type == sys::ibv_transport_type::IBV_TRANSPORT_IWARP }
    }

    /// Device facts needed to size an endpoint.
    pub fn device_info(&mut self) -> io::Result<DeviceInfo> {
        let ctx = self.context()?;
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

    /// Creates the RC endpoint (PD, completion channel, a CQ for each queue, QP).
    pub fn create_endpoint(
        &mut self,
        sq_size: u32,
        rq_size: u32,
        sq_inline: u32,
    ) -> io::Result<Endpoint> {
        self.create_qp_endpoint(sys::ibv_qp_type::IBV_QPT_RC, 2, sq_size, rq_size, sq_inline)
    }

    /// Creates a queue pair of type `qp_type` on the id with its own PD and completion channel
    /// (every send signalled; `send_sge` gather entries per send, one per receive). A connected
    /// (RC) QP's send queue has a CQ of its own on the channel, armed apart (see
    /// [`Endpoint::arm`]); a UD QP has one CQ for both queues. On success librdmacm stores the
    /// QP in id->qp (and moves a UD QP to RTS with the UDP Q_Key).
    pub(super) fn create_qp_endpoint(
        &mut self,
        qp_type: sys::ibv_qp_type::Type,
        send_sge: u32,
        sq_size: u32,
        rq_size: u32,
        sq_inline: u32,
    ) -> io::Result<Endpoint> {
        let ctx = self.context()?;
        // SAFETY: ctx is a live device context.
        let pd = ProtectionDomain(non_null(unsafe { sys::ibv_alloc_pd(ctx) })?);
        // SAFETY: as above.
        let comp = CompChannel(non_null(unsafe { sys::ibv_create_comp_channel(ctx) })?);
        set_nonblocking(comp.fd(), true)?;
        let split = qp_type == sys::ibv_qp_type::IBV_QPT_RC;
        let recv_entries = if split { rq_size } else { sq_size + rq_size };
        let new_cq = |entries: u32| -> io::Result<CompletionQueue> {
            // SAFETY: ctx and channel valid; no cq_context.
            let cq = unsafe {
                sys::ibv_create_cq(ctx, entries as i32, ptr::null_mut(), comp.0.as_ptr(), 0)
            };
            Ok(CompletionQueue(non_null(cq)?))
        };
        let cq = new_cq(recv_entries)?;
        let send_cq = if split { Some(new_cq(sq_size)?) } else { None };
        // SAFETY: zeroed init attr is valid; fields set below.
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = send_cq.as_ref().unwrap_or(&cq).0.as_ptr();
        attr.recv_cq = cq.0.as_ptr();
        attr.qp_type = qp_type;
        attr.sq_sig_all = 1;
        attr.cap.max_send_wr = sq_size;
        attr.cap.max_recv_wr = rq_size;
        attr.cap.max_send_sge = send_sge;
        attr.cap.max_recv_sge = 1;
        attr.cap.max_inline_data = sq_inline;
        // SAFETY: valid id, pd and attr; on success librdmacm stores the QP in id->qp and
        // writes back the granted caps.
        cvt(unsafe { sys::rdma_create_qp(self.id.as_ptr(), pd.0.as_ptr(), &mut attr) })?;
        self.has_qp = true;
        Ok(Endpoint::new(
            self.raw().qp,
            attr.cap.max_inline_data,
            self.is_iwarp(),
            cq,
            send_cq,
            comp,
            pd,
        ))
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

/// Device contexts across fork and credential changes.
///
/// The kernel refuses the write(2)-based verbs commands on a device file opened under other
/// credentials than the caller's (`ib_safe_file_access`): a forked child has its own, and so
/// has every thread after setuid, setgid and the like. Soft-RoCE and Soft-iWARP ring their
/// doorbell that way, so a QP made on such a context connects and then fails its first post
/// with EACCES. librdmacm opens each device once per process image and gives every id that
/// context, so a child of a process that used RDMA (a forking server's workers), or a process
/// whose credentials changed, opens its own.
pub mod contexts {
    use std::collections::HashMap;
    use std::io;
    use std::sync::{Mutex, OnceLock};

    use rdma_sys as sys;

    use crate::verbs::non_null;

    /// The process that first used librdmacm: its contexts are librdmacm's.
    static FIRST: OnceLock<u32> = OnceLock::new();

    /// Bumped when the process's credentials change (see `credentials_changed`).
    static CREDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

    /// The process's credentials changed: librdmacm's contexts, and ours opened before, are
    /// refused from now on (see the module documentation); later connections open new ones.
    pub fn credentials_changed() {
        CREDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// An own context (pointer as an integer) with the process and the credentials
    /// generation that opened it (one opened before a fork is the parent's).
    #[derive(Clone, Copy)]
    struct Own {
        pid: u32,
        creds: u32,
        ctx: usize,
    }

    /// This process's own contexts, by device (pointer as an integer).
    static OWN: Mutex<Option<HashMap<usize, Own>>> = Mutex::new(None);

    /// Notes the first process to use librdmacm (every later call is a no-op).
    pub fn first_use() {
        FIRST.get_or_init(std::process::id);
    }

    /// `ctx` if this process may use it, else this process's own context of its device.
    pub fn usable(ctx: *mut sys::ibv_context) -> io::Result<*mut sys::ibv_context> {
        let pid = std::process::id();
        let creds = CREDS.load(std::sync::atomic::Ordering::SeqCst);
        if creds == 0 && FIRST.get().is_none_or(|&p| p == pid) {
            return Ok(ctx);
        }
        // SAFETY: ctx is a live context; its device lives as long as librdmacm's device list.
        let dev = unsafe { (*ctx).device };
        let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
        let own = own.get_or_insert_with(HashMap::new);
        if let Some(o) = own.get(&(dev as usize))
            && o.pid == pid
            && o.creds == creds
        {
            return Ok(o.ctx as *mut sys::ibv_context);
        }
        // SAFETY: dev is a device of librdmacm's list; the context is never closed (it serves
        // every later connection of this process).
        let c = non_null(unsafe { sys::ibv_open_device(dev) })?;
        own.insert(
            dev as usize,
            Own {
                pid,
                creds,
                ctx: c.as_ptr() as usize,
            },
        );
        Ok(c.as_ptr())
    }
}
