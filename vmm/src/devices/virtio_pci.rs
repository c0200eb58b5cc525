//! The modern virtio-pci transport (virtio 1.x, section 4.1) with MSI-X.
//!
//! One 32-bit memory BAR holds the common configuration, the ISR, the
//! device configuration, the queue notify addresses, and the MSI-X table
//! and PBA. Each queue's notify address is a KVM ioeventfd, and each MSI-X
//! vector an irqfd routed as MSI: both descriptors go to the device (for
//! vhost-user, to the backend), so no vCPU exit and no vmm thread sits on
//! the data path. Only set-up (feature and queue registers, the MSI-X
//! table) exits to this code.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use tracing::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pci::{ConfigSpace, PciDevice};
use super::BusDevice;
use crate::interrupts::MsiRouter;
use cli_support::log_limit::LogLimit;

pub const BAR_SIZE: u32 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
pub const NO_VECTOR: u16 = 0xffff;

/// The common configuration's device status byte: its writes act at once
/// (reset, DRIVER_OK starts the device), so they are never coalesced.
const DEVICE_STATUS: u64 = 0x14;

/// The parts of a device's registers (at BAR `bar`) whose writes may wait
/// in KVM's coalesced-write ring until the vCPU's next exit (see
/// `coalesced`): the common configuration but its status byte. Every
/// read exits and drains the ring first, and the driver's last set-up
/// step is a status write, so each latched value is in place before
/// anything reads or uses it. The MSI-X table is not here: a guest
/// unmasks vectors at any time and expects them live.
pub fn coalescable(bar: u64) -> [(u64, u64); 2] {
    [
        (bar + COMMON, DEVICE_STATUS - COMMON),
        (
            bar + DEVICE_STATUS + 2,
            COMMON + COMMON_LEN - DEVICE_STATUS - 2,
        ),
    ]
}

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;

/// A queue as the driver configured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub max_size: u16,
    pub vector: u16,
    pub enabled: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Per-vector interrupt descriptors for a device (Firecracker's
/// `notifier()`: the eventfd a backend writes to interrupt the guest).
/// A device's own error, whatever the device (the transport only reports
/// it).
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// Why the transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("an eventfd: {0}")]
    Eventfd(std::io::Error),
    #[error("the ioeventfd at {addr:#x}: {err}")]
    Ioeventfd { addr: u64, err: kvm_ioctls::Error },
}

/// Why one attempt to reconnect a device to its backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconnectError {
    /// Nobody answers yet, or the backend went away again mid-way: worth
    /// another attempt until the disk's reconnect timeout.
    #[error("{0}")]
    NotYet(DeviceError),
    /// A backend answered that cannot carry the session on (other
    /// features): waiting longer will not help.
    #[error("{0}")]
    Incompatible(DeviceError),
}

/// A device's connection to the process that serves it (vhost-user), as
/// the watcher that reconnects it uses it: without the transport's lock,
/// which every vCPU exit to the device's registers takes.
pub trait BackendLink: Send + Sync {
    /// The connection to watch for the backend going away.
    fn connection_fd(&self) -> Option<std::os::fd::RawFd>;
    /// One attempt to reconnect and replay the session.
    fn reconnect(&self) -> Result<(), ReconnectError>;
    /// The backend is gone for good: answer the guest's requests with
    /// errors from now on. False when there is nothing to take over.
    fn give_up(&self) -> bool;
    /// Whether the backend's faults on guest memory go to a lazy
    /// restore's pager (it may run before memory is filled).
    fn pages_through_pager(&self) -> bool;
    /// The pager is done: the backend stops handing it its faults.
    fn end_paging(&self) -> Result<(), DeviceError>;
}

pub trait Interrupts {
    fn notifier(&self, vector: u16) -> Option<&EventFd>;
}

