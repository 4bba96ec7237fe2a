//! The stream driver: turns the core's decisions ([`Stream`]) into work requests on a
//! [`Transport`] and feeds the completions back. This is the posting code the library runs; the
//! host tests run it too, over the in-memory wire, so no test drives a copy of it.
//!
//! What it owns besides the core: the connection's three registered buffers (send ring with its
//! control slots, receive buffer with the iWARP message slots, target SGL with the iomap), the
//! receives posted, and the counts of sends posted and completed. How messages travel is decided
//! here once: with immediate data, or (iWARP, [`StreamConfig::msg_send`]) as a 4-byte SEND after
//! the write.

use std::io;
use std::sync::atomic;

use super::stream::{
    self as core, CreditUpdate, DataWrite, IomapWrite, LocalBuffers, SendPlan, Stream, StreamConfig,
};
use super::transport::{Completion, STATUS_FLUSHED, STATUS_RETRY_EXCEEDED, Source, Transport};
use super::wire::{self, ConnData, Msg, RemoteSge};
use crate::trace::{trace, trace_verbose};

/// Completions taken per poll of the transport.
const POLL_BATCH: usize = 32;

/// Receives owed at most before [`Driver::progress`] posts them at once (see
/// `post_owed_recvs`): a bound on the burst, not on correctness.
pub const RECVS_OWED_MAX: u32 = 16;

/// The registered buffers of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Buffers<M> {
    /// Send ring, then the control slots (the registration of its current size).
    pub sbuf: M,
    /// Receive buffer (the registration of its current size).
    pub rbuf: M,
    /// Target SGL (the peer writes its windows here), then our target iomap.
    pub tsgl: M,
    /// iWARP: the 4-byte message slots the posted receives fill.
    pub msgs: Option<M>,
}

/// Counts of the driver's decisions, for the coverage checks of the host tests.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Target SGL entries whose two reads differed (a window being placed as we looked).
    pub torn_sge_reads: u64,
    /// Receives posted late: taken by data messages, posted after the caller had the bytes.
    pub owed_recvs_posted: u64,
    /// Fresh writes that used up a window of the peer.
    pub direct_used_up_window: u64,
    /// Gathered (pending) writes that used up a window when they started.
    pub pending_used_up_window: u64,
    /// Appends to a pending write that used up its window.
    pub append_used_up_window: u64,
    /// Sends appended to a pending write.
    pub appends: u64,
    /// Pending writes posted.
    pub flushes: u64,
    /// Data writes sent inline.
    pub inline_writes: u64,
    /// Credit updates carrying a window, and without.
    pub credit_updates_with_window: u64,
    /// Credit updates without a window.
    pub credit_updates_plain: u64,
    /// Bytes before the ring's end at which a ring write wrapped.
    pub ring_wrap_at: std::collections::BTreeSet<u32>,
    /// Ring writes ending exactly at the ring's end.
    pub ring_exact_end: u64,
    /// Send rings grown, and of those, grown with bytes in flight up to the old ring's end.
    pub sbuf_grown: u64,
    /// Send rings grown with bytes in flight that end at the old ring's end.
    pub sbuf_grown_at_end: u64,
    /// Send ring registrations released after growing.
    pub sbuf_released: u64,
    /// Receive buffers registered whole.
    pub rbuf_grown: u64,
    /// Of those, registered while the peer still had a window of the starting ring.
    pub rbuf_grown_granted: u64,
    /// Receive buffer registrations released after growing.
    pub rbuf_released: u64,
    /// Data messages sent with their bytes in the message SEND (iWARP, a peer with room).
    pub carried_sends: u64,
    /// Data messages received with their bytes in the message SEND.
    pub carried_recvs: u64,
}

