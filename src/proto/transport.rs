//! The transport interface: what the stream driver ([`super::driver`]) needs from a reliable
//! connected queue pair and its registered memory. The verbs endpoint implements it for the
//! library (`socket::stream::endpoint`); an in-memory wire implements it for the host tests, so
//! both run the same posting code.
//!
//! Nothing here knows the rsocket wire: work-request ids, immediate values and buffer layouts
//! are chosen by the driver and the core and passed through unchanged.

use std::io;

/// Where the bytes of a posted write come from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a, M, S> {
    /// No bytes (a 0-byte write: a message alone, or a keepalive probe).
    Empty,
    /// Copied at the post (must fit the queue pair's inline size).
    Inline(&'a [u8]),
    /// Up to two (offset, length) ranges of one of our registered buffers, read by the device
    /// some time after the post: they must stay untouched until the write completes.
    Region(M, [(u32, u32); 2], usize),
    /// Registered application memory (zero-copy).
    User(S),
}

/// [`Completion::status`] of a send the device gave up retransmitting (the peer did not
/// answer): verbs' IBV_WC_RETRY_EXC_ERR.
pub const STATUS_RETRY_EXCEEDED: u32 = 12;
/// `IBV_WC_WR_FLUSH_ERR`: the work request was flushed, the queue pair having left RTS.
pub const STATUS_FLUSHED: u32 = 5;

/// A completion of a posted work request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// The work request's id, as posted.
    pub wr_id: u64,
    /// Whether it succeeded.
    pub ok: bool,
    /// The device's status code (for diagnostics).
    pub status: u32,
    /// Immediate data (host order), when the completion of a receive carried one.
    pub imm: Option<u32>,
    /// Bytes a receive got (a SEND's length; 0 for a write with immediate data and for sends).
    pub len: u32,
}

/// A reliable connected queue pair with its completion queue and registered buffers.
pub trait Transport {
    /// Names one of our registered buffers.
    type Mr: Copy + std::fmt::Debug;
    /// A range of registered application memory.
    type Seg: Copy;

    /// Registers a zeroed buffer of `len` bytes, writable by the peer when `remote_write`.
    fn register(&mut self, len: usize, remote_write: bool) -> io::Result<Self::Mr>;
    /// Allocates a zeroed buffer of `cap` bytes and registers its first `len` (≤ `cap`):
    /// [`Transport::extend`] registers the rest later, at the same addresses.
    fn reserve(&mut self, len: usize, cap: usize, remote_write: bool) -> io::Result<Self::Mr>;
    /// Registers the whole allocation of `mr` (made by [`Transport::reserve`]) as a new
    /// buffer with its own keys and the same addresses. `mr` stays registered until
    /// [`Transport::release`]: work requests and windows given under its keys remain valid.
    fn extend(&mut self, mr: Self::Mr) -> io::Result<Self::Mr>;
    /// Deregisters `mr`, which [`Transport::extend`] superseded. Its memory stays (the
    /// registration that superseded it holds it).
    fn release(&mut self, mr: Self::Mr);
    /// The address and key the peer uses to reach buffer `mr`.
    fn remote_handle(&self, mr: Self::Mr) -> (u64, u32);
    /// Copies bytes out of buffer `mr` (what the peer wrote there, or what we put there).
    fn read(&self, mr: Self::Mr, offset: usize, out: &mut [u8]);
    /// Copies bytes into buffer `mr`.
    fn write(&mut self, mr: Self::Mr, offset: usize, data: &[u8]);
    /// The largest inline send the queue pair accepts.
    fn inline_size(&self) -> u32;

    /// Posts an RDMA write of `src` to `remote` (address, rkey), with immediate data if `imm`.
    fn post_write(
        &mut self,
        wr_id: u64,
        src: Source<'_, Self::Mr, Self::Seg>,
        remote: (u64, u32),
        imm: Option<u32>,
    ) -> io::Result<()>;
    /// Posts a SEND of `bytes`, inline.
    fn post_send(&mut self, wr_id: u64, bytes: &[u8]) -> io::Result<()>;
    /// Posts an RDMA read of `remote` (address, rkey) into `dst`.
    fn post_read(&mut self, wr_id: u64, dst: Self::Seg, remote: (u64, u32)) -> io::Result<()>;
    /// Posts a 0-byte RDMA read (no memory on either side is touched): it completes once the
    /// peer's device sent its read response.
    fn post_read_probe(&mut self, wr_id: u64) -> io::Result<()>;
    /// Posts a receive: without buffer (data arrives by RDMA write with immediate), or into
    /// `(mr, offset, len)`: the `len` bytes at `offset` of buffer `mr` (a SEND's message, and
    /// the data it may carry).
    fn post_recv(&mut self, wr_id: u64, into: Option<(Self::Mr, usize, usize)>) -> io::Result<()>;
    /// Fills `out` with up to `out.len()` completions; returns how many.
    fn poll(&mut self, out: &mut [Completion]) -> io::Result<usize>;
}
