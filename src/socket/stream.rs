//! Stream rsockets: connection setup over rdma_cm, the data path over one RC QP, blocking and
//! non-blocking waits.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proto::stream::{
    self as core, CreditUpdate, DataWrite, LocalBuffers, SendPlan, Stream, StreamConfig,
    StreamError, WR_ID_MSG_SEND, WR_ID_RECV,
};
use crate::proto::wire::{self, ConnData, Ctrl, Msg, RemoteSge};
use crate::socket::config::Config;
use crate::socket::spin::Spin;
use crate::trace::trace;
use crate::verbs::{
    Access, CmEvent, CmEventKind, CmId, CmOption, Completion, ConnParam, Endpoint, EventChannel,
    MrId, Payload, SockAddr, Waker, poll_fds, raise_sigpipe,
};

mod iomap;
mod stage;
mod zerocopy;
pub use zerocopy::ZeroCopyNotice;

/// A non-blocking call that finds nothing to do looks at the CM channel when this many
/// microseconds passed since the last look (a vanished peer shows there, not in the CQ).
const CM_CHECK_US: u64 = 10_000;
/// Idle non-blocking calls between two reads of the tick counter for that check.
const CM_TICK_EVERY: u32 = 64;

/// Per-socket settings, fixed once the connection exists (as with librdmacm).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Send queue depth.
    pub sq_size: u32,
    /// Receive queue depth.
    pub rq_size: u32,
    /// Inline size requested.
    pub sq_inline: u32,
    /// Receive buffer bytes (SO_RCVBUF).
    pub rbuf_size: u32,
    /// Send buffer bytes (SO_SNDBUF).
    pub sbuf_size: u32,
    /// O_NONBLOCK.
    pub nonblocking: bool,
    /// SO_REUSEADDR (accepted for compatibility; rdma_cm ports are not in TIME_WAIT).
    pub reuseaddr: bool,
    /// TCP_NODELAY (always effectively on: a lone message is never delayed).
    pub nodelay: bool,
    /// SO_KEEPALIVE.
    pub keepalive: bool,
    /// TCP_KEEPIDLE: seconds of silence before the first probe.
    pub keepidle: u32,
    /// TCP_KEEPINTVL: seconds between probes.
    pub keepintvl: u32,
    /// TCP_KEEPCNT (kept for getsockopt: over RC one unacknowledged probe is conclusive).
    pub keepcnt: u32,
    /// SO_LINGER: `Some(seconds)` when on. Kept for getsockopt: close always drains the sends
    /// (bounded by the transport's retries), as librdmacm does, and on iWARP the connection
    /// lingers in the background until the peer is done (see `socket::linger`).
    pub linger: Option<i32>,
    /// SO_OOBINLINE (there is no out-of-band data; kept for getsockopt).
    pub oobinline: bool,
    /// IP_TOS.
    pub tos: u8,
    /// IPV6_V6ONLY.
    pub v6only: bool,
    /// RDMA_IOMAPSIZE: iomap entries offered to the peer.
    pub iomap_size: u16,
    /// SO_ZEROCOPY: MSG_ZEROCOPY sends from riomap'd memory go without a copy, with a
    /// completion notice on the error queue (see `zerocopy`).
    pub zerocopy: bool,
    /// FD_CLOEXEC (descriptor flag).
    pub cloexec: bool,
}

/// Default TCP_KEEPIDLE: the kernel's tcp_keepalive_time, else 7200 s (as librdmacm). Read
/// once per process, not at every rsocket().
fn default_keepidle() -> u32 {
    static IDLE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *IDLE.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_keepalive_time")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(7200)
    })
}

impl Options {
    fn from_config(c: &Config) -> Self {
        Options {
            sq_size: c.sqsize_default,
            rq_size: c.rqsize_default,
            sq_inline: c.inline_default,
            rbuf_size: c.mem_default,
            sbuf_size: c.wmem_default,
            nonblocking: false,
            reuseaddr: false,
            nodelay: false,
            keepalive: false,
            keepidle: default_keepidle(),
            keepintvl: 75,
            keepcnt: 9,
            linger: None,
            oobinline: false,
            tos: 0,
            v6only: false,
            iomap_size: c.iomap_size.min(u16::MAX as u32) as u16,
            zerocopy: false,
            cloexec: false,
        }
    }
}

/// Transport retries of the QP. librdmacm asks for 7, which Soft-RoCE treats as "retry for
/// ever": a dead peer would then never be reported. 6 is the largest finite count.
const TRANSPORT_RETRIES: u8 = 6;

/// How long connection setup steps may take before ETIMEDOUT.
const RESOLVE_TIMEOUT_MS: i32 = 2000;
const CM_WAIT: Duration = Duration::from_secs(30);

enum State {
    /// Created, maybe bound.
    Idle { id: CmId, bound: bool },
    /// Connect request sent; waiting for the reply.
    Connecting(Box<Conn>),
    /// Accepted and replied to; waiting for the peer's confirmation (the core is ready).
    Accepting(Box<Conn>),
    /// Listening; connect requests already taken off the channel wait in `pending`.
    Listening {
        id: CmId,
        pending: VecDeque<CmEvent>,
        /// Dual stack where the device's IPv6 wildcard listener does not take IPv4 (iWARP):
        /// a second listener on 0.0.0.0 at the same port, on the same channel.
        v4: Option<CmId>,
    },
    /// Connected (or was: the core knows whether it still is).
    Connected(Box<Conn>),
    /// A failed connect consumed the id (SO_ERROR tells why).
    Failed,
}

struct Inner {
    state: State,
    opts: Options,
    /// One thread sleeps on the descriptors; the others wait on the condvar.
    sleeping: bool,
    /// Pending SO_ERROR.
    so_error: i32,
    /// RDMA_ROUTE set by the application (`struct ibv_path_data[]`), used instead of resolving.
    route: Option<Vec<u8>>,
}

/// A stream rsocket.
pub struct StreamSocket {
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Threads waiting on `cv`: notifying costs a syscall, so only when someone waits.
    waiters: AtomicU32,
    /// Threads blocked on `inner`'s mutex (see `lock`).
    contenders: AtomicU32,
    /// Wakes the thread sleeping in `wait_conn` when another thread consumed its wake-up.
    waker: Waker,
    /// Address family given to rsocket (SO_DOMAIN).
    domain: i32,
    /// Set when the socket is in the descriptor table: the flusher can then reach it, so
    /// small sends may be gathered (see `flusher`).
    me: std::sync::OnceLock<std::sync::Weak<StreamSocket>>,
    /// The flusher holds this socket (registering again would cost a wake-up per send).
    pub(crate) in_flusher: std::sync::atomic::AtomicBool,
    /// Small sends of a streaming application, for the flusher to post (see `stage`).
    stage: stage::Stage,
    /// `opts.nonblocking`, readable without the lock (every send and receive asks).
    nonblocking: std::sync::atomic::AtomicBool,
    // Declared last: dropped after the CM id that uses it.
    channel: EventChannel,
}

/// Readiness of one rsocket for rpoll, and what to sleep on when it is not ready.
#[derive(Debug, Clone, Copy)]
pub struct PollState {
    /// POLLIN/POLLOUT/POLLHUP/POLLERR as for a kernel TCP socket.
    pub revents: i16,
    /// Descriptors that become readable when the state may have changed (after `arm`).
    pub wait_fds: [RawFd; 3],
    /// How many of `wait_fds` are valid.
    pub n_wait: usize,
}

impl std::fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamSocket(fd {})", self.channel.fd())
    }
}

