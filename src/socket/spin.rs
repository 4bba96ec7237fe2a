//! How long a blocking call busy-polls before it sleeps on the completion channel.
//!
//! librdmacm spins for a fixed `polling_time` (10 µs). Where a wake-up from sleep costs more
//! than the wait itself (Soft-RoCE in a VM: a sleeping round trip takes about three times a
//! spinning one, and more CPU), a fixed 10 µs spin never catches the reply. [`Spin`] adapts the
//! window to the waits it sees, between `polling_time` and a cap:
//!
//! - a wait that ended while spinning sets the window to twice its length (a shorter wait
//!   shrinks it again);
//! - a wait that had to sleep but was not much longer than the cap doubles the window (explore:
//!   the reply might have been caught);
//! - a few such misses in a row at the cap, or one very long wait, drop the window back to
//!   `polling_time` and hold it there for a while, so a slow peer costs little spinning.
//!
//! Pure bookkeeping over tick counts (no clock, no I/O), so the policy is unit-tested here.

/// Upper bound of the adaptive window, microseconds.
pub const CAP_US: u64 = 500;
/// Misses in a row with the window at the cap before giving up on spinning.
const MISSES_AT_CAP: u32 = 3;
/// Waits spent at the minimum after giving up, before exploring again.
const HOLD_WAITS: u32 = 64;
/// A wait longer than this many caps is idleness, not a reply to catch.
const IDLE_CAPS: u64 = 4;

/// The adaptive busy-poll window of one connection, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spin {
    min: u64,
    cap: u64,
    window: u64,
    misses: u32,
    hold: u32,
}

impl Spin {
    /// A window that starts at `min` and may grow to `cap` (`cap <= min`: fixed at `min`).
    pub fn new(min: u64, cap: u64) -> Spin {
        Spin {
            min,
            cap: cap.max(min),
            window: min,
            misses: 0,
            hold: 0,
        }
    }

    /// How long to busy-poll before sleeping.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// A spin caught what it waited for after `waited` ticks, in a place whose waits differ in
    /// kind (an epoll set: a reply, then room to write, then the next request): the window
    /// covers twice this wait but shrinks by a quarter at most, so that one short wait does
    /// not cut the spin for the long ones that follow it.
    pub fn record_caught_decaying(&mut self, waited: u64) {
        if self.cap == self.min {
            return;
        }
        let floor = self.window - self.window / 4;
        self.window = waited
            .saturating_mul(2)
            .max(floor)
            .clamp(self.min, self.cap);
        self.misses = 0;
    }

    /// A wait ended after `waited` ticks; `slept` says whether it went to sleep first.
    pub fn record(&mut self, waited: u64, slept: bool) {
        if self.cap == self.min {
            return;
        }
        if !slept {
            self.window = waited.saturating_mul(2).clamp(self.min, self.cap);
            self.misses = 0;
            return;
        }
        if waited > self.cap.saturating_mul(IDLE_CAPS) {
            self.reset(0);
            return;
        }
        if self.hold > 0 {
            self.hold -= 1;
            return;
        }
        if self.window < self.cap {
            self.window = self.window.saturating_mul(2).min(self.cap);
            return;
        }
        self.misses += 1;
        if self.misses >= MISSES_AT_CAP {
            self.reset(HOLD_WAITS);
        }
    }

    fn reset(&mut self, hold: u32) {
        self.window = self.min;
        self.misses = 0;
        self.hold = hold;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_catch_shrinks_the_window_by_a_quarter_at_most() {
        let mut s = Spin::new(10, 500);
        s.record_caught_decaying(200);
        assert_eq!(s.window(), 400);
        s.record_caught_decaying(1);
        assert_eq!(s.window(), 300);
        s.record_caught_decaying(1);
        assert_eq!(s.window(), 225);
        s.record_caught_decaying(400);
        assert_eq!(s.window(), 500, "never above the cap");
        let mut fixed = Spin::new(10, 0);
        fixed.record_caught_decaying(300);
        assert_eq!(fixed.window(), 10);
    }

    #[test]
    fn fixed_window_never_moves() {
        let mut s = Spin::new(10, 0);
        for (w, slept) in [(5, false), (1000, true), (15, true)] {
            s.record(w, slept);
            assert_eq!(s.window(), 10);
        }
    }

    #[test]
    fn caught_waits_set_twice_their_length_within_bounds() {
        let mut s = Spin::new(10, 500);
        s.record(100, false);
        assert_eq!(s.window(), 200);
        s.record(2, false);
        assert_eq!(s.window(), 10, "never below the minimum");
        s.record(400, false);
        assert_eq!(s.window(), 500, "never above the cap");
    }

    #[test]
    fn misses_explore_up_to_the_cap_then_catch() {
        let mut s = Spin::new(10, 500);
        let mut seen = vec![];
        for _ in 0..6 {
            s.record(700, true); // a sleeping wait, the wake-up included
            seen.push(s.window());
        }
        assert_eq!(seen, [20, 40, 80, 160, 320, 500]);
        s.record(230, false); // now the spin catches the reply
        assert_eq!(s.window(), 460);
    }

    #[test]
    fn a_slow_peer_is_given_up_on_and_held_at_the_minimum() {
        let mut s = Spin::new(10, 500);
        for _ in 0..6 {
            s.record(1500, true);
        }
        assert_eq!(s.window(), 500);
        for _ in 0..MISSES_AT_CAP {
            s.record(1500, true);
        }
        assert_eq!(s.window(), 10, "gave up after misses at the cap");
        for _ in 0..HOLD_WAITS {
            s.record(1500, true);
            assert_eq!(s.window(), 10, "held while the hold lasts");
        }
        s.record(1500, true);
        assert_eq!(s.window(), 20, "explores again afterwards");
    }

    #[test]
    fn a_caught_wait_clears_the_misses() {
        let mut s = Spin::new(10, 500);
        for _ in 0..6 {
            s.record(700, true);
        }
        s.record(700, true);
        s.record(700, true);
        s.record(240, false);
        s.record(700, true);
        s.record(700, true);
        assert_eq!(
            s.window(),
            500,
            "two misses after a catch are not three in a row"
        );
    }

    #[test]
    fn idleness_resets_without_holding() {
        let mut s = Spin::new(10, 500);
        s.record(300, false);
        assert_eq!(s.window(), 500);
        s.record(500 * IDLE_CAPS + 1, true);
        assert_eq!(s.window(), 10);
        s.record(700, true);
        assert_eq!(s.window(), 20, "no hold after plain idleness");
    }
}
