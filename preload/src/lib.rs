//! `librspreload-rs.so`: unmodified socket programs over rsocket-rs (`LD_PRELOAD`, or the
//! `rsocket-run` launcher).
//!
//! It interposes the C library's socket and descriptor calls. TCP sockets become rsockets
//! where RDMA can carry them and stay kernel sockets everywhere else (see `convert` for the
//! rules: connects that fall back to kernel TCP, listeners that take RDMA and TCP clients at
//! once, fork). A converted socket's descriptor is a real descriptor that shows the rsocket's
//! readiness, so the kernel's own poll, select and epoll (level and edge triggered, ONESHOT,
//! nested sets, kernel descriptors in the same set) serve it, with no monitor thread. The
//! epoll calls are interposed for speed only: a set that holds an rsocket also sleeps on its
//! completion channel, so that a message wakes the program once (see `hook`); poll and select
//! are interposed to keep that right. `dup`, `fcntl(F_DUPFD)`, `close` and `exec` keep the
//! table right. Anything that is not a converted socket goes to the C library unchanged.
//!
//! Every exported function catches panics (errno EIO, the C error value).
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(clippy::missing_safety_doc)] // each function's contract is the libc one it replaces

mod calls;
mod convert;
mod hook;
mod policy;
mod real;
mod table;

/// `RSOCKET_PRELOAD_DEBUG=1`: a line on stderr for every conversion decision.
macro_rules! trace {
    ($($a:tt)*) => {
        if $crate::debug() {
            eprintln!("rspreload[{}]: {}", std::process::id(), format_args!($($a)*));
        }
    };
}
pub(crate) use trace;

/// Whether `RSOCKET_DEBUG` asks for trace lines.
pub(crate) fn debug() -> bool {
    static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        std::env::var("RSOCKET_PRELOAD_DEBUG").is_ok_and(|v| v != "0" && !v.is_empty())
    })
}

extern "C" fn at_fork_prepare() {
    convert::fork_prepare();
}

extern "C" fn at_fork_parent() {
    convert::fork_parent();
}

extern "C" fn at_fork_child() {
    convert::fork_child();
}

extern "C" fn init() {
    // SAFETY: registers three handlers with no arguments, as pthread_atfork takes them.
    unsafe {
        libc::pthread_atfork(
            Some(at_fork_prepare),
            Some(at_fork_parent),
            Some(at_fork_child),
        )
    };
}

/// Runs [`init`] when the library is loaded.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = init;
