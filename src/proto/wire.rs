//! Wire formats of librdmacm's rsockets (protocol version 1).
//!
//! Everything a peer sends is parsed here and validated before the rest of the crate sees it:
//! connect private data (`rs_conn_data`), the 32-bit messages carried as immediate data (or as
//! 4-byte inline sends on iWARP), and the 16-byte scatter/gather entries (`rs_sge`) a peer writes
//! into our target SGL.

use std::fmt;

/// Protocol version spoken by librdmacm 44 and by us.
pub const VERSION: u8 = 1;
/// Size of `rs_conn_data` on the wire.
pub const CONN_DATA_LEN: usize = 40;
/// Size of one `rs_sge` (addr u64, key u32, length u32).
pub const SGE_LEN: usize = 16;
/// Size of one `rs_iomap` (offset u64 followed by an `rs_sge`).
pub const IOMAP_LEN: usize = 24;

/// Byte offset of iomap entry `index` in a target SGL buffer: the iomap follows the SGL.
pub fn iomap_entry_offset(index: usize) -> usize {
    SGE_LEN * SGL_SIZE as usize + index * IOMAP_LEN
}
/// Number of entries in a target SGL (two halves of the receive buffer).
pub const SGL_SIZE: u32 = 2;
/// Size of a message when it travels as a SEND (iWARP) instead of immediate data.
pub const MSG_SIZE: usize = 4;
/// Most data bytes a message SEND carries after its message (rsocket-rs peers on iWARP, see
/// [`ConnData::send_room`]): small messages then travel as one SEND instead of an RDMA write
/// plus a SEND.
pub const SEND_PAYLOAD_MAX: usize = 64;

/// Connect flag: the sender is a big-endian host.
pub const CONN_FLAG_NET: u8 = 1 << 0;
/// Connect flag: the sender supports iomap (librdmacm always sets it).
pub const CONN_FLAG_IOMAP: u8 = 1 << 1;
/// Connect flag (our extension; librdmacm ignores flags it does not know): the sender is
/// rsocket-rs and speaks its extensions (iomap permissions and withdrawal, rioread).
pub const CONN_FLAG_RSRS: u8 = 1 << 7;

/// Errors found while decoding what a peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the format needs.
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A protocol version we do not speak.
    Version(u8),
    /// A field with a value the protocol never produces.
    Invalid(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { need, have } => {
                write!(f, "truncated: need {need} bytes, have {have}")
            }
            WireError::Version(v) => write!(f, "unsupported rsocket protocol version {v}"),
            WireError::Invalid(what) => write!(f, "invalid {what}"),
        }
    }
}

impl std::error::Error for WireError {}

/// A remote buffer: address, rkey and length (`rs_sge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteSge {
    /// Remote virtual address.
    pub addr: u64,
    /// Remote key granting access.
    pub key: u32,
    /// Length in bytes (or entry count for a target SGL descriptor).
    pub length: u32,
}

