//! The readiness descriptor: what makes an rsocket a real pollable descriptor.
//!
//! An rsocket's number is one end (the *user end*) of a `socketpair(AF_UNIX, SOCK_STREAM)`; the
//! library keeps the other (the *library end*). The library sets what poll(2), select(2) and
//! epoll (level or edge triggered) report on the user end to match the rsocket's state:
//!
//! | shown | how |
//! |---|---|
//! | POLLIN | one byte waits in the user end (written at the library end; read back to clear) |
//! | no POLLOUT | the user end's send buffer holds bytes the library end has not read (a "blocker", written from the user end; the library end reads it to clear) |
//! | POLLIN + POLLRDHUP | the library end shut down for writing (the peer's end of stream; for good) |
//! | + POLLHUP (and POLLOUT) | the library end shut down both ways (connection gone; for good) |
//! | + POLLERR | the library end closed with unread bytes: ECONNRESET pending on the user end (for good, until SO_ERROR is read) |
//!
//! Every change is one or two syscalls, made only when what is shown changes. The kernel does
//! the rest: every waiter on the user end (poll, select, epoll sets, nested epoll) is woken as
//! for any socket, and since it is a real socket, `fstat` and `dup` see one.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// What the user end shows (a set of `POLL*` bits), the irreversible ones included.
#[derive(Debug)]
pub struct ReadyFd {
    user: OwnedFd,
    /// None once closed to show POLLERR.
    lib: Option<OwnedFd>,
    /// POLL* bits shown now.
    shown: i16,
}

/// The bits a readiness descriptor can show.
pub const SHOWABLE: i16 =
    libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
/// The bits that stay once shown: the end of the connection.
pub const GONE: i16 = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;

/// Bytes the user end must hold unread for it to stop being writable (measured once).
fn blocker_len() -> io::Result<usize> {
    static LEN: OnceLock<usize> = OnceLock::new();
    if let Some(&n) = LEN.get() {
        return Ok(n);
    }
    let (u, l) = pair(false)?;
    let chunk = [0u8; 256];
    let mut n = 0;
    while writable(u.as_raw_fd())? {
        if n >= 1 << 16 {
            return Err(io::Error::other(
                "readiness descriptor: cannot block POLLOUT",
            ));
        }
        n += send(u.as_raw_fd(), &chunk)?;
    }
    drop(l);
    Ok(*LEN.get_or_init(|| n))
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn pair(cloexec: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    let ty = libc::SOCK_STREAM | if cloexec { libc::SOCK_CLOEXEC } else { 0 };
    // SAFETY: fds is a valid array of two ints for socketpair to fill.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (u, l) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The smallest send buffer, so that a short blocker stops the user end being writable.
    let one: libc::c_int = 1;
    // SAFETY: passes a pointer to a local int and its size.
    unsafe {
        libc::setsockopt(
            u.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // The library end is ours alone: close-on-exec whatever the rsocket asked.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(l.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((u, l))
}

/// Whether `fd` is writable now. A poll that waits for nothing still fails with EINTR when it
/// finds nothing ready and a signal is pending (a program's timer signal without SA_RESTART):
/// looked at again, since the handler has run by then. (Before, the first rsocket of a
/// process, whose setup ends on a descriptor that is no longer writable, failed with EINTR
/// under such a timer, and the preload left that listener to kernel TCP.)
fn writable(fd: RawFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        match cvt(unsafe { libc::poll(&mut p, 1, 0) } as isize) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => r?,
        };
        return Ok(p.revents & libc::POLLOUT != 0);
    }
}

fn send(fd: RawFd, b: &[u8]) -> io::Result<usize> {
    // SAFETY: b is a valid buffer of b.len() bytes; MSG_NOSIGNAL: no SIGPIPE.
    cvt(unsafe {
        libc::send(
            fd,
            b.as_ptr() as *const libc::c_void,
            b.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Reads and drops everything queued at `fd` (non-blocking). A receive on a stream socket
/// takes all that is queued up to its length, so one that returns less than the buffer emptied
/// it: no second call to find EAGAIN (this is on the data path of every message shown).
fn drain(fd: RawFd) -> io::Result<()> {
    let mut b = [0u8; 4096];
    loop {
        // SAFETY: b is a valid, exclusively borrowed buffer of b.len() bytes.
        let r = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr() as *mut libc::c_void,
                b.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r > 0 {
            if (r as usize) < b.len() {
                return Ok(());
            }
            continue;
        }
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(()),
            Some(libc::EINTR) => continue,
            _ => Err(e),
        };
    }
}

fn shutdown(fd: RawFd, how: i32) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor we own.
    cvt(unsafe { libc::shutdown(fd, how) } as isize).map(|_| ())
}

/// A second descriptor for the same open socket as `fd` (close-on-exec): it polls exactly as
/// `fd` does, and stays valid however `fd` is closed.
pub fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC has no memory arguments.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: d was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(d) })
}

