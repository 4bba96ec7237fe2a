//! Staging: the small sends of a streaming application leave in fewer, fuller RDMA writes.
//!
//! Posting a write costs far more than copying a small message. On Soft-RoCE the post runs the
//! whole transmit path in the calling thread, so the write has completed before the call
//! returns, and gathering "while a write is in flight" (`Stream::plan_send`) never finds one in
//! flight. So a small send that comes sooner after the previous send than that send's own post
//! took is copied into the stage and handed to the service thread (a flush job), which posts everything staged
//! as one write while the application goes on staging the next messages.
//!
//! A lone message is never held back: a send after a receive, after a pause longer than a post,
//! or with nothing staged and no send before it posts its own write at once, as before. Staged
//! bytes keep their order: every call that takes the socket's lock posts the stage first
//! (`drive`), and a send that does not stage waits until the stage is empty.
//!
//! Who posts the stage: while the application keeps staging, the application itself, once
//! the stage's first byte has waited as long as a post takes (or the stage holds
//! [`STAGE_POST_AT`] bytes); its next call of any other kind posts it too. The flush job is
//! the backstop for an application that stops calling: it leaves the stage (and sends
//! gathered behind writes in flight) alone while the application goes on calling (it would
//! only take the CPU from it: with both ends busy-polling on a two-CPU machine, a post in the
//! service thread runs instead of the application, not beside it, and each write then carried
//! one message) and posts them a post's time after the application's last call
//! ([`Stage::app_still_calling`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::StreamSocket;
use super::conn::Conn;
use crate::error::Result;
use crate::proto::stream as core;
use crate::trace::trace_verbose;
use crate::verbs::ticks;

/// Largest send that may be staged (larger ones are worth a write of their own).
const STAGE_MAX_MSG: usize = core::OLAP_START_SIZE as usize;
/// Most bytes staged at once; beyond, sends take the ordinary path (and wait for room there).
/// Two full writes: the application stages the next while its post of the last one runs.
const STAGE_LIMIT: usize = 2 * STAGE_POST_AT;
/// The flush job's longest wait, in posts' time, while the application keeps staging (a
/// power of two), and in microseconds: a staged send waits at most this long for a post when
/// the application stops calling.
const MAX_DEFER: u32 = 32;
const MAX_DEFER_US: u64 = 2_000;
/// The least the flush job waits before it looks again at a socket a call is using,
/// microseconds (before a post was measured).
const RETRY_MIN_US: u64 = 50;
/// The most a send's post is taken to cost (a send that had to wait for room measures its
/// wait too), microseconds.
const MAX_POST_COST_US: u64 = 1_000;
/// A stage this full is posted by the application's send that filled it: one write of the
/// largest size. On Soft-RoCE a post runs the device's whole transmit in the calling thread,
/// and a post's fixed costs (the call, the work request, the ACK, the completion) are paid per
/// write: rstream's 1,000 messages of 64 B back to back took 10.5 us a message with 64 KiB
/// writes against 14.5 us with 16 KiB ones (1 KiB messages: 98.7 against 114.3 us; 16 B: the
/// same within the rounds' spread; median of 10 rounds, one VM run). A staged message still
/// waits no longer than a post's time ([`Stage::try_stage`]).
const STAGE_POST_AT: usize = core::MAX_TRANSFER as usize;
/// Writes the flush job posts in one go while the application keeps staging, before it lets
/// others have the socket's lock.
const FLUSH_ROUNDS: usize = 16;

