//! Shutdown and close: control messages, draining the sends, and the disconnect.
//!
//! Lingering close on iWARP. Soft-iWARP completes a send once TCP has taken it, and closes the
//! TCP connection at rdma_disconnect: if the peer's next message (a credit update for the data
//! just sent) then reaches the closed socket, the kernel resets the connection and drops what
//! it had not transmitted yet, the tail of our data. So a closed iWARP socket keeps its
//! connection until the peer sends nothing more (its DISCONNECT arrived, or it disconnected),
//! for at most [`crate::proto::stream::LINGER`]. `rclose` does not wait for that: the service
//! thread does (a linger job), as the kernel does for a TCP socket; and at exit the process
//! waits for the connections still lingering, within their bound.
//!
//! Exit. The kernel closes the TCP sockets of a process that exits, and what they still had
//! to send leaves before the FIN. A connection of ours would go with the process's queue
//! pairs instead, and with it what was staged, gathered or not yet transmitted (on iWARP also
//! what TCP had taken but not sent when the peer's next message met the closed socket: the
//! same reset as above). So at exit ([`at_exit`]) every connection the process still has open
//! is closed as `rclose` closes it, and the process waits for those that linger: all within
//! [`LINGER`], after which it exits anyway (a peer that takes nothing more cannot hold it).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Inner, State, StreamSocket};
use crate::error::{Error, Result};
use crate::proto::stream::LINGER;
use crate::proto::wire::Ctrl;
use crate::socket::service::{self, Jobs};
use crate::trace::trace;

/// At exit (exit(3) or a return from main; registered with the first stream socket): closes
/// this process's connections still open, then waits for the lingering closes, within
/// [`LINGER`] in all (see the module documentation). The closes run on a thread of their own,
/// so that the bound holds even where one would wait (a peer that grants no credit).
pub(super) extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let deadline = Instant::now() + LINGER;
        let pid = std::process::id();
        let own: Vec<_> = StreamSocket::live()
            .into_iter()
            .filter(|s| s.pid == pid)
            .collect();
        if !own.is_empty() {
            let (done, wait) = std::sync::mpsc::channel();
            let closer = crate::verbs::os::without_signals(|| {
                std::thread::Builder::new()
                    .name("rsocket-exit".into())
                    .spawn(move || {
                        for s in own {
                            s.close_at_exit();
                        }
                        let _ = done.send(());
                    })
            });
            if closer.is_ok() {
                let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            }
        }
        service::wait_lingering(deadline);
    });
}

impl StreamSocket {
    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: i32) -> Result<()> {
        let (rd, wr) = match how {
            libc::SHUT_RD => (true, false),
            libc::SHUT_WR => (false, true),
            libc::SHUT_RDWR => (true, true),
            _ => return Err(Error::InvalidArgument),
        };
        // An accepted socket is connected for its caller even while the peer's confirmation
        // (ESTABLISHED) has not been seen yet: wait for it, as the other calls do.
        if matches!(self.lock().state, State::Accepting(_)) {
            self.wait_conn(false, |_| Ok(Some(())))?;
        }
        if wr {
            // Staged sends leave before the shutdown (or are dropped if the connection broke).
            self.close_stage();
            if self.stage.len() > 0 {
                self.wait_conn(false, |_| Ok((self.stage.len() == 0).then_some(())))?;
            }
        }
        let ctrl = {
            let mut g = self.lock();
            let State::Connected(c) = &mut g.state else {
                return Err(Error::NotConnected);
            };
            if wr {
                c.shut_wr = true;
            }
            c.link.core.shutdown(rd, wr)
        };
        let Some(ctrl) = ctrl else {
            return Ok(());
        };
        // Like librdmacm, shutdown waits for a control slot and for the sends to drain.
        self.wait_conn(false, |c| {
            // Gathered data goes before the control message.
            c.link.flush_now()?;
            if !c.link.core.can_send_ctrl() {
                return Ok(None);
            }
            if let Some(m) = c.link.core.post_ctrl(ctrl) {
                c.link.post_msg(m)?;
            }
            Ok(Some(()))
        })?;
        self.wait_conn(false, |c| Ok(c.link.core.all_sends_done().then_some(())))?;
        if ctrl == Ctrl::Disconnect
            && let State::Connected(c) = &mut self.lock().state
        {
            c.link.core.set_disconnected();
            if c.must_linger() {
                c.disconnect_owed = true;
            } else {
                c.id.disconnect();
            }
        }
        Ok(())
    }

    /// Orderly close: disconnect if still connected. Resources go when the last handle drops.
    /// On iWARP the disconnect may linger in the background (see the module documentation).
    pub fn close(&self) -> Result<()> {
        let _call = self.call();
        let connected =
            matches!(&self.lock().state, State::Connected(c) if c.link.core.flags().connected);
        if connected {
            let _ = self.shutdown(libc::SHUT_RDWR);
        }
        let mut g = self.lock();
        // The number goes at once, as a closed descriptor's (and out of every epoll set); a
        // lingering connection keeps only its RDMA resources.
        g.ready = None;
        self.self_driven.store(true, Ordering::Relaxed);
        if let State::Connected(c) = &mut g.state
            && c.disconnect_owed
            && c.must_linger()
        {
            c.link.core.set_keepalive(None, std::time::Instant::now());
            c.link.core.start_linger(std::time::Instant::now());
            drop(g);
            let lingering = self.add_jobs(Jobs {
                linger: true,
                ..Jobs::default()
            });
            self.waker.wake();
            if lingering {
                trace!("{self:?}: lingering close");
                return Ok(());
            }
            g = self.lock();
        }
        self.finish_close(&mut g);
        Ok(())
    }

    /// [`at_exit`]: closes the socket as `rclose` does if it is a connection still open (not
    /// closed already, not lingering, not broken). Listeners and the rest are left to go with
    /// the process.
    fn close_at_exit(&self) {
        let open = {
            let g = self.lock();
            g.ready.is_some()
                && matches!(&g.state, State::Connected(c) if c.link.core.flags().connected)
        };
        if open {
            trace!("{self:?}: closed at exit");
            let _ = self.close();
        }
    }

    /// Disconnects and lets the connection's resources go with the last handle.
    pub(super) fn finish_close(&self, g: &mut Inner) {
        if let State::Connected(c) | State::Connecting(c) | State::Accepting(c) = &mut g.state {
            c.id.disconnect();
        }
        g.state = State::Failed;
        self.waker.wake();
    }
}
