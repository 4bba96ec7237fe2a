//! The verbs endpoint as the driver's [`Transport`]: the library's side of the transport seam
//! (the host tests put the in-memory wire on the other side).

use std::io;

use crate::proto::transport::{Completion, STATUS_RETRY_EXCEEDED, Source, Transport};
use crate::verbs::{Access, Endpoint, MrId, Payload, UserSeg};

// The driver tells a device's give-up by its verbs status code.
const _: () = assert!(rdma_sys::ibv_wc_status::IBV_WC_RETRY_EXC_ERR == STATUS_RETRY_EXCEEDED);

fn payload<'a>(src: Source<'a, MrId, UserSeg>) -> Payload<'a> {
    match src {
        Source::Empty => Payload::Empty,
        Source::Inline(b) => Payload::Inline(b),
        Source::Region(mr, segs, n) => Payload::Region(mr, segs, n),
        Source::User(seg) => Payload::User(seg),
    }
}

impl Transport for Endpoint {
    type Mr = MrId;
    type Seg = UserSeg;

    fn register(&mut self, len: usize, remote_write: bool) -> io::Result<MrId> {
        Transport::reserve(self, len, len, remote_write)
    }

    fn reserve(&mut self, len: usize, cap: usize, remote_write: bool) -> io::Result<MrId> {
        let access = if remote_write {
            Access::RemoteWrite
        } else {
            Access::Local
        };
        Endpoint::reserve(self, len, cap, access)
    }

    fn extend(&mut self, mr: MrId) -> io::Result<MrId> {
        Endpoint::extend(self, mr)
    }

    fn release(&mut self, mr: MrId) {
        Endpoint::release(self, mr)
    }

    fn remote_handle(&self, mr: MrId) -> (u64, u32) {
        Endpoint::remote_handle(self, mr)
    }

    fn read(&self, mr: MrId, offset: usize, out: &mut [u8]) {
        Endpoint::read(self, mr, offset, out)
    }

    fn write(&mut self, mr: MrId, offset: usize, data: &[u8]) {
        Endpoint::write(self, mr, offset, data)
    }

    fn inline_size(&self) -> u32 {
        self.sq_inline()
    }

    fn post_write(
        &mut self,
        wr_id: u64,
        src: Source<'_, MrId, UserSeg>,
        remote: (u64, u32),
        imm: Option<u32>,
    ) -> io::Result<()> {
        Endpoint::post_send(self, wr_id, payload(src), Some(remote), imm)
    }

    fn post_send(&mut self, wr_id: u64, bytes: &[u8]) -> io::Result<()> {
        Endpoint::post_send(self, wr_id, Payload::Inline(bytes), None, None)
    }

    fn post_read(&mut self, wr_id: u64, dst: UserSeg, remote: (u64, u32)) -> io::Result<()> {
        Endpoint::post_read(self, wr_id, dst, remote)
    }

    fn post_read_probe(&mut self, wr_id: u64) -> io::Result<()> {
        Endpoint::post_read_probe(self, wr_id)
    }

    fn post_recv(&mut self, wr_id: u64, into: Option<(MrId, usize, usize)>) -> io::Result<()> {
        Endpoint::post_recv(self, wr_id, into)
    }

    fn poll(&mut self, out: &mut [Completion]) -> io::Result<usize> {
        let mut n = 0;
        Endpoint::poll(self, out.len(), |c| {
            out[n] = Completion {
                wr_id: c.wr_id,
                ok: c.ok,
                status: c.status,
                imm: c.imm,
                len: c.byte_len,
            };
            n += 1;
        })?;
        Ok(n)
    }
}
