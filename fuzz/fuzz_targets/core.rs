//! The protocol core (`proto::stream::Stream`) with a hostile peer: the fuzzer picks the
//! connection's sizes (as the library negotiates them), the peer's private data and then a
//! mix of what the peer can do (any immediate value, any entries in our target SGL) and what
//! the application and the device do (sends, receives, completions of what we posted, in
//! order, some failed; shutdowns, keepalive probes). Nothing may panic, and the peer can never
//! make us read or write outside our buffers: every range the core hands out lies inside the
//! receive buffer (receives) or the send ring (sends), and credit updates go only into the
//! target SGL the peer announced.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use rsocket::proto::stream::{
    CreditUpdate, DataWrite, LocalBuffers, QueueSizes, SendPlan, Stream, msg_send_wr_id,
};
use rsocket::proto::wire::{CONN_DATA_LEN, ConnData, RemoteSge, SGE_LEN, SGL_SIZE};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.0.len() < N {
            return None;
        }
        let (a, b) = self.0.split_at(N);
        self.0 = b;
        Some(a.try_into().unwrap())
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes::<2>().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }
}

fn check_ring(w: &[(u32, u32)], sbuf: u32) {
    for &(o, l) in w {
        assert!(
            o as u64 + l as u64 <= sbuf as u64,
            "ring range {o}+{l} outside the {sbuf}-byte send ring"
        );
    }
}

