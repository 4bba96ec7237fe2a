//! The stream (SOCK_STREAM) protocol state machine, sans-IO.
//!
//! [`Stream`] keeps the bookkeeping of one rsocket connection: send credits and sequence numbers,
//! the send ring, the peer's receive-buffer windows (our target SGL), the receive ring and the
//! credit updates we owe the peer. It never touches a queue pair, a buffer or a clock. The socket
//! layer asks it what to post ([`Stream::plan_write`], [`Stream::poll_credit_update`],
//! [`Stream::post_ctrl`]), performs that with verbs, and feeds completions back
//! ([`Stream::on_send_completion`], [`Stream::on_recv`]).
//!
//! Work-request ids follow librdmacm: a send's wr_id is the 32-bit message it carried, a receive
//! has bit 63 set, and the extra 4-byte SEND used on iWARP has bit 62 set.

use std::collections::VecDeque;

use super::wire::{self, ConnData, Ctrl, Msg, RemoteSge, WireError};

/// First segment size of one send call; segments double up to [`MAX_TRANSFER`].
pub const OLAP_START_SIZE: u32 = 2048;
/// Largest single RDMA write.
pub const MAX_TRANSFER: u32 = 65536;
/// Minimum free send-buffer space before we start another write.
pub const SNDLOWAT: u32 = 2048;
/// Send queue entries reserved for control messages (credits, shutdown).
pub const CTRL_SLOTS: u32 = 4;
/// Smallest queue size we create.
pub const QP_MIN_SIZE: u16 = 16;
/// Largest queue size (sequence numbers are 16-bit).
pub const QP_MAX_SIZE: u16 = 0xFFFE;

/// wr_id flag of receive work requests.
pub const WR_ID_RECV: u64 = 1 << 63;
/// wr_id flag of the 4-byte message SEND that follows a write on iWARP.
pub const WR_ID_MSG_SEND: u64 = 1 << 62;
/// wr_id flag of a write or read that uses the application's registered memory, not the send
/// ring (its completion gives no ring bytes back).
pub const WR_ID_NO_RING: u64 = 1 << 61;

/// wr_id flag of a SEND that carried a DATA message and its bytes (iWARP, rsocket-rs peer):
/// its completion stands for the write's and the message SEND's.
pub const WR_ID_CARRIED: u64 = 1 << 60;

/// The wr_id of a receive; `slot` names its 4-byte message slot on iWARP (0 otherwise).
pub fn recv_wr_id(slot: u32) -> u64 {
    WR_ID_RECV | slot as u64
}

/// Whether a completion is a receive's.
pub fn is_recv(wr_id: u64) -> bool {
    wr_id & WR_ID_RECV != 0
}

/// The message slot of a receive's wr_id.
pub fn recv_slot(wr_id: u64) -> u32 {
    wr_id as u32
}

/// The wr_id of the 4-byte SEND carrying `msg` after its write, on iWARP: the message's
/// opcode, so its completion is told apart from the write's.
pub fn msg_send_wr_id(msg: u32) -> u64 {
    wire::Msg::op_bits(msg) as u64 | WR_ID_MSG_SEND
}

/// Local opcode (wr_id only, never on the wire) of a riowrite.
pub const LOCAL_OP_WRITE: u32 = wire::Op::Write as u32;
/// Local opcode (wr_id only, never on the wire; reserved there) of a rioread.
pub const LOCAL_OP_READ: u32 = 1;

/// Sizes negotiated for one connection (after the device clamped them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// Send queue depth.
    pub sq_size: u16,
    /// Receive queue depth (= credits granted to the peer).
    pub rq_size: u16,
    /// Largest inline send the QP accepts.
    pub sq_inline: u32,
    /// Receive buffer bytes (two halves) the ring may grow to.
    pub rbuf_size: u32,
    /// Receive ring bytes registered at connect (≤ `rbuf_size`, even). The ring grows to
    /// `rbuf_size` once the peer used up every window we gave it or filled windows worth
    /// `rbuf_size` bytes (see [`Stream::rbuf_grow_wanted`]).
    pub rbuf_start: u32,
    /// Send ring bytes the ring may grow to.
    pub sbuf_size: u32,
    /// Send ring bytes registered at connect (≤ `sbuf_size`). The ring grows to `sbuf_size`
    /// once a send found it full (see [`Stream::sbuf_grow_due`]).
    pub sbuf_start: u32,
    /// iWARP mode: no immediate data; messages travel as 4-byte SENDs after the write.
    pub msg_send: bool,
    /// iWARP: data bytes each posted receive holds after its message, offered to rsocket-rs
    /// peers ([`ConnData::send_room`]); 0 otherwise.
    pub recv_payload: u32,
}

impl StreamConfig {
    /// Bytes of control slots after the send ring, used when credit SGEs cannot go inline.
    pub fn ctrl_area(&self) -> u32 {
        if self.sq_inline < wire::SGE_LEN as u32 {
            wire::SGE_LEN as u32 * CTRL_SLOTS
        } else {
            0
        }
    }

    /// Bytes of the send buffer to allocate: the ring at its largest, then the control slots
    /// (which only a ring that never grows has: see [`QueueSizes::config`]).
    pub fn send_buffer_len(&self) -> usize {
        (self.sbuf_size + self.ctrl_area()) as usize
    }

    /// Bytes of the send buffer registered at connect.
    pub fn send_buffer_start(&self) -> usize {
        if self.sbuf_start == self.sbuf_size {
            self.send_buffer_len()
        } else {
            self.sbuf_start as usize
        }
    }

    /// Message slots after the receive buffer (iWARP: one per posted receive; else none).
    pub fn msg_slots(&self, rq_posted: u32) -> u32 {
        if self.msg_send { rq_posted } else { 0 }
    }

    /// Bytes of one message slot: the message, then room for [`StreamConfig::recv_payload`]
    /// data bytes.
    pub fn msg_slot_len(&self) -> usize {
        wire::MSG_SIZE + self.recv_payload as usize
    }

    /// Bytes of the target SGL buffer: the SGL, then `iomap` iomap entries.
    pub fn target_sgl_len(iomap: u16) -> usize {
        wire::SGE_LEN * wire::SGL_SIZE as usize + wire::IOMAP_LEN * iomap as usize
    }
}

/// Addresses of our own registered buffers, as the peer must see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalBuffers {
    /// Our target SGL array (remote-writable), `length` ignored.
    pub target_sgl: RemoteSge,
    /// Our receive buffer start and rkey, `length` ignored.
    pub rbuf: RemoteSge,
    /// Number of iomap entries we offer.
    pub target_iomap_size: u16,
}

/// One RDMA write of application data, as planned by [`Stream::plan_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataWrite {
    /// Bytes in this write.
    pub len: u32,
    /// Where in the peer's receive buffer.
    pub remote_addr: u64,
    /// Peer's rkey.
    pub rkey: u32,
    /// Message (host order) to carry as immediate data, or as a SEND on iWARP.
    pub msg: u32,
    /// Send inline from the application buffer (no copy into the ring).
    pub inline: bool,
    /// Ring segments (offset, len) to copy the data into, in order; unused when `inline`.
    pub ring: [(u32, u32); 2],
    /// Number of valid entries in `ring`.
    pub ring_segs: usize,
    /// Target SGL entry now used up: zero it in memory before posting, so that a later
    /// write of the peer into it can be told from stale contents.
    pub exhausted_sge: Option<usize>,
}

