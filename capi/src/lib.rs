//! The C ABI of rsocket-rs: `librsocket-rs.so` / `librsocket-rs.a`, a drop-in replacement for
//! librdmacm's rsockets (`<rdma/rsocket.h>`, librdmacm 44).
//!
//! Every function is three steps: look up the descriptor, call the core, map the result. The
//! [`ffi!`] boundary catches panics (errno EIO) and maps [`rsocket::Error`] to errno, so nothing
//! unwinds into C. Pointer arguments are checked for NULL here; everything else is the core's job.
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(clippy::missing_safety_doc)] // the C header documents each call's contract

use std::os::raw::{c_int, c_long, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use libc::{
    fd_set, iovec, msghdr, nfds_t, off_t, pollfd, size_t, sockaddr, socklen_t, ssize_t, timeval,
};
use rsocket::Error;
use rsocket::socket::{self, DgramSocket, Socket, options};
use rsocket::verbs::{SockAddr, UserMemory};
use std::sync::Arc;

mod errno;

/// Level of the RDMA-specific socket options (`SOL_RDMA` in rsocket.h).
pub const SOL_RDMA: c_int = options::SOL_RDMA;
/// `RDMA_SQSIZE`: send queue size.
pub const RDMA_SQSIZE: c_int = options::RDMA_SQSIZE;
/// `RDMA_RQSIZE`: receive queue size.
pub const RDMA_RQSIZE: c_int = options::RDMA_RQSIZE;
/// `RDMA_INLINE`: inline data size.
pub const RDMA_INLINE: c_int = options::RDMA_INLINE;
/// `RDMA_IOMAPSIZE`: iomap entries offered to the peer.
pub const RDMA_IOMAPSIZE: c_int = options::RDMA_IOMAPSIZE;
/// `RDMA_ROUTE`: path record to use.
pub const RDMA_ROUTE: c_int = options::RDMA_ROUTE;

/// Runs `body`, turning errors and panics into `errno` plus the C error value `$fail`.
macro_rules! ffi {
    ($fail:expr, $body:expr) => {
        match catch_unwind(AssertUnwindSafe(|| -> Result<_, Error> { $body })) {
            Ok(Ok(v)) => v,
            // The answer of every busy-polling call that finds nothing. It owns nothing: not
            // handed to the (out-of-line) drop of a general error.
            Ok(Err(e @ Error::WouldBlock)) => {
                std::mem::forget(e);
                errno::set_raw(libc::EAGAIN);
                $fail
            }
            Ok(Err(e)) => {
                errno::set(&e);
                $fail
            }
            Err(_) => {
                errno::set_raw(libc::EIO);
                $fail
            }
        }
    };
}

fn null_check<T>(p: *const T) -> Result<(), Error> {
    if p.is_null() {
        Err(Error::Os(std::io::Error::from_raw_os_error(libc::EFAULT)))
    } else {
        Ok(())
    }
}

/// Builds a byte slice from a C buffer; an empty one for `len == 0` whatever the pointer.
unsafe fn buf<'a>(p: *const c_void, len: size_t) -> Result<&'a [u8], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    null_check(p)?;
    // SAFETY: the caller passes a buffer of len readable bytes (C contract of rsend & co.).
    Ok(unsafe { std::slice::from_raw_parts(p as *const u8, len) })
}

/// Mutable counterpart of [`buf`].
unsafe fn buf_mut<'a>(p: *mut c_void, len: size_t) -> Result<&'a mut [u8], Error> {
    if len == 0 {
        return Ok(&mut []);
    }
    null_check(p)?;
    // SAFETY: the caller passes a buffer of len writable bytes (C contract of rrecv & co.).
    Ok(unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) })
}

unsafe fn iovecs<'a>(iov: *const iovec, n: c_int) -> Result<&'a [iovec], Error> {
    if !(0..=libc::UIO_MAXIOV).contains(&n) {
        return Err(Error::InvalidArgument);
    }
    if n == 0 {
        return Ok(&[]);
    }
    null_check(iov)?;
    // SAFETY: the caller passes n iovecs.
    Ok(unsafe { std::slice::from_raw_parts(iov, n as usize) })
}

