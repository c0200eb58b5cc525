//! One frontend connection: the vhost-user requests in one place
//! (features, memory table, vrings, inflight region) and the queue workers
//! they start and stop.
//!
//! vhost-user-backend's daemon refuses GET/SET_INFLIGHT_FD and cannot be
//! extended (its handler is private to it), so this module answers every
//! request itself, through the vhost crate's request parser, and keeps
//! vhost-user-backend's `VringMutex` as each queue's state. A request that
//! breaks the protocol (a queue that does not exist, vring addresses
//! before a memory table, a region that does not fit) is an error; the
//! caller drops the connection with that reason and serves the next one.
//!
//! Postcopy (PAGEFAULT): a vmm restoring a VM lazily asks us to register
//! our mapping of guest memory with a userfaultfd and hands its faults to
//! its pager (POSTCOPY_ADVISE gives it the descriptor, the memory table's
//! reply our mapping's addresses, and the memory is used only once it acks
//! the table): a page the pager has not filled yet is never a page of
//! zeros here.

use std::fs::File;
use std::io;
use std::sync::Arc;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Backend, GpuBackend, Result as VuResult};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion};

use crate::config;
use crate::export::Export;
use crate::inflight::InflightRegion;
use crate::worker::{QueueWorker, WorkerHandle};
use vhost_user_session::fence::GuardedRange;
use vhost_user_session::memory::{self, MappedRegion};
use vhost_user_session::queues::Queues;
use vhost_user_session::{refuse, Session};

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const MAX_MEM_SLOTS: u64 = 509;

/// Whether this process can make a userfaultfd that also takes the
/// kernel's faults (io_uring's, pread's into guest memory): probed once,
/// as the user it serves as (see [`probe_paging`]).
static PAGING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A userfaultfd that takes the kernel's faults too, made by the system
/// call (the `userfaultfd` crate's builder opens /dev/userfaultfd first,
/// which a session's filter does not allow).
fn new_userfault() -> io::Result<userfaultfd::Uffd> {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    // SAFETY: the userfaultfd system call with flags only; the result is
    // checked and owned below.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just made, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct uffdio_api: the API version in, the features and ioctls out.
    let mut api = [0xaa_u64, 0, 0];
    const UFFDIO_API: u64 = 0xc018_aa3f;
    // SAFETY: UFFDIO_API on the new descriptor with its 24-byte argument,
    // alive for the call.
    if unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            UFFDIO_API as _,
            api.as_mut_ptr(),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a userfaultfd whose API handshake is done, given up here.
    Ok(unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) })
}

/// Offers postcopy (PAGEFAULT) only if a userfaultfd can be made here:
/// called once privileges are what they stay, before any session.
pub fn probe_paging() {
    match new_userfault() {
        Ok(_) => PAGING.store(true, std::sync::atomic::Ordering::Relaxed),
        Err(e) => info!("postcopy (a restoring vmm paging our faults) is not offered: {e}"),
    }
}

/// Postcopy's state on this connection.
#[derive(Default)]
struct Postcopy {
    uffd: Option<userfaultfd::Uffd>,
    listening: bool,
    /// A memory table mapped and registered, used once the frontend acks.
    pending: Option<Vec<MappedRegion>>,
}

pub struct Connection {
    export: Arc<Export>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    regions: Vec<MappedRegion>,
    postcopy: Postcopy,
    queues: Queues<WorkerHandle>,
    owned: bool,
    acked_features: Option<u64>,
    acked_protocol_features: u64,
    inflight: Option<(Arc<InflightRegion>, GuardedRange)>,
    session: Arc<Session>,
}

