//! The keepalive service: one thread per process, started by the first SO_KEEPALIVE, that
//! probes idle connections (see `StreamSocket::keepalive_tick`). A probe that is not
//! acknowledged fails the connection with ETIMEDOUT on the next call, as with TCP.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::socket::stream::StreamSocket;

/// How often the service looks at the registered sockets.
const TICK: Duration = Duration::from_millis(250);

fn registry() -> &'static Mutex<Vec<Weak<StreamSocket>>> {
    static REG: OnceLock<Mutex<Vec<Weak<StreamSocket>>>> = OnceLock::new();
    REG.get_or_init(|| {
        std::thread::Builder::new()
            .name("rsocket-keepalive".into())
            .spawn(run)
            .expect("spawn the keepalive thread");
        Mutex::new(Vec::new())
    })
}

/// Adds a socket to the service (it leaves when the socket is dropped).
pub fn register(s: &Arc<StreamSocket>) {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if !reg.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(s))) {
        reg.push(Arc::downgrade(s));
    }
}

fn run() {
    loop {
        std::thread::sleep(TICK);
        let live: Vec<Arc<StreamSocket>> = {
            let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
            reg.retain(|w| w.strong_count() > 0);
            reg.iter().filter_map(Weak::upgrade).collect()
        };
        let now = Instant::now();
        for s in live {
            // A failed probe is reported through the socket itself; nothing to do here.
            let _ = s.keepalive_tick(now);
        }
    }
}