/// Work requests of one connection, driven by its protocol core.
#[derive(Debug)]
pub struct Driver<T: Transport> {
    /// The protocol state machine.
    pub core: Stream,
    /// The queue pair and its memory.
    pub t: T,
    /// Our registered buffers.
    pub bufs: Buffers<T::Mr>,
    cfg: StreamConfig,
    local: LocalBuffers,
    /// iWARP: message slots after the receive buffer (byte offset of the first, count).
    msg_slots: Option<(usize, u32)>,
    /// Slot of the next receive posted.
    recv_slot: u32,
    /// Receives taken by data messages and not posted again yet (see [`Driver::progress`]).
    recvs_owed: u32,
    /// iomap entries for the peer, when they cannot go inline: one slot per entry of its iomap
    /// (registered on first use).
    iomap_stage: Option<T::Mr>,
    comps: [Completion; POLL_BATCH],
    sends_posted: u64,
    sends_completed: u64,
    /// The send ring's registration before it grew, until the sends posted before then (the
    /// count) completed.
    sbuf_old: Option<(T::Mr, u64)>,
    /// The receive buffer's registration before it grew, until the peer filled the windows
    /// given under it.
    rbuf_old: Option<T::Mr>,
    /// What the driver decided so far (test builds).
    #[cfg(test)]
    pub seen: Seen,
}

impl<T: Transport> Driver<T> {
    /// Registers the connection's buffers on `t`, posts `rq_posted` receives, and offers
    /// `iomap` entries of our target iomap. The core is a placeholder until [`Driver::start`].
    pub fn new(mut t: T, cfg: StreamConfig, rq_posted: u32, iomap: u16) -> io::Result<Self> {
        let sbuf = t.reserve(cfg.send_buffer_start(), cfg.send_buffer_len(), false)?;
        let tsgl = t.register(StreamConfig::target_sgl_len(iomap), true)?;
        let rbuf = t.reserve(cfg.rbuf_start as usize, cfg.rbuf_size as usize, true)?;
        let slots = cfg.msg_slots(rq_posted);
        let msgs = match slots {
            0 => None,
            n => Some(t.register(n as usize * cfg.msg_slot_len(), false)?),
        };
        let (taddr, tkey) = t.remote_handle(tsgl);
        let (raddr, rkey) = t.remote_handle(rbuf);
        let local = LocalBuffers {
            target_sgl: RemoteSge {
                addr: taddr,
                key: tkey,
                length: 0,
            },
            rbuf: RemoteSge {
                addr: raddr,
                key: rkey,
                length: 0,
            },
            target_iomap_size: iomap,
        };
        // Replaced once the peer's private data is known.
        let placeholder = ConnData {
            flags: 0,
            credits: 1,
            target_iomap_size: 0,
            target_sgl: RemoteSge::default(),
            data_buf: RemoteSge::default(),
            send_room: 0,
        };
        let mut d = Driver {
            core: Stream::new(cfg, local, &placeholder),
            t,
            bufs: Buffers {
                sbuf,
                rbuf,
                tsgl,
                msgs,
            },
            cfg,
            local,
            msg_slots: (slots > 0).then_some((0, slots)),
            recv_slot: 0,
            recvs_owed: 0,
            iomap_stage: None,
            comps: [Completion::default(); POLL_BATCH],
            sends_posted: 0,
            sends_completed: 0,
            sbuf_old: None,
            rbuf_old: None,
            #[cfg(test)]
            seen: Seen::default(),
        };
        d.post_recvs(rq_posted)?;
        Ok(d)
    }

    /// Our connect private data (REQ or REP).
    pub fn conn_data(&self) -> [u8; wire::CONN_DATA_LEN] {
        Stream::local_conn_data(&self.cfg, &self.local).encode()
    }

    /// The configuration the connection was set up with.
    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// Our buffers as the peer sees them.
    pub fn local(&self) -> &LocalBuffers {
        &self.local
    }

    /// Starts the protocol once the peer's private data is known; `accepted` for the passive
    /// side (see [`Stream::accepted`]).
    pub fn start(&mut self, peer: &ConnData, accepted: bool) {
        self.core = if accepted {
            Stream::accepted(self.cfg, self.local, peer)
        } else {
            Stream::new(self.cfg, self.local, peer)
        };
    }

    /// Send work requests posted so far (a sequence number for [`Driver::sends_completed`]).
    pub fn sends_posted(&self) -> u64 {
        self.sends_posted
    }

    /// Send work requests completed so far. A send queue completes in order, so
    /// `sends_completed() >= n` means the first `n` sends are done.
    pub fn sends_completed(&self) -> u64 {
        self.sends_completed
    }

