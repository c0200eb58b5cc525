//! Every vhost-user request of a session, answered in one place for every
//! backend: a [`Connection`] holds what any session keeps ([`Core`]: the
//! memory table, the queues, what was negotiated) and a [`Device`], the
//! backend's own part: what it offers, its configuration space, how its
//! workers start and stop, and the requests only some devices take
//! (blk-backend's inflight region and postcopy).
//!
//! A request that breaks the protocol is an error: the server ends the
//! session with that reason and serves the next frontend.

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
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::memory::{self, MappedRegion};
use crate::queues::Queues;
use crate::server::Served;
use crate::{refuse, Session};

/// VIRTIO_RING_F_EVENT_IDX.
const EVENT_IDX: u64 = 1 << 29;
/// Memory slots a frontend may fill (CONFIGURE_MEM_SLOTS).
const MAX_MEM_SLOTS: u64 = 509;

/// What every session keeps.
pub struct Core<W> {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub regions: Vec<MappedRegion>,
    pub queues: Queues<W>,
    pub session: Arc<Session>,
    owned: bool,
    acked_features: Option<u64>,
    /// SET_PROTOCOL_FEATURES came (with what).
    protocol_features: Option<u64>,
}

impl<W> Core<W> {
    /// The features the driver acked, once it did.
    pub fn acked_features(&self) -> Option<u64> {
        self.acked_features
    }

    /// Whether the driver acked EVENT_IDX.
    pub fn event_idx(&self) -> bool {
        self.acked_features.is_some_and(|f| f & EVENT_IDX != 0)
    }
}

/// A backend's device, as a session drives it.
pub trait Device: Sized {
    /// What serves a queue, kept in its slot (`Queues<Worker>`): a worker
    /// handle, or a mark that another worker has it.
    type Worker;

    /// The virtio features offered (VHOST_USER_F_PROTOCOL_FEATURES too).
    fn features(&self) -> u64;
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// `size` bytes of the configuration space from `offset` (within 256).
    fn config(&self, offset: u32, size: u32) -> Vec<u8>;
    /// A driver's write to the configuration space.
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> VuResult<()> {
        Err(refuse(format!(
            "SET_CONFIG of {} bytes at {offset}",
            buf.len()
        )))
    }
    /// The driver acked `features` (no worker runs).
    fn features_acked(&mut self, _core: &Core<Self::Worker>, _features: u64) {}

    /// Stops what serves queue `q` (in-flight work completes first).
    fn stop(&mut self, core: &mut Core<Self::Worker>, q: usize);
    /// Makes queue `q` served if everything it needs has arrived (and not
    /// served if not), whatever served it before.
    fn start(&mut self, core: &mut Core<Self::Worker>, q: usize) -> VuResult<()>;
    /// Stops every worker.
    fn stop_all(&mut self, core: &mut Core<Self::Worker>) {
        for q in 0..core.queues.len() {
            self.stop(core, q);
        }
    }
    /// Starts every queue that is ready.
    fn start_all(&mut self, core: &mut Core<Self::Worker>) -> VuResult<()> {
        for q in 0..core.queues.len() {
            self.start(core, q)?;
        }
        Ok(())
    }
    /// The session ends.
    fn close(&mut self, core: &mut Core<Self::Worker>) {
        self.stop_all(core);
    }

    /// A memory table arrived, mapped: installed (the default), or held
    /// until the frontend acks it (postcopy: the reply gives our mapping's
    /// addresses).
    fn memory_table(
        &mut self,
        core: &mut Core<Self::Worker>,
        regions: Vec<MappedRegion>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        install_memory(core, self, regions)?;
        Ok(None)
    }
    /// A region added on its own (CONFIGURE_MEM_SLOTS), mapped.
    fn memory_region_added(
        &mut self,
        core: &mut Core<Self::Worker>,
        added: MappedRegion,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let mut regions = core.regions.clone();
        regions.push(added);
        install_memory(core, self, regions)?;
        Ok(None)
    }

    fn get_inflight_fd(
        &mut self,
        _core: &mut Core<Self::Worker>,
        _msg: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        unsupported("an inflight region")
    }
    fn set_inflight_fd(
        &mut self,
        _core: &mut Core<Self::Worker>,
        _msg: &VhostUserInflight,
        _file: File,
    ) -> VuResult<()> {
        unsupported("an inflight region")
    }
    fn postcopy_advice(&mut self, _core: &mut Core<Self::Worker>) -> VuResult<File> {
        unsupported("postcopy")
    }
    fn postcopy_listen(&mut self, _core: &mut Core<Self::Worker>) -> VuResult<()> {
        unsupported("postcopy")
    }
    fn postcopy_end(&mut self, _core: &mut Core<Self::Worker>) -> VuResult<()> {
        unsupported("postcopy")
    }
    fn postcopy_ack_mem_regions(&mut self, _core: &mut Core<Self::Worker>) -> VuResult<()> {
        unsupported("postcopy")
    }
}

fn unsupported<T>(what: &str) -> VuResult<T> {
    Err(refuse(format!("{what} is not supported by this device")))
}

/// Replaces the guest memory: every worker stops, the memory changes,
/// the queues that are ready start again.
pub fn install_memory<D: Device>(
    core: &mut Core<D::Worker>,
    device: &mut D,
    regions: Vec<MappedRegion>,
) -> VuResult<()> {
    let mem = memory::guest_memory(&regions)?;
    device.stop_all(core);
    core.mem
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(mem);
    core.regions = regions;
    device.start_all(core)
}

