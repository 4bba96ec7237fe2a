//! librdmacm's datagram wire (`SOCK_DGRAM` rsockets): the header in front of every UD message
//! and the header of the UDP messages that introduce two sockets to each other.
//!
//! A datagram rsocket owns a kernel UDP socket and a UD queue pair per local address. The first
//! datagrams to a destination whose queue pair is unknown go over UDP, behind a [`UdpHeader`]
//! that names the sender's queue pair (op [`UdpOp::Data`]); the receiver answers with its own
//! (op [`UdpOp::Ctrl`]), and from then on datagrams go queue pair to queue pair behind a
//! [`DsHeader`] that names the sender's IP address and port (a UD completion names only a queue
//! pair). Everything here is parsed from peer bytes, so every length and version is checked.
//!
//! Multicast (not in librdmacm) uses the same header with 4 more bytes: the group's port, so
//! that only sockets bound to it take the datagram (every queue pair attached to a group
//! receives all of its traffic, whatever the port). librdmacm drops such a header as invalid.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Q_Key of every rsocket UD queue pair (`RDMA_UDP_QKEY`, rdma_cma.h).
pub const UDP_QKEY: u32 = 0x0123_4567;
/// Bytes of a receive buffer after the GRH: one message, header included (`RS_SNDLOWAT`).
pub const SLOT: usize = 2048;
/// Bytes of the global route header a UD receive starts with (`struct ibv_grh`).
pub const GRH_LEN: usize = 40;
/// Destination queue pair number of a multicast send.
pub const MCAST_QPN: u32 = 0x00FF_FFFF;

/// [`DsHeader`] length for an IPv4 source (`DS_IPV4_HDR_LEN`).
pub const DS_V4_LEN: u8 = 8;
/// [`DsHeader`] length for an IPv6 source (`DS_IPV6_HDR_LEN`).
pub const DS_V6_LEN: u8 = 24;
/// Extra bytes of a multicast header: the group's port and 2 reserved bytes.
pub const DS_MCAST_EXTRA: u8 = 4;

/// [`UdpHeader`] tag (`DS_UDP_TAG`).
pub const UDP_TAG: u32 = 0x5555_5555;
/// [`UdpHeader`] length for IPv4 (`DS_UDP_IPV4_HDR_LEN`).
pub const UDP_V4_LEN: u8 = 16;
/// [`UdpHeader`] length for IPv6 (`DS_UDP_IPV6_HDR_LEN`).
pub const UDP_V6_LEN: u8 = 28;

/// The header in front of each UD datagram: who sent it, and for multicast, to which port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsHeader {
    /// The sender's address (its socket's IP address on that device, and its port).
    pub src: SocketAddr,
    /// The group port of a multicast datagram (`None`: unicast).
    pub mcast_port: Option<u16>,
}

impl DsHeader {
    /// Encoded length.
    pub fn len(&self) -> usize {
        let base = if self.src.is_ipv4() {
            DS_V4_LEN
        } else {
            DS_V6_LEN
        };
        (base
            + if self.mcast_port.is_some() {
                DS_MCAST_EXTRA
            } else {
                0
            }) as usize
    }

    /// Never empty (for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the header at the start of `out` (at least [`DsHeader::len`] bytes); returns
    /// its length. Layout: version, length, port (big endian), then the IPv4 address, or the
    /// IPv6 flow info and address; multicast adds the group port and 2 zero bytes.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let n = self.len();
        out[1] = n as u8;
        out[2..4].copy_from_slice(&self.src.port().to_be_bytes());
        let mut at = match self.src {
            SocketAddr::V4(a) => {
                out[0] = 4;
                out[4..8].copy_from_slice(&a.ip().octets());
                8
            }
            SocketAddr::V6(a) => {
                out[0] = 6;
                // sin6_flowinfo travels as the socket address holds it: network order.
                out[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
                out[8..24].copy_from_slice(&a.ip().octets());
                24
            }
        };
        if let Some(p) = self.mcast_port {
            out[at..at + 2].copy_from_slice(&p.to_be_bytes());
            out[at + 2..at + 4].fill(0);
            at += 4;
        }
        debug_assert_eq!(at, n);
        n
    }

