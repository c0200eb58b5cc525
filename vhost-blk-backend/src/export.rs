//! One export: an open chain served on one socket, and the request
//! execution every queue worker of it shares.
//!
//! The hot path takes no lock another queue can hold: each worker resolves
//! reads and overwrites on its own copy of the chain's index
//! ([`ChainView`]) and does the I/O on its own io_uring, through
//! descriptors that never change while the export lives. The [`Disk`]
//! itself sits behind one mutex for what changes the chain's state: a
//! write that allocates blocks in the top, flush, discard, write-zeroes and
//! writes that are not whole blocks. Whoever changes it forwards the index
//! changes to every worker over a channel; a worker applies them after it
//! pops requests and before it resolves them, so a read that the guest
//! issued after a write completed always sees that write.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use crossbeam_channel::{Receiver, Sender};
use image_format::{ChainView, Disk, IndexChange, Source};
use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::config::{self, SECTOR};
use crate::uring::{Pending, QueueRing, RingFile};
use blk_request::{Kind, Request, Segment};

/// How the read-only layers below the private top are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BaseIo {
    /// Through the host page cache: a fleet of clones of one base shares
    /// one cached copy of it.
    Page,
    /// O_DIRECT: no host caching; every guest read goes to the device.
    Direct,
}

/// What an export serves and how (the control protocol's, checked once
/// for the command line and the control socket alike).
pub use blk_control::ExportSpec;

/// Layer files shared by every export of the process: clones of one base
/// read it through one descriptor per mode.
#[derive(Default)]
pub struct SharedFiles {
    open: Mutex<HashMap<(u64, u64, bool), Weak<File>>>,
}

impl SharedFiles {
    /// A read-only descriptor for `path`, shared with other exports.
    fn read_only(&self, path: &Path, direct: bool) -> io::Result<Arc<File>> {
        let meta = std::fs::metadata(path)?;
        let key = (meta.dev(), meta.ino(), direct);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(f);
        }
        let mut o = std::fs::OpenOptions::new();
        o.read(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let f = Arc::new(o.open(path)?);
        open.insert(key, Arc::downgrade(&f));
        Ok(f)
    }
}

/// Per layer (base first): the descriptor for aligned I/O (O_DIRECT where
/// chosen and possible) and a buffered one for the rest.
struct LayerFiles {
    aligned: Vec<Arc<File>>,
    /// Whether `aligned[k]` is O_DIRECT (needs 512-byte alignment).
    aligned_direct: Vec<bool>,
    buffered: Vec<Arc<File>>,
    /// Whether layer `k` lives in memory (see [`in_memory`]): its I/O is
    /// done by the worker itself, not through the ring.
    in_memory: Vec<bool>,
}

/// Whether `f` lives in memory (tmpfs, ramfs, hugetlbfs). Its reads and
/// writes are copies that never wait for a device, and io_uring hands
/// every one of them to a kernel worker thread (these filesystems cannot
/// say "would block"): on /dev/shm those threads took 64 % of the
/// backend's CPU and a context switch per I/O, where the queue worker
/// copying the bytes itself takes a fraction of that.
fn in_memory(f: &File) -> bool {
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;
    rustix::fs::fstatfs(f).is_ok_and(|st| {
        matches!(
            st.f_type as u32,
            TMPFS_MAGIC | RAMFS_MAGIC | HUGETLBFS_MAGIC
        )
    })
}

struct DiskState {
    disk: Disk,
    /// Every worker's channel, by subscription id.
    subscribers: Vec<(u64, Sender<IndexChange>)>,
    next_id: u64,
}

pub struct Export {
    /// As added (its limits as they were then: `current_spec` has them
    /// as they are).
    pub spec: ExportSpec,
    /// Its rate limits, changed live by `export-set-limits`.
    pub limits: crate::limits::ExportLimits,
    capacity: u64,
    config: Vec<u8>,
    id: [u8; 20],
    files: LayerFiles,
    state: Mutex<DiskState>,
    io_failures: Mutex<cli_support::log_limit::LogLimit>,
    /// Requests answered, and those answered with an error (IOERR/UNSUPP).
    requests: std::sync::atomic::AtomicU64,
    failed_requests: std::sync::atomic::AtomicU64,
    /// The top is marked dirty (`Disk::begin_writes`): looked at without
    /// the disk's lock before every ring write, set once.
    writes_begun: std::sync::atomic::AtomicBool,
}

