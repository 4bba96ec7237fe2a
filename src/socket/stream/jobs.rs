//! A stream socket's jobs with the service thread (`socket::service`): post gathered and staged
//! sends once the writes in flight complete, probe an idle connection (SO_KEEPALIVE), finish a
//! lingering close. Each runs under the socket's lock, like a call of the application.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::{State, StreamSocket};
use crate::error::Result;
use crate::proto::stream::Keepalive;
use crate::socket::service::{self, Jobs, Serviced, Wait};
use crate::trace::trace;

/// How long an iWARP connection we initiated may stay silent before the nudge job's first
/// READ (see `StreamSocket::nudge_job`); each next one waits twice as long.
pub(super) const NUDGE_FIRST: Duration = Duration::from_millis(50);
/// READs the nudge job sends at most.
pub(super) const NUDGE_TRIES: u32 = 5;

/// What the flush job waits for before it runs again.
enum FlushWait {
    /// Writes in flight to complete: the completion channel (the CQ armed).
    Completions(RawFd),
    /// The application to stop calling (its calls post what is staged or gathered meanwhile).
    Until(Instant),
}

impl StreamSocket {
    /// This socket as the service holds it (None before it has a handle, see `set_handle`).
    fn serviced(&self) -> Option<Arc<dyn Serviced>> {
        let me = self.me.get()?.upgrade()?;
        Some(me)
    }

    /// Hands `jobs` to the service thread. Returns false if it cannot take them.
    pub(super) fn add_jobs(&self, jobs: Jobs) -> bool {
        self.serviced().is_some_and(|s| service::add(&s, jobs))
    }

    /// Hands the flush job work from a call of the application (gathered or staged sends, or
    /// a completion event the call took from it). The job's first look is a post's time away
    /// (the application, in a call now, may well post them itself meanwhile): the service
    /// thread is set to wake then rather than woken now, a wake-up that would only take the
    /// CPU from the application. Returns false if the service cannot take the job.
    pub(super) fn hand_flush(&self) -> bool {
        let Some(after) = self.stage.first_look() else {
            return self.add_jobs(super::FLUSH);
        };
        self.serviced()
            .is_some_and(|s| service::add_at(&s, super::FLUSH, Instant::now() + after))
    }

    /// The jobs the service thread has for this socket now (for tests and diagnostics).
    pub fn service_jobs(&self) -> Jobs {
        self.serviced()
            .map(|s| service::jobs_of(&s))
            .unwrap_or_default()
    }

    /// Whether the socket is closed and its connection lingers (iWARP, see `close`).
    pub fn is_lingering(&self) -> bool {
        self.service_jobs().linger
    }

    /// Test builds: the next job the service thread runs for this socket panics (the socket
    /// must then fail with an error while the others go on).
    #[cfg(debug_assertions)]
    pub fn inject_job_panic(&self) {
        self.panic_in_job.store(true, Ordering::SeqCst);
    }

    /// SO_KEEPALIVE on or off; the probes are a job of the service thread.
    pub fn set_keepalive(&self, on: bool) {
        self.set_options(|o| o.keepalive = on);
        if on {
            self.add_jobs(Jobs {
                keepalive: true,
                ..Jobs::default()
            });
        }
    }

    /// Flush job: posts staged and gathered sends that are due. Returns what to wait for while
    /// some are still waiting: the completion channel (CQ armed) for writes in flight, or a
    /// time while the application still calls (its calls post them then, see
    /// `Stage::app_still_calling`); None when done.
    fn flush_job(&self, now: Instant) -> Result<Option<FlushWait>> {
        // The application posts what it staged or gathered itself while it goes on calling.
        let t = crate::verbs::ticks();
        let wait = self.stage.app_still_calling(
            t,
            self.in_call.load(Ordering::Acquire) > 0,
            self.last_exit.load(Ordering::Relaxed),
        );
        if let Some(ticks) = wait {
            return Ok(Some(FlushWait::Until(
                now + crate::verbs::wait_of_ticks(ticks),
            )));
        }
        // A call that holds the socket now drives the connection (posting what is gathered as
        // the writes before it complete) and posts the stage: waiting for its lock would only
        // make it wait for ours next, while we post in its place.
        let Some(mut g) = self.try_lock_now() else {
            return Ok(Some(FlushWait::Until(now + self.stage.retry_after())));
        };
        let State::Connected(conn) = &mut g.state else {
            self.drop_stage();
            self.settle_stage(false);
            return Ok(None);
        };
        let r = self.flush_round(conn);
        self.publish(&mut g);
        if r.is_err() {
            // The connection failed: the job ends, and the next send reports the error.
            self.drop_stage();
            self.settle_stage(false);
        }
        r
    }

