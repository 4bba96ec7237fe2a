//! Two simulated peers exchanging rsocket traffic through the in-memory RC wire
//! ([`crate::proto::memwire`]), each driven by the library's own posting code
//! ([`crate::proto::driver::Driver`]). Writes land in the peer's buffers by (rkey, address)
//! exactly as the NIC would place them, so a protocol bug that writes outside a granted window
//! fails the test; on iWARP a message that finds no receive posted fails it too.

use super::*;
use crate::proto::driver::Driver;
use crate::proto::memwire::{self, MemEnd};
use proptest::prelude::*;

pub(super) const RBUF_BASE: u64 = 0x10_0000_0000;
pub(super) const TSGL_BASE: u64 = 0x20_0000_0000;

/// One peer: its driver over one end of the wire, and its application's bytes.
pub(super) struct Peer {
    pub(super) d: Driver<MemEnd>,
    /// Application bytes to send, how many went, and what we received.
    pub(super) to_send: Vec<u8>,
    pub(super) sent: usize,
    pub(super) received: Vec<u8>,
    pub(super) eof: bool,
}

pub(super) fn cfg(
    sq: u16,
    rq: u16,
    inline: u32,
    rbuf: u32,
    sbuf: u32,
    msg_send: bool,
) -> StreamConfig {
    StreamConfig {
        sq_size: sq,
        rq_size: rq,
        sq_inline: inline,
        rbuf_size: rbuf,
        rbuf_start: rbuf,
        sbuf_size: sbuf,
        sbuf_start: sbuf,
        msg_send,
        recv_payload: if msg_send {
            wire::SEND_PAYLOAD_MAX as u32
        } else {
            0
        },
    }
}

/// Our buffers as the peer sees them, for the tests of the core alone.
pub(super) fn local(id: u32) -> LocalBuffers {
    LocalBuffers {
        target_sgl: RemoteSge {
            addr: TSGL_BASE,
            key: 0x100 + id,
            length: 0,
        },
        rbuf: RemoteSge {
            addr: RBUF_BASE,
            key: 0x200 + id,
            length: 0,
        },
        target_iomap_size: 0,
    }
}

/// Receives posted for a configuration, as the socket layer negotiates them.
fn rq_posted(c: StreamConfig) -> u32 {
    QueueSizes::negotiate(
        c.sq_size as u32,
        c.rq_size as u32,
        c.sq_inline,
        u32::MAX,
        c.msg_send,
    )
    .rq_posted
    .max(c.rq_size as u32)
}

/// Builds a connected pair exactly as connect/accept do: buffers registered and receives
/// posted, private data exchanged encoded, the acceptor started as accepted (on iWARP it
/// waits for the initiator to speak), and the initiator's first credit update posted.
pub(super) fn pair(ca: StreamConfig, cb: StreamConfig) -> (Peer, Peer) {
    pair_offering(ca, cb, 0)
}

/// [`pair`], the acceptor offering `iomap` entries of its target iomap.
fn pair_offering(ca: StreamConfig, cb: StreamConfig, iomap: u16) -> (Peer, Peer) {
    let mk = |id, c: StreamConfig| {
        let end = MemEnd::new(id, c.msg_send, c.sq_inline);
        Peer {
            d: Driver::new(end, c, rq_posted(c), if id == 2 { iomap } else { 0 }).unwrap(),
            to_send: Vec::new(),
            sent: 0,
            received: Vec::new(),
            eof: false,
        }
    };
    let (mut a, mut b) = (mk(1, ca), mk(2, cb));
    let req = ConnData::decode(&a.d.conn_data()).unwrap();
    let rep = ConnData::decode(&b.d.conn_data()).unwrap();
    b.d.start(&req, true);
    a.d.start(&rep, false);
    a.poll();
    (a, b)
}

/// A pair past the handshake: the first credit updates delivered both ways and completed.
fn connected(ca: StreamConfig, cb: StreamConfig) -> (Peer, Peer) {
    let (mut a, mut b) = pair(ca, cb);
    deliver_all(&mut a, &mut b);
    deliver_all(&mut b, &mut a);
    assert!(a.d.t.uncompleted() == 0 && b.d.t.uncompleted() == 0);
    (a, b)
}