impl RemoteSge {
    /// Encodes big-endian, as in connect private data.
    pub fn to_be_bytes(&self) -> [u8; SGE_LEN] {
        let mut b = [0u8; SGE_LEN];
        b[0..8].copy_from_slice(&self.addr.to_be_bytes());
        b[8..12].copy_from_slice(&self.key.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes big-endian.
    pub fn from_be_bytes(b: &[u8; SGE_LEN]) -> Self {
        RemoteSge {
            addr: u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")),
            key: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
            length: u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
        }
    }

    /// Encodes in the byte order the peer reads target SGL entries in: its own host order, which
    /// is little-endian unless it set [`CONN_FLAG_NET`].
    pub fn to_peer_bytes(&self, peer_big_endian: bool) -> [u8; SGE_LEN] {
        if peer_big_endian {
            return self.to_be_bytes();
        }
        let mut b = [0u8; SGE_LEN];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.key.to_le_bytes());
        b[12..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Decodes an entry a peer wrote into our target SGL (always in our host order).
    pub fn from_ne_bytes(b: &[u8; SGE_LEN]) -> Self {
        RemoteSge {
            addr: u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes")),
            key: u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes")),
            length: u32::from_ne_bytes(b[12..16].try_into().expect("4 bytes")),
        }
    }
}

/// Scales an iomap size into the 8-bit connect field (librdmacm's `rs_value_to_scale`).
pub fn iomap_size_to_scale(value: u16) -> u8 {
    if value <= 128 {
        value as u8
    } else {
        (0x80 | (value >> 8)) as u8
    }
}

/// Inverse of [`iomap_size_to_scale`].
pub fn iomap_scale_to_size(scale: u8) -> u16 {
    if scale <= 128 {
        scale as u16
    } else {
        ((scale & 0x7f) as u16) << 8
    }
}

/// Connect private data (`rs_conn_data`), exchanged in the CM REQ and REP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnData {
    /// Flags ([`CONN_FLAG_NET`], [`CONN_FLAG_IOMAP`]).
    pub flags: u8,
    /// Receive credits the sender grants (its receive queue size).
    pub credits: u16,
    /// Number of iomap entries the sender offers (decoded from the scaled byte).
    pub target_iomap_size: u16,
    /// Where the sender's target SGL lives; `length` is its entry count.
    pub target_sgl: RemoteSge,
    /// The first half of the sender's receive buffer.
    pub data_buf: RemoteSge,
    /// rsocket-rs on iWARP (byte 4, reserved and zero in librdmacm's): data bytes each receive
    /// the sender posted holds after its 4-byte message. A peer may then send a DATA message
    /// of up to that many bytes as one SEND of the message followed by the data, which the
    /// sender of this value copies to where the RDMA write would have put it. 0: none.
    pub send_room: u8,
}

impl ConnData {
    /// Encodes as the 40 bytes librdmacm sends.
    pub fn encode(&self) -> [u8; CONN_DATA_LEN] {
        let mut b = [0u8; CONN_DATA_LEN];
        b[0] = VERSION;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.credits.to_be_bytes());
        b[4] = self.send_room;
        b[7] = iomap_size_to_scale(self.target_iomap_size);
        b[8..24].copy_from_slice(&self.target_sgl.to_be_bytes());
        b[24..40].copy_from_slice(&self.data_buf.to_be_bytes());
        b
    }

    /// Decodes and validates the first 40 bytes of a peer's private data (CM pads the rest).
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < CONN_DATA_LEN {
            return Err(WireError::Truncated {
                need: CONN_DATA_LEN,
                have: b.len(),
            });
        }
        if b[0] != VERSION {
            return Err(WireError::Version(b[0]));
        }
        let sge = |off: usize| {
            RemoteSge::from_be_bytes(b[off..off + SGE_LEN].try_into().expect("16 bytes"))
        };
        let cd = ConnData {
            flags: b[1],
            credits: u16::from_be_bytes([b[2], b[3]]),
            target_iomap_size: iomap_scale_to_size(b[7]),
            target_sgl: sge(8),
            data_buf: sge(24),
            send_room: b[4],
        };
        if cd.credits == 0 {
            return Err(WireError::Invalid("credits (0)"));
        }
        if cd.target_sgl.length != SGL_SIZE {
            return Err(WireError::Invalid("target SGL entry count"));
        }
        if cd.data_buf.length == 0 {
            return Err(WireError::Invalid("receive buffer length (0)"));
        }
        // Regions that would wrap around the address space (found by fuzz/run core: our
        // address arithmetic on them overflowed).
        let sgl_len =
            (SGE_LEN as u64) * SGL_SIZE as u64 + IOMAP_LEN as u64 * cd.target_iomap_size as u64;
        if cd
            .data_buf
            .addr
            .checked_add(cd.data_buf.length as u64)
            .is_none()
            || cd.target_sgl.addr.checked_add(sgl_len).is_none()
        {
            return Err(WireError::Invalid("buffer wraps around the address space"));
        }
        Ok(cd)
    }

    /// Whether the sender is a big-endian host.
    pub fn is_big_endian(&self) -> bool {
        self.flags & CONN_FLAG_NET != 0
    }

    /// Whether the sender is rsocket-rs (speaks our extensions).
    pub fn is_rsocket_rs(&self) -> bool {
        self.flags & CONN_FLAG_RSRS != 0
    }

