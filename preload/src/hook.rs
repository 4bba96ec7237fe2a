//! Epoll sets that sleep on their rsockets' completion channels themselves.
//!
//! An rsocket's descriptor shows its readiness, and the rsocket core's service thread keeps it
//! up to date for a program asleep in epoll_wait: a message wakes the service thread, which
//! shows it, which wakes the program. Two wake-ups per message, where kernel TCP has one.
//!
//! So when the program puts a connected rsocket in an epoll set (`epoll_ctl`), the preload puts
//! the rsocket's completion channel in the same set too, under a token of its own
//! ([`registered`]), and the service thread leaves that channel to the set
//! (`StreamSocket::hook`). The interposed epoll_wait, epoll_pwait and epoll_pwait2 ([`wait`])
//! take the tokens out of what the kernel returns: for each, the rsocket processes what came
//! and shows it on its descriptor (`StreamSocket::hook_event`), from the program's own thread;
//! the events that showing raises are collected at once, without sleeping, and returned with
//! the others. A message costs the program one wake-up, as with kernel TCP.
//!
//! The token is bits no program puts in `epoll_data` by chance: [`MAGIC`], the fork generation,
//! the completion channel's number and the rsocket's. A token of an unknown registration (the
//! rsocket closed from another descriptor of a set) is removed from the set; one of an older
//! generation belongs to the parent process (an epoll set shared across fork) and is left to it.
//!
//! An rsocket stays hooked while any registration lasts: `epoll_ctl(EPOLL_CTL_DEL)`, the
//! rsocket's close and the epoll set's close end them. Other ways to sleep on the descriptor
//! (poll, select, blocking calls, rpoll) find the completion channel as before: the blocking
//! calls and rpoll sleep on it themselves, and for poll and select on a hooked rsocket the
//! service thread watches the channel again while they sleep ([`hold`]).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use libc::{c_int, epoll_event};
use rsocket::verbs::{ticks, ticks_per_us};

use crate::real;
use crate::table::{self, generation};
use crate::trace;

/// The top 16 bits of every token.
const MAGIC: u64 = 0xa73c << 48;
/// Field widths: generation 8 bits, completion channel 20, rsocket 20.
const FD_BITS: u32 = 20;
const FD_MASK: u64 = (1 << FD_BITS) - 1;

/// One registration: the completion channel of rsocket `rs` in epoll set `epfd`, made when
/// the program put its descriptor `fd` there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// The epoll set.
    pub epfd: RawFd,
    /// The program's descriptor of the rsocket in that set.
    pub fd: RawFd,
    /// The rsocket.
    pub rs: RawFd,
    /// Its completion channel (None: not connected yet; hooked at the next wait).
    pub comp: Option<RawFd>,
    /// The program's registration of `fd` (events, data); None after EPOLL_CTL_DEL.
    pub app: Option<(u32, u64)>,
}

/// The registrations, kept with the table's details.
#[derive(Debug, Default)]
pub struct Hooks {
    /// By epoll set and program descriptor.
    by_key: HashMap<(RawFd, RawFd), Hook>,
    /// Keys by rsocket.
    by_rs: HashMap<RawFd, Vec<(RawFd, RawFd)>>,
    /// Registrations by epoll set.
    sets: HashMap<RawFd, usize>,
}

impl Hooks {
    fn insert(&mut self, h: Hook) {
        if h.comp.is_none() {
            PENDING.fetch_add(1, Ordering::Relaxed);
        }
        self.by_key.insert((h.epfd, h.fd), h);
        self.by_rs.entry(h.rs).or_default().push((h.epfd, h.fd));
        *self.sets.entry(h.epfd).or_default() += 1;
        SETS.store(self.sets.len(), Ordering::Relaxed);
    }

