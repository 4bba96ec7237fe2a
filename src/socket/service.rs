//! The service thread: one per process, for the background work of every socket. A socket
//! hands it jobs ([`Jobs`]): post the small sends it gathered once the writes in flight
//! complete (even if the application makes no further call), probe an idle connection
//! (SO_KEEPALIVE), finish a lingering close (iWARP, see `socket::stream::close`). One registry, one
//! wait loop: each round asks every registered socket to do its due jobs ([`Serviced::serve`]),
//! which says what to sleep on and until when (the deadlines come from the protocol core, from
//! the time passed in); the thread then sleeps in one poll(2) on all of it.
//!
//! A job that panics fails its socket with an error (EIO on its next call, waiters woken)
//! instead of leaving it waiting for ever; the other sockets go on. A forked child does not
//! inherit the thread: the first job registered in the child starts the child's own, with an
//! empty registry (the parent's sockets are not the child's to serve). At exit the process
//! waits for the closes still lingering ([`wait_lingering`]).
//!
//! The thread starts with the first job and then stays, blocked in poll(2) when idle.

use std::os::fd::RawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

use crate::trace::{trace, trace_verbose};
use crate::verbs::{Timer, Waker, poll_fds_for, pollin};

/// The jobs a socket has with the service (a set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Jobs {
    /// Gathered or staged sends wait for writes in flight.
    pub flush: bool,
    /// SO_KEEPALIVE is on.
    pub keepalive: bool,
    /// The socket is closed and its connection lingers.
    pub linger: bool,
    /// Its descriptor shows its readiness: what arrives while the application is outside a
    /// call is shown by the service thread.
    pub watch: bool,
    /// A new iWARP connection we initiated, not yet heard from: see `StreamSocket::nudge_job`.
    pub nudge: bool,
    /// A send waits for the peer's room: see `StreamSocket::persist_job`.
    pub persist: bool,
}

impl Jobs {
    /// No job at all.
    pub fn is_empty(&self) -> bool {
        !(self.flush || self.keepalive || self.linger || self.watch || self.nudge || self.persist)
    }

    fn union(self, o: Jobs) -> Jobs {
        Jobs {
            flush: self.flush || o.flush,
            keepalive: self.keepalive || o.keepalive,
            linger: self.linger || o.linger,
            watch: self.watch || o.watch,
            nudge: self.nudge || o.nudge,
            persist: self.persist || o.persist,
        }
    }
}

/// What a socket's jobs wait for after a round.
#[derive(Debug, Clone, Default)]
pub struct Wait {
    /// The jobs still to do (the others are done).
    pub jobs: Jobs,
    /// Descriptors that become readable when a job may progress.
    pub fds: Vec<RawFd>,
    /// When a job is due at the latest.
    pub deadline: Option<Instant>,
}

/// A socket the service can serve.
pub trait Serviced: Send + Sync {
    /// Does the due part of `jobs` at `now`. `ready` lists the descriptors of this socket that
    /// poll(2) found readable since the last round (wake-ups to consume).
    fn serve(&self, jobs: Jobs, now: Instant, ready: &[RawFd]) -> Wait;
    /// A job panicked: fail the socket with an error, release the jobs' state.
    fn job_failed(&self, jobs: Jobs);
}

/// A registered socket: lingering ones are held (nobody else does), the others only referred
/// to (they leave when the application drops them).
enum Handle {
    Weak(Weak<dyn Serviced>),
    Held(Arc<dyn Serviced>),
}

impl Handle {
    fn get(&self) -> Option<Arc<dyn Serviced>> {
        match self {
            Handle::Weak(w) => w.upgrade(),
            Handle::Held(a) => Some(a.clone()),
        }
    }

    fn ptr(&self) -> *const () {
        match self {
            Handle::Weak(w) => w.as_ptr() as *const (),
            Handle::Held(a) => Arc::as_ptr(a) as *const (),
        }
    }

    fn is(&self, s: &Arc<dyn Serviced>) -> bool {
        std::ptr::eq(self.ptr(), Arc::as_ptr(s) as *const ())
    }
}

