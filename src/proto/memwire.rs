//! An in-memory RC wire for the host tests: each end is a [`Transport`] with real byte buffers,
//! so the tests run the library's own posting code ([`super::driver::Driver`]) between two
//! simulated peers.
//!
//! The wire is as strict as a NIC and more hostile than a fast one. A write's bytes are read out
//! of the send ring when the test lets the sender's "NIC" read them ([`MemEnd::nic_read`]), not
//! at the post, so ring bytes reused before their write completed show up as wrong data. A write
//! is placed at the peer ([`MemEnd::place_next`]) only into a region the peer registered
//! remote-writable, by its key and within its bounds: anything else panics. Every message (a
//! write with immediate, a SEND) takes one of the peer's posted receives; on iWARP a message
//! that finds none breaks the connection (a panic here), on RoCE it waits (receiver-not-ready
//! retry). Sends complete in order, on RoCE only once placed (acknowledged), on iWARP once read
//! (Soft-iWARP completes when TCP took the data), possibly before the peer has them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;

use super::transport::{Completion, Source, Transport};

/// One registration of a buffer. A buffer's bytes live in its first registration (the owner);
/// [`Transport::extend`] adds registrations of the same bytes with other keys.
#[derive(Debug)]
struct Region {
    base: u64,
    rkey: u32,
    remote_write: bool,
    /// The whole allocation (owner only; empty in later registrations).
    bytes: Vec<u8>,
    /// Index of the registration that holds the bytes.
    owner: usize,
    /// Bytes registered (from `base`).
    len: usize,
    /// Not released yet: a work request or a peer's write under a released key breaks the
    /// test, as a device would fail it.
    live: bool,
}

/// Where a posted work request's bytes come from.
#[derive(Debug, Clone)]
enum Src {
    Bytes(Vec<u8>),
    Ring(usize, [(u32, u32); 2], usize),
}

/// What a work request does at the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// RDMA write to (address, rkey), with immediate data if any.
    Write((u64, u32), Option<u32>),
    /// SEND.
    Send,
    /// 0-byte RDMA read (a keepalive probe on iWARP): touches no memory, completes only once
    /// the peer answered it (placed there), on iWARP too.
    ReadProbe,
}

/// A posted send work request.
#[derive(Debug, Clone)]
pub struct Wr {
    /// Its id.
    pub wr_id: u64,
    /// What it does.
    pub op: Op,
    src: Src,
    /// The bytes, once the NIC read them.
    pub data: Option<Vec<u8>>,
}

impl Wr {
    /// Bytes it carries.
    pub fn len(&self) -> usize {
        match &self.src {
            Src::Bytes(b) => b.len(),
            Src::Ring(_, segs, n) => segs[..*n].iter().map(|&(_, l)| l as usize).sum(),
        }
    }

    /// Whether it carries application data (a write whose wr_id is a DATA message).
    pub fn is_data(&self) -> bool {
        use super::stream::{WR_ID_MSG_SEND, WR_ID_NO_RING, WR_ID_RECV};
        matches!(self.op, Op::Write(..))
            && self.wr_id & (WR_ID_RECV | WR_ID_MSG_SEND | WR_ID_NO_RING) == 0
            && (self.wr_id as u32) >> 29 == 0
    }
}

/// Where a posted receive puts a SEND's bytes: buffer, offset, length.
type RecvInto = (usize, usize, usize);

/// One end of the wire.
#[derive(Debug)]
pub struct MemEnd {
    id: u32,
    iwarp: bool,
    inline: u32,
    regions: Vec<Region>,
    /// Sends posted and not yet both placed and completed; `wrs[0]` is number `base`.
    wrs: VecDeque<Wr>,
    base: usize,
    read: usize,
    placed: usize,
    completed: usize,
    recvs: VecDeque<(u64, Option<RecvInto>)>,
    cq: VecDeque<Completion>,
    /// Sends whose completion came before the peer had them (iWARP).
    pub completed_early: u64,
    /// Data messages (RoCE) that found no receive posted at this end: a receiver-not-ready
    /// retry on a device, which the credits we granted should never allow.
    pub data_found_no_recv: u64,
    /// Byte counts of the data writes posted, in order.
    pub data_writes: Vec<usize>,
    /// Every post fails (ENOTCONN), as a device refuses posts on a queue pair that left the
    /// connected state (Soft-iWARP's, once a dead peer reset its TCP connection).
    pub refuse_posts: bool,
    /// The next read of this buffer (registration, byte range) sees those bytes zero, as a
    /// copy sees what the peer's device is still writing when it races it ([`MemEnd::tear_next_read`]).
    torn: std::cell::Cell<Option<(usize, usize, usize)>>,
}

