//! A connected RC endpoint: protection domain, completion queue and channel, queue pair,
//! registered memory; posting and polling.

use std::io;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};

use rdma_sys as sys;

use super::guarded::Guarded;
use super::{cvt, last_error};

#[derive(Debug)]
pub(super) struct ProtectionDomain(pub(super) NonNull<sys::ibv_pd>);

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: the endpoint drops its MRs and QP first.
        unsafe { sys::ibv_dealloc_pd(self.0.as_ptr()) };
    }
}

#[derive(Debug)]
pub(super) struct CompChannel(pub(super) NonNull<sys::ibv_comp_channel>);

impl CompChannel {
    pub(super) fn fd(&self) -> RawFd {
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
pub(super) struct CompletionQueue(pub(super) NonNull<sys::ibv_cq>);

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
    /// The registration; `None` once released ([`Endpoint::release`]).
    mr: Option<NonNull<sys::ibv_mr>>,
    /// The buffer's first byte.
    base: NonNull<u8>,
    /// Bytes registered from `base`.
    pub(super) len: usize,
    /// Bytes of the buffer (≥ `len`).
    cap: usize,
    /// What the registration grants.
    access: Access,
    /// The mapping, held by the newest registration of it (unmapped after the MR is
    /// deregistered: fields drop after `drop`; an older registration of the same mapping has a
    /// lower index in the endpoint's list, so it is deregistered first).
    mem: Option<Guarded>,
}

impl MemoryRegion {
    /// The buffer's first byte.
    pub(super) fn ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    fn live(&self) -> &sys::ibv_mr {
        let mr = self.mr.expect("registered buffer used after its release");
        // SAFETY: registered and not yet deregistered (released ones are None).
        unsafe { mr.as_ref() }
    }

    /// Local key.
    pub(super) fn lkey(&self) -> u32 {
        self.live().lkey
    }

    /// Remote key.
    pub(super) fn rkey(&self) -> u32 {
        self.live().rkey
    }
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

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        if let Some(mr) = self.mr.take() {
            // SAFETY: registered once, not released; the QP that used it is gone (endpoint
            // field order).
            unsafe { sys::ibv_dereg_mr(mr.as_ptr()) };
        }
    }
}