struct Entry {
    socket: Handle,
    jobs: Jobs,
    /// Bumped at every [`add`]: jobs added while a round served the socket are kept.
    generation: u64,
    /// Its descriptors found readable by the last poll.
    ready: Vec<RawFd>,
    /// When its jobs are due, if they wait only for a time (no descriptor).
    due: Option<Instant>,
}

struct Service {
    /// The process that runs the thread.
    pid: u32,
    entries: Mutex<Vec<Entry>>,
    /// Signalled when a lingering socket leaves (the exit handler waits on it).
    left: Condvar,
    wake: Waker,
    /// Wakes the thread at the earliest time a job was added for ([`add_at`]) while it slept;
    /// None if it could not be made (every such job then wakes the thread at once).
    timer: Option<Timer>,
    /// When `timer` fires next (None: not set since the thread last woke).
    timer_at: Mutex<Option<Instant>>,
}

/// The current process's service (None until the first job; a parent's after fork). Services
/// are leaked: the thread of one lives as long as the process.
static CURRENT: Mutex<Option<&'static Service>> = Mutex::new(None);

/// Starts a new service thread now, from the calling thread; the old one keeps the sockets it
/// had. For a process whose credentials changed (setuid and the like give every thread
/// credentials of its own, and the kernel serves a CM or verbs file's write(2) commands only to
/// the credentials the file was opened with): a thread made from the one that changed them
/// shares its credentials, an older one never does again. So this is called from the thread
/// that changed them (started lazily, from whichever thread adds the next job, it could be an
/// old one).
pub fn restart() {
    let _ = start(&mut CURRENT.lock().unwrap_or_else(|e| e.into_inner()));
}

fn current() -> Option<&'static Service> {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new service and its thread, made the current one (None: it could not start).
fn start(cur: &mut Option<&'static Service>) -> Option<&'static Service> {
    let s: &'static Service = Box::leak(Box::new(Service {
        pid: std::process::id(),
        entries: Mutex::new(Vec::new()),
        left: Condvar::new(),
        wake: Waker::new().ok()?,
        timer: Timer::new().ok(),
        timer_at: Mutex::new(None),
    }));
    // The thread blocks every signal (see without_signals).
    crate::verbs::os::without_signals(|| {
        std::thread::Builder::new()
            .name("rsocket-service".into())
            .spawn(move || run(s))
    })
    .ok()?;
    *cur = Some(s);
    Some(s)
}

/// The service of this process, started if needed (None: it could not start).
fn service() -> Option<&'static Service> {
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = *cur
        && s.pid == std::process::id()
    {
        return Some(s);
    }
    start(&mut cur)
}

/// Adds `jobs` to the socket's jobs with the service, due now. Returns false if the service
/// could not start (the caller does the work itself then, or goes without).
pub fn add(s: &Arc<dyn Serviced>, jobs: Jobs) -> bool {
    add_due(s, jobs, None)
}

/// Adds `jobs` to the socket's jobs with the service, due at `at` (the socket's other jobs are
/// not put off by it). The thread is not woken now: it wakes at `at` (see [`Timer`]). Returns
/// false if the service could not start.
pub fn add_at(s: &Arc<dyn Serviced>, jobs: Jobs, at: Instant) -> bool {
    add_due(s, jobs, Some(at))
}