/// An established connection's resources and state machine.
struct Conn {
    id: CmId,
    ep: Endpoint,
    core: Stream,
    sbuf: MrId,
    rbuf: MrId,
    tsgl: MrId,
    /// iWARP: 4-byte receive slots after the receive buffer (region, offset, slot count).
    msg_area: Option<(MrId, usize, u32)>,
    recv_slot: u32,
    shut_wr: bool,
    comps: Vec<Completion>,
    cfg: StreamConfig,
    local: LocalBuffers,
    /// Completion batches processed: the keepalive service turns changes into an idle timer,
    /// so the data path never reads the clock for it.
    activity: u64,
    /// Keepalive service: the activity count it last saw, and when it saw it change.
    seen_activity: (u64, Instant),
    /// Last keepalive probe.
    last_probe: Option<Instant>,
    /// When (ticks) a non-blocking call that found nothing to do last looked at the CM channel.
    cm_checked: u64,
    /// Non-blocking calls that found nothing to do (counts the reads of the tick counter).
    idle_calls: u32,
    /// How long blocking calls busy-poll before sleeping.
    spin: Spin,
    /// riomap state: the peer's windows, our mappings, announcements owed.
    io: iomap::IoMaps,
    /// MSG_ZEROCOPY calls in flight and notices not yet read.
    zc: zerocopy::ZeroCopy,
    /// The CM reported the connection gone (the peer disconnected, or the device went).
    cm_gone: bool,
    /// iWARP: our DISCONNECT went, rdma_disconnect is left for the lingering close (see
    /// `linger`).
    disconnect_owed: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The QP goes first, then the id, then the endpoint's MRs, CQ, channel and PD.
        self.id.destroy_qp();
    }
}

/// Receives posted beyond the credits granted, on iWARP (see [`Conn::setup`]): room for the
/// peer's control messages (credit updates, shutdown) while we do not poll.
const RECV_SLACK: u32 = 16;

impl Conn {
    /// Creates the endpoint and buffers on a routed/requested id.
    fn setup(mut id: CmId, opts: &Options, iomap: u16) -> Result<Self> {
        let dev = id.device_info()?;
        let max = dev
            .max_qp_wr
            .clamp(core::QP_MIN_SIZE as u32, core::QP_MAX_SIZE as u32);
        let sq = opts.sq_size.clamp(core::QP_MIN_SIZE as u32, max);
        let rq = opts.rq_size.clamp(core::QP_MIN_SIZE as u32, max);
        let mut inline = opts.sq_inline;
        if dev.iwarp {
            inline = inline.max(wire::MSG_SIZE as u32);
        }
        // iWARP has no receiver-not-ready retry: a message that finds no receive posted ends
        // the connection. The peer's data messages are bounded by the credits we grant (rq), its
        // credit updates and control messages are not, and receives are reposted only when we
        // poll: a peer that used all its credits and then sent a credit update while we did
        // not poll broke the connection (seen with the stress suite on Soft-iWARP). So on iWARP
        // a few receives more than the credits are posted.
        let rq = if dev.iwarp {
            rq.min(max.saturating_sub(RECV_SLACK))
                .max(core::QP_MIN_SIZE as u32)
        } else {
            rq
        };
        let rq_posted = if dev.iwarp {
            (rq + RECV_SLACK).min(max)
        } else {
            rq
        };
        let mut ep = id.create_endpoint(sq, rq_posted, inline)?;
        let sq_inline = ep.sq_inline();
        if dev.iwarp && sq_inline < wire::MSG_SIZE as u32 {
            return Err(Error::Unsupported(libc::ENOTSUP));
        }
        let cfg = StreamConfig {
            sq_size: sq as u16,
            rq_size: rq as u16,
            sq_inline,
            rbuf_size: opts.rbuf_size.max(4096) & !1,
            sbuf_size: opts.sbuf_size.max(core::SNDLOWAT),
            msg_send: dev.iwarp,
        };
        let sbuf = ep.register((cfg.sbuf_size + cfg.ctrl_area()) as usize, Access::Local)?;
        let tsgl = ep.register(
            wire::SGE_LEN * wire::SGL_SIZE as usize + wire::IOMAP_LEN * iomap as usize,
            Access::RemoteWrite,
        )?;
        let msg_bytes = if dev.iwarp {
            rq_posted as usize * wire::MSG_SIZE
        } else {
            0
        };
        let rbuf = ep.register(cfg.rbuf_size as usize + msg_bytes, Access::RemoteWrite)?;
        let msg_area = dev
            .iwarp
            .then_some((rbuf, cfg.rbuf_size as usize, rq_posted));
        let mut recv_slot = 0;
        ep.post_recvs(rq_posted, msg_area, &mut recv_slot)?;
        let (taddr, tkey) = ep.remote_handle(tsgl);
        let (raddr, rkey) = ep.remote_handle(rbuf);
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
        // The core is replaced once the peer's private data is known.
        let placeholder = ConnData {
            flags: 0,
            credits: 1,
            target_iomap_size: 0,
            target_sgl: RemoteSge::default(),
            data_buf: RemoteSge::default(),
        };
        let conn = Conn {
            id,
            ep,
            core: Stream::new(cfg, local, &placeholder),
            sbuf,
            rbuf,
            tsgl,
            msg_area,
            recv_slot,
            shut_wr: false,
            comps: Vec::with_capacity(32),
            cfg,
            local,
            activity: 0,
            seen_activity: (0, Instant::now()),
            last_probe: None,
            cm_checked: crate::verbs::ticks(),
            idle_calls: 0,
            spin: new_spin(),
            io: iomap::IoMaps::new(dev.max_rd_atom),
            zc: zerocopy::ZeroCopy::default(),
            cm_gone: false,
            disconnect_owed: false,
        };
        Ok(conn)
    }

    fn conn_param(&self) -> ConnParam {
        ConnParam {
            // RDMA reads (rioread) in both directions; iWARP also issues one while connecting
            // (librdmacm's workaround needs initiator_depth ≥ 1 there).
            responder_resources: self.io.rd_atom,
            initiator_depth: self.io.rd_atom.max(self.core.config().msg_send as u8),
            flow_control: 1,
            retry_count: TRANSPORT_RETRIES,
            rnr_retry_count: 7,
        }
    }

    /// Sets up the protocol state once the peer's private data is known.
    fn start(&mut self, peer: &ConnData) {
        self.core = Stream::new(self.cfg, self.local, peer);
        self.io.start(self.local.target_iomap_size, peer);
    }

    /// Starts the protocol and sends what is owed at once (the first credit update).
    fn establish(&mut self, peer: &ConnData) -> Result<()> {
        self.start(peer);
        self.progress()?;
        Ok(())
    }

    /// Our connect private data.
    fn conn_data(&self) -> [u8; wire::CONN_DATA_LEN] {
        Stream::local_conn_data(&self.cfg, &self.local).encode()
    }

    /// Readiness as a kernel TCP socket reports it.
    fn revents(&self) -> i16 {
        let f = self.core.flags();
        let mut r = 0;
        if self.core.has_data() || !f.readable {
            r |= libc::POLLIN;
        }
        if self.core.can_send() || !f.writable {
            r |= libc::POLLOUT;
        }
        // After an orderly disconnect the data still queued is read first, as after a TCP FIN:
        // POLLHUP only once it is drained (a reset reports at once, with POLLERR).
        if !f.connected && (!self.core.has_data() || self.core.error().is_some()) {
            r |= libc::POLLHUP;
        }
        // As for a kernel socket, MSG_ZEROCOPY notices waiting on the error queue: POLLERR.
        if self.core.error().is_some() || self.zc.has_notice() {
            r |= libc::POLLERR;
        }
        r
    }

    /// Data may still be sent: else EPIPE after our SHUT_WR, ECONNRESET when the connection
    /// went away.
    fn check_writable(&self) -> Result<()> {
        if self.core.flags().writable {
            Ok(())
        } else if self.shut_wr {
            Err(Error::BrokenPipe)
        } else {
            Err(Error::ConnectionReset)
        }
    }