/// A worker's copy of the index and the channel that keeps it current.
pub struct Subscription {
    pub view: ChainView,
    changes: Receiver<IndexChange>,
    id: u64,
}

impl Subscription {
    /// Applies every change forwarded so far.
    #[inline]
    pub fn catch_up(&mut self) {
        while let Ok(c) = self.changes.try_recv() {
            self.view.apply(c);
        }
    }
}

fn open_rw_direct(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

fn open_rw(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

impl Export {
    /// The spec with the limits as they are now (a seal or a merge serves
    /// the export again with them).
    pub fn current_spec(&self) -> ExportSpec {
        ExportSpec {
            limits: self.limits.limits(),
            limit_group: self.limits.group(),
            ..self.spec.clone()
        }
    }

    /// Opens the export's chain. `shadow_dir`: where the crash shadow of a
    /// writable top lives (see `image_format::shadow`).
    /// `group`: the rate-limit group `spec.limit_group` names.
    pub fn open(
        spec: ExportSpec,
        group: Option<(String, rate_limit::Shared)>,
        shared: &SharedFiles,
        base_io: BaseIo,
        shadow_dir: Option<&Path>,
    ) -> anyhow::Result<Export> {
        use anyhow::Context;
        let mut disk = Disk::open_path(&spec.image, !spec.readonly)?;
        if let Some(dir) = shadow_dir {
            disk.attach_crash_shadow(dir)?;
        }
        disk.track_index_changes();
        let n = disk.layers().len();
        let mut files = LayerFiles {
            aligned: Vec::with_capacity(n),
            aligned_direct: Vec::with_capacity(n),
            buffered: Vec::with_capacity(n),
            in_memory: Vec::with_capacity(n),
        };
        for (k, layer) in disk.layers().iter().enumerate() {
            let path = &layer.path;
            let private_top = k + 1 == n && !spec.readonly;
            let ctx = || format!("opening {}", path.display());
            let buffered = if private_top {
                Arc::new(open_rw(path).with_context(ctx)?)
            } else {
                shared.read_only(path, false).with_context(ctx)?
            };
            // O_DIRECT where asked for and where the filesystem has it
            // (tmpfs has not): the buffered descriptor serves otherwise.
            let direct = if private_top {
                open_rw_direct(path).ok().map(Arc::new)
            } else if base_io == BaseIo::Direct {
                shared.read_only(path, true).ok()
            } else {
                None
            };
            files.aligned_direct.push(direct.is_some());
            files.in_memory.push(in_memory(&buffered));
            files
                .aligned
                .push(direct.unwrap_or_else(|| Arc::clone(&buffered)));
            files.buffered.push(buffered);
        }
        let capacity = disk.virtual_size();
        let config =
            config::config_space(capacity, disk.block_size() as u32, spec.num_queues as u16);
        let mut id = [0u8; 20];
        let uuid = disk.top().header.uuid.simple().to_string();
        let text = format!("snap-{}", &uuid[..15]);
        id[..text.len()].copy_from_slice(text.as_bytes());
        let writes_begun = disk.writes_begun().into();
        Ok(Export {
            limits: crate::limits::ExportLimits::new(spec.limits, group),
            spec,
            capacity,
            config,
            id,
            files,
            writes_begun,
            state: Mutex::new(DiskState {
                disk,
                subscribers: Vec::new(),
                next_id: 0,
            }),
            io_failures: Mutex::default(),
            requests: Default::default(),
            failed_requests: Default::default(),
        })
    }

    pub fn readonly(&self) -> bool {
        self.spec.readonly
    }

    /// The top marked dirty before the first write the ring does itself
    /// (once; a header update and a sync in the caller's thread).
    fn begin_writes(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.writes_begun.load(Ordering::Acquire) {
            return true;
        }
        let ok = self.with_disk(|d| d.begin_writes()).is_ok();
        if ok {
            self.writes_begun.store(true, Ordering::Release);
        }
        ok
    }

    pub fn config_space(&self) -> &[u8] {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the disk, then forwards the index changes it made.
    fn with_disk<R>(&self, f: impl FnOnce(&mut Disk) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st.disk);
        let changes = st.disk.take_index_changes();
        if !changes.is_empty() {
            for (_, tx) in &st.subscribers {
                for &c in &changes {
                    // A worker that went away drops its receiver; the
                    // subscription is removed with it.
                    let _ = tx.send(c);
                }
            }
        }
        r
    }

    /// A copy of the index that the caller keeps current with
    /// [`Subscription::catch_up`]; no change can slip between the copy
    /// and the subscription.
    pub fn subscribe(&self) -> Subscription {
        let mut st = self.lock();
        let (tx, rx) = crossbeam_channel::unbounded();
        let id = st.next_id;
        st.next_id += 1;
        st.subscribers.push((id, tx));
        Subscription {
            view: st.disk.view(),
            changes: rx,
            id,
        }
    }

    pub fn unsubscribe(&self, s: Subscription) {
        self.lock().subscribers.retain(|(id, _)| *id != s.id);
    }

    /// Counts answered requests (`failed`: with an error status).
    pub fn count_requests(&self, answered: u64, failed: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(answered, Relaxed);
        if failed > 0 {
            self.failed_requests.fetch_add(failed, Relaxed);
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn failed_requests(&self) -> u64 {
        self.failed_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn flush(&self) -> image_format::Result<()> {
        self.with_disk(|d| d.flush())
    }

    /// Flushes and marks the image clean, and keeps the disk locked so
    /// that nothing writes after it; call when the process is about to exit.
    pub fn shutdown(&self) -> image_format::Result<impl Drop + '_> {
        let mut st = self.lock();
        st.disk.mark_clean()?;
        Ok(st)
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= self.capacity)
    }

    /// Records completed whole-block writes to the top that the writer's
    /// view did not already show as the top's.
    pub fn note_written(&self, ranges: &[(u64, u64)]) {
        self.with_disk(|d| {
            for &(off, len) in ranges {
                d.note_written(off, len);
            }
        });
    }

    /// The descriptor for I/O on layer `k`: the aligned one when the
    /// transfer suits it, else the buffered one.
    #[inline]
    fn fd_for(&self, k: usize, buf: u64, len: u64, off: u64) -> RingFile {
        let aligned = (buf | len | off).is_multiple_of(512);
        if aligned || !self.files.aligned_direct[k] {
            RingFile {
                fd: self.files.aligned[k].as_raw_fd(),
                slot: 2 * k as u32,
            }
        } else {
            RingFile {
                fd: self.files.buffered[k].as_raw_fd(),
                slot: 2 * k as u32 + 1,
            }
        }
    }

    /// Every layer file a ring may name, in [`RingFile::slot`] order (for
    /// the ring's table of registered files).
    pub fn ring_files(&self) -> Vec<RawFd> {
        self.files
            .aligned
            .iter()
            .zip(&self.files.buffered)
            .flat_map(|(a, b)| [a.as_raw_fd(), b.as_raw_fd()])
            .collect()
    }

    /// Whether any layer's I/O goes through the ring (a layer on a device,
    /// not in memory): only then do registered buffers pay.
    pub fn uses_ring(&self) -> bool {
        self.files.in_memory.iter().any(|m| !m)
    }

    /// Turns a read or a whole-block write into ring I/O. `None`: the
    /// request takes the synchronous path instead; `Some(None)`: queued;
    /// `Some(Some(status_len))`: finished without kernel I/O.
    pub fn submit_rw(
        &self,
        ring: &mut QueueRing,
        view: &ChainView,
        req: &Request,
        head: u16,
    ) -> Option<Option<Pending>> {
        let write = req.kind == Kind::Out;
        if !self.in_range(req.sector, req.data_len) || (write && self.readonly()) {
            return None;
        }
        let start = req.sector * SECTOR;
        if write && !self.begin_writes() {
            // The synchronous path tries again and answers the error.
            return None;
        }
        let target = if write {
            Some(view.direct_write_target(start, req.data_len)?)
        } else {
            None
        };
        let slot = ring.add(Pending {
            head,
            status: req.status,
            written: if write { 0 } else { req.data_len as u32 },
            remaining: 1, // held until every I/O is queued
            failed: false,
            wrote: write.then_some((start, req.data_len)),
        });
        let mut off = start;
        let mut queued = 0u32;
        let mut failed = false;
        'segments: for seg in &req.data {
            // Looked up in guest memory once, when the request was parsed
            // against the worker's memory, which stays mapped while the
            // worker runs.
            let (base, len) = (seg.host, seg.len);
            if let Some((top, file_off)) = target {
                let file_off = file_off + (off - start);
                let fd = self.fd_for(top, base as u64, len as u64, file_off);
                if self.files.in_memory[top] {
                    // SAFETY: as for the ring below.
                    if let Err(e) = unsafe { QueueRing::rw_now(true, fd.fd, base, len, file_off) } {
                        self.io_failure(format_args!("write at {file_off}: {e}"));
                        failed = true;
                        break;
                    }
                    off += len as u64;
                    continue;
                }
                // SAFETY: guest memory of a request the guest may not touch
                // until we complete it; mapped while the worker runs (a
                // memory change stops the workers, which drain first).
                if unsafe { ring.push_rw(true, fd, base, len, file_off, slot) }.is_err() {
                    failed = true;
                    break;
                }
                queued += 1;
            } else {
                for e in view.resolve(off, len as u64) {
                    // SAFETY: inside the slice get_slice checked.
                    let dst = unsafe { base.add((e.offset - off) as usize) };
                    match e.source {
                        Source::Zero => {
                            // SAFETY: as above.
                            unsafe { std::ptr::write_bytes(dst, 0, e.len as usize) }
                        }
                        Source::Layer { layer, file_offset } => {
                            let fd = self.fd_for(layer, dst as u64, e.len, file_offset);
                            if self.files.in_memory[layer] {
                                // SAFETY: as for writes above.
                                let copied = unsafe {
                                    QueueRing::rw_now(false, fd.fd, dst, e.len as u32, file_offset)
                                };
                                if let Err(err) = copied {
                                    self.io_failure(format_args!("read at {file_offset}: {err}"));
                                    failed = true;
                                    break 'segments;
                                }
                                continue;
                            }
                            // SAFETY: as for writes above.
                            if unsafe {
                                ring.push_rw(false, fd, dst, e.len as u32, file_offset, slot)
                            }
                            .is_err()
                            {
                                failed = true;
                                break 'segments;
                            }
                            queued += 1;
                        }
                    }
                }
            }
            off += len as u64;
        }
        let p = ring.get_mut(slot).expect("just added");
        p.failed |= failed;
        p.remaining += queued;
        p.remaining -= 1;
        if p.remaining == 0 {
            // Nothing went to the kernel (all zeros, or a failure): done now.
            let p = p.clone();
            ring.finish_now(slot);
            return Some(Some(p));
        }
        Some(None)
    }

    /// Logs a failed request, a few at a time: a guest can repeat one at
    /// will (a bad sector, a buffer in memory it took away).
    fn io_failure(&self, what: std::fmt::Arguments) {
        self.io_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .emit(
                || warn!("{what}"),
                |n| warn!("{n} more failed requests (not logged one by one)"),
            );
    }

    /// Executes a request synchronously; returns (status, bytes written to
    /// guest memory).
    pub fn execute(&self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let ioerr = (VIRTIO_BLK_S_IOERR as u8, 0);
        let ok = VIRTIO_BLK_S_OK as u8;
        match req.kind {
            Kind::In => {
                if !self.in_range(req.sector, req.data_len) {
                    return ioerr;
                }
                let mut off = req.sector * SECTOR;
                let st = self.lock();
                for &Segment { addr, len, .. } in &req.data {
                    if let Err(e) = read_into_guest(&st.disk, mem, addr, off, len as u64) {
                        self.io_failure(format_args!("read at {off}: {e}"));
                        return ioerr;
                    }
                    off += len as u64;
                }
                (ok, req.data_len as u32)
            }
            Kind::Out => {
                if self.readonly() || !self.in_range(req.sector, req.data_len) {
                    return ioerr;
                }
                let mut buf = vec![0u8; req.data_len as usize];
                let mut at = 0usize;
                for &Segment { addr, len, .. } in &req.data {
                    if mem
                        .read_slice(&mut buf[at..at + len as usize], addr)
                        .is_err()
                    {
                        return ioerr;
                    }
                    at += len as usize;
                }
                match self.with_disk(|d| d.write_at(&buf, req.sector * SECTOR)) {
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        self.io_failure(format_args!("write: {e}"));
                        ioerr
                    }
                }
            }
            Kind::Flush => {
                if self.readonly() {
                    return (ok, 0);
                }
                match self.flush() {
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        self.io_failure(format_args!("flush: {e}"));
                        ioerr
                    }
                }
            }
            Kind::GetId => {
                let n = (req.data_len as usize).min(20);
                let Some(&Segment { addr, .. }) = req.data.first() else {
                    return ioerr;
                };
                match mem.write_slice(&self.id[..n], addr) {
                    Ok(()) => (ok, n as u32),
                    Err(_) => ioerr,
                }
            }
            Kind::Discard | Kind::WriteZeroes => {
                if self.readonly() {
                    return ioerr;
                }
                // Segments are validated before anything is zeroed.
                let mut ranges = Vec::new();
                for &Segment { addr, len, .. } in &req.data {
                    if len % 16 != 0 {
                        return ioerr;
                    }
                    for k in 0..(len as u64 / 16) {
                        let a = addr.unchecked_add(16 * k);
                        let (Ok(sector), Ok(count)) = (
                            mem.read_obj::<u64>(a),
                            mem.read_obj::<u32>(a.unchecked_add(8)),
                        ) else {
                            return ioerr;
                        };
                        let bytes = count as u64 * SECTOR;
                        if count > config::MAX_DISCARD_SECTORS || !self.in_range(sector, bytes) {
                            return ioerr;
                        }
                        ranges.push((sector * SECTOR, bytes));
                    }
                }
                let r = self.with_disk(|d| {
                    ranges
                        .iter()
                        .try_for_each(|&(off, len)| d.write_zeroes(off, len))
                });
                match r {
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        self.io_failure(format_args!("zeroing: {e}"));
                        ioerr
                    }
                }
            }
            Kind::Unsupported(t) => {
                debug!("unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
        }
    }

    /// The GET_CONFIG reply: `size` bytes from `offset`, zero past the end.
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(size as usize).min(self.config.len());
        let mut v = self.config[start..end].to_vec();
        v.resize(size as usize, 0);
        v
    }
}

