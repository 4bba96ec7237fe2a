//! Waiting: completion processing, busy-polling then sleeping on the completion channel, the
//! CM channel and the waker; readiness for rpoll.

use std::os::fd::RawFd;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::conn::Conn;
use super::{CM_WAIT, Inner, PollState, State, StreamSocket, errno_error};
use crate::error::{Error, Result};
use crate::verbs::{poll_fds, pollin};

/// A non-blocking call that finds nothing to do looks at the CM channel when this many
/// microseconds passed since the last look (a vanished peer shows there, not in the CQ).
const CM_CHECK_US: u64 = 10_000;
/// Idle non-blocking calls between two reads of the tick counter for that check.
pub(super) const CM_TICK_EVERY: u32 = 64;

/// Waits until `fds` has input or `timeout` passes (None: forever). EINTR counts as a wake-up.
pub(super) fn wait_readable(fds: &[RawFd], timeout: Option<Duration>) -> Result<bool> {
    let mut pfds: Vec<libc::pollfd> = fds.iter().map(|&fd| pollin(fd)).collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    Ok(poll_fds(&mut pfds, ms)? > 0)
}

impl StreamSocket {
    /// Whether data may be posted on `c` now: EPIPE/ECONNRESET if it cannot be sent at all,
    /// false while staged sends wait (they go first: the order on the wire is the call order).
    pub(super) fn may_post_data(&self, c: &Conn) -> Result<bool> {
        c.check_writable()?;
        Ok(self.stage.len() == 0)
    }

    /// Processes the connection's completions; wakes condvar waiters if anything changed.
    pub(super) fn drive(&self, conn: &mut Conn) -> Result<bool> {
        let mut any = conn.progress()?;
        // Staged sends go before anything this call does.
        any |= self.drain_stage(conn)? > 0;
        if any {
            self.notify();
        }
        Ok(any)
    }

    /// Readiness for rpoll. Drives connection setup and completions; with `arm` = the events
    /// the caller waits for, also arms the CQ (unless they are ready) so that `wait_fds` become
    /// readable on the next change.
    pub fn poll_state(&self, arm: Option<i16>) -> Result<PollState> {
        let mut g = self.lock();
        let ps = self.poll_state_locked(&mut g, arm)?;
        self.publish(&mut g);
        Ok(ps)
    }

    /// One look at the readiness, as a call of its own (rpoll with a single rsocket and no
    /// wait, as a busy-polling loop calls it): the call ends without a second lock (see
    /// `settle`). POLL bits as for `poll_state`; `events`, what the caller asks for: a
    /// self-driven socket ready for all of it already is not driven first.
    pub fn poll_once(&self, events: i16) -> Result<i16> {
        if let Some(revents) = self.poll_short(events) {
            return Ok(revents);
        }
        let mut call = self.call();
        let mut g = self.lock();
        let ps = self.poll_state_locked(&mut g, None)?;
        if self.self_driven.load(Ordering::Relaxed) {
            self.settle(&mut g, &mut call);
        } else {
            self.publish(&mut g);
        }
        Ok(ps.revents)
    }

