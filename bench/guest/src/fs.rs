//! virtio-fs: finding the device, its tag, and FUSE over its request
//! queue (FUSE_INIT, then LOOKUP, OPEN and READ of one file in the shared
//! folder's root; CREATE, WRITE, FSYNC and RELEASE of another), polled. Enough to prove the path from a guest through
//! the vmm's vhost-user frontend to a vhost-user-fs backend (virtiofsd)
//! and the host's files.

use crate::mem::{rd32, rd64, rd8, wr16, wr32, wr64, wr8, Arena};
use crate::pci::{self, BarAllocator, ConfigAccess, Function};
use crate::virtio::{self, write_desc, InitError, Transport, Virtqueue, DESC_F_NEXT, DESC_F_WRITE, NO_VECTOR};

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_INIT: u32 = 26;
const FUSE_CREATE: u32 = 35;
const O_WRONLY: u32 = 0o1;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;
/// The root directory's node id.
const ROOT: u64 = 1;
const IN_HEADER: u64 = 40;
const OUT_HEADER: u64 = 16;
/// One request's buffers: what the driver sends, and what the device
/// writes back (a header and up to this much).
const REQ_BUF: u64 = 4096;
const REPLY_BUF: u64 = 64 * 1024;
/// The most one WRITE carries (its data in a buffer of its own).
pub const WRITE_CHUNK: u64 = 64 * 1024;

/// Byte `i` of what `out=` files hold: the host computes the same.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

#[derive(Debug)]
pub enum FsError {
    NoConfigAccess,
    NotFound,
    Init(InitError),
    /// The device's tag is not the one asked for.
    Tag,
    /// No answer within the timeout.
    Timeout(&'static str),
    /// FUSE said no: the operation and its errno.
    Fuse(&'static str, i32),
    /// The name does not fit a request.
    Name,
}

impl core::fmt::Display for FsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FsError::NoConfigAccess => write!(f, "no PCI configuration access"),
            FsError::NotFound => write!(f, "virtio-fs device not found"),
            FsError::Init(e) => write!(f, "virtio-fs initialisation failed: {e:?}"),
            FsError::Tag => write!(f, "no virtio-fs device has the tag asked for"),
            FsError::Timeout(op) => write!(f, "{op}: no answer from the device"),
            FsError::Fuse(op, errno) => write!(f, "{op}: FUSE error {errno}"),
            FsError::Name => write!(f, "a file name of 1 to 255 bytes"),
        }
    }
}

/// READ's and WRITE's argument (fuse_read_in, fuse_write_in: one layout)
/// at `a`: its length.
fn io_in(a: u64, fh: u64, offset: u64, size: u32) -> u64 {
    wr64(a, fh);
    wr64(a + 8, offset);
    wr32(a + 16, size);
    wr32(a + 20, 0); // read_flags / write_flags
    wr64(a + 24, 0); // lock_owner
    wr32(a + 32, 0); // flags
    wr32(a + 36, 0);
    40
}

fn find(access: ConfigAccess, max_bus: u8, mut wanted: impl FnMut(Function) -> bool) -> Option<Function> {
    let mut hit = None;
    pci::functions(access, max_bus, |f| {
        let (vendor, device) = f.vendor_device();
        // 0x105a: modern virtio-fs (device type 26).
        if hit.is_none() && vendor == 0x1af4 && device == 0x105a && wanted(f) {
            hit = Some(f);
        }
    });
    hit
}

pub struct Share {
    _transport: Transport,
    requests: Virtqueue,
    req_buf: u64,
    reply_buf: u64,
    /// A WRITE's data.
    write_buf: u64,
    unique: u64,
    /// The device's tag (NUL-padded).
    pub tag: [u8; 36],
    pub request_queues: u32,
}

impl Share {
    /// The device's virtio-pci transport (what `mode=fuzz fuzz=fs` writes
    /// junk to).
    pub fn transport(&self) -> &Transport {
        &self._transport
    }

    /// The virtio-fs device (the first, or the one tagged `tag`), its
    /// high-priority and first request queue set up, FUSE not yet begun.
    pub fn open(rsdp: u64, max_bus: u8, tag: &[u8], arena: &Arena) -> Result<Share, FsError> {
        let access = pci::config_access(rsdp).ok_or(FsError::NoConfigAccess)?;
        let func = find(access, max_bus, |_| true).ok_or(FsError::NotFound)?;
        // Its own BAR window (the disk's, the console's and the NIC's are
        // placed from 0xc000_0000, 0xd000_0000 and 0xd800_0000).
        let mut bars = BarAllocator { next32: 0xdc00_0000, end32: 0xe000_0000 };
        let t = Transport::new(func, &mut bars).map_err(FsError::Init)?;
        let mut got = [0u8; 36];
        for (i, b) in got.iter_mut().enumerate() {
            *b = rd8(t.device_cfg + i as u64);
        }
        let len = got.iter().position(|&b| b == 0).unwrap_or(36);
        if !tag.is_empty() && &got[..len] != tag {
            return Err(FsError::Tag);
        }
        let request_queues = rd32(t.device_cfg + 36);
        t.negotiate(virtio::F_VERSION_1).map_err(FsError::Init)?;
        let mut hiprio = t.setup_queue(0, 8, NO_VECTOR, arena).map_err(FsError::Init)?;
        hiprio.suppress_interrupts();
        let mut requests = t.setup_queue(1, 8, NO_VECTOR, arena).map_err(FsError::Init)?;
        requests.suppress_interrupts();
        let req_buf = arena.alloc(REQ_BUF, 4096).ok_or(FsError::Init(InitError::OutOfMemory))?;
        let reply_buf = arena.alloc(REPLY_BUF, 4096).ok_or(FsError::Init(InitError::OutOfMemory))?;
        let write_buf = arena.alloc(WRITE_CHUNK, 4096).ok_or(FsError::Init(InitError::OutOfMemory))?;
        t.driver_ok();
        Ok(Share { _transport: t, requests, req_buf, reply_buf, write_buf, unique: 0, tag: got, request_queues })
    }