    /// Runs one post on the transport. A post the device refuses means its queue pair left the
    /// connected state (Soft-iWARP refuses one with ENOTCONN once a dead peer reset the TCP
    /// connection), or that what we planned no longer matches what was posted: either way the
    /// connection is broken. The core fails (every later call reports it, as ECONNRESET), and
    /// this call gets a connection reset rather than the device's errno.
    fn post(&mut self, f: impl FnOnce(&mut T) -> io::Result<()>) -> io::Result<()> {
        f(&mut self.t).map_err(|e| {
            trace!("the device refused a post: {e}");
            self.core.fail_post();
            io::Error::new(io::ErrorKind::ConnectionReset, e)
        })
    }

    fn post_recvs(&mut self, n: u32) -> io::Result<()> {
        let slot_len = self.cfg.msg_slot_len();
        for _ in 0..n {
            let into = self.msg_slots.map(|(base, slots)| {
                let slot = self.recv_slot;
                self.recv_slot = (slot + 1) % slots;
                (slot, base + slot as usize * slot_len)
            });
            match (into, self.bufs.msgs) {
                (Some((slot, off)), Some(msgs)) => {
                    self.post(|t| t.post_recv(core::recv_wr_id(slot), Some((msgs, off, slot_len))))?
                }
                _ => self.post(|t| t.post_recv(core::recv_wr_id(0), None))?,
            }
        }
        Ok(())
    }

    /// Posts the receives that data messages took ([`Driver::progress`] leaves them owed). A
    /// message's receive need not be back before the caller has its bytes: the peer may use
    /// only the credits we granted, and each grant counts on a receive for every message it
    /// allows. So the owed receives go back before any grant (`post_credit_updates`), and
    /// otherwise when a look finds nothing, or once [`RECVS_OWED_MAX`] are owed. Between two
    /// grants, each owed receive is one a message since the last grant took: never more
    /// than the peer can have used of what that grant allowed.
    fn post_owed_recvs(&mut self) -> io::Result<()> {
        let n = std::mem::take(&mut self.recvs_owed);
        if n > 0 && self.core.flags().connected {
            #[cfg(test)]
            {
                self.seen.owed_recvs_posted += n as u64;
            }
            self.post_recvs(n)?;
        }
        Ok(())
    }

    /// Polls the completions, feeds the core, reposts receives, posts gathered sends that are
    /// due and the credit updates owed. `on_window` is told of each iomap announcement the peer
    /// made: its message data, and a reader of our target iomap's entries (by index). Returns
    /// whether anything completed.
    pub fn progress(
        &mut self,
        mut on_window: impl FnMut(u32, &mut dyn FnMut(usize) -> [u8; wire::IOMAP_LEN]),
    ) -> io::Result<bool> {
        let mut any = false;
        loop {
            let n = self.t.poll(&mut self.comps)?;
            if n == 0 {
                if !any {
                    // Nothing came: time the caller would spend waiting anyway.
                    self.post_owed_recvs()?;
                }
                break;
            }
            any = true;
            // Fewer than asked for: the queue was empty when polled, and what completes later
            // is for the next look (an arming after this poll raises an event for it). One
            // poll per look instead of a second that finds nothing: the common case.
            let drained = n < POLL_BATCH;
            let mut reposts = 0;
            for i in 0..n {
                let c = self.comps[i];
                let recv = core::is_recv(c.wr_id);
                // Every failure but the flushes after the first (they only say that the queue
                // pair left RTS): a send's own error status, polled after the receives' flushes,
                // says why.
                if !c.ok
                    && (c.status != STATUS_FLUSHED
                        || (self.core.error().is_none() && self.core.flags().connected))
                {
                    trace!(
                        "completion failed: wr_id {:#x} status {} ({})",
                        c.wr_id,
                        c.status,
                        if recv { "recv" } else { "send" }
                    );
                }
                if !recv {
                    self.sends_completed += 1;
                    if !c.ok && c.status == STATUS_RETRY_EXCEEDED {
                        self.core.on_retries_exceeded();
                    }
                    if c.wr_id & core::WR_ID_CARRIED != 0 {
                        // One SEND did the work of the write and its message SEND.
                        let msg = c.wr_id as u32;
                        self.core.on_send_completion(msg as u64, c.ok);
                        self.core
                            .on_send_completion(core::msg_send_wr_id(msg), c.ok);
                    } else {
                        self.core.on_send_completion(c.wr_id, c.ok);
                    }
                    continue;
                }
                if !c.ok {
                    // Flushed: the QP left RTS, the connection is gone.
                    self.core.on_connection_lost();
                    continue;
                }
                reposts += 1;
                let raw = match c.imm {
                    Some(v) => v,
                    None => {
                        let (Some((base, _)), Some(msgs)) = (self.msg_slots, self.bufs.msgs) else {
                            continue;
                        };
                        let slot = core::recv_slot(c.wr_id) as usize;
                        let at = base + slot * self.cfg.msg_slot_len();
                        let mut b = [0u8; wire::MSG_SIZE];
                        self.t.read(msgs, at, &mut b);
                        let raw = u32::from_ne_bytes(b);
                        if c.len as usize > wire::MSG_SIZE {
                            self.take_carried(raw, msgs, at, c.len);
                            continue;
                        }
                        raw
                    }
                };
                match self.core.on_recv(raw) {
                    // Its receive is posted again later, off the path from the message to
                    // the caller (see `post_owed_recvs`).
                    Ok(Msg::Data(_)) => {
                        reposts -= 1;
                        self.recvs_owed += 1;
                    }
                    Ok(Msg::Credits(_)) => self.refresh_target_sgl(),
                    Ok(Msg::IomapSgl(data)) => {
                        let (t, tsgl) = (&self.t, self.bufs.tsgl);
                        on_window(data, &mut |i| {
                            let mut b = [0u8; wire::IOMAP_LEN];
                            t.read(tsgl, wire::iomap_entry_offset(i), &mut b);
                            b
                        });
                    }
                    _ => {}
                }
            }
            if reposts > 0 && self.core.flags().connected {
                self.post_recvs(reposts)?;
            }
            if self.recvs_owed >= RECVS_OWED_MAX {
                self.post_owed_recvs()?;
            }
            if drained {
                break;
            }
        }
        if self.upkeep_due() {
            self.grow_rings();
            self.flush_due()?;
            self.send_credits()?;
        }
        Ok(any)
    }