/// What [`Stream::plan_send`] decided for the next bytes of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPlan {
    /// Post this write now. `fresh` writes carry the caller's next `len` bytes (copy them into
    /// `ring` unless inline); a flushed pending write already holds its bytes in the ring.
    Post {
        /// The write.
        write: DataWrite,
        /// Whether the write carries new caller bytes (false: a flushed pending write).
        fresh: bool,
    },
    /// Copy the caller's next `len` bytes into the ring segments; they leave later, gathered
    /// with their neighbours into one write, via [`Stream::flush`].
    Queued {
        /// Ring segments (offset, len).
        ring: [(u32, u32); 2],
        /// Valid entries of `ring`.
        ring_segs: usize,
        /// Bytes taken.
        len: u32,
    },
}

/// A credit update to post ([`Stream::poll_credit_update`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditUpdate {
    /// The message (host order): [`Msg::Credits`].
    pub msg: u32,
    /// When a receive-buffer half was freed: the 16 bytes to RDMA-write into the peer's
    /// target SGL (already in the peer's byte order), and where.
    pub sge: Option<SgeWrite>,
}

/// Write of a fresh receive window into the peer's target SGL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgeWrite {
    /// The entry bytes.
    pub bytes: [u8; wire::SGE_LEN],
    /// Peer address of the entry.
    pub remote_addr: u64,
    /// Peer rkey of its target SGL.
    pub rkey: u32,
    /// Send inline (else copy into `ctrl_slot_offset` of the ring's control area).
    pub inline: bool,
    /// Offset in the send buffer of the control slot to send from when not inline.
    pub ctrl_slot_offset: u32,
}

/// An iomap announcement to post ([`Stream::plan_iomap_announce`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IomapWrite {
    /// The message (host order): IOMAP_SGL; also the wr_id.
    pub msg: u32,
    /// Peer address of the entry.
    pub remote_addr: u64,
    /// Peer rkey of its target iomap.
    pub rkey: u32,
    /// Write the entry in big-endian order (the peer is a big-endian host).
    pub big_endian: bool,
}

/// Which direct operation ([`Stream::plan_direct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectKind {
    /// RDMA WRITE into a peer window (riowrite).
    Write,
    /// RDMA READ from a peer window (rioread).
    Read,
}

/// One planned direct operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    /// Bytes.
    pub len: u32,
    /// Work-request id to post with.
    pub wr_id: u64,
    /// A write sent inline from the caller's buffer.
    pub inline: bool,
    /// Ring segments to copy a write's bytes into (unless inline or zero-copy).
    pub ring: [(u32, u32); 2],
    /// Valid entries of `ring`.
    pub ring_segs: usize,
}

/// Credits of the peer that data messages leave unused, for our control messages.
///
/// A peer grants as many data messages as it has receives, but each of our control messages
/// (credit updates above all) takes one of its receives too, until the peer next polls and
/// posts them again. librdmacm's receives are exactly its credits: with its data credits used
/// up, one credit update from us finds no receive. Over InfiniBand or RoCE the NIC retries
/// (RNR) until one is posted; iWARP has no such retry, and the peer's NIC ends the connection
/// (both ends see ECONNRESET). So on iWARP a few credits (twice CTRL_SLOTS, at most a quarter
/// of the window, so that the peer's next grant still comes) are left for them. Not just
/// CTRL_SLOTS: a control slot comes back when our SEND completes, which on iWARP is when the
/// peer's TCP took it, not when the peer polled, so more of our control messages than
/// CTRL_SLOTS may wait unpolled in its receive queue (a credit update per half of its receive
/// credits we used and per half of our receive ring it filled, both counted across its polls).
fn credit_reserve(msg_send: bool, credits: u16) -> u16 {
    if msg_send {
        (2 * CTRL_SLOTS as u16).min(credits / 4)
    } else {
        0
    }
}

/// Errors of the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The peer sent something malformed or out of bounds.
    Protocol(WireError),
    /// A work request failed (status non-success).
    Transport,
    /// Keepalive gave up: TCP_KEEPCNT probes unanswered, or the device gave up on one.
    KeepaliveTimeout,
    /// The device gave up retransmitting a work request to a peer that does not answer (its
    /// retries exceeded): ETIMEDOUT, like TCP's retransmission timeout.
    RetriesExceeded,
    /// The connection went away without the peer's orderly DISCONNECT/SHUTDOWN (it was
    /// killed or aborted): ECONNRESET, like a TCP reset.
    Reset,
    /// Our own background work on the connection failed (a panic in a service job): EIO.
    Internal,
}

impl From<WireError> for StreamError {
    fn from(e: WireError) -> Self {
        StreamError::Protocol(e)
    }
}

/// Connection state of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// We may still receive data (no SHUTDOWN/DISCONNECT from the peer).
    pub readable: bool,
    /// We may still send data.
    pub writable: bool,
    /// The connection exists (not disconnected or failed).
    pub connected: bool,
}

/// A window of our receive buffer the peer may still write into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Granted {
    /// Offset in the receive buffer of its next byte.
    at: u32,
    /// Bytes not yet written.
    left: u32,
    /// The rkey it was given under.
    key: u32,
}

/// The connected-stream state machine.
#[derive(Debug)]
pub struct Stream {
    cfg: StreamConfig,
    flags: Flags,
    err: Option<StreamError>,
    peer_big_endian: bool,
    remote_sgl: RemoteSge,
    remote_sge: u32,
    local: LocalBuffers,
    // send side
    sseq_no: u16,
    sseq_comp: u16,
    /// Receive credits the peer granted at connect (its receive queue): no credit limit of
    /// the peer runs further ahead of what we sent.
    peer_credits: u16,
    /// Credits left unused for our control messages (see [`credit_reserve`]).
    credit_reserve: u16,
    sqe_avail: u32,
    sbuf_bytes_avail: u32,
    sbuf_head: u32,
    /// Send ring bytes now (grows from `cfg.sbuf_start` to `sbuf_cap`).
    sbuf_cur: u32,
    /// Largest the send ring may grow to (`cfg.sbuf_size`, or `sbuf_cur` once growing failed).
    sbuf_cap: u32,
    /// A send found the ring too small: grow it at the next moment the layout allows.
    sbuf_grow_wanted: bool,
    /// Data writes posted and not completed.
    inflight: u32,
    /// Small sends gathered while earlier writes are in flight: one planned write that grows
    /// until it is flushed (credit, send-queue entry and window are already reserved).
    pending: Option<DataWrite>,
    target_sgl: [RemoteSge; 2],
    target_sge: usize,
    ctrl_seqno: u32,
    ctrl_max_seqno: u32,
    // receive side
    /// Messages received and not yet consumed: (offset in the receive buffer, length). Each
    /// lies in one window, so it is contiguous; consecutive ones usually are too, but not
    /// across the ring's end or where it grew.
    rmsg: VecDeque<(u32, u32)>,
    /// The bytes of `rmsg` (kept, so that a message's arrival and a read need not add them up).
    rmsg_bytes: u64,
    rbuf_offset: u32,
    rbuf_bytes_avail: u32,
    rbuf_free_offset: u32,
    rseq_no: u16,
    rseq_comp: u16,
    /// Receive ring bytes now (grows from `cfg.rbuf_start` to `rbuf_cap`).
    rbuf_cur: u32,
    /// Largest the receive ring may grow to (`cfg.rbuf_size`, or `rbuf_cur` once growing failed).
    rbuf_cap: u32,
    /// The windows we gave the peer that it has not filled yet, oldest first (at most one per
    /// entry of its target SGL): the peer's data must land in them, in order.
    granted: VecDeque<Granted>,
    /// The peer used up every window we gave it, or filled windows worth the full buffer: grow
    /// the ring.
    rbuf_grow_wanted: bool,
    /// Data bytes the peer wrote into our windows (saturating): with the windows it filled,
    /// a reason to grow the ring.
    rbuf_filled: u32,
    /// The rkey of the whole (grown) receive buffer, registered and not yet given out: the ring
    /// switches to it at the next window that may start its second half.
    rbuf_grown_key: Option<u32>,
    /// The rkey the ring had before it grew, while a window under it is still unfilled.
    rbuf_old_key: Option<u32>,
    /// The peer is rsocket-rs.
    peer_ext: bool,
    /// Data bytes a message SEND to the peer may carry (iWARP, rsocket-rs peer; else 0).
    peer_payload: u32,
    /// The peer's target iomap: address, rkey, entry count.
    remote_iomap: RemoteSge,
    /// Nothing may be posted until the peer's first message arrives (see
    /// [`Stream::hold_sends_until_peer_speaks`]).
    held: bool,
    /// A message of the peer has arrived since the connection was set up.
    heard: bool,
    /// The peer's DISCONNECT arrived: it sends nothing more.
    peer_done: bool,
    /// The SHUTDOWN or DISCONNECT that `shutdown` owes the peer, until posted. Still owed when
    /// the peer's own SHUTDOWN arrives while ours waits for a control slot: the connection is
    /// then closed both ways, but the peer reads to the end of the stream only once ours came.
    ctrl_owed: Option<Ctrl>,
    /// The connection vanished underneath us ([`Stream::on_connection_lost`]).
    lost: bool,
    /// Direct reads completed.
    reads_done: u64,
    /// Completions processed (the keepalive timer's view of traffic).
    activity: u64,
    /// The last send planned found no room: see [`Stream::send_starved`].
    send_waiting: bool,
    timers: Option<Timers>,
}

