//! Unreliable datagram (UD) queue pairs for datagram rsockets: the endpoint, address handles
//! built from a resolved route (with the global route header RoCE needs) or from a multicast
//! join, and multicast membership through the connection manager.

use std::io;
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use rdma_sys as sys;

use super::addr::SockAddr;
use super::cm::{CmEvent, CmId, EventChannel};
use super::endpoint::{Endpoint, MrId};
use super::os::{poll_fds, pollin};
use super::{cvt, last_error, non_null};

/// How to reach one peer queue pair (or a multicast group): `struct ibv_ah_attr`.
#[derive(Clone, Copy)]
pub struct AhAttr(sys::ibv_ah_attr);

impl std::fmt::Debug for AhAttr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: `raw` is the plain byte view of the gid union; every bit pattern is valid.
        let dgid = unsafe { self.0.grh.dgid.raw };
        f.debug_struct("AhAttr")
            .field("global", &self.0.is_global)
            .field("dgid", &dgid)
            .field("sgid_index", &self.0.grh.sgid_index)
            .field("hop_limit", &self.0.grh.hop_limit)
            .field("dlid", &self.0.dlid)
            .field("port", &self.0.port_num)
            .finish()
    }
}

impl AhAttr {
    /// Sets the hop limit (the IP TTL on RoCE v2) of a global route.
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.0.grh.hop_limit = hops;
    }
}

/// An address handle, destroyed on drop.
#[derive(Debug)]
pub struct Ah(NonNull<sys::ibv_ah>);

// SAFETY: an address handle is immutable after creation; verbs calls on it are thread-safe.
unsafe impl Send for Ah {}
// SAFETY: as above.
unsafe impl Sync for Ah {}

impl Drop for Ah {
    fn drop(&mut self) {
        // SAFETY: created once by ibv_create_ah, destroyed once; no send using it is posted
        // after this (its owner drops it only with the destination, under the socket's lock).
        unsafe { sys::ibv_destroy_ah(self.0.as_ptr()) };
    }
}

/// What a datagram socket needs to know about the port its queue pair is on.
#[derive(Debug, Clone, Copy)]
pub struct PortInfo {
    /// The active MTU in bytes: the largest UD message.
    pub mtu: usize,
    /// Ethernet link layer (RoCE): address handles need a global route header.
    pub ethernet: bool,
}

/// Whether the host has an RDMA device with unreliable datagrams (InfiniBand or RoCE; iWARP
/// devices have none).
pub fn ud_device_present() -> bool {
    let mut n = 0;
    // SAFETY: out-pointer to a local; the list is freed below.
    let list = unsafe { sys::ibv_get_device_list(&mut n) };
    if list.is_null() {
        return false;
    }
    let mut found = false;
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds n valid device pointers.
        let dev = unsafe { *list.add(i) };
        // SAFETY: dev is valid until the list is freed.
        if unsafe { (*dev).transport_type } != sys::ibv_transport_type::IBV_TRANSPORT_IWARP {
            found = true;
        }
    }
    // SAFETY: the list came from ibv_get_device_list.
    unsafe { sys::ibv_free_device_list(list) };
    found
}

/// Waits up to `timeout` for the next event on `ch` (a non-blocking channel).
pub fn wait_event(ch: &EventChannel, timeout: Duration) -> io::Result<CmEvent> {
    let end = Instant::now() + timeout;
    loop {
        match ch.get_event() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        let mut p = [pollin(ch.fd())];
        poll_fds(&mut p, left.as_millis().clamp(1, i32::MAX as u128) as i32)?;
    }
}

/// The address handle attributes for `dst`, seen from the device that `src` (an IP address,
/// port 0) is on: a route resolved through the connection manager. Also returns the device
/// it resolved on (compare with the endpoint's before using the attributes there).
pub fn resolve_ah_attr(
    src: &SockAddr,
    dst: &SockAddr,
    timeout_ms: i32,
) -> io::Result<(AhAttr, usize)> {
    let ch = EventChannel::new()?;
    let mut id = CmId::new_udp(&ch)?;
    id.resolve_addr(Some(src), dst, timeout_ms)?;
    expect(
        &ch,
        sys::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
        timeout_ms,
    )?;
    id.resolve_route(timeout_ms)?;
    expect(
        &ch,
        sys::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
        timeout_ms,
    )?;
    let attr = id.route_ah_attr()?;
    let dev = id.device();
    Ok((attr, dev))
}

/// Takes the next event and checks it is `want` (EHOSTUNREACH otherwise).
fn expect(ch: &EventChannel, want: u32, timeout_ms: i32) -> io::Result<()> {
    let ev = wait_event(ch, Duration::from_millis(timeout_ms.max(1) as u64 + 500))?;
    if ev.raw().event == want && ev.status() == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::EHOSTUNREACH))
    }
}