fn add_due(s: &Arc<dyn Serviced>, jobs: Jobs, at: Option<Instant>) -> bool {
    let Some(svc) = service() else {
        return false;
    };
    // Without a timer a job due later wakes the thread now, as one due now does.
    let at = at.filter(|_| svc.timer.is_some());
    let mut list = svc.entries.lock().unwrap_or_else(|e| e.into_inner());
    match list.iter_mut().find(|e| e.socket.is(s)) {
        Some(e) => {
            e.jobs = e.jobs.union(jobs);
            e.generation += 1;
            // A socket served every round (its jobs wait for a descriptor, or were added due
            // now) stays so; one that waits for a time waits for the sooner of the two.
            e.due = e.due.and_then(|d| at.map(|a| d.min(a)));
            if jobs.linger {
                e.socket = Handle::Held(s.clone());
            }
        }
        None => list.push(Entry {
            socket: if jobs.linger {
                Handle::Held(s.clone())
            } else {
                Handle::Weak(Arc::downgrade(s))
            },
            jobs,
            generation: 0,
            ready: Vec::new(),
            due: at,
        }),
    }
    drop(list);
    match (at, &svc.timer) {
        (Some(at), Some(timer)) => {
            // After the entry: a thread that already took its round's work sleeps no longer
            // than the timer, one that did not yet sees the entry's due time in that round.
            let mut set = svc.timer_at.lock().unwrap_or_else(|e| e.into_inner());
            if set.is_none_or(|t| at < t) {
                if timer
                    .set_after(at.saturating_duration_since(Instant::now()))
                    .is_ok()
                {
                    *set = Some(at);
                } else {
                    drop(set);
                    svc.wake.wake();
                }
            }
        }
        _ => svc.wake.wake(),
    }
    true
}

/// The jobs `s` has with the service now (for tests and diagnostics).
pub fn jobs_of(s: &Arc<dyn Serviced>) -> Jobs {
    current()
        .filter(|svc| svc.pid == std::process::id())
        .and_then(|svc| {
            let list = svc.entries.lock().unwrap_or_else(|e| e.into_inner());
            list.iter().find(|e| e.socket.is(s)).map(|e| e.jobs)
        })
        .unwrap_or_default()
}

/// The shortest timed sleep of the service thread.
const MIN_SLEEP: std::time::Duration = std::time::Duration::from_micros(100);