    fn remove(&mut self, key: (RawFd, RawFd)) -> Option<Hook> {
        let h = self.by_key.remove(&key)?;
        if h.comp.is_none() {
            PENDING.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(v) = self.by_rs.get_mut(&h.rs) {
            v.retain(|k| *k != key);
            if v.is_empty() {
                self.by_rs.remove(&h.rs);
            }
        }
        if let Some(n) = self.sets.get_mut(&h.epfd) {
            *n -= 1;
            if *n == 0 {
                self.sets.remove(&h.epfd);
            }
        }
        SETS.store(self.sets.len(), Ordering::Relaxed);
        Some(h)
    }

    fn known(&self, rs: RawFd, comp: RawFd) -> bool {
        self.by_rs.get(&rs).is_some_and(|v| {
            v.iter()
                .any(|k| self.by_key.get(k).is_some_and(|h| h.comp == Some(comp)))
        })
    }
}

/// Registrations waiting for their rsocket to connect (any set).
static PENDING: AtomicUsize = AtomicUsize::new(0);
/// Epoll sets with registrations (close looks them up only while there are any).
static SETS: AtomicUsize = AtomicUsize::new(0);

fn token(rs: RawFd, comp: RawFd) -> Option<u64> {
    let (r, c) = (u64::try_from(rs).ok()?, u64::try_from(comp).ok()?);
    (r <= FD_MASK && c <= FD_MASK)
        .then(|| MAGIC | u64::from(generation() & 0xff) << 40 | c << FD_BITS | r)
}

/// A token's (generation, completion channel, rsocket), or None if `v` is the program's.
fn parse(v: u64) -> Option<(u32, RawFd, RawFd)> {
    (v & (0xffff << 48) == MAGIC).then_some((
        ((v >> 40) & 0xff) as u32,
        ((v >> FD_BITS) & FD_MASK) as RawFd,
        (v & FD_MASK) as RawFd,
    ))
}

fn socket(rs: RawFd) -> Option<std::sync::Arc<rsocket::socket::StreamSocket>> {
    rsocket::socket::lookup(rs).ok()
}

/// Puts rsocket `rs`'s completion channel in `epfd` for program descriptor `fd`; false if the
/// rsocket is not connected yet (or cannot be hooked).
fn hook(epfd: RawFd, fd: RawFd, rs: RawFd) -> Option<Hook> {
    let s = socket(rs)?;
    let comp = s.hook()?;
    let Some(tok) = token(rs, comp) else {
        s.unhook();
        return None;
    };
    let mut ev = epoll_event {
        events: libc::EPOLLIN as u32,
        u64: tok,
    };
    // SAFETY: a valid event for ADD; the completion channel is the rsocket core's.
    if unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, comp, &mut ev) } != 0 {
        // Already there (another descriptor of the same rsocket in the same set): that
        // registration serves both.
        s.unhook();
        return None;
    }
    trace!("rsocket {rs}: completion channel {comp} in epoll set {epfd} (fd {fd})");
    Some(Hook {
        epfd,
        fd,
        rs,
        comp: Some(comp),
        app: None,
    })
}

fn unhook(h: &Hook) {
    if let Some(comp) = h.comp {
        // SAFETY: DEL takes no event; the channel is the rsocket core's.
        unsafe { real::epoll_ctl(h.epfd, libc::EPOLL_CTL_DEL, comp, std::ptr::null_mut()) };
        if let Some(s) = socket(h.rs) {
            s.unhook();
        }
    }
}

/// The program's `epoll_ctl(epfd, op, fd)` on rsocket `rs` succeeded (`app`: the events and
/// data it registered, for ADD and MOD): hooks the rsocket to the set.
pub fn registered(epfd: RawFd, op: c_int, fd: RawFd, rs: RawFd, app: Option<(u32, u64)>) {
    if !enabled() {
        return;
    }
    let key = (epfd, fd);
    match op {
        libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD => {
            let (have, stale) = table::with(|d| match d.hooks.by_key.get_mut(&key) {
                // The program's number now names another rsocket (the old one lives on in
                // a duplicate, and so does the kernel's registration of it, under the same
                // number): the old registration's data is no longer the program's.
                Some(h) if h.rs != rs => (None, d.hooks.remove(key)),
                Some(h) => {
                    h.app = app;
                    (Some(h.comp.is_some()), None)
                }
                None => (None, None),
            });
            if let Some(old) = stale {
                unhook(&old);
            }
            if have == Some(true) {
                return;
            }
            let h = hook(epfd, fd, rs);
            table::with(|d| match (h, have) {
                (Some(h), _) => {
                    d.hooks.remove(key);
                    d.hooks.insert(Hook { app, ..h });
                }
                (None, None) => d.hooks.insert(Hook {
                    epfd,
                    fd,
                    rs,
                    comp: None,
                    app,
                }),
                (None, Some(_)) => {}
            });
        }
        // EPOLL_CTL_DEL leaves the registration: event loops take a descriptor out of their set
        // and put it back all the time (redis, whenever it has nothing to write and reads
        // nothing for a moment), and each hook and unhook would cost a wake-up of the service
        // thread. Until the rsocket or the set closes, its completions wake the set, which
        // shows them on the descriptor and sleeps again.
        libc::EPOLL_CTL_DEL => table::with(|d| {
            if let Some(h) = d.hooks.by_key.get_mut(&key) {
                h.app = None;
            }
        }),
        _ => {}
    }
}