/// The datagram socket behind `socket`, if it names one (None for a stream socket; EBADF for
/// no socket).
fn dgram(socket: c_int) -> Result<Option<Arc<DgramSocket>>, Error> {
    Ok(match socket::lookup_any(socket)? {
        Socket::Dgram(d) => Some(d),
        Socket::Stream(_) => None,
    })
}

/// Creates an rsocket. See rsocket(7); AF_INET/AF_INET6, SOCK_STREAM or SOCK_DGRAM.
#[unsafe(no_mangle)]
pub extern "C" fn rsocket(domain: c_int, r#type: c_int, protocol: c_int) -> c_int {
    ffi!(-1, socket::socket(domain, r#type, protocol))
}

/// Binds an rsocket to a local address.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rbind(socket: c_int, addr: *const sockaddr, addrlen: socklen_t) -> c_int {
    ffi!(-1, {
        // SAFETY: C contract: addr points to addrlen bytes.
        let a = unsafe { SockAddr::from_raw(addr, addrlen) }?;
        match socket::lookup_any(socket)? {
            Socket::Stream(s) => s.bind(&a),
            Socket::Dgram(d) => d.bind(&a),
        }
        .map(|()| 0)
    })
}

/// Listens for connections.
#[unsafe(no_mangle)]
pub extern "C" fn rlisten(socket: c_int, backlog: c_int) -> c_int {
    ffi!(-1, socket::lookup(socket)?.listen(backlog).map(|()| 0))
}

/// Accepts a connection; fills `addr`/`addrlen` with the peer's address when both are given.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn raccept(
    socket: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> c_int {
    ffi!(-1, {
        let s = socket::lookup(socket)?.accept()?;
        if !addr.is_null() && !addrlen.is_null() {
            // SAFETY: C contract: addr has *addrlen writable bytes.
            unsafe { s.peer_addr()?.copy_out(addr, addrlen) };
        }
        Ok(socket::insert(s))
    })
}

/// Connects to a listening rsocket.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rconnect(
    socket: c_int,
    addr: *const sockaddr,
    addrlen: socklen_t,
) -> c_int {
    ffi!(-1, {
        if let Some(d) = dgram(socket)? {
            // AF_UNSPEC (dissolving a datagram socket's association) may be short.
            // SAFETY: C contract: addr points to addrlen bytes.
            let a = unsafe { dgram_addr(addr, addrlen) }?;
            return d.connect(&a).map(|()| 0);
        }
        let s = socket::lookup(socket)?;
        // SAFETY: C contract: addr points to addrlen bytes.
        let a = unsafe { SockAddr::from_raw(addr, addrlen) }?;
        s.connect(&a).map(|()| 0)
    })
}

/// A datagram socket's connect address: AF_UNSPEC as the kernel takes it (any length of at
/// least the family), anything else as for a stream.
///
/// # Safety
/// `addr` points to `len` readable bytes.
unsafe fn dgram_addr(addr: *const sockaddr, len: socklen_t) -> Result<SockAddr, Error> {
    null_check(addr)?;
    if len as usize >= std::mem::size_of::<libc::sa_family_t>() {
        // SAFETY: at least the family is readable.
        let family = unsafe { std::ptr::read_unaligned(addr as *const libc::sa_family_t) };
        if family as c_int == libc::AF_UNSPEC {
            // SAFETY: zeroed storage is a valid AF_UNSPEC address.
            let storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            return Ok(SockAddr {
                storage,
                len: std::mem::size_of::<libc::sa_family_t>() as socklen_t,
            });
        }
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { SockAddr::from_raw(addr, len) }?)
}

/// Shuts down part of a connection (SHUT_RD, SHUT_WR, SHUT_RDWR).
#[unsafe(no_mangle)]
pub extern "C" fn rshutdown(socket: c_int, how: c_int) -> c_int {
    ffi!(
        -1,
        match socket::lookup_any(socket)? {
            Socket::Stream(s) => s.shutdown(how),
            Socket::Dgram(d) => d.shutdown(how),
        }
        .map(|()| 0)
    )
}

/// Closes an rsocket. Unlike librdmacm (which returns EBADF), an unknown descriptor gives -1
/// with errno EBADF, as close(2) does.
#[unsafe(no_mangle)]
pub extern "C" fn rclose(socket: c_int) -> c_int {
    ffi!(-1, socket::close(socket).map(|()| 0))
}

