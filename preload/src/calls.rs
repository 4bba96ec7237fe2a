//! The interposed C library calls.
//!
//! Each one looks its descriptor up (`table::slot`, one atomic load) and either passes the
//! call to the C library (`real`) or serves it with the rsocket calls of `rsocket_rs` (the C
//! API, linked in). An rsocket that a forked child inherited fails there with ENOTCONN: the
//! connection stays the parent's.

use std::os::fd::RawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};

use libc::{
    c_char, c_int, c_uint, c_ulong, c_void, iovec, mmsghdr, msghdr, off_t, size_t, sockaddr,
    socklen_t, ssize_t,
};
use rsocket_rs as rs;

use crate::convert;
use crate::hook;
use crate::policy;
use crate::real;
use crate::table::{self, Slot};
use crate::trace;

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

fn errno() -> c_int {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Runs `body`; a panic becomes errno EIO and `$fail`.
macro_rules! guard {
    ($fail:expr, $body:expr) => {
        match catch_unwind(AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(_) => {
                set_errno(libc::EIO);
                $fail
            }
        }
    };
}

/// The rsocket behind `fd`: Ok(Some(rs)), Ok(None) for a descriptor the kernel serves, or
/// Err(()) (errno ENOTCONN set) for an rsocket of the parent process.
#[inline]
fn rsocket_of(fd: RawFd) -> Result<Option<RawFd>, ()> {
    match table::slot(fd) {
        Slot::Rsocket { rs, ours: true } => Ok(Some(rs)),
        Slot::Rsocket { ours: false, .. } => {
            set_errno(libc::ENOTCONN);
            Err(())
        }
        _ => Ok(None),
    }
}

/// Set once any rsocket has a timeout: the I/O calls look the timeouts up only then.
static ANY_TIMEOUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// SO_RCVTIMEO/SO_SNDTIMEO of rsocket `r` (the core has neither): before a blocking call that
/// would wait for `events` (POLLIN to receive, POLLOUT to send), waits at most the timeout for
/// them. Returns false with errno EAGAIN when it passed, or the error of the wait (EINTR), as
/// the kernel's blocking call would; true to go on with the call. A send longer than the room
/// that comes within the timeout may still wait for the rest.
fn io_timeout(r: RawFd, events: i16, flags: c_int) -> bool {
    if !ANY_TIMEOUT.load(std::sync::atomic::Ordering::Relaxed) || flags & libc::MSG_DONTWAIT != 0 {
        return true;
    }
    let Some(tv) = table::with(|d| d.timeouts.get(&r).copied())
        .and_then(|t| if events == libc::POLLIN { t.rcv } else { t.snd })
    else {
        return true;
    };
    if rs::rfcntl(r, libc::F_GETFL, 0) & libc::O_NONBLOCK != 0 {
        return true;
    }
    let (sec, usec) = tv;
    let ms = sec
        .saturating_mul(1000)
        .saturating_add((usec + 999) / 1000)
        .clamp(1, i32::MAX as i64);
    let mut p = libc::pollfd {
        fd: r,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd.
    match unsafe { rs::rpoll(&mut p, 1, ms as c_int) } {
        0 => {
            set_errno(libc::EAGAIN);
            false
        }
        n => n > 0,
    }
}

/// setsockopt SO_RCVTIMEO/SO_SNDTIMEO on rsocket `r`: Some(result) if it was one of them.
pub(crate) fn set_timeout(
    r: RawFd,
    level: c_int,
    name: c_int,
    v: *const c_void,
    len: socklen_t,
) -> Option<c_int> {
    if level != libc::SOL_SOCKET || !matches!(name, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO) {
        return None;
    }
    if v.is_null() || (len as usize) < std::mem::size_of::<libc::timeval>() {
        set_errno(libc::EINVAL);
        return Some(-1);
    }
    // SAFETY: v has a timeval's readable bytes (checked above); read unaligned.
    let tv = unsafe { std::ptr::read_unaligned(v as *const libc::timeval) };
    if tv.tv_usec < 0 || tv.tv_usec >= 1_000_000 {
        set_errno(libc::EDOM);
        return Some(-1);
    }
    #[allow(clippy::unnecessary_cast)] // time_t and suseconds_t differ between targets
    let t = (tv.tv_sec > 0 || tv.tv_usec > 0).then_some((tv.tv_sec as i64, tv.tv_usec as i64));
    table::with(|d| {
        let e = d.timeouts.entry(r).or_default();
        if name == libc::SO_RCVTIMEO {
            e.rcv = t;
        } else {
            e.snd = t;
        }
        if *e == table::Timeouts::default() {
            d.timeouts.remove(&r);
        }
    });
    if t.is_some() {
        ANY_TIMEOUT.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    Some(0)
}

/// Dispatches on `fd`: `$rs` with the rsocket number bound to `$r`, or `$kernel`.
macro_rules! route {
    ($fd:expr, $fail:expr, |$r:ident| $rs:expr, $kernel:expr) => {
        guard!(
            $fail,
            match rsocket_of($fd) {
                Ok(Some($r)) => $rs,
                Ok(None) => $kernel,
                Err(()) => $fail,
            }
        )
    };
}

/// [`route!`] for a call that may block waiting for `$events` (POLLIN to receive, POLLOUT to
/// send; `$flags` its MSG_ flags): the rsocket's SO_RCVTIMEO or SO_SNDTIMEO bounds the wait
/// first (`io_timeout`).
macro_rules! route_io {
    ($fd:expr, $events:expr, $flags:expr, |$r:ident| $rs:expr, $kernel:expr) => {
        route!(
            $fd,
            -1,
            |$r| if io_timeout($r, $events, $flags) {
                $rs
            } else {
                -1
            },
            $kernel
        )
    };
}

#[unsafe(no_mangle)]
pub extern "C" fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    guard!(-1, {
        // SAFETY: socket has no memory arguments.
        let fd = unsafe { real::socket(domain, ty, protocol) };
        if fd >= 0 && policy::get().intercepts(domain, ty, protocol) {
            table::with(|d| {
                d.candidates.insert(
                    fd,
                    table::Candidate {
                        domain,
                        dgram: ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) == libc::SOCK_DGRAM,
                        options: Vec::new(),
                    },
                )
            });
            if !table::set_slot(fd, Slot::Candidate) {
                table::with(|d| d.candidates.remove(&fd));
            }
        }
        fd
    })
}

/// bind(2): a UDP candidate converts here (see `convert::bind_dgram`); a TCP candidate binds
/// its kernel socket (the rsocket takes the address at connect or listen).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    guard!(
        -1,
        match table::slot(fd) {
            // SAFETY: C contract of bind.
            Slot::Candidate if convert::is_dgram_candidate(fd) => unsafe {
                convert::bind_dgram(fd, addr, len)
            },
            // SAFETY: C contract of bind.
            Slot::Rsocket { rs: r, ours: true } => unsafe { rs::rbind(r, addr, len) },
            // SAFETY: C contract of bind.
            _ => unsafe { real::bind(fd, addr, len) },
        }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    guard!(
        -1,
        match table::slot(fd) {
            // SAFETY: C contract of connect.
            Slot::Candidate => unsafe { convert::connect(fd, addr, len) },
            Slot::Rsocket { rs: r, ours: true } => {
                // A second connect on a connected rsocket: what the rsocket says (EISCONN).
                // SAFETY: C contract of connect.
                unsafe { rs::rconnect(r, addr, len) }
            }
            Slot::Rsocket { ours: false, .. } => {
                set_errno(libc::ENOTCONN);
                -1
            }
            // SAFETY: C contract of connect.
            _ => unsafe { real::connect(fd, addr, len) },
        }
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    guard!(
        -1,
        match table::slot(fd) {
            Slot::Candidate | Slot::Listener { .. } => convert::listen(fd, backlog),
            Slot::Rsocket { .. } => {
                set_errno(libc::EINVAL);
                -1
            }
            // SAFETY: listen has no memory arguments.
            Slot::Kernel => unsafe { real::listen(fd, backlog) },
        }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    guard!(
        -1,
        match table::slot(fd) {
            // SAFETY: C contract of accept4.
            Slot::Listener { id } => unsafe { convert::accept(fd, id, addr, len, flags) },
            Slot::Rsocket { .. } => {
                set_errno(libc::EINVAL);
                -1
            }
            // SAFETY: C contract of accept4.
            _ => unsafe { real::accept4(fd, addr, len, flags) },
        }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: C contract of accept.
    unsafe { accept4(fd, addr, len, 0) }
}

#[unsafe(no_mangle)]
pub extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: shutdown has no memory arguments.
    route!(fd, -1, |r| rs::rshutdown(r, how), unsafe {
        real::shutdown(fd, how)
    })
}

/// The table's side of closing application descriptor `fd` (it is about to be closed or
/// replaced): the rsocket or listener goes with its last descriptor.
fn forget(fd: RawFd) {
    let s = table::slot(fd);
    if s == Slot::Kernel {
        hook::set_closing(fd);
        return;
    }
    table::set_slot(fd, Slot::Kernel);
    match s {
        Slot::Candidate => {
            table::with(|d| d.candidates.remove(&fd));
        }
        Slot::Rsocket { rs: r, ours } => {
            let last = table::with(|d| {
                let n = d.rsocket_refs.entry(r).or_insert(1);
                *n -= 1;
                if *n == 0 {
                    d.rsocket_refs.remove(&r);
                    d.rsocket_domain.remove(&r);
                    d.timeouts.remove(&r);
                    true
                } else {
                    false
                }
            });
            if last && ours {
                hook::closing(r);
                rs::rclose(r);
            }
        }
        Slot::Listener { id } => {
            let last = table::with(|d| {
                let n = d.listener_refs.entry(id).or_insert(1);
                *n -= 1;
                if *n == 0 {
                    d.listener_refs.remove(&id);
                    true
                } else {
                    false
                }
            });
            if last {
                convert::close_listener(id);
            }
        }
        Slot::Kernel => {}
    }
}

/// `to` now names what `from` names (after a dup).
fn alias(from: RawFd, to: RawFd) {
    match table::slot(from) {
        Slot::Kernel => {}
        Slot::Candidate => {
            // A duplicated candidate cannot be converted in place for both numbers.
            convert::give_up(from);
        }
        Slot::Rsocket { rs: r, ours } => {
            table::with(|d| *d.rsocket_refs.entry(r).or_insert(0) += 1);
            table::set_slot(to, Slot::Rsocket { rs: r, ours });
        }
        Slot::Listener { id } => {
            table::with(|d| *d.listener_refs.entry(id).or_insert(0) += 1);
            table::set_slot(to, Slot::Listener { id });
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn close(fd: c_int) -> c_int {
    guard!(-1, {
        if table::slot(fd) == Slot::Kernel {
            hook::set_closing(fd);
            // SAFETY: close has no memory arguments.
            return unsafe { real::close(fd) };
        }
        // The number may be reused as soon as it is closed: forget it first.
        forget(fd);
        // SAFETY: as above.
        unsafe { real::close(fd) }
    })
}

/// epoll_ctl(2): passed on; for a listener, mirrored on its private token route in this
/// process (see `convert::epoll_mirror`); for an rsocket, its completion channel joins or leaves
/// the set too (see `hook`).
///
/// # Safety
/// `ev` as epoll_ctl(2) takes it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut libc::epoll_event,
) -> c_int {
    guard!(-1, {
        // SAFETY: C contract.
        let r = unsafe { real::epoll_ctl(epfd, op, fd, ev) };
        if r == 0 {
            match table::slot(fd) {
                Slot::Listener { id } => {
                    let e = errno();
                    // SAFETY: C contract (ev valid for ADD and MOD).
                    unsafe { convert::epoll_mirror(epfd, op, id, ev) };
                    set_errno(e);
                }
                Slot::Rsocket { rs: r, ours: true } => {
                    let e = errno();
                    let app = if op == libc::EPOLL_CTL_DEL {
                        None
                    } else {
                        // SAFETY: C contract: ev is valid for ADD and MOD (checked by the
                        // kernel, which took it).
                        unsafe { ev.as_ref() }.map(|e| (e.events, e.u64))
                    };
                    hook::registered(epfd, op, fd, r, app);
                    set_errno(e);
                }
                _ => {}
            }
        }
        r
    })
}

/// The descriptors of a poll(2) array (none if it is null).
///
/// # Safety
/// `fds` is null or points to `n` pollfds.
unsafe fn poll_fds(fds: *const libc::pollfd, n: libc::nfds_t) -> impl Iterator<Item = RawFd> {
    let n = if fds.is_null() { 0 } else { n as usize };
    // SAFETY: the caller's contract: n pollfds at fds.
    (0..n).map(move |i| unsafe { (*fds.add(i)).fd })
}

/// The descriptors below `n` set in any of select(2)'s three sets (null ones skipped).
///
/// # Safety
/// Each set is null or a valid fd_set.
unsafe fn select_fds(n: c_int, sets: [*const libc::fd_set; 3]) -> impl Iterator<Item = RawFd> {
    let n = n.clamp(0, libc::FD_SETSIZE as c_int);
    (0..n).filter(move |&fd| {
        sets.iter()
            // SAFETY: the caller's contract: each set null or valid; fd < FD_SETSIZE.
            .any(|&s| !s.is_null() && unsafe { libc::FD_ISSET(fd, s) })
    })
}

/// poll(2): passed on; a hooked rsocket in it is watched by the service thread while it sleeps
/// (see `hook::hold`).
///
/// # Safety
/// As poll(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, ms: c_int) -> c_int {
    guard!(-1, {
        // SAFETY: C contract.
        let _held = hook::hold(unsafe { poll_fds(fds, n) });
        // SAFETY: C contract.
        unsafe { real::poll(fds, n, ms) }
    })
}

/// The fortified poll (`_FORTIFY_SOURCE`): as [`poll`], once the array fits its buffer.
///
/// # Safety
/// As poll(2); `len` is the size of the buffer at `fds`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    ms: c_int,
    len: libc::size_t,
) -> c_int {
    if (len / std::mem::size_of::<libc::pollfd>()) < n as usize {
        // SAFETY: what the C library's check does on overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: C contract.
    unsafe { poll(fds, n, ms) }
}

/// ppoll(2): as [`poll`].
///
/// # Safety
/// As ppoll(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    guard!(-1, {
        // SAFETY: C contract.
        let _held = hook::hold(unsafe { poll_fds(fds, n) });
        // SAFETY: C contract.
        unsafe { real::ppoll(fds, n, ts, mask) }
    })
}

