//! Which sockets the preload converts: the environment and upstream's `preload_config`.
//!
//! - `RSOCKET_PRELOAD=0` turns conversion off: every call goes to the kernel.
//! - `preload_config` in the rsocket configuration directory (`RSOCKET_CONFIG_DIR`, default
//!   `/etc/rdma/rsocket`), upstream's format: lines `program domain type protocol`, each field a
//!   name or `*` (`redis-server inet stream tcp`), `#` starts a comment line. Without entries
//!   every TCP socket is a candidate; with entries only the ones an entry matches (the program
//!   by the prefix of its short name, case-insensitive, as upstream).
//! - `RS_SQ_SIZE`, `RS_RQ_SIZE`, `RS_INLINE` (upstream's variables): queue and inline sizes
//!   set on every rsocket the preload makes.
//! - `RSOCKET_PRELOAD_CONNECT_MS`: how long a connect waits for the RDMA handshake before it
//!   gives up on RDMA and connects over kernel TCP instead (default 10000).
//! - `RSOCKET_PRELOAD_TEST_CLAIM_DELAY_MS` (for tests): a listener's RDMA side, listening
//!   again (after fork or a change of credentials), is taken up only this long after it
//!   listens, which makes the race of that claim with further changes of credentials
//!   certain to happen (c-tests/preload.sh).
//!
//! Only TCP sockets are candidates, and only connects to and listeners on addresses that are
//! not loopback (loopback traffic has no RDMA device to take it: it stays in the kernel).

use std::sync::OnceLock;

/// The settings, read once.
#[derive(Debug)]
pub struct Policy {
    /// Conversion on at all.
    pub enabled: bool,
    entries: Vec<Entry>,
    /// RS_SQ_SIZE.
    pub sq_size: Option<i32>,
    /// RS_RQ_SIZE.
    pub rq_size: Option<i32>,
    /// RS_INLINE.
    pub inline: Option<i32>,
    /// RSOCKET_PRELOAD_CONNECT_MS.
    pub connect_ms: i32,
    /// UDP sockets convert too (`RSOCKET_PRELOAD_UDP`, on unless `0`).
    pub udp: bool,
    /// RSOCKET_PRELOAD_TEST_CLAIM_DELAY_MS (0: none).
    pub claim_delay_ms: u64,
}

#[derive(Debug)]
struct Entry {
    program: Option<String>,
    domain: Option<i32>,
    ty: Option<i32>,
    protocol: Option<i32>,
}

fn env_int(name: &str) -> Option<i32> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn parse_field(s: &str, names: &[(&[&str], i32)]) -> Result<Option<i32>, ()> {
    if s == "*" {
        return Ok(None);
    }
    names
        .iter()
        .find(|(n, _)| n.iter().any(|n| n.eq_ignore_ascii_case(s)))
        .map(|&(_, v)| Some(v))
        .ok_or(())
}

fn parse_config(text: &str) -> Vec<Entry> {
    let mut v = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let domain = parse_field(
            f[1],
            &[
                (&["inet", "af_inet", "pf_inet"], libc::AF_INET),
                (&["inet6", "af_inet6", "pf_inet6"], libc::AF_INET6),
                (&["ib", "af_ib", "pf_ib"], libc::AF_IB),
            ],
        );
        let ty = parse_field(
            f[2],
            &[
                (&["stream", "sock_stream"], libc::SOCK_STREAM),
                (&["dgram", "sock_dgram"], libc::SOCK_DGRAM),
            ],
        );
        let protocol = parse_field(
            f[3],
            &[
                (&["tcp", "ipproto_tcp"], libc::IPPROTO_TCP),
                (&["udp", "ipproto_udp"], libc::IPPROTO_UDP),
            ],
        );
        if let (Ok(domain), Ok(ty), Ok(protocol)) = (domain, ty, protocol) {
            v.push(Entry {
                program: (f[0] != "*").then(|| f[0].to_ascii_lowercase()),
                domain,
                ty,
                protocol,
            });
        }
    }
    v
}

fn program_name() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The process's policy.
pub fn get() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        let dir =
            std::env::var("RSOCKET_CONFIG_DIR").unwrap_or_else(|_| "/etc/rdma/rsocket".into());
        let entries = std::fs::read_to_string(format!("{dir}/preload_config"))
            .map(|t| parse_config(&t))
            .unwrap_or_default();
        Policy {
            enabled: std::env::var("RSOCKET_PRELOAD").map_or(true, |v| v.trim() != "0"),
            entries,
            sq_size: env_int("RS_SQ_SIZE"),
            rq_size: env_int("RS_RQ_SIZE"),
            inline: env_int("RS_INLINE"),
            connect_ms: env_int("RSOCKET_PRELOAD_CONNECT_MS").unwrap_or(10000),
            udp: std::env::var("RSOCKET_PRELOAD_UDP").map_or(true, |v| v.trim() != "0"),
            claim_delay_ms: env_int("RSOCKET_PRELOAD_TEST_CLAIM_DELAY_MS")
                .map_or(0, |v| v.max(0) as u64),
        }
    })
}

