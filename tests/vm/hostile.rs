//! A hostile peer, built on raw verbs and the connection manager (the library's thin wrappers,
//! none of its protocol): malformed connect private data, unknown immediate values and control
//! messages, data beyond the receive window we granted, RDMA writes past our receive buffer.
//! Our side ends that connection with an error (or refuses it) and keeps serving the others.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use rsocket::proto::wire::{CONN_FLAG_IOMAP, ConnData, RemoteSge};
use rsocket::socket::{self, StreamSocket};
use rsocket::verbs::{Access, CmEventKind, CmId, ConnParam, Endpoint, EventChannel, Payload};

use super::{addr, client_ip, connect, listener, next_port, recv_exact, send_all, server_ip};

/// A raw connection to `dst`: its CM id, endpoint and the regions the private data announces.
struct Raw {
    ch: EventChannel,
    id: CmId,
    ep: Option<Endpoint>,
    /// Our side's private data, from its reply.
    reply: Vec<u8>,
    iwarp: bool,
}

fn wait_event(ch: &EventChannel, what: &str) -> (CmEventKind, Vec<u8>) {
    let mut p = [libc::pollfd {
        fd: ch.fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(p.as_mut_ptr(), 1, 10_000) };
    assert!(n == 1, "hostile peer: no CM event while {what}");
    let e = ch.get_event().expect("CM event");
    (e.kind(), e.private_data())
}

impl Raw {
    /// Connects with `private` as the connect request's private data. Returns the connection
    /// once established, or the CM event that ended the attempt.
    /// `private` builds it from our (the hostile peer's) real target SGL and receive buffer.
    fn connect(dst: SocketAddr, private: Pd) -> Result<Raw, CmEventKind> {
        let ch = EventChannel::new().expect("event channel");
        let mut id = CmId::new(&ch).expect("cm id");
        let src: SocketAddr = addr(client_ip(), 0);
        id.resolve_addr(Some(&src.into()), &dst.into(), 2000)
            .expect("resolve_addr");
        assert!(matches!(
            wait_event(&ch, "resolving").0,
            CmEventKind::AddrResolved
        ));
        id.resolve_route(2000).expect("resolve_route");
        assert!(matches!(
            wait_event(&ch, "routing").0,
            CmEventKind::RouteResolved
        ));
        let iwarp = id.device_info().expect("device").iwarp;
        let ep = id.create_endpoint(64, 64, 64).expect("endpoint");
        // Receives for what our side sends (credit updates: immediate data, or 4-byte SENDs on
        // iWARP, into a buffer).
        let mut ep = ep;
        let rx = ep.register(4096, Access::Local).expect("mr");
        for i in 0..32 {
            ep.post_recv(i, Some((rx, i as usize * 4)))
                .expect("post_recv");
        }
        let region = |ep: &mut Endpoint, len: usize, count: u32| {
            let mr = ep.register(len, Access::RemoteWrite).expect("mr");
            let (addr, key) = ep.remote_handle(mr);
            RemoteSge {
                addr,
                key,
                length: count,
            }
        };
        let tsgl = region(&mut ep, 4096, 2);
        let rbuf = region(&mut ep, 1 << 16, 1 << 15);
        let private = private(tsgl, rbuf);
        let param = ConnParam {
            responder_resources: 1,
            initiator_depth: 1,
            flow_control: 1,
            retry_count: 3,
            rnr_retry_count: 7,
        };
        id.connect(&private, &param).expect("connect");
        match wait_event(&ch, "connecting") {
            (CmEventKind::Established, reply) => Ok(Raw {
                ch,
                id,
                ep: Some(ep),
                reply,
                iwarp,
            }),
            (k, _) => {
                id.destroy_qp();
                drop(ep);
                Err(k)
            }
        }
    }

    /// Our side's receive buffer (address, rkey, length of the first window).
    fn our_rbuf(&self) -> RemoteSge {
        ConnData::decode(&self.reply)
            .expect("our private data decodes")
            .data_buf
    }

    /// Sends `msg` as the protocol would carry a message: immediate data of a 0-byte write to
    /// our receive buffer, or a 4-byte SEND on iWARP.
    fn send_msg(&self, msg: u32) {
        let ep = self.ep.as_ref().unwrap();
        let rb = self.our_rbuf();
        if self.iwarp {
            ep.post_send(1, Payload::Inline(&msg.to_ne_bytes()), None, None)
                .expect("send");
        } else {
            ep.post_send(1, Payload::Empty, Some((rb.addr, rb.key)), Some(msg))
                .expect("write with imm");
        }
    }

    /// RDMA-writes `len` bytes at `offset` of our receive buffer.
    fn write_rbuf(&mut self, offset: u64, len: usize) {
        let rb = self.our_rbuf();
        let ep = self.ep.as_mut().unwrap();
        let mr = ep.register(len, Access::Local).expect("mr");
        ep.post_send(
            2,
            Payload::Region(mr, [(0, len as u32), (0, 0)], 1),
            Some((rb.addr + offset, rb.key)),
            None,
        )
        .expect("write");
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.id.disconnect();
        self.id.destroy_qp();
        self.ep = None;
        let _ = &self.ch;
    }
}

/// Private data like librdmacm's, announcing the hostile peer's real regions.
fn conn_data(credits: u16, target_sgl: RemoteSge, data_buf: RemoteSge) -> ConnData {
    ConnData {
        flags: CONN_FLAG_IOMAP,
        credits,
        target_iomap_size: 0,
        target_sgl,
        data_buf,
    }
}

/// Builds the private data of a connect from the hostile peer's target SGL and receive buffer.
type Pd = fn(RemoteSge, RemoteSge) -> Vec<u8>;

/// A hostile act on an established connection.
type Act = fn(&mut Raw);

/// A good connection, checked after every attack: the listener and its other connections
/// go on.
fn still_serving(good: &(std::sync::Arc<StreamSocket>, std::sync::Arc<StreamSocket>), n: u8) {
    send_all(&good.0, &[n; 100]);
    assert_eq!(
        recv_exact(&good.1, 100),
        vec![n; 100],
        "the good connection"
    );
}

pub(super) fn hostile_peer_ends_only_its_own_connection() {
    let port = next_port();
    let l = listener(port);
    let dst = addr(server_ip(), port);
    // Like a server's accept loop (requests wait for raccept, which refuses the malformed).
    let (tx, accepted) = std::sync::mpsc::channel();
    let acceptor = {
        let l = l.clone();
        thread::spawn(move || {
            while let Ok(s) = l.accept() {
                if tx.send(s).is_err() {
                    return;
                }
            }
        })
    };
    let c = connect(port);
    let good = (c, accepted.recv().unwrap());
    still_serving(&good, 0);

    // Malformed private data: refused, never accepted.
    let cases: [(&str, Pd); 6] = [
        ("empty", |_, _| Vec::new()),
        ("short", |t, r| conn_data(64, t, r).encode()[..20].to_vec()),
        ("wrong version", |t, r| {
            let mut b = conn_data(64, t, r).encode().to_vec();
            b[0] = 9;
            b
        }),
        ("no credits", |t, r| conn_data(0, t, r).encode().to_vec()),
        ("a 7-entry target SGL", |t, r| {
            let mut b = conn_data(64, t, r).encode().to_vec();
            b[23] = 7;
            b
        }),
        ("a receive buffer wrapping the address space", |t, mut r| {
            r.addr = u64::MAX - 10;
            conn_data(64, t, r).encode().to_vec()
        }),
    ];
    for (i, (what, pd)) in cases.into_iter().enumerate() {
        match Raw::connect(dst, pd) {
            Ok(_) => panic!("private data with {what}: accepted"),
            Err(k) => println!("    private data with {what}: {k:?}"),
        }
        still_serving(&good, 1 + i as u8);
    }

    // Valid private data (huge credits and window too), then one hostile act each: the
    // accepted socket's receive ends with an error, not data.
    let acts: [(&str, Act); 5] = [
        ("an unknown opcode", |r| r.send_msg(0x2000_0000)),
        ("a local-only opcode", |r| r.send_msg(0x4000_0000)),
        ("an unknown control message", |r| r.send_msg(0xe000_0009)),
        ("data beyond the granted window", |r| {
            r.send_msg(0x1fff_ffff);
        }),
        ("a write past the receive buffer", |r| {
            let len = r.our_rbuf().length as usize * 2 + 4096;
            r.write_rbuf(0, len);
            r.send_msg(4096);
        }),
    ];
    for (i, (what, act)) in acts.iter().enumerate() {
        let pd: Pd = |t, r| conn_data(u16::MAX, t, r).encode().to_vec();
        let mut raw = Raw::connect(dst, pd).unwrap_or_else(|k| panic!("{what}: {k:?}"));
        let s = accepted.recv().unwrap();
        let server = thread::spawn(move || {
            let mut b = vec![0u8; 1 << 16];
            let r = s.recv(&mut b, 0);
            let _ = socket::close(s.fd());
            r
        });
        // Up to the hostile act the connection is a well-behaved one: it stays up (so the
        // error below is the act's).
        thread::sleep(Duration::from_millis(300));
        assert!(!server.is_finished(), "{what}: failed before the act");
        act(&mut raw);
        let t0 = std::time::Instant::now();
        while !server.is_finished() && t0.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            server.is_finished(),
            "{what}: our receive still blocked after 10 s"
        );
        let r = server.join().expect("our side did not crash");
        println!("    {what}: our receive got {r:?}");
        assert!(r.is_err(), "{what}: our receive got {r:?}, not an error");
        drop(raw);
        still_serving(&good, 10 + i as u8);
    }
    // The acceptor ends at its next connection.
    drop(accepted);
    let last = connect(port);
    acceptor.join().unwrap();
    for c in [last, good.0] {
        socket::close(c.fd()).unwrap();
    }
    drop(good.1);
    socket::close(l.fd()).unwrap();
}