/// The stage of one socket.
#[derive(Debug, Default)]
pub(super) struct Stage {
    staged: Mutex<Staged>,
    /// Bytes in `staged` (read without its lock by every `drive`).
    len: AtomicUsize,
    /// Ticks when the last send returned (staged: when it started); 0 after a receive (a
    /// reply is not a stream).
    last_send: AtomicU64,
    /// What the last send that posted its own write took, in ticks.
    post_cost: AtomicU64,
    /// Bytes that went through the stage since the socket was created (diagnostics).
    total: AtomicU64,
    /// Ticks when the first byte of what is staged now was staged (0: nothing staged).
    since: AtomicU64,
    /// Looks of the flush job in a row that found the application still calling.
    defers: AtomicU32,
    /// Write size the last send had reached (a send starts with small writes and doubles
    /// them, so the first bytes leave early); a send that continues a stream goes on from there.
    olen: AtomicU32,
    /// Staging allowed: a send succeeded and no shutdown or error came since. Written under
    /// the stage's lock (a staging send reads it there); read without it by a send that posts
    /// its own write, which takes the lock only to set it.
    open: AtomicBool,
}

#[derive(Debug, Default)]
struct Staged {
    bytes: Vec<u8>,
    /// The flusher was handed the stage and has not found it empty since.
    queued: bool,
}

impl Stage {
    fn lock(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes staged.
    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// A receive: the next send answers the peer, it is not part of a stream.
    pub(super) fn on_recv(&self) {
        self.last_send.store(0, Ordering::Relaxed);
    }

    /// Whether a send now continues a stream: it comes sooner after the previous send than
    /// that send's post took, with no receive in between.
    fn streaming(&self, now: u64) -> bool {
        let last = self.last_send.load(Ordering::Relaxed);
        last != 0 && now.wrapping_sub(last) < self.post_cost.load(Ordering::Relaxed)
    }

    /// Flush job: while the application goes on calling (it is in a call on the socket, or
    /// left one less than a post's time ago), the ticks until the job looks again; None when
    /// it should post what is staged or gathered now. The application's calls post both
    /// themselves (a send posts the stage once it is a post's time old, and any call drives
    /// the connection, posting gathered sends as the writes before them complete); a post in
    /// the service thread would only take the CPU from it: with both ends busy on a two-CPU
    /// machine it runs instead of the application, not beside it, and each such post carried
    /// one message.
    ///
    /// The first look after the job was handed its work waits a post's time from now: the
    /// application may not have run since (the service thread's wake-up can take its CPU, and
    /// under emulation that wake-up alone takes longer than a post). Each further look that
    /// finds the application still calling waits twice as long, up to [`MAX_DEFER`] posts'
    /// time and [`MAX_DEFER_US`], so that a long stream costs the service thread a few
    /// wake-ups, not one per post. A call that lasts (a blocking receive, asleep on the
    /// completions, which posts them too) is counted on for [`MAX_DEFER_US`] after the
    /// previous call's end at most, so that the job neither looks again and again while it
    /// sleeps nor counts on it once it returned.
    pub(super) fn app_still_calling(&self, now: u64, inside: bool, last_exit: u64) -> Option<u64> {
        let cost = self.post_cost.load(Ordering::Relaxed);
        let max = MAX_DEFER_US * crate::verbs::ticks_per_us();
        if cost == 0 {
            return None;
        }
        let n = self.defers.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            return Some(cost);
        }
        let waited = now.wrapping_sub(last_exit);
        if waited >= max || (!inside && waited >= cost) {
            self.defers.store(0, Ordering::Relaxed);
            return None;
        }
        Some(Self::deferral(cost, n))
    }

    /// The `n`th look (from 1) that finds the application still calling waits this long.
    fn deferral(cost: u64, n: u32) -> u64 {
        let max = MAX_DEFER_US * crate::verbs::ticks_per_us();
        cost.saturating_mul(1 << (n.max(1) - 1).min(MAX_DEFER.trailing_zeros()))
            .min(max)
    }

