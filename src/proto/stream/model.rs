//! Model-based test of the stream core: two [`Stream`]s over a simulated RC link, driven by
//! random sends, receives, completions and credit updates in random order, checked against a
//! plain byte queue per direction.
//!
//! The link is more hostile than the one in `tests.rs`: a NIC reads a write's bytes out of the
//! send ring at some time after the post (DMA), not at the post, so a ring byte reused before
//! its write completed shows as wrong data. On RoCE a send completes only after the peer placed
//! it; on iWARP a send completes once it was read (Soft-iWARP: handed to TCP), possibly before
//! the peer placed it, and every message is a write followed by a 4-byte SEND. Placement checks
//! every write against the peer's registered regions and hands every message to the peer's
//! core, which refuses data beyond the credits and windows it granted. Both sides' target-SGL memory is simulated, zeroing and stale entries included.
//!
//! Each mode runs a fixed set of seeds (deterministic, so a failure names its seed) and must
//! reach every coverage point: ring wraps at every position near the ring's end, receive-buffer
//! wraps, windows used up by direct, pending and appended writes, credit and send-queue stalls,
//! completions before placement (iWARP).

use std::collections::{BTreeSet, VecDeque};

use super::tests::{RBUF_BASE, TSGL_BASE, local};
use super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

/// Where a posted write's bytes come from.
#[derive(Debug, Clone)]
enum Src {
    /// Copied at the post (inline data).
    Inline(Vec<u8>),
    /// Read from the send buffer when the NIC gets to it.
    Ring([(u32, u32); 2], usize),
    /// No payload.
    Empty,
}

#[derive(Debug, Clone)]
struct Wr {
    wr_id: u64,
    /// RDMA write target (address, rkey), or a SEND.
    remote: Option<(u64, u32)>,
    src: Src,
    /// The message it carries (immediate data, or a SEND's 4 bytes).
    msg: Option<u32>,
    /// Bytes as the NIC read them.
    data: Option<Vec<u8>>,
}

/// Coverage points, counted over all seeds of a mode.
#[derive(Default, Debug)]
struct Coverage {
    /// Bytes before the ring's end at which a ring write wrapped.
    ring_wrap_at: BTreeSet<u32>,
    ring_exact_end: u64,
    /// Bytes before the receive buffer's end at which a read wrapped.
    rbuf_wrap_at: BTreeSet<u32>,
    partial_msg_reads: u64,
    peeks: u64,
    window_used_up_direct: u64,
    window_used_up_pending: u64,
    window_used_up_append: u64,
    appends: u64,
    flushes: u64,
    credit_updates_with_window: u64,
    credit_updates_plain: u64,
    credit_stalls: u64,
    sqe_stalls: u64,
    buffer_stalls: u64,
    completions_before_placement: u64,
    inline_writes: u64,
    bytes: u64,
}

struct Side {
    s: Stream,
    cfg: StreamConfig,
    sbuf: Vec<u8>,
    rbuf: Vec<u8>,
    tsgl: [u8; 32],
    rkey_rbuf: u32,
    rkey_tsgl: u32,
    /// This direction's application bytes, all of them; `planned` of them handed to the core.
    app: Vec<u8>,
    planned: usize,
    /// Bytes left of the current send call, and the call's segment size (as `send_some`).
    call_left: usize,
    olen: u32,
    coalesce: bool,
    received: Vec<u8>,
    /// Posted, in order; `read`, `placed`, `completed` count how far each stage got.
    wrs: VecDeque<Wr>,
    read: usize,
    placed: usize,
    completed: usize,
    /// Index of `wrs[0]` since the start.
    base: usize,
}

impl Side {
    fn new(
        cfg: StreamConfig,
        l: LocalBuffers,
        peer: &ConnData,
        app: Vec<u8>,
        coalesce: bool,
    ) -> Self {
        Side {
            s: Stream::new(cfg, l, peer),
            cfg,
            sbuf: vec![0xEE; (cfg.sbuf_size + cfg.ctrl_area()) as usize],
            rbuf: vec![0xDD; cfg.rbuf_size as usize],
            tsgl: [0; 32],
            rkey_rbuf: l.rbuf.key,
            rkey_tsgl: l.target_sgl.key,
            app,
            planned: 0,
            call_left: 0,
            olen: OLAP_START_SIZE,
            coalesce,
            received: Vec::new(),
            wrs: VecDeque::new(),
            read: 0,
            placed: 0,
            completed: 0,
            base: 0,
        }
    }

