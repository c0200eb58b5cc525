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
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Backend, Error as VuError, GpuBackend, Result as VuResult};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

use crate::config;
use crate::export::Export;
use crate::inflight::InflightRegion;
use crate::memory_fence::{GuardedRange, SessionFence};
use crate::worker::{QueueWorker, Vring, WorkerHandle};
use cli_support::log_limit::LogLimit;

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const MAX_MEM_SLOTS: u64 = 509;

/// A guest memory region as the frontend's address space sees it.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    frontend_addr: u64,
    size: u64,
    guest_addr: u64,
}

/// A mapped region of the frontend's memory, guarded against the
/// frontend truncating its file under us.
#[derive(Debug, Clone)]
struct MappedRegion {
    at: Mapping,
    region: Arc<GuestRegionMmap>,
    _guard: Arc<GuardedRange>,
}

/// What lets a worker end its session from its side: the mark the SIGBUS
/// handler sets when the frontend took away memory we had mapped, and the
/// session's socket, shut down to end it.
///
/// And the session's log limit: every line its frontend (or the guest
/// behind it) can cause goes through it, whichever queue logs it, so that
/// restarting queues or reconnecting does not buy a fresh allowance.
#[derive(Debug)]
pub struct Session {
    fence: Arc<SessionFence>,
    socket: Option<UnixStream>,
    logs: std::sync::Mutex<LogLimit>,
}

impl Session {
    pub fn new(fence: Arc<SessionFence>, socket: Option<UnixStream>) -> Session {
        Session {
            fence,
            socket,
            logs: std::sync::Mutex::default(),
        }
    }

    /// Logs a line the peer caused, within the session's limit (ten in
    /// full, then a count a second).
    pub fn peer_caused(&self, line: impl FnOnce()) {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .emit(line, |n| {
                warn!("{n} more lines caused by this frontend or its guest (not logged one by one)")
            });
    }

    /// Reports what the limit left out, when the session ends.
    pub fn flush_logs(&self) {
        if let Some(n) = self
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remaining()
        {
            warn!("{n} more lines caused by this frontend or its guest (not logged one by one)");
        }
    }

    /// Whether the frontend hung up (its process may be gone).
    pub fn frontend_gone(&self) -> bool {
        let Some(s) = &self.socket else {
            return false;
        };
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll with no wait on the session's socket, open for the
        // call.
        let r = unsafe { libc::poll(&raw mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
    }

    /// Whether the frontend truncated memory this session had mapped.
    pub fn memory_lost(&self) -> bool {
        self.fence.tripped()
    }

    /// Ends the session: the server sees the frontend gone and closes it.
    pub fn hang_up(&self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct QueueSlot {
    vring: Vring,
    addresses_set: bool,
    kick_set: bool,
    worker: Option<WorkerHandle>,
}

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
    queues: Vec<QueueSlot>,
    owned: bool,
    acked_features: Option<u64>,
    acked_protocol_features: u64,
    inflight: Option<(Arc<InflightRegion>, GuardedRange)>,
    session: Arc<Session>,
}

/// A request refused: the server closes the session and logs why (once).
fn refuse(why: String) -> VuError {
    VuError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, why))
}

impl Connection {
    pub fn new(export: Arc<Export>, session: Arc<Session>) -> io::Result<Connection> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = (0..export.spec.num_queues)
            .map(|_| {
                Ok(QueueSlot {
                    vring: Vring::new(mem.clone(), export.spec.queue_size as u16)
                        .map_err(|e| io::Error::other(format!("{e:?}")))?,
                    addresses_set: false,
                    kick_set: false,
                    worker: None,
                })
            })
            .collect::<io::Result<_>>()?;
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

    fn slot(&mut self, index: u32) -> VuResult<&mut QueueSlot> {
        let n = self.queues.len();
        self.queues.get_mut(index as usize).ok_or_else(|| {
            refuse(format!(
                "queue {index} does not exist (this export has {n})"
            ))
        })
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
        if let Some(w) = self.queues[q].worker.take() {
            w.stop();
        }
    }

