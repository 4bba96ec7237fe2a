//! rsocket-rs: RDMA sockets ("rsockets") rebuilt in Rust, wire-compatible with librdmacm.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
pub mod proto;