impl ReadyFd {
    /// A new readiness descriptor showing POLLOUT only (an unconnected socket's readiness).
    pub fn new(cloexec: bool) -> io::Result<Self> {
        blocker_len()?;
        let (user, lib) = pair(cloexec)?;
        Ok(ReadyFd {
            user,
            lib: Some(lib),
            shown: libc::POLLOUT,
        })
    }

    /// The user end: the rsocket's number.
    pub fn fd(&self) -> RawFd {
        self.user.as_raw_fd()
    }

    /// What the user end shows now.
    pub fn shown(&self) -> i16 {
        self.shown
    }

    /// Makes the user end show `want` (POLLIN, POLLOUT, POLLRDHUP, POLLHUP, POLLERR; other
    /// bits are ignored). POLLRDHUP, POLLHUP and POLLERR are for good: once shown they stay, and
    /// they bring POLLIN (and POLLHUP, POLLERR bring POLLOUT) with them, as on a TCP socket.
    /// Costs a syscall or two per bit that changes, none when nothing does.
    pub fn show(&mut self, want: i16) -> io::Result<()> {
        let want = want & SHOWABLE;
        if want == self.shown || self.lib.is_none() {
            return Ok(());
        }
        let lib = self.lib.as_ref().map(|l| l.as_raw_fd()).unwrap_or(-1);
        let u = self.user.as_raw_fd();
        if want & libc::POLLERR != 0 && self.shown & libc::POLLHUP == 0 {
            // Unread bytes at the library end when it closes: the user end gets ECONNRESET.
            // (After POLLHUP the user end can no longer send them: a hang-up stays one.)
            // (The kernel wakes pollers before it frees what the library end held: a poll woken
            // by the error may not see POLLOUT yet, which follows at once. Draining a blocker
            // first would show POLLOUT alone before the error, which is worse.)
            if self.shown & libc::POLLOUT != 0 {
                send(u, &[0])?;
            }
            self.lib = None;
            self.shown = SHOWABLE;
            return Ok(());
        }
        if want & libc::POLLHUP != 0 && self.shown & libc::POLLHUP == 0 {
            drain(lib)?;
            shutdown(lib, libc::SHUT_RDWR)?;
            self.shown |= libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLOUT;
        }
        if want & libc::POLLRDHUP != 0 && self.shown & libc::POLLRDHUP == 0 {
            shutdown(lib, libc::SHUT_WR)?;
            self.shown |= libc::POLLIN | libc::POLLRDHUP;
        }
        if self.shown & GONE == 0 {
            match (want & libc::POLLIN != 0, self.shown & libc::POLLIN != 0) {
                (true, false) => {
                    send(lib, &[1])?;
                    self.shown |= libc::POLLIN;
                }
                (false, true) => {
                    drain(u)?;
                    self.shown &= !libc::POLLIN;
                }
                _ => {}
            }
        }
        if self.shown & libc::POLLHUP == 0 {
            match (want & libc::POLLOUT != 0, self.shown & libc::POLLOUT != 0) {
                (true, false) => {
                    drain(lib)?;
                    self.shown |= libc::POLLOUT;
                }
                (false, true) => {
                    let b = vec![0u8; blocker_len()?];
                    send(u, &b)?;
                    self.shown &= !libc::POLLOUT;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Sets or clears close-on-exec on the user end (the library end always has it).
    pub fn set_cloexec(&self, on: bool) {
        let flag = if on { libc::FD_CLOEXEC } else { 0 };
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(self.user.as_raw_fd(), libc::F_SETFD, flag) };
    }

    /// Clears the pending error the user end reports after POLLERR (SO_ERROR was read), as
    /// reading SO_ERROR clears a TCP socket's.
    pub fn clear_error(&self) {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: passes a pointer to a local int and its length.
        unsafe {
            libc::getsockopt(
                self.user.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn on_signal(_: libc::c_int) {}

    /// The look at whether the user end is writable, made when it is not, again and again
    /// while another thread signals this one (a handler without SA_RESTART, as a program's
    /// timer has): never an error. (poll with a zero timeout fails with EINTR then, and the
    /// first rsocket of a process under such a timer failed.)
    #[test]
    fn a_signal_does_not_make_the_writable_check_fail() {
        // SAFETY: sigaction with a handler that does nothing, for SIGURG (which only this test
        // sends, and only to its own thread); a zeroed sigaction is a valid start.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            assert_eq!(libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut()), 0);
        }
        let (u, _l) = pair(false).unwrap();
        while writable(u.as_raw_fd()).unwrap() {
            send(u.as_raw_fd(), &[0u8; 256]).unwrap();
        }
        // SAFETY: this thread's own handle.
        let me = unsafe { libc::pthread_self() };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let signaller = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // SAFETY: the test thread outlives this loop (joined before it returns).
                    unsafe { libc::pthread_kill(me, libc::SIGURG) };
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::yield_now();
                }
            })
        };
        let mut looks = 0;
        let r = loop {
            let r = writable(u.as_raw_fd());
            looks += 1;
            if r.is_err()
                || (looks >= 20_000 && sent.load(std::sync::atomic::Ordering::Relaxed) >= 1_000)
            {
                break r;
            }
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        signaller.join().unwrap();
        assert!(!r.expect("the look failed while signalled"), "still full");
    }

    fn poll_now(fd: RawFd) -> i16 {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert!(unsafe { libc::poll(&mut p, 1, 0) } >= 0);
        p.revents
    }

    fn epoll_events(ep: RawFd) -> Vec<u32> {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: evs is a valid array of 4 events.
        let n = unsafe { libc::epoll_wait(ep, evs.as_mut_ptr(), 4, 0) };
        assert!(n >= 0);
        evs[..n as usize].iter().map(|e| e.events).collect()
    }

    fn epoll_add(ep: RawFd, fd: RawFd, events: u32) {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: ev is a valid epoll_event.
        assert_eq!(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
            0
        );
    }

    fn epoll() -> OwnedFd {
        // SAFETY: epoll_create1 has no memory arguments; the fd is new and ours.
        unsafe { OwnedFd::from_raw_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC)) }
    }

