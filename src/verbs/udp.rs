//! The kernel UDP socket a datagram rsocket owns: it holds the socket's port, carries the
//! introductions between queue pairs (`proto::dgram::UdpHeader`), and finds which local
//! address routes to a destination.
//!
//! Every call here is a raw system call, not the C library's function: under a preload that
//! interposes `socket`, `bind` and the rest (ours converts UDP sockets into datagram
//! rsockets), the library's own socket must stay a kernel socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::addr::SockAddr;

/// A non-blocking, close-on-exec UDP socket.
#[derive(Debug)]
pub struct UdpSock(OwnedFd);

fn check(r: libc::c_long) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as libc::c_int)
    }
}

fn check_len(r: libc::c_long) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl UdpSock {
    /// A new unbound socket of `domain` (AF_INET or AF_INET6).
    pub fn new(domain: i32) -> io::Result<Self> {
        // SAFETY: socket(2) has no memory arguments.
        let fd = check(unsafe {
            libc::syscall(
                libc::SYS_socket,
                domain,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: fd was just created and is owned by nobody else.
        Ok(UdpSock(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The descriptor (readable when a datagram is queued).
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Sets an integer socket option.
    pub fn set_int(&self, level: i32, name: i32, v: i32) -> io::Result<()> {
        // SAFETY: the option value is a local int of the length passed.
        check(unsafe {
            libc::syscall(
                libc::SYS_setsockopt,
                self.fd(),
                level,
                name,
                &v as *const i32 as *const libc::c_void,
                4,
            )
        })
        .map(drop)
    }

    /// bind(2).
    pub fn bind(&self, addr: &SockAddr) -> io::Result<()> {
        let mut a = *addr;
        let len = a.len;
        // SAFETY: a is a valid socket address of len bytes.
        check(unsafe { libc::syscall(libc::SYS_bind, self.fd(), a.as_mut_ptr(), len) }).map(drop)
    }

    /// connect(2) (AF_UNSPEC dissolves the association).
    pub fn connect(&self, addr: &SockAddr) -> io::Result<()> {
        let mut a = *addr;
        let len = a.len;
        // SAFETY: as for bind.
        check(unsafe { libc::syscall(libc::SYS_connect, self.fd(), a.as_mut_ptr(), len) }).map(drop)
    }

    /// getsockname(2).
    pub fn local_addr(&self) -> io::Result<SockAddr> {
        // SAFETY: zeroed storage is valid output.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: storage and its length are valid output.
        check(unsafe {
            libc::syscall(
                libc::SYS_getsockname,
                self.fd(),
                &mut st as *mut _ as *mut libc::sockaddr,
                &mut len as *mut libc::socklen_t,
            )
        })?;
        Ok(SockAddr::from_storage(st))
    }

    /// Sends `parts` as one datagram to `to`.
    pub fn send_to(&self, parts: &[&[u8]], to: &SockAddr) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let mut a = *to;
        // SAFETY: zeroed msghdr is valid; fields set below.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        m.msg_name = a.as_mut_ptr() as *mut libc::c_void;
        m.msg_namelen = a.len;
        m.msg_iov = iov.as_mut_ptr();
        m.msg_iovlen = iov.len() as _;
        // SAFETY: the msghdr points to live iovecs and address for the call.
        check_len(unsafe {
            libc::syscall(
                libc::SYS_sendmsg,
                self.fd(),
                &m as *const libc::msghdr,
                libc::MSG_NOSIGNAL,
            )
        })
    }

    /// Receives one datagram (non-blocking: WouldBlock when none is queued) and its source.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SockAddr)> {
        // SAFETY: zeroed storage is valid output.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buffer and address storage are valid for their lengths.
        let n = check_len(unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                self.fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut st as *mut _ as *mut libc::sockaddr,
                &mut len as *mut libc::socklen_t,
            )
        })?;
        Ok((n, SockAddr::from_storage(st)))
    }
}

/// The local address the kernel would send from to reach `dst` (a connected UDP socket's
/// name; no packet is sent).
pub fn source_for(dst: &SockAddr) -> io::Result<SockAddr> {
    let s = UdpSock::new(dst.family())?;
    s.connect(dst)?;
    s.local_addr()
}