    /// Data bytes a message SEND to the sender may carry ([`ConnData::send_room`]; 0 unless
    /// the sender is rsocket-rs).
    pub fn payload_room(&self) -> u32 {
        if self.is_rsocket_rs() {
            (self.send_room as usize).min(SEND_PAYLOAD_MAX) as u32
        } else {
            0
        }
    }
}

/// Message opcodes (top 3 bits of the 32-bit message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Application data: the low 29 bits are the byte count.
    Data = 0,
    /// Local-only marker for riowrite completions; never on the wire.
    Write = 2,
    /// Credit update: the low bits are the new credit limit (16-bit sequence space).
    Sgl = 4,
    /// An iomap entry was written at the given index.
    IomapSgl = 6,
    /// Control message ([`Ctrl`]).
    Ctrl = 7,
}

/// Control message values carried with [`Op::Ctrl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Ctrl {
    /// The sender is gone for both directions.
    Disconnect = 0,
    /// Keepalive probe (local wr_id only; the probe itself is a 0-byte write).
    Keepalive = 1,
    /// The sender will send no more data (SHUT_WR).
    Shutdown = 2,
}

/// A decoded 32-bit rsocket message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// `len` bytes of data landed at the current receive position.
    Data(u32),
    /// New credit limit.
    Credits(u16),
    /// An iomap entry was updated: its index, plus permission bits from rsocket-rs peers
    /// (see [`crate::proto::iomap`]).
    IomapSgl(u32),
    /// Control message.
    Ctrl(Ctrl),
}

const DATA_MASK: u32 = 0x1FFF_FFFF;

impl Msg {
    /// The opcode bits of an encoded message (its data bits cleared).
    pub fn op_bits(v: u32) -> u32 {
        v & !DATA_MASK
    }

    /// Encodes as the host-order 32-bit value (send it big-endian as immediate data).
    pub fn encode(self) -> u32 {
        match self {
            Msg::Data(len) => (Op::Data as u32) << 29 | (len & DATA_MASK),
            Msg::Credits(c) => (Op::Sgl as u32) << 29 | c as u32,
            Msg::IomapSgl(d) => (Op::IomapSgl as u32) << 29 | (d & DATA_MASK),
            Msg::Ctrl(c) => (Op::Ctrl as u32) << 29 | c as u32,
        }
    }

