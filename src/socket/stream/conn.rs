//! An established connection: its CM id, verbs endpoint and driver, created on a routed or
//! requested id; readiness and the CM's view of the connection.

use super::settings::Options;
use super::{iomap, zerocopy};
use crate::error::{Error, Result};
use crate::proto::driver::Driver;
use crate::proto::stream::QueueSizes;
use crate::proto::wire::ConnData;
use crate::socket::config::Config;
use crate::socket::spin::Spin;
use crate::trace::trace;
use crate::verbs::{CmEventKind, CmId, ConnParam, Endpoint, EventChannel};

/// Transport retries of the QP. librdmacm asks for 7, which Soft-RoCE treats as "retry for
/// ever": a dead peer would then never be reported. 6 is the largest finite count.
pub(super) const TRANSPORT_RETRIES: u8 = 6;

/// An established connection's resources and state machine.
pub(super) struct Conn {
    pub(super) id: CmId,
    /// The protocol core and its posting code, over the verbs endpoint.
    pub(super) link: Driver<Endpoint>,
    pub(super) shut_wr: bool,
    /// When (ticks) a non-blocking call that found nothing to do last looked at the CM channel.
    pub(super) cm_checked: u64,
    /// Non-blocking calls that found nothing to do (counts the reads of the tick counter).
    pub(super) idle_calls: u32,
    /// How long blocking calls busy-poll before sleeping.
    pub(super) spin: Spin,
    /// riomap state: the peer's windows, our mappings, announcements owed.
    pub(super) io: iomap::IoMaps,
    /// MSG_ZEROCOPY calls in flight and notices not yet read.
    pub(super) zc: zerocopy::ZeroCopy,
    /// The CM reported the connection gone (the peer disconnected, or the device went).
    pub(super) cm_gone: bool,
    /// iWARP: our DISCONNECT went, rdma_disconnect is left for the lingering close (see `close`).
    pub(super) disconnect_owed: bool,
    /// iWARP initiator: when the nudge job sends its next READ, and how many it sent (see
    /// `StreamSocket::nudge_job`).
    pub(super) nudge: Option<(std::time::Instant, u32)>,
    /// The persist job runs (see `StreamSocket::persist_job`): a call that finds a send
    /// waiting for the peer's room adds it only then.
    pub(super) persist_job: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The QP goes first, then the id, then the endpoint's MRs, CQ, channel and PD.
        self.id.destroy_qp();
    }
}

impl Conn {
    /// Creates the endpoint and buffers on a routed/requested id.
    pub(super) fn setup(mut id: CmId, opts: &Options, iomap: u16) -> Result<Self> {
        let dev = id.device_info()?;
        let q = QueueSizes::negotiate(
            opts.sq_size,
            opts.rq_size,
            opts.sq_inline,
            dev.max_qp_wr,
            dev.iwarp,
        );
        // On iWARP the inline size asked for has room for a small message's bytes after the
        // message; a device that refuses it gets the size the application asked for (small
        // messages then travel after their write).
        let ep = match id.create_endpoint(q.sq, q.rq_posted, q.inline) {
            Err(e) if q.inline > opts.sq_inline => {
                trace!("queue pair with {} bytes inline refused ({e})", q.inline);
                id.create_endpoint(
                    q.sq,
                    q.rq_posted,
                    opts.sq_inline.max(crate::proto::wire::MSG_SIZE as u32),
                )?
            }
            r => r?,
        };
        let cfg = q
            .config(
                ep.sq_inline(),
                (opts.rbuf_start, opts.rbuf_size),
                (opts.sbuf_start, opts.sbuf_size),
                dev.iwarp,
            )
            .ok_or(Error::Unsupported(libc::ENOTSUP))?;
        let link = Driver::new(ep, cfg, q.rq_posted, iomap)?;
        Ok(Conn {
            id,
            link,
            shut_wr: false,
            cm_checked: crate::verbs::ticks(),
            idle_calls: 0,
            spin: new_spin(),
            io: iomap::IoMaps::new(dev.max_rd_atom),
            zc: zerocopy::ZeroCopy::default(),
            cm_gone: false,
            disconnect_owed: false,
            nudge: None,
            persist_job: false,
        })
    }

    pub(super) fn conn_param(&self) -> ConnParam {
        ConnParam {
            // RDMA reads (rioread) in both directions; iWARP also issues one while connecting
            // (librdmacm's workaround needs initiator_depth ≥ 1 there).
            responder_resources: self.io.rd_atom,
            initiator_depth: self.io.rd_atom.max(self.link.core.config().msg_send as u8),
            flow_control: 1,
            retry_count: TRANSPORT_RETRIES,
            rnr_retry_count: 7,
        }
    }

    /// Sets up the protocol state once the peer's private data is known; `accepted` on the
    /// passive side.
    pub(super) fn start(&mut self, peer: &ConnData, accepted: bool) {
        self.link.start(peer, accepted);
        self.io.start(self.link.local().target_iomap_size, peer);
    }

    /// Starts the protocol and sends what is owed at once (the first credit update).
    pub(super) fn establish(&mut self, peer: &ConnData) -> Result<()> {
        self.start(peer, false);
        self.progress()?;
        Ok(())
    }

