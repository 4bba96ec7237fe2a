//! riomap windows, sans-IO: the `rs_iomap` entries peers exchange, the windows a peer granted us
//! and the checks every riowrite/rioread passes before anything is posted.
//!
//! Wire (librdmacm's): an entry is 24 bytes, `offset u64, addr u64, key u32, length u32`, in the
//! receiver's byte order, RDMA-written into the receiver's target iomap (right after its two
//! target-SGL entries) with the message `IOMAP_SGL(index)`. librdmacm only maps windows for
//! remote write and never withdraws one. Between two rsocket-rs peers (both set
//! [`wire::CONN_FLAG_RSRS`]) the message's data also carries the window's permissions
//! ([`PERM_READ`], [`PERM_WRITE`]), and an unmapped window is withdrawn by announcing a zero-length
//! entry; librdmacm ignores the data bits of IOMAP_SGL and finds nothing in a zero-length entry.

use super::wire::{self, RemoteSge, WireError};

/// The window may be RDMA-read (rioread): announced by rsocket-rs peers only.
pub const PERM_READ: u8 = 1;
/// The window may be RDMA-written (riowrite).
pub const PERM_WRITE: u8 = 2;
/// Bit of the IOMAP_SGL data where an rsocket-rs peer puts the permissions (index below it).
pub const PERM_SHIFT: u32 = 16;

/// One `rs_iomap`: the window `[offset, offset + sge.length)` of the owner's riomap offset
/// space lives at `sge.addr` under rkey `sge.key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IomapEntry {
    /// Start of the window in the riomap offset space.
    pub offset: u64,
    /// Where the window is in the owner's memory.
    pub sge: RemoteSge,
}

impl IomapEntry {
    /// Bytes as the receiver stores them (its byte order: big-endian if `big_endian`).
    pub fn to_peer_bytes(&self, big_endian: bool) -> [u8; wire::IOMAP_LEN] {
        let mut b = [0u8; wire::IOMAP_LEN];
        let sge = self.sge.to_peer_bytes(big_endian);
        let off = if big_endian {
            self.offset.to_be_bytes()
        } else {
            self.offset.to_le_bytes()
        };
        b[..8].copy_from_slice(&off);
        b[8..].copy_from_slice(&sge);
        b
    }

    /// Parses an entry a peer wrote into our memory (our byte order).
    pub fn from_ne_bytes(b: [u8; wire::IOMAP_LEN]) -> Self {
        IomapEntry {
            offset: u64::from_ne_bytes(b[..8].try_into().expect("8 bytes")),
            sge: RemoteSge::from_ne_bytes(b[8..].try_into().expect("16 bytes")),
        }
    }

    /// Whether `[offset, offset + len)` lies inside the window (no overflow).
    fn covers(&self, offset: u64, len: u64) -> bool {
        let Some(end) = self.offset.checked_add(self.sge.length as u64) else {
            return false;
        };
        // A window whose memory would wrap around the address space is no window (a hostile
        // peer's entry; found by fuzz/run wire): the target address is computed from it.
        self.sge.length != 0
            && self.sge.addr.checked_add(self.sge.length as u64).is_some()
            && offset >= self.offset
            && offset.checked_add(len).is_some_and(|e| e <= end)
    }
}

/// Why a riowrite/rioread was refused before anything was posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IomapError {
    /// No window the peer mapped holds the whole range (never mapped, unmapped, or the range
    /// runs past the window's end): EINVAL.
    NoWindow,
    /// The window exists but was not mapped with the needed protection: EACCES.
    Permission,
    /// The peer cannot grant this at all (rioread from a librdmacm peer): EOPNOTSUPP.
    Unsupported,
}

/// Where one checked RDMA operation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteTarget {
    /// Peer address.
    pub addr: u64,
    /// Peer rkey.
    pub rkey: u32,
}

/// The windows a peer announced into our target iomap. Entries are snapshots taken when the
/// IOMAP_SGL message was received, so a window is usable only once its announcement is complete,
/// and what the peer writes into our memory afterwards without a message is ignored.
#[derive(Debug, Clone)]
pub struct PeerWindows {
    entries: Vec<(IomapEntry, u8)>,
    peer_ext: bool,
}

impl PeerWindows {
    /// `size` = entries we offered (our target iomap size); `peer_ext`: the peer is rsocket-rs.
    pub fn new(size: u16, peer_ext: bool) -> Self {
        PeerWindows {
            entries: vec![(IomapEntry::default(), 0); size as usize],
            peer_ext,
        }
    }

    /// Takes in an announcement: `data` of the IOMAP_SGL message and the entry bytes now in our
    /// target iomap at that index. An index we never offered is a protocol error.
    pub fn on_update(
        &mut self,
        data: u32,
        bytes: impl FnOnce(usize) -> [u8; wire::IOMAP_LEN],
    ) -> Result<(), WireError> {
        let index = (data & ((1 << PERM_SHIFT) - 1)) as usize;
        if index >= self.entries.len() {
            return Err(WireError::Invalid("iomap index beyond the entries offered"));
        }
        let entry = IomapEntry::from_ne_bytes(bytes(index));
        let perms = if self.peer_ext {
            (data >> PERM_SHIFT) as u8 & (PERM_READ | PERM_WRITE)
        } else {
            // librdmacm maps windows for remote write only.
            PERM_WRITE
        };
        self.entries[index] = (entry, perms);
        Ok(())
    }