    fn tsgl_mem(&self) -> [RemoteSge; 2] {
        [
            RemoteSge::from_ne_bytes(self.tsgl[0..16].try_into().unwrap()),
            RemoteSge::from_ne_bytes(self.tsgl[16..32].try_into().unwrap()),
        ]
    }

    fn push(&mut self, wr_id: u64, remote: Option<(u64, u32)>, src: Src, msg: Option<u32>) {
        self.wrs.push_back(Wr {
            wr_id,
            remote,
            src,
            msg,
            data: None,
        });
    }

    /// A message alone (`post_msg`): a 0-byte write with immediate, or a 4-byte SEND on iWARP.
    fn post_msg(&mut self, msg: u32) {
        if self.cfg.msg_send {
            self.push(
                msg as u64,
                None,
                Src::Inline(msg.to_ne_bytes().to_vec()),
                Some(msg),
            );
        } else {
            self.push(msg as u64, Some((0xdead_beef, 0)), Src::Empty, Some(msg));
        }
    }

    /// Posts a message-carrying write as the socket layer does (`post_write_msg`).
    fn post_write_msg(&mut self, msg: u32, src: Src, remote: (u64, u32), wr_id: u64) {
        if self.cfg.msg_send {
            self.push(wr_id, Some(remote), src, None);
            let op_only = (msg & !0x1FFF_FFFF) as u64 | WR_ID_MSG_SEND;
            self.push(
                op_only,
                None,
                Src::Inline(msg.to_ne_bytes().to_vec()),
                Some(msg),
            );
        } else {
            self.push(wr_id, Some(remote), src, Some(msg));
        }
    }

    /// `post_data`: a planned data write, `fresh` bytes copied into the ring (or inline) now.
    fn post_data(
        &mut self,
        w: DataWrite,
        fresh: Option<std::ops::Range<usize>>,
        cov: &mut Coverage,
    ) {
        if let Some(i) = w.exhausted_sge {
            self.tsgl[i * 16..i * 16 + 16].fill(0);
        }
        let src = match fresh {
            Some(r) if w.inline => {
                cov.inline_writes += 1;
                Src::Inline(self.app[r].to_vec())
            }
            Some(r) => {
                self.copy_to_ring(&w.ring[..w.ring_segs], r);
                Src::Ring(w.ring, w.ring_segs)
            }
            None => Src::Ring(w.ring, w.ring_segs),
        };
        if !w.inline {
            let sb = self.cfg.sbuf_size;
            if w.ring_segs == 2 {
                cov.ring_wrap_at.insert(w.ring[0].1);
            } else if w.ring[0].0 + w.ring[0].1 == sb {
                cov.ring_exact_end += 1;
            }
        }
        self.post_write_msg(w.msg, src, (w.remote_addr, w.rkey), w.msg as u64);
    }

    fn copy_to_ring(&mut self, ring: &[(u32, u32)], r: std::ops::Range<usize>) {
        let mut at = r.start;
        for &(o, l) in ring {
            let (o, l) = (o as usize, l as usize);
            self.sbuf[o..o + l].copy_from_slice(&self.app[at..at + l]);
            at += l;
        }
        assert_eq!(at, r.end, "ring segments do not add up to the write");
    }

    /// One step of an application send call (`send_some`), or a new call.
    fn send_step(&mut self, rng: &mut Rng, cov: &mut Coverage) -> bool {
        if self.call_left == 0 {
            if self.planned == self.app.len() {
                return false;
            }
            let n = send_size(rng, self.cfg.sbuf_size <= 2048).min(self.app.len() - self.planned);
            self.call_left = n;
            self.olen = if rng.chance(2) {
                OLAP_START_SIZE
            } else {
                MAX_TRANSFER
            };
        }
        let max = (self.call_left as u32).min(self.olen);
        let had_pending = self.s.has_pending();
        let plan = if self.coalesce {
            self.s.plan_send(max)
        } else {
            self.s
                .plan_write(max)
                .map(|write| SendPlan::Post { write, fresh: true })
        };
        let Some(plan) = plan else {
            self.note_stall(cov);
            return false;
        };
        match plan {
            SendPlan::Post { write, fresh: true } => {
                if self.olen < MAX_TRANSFER {
                    self.olen <<= 1;
                }
                if write.exhausted_sge.is_some() {
                    cov.window_used_up_direct += 1;
                }
                let r = self.planned..self.planned + write.len as usize;
                self.planned += write.len as usize;
                self.call_left -= write.len as usize;
                self.post_data(write, Some(r), cov);
            }
            SendPlan::Post {
                write,
                fresh: false,
            } => {
                cov.flushes += 1;
                self.post_data(write, None, cov);
            }
            SendPlan::Queued {
                ring,
                ring_segs,
                len,
            } => {
                let r = self.planned..self.planned + len as usize;
                self.copy_to_ring(&ring[..ring_segs], r);
                self.planned += len as usize;
                self.call_left -= len as usize;
                let p = self
                    .s
                    .pending
                    .expect("queued bytes wait in the pending write");
                if had_pending {
                    cov.appends += 1;
                    // An append happens only while the window lasts: it used it up now.
                    if p.exhausted_sge.is_some() {
                        cov.window_used_up_append += 1;
                    }
                } else if p.exhausted_sge.is_some() {
                    cov.window_used_up_pending += 1;
                }
            }
        }
        true
    }