    fn flush_round(&self, conn: &mut Conn) -> Result<Option<FlushWait>> {
        self.flush_stage(conn)?;
        self.drive(conn)?;
        if self.flush_over(conn) {
            return Ok(None);
        }
        // Gathered and staged sends wait for the completions of the writes in flight.
        conn.link.t.arm(true)?;
        // A completion that raced with arming is visible now; taking it may post the rest.
        self.drive(conn)?;
        // Decided again after that drive: the job must not end while the stage still counts on
        // it (a send that finds the stage handed over does not hand it over again).
        Ok((!self.flush_over(conn)).then(|| FlushWait::Completions(conn.link.t.comp_fd())))
    }

    /// Whether the flush job is over: nothing staged and no gathered send waiting, or no
    /// connection left to send them on. When it is, the stage and the gathered sends are let go
    /// of (`settle_stage`), so that the next send hands them over again.
    fn flush_over(&self, conn: &Conn) -> bool {
        let connected = conn.link.core.flags().connected;
        if !connected {
            self.drop_stage();
            self.settle_stage(false);
            return true;
        }
        let more = conn.link.core.has_pending();
        let staged = self.settle_stage(more);
        !staged && !more
    }

    /// Keepalive job: takes the completions, then probes when the core's timer says so.
    /// Returns when to look again, or None when the job is over (keepalive off, connection
    /// gone).
    fn keepalive_job(&self, now: Instant) -> Option<Instant> {
        let mut g = self.lock();
        if !g.opts.keepalive {
            return None;
        }
        let k = Keepalive {
            idle: Duration::from_secs(g.opts.keepidle as u64),
            interval: Duration::from_secs(g.opts.keepintvl as u64),
            count: g.opts.keepcnt,
        };
        // Set before connecting: the job is added again once connected (`advance_connect`).
        let State::Connected(conn) = &mut g.state else {
            return None;
        };
        if conn.link.core.keepalive() != Some(k) {
            conn.link.core.set_keepalive(Some(k), now);
        }
        if self.drive(conn).is_err() || !conn.link.core.flags().connected {
            return None;
        }
        let due = conn.link.core.handle_timeout(now);
        if due.dead {
            // No completion tells a caller asleep on the CQ: it is woken, and the descriptor
            // shows the error.
            trace!("{self:?}: keepalive: no answer, connection given up");
            self.notify();
            self.waker.wake();
            self.publish(&mut g);
            return None;
        }
        if let Some(wr_id) = due.probe
            && conn.link.post_probe(wr_id).is_err()
        {
            return None;
        }
        conn.link.core.poll_timeout()
    }

    /// Persist job: while a send waits for the peer's room (a window or a credit, see
    /// `Stream::send_starved`) with nothing of ours in flight, a probe now and then, as TCP's
    /// persist timer sends (`Stream::handle_persist`). Only the peer's credit update ends such
    /// a wait, and without keepalive nothing else would notice a link that died after our last
    /// write was acknowledged and before that update came: the send would wait for ever. A
    /// probe is a work request the peer's device must acknowledge; the device gives up on it
    /// on a dead link, which fails the connection and ends the send. Returns when to look
    /// again, None when the job is over (no send waits any more).
    fn persist_job(&self, now: Instant) -> Option<Instant> {
        let mut g = self.lock();
        let State::Connected(conn) = &mut g.state else {
            return None;
        };
        let mut over = self.drive(conn).is_err();
        if !over && let Some(wr_id) = conn.link.core.handle_persist(now) {
            trace!("{self:?}: a send waits for the peer's room: persist probe");
            over = conn.link.post_persist_probe(wr_id).is_err();
        }
        let next = conn.link.core.persist_deadline().filter(|_| !over);
        conn.persist_job = next.is_some();
        next
    }

