//! Opt-in diagnostics: with `RSOCKET_DEBUG` set (to anything but `0`), connection setup and
//! teardown events are written to stderr. Off by default; the check is one load per call.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

/// True when `RSOCKET_DEBUG` asks for diagnostics.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("RSOCKET_DEBUG").is_some_and(|v| v != "0"))
}

/// Seconds since the first diagnostic line of the process (to read a trace as a timeline).
pub fn elapsed() -> f64 {
    static T0: OnceLock<std::time::Instant> = OnceLock::new();
    T0.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
}

/// Writes one diagnostic line to stderr when [`enabled`]: the process and the thread's name
/// (`main` or `rsocket-service`, say), the seconds since its first line, the message.
macro_rules! trace {
    ($($arg:tt)*) => {
        if $crate::trace::enabled() {
            eprintln!(
                "rsocket-rs[{} {}] {:.6}: {}",
                std::process::id(),
                std::thread::current().name().unwrap_or("-"),
                $crate::trace::elapsed(),
                format_args!($($arg)*)
            );
        }
    };
}
pub(crate) use trace;