    fn note_stall(&self, cov: &mut Coverage) {
        let s = &self.s;
        if !s.credit_left() {
            cov.credit_stalls += 1;
        } else if s.sqe_avail < if self.cfg.msg_send { 2 } else { 1 } {
            cov.sqe_stalls += 1;
        } else if s.sbuf_bytes_avail < SNDLOWAT.min(self.cfg.sbuf_size) {
            cov.buffer_stalls += 1;
        }
    }

    /// The flusher: posts the pending write once nothing else is in flight.
    fn flush_step(&mut self, cov: &mut Coverage) -> bool {
        if !self.s.should_flush() {
            return false;
        }
        let w = self.s.flush().expect("should_flush");
        cov.flushes += 1;
        self.post_data(w, None, cov);
        true
    }

    /// `send_credits`.
    fn credit_step(&mut self, cov: &mut Coverage) -> bool {
        let Some(CreditUpdate { msg, sge }) = self.s.poll_credit_update() else {
            return false;
        };
        match sge {
            Some(w) => {
                cov.credit_updates_with_window += 1;
                let src = if w.inline {
                    Src::Inline(w.bytes.to_vec())
                } else {
                    let o = w.ctrl_slot_offset as usize;
                    self.sbuf[o..o + 16].copy_from_slice(&w.bytes);
                    Src::Ring([(w.ctrl_slot_offset, 16), (0, 0)], 1)
                };
                self.post_write_msg(msg, src, (w.remote_addr, w.rkey), msg as u64);
            }
            None => {
                cov.credit_updates_plain += 1;
                self.post_msg(msg);
            }
        }
        true
    }

    /// The application reads up to `max` bytes (or peeks); every byte is checked.
    fn recv_step(
        &mut self,
        max: usize,
        peek: bool,
        peer_app: &[u8],
        seed: u64,
        cov: &mut Coverage,
    ) -> bool {
        if !self.s.has_data() {
            return false;
        }
        let mut out = Vec::new();
        let rbuf = &self.rbuf;
        let size = self.cfg.rbuf_size;
        let start = self.s.rbuf_offset;
        let head = self.s.rmsg.front().copied();
        let n = self.s.consume(max, peek, |o, l| {
            out.extend_from_slice(&rbuf[o as usize..(o + l) as usize]);
        });
        if start as usize + n > size as usize {
            cov.rbuf_wrap_at.insert(size - start);
        }
        if head.is_some_and(|h| (h as usize) > n) {
            cov.partial_msg_reads += 1;
        }
        assert_eq!(n, out.len());
        let at = self.received.len();
        let want = &peer_app[at..at + n];
        if out != want {
            let i = out.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "seed {seed}: wrong byte at stream offset {} (got {:#04x}, want {:#04x}), {} bytes read{}",
                at + i,
                out[i],
                want[i],
                n,
                if peek { " by MSG_PEEK" } else { "" }
            );
        }
        if peek {
            cov.peeks += 1;
        } else {
            self.received.extend_from_slice(&out);
            cov.bytes += n as u64;
        }
        true
    }

    /// The NIC reads the next posted write's bytes.
    fn nic_read(&mut self) -> bool {
        let i = self.read - self.base;
        let Some(wr) = self.wrs.get(i) else {
            return false;
        };
        let data = match &wr.src {
            Src::Inline(b) => b.clone(),
            Src::Empty => Vec::new(),
            Src::Ring(segs, n) => {
                let mut v = Vec::new();
                for &(o, l) in &segs[..*n] {
                    v.extend_from_slice(&self.sbuf[o as usize..(o + l) as usize]);
                }
                v
            }
        };
        self.wrs[i].data = Some(data);
        self.read += 1;
        true
    }

    /// Whether the next write may complete locally: read, and on RoCE also placed (acked).
    fn can_complete(&self) -> bool {
        self.completed < self.read && (self.cfg.msg_send || self.completed < self.placed)
    }

    fn complete(&mut self, cov: &mut Coverage) {
        let wr = &self.wrs[self.completed - self.base];
        if self.completed >= self.placed {
            cov.completions_before_placement += 1;
        }
        self.s.on_send_completion(wr.wr_id, true);
        self.completed += 1;
        self.retire();
    }

    /// Drops the work requests both completed here and placed at the peer.
    fn retire(&mut self) {
        while self.base < self.completed.min(self.placed) {
            self.wrs.pop_front();
            self.base += 1;
        }
    }
}