    /// Parses the header at the start of a received message (GRH excluded). `None` for a
    /// message too short for its header or with an unknown version or length.
    pub fn decode(msg: &[u8]) -> Option<DsHeader> {
        let (&version, rest) = msg.split_first()?;
        let len = *rest.first()?;
        if msg.len() < len as usize {
            return None;
        }
        let port = u16::from_be_bytes([*msg.get(2)?, *msg.get(3)?]);
        let (src, base) = match (version, len) {
            (4, DS_V4_LEN) | (4, 12) => {
                let ip = Ipv4Addr::new(msg[4], msg[5], msg[6], msg[7]);
                (SocketAddr::V4(SocketAddrV4::new(ip, port)), DS_V4_LEN)
            }
            (6, DS_V6_LEN) | (6, 28) => {
                let flow = u32::from_be_bytes(msg[4..8].try_into().ok()?);
                let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&msg[8..24]).ok()?);
                (
                    SocketAddr::V6(SocketAddrV6::new(ip, port, flow, 0)),
                    DS_V6_LEN,
                )
            }
            _ => return None,
        };
        let mcast_port = (len > base).then(|| {
            let at = base as usize;
            u16::from_be_bytes([msg[at], msg[at + 1]])
        });
        Some(DsHeader { src, mcast_port })
    }
}

/// What a UDP introduction carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpOp {
    /// A datagram for the application follows; answer with your queue pair (`RS_OP_DATA`).
    Data,
    /// The sender's queue pair, nothing else (`RS_OP_CTRL`).
    Ctrl,
}

impl UdpOp {
    fn code(self) -> u8 {
        match self {
            UdpOp::Data => 0,
            UdpOp::Ctrl => 7,
        }
    }
}

/// The header of a datagram sent over the UDP socket (`struct ds_udp_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpHeader {
    /// What follows.
    pub op: UdpOp,
    /// The sender's UD queue pair number (24 bits).
    pub qpn: u32,
    /// The IP address the sender's queue pair is bound to.
    pub addr: IpAddr,
}

impl UdpHeader {
    /// Encoded length.
    pub fn len(&self) -> usize {
        if self.addr.is_ipv4() {
            UDP_V4_LEN as usize
        } else {
            UDP_V6_LEN as usize
        }
    }

    /// Never empty (for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The encoded header: tag, version, op, length, a reserved byte, the queue pair number
    /// (big endian, top byte zero), the address.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&UDP_TAG.to_be_bytes());
        out.push(if self.addr.is_ipv4() { 4 } else { 6 });
        out.push(self.op.code());
        out.push(self.len() as u8);
        out.push(0);
        out.extend_from_slice(&(self.qpn & MCAST_QPN).to_be_bytes());
        match self.addr {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
        out
    }

    /// Parses a UDP message that came from a socket of family `from_v4` (IPv4 or not):
    /// the header and the offset of what follows. `None` unless the tag, version, length and
    /// op are valid and agree with the family it came from (as librdmacm checks).
    pub fn decode(msg: &[u8], from_v4: bool) -> Option<(UdpHeader, usize)> {
        if msg.len() < UDP_V4_LEN as usize {
            return None;
        }
        if u32::from_be_bytes(msg[0..4].try_into().ok()?) != UDP_TAG {
            return None;
        }
        let (version, op, len) = (msg[4], msg[5], msg[6]);
        let op = match op {
            0 => UdpOp::Data,
            7 => UdpOp::Ctrl,
            _ => return None,
        };
        let qpn = u32::from_be_bytes(msg[8..12].try_into().ok()?) & MCAST_QPN;
        let addr = match (version, len, from_v4) {
            (4, UDP_V4_LEN, true) => IpAddr::V4(Ipv4Addr::new(msg[12], msg[13], msg[14], msg[15])),
            (6, UDP_V6_LEN, false) if msg.len() >= UDP_V6_LEN as usize => {
                IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&msg[12..28]).ok()?))
            }
            _ => return None,
        };
        Some((UdpHeader { op, qpn, addr }, len as usize))
    }
}

/// The largest payload one datagram can carry from a socket of this family over a path of
/// `mtu` bytes (a UD message is one packet, and one receive buffer of [`SLOT`] bytes), unicast
/// or multicast (whose header is longer).
pub fn max_payload(mtu: usize, v4: bool, mcast: bool) -> usize {
    let hdr = if v4 { DS_V4_LEN } else { DS_V6_LEN } + if mcast { DS_MCAST_EXTRA } else { 0 };
    mtu.min(SLOT).saturating_sub(hdr as usize)
}