    /// One FUSE request: `opcode` on `node` with `args` (written by
    /// `args` into the request buffer after the header: their length),
    /// the reply's payload length back (after its header, at
    /// `reply_buf + OUT_HEADER`).
    fn call(&mut self, op: &'static str, opcode: u32, node: u64, reply_len: u64, args: impl FnOnce(u64) -> u64, timeout: &dyn Fn() -> bool) -> Result<u64, FsError> {
        self.call_with(op, opcode, node, reply_len, args, 0, timeout)
    }

    /// [`Share::call`] with `data_len` bytes of `write_buf` after the
    /// arguments (a WRITE's data), in a descriptor of their own.
    #[allow(clippy::too_many_arguments)]
    fn call_with(&mut self, op: &'static str, opcode: u32, node: u64, reply_len: u64, args: impl FnOnce(u64) -> u64, data_len: u64, timeout: &dyn Fn() -> bool) -> Result<u64, FsError> {
        self.unique += 1;
        let arg_len = args(self.req_buf + IN_HEADER);
        let head = IN_HEADER + arg_len;
        let len = head + data_len;
        let h = self.req_buf;
        wr32(h, len as u32);
        wr32(h + 4, opcode);
        wr64(h + 8, self.unique);
        wr64(h + 16, node);
        wr32(h + 24, 0); // uid
        wr32(h + 28, 0); // gid
        wr32(h + 32, 1); // pid
        wr16(h + 36, 0);
        wr16(h + 38, 0);
        wr32(self.reply_buf, 0);
        let table = self.requests.desc_table();
        let reply = (OUT_HEADER + reply_len.min(REPLY_BUF - OUT_HEADER)) as u32;
        if data_len > 0 {
            write_desc(table, 0, self.req_buf, head as u32, DESC_F_NEXT, 1);
            write_desc(table, 1, self.write_buf, data_len as u32, DESC_F_NEXT, 2);
            write_desc(table, 2, self.reply_buf, reply, DESC_F_WRITE, 0);
        } else {
            write_desc(table, 0, self.req_buf, len as u32, DESC_F_NEXT, 1);
            write_desc(table, 1, self.reply_buf, reply, DESC_F_WRITE, 0);
        }
        self.requests.push(0);
        self.requests.publish();
        loop {
            if self.requests.pop_used().is_some() {
                break;
            }
            if timeout() {
                return Err(FsError::Timeout(op));
            }
            core::hint::spin_loop();
        }
        let out_len = u64::from(rd32(self.reply_buf));
        let error = rd32(self.reply_buf + 4) as i32;
        if rd64(self.reply_buf + 8) != self.unique {
            return Err(FsError::Fuse(op, -5));
        }
        if error != 0 {
            return Err(FsError::Fuse(op, error));
        }
        Ok(out_len.saturating_sub(OUT_HEADER))
    }

    /// FUSE_INIT (protocol 7.31): the device's major and minor.
    pub fn init(&mut self, timeout: &dyn Fn() -> bool) -> Result<(u32, u32), FsError> {
        self.call(
            "FUSE_INIT",
            FUSE_INIT,
            0,
            64,
            |a| {
                wr32(a, 7);
                wr32(a + 4, 31);
                wr32(a + 8, 0); // max_readahead
                wr32(a + 12, 0); // flags
                16
            },
            timeout,
        )?;
        let r = self.reply_buf + OUT_HEADER;
        Ok((rd32(r), rd32(r + 4)))
    }

