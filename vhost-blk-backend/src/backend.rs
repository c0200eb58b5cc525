//! The vhost-user-backend glue: one worker thread per queue pops descriptor
//! chains, executes them against the open chain and completes them.
//!
//! Reads go straight from the layer files into guest memory (`pread` into
//! the mapped guest pages, no copy); writes currently go through the
//! library's synchronous path. The io_uring path replaces both.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use image_format::{Disk, Source};
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use std::os::unix::fs::OpenOptionsExt;

use crate::config::{self, SECTOR};
use crate::request::{Kind, Request};
use crate::uring::{Pending, QueueRing};

pub struct BlkBackend {
    /// Readers (resolving a read into extents) share it; map updates after
    /// writes, flushes and the synchronous path take it alone.
    disk: RwLock<Disk>,
    /// Per layer (base first): a descriptor opened with O_DIRECT for the
    /// io_uring path, when the filesystem allows it.
    direct: Vec<Option<std::fs::File>>,
    /// One ring per queue, used only by that queue's worker thread.
    rings: Vec<Mutex<QueueRing>>,
    readonly: bool,
    num_queues: usize,
    queue_size: usize,
    capacity: u64,
    config: Vec<u8>,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    id: [u8; 20],
}

impl BlkBackend {
    pub fn new(disk: Disk, readonly: bool, num_queues: usize, queue_size: usize) -> Self {
        let capacity = disk.virtual_size();
        let config = config::config_space(capacity, disk.block_size() as u32, num_queues as u16);
        let mut id = [0u8; 20];
        let uuid = disk.top().header.uuid.simple().to_string();
        let text = format!("snap-{}", &uuid[..15]);
        id[..text.len().min(20)].copy_from_slice(&text.as_bytes()[..text.len().min(20)]);
        let direct = disk
            .layers()
            .iter()
            .enumerate()
            .map(|(k, l)| {
                let writable = !readonly && k + 1 == disk.layers().len();
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .custom_flags(libc::O_DIRECT)
                    .open(&l.path)
                    .ok()
            })
            .collect();
        let rings = (0..num_queues)
            .map(|_| {
                Mutex::new(
                    QueueRing::new((queue_size as u32 * 4).next_power_of_two()).expect("io_uring"),
                )
            })
            .collect();
        BlkBackend {
            disk: RwLock::new(disk),
            direct,
            rings,
            readonly,
            num_queues,
            queue_size,
            capacity,
            config,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            id,
        }
    }

