//! A hostile peer, built on raw verbs and the connection manager (the library's thin wrappers,
//! none of its protocol): malformed connect private data, unknown immediate values and control
//! messages, data beyond the receive window we granted, RDMA writes past our receive buffer.
//! Our side ends that connection with an error (or refuses it) and keeps serving the others.

use std::net::SocketAddr;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rsocket::proto::iomap::IomapEntry;
use rsocket::proto::wire::{self, CONN_FLAG_IOMAP, ConnData, Msg, RemoteSge};
use rsocket::socket::{self, StreamSocket};
use rsocket::verbs::{
    Access, CmEventKind, CmId, Completion, ConnParam, Endpoint, EventChannel, MrId, Payload,
    UserMemory,
};

use super::{
    addr, client_ip, connect, listener, new_socket, next_port, recv_exact, send_all, server_ip,
    set_int,
};

/// A raw connection to `dst`: its CM id, endpoint and the regions the private data announces.
struct Raw {
    ch: EventChannel,
    id: CmId,
    ep: Option<Endpoint>,
    /// Our side's private data, from its reply.
    reply: Vec<u8>,
    iwarp: bool,
    /// The hostile peer's target SGL (our side writes SGL and iomap entries there).
    tsgl: MrId,
    /// Destinations of the peer's RDMA reads (after `ep`: freed once the QP is gone).
    read_bufs: Vec<Vec<u8>>,
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
            ep.post_recv(i, Some((rx, i as usize * 4, 4)))
                .expect("post_recv");
        }
        let region = |ep: &mut Endpoint, len: usize, count: u32| {
            let mr = ep.register(len, Access::RemoteWrite).expect("mr");
            let (addr, key) = ep.remote_handle(mr);
            let sge = RemoteSge {
                addr,
                key,
                length: count,
            };
            (mr, sge)
        };
        let (tsgl_mr, tsgl) = region(&mut ep, 4096, 2);
        let (_, rbuf) = region(&mut ep, 1 << 16, 1 << 15);
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
                tsgl: tsgl_mr,
                read_bufs: Vec::new(),
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
        self.try_send_msg(msg).expect("send");
    }

    /// [`Raw::send_msg`], the device's refusal returned: Soft-iWARP refuses to post on a QP
    /// that an earlier act already put in error (ENOTCONN), where Soft-RoCE takes the post and
    /// flushes it.
    fn try_send_msg(&self, msg: u32) -> std::io::Result<()> {
        let ep = self.ep.as_ref().unwrap();
        let rb = self.our_rbuf();
        if self.iwarp {
            ep.post_send(1, Payload::Inline(&msg.to_ne_bytes()), None, None)
        } else {
            ep.post_send(1, Payload::Empty, Some((rb.addr, rb.key)), Some(msg))
        }
    }

    /// Sends `msg` followed by `bytes` in one SEND (the form of a small DATA message between
    /// rsocket-rs peers on iWARP).
    fn send_carried(&self, msg: u32, bytes: &[u8]) {
        let mut b = msg.to_ne_bytes().to_vec();
        b.extend_from_slice(bytes);
        let ep = self.ep.as_ref().unwrap();
        ep.post_send(1, Payload::Inline(&b), None, None)
            .expect("send");
    }

    /// Our side's target SGL (address, rkey), where the peer's SGL entries go; its target
    /// iomap follows the two entries.
    fn our_tsgl(&self) -> RemoteSge {
        ConnData::decode(&self.reply)
            .expect("our private data decodes")
            .target_sgl
    }

    /// RDMA-writes `bytes` to `remote` (address, rkey) with work request `wr_id`.
    fn write_at(&mut self, wr_id: u64, remote: (u64, u32), bytes: &[u8]) {
        let ep = self.ep.as_mut().unwrap();
        let mr = ep.register(bytes.len(), Access::Local).expect("mr");
        ep.write(mr, 0, bytes);
        ep.post_send(
            wr_id,
            Payload::Region(mr, [(0, bytes.len() as u32), (0, 0)], 1),
            Some(remote),
            None,
        )
        .expect("write");
    }

    /// Takes the completions there are (shown with HOSTILE_DEBUG set), each also to `f`.
    fn drain(&mut self, mut f: impl FnMut(Completion)) {
        let debug = std::env::var_os("HOSTILE_DEBUG").is_some();
        self.ep
            .as_ref()
            .unwrap()
            .poll(16, |c| {
                if debug {
                    eprintln!("      completion {c:?}");
                }
                f(c)
            })
            .expect("poll");
    }

    /// Waits (up to 10 s) for the completion of `wr_id`, taking the others it polls.
    fn completion(&mut self, wr_id: u64) -> Completion {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let mut found = None;
            self.drain(|c| {
                if c.wr_id == wr_id {
                    found = Some(c);
                }
            });
            if let Some(c) = found {
                return c;
            }
            thread::sleep(Duration::from_millis(2));
        }
        panic!("hostile peer: no completion of work request {wr_id} in 10 s");
    }

    /// RDMA-reads `len` bytes from `remote` with work request `wr_id`; its completion.
    fn read(&mut self, wr_id: u64, remote: (u64, u32), len: u32) -> Completion {
        let mut buf = vec![0u8; len as usize];
        let ep = self.ep.as_mut().unwrap();
        // SAFETY: `buf` stays in `read_bufs` (its heap memory does not move) until the
        // endpoint is gone.
        let mem = unsafe { UserMemory::new(buf.as_mut_ptr(), buf.len()) };
        let mr = ep.register_user(mem, false, false).expect("register");
        let seg = ep
            .user_seg(mr, mem.addr(), len)
            .expect("in the registration");
        self.read_bufs.push(buf);
        ep.post_read(wr_id, seg, remote).expect("post read");
        self.completion(wr_id)
    }

    /// Our window `index` as our side announced it into the hostile peer's target iomap
    /// (waits up to 10 s for it).
    fn window(&mut self, index: usize) -> IomapEntry {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let mut b = [0u8; wire::IOMAP_LEN];
            self.ep
                .as_ref()
                .unwrap()
                .read(self.tsgl, wire::iomap_entry_offset(index), &mut b);
            let e = IomapEntry::from_ne_bytes(b);
            if e.sge.length != 0 {
                return e;
            }
            thread::sleep(Duration::from_millis(5));
        }
        panic!("hostile peer: window {index} never announced");
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
        send_room: 0,
    }
}