pub(super) struct Rng(pub(super) u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

impl Peer {
    fn s(&mut self) -> &mut Stream {
        &mut self.d.core
    }

    /// Takes the completions (and what the peer placed), as every call of the socket does.
    fn poll(&mut self) -> bool {
        self.d.progress(|_, _| {}).unwrap()
    }

    fn tsgl_mem(&self) -> [RemoteSge; 2] {
        let m = &self.d.t.region(self.d.bufs.tsgl)[..32];
        [
            RemoteSge::from_ne_bytes(m[0..16].try_into().unwrap()),
            RemoteSge::from_ne_bytes(m[16..32].try_into().unwrap()),
        ]
    }

    /// Data writes posted so far.
    fn data_writes(&self) -> usize {
        self.d.t.data_writes()
    }

    /// Polls, then sends what the credits allow in writes of at most `seg` bytes each
    /// (0: credit updates only).
    fn pump(&mut self, seg: u32) {
        self.poll();
        while seg > 0 && self.sent < self.to_send.len() {
            let n = (self.to_send.len() - self.sent).min(seg as usize);
            let mut olen = seg;
            let took = self
                .d
                .send_some(&self.to_send[self.sent..self.sent + n], &mut olen, false)
                .unwrap();
            if took == 0 {
                break;
            }
            self.sent += took;
        }
    }

    /// Sends application messages of the given sizes through the coalescing planner, as the
    /// socket's send does; returns how many data writes went on the wire.
    fn send_coalesced(&mut self, sizes: &mut VecDeque<usize>, msg_off: &mut usize) -> usize {
        let before = self.data_writes();
        self.poll();
        while let Some(&n) = sizes.front() {
            let want = n - *msg_off;
            let mut olen = OLAP_START_SIZE;
            let took = self
                .d
                .send_some(&self.to_send[self.sent..self.sent + want], &mut olen, true)
                .unwrap();
            self.sent += took;
            *msg_off += took;
            if *msg_off < n {
                break;
            }
            sizes.pop_front();
            *msg_off = 0;
        }
        self.data_writes() - before
    }

    /// Reads up to `max` bytes as the socket's receive does (poll, copy out, credits).
    fn read(&mut self, max: usize) {
        self.poll();
        let mut out = vec![0u8; max];
        let n = self.d.recv_some(&mut out, false);
        self.d.send_credits().unwrap();
        if n == 0 && !self.d.core.flags().readable && !self.d.core.has_data() {
            self.eof = true;
        }
        self.received.extend_from_slice(&out[..n]);
    }
}

/// Moves `from`'s next send across (read, placed, completed at the sender); neither side polls.
fn deliver_one(from: &mut Peer, to: &mut Peer) -> bool {
    from.d.t.nic_read();
    let placed = from.d.t.place_next(&mut to.d.t);
    from.d.t.complete_next();
    placed
}

/// Delivers everything `from` posted to `to`, then both take their completions.
fn deliver_all(from: &mut Peer, to: &mut Peer) {
    MemEnd::deliver_all(&mut from.d.t, &mut to.d.t);
    to.poll();
    from.poll();
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs both directions until all data arrived, in random order across the two directions
/// (each direction stays FIFO, as on an RC QP), with random reads and polls.
fn run(ca: StreamConfig, cb: StreamConfig, na: usize, nb: usize, seed: u64) {
    let (mut a, mut b) = pair(ca, cb);
    a.to_send = pattern(na, 1);
    b.to_send = pattern(nb, 2);
    let mut rng = Rng(seed | 1);
    for step in 0..2_000_000 {
        let seg = [64u32, 2048, 4096, 65536][rng.below(4) as usize];
        match rng.below(8) {
            0 => a.pump(seg),
            1 => b.pump(seg),
            2 => {
                deliver_one(&mut a, &mut b);
            }
            3 => {
                deliver_one(&mut b, &mut a);
            }
            4 => a.read(rng.below(70_000) as usize + 1),
            5 => b.read(rng.below(70_000) as usize + 1),
            6 => {
                a.poll();
            }
            _ => {
                b.poll();
            }
        }
        assert!(a.d.core.error().is_none() && b.d.core.error().is_none());
        if a.received.len() == nb
            && b.received.len() == na
            && a.d.t.uncompleted() == 0
            && b.d.t.uncompleted() == 0
        {
            assert_eq!(a.received, b.to_send, "B->A stream differs");
            assert_eq!(b.received, a.to_send, "A->B stream differs");
            return;
        }
        assert!(
            step < 1_999_999,
            "no progress: a sent {} b got {}",
            a.sent,
            b.received.len()
        );
    }
}

#[test]
fn transfers_both_ways_with_defaults() {
    let c = cfg(384, 384, 64, 128 * 1024, 128 * 1024, false);
    run(c, c, 1 << 20, 300_000, 7);
}

#[test]
fn transfers_on_iwarp_mode_and_tiny_queues() {
    let c = cfg(16, 16, 4, 8192, 4096, true);
    run(c, c, 200_000, 123_457, 99);
}

/// iWARP without MPA peer-to-peer mode: the accepting side posts nothing (no credit update, no
/// data, no control message, no probe) until the initiator's first message arrived; then
/// everything flows. A connection lost while held owes nothing (shutdown does not wait).
#[test]
fn iwarp_acceptor_waits_for_the_initiator_to_speak_first() {
    let c = cfg(16, 16, 4, 8192, 4096, true);
    let (mut a, mut b) = pair(c, c);
    a.to_send = pattern(20_000, 5);
    b.to_send = pattern(30_000, 6);
    b.pump(1024);
    assert_eq!(b.d.t.uncompleted(), 0, "the acceptor spoke first");
    assert!(b.s().sends_held() && !b.s().can_send() && !b.s().can_send_ctrl());
    assert_eq!(b.s().post_ctrl(Ctrl::Shutdown), None);
    assert_eq!(b.s().post_keepalive(), None);
    // The initiator's first message (its credit update, posted as `establish` does) releases
    // the hold.
    let first = a.d.t.in_flight().next().expect("initiator sends first");
    assert!(matches!(
        Msg::decode(first.wr_id as u32),
        Ok(Msg::Credits(_))
    ));
    deliver_all(&mut a, &mut b);
    assert!(!b.s().sends_held());
    for _ in 0..10_000 {
        a.pump(1024);
        b.pump(1024);
        deliver_all(&mut a, &mut b);
        deliver_all(&mut b, &mut a);
        a.read(1 << 20);
        b.read(1 << 20);
        if a.received.len() == 30_000 && b.received.len() == 20_000 {
            break;
        }
    }
    assert!(a.received == b.to_send && b.received == a.to_send);

    let (_, mut b) = pair(c, c);
    assert!(b.s().sends_held());
    b.s().on_connection_lost();
    assert!(!b.s().sends_held() && b.s().can_send_ctrl() && b.s().all_sends_done());
}

/// riomap announcements go into the peer's target iomap (after its two SGL entries), use a
/// credit each, and never beyond the entries it offered; direct writes and reads take a send
/// queue entry (and ring bytes only when copied) and give them back on completion.
#[test]
fn iomap_announcements_and_direct_operations_account_resources() {
    use crate::proto::iomap::{PERM_READ, PERM_WRITE};
    let c = cfg(16, 4, 64, 8192, 8192, false);
    let (la, lb) = (local(1), local(2));
    let lb = LocalBuffers {
        target_iomap_size: 3,
        ..lb
    };
    let rep = ConnData::decode(&Stream::local_conn_data(&c, &lb).encode()).unwrap();
    let mut a = Stream::new(c, la, &rep);
    assert!(a.peer_is_rsocket_rs());
    assert_eq!(a.peer_iomap_size(), 3);
    assert_eq!(
        a.plan_iomap_announce(3, PERM_WRITE),
        None,
        "index not offered"
    );
    let w = a.plan_iomap_announce(2, PERM_READ | PERM_WRITE).unwrap();
    assert_eq!(w.remote_addr, TSGL_BASE + 32 + 2 * 24);
    assert_eq!(w.rkey, lb.target_sgl.key);
    assert_eq!(
        Msg::decode(w.msg),
        Ok(Msg::IomapSgl(2 | 3 << crate::proto::iomap::PERM_SHIFT))
    );
    // Four credits: three more announcements, then none until credits return.
    for i in 0..3 {
        assert!(a.plan_iomap_announce(i, PERM_WRITE).is_some());
    }
    assert_eq!(a.plan_iomap_announce(0, PERM_WRITE), None);
    assert!(!a.can_send());
    a.on_recv(Msg::Credits(8).encode()).unwrap();
    assert!(a.plan_iomap_announce(0, 0).is_some());
    for _ in 0..5 {
        a.on_send_completion(Msg::IomapSgl(0).encode() as u64, true);
    }
    assert!(a.all_sends_done());

    // Direct operations: copied writes use the ring, zero-copy ones and reads do not.
    let before = a.sbuf_bytes_avail;
    let w = a.plan_direct(DirectKind::Write, 5000, false).unwrap();
    assert_eq!((w.len, w.inline, w.ring_segs), (5000, false, 1));
    assert_eq!(a.sbuf_bytes_avail, before - 5000);
    let z = a.plan_direct(DirectKind::Write, 1 << 20, true).unwrap();
    assert_eq!(z.len, MAX_TRANSFER);
    assert_eq!(z.wr_id & WR_ID_NO_RING, WR_ID_NO_RING);
    let r = a.plan_direct(DirectKind::Read, 100, true).unwrap();
    assert_eq!(a.sbuf_bytes_avail, before - 5000);
    let small = a.plan_direct(DirectKind::Write, 10, false).unwrap();
    assert!(small.inline);
    for d in [w, z, r, small] {
        a.on_send_completion(d.wr_id, true);
    }
    assert_eq!(a.sbuf_bytes_avail, before);
    assert!(a.all_sends_done());
    // With the ring nearly full, a small (inline-sized) write waits instead of counting more
    // bytes out than the ring has (found as corrupted riowrite data on siw).
    let mut held = Vec::new();
    while let Some(d) = a.plan_direct(DirectKind::Write, 8192, false) {
        held.push(d);
    }
    assert!(a.sbuf_bytes_avail < 64);
    let left = a.sbuf_bytes_avail;
    if let Some(d) = a.plan_direct(DirectKind::Write, 64, false) {
        assert!(d.len <= left);
        held.push(d);
    }
    assert!(a.sbuf_bytes_avail <= c.sbuf_size);
    for d in held {
        a.on_send_completion(d.wr_id, true);
    }
    assert_eq!(a.sbuf_bytes_avail, before);
    // A librdmacm peer (no extension flag) gets the bare index.
    let plain = ConnData {
        flags: wire::CONN_FLAG_IOMAP,
        ..rep
    };
    let mut b = Stream::new(c, la, &plain);
    assert!(!b.peer_is_rsocket_rs());
    let w = b.plan_iomap_announce(1, PERM_READ | PERM_WRITE).unwrap();
    assert_eq!(Msg::decode(w.msg), Ok(Msg::IomapSgl(1)));
}

#[test]
fn credit_starvation_stalls_without_overrun() {
    let c = cfg(64, 16, 64, 16384, 65536, false);
    let (mut a, mut b) = pair(c, c);
    a.to_send = pattern(1 << 20, 3);
    // B never reads: A must stop once the windows and credits are used up.
    for _ in 0..1000 {
        a.pump(512);
        deliver_all(&mut a, &mut b);
    }
    assert!(!a.s().can_send());
    assert!(
        a.sent <= 16384,
        "sent {} bytes into a 16 KiB receive buffer",
        a.sent
    );
    assert!(b.s().readable_bytes() == a.sent);
    // Messages are at most the credits granted.
    assert!(b.s().rmsg.len() <= 16);
    // Once B reads and returns credits, the rest flows.
    for _ in 0..100_000 {
        b.read(100_000);
        deliver_all(&mut b, &mut a);
        a.pump(4096);
        deliver_all(&mut a, &mut b);
        if b.received.len() == 1 << 20 {
            break;
        }
    }
    assert_eq!(b.received, a.to_send);
}

/// A data message's receive is posted again off the path from the message to the caller
/// (when a look finds nothing, or before a grant), never after a grant that counts on it: the
/// peer, granted all its credits back while receives were still owed, finds one for each
/// message it may send.
#[test]
fn receives_owed_to_the_queue_go_back_before_the_credits_that_count_on_them() {
    for msg_send in [false, true] {
        let c = cfg(64, 16, 64, 16384, 65536, msg_send);
        let (mut a, mut b) = connected(c, c);
        let posted = b.d.seen.owed_recvs_posted;
        a.to_send = pattern(64 * 40, 9);
        // Ten messages: fewer than RECVS_OWED_MAX, more than half the receives.
        let first = 10;
        for _ in 0..first {
            let mut olen = 64;
            let took =
                a.d.send_some(&a.to_send[a.sent..a.sent + 64], &mut olen, false);
            a.sent += took.unwrap();
        }
        assert_eq!(a.sent, first * 64);
        // B takes them all in one look that finds them: their receives are owed.
        MemEnd::deliver_all(&mut a.d.t, &mut b.d.t);
        assert!(b.poll());
        assert_eq!(b.d.seen.owed_recvs_posted, posted, "none posted yet");
        // B reads them and owes credits for half its receives: the grant goes out, and the
        // receives it counts on before it.
        let mut out = vec![0u8; 64 * 40];
        let n = b.d.recv_some(&mut out, false);
        assert_eq!(n, first * 64);
        b.d.send_credits().unwrap();
        assert_eq!(
            b.d.seen.owed_recvs_posted - posted,
            first as u64,
            "msg_send {msg_send}"
        );
        // A uses every credit; B does not look until all arrived.
        MemEnd::deliver_all(&mut b.d.t, &mut a.d.t);
        a.pump(64);
        MemEnd::deliver_all(&mut a.d.t, &mut b.d.t);
        assert_eq!(b.d.t.data_found_no_recv, 0, "msg_send {msg_send}");
        b.received.extend_from_slice(&out[..n]);
        for _ in 0..100 {
            b.read(64 * 40);
            deliver_all(&mut b, &mut a);
            a.pump(64);
            deliver_all(&mut a, &mut b);
        }
        assert_eq!(b.received, a.to_send, "msg_send {msg_send}");
        assert_eq!(b.d.t.data_found_no_recv, 0, "msg_send {msg_send}");
    }
}

#[test]
fn on_iwarp_data_leaves_credits_for_control_messages() {
    // The peer has 16 receives and grants 16 credits. Over RoCE data may take them all (a
    // control message finding no receive is retried); over iWARP it would end the connection,
    // so a quarter (at most twice CTRL_SLOTS) stay free for our credit updates.
    // With more credits, twice CTRL_SLOTS: our control slots come back before the peer polls.
    for (rq, msg_send, data_msgs) in [
        (16, false, 16),
        (16, true, 12),
        (48, false, 48),
        (48, true, 40),
    ] {
        let c = cfg(64, rq, 64, 65536, 65536, msg_send);
        let (mut a, mut b) = pair(c, c);
        a.to_send = pattern(1 << 16, 4);
        for _ in 0..100 {
            a.pump(64);
            deliver_all(&mut a, &mut b);
        }
        assert!(!a.s().can_send());
        assert_eq!(b.s().rmsg.len(), data_msgs, "rq {rq} msg_send {msg_send}");
        assert!(a.s().can_send_ctrl(), "a control message may still go");
    }
}

#[test]
fn a_credit_update_waiting_for_a_control_slot_waits_for_our_sends() {
    // A receiver whose control sends have not completed yet has no control slot for the
    // credit update it owes: until one of its sends completes, the peer gets no credits and
    // sends nothing more. A waiter for data must then be woken by our sends' completions.
    for msg_send in [false, true] {
        let c = cfg(64, 16, 64, 16384, 65536, msg_send);
        let (mut a, mut b) = connected(c, c);
        assert!(!b.s().waits_for_sends(), "a quiet connection owes nothing");
        a.to_send = pattern(1 << 20, 5);
        let mut stuck = false;
        for _ in 0..1000 {
            a.pump(512);
            deliver_all(&mut a, &mut b);
            b.read(100_000);
            // B's credit updates reach A, but B sees none of their completions.
            while b.d.t.nic_read() {}
            while b.d.t.place_next(&mut a.d.t) {}
            a.poll();
            if b.s().waits_for_sends() {
                stuck = true;
                break;
            }
        }
        assert!(stuck, "msg_send {msg_send}: control slots never ran out");
        assert!(!b.s().credit_update_due(), "no slot, so not due");
        assert!(
            !b.s().has_pending(),
            "nothing gathered: only the update waits"
        );
        // The completions come: the update leaves and nothing is owed any more.
        while b.d.t.complete_next() {}
        b.read(100_000);
        assert!(!b.s().waits_for_sends(), "msg_send {msg_send}");
        let sent = a.sent;
        deliver_all(&mut b, &mut a);
        a.pump(512);
        assert!(a.sent > sent, "msg_send {msg_send}: the peer sends again");
    }
}

#[test]
fn lost_credit_update_never_causes_overrun() {
    let c = cfg(64, 16, 64, 16384, 65536, false);
    let (mut a, mut b) = pair(c, c);
    a.to_send = pattern(100_000, 4);
    for i in 0..10_000 {
        a.pump(1000);
        deliver_all(&mut a, &mut b);
        b.read(3000);
        // B sends only credit updates: every other round they are lost (a peer that "forgets"
        // them).
        loop {
            let moved = if i % 2 == 0 {
                deliver_one(&mut b, &mut a)
            } else {
                b.d.t.lose_next()
            };
            if !moved {
                break;
            }
        }
        b.poll();
    }
    // Whatever arrived is a correct prefix: no write ever landed outside a granted window.
    assert_eq!(&b.received[..], &a.to_send[..b.received.len()]);
}

#[test]
fn shutdown_interleaved_with_data_gives_eof_after_data() {
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, mut b) = pair(c, c);
    a.to_send = pattern(5000, 5);
    a.pump(65536);
    let ctrl = a.s().shutdown(false, true).unwrap();
    assert_eq!(ctrl, Ctrl::Shutdown);
    let m = a.s().post_ctrl(ctrl).unwrap();
    a.d.post_msg(m).unwrap();
    assert!(a.s().plan_write(100).is_none(), "no data after SHUT_WR");
    deliver_all(&mut a, &mut b);
    assert!(!b.s().flags().readable);
    assert!(
        b.s().flags().writable,
        "half-close keeps the other direction"
    );
    b.read(100_000);
    assert_eq!(b.received, a.to_send);
    assert!(!b.eof);
    b.read(100_000);
    assert!(b.eof);
    deliver_all(&mut b, &mut a);
    assert!(a.s().all_sends_done());
}

#[test]
fn crossing_shutdowns_wait_for_our_own_to_leave() {
    // Both ends SHUT_WR at once: the peer's SHUTDOWN arrives while ours, and the data before
    // it, are still in flight. The connection is then closed both ways, but the sends are not
    // done: a disconnect now would flush them.
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, mut b) = pair(c, c);
    a.to_send = pattern(3000, 7);
    a.pump(65536);
    let ours = a.s().shutdown(false, true).unwrap();
    let m = a.s().post_ctrl(ours).unwrap();
    let theirs = b.s().shutdown(false, true).unwrap();
    let theirs = b.s().post_ctrl(theirs).unwrap();
    a.s().on_recv(theirs).unwrap();
    assert!(!a.s().flags().connected, "closed both ways");
    assert!(
        !a.s().all_sends_done(),
        "our data and SHUTDOWN are still in flight"
    );
    deliver_all(&mut a, &mut b);
    assert!(!a.s().all_sends_done(), "our SHUTDOWN is still in flight");
    b.s().on_recv(m).unwrap();
    a.s().on_send_completion(m as u64, true);
    assert!(a.s().all_sends_done());
    b.read(100_000);
    assert_eq!(b.received, a.to_send);
    b.read(100_000);
    assert!(b.eof, "the peer reads the end of the stream, not a reset");
    assert_eq!(b.s().error(), None);
}

