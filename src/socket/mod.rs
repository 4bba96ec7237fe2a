//! Sockets: the descriptor table, stream rsockets, options and configuration.
//!
//! A descriptor is the number of a real file descriptor the rsocket owns (the user end of its
//! readiness socketpair, `verbs::ready`), so rsocket numbers never collide with the process's
//! other descriptors, and poll(2), select(2) and epoll work on them.

#![forbid(unsafe_code)]

pub mod config;
pub mod dgram;
pub mod options;
pub mod poll;
pub mod service;
pub mod spin;
pub mod stream;

use std::os::fd::RawFd;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
pub use dgram::DgramSocket;
pub use stream::StreamSocket;

/// The kinds of sockets a descriptor can name.
#[derive(Debug, Clone)]
pub enum Socket {
    /// SOCK_STREAM.
    Stream(Arc<StreamSocket>),
    /// SOCK_DGRAM.
    Dgram(Arc<DgramSocket>),
}

/// The descriptor table, indexed by descriptor number (descriptors are small integers, and a
/// lookup runs on every call: no hashing).
struct Table(Vec<Option<Socket>>);

impl Table {
    fn get(&self, fd: RawFd) -> Option<&Socket> {
        self.0.get(usize::try_from(fd).ok()?)?.as_ref()
    }

    fn insert(&mut self, fd: RawFd, s: Socket) {
        let i = usize::try_from(fd).expect("descriptors are not negative");
        if self.0.len() <= i {
            self.0.resize(i + 1, None);
        }
        self.0[i] = Some(s);
    }

    fn remove(&mut self, fd: RawFd) -> Option<Socket> {
        self.0.get_mut(usize::try_from(fd).ok()?)?.take()
    }
}

fn table() -> &'static RwLock<Table> {
    // A plain static, not a lazily set one: no look at its state per call.
    static TABLE: RwLock<Table> = RwLock::new(Table(Vec::new()));
    &TABLE
}

/// The process's credentials changed (setuid, setgid, setgroups and the like): every thread
/// now has credentials of its own, and the kernel serves a CM or verbs file's write(2)
/// commands only to the credentials it was opened with. Sockets made before stop working;
/// the ones made from now on, from the thread that changed them (or threads it starts), work:
/// they open new device contexts and have a new service thread.
pub fn credentials_changed() {
    crate::verbs::credentials_changed();
    service::restart();
}

/// Creates an rsocket and returns its descriptor.
pub fn socket(domain: i32, ty: i32, protocol: i32) -> Result<RawFd> {
    let base = ty & !(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK);
    if !matches!(domain, libc::AF_INET | libc::AF_INET6 | libc::AF_IB) {
        return Err(Error::Unsupported(libc::EAFNOSUPPORT));
    }
    match base {
        libc::SOCK_STREAM => {
            if protocol != 0 && protocol != libc::IPPROTO_TCP {
                return Err(Error::Unsupported(libc::EPROTONOSUPPORT));
            }
        }
        libc::SOCK_DGRAM => {
            if protocol != 0 && protocol != libc::IPPROTO_UDP {
                return Err(Error::Unsupported(libc::EPROTONOSUPPORT));
            }
            if domain == libc::AF_IB {
                return Err(Error::Unsupported(libc::EAFNOSUPPORT));
            }
            let s = DgramSocket::new(
                domain,
                ty & libc::SOCK_NONBLOCK != 0,
                ty & libc::SOCK_CLOEXEC != 0,
            )?;
            let fd = s.fd();
            table()
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fd, Socket::Dgram(s));
            return Ok(fd);
        }
        _ => return Err(Error::Unsupported(libc::ESOCKTNOSUPPORT)),
    }
    let s = StreamSocket::new(domain, ty & libc::SOCK_NONBLOCK != 0)?;
    if ty & libc::SOCK_CLOEXEC != 0 {
        s.set_options(|o| o.cloexec = true);
    }
    Ok(insert(s))
}

/// Gives a stream socket (e.g. one returned by accept) its descriptor.
pub fn insert(s: Arc<StreamSocket>) -> RawFd {
    let fd = s.fd();
    table()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(fd, Socket::Stream(s));
    fd
}

/// Finds the socket behind a descriptor, whatever its kind.
pub fn lookup_any(fd: RawFd) -> Result<Socket> {
    // A match, not `ok_or`: the error is built (and dropped again) only when it is returned,
    // not on every call of the busiest path (an out-of-line drop per rrecv that finds nothing).
    match table().read().unwrap_or_else(|p| p.into_inner()).get(fd) {
        Some(s) => Ok(s.clone()),
        None => Err(Error::BadDescriptor),
    }
}

/// One line per live stream socket (those of the descriptor table and the safe API's
/// accepted ones alike): its descriptor and state (`StreamSocket::describe`), or that another
/// thread holds its lock (not waited for). For diagnostics: a test's watchdog prints them when
/// a test hangs.
pub fn describe_all() -> Vec<String> {
    StreamSocket::live()
        .into_iter()
        .map(|s| {
            let d = s.try_describe();
            format!(
                "fd {}: {}",
                s.fd(),
                d.as_deref().unwrap_or("(locked by another thread)")
            )
        })
        .collect()
}

/// Finds the stream socket behind a descriptor: EBADF if there is none, EOPNOTSUPP if the
/// descriptor names a socket of another kind (the kernel's errno for a stream call on it).
pub fn lookup(fd: RawFd) -> Result<Arc<StreamSocket>> {
    match lookup_any(fd)? {
        Socket::Stream(s) => Ok(s),
        Socket::Dgram(_) => Err(Error::OpNotSupported),
    }
}

/// Closes a descriptor: orderly disconnect, then the resources go with the last handle.
pub fn close(fd: RawFd) -> Result<()> {
    let s = table()
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .remove(fd)
        .ok_or(Error::BadDescriptor)?;
    match s {
        Socket::Stream(s) => s.close(),
        Socket::Dgram(s) => s.close(),
    }
}
