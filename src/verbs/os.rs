//! Operating-system helpers the layers above share: eventfd wakers, poll(2), the tick counter,
//! SIGPIPE and atexit. Nothing RDMA-specific.

use std::io;
use std::os::fd::RawFd;

/// Sets or clears O_NONBLOCK on a descriptor.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an integer descriptor has no memory-safety requirements.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if new != flags && unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An eventfd used to wake a thread sleeping in `poll` on a socket's descriptors.
#[derive(Debug)]
pub struct Waker(std::os::fd::OwnedFd);

impl Waker {
    /// Creates a non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(Waker(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// The descriptor to poll for input.
    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    /// Makes the descriptor readable.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd; a full counter only means "awake".
        unsafe { libc::write(self.fd(), &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Clears a pending wake-up.
    pub fn reset(&self) {
        read_count(self.fd());
    }
}

/// Reads (and so clears) the 8-byte count of an eventfd or timerfd; non-blocking, nothing
/// happens when it is zero (EAGAIN).
fn read_count(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// A timerfd (CLOCK_MONOTONIC, the clock of `std::time::Instant`): a descriptor that becomes
/// readable at a time set from another thread, so a thread asleep in poll(2) on it wakes then
/// without being woken now (a wake-up takes a CPU from whoever runs on it).
#[derive(Debug)]
pub struct Timer(std::os::fd::OwnedFd);

impl Timer {
    /// Creates a non-blocking, disarmed timer.
    pub fn new() -> io::Result<Self> {
        // SAFETY: timerfd_create has no memory arguments.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(Timer(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// The descriptor to poll for input.
    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    /// Makes the descriptor readable once `after` has passed from now (replacing any earlier
    /// setting and clearing an expiry not yet read).
    pub fn set_after(&self, after: std::time::Duration) -> io::Result<()> {
        // A zero time would disarm the timer: the soonest it can fire is a nanosecond.
        let after = after.max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: spec is a valid itimerspec; no old value is asked for.
        let r = unsafe { libc::timerfd_settime(self.fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Clears an expiry (the descriptor is no longer readable until the next one).
    pub fn reset(&self) {
        read_count(self.fd());
    }
}

/// poll(2) over `fds` (events and revents as in libc). EINTR counts as a wake-up with no events.
/// `timeout_ms` < 0 waits forever.
pub fn poll_fds(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    let timeout = u64::try_from(timeout_ms)
        .ok()
        .map(std::time::Duration::from_millis);
    poll_fds_for(fds, timeout)
}

/// A descriptor to wait on for reading (POLLIN), as poll(2) takes it.
pub fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// poll(2) with a timeout to the microsecond (ppoll): `None` waits forever. EINTR counts as a
/// wake-up with nothing ready.
pub fn poll_fds_for(
    fds: &mut [libc::pollfd],
    timeout: Option<std::time::Duration>,
) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds is a valid, exclusively borrowed array of fds.len() entries; tp is null or
    // points to a timespec that outlives the call; no signal mask is passed.
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            tp,
            std::ptr::null(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// A cheap tick counter for comparing short intervals with each other (not calibrated to any
/// unit): the time-stamp counter on x86_64, nanoseconds from a process-wide epoch elsewhere.
/// The clock syscalls are avoided because where the clock source is not in the vDSO (the test
/// VM's HPET) a read costs microseconds.
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC exists on every x86_64 CPU, takes no operands and touches no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        EPOCH
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }
}

/// [`ticks`] per microsecond, measured once per process (on x86_64 against the monotonic clock
/// over about 200 µs; elsewhere ticks are nanoseconds). At least 1.
pub fn ticks_per_us() -> u64 {
    static TPU: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TPU.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1000;
        }
        let t0 = std::time::Instant::now();
        let k0 = ticks();
        let mut dt = t0.elapsed();
        while dt < std::time::Duration::from_micros(200) {
            dt = t0.elapsed();
        }
        let k = ticks().wrapping_sub(k0);
        (k / (dt.as_micros() as u64).max(1)).max(1)
    })
}

/// A wait of at least `t` [`ticks`]: the whole microseconds they hold, and one more.
pub fn wait_of_ticks(t: u64) -> std::time::Duration {
    std::time::Duration::from_micros(t / ticks_per_us() + 1)
}

/// Raises SIGPIPE in the calling thread, as a write to a shut-down kernel socket does.
pub fn raise_sigpipe() {
    // SAFETY: raise has no memory arguments.
    unsafe { libc::raise(libc::SIGPIPE) };
}

/// Runs `f` when the process exits normally (exit(3) or a return from main), after the
/// handlers registered later. Returns false if it could not be registered.
pub fn run_at_exit(f: extern "C" fn()) -> bool {
    // SAFETY: `f` is a plain function with no arguments; atexit only stores the pointer.
    unsafe { libc::atexit(f) == 0 }
}

/// Runs `f` with every blockable signal blocked in this thread (the mask restored after).
///
/// For starting the library's own threads, which inherit the mask and keep it: a program's
/// signals then go to its own threads. A process-directed signal (a timer's SIGALRM, say) is
/// otherwise delivered to whichever thread does not block it, the library's service thread
/// among them: the program's handler runs there, and the program's blocking call that the
/// signal was meant to interrupt goes on waiting.
///
/// For connection-manager calls that wait inside the kernel: on iWARP, `rdma_listen` and
/// `rdma_connect` open and connect kernel TCP sockets in the calling thread, and a signal that
/// lands there (a program's SIGALRM timer, say) can end the listen early with no error told to
/// us: the listener then refuses every connection. The kernel's own socket calls would restart
/// or fail with EINTR instead; these are short, so they run with signals held back until done.
pub fn without_signals<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset pointers.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: valid sigset pointers; only this thread's mask changes.
    let blocked = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) } == 0;
    let r = f();
    if blocked {
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
    r
}