    /// The flush job is handed work by a call of the application: how long until its first
    /// look, which waits a post's time from now (see `app_still_calling`), counted as that
    /// first look done, so that the service thread need not wake now only to learn it. None
    /// when no post was measured yet (the job looks at once).
    pub(super) fn first_look(&self) -> Option<std::time::Duration> {
        let cost = self.post_cost.load(Ordering::Relaxed);
        if cost == 0 {
            return None;
        }
        // A job that is deferring already keeps its count of looks.
        let _ = self
            .defers
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed);
        Some(crate::verbs::wait_of_ticks(cost))
    }

    /// The flush job found the socket in use by a call of the application (which drives the
    /// connection, posting what is gathered, and posts the stage): how long until it looks
    /// again, counted as a look that found the application still calling (see
    /// `app_still_calling`: each such look waits twice as long as the one before).
    pub(super) fn retry_after(&self) -> std::time::Duration {
        let cost = self.post_cost.load(Ordering::Relaxed);
        let n = self.defers.fetch_add(1, Ordering::Relaxed).max(1);
        let us = Self::deferral(cost, n) / crate::verbs::ticks_per_us();
        std::time::Duration::from_micros(us.max(RETRY_MIN_US))
    }

    /// The write size a send starts with: where the previous send left off if this one
    /// continues a stream (the pipe is busy already, small writes would only cost more posts,
    /// completions and credits), else small.
    pub(super) fn first_write_size(&self, now: u64) -> u32 {
        if self.streaming(now) {
            self.olen.load(Ordering::Relaxed).max(core::OLAP_START_SIZE)
        } else {
            core::OLAP_START_SIZE
        }
    }
}

impl StreamSocket {
    /// Bytes that went through the stage (were sent by the flush job), for diagnostics.
    pub fn staged_bytes(&self) -> u64 {
        self.stage.total.load(Ordering::Relaxed)
    }

    /// Stages `buf` if the application is streaming small sends (see the module comment);
    /// `now` is when the send started (ticks). `None` means send it the ordinary way.
    pub(super) fn try_stage(&self, buf: &[u8], now: u64) -> Option<usize> {
        if buf.len() >= STAGE_MAX_MSG || buf.is_empty() {
            return None;
        }
        let st = &self.stage;
        if !st.streaming(now) {
            return None;
        }
        let mut s = st.lock();
        if !st.open.load(Ordering::Relaxed) || s.bytes.len() + buf.len() > STAGE_LIMIT {
            return None;
        }
        if s.bytes.is_empty() {
            st.since.store(now, Ordering::Relaxed);
        }
        s.bytes.extend_from_slice(buf);
        st.len.store(s.bytes.len(), Ordering::Release);
        st.total.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let hand_over = !std::mem::replace(&mut s.queued, true);
        if hand_over {
            // Under the stage's lock, so the flush job cannot let go of the socket between this
            // and its look at the stage (see `settle_stage`).
            self.in_flusher.store(true, Ordering::Release);
        }
        let post_now = s.bytes.len() >= STAGE_POST_AT
            || now.wrapping_sub(st.since.load(Ordering::Relaxed))
                >= st.post_cost.load(Ordering::Relaxed);
        drop(s);
        st.last_send.store(now, Ordering::Relaxed);
        if hand_over {
            // The backstop, should the application stop calling.
            self.hand_flush();
        }
        if post_now {
            self.post_stage();
        }
        Some(buf.len())
    }

    /// The application posts its stage itself (see the module comment). Errors are left to
    /// its next call, which finds the connection failed (the stage is dropped with it).
    fn post_stage(&self) {
        let mut g = self.lock();
        if let super::State::Connected(conn) = &mut g.state {
            let _ = self.drive(conn);
        }
    }

    /// After a send that took the ordinary path: `t0` is when it started, `olen` the write
    /// size it reached, `posted` whether it posted a write (else its bytes were gathered
    /// behind writes in flight, which says nothing of what a post costs). Opens the stage.
    pub(super) fn sent_directly(&self, t0: u64, olen: u32, posted: bool) {
        let st = &self.stage;
        st.olen.store(olen, Ordering::Relaxed);
        let now = ticks();
        if posted {
            // A send that waited for room counts its wait too: bounded, so that such a wait
            // does not make every later send look like part of a stream, nor make the flush
            // job wait that long for the application to post its stage.
            let cap = MAX_POST_COST_US * crate::verbs::ticks_per_us();
            st.post_cost
                .store(now.wrapping_sub(t0).min(cap), Ordering::Relaxed);
        }
        st.last_send.store(now, Ordering::Relaxed);
        if !st.open.load(Ordering::Relaxed) {
            let _s = st.lock();
            st.open.store(true, Ordering::Relaxed);
        }
    }