/// The fortified ppoll: as [`ppoll`], once the array fits its buffer.
///
/// # Safety
/// As ppoll(2); `len` is the size of the buffer at `fds`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut libc::pollfd,
    n: libc::nfds_t,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
    len: libc::size_t,
) -> c_int {
    if (len / std::mem::size_of::<libc::pollfd>()) < n as usize {
        // SAFETY: what the C library's check does on overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: C contract.
    unsafe { ppoll(fds, n, ts, mask) }
}

/// select(2): as [`poll`].
///
/// # Safety
/// As select(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn select(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tv: *mut libc::timeval,
) -> c_int {
    guard!(-1, {
        // SAFETY: C contract.
        let _held = hook::hold(unsafe { select_fds(n, [r, w, e].map(|p| p as *const _)) });
        // SAFETY: C contract.
        unsafe { real::select(n, r, w, e, tv) }
    })
}

/// pselect(2): as [`poll`].
///
/// # Safety
/// As pselect(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pselect(
    n: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    guard!(-1, {
        // SAFETY: C contract.
        let _held = hook::hold(unsafe { select_fds(n, [r, w, e].map(|p| p as *const _)) });
        // SAFETY: C contract.
        unsafe { real::pselect(n, r, w, e, ts, mask) }
    })
}

/// A C timeout in milliseconds (negative: none) as the hook's wait takes it.
fn ms_timeout(ms: c_int) -> Option<std::time::Duration> {
    u64::try_from(ms).ok().map(std::time::Duration::from_millis)
}

