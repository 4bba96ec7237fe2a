//! A safe Rust API for RDMA stream sockets, shaped like `std::net`: [`RdmaListener`] and
//! [`RdmaStream`], with `Read`/`Write` and `AsFd`/`AsRawFd`.
//!
//! Each one is an rsocket of the descriptor table (as the C API's), and its descriptor is a
//! real one whose readiness follows the socket's (see `socket::stream::ready`): put it into
//! your own epoll or poll loop, or use it with an async runtime. With tokio, for example, wrap a
//! non-blocking stream in `AsyncFd` and retry on `WouldBlock` after each readiness:
//!
//! ```no_run
//! # async fn echo_once(addr: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::io::{Read, Write};
//! use rsocket::net::RdmaStream;
//! use tokio::io::unix::AsyncFd;
//!
//! let s = RdmaStream::connect(addr)?;
//! s.set_nonblocking(true)?;
//! // SAFETY: the stream owns the descriptor it lends (`as_raw_fd`) until it is dropped.
//! let s = unsafe { AsyncFd::register(s) }.map_err(|e| e.into_parts().1)?;
//! let mut buf = [0u8; 5];
//! loop {
//!     let mut ready = s.writable().await?;
//!     if let Ok(r) = ready.try_io(|s| s.get_ref().write(b"hello")) {
//!         r?;
//!         break;
//!     }
//! }
//! loop {
//!     let mut ready = s.readable().await?;
//!     if let Ok(r) = ready.try_io(|s| s.get_ref().read(&mut buf)) {
//!         println!("read {} bytes", r?);
//!         break;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Dropping a listener or a stream closes it (an orderly disconnect, as `rclose`). `as_raw_fd`
//! and `as_fd` give a descriptor the value owns, of the same open socket as the rsocket's number
//! (`rsocket_fd`, for the C calls), which polls the same.

#![forbid(unsafe_code)]

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::error::Error;
use crate::socket::{self, StreamSocket};
use crate::verbs::ready::dup_cloexec;

fn io_err(e: Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

fn family(a: &SocketAddr) -> i32 {
    if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// A descriptor of the table, closed (`rclose`) when dropped.
#[derive(Debug)]
struct Handle {
    fd: RawFd,
    s: Arc<StreamSocket>,
    /// The same open socket as `fd`, owned here: what `as_fd` lends (a borrow must stay valid
    /// whatever happens to the number).
    dup: OwnedFd,
}

impl Handle {
    fn new(domain: i32) -> io::Result<Self> {
        let fd = socket::socket(domain, libc::SOCK_STREAM, 0).map_err(io_err)?;
        let s = socket::lookup(fd).map_err(io_err)?;
        Self::with(fd, s)
    }

    fn adopt(s: Arc<StreamSocket>) -> io::Result<Self> {
        let fd = socket::insert(s.clone());
        Self::with(fd, s)
    }

    fn with(fd: RawFd, s: Arc<StreamSocket>) -> io::Result<Self> {
        match dup_cloexec(fd) {
            Ok(dup) => Ok(Handle { fd, s, dup }),
            Err(e) => {
                let _ = socket::close(fd);
                Err(e)
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = socket::close(self.fd);
    }
}

/// A listening RDMA stream socket.
#[derive(Debug)]
pub struct RdmaListener(Handle);

impl RdmaListener {
    /// Binds to `addr` (an address of an RDMA device, or a wildcard) and listens.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let h = Handle::new(family(&addr))?;
        h.s.bind(&addr.into()).map_err(io_err)?;
        h.s.listen(128).map_err(io_err)?;
        Ok(RdmaListener(h))
    }

    /// Accepts a connection (`WouldBlock` if non-blocking and none is pending).
    pub fn accept(&self) -> io::Result<(RdmaStream, SocketAddr)> {
        let s = self.0.s.accept().map_err(io_err)?;
        let stream = RdmaStream(Handle::adopt(s)?);
        let peer = stream.peer_addr()?;
        Ok((stream, peer))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        to_std(self.0.s.local_addr().map_err(io_err)?)
    }

    /// O_NONBLOCK on or off.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.0.s.set_options(|o| o.nonblocking = on);
        Ok(())
    }

    /// The rsocket's number, for the C API's calls on the same socket.
    pub fn rsocket_fd(&self) -> RawFd {
        self.0.fd
    }
}

fn to_std(a: crate::verbs::SockAddr) -> io::Result<SocketAddr> {
    a.to_std()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
}

/// A connected RDMA stream socket.
#[derive(Debug)]
pub struct RdmaStream(Handle);

impl RdmaStream {
    /// Connects to `addr` (blocking), from whatever local RDMA address routes there.
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        Self::connect_from(None, addr)
    }

    /// Connects to `addr` from the local address `local` (its port 0: any), blocking.
    pub fn connect_from(local: Option<SocketAddr>, addr: SocketAddr) -> io::Result<Self> {
        let h = Handle::new(family(&addr))?;
        if let Some(l) = local {
            h.s.bind(&l.into()).map_err(io_err)?;
        }
        h.s.connect(&addr.into()).map_err(io_err)?;
        Ok(RdmaStream(h))
    }

    /// O_NONBLOCK on or off: reads and writes that cannot proceed give `WouldBlock`.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.0.s.set_options(|o| o.nonblocking = on);
        Ok(())
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        to_std(self.0.s.peer_addr().map_err(io_err)?)
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        to_std(self.0.s.local_addr().map_err(io_err)?)
    }

    /// Shuts down reading, writing or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        self.0.s.shutdown(how).map_err(io_err)
    }

    /// The rsocket's number, for the C API's calls on the same socket (`rsend`, `rgetsockopt`...).
    pub fn rsocket_fd(&self) -> RawFd {
        self.0.fd
    }

    /// The pending socket error (SO_ERROR), taken.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        let e = self.0.s.take_error();
        Ok((e != 0).then(|| io::Error::from_raw_os_error(e)))
    }
}

impl io::Read for &RdmaStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.s.recv(buf, 0).map_err(io_err)
    }
}

impl io::Write for &RdmaStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // No SIGPIPE: a write after the peer went reports EPIPE, as std's sockets do.
        self.0.s.send(buf, libc::MSG_NOSIGNAL).map_err(io_err)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Read for RdmaStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl io::Write for RdmaStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The descriptor this value owns (see [`AsFd`]); [`RdmaStream::rsocket_fd`] is the number the
/// C calls take.
impl AsRawFd for RdmaStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.dup.as_raw_fd()
    }
}

/// As for [`RdmaStream`].
impl AsRawFd for RdmaListener {
    fn as_raw_fd(&self) -> RawFd {
        self.0.dup.as_raw_fd()
    }
}

/// A descriptor of the same open socket as the rsocket's number ([`RdmaStream::rsocket_fd`],
/// which the C calls take), owned by this value: it polls, epolls and registers with async
/// runtimes exactly as that number would.
impl AsFd for RdmaStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.dup.as_fd()
    }
}

/// As for [`RdmaStream`].
impl AsFd for RdmaListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.dup.as_fd()
    }
}