impl Policy {
    /// Whether a socket(domain, type, protocol) call makes a candidate.
    pub fn intercepts(&self, domain: i32, ty: i32, protocol: i32) -> bool {
        let base = ty & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        let stream = base == libc::SOCK_STREAM && matches!(protocol, 0 | libc::IPPROTO_TCP);
        let dgram = base == libc::SOCK_DGRAM && matches!(protocol, 0 | libc::IPPROTO_UDP);
        if !self.enabled
            || !matches!(domain, libc::AF_INET | libc::AF_INET6)
            || !(stream || dgram && self.udp)
        {
            return false;
        }
        if self.entries.is_empty() {
            return true;
        }
        let protocol = if stream {
            libc::IPPROTO_TCP
        } else {
            libc::IPPROTO_UDP
        };
        let prog = program_name();
        self.entries.iter().any(|e| {
            e.program
                .as_ref()
                .is_none_or(|p| prog.starts_with(p.as_str()))
                && e.domain.is_none_or(|d| d == domain)
                && e.ty.is_none_or(|t| t == base)
                && e.protocol.is_none_or(|p| p == protocol)
        })
    }
}

/// Whether an IPv4 address (network order bytes) is loopback.
fn loopback_v4(a: [u8; 4]) -> bool {
    a[0] == 127
}

/// What an address is, for the conversion rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// INADDR_ANY / in6addr_any.
    Wildcard,
    /// 127/8, ::1, ::ffff:127/104.
    Loopback,
    /// Anything else: an interface address, local or remote.
    Other,
    /// Not an IPv4/IPv6 address.
    NotIp,
}

/// Classifies a socket address.
///
/// # Safety
/// `addr` points to `len` readable bytes.
pub unsafe fn place(addr: *const libc::sockaddr, len: libc::socklen_t) -> Place {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return Place::NotIp;
    }
    // SAFETY: at least the family is readable (checked above).
    let family = unsafe { (*addr).sa_family } as i32;
    match family {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: len covers a sockaddr_in.
            let a = unsafe { *(addr as *const libc::sockaddr_in) };
            let b = a.sin_addr.s_addr.to_ne_bytes();
            if b == [0; 4] {
                Place::Wildcard
            } else if loopback_v4(b) {
                Place::Loopback
            } else {
                Place::Other
            }
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: len covers a sockaddr_in6.
            let a = unsafe { *(addr as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            if ip.is_unspecified() {
                Place::Wildcard
            } else if ip.is_loopback() {
                Place::Loopback
            } else if let Some(v4) = ip.to_ipv4_mapped() {
                if v4.is_unspecified() {
                    Place::Wildcard
                } else if loopback_v4(v4.octets()) {
                    Place::Loopback
                } else {
                    Place::Other
                }
            } else {
                Place::Other
            }
        }
        _ => Place::NotIp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_follow_upstreams_format() {
        let e = parse_config(
            "# comment\nredis inet stream tcp\n* * * *\nbad line\nx inet6 dgram bogus\n",
        );
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].program.as_deref(), Some("redis"));
        assert_eq!(e[0].domain, Some(libc::AF_INET));
        assert_eq!(e[0].ty, Some(libc::SOCK_STREAM));
        assert_eq!(e[0].protocol, Some(libc::IPPROTO_TCP));
        assert!(e[1].program.is_none() && e[1].domain.is_none());
    }

    #[test]
    fn only_tcp_and_udp_sockets_are_candidates() {
        let p = Policy {
            enabled: true,
            entries: Vec::new(),
            sq_size: None,
            rq_size: None,
            inline: None,
            connect_ms: 0,
            udp: true,
            claim_delay_ms: 0,
        };
        assert!(p.intercepts(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0));
        assert!(p.intercepts(libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP));
        assert!(p.intercepts(libc::AF_INET, libc::SOCK_DGRAM, 0));
        assert!(p.intercepts(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDP));
        assert!(!p.intercepts(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP));
        assert!(!p.intercepts(libc::AF_UNIX, libc::SOCK_STREAM, 0));
        assert!(!p.intercepts(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP));
        let off = Policy {
            enabled: false,
            ..p
        };
        assert!(!off.intercepts(libc::AF_INET, libc::SOCK_STREAM, 0));
        let tcp_only = Policy { udp: false, ..off };
        let tcp_only = Policy {
            enabled: true,
            ..tcp_only
        };
        assert!(!tcp_only.intercepts(libc::AF_INET, libc::SOCK_DGRAM, 0));
        assert!(tcp_only.intercepts(libc::AF_INET, libc::SOCK_STREAM, 0));
    }

    #[test]
    fn addresses_are_classified() {
        let v4 = |a: [u8; 4]| {
            let s = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a local sockaddr_in and its size.
            unsafe {
                place(
                    &s as *const _ as *const libc::sockaddr,
                    std::mem::size_of_val(&s) as u32,
                )
            }
        };
        assert_eq!(v4([0, 0, 0, 0]), Place::Wildcard);
        assert_eq!(v4([127, 0, 0, 1]), Place::Loopback);
        assert_eq!(v4([10, 10, 0, 1]), Place::Other);
        let mut s6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        s6.sin6_family = libc::AF_INET6 as u16;
        s6.sin6_addr.s6_addr = std::net::Ipv6Addr::LOCALHOST.octets();
        let p = |s: &libc::sockaddr_in6| unsafe {
            place(
                s as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(s) as u32,
            )
        };
        assert_eq!(p(&s6), Place::Loopback);
        s6.sin6_addr.s6_addr = std::net::Ipv4Addr::new(10, 10, 0, 2)
            .to_ipv6_mapped()
            .octets();
        assert_eq!(p(&s6), Place::Other);
        s6.sin6_addr.s6_addr = [0; 16];
        assert_eq!(p(&s6), Place::Wildcard);
    }
}