/// The hook's remaining timeout as milliseconds, rounded up (a wait never ends early).
fn ms_of(t: Option<std::time::Duration>) -> c_int {
    t.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int
    })
}

/// epoll_wait(2): an rsocket's completion channel in the set wakes it directly (see `hook`).
///
/// # Safety
/// As epoll_wait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    max: c_int,
    ms: c_int,
) -> c_int {
    guard!(-1, {
        // SAFETY: C contract; the closure calls the C library's wait on the same set.
        unsafe {
            hook::wait(epfd, ev, max, ms_timeout(ms), |e, n, t| {
                real::epoll_wait(epfd, e, n, ms_of(t))
            })
        }
    })
}

/// epoll_pwait(2): as [`epoll_wait`], with the signal mask.
///
/// # Safety
/// As epoll_pwait(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    max: c_int,
    ms: c_int,
    mask: *const libc::sigset_t,
) -> c_int {
    guard!(-1, {
        // SAFETY: as epoll_wait.
        unsafe {
            hook::wait(epfd, ev, max, ms_timeout(ms), |e, n, t| {
                real::epoll_pwait(epfd, e, n, ms_of(t), mask)
            })
        }
    })
}

/// epoll_pwait2(2): as [`epoll_wait`], with a timespec timeout and the signal mask.
///
/// # Safety
/// As epoll_pwait2(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    ev: *mut libc::epoll_event,
    max: c_int,
    ts: *const libc::timespec,
    mask: *const libc::sigset_t,
) -> c_int {
    guard!(-1, {
        // SAFETY: ts is null or a valid timespec (C contract).
        let timeout = unsafe { ts.as_ref() }.map(|t| {
            std::time::Duration::new(
                t.tv_sec.max(0) as u64,
                t.tv_nsec.clamp(0, 999_999_999) as u32,
            )
        });
        // SAFETY: as epoll_wait.
        unsafe {
            hook::wait(epfd, ev, max, timeout, |e, n, t| {
                let spec = t.map(|t| libc::timespec {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_nsec: t.subsec_nanos() as libc::c_long,
                });
                real::epoll_pwait2(
                    epfd,
                    e,
                    n,
                    spec.as_ref().map_or(std::ptr::null(), |s| s as *const _),
                    mask,
                )
            })
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn dup(fd: c_int) -> c_int {
    guard!(-1, {
        // SAFETY: dup has no memory arguments.
        let n = unsafe { real::dup(fd) };
        if n >= 0 {
            alias(fd, n);
        }
        n
    })
}

fn dup_onto(fd: RawFd, to: RawFd, flags: c_int, three: bool) -> c_int {
    if fd == to {
        // SAFETY: no memory arguments.
        return unsafe {
            if three {
                real::dup3(fd, to, flags)
            } else {
                real::dup2(fd, to)
            }
        };
    }
    forget(to);
    // SAFETY: no memory arguments.
    let n = unsafe {
        if three {
            real::dup3(fd, to, flags)
        } else {
            real::dup2(fd, to)
        }
    };
    if n >= 0 {
        alias(fd, n);
    }
    n
}

#[unsafe(no_mangle)]
pub extern "C" fn dup2(fd: c_int, to: c_int) -> c_int {
    guard!(-1, dup_onto(fd, to, 0, false))
}

#[unsafe(no_mangle)]
pub extern "C" fn dup3(fd: c_int, to: c_int, flags: c_int) -> c_int {
    guard!(-1, dup_onto(fd, to, flags, true))
}

fn fcntl_any(fd: c_int, cmd: c_int, arg: c_ulong, sixty_four: bool) -> c_int {
    let kernel = || {
        // SAFETY: the caller's fcntl, as it made it (arg is an int or a pointer it owns).
        unsafe {
            if sixty_four {
                real::fcntl64(fd, cmd, arg)
            } else {
                real::fcntl(fd, cmd, arg)
            }
        }
    };
    match cmd {
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
            let n = kernel();
            if n >= 0 {
                alias(fd, n);
            }
            n
        }
        libc::F_GETFL | libc::F_SETFL => match rsocket_of(fd) {
            Ok(Some(r)) => rs::rfcntl(r, cmd, arg as _),
            Ok(None) => kernel(),
            Err(()) => -1,
        },
        _ => kernel(),
    }
}

/// fcntl(2). Declared variadic in C; on the x86-64 and AArch64 Linux ABIs the optional
/// argument travels in the register of a fixed third argument, which this definition reads.
#[unsafe(no_mangle)]
pub extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    guard!(-1, fcntl_any(fd, cmd, arg, false))
}

/// fcntl64(2), as [`fcntl`].
#[unsafe(no_mangle)]
pub extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    guard!(-1, fcntl_any(fd, cmd, arg, true))
}

/// ioctl(2): FIONBIO and FIONREAD on rsockets; everything else goes to the kernel. Variadic in
/// C, read as [`fcntl`] reads its argument.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: c_ulong) -> c_int {
    route!(
        fd,
        -1,
        |r| match req {
            libc::FIONBIO => {
                if arg == 0 {
                    set_errno(libc::EFAULT);
                    return -1;
                }
                // SAFETY: FIONBIO's argument is a pointer to an int (C contract).
                let on = unsafe { *(arg as *const c_int) } != 0;
                let fl = rs::rfcntl(r, libc::F_GETFL, 0);
                let fl = if on {
                    fl | libc::O_NONBLOCK
                } else {
                    fl & !libc::O_NONBLOCK
                };
                rs::rfcntl(r, libc::F_SETFL, fl as _)
            }
            libc::FIONREAD => {
                if arg == 0 {
                    set_errno(libc::EFAULT);
                    return -1;
                }
                let n = readable(r);
                if n < 0 {
                    return -1;
                }
                // SAFETY: FIONREAD's argument is a pointer to an int (C contract).
                unsafe { *(arg as *mut c_int) = n as c_int };
                0
            }
            // SAFETY: the caller's ioctl on the descriptor itself.
            _ => unsafe { real::ioctl(fd, req, arg) },
        },
        // SAFETY: the caller's ioctl, as it made it.
        unsafe { real::ioctl(fd, req, arg) }
    )
}