    /// Flushes and marks the image clean; call when the process is about
    /// to exit (the disk lock is held until then, so nothing writes after).
    pub fn shutdown(&self) -> image_format::Result<std::sync::RwLockWriteGuard<'_, Disk>> {
        let mut disk = self.disk.write().unwrap_or_else(|e| e.into_inner());
        disk.mark_clean()?;
        Ok(disk)
    }

    pub fn flush(&self) -> image_format::Result<()> {
        self.disk.write().unwrap_or_else(|e| e.into_inner()).flush()
    }

    fn in_range(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(SECTOR)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= self.capacity)
    }

    /// Executes a parsed request; returns (status, bytes written to guest).
    fn execute(&self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let ioerr = (VIRTIO_BLK_S_IOERR as u8, 0);
        match req.kind {
            Kind::In => {
                if !self.in_range(req.sector, req.data_len) {
                    return ioerr;
                }
                let disk = self.disk.read().unwrap_or_else(|e| e.into_inner());
                let mut off = req.sector * SECTOR;
                for &(addr, len) in &req.data {
                    if let Err(e) = read_into_guest(&disk, mem, addr, off, len as u64) {
                        warn!("read at {off}: {e}");
                        return ioerr;
                    }
                    off += len as u64;
                }
                (VIRTIO_BLK_S_OK as u8, req.data_len as u32)
            }
            Kind::Out => {
                if self.readonly || !self.in_range(req.sector, req.data_len) {
                    return ioerr;
                }
                let mut buf = vec![0u8; req.data_len as usize];
                let mut at = 0usize;
                for &(addr, len) in &req.data {
                    if mem
                        .read_slice(&mut buf[at..at + len as usize], addr)
                        .is_err()
                    {
                        return ioerr;
                    }
                    at += len as usize;
                }
                let mut disk = self.disk.write().unwrap_or_else(|e| e.into_inner());
                match disk.write_at(&buf, req.sector * SECTOR) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                    Err(e) => {
                        warn!("write: {e}");
                        ioerr
                    }
                }
            }
            Kind::Flush => {
                if self.readonly {
                    return (VIRTIO_BLK_S_OK as u8, 0);
                }
                match self.flush() {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                    Err(e) => {
                        warn!("flush: {e}");
                        ioerr
                    }
                }
            }
            Kind::GetId => {
                let n = (req.data_len as usize).min(20);
                let Some(&(addr, _)) = req.data.first() else {
                    return ioerr;
                };
                match mem.write_slice(&self.id[..n], addr) {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, n as u32),
                    Err(_) => ioerr,
                }
            }
            Kind::Discard | Kind::WriteZeroes => {
                if self.readonly {
                    return ioerr;
                }
                let mut disk = self.disk.write().unwrap_or_else(|e| e.into_inner());
                for &(addr, len) in &req.data {
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
                        if let Err(e) = disk.write_zeroes(sector * SECTOR, bytes) {
                            warn!("zeroing: {e}");
                            return ioerr;
                        }
                    }
                }
                (VIRTIO_BLK_S_OK as u8, 0)
            }
            Kind::Unsupported(t) => {
                debug!("unsupported request type {t}");
                (VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
        }
    }

    /// The eventfd queue `q`'s completions arrive on.
    pub fn ring_eventfd(&self, q: usize) -> std::os::fd::RawFd {
        self.rings[q]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .eventfd()
    }

    /// Waits for all I/O in flight (the frontend went away; its memory is
    /// about to be unmapped). Completed writes still reach the map.
    pub fn quiesce(&self) {
        for r in &self.rings {
            let done = r.lock().unwrap_or_else(|e| e.into_inner()).drain();
            self.note_writes(&done);
        }
    }

    fn note_writes(&self, done: &[Pending]) {
        let wrote: Vec<_> = done
            .iter()
            .filter(|p| !p.failed)
            .filter_map(|p| p.wrote)
            .collect();
        if !wrote.is_empty() {
            let mut disk = self.disk.write().unwrap_or_else(|e| e.into_inner());
            for (off, len) in wrote {
                disk.note_written(off, len);
            }
        }
    }

    /// The descriptor for I/O on layer `k`: O_DIRECT when the transfer is
    /// aligned for it, else the library's buffered one.
    fn fd_for(
        &self,
        disk: &Disk,
        k: usize,
        buf: u64,
        len: u64,
        off: u64,
    ) -> Option<std::os::fd::RawFd> {
        let aligned = (buf | len | off).is_multiple_of(512);
        match (&self.direct[k], aligned) {
            (Some(f), true) => Some(std::os::fd::AsRawFd::as_raw_fd(f)),
            _ => disk.layers()[k].storage.raw_fd(),
        }
    }

    /// Turns a read or an aligned write into ring I/O. `None`: the request
    /// takes the synchronous path instead; `Some(None)`: queued;
    /// `Some(Some(used))`: finished without kernel I/O.
    fn submit_rw(
        &self,
        ring: &mut QueueRing,
        req: &Request,
        mem: &GuestMemoryMmap,
        head: u16,
    ) -> Option<Option<(u16, u32)>> {
        let write = req.kind == Kind::Out;
        if !self.in_range(req.sector, req.data_len) || (write && self.readonly) {
            return None;
        }
        let disk = self.disk.read().unwrap_or_else(|e| e.into_inner());
        let start = req.sector * SECTOR;
        let target = if write {
            Some(disk.direct_write_target(start, req.data_len)?)
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
        for &(addr, len) in &req.data {
            let Ok(slice) = mem.get_slice(addr, len as usize) else {
                failed = true;
                break;
            };
            let base = slice.ptr_guard_mut().as_ptr();
            if let Some((top, file_off)) = target {
                let file_off = file_off + (off - start);
                let Some(fd) = self.fd_for(&disk, top, base as u64, len as u64, file_off) else {
                    failed = true;
                    break;
                };
                // SAFETY: guest memory of a request the guest may not touch
                // until we complete it; mapped while this connection lives
                // (quiesce() drains before it goes).
                if unsafe { ring.push_rw(true, fd, base, len, file_off, slot) }.is_err() {
                    failed = true;
                    break;
                }
                queued += 1;
            } else {
                for e in disk.resolve(off, len as u64) {
                    // SAFETY: inside the slice get_slice checked.
                    let dst = unsafe { base.add((e.offset - off) as usize) };
                    match e.source {
                        Source::Zero => {
                            // SAFETY: as above.
                            unsafe { std::ptr::write_bytes(dst, 0, e.len as usize) }
                        }
                        Source::Layer { layer, file_offset } => {
                            let Some(fd) =
                                self.fd_for(&disk, layer, dst as u64, e.len, file_offset)
                            else {
                                failed = true;
                                break;
                            };
                            // SAFETY: as for writes above.
                            if unsafe {
                                ring.push_rw(false, fd, dst, e.len as u32, file_offset, slot)
                            }
                            .is_err()
                            {
                                failed = true;
                                break;
                            }
                            queued += 1;
                        }
                    }
                }
            }
            off += len as u64;
        }
        drop(disk);
        let p = ring.get_mut(slot).expect("just added");
        p.failed |= failed;
        p.remaining += queued;
        p.remaining -= 1;
        if p.remaining == 0 {
            // Nothing went to the kernel (all zeros, or a failure): done now.
            let p = p.clone();
            ring.finish_now(slot);
            return Some(self.complete(&[p], mem).pop());
        }
        Some(None)
    }

    /// Writes statuses and used entries for finished ring requests.
    fn complete(&self, done: &[Pending], mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        self.note_writes(done);
        done.iter()
            .map(|p| {
                let (status, len) = if p.failed {
                    (VIRTIO_BLK_S_IOERR as u8, 1)
                } else {
                    (VIRTIO_BLK_S_OK as u8, p.written + 1)
                };
                let _ = mem.write_obj(status, p.status);
                (p.head, len)
            })
            .collect()
    }

    fn publish(
        &self,
        vring: &VringRwLock,
        used: &[(u16, u32)],
        mem: &GuestMemoryMmap,
    ) -> io::Result<()> {
        if used.is_empty() {
            return Ok(());
        }
        for &(head, len) in used {
            if let Err(e) = vring.add_used(head, len) {
                warn!("add_used: {e}");
            }
        }
        let notify = vring
            .get_mut()
            .get_queue_mut()
            .needs_notification(mem)
            .unwrap_or(true);
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn process_queue(&self, vring: &VringRwLock, q: usize) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut ring = self.rings[q].lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let mut used = Vec::new();
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                match Request::parse(chain, &mem) {
                    Ok(req) => {
                        let ring_path = if matches!(req.kind, Kind::In | Kind::Out) {
                            self.submit_rw(&mut ring, &req, &mem, head)
                        } else {
                            None
                        };
                        match ring_path {
                            Some(Some(u)) => used.push(u),
                            Some(None) => {}
                            None => {
                                let (s, w) = self.execute(&req, &mem);
                                let _ = mem.write_obj(s, req.status);
                                used.push((head, w + 1));
                            }
                        }
                    }
                    Err((e, status_addr)) => {
                        warn!("bad request (head {head}): {e}");
                        if let Some(a) = status_addr {
                            let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, a);
                        }
                        used.push((head, 1));
                    }
                }
            }
            // Every chain this kick made available, in one submission.
            ring.submit()?;
            self.publish(vring, &used, &mem)?;
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        Ok(())
    }

    fn process_completions(&self, vring: &VringRwLock, q: usize) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let done = self.rings[q]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reap();
        let used = self.complete(&done, &mem);
        self.publish(vring, &used, &mem)
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
        match e.source {
            Source::Zero => {
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(dst, 0, e.len as usize) };
            }
            Source::Layer { layer, file_offset } => {
                let fd = disk.layers()[layer]
                    .storage
                    .raw_fd()
                    .ok_or_else(|| io::Error::other("layer without a file descriptor"))?;
                let mut done = 0usize;
                while done < e.len as usize {
                    // SAFETY: pread into the checked guest range.
                    let n = unsafe {
                        libc::pread(
                            fd,
                            dst.add(done) as *mut libc::c_void,
                            e.len as usize - done,
                            (file_offset + done as u64) as libc::off_t,
                        )
                    };
                    if n < 0 {
                        let err = io::Error::last_os_error();
                        if err.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(err);
                    }
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "short layer file",
                        ));
                    }
                    done += n as usize;
                }
            }
        }
    }
    Ok(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }
    fn max_queue_size(&self) -> usize {
        self.queue_size
    }
    fn features(&self) -> u64 {
        config::features(self.readonly, self.num_queues > 1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }
    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(self.config.len());
        let end = (start + size as usize).min(self.config.len());
        let mut v = self.config[start..end].to_vec();
        v.resize(size as usize, 0);
        v
    }
    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }
    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the workers never leave and a reconnect hangs.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per worker thread (queues_per_thread): the thread's
        // only vring is vrings[0], and the thread index is the queue index.
        let (Some(vring), Some(_)) = (vrings.first(), self.rings.get(thread)) else {
            return Err(io::Error::other(format!(
                "event {device_event} on unknown thread {thread}"
            )));
        };
        if (device_event as usize) < self.num_queues {
            self.process_queue(vring, thread)
        } else {
            // Its ring's completions (registered as num_queues + 1 + queue).
            self.process_completions(vring, thread)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn backend(dir: &Path, readonly: bool) -> BlkBackend {
        let p = dir.join("t.img");
        image_format::ops::create(&image_format::RealEnv, &p, Some(1 << 20), 4096, None)
            .expect("create");
        BlkBackend::new(
            Disk::open_path(&p, !readonly).expect("open"),
            readonly,
            1,
            128,
        )
    }

    fn req(kind: Kind, sector: u64, data: Vec<(GuestAddress, u32)>) -> Request {
        let data_len = data.iter().map(|d| d.1 as u64).sum();
        Request {
            kind,
            sector,
            data,
            data_len,
            status: GuestAddress(0),
        }
    }

    #[test]
    fn requests_outside_the_disk_or_not_allowed_fail_and_serving_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = backend(dir.path(), false);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        // Past the end, and a sector number that overflows.
        assert_eq!(
            b.execute(
                &req(Kind::In, 2048, vec![(GuestAddress(0x1000), 512)]),
                &mem
            )
            .0,
            ioerr
        );
        assert_eq!(
            b.execute(
                &req(Kind::Out, u64::MAX / 256, vec![(GuestAddress(0x1000), 512)]),
                &mem
            )
            .0,
            ioerr
        );
        // A discard segment past the end.
        mem.write_obj(2040u64, GuestAddress(0x2000)).expect("w");
        mem.write_obj(64u32, GuestAddress(0x2008)).expect("w");
        assert_eq!(
            b.execute(
                &req(Kind::Discard, 0, vec![(GuestAddress(0x2000), 16)]),
                &mem
            )
            .0,
            ioerr
        );
        assert_eq!(
            b.execute(&req(Kind::Unsupported(99), 0, vec![]), &mem).0,
            VIRTIO_BLK_S_UNSUPP as u8
        );
        // Still serving: a write and a read of it.
        mem.write_slice(&[7u8; 512], GuestAddress(0x3000))
            .expect("w");
        assert_eq!(
            b.execute(&req(Kind::Out, 1, vec![(GuestAddress(0x3000), 512)]), &mem),
            (0, 0)
        );
        assert_eq!(
            b.execute(&req(Kind::In, 1, vec![(GuestAddress(0x4000), 512)]), &mem),
            (0, 512)
        );
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x4000)).expect("r");
        assert_eq!(back, [7u8; 512]);
        // GET_ID names the image.
        assert_eq!(
            b.execute(&req(Kind::GetId, 0, vec![(GuestAddress(0x5000), 20)]), &mem)
                .1,
            20
        );
    }

    #[test]
    fn a_read_only_export_refuses_writes_and_discards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = backend(dir.path(), true);
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
}
