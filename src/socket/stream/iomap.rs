//! riomap, riounmap, riowrite and rioread on a connected stream rsocket.
//!
//! Our mappings are registrations of application memory, announced to the peer in the entries
//! of its target iomap (librdmacm's wire, see [`crate::proto::iomap`]); the peer's
//! announcements arrive in ours and are snapshotted into [`PeerWindows`]. Every riowrite and
//! rioread is checked against those windows, for the whole range and the permission, before
//! anything is posted.

use super::{Error, Result, State, StreamSocket};
use crate::proto::driver::Driver;
use crate::proto::iomap::{IomapEntry, IomapError, PERM_READ, PERM_WRITE, PeerWindows};
use crate::proto::stream::DirectKind;
use crate::proto::transport::Source;
use crate::proto::wire::{self, ConnData, RemoteSge};
use crate::verbs::{Endpoint, UserMemory, UserMrId};
use std::collections::VecDeque;

/// RDMA reads in flight per direction (connect parameters; capped by the device). More reads
/// in flight are possible, but asking Soft-RoCE for 8 made 64 KiB streaming (no reads at all)
/// drop from 26.5 to 18.3 MB/s in bench/compare; reads beyond one wait in the send queue.
const MAX_RD_ATOM: u8 = 1;

/// One riomap'd buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct LocalMap {
    pub(super) mr: UserMrId,
    addr: u64,
    len: u64,
    offset: u64,
    perms: u8,
    /// Entry of the peer's target iomap that announces it (none: local only, PROT_NONE).
    index: Option<u16>,
}

/// riomap state of one connection.
#[derive(Debug)]
pub(super) struct IoMaps {
    /// RDMA reads outstanding per direction (connect parameters).
    pub(super) rd_atom: u8,
    windows: PeerWindows,
    maps: Vec<LocalMap>,
    /// Entries of the peer's iomap whose current state (a window or its withdrawal) is owed.
    announce: VecDeque<u16>,
    reads_posted: u64,
}

impl IoMaps {
    pub(super) fn new(dev_rd_atom: u8) -> Self {
        IoMaps {
            rd_atom: dev_rd_atom.min(MAX_RD_ATOM),
            windows: PeerWindows::new(0, false),
            maps: Vec::new(),
            announce: VecDeque::new(),
            reads_posted: 0,
        }
    }

    /// Once the peer's private data is known.
    pub(super) fn start(&mut self, offered: u16, peer: &ConnData) {
        self.windows = PeerWindows::new(offered, peer.is_rsocket_rs());
    }

    /// The local map holding `[addr, addr + len)`, if any.
    pub(super) fn covering(&self, addr: u64, len: u64) -> Option<&LocalMap> {
        self.maps
            .iter()
            .find(|m| addr >= m.addr && addr.checked_add(len).is_some_and(|e| e <= m.addr + m.len))
    }
}

fn window_error(e: IomapError) -> Error {
    match e {
        IomapError::NoWindow => Error::InvalidArgument,
        IomapError::Permission => Error::PermissionDenied,
        IomapError::Unsupported => Error::OpNotSupported,
    }
}

impl IoMaps {
    /// The peer announced (or withdrew) a window in our target iomap; `entry` reads entries.
    pub(super) fn take_window(
        &mut self,
        data: u32,
        entry: &mut dyn FnMut(usize) -> [u8; wire::IOMAP_LEN],
    ) {
        // The core already refused indexes we never offered.
        let _ = self.windows.on_update(data, entry);
    }

    /// Posts the announcements owed, as far as credits and queue entries allow.
    #[inline]
    pub(super) fn send_announcements(&mut self, link: &mut Driver<Endpoint>) -> Result<()> {
        if self.announce.is_empty() {
            return Ok(());
        }
        self.post_announcements(link)
    }

    fn post_announcements(&mut self, link: &mut Driver<Endpoint>) -> Result<()> {
        while let Some(&index) = self.announce.front() {
            let (entry, perms) = match self.maps.iter().find(|m| m.index == Some(index)) {
                Some(m) => {
                    let (addr, key) = link
                        .t
                        .user_remote_handle(m.mr)
                        .ok_or(Error::InvalidArgument)?;
                    let sge = RemoteSge {
                        addr,
                        key,
                        length: m.len as u32,
                    };
                    (
                        IomapEntry {
                            offset: m.offset,
                            sge,
                        },
                        m.perms,
                    )
                }
                None => (IomapEntry::default(), 0),
            };
            let Some(w) = link.core.plan_iomap_announce(index, perms) else {
                break;
            };
            self.announce.pop_front();
            let bytes = entry.to_peer_bytes(w.big_endian);
            link.post_iomap_announce(index, w, &bytes)?;
        }
        Ok(())
    }
}