impl Stream {
    /// Our private data for the CM REQ/REP.
    pub fn local_conn_data(cfg: &StreamConfig, local: &LocalBuffers) -> ConnData {
        ConnData {
            flags: wire::CONN_FLAG_IOMAP
                | wire::CONN_FLAG_RSRS
                | if cfg!(target_endian = "big") {
                    wire::CONN_FLAG_NET
                } else {
                    0
                },
            credits: cfg.rq_size,
            target_iomap_size: local.target_iomap_size,
            target_sgl: RemoteSge {
                addr: local.target_sgl.addr,
                key: local.target_sgl.key,
                length: wire::SGL_SIZE,
            },
            data_buf: RemoteSge {
                addr: local.rbuf.addr,
                key: local.rbuf.key,
                length: cfg.rbuf_start / 2,
            },
            send_room: cfg.recv_payload.min(wire::SEND_PAYLOAD_MAX as u32) as u8,
        }
    }

    /// Creates the connected state from our configuration and the peer's private data.
    pub fn new(cfg: StreamConfig, local: LocalBuffers, peer: &ConnData) -> Self {
        let ctrl_max = CTRL_SLOTS;
        Stream {
            cfg,
            flags: Flags {
                readable: true,
                writable: true,
                connected: true,
            },
            err: None,
            peer_big_endian: peer.is_big_endian(),
            remote_sgl: peer.target_sgl,
            remote_sge: 1,
            local,
            sseq_no: 0,
            sseq_comp: peer.credits,
            peer_credits: peer.credits,
            credit_reserve: credit_reserve(cfg.msg_send, peer.credits),
            sqe_avail: cfg.sq_size as u32 - ctrl_max,
            sbuf_bytes_avail: cfg.sbuf_start,
            sbuf_head: 0,
            sbuf_cur: cfg.sbuf_start,
            sbuf_cap: cfg.sbuf_size,
            sbuf_grow_wanted: false,
            inflight: 0,
            pending: None,
            target_sgl: [peer.data_buf, RemoteSge::default()],
            target_sge: 0,
            ctrl_seqno: 0,
            ctrl_max_seqno: ctrl_max,
            rmsg: VecDeque::with_capacity(cfg.rq_size as usize + 1),
            rmsg_bytes: 0,
            rbuf_offset: 0,
            rbuf_bytes_avail: cfg.rbuf_start / 2,
            rbuf_free_offset: cfg.rbuf_start / 2,
            rseq_no: 0,
            rseq_comp: cfg.rq_size / 2,
            rbuf_cur: cfg.rbuf_start,
            // The grown ring's first window runs from the small ring's end to its middle.
            rbuf_cap: if cfg.rbuf_start < cfg.rbuf_size / 2 {
                cfg.rbuf_size
            } else {
                cfg.rbuf_start
            },
            granted: VecDeque::from([Granted {
                at: 0,
                left: cfg.rbuf_start / 2,
                key: local.rbuf.key,
            }]),
            rbuf_grow_wanted: false,
            rbuf_filled: 0,
            rbuf_grown_key: None,
            rbuf_old_key: None,
            held: false,
            heard: false,
            peer_done: false,
            ctrl_owed: None,
            lost: false,
            reads_done: 0,
            activity: 0,
            send_waiting: false,
            timers: None,
            peer_ext: peer.is_rsocket_rs(),
            peer_payload: if cfg.msg_send { peer.payload_room() } else { 0 },
            remote_iomap: RemoteSge {
                addr: peer.target_sgl.addr + wire::SGE_LEN as u64 * wire::SGL_SIZE as u64,
                key: peer.target_sgl.key,
                length: peer.target_iomap_size as u32,
            },
        }
    }

    /// The connected state of an accepted connection: as [`Stream::new`], and on iWARP the
    /// initiator speaks first (see [`Stream::hold_sends_until_peer_speaks`]).
    pub fn accepted(cfg: StreamConfig, local: LocalBuffers, peer: &ConnData) -> Self {
        let mut s = Self::new(cfg, local, peer);
        if cfg.msg_send {
            s.hold_sends_until_peer_speaks();
        }
        s
    }

    /// Whether the gathered (pending) write used up the peer's window (test coverage).
    #[cfg(test)]
    pub(crate) fn pending_used_up_window(&self) -> bool {
        self.pending.is_some_and(|p| p.exhausted_sge.is_some())
    }

    /// Fails the connection because the device refused a post (see `Driver`): a broken
    /// connection, reported as a failed work request is.
    pub fn fail_post(&mut self) {
        self.fail(StreamError::Transport);
    }

    /// Fails the connection because our own background work broke (a bug): every call then
    /// reports an error instead of waiting for that work.
    pub fn fail_internal(&mut self) {
        self.fail(StreamError::Internal);
    }

    /// Direct reads (rioread) completed so far.
    pub fn reads_completed(&self) -> u64 {
        self.reads_done
    }

    /// For the accepting side of an iWARP connection: post nothing (data, credit updates,
    /// control messages, keepalive probes) until the peer's first message has arrived. Without
    /// MPA's peer-to-peer mode the initiator learns that the connection is up from the MPA reply
    /// and fails the connection if our first frame arrives before it has read that reply (Soft-
    /// iWARP checks). Both librdmacm's and our initiator send a credit update first thing, so the
    /// hold is short; a peer that disconnects instead releases it (nothing is owed then).
    pub fn hold_sends_until_peer_speaks(&mut self) {
        self.held = true;
    }