    /// Whether [`Driver::grow_rings`], [`Driver::flush_due`] or [`Driver::send_credits`] has
    /// anything to do: each does nothing otherwise, and this one look costs less than the
    /// three (a busy-polling call that finds nothing goes through here every time).
    #[inline]
    fn upkeep_due(&self) -> bool {
        let core = &self.core;
        let sbuf = match self.sbuf_old {
            Some((_, posted)) => self.sends_completed >= posted,
            None => core.sbuf_grow_due(),
        };
        sbuf || (self.rbuf_old.is_none() && core.rbuf_grow_wanted())
            || core.rbuf_retired()
            || core.should_flush()
            || core.credit_update_due()
    }

    /// A message SEND that carried its DATA bytes (`len` in all, the message first, in the
    /// slot at `at` of `msgs`): the core checks it and says where the bytes belong in the
    /// receive buffer, and they are copied there (before anything can read them).
    fn take_carried(&mut self, raw: u32, msgs: T::Mr, at: usize, len: u32) {
        let payload = len - wire::MSG_SIZE as u32;
        let Ok(to) = self.core.on_recv_carrying(raw, payload) else {
            return;
        };
        #[cfg(test)]
        {
            self.seen.carried_recvs += 1;
        }
        let mut b = [0u8; wire::SEND_PAYLOAD_MAX];
        let b = &mut b[..payload as usize];
        self.t.read(msgs, at + wire::MSG_SIZE, b);
        self.t.write(self.bufs.rbuf, to as usize, b);
    }