/// Rsocket `rs` is about to close: its registrations go (the completion channel leaves the
/// sets now, not when a lingering close ends).
pub fn closing(rs: RawFd) {
    if SETS.load(Ordering::Relaxed) == 0 && PENDING.load(Ordering::Relaxed) == 0 {
        return;
    }
    let gone: Vec<Hook> = table::with(|d| {
        let keys = d.hooks.by_rs.get(&rs).cloned().unwrap_or_default();
        keys.into_iter().filter_map(|k| d.hooks.remove(k)).collect()
    });
    for h in &gone {
        unhook(h);
    }
}

/// Descriptor `fd` is about to close: if it is an epoll set with registrations, they go with it.
pub fn set_closing(fd: RawFd) {
    if SETS.load(Ordering::Relaxed) == 0 {
        return;
    }
    let gone: Vec<Hook> = table::with(|d| {
        if !d.hooks.sets.contains_key(&fd) {
            return Vec::new();
        }
        let keys: Vec<_> = d
            .hooks
            .by_key
            .keys()
            .filter(|k| k.0 == fd)
            .copied()
            .collect();
        keys.into_iter().filter_map(|k| d.hooks.remove(k)).collect()
    });
    for h in &gone {
        // The set goes with the descriptor (unless duplicated: then the registrations stay in
        // it, and their tokens are removed when they come).
        if h.comp.is_some()
            && let Some(s) = socket(h.rs)
        {
            s.unhook();
        }
    }
}

/// A forked child: the registrations are the parent's (an epoll set made before the fork is
/// shared with it, and the child must not take them out of it).
pub fn forked(d: &mut table::Details) {
    d.hooks = Hooks::default();
    SPINS.with(|m| m.borrow_mut().clear());
    PENDING.store(0, Ordering::Relaxed);
    SETS.store(0, Ordering::Relaxed);
}

/// Hooks the registrations of `epfd` whose rsocket connected since.
fn adopt_pending(epfd: RawFd) {
    let waiting: Vec<Hook> = table::with(|d| {
        d.hooks
            .by_key
            .values()
            .filter(|h| h.epfd == epfd && h.comp.is_none())
            .copied()
            .collect()
    });
    for w in waiting {
        if let Some(h) = hook(w.epfd, w.fd, w.rs) {
            let kept = table::with(|d| {
                let same = d.hooks.by_key.get(&(w.epfd, w.fd)) == Some(&w);
                if same {
                    d.hooks.remove((w.epfd, w.fd));
                    d.hooks.insert(Hook { app: w.app, ..h });
                }
                same
            });
            if !kept {
                unhook(&h);
            }
        }
    }
}

