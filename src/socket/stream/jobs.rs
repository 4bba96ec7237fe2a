//! What the background services do with a socket: post gathered sends (the flusher),
//! probe an idle connection (keepalive), finish a lingering close.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::{State, StreamSocket};
use crate::error::Result;
use crate::proto::transport::Source;

impl StreamSocket {
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
        let connected = conn.link.core.flags().connected;
        let staged = self.settle_stage(connected && conn.link.core.has_pending());
        if !connected || (!staged && !conn.link.core.has_pending()) {
            return Ok(None);
        }
        conn.link.t.arm()?;
        self.drive(conn)?;
        Ok((conn.link.core.has_pending() || self.stage.len() > 0).then(|| conn.link.t.comp_fd()))
    }

    /// After the flusher thread's sleep on this socket's completion channel `fd` ended.
    pub(crate) fn flusher_woke(&self, fd: RawFd) -> Result<()> {
        self.woke(true, &[fd])
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
        if let Some(wr_id) = conn.link.core.post_keepalive() {
            conn.last_probe = Some(now);
            conn.link.post_write(wr_id, Source::Empty, (0, 0))?;
        }
        Ok(())
    }

    /// Lingering close: takes what arrived (the peer's DISCONNECT, its CM disconnect) and
    /// says whether the connection may go now. If not, returns the descriptors to sleep on
    /// (the CQ armed) until it may.
    pub(crate) fn linger_state(&self) -> Option<[RawFd; 2]> {
        let mut g = self.lock();
        let State::Connected(c) = &mut g.state else {
            return None;
        };
        c.link.t.take_cq_event();
        let ok = c.drain_cm_events(&self.channel).is_ok()
            && c.progress().is_ok()
            && c.link.t.arm().is_ok()
            && c.progress().is_ok();
        (ok && c.must_linger()).then(|| [c.link.t.comp_fd(), self.channel.fd()])
    }

    /// Ends a lingering close.
    pub(crate) fn end_linger(&self) {
        self.finish_close(&mut self.lock());
    }
}