    /// Whether a message of the peer has arrived since the connection was set up.
    pub fn peer_heard(&self) -> bool {
        self.heard
    }

    /// Whether sends wait for the peer's first message.
    pub fn sends_held(&self) -> bool {
        self.held && self.flags.connected
    }

    /// The negotiated configuration.
    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// Connection state.
    #[inline]
    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// The error that broke the connection, if any.
    pub fn error(&self) -> Option<&StreamError> {
        self.err.as_ref()
    }

    fn fail(&mut self, e: StreamError) {
        if self.err.is_none() {
            self.err = Some(e);
        }
        self.flags = Flags {
            readable: false,
            writable: false,
            connected: false,
        };
    }

    /// Whether the peer's DISCONNECT arrived: it has nothing more to send (no data, no credit
    /// update), so our side of the connection may go without anything of the peer's arriving
    /// after it.
    pub fn peer_done(&self) -> bool {
        self.peer_done
    }

    /// Marks the connection as gone (CM disconnect event, QP error).
    pub fn set_disconnected(&mut self) {
        self.flags.connected = false;
        self.flags.readable = false;
        self.flags.writable = false;
    }

    /// The connection vanished underneath us (CM disconnect, flushed QP). If the peer had not
    /// said goodbye (we could still read), it is a reset, not an end of stream.
    pub fn on_connection_lost(&mut self) {
        self.lost = true;
        if self.flags.readable && self.flags.connected {
            self.fail(StreamError::Reset);
        } else {
            self.set_disconnected();
        }
    }

    // ---------------------------------------------------------------- send side

    /// Whether a data write can be posted now.
    pub fn can_send(&self) -> bool {
        let need_sqe = if self.cfg.msg_send { 2 } else { 1 };
        self.flags.writable
            && !self.held
            && self.sqe_avail >= need_sqe
            && self.sbuf_bytes_avail >= SNDLOWAT.min(self.sbuf_cur)
            && self.credit_left()
            && self.target_sgl[self.target_sge].length != 0
    }

    /// Whether a send waits for the peer alone: the last one planned found no room, and what
    /// it lacks is a window or a credit of the peer (not room of ours, which comes back with
    /// completions of our own writes). Only the peer's credit update ends that wait, so while
    /// it lasts with nothing of ours in flight a dead link would go unnoticed (without
    /// keepalive): [`Stream::handle_persist`] then probes, as TCP's persist timer does.
    pub fn send_starved(&self) -> bool {
        self.send_waiting
            && self.flags.connected
            && self.flags.writable
            && !self.held
            && (!self.credit_left() || self.target_sgl[self.target_sge].length == 0)
    }

    /// A caller waits for room to send (rpoll for POLLOUT, say): as a send that found none,
    /// for [`Stream::send_starved`].
    pub fn note_send_wait(&mut self) {
        self.send_waiting = true;
    }

    /// Whether none of our sends is in flight (posted and not completed).
    fn nothing_in_flight(&self) -> bool {
        self.ctrl_max_seqno.wrapping_sub(self.ctrl_seqno) == CTRL_SLOTS
            && self.sqe_avail == self.cfg.sq_size as u32 - CTRL_SLOTS
    }

    /// Adopts windows the peer wrote into our target SGL (`mem` = current memory contents,
    /// host order). Only entries we have used up are taken: anything else is stale or hostile.
    /// An entry used up by the pending (gathered) write still holds the peer's old window in
    /// memory: it is zeroed only just before that write is posted ([`DataWrite::exhausted_sge`]),
    /// so until then it is not taken either.
    pub fn refresh_target_sgl(&mut self, mem: [RemoteSge; 2]) {
        let unzeroed = self.pending.and_then(|p| p.exhausted_sge);
        for (i, (local, fresh)) in self.target_sgl.iter_mut().zip(mem).enumerate() {
            if local.length == 0
                && unzeroed != Some(i)
                && fresh.length != 0
                && fresh.addr.checked_add(fresh.length as u64).is_some()
            {
                *local = fresh;
            }
        }
    }

    /// Plans one RDMA write of at most `max` bytes (the caller's segment size), or `None` when
    /// [`Stream::can_send`] is false. The state is updated as if the write was posted.
    pub fn plan_write(&mut self, max: u32) -> Option<DataWrite> {
        self.plan_write_from(max, false)
    }

    /// Like [`Stream::plan_write`] for a write that counts as in flight for
    /// [`Stream::plan_send`]'s gathering (the rest of a send whose start went through it).
    pub fn plan_write_counted(&mut self, max: u32) -> Option<DataWrite> {
        let w = self.plan_write(max)?;
        self.inflight += 1;
        Some(w)
    }

    /// Like [`Stream::plan_write`] for data sent straight from the application's registered
    /// memory (MSG_ZEROCOPY): no ring bytes, never inline; post it with wr_id
    /// `msg | WR_ID_NO_RING`. Gathered sends must be flushed first (the order is the caller's).
    pub fn plan_write_zero_copy(&mut self, max: u32) -> Option<DataWrite> {
        let w = self.plan_write_from(max.min(MAX_TRANSFER), true)?;
        self.inflight += 1;
        Some(w)
    }

    fn plan_write_from(&mut self, max: u32, zero_copy: bool) -> Option<DataWrite> {
        if !zero_copy && max > self.sbuf_bytes_avail {
            self.want_sbuf_growth();
        }
        if max == 0 || !self.can_send() {
            self.send_waiting = max > 0;
            return None;
        }
        self.send_waiting = false;
        let sge = &mut self.target_sgl[self.target_sge];
        let len = if zero_copy {
            max.min(sge.length)
        } else {
            max.min(self.sbuf_bytes_avail).min(sge.length)
        };
        let remote_addr = sge.addr;
        let rkey = sge.key;
        sge.addr += len as u64;
        sge.length -= len;
        let mut exhausted_sge = None;
        if sge.length == 0 {
            exhausted_sge = Some(self.target_sge);
            self.target_sge = (self.target_sge + 1) % wire::SGL_SIZE as usize;
        }
        self.sseq_no = self.sseq_no.wrapping_add(1);
        self.sqe_avail -= if self.cfg.msg_send { 2 } else { 1 };
        if !zero_copy {
            self.sbuf_bytes_avail -= len;
        }

        let inline = !zero_copy && len <= self.cfg.sq_inline;
        let (ring, ring_segs) = if inline || zero_copy {
            ([(0, 0); 2], 0)
        } else {
            self.take_ring(len)
        };
        Some(DataWrite {
            len,
            remote_addr,
            rkey,
            msg: Msg::Data(len).encode(),
            inline,
            ring,
            ring_segs,
            exhausted_sge,
        })
    }

    /// Takes the next `len` bytes of the send ring (already counted out of
    /// `sbuf_bytes_avail`): one or two (offset, len) segments.
    fn take_ring(&mut self, len: u32) -> ([(u32, u32); 2], usize) {
        let mut ring = [(0, 0); 2];
        let to_end = self.sbuf_cur - self.sbuf_head;
        if len <= to_end {
            ring[0] = (self.sbuf_head, len);
            self.sbuf_head = if len == to_end {
                0
            } else {
                self.sbuf_head + len
            };
            (ring, 1)
        } else {
            ring[0] = (self.sbuf_head, to_end);
            ring[1] = (0, len - to_end);
            self.sbuf_head = len - to_end;
            (ring, 2)
        }
    }