    /// Grows the rings the core asks to grow (registering the rest of their allocation) and
    /// releases the registrations they outgrew once nothing uses them. A registration that
    /// fails (RLIMIT_MEMLOCK, say) leaves the ring at its size: slower, never wrong.
    fn grow_rings(&mut self) {
        if let Some((old, posted)) = self.sbuf_old
            && self.sends_completed >= posted
        {
            self.t.release(old);
            self.sbuf_old = None;
            #[cfg(test)]
            {
                self.seen.sbuf_released += 1;
            }
        }
        if self.sbuf_old.is_none() && self.core.sbuf_grow_due() {
            match self.t.extend(self.bufs.sbuf) {
                Ok(m) => {
                    #[cfg(test)]
                    {
                        self.seen.sbuf_grown += 1;
                        if self.core.send_ring_head() == 0
                            && self.sends_completed < self.sends_posted
                        {
                            self.seen.sbuf_grown_at_end += 1;
                        }
                    }
                    self.sbuf_old = Some((self.bufs.sbuf, self.sends_posted));
                    self.bufs.sbuf = m;
                    self.core.on_sbuf_grown();
                    trace!("send ring grown to {} bytes", self.core.send_ring_len());
                }
                Err(e) => {
                    trace!("send ring stays small: {e}");
                    self.core.sbuf_growth_failed();
                }
            }
        }
        if self.rbuf_old.is_none() && self.core.rbuf_grow_wanted() {
            match self.t.extend(self.bufs.rbuf) {
                Ok(m) => {
                    #[cfg(test)]
                    {
                        self.seen.rbuf_grown += 1;
                        if self.core.granted_windows() > 0 {
                            self.seen.rbuf_grown_granted += 1;
                        }
                    }
                    self.rbuf_old = Some(self.bufs.rbuf);
                    self.bufs.rbuf = m;
                    self.core.on_rbuf_grown(self.t.remote_handle(m).1);
                    trace!(
                        "receive buffer registered whole ({} bytes)",
                        self.cfg.rbuf_size
                    );
                }
                Err(e) => {
                    trace!("receive ring stays small: {e}");
                    self.core.rbuf_growth_failed();
                }
            }
        }
        if self.core.take_rbuf_retired()
            && let Some(old) = self.rbuf_old.take()
        {
            self.t.release(old);
            #[cfg(test)]
            {
                self.seen.rbuf_released += 1;
            }
        }
    }

    /// Re-reads the target SGL the peer writes its windows into, after a credit update.
    ///
    /// The peer's device may be placing its next window into an entry while we read it: that
    /// window's own credit update comes later, but the update we act on now makes us look at
    /// every entry we used up. A device writes an entry in ascending order (address, key,
    /// length), so a copy racing it can see the new length beside the address we zeroed:
    /// a write there fails the connection (remote access error) or, worse, lands in an older
    /// window. So each entry is read twice and taken only if both reads agree (once a read
    /// sees the new length, the address before it was written already); one that changed
    /// is left for its own credit update.
    fn refresh_target_sgl(&mut self) {
        const LEN: usize = wire::SGE_LEN * wire::SGL_SIZE as usize;
        let (mut first, mut again) = ([0u8; LEN], [0u8; LEN]);
        self.t.read(self.bufs.tsgl, 0, &mut first);
        // The second read may not be merged with the first or moved before it.
        atomic::fence(atomic::Ordering::Acquire);
        self.t.read(self.bufs.tsgl, 0, &mut again);
        let mut mem = [RemoteSge::default(); wire::SGL_SIZE as usize];
        for (i, e) in mem.iter_mut().enumerate() {
            let r = i * wire::SGE_LEN..(i + 1) * wire::SGE_LEN;
            if first[r.clone()] == again[r.clone()] {
                *e = RemoteSge::from_ne_bytes(again[r.clone()].try_into().expect("16 bytes"));
            } else {
                #[cfg(test)]
                {
                    self.seen.torn_sge_reads += 1;
                }
                trace_verbose!(
                    "target SGL entry {i} read while the peer's device wrote it: {:?}, then {:?}",
                    RemoteSge::from_ne_bytes(first[r.clone()].try_into().expect("16 bytes")),
                    RemoteSge::from_ne_bytes(again[r].try_into().expect("16 bytes"))
                );
            }
        }
        self.core.refresh_target_sgl(mem);
    }

    /// Zeroes an entry of our target SGL that a write used up, so that the peer's next write
    /// into it is told from stale contents.
    fn clear_sge(&mut self, i: usize) {
        self.t
            .write(self.bufs.tsgl, i * wire::SGE_LEN, &[0u8; wire::SGE_LEN]);
    }

    /// Posts a raw RDMA write (a riowrite's, or a keepalive probe), counted.
    pub fn post_write(
        &mut self,
        wr_id: u64,
        src: Source<'_, T::Mr, T::Seg>,
        remote: (u64, u32),
    ) -> io::Result<()> {
        self.post(|t| t.post_write(wr_id, src, remote, None))?;
        self.sends_posted += 1;
        Ok(())
    }