    /// Posts a message: a 0-byte write with immediate, or an inline SEND on iWARP.
    fn post_msg(&self, msg: u32) -> Result<()> {
        if self.core.config().msg_send {
            self.ep
                .post_send(msg as u64, Payload::Inline(&msg.to_ne_bytes()), None, None)?;
        } else {
            self.ep
                .post_send(msg as u64, Payload::Empty, Some((0, 0)), Some(msg))?;
        }
        Ok(())
    }

    /// Posts an RDMA write carrying `msg` (with immediate, or followed by a SEND on iWARP).
    fn post_write_msg(&self, msg: u32, payload: Payload<'_>, remote: (u64, u32)) -> Result<()> {
        self.post_write_msg_id(msg as u64, msg, payload, remote)
    }

    /// [`Conn::post_write_msg`] with the write's own wr_id (flags besides the message).
    fn post_write_msg_id(
        &self,
        wr_id: u64,
        msg: u32,
        payload: Payload<'_>,
        remote: (u64, u32),
    ) -> Result<()> {
        if self.core.config().msg_send {
            self.ep.post_send(wr_id, payload, Some(remote), None)?;
            let op_only = (msg & !0x1FFF_FFFF) as u64 | WR_ID_MSG_SEND;
            self.ep
                .post_send(op_only, Payload::Inline(&msg.to_ne_bytes()), None, None)?;
        } else {
            self.ep.post_send(wr_id, payload, Some(remote), Some(msg))?;
        }
        Ok(())
    }

    fn refresh_target_sgl(&mut self) {
        let mut b = [0u8; 32];
        self.ep.read(self.tsgl, 0, &mut b);
        let e0 = RemoteSge::from_ne_bytes(b[0..16].try_into().expect("16 bytes"));
        let e1 = RemoteSge::from_ne_bytes(b[16..32].try_into().expect("16 bytes"));
        self.core.refresh_target_sgl([e0, e1]);
    }

    /// Polls the CQ, feeds the core, reposts receives and sends owed credits.
    /// Returns whether anything completed.
    fn progress(&mut self) -> Result<bool> {
        let mut any = false;
        loop {
            self.comps.clear();
            self.ep.poll(&mut self.comps, 32)?;
            if self.comps.is_empty() {
                break;
            }
            any = true;
            self.activity = self.activity.wrapping_add(1);
            let mut reposts = 0;
            for i in 0..self.comps.len() {
                let c = self.comps[i];
                if !c.ok {
                    trace!(
                        "completion failed: wr_id {:#x} status {} ({})",
                        c.wr_id,
                        c.status,
                        if c.wr_id & WR_ID_RECV == 0 {
                            "send"
                        } else {
                            "recv"
                        }
                    );
                }
                if c.wr_id & WR_ID_RECV == 0 {
                    self.io.on_send_completion(c.wr_id);
                    self.core.on_send_completion(c.wr_id, c.ok);
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
                        let Some((mr, base, _)) = self.msg_area else {
                            continue;
                        };
                        let slot = (c.wr_id & 0xFFFF_FFFF) as usize;
                        let mut b = [0u8; 4];
                        self.ep.read(mr, base + slot * 4, &mut b);
                        u32::from_ne_bytes(b)
                    }
                };
                match self.core.on_recv(raw) {
                    Ok(Msg::Credits(_)) => self.refresh_target_sgl(),
                    Ok(Msg::IomapSgl(data)) => self.take_window(data),
                    _ => {}
                }
            }
            if reposts > 0 && self.core.flags().connected {
                self.ep
                    .post_recvs(reposts, self.msg_area, &mut self.recv_slot)?;
            }
        }
        self.flush_due()?;
        self.send_credits()?;
        self.send_announcements()?;
        self.zc.reap(self.ep.sends_completed());
        Ok(any)
    }

    fn send_credits(&mut self) -> Result<()> {
        while let Some(CreditUpdate { msg, sge }) = self.core.poll_credit_update() {
            match sge {
                Some(w) if w.inline => {
                    self.post_write_msg(msg, Payload::Inline(&w.bytes), (w.remote_addr, w.rkey))?;
                }
                Some(w) => {
                    self.ep
                        .write(self.sbuf, w.ctrl_slot_offset as usize, &w.bytes);
                    let seg = [(w.ctrl_slot_offset, wire::SGE_LEN as u32), (0, 0)];
                    self.post_write_msg(
                        msg,
                        Payload::Region(self.sbuf, seg, 1),
                        (w.remote_addr, w.rkey),
                    )?;
                }
                None => self.post_msg(msg)?,
            }
        }
        Ok(())
    }

    /// Sends as much of `buf` as the credits and windows allow; returns bytes posted.
    fn send_some(&mut self, buf: &[u8], olen: &mut u32, coalesce: bool) -> Result<usize> {
        let mut sent = 0;
        while sent < buf.len() {
            let left = (buf.len() - sent).min(u32::MAX as usize) as u32;
            let max = left.min(*olen);
            let plan = if coalesce {
                self.core.plan_send(max)
            } else {
                self.core
                    .plan_write(max)
                    .map(|write| SendPlan::Post { write, fresh: true })
            };
            match plan {
                None => break,
                Some(SendPlan::Post { write, fresh: true }) => {
                    if *olen < core::MAX_TRANSFER {
                        *olen <<= 1;
                    }
                    self.post_data(write, Some(&buf[sent..sent + write.len as usize]))?;
                    sent += write.len as usize;
                }
                Some(SendPlan::Post {
                    write,
                    fresh: false,
                }) => self.post_data(write, None)?,
                Some(SendPlan::Queued {
                    ring,
                    ring_segs,
                    len,
                }) => {
                    self.copy_to_ring(&ring[..ring_segs], &buf[sent..sent + len as usize]);
                    sent += len as usize;
                }
            }
        }
        self.flush_due()?;
        Ok(sent)
    }

    fn copy_to_ring(&self, ring: &[(u32, u32)], mut data: &[u8]) {
        for &(o, l) in ring {
            self.ep.write(self.sbuf, o as usize, &data[..l as usize]);
            data = &data[l as usize..];
        }
    }

    /// Posts a planned data write: `src` holds its bytes (copied into the ring unless inline),
    /// or, for a flushed pending write, the ring already does.
    fn post_data(&self, w: DataWrite, src: Option<&[u8]>) -> Result<()> {
        if let Some(i) = w.exhausted_sge {
            self.ep
                .write(self.tsgl, i * wire::SGE_LEN, &[0u8; wire::SGE_LEN]);
        }
        let payload = match src {
            Some(data) if w.inline => Payload::Inline(data),
            Some(data) => {
                self.copy_to_ring(&w.ring[..w.ring_segs], data);
                Payload::Region(self.sbuf, w.ring, w.ring_segs)
            }
            None => Payload::Region(self.sbuf, w.ring, w.ring_segs),
        };
        self.post_write_msg(w.msg, payload, (w.remote_addr, w.rkey))
    }

    /// Posts the gathered small sends once nothing else is in flight.
    fn flush_due(&mut self) -> Result<()> {
        if self.core.should_flush() {
            self.flush_now()?;
        }
        Ok(())
    }

    /// Posts the gathered small sends now (before a shutdown, say).
    fn flush_now(&mut self) -> Result<()> {
        if let Some(w) = self.core.flush() {
            trace!("flush {} gathered bytes", w.len);
            self.post_data(w, None)?;
        }
        Ok(())
    }

    fn recv_some(&mut self, buf: &mut [u8], peek: bool) -> usize {
        let Conn { core, ep, rbuf, .. } = self;
        let mut off = 0;
        core.consume(buf.len(), peek, |o, l| {
            ep.read(*rbuf, o as usize, &mut buf[off..off + l as usize]);
            off += l as usize;
        })
    }

    /// iWARP: whether rdma_disconnect now could lose data we sent. Soft-iWARP completes a send
    /// once TCP took it, and a TCP socket closed while the peer still sends (a credit update for
    /// the data we just sent, say) is reset, the data not yet transmitted dropped with it. So
    /// the disconnect waits until the peer sends nothing more: its DISCONNECT arrived or it
    /// disconnected itself (bounded, see `linger`). RC over InfiniBand or RoCE acknowledges
    /// delivery: nothing to wait for there.
    fn must_linger(&self) -> bool {
        self.cfg.msg_send && !self.cm_gone && !self.core.peer_done() && self.core.error().is_none()
    }

    fn drain_cm_events(&mut self, channel: &EventChannel) -> Result<()> {
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
                self.core.on_connection_lost();
            }
        }
        Ok(())
    }
}