    /// Decodes a message received from a peer.
    pub fn decode(v: u32) -> Result<Self, WireError> {
        let data = v & DATA_MASK;
        match v >> 29 {
            0 => Ok(Msg::Data(data)),
            // librdmacm keeps the credit limit in a 16-bit sequence number and truncates.
            4 => Ok(Msg::Credits(data as u16)),
            6 => Ok(Msg::IomapSgl(data)),
            7 => match data {
                0 => Ok(Msg::Ctrl(Ctrl::Disconnect)),
                1 => Ok(Msg::Ctrl(Ctrl::Keepalive)),
                2 => Ok(Msg::Ctrl(Ctrl::Shutdown)),
                _ => Err(WireError::Invalid("control message")),
            },
            _ => Err(WireError::Invalid("message opcode")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The client's private data from frame 1 of shared/traces/rstream-rxe.pcap.
    const TRACE_REQ: &str = "01 02 0180 000000 00 00007fc1a8002000 0000034f 00000002 \
                             00007fc1acdd5000 00000426 00080000";

    #[test]
    fn decodes_librdmacm_connect_request() {
        let mut b = hex(TRACE_REQ);
        b.extend_from_slice(&[0u8; 16]); // CM padding is ignored
        let cd = ConnData::decode(&b).unwrap();
        assert_eq!(cd.flags, CONN_FLAG_IOMAP);
        assert!(!cd.is_big_endian());
        assert_eq!(cd.credits, 384);
        assert_eq!(cd.target_iomap_size, 0);
        assert_eq!(
            cd.target_sgl,
            RemoteSge {
                addr: 0x7fc1a8002000,
                key: 0x34f,
                length: 2
            }
        );
        assert_eq!(
            cd.data_buf,
            RemoteSge {
                addr: 0x7fc1acdd5000,
                key: 0x426,
                length: 512 * 1024
            }
        );
        assert_eq!(cd.encode().to_vec(), hex(TRACE_REQ));
    }

    #[test]
    fn rejects_malformed_connect_data() {
        let good = hex(TRACE_REQ);
        assert!(matches!(
            ConnData::decode(&good[..39]),
            Err(WireError::Truncated { need: 40, have: 39 })
        ));
        let mut b = good.clone();
        b[0] = 2;
        assert_eq!(ConnData::decode(&b), Err(WireError::Version(2)));
        let mut b = good.clone();
        b[2] = 0;
        b[3] = 0;
        assert!(matches!(ConnData::decode(&b), Err(WireError::Invalid(_))));
        let mut b = good.clone();
        b[23] = 7; // target SGL with 7 entries
        assert!(matches!(ConnData::decode(&b), Err(WireError::Invalid(_))));
        let mut b = good.clone();
        b[36..40].copy_from_slice(&[0; 4]);
        assert!(matches!(ConnData::decode(&b), Err(WireError::Invalid(_))));
        // Regions wrapping around the address space (found by fuzz/run core).
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(u64::MAX - 100).to_be_bytes());
        assert!(matches!(ConnData::decode(&b), Err(WireError::Invalid(_))));
        let mut b = good;
        b[8..16].copy_from_slice(&(u64::MAX - 16).to_be_bytes());
        assert!(matches!(ConnData::decode(&b), Err(WireError::Invalid(_))));
    }

    #[test]
    fn send_room_travels_in_byte_4_and_counts_only_from_rsocket_rs() {
        let mut cd = ConnData::decode(&hex(TRACE_REQ)).unwrap();
        assert_eq!(cd.send_room, 0, "librdmacm leaves byte 4 zero");
        cd.send_room = 64;
        let b = cd.encode();
        assert_eq!(b[4], 64);
        let back = ConnData::decode(&b).unwrap();
        assert_eq!(back.send_room, 64);
        // Not flagged as rsocket-rs: the byte means nothing.
        assert_eq!(back.payload_room(), 0);
        cd.flags |= CONN_FLAG_RSRS;
        assert_eq!(cd.payload_room(), 64);
        // More than we ever carry is capped.
        cd.send_room = 255;
        assert_eq!(cd.payload_room(), SEND_PAYLOAD_MAX as u32);
    }

    #[test]
    fn immediate_values_from_trace() {
        // Frames 4/6: SGL credit update to 384; frames 8/10: 16-byte data; 44/46: disconnect.
        assert_eq!(Msg::decode(0x8000_0180), Ok(Msg::Credits(384)));
        assert_eq!(Msg::Credits(384).encode(), 0x8000_0180);
        assert_eq!(Msg::decode(0x0000_0010), Ok(Msg::Data(16)));
        assert_eq!(Msg::decode(0x0000_03e8), Ok(Msg::Data(1000)));
        assert_eq!(Msg::decode(0xe000_0000), Ok(Msg::Ctrl(Ctrl::Disconnect)));
        assert_eq!(Msg::Ctrl(Ctrl::Shutdown).encode(), 0xe000_0002);
        assert!(Msg::decode(0x2000_0000).is_err()); // op 1 reserved
        assert!(Msg::decode(0x4000_0000).is_err()); // op 2 is local only
        assert!(Msg::decode(0xe000_0009).is_err());
    }

    #[test]
    fn iomap_scale_round_trips() {
        for v in [0u16, 1, 64, 128] {
            assert_eq!(iomap_scale_to_size(iomap_size_to_scale(v)), v);
        }
        assert_eq!(iomap_size_to_scale(512), 0x82);
        assert_eq!(iomap_scale_to_size(0x82), 512);
    }

    #[test]
    fn sge_byte_orders() {
        let s = RemoteSge {
            addr: 0x1122334455667788,
            key: 0xaabbccdd,
            length: 0x10000,
        };
        assert_eq!(RemoteSge::from_be_bytes(&s.to_be_bytes()), s);
        assert_eq!(
            RemoteSge::from_ne_bytes(&s.to_peer_bytes(cfg!(target_endian = "big"))),
            s
        );
    }
}