#[test]
fn a_shutdown_waiting_for_a_control_slot_is_still_sent_when_the_peers_crosses_it() {
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, mut b) = connected(c, c);
    let mut slots = Vec::new();
    while let Some(id) = a.s().post_keepalive() {
        slots.push(id);
    }
    let ours = a.s().shutdown(false, true).unwrap();
    assert!(!a.s().can_send_ctrl(), "every control slot is taken");
    let theirs = b.s().shutdown(false, true).unwrap();
    let theirs = b.s().post_ctrl(theirs).unwrap();
    a.s().on_recv(theirs).unwrap();
    assert!(!a.s().flags().connected, "closed both ways");
    assert!(
        !a.s().can_send_ctrl(),
        "our SHUTDOWN is owed: wait for a slot rather than give up on it"
    );
    a.s().on_send_completion(slots[0], true);
    assert!(a.s().can_send_ctrl());
    let m = a
        .s()
        .post_ctrl(ours)
        .expect("the owed SHUTDOWN is posted though the peer's arrived");
    assert!(a.s().post_ctrl(ours).is_none(), "owed once");
    assert!(a.s().can_send_ctrl(), "nothing more owed");
    b.s().on_recv(m).unwrap();
    b.read(100);
    assert!(b.eof, "the peer reads the end of the stream");
    assert_eq!(b.s().error(), None);
    for &id in &slots[1..] {
        a.s().on_send_completion(id, true);
    }
    assert!(!a.s().all_sends_done(), "our SHUTDOWN is in flight");
    a.s().on_send_completion(m as u64, true);
    assert!(a.s().all_sends_done());
}

