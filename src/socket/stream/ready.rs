//! The rsocket's descriptor shows the socket's readiness (`verbs::ready`), so that poll(2),
//! select(2) and epoll see what rpoll reports, with no thread per socket or per epoll set.
//!
//! When the application is inside a call, the call itself brings the descriptor up to date
//! before it returns. When it is not (it sleeps in epoll_wait, say), something must notice that
//! data arrived: the service thread, which sleeps on the socket's completion and CM channels
//! (the CQ armed) and shows the change (a *watch* job). Watching costs an arming and a wake-up
//! of the service thread per completion, which a program that never sleeps on the descriptor
//! should not pay: one that calls again by itself (busy-polling on EAGAIN, blocking calls,
//! rpoll) finds its data before the service thread can show it. So each socket is in one of
//! two modes:
//!
//! - *Watched* (from the start): every call publishes the readiness before it returns and
//!   leaves the CQ armed; the service thread shows what arrives in between.
//! - *Self-driven*: after [`WASTED_MAX`] more wake-ups of the service thread that found the
//!   application inside a call or found nothing to show (its calls had taken what came before
//!   it could be shown) than twice the useful ones (that showed something new to an application
//!   outside a call); rpoll counts as a call, and so does an application that polls by itself
//!   (more than [`POLLING_CALLS`] EAGAIN returns, or rpoll looks without a wait that found
//!   nothing, since the watch job last ran), or at once after a burst of [`POLLING_BURST`]
//!   such calls between two wake-ups. Calls then show only
//!   the end of the connection on the descriptor (POLLRDHUP, POLLHUP, POLLERR) and take back
//!   readiness that went (so that a program asleep on the descriptor never spins on a stale
//!   POLLIN), arm nothing,
//!   and the service thread sleeps no more on the socket's channels (no syscall or wake-up
//!   added per message). The service
//!   thread looks every [`TICK`] at first: a socket whose application made no call for
//!   [`IDLE`], and none by a second look [`IDLE`] later, is watched again (its descriptor
//!   brought up to date then). Each look that
//!   finds the application still calling doubles the time to the next, up to [`TICK_MAX`]:
//!   under emulation, with every CPU taken by busy-polling programs, each look preempts one of
//!   them (a 64 B ping-pong's mean went from 175 to 142 us with looks 100 ms apart instead of
//!   10). A program that busy-polls and then sleeps on the descriptor waits at most about
//!   `TICK_MAX + 2 * IDLE` for its first wake-up (`TICK + 2 * IDLE` after a short burst).
//!
//! A watched socket can also be *hooked* ([`StreamSocket::hook`]): a wait set of the application
//! (the preload puts the completion channel in the program's epoll sets) sleeps on the
//! completion channel itself and calls [`StreamSocket::hook_event`] when it becomes readable.
//! The service thread then leaves the channel to it (it still watches the CM channel), so a
//! message to a program asleep in epoll_wait costs one wake-up, the program's, instead of two
//! (the service thread's, then the program's).

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Inner, State, StreamSocket};
use crate::socket::service::{Jobs, Wait};
use crate::trace::{trace, trace_verbose};
use crate::verbs::ready::GONE;
use crate::verbs::{ticks, ticks_per_us};

/// Wasted wake-ups of the service thread, less twice the useful ones, after which a socket
/// counts as self-driven (see the module documentation).
pub(super) const WASTED_MAX: u8 = 16;
/// How often the service thread looks at a self-driven socket at first.
pub(super) const TICK: Duration = Duration::from_millis(10);
/// The longest time between two looks at a self-driven socket in use ([`TICK`] doubled three
/// times).
pub(super) const TICK_MAX: Duration = Duration::from_millis(80);
/// A self-driven socket whose application made no call for this long, twice over (two looks
/// this far apart), is watched again.
pub(super) const IDLE: Duration = Duration::from_millis(2);

