//! Model-based test of the stream core: two [`Stream`]s over a simulated RC link, driven by
//! random sends, receives, completions and credit updates in random order, checked against a
//! plain byte queue per direction.
//!
//! Both sides run the library's posting code ([`crate::proto::driver::Driver`]) over the
//! in-memory wire ([`crate::proto::memwire`]), whose steps the test interleaves at random: a
//! NIC reads a write's bytes out of the send ring at some time after the post (DMA), so a ring
//! byte reused before its write completed shows as wrong data; on RoCE a send completes only
//! after the peer placed it, on iWARP once it was read (Soft-iWARP: handed to TCP), possibly
//! before the peer placed it, and every message is a write followed by a 4-byte SEND into a
//! posted receive. Placement checks every write against the peer's registered regions, and
//! the peer's core refuses data beyond the credits and windows it granted.
//!
//! Each mode runs a fixed set of seeds (deterministic, so a failure names its seed) and must
//! reach every coverage point: ring wraps at every position near the ring's end, receive-buffer
//! wraps, windows used up by direct, pending and appended writes, credit and send-queue stalls,
//! completions before placement (iWARP), small messages carried in their message SEND (iWARP,
//! where the receiving end drew receives with room for them).

use std::collections::BTreeSet;

use super::tests::{Peer, pair};
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
    sbuf_grown: u64,
    sbuf_grown_at_end: u64,
    sbuf_released: u64,
    rbuf_grown: u64,
    rbuf_grown_granted: u64,
    rbuf_released: u64,
    carried_sends: u64,
    carried_recvs: u64,
    owed_recvs_posted: u64,
    data_found_no_recv: u64,
}

impl Coverage {
    /// Adds what one side's driver decided.
    fn add(&mut self, p: &Peer) {
        let s = &p.d.seen;
        self.ring_wrap_at.extend(&s.ring_wrap_at);
        self.ring_exact_end += s.ring_exact_end;
        self.window_used_up_direct += s.direct_used_up_window;
        self.window_used_up_pending += s.pending_used_up_window;
        self.window_used_up_append += s.append_used_up_window;
        self.appends += s.appends;
        self.flushes += s.flushes;
        self.inline_writes += s.inline_writes;
        self.credit_updates_with_window += s.credit_updates_with_window;
        self.credit_updates_plain += s.credit_updates_plain;
        self.sbuf_grown += s.sbuf_grown;
        self.sbuf_grown_at_end += s.sbuf_grown_at_end;
        self.sbuf_released += s.sbuf_released;
        self.rbuf_grown += s.rbuf_grown;
        self.rbuf_grown_granted += s.rbuf_grown_granted;
        self.rbuf_released += s.rbuf_released;
        self.carried_sends += s.carried_sends;
        self.carried_recvs += s.carried_recvs;
        self.completions_before_placement += p.d.t.completed_early;
        self.owed_recvs_posted += s.owed_recvs_posted;
        self.data_found_no_recv += p.d.t.data_found_no_recv;
    }
}

/// One side: a peer (driver, application bytes) and the application's current send call.
struct Side {
    p: Peer,
    cfg: StreamConfig,
    /// Bytes of this direction handed to the driver.
    planned: usize,
    /// Bytes left of the current send call, and the call's write size (as `send_some`).
    call_left: usize,
    olen: u32,
    coalesce: bool,
}

impl Side {
    /// One step of an application send call (`Driver::send_some` with at most one write's
    /// worth), or a new call.
    fn send_step(&mut self, rng: &mut Rng, cov: &mut Coverage) -> bool {
        let app = &self.p.to_send;
        if self.call_left == 0 {
            if self.planned == app.len() {
                return false;
            }
            let n = send_size(rng, self.cfg.sbuf_size <= 2048).min(app.len() - self.planned);
            self.call_left = n;
            self.olen = if rng.chance(2) {
                OLAP_START_SIZE
            } else {
                MAX_TRANSFER
            };
        }
        let max = self.call_left.min(self.olen as usize);
        let src = &app[self.planned..self.planned + max];
        let took = self
            .p
            .d
            .send_some(src, &mut self.olen, self.coalesce)
            .expect("posts succeed on the wire");
        if took == 0 {
            self.note_stall(cov);
            return false;
        }
        self.planned += took;
        self.call_left -= took;
        true
    }

