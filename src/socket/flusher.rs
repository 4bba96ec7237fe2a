//! The flusher: small sends gathered while earlier writes were in flight (see
//! `Stream::plan_send`) must leave when those writes complete, even if the application makes no
//! further call. One thread per process sleeps on the completion channels of the sockets that
//! hold gathered data and posts it; it is idle (blocked on an eventfd) otherwise.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::socket::stream::StreamSocket;
use crate::verbs::{Waker, poll_fds};

struct Flusher {
    sockets: Mutex<Vec<Weak<StreamSocket>>>,
    wake: Waker,
}

fn flusher() -> &'static Flusher {
    static F: OnceLock<Flusher> = OnceLock::new();
    F.get_or_init(|| {
        std::thread::Builder::new()
            .name("rsocket-flusher".into())
            .spawn(run)
            .expect("spawn the flusher thread");
        Flusher {
            sockets: Mutex::new(Vec::new()),
            wake: Waker::new().expect("eventfd for the flusher"),
        }
    })
}

/// Hands a socket with gathered sends to the flusher.
pub fn register(s: Weak<StreamSocket>) {
    let f = flusher();
    let mut list = f.sockets.lock().unwrap_or_else(|p| p.into_inner());
    if !list.iter().any(|w| w.ptr_eq(&s)) {
        list.push(s);
    }
    drop(list);
    f.wake.wake();
}

fn run() {
    let f = flusher();
    loop {
        let socks: Vec<Arc<StreamSocket>> = {
            let list = f.sockets.lock().unwrap_or_else(|p| p.into_inner());
            list.iter().filter_map(Weak::upgrade).collect()
        };
        let mut fds = vec![libc::pollfd {
            fd: f.wake.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let mut waiting = Vec::new();
        for s in &socks {
            // Errors show up on the application's next call; the flusher just lets go.
            if let Ok(Some(fd)) = s.flush_state() {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                waiting.push(Arc::downgrade(s));
            }
        }
        {
            // Keep what still waits, plus anything registered meanwhile.
            let mut list = f.sockets.lock().unwrap_or_else(|p| p.into_inner());
            // flush_state clears the flag (under the socket's lock) when nothing waits; a send
            // that gathers again sets it before registering, so this cannot drop a live entry.
            list.retain(|w| {
                w.upgrade()
                    .is_some_and(|s| s.in_flusher.load(Ordering::Acquire))
            });
        }
        drop(socks);
        let _ = poll_fds(&mut fds, -1);
        if fds[0].revents != 0 {
            f.wake.reset();
        }
        for (w, p) in waiting.iter().zip(&fds[1..]) {
            if p.revents != 0
                && let Some(s) = w.upgrade()
            {
                // Takes the completion event (passing it on to a thread sleeping in a call).
                let _ = s.flusher_woke(p.fd);
            }
        }
    }
}
