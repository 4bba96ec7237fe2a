//! Which of the application's descriptors the preload handles, and how.
//!
//! Every interposed call looks its descriptor up here first, so the lookup is one atomic load
//! from a flat array indexed by descriptor number, without a lock: descriptors the preload
//! does not handle (files, pipes, the rsocket core's own descriptors) pass straight to the C
//! library. The details of the ones it handles live in a map behind a short spin lock that is
//! held across fork (see `fork`), never across a call into the C library or the rsocket core.
//!
//! A descriptor is one of:
//! - *candidate*: a kernel TCP socket the application created, not connected or listening
//!   yet; it may still become an rsocket (at connect) or a dual listener (at listen);
//! - *rsocket*: converted. The application's descriptor is a duplicate of the rsocket's own
//!   (the user end of its readiness socketpair), so the kernel's poll, select and epoll see the
//!   rsocket's readiness on it; the data calls go to the rsocket;
//! - *listener*: a kernel listening socket with an RDMA listener beside it (see `listen`).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Descriptors above this are never converted (they stay kernel sockets).
pub const MAX_FDS: usize = 1 << 20;

/// What the fast path needs about a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Not the preload's: the C library handles it.
    Kernel,
    /// A kernel TCP socket that may still be converted.
    Candidate,
    /// An rsocket: its number in the rsocket core, and whether this process may use it.
    Rsocket { rs: RawFd, ours: bool },
    /// A kernel listening socket with an RDMA listener (its id in `listen`).
    Listener { id: u32 },
}

const TAG_CANDIDATE: u64 = 1;
const TAG_RSOCKET: u64 = 2;
const TAG_LISTENER: u64 = 3;

/// slot = tag << 32 | value, generation << 40: the fork generation the slot was made in.
static SLOTS: [AtomicU64; MAX_FDS] = [const { AtomicU64::new(0) }; MAX_FDS];

/// Bumped in every forked child: rsockets made before the fork belong to the parent.
static GENERATION: AtomicU32 = AtomicU32::new(0);

/// This process's fork generation (see [`GENERATION`]).
pub fn generation() -> u32 {
    GENERATION.load(Ordering::Relaxed)
}

/// A forked child's first step: every rsocket in the table is now the parent's.
pub fn forked() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

fn index(fd: RawFd) -> Option<usize> {
    usize::try_from(fd).ok().filter(|&i| i < MAX_FDS)
}

/// How the preload handles `fd`.
#[inline]
pub fn slot(fd: RawFd) -> Slot {
    let Some(i) = index(fd) else {
        return Slot::Kernel;
    };
    let v = SLOTS[i].load(Ordering::Acquire);
    match (v >> 32) & 0xff {
        0 => Slot::Kernel,
        TAG_CANDIDATE => Slot::Candidate,
        TAG_RSOCKET => Slot::Rsocket {
            rs: (v & 0xffff_ffff) as RawFd,
            ours: (v >> 40) as u32 == generation() & 0xff_ffff,
        },
        _ => Slot::Listener {
            id: (v & 0xffff_ffff) as u32,
        },
    }
}

/// Sets how the preload handles `fd` (false if `fd` is too large to be handled).
pub fn set_slot(fd: RawFd, s: Slot) -> bool {
    let Some(i) = index(fd) else {
        return matches!(s, Slot::Kernel);
    };
    let g = u64::from(generation() & 0xff_ffff) << 40;
    let v = match s {
        Slot::Kernel => 0,
        Slot::Candidate => g | TAG_CANDIDATE << 32,
        Slot::Rsocket { rs, .. } => g | TAG_RSOCKET << 32 | rs as u32 as u64,
        Slot::Listener { id } => g | TAG_LISTENER << 32 | u64::from(id),
    };
    SLOTS[i].store(v, Ordering::Release);
    true
}

/// A tiny lock that can be taken before fork and released on both sides after it (std's
/// guards cannot cross the atfork handlers).
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: std::cell::UnsafeCell<T>,
}

// SAFETY: the value is only reached through the lock.
unsafe impl<T: Send> Sync for SpinLock<T> {}