#[test]
fn a_peer_that_disconnected_or_vanished_is_not_waited_for() {
    let c = cfg(64, 64, 64, 65536, 65536, false);
    for vanished in [false, true] {
        let (mut a, mut b) = pair(c, c);
        a.to_send = pattern(3000, 8);
        a.pump(65536);
        assert!(a.d.t.uncompleted() > 0 && !a.s().all_sends_done());
        if vanished {
            a.s().on_connection_lost();
        } else {
            let m = b.s().shutdown(true, true).unwrap();
            let m = b.s().post_ctrl(m).unwrap();
            a.s().on_recv(m).unwrap();
        }
        assert!(
            a.s().all_sends_done(),
            "nothing to wait for (vanished {vanished})"
        );
    }
}

#[test]
fn disconnect_marks_both_directions_closed() {
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, mut b) = pair(c, c);
    let ctrl = a.s().shutdown(true, true).unwrap();
    let m = a.s().post_ctrl(ctrl).unwrap();
    assert_eq!(m, 0xe000_0000, "the trace's disconnect immediate");
    b.s().on_recv(m).unwrap();
    assert!(!b.s().flags().connected);
    assert!(
        b.s().peer_done(),
        "the receiver knows the peer sends nothing more"
    );
    a.s().on_send_completion(m as u64, true);
    assert!(!a.s().flags().connected);
    assert!(
        !a.s().peer_done(),
        "our own disconnect says nothing of the peer"
    );
    assert!(b.s().poll_credit_update().is_none());
}

#[test]
fn first_credit_update_matches_trace() {
    // Frames 4/6: 0x80000180 writing 16 bytes at target_sgl + 16 (second half), posted by the
    // initiator once connected.
    let c = cfg(384, 384, 64, 1 << 20, 1 << 20, false);
    let (mut a, b) = pair(c, c);
    assert_eq!(a.d.t.in_flight().count(), 1, "one message");
    a.d.t.nic_read();
    let wr = a.d.t.in_flight().next().unwrap();
    assert_eq!(wr.wr_id, 0x8000_0180);
    let tsgl = b.d.local().target_sgl;
    assert_eq!(
        wr.op,
        memwire::Op::Write((tsgl.addr + 16, tsgl.key), Some(0x8000_0180))
    );
    let bytes: [u8; 16] = wr.data.as_deref().unwrap().try_into().unwrap();
    let sge = RemoteSge::from_ne_bytes(&bytes);
    assert_eq!(sge.addr, a.d.local().rbuf.addr + (1 << 19));
    assert_eq!(sge.length, 1 << 19);
    assert!(a.s().poll_credit_update().is_none(), "nothing more is owed");
}

#[test]
fn malformed_messages_break_the_connection() {
    let c = cfg(64, 16, 64, 16384, 16384, false);
    let (mut a, _b) = pair(c, c);
    assert!(a.s().on_recv(0x2000_0000).is_err());
    assert!(a.s().error().is_some());
    assert!(!a.s().flags().connected);

    let (mut a, _b) = pair(c, c);
    // Both halves were granted (the first at connect, the second with the first credit
    // update): more data than that breaks the connection.
    a.s().on_recv(Msg::Data(8000).encode()).unwrap();
    a.s().on_recv(Msg::Data(192).encode()).unwrap();
    a.s().on_recv(Msg::Data(8192).encode()).unwrap();
    assert!(a.s().on_recv(Msg::Data(1).encode()).is_err());

    // A write never spans two windows: one that would is not where the peer may write.
    let (mut a, _b) = pair(c, c);
    a.s().on_recv(Msg::Data(8000).encode()).unwrap();
    assert!(a.s().on_recv(Msg::Data(193).encode()).is_err());
}

#[test]
fn credits_beyond_the_peers_receive_queue_break_the_connection() {
    let c = cfg(64, 16, 64, 16384, 16384, false);
    let sending = |c| {
        let (mut a, mut b) = connected(c, c);
        b.to_send = pattern(3000, 2);
        b.pump(1000);
        deliver_all(&mut b, &mut a);
        let sent = b.s().sseq_no;
        (b, sent)
    };
    // What the peer may grant: everything it read of ours plus its receive queue.
    let (mut b, sent) = sending(c);
    assert!(sent > 0);
    let limit = |n: i32| Msg::Credits(sent.wrapping_add_signed(n as i16)).encode();
    b.s().on_recv(limit(16)).unwrap();
    b.s().on_recv(limit(0)).unwrap();
    for (n, what) in [(17, "one beyond its queue"), (-1, "behind what we sent")] {
        let (mut b, sent) = sending(c);
        let m = Msg::Credits(sent.wrapping_add_signed(n as i16)).encode();
        assert!(b.s().on_recv(m).is_err(), "a credit limit {what}");
        assert!(!b.s().flags().connected, "{what}");
    }
}

#[test]
fn stale_or_unsolicited_sgl_entries_are_ignored() {
    let c = cfg(64, 16, 64, 16384, 16384, false);
    let (mut a, _b) = pair(c, c);
    let before = a.s().target_sgl;
    // The peer scribbles over entry 0 while we still use it: ignored.
    a.s().refresh_target_sgl([
        RemoteSge {
            addr: 1,
            key: 2,
            length: 3,
        },
        RemoteSge::default(),
    ]);
    assert_eq!(a.s().target_sgl, before);
}

/// A gathered (pending) write that uses up a window: the peer's old entry stays in our target
/// SGL's memory until that write is posted (the entry is zeroed just before its post). A credit
/// update processed in between must not take the old entry again, or later data lands in a
/// half of the peer's buffer it has not read yet.
#[test]
fn a_window_used_up_by_a_gathered_write_is_not_taken_again_before_it_leaves() {
    let c = cfg(64, 64, 64, 8192, 65536, false);
    // B's first credit update puts its second half (4096 B) into A's target SGL entry 1.
    let (mut a, _b) = connected(c, c);
    assert_eq!(a.tsgl_mem()[1].length, 4096);
    a.to_send = pattern(8192, 3);
    let mut sizes: VecDeque<usize> = [4096, 4000, 96].into_iter().collect();
    a.send_coalesced(&mut sizes, &mut 0);
    assert!(
        a.s().has_pending(),
        "the last 96 bytes wait behind the writes in flight"
    );
    assert_eq!(
        a.s().target_sgl[1].length,
        0,
        "the pending write used up entry 1"
    );
    // A credit update (no new window) arrives before the pending write leaves.
    a.s().on_recv(Msg::Credits(64).encode()).unwrap();
    let mem = a.tsgl_mem();
    a.s().refresh_target_sgl(mem);
    let e1 = a.s().target_sgl[1];
    assert_eq!(e1.length, 0, "the stale entry 1 was taken again: {e1:?}");
    assert!(!a.s().can_send());
}