/// What a send call returns: the bytes sent if any went, else the error, with SIGPIPE for
/// EPIPE unless MSG_NOSIGNAL (as a kernel socket).
fn send_result(r: Result<usize>, sent: usize, flags: i32) -> Result<usize> {
    match r {
        Ok(n) => Ok(n),
        Err(_) if sent > 0 => Ok(sent),
        Err(Error::BrokenPipe) => {
            if flags & libc::MSG_NOSIGNAL == 0 {
                raise_sigpipe();
            }
            Err(Error::BrokenPipe)
        }
        Err(e) => Err(e),
    }
}

/// A connection's busy-poll policy, in [`crate::verbs::ticks`]: from `polling_time`, adaptive
/// up to [`crate::socket::spin::CAP_US`] unless `polling_time` is configured.
pub(crate) fn new_spin() -> Spin {
    let c = Config::get();
    let tpu = crate::verbs::ticks_per_us();
    let cap = if c.adaptive_spin {
        crate::socket::spin::CAP_US * tpu
    } else {
        0
    };
    Spin::new(c.polling_time as u64 * tpu, cap)
}

/// Waits until `fds` has input or `timeout` passes (None: forever). EINTR counts as a wake-up.
fn wait_readable(fds: &[RawFd], timeout: Option<Duration>) -> Result<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    Ok(poll_fds(&mut pfds, ms)? > 0)
}

/// Maps a failed connection-setup event to the errno a TCP socket would give.
fn cm_failure(ev: &CmEvent) -> Error {
    match ev.kind() {
        CmEventKind::Rejected => Error::ConnectionRefused,
        CmEventKind::Unreachable | CmEventKind::ResolveError => match -ev.status() {
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENODEV | libc::EADDRNOTAVAIL => {
                Error::Os(std::io::Error::from_raw_os_error(libc::EHOSTUNREACH))
            }
            libc::ECONNREFUSED => Error::ConnectionRefused,
            _ => Error::TimedOut,
        },
        CmEventKind::ConnectError => Error::ConnectionRefused,
        _ => Error::Protocol(format!(
            "unexpected connection manager event {:?}",
            ev.kind()
        )),
    }
}

/// Waits for the event `want`, skipping unrelated ones; maps failures like TCP.
fn expect_event(channel: &EventChannel, want: CmEventKind, timeout: Duration) -> Result<CmEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let ev = match channel.get_event() {
            Ok(ev) => ev,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::TimedOut);
                }
                wait_readable(&[channel.fd()], Some(deadline - now))?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let k = ev.kind();
        if k == want {
            return Ok(ev);
        }
        if matches!(k, CmEventKind::Other(_)) {
            continue;
        }
        return Err(cm_failure(&ev));
    }
}

impl StreamSocket {
    /// A new unconnected stream rsocket.
    pub fn new(domain: i32, nonblocking: bool) -> Result<Self> {
        let channel = EventChannel::new()?;
        let id = CmId::new(&channel)?;
        let mut opts = Options::from_config(Config::get());
        opts.nonblocking = nonblocking;
        Self::from_parts(channel, State::Idle { id, bound: false }, opts, domain)
    }

    fn from_parts(channel: EventChannel, state: State, opts: Options, domain: i32) -> Result<Self> {
        Ok(StreamSocket {
            nonblocking: std::sync::atomic::AtomicBool::new(opts.nonblocking),
            inner: Mutex::new(Inner {
                state,
                opts,
                sleeping: false,
                so_error: 0,
                route: None,
            }),
            cv: Condvar::new(),
            waiters: AtomicU32::new(0),
            contenders: AtomicU32::new(0),
            waker: Waker::new()?,
            domain,
            me: std::sync::OnceLock::new(),
            in_flusher: std::sync::atomic::AtomicBool::new(false),
            stage: stage::Stage::default(),
            channel,
        })
    }

    /// An AF_INET socket takes only IPv4 addresses; AF_INET6 takes IPv6 (and IPv4-mapped).
    fn check_family(&self, a: &SockAddr) -> Result<()> {
        match (self.domain, a.family()) {
            (libc::AF_INET, libc::AF_INET)
            | (libc::AF_INET6, libc::AF_INET6)
            | (libc::AF_IB, _) => Ok(()),
            _ => Err(Error::Unsupported(libc::EAFNOSUPPORT)),
        }
    }

    /// How this socket reports an address: IPv4 as IPv4-mapped on AF_INET6 sockets.
    fn report(&self, a: SockAddr) -> SockAddr {
        if self.domain == libc::AF_INET6 {
            a.map_v4()
        } else {
            a
        }
    }

    /// Lets the socket hand itself to the flusher (called when it enters the descriptor table).
    pub fn set_handle(&self, me: std::sync::Weak<StreamSocket>) {
        let _ = self.me.set(me);
    }

    /// Flusher: posts gathered sends that are due. Returns the completion-channel fd to wait on
    /// (CQ armed) while some are still waiting for writes in flight, or None when done.
    pub(crate) fn flush_state(&self) -> Result<Option<RawFd>> {
        let mut g = self.lock();
        let State::Connected(conn) = &mut g.state else {
            self.drop_stage();
            self.settle_stage(false);
            return Ok(None);
        };
        self.flush_stage(conn)?;
        self.drive(conn)?;
        let connected = conn.core.flags().connected;
        let staged = self.settle_stage(connected && conn.core.has_pending());
        if !connected || (!staged && !conn.core.has_pending()) {
            return Ok(None);
        }
        conn.ep.arm()?;
        self.drive(conn)?;
        Ok((conn.core.has_pending() || self.stage.len() > 0).then(|| conn.ep.comp_fd()))
    }

    /// Address family (SO_DOMAIN).
    pub fn domain(&self) -> i32 {
        self.domain
    }

    /// Whether the socket listens (SO_ACCEPTCONN).
    pub fn is_listening(&self) -> bool {
        matches!(self.lock().state, State::Listening { .. })
    }