fn run(svc: &'static Service) {
    loop {
        let now = Instant::now();
        // Take the round's work out, so sockets can register meanwhile.
        type Work = (Arc<dyn Serviced>, Jobs, u64, Vec<RawFd>);
        let mut next: Option<Instant> = None;
        let mut work: Vec<Work> = {
            let mut list = svc.entries.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|e| e.socket.get().is_some());
            list.iter_mut()
                .filter_map(|e| {
                    // A socket whose jobs wait only for a time that has not come is left alone
                    // (keepalive timers: no work per wake-up of the others).
                    if let Some(d) = e.due
                        && d > now
                        && e.ready.is_empty()
                    {
                        next = Some(next.map_or(d, |n| n.min(d)));
                        return None;
                    }
                    let s = e.socket.get()?;
                    Some((s, e.jobs, e.generation, std::mem::take(&mut e.ready)))
                })
                .collect()
        };
        // Sockets whose descriptors woke us first: what arrived is shown before the other
        // sockets' jobs run (a program asleep on the descriptor waits for it).
        work.sort_by_key(|(_, _, _, ready)| ready.is_empty());
        let mut fds = vec![pollin(svc.wake.fd())];
        if let Some(t) = &svc.timer {
            fds.push(pollin(t.fd()));
        }
        // The sockets' descriptors follow the service's own.
        let own = fds.len();
        let mut owners: Vec<Weak<dyn Serviced>> = Vec::new();
        let mut results = Vec::with_capacity(work.len());
        for (s, jobs, _, ready) in &work {
            let w = match catch_unwind(AssertUnwindSafe(|| s.serve(*jobs, now, ready))) {
                Ok(w) => w,
                Err(_) => {
                    trace!("service: a job panicked; its socket fails");
                    // Failing the socket must not take the thread down either.
                    let _ = catch_unwind(AssertUnwindSafe(|| s.job_failed(*jobs)));
                    Wait::default()
                }
            };
            for &fd in &w.fds {
                fds.push(pollin(fd));
                owners.push(Arc::downgrade(s));
            }
            if let Some(d) = w.deadline {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
            results.push((w.jobs, w.fds.is_empty().then_some(w.deadline).flatten()));
        }
        let mut lingering_left = false;
        {
            let mut list = svc.entries.lock().unwrap_or_else(|e| e.into_inner());
            for ((s, done, generation, _), (left, due)) in work.iter().zip(&results) {
                if let Some(e) = list.iter_mut().find(|e| e.socket.is(s)) {
                    // Jobs added while the round served the socket stay (they are served
                    // again next round); the others are what the round left.
                    let jobs = if e.generation == *generation {
                        e.due = *due;
                        *left
                    } else {
                        left.union(e.jobs)
                    };
                    lingering_left |= done.linger && !jobs.linger;
                    e.jobs = jobs;
                    if !e.jobs.linger
                        && let Handle::Held(a) = &e.socket
                    {
                        e.socket = Handle::Weak(Arc::downgrade(a));
                    }
                }
            }
            list.retain(|e| !e.jobs.is_empty());
        }
        if lingering_left {
            svc.left.notify_all();
        }
        drop(work);
        // To the microsecond (a flush job's deadline is a post's time away, see
        // `stream::stage`), but at least MIN_SLEEP: a job whose time keeps being now must not
        // turn this loop into a busy one.
        let timeout = next.map(|n| n.saturating_duration_since(Instant::now()).max(MIN_SLEEP));
        let _ = poll_fds_for(&mut fds, timeout);
        let timed = own > 1 && fds[1].revents != 0;
        trace_verbose!(
            "service: woke ({}{}{} of {} descriptors ready, timeout {:?})",
            if fds[0].revents != 0 { "waker, " } else { "" },
            if timed { "timer, " } else { "" },
            fds[own..].iter().filter(|p| p.revents != 0).count(),
            fds.len() - own,
            timeout
        );
        if fds[0].revents != 0 {
            svc.wake.reset();
        }
        if let Some(t) = &svc.timer {
            // Before the next round takes its work: a job added at a time from here on sets
            // the timer again (see add_due).
            let mut set = svc.timer_at.lock().unwrap_or_else(|e| e.into_inner());
            if timed {
                t.reset();
            }
            if timed || set.is_some_and(|at| at <= Instant::now()) {
                *set = None;
            }
        }
        // Hand each socket the wake-ups that are its own, for the next round.
        let mut list = svc.entries.lock().unwrap_or_else(|e| e.into_inner());
        for (p, owner) in fds[own..].iter().zip(&owners) {
            if p.revents == 0 {
                continue;
            }
            let ptr = owner.as_ptr() as *const ();
            if let Some(e) = list.iter_mut().find(|e| e.socket.ptr() == ptr) {
                e.ready.push(p.fd);
            }
        }
    }
}