/// Copies `[off, off + len)` of the disk into guest memory at `addr`.
fn read_into_guest(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    off: u64,
    len: u64,
) -> io::Result<()> {
    let slice = mem
        .get_slice(addr, len as usize)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let guard = slice.ptr_guard_mut();
    let base = guard.as_ptr();
    for e in disk.resolve(off, len) {
        let at = (e.offset - off) as usize;
        // SAFETY: [base, base + len) is one mapped guest region (get_slice
        // checked it); extents stay inside [off, off + len).
        let dst = unsafe { base.add(at) };
        // SAFETY: the same range, as a slice for the library.
        let out = unsafe { std::slice::from_raw_parts_mut(dst, e.len as usize) };
        match e.source {
            Source::Zero => out.fill(0),
            Source::Layer { .. } => disk
                .read_at(out, e.offset)
                .map_err(|e| io::Error::other(e.to_string()))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(dir: &Path, readonly: bool) -> Export {
        let p = dir.join("t.img");
        image_format::ops::create(&image_format::RealEnv, &p, Some(1 << 20), 4096, None)
            .expect("create");
        Export::open(
            ExportSpec {
                socket: dir.join("s"),
                image: p,
                readonly,
                num_queues: 1,
                queue_size: 128,
                poll_us: 0,
                fixed_buffers: false,
                submit_batch: 0,
                worker_cpus: None,
                limits: Default::default(),
                limit_group: None,
            },
            None,
            &SharedFiles::default(),
            BaseIo::Page,
            None,
        )
        .expect("open")
    }

    /// A request for the synchronous path (which goes by guest address:
    /// the segments' host addresses are left null).
    fn req(kind: Kind, sector: u64, data: Vec<(GuestAddress, u32)>) -> Request {
        let mut r = Request::default();
        r.kind = kind;
        r.sector = sector;
        r.data_len = data.iter().map(|d| d.1 as u64).sum();
        r.data = data
            .into_iter()
            .map(|(addr, len)| Segment {
                addr,
                len,
                host: std::ptr::null_mut(),
            })
            .collect();
        r
    }

    #[test]
    fn requests_outside_the_disk_or_not_allowed_fail_and_serving_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = export(dir.path(), false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let run = |r: &Request| b.execute(r, &mem);
        // Past the end, and a sector number that overflows.
        assert_eq!(
            run(&req(Kind::In, 2048, vec![(GuestAddress(0x1000), 512)])).0,
            ioerr
        );
        assert_eq!(
            run(&req(
                Kind::Out,
                u64::MAX / 256,
                vec![(GuestAddress(0x1000), 512)]
            ))
            .0,
            ioerr
        );
        // A discard segment past the end.
        mem.write_obj(2040u64, GuestAddress(0x2000)).expect("w");
        mem.write_obj(64u32, GuestAddress(0x2008)).expect("w");
        assert_eq!(
            run(&req(Kind::Discard, 0, vec![(GuestAddress(0x2000), 16)])).0,
            ioerr
        );
        assert_eq!(
            run(&req(Kind::Unsupported(99), 0, vec![])).0,
            VIRTIO_BLK_S_UNSUPP as u8
        );
        // Still serving: a write and a read of it.
        mem.write_slice(&[7u8; 512], GuestAddress(0x3000))
            .expect("w");
        assert_eq!(
            run(&req(Kind::Out, 1, vec![(GuestAddress(0x3000), 512)])),
            (0, 0)
        );
        assert_eq!(
            run(&req(Kind::In, 1, vec![(GuestAddress(0x4000), 512)])),
            (0, 512)
        );
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x4000)).expect("r");
        assert_eq!(back, [7u8; 512]);
        // GET_ID names the image.
        assert_eq!(
            run(&req(Kind::GetId, 0, vec![(GuestAddress(0x5000), 20)])).1,
            20
        );
    }

    #[test]
    fn a_read_only_export_refuses_writes_and_discards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = export(dir.path(), true);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        assert_eq!(
            b.execute(&req(Kind::Out, 0, vec![(GuestAddress(0x1000), 512)]), &mem)
                .0,
            ioerr
        );
        assert_eq!(
            b.execute(
                &req(Kind::WriteZeroes, 0, vec![(GuestAddress(0x2000), 16)]),
                &mem
            )
            .0,
            ioerr
        );
        assert_eq!(
            b.execute(&req(Kind::In, 0, vec![(GuestAddress(0x1000), 512)]), &mem)
                .0,
            0
        );
    }

    #[test]
    fn workers_see_each_other_s_allocations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = export(dir.path(), false);
        let mut s0 = b.subscribe();
        let mut s1 = b.subscribe();
        assert!(!s1.view.top_owns(0, 8192));
        b.note_written(&[(0, 8192)]);
        s0.catch_up();
        s1.catch_up();
        assert!(s0.view.top_owns(0, 8192) && s1.view.top_owns(0, 8192));
        b.unsubscribe(s0);
        // A gone subscriber does not stop the others from hearing.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        mem.write_obj(16u64, GuestAddress(0x2000)).expect("w");
        mem.write_obj(8u32, GuestAddress(0x2008)).expect("w");
        assert_eq!(
            b.execute(
                &req(Kind::WriteZeroes, 0, vec![(GuestAddress(0x2000), 16)]),
                &mem
            )
            .0,
            0
        );
        s1.catch_up();
        assert!(!s1.view.top_owns(8192, 4096));
        assert!(s1.view.top_owns(0, 8192));
    }
}
