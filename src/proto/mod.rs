//! The sans-IO protocol core: wire formats and state machines, no verbs, no threads, no clocks.
//!
//! Everything here is deterministic and unit-tested with simulated peers on the host.

pub mod iomap;
pub mod stream;
pub mod wire;