    /// Whether a work request can be posted that needs `sqe` send-queue entries (and, if
    /// `credit`, a receive credit of the peer).
    fn can_post(&self, sqe: u32, credit: bool) -> bool {
        self.flags.writable
            && !self.held
            && self.sqe_avail >= sqe
            && (!credit || self.credit_left())
    }

    /// Whether a data message may go: a receive credit of the peer is left beyond the reserve.
    fn credit_left(&self) -> bool {
        self.sseq_comp.wrapping_sub(self.sseq_no) > self.credit_reserve
    }

    /// The peer is rsocket-rs (its iomap announcements carry permissions; rioread possible).
    pub fn peer_is_rsocket_rs(&self) -> bool {
        self.peer_ext
    }

    /// Data bytes a message SEND to the peer may carry after the message (iWARP, rsocket-rs
    /// peer: [`ConnData::send_room`]); 0 when messages travel alone, after their write.
    pub fn peer_payload_room(&self) -> u32 {
        self.peer_payload
    }

    /// Feeds back a received message SEND that carried `payload` data bytes after the message:
    /// a DATA message of exactly that many bytes, at most what our receives hold
    /// ([`StreamConfig::recv_payload`]), else the connection fails. Returns where in the
    /// receive buffer the bytes belong (where the peer's RDMA write would have put them); the
    /// caller copies them there before anything reads the buffer.
    pub fn on_recv_carrying(&mut self, raw: u32, payload: u32) -> Result<u32, StreamError> {
        let carried = matches!(Msg::decode(raw), Ok(Msg::Data(len)) if len == payload && len > 0);
        if !carried || payload > self.cfg.recv_payload {
            let e = WireError::Invalid("data carried by a message SEND");
            self.fail(e.clone().into());
            return Err(e.into());
        }
        self.on_recv(raw)?;
        Ok(self.rmsg.back().map_or(0, |&(at, _)| at))
    }

    /// Entries of the peer's target iomap (windows we may announce to it).
    pub fn peer_iomap_size(&self) -> u16 {
        self.remote_iomap.length as u16
    }

    /// Plans the announcement of our window `index` (< [`Stream::peer_iomap_size`]) with
    /// `perms` (0: withdrawn): an RDMA write of the 24-byte entry into the peer's target iomap
    /// with IOMAP_SGL as message. Uses a credit like data. `None` while it cannot be posted.
    pub fn plan_iomap_announce(&mut self, index: u16, perms: u8) -> Option<IomapWrite> {
        let sqe = if self.cfg.msg_send { 2 } else { 1 };
        if index >= self.peer_iomap_size() || !self.can_post(sqe, true) {
            return None;
        }
        self.sseq_no = self.sseq_no.wrapping_add(1);
        self.sqe_avail -= sqe;
        let data = super::iomap::announce_data(index, perms, self.peer_ext);
        Some(IomapWrite {
            msg: Msg::IomapSgl(data).encode(),
            remote_addr: self.remote_iomap.addr + index as u64 * wire::IOMAP_LEN as u64,
            rkey: self.remote_iomap.key,
            big_endian: self.peer_big_endian,
        })
    }

    /// Plans one direct operation on a peer window (riowrite, rioread) of at most `max` bytes:
    /// no message, no credit, one send-queue entry. A write that is not zero-copy goes through
    /// the send ring (or inline); zero-copy writes and reads use the caller's registered memory.
    /// Returns `None` while it cannot be posted (the caller waits for completions).
    pub fn plan_direct(&mut self, kind: DirectKind, max: u32, zero_copy: bool) -> Option<Direct> {
        if max == 0 || !self.can_post(1, false) {
            return None;
        }
        let mut len = max.min(MAX_TRANSFER);
        let copy = kind == DirectKind::Write && !zero_copy;
        // Copied bytes (inline ones too, like plan_write) are counted out of the ring's free
        // space until they complete: never more than it has.
        if copy {
            if len > self.sbuf_bytes_avail {
                self.want_sbuf_growth();
            }
            if self.sbuf_bytes_avail < SNDLOWAT.min(self.sbuf_cur).min(len) {
                return None;
            }
            len = len.min(self.sbuf_bytes_avail);
        }
        let inline = copy && len <= self.cfg.sq_inline;
        self.sqe_avail -= 1;
        let (ring, ring_segs) = if copy {
            self.sbuf_bytes_avail -= len;
            if inline {
                ([(0, 0); 2], 0)
            } else {
                self.take_ring(len)
            }
        } else {
            ([(0, 0); 2], 0)
        };
        let op = match kind {
            DirectKind::Write => LOCAL_OP_WRITE,
            DirectKind::Read => LOCAL_OP_READ,
        };
        let mut wr_id = (op << 29 | len) as u64;
        if !copy {
            wr_id |= WR_ID_NO_RING;
        }
        Some(Direct {
            len,
            wr_id,
            inline,
            ring,
            ring_segs,
        })
    }

    fn want_sbuf_growth(&mut self) {
        if self.sbuf_cur < self.sbuf_cap {
            self.sbuf_grow_wanted = true;
        }
    }

    /// Whether the send ring should grow now: a send found it too small, and the bytes in
    /// flight lie in one piece that ends at the ring's head (or at its end), so the larger
    /// ring keeps them where they are. Then register the whole send buffer and call
    /// [`Stream::on_sbuf_grown`].
    #[inline]
    pub fn sbuf_grow_due(&self) -> bool {
        // Inline bytes in flight count too (see plan_direct), so `used` may exceed the ring's
        // occupied bytes: the test errs on the side of waiting.
        let used = self.sbuf_cur - self.sbuf_bytes_avail;
        self.sbuf_grow_wanted
            && self.pending.is_none()
            && (used <= self.sbuf_head || self.sbuf_head == 0)
    }

    /// The whole send buffer is registered: the ring has its full size from now on. Bytes in
    /// flight stay in place; a head at the old end moves past them rather than wrapping.
    pub fn on_sbuf_grown(&mut self) {
        if self.sbuf_head == 0 && self.sbuf_bytes_avail < self.sbuf_cur {
            self.sbuf_head = self.sbuf_cur;
        }
        self.sbuf_bytes_avail += self.sbuf_cap - self.sbuf_cur;
        self.sbuf_cur = self.sbuf_cap;
        self.sbuf_grow_wanted = false;
    }

    /// Registering the larger send buffer failed: the ring keeps its size.
    pub fn sbuf_growth_failed(&mut self) {
        self.sbuf_cap = self.sbuf_cur;
        self.sbuf_grow_wanted = false;
    }

    /// Send ring bytes now.
    pub fn send_ring_len(&self) -> u32 {
        self.sbuf_cur
    }

    /// Offset in the send ring of the next write (test coverage).
    #[cfg(test)]
    pub(crate) fn send_ring_head(&self) -> u32 {
        self.sbuf_head
    }

    /// Receive ring bytes now.
    pub fn recv_ring_len(&self) -> u32 {
        self.rbuf_cur
    }

    /// Data writes posted and not yet completed.
    pub fn data_in_flight(&self) -> u32 {
        self.inflight
    }