    /// FUSE_LOOKUP of `name` in the root: its node id and size.
    pub fn lookup(&mut self, name: &[u8], timeout: &dyn Fn() -> bool) -> Result<(u64, u64), FsError> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Name);
        }
        self.call(
            "FUSE_LOOKUP",
            FUSE_LOOKUP,
            ROOT,
            128,
            |a| {
                for (i, &b) in name.iter().enumerate() {
                    wr8(a + i as u64, b);
                }
                wr8(a + name.len() as u64, 0);
                name.len() as u64 + 1
            },
            timeout,
        )?;
        let e = self.reply_buf + OUT_HEADER;
        // fuse_entry_out: nodeid, then the attributes at 40 (size at +8).
        Ok((rd64(e), rd64(e + 48)))
    }

    /// FUSE_OPEN of `node` read-only: its file handle.
    pub fn open_file(&mut self, node: u64, timeout: &dyn Fn() -> bool) -> Result<u64, FsError> {
        self.call(
            "FUSE_OPEN",
            FUSE_OPEN,
            node,
            16,
            |a| {
                wr32(a, 0); // O_RDONLY
                wr32(a + 4, 0);
                8
            },
            timeout,
        )?;
        Ok(rd64(self.reply_buf + OUT_HEADER))
    }

    /// FUSE_READ of up to `size` bytes at `offset`: the bytes read, at
    /// `data()`.
    pub fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32, timeout: &dyn Fn() -> bool) -> Result<u64, FsError> {
        let size = size.min((REPLY_BUF - OUT_HEADER) as u32);
        self.call(
            "FUSE_READ",
            FUSE_READ,
            node,
            u64::from(size),
            |a| io_in(a, fh, offset, size),
            timeout,
        )
    }

    /// FUSE_CREATE of `name` in the root, write-only and truncated
    /// (0644): its node id and file handle.
    pub fn create(&mut self, name: &[u8], timeout: &dyn Fn() -> bool) -> Result<(u64, u64), FsError> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Name);
        }
        self.call(
            "FUSE_CREATE",
            FUSE_CREATE,
            ROOT,
            128 + 16,
            |a| {
                wr32(a, O_WRONLY | O_CREAT | O_TRUNC);
                wr32(a + 4, 0o100644); // S_IFREG | 0644
                wr32(a + 8, 0o022); // umask
                wr32(a + 12, 0); // open_flags
                for (i, &b) in name.iter().enumerate() {
                    wr8(a + 16 + i as u64, b);
                }
                wr8(a + 16 + name.len() as u64, 0);
                16 + name.len() as u64 + 1
            },
            timeout,
        )?;
        // fuse_entry_out (128 bytes: the node id first), then fuse_open_out
        // (the file handle first).
        let e = self.reply_buf + OUT_HEADER;
        Ok((rd64(e), rd64(e + 128)))
    }

    /// Where a WRITE's data goes before [`Share::write`]: `WRITE_CHUNK`
    /// bytes.
    pub fn write_data(&mut self) -> &'static mut [u8] {
        // SAFETY: the write buffer is RAM the arena gave this device alone,
        // WRITE_CHUNK bytes from `write_buf`, and no request is in flight
        // while the caller fills it (calls are synchronous).
        unsafe { core::slice::from_raw_parts_mut(self.write_buf as *mut u8, WRITE_CHUNK as usize) }
    }

    /// FUSE_WRITE of the first `len` bytes of [`Share::write_data`] at
    /// `offset`: how many the device took.
    pub fn write(&mut self, node: u64, fh: u64, offset: u64, len: u64, timeout: &dyn Fn() -> bool) -> Result<u64, FsError> {
        let len = len.min(WRITE_CHUNK);
        self.call_with(
            "FUSE_WRITE",
            FUSE_WRITE,
            node,
            8,
            |a| io_in(a, fh, offset, len as u32),
            len,
            timeout,
        )?;
        Ok(u64::from(rd32(self.reply_buf + OUT_HEADER)))
    }

    /// FUSE_FSYNC of `fh`: what was written is on the host's disk.
    pub fn fsync(&mut self, node: u64, fh: u64, timeout: &dyn Fn() -> bool) -> Result<(), FsError> {
        self.call(
            "FUSE_FSYNC",
            FUSE_FSYNC,
            node,
            0,
            |a| {
                wr64(a, fh);
                wr32(a + 8, 0);
                wr32(a + 12, 0);
                16
            },
            timeout,
        )
        .map(|_| ())
    }

    /// FUSE_RELEASE of `fh` (the last close).
    pub fn release(&mut self, node: u64, fh: u64, flags: u32, timeout: &dyn Fn() -> bool) -> Result<(), FsError> {
        self.call(
            "FUSE_RELEASE",
            FUSE_RELEASE,
            node,
            0,
            |a| {
                wr64(a, fh);
                wr32(a + 8, flags);
                wr32(a + 12, 0);
                wr64(a + 16, 0);
                24
            },
            timeout,
        )
        .map(|_| ())
    }

    /// The flags `create` opened with (RELEASE repeats them).
    pub const CREATE_FLAGS: u32 = O_WRONLY | O_CREAT | O_TRUNC;

    /// Where the last READ's bytes are.
    pub fn data(&self, len: u64) -> &'static [u8] {
        // SAFETY: the reply buffer is RAM the arena gave this device alone,
        // REPLY_BUF bytes from `reply_buf`; `len` is clamped to it.
        unsafe { core::slice::from_raw_parts((self.reply_buf + OUT_HEADER) as *const u8, len.min(REPLY_BUF - OUT_HEADER) as usize) }
    }
}