/// Receives data. 0 means the peer shut down its sending side.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rrecv(
    socket: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
) -> ssize_t {
    ffi!(-1, {
        // SAFETY: C contract.
        let b = unsafe { buf_mut(buf, len) }?;
        // One look-up: this is the call a busy-polling program makes most.
        match socket::lookup_any(socket)? {
            Socket::Dgram(d) => dgram_recv(&d, b, flags).map(|(n, _)| n),
            Socket::Stream(s) => s.recv(b, flags).map(|n| n as ssize_t),
        }
    })
}

/// Receives data; on a connected stream `src_addr` gets the peer's address.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rrecvfrom(
    socket: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    src_addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> ssize_t {
    ffi!(-1, {
        // SAFETY: C contract.
        let b = unsafe { buf_mut(buf, len) }?;
        if let Some(d) = dgram(socket)? {
            let (n, r) = dgram_recv(&d, b, flags)?;
            if !src_addr.is_null() && !addrlen.is_null() {
                // SAFETY: C contract: src_addr has *addrlen writable bytes.
                unsafe { SockAddr::from(r.src).copy_out(src_addr, addrlen) };
            }
            return Ok(n);
        }
        let s = socket::lookup(socket)?;
        let n = s.recv(b, flags)?;
        if !src_addr.is_null() && !addrlen.is_null() {
            // SAFETY: C contract: src_addr has *addrlen writable bytes.
            unsafe { s.peer_addr()?.copy_out(src_addr, addrlen) };
        }
        Ok(n as ssize_t)
    })
}

