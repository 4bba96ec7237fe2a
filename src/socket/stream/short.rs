//! The short paths: a busy-polling program's common calls without the call machinery.
//!
//! Under emulation a round trip's cost grows with the distinct code run between two posts,
//! not with the instructions (bench/README.md, "Where a ping-pong's time goes"), and a
//! busy-polling program (rstream's default loop, MSG_DONTWAIT retried at once) runs its
//! receive that finds nothing, its receive that finds a message and its send between every
//! two messages (and rstream -T a its rpoll that looks without waiting). So a self-driven
//! socket (its descriptor shows no data readiness, see `ready`) takes these in one stretch of
//! code each, under one try of the lock, with the same protocol steps as the full path
//! (`Conn::progress`, `Driver::recv_some`, `Driver::send_some`) and none of its waiting, call
//! counting or second look. Anything else (the lock taken, a
//! stage, an error, the end of the stream, a peek, a look at the CM channel due, a send that
//! did not fit) leaves the call to the full path, from where the short one stopped.

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use super::wait::CM_TICK_EVERY;
use super::{Inner, State, StreamSocket};
use crate::error::{Error, Result};
use crate::trace::{trace, trace_verbose};
use crate::verbs::ticks;

/// What the short send did.
pub(super) enum ShortSend {
    /// Not taken: the full path sends everything.
    No,
    /// Sent `sent` bytes (not all; `posted`: in a write of their own): the full path sends
    /// the rest.
    Part { sent: usize, posted: bool },
    /// Sent everything; whether it posted a write (else its bytes were gathered behind writes
    /// in flight).
    All { posted: bool },
}

/// Which short path a call took (test builds count them, see `StreamSocket::short_calls`).
#[cfg(debug_assertions)]
#[derive(Clone, Copy)]
pub(super) enum Taken {
    Miss = 0,
    Hit = 1,
    Send = 2,
    Poll = 3,
}

impl StreamSocket {
    /// The lock for a short path: the socket is self-driven, nothing is staged, the lock is
    /// free and the connection is up; else `None` (the full path).
    fn short_lock(&self) -> Option<MutexGuard<'_, Inner>> {
        if !self.self_driven.load(Ordering::Relaxed) || self.stage.len() != 0 {
            return None;
        }
        let g = self.inner.try_lock().ok()?;
        matches!(g.state, State::Connected(_)).then_some(g)
    }

    /// Receive, short (see the module comment): `Some` is the call's result (bytes received,
    /// or EAGAIN for a non-blocking receive that found nothing), `None` leaves the call to
    /// the full path with nothing taken. Not for MSG_PEEK or MSG_WAITALL.
    pub(super) fn recv_short(&self, buf: &mut [u8], nonblock: bool) -> Option<Result<usize>> {
        let mut g = self.short_lock()?;
        let State::Connected(conn) = &mut g.state else {
            return None;
        };
        // Data in hand first, as the full path: what the CQ holds comes later in the stream.
        if !conn.link.core.has_data() {
            if !conn.link.core.flags().readable {
                return None;
            }
            let moved = self.drive(conn).ok()?;
            if !conn.link.core.has_data() {
                // A non-blocking program that only retries on EAGAIN never sleeps on the CM
                // channel: the full path looks at it now and then (`wait_conn_from`).
                if !nonblock
                    || !conn.link.core.flags().readable
                    || conn.idle_calls.wrapping_add(1) % CM_TICK_EVERY == 0
                {
                    return None;
                }
                conn.idle_calls = conn.idle_calls.wrapping_add(1);
                if moved {
                    self.publish(&mut g);
                }
                drop(g);
                self.short_exit(
                    #[cfg(debug_assertions)]
                    Taken::Miss,
                );
                return Some(Err(Error::WouldBlock));
            }
        }
        let n = conn.link.recv_some(buf, false);
        // As the full path: the bytes are the call's result even if the credit update failed
        // (the next call finds the connection broken).
        if let Err(e) = conn.link.send_credits() {
            trace!("{self:?}: credit update: {e}");
        }
        self.publish(&mut g);
        drop(g);
        self.short_exit(
            #[cfg(debug_assertions)]
            Taken::Hit,
        );
        Some(Ok(n))
    }

    /// Send, short (see the module comment), of a non-empty `buf` that is not staged: the
    /// bytes go as the full path's first try sends them (`Driver::send_some`, writes from
    /// `olen` on). Errors are left to the full path, which finds the connection failed.
    pub(super) fn send_short(&self, buf: &[u8], olen: &mut u32) -> ShortSend {
        let Some(mut g) = self.short_lock() else {
            return ShortSend::No;
        };
        let State::Connected(conn) = &mut g.state else {
            return ShortSend::No;
        };
        // As the full path's first try: the connection can send and nothing staged goes first.
        if !matches!(self.may_post_data(conn), Ok(true)) {
            return ShortSend::No;
        }
        let before = conn.link.sends_posted();
        let Ok(sent) = conn.link.send_some(buf, olen, true) else {
            return ShortSend::No;
        };
        let posted = conn.link.sends_posted() != before;
        let pending = conn.link.core.has_pending();
        self.publish(&mut g);
        drop(g);
        if pending && !self.in_flusher.swap(true, Ordering::AcqRel) {
            // Gathered sends leave when the writes in flight complete, even if we go idle.
            trace_verbose!("fd {}: gathered send, flush job", self.channel.fd());
            self.hand_flush();
        }
        if sent < buf.len() {
            return ShortSend::Part { sent, posted };
        }
        self.short_exit(
            #[cfg(debug_assertions)]
            Taken::Send,
        );
        ShortSend::All { posted }
    }

    /// rpoll's look at one socket without a wait (rstream -T a busy-polls so), short: the
    /// connection's readiness (after taking the completions unless it is ready already for
    /// `events`), or `None` for the full path (`poll_once`).
    pub(super) fn poll_short(&self, events: i16) -> Option<i16> {
        let mut g = self.short_lock()?;
        let State::Connected(conn) = &mut g.state else {
            return None;
        };
        // Ready already for all the caller asks (room to send, say, right after a receive):
        // no look at the completions, as a send that fits goes without one. What they hold
        // comes with the next look. (All: a loop asking for POLLIN and POLLOUT that only ever
        // saw POLLOUT would never see its data.)
        let now = conn.revents();
        let want = events & (libc::POLLIN | libc::POLLOUT);
        let revents = if want != 0 && now & want == want {
            now
        } else {
            self.drive(conn).ok()?;
            let r = conn.revents();
            self.publish(&mut g);
            r
        };
        drop(g);
        self.short_exit(
            #[cfg(debug_assertions)]
            Taken::Poll,
        );
        Some(revents)
    }

    /// A short path returns: as at the end of every call (`exit_call`), the service thread
    /// sees the application still calling.
    fn short_exit(&self, #[cfg(debug_assertions)] taken: Taken) {
        self.touch(ticks());
        #[cfg(debug_assertions)]
        self.short_calls[taken as usize].fetch_add(1, Ordering::Relaxed);
    }
}