impl CmId {
    /// Creates a UDP-port-space id on `channel` (the port space of datagram rsockets).
    pub fn new_udp(channel: &EventChannel) -> io::Result<Self> {
        let mut id: *mut sys::rdma_cm_id = ptr::null_mut();
        // SAFETY: valid channel and out-pointer.
        cvt(unsafe {
            sys::rdma_create_id(
                channel.as_ptr(),
                &mut id,
                ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_UDP,
            )
        })?;
        Ok(CmId {
            id: non_null(id)?,
            has_qp: false,
        })
    }

    /// The id's device (an opaque identity, to compare).
    pub fn device(&self) -> usize {
        let ctx = self.raw().verbs;
        if ctx.is_null() {
            return 0;
        }
        // SAFETY: a non-null context of a bound id is live; its device outlives it.
        unsafe { (*ctx).device as usize }
    }

    /// Whether the id is on an iWARP device (which has no unreliable datagrams).
    pub fn on_iwarp(&self) -> bool {
        !self.raw().verbs.is_null() && self.is_iwarp()
    }

    /// The MTU and link layer of the port the (bound) id is on.
    pub fn port_info(&mut self) -> io::Result<PortInfo> {
        let ctx = self.context()?;
        // SAFETY: zeroed port attributes are valid output storage.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, port of the id, output struct of the size passed.
        cvt(unsafe { sys::___ibv_query_port(ctx, self.raw().port_num, &mut attr) })?;
        Ok(PortInfo {
            mtu: crate::proto::dgram::mtu_bytes(attr.active_mtu),
            ethernet: attr.link_layer == 2, // IBV_LINK_LAYER_ETHERNET
        })
    }

    /// Creates a UD queue pair on the (bound) id with its own PD, CQ and completion channel;
    /// librdmacm moves it to RTS with the UDP Q_Key.
    pub fn create_ud_endpoint(
        &mut self,
        sq_size: u32,
        rq_size: u32,
        sq_inline: u32,
    ) -> io::Result<Endpoint> {
        if self.on_iwarp() {
            return Err(io::Error::from_raw_os_error(libc::ESOCKTNOSUPPORT));
        }
        self.create_qp_endpoint(sys::ibv_qp_type::IBV_QPT_UD, 1, sq_size, rq_size, sq_inline)
    }

    /// Address handle attributes from the route this id resolved: with a global route header
    /// on an Ethernet port or past a router (librdmacm leaves it out on RoCE, where the device
    /// needs it).
    pub fn route_ah_attr(&mut self) -> io::Result<AhAttr> {
        let ethernet = self.port_info()?.ethernet;
        let ctx = self.context()?;
        let r = self.raw();
        if r.route.path_rec.is_null() || r.route.num_paths < 1 {
            return Err(io::Error::from_raw_os_error(libc::EHOSTUNREACH));
        }
        // SAFETY: a resolved route holds num_paths (≥ 1) path records.
        let path = unsafe { &*r.route.path_rec };
        // SAFETY: zeroed attributes are valid; set below.
        let mut a: sys::ibv_ah_attr = unsafe { std::mem::zeroed() };
        if ethernet || path.hop_limit > 1 {
            a.is_global = 1;
            a.grh.dgid = path.dgid;
            a.grh.flow_label = u32::from_be(path.flow_label);
            a.grh.sgid_index = gid_index(ctx, r.port_num, &path.sgid)?;
            a.grh.hop_limit = if path.hop_limit > 1 {
                path.hop_limit
            } else {
                64
            };
            a.grh.traffic_class = path.traffic_class;
        }
        a.dlid = u16::from_be(path.dlid);
        a.sl = path.sl;
        a.port_num = r.port_num;
        Ok(AhAttr(a))
    }

    /// Joins the multicast group `group` (the QP is attached for a full member; a send-only
    /// member gets an address handle to send with, and nothing attached). The join completes
    /// with an event on the id's channel ([`CmEvent::multicast`]).
    pub fn join_multicast(&self, group: &SockAddr, send_only: bool) -> io::Result<()> {
        let mut g = *group;
        let mut attr = sys::rdma_cm_join_mc_attr_ex {
            comp_mask: (sys::rdma_cm_join_mc_attr_mask::RDMA_CM_JOIN_MC_ATTR_ADDRESS
                | sys::rdma_cm_join_mc_attr_mask::RDMA_CM_JOIN_MC_ATTR_JOIN_FLAGS)
                .0,
            join_flags: if send_only {
                sys::rdma_cm_mc_join_flags::RDMA_MC_JOIN_FLAG_SENDONLY_FULLMEMBER.0
            } else {
                sys::rdma_cm_mc_join_flags::RDMA_MC_JOIN_FLAG_FULLMEMBER.0
            },
            addr: g.as_mut_ptr(),
        };
        // SAFETY: valid id; attr and the address are locals librdmacm copies.
        cvt(unsafe { sys::rdma_join_multicast_ex(self.id.as_ptr(), &mut attr, ptr::null_mut()) })
    }