    /// Stops staging (shutdown): later sends take the ordinary path, which reports the error.
    pub(super) fn close_stage(&self) {
        let s = self.stage.lock();
        self.stage.open.store(false, Ordering::Relaxed);
        drop(s);
        self.stage.last_send.store(0, Ordering::Relaxed);
    }

    /// Drops what is staged (the connection is gone) and stops staging.
    pub(super) fn drop_stage(&self) {
        let mut s = self.stage.lock();
        self.stage.open.store(false, Ordering::Relaxed);
        s.bytes.clear();
        self.stage.len.store(0, Ordering::Release);
    }

    /// Posts what is staged, as far as credits and buffers allow; returns the bytes posted.
    /// On a connection that can no longer send, staged bytes are dropped (as a TCP socket's
    /// send queue is on a reset) and staging stops.
    #[inline]
    pub(super) fn drain_stage(&self, conn: &mut Conn) -> Result<usize> {
        if self.stage.len() == 0 {
            return Ok(0);
        }
        self.post_staged(conn)
    }

    fn post_staged(&self, conn: &mut Conn) -> Result<usize> {
        let st = &self.stage;
        if !conn.link.core.flags().writable || conn.shut_wr {
            self.drop_stage();
            return Ok(0);
        }
        // Taken out, so the application can stage more while this posts.
        let mut bytes = std::mem::take(&mut st.lock().bytes);
        let mut olen = core::MAX_TRANSFER;
        let posted = match conn.link.send_some(&bytes, &mut olen, true) {
            Ok(n) => n,
            Err(e) => {
                // The post failed: the connection is gone, and so is what was staged.
                self.drop_stage();
                return Err(e.into());
            }
        };
        let mut s = st.lock();
        bytes.drain(..posted);
        if bytes.is_empty() && s.bytes.is_empty() {
            st.since.store(0, Ordering::Relaxed);
        }
        if !bytes.is_empty() {
            // What did not fit goes before anything staged meanwhile.
            bytes.extend_from_slice(&s.bytes);
            s.bytes = bytes;
        } else if s.bytes.is_empty() {
            // Keep the allocation.
            s.bytes = bytes;
        }
        st.len.store(s.bytes.len(), Ordering::Release);
        drop(s);
        if posted > 0 {
            trace_verbose!("fd {}: posted {posted} staged bytes", self.channel.fd());
        }
        Ok(posted)
    }