/// Receives into several buffers, filling each in turn.
fn recv_iov(socket: c_int, iov: &[iovec], flags: c_int) -> Result<ssize_t, Error> {
    if let Some(d) = dgram(socket)? {
        return dgram_recv_iov(&d, iov, flags).map(|(n, _)| n);
    }
    let s = socket::lookup(socket)?;
    let mut total = 0usize;
    for v in iov {
        // SAFETY: C contract: each iovec describes writable memory.
        let b = unsafe { buf_mut(v.iov_base, v.iov_len) }?;
        if b.is_empty() {
            continue;
        }
        // After the first bytes, only take what is already there (like readv on a socket),
        // unless MSG_WAITALL asks for every iovec to be filled.
        let f = if total > 0 && flags & libc::MSG_WAITALL == 0 {
            flags | libc::MSG_DONTWAIT
        } else {
            flags
        };
        match s.recv(b, f) {
            Ok(n) => {
                total += n;
                if n < b.len() && flags & libc::MSG_WAITALL == 0 {
                    break;
                }
                if n == 0 {
                    break;
                }
            }
            Err(_) if total > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total as ssize_t)
}

/// Sends from several buffers in order.
/// Vectored sends up to this size leave as one send of their bytes gathered (see `send_iov`).
const GATHER_IOV_MAX: usize = 64 * 1024;

fn send_iov(socket: c_int, iov: &[iovec], flags: c_int) -> Result<ssize_t, Error> {
    send_iov_to(socket, iov, flags, None)
}

/// A datagram socket's receive: one datagram; MSG_TRUNC returns its full length.
fn dgram_recv(
    d: &DgramSocket,
    b: &mut [u8],
    flags: c_int,
) -> Result<(ssize_t, socket::dgram::Received), Error> {
    let r = d.recv_from(b, flags)?;
    let n = if flags & libc::MSG_TRUNC != 0 {
        r.len
    } else {
        r.copied
    };
    Ok((n as ssize_t, r))
}

/// A datagram socket's vectored receive: one datagram spread over the buffers.
fn dgram_recv_iov(
    d: &DgramSocket,
    iov: &[iovec],
    flags: c_int,
) -> Result<(ssize_t, socket::dgram::Received), Error> {
    let cap = iov.iter().map(|v| v.iov_len).sum::<usize>().min(1 << 16);
    let mut all = vec![0u8; cap];
    let (n, r) = dgram_recv(d, &mut all, flags)?;
    let mut at = 0;
    for v in iov {
        if at >= r.copied {
            break;
        }
        // SAFETY: C contract: each iovec describes writable memory.
        let b = unsafe { buf_mut(v.iov_base, v.iov_len) }?;
        let k = b.len().min(r.copied - at);
        b[..k].copy_from_slice(&all[at..at + k]);
        at += k;
    }
    Ok((n, r))
}

/// Sends from several buffers in order (one datagram, to `to` if given, on a datagram socket).
fn send_iov_to(
    socket: c_int,
    iov: &[iovec],
    flags: c_int,
    to: Option<&SockAddr>,
) -> Result<ssize_t, Error> {
    if let Some(d) = dgram(socket)? {
        let mut all = Vec::new();
        for v in iov {
            // SAFETY: C contract: each iovec describes readable memory.
            all.extend_from_slice(unsafe { buf(v.iov_base, v.iov_len) }?);
            if all.len() > 1 << 16 {
                return Err(Error::Os(std::io::Error::from_raw_os_error(libc::EMSGSIZE)));
            }
        }
        return Ok(d.send_to(&all, flags, to)? as ssize_t);
    }
    let s = socket::lookup(socket)?;
    // A message made of several buffers (a header, a value, a trailer: memcached's replies) is
    // one message: sent buffer by buffer, the later ones are small sends right after a write,
    // which the library gathers for the service thread to post once that write completes, a
    // wake-up and a delay on every reply. Up to GATHER_IOV_MAX the bytes are copied together
    // and sent at once (MSG_ZEROCOPY sends from the caller's memory, so not those).
    let len = iov
        .iter()
        .try_fold(0usize, |a, v| a.checked_add(v.iov_len))
        .unwrap_or(usize::MAX);
    if iov.len() > 1 && len <= GATHER_IOV_MAX && flags & libc::MSG_ZEROCOPY == 0 {
        let mut all = Vec::with_capacity(len);
        for v in iov {
            // SAFETY: C contract: each iovec describes readable memory.
            all.extend_from_slice(unsafe { buf(v.iov_base, v.iov_len) }?);
        }
        return Ok(s.send(&all, flags)? as ssize_t);
    }
    let mut total = 0usize;
    for v in iov {
        // SAFETY: C contract: each iovec describes readable memory.
        let b = unsafe { buf(v.iov_base, v.iov_len) }?;
        if b.is_empty() {
            continue;
        }
        match s.send(b, flags) {
            Ok(n) => {
                total += n;
                if n < b.len() {
                    break;
                }
            }
            Err(_) if total > 0 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total as ssize_t)
}

/// Receives into the message's iovecs (all of them, unlike librdmacm which fills only the first).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rrecvmsg(socket: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    ffi!(-1, {
        null_check(msg)?;
        // SAFETY: non-null msghdr from the caller.
        let m = unsafe { &mut *msg };
        if flags & libc::MSG_ERRQUEUE != 0 {
            // SAFETY: the caller's msghdr and its control buffer.
            return unsafe { zero_copy_notice(socket, m) };
        }
        // SAFETY: C contract.
        let iov = unsafe { iovecs(m.msg_iov, m.msg_iovlen as c_int) }?;
        if let Some(d) = dgram(socket)? {
            let (n, r) = dgram_recv_iov(&d, iov, flags)?;
            m.msg_flags = if r.copied < r.len { libc::MSG_TRUNC } else { 0 };
            // SAFETY: the caller's msghdr and its control buffer.
            unsafe { drops_notice(m, r.drops) };
            if !m.msg_name.is_null() {
                let mut len = m.msg_namelen;
                // SAFETY: C contract: msg_name has msg_namelen writable bytes.
                unsafe { SockAddr::from(r.src).copy_out(m.msg_name as *mut sockaddr, &mut len) };
                m.msg_namelen = len;
            }
            return Ok(n);
        }
        let n = recv_iov(socket, iov, flags)?;
        m.msg_flags = 0;
        m.msg_controllen = 0;
        Ok(n)
    })
}

