//! Zero-copy sends in the shape of Linux's MSG_ZEROCOPY.
//!
//! With SO_ZEROCOPY on, `rsend(…, MSG_ZEROCOPY)` and `riowrite(…, MSG_ZEROCOPY)` from memory the
//! application registered with riomap (any protection, PROT_NONE for local only) are RDMA-written
//! straight from that memory: the call returns once the writes are posted, and the buffer must
//! stay untouched until its notice arrives. Each such call that sends anything gets the next
//! 32-bit id (from 0). Notices are read with `rrecvmsg(…, MSG_ERRQUEUE)` as a
//! `sock_extended_err` (origin SO_EE_ORIGIN_ZEROCOPY, ids `ee_info..=ee_data`), and rpoll reports
//! POLLERR while one waits, exactly as for a kernel socket. A call from memory that is not
//! registered is copied instead and its notice says so (SO_EE_CODE_ZEROCOPY_COPIED).

use std::collections::VecDeque;

use super::data::send_result;
use super::{Error, Result, State, StreamSocket};
use crate::proto::stream::DirectKind;
use crate::proto::transport::Source;

/// Completed MSG_ZEROCOPY calls `lo..=hi` (ids), as one error-queue notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroCopyNotice {
    /// First id.
    pub lo: u32,
    /// Last id (inclusive).
    pub hi: u32,
    /// The data was copied (the buffer was not registered): SO_EE_CODE_ZEROCOPY_COPIED.
    pub copied: bool,
}

/// MSG_ZEROCOPY state of one connection.
#[derive(Debug, Default)]
pub(super) struct ZeroCopy {
    next_id: u32,
    /// Calls in flight: id, send sequence number that completes it, copied.
    inflight: VecDeque<(u32, u64, bool)>,
    /// Completed calls not yet read, consecutive ones merged.
    ready: VecDeque<ZeroCopyNotice>,
}

impl ZeroCopy {
    /// Records a call whose work requests are all posted once `posted` sends were posted.
    pub(super) fn track(&mut self, posted: u64, copied: bool) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.inflight.push_back((id, posted, copied));
    }

    /// Moves the calls whose sends completed (`completed` so far) to the notices.
    #[inline]
    pub(super) fn reap(&mut self, completed: u64) {
        if !self.inflight.is_empty() {
            self.reap_completed(completed);
        }
    }

    fn reap_completed(&mut self, completed: u64) {
        while let Some(&(id, seq, copied)) = self.inflight.front() {
            if seq > completed {
                break;
            }
            self.inflight.pop_front();
            match self.ready.back_mut() {
                Some(n) if n.copied == copied && n.hi.wrapping_add(1) == id => n.hi = id,
                _ => self.ready.push_back(ZeroCopyNotice {
                    lo: id,
                    hi: id,
                    copied,
                }),
            }
        }
    }

    pub(super) fn has_notice(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Calls whose sends have not all completed (their notices come with send completions).
    pub(super) fn in_flight(&self) -> bool {
        !self.inflight.is_empty()
    }
}

