//! Lingering close on iWARP. Soft-iWARP completes a send once TCP has taken it, and closes the
//! TCP connection at rdma_disconnect: if the peer's next message (a credit update for the data
//! just sent) then reaches the closed socket, the kernel resets the connection and drops what
//! it had not transmitted yet, the tail of our data. So a closed iWARP socket keeps its
//! connection until the peer sends nothing more (its DISCONNECT arrived, or it disconnected),
//! for at most [`LINGER`]. `rclose` does not wait for that: one thread per process does, as the
//! kernel does for a TCP socket; and at exit the process waits for the connections still
//! lingering, within their bounds.

use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::socket::stream::StreamSocket;
use crate::verbs::{Waker, poll_fds, run_at_exit};

/// How long a closed connection may wait for the peer.
pub const LINGER: Duration = Duration::from_secs(2);

struct Lingering {
    /// The closed sockets and when each must go at the latest.
    sockets: Mutex<Vec<(Arc<StreamSocket>, Instant)>>,
    /// Signalled when a socket leaves (the exit handler waits on it).
    left: Condvar,
    wake: Waker,
    /// The process that runs the thread: a forked child inherits the list, not the thread.
    pid: u32,
}

/// The service, once started (None inside: it could not start).
static SERVICE: OnceLock<Option<Lingering>> = OnceLock::new();

/// The service, started on first use.
fn lingering() -> Option<&'static Lingering> {
    SERVICE
        .get_or_init(|| {
            let l = Lingering {
                sockets: Mutex::new(Vec::new()),
                left: Condvar::new(),
                wake: Waker::new().ok()?,
                pid: std::process::id(),
            };
            std::thread::Builder::new()
                .name("rsocket-linger".into())
                .spawn(run)
                .ok()?;
            run_at_exit(at_exit);
            Some(l)
        })
        .as_ref()
}

/// Lets a closed socket linger; it is disconnected at once if the service cannot run.
pub fn start(s: Arc<StreamSocket>) {
    let Some(l) = lingering() else {
        s.end_linger();
        return;
    };
    crate::trace::trace!("{s:?}: lingering close");
    l.sockets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((s, Instant::now() + LINGER));
    l.wake.wake();
}

/// Whether `s` is closed and lingering now (for tests and diagnostics; does not start the
/// service).
pub fn holds(s: &StreamSocket) -> bool {
    SERVICE.get().and_then(Option::as_ref).is_some_and(|l| {
        l.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(x, _)| std::ptr::eq(Arc::as_ptr(x), s))
    })
}

fn run() {
    // Waits for `lingering` to have finished initialising (the thread may start before).
    let Some(l) = lingering() else { return };
    loop {
        let now = Instant::now();
        let list: Vec<(Arc<StreamSocket>, Instant)> =
            l.sockets.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut fds = vec![libc::pollfd {
            fd: l.wake.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let mut done = Vec::new();
        let mut next: Option<Instant> = None;
        for (s, deadline) in &list {
            match s.linger_state() {
                Some(wait) if *deadline > now => {
                    fds.extend(wait.iter().map(|&fd: &RawFd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    }));
                    next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
                }
                _ => done.push(Arc::clone(s)),
            }
        }
        if !done.is_empty() {
            for s in &done {
                s.end_linger();
            }
            l.sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(s, _)| !done.iter().any(|d| Arc::ptr_eq(d, s)));
            l.left.notify_all();
            // The list changed: look again before sleeping.
            continue;
        }
        drop(list);
        let ms = next.map_or(-1, |n| {
            n.saturating_duration_since(now)
                .as_millis()
                .min(i32::MAX as u128) as i32
                + 1
        });
        let _ = poll_fds(&mut fds, ms);
        if fds[0].revents != 0 {
            l.wake.reset();
        }
    }
}

/// At exit: waits for the lingering connections (each within its bound), so that a program
/// that closes and returns from main does not lose the tail of its data either.
extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(|| {
        let Some(l) = lingering() else { return };
        if l.pid != std::process::id() {
            return;
        }
        let mut list = l.sockets.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(last) = list.iter().map(|(_, d)| *d).max() {
            let left = last.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            list = l
                .left
                .wait_timeout(list, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    });
}
