//! rpoll over rsockets and regular descriptors together.
//!
//! Like librdmacm: check every rsocket (driving its completions), busy-poll (for `polling_time`
//! µs, or adaptively: [`crate::socket::spin`]), then arm each rsocket's CQ and sleep in poll(2)
//! on the completion channels, the CM channels and the caller's regular descriptors.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::socket::spin::Spin;
use crate::socket::stream::new_spin;
use crate::socket::{Socket, lookup_any};
use crate::verbs::{poll_fds, pollin, ticks};

thread_local! {
    /// rpoll's busy-poll window: per thread, as a thread tends to wait on the same sockets.
    static SPIN: std::cell::Cell<Spin> = std::cell::Cell::new(new_spin());
}

fn mask(events: i16) -> i16 {
    events | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL
}

/// The readiness of an rsocket now (`arm`: also the descriptors to sleep on, CQs armed).
fn state(s: &Socket, events: Option<i16>, wait: &mut Vec<RawFd>) -> Result<i16> {
    match s {
        Socket::Stream(s) => {
            let ps = s.poll_state(events)?;
            wait.extend_from_slice(&ps.wait_fds[..ps.n_wait]);
            Ok(ps.revents)
        }
        Socket::Dgram(d) => {
            let (revents, fds) = d.poll_state(events.is_some())?;
            wait.extend(fds);
            Ok(revents)
        }
    }
}

/// One pass without sleeping: fills `revents`, returns how many entries are ready.
fn check(fds: &mut [libc::pollfd], socks: &[Option<Socket>]) -> Result<usize> {
    let mut real: Vec<libc::pollfd> = Vec::new();
    let mut real_idx = Vec::new();
    let mut n = 0;
    for (i, p) in fds.iter_mut().enumerate() {
        p.revents = 0;
        if p.fd < 0 {
            continue;
        }
        match &socks[i] {
            Some(s) => {
                p.revents = state(s, None, &mut Vec::new())? & mask(p.events);
                n += (p.revents != 0) as usize;
            }
            None => {
                real.push(libc::pollfd {
                    fd: p.fd,
                    events: p.events,
                    revents: 0,
                });
                real_idx.push(i);
            }
        }
    }
    if !real.is_empty() && poll_fds(&mut real, 0)? > 0 {
        for (r, &i) in real.iter().zip(&real_idx) {
            fds[i].revents = r.revents;
            n += (r.revents != 0) as usize;
        }
    }
    Ok(n)
}

/// poll(2) semantics over a mix of rsockets and regular descriptors. `timeout_ms` < 0 waits
/// forever, 0 checks once.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> Result<usize> {
    // One stream rsocket: the first look needs no allocation and no second lock. A program
    // that busy-polls with a zero timeout (rstream -T a) makes only such looks.
    if let [p] = fds
        && p.fd >= 0
        && let Ok(Socket::Stream(s)) = lookup_any(p.fd)
    {
        p.revents = s.poll_once(p.events)? & mask(p.events);
        if p.revents != 0 || timeout_ms == 0 {
            if p.revents == 0 {
                s.note_poll_miss();
            }
            return Ok((p.revents != 0) as usize);
        }
    }
    let socks: Vec<Option<Socket>> = fds
        .iter()
        .map(|p| {
            if p.fd >= 0 {
                lookup_any(p.fd).ok()
            } else {
                None
            }
        })
        .collect();
    // The caller waits in here: the service thread leaves these sockets to it (see
    // `stream::ready`), and their descriptors are brought up to date when it returns.
    let _calls: Vec<_> = socks
        .iter()
        .flatten()
        .filter_map(|s| match s {
            Socket::Stream(s) => Some(s.call()),
            Socket::Dgram(_) => None,
        })
        .collect();
    // The busy-poll is timed with the tick counter, and the clock is read only when there is
    // a timeout to keep (a clock read can cost a syscall).
    let mut start = None;
    let mut deadline = None;
    let mut slept = false;
    loop {
        let n = check(fds, &socks)?;
        if n == 0 && timeout_ms == 0 {
            for s in socks.iter().flatten() {
                if let Socket::Stream(s) = s {
                    s.note_poll_miss();
                }
            }
        }
        if n > 0 || timeout_ms == 0 {
            if n > 0
                && let Some(t0) = start
            {
                SPIN.with(|s| {
                    let mut sp = s.get();
                    sp.record(ticks().wrapping_sub(t0), slept);
                    s.set(sp);
                });
            }
            return Ok(n);
        }
        let now = ticks();
        let t0 = *start.get_or_insert_with(|| {
            if timeout_ms > 0 {
                deadline = Some(Instant::now() + Duration::from_millis(timeout_ms as u64));
            }
            now
        });
        if now.wrapping_sub(t0) < SPIN.with(|s| s.get().window()) {
            continue;
        }
        // Arm, then sleep on everything that can change a state.
        let mut sleep: Vec<libc::pollfd> = Vec::new();
        let mut ready = false;
        for (i, p) in fds.iter().enumerate() {
            if p.fd < 0 {
                continue;
            }
            match &socks[i] {
                Some(s) => {
                    let mut wait = Vec::new();
                    ready |= state(s, Some(p.events), &mut wait)? & mask(p.events) != 0;
                    for fd in wait {
                        sleep.push(pollin(fd));
                    }
                }
                None => sleep.push(libc::pollfd {
                    fd: p.fd,
                    events: p.events,
                    revents: 0,
                }),
            }
        }
        if ready {
            continue;
        }
        let wait_ms = match deadline {
            None => -1,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return check(fds, &socks);
                }
                (d - now).as_millis().clamp(1, i32::MAX as u128) as i32
            }
        };
        crate::trace::trace_verbose!(
            "rpoll: sleeping on {:?}",
            sleep.iter().map(|p| p.fd).collect::<Vec<_>>()
        );
        slept = true;
        poll_fds(&mut sleep, wait_ms)?;
        crate::trace::trace_verbose!(
            "rpoll: woke {:?}",
            sleep.iter().map(|p| (p.fd, p.revents)).collect::<Vec<_>>()
        );
        let ready: Vec<RawFd> = sleep
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| p.fd)
            .collect();
        if !ready.is_empty() {
            for s in socks.iter().flatten() {
                if let Socket::Stream(s) = s {
                    s.poll_woke(&ready)?;
                }
            }
        }
    }
}