    /// Sets an rdma_cm option on the id while it is not connected (later changes are kept
    /// for getsockopt only, as upstream).
    pub fn set_cm_option(&self, opt: CmOption, value: &[u8]) -> Result<()> {
        match &self.lock().state {
            State::Idle { id, .. } | State::Listening { id, .. } => match id.set_option(opt, value)
            {
                // Options the device or kernel lacks (e.g. REUSEADDR on some transports) are
                // kept as settings, like librdmacm does.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::ENOTSUP)) => {
                    Ok(())
                }
                r => r.map_err(Error::from),
            },
            _ => Ok(()),
        }
    }

    /// Path MTU of the connection's route (TCP_MAXSEG).
    pub fn path_mtu(&self) -> Option<u32> {
        match &self.lock().state {
            State::Idle { id, .. } | State::Listening { id, .. } => id.path_mtu(),
            State::Connected(c) | State::Connecting(c) | State::Accepting(c) => c.id.path_mtu(),
            State::Failed => None,
        }
    }

    /// Sets RDMA_ROUTE (used by the next connect instead of route resolution).
    pub fn set_route(&self, route: Vec<u8>) {
        self.lock().route = Some(route);
    }

    /// The route set with RDMA_ROUTE.
    pub fn route(&self) -> Option<Vec<u8>> {
        self.lock().route.clone()
    }

    /// SO_KEEPALIVE on or off; probes are sent by the process-wide keepalive service.
    pub fn set_keepalive(self: &std::sync::Arc<Self>, on: bool) {
        self.set_options(|o| o.keepalive = on);
        if on {
            crate::socket::keepalive::register(self);
        }
    }

    /// Called by the keepalive service: probes the peer when the connection was idle for
    /// TCP_KEEPIDLE and the last probe is TCP_KEEPINTVL old.
    pub(crate) fn keepalive_tick(&self, now: Instant) -> Result<()> {
        let mut g = self.lock();
        let (idle, intvl) = (g.opts.keepidle as u64, g.opts.keepintvl as u64);
        if !g.opts.keepalive {
            return Ok(());
        }
        let State::Connected(conn) = &mut g.state else {
            return Ok(());
        };
        self.drive(conn)?;
        if conn.seen_activity.0 != conn.activity {
            conn.seen_activity = (conn.activity, now);
        }
        let quiet = now.saturating_duration_since(conn.seen_activity.1);
        let since_probe = conn.last_probe.map(|t| now.saturating_duration_since(t));
        if quiet < Duration::from_secs(idle)
            || since_probe.is_some_and(|d| d < Duration::from_secs(intvl))
        {
            return Ok(());
        }
        if let Some(wr_id) = conn.core.post_keepalive() {
            conn.last_probe = Some(now);
            conn.ep
                .post_send(wr_id, Payload::Empty, Some((0, 0)), None)?;
        }
        Ok(())
    }

    /// The descriptor number (the CM event channel's fd, so it never collides with a real fd).
    pub fn fd(&self) -> RawFd {
        self.channel.fd()
    }

    /// Whether data may be posted on `c` now: EPIPE/ECONNRESET if it cannot be sent at all,
    /// false while staged sends wait (they go first: the order on the wire is the call order).
    fn may_post_data(&self, c: &Conn) -> Result<bool> {
        c.check_writable()?;
        Ok(self.stage.len() == 0)
    }

    /// Processes the connection's completions; wakes condvar waiters if anything changed.
    fn drive(&self, conn: &mut Conn) -> Result<bool> {
        let mut any = conn.progress()?;
        // Staged sends go before anything this call does.
        any |= self.drain_stage(conn)? > 0;
        if any {
            self.notify();
        }
        Ok(any)
    }

    /// Wakes the threads waiting on the condvar, if any (call with the lock held).
    fn notify(&self) {
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.cv.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the protocol state half-updated in a way
        // that matters more than losing the socket; keep serving.
        match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                // Counted, so that a thread busy-polling under the lock lets us in.
                self.contenders.fetch_add(1, Ordering::Relaxed);
                let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                self.contenders.fetch_sub(1, Ordering::Relaxed);
                g
            }
        }
    }

    /// Current options.
    pub fn options(&self) -> Options {
        self.lock().opts
    }

    /// Changes options (only sizes before connecting take effect, as upstream).
    pub fn set_options(&self, f: impl FnOnce(&mut Options)) {
        let mut g = self.lock();
        f(&mut g.opts);
        self.nonblocking
            .store(g.opts.nonblocking, Ordering::Relaxed);
    }

    /// O_NONBLOCK is set.
    fn is_nonblocking(&self) -> bool {
        self.nonblocking.load(Ordering::Relaxed)
    }

    /// Whether a connection exists (or is being set up).
    pub fn is_connected(&self) -> bool {
        matches!(
            self.lock().state,
            State::Connected(_) | State::Connecting(_) | State::Accepting(_)
        )
    }

    /// Binds to a local address.
    pub fn bind(&self, addr: &SockAddr) -> Result<()> {
        let mut g = self.lock();
        match &mut g.state {
            State::Idle { id, bound } => {
                if *bound {
                    return Err(Error::InvalidArgument);
                }
                self.check_family(addr)?;
                if let Some(std::net::SocketAddr::V6(v6)) = addr.to_std()
                    && v6.ip().is_unspecified()
                {
                    // Dual stack is done with a separate IPv4 listener (see v4_companion), the
                    // same way on every transport: the IPv6 id takes IPv6 only.
                    let _ = id.set_option(CmOption::AfOnly, &1i32.to_ne_bytes());
                }
                id.bind(&addr.unmap_v4())
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ENODEV) => {
                            Error::Os(std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))
                        }
                        _ => e.into(),
                    })?;
                *bound = true;
                Ok(())
            }
            _ => Err(Error::InvalidArgument),
        }
    }

    /// Starts listening.
    pub fn listen(&self, backlog: i32) -> Result<()> {
        let mut g = self.lock();
        let st = std::mem::replace(&mut g.state, State::Failed);
        match st {
            State::Idle { id, bound } => match id.listen(backlog.max(1)) {
                Ok(()) => {
                    let v4 = if g.opts.v6only {
                        None
                    } else {
                        self.v4_companion(&id, backlog)
                    };
                    g.state = State::Listening {
                        id,
                        pending: VecDeque::new(),
                        v4,
                    };
                    Ok(())
                }
                Err(e) => {
                    g.state = State::Idle { id, bound };
                    Err(e.into())
                }
            },
            s @ State::Listening { .. } => {
                g.state = s;
                Ok(())
            }
            s => {
                g.state = s;
                Err(Error::InvalidArgument)
            }
        }
    }

    /// For an AF_INET6 listener on the wildcard address: an IPv4 wildcard listener on the same
    /// port (the IPv6 id was bound IPv6-only, since iWARP's IPv6 wildcard does not take IPv4).
    fn v4_companion(&self, id: &CmId, backlog: i32) -> Option<CmId> {
        let local = id.local_addr().to_std()?;
        match local {
            std::net::SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
                let v4 = CmId::new(&self.channel).ok()?;
                let any = std::net::SocketAddr::from(([0, 0, 0, 0], v6.port()));
                v4.bind(&any.into()).ok()?;
                v4.listen(backlog.max(1)).ok()?;
                Some(v4)
            }
            _ => None,
        }
    }

    /// Moves connect requests from the channel into the listener's queue.
    fn collect_requests(&self, g: &mut Inner) {
        if let State::Listening { pending, .. } = &mut g.state {
            while let Ok(ev) = self.channel.get_event() {
                trace!(
                    "fd {}: listener event {:?} status {}",
                    self.channel.fd(),
                    ev.kind(),
                    ev.status()
                );
                if ev.kind() == CmEventKind::ConnectRequest {
                    pending.push_back(ev);
                }
            }
        }
    }

    /// Accepts one connection (blocking unless non-blocking).
    pub fn accept(&self) -> Result<StreamSocket> {
        loop {
            let mut g = self.lock();
            if !matches!(g.state, State::Listening { .. }) {
                return Err(Error::InvalidArgument);
            }
            self.collect_requests(&mut g);
            let opts = g.opts;
            let next = match &mut g.state {
                State::Listening { pending, .. } => pending.pop_front(),
                _ => None,
            };
            drop(g);
            let Some(ev) = next else {
                if opts.nonblocking {
                    return Err(Error::WouldBlock);
                }
                wait_readable(&[self.channel.fd()], None)?;
                continue;
            };
            let private = ev.private_data();
            let param = ev.conn_param();
            let Some(id) = ev.take_request_id() else {
                continue;
            };
            // The event must be acked before the id can migrate to its own channel.
            drop(ev);
            match Self::accept_one(id, &private, param, opts, self.domain) {
                Ok(s) => return Ok(s),
                // A bad request or a peer that vanished mid-handshake is not the caller's
                // problem: take the next one (non-blocking callers get EAGAIN).
                Err(e) => {
                    trace!("fd {}: accept failed: {e}", self.channel.fd());
                    if opts.nonblocking {
                        return Err(Error::WouldBlock);
                    }
                }
            }
        }
    }

    fn accept_one(
        id: CmId,
        private: &[u8],
        req: ConnParam,
        opts: Options,
        domain: i32,
    ) -> Result<StreamSocket> {
        let peer = match ConnData::decode(private) {
            Ok(p) => p,
            Err(e) => {
                id.reject();
                return Err(Error::Protocol(e.to_string()));
            }
        };
        let channel = EventChannel::new()?;
        id.migrate(&channel)?;
        let mut conn = Conn::setup(id, &opts, opts.iomap_size)?;
        conn.start(&peer);
        if conn.core.config().msg_send {
            // iWARP without MPA peer-to-peer mode: the initiator speaks first.
            conn.core.hold_sends_until_peer_speaks();
        }
        let param = ConnParam {
            responder_resources: req.responder_resources.min(conn.io.rd_atom.max(1)),
            initiator_depth: req.initiator_depth.min(conn.io.rd_atom.max(1)),
            flow_control: req.flow_control,
            retry_count: TRANSPORT_RETRIES,
            rnr_retry_count: 7,
        };
        conn.id.accept(&conn.conn_data(), &param)?;
        // Like librdmacm, the connection completes when the peer's confirmation (ESTABLISHED)
        // is seen by the next call on the socket: a single-threaded program may be the peer.
        Self::from_parts(channel, State::Accepting(Box::new(conn)), opts, domain)
    }

    /// Connects to `dst`. Address and route resolution are local and done here; a non-blocking
    /// socket then returns EINPROGRESS, rpoll reports POLLOUT when the connect finished and
    /// SO_ERROR tells how.
    pub fn connect(&self, dst: &SockAddr) -> Result<()> {
        let mut g = self.lock();
        let st = std::mem::replace(&mut g.state, State::Failed);
        let id = match st {
            State::Idle { id, .. } => id,
            s @ (State::Connecting(_) | State::Accepting(_)) => {
                g.state = s;
                return Err(Error::Already);
            }
            s @ State::Connected(_) => {
                g.state = s;
                return Err(Error::IsConnected);
            }
            s => {
                g.state = s;
                return Err(Error::InvalidArgument);
            }
        };
        if let Err(e) = self.check_family(dst) {
            g.state = State::Idle { id, bound: false };
            return Err(e);
        }
        let dst = &dst.unmap_v4();
        let opts = g.opts;
        let route = g.route.clone();
        let started = (|| -> Result<Conn> {
            id.resolve_addr(None, dst, RESOLVE_TIMEOUT_MS)?;
            expect_event(&self.channel, CmEventKind::AddrResolved, CM_WAIT)?;
            match route {
                Some(r) => id.set_option(CmOption::IbPath, &r)?,
                None => id.resolve_route(RESOLVE_TIMEOUT_MS)?,
            }
            expect_event(&self.channel, CmEventKind::RouteResolved, CM_WAIT)?;
            let conn = Conn::setup(id, &opts, opts.iomap_size)?;
            conn.id.connect(&conn.conn_data(), &conn.conn_param())?;
            Ok(conn)
        })();
        g.state = State::Connecting(Box::new(started?));
        let deadline = Instant::now() + CM_WAIT;
        loop {
            self.advance_connect(&mut g);
            match g.state {
                State::Connected(_) => return Ok(()),
                State::Failed => return Err(errno_error(std::mem::take(&mut g.so_error))),
                _ if opts.nonblocking => return Err(Error::InProgress),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                g.state = State::Failed;
                return Err(Error::TimedOut);
            }
            drop(g);
            wait_readable(&[self.channel.fd()], Some(deadline - now))?;
            g = self.lock();
        }
    }

    /// Drives a connect or accept in progress with the CM events queued (never blocks).
    fn advance_connect(&self, g: &mut Inner) {
        while matches!(g.state, State::Connecting(_) | State::Accepting(_)) {
            let ev = match self.channel.get_event() {
                Ok(ev) => ev,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return,
                Err(e) => {
                    g.so_error = e.raw_os_error().unwrap_or(libc::EIO);
                    g.state = State::Failed;
                    return;
                }
            };
            let kind = ev.kind();
            trace!(
                "fd {}: {} event {kind:?} status {}",
                self.channel.fd(),
                if matches!(g.state, State::Accepting(_)) {
                    "accept"
                } else {
                    "connect"
                },
                ev.status()
            );
            if matches!(kind, CmEventKind::Other(_)) {
                continue;
            }
            let st = std::mem::replace(&mut g.state, State::Failed);
            let next: Result<State> = match (st, kind) {
                (State::Connecting(mut conn), CmEventKind::Established) => {
                    let peer = ConnData::decode(&ev.private_data())
                        .map_err(|e| Error::Protocol(e.to_string()));
                    drop(ev);
                    peer.and_then(|p| conn.establish(&p))
                        .map(|()| State::Connected(conn))
                }
                (State::Accepting(mut conn), CmEventKind::Established) => {
                    drop(ev);
                    conn.progress().map(|_| State::Connected(conn))
                }
                (st, _) => {
                    let e = if matches!(st, State::Accepting(_)) {
                        // The peer gave up on a connection we were accepting.
                        Error::ConnectionReset
                    } else {
                        cm_failure(&ev)
                    };
                    // The event goes (acked) before the id it names.
                    drop(ev);
                    drop(st);
                    Err(e)
                }
            };
            match next {
                Ok(s) => g.state = s,
                Err(e) => {
                    g.so_error = e.errno();
                    g.state = State::Failed;
                }
            }
        }
    }

    /// Readiness for rpoll. Drives connection setup and completions; with `arm` = the events
    /// the caller waits for, also arms the CQ (unless they are ready) so that `wait_fds` become
    /// readable on the next change.
    pub fn poll_state(&self, arm: Option<i16>) -> Result<PollState> {
        let mut g = self.lock();
        self.advance_connect(&mut g);
        self.collect_requests(&mut g);
        let ch = self.channel.fd();
        let mut ps = PollState {
            revents: 0,
            wait_fds: [ch, -1, -1],
            n_wait: 1,
        };
        match &mut g.state {
            State::Idle { .. } => ps.revents = libc::POLLOUT | libc::POLLHUP,
            State::Connecting(_) | State::Accepting(_) => {}
            State::Failed => {
                ps.revents = libc::POLLOUT | libc::POLLHUP;
                if g.so_error != 0 {
                    ps.revents |= libc::POLLERR;
                }
            }
            State::Listening { pending, .. } => {
                if !pending.is_empty() {
                    ps.revents = libc::POLLIN;
                }
            }
            State::Connected(conn) => {
                self.drive(conn)?;
                ps.revents = conn.revents();
                // Arm unless what the caller waits for is there already (other readiness,
                // such as POLLOUT while it waits for POLLIN, must not stop the arming).
                let wanted =
                    |r: i16| arm.is_some_and(|e| r & (e | libc::POLLERR | libc::POLLHUP) == 0);
                if wanted(ps.revents) {
                    conn.ep.arm()?;
                    // A completion that raced with arming is visible now.
                    self.drive(conn)?;
                    ps.revents = conn.revents();
                }
                // The waker too: the flusher thread may take the CQ event that was ours and
                // passes it on there.
                ps.wait_fds = [conn.ep.comp_fd(), ch, self.waker.fd()];
                ps.n_wait = 3;
            }
        }
        Ok(ps)
    }

    /// After rpoll slept: consume the completion-channel, CM and waker wake-ups among the
    /// descriptors in `ready` (those poll(2) found readable) so they don't repeat. Only those:
    /// each look at a descriptor that has nothing is a syscall on the latency path.
    pub fn poll_woke(&self, ready: &[RawFd]) -> Result<()> {
        self.woke(false, ready)
    }

    /// After the flusher thread's sleep on this socket's completion channel `fd` ended.
    pub(crate) fn flusher_woke(&self, fd: RawFd) -> Result<()> {
        self.woke(true, &[fd])
    }

    /// Consumes what woke a sleeper. The completion channel raises one event per arming and
    /// every sleeper on it (wait_conn, rpoll, the flusher) may have armed it: an event taken by
    /// one is passed on through the waker, which the others also sleep on.
    /// `ready`: the descriptors poll(2) found readable.
    fn woke(&self, flusher: bool, ready: &[RawFd]) -> Result<()> {
        let cm = ready.contains(&self.channel.fd());
        let mut g = self.lock();
        let sleeping = g.sleeping;
        if let State::Connected(conn) = &mut g.state {
            let comp = ready.contains(&conn.ep.comp_fd());
            // One arming raises at most one event, and the CQ is armed again only once that
            // event was taken: there is at most one to take.
            let took = comp && conn.ep.take_cq_event();
            if cm {
                conn.drain_cm_events(&self.channel)?;
            }
            if took && (sleeping || flusher) {
                self.waker.wake();
            } else if !flusher && !sleeping && ready.contains(&self.waker.fd()) {
                // rpoll: a wake-up passed to us is used up (a wait_conn sleeper keeps its own).
                self.waker.reset();
            }
            self.notify();
        } else if cm && matches!(g.state, State::Idle { .. } | State::Failed) {
            // Stray CM events (after a failed connect) would keep the channel readable.
            while self.channel.get_event().is_ok() {}
        }
        Ok(())
    }

    /// Runs `step` until it yields a value, sleeping between attempts; `nonblock` turns a wait
    /// into EAGAIN. `step` sees the connection after each round of completion processing.
    fn wait_conn<R>(
        &self,
        nonblock: bool,
        mut step: impl FnMut(&mut Conn) -> Result<Option<R>>,
    ) -> Result<R> {
        let mut g = self.lock();
        // Busy-poll window in ticks, from when the spin started: no clock syscalls.
        let mut spin_start: Option<u64> = None;
        // When the wait began and whether it slept, for the adaptive spin.
        let mut wait_start: Option<u64> = None;
        let mut slept = false;
        loop {
            if matches!(g.state, State::Connecting(_) | State::Accepting(_)) {
                self.advance_connect(&mut g);
                if matches!(g.state, State::Connecting(_) | State::Accepting(_)) {
                    if nonblock {
                        return Err(Error::WouldBlock);
                    }
                    drop(g);
                    wait_readable(&[self.channel.fd()], Some(CM_WAIT))?;
                    g = self.lock();
                    continue;
                }
                if matches!(g.state, State::Failed) {
                    return Err(errno_error(std::mem::take(&mut g.so_error)));
                }
            }
            let State::Connected(conn) = &mut g.state else {
                return Err(Error::NotConnected);
            };
            if self.drive(conn)? {
                spin_start = None;
            }
            if let Some(r) = step(conn)? {
                if let Some(w0) = wait_start {
                    conn.spin
                        .record(crate::verbs::ticks().wrapping_sub(w0), slept);
                }
                self.notify();
                return Ok(r);
            }
            if nonblock {
                // A program that only retries on EAGAIN never sleeps on the CM channel, so a
                // peer that vanished (DISCONNECTED, no completion) would go unnoticed: look at
                // the channel now and then. Timed with the tick counter (a clock read costs a
                // syscall where the clock source is not in the vDSO, as in the test VM).
                // (Even the tick counter is read only every CM_TICK_EVERY idle calls: under
                // emulation it is not free either.)
                conn.idle_calls = conn.idle_calls.wrapping_add(1);
                let now = (conn.idle_calls % CM_TICK_EVERY == 0).then(crate::verbs::ticks);
                if let Some(now) = now
                    && now.wrapping_sub(conn.cm_checked)
                        >= CM_CHECK_US * crate::verbs::ticks_per_us()
                {
                    conn.cm_checked = now;
                    let was = conn.core.flags().connected;
                    conn.drain_cm_events(&self.channel)?;
                    if was && !conn.core.flags().connected {
                        self.notify();
                        continue;
                    }
                }
                return Err(Error::WouldBlock);
            }
            let now = crate::verbs::ticks();
            wait_start.get_or_insert(now);
            let t0 = *spin_start.get_or_insert(now);
            let conn_window = conn.spin.window();
            if now.wrapping_sub(t0) < conn_window {
                if self.contenders.load(Ordering::Relaxed) > 0 {
                    // Another thread wants the socket (a send while we wait to receive, the
                    // flusher): let it have it rather than keep it out for the whole spin.
                    // Yielding, as it may need this CPU to run.
                    drop(g);
                    while self.contenders.load(Ordering::Relaxed) > 0
                        && crate::verbs::ticks().wrapping_sub(t0) < conn_window
                    {
                        std::thread::yield_now();
                    }
                    g = self.lock();
                }
                continue;
            }
            if g.sleeping {
                // Counted under the lock, so a notifier (also under the lock) cannot miss us.
                self.waiters.fetch_add(1, Ordering::Relaxed);
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                self.waiters.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let State::Connected(conn) = &mut g.state else {
                return Err(Error::NotConnected);
            };
            conn.ep.arm()?;
            if self.drive(conn)? {
                continue;
            }
            let mut fds =
                [conn.ep.comp_fd(), self.channel.fd(), self.waker.fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            g.sleeping = true;
            slept = true;
            drop(g);
            let r = poll_fds(&mut fds, -1);
            g = self.lock();
            g.sleeping = false;
            // Only touch what woke us: each extra read is a syscall on the latency path.
            let [comp, cm, wake] = fds.map(|p| p.revents != 0);
            if wake {
                self.waker.reset();
            }
            if let State::Connected(conn) = &mut g.state {
                // An armed CQ raises one event; another thread may have taken it already.
                if comp {
                    conn.ep.take_cq_event();
                }
                let d = if cm {
                    conn.drain_cm_events(&self.channel)
                } else {
                    Ok(())
                };
                self.notify();
                d?;
            }
            spin_start = None;
            r?;
        }
    }

    /// Sends `buf`; blocking sends everything, non-blocking what fits (EAGAIN if nothing).
    /// Writing after SHUT_WR gives EPIPE and raises SIGPIPE unless MSG_NOSIGNAL.
    pub fn send(&self, buf: &[u8], flags: i32) -> Result<usize> {
        if flags & libc::MSG_ZEROCOPY != 0 && self.lock().opts.zerocopy && !buf.is_empty() {
            return self.send_zero_copy(buf, flags);
        }
        let t0 = crate::verbs::ticks();
        if let Some(n) = self.try_stage(buf, t0) {
            return Ok(n);
        }
        let nonblock = flags & libc::MSG_DONTWAIT != 0 || self.is_nonblocking();
        if buf.is_empty() {
            return self.wait_conn(true, |_| Ok(Some(0)));
        }
        let mut sent = 0;
        let mut olen = self.stage.first_write_size(t0);
        let handle = self.me.get();
        let coalesce = handle.is_some();
        let mut pending = false;
        let r = self.wait_conn(nonblock, |c| {
            if !self.may_post_data(c)? {
                return Ok(None);
            }
            sent += c.send_some(&buf[sent..], &mut olen, coalesce)?;
            pending = c.core.has_pending();
            Ok((sent == buf.len() || (nonblock && sent > 0)).then_some(sent))
        });
        if pending
            && let Some(h) = handle
            && !self.in_flusher.swap(true, Ordering::AcqRel)
        {
            // Gathered sends leave when the writes in flight complete, even if we go idle.
            trace!(
                "fd {}: gathered send, flusher registered",
                self.channel.fd()
            );
            crate::socket::flusher::register(h.clone());
        }
        if r.is_ok() && coalesce {
            self.sent_directly(t0, olen);
        }
        send_result(r, sent, flags)
    }

    /// Receives into `buf` (MSG_PEEK, MSG_WAITALL, MSG_DONTWAIT honoured). 0 means end of stream.
    pub fn recv(&self, buf: &mut [u8], flags: i32) -> Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0 || self.is_nonblocking();
        let peek = flags & libc::MSG_PEEK != 0;
        self.stage.on_recv();
        let waitall = flags & libc::MSG_WAITALL != 0 && !peek;
        let mut got = 0;
        let r = self.wait_conn(nonblock, |c| {
            if c.core.has_data() {
                got += c.recv_some(&mut buf[got..], peek);
                c.send_credits()?;
                if !waitall || got == buf.len() {
                    return Ok(Some(got));
                }
            }
            if !c.core.flags().readable && !c.core.has_data() {
                if let Some(e) = c.core.error()
                    && got == 0
                {
                    return Err(broken(e));
                }
                return Ok(Some(got));
            }
            Ok(None)
        });
        match r {
            Ok(n) => Ok(n),
            Err(_) if got > 0 => Ok(got),
            Err(e) => Err(e),
        }
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: i32) -> Result<()> {
        let (rd, wr) = match how {
            libc::SHUT_RD => (true, false),
            libc::SHUT_WR => (false, true),
            libc::SHUT_RDWR => (true, true),
            _ => return Err(Error::InvalidArgument),
        };
        // An accepted socket is connected for its caller even while the peer's confirmation
        // (ESTABLISHED) has not been seen yet: wait for it, as the other calls do.
        if matches!(self.lock().state, State::Accepting(_)) {
            self.wait_conn(false, |_| Ok(Some(())))?;
        }
        if wr {
            // Staged sends leave before the shutdown (or are dropped if the connection broke).
            self.close_stage();
            if self.stage.len() > 0 {
                self.wait_conn(false, |_| Ok((self.stage.len() == 0).then_some(())))?;
            }
        }
        let ctrl = {
            let mut g = self.lock();
            let State::Connected(c) = &mut g.state else {
                return Err(Error::NotConnected);
            };
            if wr {
                c.shut_wr = true;
            }
            c.core.shutdown(rd, wr)
        };
        let Some(ctrl) = ctrl else {
            return Ok(());
        };
        // Like librdmacm, shutdown waits for a control slot and for the sends to drain.
        self.wait_conn(false, |c| {
            // Gathered data goes before the control message.
            c.flush_now()?;
            if !c.core.can_send_ctrl() {
                return Ok(None);
            }
            if let Some(m) = c.core.post_ctrl(ctrl) {
                c.post_msg(m)?;
            }
            Ok(Some(()))
        })?;
        self.wait_conn(false, |c| Ok(c.core.all_sends_done().then_some(())))?;
        if ctrl == Ctrl::Disconnect
            && let State::Connected(c) = &mut self.lock().state
        {
            c.core.set_disconnected();
            if c.must_linger() {
                c.disconnect_owed = true;
            } else {
                c.id.disconnect();
            }
        }
        Ok(())
    }

    /// Orderly close: disconnect if still connected. Resources go when the last handle drops.
    /// On iWARP the disconnect may linger in the background (see `linger`).
    pub fn close(&self) -> Result<()> {
        let connected =
            matches!(&self.lock().state, State::Connected(c) if c.core.flags().connected);
        if connected {
            let _ = self.shutdown(libc::SHUT_RDWR);
        }
        let mut g = self.lock();
        if let State::Connected(c) = &mut g.state
            && c.disconnect_owed
            && c.must_linger()
            && let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade)
        {
            drop(g);
            crate::socket::linger::start(me);
            self.waker.wake();
            return Ok(());
        }
        self.finish_close(&mut g);
        Ok(())
    }

    /// Disconnects and lets the connection's resources go with the last handle.
    fn finish_close(&self, g: &mut Inner) {
        if let State::Connected(c) | State::Connecting(c) | State::Accepting(c) = &mut g.state {
            c.id.disconnect();
        }
        g.state = State::Failed;
        self.waker.wake();
    }

    /// Lingering close: takes what arrived (the peer's DISCONNECT, its CM disconnect) and
    /// says whether the connection may go now. If not, returns the descriptors to sleep on
    /// (the CQ armed) until it may.
    pub(crate) fn linger_state(&self) -> Option<[RawFd; 2]> {
        let mut g = self.lock();
        let State::Connected(c) = &mut g.state else {
            return None;
        };
        c.ep.take_cq_event();
        let ok = c.drain_cm_events(&self.channel).is_ok()
            && c.progress().is_ok()
            && c.ep.arm().is_ok()
            && c.progress().is_ok();
        (ok && c.must_linger()).then(|| [c.ep.comp_fd(), self.channel.fd()])
    }

    /// Ends a lingering close.
    pub(crate) fn end_linger(&self) {
        self.finish_close(&mut self.lock());
    }

    /// Local address.
    pub fn local_addr(&self) -> Result<SockAddr> {
        let a = match &self.lock().state {
            State::Idle { id, .. } | State::Listening { id, .. } => id.local_addr(),
            State::Connected(c) | State::Connecting(c) | State::Accepting(c) => c.id.local_addr(),
            State::Failed => return Err(Error::NotConnected),
        };
        Ok(self.report(a))
    }

    /// Peer address.
    pub fn peer_addr(&self) -> Result<SockAddr> {
        match &self.lock().state {
            State::Connected(c) | State::Accepting(c) => Ok(self.report(c.id.peer_addr())),
            _ => Err(Error::NotConnected),
        }
    }

    /// A one-line description of the socket's state, for diagnostics.
    pub fn describe(&self) -> String {
        let g = self.lock();
        match &g.state {
            State::Idle { bound, .. } => format!("idle (bound {bound})"),
            State::Connecting(_) => "connecting".into(),
            State::Accepting(_) => "accepting".into(),
            State::Listening { pending, v4, .. } => format!(
                "listening ({} pending{})",
                pending.len(),
                if v4.is_some() { ", IPv4 companion" } else { "" }
            ),
            State::Connected(c) => format!("connected: {:?}", c.core),
            State::Failed => format!("failed (so_error {})", g.so_error),
        }
    }

    /// Takes the pending socket error (SO_ERROR); drives a connect in progress first.
    pub fn take_error(&self) -> i32 {
        let mut g = self.lock();
        self.advance_connect(&mut g);
        if g.so_error == 0
            && let State::Connected(c) = &g.state
            && let Some(e) = c.core.error()
        {
            return broken(e).errno();
        }
        std::mem::take(&mut g.so_error)
    }
}

/// What a broken connection reports, as TCP would: a keepalive that went unanswered is
/// ETIMEDOUT, anything else (reset, failed transfer, protocol violation) ECONNRESET.
fn broken(e: &StreamError) -> Error {
    match e {
        StreamError::KeepaliveTimeout => Error::TimedOut,
        _ => Error::ConnectionReset,
    }
}

/// An error from a saved errno (SO_ERROR of a failed connect).
fn errno_error(e: i32) -> Error {
    Error::from(std::io::Error::from_raw_os_error(if e == 0 {
        libc::EIO
    } else {
        e
    }))
}