    /// Starts queue `q`'s worker when everything it needs has arrived.
    fn maybe_start(&mut self, q: usize) -> VuResult<()> {
        let Some(features) = self.acked_features else {
            return Ok(());
        };
        let slot = &self.queues[q];
        let enabled = slot.vring.get_ref().is_enabled();
        if slot.worker.is_some()
            || !slot.addresses_set
            || !slot.kick_set
            || !enabled
            || self.regions.is_empty()
        {
            return Ok(());
        }
        if let Err(why) = self.rings_in_memory(q) {
            // The memory table changed under rings that were fine: the
            // queue waits for new addresses instead of failing every
            // request.
            warn!(queue = q, "not started: {why}");
            return Ok(());
        }
        let vring = self.queues[q].vring.clone();
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
        };
        let handle = worker
            .spawn()
            .map_err(|e| refuse(format!("queue {q}: cannot start its worker: {e}")))?;
        self.queues[q].worker = Some(handle);
        debug!(queue = q, "started");
        Ok(())
    }

    /// Whether queue `q`'s rings lie wholly in guest memory: a table that
    /// starts inside and runs past a region's end would fail every request
    /// it holds, and a ring out there cannot be served at all.
    fn rings_in_memory(&self, q: usize) -> Result<(), RingOutside> {
        let st = self.queues[q].vring.get_ref();
        let queue = st.get_queue();
        let n = u64::from(queue.size());
        let mem = self.mem.memory();
        for (what, at, len) in [
            ("descriptor table", queue.desc_table(), 16 * n),
            ("available ring", queue.avail_ring(), 6 + 2 * n),
            ("used ring", queue.used_ring(), 6 + 8 * n),
        ] {
            if !mem.check_range(
                GuestAddress(at),
                len as usize,
                vm_memory::Permissions::ReadWrite,
            ) {
                return Err(RingOutside { what, at, len });
            }
        }
        Ok(())
    }

    fn start_all(&mut self) -> VuResult<()> {
        for q in 0..self.queues.len() {
            self.maybe_start(q)?;
        }
        Ok(())
    }