    const IN: i16 = libc::POLLIN;
    const OUT: i16 = libc::POLLOUT;

    #[test]
    fn poll_sees_what_is_shown() {
        let mut r = ReadyFd::new(true).unwrap();
        assert_eq!(poll_now(r.fd()), OUT);
        for want in [0, IN, IN | OUT, OUT, 0, IN, 0, OUT | IN, OUT] {
            r.show(want).unwrap();
            assert_eq!(poll_now(r.fd()), want, "showing {want:#x}");
            assert_eq!(r.shown(), want);
        }
    }

    #[test]
    fn end_of_stream_then_hangup_stay() {
        let mut r = ReadyFd::new(false).unwrap();
        r.show(0).unwrap();
        r.show(libc::POLLRDHUP).unwrap();
        assert_eq!(poll_now(r.fd()), IN | libc::POLLRDHUP);
        // Cannot be taken back.
        r.show(0).unwrap();
        assert_eq!(poll_now(r.fd()), IN | libc::POLLRDHUP);
        r.show(libc::POLLHUP).unwrap();
        assert_eq!(poll_now(r.fd()), IN | OUT | libc::POLLRDHUP | libc::POLLHUP);
        let hup = IN | OUT | libc::POLLRDHUP | libc::POLLHUP;
        r.show(0).unwrap();
        assert_eq!(poll_now(r.fd()), hup);
    }