impl MemEnd {
    /// An end with address space `id` (distinct per end, so a write with the other end's key
    /// is caught), iWARP semantics or RoCE's, and an inline size.
    pub fn new(id: u32, iwarp: bool, inline: u32) -> Self {
        MemEnd {
            id,
            iwarp,
            inline,
            regions: Vec::new(),
            wrs: VecDeque::new(),
            base: 0,
            read: 0,
            placed: 0,
            completed: 0,
            recvs: VecDeque::new(),
            cq: VecDeque::new(),
            completed_early: 0,
            data_found_no_recv: 0,
            data_writes: Vec::new(),
            refuse_posts: false,
            torn: std::cell::Cell::new(None),
        }
    }

    /// Makes the next read of buffer `mr` see `range` (offsets in it) zero, as a copy racing
    /// the peer's device sees an entry it is writing in ascending order: the part before
    /// where the device got to still holds the old (zeroed) bytes. Reads after it see the
    /// buffer as it is.
    pub fn tear_next_read(&mut self, mr: usize, range: std::ops::Range<usize>) {
        self.torn.set(Some((mr, range.start, range.end)));
    }

    /// The bytes of one of our buffers (as registered by `mr`).
    pub fn region(&self, mr: usize) -> &[u8] {
        let r = &self.regions[mr];
        assert!(
            r.live,
            "end {}: region {mr} used after its release",
            self.id
        );
        &self.regions[r.owner].bytes[..r.len]
    }

    fn region_mut(&mut self, mr: usize) -> &mut [u8] {
        let (owner, len, live) = {
            let r = &self.regions[mr];
            (r.owner, r.len, r.live)
        };
        assert!(live, "end {}: region {mr} used after its release", self.id);
        &mut self.regions[owner].bytes[..len]
    }

    /// Registrations of ours that are live (a released one is gone, as on a device).
    pub fn live_regions(&self) -> usize {
        self.regions.iter().filter(|r| r.live).count()
    }

    /// Bytes of ours registered (all live registrations).
    pub fn registered_bytes(&self) -> usize {
        self.regions.iter().filter(|r| r.live).map(|r| r.len).sum()
    }

    /// Fills bytes of one of our buffers, anywhere in its allocation (with garbage, say, that
    /// no test may receive).
    pub fn fill(&mut self, mr: usize, range: std::ops::Range<usize>, byte: u8) {
        let owner = self.regions[mr].owner;
        self.regions[owner].bytes[range].fill(byte);
    }

    /// Posted sends not completed yet.
    pub fn uncompleted(&self) -> usize {
        self.base + self.wrs.len() - self.completed
    }