    /// Posts a keepalive probe (`wr_id` from the core), counted: a work request that completes
    /// only once the peer's device answered. A 0-byte RDMA write where the peer's NIC
    /// acknowledges it (InfiniBand, RoCE); on iWARP, where a write completes once the local TCP
    /// took it, a 0-byte RDMA READ, which the peer's device answers with a read response.
    pub fn post_probe(&mut self, wr_id: u64) -> io::Result<()> {
        if !self.cfg.msg_send {
            return self.post_persist_probe(wr_id);
        }
        self.post(|t| t.post_read_probe(wr_id))?;
        self.sends_posted += 1;
        Ok(())
    }

    /// Posts a persist probe (`wr_id` from [`Stream::handle_persist`]), counted: a 0-byte RDMA
    /// write, on iWARP too, where it completes once the local TCP took it but is then
    /// retransmitted until the peer's TCP acknowledges it (and the connection fails when TCP
    /// gives up), which is all a persist probe is for.
    pub fn post_persist_probe(&mut self, wr_id: u64) -> io::Result<()> {
        self.post(|t| t.post_write(wr_id, Source::Empty, (0, 0), None))?;
        self.sends_posted += 1;
        Ok(())
    }

    /// Posts an RDMA read (a rioread's), counted.
    pub fn post_read(&mut self, wr_id: u64, dst: T::Seg, remote: (u64, u32)) -> io::Result<()> {
        self.post(|t| t.post_read(wr_id, dst, remote))?;
        self.sends_posted += 1;
        Ok(())
    }

    /// Posts a message alone: a 0-byte write with immediate, or an inline SEND on iWARP.
    pub fn post_msg(&mut self, msg: u32) -> io::Result<()> {
        if self.cfg.msg_send {
            self.post(|t| t.post_send(msg as u64, &msg.to_ne_bytes()))?;
        } else {
            self.post(|t| t.post_write(msg as u64, Source::Empty, (0, 0), Some(msg)))?;
        }
        self.sends_posted += 1;
        Ok(())
    }

    /// Posts an RDMA write carrying `msg`: with immediate data, or followed by a SEND of it on
    /// iWARP. `wr_id` is the write's (the message, plus flags).
    pub fn post_write_msg(
        &mut self,
        wr_id: u64,
        msg: u32,
        src: Source<'_, T::Mr, T::Seg>,
        remote: (u64, u32),
    ) -> io::Result<()> {
        if self.cfg.msg_send {
            self.post(|t| t.post_write(wr_id, src, remote, None))?;
            self.sends_posted += 1;
            self.post(|t| t.post_send(core::msg_send_wr_id(msg), &msg.to_ne_bytes()))?;
        } else {
            self.post(|t| t.post_write(wr_id, src, remote, Some(msg)))?;
        }
        self.sends_posted += 1;
        Ok(())
    }

    /// Posts an iomap announcement the core planned (`w`, for entry `index` of the peer's
    /// iomap) carrying `entry` (the entry's bytes as the peer reads them): inline when the queue
    /// pair allows, else from a staging slot.
    pub fn post_iomap_announce(
        &mut self,
        index: u16,
        w: IomapWrite,
        entry: &[u8; wire::IOMAP_LEN],
    ) -> io::Result<()> {
        let remote = (w.remote_addr, w.rkey);
        if self.t.inline_size() as usize >= wire::IOMAP_LEN {
            return self.post_write_msg(w.msg as u64, w.msg, Source::Inline(entry), remote);
        }
        let stage = match self.iomap_stage {
            Some(m) => m,
            None => {
                let n = self.core.peer_iomap_size() as usize;
                let m = self.t.register(n * wire::IOMAP_LEN, false)?;
                self.iomap_stage = Some(m);
                m
            }
        };
        let off = index as u32 * wire::IOMAP_LEN as u32;
        self.t.write(stage, off as usize, entry);
        let seg = [(off, wire::IOMAP_LEN as u32), (0, 0)];
        self.post_write_msg(w.msg as u64, w.msg, Source::Region(stage, seg, 1), remote)
    }