    /// Plans the next at most `max` bytes of a send, coalescing small sends: with nothing in
    /// flight they leave at once (a lone message is never delayed); while earlier writes are in
    /// flight, sends smaller than [`OLAP_START_SIZE`] are gathered in the ring into one pending
    /// write, which leaves with [`Stream::flush`] once the writes in flight completed
    /// ([`Stream::should_flush`]). Data always leaves in order: a send that cannot join the
    /// pending write first flushes it (`Post` with `fresh: false`; ask again).
    pub fn plan_send(&mut self, max: u32) -> Option<SendPlan> {
        if max == 0 || !self.flags.writable {
            return None;
        }
        let small = max < OLAP_START_SIZE;
        if self.pending.is_none() && (self.inflight == 0 || !small) {
            let w = self.plan_write(max)?;
            self.inflight += 1;
            return Some(SendPlan::Post {
                write: w,
                fresh: true,
            });
        }
        if self.pending.is_some() {
            let n = if small { self.appendable(max) } else { 0 };
            if n == 0 {
                return self.flush().map(|w| SendPlan::Post {
                    write: w,
                    fresh: false,
                });
            }
            let p = self.pending.as_mut().expect("pending checked above");
            let at = p.ring[0].0 + p.ring[0].1;
            p.ring[0].1 += n;
            p.len += n;
            p.msg = Msg::Data(p.len).encode();
            let sge = &mut self.target_sgl[self.target_sge];
            sge.addr += n as u64;
            sge.length -= n;
            if sge.length == 0 {
                p.exhausted_sge = Some(self.target_sge);
                self.target_sge = (self.target_sge + 1) % wire::SGL_SIZE as usize;
            }
            self.sbuf_bytes_avail -= n;
            self.sbuf_head = (at + n) % self.sbuf_cur;
            return Some(SendPlan::Queued {
                ring: [(at, n), (0, 0)],
                ring_segs: 1,
                len: n,
            });
        }
        // Start a pending write; it always goes through the ring (the caller's buffer is gone
        // by the time it leaves).
        let inline = self.cfg.sq_inline;
        self.cfg.sq_inline = 0;
        let w = self.plan_write(max);
        self.cfg.sq_inline = inline;
        let w = w?;
        self.pending = Some(w);
        Some(SendPlan::Queued {
            ring: w.ring,
            ring_segs: w.ring_segs,
            len: w.len,
        })
    }

    /// Bytes (≤ `max`) that can join the pending write: contiguous in the ring and in the
    /// peer's window, within one transfer.
    fn appendable(&self, max: u32) -> u32 {
        let Some(p) = &self.pending else { return 0 };
        if p.exhausted_sge.is_some() || p.ring_segs != 1 {
            return 0;
        }
        let end = p.ring[0].0 + p.ring[0].1;
        let sge = &self.target_sgl[self.target_sge];
        if sge.addr != p.remote_addr + p.len as u64 || end % self.sbuf_cur != self.sbuf_head {
            return 0;
        }
        max.min(MAX_TRANSFER - p.len.min(MAX_TRANSFER))
            .min(self.sbuf_bytes_avail)
            .min(sge.length)
            .min(self.sbuf_cur - end)
    }

    /// Whether gathered sends wait to leave.
    #[inline]
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether something owed to the peer waits for one of our sends to complete: gathered
    /// sends (they leave once the writes before them complete), or a credit update or control
    /// message that has no free control slot (slots come back as control sends complete). A
    /// waiter for received data must then be woken by our sends' completions too: the peer
    /// may be waiting, before it sends anything more, for what we owe it.
    pub fn waits_for_sends(&self) -> bool {
        if self.pending.is_some() {
            return true;
        }
        let owed = (self.flags.connected && self.credits_owed()) || self.ctrl_owed.is_some();
        owed && !self.held && !self.ctrl_avail(self.credit_update_slots())
    }

    /// Whether the pending write should leave now (nothing else in flight).
    #[inline]
    pub fn should_flush(&self) -> bool {
        self.pending.is_some() && self.inflight == 0
    }

    /// Takes the pending write to post (its bytes are in the ring already).
    pub fn flush(&mut self) -> Option<DataWrite> {
        let w = self.pending.take()?;
        self.inflight += 1;
        Some(w)
    }

    /// Whether a control slot is free (two on iWARP when a credit SGE goes with it).
    #[inline]
    fn ctrl_avail(&self, n: u32) -> bool {
        !self.held && self.ctrl_max_seqno.wrapping_sub(self.ctrl_seqno) >= n
    }

    /// Posts a control message (shutdown/disconnect) if a control slot is free.
    pub fn post_ctrl(&mut self, ctrl: Ctrl) -> Option<u32> {
        let owed = self.ctrl_owed == Some(ctrl) && self.err.is_none();
        if !(self.flags.connected || owed) || !self.ctrl_avail(1) {
            return None;
        }
        if owed {
            self.ctrl_owed = None;
        }
        self.ctrl_seqno = self.ctrl_seqno.wrapping_add(1);
        Some(Msg::Ctrl(ctrl).encode())
    }

    /// Takes a control slot for a keepalive probe (a 0-byte RDMA write the peer's NIC acks
    /// without software, so no receive and no credit are used). Returns its wr_id.
    pub fn post_keepalive(&mut self) -> Option<u64> {
        if !self.flags.connected || !self.ctrl_avail(1) {
            return None;
        }
        self.ctrl_seqno = self.ctrl_seqno.wrapping_add(1);
        Some(Msg::Ctrl(Ctrl::Keepalive).encode() as u64)
    }

    /// Whether a control message could be posted now (or never will: not connected, and no
    /// SHUTDOWN/DISCONNECT owed to a peer still there).
    pub fn can_send_ctrl(&self) -> bool {
        self.ctrl_avail(1)
            || self.err.is_some()
            || (!self.flags.connected && self.ctrl_owed.is_none())
    }

    /// Whether every posted send has completed, or nothing is left to wait for: the connection
    /// failed or vanished, or the peer's DISCONNECT came (it is closing: what we still send is
    /// lost to it anyway). Closed both ways by SHUTDOWNs that crossed is no such reason: the
    /// peer is still there, reading to the end of our stream, and disconnecting before our
    /// SHUTDOWN (and the data before it) left would flush them, the peer seeing a reset.
    pub fn all_sends_done(&self) -> bool {
        self.err.is_some()
            || self.lost
            || (!self.flags.connected && self.peer_done)
            || self.nothing_in_flight()
    }

    /// Applies SHUT_RD/SHUT_WR/SHUT_RDWR locally and returns the control message owed to the
    /// peer, if any (post it with [`Stream::post_ctrl`]).
    pub fn shutdown(&mut self, read: bool, write: bool) -> Option<Ctrl> {
        let ctrl = self.shutdown_flags(read, write);
        if ctrl.is_some() {
            self.ctrl_owed = ctrl;
        }
        ctrl
    }

    /// The flag changes of [`Stream::shutdown`] and the message they call for.
    fn shutdown_flags(&mut self, read: bool, write: bool) -> Option<Ctrl> {
        if !self.flags.connected {
            return None;
        }
        if read && write {
            self.flags.readable = false;
            self.flags.writable = false;
            Some(Ctrl::Disconnect)
        } else if write {
            self.flags.writable = false;
            Some(if self.flags.readable {
                Ctrl::Shutdown
            } else {
                Ctrl::Disconnect
            })
        } else if read {
            self.flags.readable = false;
            if self.flags.writable {
                None
            } else {
                Some(Ctrl::Disconnect)
            }
        } else {
            None
        }
    }