    /// The sends posted and not yet retired (both placed and completed), oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &Wr> {
        self.wrs.iter()
    }

    /// The NIC reads the next posted send's bytes. Returns false if all were read.
    pub fn nic_read(&mut self) -> bool {
        let i = self.read - self.base;
        let Some(wr) = self.wrs.get(i) else {
            return false;
        };
        let data = match &wr.src {
            Src::Bytes(b) => b.clone(),
            Src::Ring(mr, segs, n) => {
                let mut v = Vec::new();
                for &(o, l) in &segs[..*n] {
                    v.extend_from_slice(&self.region(*mr)[o as usize..(o + l) as usize]);
                }
                v
            }
        };
        self.wrs[i].data = Some(data);
        self.read += 1;
        true
    }

    /// Places our next read send at `to`, as its NIC would. Returns false if there is none,
    /// or (RoCE) the message finds no receive posted yet: it is retried later.
    pub fn place_next(&mut self, to: &mut MemEnd) -> bool {
        if self.placed == self.read {
            return false;
        }
        let wr = &self.wrs[self.placed - self.base];
        let data = wr.data.as_ref().expect("read before placed");
        let msg = match wr.op {
            Op::Write(_, imm) => imm.map(|v| (v, None)),
            Op::Send => Some((0, Some(data.clone()))),
            Op::ReadProbe => None,
        };
        if msg.is_some() && to.recvs.is_empty() {
            assert!(
                !to.iwarp,
                "end {}: a message (wr_id {:#x}) found no receive posted: iWARP ends the connection",
                to.id, wr.wr_id
            );
            if let Some((imm, None)) = msg
                && matches!(super::wire::Msg::decode(imm), Ok(super::wire::Msg::Data(_)))
            {
                to.data_found_no_recv += 1;
            }
            return false;
        }
        if let Op::Write((addr, rkey), _) = wr.op
            && !data.is_empty()
        {
            let i = to
                .regions
                .iter()
                .position(|r| r.rkey == rkey)
                .unwrap_or_else(|| panic!("write with rkey {rkey:#x}, never granted"));
            let r = &to.regions[i];
            assert!(r.live, "write with rkey {rkey:#x}, released");
            assert!(r.remote_write, "write into a region not remote-writable");
            let off = addr.checked_sub(r.base).expect("write below the region") as usize;
            assert!(
                off + data.len() <= r.len,
                "write past the region's end ({} bytes at offset {off} of {})",
                data.len(),
                r.len
            );
            to.region_mut(i)[off..off + data.len()].copy_from_slice(data);
        }
        if let Some((imm, bytes)) = msg {
            let (wr_id, into) = to.recvs.pop_front().expect("checked");
            let (imm, len) = match (bytes, into) {
                (Some(b), Some((mr, off, len))) => {
                    assert!(b.len() <= len, "SEND longer than its receive");
                    to.region_mut(mr)[off..off + b.len()].copy_from_slice(&b);
                    (None, b.len() as u32)
                }
                (Some(_), None) => panic!("SEND into a receive without buffer"),
                (None, _) => (Some(imm), 0),
            };
            to.cq.push_back(Completion {
                wr_id,
                ok: true,
                status: 0,
                imm,
                len,
            });
        }
        self.placed += 1;
        self.retire();
        true
    }

    /// Whether our next send may complete: read, and on RoCE also placed.
    pub fn can_complete(&self) -> bool {
        let answered = |i: usize| {
            self.wrs
                .get(i.wrapping_sub(self.base))
                .is_some_and(|w| w.op == Op::ReadProbe)
        };
        self.completed < self.read
            && ((self.iwarp && !answered(self.completed)) || self.completed < self.placed)
    }

    /// Completes our next send if it may. Returns whether it did.
    pub fn complete_next(&mut self) -> bool {
        if !self.can_complete() {
            return false;
        }
        if self.completed >= self.placed {
            self.completed_early += 1;
        }
        let wr_id = self.wrs[self.completed - self.base].wr_id;
        self.cq.push_back(Completion {
            wr_id,
            ok: true,
            status: 0,
            imm: None,
            len: 0,
        });
        self.completed += 1;
        self.retire();
        true
    }

    fn retire(&mut self) {
        while self.base < self.completed.min(self.placed) {
            self.wrs.pop_front();
            self.base += 1;
        }
    }

    /// Delivers everything `from` posted to `to`, in order, completing each at `from`.
    /// Returns the number of sends delivered.
    pub fn deliver_all(from: &mut MemEnd, to: &mut MemEnd) -> usize {
        let mut n = 0;
        while from.nic_read() {}
        while from.place_next(to) {
            n += 1;
        }
        while from.complete_next() {}
        n
    }

    /// Data writes posted so far.
    pub fn data_writes(&self) -> usize {
        self.data_writes.len()
    }

    /// Loses our next send: read and completed, never placed at the peer (a peer that
    /// "forgets" a message). Returns false if there is none.
    pub fn lose_next(&mut self) -> bool {
        if self.placed == self.read && !self.nic_read() {
            return false;
        }
        self.placed += 1;
        while self.complete_next() {}
        self.retire();
        true
    }

    /// The error of a refused post ([`MemEnd::refuse_posts`]), if posts are refused.
    fn refused(&self) -> io::Result<()> {
        if self.refuse_posts {
            return Err(io::Error::from_raw_os_error(107)); // ENOTCONN
        }
        Ok(())
    }

    fn push(&mut self, wr_id: u64, op: Op, src: Src) {
        let wr = Wr {
            wr_id,
            op,
            src,
            data: None,
        };
        if wr.is_data() {
            self.data_writes.push(wr.len());
        }
        self.wrs.push_back(wr);
    }
}