    /// Posts a zero-copy data write planned by [`Stream::plan_write_zero_copy`], from registered
    /// application memory `src` (its completion gives no ring bytes back).
    pub fn post_zero_copy(&mut self, w: DataWrite, src: T::Seg) -> io::Result<()> {
        if let Some(i) = w.exhausted_sge {
            self.clear_sge(i);
        }
        let wr_id = w.msg as u64 | core::WR_ID_NO_RING;
        self.post_write_msg(wr_id, w.msg, Source::User(src), (w.remote_addr, w.rkey))
    }

    /// Posts the credit updates owed.
    #[inline]
    pub fn send_credits(&mut self) -> io::Result<()> {
        if self.core.credit_update_due() {
            self.post_credit_updates()
        } else {
            Ok(())
        }
    }

    fn post_credit_updates(&mut self) -> io::Result<()> {
        // Every receive a grant counts on is posted first.
        self.post_owed_recvs()?;
        while let Some(CreditUpdate { msg, sge }) = self.core.poll_credit_update() {
            #[cfg(test)]
            if sge.is_some() {
                self.seen.credit_updates_with_window += 1;
            } else {
                self.seen.credit_updates_plain += 1;
            }
            match sge {
                Some(w) if w.inline => self.post_write_msg(
                    msg as u64,
                    msg,
                    Source::Inline(&w.bytes),
                    (w.remote_addr, w.rkey),
                )?,
                Some(w) => {
                    self.t
                        .write(self.bufs.sbuf, w.ctrl_slot_offset as usize, &w.bytes);
                    let seg = [(w.ctrl_slot_offset, wire::SGE_LEN as u32), (0, 0)];
                    self.post_write_msg(
                        msg as u64,
                        msg,
                        Source::Region(self.bufs.sbuf, seg, 1),
                        (w.remote_addr, w.rkey),
                    )?;
                }
                None => self.post_msg(msg)?,
            }
        }
        Ok(())
    }

    /// Sends as much of `buf` as the credits and windows allow; returns the bytes taken (posted,
    /// or gathered in the ring to leave with the next flush). `olen` is the write size this
    /// call has reached (doubled per write up to [`core::MAX_TRANSFER`]); `coalesce` lets small
    /// sends gather while writes are in flight ([`Stream::plan_send`]).
    pub fn send_some(&mut self, buf: &[u8], olen: &mut u32, coalesce: bool) -> io::Result<usize> {
        self.grow_rings();
        let mut sent = 0;
        while sent < buf.len() {
            let left = (buf.len() - sent).min(u32::MAX as usize) as u32;
            let max = left.min(*olen);
            #[cfg(test)]
            let had_pending = self.core.has_pending();
            // Only a send's start gathers (or what joins bytes gathered already): the rest of
            // one send is one message's, which the peer waits for whole, so it leaves at once
            // rather than with the next flush (a 3000-byte message would otherwise leave its
            // last 952 bytes to the flush job, a wake-up of the service thread per message).
            let plan = if coalesce && (sent == 0 || self.core.has_pending()) {
                self.core.plan_send(max)
            } else if coalesce {
                self.core
                    .plan_write_counted(max)
                    .map(|write| SendPlan::Post { write, fresh: true })
            } else {
                self.core
                    .plan_write(max)
                    .map(|write| SendPlan::Post { write, fresh: true })
            };
            match plan {
                None => break,
                Some(SendPlan::Post { write, fresh: true }) => {
                    #[cfg(test)]
                    if write.exhausted_sge.is_some() {
                        self.seen.direct_used_up_window += 1;
                    }
                    if *olen < core::MAX_TRANSFER {
                        *olen <<= 1;
                    }
                    self.post_data(write, Some(&buf[sent..sent + write.len as usize]))?;
                    sent += write.len as usize;
                }
                Some(SendPlan::Post {
                    write,
                    fresh: false,
                }) => {
                    #[cfg(test)]
                    {
                        self.seen.flushes += 1;
                    }
                    self.post_data(write, None)?
                }
                Some(SendPlan::Queued {
                    ring,
                    ring_segs,
                    len,
                }) => {
                    self.copy_to_ring(&ring[..ring_segs], &buf[sent..sent + len as usize]);
                    sent += len as usize;
                    #[cfg(test)]
                    {
                        let used_up = self.core.pending_used_up_window();
                        if had_pending {
                            self.seen.appends += 1;
                            // An append happens only while the window lasts: it used it up now.
                            if used_up {
                                self.seen.append_used_up_window += 1;
                            }
                        } else if used_up {
                            self.seen.pending_used_up_window += 1;
                        }
                    }
                }
            }
        }
        self.flush_due()?;
        Ok(sent)
    }

