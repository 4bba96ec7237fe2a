//! The service thread across fork(), on the host (no RDMA needed: the sockets are stand-ins).
//! A forked child has only the thread that forked, not the parent's service thread: the
//! child's first job must start the child's own, with none of the parent's sockets, and the
//! parent's must go on. Alone in its test binary, so no other test thread holds a lock when it
//! forks.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rsocket::socket::service::{self, Jobs, Serviced, Wait};

#[derive(Default)]
struct Mock {
    rounds: AtomicU32,
}

impl Serviced for Mock {
    fn serve(&self, jobs: Jobs, now: Instant, _: &[RawFd]) -> Wait {
        self.rounds.fetch_add(1, Ordering::SeqCst);
        Wait {
            jobs,
            fds: Vec::new(),
            deadline: Some(now + Duration::from_millis(5)),
        }
    }

    fn job_failed(&self, _: Jobs) {}
}

const KEEPALIVE: Jobs = Jobs {
    flush: false,
    keepalive: true,
    linger: false,
    watch: false,
    nudge: false,
    persist: false,
};

fn served_again(m: &Mock, rounds: u32) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if m.rounds.load(Ordering::SeqCst) >= rounds + 3 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn service_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .filter(|n| n.trim() == "rsocket-service")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_forked_child_starts_its_own_service_thread() {
    let parent = Arc::new(Mock::default());
    let p: Arc<dyn Serviced> = parent.clone();
    assert!(service::add(&p, KEEPALIVE));
    assert!(served_again(&parent, 0), "the parent's socket is served");
    assert_eq!(service_threads(), 1);
    // SAFETY: fork in a test binary whose other threads (the harness's, the service thread)
    // the child never relies on: it uses no lock they may hold, and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // The child: no service thread until a job comes; the parent's socket is not served
        // here (its copy stays as it was), the child's own is, by one new thread.
        let code = (|| {
            if service_threads() != 0 {
                return 10;
            }
            let before = parent.rounds.load(Ordering::SeqCst);
            let child = Arc::new(Mock::default());
            let c: Arc<dyn Serviced> = child.clone();
            if !service::add(&c, KEEPALIVE) {
                return 11;
            }
            if !served_again(&child, 0) {
                return 12;
            }
            if service_threads() != 1 {
                return 13;
            }
            if parent.rounds.load(Ordering::SeqCst) != before {
                return 14;
            }
            if service::jobs_of(&p) != Jobs::default() || service::jobs_of(&c) != KEEPALIVE {
                return 15;
            }
            0
        })();
        // SAFETY: ends the child at once, running nothing of the parent's.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child we forked; `status` outlives the call.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: exit code {} (see the checks in the child)",
        libc::WEXITSTATUS(status)
    );
    let now = parent.rounds.load(Ordering::SeqCst);
    assert!(served_again(&parent, now), "the parent's service goes on");
    assert_eq!(service::jobs_of(&p), KEEPALIVE);
}