    fn note_stall(&self, cov: &mut Coverage) {
        let s = &self.p.d.core;
        if !s.credit_left() {
            cov.credit_stalls += 1;
        } else if s.sqe_avail < if self.cfg.msg_send { 2 } else { 1 } {
            cov.sqe_stalls += 1;
        } else if s.sbuf_bytes_avail < SNDLOWAT.min(self.cfg.sbuf_size) {
            cov.buffer_stalls += 1;
        }
    }

    /// The flusher: posts the pending write once nothing else is in flight.
    fn flush_step(&mut self) -> bool {
        if !self.p.d.core.should_flush() {
            return false;
        }
        self.p.d.flush_due().expect("posts succeed on the wire");
        true
    }

    /// `Driver::send_credits`.
    fn credit_step(&mut self) -> bool {
        let before = self.p.d.sends_posted();
        self.p.d.send_credits().expect("posts succeed on the wire");
        self.p.d.sends_posted() != before
    }

    /// Takes completions (sends done, messages placed by the peer).
    fn poll_step(&mut self, seed: u64) -> bool {
        let any = self.p.d.progress(|_, _| {}).expect("polls succeed");
        if let Some(e) = self.p.d.core.error() {
            panic!("seed {seed}: the connection failed: {e:?}");
        }
        any
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
        let s = &self.p.d.core;
        if !s.has_data() {
            return false;
        }
        let size = s.recv_ring_len();
        let start = s.rbuf_offset;
        let head = s.rmsg.front().map(|m| m.1);
        let mut out = vec![0u8; max];
        let n = self.p.d.recv_some(&mut out, peek);
        out.truncate(n);
        if start as usize + n > size as usize {
            cov.rbuf_wrap_at.insert(size - start);
        }
        if head.is_some_and(|h| (h as usize) > n) {
            cov.partial_msg_reads += 1;
        }
        let at = self.p.received.len();
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
            self.p.received.extend_from_slice(&out);
            cov.bytes += n as u64;
        }
        true
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
    let mut grow_rng = Rng(seed ^ 0x6a09_e667_f3bc_c908);
    let mut mk = |rng: &mut Rng| {
        let sq = [16u16, 17, 24, 64][rng.below(4) as usize];
        let rq = [16u16, 17, 32, 64][rng.below(4) as usize];
        let sq_inline =
            [0u32, 4, 16, 64][rng.below(4) as usize].max(if mode_iwarp { 4 } else { 0 });
        let rbuf_size = if tiny {
            4096
        } else {
            [4096u32, 8192, 12_000, 65_536][rng.below(4) as usize]
        };
        let sbuf_size = if tiny {
            2048
        } else {
            [2048u32, 4096, 5000, 16_384][rng.below(4) as usize]
        };
        // Half of the rings start smaller and grow (as QueueSizes::config allows), drawn
        // from their own generator so that the other choices stay those of each seed.
        let grow = grow_rng.chance(2);
        let rbuf_start = if grow {
            [2048u32, 4096, 6000][grow_rng.below(3) as usize].min(rbuf_size)
        } else {
            rbuf_size
        };
        let sbuf_start = if grow && sq_inline >= wire::SGE_LEN as u32 {
            [2048u32, 3000][grow_rng.below(2) as usize].min(sbuf_size)
        } else {
            sbuf_size
        };
        // iWARP: receives with room for a small message's bytes, or none (each end draws its
        // own, so a peer may carry its data in SENDs one way only).
        let recv_payload = if mode_iwarp {
            [0u32, 1, 17, wire::SEND_PAYLOAD_MAX as u32][grow_rng.below(4) as usize]
        } else {
            0
        };
        StreamConfig {
            sq_size: sq,
            rq_size: rq,
            sq_inline,
            rbuf_size,
            rbuf_start,
            sbuf_size,
            sbuf_start,
            msg_send: mode_iwarp,
            recv_payload,
        }
    };
    let (ca, cb) = (mk(&mut rng), mk(&mut rng));
    let na = 1 + rng.below(150_000) as usize;
    let nb = 1 + rng.below(150_000) as usize;
    let (pa, pb) = (pattern(na, &mut rng), pattern(nb, &mut rng));
    // Connected as connect/accept do it (the initiator's first credit update is posted).
    let (mut a, mut b) = pair(ca, cb);
    // Garbage in the rings and receive buffers (not in the control slots after the ring: the
    // first credit update may be waiting there for its write).
    for (p, c) in [(&mut a, ca), (&mut b, cb)] {
        p.d.t.fill(p.d.bufs.sbuf, 0..c.sbuf_size as usize, 0xEE);
        p.d.t.fill(p.d.bufs.rbuf, 0..c.rbuf_size as usize, 0xDD);
    }
    a.to_send = pa;
    b.to_send = pb;
    let side = |p: Peer, cfg: StreamConfig, rng: &mut Rng| Side {
        p,
        cfg,
        planned: 0,
        call_left: 0,
        olen: OLAP_START_SIZE,
        coalesce: !rng.chance(4),
    };
    let mut a = side(a, ca, &mut rng);
    let mut b = side(b, cb, &mut rng);
    let mut idle = 0;
    for _ in 0..5_000_000u64 {
        let (me, peer) = if rng.chance(2) {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let did = match rng.below(11) {
            0 | 1 => me.send_step(&mut rng, cov),
            2 => me.flush_step(),
            3 => me.credit_step(),
            4 => {
                let max = if tiny || rng.chance(3) {
                    1 + rng.below(64)
                } else {
                    1 + rng.below(70_000)
                };
                let peek = rng.chance(8);
                me.recv_step(max as usize, peek, &peer.p.to_send, seed, cov)
            }
            5 => me.p.d.t.nic_read(),
            // The peer's NIC places the next send of `me` that it has read.
            6 | 7 => me.p.d.t.place_next(&mut peer.p.d.t),
            8 => me.p.d.t.complete_next(),
            _ => me.poll_step(seed),
        };
        idle = if did { 0 } else { idle + 1 };
        if a.p.received.len() == nb && b.p.received.len() == na {
            assert_eq!(a.p.received, b.p.to_send, "seed {seed}: B->A differs");
            assert_eq!(b.p.received, a.p.to_send, "seed {seed}: A->B differs");
            cov.add(&a.p);
            cov.add(&b.p);
            return;
        }
        if idle >= 10_000 {
            eprintln!("A core {:#?}\nB core {:#?}", a.p.d.core, b.p.d.core);
        }
        assert!(
            idle < 10_000,
            "seed {seed}: stalled with A {}/{} planned, B got {}; B {}/{} planned, A got {}",
            a.planned,
            na,
            b.p.received.len(),
            b.planned,
            nb,
            a.p.received.len()
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
        ("send rings grown", cov.sbuf_grown),
        (
            "send rings grown with bytes in flight to the end",
            cov.sbuf_grown_at_end,
        ),
        ("outgrown send rings released", cov.sbuf_released),
        ("receive buffers grown", cov.rbuf_grown),
        (
            "receive buffers grown with a window still granted",
            cov.rbuf_grown_granted,
        ),
        ("outgrown receive buffers released", cov.rbuf_released),
        (
            "receives posted after the caller had the message",
            cov.owed_recvs_posted,
        ),
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
    if iwarp {
        if cov.carried_sends == 0 {
            missing.push("data carried in message SENDs".to_string());
        }
        assert_eq!(
            cov.carried_sends, cov.carried_recvs,
            "every carried SEND taken"
        );
    } else {
        assert_eq!(
            cov.completions_before_placement, 0,
            "RoCE completes after placement"
        );
        assert_eq!(cov.carried_sends, 0, "RoCE carries no data in SENDs");
    }
    assert_eq!(
        cov.data_found_no_recv, 0,
        "a data message found no receive posted: more in flight than the credits allow"
    );
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