    /// Copies `data` into the ring segments (offset, length), in order.
    pub fn copy_to_ring(&mut self, ring: &[(u32, u32)], mut data: &[u8]) {
        for &(o, l) in ring {
            self.t
                .write(self.bufs.sbuf, o as usize, &data[..l as usize]);
            data = &data[l as usize..];
        }
    }

    /// The ring segments of a planned write as a source.
    pub fn ring_source<'a>(&self, ring: [(u32, u32); 2], segs: usize) -> Source<'a, T::Mr, T::Seg> {
        Source::Region(self.bufs.sbuf, ring, segs)
    }

    /// Posts a planned data write: `src` holds its bytes (copied into the ring unless inline),
    /// or, for a flushed pending write, the ring already does.
    fn post_data(&mut self, w: DataWrite, src: Option<&[u8]>) -> io::Result<()> {
        if let Some(i) = w.exhausted_sge {
            self.clear_sge(i);
        }
        #[cfg(test)]
        if w.inline {
            self.seen.inline_writes += 1;
        } else if w.ring_segs == 2 {
            self.seen.ring_wrap_at.insert(w.ring[0].1);
        } else if w.ring[0].0 + w.ring[0].1 == self.core.send_ring_len() {
            self.seen.ring_exact_end += 1;
        }
        if let Some(data) = src
            && w.inline
            && !data.is_empty()
            && data.len() as u32 <= self.core.peer_payload_room()
            && wire::MSG_SIZE + data.len() <= self.t.inline_size() as usize
        {
            // An rsocket-rs peer on iWARP takes a small message's bytes in its SEND: one work
            // request instead of an RDMA write and a SEND.
            #[cfg(test)]
            {
                self.seen.carried_sends += 1;
            }
            let mut b = [0u8; wire::MSG_SIZE + wire::SEND_PAYLOAD_MAX];
            b[..wire::MSG_SIZE].copy_from_slice(&w.msg.to_ne_bytes());
            b[wire::MSG_SIZE..wire::MSG_SIZE + data.len()].copy_from_slice(data);
            self.post(|t| {
                t.post_send(
                    w.msg as u64 | core::WR_ID_CARRIED,
                    &b[..wire::MSG_SIZE + data.len()],
                )
            })?;
            self.sends_posted += 1;
            return Ok(());
        }
        let payload = match src {
            Some(data) if w.inline => Source::Inline(data),
            Some(data) => {
                self.copy_to_ring(&w.ring[..w.ring_segs], data);
                self.ring_source(w.ring, w.ring_segs)
            }
            None => self.ring_source(w.ring, w.ring_segs),
        };
        self.post_write_msg(w.msg as u64, w.msg, payload, (w.remote_addr, w.rkey))
    }

    /// Posts the gathered small sends once nothing else is in flight.
    pub fn flush_due(&mut self) -> io::Result<()> {
        if self.core.should_flush() {
            self.flush_now()?;
        }
        Ok(())
    }

    /// Posts the gathered small sends now (before a shutdown, say).
    pub fn flush_now(&mut self) -> io::Result<()> {
        if let Some(w) = self.core.flush() {
            trace_verbose!("flush {} gathered bytes", w.len);
            #[cfg(test)]
            {
                self.seen.flushes += 1;
            }
            self.post_data(w, None)?;
        }
        Ok(())
    }

    /// Copies up to `buf.len()` received bytes out (leaving them with `peek`); returns how many.
    pub fn recv_some(&mut self, buf: &mut [u8], peek: bool) -> usize {
        let Driver { core, t, bufs, .. } = self;
        let mut off = 0;
        core.consume(buf.len(), peek, |o, l| {
            t.read(bufs.rbuf, o as usize, &mut buf[off..off + l as usize]);
            off += l as usize;
        })
    }
}