/// At exit (see `socket::stream::close`): waits until no socket of this process lingers any
/// more, or until `deadline`, so that a program that closes and returns from main does not
/// lose the tail of its data either.
pub(crate) fn wait_lingering(deadline: Instant) {
    let _ = catch_unwind(|| {
        let Some(svc) = current().filter(|s| s.pid == std::process::id()) else {
            return;
        };
        let mut list = svc.entries.lock().unwrap_or_else(|e| e.into_inner());
        while list.iter().any(|e| e.jobs.linger) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            list = svc
                .left
                .wait_timeout(list, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;

    /// A socket stand-in: counts its rounds, panics when told to.
    #[derive(Default)]
    struct Mock {
        rounds: AtomicU32,
        panic_next: AtomicBool,
        failed: AtomicBool,
    }

    impl Serviced for Mock {
        fn serve(&self, jobs: Jobs, now: Instant, _: &[RawFd]) -> Wait {
            if self.panic_next.swap(false, Ordering::SeqCst) {
                panic!("injected");
            }
            self.rounds.fetch_add(1, Ordering::SeqCst);
            Wait {
                jobs,
                fds: Vec::new(),
                deadline: Some(now + Duration::from_millis(5)),
            }
        }

        fn job_failed(&self, _: Jobs) {
            self.failed.store(true, Ordering::SeqCst);
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn service_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .filter(|n| n.trim() == "rsocket-service")
            .count()
    }

    /// A socket stand-in whose jobs end at their first round, which it records.
    #[derive(Default)]
    struct Once {
        served_at: Mutex<Vec<Instant>>,
    }

    impl Serviced for Once {
        fn serve(&self, _: Jobs, now: Instant, _: &[RawFd]) -> Wait {
            self.served_at.lock().unwrap().push(now);
            Wait::default()
        }

        fn job_failed(&self, _: Jobs) {}
    }

    #[test]
    fn a_job_added_for_later_is_served_then_and_not_before() {
        let flush = Jobs {
            flush: true,
            ..Jobs::default()
        };
        // The thread asleep with nothing to do, then two jobs for later, the later one first:
        // each is served once, at its time or after, never before.
        let warm = Arc::new(Once::default());
        assert!(add(&(warm.clone() as Arc<dyn Serviced>), flush));
        wait_for("the first job served", || {
            !warm.served_at.lock().unwrap().is_empty()
        });
        // Asleep again (no deadline of ours): only the timer wakes it for the jobs below.
        std::thread::sleep(Duration::from_millis(20));
        let (late, soon) = (Arc::new(Once::default()), Arc::new(Once::default()));
        let t0 = Instant::now();
        let (at_late, at_soon) = (
            t0 + Duration::from_millis(300),
            t0 + Duration::from_millis(100),
        );
        assert!(add_at(&(late.clone() as Arc<dyn Serviced>), flush, at_late));
        assert!(add_at(&(soon.clone() as Arc<dyn Serviced>), flush, at_soon));
        for (m, at) in [(&soon, at_soon), (&late, at_late)] {
            wait_for("the job served", || !m.served_at.lock().unwrap().is_empty());
            let served = m.served_at.lock().unwrap().clone();
            assert!(
                served[0] >= at,
                "served {:?} before its time",
                at - served[0]
            );
        }
        // Done at the first round: no second one.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(soon.served_at.lock().unwrap().len(), 1);
        assert_eq!(late.served_at.lock().unwrap().len(), 1);
    }

    #[test]
    fn one_thread_serves_every_socket_and_a_panicking_job_fails_only_its_socket() {
        let mocks: Vec<Arc<Mock>> = (0..8).map(|_| Arc::new(Mock::default())).collect();
        let handles: Vec<Arc<dyn Serviced>> = mocks
            .iter()
            .map(|m| m.clone() as Arc<dyn Serviced>)
            .collect();
        let kinds = [
            Jobs {
                keepalive: true,
                ..Jobs::default()
            },
            Jobs {
                flush: true,
                ..Jobs::default()
            },
        ];
        for (i, h) in handles.iter().enumerate() {
            assert!(add(h, kinds[i % 2]));
        }
        wait_for("every socket served", || {
            mocks.iter().all(|m| m.rounds.load(Ordering::SeqCst) >= 3)
        });
        assert_eq!(service_threads(), 1);
        mocks[3].panic_next.store(true, Ordering::SeqCst);
        wait_for("the panicking socket failed", || {
            mocks[3].failed.load(Ordering::SeqCst)
        });
        assert!(jobs_of(&handles[3]).is_empty(), "its jobs are gone");
        let before: Vec<u32> = mocks
            .iter()
            .map(|m| m.rounds.load(Ordering::SeqCst))
            .collect();
        wait_for("the others served on", || {
            mocks
                .iter()
                .zip(&before)
                .enumerate()
                .all(|(i, (m, b))| i == 3 || m.rounds.load(Ordering::SeqCst) > b + 2)
        });
        assert_eq!(mocks[3].rounds.load(Ordering::SeqCst), before[3]);
        assert!(
            mocks
                .iter()
                .enumerate()
                .all(|(i, m)| i == 3 || !m.failed.load(Ordering::SeqCst))
        );
        assert_eq!(jobs_of(&handles[0]), kinds[0]);
        assert_eq!(service_threads(), 1, "the thread survived the panic");
        // A dropped socket leaves the registry (the service holds no strong reference).
        drop(handles);
        let weak = Arc::downgrade(&mocks[0]);
        drop(mocks);
        assert!(weak.upgrade().is_none());
    }
}
