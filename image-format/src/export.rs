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
//! One request at a time (fuser's session loop), as the chain's
//! synchronous path wants.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

use crate::disk::Disk;
use crate::error::Error;
use crate::storage::AlignedBuf;

/// The root inode: the exported file itself.
const ROOT: u64 = fuser::FUSE_ROOT_ID;
/// How long the kernel may keep the file's attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);
/// The largest write the kernel hands over in one request.
const MAX_WRITE: u32 = 1 << 20;

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
    disk: Disk,
    readonly: bool,
    attr: FileAttr,
    /// One read's bytes, kept (a fresh megabyte per request is a fresh
    /// mapping to fault in and zero) and page-aligned (the page cache
    /// copies out to it about twice as fast).
    read_buf: AlignedBuf,
}

impl Export {
    /// Opens the chain at `image` (locked: see the module's notes).
    pub fn open(image: &Path, readonly: bool) -> Result<Export, ExportError> {
        let disk = Disk::open_path(image, !readonly)?;
        let now = SystemTime::now();
        // SAFETY: getuid and getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let attr = FileAttr {
            ino: ROOT,
            size: disk.virtual_size(),
            blocks: disk.virtual_size().div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: if readonly { 0o444 } else { 0o644 },
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: disk.block_size() as u32,
            flags: 0,
        };
        Ok(Export {
            disk,
            readonly,
            attr,
            read_buf: AlignedBuf::new(0),
        })
    }

    /// The image's virtual size: the exported file's length.
    pub fn size(&self) -> u64 {
        self.disk.virtual_size()
    }

    /// Mounts the export over the regular file `mountpoint` (made if it
    /// does not exist) and serves it on a thread of its own until the
    /// returned session is dropped or joined, which unmounts it; the
    /// chain is flushed and marked clean as the session ends.
    pub fn mount(self, mountpoint: &Path) -> Result<fuser::BackgroundSession, ExportError> {
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
        let mut options = vec![
            MountOption::FSName("img".into()),
            MountOption::Subtype("img".into()),
            MountOption::DefaultPermissions,
        ];
        options.push(if self.readonly {
            MountOption::RO
        } else {
            MountOption::RW
        });
        fuser::spawn_mount2(self, mountpoint, &options).map_err(|source| ExportError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        })
    }

    /// `[offset, offset + len)` clipped to the file: None past its end.
    fn clip(&self, offset: i64, len: u64) -> Option<(u64, u64)> {
        let offset = u64::try_from(offset).ok()?;
        let size = self.disk.virtual_size();
        (offset <= size).then(|| (offset, len.min(size - offset)))
    }

    fn errno(e: &Error) -> i32 {
        tracing::warn!("{e}");
        libc::EIO
    }
}

impl Filesystem for Export {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        // O_DIRECT requests sent on without waiting for the one before
        // (libfuse's default too): this loop always has the next one.
        const FUSE_ASYNC_DIO: u64 = 1 << 15;
        let _ = config.add_capabilities(FUSE_ASYNC_DIO);
        Ok(())
    }

    /// The session ends (unmounted): what was written made durable and
    /// the top marked clean.
    fn destroy(&mut self) {
        if let Err(e) = self.disk.mark_clean() {
            tracing::error!("closing the image: {e}");
        }
    }

    fn lookup(&mut self, _req: &Request<'_>, _parent: u64, _name: &OsStr, reply: ReplyEntry) {
        // The root is a file: nothing lives below it.
        reply.error(libc::ENOTDIR);
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if ino != ROOT {
            return reply.error(libc::ENOENT);
        }
        reply.attr(&TTL, &self.attr);
    }

    /// Times and owners are the export's own; the size is the image's.
    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOENT);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(libc::EPERM);
        }
        // (`img resize` changes an image's size; O_TRUNC on an export
        // would destroy it.)
        if size.is_some_and(|s| s != self.disk.virtual_size()) {
            return reply.error(libc::EINVAL);
        }
        reply.attr(&TTL, &self.attr);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ino != ROOT {
            return reply.error(libc::ENOENT);
        }
        if self.readonly && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        reply.opened(0, 0);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some((offset, len)) = self.clip(offset, u64::from(size)) else {
            return reply.error(libc::EINVAL);
        };
        let len = len as usize;
        if self.read_buf.len() < len {
            self.read_buf = AlignedBuf::new(len);
        }
        let buf = &mut self.read_buf[..len];
        match self.disk.read_at(buf, offset) {
            Ok(()) => reply.data(buf),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
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
        match self.disk.write_at(&data[..len as usize], offset) {
            Ok(()) => reply.written(len as u32),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }

    /// Block-device ioctls (BLKGETSIZE64, BLKDISCARD...): a regular file
    /// has none; its callers fall back to stat and fallocate.
    fn ioctl(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: u32,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(libc::ENOTTY);
    }

    /// close(2): nothing to do (durability is fsync's).
    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _owner: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _data: bool, reply: ReplyEmpty) {
        match self.disk.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }

    /// PUNCH_HOLE and ZERO_RANGE make the range read as zeros (the
    /// format's discard); plain allocation within the file is a no-op.
    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.readonly {
            return reply.error(libc::EROFS);
        }
        let Some((offset, len)) = u64::try_from(length)
            .ok()
            .and_then(|l| self.clip(offset, l))
        else {
            return reply.error(libc::EINVAL);
        };
        let zeroing = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        let known = zeroing | libc::FALLOC_FL_KEEP_SIZE;
        if mode & !known != 0 {
            return reply.error(libc::EOPNOTSUPP);
        }
        if mode & zeroing == 0 {
            return reply.ok();
        }
        match self.disk.write_zeroes(offset, len) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::errno(&e)),
        }
    }
}