fn access_flags(access: Access) -> i32 {
    let acc = match access {
        Access::Local => sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
        Access::RemoteWrite => {
            (sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                .0
        }
    };
    acc as i32
}

/// A QP's endpoint (owned by the CM id): its CQs (the receive queue's, and on a connected QP the
/// send queue's) with their completion channel, a PD and the registered buffers. Field order is
/// drop order.
#[derive(Debug)]
pub struct Endpoint {
    pub(super) qp: *mut sys::ibv_qp,
    sq_inline: u32,
    /// The device mistransmits short transfers that cross a page (see [`short_page_split`]).
    split_short: bool,
    mrs: Vec<MemoryRegion>,
    user_mrs: Vec<Option<UserRegion>>,
    /// The CQ is armed and its event not taken yet (arming again would be a wasted syscall).
    armed: std::cell::Cell<bool>,
    /// The same for the send CQ.
    send_armed: std::cell::Cell<bool>,
    /// With a send CQ: sends posted whose completions were not polled yet (that CQ is polled
    /// only while there are). Without one, only counted.
    sends_out: std::cell::Cell<u64>,
    /// The CQ of the receive queue (and of the send queue when there is no `send_cq`).
    cq: CompletionQueue,
    /// A CQ of the send queue's own, on the same channel (connected QPs): armed only for a
    /// waiter that needs our sends' completions (room to send, a flush, a close), so that a
    /// program asleep until data arrives is not woken by the completion of each of its own
    /// sends (see [`Endpoint::arm`]).
    send_cq: Option<CompletionQueue>,
    comp: CompChannel,
    pub(super) pd: ProtectionDomain,
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
/// wrong place in the second, and the peer receives other bytes with no error on either side.
/// The bound is `MAX_HDR_INLINE` = (sizeof(struct siw_rreq_pkt) − sizeof(struct iwarp_send)) &
/// 0xF8 = (56 − 20) & 0xF8 = 32 bytes on x86-64 (this was 24 here before, and 25- to 32-byte
/// writes crossing a page still arrived corrupted: the stress suite's lib-rs seed 15 on siw).
/// Inline data and transfers with two SGEs take other paths and are right.
pub const SHORT_TRANSFER: u32 = 32;

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
    /// An endpoint for the QP just created on a CM id with these queues.
    pub(super) fn new(
        qp: *mut sys::ibv_qp,
        sq_inline: u32,
        split_short: bool,
        cq: CompletionQueue,
        send_cq: Option<CompletionQueue>,
        comp: CompChannel,
        pd: ProtectionDomain,
    ) -> Self {
        Endpoint {
            qp,
            sq_inline,
            split_short,
            mrs: Vec::new(),
            user_mrs: Vec::new(),
            armed: std::cell::Cell::new(false),
            send_armed: std::cell::Cell::new(false),
            sends_out: std::cell::Cell::new(0),
            cq,
            send_cq,
            comp,
            pd,
        }
    }

    /// Inline size the device granted.
    pub fn sq_inline(&self) -> u32 {
        self.sq_inline
    }

    /// Completion channel fd (readable after an armed CQ got a completion).
    pub fn comp_fd(&self) -> RawFd {
        self.comp.fd()
    }

    /// Allocates and registers a zeroed, page-aligned buffer with an inaccessible page on
    /// each side (see [`Guarded`]).
    pub fn register(&mut self, len: usize, access: Access) -> io::Result<MrId> {
        self.reserve(len, len, access)
    }

    /// Like [`Endpoint::register`] for a buffer of `cap` bytes of which only the first `len`
    /// are registered now (the pages beyond are never touched until [`Endpoint::extend`]).
    pub fn reserve(&mut self, len: usize, cap: usize, access: Access) -> io::Result<MrId> {
        let mem = Guarded::new(cap.max(len))?;
        let base = mem.ptr();
        // SAFETY: base is a live mapping of at least len bytes, pd valid.
        let mr = unsafe {
            sys::ibv_reg_mr(
                self.pd.0.as_ptr(),
                base.as_ptr() as *mut _,
                len,
                access_flags(access),
            )
        };
        let mr = NonNull::new(mr).ok_or_else(last_error)?;
        self.mrs.push(MemoryRegion {
            mr: Some(mr),
            base,
            len,
            cap: cap.max(len),
            access,
            mem: Some(mem),
        });
        Ok(MrId(self.mrs.len() - 1))
    }

    /// Registers the whole buffer of `id` (made by [`Endpoint::reserve`], not superseded
    /// already) again with the same access, as a new region at the same address. `id` stays registered until
    /// [`Endpoint::release`].
    pub fn extend(&mut self, id: MrId) -> io::Result<MrId> {
        let m = &self.mrs[id.0];
        if m.mem.is_none() || m.mr.is_none() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (base, cap, access) = (m.base, m.cap, m.access);
        // SAFETY: the mapping holds at least cap bytes (reserve's); pd valid.
        let mr = unsafe {
            sys::ibv_reg_mr(
                self.pd.0.as_ptr(),
                base.as_ptr() as *mut _,
                cap,
                access_flags(access),
            )
        };
        let mr = NonNull::new(mr).ok_or_else(last_error)?;
        let mem = self.mrs[id.0].mem.take();
        self.mrs.push(MemoryRegion {
            mr: Some(mr),
            base,
            len: cap,
            cap,
            access,
            mem,
        });
        Ok(MrId(self.mrs.len() - 1))
    }

    /// Deregisters a region that [`Endpoint::extend`] superseded (its memory stays with the
    /// newer registration). Work requests posted under it must have completed.
    pub fn release(&mut self, id: MrId) {
        let m = &mut self.mrs[id.0];
        if m.mem.is_some() {
            // Still the owner of its memory: not superseded, keep it.
            return;
        }
        if let Some(mr) = m.mr.take() {
            // SAFETY: registered once, deregistered once here (now None).
            unsafe { sys::ibv_dereg_mr(mr.as_ptr()) };
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
        self.sends_out.set(self.sends_out.get() + 1);
        Ok(())
    }

    /// Posts a 0-byte RDMA READ (no scatter entry, no remote memory named): it touches no
    /// memory and completes once the peer's device sent its read response.
    pub fn post_read_probe(&self, wr_id: u64) -> io::Result<()> {
        // SAFETY: zeroed send WR is valid (no scatter list, remote address and key 0).
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: valid QP; wr lives across the call and names no memory.
        cvt(unsafe { sys::ibv_post_send(self.qp, &mut wr, &mut bad) })?;
        self.sends_out.set(self.sends_out.get() + 1);
        Ok(())
    }

    pub(super) fn mr(&self, id: MrId) -> &MemoryRegion {
        &self.mrs[id.0]
    }

    /// (address, rkey) of a region, for the peer.
    pub fn remote_handle(&self, id: MrId) -> (u64, u32) {
        let m = self.mr(id);
        (m.ptr() as u64, m.rkey())
    }

    /// Copies region bytes out. Panics on an out-of-range request (a bug, not peer input).
    pub fn read(&self, id: MrId, offset: usize, out: &mut [u8]) {
        let m = self.mr(id);
        assert!(
            offset.checked_add(out.len()).is_some_and(|e| e <= m.len),
            "read outside region"
        );
        // SAFETY: range checked against the allocation; raw copy because the NIC may write.
        unsafe { ptr::copy_nonoverlapping(m.ptr().add(offset), out.as_mut_ptr(), out.len()) };
    }

    /// Copies bytes into a region. Panics on an out-of-range request.
    pub fn write(&self, id: MrId, offset: usize, data: &[u8]) {
        let m = self.mr(id);
        assert!(
            offset.checked_add(data.len()).is_some_and(|e| e <= m.len),
            "write outside region"
        );
        // SAFETY: range checked against the allocation.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), m.ptr().add(offset), data.len()) };
    }

    /// Posts a receive: zero-SGE (data arrives by RDMA write with immediate), or into
    /// `(region, offset, len)`: `len` bytes at `offset` of the region (a SEND's message and
    /// the data it may carry).
    pub fn post_recv(&self, wr_id: u64, into: Option<(MrId, usize, usize)>) -> io::Result<()> {
        let mut sge = sys::ibv_sge {
            addr: 0,
            length: 0,
            lkey: 0,
        };
        // SAFETY: zeroed recv WR is valid; fields set below.
        let mut wr: sys::ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        if let Some((id, offset, len)) = into {
            let m = self.mr(id);
            assert!(offset + len <= m.len, "receive outside region");
            sge.addr = m.ptr() as u64 + offset as u64;
            sge.length = len as u32;
            sge.lkey = m.lkey();
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
        }
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        // SAFETY: valid QP; wr and sge live across the call.
        cvt(unsafe { sys::ibv_post_recv(self.qp, &mut wr, &mut bad) })
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
                        addr: m.ptr() as u64 + off as u64,
                        length: len,
                        lkey: m.lkey(),
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
        self.sends_out.set(self.sends_out.get() + 1);
        Ok(())
    }

    /// Polls up to `max` completions (at most 32), handing each to `f`: the receive CQ's,
    /// then, with room left and sends not completed yet, the send CQ's.
    #[inline]
    pub fn poll(&self, max: usize, mut f: impl FnMut(Completion)) -> io::Result<()> {
        let n = Self::poll_cq(&self.cq, max, &mut f)?;
        if let Some(scq) = &self.send_cq
            && n < max
            && self.sends_out.get() > 0
        {
            let done = Self::poll_cq(scq, max - n, &mut f)?;
            self.sends_out
                .set(self.sends_out.get().saturating_sub(done as u64));
        }
        Ok(())
    }

    #[inline]
    fn poll_cq(
        cq: &CompletionQueue,
        max: usize,
        f: &mut impl FnMut(Completion),
    ) -> io::Result<usize> {
        // Not zeroed: this runs on every call of the fast path, and the CQ writes what it returns.
        let mut wcs: [std::mem::MaybeUninit<sys::ibv_wc>; 32] =
            [const { std::mem::MaybeUninit::uninit() }; 32];
        let want = max.min(32) as i32;
        // SAFETY: valid CQ and output array of `want` entries.
        let n =
            unsafe { sys::ibv_poll_cq(cq.0.as_ptr(), want, wcs.as_mut_ptr() as *mut sys::ibv_wc) };
        if n < 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for wc in &wcs[..n as usize] {
            // SAFETY: ibv_poll_cq initialised the first n entries.
            let wc = unsafe { wc.assume_init_ref() };
            let with_imm = wc.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
            f(Completion {
                wr_id: wc.wr_id,
                ok: wc.status == sys::ibv_wc_status::IBV_WC_SUCCESS,
                status: wc.status,
                // SAFETY: imm_data is the active member when IBV_WC_WITH_IMM is set.
                imm: with_imm
                    .then(|| u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })),
                byte_len: wc.byte_len,
            });
        }
        Ok(n as usize)
    }

    /// Whether the CQs are armed as [`Endpoint::arm`]`(sends)` arms them (their next
    /// completion raises an event), as far as we know.
    pub fn is_armed(&self, sends: bool) -> bool {
        self.armed.get() && (!sends || self.send_cq.is_none() || self.send_armed.get())
    }

    /// Arms the CQs: the completion channel fd becomes readable at the next completion of a
    /// receive, and with `sends` of a send too. Without `sends` the completions of our own
    /// sends raise no event (on a connected QP, whose send queue has a CQ of its own): a
    /// waiter for data, room shown already, is not woken for each send it made.
    pub fn arm(&self, sends: bool) -> io::Result<()> {
        // Still armed: the next completion raises the event (or raised it already and the
        // channel stays readable until the event is taken).
        if !self.armed.get() {
            // SAFETY: valid CQ.
            cvt(unsafe { sys::ibv_req_notify_cq(self.cq.0.as_ptr(), 0) })?;
            self.armed.set(true);
        }
        if sends
            && let Some(scq) = &self.send_cq
            && !self.send_armed.get()
        {
            // SAFETY: valid CQ.
            cvt(unsafe { sys::ibv_req_notify_cq(scq.0.as_ptr(), 0) })?;
            self.send_armed.set(true);
        }
        Ok(())
    }

    /// Consumes the completion-channel events pending (non-blocking): one per armed CQ at
    /// most. Returns whether one was consumed; each is acknowledged at once.
    pub fn take_cq_event(&self) -> bool {
        let mut took = false;
        loop {
            let mut cq: *mut sys::ibv_cq = ptr::null_mut();
            let mut ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: valid channel; the fd is non-blocking so this never sleeps.
            let r = unsafe { sys::ibv_get_cq_event(self.comp.0.as_ptr(), &mut cq, &mut ctx) };
            if r != 0 {
                return took;
            }
            took = true;
            // An event disarms its CQ.
            let send = self.send_cq.as_ref().is_some_and(|s| s.0.as_ptr() == cq);
            if send {
                self.send_armed.set(false);
            } else {
                self.armed.set(false);
            }
            // SAFETY: cq is ours; one event to ack.
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            // The other CQ may have raised its event too: taken now, or the channel would
            // stay readable. Only if it is armed (each read that finds nothing is a syscall).
            let other_armed = if send {
                self.armed.get()
            } else {
                self.send_armed.get()
            };
            if !other_armed {
                return true;
            }
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
    fn the_short_transfer_bound_is_siws_header_path_limit() {
        // MAX_HDR_INLINE of Linux 6.1's siw_qp_tx.c: sizeof(struct siw_rreq_pkt) is 56 (a 48-byte
        // read request header and a 4-byte CRC, 8-aligned), sizeof(struct iwarp_send) is 20.
        assert_eq!(SHORT_TRANSFER, (56 - 20) & 0xF8);
    }

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
        assert_eq!(
            ranges(sg_list(long, 1, true)),
            [(base + 4090, SHORT_TRANSFER + 1)]
        );
        let two = [sge(base + 4094, 2), sge(base, 11)];
        assert_eq!(
            ranges(sg_list(two, 2, true)),
            [(base + 4094, 2), (base, 11)]
        );
        // Every placement of every short length: no part of a short single SGE crosses a page.
        for len in 1..=SHORT_TRANSFER {
            for off in 4096 - 40..4096 + 2 {
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