/// What the transport needs from a virtio device.
pub trait VirtioDevice: Send {
    /// Virtio device id (2: block).
    fn device_id(&self) -> u16;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    fn num_queues(&self) -> u16;
    fn max_queue_size(&self) -> u16;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: serve `queues` (their kick eventfds are `kicks`).
    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig],
        kicks: &[EventFd],
        interrupts: &dyn Interrupts,
    ) -> Result<(), DeviceError>;
    /// The driver reset the device.
    fn reset(&mut self);
    /// For devices served by another process: their connection, as the
    /// watcher that reconnects them uses it.
    fn backend_link(&self) -> Option<Arc<dyn BackendLink>> {
        None
    }
    /// A snapshot is about to be taken of the started device: stop its
    /// queues so that nothing moves in guest memory (a backend finishes
    /// what it has in flight first).
    fn pause(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The snapshot is taken: the paused device serves again.
    fn resume(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// What the device keeps beyond what its transport saves.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Puts back what [`VirtioDevice::save_state`] returned, after the
    /// transport restored and activated the device.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// The transport as a snapshot keeps it: what the driver programmed
/// (configuration space, feature words, queues, MSI-X table, status) and
/// the device's own state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub config: Vec<u32>,
    /// (address low, address high, data, control) per vector.
    pub msix: Vec<[u32; 4]>,
    pub queues: Vec<QueueConfig>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub config_vector: u16,
    pub config_generation: u8,
    pub activated: bool,
    pub device: serde_json::Value,
}

/// Why a saved transport cannot be put back on this one.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error(
        "the saved device has {saved} queues and {saved_vectors} MSI-X vectors; \
         this one {here} and {here_vectors}"
    )]
    Shape {
        saved: usize,
        saved_vectors: usize,
        here: usize,
        here_vectors: usize,
    },
    #[error("the saved configuration space has {0} registers, not 64")]
    Config(usize),
    #[error("starting the restored device: {0}")]
    Activate(DeviceError),
    #[error("the device's own state: {0}")]
    Device(DeviceError),
}

#[derive(Clone, Copy, Default)]
struct MsixEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// The MSI-X vectors. A vector's eventfd is attached to KVM (an irqfd)
/// only while the vector is unmasked: while it is masked, interrupts
/// collect in the eventfd (its pending bit, as the PBA shows it), and KVM
/// delivers the collected one the moment the irqfd is attached again.
struct MsixVectors {
    entries: Vec<MsixEntry>,
    gsis: Vec<u32>,
    fds: Vec<EventFd>,
    attached: Vec<bool>,
    enabled: bool,
    masked: bool,
}

impl Interrupts for MsixVectors {
    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.fds.get(vector as usize)
    }
}

pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    router: Arc<MsiRouter>,
    vm: Arc<VmFd>,
    msix: MsixVectors,
    kicks: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    config_vector: u16,
    config_generation: u8,
    activated: bool,
    /// A restored device's own state, while its start waits (see
    /// [`VirtioPci::restore`]).
    deferred: Option<serde_json::Value>,
    /// What the driver does wrong is logged within a limit: a guest must
    /// not be able to fill the host's disk with our log.
    driver_errors: LogLimit,
}