/// Handles the tokens among the `n` events the kernel put at `ev[start..]` (room for `max` in
/// all): moves the program's events to follow `ev[..start]` (the ones an earlier call returned:
/// an event for the same data there takes the new bits instead, as a level-triggered set
/// reports a descriptor that is still ready once more) and adds the ones the tokens' rsockets
/// began to show. Returns how many events the program has now, and whether the set must be
/// asked again for some (a registration with EPOLLONESHOT, which only the kernel can honour,
/// or no room left).
///
/// An event added here is one the kernel has queued too (showing it woke the set): the next
/// wait may report it again, as a level-triggered set reports what is still ready, and an
/// edge-triggered one once more (a spurious wake-up, which such programs expect).
///
/// # Safety
/// `ev` points to room for `max` events, the first `start + n` of them initialised.
unsafe fn filter(
    epfd: RawFd,
    ev: *mut epoll_event,
    start: usize,
    n: usize,
    max: usize,
) -> (usize, bool) {
    // SAFETY: the caller's contract (only initialised events are read).
    let evs = unsafe { std::slice::from_raw_parts_mut(ev, max) };
    let mut kept = start;
    let mut tokens: [(RawFd, RawFd); 8] = [(-1, -1); 8];
    let mut n_tokens = 0;
    let mut ask_again = false;
    for i in start..start + n {
        let e = evs[i];
        let Some((made_in, comp, rs)) = parse(e.u64) else {
            if let Some(same) = evs[..start].iter_mut().find(|x| x.u64 == e.u64) {
                same.events |= e.events;
            } else {
                evs[kept] = e;
                kept += 1;
            }
            continue;
        };
        if made_in != generation() & 0xff {
            // The parent's, in a set shared across fork: its to take.
            continue;
        }
        if n_tokens < tokens.len() {
            tokens[n_tokens] = (comp, rs);
            n_tokens += 1;
        } else {
            // More than we keep track of here: the kernel reports what they show.
            handle(epfd, comp, rs);
            ask_again = true;
        }
    }
    for &(comp, rs) in &tokens[..n_tokens] {
        let new = handle(epfd, comp, rs);
        ask_again |= show_new(epfd, rs, new, evs, &mut kept);
    }
    (kept, ask_again)
}

/// Adds to `evs[..*kept]` the events that rsocket `rs` beginning to show `new` (POLL bits)
/// raises for the program's registrations of it in `epfd` (merged into an event for the same
/// data already there). Returns whether the set must be asked again (EPOLLONESHOT, no room).
fn show_new(epfd: RawFd, rs: RawFd, new: i16, evs: &mut [epoll_event], kept: &mut usize) -> bool {
    if new == 0 {
        return false;
    }
    let regs: Vec<(u32, u64)> = table::with(|d| {
        d.hooks.by_rs.get(&rs).map_or_else(Vec::new, |keys| {
            keys.iter()
                .filter(|k| k.0 == epfd)
                .filter_map(|k| d.hooks.by_key.get(k).and_then(|h| h.app))
                .collect()
        })
    });
    let mut ask_again = false;
    for (events, data) in regs {
        let shows = u32::from(new as u16) & (events | (libc::EPOLLERR | libc::EPOLLHUP) as u32);
        if shows == 0 {
            continue;
        }
        if events & libc::EPOLLONESHOT as u32 != 0 {
            ask_again = true;
        } else if let Some(same) = evs[..*kept].iter_mut().find(|x| x.u64 == data) {
            same.events |= shows;
        } else if *kept == evs.len() {
            ask_again = true;
        } else {
            evs[*kept] = epoll_event {
                events: shows,
                u64: data,
            };
            *kept += 1;
        }
    }
    ask_again
}

/// One token: the rsocket takes what came (returns what its descriptor began to show), or a
/// registration that outlived its own goes.
fn handle(epfd: RawFd, comp: RawFd, rs: RawFd) -> i16 {
    if table::with(|d| d.hooks.known(rs, comp)) {
        return socket(rs).map_or(0, |s| s.hook_event());
    }
    // A registration that outlived its own (a set closed through one of two descriptors,
    // say): out of the set, or it would wake the program for ever.
    // SAFETY: DEL takes no event.
    unsafe { real::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, comp, std::ptr::null_mut()) };
    0
}