fn check_write(w: &DataWrite, sbuf: u32) {
    let segs = &w.ring[..w.ring_segs];
    check_ring(segs, sbuf);
    if !w.inline {
        assert_eq!(segs.iter().map(|s| s.1 as u64).sum::<u64>(), w.len as u64);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut i = Input(data);
    let Some(setup) = i.bytes::<16>() else { return };
    let iwarp = setup[0] & 1 != 0;
    let u = |k: usize| u16::from_le_bytes([setup[k], setup[k + 1]]) as u32;
    let q = QueueSizes::negotiate(u(1), u(3), setup[5] as u32, u(6).max(1), iwarp);
    let rbuf = u(8) << (setup[10] % 12);
    let sbuf = u(11) << (setup[13] % 12);
    // Rings that start at a fraction of their size (and grow) or at full size.
    let rstart = rbuf >> (setup[15] >> 3 & 3);
    let sstart = sbuf >> (setup[15] >> 5 & 3);
    let Some(cfg) = q.config(
        q.inline.min(setup[14] as u32 * 4),
        (rstart, rbuf),
        (sstart, sbuf),
        iwarp,
    ) else {
        return;
    };
    let Some(pd) = i.bytes::<CONN_DATA_LEN>() else {
        return;
    };
    let Ok(peer) = ConnData::decode(&pd) else {
        return;
    };
    let local = LocalBuffers {
        target_sgl: RemoteSge {
            addr: 0x1000,
            key: 1,
            length: 0,
        },
        rbuf: RemoteSge {
            addr: 0x10_0000,
            key: 2,
            length: 0,
        },
        target_iomap_size: (setup[15] % 8) as u16,
    };
    let mut s = if setup[0] & 2 != 0 {
        Stream::accepted(cfg, local, &peer)
    } else {
        Stream::new(cfg, local, &peer)
    };
    let sgl_lo = peer.target_sgl.addr;
    let sgl_hi = sgl_lo.saturating_add(SGE_LEN as u64 * SGL_SIZE as u64);
    // Our posted sends, in the order the device completes them.
    let mut posted: VecDeque<u64> = VecDeque::new();
    let post_msg = |posted: &mut VecDeque<u64>, wr_id: u64, msg: u32, with_write: bool| {
        if cfg.msg_send {
            if with_write {
                posted.push_back(wr_id);
            }
            posted.push_back(if with_write {
                msg_send_wr_id(msg)
            } else {
                msg as u64
            });
        } else {
            posted.push_back(wr_id);
        }
    };
    while let Some(op) = i.u8() {
        match op % 10 {
            // The peer: any immediate value.
            0 => {
                let Some(v) = i.u32() else { return };
                let _ = s.on_recv(v);
            }
            // The peer: anything in our target SGL.
            1 => {
                let Some(b) = i.bytes::<32>() else { return };
                let e0 = RemoteSge::from_ne_bytes(b[..16].try_into().unwrap());
                let e1 = RemoteSge::from_ne_bytes(b[16..].try_into().unwrap());
                s.refresh_target_sgl([e0, e1]);
            }
            // The application sends.
            2 | 3 => {
                let Some(max) = i.u16() else { return };
                let max = (max as u32) << (op / 10 % 8);
                let plan = if op % 10 == 2 {
                    s.plan_send(max)
                } else {
                    s.plan_write(max)
                        .map(|write| SendPlan::Post { write, fresh: true })
                };
                match plan {
                    Some(SendPlan::Post { write, fresh }) => {
                        // (A flushed pending write carries bytes queued before.)
                        assert!(!fresh || write.len <= max);
                        check_write(&write, cfg.sbuf_size);
                        post_msg(&mut posted, write.msg as u64, write.msg, true);
                    }
                    Some(SendPlan::Queued {
                        ring,
                        ring_segs,
                        len,
                    }) => {
                        check_ring(&ring[..ring_segs], cfg.sbuf_size);
                        assert_eq!(ring[..ring_segs].iter().map(|r| r.1).sum::<u32>(), len);
                    }
                    None => {}
                }
                if s.should_flush()
                    && let Some(w) = s.flush()
                {
                    check_write(&w, cfg.sbuf_size);
                    post_msg(&mut posted, w.msg as u64, w.msg, true);
                }
            }
            // The device completes our oldest send.
            4 => {
                let ok = i.u8().is_none_or(|b| b != 0xff);
                if let Some(wr_id) = posted.pop_front() {
                    s.on_send_completion(wr_id, ok);
                }
            }
            // The application receives: only from inside the receive buffer.
            5 => {
                let Some(max) = i.u32() else { return };
                let peek = max & 1 != 0;
                let before = s.readable_bytes();
                let n = s.consume(max as usize >> 8, peek, |off, len| {
                    assert!(
                        off as u64 + len as u64 <= cfg.rbuf_size as u64 && len > 0,
                        "receive range {off}+{len} outside the {}-byte receive buffer",
                        cfg.rbuf_size
                    );
                });
                assert!(n <= before);
            }
            // Credit updates owed: into the peer's announced target SGL only.
            6 => {
                // The driver grows the rings the core asks to grow (the whole buffer is
                // registered under another key) before it posts credit updates.
                if s.rbuf_grow_wanted() {
                    s.on_rbuf_grown(0x5eed);
                }
                if s.sbuf_grow_due() {
                    s.on_sbuf_grown();
                }
                while let Some(CreditUpdate { msg, sge }) = s.poll_credit_update() {
                    if let Some(w) = sge {
                        assert!(
                            w.remote_addr >= sgl_lo && w.remote_addr + SGE_LEN as u64 <= sgl_hi,
                            "credit update at {:#x}, outside the target SGL at {sgl_lo:#x}",
                            w.remote_addr
                        );
                    }
                    post_msg(&mut posted, msg as u64, msg, sge.is_some());
                }
            }
            // Shutdown, and its control message.
            7 => {
                let Some(how) = i.u8() else { return };
                if let Some(ctrl) = s.shutdown(how & 1 != 0, how & 2 != 0)
                    && let Some(msg) = s.post_ctrl(ctrl)
                {
                    post_msg(&mut posted, msg as u64, msg, false);
                }
            }
            8 => {
                if let Some(wr_id) = s.post_keepalive() {
                    posted.push_back(wr_id);
                }
            }
            _ => {
                let _ = (
                    s.can_send(),
                    s.has_pending(),
                    s.all_sends_done(),
                    s.flags(),
                    s.error(),
                );
                let _ = s.credit_update_due();
            }
        }
    }
});