    fn frontend_to_guest(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|MappedRegion { at: m, .. }| {
            (addr >= m.frontend_addr && addr - m.frontend_addr < m.size)
                .then(|| addr - m.frontend_addr + m.guest_addr)
        })
    }

    fn map_region(&self, region: &VhostUserMemoryRegion, file: File) -> VuResult<MappedRegion> {
        // A region must lie inside the file behind it: a mapping past the
        // file's end is accepted by mmap, and the first access there kills
        // the whole process (SIGBUS), every other session with it.
        let (at, size, offset) = (
            region.guest_phys_addr,
            region.memory_size,
            region.mmap_offset,
        );
        let file_len = file
            .metadata()
            .map_err(|e| refuse(format!("memory region at {at:#x}: its descriptor: {e}")))?
            .len();
        let end = offset.checked_add(size).ok_or_else(|| {
            refuse(format!(
                "memory region at {at:#x}: offset {offset:#x} + size {size:#x} overflows"
            ))
        })?;
        if size == 0 || end > file_len {
            return Err(refuse(format!(
                "memory region at {at:#x}+{size:#x} (file offset {offset:#x}) does not lie \
                 inside its {file_len:#x}-byte file"
            )));
        }
        let mapped = GuestRegionMmap::new(
            region.mmap_region(file)?,
            GuestAddress(region.guest_phys_addr),
        )
        .ok_or_else(|| {
            let (at, size) = (region.guest_phys_addr, region.memory_size);
            refuse(format!(
                "memory region at {at:#x}+{size:#x} does not fit the address space"
            ))
        })?;
        let guard = self
            .session
            .fence
            .guard(mapped.as_ptr(), mapped.len() as usize)
            .map_err(|e| refuse(format!("memory region at {at:#x}: {e}")))?;
        Ok(MappedRegion {
            at: Mapping {
                frontend_addr: region.user_addr,
                size: region.memory_size,
                guest_addr: region.guest_phys_addr,
            },
            region: Arc::new(mapped),
            _guard: Arc::new(guard),
        })
    }

    /// Replaces the guest memory; workers stop (draining) and restart.
    fn install_memory(&mut self, regions: Vec<MappedRegion>) -> VuResult<()> {
        let mem = GuestMemoryMmap::from_arc_regions(
            regions.iter().map(|r| Arc::clone(&r.region)).collect(),
        )
        .map_err(|e| refuse(format!("memory regions overlap or are empty: {e}")))?;
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
            .fence
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
        for slot in &mut self.queues {
            slot.vring.set_enabled(false);
            slot.vring.set_queue_ready(false);
        }
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
        for slot in &self.queues {
            slot.vring.set_queue_event_idx(event_idx);
            if !protocol {
                // Without protocol features rings start enabled.
                slot.vring.set_enabled(true);
            }
        }
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
            .map(|(r, f)| self.map_region(r, f))
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
        let max = self.export.spec.queue_size as u32;
        let slot = self.slot(index)?;
        if slot.worker.is_some() {
            return Err(refuse(format!("queue {index} resized while running")));
        }
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(refuse(format!(
                "queue {index}: size {num} (a power of two up to {max})"
            )));
        }
        slot.vring.set_queue_size(num as u16);
        Ok(())
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
        if self.regions.is_empty() {
            return Err(refuse(format!(
                "queue {index}: ring addresses before any memory table"
            )));
        }
        let translate = |what, a| {
            self.frontend_to_guest(a).ok_or_else(|| {
                refuse(format!(
                    "queue {index}: {what} at {a:#x} is not in guest memory"
                ))
            })
        };
        let (d, u, a) = (
            translate("descriptor table", descriptor)?,
            translate("used ring", used)?,
            translate("available ring", available)?,
        );
        let slot = self.slot(index)?;
        if slot.worker.is_some() {
            return Err(refuse(format!("queue {index} moved while running")));
        }
        slot.vring
            .set_queue_info(d, a, u)
            .map_err(|e| refuse(format!("queue {index}: ring addresses refused: {e:?}")))?;
        if let Err(why) = self.rings_in_memory(index as usize) {
            self.queues[index as usize].addresses_set = false;
            return Err(refuse(format!("queue {index}: {why}")));
        }
        let slot = self.slot(index)?;
        // The used index as the guest's ring has it (a reconnect or a
        // driver reset may have moved it).
        let idx = slot
            .vring
            .queue_used_idx()
            .map_err(|e| refuse(format!("queue {index}: used ring unreadable: {e:?}")))?;
        slot.vring.set_queue_next_used(idx);
        slot.addresses_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let slot = self.slot(index)?;
        if slot.worker.is_some() {
            return Err(refuse(format!(
                "queue {index}: SET_VRING_BASE while running"
            )));
        }
        slot.vring.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.slot(index)?;
        // Stops the ring: in-flight requests complete first.
        self.stop(index as usize);
        let slot = self.slot(index)?;
        slot.vring.set_queue_ready(false);
        let next = slot.vring.queue_next_avail();
        slot.vring.set_kick(None);
        slot.vring.set_call(None);
        slot.kick_set = false;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.slot(index as u32)?;
        // The worker waits on the old descriptor: restart it on the new.
        self.stop(index as usize);
        let slot = self.slot(index as u32)?;
        slot.kick_set = fd.is_some();
        slot.vring.set_kick(fd);
        self.maybe_start(index as usize)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        // Workers signal through the vring state, under its lock: a new
        // descriptor takes effect with the next completion.
        let slot = self.slot(index as u32)?;
        slot.vring.set_call(fd);
        if slot.worker.is_some() {
            // Completions published while the old descriptor (or none)
            // was in place may have raised no interrupt the guest saw:
            // after a reconnect QEMU sends the call descriptor after the
            // kick, and the resubmitted requests may be done by then. One
            // extra interrupt is harmless; a lost one hangs the guest.
            let _ = slot.vring.signal_used_queue();
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.slot(index as u32)?.vring.set_err(fd);
        Ok(())
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
        self.slot(index)?;
        if !enable {
            self.stop(index as usize);
        }
        self.slot(index)?.vring.set_enabled(enable);
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
        let added = self.map_region(region, fd)?;
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
        let mut regions = self.regions.clone();
        let before = regions.len();
        regions.retain(|r| !(r.at.guest_addr == at && r.at.size == size));
        if regions.len() == before {
            return Err(refuse(format!(
                "no memory region at {at:#x}+{size:#x} to remove"
            )));
        }
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

/// A queue's ring that does not lie wholly in guest memory.
#[derive(Debug, thiserror::Error)]
#[error("its {what} at {at:#x}+{len:#x} does not lie wholly in guest memory")]
struct RingOutside {
    what: &'static str,
    at: u64,
    len: u64,
}