    /// Checks `[offset, offset + len)` against the windows for an operation needing `perm` and
    /// returns where it goes. The whole range must lie in one window.
    pub fn lookup(&self, offset: u64, len: u64, perm: u8) -> Result<RemoteTarget, IomapError> {
        if perm & PERM_READ != 0 && !self.peer_ext {
            return Err(IomapError::Unsupported);
        }
        let mut found = Err(IomapError::NoWindow);
        for (e, p) in &self.entries {
            if !e.covers(offset, len.max(1)) {
                continue;
            }
            if p & perm != perm {
                found = Err(IomapError::Permission);
                continue;
            }
            return Ok(RemoteTarget {
                addr: e.sge.addr + (offset - e.offset),
                rkey: e.sge.key,
            });
        }
        found
    }
}

/// Encodes the IOMAP_SGL data for an announcement of `index` with `perms` (the permission bits
/// only go to rsocket-rs peers).
pub fn announce_data(index: u16, perms: u8, peer_ext: bool) -> u32 {
    index as u32
        | if peer_ext {
            ((perms & (PERM_READ | PERM_WRITE)) as u32) << PERM_SHIFT
        } else {
            0
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, addr: u64, key: u32, length: u32) -> [u8; 24] {
        IomapEntry {
            offset,
            sge: RemoteSge { addr, key, length },
        }
        .to_peer_bytes(cfg!(target_endian = "big"))
    }

    #[test]
    fn entry_bytes_round_trip_in_both_orders() {
        let e = IomapEntry {
            offset: 0x1122_3344_5566_7788,
            sge: RemoteSge {
                addr: 0x0102_0304_0506_0708,
                key: 0xAABB_CCDD,
                length: 4096,
            },
        };
        let native = e.to_peer_bytes(cfg!(target_endian = "big"));
        assert_eq!(IomapEntry::from_ne_bytes(native), e);
        let be = e.to_peer_bytes(true);
        assert_eq!(&be[..8], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(&be[16..20], &0xAABB_CCDDu32.to_be_bytes());
    }

    #[test]
    fn lookups_check_bounds_permissions_and_withdrawal() {
        let mut w = PeerWindows::new(4, true);
        w.on_update(announce_data(1, PERM_WRITE, true), |i| {
            assert_eq!(i, 1);
            entry(1000, 0x7000, 9, 100)
        })
        .unwrap();
        w.on_update(announce_data(2, PERM_READ | PERM_WRITE, true), |_| {
            entry(5000, 0x9000, 10, 50)
        })
        .unwrap();
        assert_eq!(
            w.lookup(1010, 90, PERM_WRITE),
            Ok(RemoteTarget {
                addr: 0x700a,
                rkey: 9
            })
        );
        // Past the end, straddling, before the start, overflowing offsets.
        assert_eq!(w.lookup(1010, 91, PERM_WRITE), Err(IomapError::NoWindow));
        assert_eq!(w.lookup(999, 2, PERM_WRITE), Err(IomapError::NoWindow));
        assert_eq!(w.lookup(1100, 1, PERM_WRITE), Err(IomapError::NoWindow));
        assert_eq!(w.lookup(u64::MAX, 2, PERM_WRITE), Err(IomapError::NoWindow));
        // Write-only window: no reads.
        assert_eq!(w.lookup(1000, 10, PERM_READ), Err(IomapError::Permission));
        assert!(w.lookup(5000, 50, PERM_READ).is_ok());
        // Withdrawn (zero-length announcement): gone.
        w.on_update(announce_data(2, 0, true), |_| entry(0, 0, 0, 0))
            .unwrap();
        assert_eq!(w.lookup(5000, 1, PERM_READ), Err(IomapError::NoWindow));
        // A hostile index beyond what we offered.
        assert!(w.on_update(4, |_| unreachable!()).is_err());
        assert!(w.on_update(u32::MAX, |_| unreachable!()).is_err());
        // A window whose memory wraps around the address space (found by fuzz/run wire: the
        // target address overflowed).
        w.on_update(announce_data(3, PERM_WRITE, true), |_| {
            entry(0, u64::MAX - 10, 11, 100)
        })
        .unwrap();
        assert_eq!(w.lookup(50, 1, PERM_WRITE), Err(IomapError::NoWindow));
    }

    #[test]
    fn librdmacm_peers_grant_writes_only() {
        let mut w = PeerWindows::new(1, false);
        // librdmacm sends the bare index; extra data bits from it would not grant reads either.
        w.on_update(0, |_| entry(0, 0x1000, 3, 64)).unwrap();
        assert!(w.lookup(0, 64, PERM_WRITE).is_ok());
        assert_eq!(w.lookup(0, 1, PERM_READ), Err(IomapError::Unsupported));
        assert_eq!(announce_data(0, PERM_READ | PERM_WRITE, false), 0);
    }
}
