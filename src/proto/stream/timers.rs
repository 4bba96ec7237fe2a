//! The connection's timers, sans-IO: SO_KEEPALIVE probes, the persist probes of a send that
//! waits for the peer's room, and the bound of a lingering close.
//! The caller passes the time in ([`Stream::poll_timeout`], [`Stream::handle_timeout`], as
//! quinn-proto does); nothing here reads a clock.

use std::time::{Duration, Instant};

use super::Stream;

/// How long a closed connection may linger waiting for the peer (iWARP, see the socket
/// layer's lingering close).
pub const LINGER: Duration = Duration::from_secs(2);

/// A send that waits for the peer's room with nothing of ours in flight probes this long after
/// the wait began ([`Stream::send_starved`]), then each time twice as long after the last probe,
/// up to [`PERSIST_MAX`] apart: as TCP's persist timer, a probe is a work request the peer's
/// device must acknowledge, so that a dead link ends the wait once the device gives up on it.
pub const PERSIST_FIRST: Duration = Duration::from_secs(1);
/// The longest time between two persist probes.
pub const PERSIST_MAX: Duration = Duration::from_secs(60);

/// SO_KEEPALIVE timing, as TCP's: probe after `idle` of silence, then every `interval`; the
/// connection is dead when `count` probes went unanswered (`idle + interval * count` of
/// silence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// TCP_KEEPIDLE.
    pub idle: Duration,
    /// TCP_KEEPINTVL.
    pub interval: Duration,
    /// TCP_KEEPCNT (at least 1).
    pub count: u32,
}

impl Keepalive {
    /// The silence after which the connection is dead.
    pub fn limit(&self) -> Duration {
        self.idle
            .saturating_add(self.interval.saturating_mul(self.count.max(1)))
    }
}

/// Timer state of the connection (times passed in by the caller; the core reads no clock).
#[derive(Debug, Clone, Copy)]
pub(super) struct Timers {
    keepalive: Option<Keepalive>,
    /// The completion count last seen, and when it was seen to change: silence since then.
    seen: (u64, Instant),
    /// When the timers were last looked at.
    checked: Instant,
    last_probe: Option<Instant>,
    /// A lingering close must end by then.
    linger_until: Option<Instant>,
    /// A send waits for the peer's room: since our send count was this, the next persist
    /// probe is due then, and the one after it that much later.
    persist: Option<(u16, Instant, Duration)>,
}

/// What [`Stream::handle_timeout`] found due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeout {
    /// A keepalive probe to post (a 0-byte RDMA write with this wr_id).
    pub probe: Option<u64>,
    /// The lingering close ran out of time.
    pub linger_over: bool,
    /// Keepalive gave up (the connection failed with [`super::StreamError::KeepaliveTimeout`]):
    /// wake whoever waits on it.
    pub dead: bool,
}

impl Stream {
    /// Turns keepalive on (`Some`) or off at `now`.
    pub fn set_keepalive(&mut self, k: Option<Keepalive>, now: Instant) {
        let activity = self.activity;
        let t = self.timers(now);
        t.keepalive = k;
        t.seen = (activity, now);
    }

    /// The keepalive setting.
    pub fn keepalive(&self) -> Option<Keepalive> {
        self.timers.and_then(|t| t.keepalive)
    }

    /// Starts a lingering close at `now`: it ends at [`LINGER`] later at the latest.
    pub fn start_linger(&mut self, now: Instant) {
        self.timers(now).linger_until = Some(now + LINGER);
    }

    fn timers(&mut self, now: Instant) -> &mut Timers {
        let activity = self.activity;
        self.timers.get_or_insert(Timers {
            keepalive: None,
            seen: (activity, now),
            checked: now,
            last_probe: None,
            linger_until: None,
            persist: None,
        })
    }

    /// When [`Stream::handle_persist`] is due next: None while no send waits for the peer's
    /// room ([`Stream::send_starved`]) or the wait is not known to the timer yet (the first
    /// call starts it).
    pub fn persist_deadline(&self) -> Option<Instant> {
        let t = self.timers.as_ref()?;
        t.persist.filter(|_| self.send_starved()).map(|p| p.1)
    }

