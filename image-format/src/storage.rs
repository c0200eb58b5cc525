//! Where layer bytes live. The library does all metadata I/O (and its own
//! synchronous data path) through these two traits, so that the crash
//! harness can swap the real filesystem for [`crate::sim::SimEnv`], which
//! forgets unflushed writes. The backend's io_uring hot path bypasses them and
//! uses [`Storage::raw_fd`] with the offsets the chain resolves.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::lock::{Holder, ImageLock, LockError, LockKind};

/// One open layer file.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Deallocates `[offset, offset + len)`; it reads as zeros afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The allocated (non-hole) ranges within `[start, end)`, in order. May
    /// over-approximate (a filesystem without SEEK_DATA reports everything).
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>>;
    /// The file descriptor, for callers that do their own I/O (io_uring).
    fn raw_fd(&self) -> Option<RawFd>;
}

/// The filesystem namespace around layer files.
pub trait Env: Send + Sync + std::fmt::Debug {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn Storage>>;
    /// Creates `path`, truncating an existing file.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn Storage>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creates, renames, links) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// A name that is the same for every path of one file, for cycle checks.
    fn identity(&self, path: &Path) -> io::Result<PathBuf>;
    /// The regular files in `dir` (no directories, sockets or FIFOs:
    /// nothing opening would block on).
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Locks `path` against other users (crate::lock); `wanted` says what
    /// for, in the refusal. Environments without real files lock nothing.
    fn lock(
        &self,
        _path: &Path,
        _kind: LockKind,
        _wanted: &'static str,
    ) -> Result<ImageLock, LockError> {
        Ok(ImageLock::none())
    }
    /// Who holds a lock on `path` that would stop a writer, if anyone.
    fn lock_holder(&self, _path: &Path) -> io::Result<Option<Holder>> {
        Ok(None)
    }
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealEnv;

/// The real filesystem for scratch images that nobody will look at after
/// a crash (a test fleet's clones, removed when the fleet ends): every
/// flush is skipped, as QEMU's `cache=unsafe` does. What is written is
/// the same; only its durability is given up, and with it a cache flush
/// of the whole disk per image made.
#[derive(Debug, Default, Clone, Copy)]
pub struct VolatileEnv;

/// A real file.
#[derive(Debug)]
pub struct RealFile {
    file: File,
    /// False for [`VolatileEnv`]'s files: `sync_data` does nothing.
    durable: bool,
}

impl RealFile {
    pub fn new(file: File) -> Self {
        RealFile {
            file,
            durable: true,
        }
    }
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn lseek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own; no memory is touched.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

impl Storage for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a descriptor we own; no memory is touched.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // No hole punching here: zeros are the same content, minus the space.
            let zeros = vec![0u8; 1 << 20];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            return Ok(());
        }
        Err(e)
    }
    fn sync_data(&self) -> io::Result<()> {
        if !self.durable {
            return Ok(());
        }
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let data = match lseek(fd, at, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                // Filesystems without SEEK_DATA: everything may hold data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    out.push((at, end));
                    break;
                }
                Err(e) => return Err(e),
            };
            if data >= end {
                break;
            }
            let hole = lseek(fd, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            out.push((data, hole));
            at = hole;
        }
        Ok(out)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

fn open_file(path: &Path, writable: bool) -> io::Result<File> {
    OpenOptions::new().read(true).write(writable).open(path)
}

fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

impl Env for RealEnv {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(RealFile::new(open_file(path, writable)?)))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(RealFile::new(create_file(path)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::hard_link(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn identity(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }
    fn lock(
        &self,
        path: &Path,
        kind: LockKind,
        wanted: &'static str,
    ) -> Result<ImageLock, LockError> {
        crate::lock::acquire(path, kind, wanted)
    }
    fn lock_holder(&self, path: &Path) -> io::Result<Option<Holder>> {
        crate::lock::holder(path)
    }
}

impl Env for VolatileEnv {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(RealFile {
            file: open_file(path, writable)?,
            durable: false,
        }))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(RealFile {
            file: create_file(path)?,
            durable: false,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealEnv.rename(from, to)
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealEnv.hard_link(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        RealEnv.remove(path)
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        RealEnv.exists(path)
    }
    fn identity(&self, path: &Path) -> io::Result<PathBuf> {
        RealEnv.identity(path)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        RealEnv.list_dir(dir)
    }
    fn lock(
        &self,
        path: &Path,
        kind: LockKind,
        wanted: &'static str,
    ) -> Result<ImageLock, LockError> {
        RealEnv.lock(path, kind, wanted)
    }
    fn lock_holder(&self, path: &Path) -> io::Result<Option<Holder>> {
        RealEnv.lock_holder(path)
    }
}

/// The directory a path lives in ("." for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `name` in the directory of `path`, without a "./" for bare file names.
pub fn sibling(path: &Path, name: impl AsRef<Path>) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(name),
        _ => name.as_ref().to_path_buf(),
    }
}

/// A zeroed, page-aligned byte buffer. Copies between the page cache and a
/// buffer that is not aligned run at about half speed on this kind of
/// machine, and O_DIRECT needs the alignment anyway.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

pub const BUF_ALIGN: usize = 4096;

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + BUF_ALIGN];
        let start = storage.as_ptr().align_offset(BUF_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}
