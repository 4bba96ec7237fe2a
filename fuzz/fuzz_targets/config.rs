//! Config files (`/etc/rdma/rsocket/*`) with any contents, and the connection sizes the
//! library derives from them with any device limits: nothing may panic, and the sizes stay in
//! the ranges the protocol needs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsocket::proto::stream::{QP_MAX_SIZE, QP_MIN_SIZE, QueueSizes};
use rsocket::socket::config::Config;

const FILES: [&str; 9] = [
    "polling_time",
    "wake_up_interval",
    "inline_default",
    "sqsize_default",
    "rqsize_default",
    "mem_default",
    "wmem_default",
    "iomap_size",
    "unknown",
];

fuzz_target!(|data: &[u8]| {
    // Files separated by 0xff; the first 5 bytes: device limits.
    let (dev, rest) = data.split_at(data.len().min(5));
    let mut dev = dev.to_vec();
    dev.resize(5, 0);
    let parts: Vec<&[u8]> = rest.split(|&b| b == 0xff).collect();
    let c = Config::parse(|name| {
        let k = FILES.iter().position(|f| *f == name)?;
        parts
            .get(k)
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
    });
    assert!(c.mem_default >= 2048 && c.wmem_default >= 2048);
    let max_wr = u16::from_le_bytes([dev[0], dev[1]]) as u32;
    let iwarp = dev[2] & 1 != 0;
    let q = QueueSizes::negotiate(
        c.sqsize_default,
        c.rqsize_default,
        c.inline_default,
        max_wr,
        iwarp,
    );
    assert!((QP_MIN_SIZE as u32..=QP_MAX_SIZE as u32).contains(&q.sq));
    assert!((QP_MIN_SIZE as u32..=QP_MAX_SIZE as u32).contains(&q.rq));
    assert!(q.rq_posted >= q.rq && q.rq_posted <= QP_MAX_SIZE as u32);
    let granted = q.inline.min(dev[3] as u32 * 4);
    let start = |size: u32| (16 * 1024u32).min(size);
    if let Some(cfg) = q.config(
        granted,
        (start(c.mem_default), c.mem_default),
        (start(c.wmem_default), c.wmem_default),
        iwarp,
    ) {
        assert!(cfg.rbuf_size >= 4096 && cfg.rbuf_size % 2 == 0);
        // A receive ring grows only from at most half its size; the rings never start
        // beyond their size.
        assert!(cfg.rbuf_start == cfg.rbuf_size || cfg.rbuf_start < cfg.rbuf_size / 2);
        assert!(cfg.rbuf_start % 2 == 0 && cfg.sbuf_start <= cfg.sbuf_size);
        let _ = (
            cfg.send_buffer_len(),
            cfg.send_buffer_start(),
            cfg.msg_slots(q.rq_posted),
            cfg.ctrl_area(),
        );
    }
});