/// Bytes of an IB MTU enum value (`IBV_MTU_256` = 1 ... `IBV_MTU_4096` = 5); 0 if unknown.
pub fn mtu_bytes(code: u32) -> usize {
    match code {
        1..=5 => 128 << code,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ipv4_header_is_librdmacms_layout() {
        let h = DsHeader {
            src: "10.10.0.2:7471".parse().unwrap(),
            mcast_port: None,
        };
        let mut b = [0u8; 32];
        assert_eq!(h.encode(&mut b), 8);
        // version 4, length 8, port 7471 = 0x1d2f, 10.10.0.2
        assert_eq!(&b[..8], &hex("04 08 1d2f 0a0a0002")[..]);
        assert_eq!(DsHeader::decode(&b[..8]), Some(h));
    }

    #[test]
    fn ipv6_header_is_librdmacms_layout() {
        let src = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 0x1234, 0));
        let h = DsHeader {
            src,
            mcast_port: None,
        };
        let mut b = [0u8; 32];
        assert_eq!(h.encode(&mut b), 24);
        assert_eq!(
            &b[..24],
            &hex("06 18 0009 00001234 fe800000000000000000000000000001")[..]
        );
        assert_eq!(DsHeader::decode(&b[..24]), Some(h));
    }

    #[test]
    fn multicast_header_carries_the_group_port() {
        for src in ["10.10.0.2:5000", "[::1]:5000"] {
            let h = DsHeader {
                src: src.parse().unwrap(),
                mcast_port: Some(6000),
            };
            let mut b = [0u8; 32];
            let n = h.encode(&mut b);
            assert_eq!(n, h.len());
            assert_eq!(&b[n - 4..n], &[0x17, 0x70, 0, 0]);
            assert_eq!(DsHeader::decode(&b[..n]), Some(h));
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(DsHeader::decode(&[]), None);
        assert_eq!(DsHeader::decode(&[4]), None);
        assert_eq!(DsHeader::decode(&hex("04 08 1d2f 0a0a00")), None); // short
        assert_eq!(DsHeader::decode(&hex("05 08 1d2f 0a0a0002")), None); // version
        assert_eq!(DsHeader::decode(&hex("04 09 1d2f 0a0a0002 00")), None); // length
        assert_eq!(DsHeader::decode(&hex("06 08 1d2f 0a0a0002")), None); // v6 with v4 length
        assert_eq!(DsHeader::decode(&hex("04 0c 1d2f 0a0a0002 17")), None); // short multicast
    }

    #[test]
    fn udp_header_is_librdmacms_layout() {
        let h = UdpHeader {
            op: UdpOp::Data,
            qpn: 0x11,
            addr: "10.10.0.2".parse().unwrap(),
        };
        let b = h.encode();
        assert_eq!(b, hex("55555555 04 00 10 00 00000011 0a0a0002"));
        assert_eq!(UdpHeader::decode(&b, true), Some((h, 16)));
        // From an IPv6 socket, a v4 header is refused (librdmacm's check).
        assert_eq!(UdpHeader::decode(&b, false), None);
        let c = UdpHeader {
            op: UdpOp::Ctrl,
            qpn: 0xABCDEF,
            addr: "::2".parse().unwrap(),
        };
        let b = c.encode();
        assert_eq!(b.len(), 28);
        assert_eq!(b[5], 7);
        assert_eq!(UdpHeader::decode(&b, false), Some((c, 28)));
    }

    #[test]
    fn malformed_udp_headers_are_refused() {
        let good = hex("55555555 04 00 10 00 00000011 0a0a0002");
        for (i, v) in [(0, 0x54), (4, 5), (5, 3), (6, 17)] {
            let mut b = good.clone();
            b[i] = v;
            assert_eq!(UdpHeader::decode(&b, true), None, "byte {i} = {v}");
        }
        assert_eq!(UdpHeader::decode(&good[..15], true), None);
        // The top byte of the queue pair number is reserved and ignored.
        let mut b = good.clone();
        b[8] = 0xff;
        assert_eq!(UdpHeader::decode(&b, true).unwrap().0.qpn, 0x11);
    }

    #[test]
    fn the_largest_datagram_fits_one_packet_and_one_slot() {
        assert_eq!(max_payload(1024, true, false), 1016);
        assert_eq!(max_payload(4096, true, false), 2040);
        assert_eq!(max_payload(4096, false, true), 2020);
        assert_eq!(mtu_bytes(3), 1024);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(mtu_bytes(0), 0);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_without_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            if let Some(h) = DsHeader::decode(&b) {
                proptest::prop_assert!(h.len() <= b.len());
            }
            for v4 in [true, false] {
                if let Some((h, n)) = UdpHeader::decode(&b, v4) {
                    proptest::prop_assert_eq!(n, h.len());
                    proptest::prop_assert!(n <= b.len());
                }
            }
        }
    }
}