#[test]
fn failed_completion_is_a_transport_error() {
    let c = cfg(64, 16, 64, 16384, 16384, false);
    let (mut a, _b) = pair(c, c);
    let w = a.s().plan_write(10).unwrap();
    a.s().on_send_completion(w.msg as u64, false);
    assert_eq!(a.s().error(), Some(&StreamError::Transport));
    assert!(!a.s().can_send());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn random_sizes_and_interleavings(
        seed in any::<u64>(),
        na in 0usize..300_000,
        nb in 0usize..300_000,
        rq in 16u16..200,
        sq in 16u16..200,
        rbuf_kb in 4u32..256,
        sbuf_kb in 4u32..256,
        inline in prop_oneof![Just(0u32), Just(4), Just(64), Just(256)],
        msg_send in any::<bool>(),
    ) {
        let inline = if msg_send { inline.max(4) } else { inline };
        let c = cfg(sq, rq, inline, rbuf_kb * 1024, sbuf_kb * 1024, msg_send);
        run(c, c, na, nb, seed);
    }
}

#[test]
fn data_completed_before_a_noticed_disconnect_is_still_delivered() {
    // The CM's DISCONNECTED event can be handled before the CQ is drained: the data that
    // completed first must still be readable before end of stream.
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, mut b) = pair(c, c);
    a.to_send = pattern(3000, 6);
    a.pump(65536);
    b.s().set_disconnected();
    MemEnd::deliver_all(&mut a.d.t, &mut b.d.t);
    b.read(100_000);
    assert_eq!(b.received, a.to_send);
    b.read(100_000);
    assert!(b.eof);
}

#[test]
fn keepalive_uses_a_control_slot_and_a_lost_probe_is_a_timeout() {
    let c = cfg(64, 16, 64, 16384, 16384, false);
    let (mut a, _b) = connected(c, c);
    let mut ids = Vec::new();
    while let Some(id) = a.s().post_keepalive() {
        ids.push(id);
    }
    assert_eq!(
        ids.len(),
        CTRL_SLOTS as usize,
        "probes are bounded by the control slots"
    );
    assert!(!a.s().can_send_ctrl());
    for &id in &ids[1..] {
        a.s().on_send_completion(id, true);
    }
    assert!(a.s().flags().connected);
    assert!(!a.s().all_sends_done());
    a.s().on_send_completion(ids[0], false);
    assert_eq!(a.s().error(), Some(&StreamError::KeepaliveTimeout));
    assert!(!a.s().flags().connected);
}

#[test]
fn losing_the_connection_without_goodbye_is_a_reset() {
    let c = cfg(64, 16, 64, 16384, 16384, false);
    let (mut a, mut b) = pair(c, c);
    a.s().on_connection_lost();
    assert_eq!(a.s().error(), Some(&StreamError::Reset));
    // After an orderly DISCONNECT from the peer, losing the QP is just the end.
    b.s().on_recv(Msg::Ctrl(Ctrl::Disconnect).encode()).unwrap();
    b.s().on_connection_lost();
    assert_eq!(b.s().error(), None);
}

#[test]
fn a_post_the_device_refuses_breaks_the_connection_as_a_reset() {
    for iwarp in [false, true] {
        let c = cfg(64, 16, 64, 16384, 16384, iwarp);
        let (mut a, mut b) = connected(c, c);
        a.d.t.refuse_posts = true;
        let mut olen = OLAP_START_SIZE;
        let e = a.d.send_some(&[7u8; 1000], &mut olen, false).unwrap_err();
        // The caller sees a reset (not the device's ENOTCONN), and so does every later call.
        let e = crate::error::Error::from(e);
        assert!(matches!(e, crate::error::Error::ConnectionReset), "{e:?}");
        assert_eq!(a.s().error(), Some(&StreamError::Transport));
        let f = a.s().flags();
        assert!(!f.writable && !f.readable && !f.connected);
        // Nothing half-posted reaches the peer.
        deliver_all(&mut a, &mut b);
        b.poll();
        assert!(!b.d.core.has_data());
    }
}

#[test]
fn a_lone_message_leaves_at_once_and_later_small_ones_gather_into_one_write() {
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, mut b) = connected(c, c);
    a.to_send = pattern(100 * 64, 9);
    let mut sizes: VecDeque<usize> = std::iter::repeat_n(64, 100).collect();
    // The first message finds nothing in flight: posted at once. The other 99 are gathered.
    assert_eq!(a.send_coalesced(&mut sizes, &mut 0), 1);
    assert!(sizes.is_empty(), "all 100 messages accepted");
    assert_eq!(a.d.t.data_writes, [64]);
    assert!(
        !a.s().should_flush(),
        "still waiting for the write in flight"
    );
    deliver_one(&mut a, &mut b);
    // Its completion lets the gathered bytes go, as one write.
    a.poll();
    assert_eq!(
        a.d.t.data_writes,
        [64, 99 * 64],
        "99 sends left as one RDMA write"
    );
    deliver_all(&mut a, &mut b);
    b.read(1 << 20);
    assert_eq!(b.received, a.to_send);
    // Idle again: the next message is not delayed.
    a.to_send.extend(pattern(10, 1));
    let mut sizes: VecDeque<usize> = [10].into();
    assert_eq!(a.send_coalesced(&mut sizes, &mut 0), 1);
    assert_eq!(a.d.t.data_writes.last(), Some(&10));
}

#[test]
fn large_sends_are_not_held_back_behind_a_pending_write() {
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, _b) = pair(c, c);
    a.to_send = pattern(64 + 64 + 5000, 3);
    let mut sizes: VecDeque<usize> = [64, 64, 5000].into();
    // 64 posted, 64 pending, then the 5000-byte send flushes the pending write first (order)
    // and goes out itself.
    let writes = a.send_coalesced(&mut sizes, &mut 0);
    assert!(writes >= 3);
    let lens = &a.d.t.data_writes;
    assert_eq!(lens[..2], [64, 64]);
    assert_eq!(lens[2..].iter().sum::<usize>(), 5000);
}

#[test]
fn the_rest_of_one_send_leaves_at_once_not_with_the_next_flush() {
    let c = cfg(64, 64, 64, 65536, 65536, false);
    let (mut a, mut b) = connected(c, c);
    // 3000 bytes: a first write of OLAP_START_SIZE, then the rest of the same message, which
    // is smaller than that and finds the first in flight: it still leaves now, as its own
    // write (the peer waits for the whole message; nothing would come to gather with it).
    a.to_send = pattern(3000, 5);
    let mut sizes: VecDeque<usize> = [3000].into();
    assert_eq!(a.send_coalesced(&mut sizes, &mut 0), 2);
    assert_eq!(
        a.d.t.data_writes,
        [OLAP_START_SIZE as usize, 3000 - OLAP_START_SIZE as usize]
    );
    assert!(!a.s().has_pending(), "nothing left for a flush");
    // A small message that follows while both are in flight still gathers.
    a.to_send.extend(pattern(64, 6));
    let mut sizes: VecDeque<usize> = [64].into();
    assert_eq!(a.send_coalesced(&mut sizes, &mut 0), 0);
    assert!(a.s().has_pending());
    deliver_all(&mut a, &mut b);
    a.poll();
    deliver_all(&mut a, &mut b);
    b.read(1 << 20);
    assert_eq!(b.received, a.to_send);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    /// Coalescing keeps the byte stream intact under random small message sizes, window sizes
    /// and delivery order, and never puts more writes on the wire than messages.
    #[test]
    fn coalesced_stream_is_intact(
        seed in any::<u64>(),
        sizes in proptest::collection::vec(1usize..2048, 1..400),
        rbuf_kb in 4u32..64,
        sbuf_kb in 4u32..64,
        msg_send in any::<bool>(),
    ) {
        let c = cfg(32, 16, if msg_send { 4 } else { 64 }, rbuf_kb * 1024, sbuf_kb * 1024, msg_send);
        let (mut a, mut b) = pair(c, c);
        let total: usize = sizes.iter().sum();
        a.to_send = pattern(total, 5);
        let mut queue: VecDeque<usize> = sizes.iter().copied().collect();
        let mut msg_off = 0;
        let mut rng = Rng(seed | 1);
        for _ in 0..200_000 {
            match rng.below(4) {
                0 => {
                    a.send_coalesced(&mut queue, &mut msg_off);
                }
                1 => {
                    deliver_one(&mut a, &mut b);
                    a.poll();
                }
                2 => b.read(rng.below(5000) as usize + 1),
                _ => {
                    deliver_one(&mut b, &mut a);
                }
            }
            if b.received.len() == total {
                break;
            }
        }
        prop_assert!(b.received == a.to_send, "stream differs");
        // A write never spans a receive-window half or the ring's end: those split a message.
        let writes = a.data_writes();
        let splits = total / (rbuf_kb as usize * 512) + total / (sbuf_kb as usize * 1024) + 2;
        prop_assert!(
            writes <= sizes.len() + splits,
            "{} writes for {} messages",
            writes,
            sizes.len()
        );
    }
}