fn cap_virtio(cfg_type: u8, offset: u32, len: u32, extra: Option<u32>) -> Vec<u8> {
    let mut c = vec![
        0x09,
        0,
        if extra.is_some() { 20 } else { 16 },
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&offset.to_le_bytes());
    c.extend_from_slice(&len.to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

impl VirtioPci {
    /// A device at BAR address `bar` (fixed, like firmware places it).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar: u32,
        vm: &Arc<VmFd>,
        router: Arc<MsiRouter>,
    ) -> Result<Self, TransportError> {
        let nq = device.num_queues();
        let vectors = nq + 1;
        let mut config = ConfigSpace::new(
            0x1af4,
            0x1040 + device.device_id(),
            0x01_80_00,
            1,
            (0x1af4, device.device_id()),
        );
        config.set_bar(0, bar, BAR_SIZE);
        config.add_capability(&cap_virtio(1, COMMON as u32, COMMON_LEN as u32, None));
        config.add_capability(&cap_virtio(3, ISR as u32, 1, None));
        config.add_capability(&cap_virtio(4, DEVICE as u32, DEVICE_LEN as u32, None));
        config.add_capability(&cap_virtio(
            2,
            NOTIFY as u32,
            NOTIFY_MULTIPLIER * nq as u32,
            Some(NOTIFY_MULTIPLIER),
        ));
        let mut msix = vec![0x11, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(&msix);
        // Message control: enable and function mask.
        config.allow_write(msix_cap / 4, 0xc000_0000);

        let mut kicks = Vec::new();
        for q in 0..nq {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(TransportError::Eventfd)?;
            let addr = bar as u64 + NOTIFY + q as u64 * NOTIFY_MULTIPLIER as u64;
            vm.register_ioevent(&fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|err| TransportError::Ioeventfd { addr, err })?;
            kicks.push(fd);
        }
        let mut gsis = Vec::new();
        let mut fds = Vec::new();
        for _ in 0..vectors {
            gsis.push(router.allocate());
            fds.push(EventFd::new(EFD_NONBLOCK).map_err(TransportError::Eventfd)?);
        }
        let max = device.max_queue_size();
        Ok(VirtioPci {
            config,
            msix_cap,
            router,
            msix: MsixVectors {
                entries: vec![
                    MsixEntry {
                        control: 1,
                        ..Default::default()
                    };
                    vectors as usize
                ],
                gsis,
                fds,
                attached: vec![false; vectors as usize],
                enabled: false,
                masked: false,
            },
            vm: Arc::clone(vm),
            kicks,
            queues: (0..nq)
                .map(|_| QueueConfig {
                    size: max,
                    max_size: max,
                    vector: NO_VECTOR,
                    ..Default::default()
                })
                .collect(),
            device,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            config_generation: 0,
            activated: false,
            deferred: None,
            driver_errors: LogLimit::default(),
        })
    }

    /// Stops the device's queues (the VM is ending): the backend finishes
    /// what is in flight first.
    pub fn shutdown(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
    }

    pub fn backend_link(&self) -> Option<Arc<dyn BackendLink>> {
        self.device.backend_link()
    }

    /// Stops a started device's queues for a snapshot (see
    /// [`VirtioDevice::pause`]).
    pub fn pause(&mut self) -> Result<(), DeviceError> {
        if self.activated {
            self.device.pause()?;
        }
        Ok(())
    }

    /// Starts again what [`VirtioPci::pause`] stopped.
    pub fn resume(&mut self) -> Result<(), DeviceError> {
        if self.activated {
            self.device.resume()?;
        }
        Ok(())
    }

    pub fn save(&self) -> TransportState {
        TransportState {
            config: self.config.regs().to_vec(),
            msix: self
                .msix
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            queues: self.queues.clone(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            config_vector: self.config_vector,
            config_generation: self.config_generation,
            // A restored device whose start still waits is a started one.
            activated: self.activated || self.deferred.is_some(),
            device: match &self.deferred {
                Some(state) => state.clone(),
                None => self.device.save_state(),
            },
        }
    }

    /// Puts a saved transport back on this fresh one (same device, same
    /// place): registers, MSI-X routes, and, if the driver had started
    /// the device, the device started as it was (now, or with `defer`
    /// when [`VirtioPci::start_restored`] is called: a vhost-user backend
    /// must not touch guest memory a lazy restore has not filled yet).
    pub fn restore(
        &mut self,
        s: &TransportState,
        defer: bool,
    ) -> Result<(), TransportRestoreError> {
        if s.queues.len() != self.queues.len() || s.msix.len() != self.msix.entries.len() {
            return Err(TransportRestoreError::Shape {
                saved: s.queues.len(),
                saved_vectors: s.msix.len(),
                here: self.queues.len(),
                here_vectors: self.msix.entries.len(),
            });
        }
        if !self.config.set_regs(&s.config) {
            return Err(TransportRestoreError::Config(s.config.len()));
        }
        for (e, m) in self.msix.entries.iter_mut().zip(&s.msix) {
            *e = MsixEntry {
                addr_lo: m[0],
                addr_hi: m[1],
                data: m[2],
                control: m[3],
            };
        }
        let ctl = self.config.read(self.msix_cap / 4) >> 16;
        self.msix.enabled = ctl & 0x8000 != 0;
        self.msix.masked = ctl & 0x4000 != 0;
        for (q, saved) in self.queues.iter_mut().zip(&s.queues) {
            // The maximum is this device's; the rest the driver's.
            *q = QueueConfig {
                max_size: q.max_size,
                ..*saved
            };
        }
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features & self.device.features();
        self.status = s.status;
        self.queue_select = s.queue_select;
        self.config_vector = s.config_vector;
        self.config_generation = s.config_generation;
        self.update_all_routes();
        if s.activated {
            self.deferred = Some(s.device.clone());
            if !defer {
                self.start_restored()?;
            }
        }
        Ok(())
    }

    /// Starts a restored device whose start [`VirtioPci::restore`]
    /// deferred (nothing if none was).
    pub fn start_restored(&mut self) -> Result<(), TransportRestoreError> {
        let Some(state) = self.deferred.take() else {
            return Ok(());
        };
        self.device
            .activate(self.driver_features, &self.queues, &self.kicks, &self.msix)
            .map_err(TransportRestoreError::Activate)?;
        self.activated = true;
        self.device
            .restore_state(&state)
            .map_err(TransportRestoreError::Device)
    }

    /// Vector `v`'s eventfd, as a backend would write it.
    #[cfg(test)]
    pub fn notifier_for_tests(&self, v: u16) -> &EventFd {
        &self.msix.fds[v as usize]
    }

    fn queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Routes vector `v` as the guest programmed it and attaches its
    /// eventfd; a masked vector is detached, so that what arrives meanwhile
    /// stays pending (see [`MsixVectors`]).
    fn update_route(&mut self, v: usize) {
        let Some(e) = self.msix.entries.get(v).copied() else {
            return;
        };
        let masked = !self.msix.enabled || self.msix.masked || e.control & 1 != 0;
        let (gsi, fd) = (self.msix.gsis[v], &self.msix.fds[v]);
        if masked {
            if self.msix.attached[v] {
                if let Err(err) = self.vm.unregister_irqfd(fd, gsi) {
                    warn!("masking MSI-X vector {v}: {err}");
                }
                self.msix.attached[v] = false;
            }
            return;
        }
        let addr = (e.addr_hi as u64) << 32 | e.addr_lo as u64;
        self.router.set(gsi, Some((addr, e.data)));
        if !self.msix.attached[v] {
            // KVM checks the eventfd as it attaches it: an interrupt that
            // came while the vector was masked is delivered now.
            match self.vm.register_irqfd(fd, gsi) {
                Ok(()) => self.msix.attached[v] = true,
                Err(err) => warn!("unmasking MSI-X vector {v}: {err}"),
            }
        }
    }

    /// The pending bits of the PBA's 64-bit word `word`: masked vectors
    /// whose eventfd holds an interrupt.
    fn pending_bits(&self, word: usize) -> u64 {
        let mut bits = 0u64;
        for (v, fd) in self.msix.fds.iter().enumerate().skip(64 * word).take(64) {
            if !self.msix.attached[v] && readable(fd) {
                bits |= 1 << (v - 64 * word);
            }
        }
        bits
    }

    fn update_all_routes(&mut self) {
        for v in 0..self.msix.entries.len() {
            self.update_route(v);
        }
    }

    fn read_common(&mut self, offset: u64) -> u64 {
        let q = self.queues.get(self.queue_select as usize).copied();
        match offset {
            0x00 => self.device_feature_select as u64,
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => self.driver_feature_select as u64,
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => self.config_vector as u64,
            0x12 => self.queues.len() as u64,
            0x14 => self.status as u64,
            0x15 => self.config_generation as u64,
            0x16 => self.queue_select as u64,
            0x18 => q.map_or(0, |q| q.size as u64),
            0x1a => q.map_or(NO_VECTOR as u64, |q| q.vector as u64),
            0x1c => q.map_or(0, |q| q.enabled as u64),
            0x1e => self.queue_select as u64, // notify offset (x multiplier)
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, v: u64) {
        let lo = |old: u64| (old & !0xffff_ffff) | (v & 0xffff_ffff);
        let hi = |old: u64| (old & 0xffff_ffff) | (v << 32);
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c => {
                let offered = self.device.features();
                match self.driver_feature_select {
                    0 => self.driver_features = lo(self.driver_features) & offered,
                    1 => self.driver_features = hi(self.driver_features) & offered,
                    _ => {}
                }
            }
            0x10 => self.config_vector = v as u16,
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 => {
                if let Some(q) = self.queue() {
                    let n = v as u16;
                    if n.is_power_of_two() && n <= q.max_size {
                        q.size = n;
                    } else {
                        let max = q.max_size;
                        self.driver_errors.emit(
                            || warn!("queue size {n} refused (max {max})"),
                            |n| warn!("{n} more driver errors (not logged one by one)"),
                        );
                    }
                }
            }
            0x1a => {
                let nv = self.msix.entries.len() as u16;
                if let Some(q) = self.queue() {
                    q.vector = if (v as u16) < nv { v as u16 } else { NO_VECTOR };
                }
            }
            0x1c => {
                if let Some(q) = self.queue() {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20 => self.queue().into_iter().for_each(|q| q.desc = lo(q.desc)),
            0x24 => self.queue().into_iter().for_each(|q| q.desc = hi(q.desc)),
            0x28 => self.queue().into_iter().for_each(|q| q.avail = lo(q.avail)),
            0x2c => self.queue().into_iter().for_each(|q| q.avail = hi(q.avail)),
            0x30 => self.queue().into_iter().for_each(|q| q.used = lo(q.used)),
            0x34 => self.queue().into_iter().for_each(|q| q.used = hi(q.used)),
            _ => {}
        }
    }

    fn write_status(&mut self, s: u8) {
        if s == 0 {
            debug!("driver reset the device");
            if self.activated {
                self.device.reset();
                self.activated = false;
            }
            let max = self.device.max_queue_size();
            for q in &mut self.queues {
                *q = QueueConfig {
                    size: max,
                    max_size: max,
                    vector: NO_VECTOR,
                    ..Default::default()
                };
            }
            self.status = 0;
            self.driver_features = 0;
            return;
        }
        let newly = s & !self.status;
        self.status = s;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & (1 << 32) == 0 {
            // VIRTIO_F_VERSION_1 is required of a modern driver.
            self.status &= !STATUS_FEATURES_OK;
        }
        if newly & STATUS_DRIVER_OK != 0 && !self.activated {
            let kicks: Vec<EventFd> = self
                .kicks
                .iter()
                .filter_map(|k| k.try_clone().ok())
                .collect();
            match self
                .device
                .activate(self.driver_features, &self.queues, &kicks, &self.msix)
            {
                Ok(()) => self.activated = true,
                Err(e) => {
                    self.driver_errors.emit(
                        || warn!("device activation failed: {e}"),
                        |n| warn!("{n} more driver errors (not logged one by one)"),
                    );
                    self.status |= STATUS_FAILED;
                }
            }
        }
    }

    fn msix_access(&mut self, offset: u64, data: &mut [u8], write: bool) {
        let v = (offset / 16) as usize;
        let field = (offset % 16 / 4) as usize;
        let Some(e) = self.msix.entries.get_mut(v) else {
            data.fill(0);
            return;
        };
        let regs = [&mut e.addr_lo, &mut e.addr_hi, &mut e.data, &mut e.control];
        let r = regs.into_iter().nth(field).expect("4 fields");
        if write {
            if data.len() == 4 {
                *r = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            } else if data.len() == 8 && field.is_multiple_of(2) {
                // A 64-bit write covers two fields.
                let lo = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let hi = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
                *r = lo;
                let e = &mut self.msix.entries[v];
                match field {
                    0 => e.addr_hi = hi,
                    _ => e.control = hi,
                }
            }
            self.update_route(v);
        } else {
            let b = r.to_le_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = b.get(i).copied().unwrap_or(0);
            }
        }
    }
}

/// Whether an eventfd holds a count (without taking it).
fn readable(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, without waiting.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & libc::POLLIN != 0 }
}

fn value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
    u64::from_le_bytes(b)
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => {
                let v = self.read_common(o);
                for (i, d) in data.iter_mut().enumerate() {
                    *d = (v >> (8 * i)) as u8;
                }
            }
            o if o == ISR => data.fill(0),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.msix_access(o - MSIX_TABLE, data, false)
            }
            o if (MSIX_PBA..MSIX_PBA + 8 * self.msix.fds.len().div_ceil(64) as u64)
                .contains(&o) =>
            {
                let word = ((o - MSIX_PBA) / 8) as usize;
                let bits = self.pending_bits(word) >> (8 * ((o - MSIX_PBA) % 8));
                for (i, d) in data.iter_mut().enumerate() {
                    *d = bits.checked_shr(8 * i as u32).unwrap_or(0) as u8;
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o, value(data)),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE, data)
            }
            o if (NOTIFY..NOTIFY + NOTIFY_MULTIPLIER as u64 * self.kicks.len() as u64)
                .contains(&o) =>
            {
                // A notify the ioeventfd did not match (another width).
                let q = ((o - NOTIFY) / NOTIFY_MULTIPLIER as u64) as usize;
                let _ = self.kicks[q].write(1);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                let mut d = data.to_vec();
                self.msix_access(o - MSIX_TABLE, &mut d, true)
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == self.msix_cap / 4 {
            let ctl = self.config.read(reg) >> 16;
            let (enabled, masked) = (ctl & 0x8000 != 0, ctl & 0x4000 != 0);
            if (enabled, masked) != (self.msix.enabled, self.msix.masked) {
                self.msix.enabled = enabled;
                self.msix.masked = masked;
                self.update_all_routes();
            }
        }
    }
}

/// Shares one transport between the PCI bus and the MMIO bus.
pub type SharedVirtioPci = Arc<Mutex<VirtioPci>>;