    fn poll_state_locked(
        &self,
        g: &mut MutexGuard<'_, Inner>,
        arm: Option<i16>,
    ) -> Result<PollState> {
        self.advance_connect(g);
        self.collect_requests(g);
        let ch = self.channel.fd();
        // The waker too: the service thread may take a CM event (a connect request, a connect's
        // reply) off the channel and passes the wake-up on there.
        let mut ps = PollState {
            revents: 0,
            wait_fds: [ch, self.waker.fd(), -1],
            n_wait: 2,
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
                    let room = arm.is_some_and(|e| e & libc::POLLOUT != 0);
                    if room && ps.revents & libc::POLLOUT == 0 {
                        // Waiting for room is waiting to send (see `watch_starved_send`).
                        conn.link.core.note_send_wait();
                        self.watch_starved_send(conn);
                    }
                    conn.link.t.arm(conn.wants_send_events(room))?;
                    // A completion that raced with arming is visible now.
                    self.drive(conn)?;
                    ps.revents = conn.revents();
                }
                // The waker too: the service thread may take the CQ event that was ours and
                // passes it on there.
                ps.wait_fds = [conn.link.t.comp_fd(), ch, self.waker.fd()];
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

    /// Consumes what woke a sleeper. The completion channel raises one event per arming and
    /// every sleeper on it (wait_conn, rpoll, the service thread) may have armed it: an event taken by
    /// one is passed on through the waker, which the others also sleep on.
    /// `ready`: the descriptors poll(2) found readable.
    pub(super) fn woke(&self, flusher: bool, ready: &[RawFd]) -> Result<()> {
        let cm = ready.contains(&self.channel.fd());
        let mut pass_on = false;
        let mut g = self.lock();
        let sleeping = g.sleeping;
        if let State::Connected(conn) = &mut g.state {
            let comp = ready.contains(&conn.link.t.comp_fd());
            // One arming raises at most one event per CQ, and a CQ is armed again only once
            // its event was taken: what there is to take is taken here.
            let took = comp && conn.link.t.take_cq_event();
            if cm {
                conn.drain_cm_events(&self.channel)?;
            }
            // And the other way: a call that took it lets the flush job know.
            pass_on = took && !flusher;
            // Passed on only to who may sleep on the channel: a call asleep in wait_conn, or
            // (from the service thread) one in rpoll, or a wait set of the application that
            // is hooked to it. A program asleep in its own poll or epoll on the descriptor is
            // in no call: the write would be a syscall per message for nobody.
            if took
                && (sleeping
                    || (flusher && (self.in_call.load(Ordering::Acquire) > 0 || self.is_hooked())))
            {
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
        drop(g);
        if pass_on {
            self.pass_on_to_flusher();
        }
        Ok(())
    }

    /// A call took the completion event: if the flush job sleeps on the completion channel
    /// too, it would not see that event and could sleep for ever with sends waiting. It is
    /// woken to look again (and to arm the CQ for itself).
    fn pass_on_to_flusher(&self) {
        if self.in_flusher.load(Ordering::Acquire) {
            self.hand_flush();
        }
    }

    /// A call is about to wait or return EAGAIN: if a send waits for the peer's room, the
    /// persist job watches the wait (see `persist_job`). One look at two flags otherwise.
    fn watch_starved_send(&self, conn: &mut Conn) {
        if !conn.persist_job && conn.link.core.send_starved() {
            conn.persist_job = self.add_jobs(super::PERSIST);
        }
    }

    /// Runs `step` until it yields a value, sleeping between attempts; `nonblock` turns a wait
    /// into EAGAIN. `step` sees the connection after each round of completion processing.
    pub(super) fn wait_conn<R>(
        &self,
        nonblock: bool,
        step: impl FnMut(&mut Conn) -> Result<Option<R>>,
    ) -> Result<R> {
        self.wait_conn_from(nonblock, false, false, step)
    }

    /// [`StreamSocket::wait_conn`]; with `step_first`, `step` is tried once before the
    /// completions are processed (a receive that finds data in hand returns it without a look
    /// at the completion queue: what is there comes later in the stream anyway). `for_data`:
    /// `step` waits for received data only, so a sleep is not woken by the completions of our
    /// own sends (see `Conn::wants_send_events`).
    pub(super) fn wait_conn_from<R>(
        &self,
        nonblock: bool,
        step_first: bool,
        for_data: bool,
        mut step: impl FnMut(&mut Conn) -> Result<Option<R>>,
    ) -> Result<R> {
        let mut call = self.call();
        let mut g = self.lock();
        if step_first
            && self.stage.len() == 0
            && let State::Connected(conn) = &mut g.state
            && let Some(r) = step(conn)?
        {
            self.settle(&mut g, &mut call);
            return Ok(r);
        }
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
                    // The waker too: the service thread may take the CM event and pass it on.
                    wait_readable(&[self.channel.fd(), self.waker.fd()], Some(CM_WAIT))?;
                    self.waker.reset();
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
            let done = step(conn)?;
            // A send that waits, or took part of its bytes (the caller waits for room next).
            self.watch_starved_send(conn);
            if let Some(r) = done {
                if let Some(w0) = wait_start {
                    conn.spin
                        .record(crate::verbs::ticks().wrapping_sub(w0), slept);
                }
                self.notify();
                self.settle(&mut g, &mut call);
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
                    let was = conn.link.core.flags().connected;
                    conn.drain_cm_events(&self.channel)?;
                    if was && !conn.link.core.flags().connected {
                        self.notify();
                        continue;
                    }
                }
                self.settle(&mut g, &mut call);
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
                // Another thread sleeps on the completion channel, armed for what it waited
                // for when it went to sleep: a receive may have left our sends' CQ unarmed.
                // When what we wait for comes with our sends' completions (room to send, say,
                // or a credit update that waits for a control slot), that CQ is armed now:
                // its event wakes the sleeper, which wakes us.
                if let State::Connected(conn) = &mut g.state
                    && conn.wants_send_events(!for_data)
                    && !conn.link.t.is_armed(true)
                {
                    conn.link.t.arm(true)?;
                    // A completion that came before the arming raised no event: looked for now.
                    if self.drive(conn)? {
                        continue;
                    }
                }
                // Counted under the lock, so a notifier (also under the lock) cannot miss us.
                self.waiters.fetch_add(1, Ordering::Relaxed);
                g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                self.waiters.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let State::Connected(conn) = &mut g.state else {
                return Err(Error::NotConnected);
            };
            conn.link.t.arm(conn.wants_send_events(!for_data))?;
            if self.drive(conn)? {
                continue;
            }
            let mut fds = [conn.link.t.comp_fd(), self.channel.fd(), self.waker.fd()].map(pollin);
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
            let mut took = false;
            if let State::Connected(conn) = &mut g.state {
                // An armed CQ raises one event; another thread may have taken it already.
                if comp {
                    took = conn.link.t.take_cq_event();
                }
                let d = if cm {
                    conn.drain_cm_events(&self.channel)
                } else {
                    Ok(())
                };
                self.notify();
                d?;
            }
            if took {
                drop(g);
                self.pass_on_to_flusher();
                g = self.lock();
            }
            spin_start = None;
            r?;
        }
    }
}
