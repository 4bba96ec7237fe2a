//! The wire decoders on arbitrary peer bytes: connect private data, immediate values (data,
//! credit, iomap and control messages), SGL entries, iomap announcements and the lookups of
//! riowrite/rioread in what was announced. None may panic; what decodes must encode back to
//! itself; a lookup's answer lies inside the window announced for it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsocket::proto::iomap::{IomapEntry, PERM_READ, PERM_WRITE, PeerWindows};
use rsocket::proto::wire::{CONN_DATA_LEN, ConnData, IOMAP_LEN, Msg, RemoteSge, SGE_LEN};

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // Private data of any length (the CM pads it; a hostile peer sends anything).
    if let Ok(cd) = ConnData::decode(data) {
        assert!(data.len() >= CONN_DATA_LEN);
        let again = ConnData::decode(&cd.encode()).expect("our encoding decodes");
        assert_eq!(again, cd);
        let _ = (cd.is_big_endian(), cd.is_rsocket_rs());
    }
    // Every 4 bytes as an immediate value.
    for w in data.chunks_exact(4) {
        let v = u32::from_ne_bytes(w.try_into().unwrap());
        if let Ok(m) = Msg::decode(v) {
            assert_eq!(Msg::decode(m.encode()), Ok(m));
        }
    }
    // SGL entries, in both byte orders.
    for e in data.chunks_exact(SGE_LEN) {
        let b: [u8; SGE_LEN] = e.try_into().unwrap();
        let be = RemoteSge::from_be_bytes(&b);
        assert_eq!(be.to_be_bytes(), b);
        let ne = RemoteSge::from_ne_bytes(&b);
        assert_eq!(ne.to_peer_bytes(cfg!(target_endian = "big")), b);
    }
    // Iomap announcements: the first byte says how many entries we offered and whether the
    // peer is rsocket-rs; then (message data, entry) pairs; the last 17 bytes a lookup.
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let mut w = PeerWindows::new((head & 0x7f) as u16, head & 0x80 != 0);
    let mut announced = Vec::new();
    for a in rest.chunks_exact(4 + IOMAP_LEN) {
        let msg = u32::from_le_bytes(a[..4].try_into().unwrap());
        let entry: [u8; IOMAP_LEN] = a[4..].try_into().unwrap();
        if w.on_update(msg, |_| entry).is_ok() {
            announced.push(IomapEntry::from_ne_bytes(entry));
        }
    }
    let tail = &rest[rest.len().saturating_sub(17)..];
    let (offset, len) = (u64_at(tail, 0), u64_at(tail, 8) & 0xffff_ffff);
    let perm = [PERM_READ, PERM_WRITE, PERM_READ | PERM_WRITE]
        [tail.get(16).map_or(0, |b| *b as usize % 3)];
    if let Ok(t) = w.lookup(offset, len, perm) {
        // Inside one announced window, whole.
        let inside = announced.iter().any(|e| {
            e.sge.key == t.rkey
                && t.addr >= e.sge.addr
                && (t.addr - e.sge.addr)
                    .checked_add(len.max(1))
                    .is_some_and(|end| end <= e.sge.length as u64)
        });
        assert!(
            inside,
            "lookup {offset:#x}+{len:#x} gave {t:?}, outside every window"
        );
    }
});
