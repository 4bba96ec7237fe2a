//! What ctest checks against the C headers: the constants and the calls of `capi`.
//!
//! The calls are declared as the C side sees them, so ctest checks that each one resolves to the
//! same symbol in C and in Rust, and the C types' layouts and the constants' values.
#![allow(missing_docs, non_camel_case_types)]

// ctest expands this file on its own, so it names no other crate: the C types are spelled out
// here with their Linux x86-64/AArch64 layouts, which ctest checks against the C compiler's.
pub use core::ffi::c_void;
pub type c_int = i32;
pub type c_short = i16;
pub type c_long = i64;
pub type c_char = i8;
pub type size_t = usize;
pub type ssize_t = isize;
pub type socklen_t = u32;
pub type sa_family_t = u16;
pub type nfds_t = u64;
pub type off_t = i64;
pub type time_t = i64;
pub type suseconds_t = i64;

#[repr(C)]
pub struct sockaddr {
    pub sa_family: sa_family_t,
    pub sa_data: [c_char; 14],
}

#[repr(C)]
pub struct iovec {
    pub iov_base: *mut c_void,
    pub iov_len: size_t,
}

#[repr(C)]
pub struct msghdr {
    pub msg_name: *mut c_void,
    pub msg_namelen: socklen_t,
    pub msg_iov: *mut iovec,
    pub msg_iovlen: size_t,
    pub msg_control: *mut c_void,
    pub msg_controllen: size_t,
    pub msg_flags: c_int,
}

#[repr(C)]
pub struct pollfd {
    pub fd: c_int,
    pub events: c_short,
    pub revents: c_short,
}

#[repr(C)]
pub struct timeval {
    pub tv_sec: time_t,
    pub tv_usec: suseconds_t,
}

#[repr(C)]
pub struct fd_set {
    pub fds_bits: [c_long; 16],
}

/// Values librdmacm 44's rsocket.h defines; tests/abi.rs also checks capi exports the same.
pub const SOL_RDMA: c_int = 0x10000;
pub const RDMA_SQSIZE: c_int = 0;
pub const RDMA_RQSIZE: c_int = 1;
pub const RDMA_INLINE: c_int = 2;
pub const RDMA_IOMAPSIZE: c_int = 3;
pub const RDMA_ROUTE: c_int = 4;

unsafe extern "C" {
    pub fn rsocket(domain: c_int, r#type: c_int, protocol: c_int) -> c_int;
    pub fn rbind(socket: c_int, addr: *const sockaddr, addrlen: socklen_t) -> c_int;
    pub fn rlisten(socket: c_int, backlog: c_int) -> c_int;
    pub fn raccept(socket: c_int, addr: *mut sockaddr, addrlen: *mut socklen_t) -> c_int;
    pub fn rconnect(socket: c_int, addr: *const sockaddr, addrlen: socklen_t) -> c_int;
    pub fn rshutdown(socket: c_int, how: c_int) -> c_int;
    pub fn rclose(socket: c_int) -> c_int;
    pub fn rrecv(socket: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t;
    pub fn rrecvfrom(
        socket: c_int,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
        src_addr: *mut sockaddr,
        addrlen: *mut socklen_t,
    ) -> ssize_t;
    pub fn rrecvmsg(socket: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t;
    pub fn rsend(socket: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t;
    pub fn rsendto(
        socket: c_int,
        buf: *const c_void,
        len: size_t,
        flags: c_int,
        dest_addr: *const sockaddr,
        addrlen: socklen_t,
    ) -> ssize_t;
    pub fn rsendmsg(socket: c_int, msg: *const msghdr, flags: c_int) -> ssize_t;
    pub fn rread(socket: c_int, buf: *mut c_void, count: size_t) -> ssize_t;
    pub fn rreadv(socket: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t;
    pub fn rwrite(socket: c_int, buf: *const c_void, count: size_t) -> ssize_t;
    pub fn rwritev(socket: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t;
    pub fn rpoll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int;
    pub fn rselect(
        nfds: c_int,
        readfds: *mut fd_set,
        writefds: *mut fd_set,
        exceptfds: *mut fd_set,
        timeout: *mut timeval,
    ) -> c_int;
    pub fn rgetpeername(socket: c_int, addr: *mut sockaddr, addrlen: *mut socklen_t) -> c_int;
    pub fn rgetsockname(socket: c_int, addr: *mut sockaddr, addrlen: *mut socklen_t) -> c_int;
    pub fn rsetsockopt(
        socket: c_int,
        level: c_int,
        optname: c_int,
        optval: *const c_void,
        optlen: socklen_t,
    ) -> c_int;
    pub fn rgetsockopt(
        socket: c_int,
        level: c_int,
        optname: c_int,
        optval: *mut c_void,
        optlen: *mut socklen_t,
    ) -> c_int;
    pub fn riomap(
        socket: c_int,
        buf: *mut c_void,
        len: size_t,
        prot: c_int,
        flags: c_int,
        offset: off_t,
    ) -> off_t;
    pub fn riounmap(socket: c_int, buf: *mut c_void, len: size_t) -> c_int;
    pub fn riowrite(
        socket: c_int,
        buf: *const c_void,
        count: size_t,
        offset: off_t,
        flags: c_int,
    ) -> size_t;
    pub fn rioread(
        socket: c_int,
        buf: *mut c_void,
        count: size_t,
        offset: off_t,
        flags: c_int,
    ) -> size_t;
}