/// The watch job alone.
pub(super) const WATCH: Jobs = Jobs {
    flush: false,
    keepalive: false,
    linger: false,
    watch: true,
    nudge: false,
    persist: false,
};

/// How a socket's descriptor is kept up to date (see the module documentation); the mode
/// itself is `StreamSocket::self_driven`, read without the lock by every call.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// Wasted service wake-ups, less twice the useful ones (never below 0).
    wasted: u8,
    /// The connection's EAGAIN count (`Conn::idle_calls`) when the watch job last ran.
    idle_calls: u32,
    /// `StreamSocket::poll_misses` when the watch job last ran.
    poll_misses: u32,
    /// A self-driven socket a look found idle: the application's last call then (see
    /// `watch_job`).
    idle_exit: Option<u64>,
}

/// More EAGAIN returns than this between two runs of the watch job: the application
/// polls by itself (it retries at once on EAGAIN) and would find what arrives without being
/// shown it. One that sleeps on the descriptor makes at most one per wake-up (it reads until
/// EAGAIN, then sleeps again).
const POLLING_CALLS: u32 = 2;

/// This many EAGAIN returns (or rpoll looks that found nothing) between two runs of the
/// watch job: the application busy-polls (one asleep on the descriptor makes one per wake-up,
/// and this thread's wake-up comes first), and the socket turns self-driven at once rather
/// than after [`WASTED_MAX`] wasted wake-ups.
const POLLING_BURST: u32 = 64;

/// What a self-driven socket's watch job waits for: the next look, [`TICK`] on, doubled
/// `doublings` times.
fn tick_wait(now: Instant, doublings: u8) -> Wait {
    look_at(now + (TICK * (1 << doublings.min(8))).min(TICK_MAX))
}

/// What a self-driven socket's watch job waits for: its next look, at `at` (no descriptor).
fn look_at(at: Instant) -> Wait {
    Wait {
        jobs: WATCH,
        fds: Vec::new(),
        deadline: Some(at),
    }
}

/// A call in progress (see [`StreamSocket::call`]). The flag: the descriptor of the
/// self-driven socket was brought up to date under the lock already ([`StreamSocket::settle`]).
pub(crate) struct Call<'a>(&'a StreamSocket, bool);

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.0.exit_call(self.1);
    }
}

impl StreamSocket {
    /// The readiness a kernel TCP socket in this state would report, as the descriptor can
    /// show it (zero-copy notices, which come and go, are reported by rpoll only).
    pub(super) fn readiness(g: &Inner) -> i16 {
        match &g.state {
            State::Idle { .. } => libc::POLLOUT,
            State::Connecting(_) | State::Accepting(_) => 0,
            State::Listening { pending, .. } => {
                if pending.is_empty() {
                    0
                } else {
                    libc::POLLIN
                }
            }
            State::Connected(c) => {
                let mut r = c.revents() & !libc::POLLERR;
                if c.link.core.error().is_some() {
                    r |= libc::POLLERR;
                }
                if !c.link.core.flags().readable {
                    r |= libc::POLLRDHUP;
                }
                r
            }
            State::Failed if g.so_error != 0 => libc::POLLOUT | libc::POLLERR | libc::POLLHUP,
            State::Failed => libc::POLLOUT | libc::POLLHUP,
        }
    }