/// SO_RXQ_OVFL's control message (SOL_SOCKET, SO_RXQ_OVFL, a u32: the datagrams the socket
/// dropped so far), as a kernel UDP socket gives it; MSG_CTRUNC when it does not fit.
///
/// # Safety
/// `m` is the caller's msghdr; its control buffer is `msg_controllen` writable bytes.
unsafe fn drops_notice(m: &mut msghdr, drops: Option<u32>) {
    let Some(count) = drops else {
        m.msg_controllen = 0;
        return;
    };
    let len = std::mem::size_of::<u32>() as u32;
    // SAFETY: pure size computation.
    let space = unsafe { libc::CMSG_SPACE(len) } as usize;
    // msg_controllen is usize in glibc, u32 elsewhere: the cast is needed there.
    #[allow(clippy::unnecessary_cast)]
    let controllen = m.msg_controllen as usize;
    if m.msg_control.is_null() || controllen < space {
        m.msg_flags |= libc::MSG_CTRUNC;
        m.msg_controllen = 0;
        return;
    }
    // SAFETY: the control buffer holds one cmsg of `space` bytes (checked above).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(m);
        (*c).cmsg_len = libc::CMSG_LEN(len) as _;
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SO_RXQ_OVFL;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u32, count);
    }
    m.msg_controllen = space as _;
}

/// `<linux/errqueue.h>`: the notice comes from MSG_ZEROCOPY.
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `<linux/errqueue.h>`: the data was copied after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// rrecvmsg with MSG_ERRQUEUE: one MSG_ZEROCOPY notice as a kernel socket gives it, a
/// `sock_extended_err` in an IP_RECVERR (IPV6_RECVERR on AF_INET6) control message; 0 bytes.
///
/// # Safety
/// `m` is the caller's msghdr; its control buffer is `msg_controllen` writable bytes.
unsafe fn zero_copy_notice(socket: c_int, m: &mut msghdr) -> Result<ssize_t, Error> {
    let s = socket::lookup(socket)?;
    let n = s.zero_copy_notice()?;
    let err = libc::sock_extended_err {
        ee_errno: 0,
        ee_origin: SO_EE_ORIGIN_ZEROCOPY,
        ee_type: 0,
        ee_code: if n.copied {
            SO_EE_CODE_ZEROCOPY_COPIED
        } else {
            0
        },
        ee_pad: 0,
        ee_info: n.lo,
        ee_data: n.hi,
    };
    let len = std::mem::size_of::<libc::sock_extended_err>() as u32;
    // SAFETY: pure size computation.
    let space = unsafe { libc::CMSG_SPACE(len) } as usize;
    m.msg_flags = libc::MSG_ERRQUEUE;
    // msg_controllen is usize in glibc, u32 elsewhere: the cast is needed there.
    #[allow(clippy::unnecessary_cast)]
    let controllen = m.msg_controllen as usize;
    if m.msg_control.is_null() || controllen < space {
        m.msg_flags |= libc::MSG_CTRUNC;
        m.msg_controllen = 0;
        return Ok(0);
    }
    // SAFETY: the control buffer holds at least one cmsg of `space` bytes (checked above).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(m);
        (*c).cmsg_len = libc::CMSG_LEN(len) as _;
        (*c).cmsg_level = if s.domain() == libc::AF_INET6 {
            libc::SOL_IPV6
        } else {
            libc::SOL_IP
        };
        (*c).cmsg_type = if s.domain() == libc::AF_INET6 {
            libc::IPV6_RECVERR
        } else {
            libc::IP_RECVERR
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::sock_extended_err, err);
    }
    m.msg_controllen = space as _;
    Ok(0)
}

/// Sends data.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rsend(
    socket: c_int,
    buf: *const c_void,
    len: size_t,
    flags: c_int,
) -> ssize_t {
    ffi!(-1, {
        // SAFETY: C contract.
        let b = unsafe { self::buf(buf, len) }?;
        match socket::lookup_any(socket)? {
            Socket::Dgram(d) => d.send_to(b, flags, None).map(|n| n as ssize_t),
            Socket::Stream(s) => s.send(b, flags).map(|n| n as ssize_t),
        }
    })
}

/// Sends data: one datagram to `dest_addr` on a datagram socket (NULL: to its peer); on a
/// stream the destination is ignored, as upstream.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rsendto(
    socket: c_int,
    buf: *const c_void,
    len: size_t,
    flags: c_int,
    dest_addr: *const sockaddr,
    addrlen: socklen_t,
) -> ssize_t {
    ffi!(-1, {
        let Some(d) = dgram(socket)? else {
            // SAFETY: same contract as rsend.
            return Ok(unsafe { rsend(socket, buf, len, flags) });
        };
        // SAFETY: C contract.
        let b = unsafe { self::buf(buf, len) }?;
        let to = if dest_addr.is_null() {
            None
        } else {
            // SAFETY: C contract: dest_addr points to addrlen bytes.
            Some(unsafe { SockAddr::from_raw(dest_addr, addrlen) }?)
        };
        d.send_to(b, flags, to.as_ref()).map(|n| n as ssize_t)
    })
}

