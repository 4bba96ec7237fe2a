//! Per-socket settings (socket options), fixed once the connection exists.

use crate::socket::config::Config;

/// Per-socket settings, fixed once the connection exists (as with librdmacm).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Send queue depth.
    pub sq_size: u32,
    /// Receive queue depth.
    pub rq_size: u32,
    /// Inline size requested.
    pub sq_inline: u32,
    /// Receive buffer bytes (SO_RCVBUF): the most the receive ring grows to.
    pub rbuf_size: u32,
    /// Receive ring bytes registered at connect ([`START_RING`], or `rbuf_size` when the
    /// application set SO_RCVBUF).
    pub rbuf_start: u32,
    /// Send buffer bytes (SO_SNDBUF): the most the send ring grows to.
    pub sbuf_size: u32,
    /// Send ring bytes registered at connect (as `rbuf_start`).
    pub sbuf_start: u32,
    /// O_NONBLOCK.
    pub nonblocking: bool,
    /// SO_REUSEADDR (accepted for compatibility; rdma_cm ports are not in TIME_WAIT).
    pub reuseaddr: bool,
    /// TCP_NODELAY (always effectively on: a lone message is never delayed).
    pub nodelay: bool,
    /// SO_KEEPALIVE.
    pub keepalive: bool,
    /// TCP_KEEPIDLE: seconds of silence before the first probe.
    pub keepidle: u32,
    /// TCP_KEEPINTVL: seconds between probes.
    pub keepintvl: u32,
    /// TCP_KEEPCNT: unanswered probes after which keepalive gives the connection up.
    pub keepcnt: u32,
    /// SO_LINGER: `Some(seconds)` when on. Kept for getsockopt: close always drains the sends
    /// (bounded by the transport's retries), as librdmacm does, and on iWARP the connection
    /// lingers in the background until the peer is done (see `socket::stream::close`).
    pub linger: Option<i32>,
    /// SO_OOBINLINE (there is no out-of-band data; kept for getsockopt).
    pub oobinline: bool,
    /// IP_TOS.
    pub tos: u8,
    /// IPV6_V6ONLY.
    pub v6only: bool,
    /// RDMA_IOMAPSIZE: iomap entries offered to the peer.
    pub iomap_size: u16,
    /// SO_ZEROCOPY: MSG_ZEROCOPY sends from riomap'd memory go without a copy, with a
    /// completion notice on the error queue (see `zerocopy`).
    pub zerocopy: bool,
    /// FD_CLOEXEC (descriptor flag).
    pub cloexec: bool,
}

/// Bytes of each ring (receive and send) registered at connect: an idle connection pins two of
/// them, an eighth of librdmacm's 128 KiB + 128 KiB. A ring grows to its full size (SO_RCVBUF,
/// SO_SNDBUF, or the mem_default and wmem_default configuration) once traffic fills it.
pub const START_RING: u32 = 16 * 1024;

/// The kernel's TCP keepalive defaults (net.ipv4.tcp_keepalive_time, _intvl, _probes), as a
/// TCP socket starts with: TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT. Where a file cannot be
/// read, the kernel's own defaults (7200 s, as librdmacm; 75 s; 9). Read once per process, not
/// at every rsocket().
fn keepalive_defaults() -> (u32, u32, u32) {
    static DEFAULTS: std::sync::OnceLock<(u32, u32, u32)> = std::sync::OnceLock::new();
    *DEFAULTS.get_or_init(|| {
        let read = |name: &str, default: u32| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/tcp_keepalive_{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .filter(|&v| v > 0)
                .unwrap_or(default)
        };
        (read("time", 7200), read("intvl", 75), read("probes", 9))
    })
}

impl Options {
    pub(super) fn from_config(c: &Config) -> Self {
        let (keepidle, keepintvl, keepcnt) = keepalive_defaults();
        Options {
            sq_size: c.sqsize_default,
            rq_size: c.rqsize_default,
            sq_inline: c.inline_default,
            rbuf_size: c.mem_default,
            rbuf_start: START_RING.min(c.mem_default),
            sbuf_size: c.wmem_default,
            sbuf_start: START_RING.min(c.wmem_default),
            nonblocking: false,
            reuseaddr: false,
            nodelay: false,
            keepalive: false,
            keepidle,
            keepintvl,
            keepcnt,
            linger: None,
            oobinline: false,
            tos: 0,
            v6only: false,
            iomap_size: c.iomap_size.min(u16::MAX as u32) as u16,
            zerocopy: false,
            cloexec: false,
        }
    }
}