    /// Brings the descriptor up to date (call with the lock held): a syscall or two if what it
    /// shows changes, none otherwise. A self-driven socket's descriptor takes the end of the
    /// connection (POLLRDHUP, POLLHUP, POLLERR: once each) but not the coming of data and
    /// room, which would cost syscalls on its data path.
    ///
    /// What went is taken back in both modes: a POLLIN or POLLOUT left shown when it is no
    /// longer true would keep a program that sleeps on the descriptor (epoll, level-triggered)
    /// waking at once, finding nothing and sleeping again, at full speed, for as long as the
    /// connection is idle. That costs a syscall only when the program was woken for nothing.
    pub(super) fn publish(&self, g: &mut Inner) {
        if self.self_driven.load(Ordering::Relaxed) {
            let Some(shown) = g.ready.as_ref().map(|r| r.shown()) else {
                return;
            };
            // The common case, every call of a busy-polling program: nothing changes.
            if let State::Connected(c) = &g.state
                && c.still_shows(shown)
            {
                return;
            }
            let want = Self::readiness(g);
            let next = (shown & want) | ((shown | want) & GONE);
            if next != shown
                && let Some(r) = g.ready.as_mut()
                && let Err(e) = r.show(next)
            {
                trace!("{self:?}: readiness descriptor: {e}");
            }
            return;
        }
        self.show(g);
    }

    fn show(&self, g: &mut Inner) {
        let want = Self::readiness(g);
        if let Some(r) = g.ready.as_mut()
            && let Err(e) = r.show(want)
        {
            trace!("{self:?}: readiness descriptor: {e}");
        }
    }