/// Places `wr` (sent by the peer) at `side`, as its NIC would, then hands its message to the core.
fn place(side: &mut Side, wr: &Wr, seed: u64) {
    let data = wr
        .data
        .as_ref()
        .expect("placed before the sender's NIC read it");
    if let Some((addr, rkey)) = wr.remote
        && !data.is_empty()
    {
        let (mem, base): (&mut [u8], u64) = if rkey == side.rkey_rbuf {
            (&mut side.rbuf, RBUF_BASE)
        } else if rkey == side.rkey_tsgl {
            (&mut side.tsgl, TSGL_BASE)
        } else {
            panic!("seed {seed}: write with rkey {rkey:#x}, never granted");
        };
        let off = addr.checked_sub(base).expect("write below the region") as usize;
        assert!(
            off + data.len() <= mem.len(),
            "seed {seed}: write past the region's end"
        );
        mem[off..off + data.len()].copy_from_slice(data);
    }
    if let Some(m) = wr.msg {
        match side.s.on_recv(m) {
            Ok(Msg::Credits(_)) => {
                let mem = side.tsgl_mem();
                side.s.refresh_target_sgl(mem);
            }
            Ok(_) => {}
            Err(e) => panic!("seed {seed}: the peer's message {m:#x} was refused: {e:?}"),
        }
    }
}

fn send_size(rng: &mut Rng, small: bool) -> usize {
    if small && rng.chance(2) {
        return 1 + rng.below(48) as usize;
    }
    match rng.below(10) {
        0..=3 => 1 + rng.below(40) as usize,
        4 => [15, 16, 17, 2047, 2048, 2049, 4095, 4096, 4097][rng.below(9) as usize],
        5..=6 => 1 + rng.below(3000) as usize,
        _ => 1 + rng.below(20_000) as usize,
    }
}

fn pattern(n: usize, rng: &mut Rng) -> Vec<u8> {
    (0..n).map(|_| rng.next() as u8).collect()
}

