//! Queue sizes and buffer layout of one connection, negotiated from what the application asked
//! and what the device can.

use super::{QP_MAX_SIZE, QP_MIN_SIZE, SNDLOWAT, StreamConfig};
use crate::proto::wire;

/// Receives posted beyond the credits granted, on iWARP (see [`QueueSizes::negotiate`]).
pub const RECV_SLACK: u32 = 16;

/// Queue sizes of one connection, from what the application asked and what the device can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSizes {
    /// Send queue depth.
    pub sq: u32,
    /// Receive credits granted to the peer.
    pub rq: u32,
    /// Receives posted: the credits, plus [`RECV_SLACK`] on iWARP.
    pub rq_posted: u32,
    /// Inline size to ask the device for.
    pub inline: u32,
}

impl QueueSizes {
    /// Clamps the requested sizes to `[QP_MIN_SIZE, device maximum]`. On iWARP (no immediate
    /// data, no receiver-not-ready retry) messages travel as 4-byte inline SENDs, and a message
    /// that finds no receive posted ends the connection. The peer's data messages are bounded by
    /// the credits we grant, its credit updates and control messages are not, and receives are
    /// reposted only when we poll: so a few receives more than the credits are posted (a peer
    /// that used all its credits and then sent a credit update while we did not poll broke the
    /// connection, seen with the stress suite on Soft-iWARP).
    pub fn negotiate(sq: u32, rq: u32, inline: u32, device_max_wr: u32, iwarp: bool) -> Self {
        let max = device_max_wr.clamp(QP_MIN_SIZE as u32, QP_MAX_SIZE as u32);
        let sq = sq.clamp(QP_MIN_SIZE as u32, max);
        let mut rq = rq.clamp(QP_MIN_SIZE as u32, max);
        let mut rq_posted = rq;
        let mut inline = inline;
        if iwarp {
            rq = rq
                .min(max.saturating_sub(RECV_SLACK))
                .max(QP_MIN_SIZE as u32);
            rq_posted = (rq + RECV_SLACK).min(max);
            // Room for a message SEND that carries its data (see StreamConfig::recv_payload).
            inline = inline.max((wire::MSG_SIZE + wire::SEND_PAYLOAD_MAX) as u32);
        }
        QueueSizes {
            sq,
            rq,
            rq_posted,
            inline,
        }
    }

    /// The stream configuration once the device granted `sq_inline`; `None` on iWARP when it
    /// cannot send a message inline. `rbuf` and `sbuf` are (bytes at connect, largest) of each
    /// ring: the rings start small and grow when the traffic needs them. A send ring whose
    /// control slots follow it (inline smaller than an SGE) never grows.
    pub fn config(
        &self,
        sq_inline: u32,
        rbuf: (u32, u32),
        sbuf: (u32, u32),
        iwarp: bool,
    ) -> Option<StreamConfig> {
        if iwarp && sq_inline < wire::MSG_SIZE as u32 {
            return None;
        }
        let rbuf_size = rbuf.1.max(4096) & !1;
        let sbuf_size = sbuf.1.max(SNDLOWAT);
        let sbuf_start = if sq_inline < wire::SGE_LEN as u32 {
            sbuf_size
        } else {
            sbuf.0.clamp(SNDLOWAT, sbuf_size)
        };
        // A receive ring grows only from at most half its full size (see Stream's growth).
        let rbuf_start = rbuf.0.clamp(4096, rbuf_size) & !1;
        let rbuf_start = if rbuf_start < rbuf_size / 2 {
            rbuf_start
        } else {
            rbuf_size
        };
        Some(StreamConfig {
            sq_size: self.sq as u16,
            rq_size: self.rq as u16,
            sq_inline,
            rbuf_size,
            rbuf_start,
            sbuf_size,
            sbuf_start,
            msg_send: iwarp,
            recv_payload: if iwarp {
                wire::SEND_PAYLOAD_MAX as u32
            } else {
                0
            },
        })
    }
}
