//! The crate's one error type. The C API maps it to errno in one table (`capi`).

#![forbid(unsafe_code)]

use std::fmt;
use std::io;

/// An rsocket operation failed.
#[derive(Debug)]
pub enum Error {
    /// Not an rsocket descriptor (EBADF).
    BadDescriptor,
    /// A non-blocking operation would block (EAGAIN).
    WouldBlock,
    /// A non-blocking connect is under way (EINPROGRESS).
    InProgress,
    /// Already connecting (EALREADY).
    Already,
    /// Already connected (EISCONN).
    IsConnected,
    /// Not connected (ENOTCONN).
    NotConnected,
    /// No listener at the peer, or it refused (ECONNREFUSED).
    ConnectionRefused,
    /// The peer went away (ECONNRESET).
    ConnectionReset,
    /// Writing after shutdown (EPIPE).
    BrokenPipe,
    /// Peer unreachable or a timeout elapsed (ETIMEDOUT).
    TimedOut,
    /// Bad argument (EINVAL).
    InvalidArgument,
    /// Unsupported socket option, family or type (ENOPROTOOPT / EAFNOSUPPORT / EPROTONOSUPPORT).
    Unsupported(i32),
    /// Operation not (yet) provided by this library (ENOSYS).
    NotImplemented,
    /// Operation not supported on this kind of socket (EOPNOTSUPP).
    OpNotSupported,
    /// The access is not granted (EACCES): an iomap window without the needed protection.
    PermissionDenied,
    /// Out of a bounded resource (ENOMEM): no free iomap slot.
    NoMemory,
    /// The peer violated the protocol (EPROTO).
    Protocol(String),
    /// An OS or verbs error with its errno.
    Os(io::Error),
}

impl Error {
    /// The errno a C caller sees.
    pub fn errno(&self) -> i32 {
        match self {
            Error::BadDescriptor => libc::EBADF,
            Error::WouldBlock => libc::EAGAIN,
            Error::InProgress => libc::EINPROGRESS,
            Error::Already => libc::EALREADY,
            Error::IsConnected => libc::EISCONN,
            Error::NotConnected => libc::ENOTCONN,
            Error::ConnectionRefused => libc::ECONNREFUSED,
            Error::ConnectionReset => libc::ECONNRESET,
            Error::BrokenPipe => libc::EPIPE,
            Error::TimedOut => libc::ETIMEDOUT,
            Error::InvalidArgument => libc::EINVAL,
            Error::Unsupported(e) => *e,
            Error::NotImplemented => libc::ENOSYS,
            Error::OpNotSupported => libc::EOPNOTSUPP,
            Error::PermissionDenied => libc::EACCES,
            Error::NoMemory => libc::ENOMEM,
            Error::Protocol(_) => libc::EPROTO,
            Error::Os(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol(m) => write!(f, "rsocket protocol error: {m}"),
            Error::Os(e) => write!(f, "{e}"),
            other => write!(f, "{}", io::Error::from_raw_os_error(other.errno())),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EAGAIN) => Error::WouldBlock,
            Some(libc::ECONNREFUSED) => Error::ConnectionRefused,
            Some(libc::ECONNRESET) => Error::ConnectionReset,
            Some(libc::ETIMEDOUT) => Error::TimedOut,
            Some(libc::EINVAL) => Error::InvalidArgument,
            // A connection the library found broken (a post the device refused, see
            // `proto::driver`): no errno of its own.
            None if e.kind() == io::ErrorKind::ConnectionReset => Error::ConnectionReset,
            _ => Error::Os(e),
        }
    }
}

/// Result alias of the crate.
pub type Result<T> = std::result::Result<T, Error>;