    /// The device gave up on a send (retries exceeded: the peer does not answer); fed before
    /// that send's [`Stream::on_send_completion`], so that the connection fails with
    /// [`StreamError::RetriesExceeded`].
    pub fn on_retries_exceeded(&mut self) {
        if self.flags.connected {
            self.fail(StreamError::RetriesExceeded);
        }
    }

    /// Feeds a send completion back. `ok` is false for a failed work request.
    pub fn on_send_completion(&mut self, wr_id: u64, ok: bool) {
        self.activity = self.activity.wrapping_add(1);
        let msg = wr_id as u32;
        let len = msg & 0x1FFF_FFFF;
        let ring = wr_id & WR_ID_NO_RING == 0;
        match msg >> 29 {
            // The SEND that carried a data or iomap message on iWARP (control messages count
            // their SEND as a control slot, below).
            op if wr_id & WR_ID_MSG_SEND != 0 && op != 4 && op != 7 => self.sqe_avail += 1,
            0 => {
                self.sqe_avail += 1;
                if ring {
                    self.sbuf_bytes_avail += len;
                }
                self.inflight = self.inflight.saturating_sub(1);
            }
            LOCAL_OP_WRITE => {
                self.sqe_avail += 1;
                if ring {
                    self.sbuf_bytes_avail += len;
                }
            }
            4 => self.ctrl_max_seqno = self.ctrl_max_seqno.wrapping_add(1),
            7 => {
                self.ctrl_max_seqno = self.ctrl_max_seqno.wrapping_add(1);
                let ctrl = msg & 0x1FFF_FFFF;
                if ctrl == Ctrl::Keepalive as u32 && !ok && self.flags.connected {
                    self.fail(StreamError::KeepaliveTimeout);
                } else if ctrl == Ctrl::Disconnect as u32 {
                    self.set_disconnected();
                }
            }
            LOCAL_OP_READ => {
                self.sqe_avail += 1;
                self.reads_done += 1;
            }
            // Iomap announcements.
            _ => self.sqe_avail += 1,
        }
        if !ok && self.flags.connected {
            self.fail(StreamError::Transport);
        }
    }

    // ---------------------------------------------------------------- receive side

    /// Feeds a received message back. Returns what it was, for the socket layer (credit updates
    /// mean: re-read the target SGL with [`Stream::refresh_target_sgl`]).
    pub fn on_recv(&mut self, raw: u32) -> Result<Msg, StreamError> {
        self.activity = self.activity.wrapping_add(1);
        self.held = false;
        self.heard = true;
        let msg = match Msg::decode(raw) {
            Ok(m) => m,
            Err(e) => {
                self.fail(e.clone().into());
                return Err(e.into());
            }
        };
        match msg {
            Msg::Data(len) => {
                // The peer may not put more in flight than the credits and windows we gave,
                // and each write lies in the oldest window it has not filled (a write never
                // spans two windows).
                let queued = self.rmsg_bytes;
                let fits = len == 0 || self.granted.front().is_some_and(|g| len <= g.left);
                if self.rmsg.len() > self.cfg.rq_size as usize
                    || queued + len as u64 > self.rbuf_cur as u64
                    || !fits
                {
                    let e = WireError::Invalid("data beyond the granted receive window");
                    self.fail(e.clone().into());
                    return Err(e.into());
                }
                let at = self.granted.front().map_or(0, |g| g.at);
                if let Some(g) = self.granted.front_mut().filter(|_| len > 0) {
                    g.left -= len;
                    g.at += len;
                    self.rbuf_filled = self.rbuf_filled.saturating_add(len);
                    if g.left == 0 {
                        self.granted.pop_front();
                        // The peer has no room left (its sends wait for our reads), or it
                        // streams: a reader that keeps up gives windows back before the peer
                        // runs out, but each of its writes ends at a window's end, so the
                        // starting ring's small windows cost it more writes and us more credit
                        // updates for as long as the stream lasts. Data worth the full buffer
                        // tells a stream from an idle connection's few messages.
                        if self.rbuf_cur < self.rbuf_cap
                            && (self.granted.is_empty() || self.rbuf_filled >= self.rbuf_cap)
                        {
                            self.rbuf_grow_wanted = true;
                        }
                    }
                }
                // Data that arrived is kept even if a disconnect was noticed first (a CM event can
                // be seen before the CQ is drained): it is read before end of stream.
                self.rmsg.push_back((at, len));
                self.rmsg_bytes += len as u64;
            }
            Msg::Credits(limit) => {
                // The peer's limit is what it has read of ours plus its receive queue: never
                // more than that beyond what we sent (nor behind it, which wraps to more).
                if limit.wrapping_sub(self.sseq_no) > self.peer_credits {
                    let e = WireError::Invalid("credits beyond the peer's receive queue");
                    self.fail(e.clone().into());
                    return Err(e.into());
                }
                self.sseq_comp = limit
            }
            Msg::IomapSgl(d) => {
                // The entry landed in our target iomap: only at an index we offered.
                if d & ((1 << super::iomap::PERM_SHIFT) - 1) >= self.local.target_iomap_size as u32
                {
                    let e = WireError::Invalid("iomap index beyond the entries offered");
                    self.fail(e.clone().into());
                    return Err(e.into());
                }
            }
            Msg::Ctrl(Ctrl::Disconnect) => {
                self.peer_done = true;
                self.set_disconnected();
            }
            Msg::Ctrl(Ctrl::Shutdown) => {
                if self.flags.writable {
                    self.flags.readable = false;
                } else {
                    self.set_disconnected();
                }
            }
            Msg::Ctrl(Ctrl::Keepalive) => {}
        }
        Ok(msg)
    }

    /// Bytes received and not yet consumed.
    pub fn readable_bytes(&self) -> usize {
        self.rmsg_bytes as usize
    }

    /// Whether data is waiting.
    #[inline]
    pub fn has_data(&self) -> bool {
        !self.rmsg.is_empty()
    }

    /// Hands up to `max` received bytes to `copy(offset_in_rbuf, len)` in order, one call per
    /// contiguous range. Unless `peek`, the bytes are consumed. Returns the byte count.
    pub fn consume(&mut self, max: usize, peek: bool, mut copy: impl FnMut(u32, u32)) -> usize {
        debug_assert_eq!(
            self.rmsg_bytes,
            self.rmsg.iter().map(|&(_, l)| l as u64).sum::<u64>()
        );
        // The oldest message holds all that is asked for (a small read of a larger or
        // coalesced message, or one message read whole): the loop below, without its setup.
        if max > 0
            && let Some(&(at, len)) = self.rmsg.front()
            && len as usize >= max
        {
            let take = max as u32;
            copy(at, take);
            if !peek {
                let (done, partial) = if take == len { (1, 0) } else { (0, take) };
                self.commit_read(done, partial, take, (at + take) % self.rbuf_cur);
            }
            return max;
        }
        let mut offset = self.rbuf_offset;
        let mut left = max;
        let mut msgs_done = 0;
        let mut head_partial = 0u32;
        for &(at, len) in self.rmsg.iter() {
            if left == 0 {
                break;
            }
            let take = (len as usize).min(left) as u32;
            if take > 0 {
                copy(at, take);
                offset = (at + take) % self.rbuf_cur;
            }
            left -= take as usize;
            if take == len {
                msgs_done += 1;
            } else {
                head_partial = take;
            }
        }
        let n = max - left;
        if !peek {
            self.commit_read(msgs_done, head_partial, n as u32, offset);
        }
        n
    }

