//! rsetsockopt / rgetsockopt / rfcntl with librdmacm's option set and kernel-socket errnos.
//!
//! Values travel as bytes, as through the C API. Options librdmacm accepts without acting on them
//! (TCP_MAXSEG, TCP_CONGESTION, SO_OOBINLINE) are accepted and reported back; anything else is
//! ENOPROTOOPT, like a kernel socket (librdmacm says ENOTSUP).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::socket::stream::StreamSocket;
use crate::verbs::CmOption;

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
/// Path record (route) to use, as `struct ibv_path_data[]`.
pub const RDMA_ROUTE: i32 = 4;

/// The name TCP_CONGESTION reports: there is no congestion control over RC, the HCA paces.
const CONGESTION_NAME: &[u8] = b"rdma";

fn unsupported() -> Error {
    Error::Unsupported(libc::ENOPROTOOPT)
}

/// An int option's value as the kernel reads it: 4 bytes or more, native order, or the first
/// byte of a shorter one; EINVAL if empty.
pub(crate) fn int(v: &[u8]) -> Result<i32> {
    match v.len() {
        0 => Err(Error::InvalidArgument),
        1..=3 => Ok(v[0] as i32),
        _ => Ok(i32::from_ne_bytes(v[..4].try_into().expect("4 bytes"))),
    }
}

/// A size option's value ([`int`]); EINVAL if negative.
pub(crate) fn size(v: &[u8]) -> Result<u32> {
    let n = int(v)?;
    if n < 0 {
        return Err(Error::InvalidArgument);
    }
    Ok(n as u32)
}