#[test]
fn keepalive_timer_probes_after_idle_silence_then_every_interval() {
    use std::time::{Duration, Instant};
    let c = cfg(64, 16, 64, 16384, 16384, false);
    let (mut a, _b) = connected(c, c);
    let t0 = Instant::now();
    let s = Duration::from_secs;
    assert_eq!(a.s().poll_timeout(), None, "no timer until keepalive is on");
    a.s().set_keepalive(
        Some(Keepalive {
            idle: s(8),
            interval: s(2),
            count: 9,
        }),
        t0,
    );
    // Looks again every second (a quarter of the idle time, at most 1 s); no probe before
    // 8 s of silence.
    assert_eq!(a.s().poll_timeout(), Some(t0 + s(1)));
    assert_eq!(a.s().handle_timeout(t0 + s(2)).probe, None);
    // Traffic at 3 s (a completion): the silence starts again when the timer sees it.
    a.s().on_recv(Msg::Credits(16).encode()).unwrap();
    assert_eq!(a.s().handle_timeout(t0 + s(4)).probe, None);
    assert_eq!(
        a.s().handle_timeout(t0 + s(10)).probe,
        None,
        "6 s of silence"
    );
    let p = a
        .s()
        .handle_timeout(t0 + s(12))
        .probe
        .expect("8 s of silence: a probe");
    assert_eq!(
        a.s().poll_timeout(),
        Some(t0 + s(13)),
        "looks again a second later (the next probe is due an interval later, at 14 s)"
    );
    assert_eq!(a.s().handle_timeout(t0 + s(13)).probe, None);
    a.s().on_send_completion(p, true);
    // The probe's own completion is traffic too, but the peer stays silent: the next probe
    // waits for the idle time again.
    assert_eq!(a.s().handle_timeout(t0 + s(14)).probe, None);
    assert!(a.s().handle_timeout(t0 + s(22)).probe.is_some());
    a.s().set_keepalive(None, t0 + s(23));
    assert_eq!(a.s().poll_timeout(), None);
}

#[test]
fn keepalive_gives_up_after_count_unanswered_probes_as_tcp() {
    use std::time::{Duration, Instant};
    // On both kinds of device: iWARP's probe is an RDMA read, which completes only once the
    // peer answered (a write completes when the local TCP took it).
    for iwarp in [false, true] {
        let c = cfg(64, 16, 64, 16384, 16384, iwarp);
        let (mut a, mut b) = connected(c, c);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let k = Keepalive {
            idle: s(2),
            interval: s(1),
            count: 3,
        };
        assert_eq!(k.limit(), s(5));
        a.s().set_keepalive(Some(k), t0);
        // A live peer answers each probe: its completion is traffic, the silence starts again.
        let p = a
            .s()
            .handle_timeout(t0 + s(2))
            .probe
            .expect("a probe at 2 s");
        a.d.post_probe(p).unwrap();
        deliver_all(&mut a, &mut b);
        assert_eq!(a.d.t.uncompleted(), 0, "the answered probe completed");
        assert!(a.s().flags().connected);
        assert_eq!(a.s().handle_timeout(t0 + s(3)), Timeout::default());
        // The peer goes silent (the link is down: nothing is answered any more). Probes at
        // 2 s, 3 s and 4 s of silence; given up at 5 s, not before.
        let quiet = t0 + s(3);
        let mut probes = 0;
        for ms in (0..5000).step_by(250) {
            let now = quiet + Duration::from_millis(ms);
            a.poll();
            let due = a.s().handle_timeout(now);
            assert!(!due.dead, "given up early, at {ms} ms of silence");
            if let Some(p) = due.probe {
                probes += 1;
                a.d.post_probe(p).unwrap();
                // Our device takes it (iWARP: into the local TCP) but nothing comes back: a
                // read probe does not complete, unlike a write on iWARP.
                while a.d.t.nic_read() {}
                assert!(
                    !a.d.t.can_complete(),
                    "iwarp {iwarp}: unanswered probe completed"
                );
            }
            let next = a.s().poll_timeout().expect("a timer");
            assert!(
                next <= quiet + s(5),
                "looks again at the deadline at the latest"
            );
        }
        assert_eq!(
            probes, 3,
            "iwarp {iwarp}: a probe at 2, 3 and 4 s of silence"
        );
        let due = a.s().handle_timeout(quiet + s(5));
        assert!(due.dead && due.probe.is_none());
        assert_eq!(a.s().error(), Some(&StreamError::KeepaliveTimeout));
        assert!(!a.s().flags().connected && !a.s().flags().readable);
        assert_eq!(a.s().poll_timeout(), None, "nothing left to time");
    }
}

#[test]
fn a_lingering_close_ends_at_its_deadline() {
    use std::time::{Duration, Instant};
    let c = cfg(64, 16, 64, 16384, 16384, true);
    let (mut a, _b) = connected(c, c);
    let t0 = Instant::now();
    a.s().start_linger(t0);
    assert_eq!(a.s().poll_timeout(), Some(t0 + LINGER));
    assert!(
        !a.s()
            .handle_timeout(t0 + LINGER - Duration::from_millis(1))
            .linger_over
    );
    assert!(a.s().handle_timeout(t0 + LINGER).linger_over);
}

/// An iomap announcement lands in the peer's target iomap (after its SGL), inline or (small
/// inline size) from a staging slot, and the peer's driver hands its message and the entry's
/// bytes up.
#[test]
fn iomap_announcements_land_in_the_peers_target_iomap() {
    use crate::proto::iomap::{IomapEntry, PERM_READ, PERM_WRITE};
    for (inline, msg_send) in [(64, false), (16, false), (64, true), (4, true)] {
        let c = cfg(64, 16, inline, 16384, 16384, msg_send);
        let (mut a, mut b) = pair_offering(c, c, 3);
        deliver_all(&mut a, &mut b);
        deliver_all(&mut b, &mut a);
        assert_eq!(a.s().peer_iomap_size(), 3);
        let w = a
            .s()
            .plan_iomap_announce(2, PERM_READ | PERM_WRITE)
            .unwrap();
        let entry = IomapEntry {
            offset: 0x1000,
            sge: RemoteSge {
                addr: 0xabc0,
                key: 7,
                length: 4096,
            },
        }
        .to_peer_bytes(w.big_endian);
        a.d.post_iomap_announce(2, w, &entry).unwrap();
        MemEnd::deliver_all(&mut a.d.t, &mut b.d.t);
        let mut seen = None;
        b.d.progress(|data, read| seen = Some((data, read(2))))
            .unwrap();
        let (data, bytes) = seen.expect("the announcement's message");
        assert_eq!(Msg::IomapSgl(data).encode(), w.msg, "inline {inline}");
        assert_eq!(bytes, entry, "inline {inline}");
    }
}

/// A configuration whose rings start at `start` bytes and may grow to 128 KiB, as the socket
/// layer's defaults.
fn growing(start: u32, iwarp: bool) -> StreamConfig {
    StreamConfig {
        rbuf_start: start,
        sbuf_start: start,
        ..cfg(384, 384, 64, 128 * 1024, 128 * 1024, iwarp)
    }
}

/// Streams `n` bytes from `a` to `b` in writes of at most `seg`, reading everything.
fn stream_through(a: &mut Peer, b: &mut Peer, n: usize, seg: u32) {
    a.to_send = pattern(n, 7);
    for _ in 0..100_000 {
        a.pump(seg);
        deliver_all(a, b);
        b.read(1 << 20);
        deliver_all(b, a);
        if b.received.len() == n {
            break;
        }
    }
    assert_eq!(b.received, a.to_send, "every byte, in order");
}