    /// Leaves a group joined with [`CmId::join_multicast`] (detaches the QP).
    pub fn leave_multicast(&self, group: &SockAddr) -> io::Result<()> {
        let mut g = *group;
        // SAFETY: valid id; the address is a local copy.
        cvt(unsafe { sys::rdma_leave_multicast(self.id.as_ptr(), g.as_mut_ptr()) })
    }
}

/// The index of `gid` in the port's GID table.
fn gid_index(ctx: *mut sys::ibv_context, port: u8, gid: &sys::ibv_gid) -> io::Result<u8> {
    // SAFETY: `raw` is the byte view of the union.
    let want = unsafe { gid.raw };
    for i in 0..=255u8 {
        // SAFETY: zeroed gid is valid output storage.
        let mut g: sys::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: live context; an index past the table fails without writing.
        if unsafe { sys::ibv_query_gid(ctx, port, i as i32, &mut g) } != 0 {
            break;
        }
        // SAFETY: byte view of the union the query wrote.
        if unsafe { g.raw } == want {
            return Ok(i);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))
}

impl CmEvent {
    /// For a multicast join event: the group's address handle attributes, queue pair number
    /// and Q_Key; an error for a failed join; `None` for other events.
    pub fn multicast(&self) -> Option<io::Result<(AhAttr, u32, u32)>> {
        use sys::rdma_cm_event_type::*;
        let r = self.raw();
        match r.event {
            RDMA_CM_EVENT_MULTICAST_JOIN if r.status == 0 => {
                // SAFETY: `ud` is the active member of a multicast join event.
                let ud = unsafe { r.param.ud };
                Some(Ok((AhAttr(ud.ah_attr), ud.qp_num, ud.qkey)))
            }
            RDMA_CM_EVENT_MULTICAST_JOIN | RDMA_CM_EVENT_MULTICAST_ERROR => {
                Some(Err(io::Error::from_raw_os_error(if r.status < 0 {
                    -r.status
                } else {
                    libc::EADDRNOTAVAIL
                })))
            }
            _ => None,
        }
    }
}

impl Endpoint {
    /// The queue pair's number.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: the QP lives as long as the endpoint.
        unsafe { (*self.qp).qp_num }
    }

    /// An address handle on this endpoint's protection domain.
    pub fn create_ah(&self, attr: &AhAttr) -> io::Result<Ah> {
        let mut a = attr.0;
        // SAFETY: valid PD; attributes copied.
        let ah = unsafe { sys::ibv_create_ah(self.pd.0.as_ptr(), &mut a) };
        NonNull::new(ah).map(Ah).ok_or_else(last_error)
    }

    /// Posts a receive of `len` bytes at `offset` of region `mr` (a UD receive: the GRH, then
    /// the message).
    pub fn post_recv_at(&self, wr_id: u64, mr: MrId, offset: usize, len: usize) -> io::Result<()> {
        let m = self.mr(mr);
        assert!(offset + len <= m.len, "receive outside region");
        let mut sge = sys::ibv_sge {
            addr: m.ptr() as u64 + offset as u64,
            length: len as u32,
            lkey: m.lkey(),
        };
        // SAFETY: zeroed recv WR is valid; fields set below.
        let mut wr: sys::ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        // SAFETY: valid QP; wr and sge live across the call.
        cvt(unsafe { sys::ibv_post_recv(self.qp, &mut wr, &mut bad) })
    }

    /// Posts a UD send of `len` bytes at `offset` of region `mr` to queue pair `qpn` through
    /// `ah` (inline when it fits).
    #[allow(clippy::too_many_arguments)]
    pub fn post_ud_send(
        &self,
        wr_id: u64,
        mr: MrId,
        offset: usize,
        len: usize,
        ah: &Ah,
        qpn: u32,
        qkey: u32,
    ) -> io::Result<()> {
        let m = self.mr(mr);
        assert!(offset + len <= m.len, "send outside region");
        let mut sge = sys::ibv_sge {
            addr: m.ptr() as u64 + offset as u64,
            length: len as u32,
            lkey: m.lkey(),
        };
        // SAFETY: zeroed send WR is valid; fields set below.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND;
        if len <= self.sq_inline() as usize {
            wr.send_flags = sys::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.wr.ud = sys::ud_t {
            ah: ah.0.as_ptr(),
            remote_qpn: qpn,
            remote_qkey: qkey,
        };
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: valid QP and AH; wr and sge live across the call.
        cvt(unsafe { sys::ibv_post_send(self.qp, &mut wr, &mut bad) })
    }
}
