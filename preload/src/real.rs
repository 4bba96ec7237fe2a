//! The C library's own functions, which this library's definitions hide: found once with
//! `dlsym(RTLD_NEXT)`, then called through a cached pointer.
//!
//! Everything the preload does with a kernel descriptor goes through here, and so does every
//! call the rsocket core makes (it is linked into this library, so its `read`, `poll`, `fcntl`
//! ... come to our definitions, which pass a descriptor that is not an application's
//! converted socket straight to these).

use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{
    c_char, c_int, c_uint, c_ulong, c_void, iovec, msghdr, off_t, size_t, sockaddr, socklen_t,
    ssize_t,
};

/// The next definition of `name` (NUL-terminated) after ours; aborts if there is none (the C
/// library always has one: a missing one means a broken process, and no errno can say it).
fn resolve(name: &'static str) -> usize {
    // SAFETY: name is NUL-terminated (the macro below appends the NUL).
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const c_char) };
    if p.is_null() {
        let msg = b"librspreload-rs: a libc function is missing\n";
        // SAFETY: writes a static buffer to stderr, then ends the process.
        unsafe {
            libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len());
            libc::abort();
        }
    }
    p as usize
}

macro_rules! real {
    ($( $(#[$m:meta])* fn $name:ident ( $($a:ident : $t:ty),* ) -> $r:ty ; )*) => {
        $(
            $(#[$m])*
            /// The C library's definition (see the module documentation).
            pub unsafe fn $name($($a: $t),*) -> $r {
                static P: AtomicUsize = AtomicUsize::new(0);
                let mut p = P.load(Ordering::Relaxed);
                if p == 0 {
                    p = resolve(concat!(stringify!($name), "\0"));
                    P.store(p, Ordering::Relaxed);
                }
                // SAFETY: p is the address of the C library's function of this name, whose C
                // prototype is the one spelled here.
                let f: unsafe extern "C" fn($($t),*) -> $r = unsafe { std::mem::transmute(p) };
                // SAFETY: the caller keeps the function's C contract.
                unsafe { f($($a),*) }
            }
        )*
    };
}

real! {
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int;
    fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    fn listen(fd: c_int, backlog: c_int) -> c_int;
    fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    fn shutdown(fd: c_int, how: c_int) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut libc::epoll_event) -> c_int;
    fn poll(fds: *mut libc::pollfd, n: libc::nfds_t, ms: c_int) -> c_int;
    fn ppoll(
        fds: *mut libc::pollfd,
        n: libc::nfds_t,
        ts: *const libc::timespec,
        mask: *const libc::sigset_t
    ) -> c_int;
    fn select(
        n: c_int,
        r: *mut libc::fd_set,
        w: *mut libc::fd_set,
        e: *mut libc::fd_set,
        tv: *mut libc::timeval
    ) -> c_int;
    fn pselect(
        n: c_int,
        r: *mut libc::fd_set,
        w: *mut libc::fd_set,
        e: *mut libc::fd_set,
        ts: *const libc::timespec,
        mask: *const libc::sigset_t
    ) -> c_int;
    fn epoll_wait(epfd: c_int, ev: *mut libc::epoll_event, max: c_int, ms: c_int) -> c_int;
    fn epoll_pwait(
        epfd: c_int,
        ev: *mut libc::epoll_event,
        max: c_int,
        ms: c_int,
        mask: *const libc::sigset_t
    ) -> c_int;
    fn epoll_pwait2(
        epfd: c_int,
        ev: *mut libc::epoll_event,
        max: c_int,
        ts: *const libc::timespec,
        mask: *const libc::sigset_t
    ) -> c_int;
    fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t;
    fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t;
    fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t;
    fn writev(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t;
    fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t;
    fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t;
    fn recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t;
    fn sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t;
    fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t;
    fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t;
    fn recvmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int, t: *mut libc::timespec) -> c_int;
    fn sendmmsg(fd: c_int, v: *mut libc::mmsghdr, n: c_uint, flags: c_int) -> c_int;
    fn sendfile(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t;
    fn sendfile64(out: c_int, inp: c_int, off: *mut off_t, n: size_t) -> ssize_t;
    fn pread(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t;
    fn lseek(fd: c_int, off: off_t, whence: c_int) -> off_t;
    fn dup(fd: c_int) -> c_int;
    fn dup2(fd: c_int, to: c_int) -> c_int;
    fn dup3(fd: c_int, to: c_int, flags: c_int) -> c_int;
    fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int;
    fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int;
    fn ioctl(fd: c_int, req: c_ulong, arg: c_ulong) -> c_int;
    fn getsockopt(fd: c_int, level: c_int, name: c_int, v: *mut c_void, len: *mut socklen_t) -> c_int;
    fn setsockopt(fd: c_int, level: c_int, name: c_int, v: *const c_void, len: socklen_t) -> c_int;
    fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int;
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    fn execv(path: *const c_char, argv: *const *const c_char) -> c_int;
    fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int;
    fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int;
    fn setuid(id: libc::uid_t) -> c_int;
    fn setgid(id: libc::gid_t) -> c_int;
    fn seteuid(id: libc::uid_t) -> c_int;
    fn setegid(id: libc::gid_t) -> c_int;
    fn setreuid(r: libc::uid_t, e: libc::uid_t) -> c_int;
    fn setregid(r: libc::gid_t, e: libc::gid_t) -> c_int;
    fn setresuid(r: libc::uid_t, e: libc::uid_t, s: libc::uid_t) -> c_int;
    fn setresgid(r: libc::gid_t, e: libc::gid_t, s: libc::gid_t) -> c_int;
    fn setgroups(n: size_t, list: *const libc::gid_t) -> c_int;
}
