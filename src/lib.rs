//! rsocket-rs: RDMA sockets ("rsockets") rebuilt in Rust, wire-compatible with librdmacm.
//!
//! Layers, top to bottom: [`socket`] (descriptors, stream sockets, options, configuration) uses
//! the sans-IO protocol core [`proto`] to decide what to post and the [`verbs`] wrappers to post
//! it. The C ABI lives in the `capi` crate.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod error;
pub mod net;
pub mod proto;
pub mod socket;
pub mod trace;
pub mod verbs;

pub use error::{Error, Result};