    /// Flusher: posts the stage again and again while the application keeps staging (each
    /// round is one write gathering what came during the previous one).
    pub(super) fn flush_stage(&self, conn: &mut Conn) -> Result<()> {
        for _ in 0..FLUSH_ROUNDS {
            conn.progress()?;
            if self.drain_stage(conn)? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Flusher, after posting: whether staged bytes still wait (for credits or room). When
    /// the stage is empty and `more` (gathered sends) is false, the flush job lets go of the
    /// socket; decided under the stage's lock so that a send staging meanwhile hands it over
    /// again.
    pub(super) fn settle_stage(&self, more: bool) -> bool {
        let mut s = self.stage.lock();
        if !s.bytes.is_empty() {
            return true;
        }
        s.queued = false;
        if !more {
            self.in_flusher.store(false, Ordering::Release);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verbs::ticks_per_us;

    /// A stage with `len` bytes staged, posts costing `cost`.
    fn stage(len: usize, cost: u64) -> Stage {
        let st = Stage::default();
        st.len.store(len, Ordering::Release);
        st.post_cost.store(cost, Ordering::Relaxed);
        st
    }

    #[test]
    fn the_flush_job_leaves_its_work_to_an_application_that_is_still_calling() {
        let us = ticks_per_us();
        let (t0, cost) = (1_000_000 * us, 100 * us);
        let st = stage(64, cost);
        // The first look, however late it comes: a post's time from now (the application
        // may not have had the CPU since it handed the work over).
        assert_eq!(st.app_still_calling(t0 + 50 * us, false, t0), Some(cost));
        // A call since: a post's time, then twice as far, never further than MAX_DEFER_US.
        assert_eq!(
            st.app_still_calling(t0 + 200 * us, false, t0 + 190 * us),
            Some(cost)
        );
        assert_eq!(
            st.app_still_calling(t0 + 400 * us, false, t0 + 390 * us),
            Some(2 * cost)
        );
        for _ in 0..10 {
            let w = st.app_still_calling(t0 + 400 * us, false, t0 + 390 * us);
            assert!(w.expect("still calling") <= MAX_DEFER_US * us);
        }
        // No call for a post's time: the job posts, and its next look waits a post's time
        // again, after which it posts if there was still no call.
        assert_eq!(
            st.app_still_calling(t0 + 490 * us, false, t0 + 390 * us),
            None
        );
        assert_eq!(st.app_still_calling(t0 + 5000 * us, false, t0), Some(cost));
        assert_eq!(st.app_still_calling(t0 + 5100 * us, false, t0), None);
    }

    #[test]
    fn a_call_that_lasts_is_counted_on_for_a_bounded_time() {
        let us = ticks_per_us();
        let (t0, cost) = (1_000_000 * us, 100 * us);
        let st = stage(64, cost);
        assert_eq!(st.app_still_calling(t0 + 10 * us, true, t0), Some(cost));
        assert_eq!(st.app_still_calling(t0 + 900 * us, true, t0), Some(cost));
        assert_eq!(st.app_still_calling(t0 + MAX_DEFER_US * us, true, t0), None);
    }

    #[test]
    fn a_job_handed_over_with_its_first_look_put_off_looks_for_real_then() {
        let us = ticks_per_us();
        let (t0, cost) = (1_000_000 * us, 100 * us);
        let st = stage(64, cost);
        let first = st.first_look().expect("a post was measured");
        assert_eq!(first, std::time::Duration::from_micros(101));
        // The service thread's look a post's time later is not another put-off: no call
        // since the hand-over, the job posts.
        assert_eq!(
            st.app_still_calling(t0 + 150 * us, false, t0 + 40 * us),
            None
        );
        // Handed over again while it defers: the count of looks stays.
        st.first_look();
        assert_eq!(
            st.app_still_calling(t0 + 300 * us, true, t0 + 290 * us),
            Some(cost)
        );
        st.first_look();
        assert_eq!(
            st.app_still_calling(t0 + 500 * us, false, t0 + 490 * us),
            Some(2 * cost)
        );
        assert_eq!(stage(64, 0).first_look(), None, "no post measured: at once");
    }

    #[test]
    fn a_socket_found_in_use_is_looked_at_again_later_and_later() {
        let us = ticks_per_us();
        let st = stage(64, 100 * us);
        let waits: Vec<u64> = (0..8)
            .map(|_| st.retry_after().as_micros() as u64)
            .collect();
        assert_eq!(waits[..4], [100, 100, 200, 400]);
        assert!(waits.iter().all(|&w| w <= MAX_DEFER_US));
        assert_eq!(*waits.last().unwrap(), MAX_DEFER_US);
        // Before a post was measured: a short wait, not none.
        assert_eq!(stage(64, 0).retry_after().as_micros() as u64, RETRY_MIN_US);
    }

    #[test]
    fn the_flush_job_posts_at_once_without_a_measured_post() {
        let us = ticks_per_us();
        let t0 = 1_000_000 * us;
        assert_eq!(stage(64, 0).app_still_calling(t0 + 1, true, t0), None);
    }
}