impl Transport for MemEnd {
    type Mr = usize;
    type Seg = Infallible;

    fn register(&mut self, len: usize, remote_write: bool) -> io::Result<usize> {
        self.reserve(len, len, remote_write)
    }

    fn reserve(&mut self, len: usize, cap: usize, remote_write: bool) -> io::Result<usize> {
        assert!(len <= cap, "registration beyond the allocation");
        let i = self.regions.len();
        self.regions.push(Region {
            base: (self.id as u64) << 40 | (i as u64 + 1) << 32,
            rkey: self.id << 8 | i as u32,
            remote_write,
            bytes: vec![0; cap],
            owner: i,
            len,
            live: true,
        });
        Ok(i)
    }

    fn extend(&mut self, mr: usize) -> io::Result<usize> {
        let r = &self.regions[mr];
        assert!(r.live, "extending a released region");
        let (base, remote_write, owner) = (r.base, r.remote_write, r.owner);
        let i = self.regions.len();
        let len = self.regions[owner].bytes.len();
        self.regions.push(Region {
            base,
            rkey: self.id << 8 | i as u32,
            remote_write,
            bytes: Vec::new(),
            owner,
            len,
            live: true,
        });
        Ok(i)
    }

    fn release(&mut self, mr: usize) {
        let r = &mut self.regions[mr];
        assert!(r.live, "region {mr} released twice");
        r.live = false;
    }

    fn remote_handle(&self, mr: usize) -> (u64, u32) {
        (self.regions[mr].base, self.regions[mr].rkey)
    }

    fn read(&self, mr: usize, offset: usize, out: &mut [u8]) {
        out.copy_from_slice(&self.region(mr)[offset..offset + out.len()]);
        if let Some((m, start, end)) = self.torn.take() {
            if m != mr {
                self.torn.set(Some((m, start, end)));
                return;
            }
            for (i, b) in out.iter_mut().enumerate() {
                if (start..end).contains(&(offset + i)) {
                    *b = 0;
                }
            }
        }
    }

    fn write(&mut self, mr: usize, offset: usize, data: &[u8]) {
        self.region_mut(mr)[offset..offset + data.len()].copy_from_slice(data);
    }

    fn inline_size(&self) -> u32 {
        self.inline
    }

    fn post_write(
        &mut self,
        wr_id: u64,
        src: Source<'_, usize, Infallible>,
        remote: (u64, u32),
        imm: Option<u32>,
    ) -> io::Result<()> {
        self.refused()?;
        let src = match src {
            Source::Empty => Src::Bytes(Vec::new()),
            Source::Inline(b) => {
                assert!(
                    b.len() <= self.inline as usize,
                    "inline beyond the QP's size"
                );
                Src::Bytes(b.to_vec())
            }
            Source::Region(mr, segs, n) => {
                for &(o, l) in &segs[..n] {
                    assert!(
                        (o + l) as usize <= self.region(mr).len(),
                        "send outside region"
                    );
                }
                Src::Ring(mr, segs, n)
            }
            Source::User(never) => match never {},
        };
        self.push(wr_id, Op::Write(remote, imm), src);
        Ok(())
    }

    fn post_send(&mut self, wr_id: u64, bytes: &[u8]) -> io::Result<()> {
        self.refused()?;
        assert!(
            bytes.len() <= self.inline as usize,
            "inline beyond the QP's size"
        );
        self.push(wr_id, Op::Send, Src::Bytes(bytes.to_vec()));
        Ok(())
    }

    fn post_read(&mut self, _: u64, dst: Infallible, _: (u64, u32)) -> io::Result<()> {
        match dst {}
    }

    fn post_read_probe(&mut self, wr_id: u64) -> io::Result<()> {
        self.refused()?;
        self.push(wr_id, Op::ReadProbe, Src::Bytes(Vec::new()));
        Ok(())
    }

    fn post_recv(&mut self, wr_id: u64, into: Option<RecvInto>) -> io::Result<()> {
        self.refused()?;
        self.recvs.push_back((wr_id, into));
        Ok(())
    }

    fn poll(&mut self, out: &mut [Completion]) -> io::Result<usize> {
        let mut n = 0;
        while n < out.len() {
            match self.cq.pop_front() {
                Some(c) => out[n] = c,
                None => break,
            }
            n += 1;
        }
        Ok(n)
    }
}
