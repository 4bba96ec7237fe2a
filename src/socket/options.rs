//! rsetsockopt / rgetsockopt / rfcntl semantics, on plain integers (the C layer copies bytes).

use crate::error::{Error, Result};
use crate::socket::stream::StreamSocket;

/// Level of the RDMA-specific options.
pub const SOL_RDMA: i32 = 0x10000;
/// Send queue size.
pub const RDMA_SQSIZE: i32 = 0;
/// Receive queue size.
pub const RDMA_RQSIZE: i32 = 1;
/// Inline data size.
pub const RDMA_INLINE: i32 = 2;
/// iomap entries offered to the peer.
pub const RDMA_IOMAPSIZE: i32 = 3;
/// Path record (route) to use.
pub const RDMA_ROUTE: i32 = 4;

fn unsupported() -> Error {
    Error::Unsupported(libc::ENOPROTOOPT)
}

/// Sets an integer-valued option.
pub fn set_int(s: &StreamSocket, level: i32, name: i32, v: i32) -> Result<()> {
    let sizes_fixed = s.is_connected();
    let size = |v: i32| -> Result<u32> {
        if v < 0 {
            return Err(Error::InvalidArgument);
        }
        if sizes_fixed {
            // librdmacm ignores sizes set after the connection exists; so do we, quietly.
            return Ok(u32::MAX);
        }
        Ok(v as u32)
    };
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_REUSEADDR) => s.set_options(|o| o.reuseaddr = v != 0),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => s.set_options(|o| o.keepalive = v != 0),
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => {
            let n = size(v)?;
            if n != u32::MAX {
                // Like the kernel, the value set is doubled for bookkeeping overhead.
                s.set_options(|o| o.rbuf_size = n.saturating_mul(2).max(4096));
            }
        }
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => {
            let n = size(v)?;
            if n != u32::MAX {
                s.set_options(|o| o.sbuf_size = n.saturating_mul(2).max(4096));
            }
        }
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => s.set_options(|o| o.nodelay = v != 0),
        (SOL_RDMA, RDMA_SQSIZE) => {
            let n = size(v)?;
            if n != u32::MAX {
                s.set_options(|o| o.sq_size = n);
            }
        }
        (SOL_RDMA, RDMA_RQSIZE) => {
            let n = size(v)?;
            if n != u32::MAX {
                s.set_options(|o| o.rq_size = n);
            }
        }
        (SOL_RDMA, RDMA_INLINE) => {
            let n = size(v)?;
            if n != u32::MAX {
                s.set_options(|o| o.sq_inline = n);
            }
        }
        _ => return Err(unsupported()),
    }
    Ok(())
}

/// Reads an integer-valued option.
pub fn get_int(s: &StreamSocket, level: i32, name: i32) -> Result<i32> {
    let o = s.options();
    Ok(match (level, name) {
        (libc::SOL_SOCKET, libc::SO_ERROR) => s.take_error(),
        (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
        (libc::SOL_SOCKET, libc::SO_REUSEADDR) => o.reuseaddr as i32,
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => o.keepalive as i32,
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => o.rbuf_size as i32,
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => o.sbuf_size as i32,
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => o.nodelay as i32,
        (SOL_RDMA, RDMA_SQSIZE) => o.sq_size as i32,
        (SOL_RDMA, RDMA_RQSIZE) => o.rq_size as i32,
        (SOL_RDMA, RDMA_INLINE) => o.sq_inline as i32,
        _ => return Err(unsupported()),
    })
}

/// `rfcntl`: F_GETFL/F_SETFL (O_NONBLOCK) and F_GETFD/F_SETFD.
pub fn fcntl(s: &StreamSocket, cmd: i32, arg: i64) -> Result<i32> {
    match cmd {
        libc::F_GETFL => Ok(libc::O_RDWR
            | if s.options().nonblocking {
                libc::O_NONBLOCK
            } else {
                0
            }),
        libc::F_SETFL => {
            s.set_options(|o| o.nonblocking = arg as i32 & libc::O_NONBLOCK != 0);
            Ok(0)
        }
        libc::F_GETFD => Ok(libc::FD_CLOEXEC),
        libc::F_SETFD => Ok(0),
        _ => Err(Error::InvalidArgument),
    }
}