impl StreamSocket {
    /// Completes a connect or accept in progress (librdmacm maps on an accepted socket at
    /// once); EINVAL when there is no connection, as librdmacm gives.
    fn established(&self) -> Result<()> {
        match self.wait_conn(false, |_| Ok(Some(()))) {
            Err(Error::NotConnected) => Err(Error::InvalidArgument),
            r => r,
        }
    }

    /// riomap: registers `mem` and, with PROT_WRITE (or our PROT_READ extension), offers it to
    /// the peer as the window `[offset, offset + len)` (offset -1: the buffer's address). Returns
    /// the offset. Errors: EINVAL (bad prot, empty or > 4 GiB, not connected, a negative offset,
    /// an overlap with another offered window), ENOMEM (every iomap entry the peer offered is
    /// taken), EOPNOTSUPP (PROT_READ alone towards a librdmacm peer, which cannot be told).
    pub fn iomap(&self, mem: UserMemory, prot: i32, offset: i64) -> Result<u64> {
        if prot & !(libc::PROT_READ | libc::PROT_WRITE) != 0
            || mem.is_empty()
            || mem.len() > u32::MAX as usize
            || offset < -1
        {
            return Err(Error::InvalidArgument);
        }
        let perms = if prot & libc::PROT_READ != 0 {
            PERM_READ
        } else {
            0
        } | if prot & libc::PROT_WRITE != 0 {
            PERM_WRITE
        } else {
            0
        };
        self.established()?;
        let mut g = self.lock();
        let State::Connected(c) = &mut g.state else {
            return Err(Error::InvalidArgument);
        };
        if perms == PERM_READ && !c.link.core.peer_is_rsocket_rs() {
            return Err(Error::OpNotSupported);
        }
        let offset = if offset == -1 {
            mem.addr()
        } else {
            offset as u64
        };
        let len = mem.len() as u64;
        let end = offset.checked_add(len).ok_or(Error::InvalidArgument)?;
        let index = if perms != 0 {
            let overlap =
                c.io.maps
                    .iter()
                    .any(|m| m.index.is_some() && offset < m.offset + m.len && m.offset < end);
            if overlap {
                return Err(Error::InvalidArgument);
            }
            let free = (0..c.link.core.peer_iomap_size())
                .find(|i| !c.io.maps.iter().any(|m| m.index == Some(*i)));
            Some(free.ok_or(Error::NoMemory)?)
        } else {
            None
        };
        let mr = c
            .link
            .t
            .register_user(mem, perms & PERM_READ != 0, perms & PERM_WRITE != 0)?;
        c.io.maps.push(LocalMap {
            mr,
            addr: mem.addr(),
            len,
            offset,
            perms,
            index,
        });
        if let Some(i) = index {
            c.io.announce.retain(|&x| x != i);
            c.io.announce.push_back(i);
            c.io.send_announcements(&mut c.link)?;
        }
        Ok(offset)
    }

    /// riounmap: the mapping of exactly `(addr, len)` goes; an offered window is withdrawn from
    /// the peer first (an rsocket-rs or librdmacm peer then finds no window there). EINVAL if
    /// there is no such mapping.
    pub fn iounmap(&self, addr: u64, len: usize) -> Result<()> {
        self.established()?;
        let mut g = self.lock();
        let State::Connected(c) = &mut g.state else {
            return Err(Error::InvalidArgument);
        };
        let i =
            c.io.maps
                .iter()
                .position(|m| m.addr == addr && m.len == len as u64)
                .ok_or(Error::InvalidArgument)?;
        let m = c.io.maps.swap_remove(i);
        if let Some(index) = m.index {
            c.io.announce.retain(|&x| x != index);
            c.io.announce.push_back(index);
            c.io.send_announcements(&mut c.link)?;
        }
        c.link.t.deregister_user(m.mr);
        Ok(())
    }