    /// Our connect private data.
    pub(super) fn conn_data(&self) -> [u8; crate::proto::wire::CONN_DATA_LEN] {
        self.link.conn_data()
    }

    /// Whether `shown` (the descriptor's POLL bits) is still what a live connection shows: it
    /// has not ended (none of GONE would be added) and POLLIN and POLLOUT, where shown, still
    /// hold. A cheap look for every call of a busy-polling program; false means: compute
    /// [`Conn::revents`]. Kept beside it: each condition here is one of its own.
    pub(super) fn still_shows(&self, shown: i16) -> bool {
        let core = &self.link.core;
        let f = core.flags();
        f.connected
            && f.readable
            && core.error().is_none()
            && (shown & libc::POLLIN == 0 || core.has_data())
            && (shown & libc::POLLOUT == 0 || core.can_send())
    }

    /// Whether a waiter on this connection must be woken by the completions of our own sends
    /// (the send CQ armed too, see `Endpoint::arm`): it waits for room to send (`room`), or
    /// something it waits for comes with them (gathered sends that leave once the writes
    /// before them complete, a credit update waiting for a control slot, without which the
    /// peer sends nothing more, MSG_ZEROCOPY notices). A waiter for data only is not: each of
    /// its own sends would otherwise wake it (or the service thread) for nothing.
    pub(super) fn wants_send_events(&self, room: bool) -> bool {
        room || self.link.core.waits_for_sends() || self.zc.in_flight()
    }

    /// Readiness as a kernel TCP socket reports it.
    pub(super) fn revents(&self) -> i16 {
        let f = self.link.core.flags();
        let mut r = 0;
        if self.link.core.has_data() || !f.readable {
            r |= libc::POLLIN;
        }
        if self.link.core.can_send() || !f.writable {
            r |= libc::POLLOUT;
        }
        // After an orderly disconnect the data still queued is read first, as after a TCP FIN:
        // POLLHUP only once it is drained (a reset reports at once, with POLLERR).
        if !f.connected && (!self.link.core.has_data() || self.link.core.error().is_some()) {
            r |= libc::POLLHUP;
        }
        // As for a kernel socket, MSG_ZEROCOPY notices waiting on the error queue: POLLERR.
        if self.link.core.error().is_some() || self.zc.has_notice() {
            r |= libc::POLLERR;
        }
        r
    }

    /// Data may still be sent: else the connection's error (ETIMEDOUT when keepalive gave
    /// up), EPIPE after our SHUT_WR, ECONNRESET when the connection went away.
    pub(super) fn check_writable(&self) -> Result<()> {
        if self.link.core.flags().writable {
            Ok(())
        } else if let Some(e) = self.link.core.error() {
            // As TCP's: the connection's error (ETIMEDOUT from keepalive) before EPIPE.
            Err(super::broken(e))
        } else if self.shut_wr {
            Err(Error::BrokenPipe)
        } else {
            Err(Error::ConnectionReset)
        }
    }

    /// Polls the CQ, feeds the core, reposts receives, sends owed credits and the iomap
    /// announcements owed. Returns whether anything completed.
    pub(super) fn progress(&mut self) -> Result<bool> {
        let Conn { link, io, .. } = self;
        let any = link.progress(|data, entry| io.take_window(data, entry))?;
        self.io.send_announcements(&mut self.link)?;
        self.zc.reap(self.link.sends_completed());
        Ok(any)
    }

    /// iWARP: whether rdma_disconnect now could lose data we sent. Soft-iWARP completes a send
    /// once TCP took it, and a TCP socket closed while the peer still sends (a credit update for
    /// the data we just sent, say) is reset, the data not yet transmitted dropped with it. So
    /// the disconnect waits until the peer sends nothing more: its DISCONNECT arrived or it
    /// disconnected itself (bounded, see `close`). RC over InfiniBand or RoCE acknowledges
    /// delivery: nothing to wait for there.
    pub(super) fn must_linger(&self) -> bool {
        self.link.config().msg_send
            && !self.cm_gone
            && !self.link.core.peer_done()
            && self.link.core.error().is_none()
    }

    pub(super) fn drain_cm_events(&mut self, channel: &EventChannel) -> Result<()> {
        while let Ok(ev) = channel.get_event() {
            trace!(
                "fd {}: event {:?} status {}",
                channel.fd(),
                ev.kind(),
                ev.status()
            );
            if matches!(
                ev.kind(),
                CmEventKind::Disconnected | CmEventKind::DeviceRemoval
            ) {
                self.cm_gone = true;
                // Everything the peer sent before disconnecting is in the CQ: take it first.
                self.progress()?;
                self.link.core.on_connection_lost();
            }
        }
        Ok(())
    }
}

/// A connection's busy-poll policy, in [`crate::verbs::ticks`]: from `polling_time`, adaptive
/// up to [`crate::socket::spin::CAP_US`] unless `polling_time` is configured.
pub fn new_spin() -> Spin {
    let c = Config::get();
    let tpu = crate::verbs::ticks_per_us();
    let cap = if c.adaptive_spin {
        crate::socket::spin::CAP_US * tpu
    } else {
        0
    };
    Spin::new(c.polling_time as u64 * tpu, cap)
}