/// Bytes an rsocket can deliver now (FIONREAD): what a non-blocking peek returns.
fn readable(r: RawFd) -> isize {
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: our buffer and its length.
    let n = unsafe {
        rs::rrecv(
            r,
            buf.as_mut_ptr() as *mut c_void,
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 && matches!(errno(), libc::EAGAIN) {
        return 0;
    }
    n
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: C contract of read.
    route_io!(
        fd,
        libc::POLLIN,
        0,
        |r| unsafe { rs::rread(r, buf, n) },
        unsafe { real::read(fd, buf, n) }
    )
}

/// The fortified read (`_FORTIFY_SOURCE`): read with the buffer's size known.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    room: size_t,
) -> ssize_t {
    if n > room {
        // The C library's answer to an overflow: abort.
        // SAFETY: ends the process.
        unsafe { libc::abort() };
    }
    // SAFETY: C contract of read.
    unsafe { read(fd, buf, n) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t {
    // SAFETY: C contract of write.
    route_io!(
        fd,
        libc::POLLOUT,
        0,
        |r| unsafe { rs::rwrite(r, buf, n) },
        unsafe { real::write(fd, buf, n) }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: C contract of readv.
    route_io!(
        fd,
        libc::POLLIN,
        0,
        |r| unsafe { rs::rreadv(r, iov, n) },
        unsafe { real::readv(fd, iov, n) }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    // SAFETY: C contract of writev.
    route_io!(
        fd,
        libc::POLLOUT,
        0,
        |r| unsafe { rs::rwritev(r, iov, n) },
        unsafe { real::writev(fd, iov, n) }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: C contract of recv.
    route_io!(
        fd,
        libc::POLLIN,
        flags,
        |r| unsafe { rs::rrecv(r, buf, n, flags) },
        unsafe { real::recv(fd, buf, n, flags) }
    )
}

/// The fortified recv.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    room: size_t,
    flags: c_int,
) -> ssize_t {
    if n > room {
        // SAFETY: ends the process, as the C library does.
        unsafe { libc::abort() };
    }
    // SAFETY: C contract of recv.
    unsafe { recv(fd, buf, n, flags) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: C contract of send.
    route_io!(
        fd,
        libc::POLLOUT,
        flags,
        |r| unsafe { rs::rsend(r, buf, n, flags) },
        unsafe { real::send(fd, buf, n, flags) }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    route_io!(
        fd,
        libc::POLLIN,
        flags,
        // SAFETY: C contract of recvfrom.
        |r| unsafe { rs::rrecvfrom(r, buf, n, flags, addr, len) },
        // SAFETY: C contract of recvfrom.
        unsafe { real::recvfrom(fd, buf, n, flags, addr, len) }
    )
}

/// The fortified recvfrom.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    room: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    if n > room {
        // SAFETY: ends the process, as the C library does.
        unsafe { libc::abort() };
    }
    // SAFETY: C contract of recvfrom.
    unsafe { recvfrom(fd, buf, n, flags, addr, len) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    if table::slot(fd) == Slot::Candidate && convert::is_dgram_candidate(fd) {
        return guard!(-1, {
            // SAFETY: C contract of sendto.
            unsafe {
                convert::send_dgram(
                    fd,
                    addr,
                    len,
                    |r| rs::rsendto(r, buf, n, flags, addr, len),
                    || real::sendto(fd, buf, n, flags, addr, len),
                )
            }
        });
    }
    route_io!(
        fd,
        libc::POLLOUT,
        flags,
        // SAFETY: C contract of sendto.
        |r| unsafe { rs::rsendto(r, buf, n, flags, addr, len) },
        // SAFETY: C contract of sendto.
        unsafe { real::sendto(fd, buf, n, flags, addr, len) }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: C contract of recvmsg.
    route_io!(
        fd,
        libc::POLLIN,
        flags,
        |r| unsafe { rs::rrecvmsg(r, msg, flags) },
        unsafe { real::recvmsg(fd, msg, flags) }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if !msg.is_null() && table::slot(fd) == Slot::Candidate && convert::is_dgram_candidate(fd) {
        // SAFETY: non-null msghdr of the caller.
        let (addr, len) = unsafe { ((*msg).msg_name as *const sockaddr, (*msg).msg_namelen) };
        return guard!(-1, {
            // SAFETY: C contract of sendmsg.
            unsafe {
                convert::send_dgram(
                    fd,
                    addr,
                    len,
                    |r| rs::rsendmsg(r, msg, flags),
                    || real::sendmsg(fd, msg, flags),
                )
            }
        });
    }
    // SAFETY: C contract of sendmsg.
    route_io!(
        fd,
        libc::POLLOUT,
        flags,
        |r| unsafe { rs::rsendmsg(r, msg, flags) },
        unsafe { real::sendmsg(fd, msg, flags) }
    )
}

/// recvmmsg(2) on an rsocket: one rrecvmsg per message; after the first, only what is there
/// already (a stream has no message boundaries to wait for).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    v: *mut mmsghdr,
    n: c_uint,
    flags: c_int,
    t: *mut libc::timespec,
) -> c_int {
    route!(
        fd,
        -1,
        |r| {
            let mut done = 0;
            while done < n {
                let f = if done == 0 {
                    flags
                } else {
                    flags | libc::MSG_DONTWAIT
                };
                // SAFETY: C contract: v has n entries.
                let m = unsafe { &mut *v.add(done as usize) };
                // SAFETY: C contract of recvmsg, for one entry.
                let got = unsafe { rs::rrecvmsg(r, &mut m.msg_hdr, f & !libc::MSG_WAITFORONE) };
                if got < 0 {
                    if done == 0 {
                        return -1;
                    }
                    break;
                }
                m.msg_len = got as c_uint;
                done += 1;
                if got == 0 {
                    break;
                }
            }
            done as c_int
        },
        // SAFETY: C contract of recvmmsg.
        unsafe { real::recvmmsg(fd, v, n, flags, t) }
    )
}

/// sendmmsg(2) on an rsocket: one rsendmsg per message, stopping at the first short one.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmmsg(fd: c_int, v: *mut mmsghdr, n: c_uint, flags: c_int) -> c_int {
    route!(
        fd,
        -1,
        |r| {
            let mut done = 0;
            while done < n {
                // SAFETY: C contract: v has n entries.
                let m = unsafe { &mut *v.add(done as usize) };
                // SAFETY: C contract of sendmsg, for one entry.
                let sent = unsafe { rs::rsendmsg(r, &m.msg_hdr, flags) };
                if sent < 0 {
                    if done == 0 {
                        return -1;
                    }
                    break;
                }
                m.msg_len = sent as c_uint;
                done += 1;
                // SAFETY: the entry's iovecs (C contract).
                let want: usize =
                    unsafe { std::slice::from_raw_parts(m.msg_hdr.msg_iov, m.msg_hdr.msg_iovlen) }
                        .iter()
                        .map(|i| i.iov_len)
                        .sum();
                if (sent as usize) < want {
                    break;
                }
            }
            done as c_int
        },
        // SAFETY: C contract of sendmmsg.
        unsafe { real::sendmmsg(fd, v, n, flags) }
    )
}

/// sendfile to an rsocket: the file's bytes are read (pread at the offset, or at the file
/// position, which then moves by what was sent) and sent; returns what was sent, as sendfile.
fn sendfile_rs(r: RawFd, inp: c_int, off: *mut off_t, count: size_t) -> ssize_t {
    let mut pos = if off.is_null() {
        // SAFETY: lseek has no memory arguments.
        let p = unsafe { real::lseek(inp, 0, libc::SEEK_CUR) };
        if p < 0 {
            return -1;
        }
        p
    } else {
        // SAFETY: off is a valid pointer (C contract).
        unsafe { *off }
    };
    let mut buf = vec![0u8; count.min(256 << 10)];
    let mut total: usize = 0;
    let mut err = 0;
    while total < count {
        let want = (count - total).min(buf.len());
        // SAFETY: our buffer and its length.
        let n = unsafe { real::pread(inp, buf.as_mut_ptr() as *mut c_void, want, pos) };
        if n <= 0 {
            if n < 0 {
                err = errno();
            }
            break;
        }
        // SAFETY: our buffer's first n bytes.
        let s = unsafe { rs::rsend(r, buf.as_ptr() as *const c_void, n as usize, 0) };
        if s < 0 {
            err = errno();
            break;
        }
        total += s as usize;
        pos += s as off_t;
        if s < n {
            break;
        }
    }
    if off.is_null() {
        // SAFETY: lseek has no memory arguments.
        unsafe { real::lseek(inp, pos, libc::SEEK_SET) };
    } else {
        // SAFETY: off is a valid pointer (C contract).
        unsafe { *off = pos };
    }
    if total == 0 && err != 0 {
        set_errno(err);
        return -1;
    }
    total as ssize_t
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    route!(out, -1, |r| sendfile_rs(r, inp, off, n), unsafe {
        // SAFETY: C contract of sendfile.
        real::sendfile(out, inp, off, n)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile64(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t {
    route!(out, -1, |r| sendfile_rs(r, inp, off, n), unsafe {
        // SAFETY: C contract of sendfile64.
        real::sendfile64(out, inp, off, n)
    })
}

fn put_int(v: *mut c_void, len: *mut socklen_t, x: c_int) -> c_int {
    if v.is_null() || len.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    // SAFETY: v has *len writable bytes (C contract); at most 4 are written.
    unsafe {
        let n = (*len as usize).min(4);
        std::ptr::copy_nonoverlapping(&x as *const c_int as *const u8, v as *mut u8, n);
        *len = n as socklen_t;
    }
    0
}

/// Answers the kernel gives on any TCP socket, for a connected rsocket.
fn getsockopt_rs(
    r: RawFd,
    level: c_int,
    name: c_int,
    v: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_TYPE) if convert::is_dgram_rsocket(r) => {
            return put_int(v, len, libc::SOCK_DGRAM);
        }
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) if convert::is_dgram_rsocket(r) => {
            return put_int(v, len, libc::IPPROTO_UDP);
        }
        (libc::SOL_SOCKET, libc::SO_TYPE) => return put_int(v, len, libc::SOCK_STREAM),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => return put_int(v, len, libc::IPPROTO_TCP),
        (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => return put_int(v, len, 0),
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => {
            let d = table::with(|d| d.rsocket_domain.get(&r).copied()).unwrap_or(libc::AF_INET);
            return put_int(v, len, d);
        }
        (libc::IPPROTO_TCP, libc::TCP_INFO) => return tcp_info(v, len),
        (libc::SOL_SOCKET, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO) => {
            let t = table::with(|d| d.timeouts.get(&r).copied()).unwrap_or_default();
            let (sec, usec) = if name == libc::SO_RCVTIMEO {
                t.rcv
            } else {
                t.snd
            }
            .unwrap_or((0, 0));
            let tv = libc::timeval {
                tv_sec: sec as _,
                tv_usec: usec as _,
            };
            let size = std::mem::size_of::<libc::timeval>();
            // SAFETY: C contract: len points to the size of v.
            if v.is_null() || len.is_null() || (unsafe { *len } as usize) < size {
                set_errno(libc::EINVAL);
                return -1;
            }
            // SAFETY: v has room for a timeval (checked above); written unaligned.
            unsafe {
                std::ptr::write_unaligned(v as *mut libc::timeval, tv);
                *len = size as socklen_t;
            }
            return 0;
        }
        _ => {}
    }
    // SAFETY: C contract of getsockopt.
    unsafe { rs::rgetsockopt(r, level, name, v, len) }
}

/// TCP_INFO for an rsocket: an established connection, no retransmissions, the counters the
/// kernel would not know left zero.
fn tcp_info(v: *mut c_void, len: *mut socklen_t) -> c_int {
    if v.is_null() || len.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    // SAFETY: tcp_info is plain old data.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    info.tcpi_state = 1; // TCP_ESTABLISHED
    info.tcpi_snd_mss = 65536;
    info.tcpi_rcv_mss = 65536;
    info.tcpi_snd_cwnd = 10;
    info.tcpi_pmtu = 4096;
    // SAFETY: v has *len writable bytes (C contract); at most sizeof(tcp_info) are written.
    unsafe {
        let n = (*len as usize).min(std::mem::size_of_val(&info));
        std::ptr::copy_nonoverlapping(&info as *const _ as *const u8, v as *mut u8, n);
        *len = n as socklen_t;
    }
    0
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    v: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    route!(fd, -1, |r| getsockopt_rs(r, level, name, v, len), unsafe {
        // SAFETY: C contract of getsockopt.
        real::getsockopt(fd, level, name, v, len)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    v: *const c_void,
    len: socklen_t,
) -> c_int {
    guard!(
        -1,
        match table::slot(fd) {
            Slot::Rsocket { rs: r, ours: true } => {
                if let Some(ret) = set_timeout(r, level, name, v, len) {
                    return ret;
                }
                // SAFETY: C contract of setsockopt.
                let ret = unsafe { rs::rsetsockopt(r, level, name, v, len) };
                if ret != 0 && errno() == libc::ENOPROTOOPT && level != rs::SOL_RDMA {
                    // A kernel option an RDMA connection has no use for (IP_TOS, SO_PRIORITY,
                    // TCP_QUICKACK ...): accepted, as the kernel socket would have.
                    trace!("fd {fd}: option {level}/{name} has no effect over RDMA");
                    return 0;
                }
                ret
            }
            Slot::Rsocket { ours: false, .. } => {
                set_errno(libc::ENOTCONN);
                -1
            }
            Slot::Candidate => {
                // SAFETY: C contract of setsockopt.
                let ret = unsafe { real::setsockopt(fd, level, name, v, len) };
                if ret == 0 && !v.is_null() {
                    // SAFETY: v has len readable bytes (the kernel just read them).
                    let value = unsafe { std::slice::from_raw_parts(v as *const u8, len as usize) }
                        .to_vec();
                    table::with(|d| {
                        if let Some(c) = d.candidates.get_mut(&fd) {
                            c.options.push(table::SavedOption { level, name, value });
                        }
                    });
                }
                ret
            }
            // SAFETY: C contract of setsockopt.
            _ => unsafe { real::setsockopt(fd, level, name, v, len) },
        }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: C contract of getsockname.
    route!(
        fd,
        -1,
        |r| unsafe { rs::rgetsockname(r, addr, len) },
        unsafe { real::getsockname(fd, addr, len) }
    )
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: C contract of getpeername.
    route!(
        fd,
        -1,
        |r| unsafe { rs::rgetpeername(r, addr, len) },
        unsafe { real::getpeername(fd, addr, len) }
    )
}

/// Before exec: an rsocket descriptor that stays open across exec would name a bare
/// socketpair in the new program (whose bytes are not the connection's), so it becomes a
/// socket at end of stream there (reads 0, writes EPIPE). Close-on-exec ones just close.
fn before_exec() {
    for fd in table::rsocket_fds() {
        // SAFETY: fcntl query with no memory argument.
        let fl = unsafe { real::fcntl(fd, libc::F_GETFD, 0) };
        if fl < 0 || fl & libc::FD_CLOEXEC != 0 {
            continue;
        }
        let mut sv = [-1; 2];
        // SAFETY: sv has room for two descriptors.
        if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) } == 0 {
            // SAFETY: our own descriptors; fd is replaced on purpose (the process is leaving).
            unsafe {
                real::close(sv[1]);
                real::dup2(sv[0], fd);
                real::close(sv[0]);
            }
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    guard!(-1, {
        before_exec();
        // SAFETY: C contract of execve.
        unsafe { real::execve(path, argv, envp) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    guard!(-1, {
        before_exec();
        // SAFETY: C contract of execv.
        unsafe { real::execv(path, argv) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    guard!(-1, {
        before_exec();
        // SAFETY: C contract of execvp.
        unsafe { real::execvp(file, argv) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    guard!(-1, {
        before_exec();
        // SAFETY: C contract of execvpe.
        unsafe { real::execvpe(file, argv, envp) }
    })
}

/// Declares credential calls that pass to the C library and, when they succeed, let the
/// preload know (`convert::credentials_changed`).
macro_rules! credentials {
    ($( fn $name:ident ( $($a:ident : $t:ty),* ); )*) => {
        $(
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($a: $t),*) -> c_int {
                // SAFETY: C contract of the call.
                let ret = unsafe { real::$name($($a),*) };
                if ret == 0 {
                    guard!((), convert::credentials_changed());
                }
                ret
            }
        )*
    };
}

credentials! {
    fn setuid(id: libc::uid_t);
    fn setgid(id: libc::gid_t);
    fn seteuid(id: libc::uid_t);
    fn setegid(id: libc::gid_t);
    fn setreuid(r: libc::uid_t, e: libc::uid_t);
    fn setregid(r: libc::gid_t, e: libc::gid_t);
    fn setresuid(r: libc::uid_t, e: libc::uid_t, s: libc::uid_t);
    fn setresgid(r: libc::gid_t, e: libc::gid_t, s: libc::gid_t);
    fn setgroups(n: size_t, list: *const libc::gid_t);
}
