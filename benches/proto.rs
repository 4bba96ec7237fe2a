//! Host benchmarks of the sans-IO protocol core: the per-message bookkeeping a send and a
//! receive cost, and the wire codecs. Run with `cargo bench --bench proto`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use rsocket::proto::stream::{LocalBuffers, SendPlan, Stream, StreamConfig};
use rsocket::proto::wire::{ConnData, Msg, RemoteSge};

const TRACE_REQ: [u8; 40] = [
    0x01, 0x02, 0x01, 0x80, 0, 0, 0, 0, 0x00, 0x00, 0x7f, 0xc1, 0xa8, 0x00, 0x20, 0x00, 0, 0, 0x03,
    0x4f, 0, 0, 0, 2, 0x00, 0x00, 0x7f, 0xc1, 0xac, 0xdd, 0x50, 0x00, 0, 0, 0x04, 0x26, 0x00, 0x08,
    0x00, 0x00,
];

fn cfg() -> StreamConfig {
    StreamConfig {
        sq_size: 384,
        rq_size: 384,
        sq_inline: 64,
        rbuf_size: 1 << 17,
        rbuf_start: 1 << 17,
        sbuf_size: 1 << 17,
        sbuf_start: 1 << 17,
        msg_send: false,
        recv_payload: 0,
    }
}

fn local(k: u32) -> LocalBuffers {
    let sge = |addr| RemoteSge {
        addr,
        key: k,
        length: 0,
    };
    LocalBuffers {
        target_sgl: sge(0x1000),
        rbuf: sge(0x10_0000),
        target_iomap_size: 0,
    }
}

/// A sender and a receiver wired back to back (window updates applied by hand).
fn pair() -> (Stream, Stream) {
    let c = cfg();
    let (la, lb) = (local(1), local(2));
    let a = Stream::new(c, la, &Stream::local_conn_data(&c, &lb));
    let b = Stream::new(c, lb, &Stream::local_conn_data(&c, &la));
    (a, b)
}

fn bench(c: &mut Criterion) {
    c.bench_function("wire: decode connect private data", |b| {
        b.iter(|| ConnData::decode(black_box(&TRACE_REQ)).unwrap())
    });
    c.bench_function("wire: encode+decode immediate", |b| {
        b.iter(|| Msg::decode(black_box(Msg::Data(black_box(64)).encode())).unwrap())
    });
    // One 64-byte message through the bookkeeping of both ends: plan, receive, consume,
    // complete, and the credit/window update that keeps the pipe open.
    c.bench_function("stream: 64 B message, send+recv bookkeeping", |bch| {
        let (mut a, mut b) = pair();
        let mut sgl = [RemoteSge::default(); 2];
        bch.iter(|| {
            let w = a.plan_write(64).expect("credits");
            b.on_recv(w.msg).unwrap();
            let n = b.consume(64, false, |o, l| {
                black_box((o, l));
            });
            a.on_send_completion(w.msg as u64, true);
            if let Some(cu) = b.poll_credit_update() {
                a.on_recv(cu.msg).unwrap();
                if let Some(s) = cu.sge {
                    let e = ((s.remote_addr - 0x1000) / 16) as usize;
                    sgl[e] = RemoteSge::from_ne_bytes(&s.bytes);
                    a.refresh_target_sgl(sgl);
                }
                b.on_send_completion(cu.msg as u64, true);
            }
            if let Some(i) = w.exhausted_sge {
                sgl[i] = RemoteSge::default();
            }
            black_box(n)
        })
    });
    // Gathering: 64-byte sends while a write is in flight only extend the pending write.
    c.bench_function(
        "stream: 64 B send gathered behind a write in flight",
        |bch| {
            bch.iter_batched(
                || {
                    let (mut a, _) = pair();
                    let first = a.plan_send(64);
                    (a, first)
                },
                |(mut a, _first)| {
                    for _ in 0..16 {
                        match a.plan_send(64) {
                            Some(SendPlan::Queued { len, .. }) => {
                                black_box(len);
                            }
                            other => panic!("expected to gather, got {other:?}"),
                        }
                    }
                    a
                },
                criterion::BatchSize::SmallInput,
            )
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