/// Well-formed private data: 64 credits, `IOMAP_SLOTS` iomap entries offered.
fn good_data(t: RemoteSge, r: RemoteSge) -> Vec<u8> {
    let mut d = conn_data(64, t, r);
    d.target_iomap_size = IOMAP_SLOTS;
    d.encode().to_vec()
}

/// Iomap entries each side offers the other.
const IOMAP_SLOTS: u16 = 4;

/// Somewhere in the hostile peer's address space nothing is registered (and a made-up key).
const NOWHERE: RemoteSge = RemoteSge {
    addr: 0x7f00_dead_0000,
    key: 0x00de_ad01,
    length: 1 << 15,
};

/// Builds the private data of a connect from the hostile peer's target SGL and receive buffer.
type Pd = fn(RemoteSge, RemoteSge) -> Vec<u8>;

/// A hostile act on an established connection.
type Act = fn(&mut Raw);

/// Like a server's accept loop (requests wait for raccept, which refuses the malformed): the
/// accepted sockets, and the thread. Once the receiver is dropped the thread ends at the next
/// connection and returns it (closing it at once could end that connection before the peer
/// saw it established).
fn accept_loop(
    l: &Arc<StreamSocket>,
) -> (
    mpsc::Receiver<Arc<StreamSocket>>,
    thread::JoinHandle<Option<Arc<StreamSocket>>>,
) {
    let (tx, accepted) = mpsc::channel();
    let l = l.clone();
    let acceptor = thread::spawn(move || {
        while let Ok(s) = l.accept() {
            if let Err(mpsc::SendError(s)) = tx.send(s) {
                return Some(s);
            }
        }
        None
    });
    (accepted, acceptor)
}

