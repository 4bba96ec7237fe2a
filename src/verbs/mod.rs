//! Thin owning wrappers over libibverbs and librdmacm (through `rdma-sys`).
//!
//! Every raw pointer and every `unsafe` call of the crate's RDMA side lives here. Each wrapper owns
//! one object and releases it on drop; the socket layer composes them in an order that drops
//! dependants first (QP before CQ and MRs, MRs before the PD, the CM id before its channel).

use std::io;
use std::ptr::NonNull;

/// `syscall!`-style helper: librdmacm/libibverbs calls return -1 (or non-zero) and set errno.
fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else if ret > 0 {
        // ibv_* verbs return a positive errno instead of setting errno.
        Err(io::Error::from_raw_os_error(ret))
    } else {
        Err(last_error())
    }
}

fn last_error() -> io::Error {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(0) | None => io::Error::from_raw_os_error(libc::EIO),
        _ => e,
    }
}

fn non_null<T>(p: *mut T) -> io::Result<NonNull<T>> {
    NonNull::new(p).ok_or_else(|| {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // No RDMA device or module: report it as such, not as "success".
            Some(0) | None => io::Error::from_raw_os_error(libc::ENODEV),
            _ => e,
        }
    })
}

mod addr;
mod cm;
mod endpoint;
mod guarded;
pub mod os;
pub mod ready;
mod ud;
mod udp;

pub use addr::SockAddr;
pub use cm::contexts::credentials_changed;
pub use cm::{CmEvent, CmEventKind, CmId, CmOption, ConnParam, DeviceInfo, EventChannel};
pub use endpoint::*;
pub use os::{
    Timer, Waker, poll_fds, poll_fds_for, pollin, raise_sigpipe, run_at_exit, set_nonblocking,
    ticks, ticks_per_us, wait_of_ticks,
};
pub use ready::ReadyFd;
pub use ud::{Ah, AhAttr, PortInfo, resolve_ah_attr, ud_device_present, wait_event};
pub use udp::{UdpSock, source_for};