/// Sends the message's iovecs in order.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rsendmsg(socket: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    ffi!(-1, {
        null_check(msg)?;
        // SAFETY: non-null msghdr from the caller.
        let m = unsafe { &*msg };
        // SAFETY: C contract.
        let iov = unsafe { iovecs(m.msg_iov, m.msg_iovlen as c_int) }?;
        // The destination counts on a datagram socket only (a stream ignores it).
        let to = if m.msg_name.is_null() || m.msg_namelen == 0 || dgram(socket)?.is_none() {
            None
        } else {
            // SAFETY: C contract: msg_name points to msg_namelen bytes.
            Some(unsafe { SockAddr::from_raw(m.msg_name as *const sockaddr, m.msg_namelen) }?)
        };
        send_iov_to(socket, iov, flags, to.as_ref())
    })
}

/// read(2) on an rsocket.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rread(socket: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    // SAFETY: same contract as rrecv.
    unsafe { rrecv(socket, buf, count, 0) }
}

/// readv(2) on an rsocket.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rreadv(socket: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t {
    ffi!(-1, {
        // SAFETY: C contract.
        let iov = unsafe { iovecs(iov, iovcnt) }?;
        recv_iov(socket, iov, 0)
    })
}

/// write(2) on an rsocket.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rwrite(socket: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    // SAFETY: same contract as rsend.
    unsafe { rsend(socket, buf, count, 0) }
}

/// writev(2) on an rsocket.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rwritev(socket: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t {
    ffi!(-1, {
        // SAFETY: C contract.
        let iov = unsafe { iovecs(iov, iovcnt) }?;
        send_iov(socket, iov, 0)
    })
}

/// poll(2) over rsockets and regular descriptors together: POLLIN/POLLOUT/POLLHUP/POLLERR mean
/// what they mean for kernel TCP sockets. Busy-polls for `polling_time` µs, then sleeps.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpoll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int {
    ffi!(-1, {
        if nfds > 1 << 20 {
            return Err(Error::InvalidArgument);
        }
        let fds: &mut [pollfd] = if nfds == 0 {
            &mut []
        } else {
            null_check(fds)?;
            // SAFETY: C contract: fds points to nfds pollfd entries.
            unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) }
        };
        socket::poll::poll(fds, timeout).map(|n| n as c_int)
    })
}