    /// A call begins; when the returned guard goes, the call ends (see `exit_call`). Counted,
    /// so that the service thread leaves a socket in use to its caller.
    pub(crate) fn call(&self) -> Call<'_> {
        self.in_call.fetch_add(1, Ordering::AcqRel);
        Call(self, false)
    }

    /// A call about to return, under the lock: a self-driven socket's descriptor is brought up
    /// to date now, so that the call's end (`exit_call`) need not take the lock again (a
    /// second lock per call is a good part of what a busy-polling call costs).
    pub(super) fn settle(&self, g: &mut Inner, call: &mut Call<'_>) {
        if self.self_driven.load(Ordering::Relaxed) {
            self.publish(g);
            call.1 = true;
        }
    }

    /// A call ends: the descriptor shows the state the call leaves, and a watched socket's CQ
    /// stays armed so that the service thread sees what arrives next. `settled`: a self-driven
    /// socket's descriptor was brought up to date already (`settle`). A socket that became
    /// watched meanwhile was shown and armed by the service thread when it turned.
    fn exit_call(&self, settled: bool) {
        self.last_exit.store(ticks(), Ordering::Relaxed);
        self.in_call.fetch_sub(1, Ordering::AcqRel);
        if settled && self.self_driven.load(Ordering::Relaxed) {
            return;
        }
        let mut g = self.lock();
        self.publish(&mut g);
        if !self.self_driven.load(Ordering::Relaxed) {
            self.arm_watch(&mut g);
        }
    }

    /// Whether the application is outside every call on the socket and made none for [`IDLE`]
    /// (a self-driven socket is then watched again).
    fn idle_or_away(&self) -> bool {
        self.in_call.load(Ordering::Acquire) == 0
            && ticks().wrapping_sub(self.last_exit.load(Ordering::Relaxed))
                >= IDLE.as_micros() as u64 * ticks_per_us()
    }

    /// A look of the watch job found the self-driven socket in use: returns how often to
    /// double the time to the next look (one more than last time, see [`TICK_MAX`]).
    fn busy_look(&self) -> u8 {
        let n = self.busy_looks.load(Ordering::Relaxed);
        self.busy_looks
            .store(n.saturating_add(1).min(8), Ordering::Relaxed);
        n
    }

    /// An rpoll look without a wait found nothing the caller asked for on this socket (see
    /// `poll_misses`).
    pub(crate) fn note_poll_miss(&self) {
        self.poll_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes a call that returns without `call` (a staged send): the application is active.
    pub(super) fn touch(&self, now: u64) {
        self.last_exit.store(now, Ordering::Relaxed);
    }

    /// Arms the CQ of a watched connection that may still change (what is not ready yet). A
    /// completion that came before the arming raises no event: the CQ is looked at once more
    /// after it, and what that finds shown. Our own sends' completions raise events only while
    /// something shown waits for them (room to send, see `Conn::wants_send_events`): a program
    /// asleep until data arrives is not woken (nor the service thread) for each send it made.
    fn arm_watch(&self, g: &mut Inner) {
        let want = Self::readiness(g);
        // Armed while the descriptor may still change, and while the receive ring may have to
        // grow: a peer that used up the small ring's windows waits for the larger one, which
        // only this thread gives when the application does not read (it may be busy sending
        // its own request, or accepting the next connection).
        if let State::Connected(c) = &mut g.state
            && c.link.core.flags().connected
            && (want & (libc::POLLIN | libc::POLLOUT) != libc::POLLIN | libc::POLLOUT
                || c.link.core.recv_ring_may_grow())
        {
            let sends = c.wants_send_events(want & libc::POLLOUT == 0);
            if c.link.t.is_armed(sends) {
                return;
            }
            if let Err(e) = c.link.t.arm(sends) {
                trace!("{self:?}: arming for the watch: {e}");
                return;
            }
            if matches!(self.drive(c), Ok(true)) {
                self.show(g);
            }
        }
    }

    /// Hooks the socket to a wait set of the application: it sleeps on the returned completion
    /// channel itself and calls [`StreamSocket::hook_event`] whenever it is readable, and the
    /// service thread stops sleeping on that channel while any hook lasts. None (nothing
    /// hooked) unless the socket is connected. Each hook is ended by one [`StreamSocket::unhook`].
    pub fn hook(&self) -> Option<RawFd> {
        let g = self.lock();
        let State::Connected(c) = &g.state else {
            return None;
        };
        if !c.link.core.flags().connected {
            return None;
        }
        let fd = c.link.t.comp_fd();
        drop(g);
        if self.hooked.fetch_add(1, Ordering::AcqRel) == 0 {
            // The service thread looks again: it sleeps on the channel no more.
            self.start_watch();
        }
        Some(fd)
    }

    /// Ends one [`StreamSocket::hook`]: with the last, the service thread watches the completion
    /// channel again.
    pub fn unhook(&self) {
        let was = self
            .hooked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if was == Ok(1) {
            self.start_watch();
        }
    }

    /// The completion channel of a hooked socket was found readable: takes its event (passed
    /// on to a thread asleep in a call, as the service thread would), processes what came, shows
    /// it on the descriptor and arms the CQ again, from the caller's thread. Returns the POLL
    /// bits the descriptor began to show (what a wait on it would be woken for).
    pub fn hook_event(&self) -> i16 {
        let (comp, before) = {
            let g = self.lock();
            let shown = g.ready.as_ref().map_or(0, |r| r.shown());
            match &g.state {
                State::Connected(c) => (c.link.t.comp_fd(), shown),
                _ => return 0,
            }
        };
        let inside = self.in_call.load(Ordering::Acquire) > 0;
        if self.woke(false, &[comp]).is_err() {
            return 0;
        }
        // A call's end shows the state and arms the CQ again (driving after the arming).
        drop(self.call());
        if inside {
            // Another thread may sleep in rpoll on the channel whose event was taken here.
            self.waker.wake();
        }
        let after = self.lock().ready.as_ref().map_or(0, |r| r.shown());
        after & !before
    }

    /// A hooked socket's wait set busy-polls before it sleeps: processes what came without
    /// a completion event (no syscall) and shows it. Returns the POLL bits the descriptor began
    /// to show, as [`StreamSocket::hook_event`].
    pub fn hook_poll(&self) -> i16 {
        let mut g = self.lock();
        let before = g.ready.as_ref().map_or(0, |r| r.shown());
        let State::Connected(c) = &mut g.state else {
            return 0;
        };
        if !matches!(self.drive(c), Ok(true)) {
            return 0;
        }
        self.publish(&mut g);
        g.ready.as_ref().map_or(0, |r| r.shown()) & !before
    }

    /// Whether a wait set of the application sleeps on the completion channel (see
    /// [`StreamSocket::hook`]).
    pub fn is_hooked(&self) -> bool {
        self.hooked.load(Ordering::Acquire) > 0
    }

    /// A wait on a hooked socket's descriptor that does not take its completion events itself
    /// (poll, select) begins: the service thread watches the completion channel again until the
    /// matching [`StreamSocket::release_watch`], so that what arrives is shown to it.
    pub fn hold_watch(&self) {
        if self.guests.fetch_add(1, Ordering::AcqRel) == 0 && self.is_hooked() {
            self.start_watch();
        }
    }

    /// Ends a [`StreamSocket::hold_watch`] (the service thread leaves the channel to the hooks
    /// again the next time it looks at the socket).
    pub fn release_watch(&self) {
        let _ = self
            .guests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Starts watching the socket's descriptors in the service thread (a listener, a connect
    /// in progress, a connection).
    pub(super) fn start_watch(&self) {
        self.add_jobs(WATCH);
    }

    /// The watch job (see the module documentation). `ready`: this socket's descriptors that
    /// woke the service thread (their wake-ups already taken by `woke`).
    pub(super) fn watch_job(&self, now: Instant, ready: &[RawFd]) -> Option<Wait> {
        // A self-driven socket in use is left alone without its lock: the application holds
        // that lock for most of its busy-polling, and taking it every TICK would make the
        // application sleep on the mutex until this thread (sharing its CPU, perhaps) lets go.
        if ready.is_empty() && self.self_driven.load(Ordering::Relaxed) && !self.idle_or_away() {
            return Some(tick_wait(now, self.busy_look()));
        }
        let mut g = self.lock();
        if matches!(g.state, State::Idle { .. } | State::Failed) {
            self.show(&mut g);
            return None;
        }
        let inside = self.in_call.load(Ordering::Acquire) > 0;
        let misses = self.poll_misses.load(Ordering::Relaxed);
        let calls = match &g.state {
            State::Connected(c) => {
                let calls = c
                    .idle_calls
                    .wrapping_sub(g.watch.idle_calls)
                    .saturating_add(misses.wrapping_sub(g.watch.poll_misses));
                g.watch.idle_calls = c.idle_calls;
                calls
            }
            _ => 0,
        };
        g.watch.poll_misses = misses;
        let polling = calls > POLLING_CALLS;
        if self.self_driven.load(Ordering::Relaxed) {
            if !self.idle_or_away() {
                g.watch.idle_exit = None;
                return Some(tick_wait(now, self.busy_look()));
            }
            // Idle once is not enough: a second look IDLE later must find no call since. Under
            // emulation the whole machine stalls for milliseconds now and then, and a look
            // right after such a stall found a busy-polling program idle; watched again, each
            // of its messages then woke this thread (which preempts one of the programs) until
            // enough wasted wake-ups made the socket self-driven again.
            let exit = self.last_exit.load(Ordering::Relaxed);
            if g.watch.idle_exit != Some(exit) {
                g.watch.idle_exit = Some(exit);
                return Some(look_at(now + IDLE));
            }
            g.watch.idle_exit = None;
            trace_verbose!("{self:?}: idle, watched again");
            self.busy_looks.store(0, Ordering::Relaxed);
            g.watch.wasted = 0;
            self.self_driven.store(false, Ordering::Relaxed);
            // What it shows may be stale (data and room were not published): taken back first,
            // so that what is shown below is a new edge for edge-triggered waiters (epoll
            // EPOLLET, tokio), which a stale POLLIN shown again would not be.
            if let Some(r) = g.ready.as_mut() {
                let fresh = r.shown() & !(libc::POLLIN | libc::POLLOUT);
                if let Err(e) = r.show(fresh) {
                    trace!("{self:?}: readiness descriptor: {e}");
                }
            }
        }
        let before = g.ready.as_ref().map_or(0, |r| r.shown());
        let connecting = !matches!(g.state, State::Connected(_));
        if matches!(g.state, State::Connecting(_) | State::Accepting(_)) {
            self.advance_connect(&mut g);
        }
        let mut progressed = false;
        let mut requests = 0;
        match &mut g.state {
            State::Listening { .. } => requests = self.collect_requests(&mut g),
            State::Connected(c) => {
                progressed = self.drive(c).unwrap_or(false);
            }
            _ => {}
        }
        // A listener's sleepers (accept, rpoll) wait for requests only. They are woken before
        // the descriptor shows the request, so that an accept woken by the descriptor uses up
        // this wake-up too; a wake-up for anything else, or one left behind, would keep every
        // later rpoll on the listener from sleeping.
        let listening = matches!(g.state, State::Listening { .. });
        if listening && requests > 0 {
            self.notify();
            self.waker.wake();
        }
        self.show(&mut g);
        let after = g.ready.as_ref().map_or(0, |r| r.shown());
        if !listening && (inside || (connecting && after != before)) {
            // The application sleeps in a call, or maybe in rpoll on the CM channel: what was
            // taken here is its to see.
            self.notify();
            self.waker.wake();
        }
        if !ready.is_empty() {
            // Useful: it showed something new to an application outside. Wasted: the
            // application is inside a call or polls by itself (it drives the socket itself),
            // or the wake-up found nothing at all (its calls took what came before it could
            // be shown). Otherwise neither: what came is shown already, not read yet, or it
            // changes nothing the application waits for (a send completing, the peer's credit
            // update), as after every reply of a request/response server sleeping in epoll,
            // which such wake-ups must not turn self-driven (it would then see each request
            // only at the next TICK).
            let driving = inside || polling;
            if after & !before != 0 && !driving {
                // Not a reset: a program woken by its own call (rpoll, a blocking receive)
                // races with this thread for the same completion and loses now and then.
                g.watch.wasted = g.watch.wasted.saturating_sub(2);
            } else if driving || (!progressed && after == before && after & libc::POLLIN == 0) {
                // A burst of EAGAIN returns is no program asleep on the descriptor: self-driven
                // at once (each wake-up until then preempts one of the busy-polling programs,
                // and a short run, rstream's 2,000 round trips say, spent most of its time so).
                let by = if calls >= POLLING_BURST {
                    WASTED_MAX
                } else {
                    1
                };
                g.watch.wasted = g.watch.wasted.saturating_add(by);
                if g.watch.wasted >= WASTED_MAX {
                    trace_verbose!("{self:?}: self-driven, not watched");
                    self.self_driven.store(true, Ordering::Relaxed);
                    self.busy_looks.store(0, Ordering::Relaxed);
                    return Some(tick_wait(now, 0));
                }
            }
        }
        self.arm_watch(&mut g);
        let mut fds = vec![self.channel.fd()];
        // A hooked socket's application sleeps on the completion channel itself.
        let mine = !self.is_hooked() || self.guests.load(Ordering::Acquire) > 0;
        match &g.state {
            State::Connected(c) if c.link.core.flags().connected && mine => {
                fds.push(c.link.t.comp_fd())
            }
            State::Connected(c) if c.link.core.flags().connected => {}
            // Nothing arrives any more: what the descriptor shows changes only with the calls.
            State::Connected(_) | State::Idle { .. } | State::Failed => return None,
            _ => {}
        }
        Some(Wait {
            jobs: WATCH,
            fds,
            deadline: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_at_a_socket_in_use_come_less_often_up_to_tick_max() {
        let now = Instant::now();
        let apart: Vec<Duration> = (0..6)
            .map(|n| tick_wait(now, n).deadline.unwrap() - now)
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(apart, [ms(10), ms(20), ms(40), ms(80), ms(80), ms(80)]);
        assert_eq!(tick_wait(now, u8::MAX).deadline, Some(now + TICK_MAX));
        assert!(
            tick_wait(now, 0).fds.is_empty(),
            "a self-driven socket's channels are not slept on"
        );
    }
}