impl Connection {
    pub fn new(export: Arc<Export>, session: Arc<Session>) -> io::Result<Connection> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = Queues::new(export.spec.num_queues, export.spec.queue_size as u16, &mem)?;
        Ok(Connection {
            export,
            mem,
            regions: Vec::new(),
            postcopy: Postcopy::default(),
            queues,
            owned: false,
            acked_features: None,
            acked_protocol_features: 0,
            inflight: None,
            session,
        })
    }

    pub fn features(&self) -> u64 {
        config::features(self.export.readonly(), self.export.spec.num_queues > 1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    pub fn protocol_features() -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        if PAGING.load(std::sync::atomic::Ordering::Relaxed) {
            f | VhostUserProtocolFeatures::PAGEFAULT
        } else {
            f
        }
    }

    /// Registers a region just mapped with the postcopy userfaultfd.
    fn register_paged(&self, r: &MappedRegion) -> VuResult<()> {
        let Some(uffd) = &self.postcopy.uffd else {
            return Err(refuse(
                "a postcopy memory table before POSTCOPY_ADVISE".into(),
            ));
        };
        uffd.register(r.region.as_ptr().cast(), r.region.len() as usize)
            .map(drop)
            .map_err(|e| {
                refuse(format!(
                    "memory region at {:#x}: registering it for postcopy: {e}",
                    r.at.guest_addr
                ))
            })
    }

    /// Ends postcopy: our mapping is the kernel's again (a fault waiting
    /// on it is woken and served with what the memory holds).
    fn end_postcopy(&mut self) {
        if let Some(uffd) = self.postcopy.uffd.take() {
            for r in &self.regions {
                let _ = uffd.unregister(r.region.as_ptr().cast(), r.region.len() as usize);
            }
        }
        self.postcopy = Postcopy::default();
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features
            .is_some_and(|f| f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0)
    }

    /// Stops every worker (their in-flight I/O completes first); returns
    /// which queues ran.
    fn stop_all(&mut self) -> Vec<usize> {
        let mut ran = Vec::new();
        for (q, slot) in self.queues.iter_mut().enumerate() {
            if let Some(w) = slot.worker.take() {
                w.stop();
                ran.push(q);
            }
        }
        ran
    }

    fn stop(&mut self, q: usize) {
        if let Some(w) = self
            .queues
            .slot(q as u32)
            .ok()
            .and_then(|s| s.worker.take())
        {
            w.stop();
        }
    }

    /// Starts queue `q`'s worker when everything it needs has arrived.
    fn maybe_start(&mut self, q: usize) -> VuResult<()> {
        let Some(features) = self.acked_features else {
            return Ok(());
        };
        let slot = self.queues.slot(q as u32)?;
        if slot.worker.is_some() || !slot.ready() || self.regions.is_empty() {
            return Ok(());
        }
        let (vring, broken) = (slot.vring.clone(), slot.broken.clone());
        if let Err(why) = self.queues.rings_in_memory(q) {
            // The memory table changed under rings that were fine: the
            // queue waits for new addresses instead of failing every
            // request.
            self.session
                .peer_caused(|| warn!(queue = q, "not started: {why}"));
            return Ok(());
        }
        let mut inflight = self.inflight.as_ref().and_then(|(r, _)| r.queue(q as u16));
        let mut resubmit = Vec::new();
        if let Some(inf) = &mut inflight {
            let used = vring
                .queue_used_idx()
                .map_err(|e| refuse(format!("queue {q}: used ring unreadable: {e:?}")))?;
            let rec = inf.recover(used);
            if let Some(next) = rec.next_avail {
                if !rec.resubmit.is_empty() || next != vring.queue_next_avail() {
                    info!(
                        queue = q,
                        resubmit = rec.resubmit.len(),
                        next_avail = next,
                        "resuming from the inflight region"
                    );
                }
                vring.set_queue_next_avail(next);
                vring.set_queue_next_used(used);
            }
            resubmit = rec.resubmit;
        }
        vring.set_queue_ready(true);
        let worker = QueueWorker {
            queue: q as u16,
            export: Arc::clone(&self.export),
            vring,
            mem: self.mem.clone(),
            event_idx: features & VIRTIO_RING_F_EVENT_IDX != 0,
            inflight,
            resubmit,
            poll: std::time::Duration::from_micros(self.export.spec.poll_us),
            session: Arc::clone(&self.session),
            broken,
        };
        let handle = worker
            .spawn()
            .map_err(|e| refuse(format!("queue {q}: cannot start its worker: {e}")))?;
        self.queues.slot(q as u32)?.worker = Some(handle);
        debug!(queue = q, "started");
        Ok(())
    }

    fn start_all(&mut self) -> VuResult<()> {
        for q in 0..self.queues.len() {
            self.maybe_start(q)?;
        }
        Ok(())
    }

    /// Replaces the guest memory; workers stop (draining) and restart.
    fn install_memory(&mut self, regions: Vec<MappedRegion>) -> VuResult<()> {
        let mem = memory::guest_memory(&regions)?;
        let ran = self.stop_all();
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        self.regions = regions;
        for q in ran {
            self.maybe_start(q)?;
        }
        Ok(())
    }

    /// The frontend keeps the inflight region's file and can truncate it
    /// too: its mapping is guarded like guest memory.
    fn keep_inflight(&mut self, region: InflightRegion) -> VuResult<()> {
        let (at, len) = region.mapping();
        let guard = self
            .session
            .guard(at, len)
            .map_err(|e| refuse(format!("inflight region: {e}")))?;
        self.inflight = Some((Arc::new(region), guard));
        Ok(())
    }

    /// Ends the session: workers complete their in-flight I/O and stop.
    /// Paging through a vmm that is gone, its faults would never be
    /// served: postcopy ends first then (the memory went with the vmm).
    pub fn close(&mut self) {
        if self.postcopy.uffd.is_some() && self.session.frontend_gone() {
            self.end_postcopy();
        }
        self.stop_all();
        self.end_postcopy();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(refuse("SET_OWNER twice".into()));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        self.owned = false;
        self.acked_features = None;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        self.queues.reset();
        self.acked_features = None;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.features();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        self.acked_features = Some(features);
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let protocol = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        self.queues.set_features(event_idx, protocol);
        self.start_all()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(refuse(
                "memory table: regions and descriptors differ in number".into(),
            ));
        }
        let regions = ctx
            .iter()
            .zip(files)
            .map(|(r, f)| memory::map_region(&self.session, r, f))
            .collect::<VuResult<Vec<_>>>()?;
        if postcopy_listening == Some(true) {
            for r in &regions {
                self.register_paged(r)?;
            }
            let bases = regions.iter().map(|r| r.region.as_ptr() as u64).collect();
            self.postcopy.pending = Some(regions);
            return Ok(Some(bases));
        }
        self.install_memory(regions)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.queues.set_num(index, num)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.queues
            .set_addr(index, &self.regions, descriptor, used, available)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.queues.set_base(index, base)
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.queues.slot(index)?;
        // Stops the ring: in-flight requests complete first.
        self.stop(index as usize);
        let next = self.queues.take_base(index)?;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.queues.slot(index.into())?;
        // The worker waits on the old descriptor: restart it on the new.
        self.stop(index as usize);
        self.queues.set_kick(index.into(), fd)?;
        self.maybe_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.queues.set_call(index.into(), fd)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.queues.set_err(index.into(), fd)
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(Self::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let ours = Self::protocol_features().bits();
        if features & !ours != 0 {
            return Err(refuse(format!(
                "protocol features {:#x} were not offered",
                features & !ours
            )));
        }
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.protocol_features_acked() {
            return Err(refuse(
                "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        self.queues.slot(index)?;
        if !enable {
            self.stop(index as usize);
        }
        self.queues.slot(index)?.vring.set_enabled(enable);
        self.maybe_start(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        if offset.checked_add(size).is_none_or(|end| end > 256) {
            return Err(refuse(format!("GET_CONFIG of {size} bytes at {offset}")));
        }
        Ok(self.export.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only `writeback` (offset 32) is writable, and this device always
        // caches writes until FLUSH; accept the driver's choice quietly.
        if offset == 32 && buf.len() == 1 {
            return Ok(());
        }
        Err(refuse(format!(
            "SET_CONFIG of {} bytes at {offset}",
            buf.len()
        )))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(refuse("not a GPU device".into()))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(refuse("no shared objects".into()))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let nq = self.queues.len() as u16;
        let max = self.export.spec.queue_size as u16;
        if msg.num_queues == 0 || msg.num_queues > nq || msg.queue_size == 0 || msg.queue_size > max
        {
            return Err(refuse(format!(
                "GET_INFLIGHT_FD for {} queues of {} (up to {nq} of {max})",
                msg.num_queues, msg.queue_size
            )));
        }
        let region = InflightRegion::create(msg.num_queues, msg.queue_size)
            .map_err(|e| refuse(format!("cannot create the inflight region: {e}")))?;
        let reply = region
            .reply()
            .map_err(|e| refuse(format!("inflight region: {e}")))?;
        self.keep_inflight(region)?;
        Ok(reply)
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::open(
            file,
            msg,
            self.queues.len() as u16,
            self.export.spec.queue_size as u16,
        )
        .map_err(|e| refuse(e.to_string()))?;
        self.keep_inflight(region)
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(refuse("all memory slots are in use".into()));
        }
        let mut regions = self
            .postcopy
            .pending
            .take()
            .unwrap_or_else(|| self.regions.clone());
        let added = memory::map_region(&self.session, region, fd)?;
        if postcopy_listening == Some(true) {
            self.register_paged(&added)?;
            let base = added.region.as_ptr() as u64;
            regions.push(added);
            self.postcopy.pending = Some(regions);
            return Ok(Some(base));
        }
        regions.push(added);
        self.install_memory(regions)?;
        Ok(None)
    }

    fn postcopy_advice(&mut self) -> VuResult<File> {
        if !PAGING.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(refuse("POSTCOPY_ADVISE: postcopy was not offered".into()));
        }
        let uffd =
            new_userfault().map_err(|e| refuse(format!("POSTCOPY_ADVISE: userfaultfd: {e}")))?;
        let handed = std::os::fd::AsFd::as_fd(&uffd)
            .try_clone_to_owned()
            .map_err(|e| refuse(format!("POSTCOPY_ADVISE: {e}")))?;
        self.postcopy.uffd = Some(uffd);
        Ok(File::from(handed))
    }

    fn postcopy_listen(&mut self) -> VuResult<()> {
        if self.postcopy.uffd.is_none() {
            return Err(refuse("POSTCOPY_LISTEN before POSTCOPY_ADVISE".into()));
        }
        self.postcopy.listening = true;
        Ok(())
    }

    fn postcopy_end(&mut self) -> VuResult<()> {
        if let Some(pending) = self.postcopy.pending.take() {
            // Never acked: used as it is now (the pager filled it all).
            self.install_memory(pending)?;
        }
        self.end_postcopy();
        Ok(())
    }

    fn postcopy_ack_mem_regions(&mut self) -> VuResult<()> {
        let Some(regions) = self.postcopy.pending.take() else {
            return Err(refuse("a memory table ack with no table waiting".into()));
        };
        info!("guest memory mapped; its missing pages are paged in by the vmm");
        self.install_memory(regions)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (at, size) = (region.guest_phys_addr, region.memory_size);
        let regions = memory::without(&self.regions, at, size)?;
        self.install_memory(regions)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(refuse("device state transfer is not supported".into()))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(refuse("device state transfer is not supported".into()))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(refuse("no shared memory regions".into()))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(refuse("dirty logging is not supported".into()))
    }
}