#[test]
fn an_idle_connection_registers_only_the_starting_rings() {
    for iwarp in [false, true] {
        let c = growing(16 * 1024, iwarp);
        let (mut a, mut b) = connected(c, c);
        // A byte each way is no reason to grow.
        a.to_send = vec![1];
        b.to_send = vec![2];
        for _ in 0..4 {
            a.pump(64);
            b.pump(64);
            deliver_all(&mut a, &mut b);
            deliver_all(&mut b, &mut a);
            a.read(100);
            b.read(100);
        }
        assert_eq!(
            (a.received.as_slice(), b.received.as_slice()),
            (&[2][..], &[1][..])
        );
        for p in [&a, &b] {
            // iWARP: a message slot per posted receive, with room for a small message's bytes.
            let msgs = if iwarp {
                rq_posted(c) as usize * (4 + wire::SEND_PAYLOAD_MAX)
            } else {
                0
            };
            assert_eq!(
                p.d.t.registered_bytes(),
                2 * 16 * 1024 + StreamConfig::target_sgl_len(0) + msgs,
                "iwarp {iwarp}"
            );
            assert_eq!(p.d.core.recv_ring_len(), 16 * 1024);
            assert_eq!(p.d.core.send_ring_len(), 16 * 1024);
        }
    }
}

#[test]
fn a_stream_grows_both_rings_and_releases_what_they_outgrew() {
    for iwarp in [false, true] {
        let c = growing(16 * 1024, iwarp);
        let (mut a, mut b) = connected(c, c);
        let regions = a.d.t.live_regions();
        stream_through(&mut a, &mut b, 1 << 20, 65536);
        // The sender's ring and the receiver's buffer have their full size, each under one
        // live registration (the outgrown ones were released once nothing used them).
        assert_eq!(a.d.core.send_ring_len(), 128 * 1024, "iwarp {iwarp}");
        assert_eq!(b.d.core.recv_ring_len(), 128 * 1024, "iwarp {iwarp}");
        assert_eq!(a.d.seen.sbuf_released, 1);
        assert_eq!(b.d.seen.rbuf_released, 1);
        assert_eq!(a.d.t.live_regions(), regions);
        assert_eq!(b.d.t.live_regions(), regions);
        // The other directions stayed small.
        assert_eq!(a.d.core.recv_ring_len(), 16 * 1024);
        assert_eq!(b.d.core.send_ring_len(), 16 * 1024);
        // Once grown, the receiver's windows are half the full buffer (librdmacm's size):
        // after the switch, no window the sender got was smaller than that.
        let w = &a.d.t.data_writes;
        let late: Vec<usize> = w[w.len() - 9..w.len() - 1].to_vec();
        assert!(late.iter().all(|&n| n == 65536), "{late:?}");
    }
}

#[test]
fn a_stream_whose_reader_keeps_up_grows_the_receive_ring_too() {
    // The reader takes each write as it lands and gives its window back before the next one
    // lands, so the writer never runs out of windows; its writes still end at the small
    // windows' ends (8 KiB here): a write and a credit update per 8 KiB for as long as the
    // stream lasts. Once windows worth the full buffer are filled, the ring grows.
    for iwarp in [false, true] {
        let c = growing(16 * 1024, iwarp);
        let (mut a, mut b) = connected(c, c);
        let n = 1 << 20;
        let data = pattern(n, 5);
        let mut rounds = 0;
        while b.received.len() < n && rounds < 10_000 {
            rounds += 1;
            a.poll();
            if a.sent < n {
                let mut olen = 65536;
                let k = (n - a.sent).min(65536);
                a.sent +=
                    a.d.send_some(&data[a.sent..a.sent + k], &mut olen, false)
                        .unwrap();
            }
            deliver_one(&mut a, &mut b);
            b.poll();
            assert!(
                !b.d.core.granted.is_empty(),
                "the writer ran out of windows"
            );
            b.read(1 << 20);
            deliver_all(&mut b, &mut a);
        }
        assert_eq!(b.received, data, "iwarp {iwarp}");
        assert_eq!(b.d.core.recv_ring_len(), 128 * 1024, "iwarp {iwarp}");
        // After the switch the windows are 64 KiB, and so are the writes (but the stream's
        // last): 1 MiB in 32 writes (16 of 8 KiB before the switch) rather than 128.
        let w = &a.d.t.data_writes;
        let late = &w[w.len() - 8..w.len() - 1];
        assert!(late.iter().all(|&l| l == 65536), "{late:?}");
        assert!(w.len() <= 32, "{} writes for 1 MiB", w.len());
    }
}

#[test]
fn a_peer_that_writes_with_the_outgrown_key_is_caught() {
    // After the switch, windows carry the whole buffer's key; the old key covers only the
    // starting ring and is released once its windows are filled: the memwire panics on a
    // write under a released key, as a device fails it. This test checks the key change.
    let c = growing(16 * 1024, false);
    let (mut a, mut b) = connected(c, c);
    let before = b.d.local().rbuf.key;
    stream_through(&mut a, &mut b, 256 * 1024, 65536);
    let now = b.tsgl_mem();
    assert!(
        now.iter().all(|w| w.length == 0 || w.key != before),
        "{now:?}"
    );
}

#[test]
fn a_ring_stays_small_when_registering_the_rest_fails() {
    let c = growing(16 * 1024, false);
    let (mut a, mut b) = connected(c, c);
    a.d.core.sbuf_growth_failed();
    b.d.core.rbuf_growth_failed();
    stream_through(&mut a, &mut b, 300_000, 65536);
    assert_eq!(a.d.core.send_ring_len(), 16 * 1024);
    assert_eq!(b.d.core.recv_ring_len(), 16 * 1024);
}

#[test]
fn a_receiver_that_does_not_read_grows_to_take_what_its_full_buffer_holds() {
    // A peer may send up to our full receive buffer before we read a byte (a program that
    // sends its whole request before reading the answer, on both ends, relies on it): the
    // ring grows without any read, by the service thread's progress alone.
    for iwarp in [false, true] {
        let c = growing(16 * 1024, iwarp);
        let (mut a, mut b) = connected(c, c);
        let n = 120_000;
        a.to_send = pattern(n, 3);
        for _ in 0..1000 {
            a.pump(65536);
            deliver_all(&mut a, &mut b);
            b.poll();
            deliver_all(&mut b, &mut a);
        }
        assert_eq!(a.sent, n, "iwarp {iwarp}");
        assert_eq!(b.d.core.readable_bytes(), n);
        b.read(1 << 20);
        assert_eq!(b.received, a.to_send);
    }
}

#[test]
fn small_messages_travel_in_one_send_between_rsocket_rs_peers_on_iwarp() {
    // Inline room for the message and 64 bytes (as QueueSizes asks on iWARP).
    let c = cfg(64, 64, 68, 64 * 1024, 64 * 1024, true);
    let (mut a, mut b) = connected(c, c);
    let sizes = [1usize, 63, 64, 65, 2000, 7, 64];
    let mut want = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let m = pattern(n, i as u8 + 3);
        want.extend_from_slice(&m);
        a.to_send.extend_from_slice(&m);
        let writes = a.d.t.data_writes();
        let carried = a.d.seen.carried_sends;
        a.pump(1 << 20);
        // Up to 64 bytes: no RDMA write, one SEND carrying them.
        if n <= 64 {
            assert_eq!(
                (a.d.t.data_writes(), a.d.seen.carried_sends),
                (writes, carried + 1)
            );
        } else {
            assert_eq!(a.d.seen.carried_sends, carried);
        }
        deliver_all(&mut a, &mut b);
        b.read(1 << 20);
        deliver_all(&mut b, &mut a);
        a.poll();
    }
    assert_eq!(b.received, want);
    let small = sizes.iter().filter(|&&n| n <= 64).count() as u64;
    assert_eq!(b.d.seen.carried_recvs, small);
    // Every completion accounted for: the send ring is whole again.
    assert_eq!(a.d.t.uncompleted(), 0);
    assert_eq!(a.d.core.send_ring_len(), a.d.core.sbuf_bytes_avail);

    // A peer whose receives hold no data (librdmacm's, or rsocket-rs's with none offered):
    // the message travels after its write, as before.
    let plain = StreamConfig {
        recv_payload: 0,
        ..c
    };
    let (mut a, mut b) = connected(c, plain);
    a.to_send = vec![9; 10];
    a.pump(64);
    deliver_all(&mut a, &mut b);
    b.read(64);
    assert_eq!(b.received, vec![9; 10]);
    assert_eq!((a.d.seen.carried_sends, a.d.t.data_writes()), (0, 1));
}