/// Access to a [`SpinLock`]'s value while it is held.
pub struct Guard<'a, T>(&'a SpinLock<T>);

impl<T> SpinLock<T> {
    /// A new, unlocked lock.
    pub const fn new(v: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: std::cell::UnsafeCell::new(v),
        }
    }

    fn acquire(&self) {
        let mut spins = 0u32;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Takes the lock.
    pub fn lock(&self) -> Guard<'_, T> {
        self.acquire();
        Guard(self)
    }

    /// Takes the lock without a guard (the fork handlers: [`SpinLock::force_unlock`] ends it).
    pub fn lock_raw(&self) {
        self.acquire();
    }

    /// Ends a [`SpinLock::lock_raw`].
    pub fn force_unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }
}

impl<T> std::ops::Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.0.value.get() }
    }
}

impl<T> std::ops::DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, exclusively.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.0.locked.store(false, Ordering::Release);
    }
}

/// A socket option the application set on a candidate, replayed on the rsocket it becomes.
#[derive(Debug, Clone)]
pub struct SavedOption {
    /// Level (SOL_SOCKET, IPPROTO_TCP, ...).
    pub level: i32,
    /// Option name.
    pub name: i32,
    /// Value bytes.
    pub value: Vec<u8>,
}

/// What the preload remembers about a candidate.
#[derive(Debug, Clone, Default)]
pub struct Candidate {
    /// AF_INET or AF_INET6.
    pub domain: i32,
    /// A UDP socket (converted at bind, connect or its first send; see `convert::dgram`).
    pub dgram: bool,
    /// Options set so far, in order.
    pub options: Vec<SavedOption>,
}

/// The details behind the slots.
#[derive(Default)]
pub struct Details {
    /// Candidates by application descriptor.
    pub candidates: HashMap<RawFd, Candidate>,
    /// How many application descriptors name each rsocket (dup), by rsocket number.
    pub rsocket_refs: HashMap<RawFd, u32>,
    /// The domain each rsocket was made for (SO_DOMAIN), by rsocket number.
    pub rsocket_domain: HashMap<RawFd, i32>,
    /// How many application descriptors name each listener, by listener id.
    pub listener_refs: HashMap<u32, u32>,
    /// SO_RCVTIMEO and SO_SNDTIMEO of each rsocket that has one, by rsocket number.
    pub timeouts: HashMap<RawFd, Timeouts>,
    /// Completion channels in the program's epoll sets (see `hook`).
    pub hooks: crate::hook::Hooks,
}

/// An rsocket's SO_RCVTIMEO and SO_SNDTIMEO (the rsocket core has neither): the preload waits
/// at most this long before a blocking receive or send, as the kernel would.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The receive timeout, seconds and microseconds (None: wait for ever).
    pub rcv: Option<(i64, i64)>,
    /// The send timeout.
    pub snd: Option<(i64, i64)>,
}

/// The details (see the module documentation for the locking rule).
pub static DETAILS: SpinLock<Option<Details>> = SpinLock::new(None);

/// Runs `f` on the details, under the lock.
pub fn with<R>(f: impl FnOnce(&mut Details) -> R) -> R {
    let mut g = DETAILS.lock();
    f(g.get_or_insert_with(Details::default))
}

/// Every application descriptor that names an rsocket (for exec), the parent's too in a forked
/// child: a program exec'd there must not get the live readiness descriptor of its parent's
/// connection (reading it takes the parent's POLLIN byte, and the parent misses the wake-up).
pub fn rsocket_fds() -> Vec<RawFd> {
    // The map is by rsocket number, so look at the slots: only the ones in use are touched.
    let top = with(|d| d.rsocket_refs.len());
    if top == 0 {
        return Vec::new();
    }
    let mut v = Vec::new();
    // SAFETY: getrlimit fills a local struct.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let n = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        (lim.rlim_cur as usize).min(MAX_FDS)
    } else {
        MAX_FDS
    };
    for fd in 0..n {
        if let Slot::Rsocket { .. } = slot(fd as RawFd) {
            v.push(fd as RawFd);
        }
    }
    v
}
