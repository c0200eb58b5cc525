//! One frontend's session: the vhost-user requests answered here (through
//! the vhost crate's parser; the state every backend keeps is
//! vhost-user-session's), and the pair workers they start and stop.
//!
//! Pair p's worker serves its receive and transmit queues (and pair 0's
//! the control queue) that the frontend set up; any change to one of
//! them stops the worker and starts it again on what is ready. A request
//! that breaks the protocol is an error: the session ends with that
//! reason, and the next frontend is served.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{self, Layout, NetDevice};
use crate::worker::{PairWorker, WorkerHandle};
use tracing::warn;
use vhost_user_session::memory::{self, MappedRegion};
use vhost_user_session::queues::{Queues, Vring};
use vhost_user_session::rings::BrokenMark;
use vhost_user_session::server::Served;
use vhost_user_session::{refuse, Session};

const MAX_MEM_SLOTS: u64 = 509;

/// A queue served by its pair's worker.
pub struct InService;

pub struct Connection {
    device: Arc<NetDevice>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    regions: Vec<MappedRegion>,
    queues: Queues<InService>,
    /// Each pair's worker, when one runs.
    workers: Vec<Option<WorkerHandle>>,
    owned: bool,
    acked_features: Option<u64>,
    /// SET_PROTOCOL_FEATURES came (rings are switched by
    /// SET_VRING_ENABLE from then on).
    protocol_features_set: bool,
    session: Arc<Session>,
}

impl Connection {
    pub fn new(device: Arc<NetDevice>, session: Arc<Session>) -> std::io::Result<Connection> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = Queues::new(
            2 * device.pairs() + 1,
            device.queue_size().min(u16::MAX as usize) as u16,
            &mem,
        )?;
        Ok(Connection {
            workers: (0..device.pairs()).map(|_| None).collect(),
            device,
            mem,
            regions: Vec::new(),
            queues,
            owned: false,
            acked_features: None,
            protocol_features_set: false,
            session,
        })
    }

    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
    }

    fn layout(&self) -> Layout {
        Layout::new(self.device.pairs(), self.acked_features.unwrap_or(0))
    }

    fn stop_pair(&mut self, p: usize) {
        if let Some(w) = self.workers.get_mut(p).and_then(Option::take) {
            w.stop();
        }
        for q in self.layout().queues_of(p).into_iter().flatten() {
            if let Ok(slot) = self.queues.slot(q as u32) {
                slot.worker = None;
            }
        }
    }

    /// Stops every worker; returns the pairs that ran.
    fn stop_all(&mut self) -> Vec<usize> {
        let ran: Vec<usize> = (0..self.workers.len())
            .filter(|&p| self.workers[p].is_some())
            .collect();
        for p in 0..self.workers.len() {
            self.stop_pair(p);
        }
        ran
    }

    /// Starts pair `p`'s worker on its queues that are ready, if any.
    fn start_pair(&mut self, p: usize) -> VuResult<()> {
        let Some(features) = self.acked_features else {
            return Ok(());
        };
        if self.regions.is_empty() || p >= self.layout().pairs || self.workers[p].is_some() {
            return Ok(());
        }
        let mut queues: [Option<(usize, Vring, BrokenMark)>; 3] = Default::default();
        for (k, q) in self.layout().queues_of(p).into_iter().enumerate() {
            let Some(q) = q else { continue };
            let Some(slot) = self.queues.get(q) else {
                continue;
            };
            if !slot.ready() {
                continue;
            }
            if let Err(why) = self.queues.rings_in_memory(q) {
                // The memory table changed under rings that were fine: the
                // queue waits for new addresses.
                self.session
                    .peer_caused(|| warn!(queue = q, "not started: {why}"));
                continue;
            }
            queues[k] = Some((q, slot.vring.clone(), slot.broken.clone()));
        }
        if queues.iter().all(Option::is_none) {
            return Ok(());
        }
        for (q, vring, _) in queues.iter().flatten() {
            vring.set_queue_ready(true);
            self.queues.slot(*q as u32)?.worker = Some(InService);
        }
        let worker = PairWorker {
            pair: p,
            device: Arc::clone(&self.device),
            queues,
            mem: self.mem.clone(),
            event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            session: Arc::clone(&self.session),
        };
        let handle = worker
            .spawn()
            .map_err(|e| refuse(format!("pair {p}: cannot start its worker: {e}")))?;
        self.workers[p] = Some(handle);
        Ok(())
    }

    fn start_all(&mut self) -> VuResult<()> {
        for p in 0..self.workers.len() {
            self.start_pair(p)?;
        }
        Ok(())
    }

    /// Runs `change` on queue `index` with its pair's worker stopped, and
    /// starts the worker again.
    fn with_pair_stopped(
        &mut self,
        index: u32,
        change: impl FnOnce(&mut Self) -> VuResult<()>,
    ) -> VuResult<()> {
        self.queues.slot(index)?;
        let pair = self.layout().pair_of(index as usize);
        if let Some(p) = pair {
            self.stop_pair(p);
        }
        let changed = change(self);
        if let Some(p) = pair {
            self.start_pair(p)?;
        }
        changed
    }

    /// Replaces the guest memory; workers stop and start again.
    fn install_memory(&mut self, regions: Vec<MappedRegion>) -> VuResult<()> {
        let mem = memory::guest_memory(&regions)?;
        let ran = self.stop_all();
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        self.regions = regions;
        for p in ran {
            self.start_pair(p)?;
        }
        self.start_all()
    }

    /// Whether SET_VRING_ENABLE may come: once the frontend sent
    /// SET_PROTOCOL_FEATURES (QEMU's virtio-net enables a peer's queue
    /// pairs before it sends SET_FEATURES; see third_party/README.md), or
    /// acked VHOST_USER_F_PROTOCOL_FEATURES.
    fn rings_switchable(&self) -> bool {
        self.protocol_features_set
            || self
                .acked_features
                .is_some_and(|f| f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0)
    }
}