#[test]
fn a_carried_message_must_be_data_of_its_length_within_our_room() {
    let c = cfg(64, 64, 68, 64 * 1024, 64 * 1024, true);
    let bad = |raw: u32, payload: u32| {
        let (_, mut b) = connected(c, c);
        assert!(b.d.core.on_recv_carrying(raw, payload).is_err());
        assert!(b.d.core.error().is_some(), "the connection fails");
    };
    bad(Msg::Data(10).encode(), 11); // length mismatch
    bad(Msg::Data(65).encode(), 65); // beyond the room of our receives
    bad(Msg::Credits(5).encode(), 4); // not data
    bad(Msg::Data(0).encode(), 0); // nothing carried
    let (_, mut b) = connected(c, c);
    assert_eq!(b.d.core.on_recv_carrying(Msg::Data(10).encode(), 10), Ok(0));
    assert_eq!(b.d.core.on_recv_carrying(Msg::Data(5).encode(), 5), Ok(10));
}

#[test]
fn each_end_knows_whether_the_peer_has_spoken_since_the_connection() {
    for iwarp in [false, true] {
        let c = cfg(64, 64, 68, 64 * 1024, 64 * 1024, iwarp);
        let (mut a, mut b) = pair(c, c);
        assert!(!a.d.core.peer_heard() && !b.d.core.peer_heard());
        // The initiator's first credit update reaches the acceptor.
        deliver_all(&mut a, &mut b);
        b.poll();
        assert!(b.d.core.peer_heard() && !a.d.core.peer_heard());
        // The acceptor answers (its own credit update, once released on iWARP).
        deliver_all(&mut b, &mut a);
        a.poll();
        assert!(a.d.core.peer_heard(), "iwarp {iwarp}");
    }
}

/// The credit update we act on makes us re-read every target SGL entry we used up, while the
/// peer's device may be writing its next window into one of them (that window's own update
/// comes later). A copy racing the device sees the new length beside the zeroed address: the
/// entry must not be taken then (a write to address 0 failed a stress run's connection with a
/// remote access error), but from its own update.
#[test]
fn a_window_read_while_the_peer_writes_it_waits_for_its_own_update() {
    for msg_send in [false, true] {
        let c = cfg(64, 16, 64, 16384, 65536, msg_send);
        let (mut a, mut b) = connected(c, c);
        let data = pattern(3 * 8192, 7);
        // Half the peer's receives used: it owes credits, but no window (800 bytes read).
        a.to_send = data[..800].to_vec();
        a.pump(100);
        deliver_all(&mut a, &mut b);
        b.read(800);
        let plain = b.d.t.in_flight().count();
        assert!(plain > 0, "a credit update without a window");
        // The rest of the first window: used up, so its entry is zeroed and re-read.
        a.to_send = data[..8192].to_vec();
        a.pump(8192);
        assert_eq!(a.s().target_sgl[0].length, 0, "the first window used up");
        deliver_all(&mut a, &mut b);
        b.read(8192);
        assert!(
            b.d.t.in_flight().count() > plain,
            "a credit update with the next window, into entry 0"
        );
        // Both updates land before we look; the first one's re-read races the window write.
        MemEnd::deliver_all(&mut b.d.t, &mut a.d.t);
        let tsgl = a.d.bufs.tsgl;
        a.d.t.tear_next_read(tsgl, 0..8);
        a.poll();
        assert_eq!(a.d.seen.torn_sge_reads, 1, "msg_send {msg_send}");
        // The window was taken from its own update, whole: the writes land where granted.
        a.to_send = data.clone();
        for _ in 0..8 {
            a.pump(4096);
            deliver_all(&mut a, &mut b);
            b.read(65536);
            deliver_all(&mut b, &mut a);
        }
        assert_eq!(b.received.len(), data.len(), "msg_send {msg_send}");
        assert!(b.received == data, "msg_send {msg_send}: bytes differ");
    }
}

/// A send that waits for the peer's room (its windows filled, the peer not reading) with
/// nothing of ours in flight is watched as TCP's persist timer watches a zero window: a probe
/// after PERSIST_FIRST, then twice as long after each, up to PERSIST_MAX; none while a write of
/// ours is in flight (the device watches that one); the wait ends with the peer's window and
/// starts afresh after a send went out. A probe the device gives up on fails the connection.
#[test]
fn a_send_waiting_for_the_peers_room_is_probed_as_tcps_persist_timer() {
    use std::time::{Duration, Instant};
    let s = Duration::from_secs;
    for msg_send in [false, true] {
        let c = cfg(64, 16, 64, 16384, 65536, msg_send);
        let (mut a, mut b) = connected(c, c);
        let t0 = Instant::now();
        assert!(!a.s().send_starved());
        assert_eq!(a.s().handle_persist(t0), None);
        assert_eq!(a.s().persist_deadline(), None, "no send waits");
        // Both windows (16 KiB) filled; the peer reads nothing.
        let data = pattern(3 * 16384, 5);
        a.to_send = data[..20000].to_vec();
        a.pump(8192);
        assert_eq!(a.sent, 16384);
        assert!(a.s().send_starved(), "msg_send {msg_send}");
        assert_eq!(a.s().handle_persist(t0), None, "the wait starts");
        assert_eq!(a.s().persist_deadline(), Some(t0 + PERSIST_FIRST));
        // Our writes are still in flight: no probe, a look again later.
        assert_eq!(a.s().handle_persist(t0 + s(1)), None);
        assert_eq!(a.s().persist_deadline(), Some(t0 + s(2)));
        deliver_all(&mut a, &mut b);
        assert!(a.s().all_sends_done() && a.s().send_starved());
        let mut at = t0 + s(2);
        let mut wait = PERSIST_FIRST;
        let mut probes = 0;
        while wait < PERSIST_MAX {
            assert_eq!(a.s().handle_persist(at - Duration::from_millis(1)), None);
            let p = a.s().handle_persist(at).expect("a probe");
            assert_eq!(p, Msg::Ctrl(Ctrl::Keepalive).encode() as u64);
            a.d.post_persist_probe(p).unwrap();
            probes += 1;
            wait = (wait * 2).min(PERSIST_MAX);
            at += wait;
            assert_eq!(a.s().persist_deadline(), Some(at), "probe {probes}");
            // The peer's device acknowledges it; its software sees nothing.
            deliver_all(&mut a, &mut b);
            assert!(a.s().all_sends_done());
            assert!(!b.s().has_data() || b.s().readable_bytes() == 16384);
        }
        assert_eq!(
            probes, 6,
            "after 1 s of waiting, then 2, 4, ..., 32 s apart; now 60 s"
        );
        assert!(a.s().flags().connected && b.s().flags().connected);
        // The peer reads: its window ends the wait.
        b.read(65536);
        deliver_all(&mut b, &mut a);
        assert!(!a.s().send_starved());
        assert_eq!(a.s().handle_persist(at), None);
        assert_eq!(a.s().persist_deadline(), None);
        // More than the peer has room for again: a new wait, with its own schedule.
        a.to_send = data.clone();
        a.pump(8192);
        deliver_all(&mut a, &mut b);
        assert!(a.s().send_starved());
        let t1 = at + s(1000);
        assert_eq!(
            a.s().handle_persist(t1),
            None,
            "a send went out: the wait starts again"
        );
        let p = a
            .s()
            .handle_persist(t1 + PERSIST_FIRST)
            .expect("a probe after PERSIST_FIRST");
        a.d.post_persist_probe(p).unwrap();
        // The link died: the device gives up on the probe.
        a.s().on_send_completion(p, false);
        assert_eq!(a.s().error(), Some(&StreamError::KeepaliveTimeout));
        assert!(!a.s().send_starved());
        assert_eq!(a.s().persist_deadline(), None);
        // What arrived before is intact.
        b.read(65536);
        assert_eq!(b.received[..], data[..b.received.len()]);
        assert!(b.received.len() >= 20000);
    }
}

/// A send short of room of its own (its send ring full of writes in flight) does not wait for
/// the peer: no persist probe (the device watches the writes in flight).
#[test]
fn a_send_short_of_its_own_room_is_not_a_persist_wait() {
    let c = cfg(64, 64, 64, 1 << 20, 16384, false);
    let (mut a, _b) = connected(c, c);
    a.to_send = pattern(65536, 9);
    a.pump(8192);
    assert_eq!(a.sent, 16384, "the send ring is full");
    assert!(!a.s().send_starved());
    assert_eq!(a.s().handle_persist(std::time::Instant::now()), None);
    assert_eq!(a.s().persist_deadline(), None);
}