/// select(2) over rsockets and regular descriptors (implemented with rpoll).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rselect(
    nfds: c_int,
    readfds: *mut fd_set,
    writefds: *mut fd_set,
    exceptfds: *mut fd_set,
    timeout: *mut timeval,
) -> c_int {
    ffi!(-1, {
        if !(0..=libc::FD_SETSIZE as c_int).contains(&nfds) {
            return Err(Error::InvalidArgument);
        }
        // SAFETY: FD_ISSET reads a caller-provided set (NULL checked) for fd < FD_SETSIZE.
        let isset = |set: *mut fd_set, fd| !set.is_null() && unsafe { libc::FD_ISSET(fd, set) };
        let mut pfds = Vec::new();
        for fd in 0..nfds {
            let mut events = 0;
            if isset(readfds, fd) {
                events |= libc::POLLIN;
            }
            if isset(writefds, fd) {
                events |= libc::POLLOUT;
            }
            if isset(exceptfds, fd) {
                events |= libc::POLLPRI;
            }
            if events != 0 {
                pfds.push(pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            }
        }
        let ms = if timeout.is_null() {
            -1
        } else {
            // SAFETY: non-null timeval from the caller.
            let t = unsafe { &*timeout };
            if t.tv_sec < 0 || t.tv_usec < 0 {
                return Err(Error::InvalidArgument);
            }
            (t.tv_sec.saturating_mul(1000) + (t.tv_usec + 999) / 1000).min(i32::MAX as i64) as i32
        };
        socket::poll::poll(&mut pfds, ms)?;
        for set in [readfds, writefds, exceptfds] {
            if !set.is_null() {
                // SAFETY: caller-provided set, non-null.
                unsafe { libc::FD_ZERO(set) };
            }
        }
        let mut n = 0;
        for p in &pfds {
            let r = p.revents;
            // SAFETY: p.fd < nfds <= FD_SETSIZE and the sets are non-null when used.
            unsafe {
                if !readfds.is_null()
                    && p.events & libc::POLLIN != 0
                    && r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                {
                    libc::FD_SET(p.fd, readfds);
                    n += 1;
                }
                if !writefds.is_null()
                    && p.events & libc::POLLOUT != 0
                    && r & (libc::POLLOUT | libc::POLLERR) != 0
                {
                    libc::FD_SET(p.fd, writefds);
                    n += 1;
                }
                if !exceptfds.is_null() && p.events & libc::POLLPRI != 0 && r & libc::POLLPRI != 0 {
                    libc::FD_SET(p.fd, exceptfds);
                    n += 1;
                }
            }
        }
        Ok(n)
    })
}

/// Copies an address of the socket (`which` picks it) out with socket semantics.
unsafe fn address_out(
    socket: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
    which: fn(&Socket) -> Result<SockAddr, Error>,
) -> Result<c_int, Error> {
    null_check(addr)?;
    null_check(addrlen)?;
    let a = which(&socket::lookup_any(socket)?)?;
    // SAFETY: C contract: addr has *addrlen writable bytes.
    unsafe { a.copy_out(addr, addrlen) };
    Ok(0)
}

/// The peer's address.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rgetpeername(
    socket: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> c_int {
    // SAFETY: same contract as getpeername(2).
    ffi!(-1, unsafe {
        address_out(socket, addr, addrlen, |s| match s {
            Socket::Stream(s) => s.peer_addr(),
            Socket::Dgram(d) => d.peer_addr(),
        })
    })
}

/// The local address.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rgetsockname(
    socket: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> c_int {
    // SAFETY: same contract as getsockname(2).
    ffi!(-1, unsafe {
        address_out(socket, addr, addrlen, |s| match s {
            Socket::Stream(s) => s.local_addr(),
            Socket::Dgram(d) => d.local_addr(),
        })
    })
}

/// Sets a socket option (SOL_SOCKET, IPPROTO_TCP, SOL_RDMA). Unknown options: ENOPROTOOPT.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rsetsockopt(
    socket: c_int,
    level: c_int,
    optname: c_int,
    optval: *const c_void,
    optlen: socklen_t,
) -> c_int {
    ffi!(-1, {
        // SAFETY: C contract: optval has optlen bytes.
        let b = unsafe { buf(optval, optlen as size_t) }?;
        if let Some(d) = dgram(socket)? {
            return d.set_option(level, optname, b).map(|()| 0);
        }
        let s = socket::lookup(socket)?;
        options::set(&s, level, optname, b).map(|()| 0)
    })
}

/// Reads a socket option.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rgetsockopt(
    socket: c_int,
    level: c_int,
    optname: c_int,
    optval: *mut c_void,
    optlen: *mut socklen_t,
) -> c_int {
    ffi!(-1, {
        null_check(optval)?;
        null_check(optlen)?;
        // SAFETY: non-null, caller-owned; optval has *optlen writable bytes.
        let out = unsafe { buf_mut(optval, *optlen as size_t) }?;
        let n = match socket::lookup_any(socket)? {
            Socket::Stream(s) => options::get(&s, level, optname, out)?,
            Socket::Dgram(d) => d.get_option(level, optname, out)?,
        };
        // SAFETY: non-null, caller-owned.
        unsafe { *optlen = n as socklen_t };
        Ok(0)
    })
}

/// fcntl(2) on an rsocket: F_GETFL/F_SETFL (O_NONBLOCK), F_GETFD/F_SETFD.
///
/// Declared variadic in rsocket.h (`int rfcntl(int socket, int cmd, ...)`). On the System V
/// x86-64 and AArch64 Linux ABIs a variadic integer/pointer argument travels in the same
/// register as a fixed one, so this definition receives it; `c_long` covers both.
#[unsafe(no_mangle)]
pub extern "C" fn rfcntl(socket: c_int, cmd: c_int, arg: c_long) -> c_int {
    ffi!(-1, {
        // c_long is i32 on 32-bit targets: the cast is needed there.
        #[allow(clippy::unnecessary_cast)]
        let arg = arg as i64;
        match socket::lookup_any(socket)? {
            Socket::Stream(s) => options::fcntl(&s, cmd, arg),
            Socket::Dgram(d) => d.fcntl(cmd, arg),
        }
    })
}

