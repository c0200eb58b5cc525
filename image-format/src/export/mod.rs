//! `img export`: a chain served on the host as one raw file through FUSE,
//! as qemu-storage-daemon's FUSE export serves an image. Reads resolve
//! through the chain; writes go to the top layer (copy-on-write: the
//! sealed layers below, and every other clone of them, stay as they are);
//! `fsync` is the format's FLUSH (every completed write durable); a hole
//! punched (`fallocate` PUNCH_HOLE, ZERO_RANGE) is a discard. The file's
//! size is the image's virtual size and cannot be changed through it.
//!
//! The chain is opened with the format's locks ([`Disk::open`]): the top
//! exclusively when writable, so a blk-backend (which takes the same
//! locks) and another export cannot have it writable at once; the refusal
//! names who has it.
//!
//! Requests are served by a few worker threads (see `session`): the
//! disk's bookkeeping under a lock, the data copied in and out of the
//! layer files without it.

mod abi;
mod session;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zerocopy::{FromBytes, IntoBytes};

use self::abi::{op, AttrOut, InHeader};
pub use self::session::ExportSession;
use self::session::Reply;
use crate::disk::{Disk, Source};
use crate::error::{io_at, Error};
use crate::storage::{AlignedBuf, Storage};

/// How long the kernel may keep the file's attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);
/// The largest read or write the kernel hands over in one request.
const MAX_IO: u32 = 1 << 20;
/// Worker threads: two keep the kernel's copy into one request's buffer
/// and the page cache's copy out of another's going at once; more only
/// queue behind the disk's lock on a small machine.
const WORKERS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Open(#[from] Error),
    #[error("the mount point {}: {source}", path.display())]
    MountPoint {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("mounting the FUSE export on {}: {source}", path.display())]
    Mount {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The chain as one file.
pub struct Export {
    /// The chain's bookkeeping (index, maps, header flags): held while a
    /// request decides where its bytes are, not while they are copied.
    disk: Mutex<Disk>,
    /// Every layer's file, base first, with its path (for errors): the
    /// chain does not change while exported.
    layers: Vec<(Arc<dyn Storage>, std::path::PathBuf)>,
    readonly: bool,
    size: u64,
    attr: abi::Attr,
    /// Errors logged so far (a failing disk must not flood the log).
    errors_logged: AtomicU64,
}

impl Export {
    /// Opens the chain at `image` (locked: see the module's notes).
    pub fn open(image: &Path, readonly: bool) -> Result<Export, ExportError> {
        let disk = Disk::open_path(image, !readonly)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let size = disk.virtual_size();
        let attr = abi::Attr {
            ino: abi::ROOT_ID,
            size,
            blocks: size.div_ceil(512),
            atime: now.as_secs(),
            mtime: now.as_secs(),
            ctime: now.as_secs(),
            atimensec: now.subsec_nanos(),
            mtimensec: now.subsec_nanos(),
            ctimensec: now.subsec_nanos(),
            mode: libc::S_IFREG | if readonly { 0o444 } else { 0o644 },
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: disk.block_size() as u32,
            flags: 0,
        };
        let layers = disk
            .layers()
            .iter()
            .map(|l| (l.storage.clone(), l.path.clone()))
            .collect();
        Ok(Export {
            disk: Mutex::new(disk),
            layers,
            readonly,
            size,
            attr,
            errors_logged: AtomicU64::new(0),
        })
    }

    /// The image's virtual size: the exported file's length.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Mounts the export over the regular file `mountpoint` (made if it
    /// does not exist) and serves it until the returned session is dropped
    /// or joined, which unmounts it; the chain is flushed and marked clean
    /// as the session ends.
    pub fn mount(self, mountpoint: &Path) -> Result<ExportSession, ExportError> {
        let mp = |source| ExportError::MountPoint {
            path: mountpoint.to_path_buf(),
            source,
        };
        match std::fs::metadata(mountpoint) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(mp(std::io::Error::other(
                    "not a regular file (an export is mounted over a file)",
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::File::create(mountpoint).map_err(mp)?;
            }
            Err(e) => return Err(mp(e)),
        }
        use fuser::MountOption;
        let options = [
            MountOption::FSName("img".into()),
            MountOption::Subtype("img".into()),
            MountOption::DefaultPermissions,
            if self.readonly {
                MountOption::RO
            } else {
                MountOption::RW
            },
        ];
        ExportSession::start(self, mountpoint, &options, WORKERS)
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        // A worker that panicked holding it left nothing half-done that
        // the next request cannot see (maps are rewritten whole on flush).
        self.disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `[offset, offset + len)` clipped to the file: None past its end.
    fn clip(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        (offset <= self.size).then(|| (offset, len.min(self.size - offset)))
    }

    /// EIO for the kernel; the cause logged (the first few only).
    fn errno(&self, e: &Error) -> i32 {
        let n = self.errors_logged.fetch_add(1, Ordering::Relaxed);
        if n < 16 {
            tracing::warn!("{e}");
        } else if n.is_power_of_two() {
            tracing::warn!("{e} ({n} errors so far; not all logged)");
        }
        libc::EIO
    }

    /// Answers one request: `request` is all of it, as read.
    fn handle(&self, request: &[u8], device: &File, read_buf: &mut AlignedBuf) {
        let Ok((h, args)) = InHeader::read_from_prefix(request) else {
            return;
        };
        let reply = Reply::new(device, h.unique);
        match h.opcode {
            // No answer expected.
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => {}
            op::INIT => match arg::<abi::InitIn>(args) {
                Ok(i) => self.init(i, reply),
                Err(e) => reply.error(e),
            },
            _ if h.nodeid != abi::ROOT_ID && h.opcode != op::STATFS && h.opcode != op::DESTROY => {
                reply.error(libc::ENOENT)
            }
            op::GETATTR => reply.ok(&[self.attr_out().as_bytes()]),
            op::SETATTR => match arg::<abi::SetattrIn>(args) {
                Ok(a) => self.setattr(a, reply),
                Err(e) => reply.error(e),
            },
            // The root is a file: nothing lives below it.
            op::LOOKUP => reply.error(libc::ENOTDIR),
            op::OPEN => match arg::<abi::OpenIn>(args) {
                Ok(o) if self.readonly && o.flags & libc::O_ACCMODE as u32 != 0 => {
                    reply.error(libc::EROFS)
                }
                Ok(o) => reply.ok(&[abi::OpenOut {
                    open_flags: Self::open_flags(o.flags),
                    ..Default::default()
                }
                .as_bytes()]),
                Err(e) => reply.error(e),
            },
            op::READ => match arg::<abi::IoIn>(args) {
                Ok(r) => self.read(r, reply, read_buf),
                Err(e) => reply.error(e),
            },
            op::WRITE => match arg::<abi::IoIn>(args) {
                Ok(w) => {
                    let data = &request[abi::WRITE_DATA_OFFSET.min(request.len())..];
                    if data.len() < w.size as usize {
                        return reply.error(libc::EINVAL);
                    }
                    self.write(w.offset, &data[..w.size as usize], reply)
                }
                Err(e) => reply.error(e),
            },
            op::STATFS => reply.ok(&[abi::StatfsOut {
                blocks: self.size / 4096,
                files: 1,
                bsize: 4096,
                frsize: 4096,
                namelen: 255,
                ..Default::default()
            }
            .as_bytes()]),
            // close(2) and the last close: durability is fsync's.
            op::FLUSH | op::RELEASE | op::DESTROY => reply.ok(&[]),
            op::FSYNC => match self.disk().flush() {
                Ok(()) => reply.ok(&[]),
                Err(e) => reply.error(self.errno(&e)),
            },
            op::FALLOCATE => match arg::<abi::FallocateIn>(args) {
                Ok(f) => self.fallocate(f, reply),
                Err(e) => reply.error(e),
            },
            op::LSEEK => match arg::<abi::LseekIn>(args) {
                Ok(l) => match self.seek(l.offset, l.whence) {
                    Ok(offset) => reply.ok(&[abi::LseekOut { offset }.as_bytes()]),
                    Err(errno) => reply.error(errno),
                },
                Err(e) => reply.error(e),
            },
            // Block-device ioctls (BLKGETSIZE64, BLKDISCARD...): a regular
            // file has none; its callers fall back to stat and fallocate.
            op::IOCTL => reply.error(libc::ENOTTY),
            _ => reply.error(libc::ENOSYS),
        }
    }

    fn init(&self, i: abi::InitIn, reply: Reply<'_>) {
        if i.major < abi::KERNEL_VERSION {
            return reply.error(libc::EPROTO);
        }
        if i.major > abi::KERNEL_VERSION {
            // The kernel asks again with ours.
            let ours = abi::InitOut {
                major: abi::KERNEL_VERSION,
                minor: abi::KERNEL_MINOR_VERSION,
                ..Default::default()
            };
            return reply.ok(&[ours.as_bytes()]);
        }
        use abi::init::*;
        // O_DIRECT requests sent on without waiting for the one before
        // (libfuse's default too): the workers always have the next one.
        let wanted = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES;
        let out = abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION,
            max_readahead: i.max_readahead.min(MAX_IO),
            flags: i.flags & wanted,
            max_background: 64,
            congestion_threshold: 48,
            max_write: MAX_IO,
            time_gran: 1,
            max_pages: (MAX_IO / 4096) as u16,
            ..Default::default()
        };
        reply.ok(&[out.as_bytes()]);
    }

    /// An O_DIRECT opener's I/O all goes straight to the export (it
    /// would anyway), and its writes run in parallel: without
    /// PARALLEL_DIRECT_WRITES the kernel holds the file's inode lock
    /// across each direct write, one at a time whatever the queue depth.
    /// Other openers go through the page cache (a loop device, mkfs).
    fn open_flags(flags: u32) -> u32 {
        use abi::fopen::*;
        if flags & libc::O_DIRECT as u32 != 0 {
            DIRECT_IO | PARALLEL_DIRECT_WRITES
        } else {
            0
        }
    }

    fn attr_out(&self) -> AttrOut {
        AttrOut {
            attr_valid: TTL.as_secs(),
            attr: self.attr,
            ..Default::default()
        }
    }

    /// Times and owners are the export's own; the size is the image's.
    fn setattr(&self, a: abi::SetattrIn, reply: Reply<'_>) {
        use abi::fattr::*;
        if a.valid & (MODE | UID | GID) != 0 {
            return reply.error(libc::EPERM);
        }
        // (`img resize` changes an image's size; O_TRUNC on an export
        // would destroy it.)
        if a.valid & SIZE != 0 && a.size != self.size {
            return reply.error(libc::EINVAL);
        }
        reply.ok(&[self.attr_out().as_bytes()]);
    }

    fn read(&self, r: abi::IoIn, reply: Reply<'_>, buf: &mut AlignedBuf) {
        let Some((offset, len)) = self.clip(r.offset, u64::from(r.size)) else {
            return reply.error(libc::EINVAL);
        };
        let len = len as usize;
        if buf.len() < len {
            *buf = AlignedBuf::new(len);
        }
        let buf = &mut buf[..len];
        match self.read_at(buf, offset) {
            Ok(()) => reply.ok(&[buf]),
            Err(e) => reply.error(self.errno(&e)),
        }
    }

    /// Reads through the chain: where the bytes are is asked under the
    /// disk's lock, the copies are made without it.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let extents: Vec<_> = self.disk().resolve(offset, buf.len() as u64).collect();
        for e in extents {
            let part = &mut buf[(e.offset - offset) as usize..(e.offset - offset + e.len) as usize];
            match e.source {
                Source::Zero => part.fill(0),
                Source::Layer { layer, file_offset } => {
                    let (storage, path) = &self.layers[layer];
                    storage.read_at(part, file_offset).map_err(io_at(path))?;
                }
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], reply: Reply<'_>) {
        if self.readonly {
            return reply.error(libc::EROFS);
        }
        let Some((offset, len)) = self.clip(offset, data.len() as u64) else {
            return reply.error(libc::EFBIG);
        };
        if len == 0 && !data.is_empty() {
            // At the end: the file does not grow.
            return reply.error(libc::ENOSPC);
        }
        match self.write_at(&data[..len as usize], offset) {
            Ok(()) => reply.ok(&[abi::WriteOut {
                size: len as u32,
                padding: 0,
            }
            .as_bytes()]),
            Err(e) => reply.error(self.errno(&e)),
        }
    }

    /// Writes to the top. Blocks the top already owns, and whole blocks,
    /// are copied in without the disk's lock (the lock only to look, and
    /// for whole new blocks to note them afterwards); a partial block the
    /// top does not own yet is completed from the chain under it.
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), Error> {
        let len = data.len() as u64;
        let (file_offset, note) = {
            let mut disk = self.disk();
            disk.begin_writes()?;
            if let Some(at) = disk.in_place_target(offset, len) {
                (at, false)
            } else if let Some((_, at)) = disk.direct_write_target(offset, len) {
                (at, true)
            } else {
                return disk.write_at(data, offset);
            }
        };
        let (top, path) = self.layers.last().expect("a chain has a top");
        top.write_at(data, file_offset).map_err(io_at(path))?;
        if note {
            self.disk().note_written(offset, len);
        }
        Ok(())
    }

    /// SEEK_DATA and SEEK_HOLE from the chain's index, as
    /// qemu-storage-daemon's export answers them: blocks no layer holds
    /// (or zeroed) are a hole, so `cp --sparse`, `qemu-img convert` and
    /// `tar -S` of the exported file skip them. (SEEK_SET, SEEK_CUR and
    /// SEEK_END never come: the kernel answers those itself.)
    fn seek(&self, offset: u64, whence: u32) -> Result<u64, i32> {
        const SEEK_DATA: u32 = libc::SEEK_DATA as u32;
        const SEEK_HOLE: u32 = libc::SEEK_HOLE as u32;
        if whence != SEEK_DATA && whence != SEEK_HOLE {
            return Err(libc::EINVAL);
        }
        if offset >= self.size {
            return Err(libc::ENXIO);
        }
        let wanted_zero = whence == SEEK_HOLE;
        let disk = self.disk();
        let found = disk
            .resolve(offset, self.size - offset)
            .find(|e| matches!(e.source, Source::Zero) == wanted_zero)
            .map(|e| e.offset);
        match (found, wanted_zero) {
            (Some(at), _) => Ok(at),
            // The end of the file is a hole.
            (None, true) => Ok(self.size),
            (None, false) => Err(libc::ENXIO),
        }
    }

    /// PUNCH_HOLE and ZERO_RANGE make the range read as zeros (the
    /// format's discard); plain allocation within the file is a no-op.
    fn fallocate(&self, f: abi::FallocateIn, reply: Reply<'_>) {
        if self.readonly {
            return reply.error(libc::EROFS);
        }
        let Some((offset, len)) = self.clip(f.offset, f.length) else {
            return reply.error(libc::EINVAL);
        };
        let mode = f.mode as i32;
        let zeroing = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        let known = zeroing | libc::FALLOC_FL_KEEP_SIZE;
        if mode & !known != 0 {
            return reply.error(libc::EOPNOTSUPP);
        }
        if mode & zeroing == 0 {
            return reply.ok(&[]);
        }
        match self.disk().write_zeroes(offset, len) {
            Ok(()) => reply.ok(&[]),
            Err(e) => reply.error(self.errno(&e)),
        }
    }
}

/// A request's argument: EINVAL when it is shorter than its structure.
fn arg<T: FromBytes>(args: &[u8]) -> Result<T, i32> {
    T::read_from_prefix(args)
        .map(|(t, _)| t)
        .map_err(|_| libc::EINVAL)
}