/// The interposed epoll waits: `call(events, max, timeout)` is the C library's wait (None:
/// no timeout). Sleeps at most `timeout` in all, returns the program's events only (see the
/// module documentation).
///
/// # Safety
/// `ev` and `max` as epoll_wait(2) takes them; `call` is a C library wait on `epfd`.
pub unsafe fn wait(
    epfd: RawFd,
    ev: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    mut call: impl FnMut(*mut epoll_event, c_int, Option<Duration>) -> c_int,
) -> c_int {
    if SETS.load(Ordering::Relaxed) == 0 && PENDING.load(Ordering::Relaxed) == 0
        || max <= 0
        || ev.is_null()
    {
        return call(ev, max, timeout);
    }
    if PENDING.load(Ordering::Relaxed) > 0 {
        adopt_pending(epfd);
    }
    let start = ticks();
    let mut left = timeout;
    let mut spun = None;
    if timeout != Some(Duration::ZERO) {
        // SAFETY: the caller's contract.
        match unsafe { spin(epfd, ev, max, timeout, &mut call) } {
            Ok(n) => return n,
            Err(s) => spun = s,
        }
    }
    loop {
        let n = call(ev, max, left);
        if let Some((t0, ref mut policy)) = spun {
            // The spin missed: the whole wait, the sleep included, teaches the window.
            policy.record(ticks().wrapping_sub(t0), true);
            save_spin(epfd, *policy);
            spun = None;
        }
        if n <= 0 {
            return n;
        }
        // SAFETY: the kernel filled n of the caller's max events.
        let (mut got, again) = unsafe { filter(epfd, ev, 0, n as usize, max as usize) };
        if got == n as usize && !again {
            return n;
        }
        if again && got < max as usize {
            // What only the kernel can report: collected without sleeping.
            // SAFETY: got < max: the rest of the caller's array.
            let m = call(
                unsafe { ev.add(got) },
                max - got as c_int,
                Some(Duration::ZERO),
            );
            if m > 0 {
                // SAFETY: the kernel filled m events after the got ones.
                got = unsafe { filter(epfd, ev, got, m as usize, max as usize).0 };
            }
        }
        if got > 0 {
            return got as c_int;
        }
        // Only the rsockets' wake-ups, nothing for the program yet: back to sleep for what
        // is left of its timeout.
        if let Some(t) = timeout {
            let spent = Duration::from_micros(ticks().wrapping_sub(start) / ticks_per_us().max(1));
            if spent >= t {
                return 0;
            }
            left = Some(t - spent);
        }
    }
}

/// Sets with at most this many hooked rsockets busy-poll them before sleeping.
const SPIN_SOCKETS: usize = 4;
/// Rounds of a spin between two looks at the kernel's side of the set (a syscall).
const KERNEL_EVERY: u32 = 8;

thread_local! {
    /// Each set's busy-poll policy, per thread (the core's adaptive window).
    static SPINS: std::cell::RefCell<HashMap<RawFd, rsocket::socket::spin::Spin>> =
        std::cell::RefCell::new(HashMap::new());
}

fn save_spin(epfd: RawFd, s: rsocket::socket::spin::Spin) {
    SPINS.with(|m| m.borrow_mut().insert(epfd, s));
}

