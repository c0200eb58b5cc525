//! The FUSE session of an export: the file mounted (by fuser: mount(2) as
//! root, fusermount3 otherwise) and a few worker threads, each reading the
//! kernel's requests from /dev/fuse into a buffer of its own and answering
//! them.
//!
//! Why not fuser's session loop: it reads every request into one buffer
//! where a WRITE's data starts 80 bytes past a page boundary, and serves
//! one request at a time. Here a worker's buffer is laid out so that the
//! data lands page-aligned (the page cache copies 1 MiB out of an aligned
//! buffer at 16.5 GB/s on this kind of machine, out of one 80 bytes off
//! at 10.6), and two workers keep both of the kernel's copies going at
//! once (one takes a request in while the other writes one out), as
//! qemu-storage-daemon's thread pool does.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use zerocopy::IntoBytes;

use super::abi::{OutHeader, WRITE_DATA_OFFSET};
use super::{Export, ExportError};
use crate::storage::{AlignedBuf, BUF_ALIGN};

/// fuser mounts the file; this filesystem is never asked anything (the
/// session's requests are read by the workers, from a copy of its
/// descriptor), and dropping the session unmounts the file.
struct MountOnly;
impl fuser::Filesystem for MountOnly {}

/// A mounted export being served. Dropping it (or [`ExportSession::join`])
/// unmounts the file, waits for the workers and closes the image.
pub struct ExportSession {
    mount: Option<fuser::Session<MountOnly>>,
    workers: Vec<JoinHandle<std::io::Result<()>>>,
    export: Arc<Export>,
}

impl ExportSession {
    pub(super) fn start(
        export: Export,
        mountpoint: &Path,
        options: &[fuser::MountOption],
        workers: usize,
    ) -> Result<ExportSession, ExportError> {
        let mount_error = |source| ExportError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        };
        let mount = fuser::Session::new(MountOnly, mountpoint, options).map_err(mount_error)?;
        let device = Arc::new(File::from(
            std::os::fd::AsFd::as_fd(&mount)
                .try_clone_to_owned()
                .map_err(mount_error)?,
        ));
        let export = Arc::new(export);
        let workers = (0..workers.max(1))
            .map(|i| {
                let (device, export) = (device.clone(), export.clone());
                std::thread::Builder::new()
                    .name(format!("export-{i}"))
                    .spawn(move || serve(&device, &export))
                    .map_err(mount_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ExportSession {
            mount: Some(mount),
            workers,
            export,
        })
    }

    /// Whether the session has ended on its own: someone unmounted the
    /// file.
    pub fn is_finished(&self) -> bool {
        self.workers.iter().any(|w| w.is_finished())
    }

    /// Unmounts the file (lazily: a user still holding it, such as a loop
    /// device, keeps being served until it lets go), waits for the workers
    /// and makes what was written durable, the top marked clean.
    pub fn join(mut self) -> Result<(), ExportError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), ExportError> {
        drop(self.mount.take());
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("reading FUSE requests: {e}"),
                Err(_) => tracing::error!("an export worker panicked"),
            }
        }
        self.export.disk().mark_clean()?;
        Ok(())
    }
}

impl Drop for ExportSession {
    fn drop(&mut self) {
        if self.mount.is_some() {
            if let Err(e) = self.end() {
                tracing::error!("closing the image: {e}");
            }
        }
    }
}

/// One worker: requests read and answered until the file is unmounted.
fn serve(device: &File, export: &Export) -> std::io::Result<()> {
    let mut request = RequestBuf::new(super::MAX_IO as usize);
    let mut read_buf = AlignedBuf::new(0);
    loop {
        let n = match (&*device).read(request.as_mut()) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                // The request was interrupted before it was read; a
                // signal; nothing yet.
                Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => continue,
                // Unmounted: the session is over.
                Some(libc::ENODEV) => return Ok(()),
                _ => return Err(e),
            },
        };
        export.handle(&request.as_mut()[..n], device, &mut read_buf);
    }
}

/// A request buffer whose byte [`WRITE_DATA_OFFSET`] is page-aligned: a
/// WRITE's data lands on a page boundary.
struct RequestBuf {
    buf: AlignedBuf,
}

impl RequestBuf {
    fn new(max_write: usize) -> RequestBuf {
        // The kernel wants room for the largest WRITE with its headers, and
        // never less than 8 KiB.
        let len = (WRITE_DATA_OFFSET + max_write).max(8192);
        RequestBuf {
            buf: AlignedBuf::new(BUF_ALIGN + len),
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[BUF_ALIGN - WRITE_DATA_OFFSET..]
    }
}

/// The most pieces a reply's body comes in.
const MAX_PARTS: usize = 2;

/// The answer to one request.
pub(super) struct Reply<'a> {
    device: &'a File,
    unique: u64,
}

impl<'a> Reply<'a> {
    pub(super) fn new(device: &'a File, unique: u64) -> Reply<'a> {
        Reply { device, unique }
    }

    /// Success, with `parts` as the reply's body.
    pub(super) fn ok(self, parts: &[&[u8]]) {
        self.send(0, parts);
    }

    /// Failure with `errno` (positive).
    pub(super) fn error(self, errno: i32) {
        self.send(-errno, &[]);
    }

    fn send(self, error: i32, parts: &[&[u8]]) {
        let len = size_of::<OutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = OutHeader {
            len: len as u32,
            error,
            unique: self.unique,
        };
        let mut iov = [IoSlice::new(&[]); 1 + MAX_PARTS];
        iov[0] = IoSlice::new(header.as_bytes());
        for (slot, p) in iov[1..].iter_mut().zip(parts) {
            *slot = IoSlice::new(p);
        }
        // One writev is one reply (the device takes it whole or not at all).
        match (&*self.device).write_vectored(&iov[..1 + parts.len().min(MAX_PARTS)]) {
            Ok(_) => {}
            // The request was interrupted and is gone.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                static FAILED: AtomicU64 = AtomicU64::new(0);
                if FAILED.fetch_add(1, Ordering::Relaxed) < 8 {
                    tracing::warn!("answering FUSE request {}: {e}", self.unique);
                }
            }
        }
    }
}
