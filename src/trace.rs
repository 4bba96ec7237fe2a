//! Opt-in diagnostics: with `RSOCKET_DEBUG` set (to anything but `0`), connection setup and
//! teardown events and failed completions (the flushed ones after a connection failed left out)
//! are written to stderr; with `RSOCKET_DEBUG=2` also
//! what happens per call or message (gathered sends handed to the flusher, staged sends
//! posted, a socket's watch mode). Off by default; the check is one load per call.

#![forbid(unsafe_code)]

use std::sync::OnceLock;

/// The level `RSOCKET_DEBUG` asks for: 0 (unset or `0`), 2 (`2`) or 1 (anything else).
fn level() -> u8 {
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var_os("RSOCKET_DEBUG") {
        None => 0,
        Some(v) if v == "0" => 0,
        Some(v) if v == "2" => 2,
        Some(_) => 1,
    })
}

/// True when `RSOCKET_DEBUG` asks for diagnostics.
pub fn enabled() -> bool {
    level() >= 1
}

/// True when `RSOCKET_DEBUG=2` asks for the per-call diagnostics too.
pub fn verbose() -> bool {
    level() >= 2
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

/// [`trace!`] for what happens per call or message: only with `RSOCKET_DEBUG=2`.
macro_rules! trace_verbose {
    ($($arg:tt)*) => {
        if $crate::trace::verbose() {
            $crate::trace::trace!($($arg)*);
        }
    };
}
pub(crate) use trace_verbose;