    /// Takes `n` bytes read by [`Stream::consume`] off the received messages: the oldest
    /// `done` messages whole, then `partial` bytes of the next one; the ring's read offset
    /// moves to `offset` and the bytes become free space.
    #[inline]
    fn commit_read(&mut self, done: usize, partial: u32, n: u32, offset: u32) {
        for _ in 0..done {
            self.rmsg.pop_front();
        }
        if partial > 0
            && let Some(h) = self.rmsg.front_mut()
        {
            h.0 += partial;
            h.1 -= partial;
        }
        self.rseq_no = self.rseq_no.wrapping_add(done as u16);
        self.rmsg_bytes -= n as u64;
        self.rbuf_offset = offset;
        self.rbuf_bytes_avail += n;
    }

    /// Whether a window can be given: half the ring is free (or the ring just grew: its first
    /// window is fresh memory), and the peer's target SGL entry it would go into holds a window
    /// the peer filled (both halves of a ring are filled in turn, so this only ever waits
    /// right after the ring grew).
    #[inline]
    fn window_due(&self) -> bool {
        (self.rbuf_bytes_avail >= self.rbuf_cur / 2 || self.rbuf_grown_key.is_some())
            && self.granted.len() < wire::SGL_SIZE as usize
    }

    /// Whether we owe the peer a credit update (a window, or credits for half the receives).
    #[inline]
    fn credits_owed(&self) -> bool {
        self.window_due() || (self.rseq_no.wrapping_sub(self.rseq_comp) as i16) >= 0
    }

    /// Control slots a credit update takes (two on iWARP when a credit SGE goes with it).
    #[inline]
    fn credit_update_slots(&self) -> u32 {
        if self.cfg.msg_send { 2 } else { 1 }
    }

    /// Whether we owe the peer a credit update and can send one.
    #[inline]
    pub fn credit_update_due(&self) -> bool {
        self.credits_owed() && self.ctrl_avail(self.credit_update_slots()) && self.flags.connected
    }

    /// Windows we gave the peer that it has not filled yet (for tests).
    #[cfg(test)]
    pub(crate) fn granted_windows(&self) -> usize {
        self.granted.len()
    }

    /// Whether the receive ring should grow: the peer used up every window we gave it, or filled
    /// windows worth the full buffer (a stream whose reader keeps up). Then
    /// register the whole receive buffer and call [`Stream::on_rbuf_grown`] with its rkey.
    #[inline]
    pub fn rbuf_grow_wanted(&self) -> bool {
        self.rbuf_grow_wanted && self.rbuf_grown_key.is_none() && self.rbuf_cur < self.rbuf_cap
    }

    /// The whole receive buffer is registered under `rkey`: the ring takes its full size
    /// with the next window, which needs no byte read (see [`Stream::poll_credit_update`]).
    pub fn on_rbuf_grown(&mut self, rkey: u32) {
        self.rbuf_grown_key = Some(rkey);
        self.rbuf_grow_wanted = false;
    }

    /// Whether the receive ring has not grown yet (and may): completions must then be taken
    /// even while the application reads nothing, so that a peer that used up the small ring's
    /// windows gets the larger one's.
    pub fn recv_ring_may_grow(&self) -> bool {
        self.rbuf_cur < self.rbuf_cap
    }

    /// Registering the larger receive buffer failed: the ring keeps its size.
    pub fn rbuf_growth_failed(&mut self) {
        self.rbuf_cap = self.rbuf_cur;
        self.rbuf_grow_wanted = false;
    }

    /// Whether [`Stream::take_rbuf_retired`] would say true now (without taking it).
    #[inline]
    pub fn rbuf_retired(&self) -> bool {
        self.rbuf_old_key
            .is_some_and(|k| self.granted.iter().all(|g| g.key != k))
    }

    /// Whether the receive buffer's registration from before it grew can go: the peer filled
    /// every window given under it. True once.
    pub fn take_rbuf_retired(&mut self) -> bool {
        let retired = self.rbuf_retired();
        if retired {
            self.rbuf_old_key = None;
        }
        retired
    }

    /// Plans the next credit update, if one is due.
    pub fn poll_credit_update(&mut self) -> Option<CreditUpdate> {
        if !self.credit_update_due() {
            return None;
        }
        let slot = self.ctrl_seqno % CTRL_SLOTS;
        self.ctrl_seqno = self.ctrl_seqno.wrapping_add(1);
        self.rseq_comp = self.rseq_no.wrapping_add(self.cfg.rq_size / 2);
        let msg = Msg::Credits(self.rseq_no.wrapping_add(self.cfg.rq_size)).encode();
        if !self.window_due() {
            return Some(CreditUpdate { msg, sge: None });
        }
        if self.cfg.msg_send {
            self.ctrl_seqno = self.ctrl_seqno.wrapping_add(1);
        }
        let half = self.rbuf_cur / 2;
        let window = match self.rbuf_grown_key.take() {
            // The ring grows: the peer's next window is fresh memory, from the small ring's
            // end to the middle of the full one (the small ring is at most half of it), so it
            // needs no byte read. The small ring's bytes, unread or in a window, stay where
            // they are and are read first (each message has its offset). Then come the full
            // ring's halves: the second one is free at once, the first once everything before
            // its middle is read. The count of free bytes (read, not given again) becomes
            // that of the small ring plus the full ring's second half: it reaches a half for
            // the first half exactly when the reader reaches the middle.
            Some(key) => {
                let full_half = self.rbuf_cap / 2;
                let start = self.rbuf_cur;
                self.rbuf_grow_wanted = false;
                self.rbuf_old_key = Some(self.local.rbuf.key);
                self.local.rbuf.key = key;
                self.rbuf_bytes_avail += full_half;
                self.rbuf_free_offset = full_half;
                self.rbuf_cur = self.rbuf_cap;
                RemoteSge {
                    addr: self.local.rbuf.addr + start as u64,
                    key,
                    length: full_half - start,
                }
            }
            None => {
                self.rbuf_bytes_avail -= half;
                let start = self.rbuf_free_offset;
                self.rbuf_free_offset = (start + half) % self.rbuf_cur;
                RemoteSge {
                    addr: self.local.rbuf.addr + start as u64,
                    key: self.local.rbuf.key,
                    length: half,
                }
            }
        };
        self.granted.push_back(Granted {
            at: (window.addr - self.local.rbuf.addr) as u32,
            left: window.length,
            key: window.key,
        });
        let sge = SgeWrite {
            bytes: window.to_peer_bytes(self.peer_big_endian),
            remote_addr: self.remote_sgl.addr + self.remote_sge as u64 * wire::SGE_LEN as u64,
            rkey: self.remote_sgl.key,
            inline: self.cfg.sq_inline >= wire::SGE_LEN as u32,
            ctrl_slot_offset: self.cfg.sbuf_size + slot * wire::SGE_LEN as u32,
        };
        self.remote_sge = (self.remote_sge + 1) % self.remote_sgl.length;
        Some(CreditUpdate {
            msg,
            sge: Some(sge),
        })
    }
}

#[cfg(test)]
mod model;
mod sizes;
#[cfg(test)]
mod tests;
mod timers;

pub use sizes::{QueueSizes, RECV_SLACK};
use timers::Timers;
pub use timers::{Keepalive, LINGER, PERSIST_FIRST, PERSIST_MAX, Timeout};
