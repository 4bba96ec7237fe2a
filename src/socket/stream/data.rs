//! Sending and receiving on a connected stream rsocket.

use std::sync::atomic::Ordering;

use super::short::ShortSend;
use super::{StreamSocket, broken};
use crate::error::{Error, Result};
use crate::trace::trace_verbose;
use crate::verbs::raise_sigpipe;

/// What a send call returns: the bytes sent if any went, else the error, with SIGPIPE for
/// EPIPE unless MSG_NOSIGNAL (as a kernel socket).
pub(super) fn send_result(r: Result<usize>, sent: usize, flags: i32) -> Result<usize> {
    match r {
        Ok(n) => Ok(n),
        Err(_) if sent > 0 => Ok(sent),
        Err(Error::BrokenPipe) => {
            if flags & libc::MSG_NOSIGNAL == 0 {
                raise_sigpipe();
            }
            Err(Error::BrokenPipe)
        }
        Err(e) => Err(e),
    }
}

impl StreamSocket {
    /// Sends `buf`; blocking sends everything, non-blocking what fits (EAGAIN if nothing).
    /// Writing after SHUT_WR gives EPIPE and raises SIGPIPE unless MSG_NOSIGNAL.
    pub fn send(&self, buf: &[u8], flags: i32) -> Result<usize> {
        if flags & libc::MSG_ZEROCOPY != 0 && self.lock().opts.zerocopy && !buf.is_empty() {
            return self.send_zero_copy(buf, flags);
        }
        let t0 = crate::verbs::ticks();
        if let Some(n) = self.try_stage(buf, t0) {
            self.touch(t0);
            return Ok(n);
        }
        let nonblock = flags & libc::MSG_DONTWAIT != 0 || self.is_nonblocking();
        if buf.is_empty() {
            return self.wait_conn(true, |_| Ok(Some(0)));
        }
        let mut olen = self.stage.first_write_size(t0);
        let mut sent = 0;
        let mut posted = false;
        match self.send_short(buf, &mut olen) {
            ShortSend::All { posted } => {
                self.sent_directly(t0, olen, posted);
                return Ok(buf.len());
            }
            ShortSend::Part { sent: n, posted: p } => {
                sent = n;
                posted = p;
            }
            ShortSend::No => {}
        }
        let mut pending = false;
        let mut first = true;
        // Tried before the completions are looked at: a send that fits goes at once, without a
        // poll of the CQ that would find nothing (librdmacm's rsend polls only when it cannot
        // send either). A non-blocking send that fits in part is not returned from that try:
        // the completions may have freed room for the rest.
        let r = self.wait_conn_from(nonblock, true, false, |c| {
            let first_try = std::mem::replace(&mut first, false);
            if !self.may_post_data(c)? {
                return Ok(None);
            }
            let before = c.link.sends_posted();
            sent += c.link.send_some(&buf[sent..], &mut olen, true)?;
            posted |= c.link.sends_posted() != before;
            pending = c.link.core.has_pending();
            Ok((sent == buf.len() || (nonblock && sent > 0 && !first_try)).then_some(sent))
        });
        if pending && !self.in_flusher.swap(true, Ordering::AcqRel) {
            // Gathered sends leave when the writes in flight complete, even if we go idle.
            trace_verbose!("fd {}: gathered send, flush job", self.channel.fd());
            self.hand_flush();
        }
        if r.is_ok() {
            self.sent_directly(t0, olen, posted);
        }
        send_result(r, sent, flags)
    }

    /// Receives into `buf` (MSG_PEEK, MSG_WAITALL, MSG_DONTWAIT honoured). 0 means end of stream.
    pub fn recv(&self, buf: &mut [u8], flags: i32) -> Result<usize> {
        let nonblock = flags & libc::MSG_DONTWAIT != 0 || self.is_nonblocking();
        let peek = flags & libc::MSG_PEEK != 0;
        self.stage.on_recv();
        if flags & (libc::MSG_PEEK | libc::MSG_WAITALL) == 0
            && !buf.is_empty()
            && let Some(r) = self.recv_short(buf, nonblock)
        {
            return r;
        }
        let waitall = flags & libc::MSG_WAITALL != 0 && !peek;
        let mut got = 0;
        // Data in hand is returned before the completion queue is looked at: what is there
        // comes later in the stream anyway (a busy receiver of small messages, many to a
        // write, then pays one look per write instead of one per call).
        let r = self.wait_conn_from(nonblock, true, true, |c| {
            if c.link.core.has_data() {
                got += c.link.recv_some(&mut buf[got..], peek);
                c.link.send_credits()?;
                if !waitall || got == buf.len() {
                    return Ok(Some(got));
                }
            }
            if !c.link.core.flags().readable && !c.link.core.has_data() {
                if let Some(e) = c.link.core.error()
                    && got == 0
                {
                    return Err(broken(e));
                }
                return Ok(Some(got));
            }
            Ok(None)
        });
        match r {
            Ok(n) => Ok(n),
            Err(_) if got > 0 => Ok(got),
            Err(e) => Err(e),
        }
    }
}
