//! Opt-in diagnostics: with `RSOCKET_DEBUG` set (to anything but `0`), connection setup and
//! teardown events are written to stderr. Off by default; the check is one load per call.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

/// True when `RSOCKET_DEBUG` asks for diagnostics.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("RSOCKET_DEBUG").is_some_and(|v| v != "0"))
}

/// Writes one diagnostic line to stderr when [`enabled`].
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::trace::enabled() {
            eprintln!("rsocket-rs[{}]: {}", std::process::id(), format_args!($($arg)*));
        }
    };
}
pub(crate) use trace;