    /// Nudge job, for an iWARP connection we initiated: while the peer has sent nothing since
    /// the connection was set up, a 0-byte RDMA READ goes after [`NUDGE_FIRST`], then after
    /// twice that, [`NUDGE_TRIES`] times in all. The accepting side sends nothing before our
    /// first message has arrived (see `Stream::hold_sends_until_peer_speaks`), and Soft-iWARP
    /// may leave that message unread in the accepting side's TCP socket: when it arrives while
    /// the socket is still being handed from the connection manager to the queue pair, no
    /// receive processing follows until more bytes arrive. Both ends then wait for ever (seen
    /// in tests/vm on siw: the initiator asleep with its credit updates sent, the acceptor
    /// asleep with nothing received). The READ is such bytes; its response is all the peer's
    /// device sends back. Returns when to look again, None when the job is over.
    fn nudge_job(&self, now: Instant) -> Option<Instant> {
        let mut g = self.lock();
        let State::Connected(conn) = &mut g.state else {
            return None;
        };
        if self.drive(conn).is_err()
            || conn.link.core.peer_heard()
            || !conn.link.core.flags().connected
        {
            return None;
        }
        let (at, tries) = conn.nudge.get_or_insert((now + NUDGE_FIRST, 0));
        if now < *at {
            return Some(*at);
        }
        if *tries >= NUDGE_TRIES {
            return None;
        }
        if let Some(wr_id) = conn.link.core.post_keepalive() {
            trace!("{self:?}: peer silent since the connection: a READ to nudge it");
            if conn.link.post_probe(wr_id).is_err() {
                return None;
            }
        }
        *tries += 1;
        *at = now + NUDGE_FIRST * (1 << *tries);
        Some(*at)
    }

    /// Linger job: takes what arrived (the peer's DISCONNECT, its CM disconnect) and ends the
    /// close once the connection may go or its time is up; until then returns the descriptors
    /// to sleep on (the CQ armed) and the deadline.
    fn linger_job(&self, now: Instant) -> Option<Wait> {
        let mut g = self.lock();
        let State::Connected(c) = &mut g.state else {
            return None;
        };
        c.link.t.take_cq_event();
        let ok = c.drain_cm_events(&self.channel).is_ok()
            && c.progress().is_ok()
            && c.link.t.arm(true).is_ok()
            && c.progress().is_ok();
        let over = c.link.core.handle_timeout(now).linger_over;
        if ok && !over && c.must_linger() {
            return Some(Wait {
                jobs: Jobs {
                    linger: true,
                    ..Jobs::default()
                },
                fds: vec![c.link.t.comp_fd(), self.channel.fd()],
                deadline: c.link.core.poll_timeout(),
            });
        }
        self.finish_close(&mut g);
        None
    }
}

impl Serviced for StreamSocket {
    fn serve(&self, jobs: Jobs, now: Instant, ready: &[RawFd]) -> Wait {
        #[cfg(debug_assertions)]
        if self.panic_in_job.swap(false, Ordering::SeqCst) {
            panic!("{self:?}: panic injected into a service job");
        }
        if !ready.is_empty() {
            // Takes the completion event (passing it on to a thread sleeping in a call).
            let _ = self.woke(true, ready);
        }
        if jobs.linger {
            // A closed socket has no other job.
            return self.linger_job(now).unwrap_or_default();
        }
        let mut w = Wait::default();
        // Errors show up on the application's next call; the job just ends.
        if jobs.flush
            && let Ok(Some(f)) = self.flush_job(now)
        {
            w.jobs.flush = true;
            match f {
                FlushWait::Completions(fd) => w.fds.push(fd),
                FlushWait::Until(at) => w.deadline = Some(at),
            }
        }
        if jobs.keepalive
            && let Some(at) = self.keepalive_job(now)
        {
            w.jobs.keepalive = true;
            w.deadline = Some(w.deadline.map_or(at, |d| d.min(at)));
        }
        if jobs.nudge
            && let Some(at) = self.nudge_job(now)
        {
            w.jobs.nudge = true;
            w.deadline = Some(w.deadline.map_or(at, |d| d.min(at)));
        }
        if jobs.persist
            && let Some(at) = self.persist_job(now)
        {
            w.jobs.persist = true;
            w.deadline = Some(w.deadline.map_or(at, |d| d.min(at)));
        }
        if jobs.watch
            && let Some(wt) = self.watch_job(now, ready)
        {
            w.jobs.watch = true;
            w.fds.extend(wt.fds);
            w.deadline = match (w.deadline, wt.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        w
    }

    fn job_failed(&self, jobs: Jobs) {
        let mut g = self.lock();
        if let State::Connected(c) = &mut g.state {
            c.link.core.fail_internal();
        }
        self.drop_stage();
        self.settle_stage(false);
        if jobs.linger {
            self.finish_close(&mut g);
        }
        self.notify();
        drop(g);
        self.waker.wake();
    }
}