    /// The persist timer at `now`, for a send that waits for the peer's room (window or
    /// credit, [`Stream::send_starved`]): the wait starts when first seen here, and ends when
    /// a send went out since (our send count moved) or none waits any more. After
    /// [`PERSIST_FIRST`] of waiting, then twice as long after each probe (up to
    /// [`PERSIST_MAX`]), a probe is due: returned as the wr_id of a 0-byte RDMA write to post
    /// (one control slot). Only when nothing of ours is in flight: a work request in flight
    /// already makes the device notice a dead link. The probe's completion is traffic; its
    /// failure (the device gave up) fails the connection, which ends the wait.
    pub fn handle_persist(&mut self, now: Instant) -> Option<u64> {
        if !self.send_starved() {
            if let Some(t) = self.timers.as_mut() {
                t.persist = None;
            }
            return None;
        }
        let (sent, idle) = (self.sseq_no, self.nothing_in_flight());
        let t = self.timers(now);
        let (since, at, wait) = match t.persist {
            Some(p) if p.0 == sent => p,
            _ => {
                t.persist = Some((sent, now + PERSIST_FIRST, PERSIST_FIRST));
                return None;
            }
        };
        if now < at {
            return None;
        }
        if !idle {
            t.persist = Some((since, now + wait, wait));
            return None;
        }
        let probe = self.post_keepalive();
        let next = (wait * 2).min(PERSIST_MAX);
        if let Some(t) = self.timers.as_mut() {
            t.persist = Some((since, now + next, next));
        }
        probe
    }

    /// When [`Stream::handle_timeout`] is due next, if ever. While traffic flows the keepalive
    /// timer looks again every quarter of TCP_KEEPIDLE (at most 250 ms apart when TCP_KEEPIDLE
    /// is 1 s or less, at most 1 s apart otherwise): it sees traffic only as a change in the
    /// completion count, so a probe goes (and the connection is given up) at most that look
    /// late, and never early.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.timers.as_ref()?;
        let probe = t.keepalive.filter(|_| self.flags.connected).map(|k| {
            let at = t.seen.1 + k.idle;
            let at = t.last_probe.map_or(at, |p| at.max(p + k.interval));
            let dead = t.seen.1 + k.limit();
            let look = (k.idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(1));
            at.min(dead).min(t.checked + look)
        });
        match (probe, t.linger_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Handles the timers at `now`: a keepalive probe when the connection was silent for
    /// TCP_KEEPIDLE and the last probe is TCP_KEEPINTVL old (one control slot, when one is
    /// free); the end of the connection with [`super::StreamError::KeepaliveTimeout`] after
    /// [`Keepalive::limit`] of silence (TCP_KEEPCNT probes unanswered: an answered probe
    /// completes, which is traffic) or when the device gives up on a probe; the end of a
    /// lingering close.
    pub fn handle_timeout(&mut self, now: Instant) -> Timeout {
        let activity = self.activity;
        let mut out = Timeout::default();
        let Some(t) = self.timers.as_mut() else {
            return out;
        };
        if t.seen.0 != activity {
            t.seen = (activity, now);
        }
        t.checked = now;
        out.linger_over = t.linger_until.is_some_and(|u| now >= u);
        let Some(k) = t.keepalive else {
            return out;
        };
        let quiet = now.saturating_duration_since(t.seen.1);
        if quiet >= k.limit() && self.flags.connected {
            self.fail(super::StreamError::KeepaliveTimeout);
            out.dead = true;
            return out;
        }
        let since_probe = t.last_probe.map(|p| now.saturating_duration_since(p));
        if quiet < k.idle || since_probe.is_some_and(|d| d < k.interval) {
            return out;
        }
        out.probe = self.post_keepalive();
        if out.probe.is_some()
            && let Some(t) = self.timers.as_mut()
        {
            t.last_probe = Some(now);
        }
        out
    }
}