/// A good connection, checked after every attack: the listener and its other connections
/// go on.
fn still_serving(good: &(Arc<StreamSocket>, Arc<StreamSocket>), n: u8) {
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
    let (accepted, acceptor) = accept_loop(&l);
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
    let acts: [(&str, Act); 7] = [
        // A message SEND carrying data (rsocket-rs peers on iWARP; on RoCE our receives hold
        // nothing and the SEND itself fails): its length must be the message's, and only data
        // may be carried.
        ("a carried SEND shorter than its message says", |r| {
            r.send_carried(Msg::Data(10).encode(), &[7; 5])
        }),
        ("a credit update carrying bytes", |r| {
            r.send_carried(Msg::Credits(5).encode(), &[7; 8])
        }),
        ("an unknown opcode", |r| r.send_msg(0x2000_0000)),
        ("a local-only opcode", |r| r.send_msg(0x4000_0000)),
        ("an unknown control message", |r| r.send_msg(0xe000_0009)),
        ("data beyond the granted window", |r| {
            r.send_msg(0x1fff_ffff);
        }),
        ("a write past the receive buffer", |r| {
            let rb = r.our_rbuf();
            let len = rb.length as usize * 2 + 4096;
            r.write_at(2, (rb.addr, rb.key), &vec![0; len]);
            // The write alone may have ended the connection already (our device refused it).
            let _ = r.try_send_msg(4096);
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
    let last_accepted = acceptor.join().unwrap();
    for c in [last, good.0] {
        socket::close(c.fd()).unwrap();
    }
    drop((good.1, last_accepted));
    socket::close(l.fd()).unwrap();
}

/// The memory protection of the mapping holding `addr` in this process, and where that
/// mapping ends.
fn mapping(addr: u64) -> (String, u64) {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().unwrap();
        let perms = f.next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return (perms.to_string(), b);
        }
    }
    ("unmapped".into(), addr)
}

/// Our side's receive buffer and target SGL (registered buffers the peer may write) lie
/// between inaccessible pages.
fn assert_guarded(raw: &Raw) {
    for (what, start) in [
        ("receive buffer", raw.our_rbuf().addr),
        ("target SGL", raw.our_tsgl().addr),
    ] {
        assert_eq!(mapping(start - 1).0, "---p", "the page before our {what}");
        let mut at = start;
        loop {
            let (perms, end) = mapping(at);
            if !perms.starts_with("rw") {
                assert_eq!(perms, "---p", "the page after our {what}");
                break;
            }
            at = end;
        }
    }
}

/// What our side does with the hostile connection while the peer acts.
#[derive(Debug, Clone, Copy)]
enum OurCall {
    /// A blocking rrecv.
    Recv,
    /// rsend until it fails.
    Send,
    /// riowrite to offset 0 until it fails.
    IoWrite,
}

impl OurCall {
    /// Runs the call on `s` until it fails (at most 10 s of calls that succeed).
    fn run(self, s: &StreamSocket) -> Result<(), rsocket::Error> {
        let t0 = Instant::now();
        let mut b = vec![7u8; 1000];
        loop {
            match self {
                OurCall::Recv => s.recv(&mut b, 0).map(drop)?,
                OurCall::Send => s.send(&b, 0).map(drop)?,
                OurCall::IoWrite => s.iowrite(&b[..100], 0, 0).map(drop)?,
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Ok(());
            }
        }
    }
}

/// Our side's connections to a hostile peer: every grant the peer can name is checked.
/// The peer grants more credits than its receive queue, points its SGL and iomap entries
/// at memory it never registered, and RDMA-writes and reads our riomap'd window outside it.
/// Each time our side ends that connection with an error and never touches memory outside
/// what it registered and granted; its registered buffers are fenced by guard pages; a good
/// connection on the same listener keeps working throughout.
pub(super) fn hostile_peer_cannot_reach_outside_its_grants() {
    let port = next_port();
    let l = new_socket();
    set_int(
        &l,
        rsocket::socket::options::SOL_RDMA,
        rsocket::socket::options::RDMA_IOMAPSIZE,
        IOMAP_SLOTS as i32,
    )
    .expect("RDMA_IOMAPSIZE");
    l.bind(&addr(server_ip(), port).into()).expect("bind");
    l.listen(4).expect("listen");
    let dst = addr(server_ip(), port);
    let (accepted, acceptor) = accept_loop(&l);
    let c = connect(port);
    let good = (c, accepted.recv().unwrap());
    still_serving(&good, 0);

    /// Grants the peer may name: its private data, then one act.
    type Case = (&'static str, Pd, Act, OurCall);
    let cases: [Case; 4] = [
        (
            "a credit limit beyond its receive queue",
            good_data,
            // 64 credits announced, nothing of ours read: 200 is beyond them.
            |r| r.send_msg(Msg::Credits(200).encode()),
            OurCall::Recv,
        ),
        (
            "a receive buffer it never registered",
            |t, _| good_data(t, NOWHERE),
            // Its first credit update, as librdmacm's initiator sends it (on iWARP the
            // accepting side may only send once the initiator spoke).
            |r| r.send_msg(Msg::Credits(64).encode()),
            OurCall::Send,
        ),
        (
            "an SGL update pointing at memory it never registered",
            |t, mut r| {
                r.length = 256;
                good_data(t, r)
            },
            |r| {
                // The second entry of our target SGL, then the credit update announcing it.
                let tsgl = r.our_tsgl();
                let entry = NOWHERE.to_peer_bytes(false);
                r.write_at(1003, (tsgl.addr + wire::SGE_LEN as u64, tsgl.key), &entry);
                r.send_msg(Msg::Credits(64).encode());
            },
            OurCall::Send,
        ),
        (
            "an iomap entry pointing at memory it never registered",
            good_data,
            |r| {
                let tsgl = r.our_tsgl();
                let entry = IomapEntry {
                    offset: 0,
                    sge: NOWHERE,
                }
                .to_peer_bytes(false);
                let at = tsgl.addr + wire::iomap_entry_offset(0) as u64;
                r.write_at(1003, (at, tsgl.key), &entry);
                r.send_msg(Msg::IomapSgl(0).encode());
            },
            OurCall::IoWrite,
        ),
    ];
    for (i, (what, pd, act, call)) in cases.into_iter().enumerate() {
        let mut raw = Raw::connect(dst, pd).unwrap_or_else(|k| panic!("{what}: {k:?}"));
        let s = accepted.recv().unwrap();
        assert_guarded(&raw);
        act(&mut raw);
        let t0 = Instant::now();
        let ours = thread::spawn(move || call.run(&s));
        while !ours.is_finished() && t0.elapsed() < Duration::from_secs(15) {
            raw.drain(drop);
            thread::sleep(Duration::from_millis(20));
        }
        assert!(
            ours.is_finished(),
            "{what}: our {call:?} still blocked after 15 s"
        );
        let r = ours.join().expect("no crash");
        println!("    {what}: our {call:?} got {r:?} in {:?}", t0.elapsed());
        assert!(r.is_err(), "{what}: our {call:?} got {r:?}, not an error");
        drop(raw);
        still_serving(&good, 1 + i as u8);
    }

    // Our riomap'd window, fenced by canaries in the same allocation: the peer's RDMA writes
    // and reads that straddle either end fail at its device, and nothing outside changes.
    const PAGE: usize = 4096;
    let probes: [(&str, i64, u32, bool); 4] = [
        ("an RDMA write straddling the window's start", -8, 16, true),
        (
            "an RDMA write straddling the window's end",
            PAGE as i64 - 8,
            16,
            true,
        ),
        (
            "an RDMA read straddling the window's end",
            PAGE as i64 - 8,
            16,
            false,
        ),
        (
            "an RDMA read of the page after the window",
            PAGE as i64,
            64,
            false,
        ),
    ];
    for (i, (what, at, len, write)) in probes.into_iter().enumerate() {
        let mut raw = Raw::connect(dst, good_data).unwrap_or_else(|k| panic!("{what}: {k:?}"));
        let s = accepted.recv().unwrap();
        let mut mem = vec![0xaau8; 3 * PAGE];
        let win = mem.as_mut_ptr().wrapping_add(PAGE);
        // SAFETY: the middle page of `mem`, which outlives the registration (s closes first).
        let window = unsafe { UserMemory::new(win, PAGE) };
        s.iomap(window, libc::PROT_READ | libc::PROT_WRITE, 0)
            .expect("riomap");
        // The window is announced with our next send (after the peer spoke, for iWARP).
        raw.send_msg(Msg::Credits(64).encode());
        send_all(&s, b"x");
        let entry = raw.window(0);
        assert_eq!(
            entry.sge.length, PAGE as u32,
            "{what}: the window announced"
        );
        // Inside the window, both work: the peer's device and ours agree on the grant.
        raw.write_at(1010, (entry.sge.addr, entry.sge.key), &[0x55; 16]);
        assert!(raw.completion(1010).ok, "{what}: a write inside the window");
        assert!(raw.read(1011, (entry.sge.addr + 100, entry.sge.key), 16).ok);
        // The hostile act.
        let remote = (entry.sge.addr.wrapping_add_signed(at), entry.sge.key);
        let c = if write {
            raw.write_at(1012, remote, &vec![0x66; len as usize]);
            raw.completion(1012)
        } else {
            raw.read(1012, remote, len)
        };
        println!("    {what}: the peer's device says {}", c.status);
        // An iWARP write completes once the peer's TCP sent it: only our device can refuse
        // it (with a TERMINATE, below). Reads wait for our device's answer everywhere.
        assert!(
            !c.ok || (write && raw.iwarp),
            "{what}: the peer's device carried it out"
        );
        // Our side notices (the device ends the connection at an access violation).
        let t0 = Instant::now();
        let r = thread::spawn({
            let s = s.clone();
            move || OurCall::Recv.run(&s)
        })
        .join()
        .expect("no crash");
        println!("    {what}: our recv got {r:?} in {:?}", t0.elapsed());
        assert!(r.is_err(), "{what}: our recv got {r:?}, not an error");
        drop(raw);
        drop(s);
        // Nothing outside the window changed; inside only the in-window write landed.
        let mut want = vec![0xaau8; 3 * PAGE];
        want[PAGE..PAGE + 16].fill(0x55);
        assert!(
            mem[..PAGE] == want[..PAGE],
            "{what}: the page before changed"
        );
        assert!(
            mem[2 * PAGE..] == want[2 * PAGE..],
            "{what}: the page after changed"
        );
        assert!(
            mem[PAGE..2 * PAGE] == want[PAGE..2 * PAGE],
            "{what}: window"
        );
        still_serving(&good, 10 + i as u8);
    }
    drop(accepted);
    let last = connect(port);
    let last_accepted = acceptor.join().unwrap();
    for c in [last, good.0] {
        socket::close(c.fd()).unwrap();
    }
    drop((good.1, last_accepted));
    socket::close(l.fd()).unwrap();
}