impl Served for Connection {
    fn close(&mut self) {
        self.stop_all();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn unsupported<T>(what: &str) -> VuResult<T> {
    Err(refuse(format!("{what} is not supported by this device")))
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
        self.protocol_features_set = false;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        self.queues.reset();
        self.acked_features = None;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(device::features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = device::features();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        // Which queue is what may change with the features.
        self.stop_all();
        self.acked_features = Some(features);
        if let Err(e) = self.device.acked_features(features) {
            self.session.peer_caused(|| warn!("{e}"));
        }
        self.queues.set_features(
            features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
        );
        self.start_all()
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
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
        let mut next = 0;
        self.with_pair_stopped(index, |c| {
            next = c.queues.take_base(index)?;
            Ok(())
        })?;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.with_pair_stopped(index.into(), |c| c.queues.set_kick(index.into(), fd))
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
        self.protocol_features_set = true;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.rings_switchable() {
            return Err(refuse(
                "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        self.with_pair_stopped(index, |c| {
            c.queues.slot(index)?.vring.set_enabled(enable);
            Ok(())
        })
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
        Ok(self.device.config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // The MAC is the frontend's own (VIRTIO_NET_F_MAC is not offered):
        // a driver writing it is told nothing changed here.
        if offset < 6 && offset as usize + buf.len() <= 6 {
            return Ok(());
        }
        Err(refuse(format!(
            "SET_CONFIG of {} bytes at {offset}",
            buf.len()
        )))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported("a GPU socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported("a shared object")
    }

    fn get_inflight_fd(&mut self, _msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        unsupported("an inflight region")
    }

    fn set_inflight_fd(&mut self, _msg: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported("an inflight region")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(refuse("all memory slots are in use".into()));
        }
        let mut regions = self.regions.clone();
        regions.push(memory::map_region(&self.session, region, fd)?);
        self.install_memory(regions)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let regions = memory::without(&self.regions, region.guest_phys_addr, region.memory_size)?;
        self.install_memory(regions)
    }

    fn postcopy_advice(&mut self) -> VuResult<File> {
        unsupported("postcopy")
    }

    fn postcopy_listen(&mut self) -> VuResult<()> {
        unsupported("postcopy")
    }

    fn postcopy_end(&mut self) -> VuResult<()> {
        unsupported("postcopy")
    }

    fn postcopy_ack_mem_regions(&mut self) -> VuResult<()> {
        unsupported("postcopy")
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported("device state transfer")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported("device state transfer")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported("shared memory")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported("dirty logging")
    }
}