/// Sets an option.
pub fn set(s: &Arc<StreamSocket>, level: i32, name: i32, v: &[u8]) -> Result<()> {
    let connected = s.is_connected();
    match (level, name) {
        (libc::SOL_SOCKET, libc::SO_REUSEADDR) => {
            let on = int(v)? != 0;
            s.set_cm_option(CmOption::ReuseAddr, &(on as i32).to_ne_bytes())?;
            s.set_options(|o| o.reuseaddr = on);
        }
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => s.set_keepalive(int(v)? != 0),
        (libc::SOL_SOCKET, libc::SO_OOBINLINE) => {
            let on = int(v)? != 0;
            s.set_options(|o| o.oobinline = on);
        }
        (libc::SOL_SOCKET, libc::SO_ZEROCOPY) => {
            let on = int(v)? != 0;
            s.set_options(|o| o.zerocopy = on);
        }
        (libc::SOL_SOCKET, libc::SO_LINGER) => {
            if v.len() < 8 {
                return Err(Error::InvalidArgument);
            }
            let on = i32::from_ne_bytes(v[0..4].try_into().expect("4 bytes")) != 0;
            let secs = i32::from_ne_bytes(v[4..8].try_into().expect("4 bytes"));
            s.set_options(|o| o.linger = on.then_some(secs.max(0)));
        }
        // Buffer sizes are fixed once the connection exists (librdmacm ignores late changes).
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => {
            let n = size(v)?;
            if !connected {
                // Like the kernel, the value set is doubled for bookkeeping.
                // A size the application chose is registered at once, not grown into.
                s.set_options(|o| {
                    o.rbuf_size = n.saturating_mul(2).max(4096);
                    o.rbuf_start = o.rbuf_size;
                });
            }
        }
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => {
            let n = size(v)?;
            if !connected {
                s.set_options(|o| {
                    o.sbuf_size = n.saturating_mul(2).max(4096);
                    o.sbuf_start = o.sbuf_size;
                });
            }
        }
        (libc::IPPROTO_IP, libc::IP_TOS) => {
            let tos = int(v)? as u8;
            s.set_cm_option(CmOption::Tos, &[tos])?;
            s.set_options(|o| o.tos = tos);
        }
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => {
            let on = int(v)? != 0;
            s.set_options(|o| o.nodelay = on);
        }
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE | libc::TCP_KEEPINTVL | libc::TCP_KEEPCNT) => {
            let n = int(v)?;
            if n <= 0 {
                return Err(Error::InvalidArgument);
            }
            s.set_options(|o| match name {
                libc::TCP_KEEPIDLE => o.keepidle = n as u32,
                libc::TCP_KEEPINTVL => o.keepintvl = n as u32,
                _ => o.keepcnt = n as u32,
            });
        }
        (libc::IPPROTO_TCP, libc::TCP_MAXSEG) => {
            size(v)?;
        }
        (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => {}
        (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => {
            let on = int(v)? != 0;
            s.set_cm_option(CmOption::AfOnly, &(on as i32).to_ne_bytes())?;
            s.set_options(|o| o.v6only = on);
        }
        (SOL_RDMA, _) if connected => return Err(Error::InvalidArgument),
        (SOL_RDMA, RDMA_SQSIZE) => {
            let n = size(v)?.min(0xFFFE);
            s.set_options(|o| o.sq_size = n);
        }
        (SOL_RDMA, RDMA_RQSIZE) => {
            let n = size(v)?.min(0xFFFE);
            s.set_options(|o| o.rq_size = n);
        }
        (SOL_RDMA, RDMA_INLINE) => {
            let n = size(v)?.min(0xFFFE);
            s.set_options(|o| o.sq_inline = n);
        }
        (SOL_RDMA, RDMA_IOMAPSIZE) => {
            let n = size(v)?.min(u16::MAX as u32) as u16;
            // Only sizes the 8-bit wire field can carry.
            let n =
                crate::proto::wire::iomap_scale_to_size(crate::proto::wire::iomap_size_to_scale(n));
            s.set_options(|o| o.iomap_size = n);
        }
        (SOL_RDMA, RDMA_ROUTE) => {
            if v.is_empty() {
                return Err(Error::InvalidArgument);
            }
            s.set_route(v.to_vec());
        }
        _ => return Err(unsupported()),
    }
    Ok(())
}

/// Reads an option into `out`; returns the length written (truncated like the kernel does).
pub fn get(s: &StreamSocket, level: i32, name: i32, out: &mut [u8]) -> Result<usize> {
    let o = s.options();
    let v: i32 = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_ERROR) => s.take_error(),
        (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => libc::IPPROTO_TCP,
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => s.domain(),
        (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => s.is_listening() as i32,
        (libc::SOL_SOCKET, libc::SO_REUSEADDR) => o.reuseaddr as i32,
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => o.keepalive as i32,
        (libc::SOL_SOCKET, libc::SO_OOBINLINE) => o.oobinline as i32,
        (libc::SOL_SOCKET, libc::SO_ZEROCOPY) => o.zerocopy as i32,
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => o.rbuf_size as i32,
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => o.sbuf_size as i32,
        (libc::SOL_SOCKET, libc::SO_LINGER) => {
            let mut b = [0u8; 8];
            b[0..4].copy_from_slice(&(o.linger.is_some() as i32).to_ne_bytes());
            b[4..8].copy_from_slice(&o.linger.unwrap_or(0).to_ne_bytes());
            return Ok(copy_out(&b, out));
        }
        (libc::IPPROTO_IP, libc::IP_TOS) => o.tos as i32,
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => o.nodelay as i32,
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => o.keepidle as i32,
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => o.keepintvl as i32,
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => o.keepcnt as i32,
        (libc::IPPROTO_TCP, libc::TCP_MAXSEG) => s.path_mtu().unwrap_or(2048) as i32,
        (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => {
            let mut name = [0u8; 16];
            name[..CONGESTION_NAME.len()].copy_from_slice(CONGESTION_NAME);
            return Ok(copy_out(&name, out));
        }
        (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => o.v6only as i32,
        (SOL_RDMA, RDMA_SQSIZE) => o.sq_size as i32,
        (SOL_RDMA, RDMA_RQSIZE) => o.rq_size as i32,
        (SOL_RDMA, RDMA_INLINE) => o.sq_inline as i32,
        (SOL_RDMA, RDMA_IOMAPSIZE) => o.iomap_size as i32,
        (SOL_RDMA, RDMA_ROUTE) => {
            // The route set with RDMA_ROUTE; the resolved one is not exported (ENOPROTOOPT).
            let r = s.route().ok_or_else(unsupported)?;
            if out.len() < r.len() {
                return Err(Error::InvalidArgument);
            }
            return Ok(copy_out(&r, out));
        }
        _ => return Err(unsupported()),
    };
    Ok(copy_out(&v.to_ne_bytes(), out))
}

/// Copies an option's value into the caller's room (cut to fit, as the kernel); returns the
/// length copied.
pub(crate) fn copy_out(v: &[u8], out: &mut [u8]) -> usize {
    let n = v.len().min(out.len());
    out[..n].copy_from_slice(&v[..n]);
    n
}

/// `rfcntl`: F_GETFL/F_SETFL (O_NONBLOCK) and F_GETFD/F_SETFD (FD_CLOEXEC).
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
        libc::F_GETFD => Ok(s.options().cloexec as i32),
        libc::F_SETFD => {
            s.set_options(|o| o.cloexec = arg as i32 & libc::FD_CLOEXEC != 0);
            Ok(0)
        }
        _ => Err(Error::InvalidArgument),
    }
}
