//! The sans-IO protocol core: wire formats and state machines, no verbs, no threads, no clocks.
//!
//! Everything here is deterministic and unit-tested with simulated peers on the host.

#![forbid(unsafe_code)]

pub mod dgram;
pub mod driver;
pub mod iomap;
#[cfg(test)]
pub(crate) mod memwire;
pub mod stream;
pub mod transport;
pub mod wire;