/// Maps `len` bytes at `buf` into the socket's riomap offset space at `offset` (-1: the
/// buffer's address) and returns that offset, or -1 with errno.
///
/// `prot`: PROT_WRITE offers the buffer to the peer's riowrite (as librdmacm does); PROT_READ,
/// our extension, offers it to the peer's rioread (rsocket-rs peers only); PROT_NONE registers
/// it locally only (zero-copy source or destination). The peer offers RDMA_IOMAPSIZE entries:
/// set that option before connecting. The buffer must stay valid until riounmap or rclose, and
/// the peer may write (PROT_WRITE) or read (PROT_READ) it at any time meanwhile.
/// Errors: EBADF, EINVAL (bad prot or length, not connected, overlapping window), ENOMEM (no
/// free entry), EOPNOTSUPP (PROT_READ alone towards a librdmacm peer).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn riomap(
    socket: c_int,
    buf: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    offset: off_t,
) -> off_t {
    let _ = flags;
    ffi!(-1, {
        let s = socket::lookup(socket)?;
        null_check(buf)?;
        // SAFETY: riomap's contract: the application keeps the buffer valid until riounmap or
        // rclose and lets the device access it meanwhile.
        let mem = unsafe { UserMemory::new(buf as *mut u8, len) };
        // off_t is i32 on some 32-bit targets: the cast is needed there.
        #[allow(clippy::unnecessary_cast)]
        s.iomap(mem, prot, offset as i64).map(|o| o as off_t)
    })
}

/// Unmaps the buffer mapped with riomap at exactly (`buf`, `len`); a window offered to the
/// peer is withdrawn. 0, or -1 with errno (EBADF, EINVAL: no such mapping).
#[unsafe(no_mangle)]
pub extern "C" fn riounmap(socket: c_int, buf: *mut c_void, len: size_t) -> c_int {
    ffi!(-1, {
        let s = socket::lookup(socket)?;
        s.iounmap(buf as u64, len).map(|()| 0)
    })
}

/// RDMA-writes `count` bytes from `buf` into the window the peer mapped at `offset`. Returns
/// the bytes written, or (size_t)-1 with errno: EINVAL (the range is not inside one window the
/// peer mapped), EACCES (mapped without PROT_WRITE), EAGAIN, EPIPE, ECONNRESET. Nothing is
/// written when the range is refused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn riowrite(
    socket: c_int,
    buf: *const c_void,
    count: size_t,
    offset: off_t,
    flags: c_int,
) -> size_t {
    ffi!(usize::MAX, {
        let s = socket::lookup(socket)?;
        if offset < 0 {
            return Err(Error::InvalidArgument);
        }
        // SAFETY: C contract.
        let b = unsafe { self::buf(buf, count) }?;
        s.iowrite(b, offset as u64, flags)
    })
}

/// Extension (not in librdmacm): RDMA-reads `count` bytes from the window the peer mapped with
/// PROT_READ at `offset` into `buf`, returning once they are there. Returns the bytes read, or
/// (size_t)-1 with errno: EINVAL (the range is not inside one window the peer mapped), EACCES
/// (mapped without PROT_READ), EOPNOTSUPP (the peer is librdmacm, which cannot grant reads),
/// ECONNRESET. Nothing is read when the range is refused.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rioread(
    socket: c_int,
    buf: *mut c_void,
    count: size_t,
    offset: off_t,
    flags: c_int,
) -> size_t {
    ffi!(usize::MAX, {
        let s = socket::lookup(socket)?;
        if offset < 0 {
            return Err(Error::InvalidArgument);
        }
        if count > 0 {
            null_check(buf)?;
        }
        // SAFETY: the caller's buffer of `count` bytes, written only by the device and only
        // until this call returns (the registration ends first).
        let mem = unsafe { UserMemory::new(buf as *mut u8, count) };
        s.ioread(mem, offset as u64, flags)
    })
}