impl StreamSocket {
    /// rsend with MSG_ZEROCOPY (SO_ZEROCOPY on): see the module documentation.
    pub(super) fn send_zero_copy(&self, buf: &[u8], flags: i32) -> Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0 || self.is_nonblocking();
        let addr = buf.as_ptr() as u64;
        let mut sent = 0usize;
        let mut olen = crate::proto::stream::OLAP_START_SIZE;
        // None until the first round: then whether the buffer is registered (and where).
        let mut source = None;
        let r = self.wait_conn(nonblock, |c| {
            if !self.may_post_data(c)? {
                return Ok(None);
            }
            let mr = match source {
                Some(m) => m,
                None => {
                    // Gathered sends leave first: the order is the call order.
                    c.link.flush_now()?;
                    let m = c.io.covering(addr, buf.len() as u64).map(|m| m.mr);
                    source = Some(m);
                    m
                }
            };
            match mr {
                None => sent += c.link.send_some(&buf[sent..], &mut olen, false)?,
                Some(mr) => {
                    while sent < buf.len() {
                        let left = (buf.len() - sent).min(u32::MAX as usize) as u32;
                        let Some(w) = c.link.core.plan_write_zero_copy(left) else {
                            break;
                        };
                        let seg = c
                            .link
                            .t
                            .user_seg(mr, addr + sent as u64, w.len)
                            .ok_or(Error::InvalidArgument)?;
                        c.link.post_zero_copy(w, seg)?;
                        sent += w.len as usize;
                    }
                }
            }
            Ok((sent == buf.len() || (nonblock && sent > 0)).then_some(sent))
        });
        if sent > 0 {
            self.track_zero_copy(source.flatten().is_none());
        }
        send_result(r, sent, flags)
    }

    /// riowrite with MSG_ZEROCOPY from a registered buffer: posts direct writes from it.
    /// Returns `None` when `buf` is not registered (the caller copies, then tracks it).
    pub(super) fn iowrite_zero_copy(
        &self,
        buf: &[u8],
        target: (u64, u32),
        nonblock: bool,
    ) -> Option<Result<usize>> {
        let addr = buf.as_ptr() as u64;
        let mr = {
            let g = self.lock();
            let State::Connected(c) = &g.state else {
                return Some(Err(Error::NotConnected));
            };
            c.io.covering(addr, buf.len() as u64)?.mr
        };
        let mut done = 0usize;
        let r = self.wait_conn(nonblock, |c| {
            if !c.link.core.flags().writable {
                return Err(Error::ConnectionReset);
            }
            if self.stage.len() > 0 {
                // Staged sends go first: the order on the wire is the call order.
                return Ok(None);
            }
            while done < buf.len() {
                let left = (buf.len() - done).min(u32::MAX as usize) as u32;
                let Some(d) = c.link.core.plan_direct(DirectKind::Write, left, true) else {
                    break;
                };
                let seg = c
                    .link
                    .t
                    .user_seg(mr, addr + done as u64, d.len)
                    .ok_or(Error::InvalidArgument)?;
                c.link.post_write(
                    d.wr_id,
                    Source::User(seg),
                    (target.0 + done as u64, target.1),
                )?;
                done += d.len as usize;
            }
            Ok((done == buf.len() || (nonblock && done > 0)).then_some(done))
        });
        if done > 0 {
            self.track_zero_copy(false);
        }
        Some(match r {
            Err(_) if done > 0 => Ok(done),
            r => r,
        })
    }

    /// Gives the MSG_ZEROCOPY call just made its id; its notice comes once every send posted so
    /// far has completed.
    pub(super) fn track_zero_copy(&self, copied: bool) {
        if let State::Connected(c) = &mut self.lock().state {
            let posted = c.link.sends_posted();
            c.zc.track(posted, copied);
            c.zc.reap(c.link.sends_completed());
        }
    }

    /// Takes the next MSG_ZEROCOPY notice (rrecvmsg with MSG_ERRQUEUE); EAGAIN when none
    /// waits, as for a kernel socket.
    pub fn zero_copy_notice(&self) -> Result<ZeroCopyNotice> {
        let mut g = self.lock();
        let State::Connected(c) = &mut g.state else {
            return Err(Error::WouldBlock);
        };
        c.progress()?;
        c.zc.ready.pop_front().ok_or(Error::WouldBlock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_come_in_order_and_merge_consecutive_ids() {
        let mut z = ZeroCopy::default();
        z.track(3, false); // id 0 done after 3 sends
        z.track(5, false); // id 1
        z.track(6, true); // id 2, copied
        z.track(9, false); // id 3
        z.reap(2);
        assert!(!z.has_notice());
        z.reap(6);
        assert_eq!(
            Vec::from(z.ready.clone()),
            vec![
                ZeroCopyNotice {
                    lo: 0,
                    hi: 1,
                    copied: false
                },
                ZeroCopyNotice {
                    lo: 2,
                    hi: 2,
                    copied: true
                }
            ]
        );
        z.reap(100);
        assert_eq!(z.ready.len(), 3);
        assert_eq!(z.ready[2].lo, 3);
    }
}