    #[test]
    fn an_error_stays_until_so_error_is_read() {
        let mut r = ReadyFd::new(false).unwrap();
        r.show(IN).unwrap();
        r.show(libc::POLLRDHUP).unwrap();
        r.show(libc::POLLERR).unwrap();
        let all = IN | OUT | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
        assert_eq!(poll_now(r.fd()), all);
        r.show(0).unwrap();
        assert_eq!(poll_now(r.fd()), all);
        r.clear_error();
        assert_eq!(poll_now(r.fd()), all & !libc::POLLERR);
    }

    #[test]
    fn an_error_straight_from_connecting() {
        let mut r = ReadyFd::new(false).unwrap();
        r.show(0).unwrap();
        r.show(libc::POLLERR | OUT).unwrap();
        assert_eq!(
            poll_now(r.fd()),
            IN | OUT | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR
        );
    }

    #[test]
    fn epoll_level_edge_and_nested() {
        let mut r = ReadyFd::new(false).unwrap();
        r.show(0).unwrap();
        let lt = epoll();
        let et = epoll();
        let outer = epoll();
        epoll_add(
            lt.as_raw_fd(),
            r.fd(),
            (libc::EPOLLIN | libc::EPOLLOUT) as u32,
        );
        epoll_add(
            et.as_raw_fd(),
            r.fd(),
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
        );
        epoll_add(outer.as_raw_fd(), lt.as_raw_fd(), libc::EPOLLIN as u32);
        assert!(epoll_events(lt.as_raw_fd()).is_empty());
        assert!(epoll_events(et.as_raw_fd()).is_empty());
        assert!(epoll_events(outer.as_raw_fd()).is_empty());
        r.show(IN).unwrap();
        let ein = libc::EPOLLIN as u32;
        assert_eq!(epoll_events(lt.as_raw_fd()), vec![ein]);
        assert_eq!(
            epoll_events(lt.as_raw_fd()),
            vec![ein],
            "level triggered repeats"
        );
        assert_eq!(epoll_events(et.as_raw_fd()), vec![ein]);
        assert!(
            epoll_events(et.as_raw_fd()).is_empty(),
            "edge triggered does not"
        );
        assert_eq!(epoll_events(outer.as_raw_fd()), vec![ein]);
        r.show(0).unwrap();
        assert!(epoll_events(lt.as_raw_fd()).is_empty());
        r.show(OUT).unwrap();
        let eout = libc::EPOLLOUT as u32;
        assert_eq!(epoll_events(lt.as_raw_fd()), vec![eout]);
        assert_eq!(epoll_events(et.as_raw_fd()), vec![eout]);
        assert!(epoll_events(et.as_raw_fd()).is_empty());
        // A new edge for each change.
        r.show(OUT | IN).unwrap();
        assert_eq!(epoll_events(et.as_raw_fd()), vec![ein | eout]);
    }

    #[test]
    fn it_is_a_socket() {
        let r = ReadyFd::new(false).unwrap();
        // SAFETY: st is a valid stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(r.fd(), &mut st) }, 0);
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFSOCK);
    }
}