    /// riowrite: RDMA-writes `buf` into the peer's window at `offset`. The whole range must lie
    /// in one window the peer mapped for writing: EINVAL (no such window, or the range runs past
    /// its end) or EACCES (mapped without PROT_WRITE), and nothing is written. Data goes through
    /// the send ring (or inline), so `buf` is free again on return; the peer learns of it from
    /// a later rsend on the same socket (the order is kept). Non-blocking sockets and
    /// MSG_DONTWAIT return what was posted, or EAGAIN.
    pub fn iowrite(&self, buf: &[u8], offset: u64, flags: i32) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let (nonblock, zero_copy) = {
            let g = self.lock();
            (
                flags & libc::MSG_DONTWAIT != 0 || g.opts.nonblocking,
                flags & libc::MSG_ZEROCOPY != 0 && g.opts.zerocopy,
            )
        };
        if zero_copy {
            let t = {
                let mut g = self.lock();
                let State::Connected(c) = &mut g.state else {
                    return Err(Error::NotConnected);
                };
                c.progress()?;
                let t =
                    c.io.windows
                        .lookup(offset, buf.len() as u64, PERM_WRITE)
                        .map_err(window_error)?;
                c.link.flush_now()?;
                t
            };
            if let Some(r) = self.iowrite_zero_copy(buf, (t.addr, t.rkey), nonblock) {
                return r;
            }
        }
        let mut done = 0usize;
        let mut target = None;
        let r = self.wait_conn(nonblock, |c| {
            if !self.may_post_data(c)? {
                return Ok(None);
            }
            let t = match target {
                Some(t) => t,
                None => {
                    let t =
                        c.io.windows
                            .lookup(offset, buf.len() as u64, PERM_WRITE)
                            .map_err(window_error)?;
                    // Gathered rsend data goes first: the order on the wire is the call order.
                    c.link.flush_now()?;
                    target = Some(t);
                    t
                }
            };
            while done < buf.len() {
                let left = (buf.len() - done).min(u32::MAX as usize) as u32;
                let Some(d) = c.link.core.plan_direct(DirectKind::Write, left, false) else {
                    break;
                };
                let src = &buf[done..done + d.len as usize];
                let payload = if d.inline {
                    Source::Inline(src)
                } else {
                    c.link.copy_to_ring(&d.ring[..d.ring_segs], src);
                    c.link.ring_source(d.ring, d.ring_segs)
                };
                c.link
                    .post_write(d.wr_id, payload, (t.addr + done as u64, t.rkey))?;
                done += d.len as usize;
            }
            Ok((done == buf.len() || (nonblock && done > 0)).then_some(done))
        });
        if zero_copy && done > 0 {
            // Not registered memory: copied, and the notice says so.
            self.track_zero_copy(true);
        }
        match r {
            Err(_) if done > 0 => Ok(done),
            r => r,
        }
    }

    /// rioread (our extension): RDMA-reads `dst.len()` bytes from the peer's window at `offset`
    /// into `dst`. The whole range must lie in one window the peer (an rsocket-rs peer) mapped
    /// with PROT_READ: EINVAL (no such window, or past its end), EACCES (mapped without
    /// PROT_READ), EOPNOTSUPP (a librdmacm peer, which cannot grant reads); nothing is read
    /// then. `dst` is read into directly when it lies in one of our riomap'd buffers, else it
    /// is registered for the call. Returns once the data is in `dst`, like a memory copy (also
    /// on non-blocking sockets; no flags are used yet).
    pub fn ioread(&self, dst: UserMemory, offset: u64, flags: i32) -> Result<usize> {
        let len = dst.len();
        if len == 0 {
            return Ok(0);
        }
        let _ = flags;
        // Check before registering anything.
        {
            let mut g = self.lock();
            let State::Connected(c) = &mut g.state else {
                return Err(Error::NotConnected);
            };
            c.progress()?;
            c.io.windows
                .lookup(offset, len as u64, PERM_READ)
                .map_err(window_error)?;
        }
        let (mr, temporary) = {
            let mut g = self.lock();
            let State::Connected(c) = &mut g.state else {
                return Err(Error::NotConnected);
            };
            match c.io.covering(dst.addr(), len as u64) {
                Some(m) => (m.mr, false),
                None => (c.link.t.register_user(dst, false, false)?, true),
            }
        };
        let mut done = 0usize;
        let mut last = None;
        let r = self.wait_conn(false, |c| {
            if !c.link.core.flags().connected {
                return Err(Error::ConnectionReset);
            }
            let t =
                c.io.windows
                    .lookup(offset, len as u64, PERM_READ)
                    .map_err(window_error)?;
            while done < len {
                let mut left = (len - done).min(u32::MAX as usize) as u32;
                let remote = t.addr + done as u64;
                if c.link.t.splits_short()
                    && let Some(first) = crate::verbs::short_page_split(remote, left)
                {
                    left = first;
                }
                let Some(d) = c.link.core.plan_direct(DirectKind::Read, left, true) else {
                    break;
                };
                let seg = c
                    .link
                    .t
                    .user_seg(mr, dst.addr() + done as u64, d.len)
                    .ok_or(Error::InvalidArgument)?;
                c.link.post_read(d.wr_id, seg, (remote, t.rkey))?;
                c.io.reads_posted += 1;
                last = Some(c.io.reads_posted);
                done += d.len as usize;
            }
            Ok(
                (done == len && last.is_some_and(|l| c.link.core.reads_completed() >= l))
                    .then_some(done),
            )
        });
        // Also after a failure: reads still in flight would find the QP in error (flushed).
        if let Some(l) = last
            && r.is_err()
        {
            let _ = self.wait_conn(false, |c| {
                Ok(
                    (c.link.core.reads_completed() >= l || !c.link.core.flags().connected)
                        .then_some(()),
                )
            });
        }
        if temporary && let State::Connected(c) = &mut self.lock().state {
            c.link.t.deregister_user(mr);
        }
        r
    }
}