/// Before a wait on `epfd` sleeps: busy-polls the set's hooked rsockets (no syscall: their
/// completions are processed by the core, as a blocking receive spins before it sleeps) and
/// looks at the kernel's side of the set every [`KERNEL_EVERY`] rounds, for the set's
/// adaptive window (at most the wait's `timeout`). Ok(n): the wait's result; Err: nothing
/// came, sleep (with when the spin began and the policy, to learn from the sleep), or no spin.
///
/// A message that comes while the program spins costs no wake-up: on Soft-RoCE a completion
/// event wakes a sleeper in 100-200 us, where the whole round trip takes 50.
///
/// # Safety
/// As [`wait`].
#[allow(clippy::type_complexity)]
unsafe fn spin(
    epfd: RawFd,
    ev: *mut epoll_event,
    max: c_int,
    timeout: Option<Duration>,
    call: &mut impl FnMut(*mut epoll_event, c_int, Option<Duration>) -> c_int,
) -> Result<c_int, Option<(u64, rsocket::socket::spin::Spin)>> {
    let socks: Vec<(RawFd, std::sync::Arc<rsocket::socket::StreamSocket>)> = {
        let rss: Vec<RawFd> = table::with(|d| {
            if d.hooks.sets.get(&epfd).is_none_or(|&n| n > SPIN_SOCKETS) {
                return Vec::new();
            }
            d.hooks
                .by_key
                .values()
                .filter(|h| h.epfd == epfd && h.comp.is_some() && h.app.is_some())
                .map(|h| h.rs)
                .collect()
        });
        rss.into_iter()
            .filter_map(|r| Some((r, socket(r)?)))
            .collect()
    };
    if socks.is_empty() {
        return Err(None);
    }
    let mut policy = SPINS.with(|m| {
        *m.borrow_mut()
            .entry(epfd)
            .or_insert_with(rsocket::socket::stream::new_spin)
    });
    let tpu = ticks_per_us().max(1);
    let mut window = policy.window();
    if let Some(t) = timeout {
        window = window.min(t.as_micros() as u64 * tpu);
    }
    let t0 = ticks();
    // SAFETY: the caller's contract: room for max events.
    let evs = unsafe { std::slice::from_raw_parts_mut(ev, max as usize) };
    // The kernel's side first: what is ready there already (room to write, say) returns at
    // once, and teaches the window nothing.
    let mut rounds = KERNEL_EVERY - 1;
    loop {
        let mut kept = 0;
        if rounds % KERNEL_EVERY == KERNEL_EVERY - 1 {
            let n = call(ev, max, Some(Duration::ZERO));
            if n < 0 {
                return Ok(n);
            }
            if n > 0 {
                // SAFETY: the kernel filled n events.
                kept = unsafe { filter(epfd, ev, 0, n as usize, max as usize).0 };
            }
            if kept > 0 {
                return Ok(kept as c_int);
            }
        }
        for (rs, s) in &socks {
            let new = s.hook_poll();
            show_new(epfd, *rs, new, evs, &mut kept);
        }
        let spent = ticks().wrapping_sub(t0);
        if kept > 0 {
            policy.record_caught_decaying(spent);
            save_spin(epfd, policy);
            return Ok(kept as c_int);
        }
        if spent >= window {
            return Err(Some((t0, policy)));
        }
        rounds += 1;
        std::hint::spin_loop();
    }
}

/// The hooked rsockets among a poll's or select's descriptors, whose completion channels the
/// service thread watches while the call sleeps (`StreamSocket::hold_watch`): nothing else
/// would show what arrives to a wait that is not an interposed epoll wait.
pub struct Held(Vec<std::sync::Arc<rsocket::socket::StreamSocket>>);

impl Drop for Held {
    fn drop(&mut self) {
        for s in &self.0 {
            s.release_watch();
        }
    }
}

/// Holds the hooked rsockets among `fds` (see [`Held`]); nothing to do, and no lookup, while
/// no rsocket is hooked.
pub fn hold(fds: impl Iterator<Item = RawFd>) -> Held {
    let mut v: Vec<std::sync::Arc<rsocket::socket::StreamSocket>> = Vec::new();
    if SETS.load(Ordering::Relaxed) == 0 {
        return Held(v);
    }
    for fd in fds {
        if let table::Slot::Rsocket { rs, ours: true } = table::slot(fd)
            && let Some(s) = socket(rs)
            && s.is_hooked()
            && !v.iter().any(|x| std::sync::Arc::ptr_eq(x, &s))
        {
            s.hold_watch();
            v.push(s);
        }
    }
    Held(v)
}

/// Whether epoll sets sleep on completion channels (`RSOCKET_PRELOAD_EPOLL_HOOK=0` turns it off:
/// the service thread shows everything, as for any other wait).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RSOCKET_PRELOAD_EPOLL_HOOK").map_or(true, |v| v != "0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_program_values_are_not_tokens() {
        let t = token(7, 12345).unwrap();
        assert_eq!(parse(t), Some((generation() & 0xff, 12345, 7)));
        assert!(token(1 << 20, 3).is_none());
        for v in [0u64, 1, u64::MAX, 0x7fff_ffff_f000, 1 << 63, 42] {
            assert_eq!(parse(v), None, "{v:#x}");
        }
    }
}