/// One session: what every session keeps, and the device's part.
pub struct Connection<D: Device> {
    pub core: Core<D::Worker>,
    pub device: D,
}

impl<D: Device> Connection<D> {
    /// A session of `queues` queues of up to `max_queue_size` entries.
    pub fn new(
        device: D,
        queues: usize,
        max_queue_size: u16,
        session: Arc<Session>,
    ) -> std::io::Result<Connection<D>> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = Queues::new(queues, max_queue_size, &mem)?;
        Ok(Connection {
            core: Core {
                mem,
                regions: Vec::new(),
                queues,
                session,
                owned: false,
                acked_features: None,
                protocol_features: None,
            },
            device,
        })
    }

    /// Whether SET_VRING_ENABLE may come: once the frontend sent
    /// SET_PROTOCOL_FEATURES (QEMU's virtio-net enables a peer's queue
    /// pairs before it sends SET_FEATURES; see third_party/README.md), or
    /// acked VHOST_USER_F_PROTOCOL_FEATURES.
    fn rings_switchable(&self) -> bool {
        self.core.protocol_features.is_some()
            || self
                .core
                .acked_features
                .is_some_and(|f| f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0)
    }

    /// Runs `change` on queue `index` with what serves it stopped, then
    /// serves it again if it is ready.
    fn with_queue_stopped<T>(
        &mut self,
        index: u32,
        change: impl FnOnce(&mut Core<D::Worker>) -> VuResult<T>,
    ) -> VuResult<T> {
        self.core.queues.slot(index)?;
        self.device.stop(&mut self.core, index as usize);
        let changed = change(&mut self.core);
        self.device.start(&mut self.core, index as usize)?;
        changed
    }

    fn map(&self, region: &VhostUserMemoryRegion, file: File) -> VuResult<MappedRegion> {
        memory::map_region(&self.core.session, region, file)
    }
}

impl<D: Device> Served for Connection<D> {
    fn close(&mut self) {
        self.device.close(&mut self.core);
    }
}

impl<D: Device> Drop for Connection<D> {
    fn drop(&mut self) {
        self.device.close(&mut self.core);
    }
}

impl<D: Device> VhostUserBackendReqHandlerMut for Connection<D> {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.core.owned {
            return Err(refuse("SET_OWNER twice".into()));
        }
        self.core.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.device.stop_all(&mut self.core);
        self.core.owned = false;
        self.core.acked_features = None;
        self.core.protocol_features = None;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.device.stop_all(&mut self.core);
        self.core.queues.reset();
        self.core.acked_features = None;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.device.features();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        // What serves which queue may change with the features.
        self.device.stop_all(&mut self.core);
        self.core.acked_features = Some(features);
        self.device.features_acked(&self.core, features);
        self.core.queues.set_features(
            features & EVENT_IDX != 0,
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0,
        );
        self.device.start_all(&mut self.core)
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
            .map(|(r, f)| self.map(r, f))
            .collect::<VuResult<Vec<_>>>()?;
        self.device
            .memory_table(&mut self.core, regions, postcopy_listening)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.core.queues.set_num(index, num)
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
        let core = &mut self.core;
        core.queues
            .set_addr(index, &core.regions, descriptor, used, available)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.core.queues.set_base(index, base)
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        // Stops the ring: in-flight work completes first.
        let next = self.with_queue_stopped(index, |core| core.queues.take_base(index))?;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        // A worker waits on the old descriptor: started again on the new.
        self.with_queue_stopped(index.into(), |core| core.queues.set_kick(index.into(), fd))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.core.queues.set_call(index.into(), fd)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.core.queues.set_err(index.into(), fd)
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let ours = self.device.protocol_features().bits();
        if features & !ours != 0 {
            return Err(refuse(format!(
                "protocol features {:#x} were not offered",
                features & !ours
            )));
        }
        self.core.protocol_features = Some(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.core.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.rings_switchable() {
            return Err(refuse(
                "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES".into(),
            ));
        }
        self.with_queue_stopped(index, |core| {
            core.queues.slot(index)?.vring.set_enabled(enable);
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
        self.device.set_config(offset, buf)
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported("a GPU socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported("a shared object")
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        self.device.get_inflight_fd(&mut self.core, msg)
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        self.device.set_inflight_fd(&mut self.core, msg, file)
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
        if self.core.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(refuse("all memory slots are in use".into()));
        }
        let added = self.map(region, fd)?;
        self.device
            .memory_region_added(&mut self.core, added, postcopy_listening)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let regions = memory::without(
            &self.core.regions,
            region.guest_phys_addr,
            region.memory_size,
        )?;
        install_memory(&mut self.core, &mut self.device, regions)
    }

    fn postcopy_advice(&mut self) -> VuResult<File> {
        self.device.postcopy_advice(&mut self.core)
    }

    fn postcopy_listen(&mut self) -> VuResult<()> {
        self.device.postcopy_listen(&mut self.core)
    }

    fn postcopy_end(&mut self) -> VuResult<()> {
        self.device.postcopy_end(&mut self.core)
    }

    fn postcopy_ack_mem_regions(&mut self) -> VuResult<()> {
        self.device.postcopy_ack_mem_regions(&mut self.core)
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