/// One connection, both directions, random events until every byte arrived.
fn run(mode_iwarp: bool, seed: u64, cov: &mut Coverage) {
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ mode_iwarp as u64);
    // A quarter of the connections use the smallest buffers, where every wrap comes often.
    let tiny = rng.chance(4);
    let mk = |rng: &mut Rng| {
        let sq = [16u16, 17, 24, 64][rng.below(4) as usize];
        let rq = [16u16, 17, 32, 64][rng.below(4) as usize];
        StreamConfig {
            sq_size: sq,
            rq_size: rq,
            sq_inline: [0u32, 4, 16, 64][rng.below(4) as usize].max(if mode_iwarp { 4 } else { 0 }),
            rbuf_size: if tiny {
                4096
            } else {
                [4096u32, 8192, 12_000, 65_536][rng.below(4) as usize]
            },
            sbuf_size: if tiny {
                2048
            } else {
                [2048u32, 4096, 5000, 16_384][rng.below(4) as usize]
            },
            msg_send: mode_iwarp,
        }
    };
    let (ca, cb) = (mk(&mut rng), mk(&mut rng));
    let (la, lb) = (local(1), local(2));
    let req = ConnData::decode(&Stream::local_conn_data(&ca, &la).encode()).unwrap();
    let rep = ConnData::decode(&Stream::local_conn_data(&cb, &lb).encode()).unwrap();
    let na = 1 + rng.below(150_000) as usize;
    let nb = 1 + rng.below(150_000) as usize;
    let (pa, pb) = (pattern(na, &mut rng), pattern(nb, &mut rng));
    let mut a = Side::new(ca, la, &rep, pa, !rng.chance(4));
    let mut b = Side::new(cb, lb, &req, pb, !rng.chance(4));
    // The initiator's first credit update, as `establish` sends it.
    a.credit_step(cov);
    let mut idle = 0;
    for _ in 0..5_000_000u64 {
        let (me, peer) = if rng.chance(2) {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let did = match rng.below(10) {
            0 | 1 => me.send_step(&mut rng, cov),
            2 => me.flush_step(cov),
            3 => me.credit_step(cov),
            4 => {
                let max = if tiny || rng.chance(3) {
                    1 + rng.below(64)
                } else {
                    1 + rng.below(70_000)
                };
                let peek = rng.chance(8);
                me.recv_step(max as usize, peek, &peer.app, seed, cov)
            }
            5 => me.nic_read(),
            6 | 7 => {
                // The peer's NIC places the next write of `me` that it has read.
                if me.placed < me.read {
                    let wr = me.wrs[me.placed - me.base].clone();
                    place(peer, &wr, seed);
                    me.placed += 1;
                    me.retire();
                    true
                } else {
                    false
                }
            }
            _ => {
                if me.can_complete() {
                    me.complete(cov);
                    true
                } else {
                    false
                }
            }
        };
        idle = if did { 0 } else { idle + 1 };
        if a.received.len() == nb && b.received.len() == na {
            assert_eq!(a.received, b.app, "seed {seed}: B->A differs");
            assert_eq!(b.received, a.app, "seed {seed}: A->B differs");
            return;
        }
        assert!(
            idle < 10_000,
            "seed {seed}: stalled with A {}/{} planned, B got {}; B {}/{} planned, A got {}",
            a.planned,
            na,
            b.received.len(),
            b.planned,
            nb,
            a.received.len()
        );
    }
    panic!("seed {seed}: did not finish");
}

fn run_mode(iwarp: bool) -> Coverage {
    let mut cov = Coverage::default();
    for seed in 1..=240 {
        run(iwarp, seed, &mut cov);
    }
    cov
}

fn check_coverage(cov: &Coverage, iwarp: bool) {
    let mut missing = Vec::new();
    let ring: Vec<u32> = (1..=24).filter(|l| !cov.ring_wrap_at.contains(l)).collect();
    if !ring.is_empty() {
        missing.push(format!("ring wraps {ring:?} bytes before its end"));
    }
    let rbuf: Vec<u32> = (1..=24).filter(|l| !cov.rbuf_wrap_at.contains(l)).collect();
    if !rbuf.is_empty() {
        missing.push(format!(
            "receive-buffer wraps {rbuf:?} bytes before its end"
        ));
    }
    for (name, n) in [
        ("ring writes ending at the ring's end", cov.ring_exact_end),
        ("partial message reads", cov.partial_msg_reads),
        ("peeks", cov.peeks),
        (
            "windows used up by a direct write",
            cov.window_used_up_direct,
        ),
        (
            "windows used up by a pending write",
            cov.window_used_up_pending,
        ),
        ("windows used up by an append", cov.window_used_up_append),
        ("appends", cov.appends),
        ("flushes", cov.flushes),
        (
            "credit updates with a window",
            cov.credit_updates_with_window,
        ),
        ("credit updates without", cov.credit_updates_plain),
        ("credit stalls", cov.credit_stalls),
        ("send queue stalls", cov.sqe_stalls),
        ("send buffer stalls", cov.buffer_stalls),
        ("inline writes", cov.inline_writes),
        (
            "completions before placement",
            if iwarp {
                cov.completions_before_placement
            } else {
                1
            },
        ),
    ] {
        if n == 0 {
            missing.push(name.to_string());
        }
    }
    if !iwarp {
        assert_eq!(
            cov.completions_before_placement, 0,
            "RoCE completes after placement"
        );
    }
    assert!(missing.is_empty(), "never reached: {}", missing.join("; "));
}

#[test]
fn model_roce_write_with_immediate() {
    let cov = run_mode(false);
    check_coverage(&cov, false);
}

#[test]
fn model_iwarp_write_then_send() {
    let cov = run_mode(true);
    check_coverage(&cov, true);
}
