//! Building a VM, two ways (as Firecracker's `build_microvm_for_boot` and
//! `build_microvm_from_snapshot`): booting a kernel, or restoring a
//! snapshot. Both make the same core (KVM, memory slots, the interrupt
//! controller), attach the same devices through the device manager and
//! start the same threads; they differ in what memory holds and how each
//! vCPU starts.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{unbounded as channel, Receiver, Sender};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use tracing::{debug, error, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::{Api, EndWaiters};
use crate::boot;
use crate::coalesced::CoalescedWrites;
use crate::config::VmConfig;
use crate::control::Control;
use crate::device_manager::{AttachError, DeviceManager};
use crate::devices::config_mirror::ConfigMirror;
use crate::devices::serial;
use crate::events::VmEvent;
use crate::kvm_stats::VcpuStats;
use crate::memory::{self, GuestRam};
use crate::snapshot::pager::PagerHandle;
use crate::snapshot::restore::{self, RestoreDone};
use crate::snapshot::{self, SnapshotError, VmState};
use crate::vcpu;

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{call}")]
    Kvm {
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("writing the ACPI tables")]
    Acpi(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Boot(#[from] crate::boot::BootError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("--serial file={path}")]
    Serial {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Devices(#[from] AttachError),
    #[error("--restore")]
    Restore(#[from] SnapshotError),
    #[error("--restore")]
    RestoreVcpu(#[from] crate::snapshot::vcpu::VcpuStateError),
    #[error("installing the vCPU kick signal")]
    KickSignal(#[source] std::io::Error),
    #[error("--api-socket {path}")]
    Api {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up coalesced console writes")]
    Coalesced(#[from] crate::coalesced::CoalescedError),
    #[error("starting the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

type Result<T, E = BuildError> = std::result::Result<T, E>;

/// A KVM call's failure, named.
fn kvm(call: &'static str) -> impl Fn(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { call, source }
}

/// Where start-up time went, in microseconds from the build's start.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timing {
    /// KVM, memory and the kernel loaded.
    pub vm_and_kernel_us: u64,
    /// Connecting to every disk backend (handshake, memory table).
    pub disk_handshake_us: u64,
    /// Until the first vCPU thread was about to enter KVM_RUN.
    pub first_run_us: u64,
}

/// A VM built and running: its vCPUs in the guest, its devices served.
pub struct Vm {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    pub ram: GuestRam,
    pub devices: DeviceManager,
    pub control: Arc<Control>,
    /// The clients waiting for the VM's end.
    pub ended: Arc<EndWaiters>,
    /// How the VM ends: the first event a vCPU, a device or the API sends.
    pub events: Receiver<VmEvent>,
    /// Held, so that `events` ends only with the process; cloned for
    /// threads started after the build (a lazy restore's).
    pub events_tx: Sender<VmEvent>,
    /// Snapshots asked for through the API.
    pub snapshots: Receiver<snapshot::Request>,
    /// Whether a restore has finished (at once after a boot).
    pub restore_done: Arc<RestoreDone>,
    /// An on-demand or lazy restore's pager.
    pub pager: Option<PagerHandle>,
    /// The MAC each NIC's guest knows (given, drawn at boot, or restored).
    pub nic_macs: Vec<[u8; 6]>,
    /// KVM's own counters per vCPU, where the kernel has them.
    pub kvm_stats: Vec<Option<VcpuStats>>,
    /// The configuration it runs with (a restore's vCPUs and memory are
    /// the snapshot's).
    pub cfg: VmConfig,
    pub timing: Timing,
}

/// How each vCPU starts.
enum First<'a> {
    /// The boot vCPU at the kernel's entry, the others waiting for its
    /// start-up IPI.
    Boot(boot::Entry),
    /// Each where the snapshot left it.
    Restore(&'a VmState),
}

/// Boots `cfg`'s kernel.
pub fn build_for_boot(cfg: &VmConfig) -> Result<Vm> {
    let t0 = Instant::now();
    let core = Core::create(cfg)?;
    let rsdp = crate::acpi::write_tables(&core.ram.mem, cfg.cpus).map_err(BuildError::Acpi)?;
    let entry = if boot::is_bzimage(&cfg.kernel) {
        boot::load_bzimage(
            &core.ram,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cfg.cmdline,
            rsdp,
        )?
    } else {
        let e = boot::load_pvh(&core.ram, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?;
        boot::set_rsdp(&core.ram.mem, rsdp)?;
        e
    };
    let timing = Timing {
        vm_and_kernel_us: t0.elapsed().as_micros() as u64,
        ..Default::default()
    };
    let nic_macs = cfg
        .nets
        .iter()
        .map(|n| n.mac_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let parts = Parts::attach(core, cfg.clone(), nic_macs, None, timing)?;
    parts.start(First::Boot(entry), None, t0)
}

/// Restores the snapshot in `dir` (read and checked already: `state`)
/// on `cfg`'s devices.
pub fn build_from_snapshot(cfg: &VmConfig, dir: &Path, state: &VmState) -> Result<Vm> {
    let mut cfg = cfg.clone();
    cfg.cpus = state.cpus;
    cfg.memory = state.memory;
    let t0 = Instant::now();
    let core = Core::create(&cfg)?;
    // The guest's memory as it was (its tables and kernel in it): copied
    // now, or brought in as the guest touches it.
    let pager = restore::fill_memory(dir, &core.ram, cfg.memory, cfg.restore_memory)?;
    for chip in &state.irqchips {
        core.vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    let timing = Timing {
        vm_and_kernel_us: t0.elapsed().as_micros() as u64,
        ..Default::default()
    };
    // A restored NIC keeps the MAC its guest knows (check_restorable
    // refused a different one given).
    let nic_macs = cfg
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| match state.nics.get(i) {
            Some(saved) => Ok(saved.mac),
            None => n.mac_bytes(),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parts = Parts::attach(
        core,
        cfg,
        nic_macs,
        pager.as_ref().map(|p| p.handle()),
        timing,
    )?;
    let devices = &parts.devices;
    let deferred = restore::restore_devices(state, devices, pager.is_some())?;
    if let (Some(pager), true) = (&pager, deferred) {
        // A disk or NIC waits for all of memory: filled in the background
        // even on demand, or it would never start.
        if pager.handle().serving() {
            info!("a disk's or NIC's backend cannot page through the vmm: it starts once all of memory is in");
        }
        pager.handle().fill_all();
    }
    devices.render_pci();
    // The guest's clock goes on from the snapshot's instant, however long
    // ago it was taken (no KVM_CLOCK_REALTIME: its monotonic time must not
    // jump by the snapshot's age; a guest that asks for the wall clock
    // again, MSR_KVM_WALL_CLOCK_NEW, gets today's). Set before any vCPU
    // runs, so none sees the host's clock first.
    let clock = kvm_bindings::kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    parts
        .core
        .vm
        .set_clock(&clock)
        .map_err(kvm("KVM_SET_CLOCK"))?;
    let paged_devices: Vec<_> = parts
        .devices
        .disks
        .iter()
        .chain(&parts.devices.nics)
        .map(|a| Arc::clone(&a.device))
        .collect();
    let vm = parts.start(
        First::Restore(state),
        pager.as_ref().map(|p| p.handle()),
        t0,
    )?;
    if let Some(pager) = pager {
        restore::finish_in_background(
            pager,
            paged_devices,
            vm.events_tx.clone(),
            Arc::clone(&vm.restore_done),
        )
        .map_err(|e| BuildError::Thread("restore", e))?;
    }
    Ok(vm)
}

/// Every device of `cfg`: disks, NICs, shared folders, the virtio
/// console. Microseconds the disks took to connect.
fn attach_devices(
    devices: &mut DeviceManager,
    cfg: &VmConfig,
    nic_macs: &[[u8; 6]],
) -> Result<u64> {
    let t0 = Instant::now();
    devices.attach_disks(&cfg.disks)?;
    let disks_us = t0.elapsed().as_micros() as u64;
    devices.attach_nics(&cfg.nets, nic_macs)?;
    devices.attach_shares(&cfg.fs)?;
    if cfg.virtio_console {
        devices.attach_console()?;
    }
    Ok(disks_us)
}

/// KVM, guest memory in its slots, the in-kernel interrupt controller:
/// what a boot and a restore both start from.
struct Core {
    kvm: Kvm,
    vm: Arc<VmFd>,
    ram: GuestRam,
    /// PCI configuration space as memory the guest reads without exits,
    /// where KVM has read-only slots.
    config_mirror: Option<ConfigMirror>,
}

impl Core {
    fn create(cfg: &VmConfig) -> Result<Core> {
        let kvm_fd = Kvm::new().map_err(kvm("/dev/kvm"))?;
        let vm = Arc::new(kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?);
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        let ram = memory::create(cfg.memory)?;
        let config_mirror = if kvm_fd.check_extension(Cap::ReadonlyMem) {
            // Without it every configuration read exits: slower, not wrong.
            ConfigMirror::new()
                .inspect_err(|e| warn!("{e}: PCI configuration reads exit"))
                .ok()
        } else {
            None
        };
        // Memory slots before the in-kernel irqchip: the first slot added
        // after KVM_CREATE_IRQCHIP waits for a grace period (5-9 ms here,
        // measured, with no CPU used); added first, it takes 0.3 ms.
        let mut slots: Vec<kvm_userspace_memory_region> = ram
            .mem
            .iter()
            .enumerate()
            .map(|(slot, region)| kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            })
            .collect();
        if let Some(m) = &config_mirror {
            let (userspace_addr, memory_size) = m.window();
            slots.push(kvm_userspace_memory_region {
                slot: slots.len() as u32,
                flags: KVM_MEM_READONLY,
                guest_phys_addr: crate::acpi::ECAM_BASE,
                memory_size,
                userspace_addr,
            });
        }
        for r in slots {
            // SAFETY: each range is mapped for the VM's life: `ram` and the
            // mirror (held by the PCI bus) outlive every vCPU, and the
            // process ends when the VM does.
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        Ok(Core {
            kvm: kvm_fd,
            vm,
            ram,
            config_mirror,
        })
    }

    /// The platform's devices, ready for the virtio ones.
    fn device_manager(
        &mut self,
        cfg: &VmConfig,
        events: &Sender<VmEvent>,
        pager: Option<PagerHandle>,
    ) -> Result<DeviceManager> {
        let serial =
            crate::console::serial_out(&cfg.serial).map_err(|source| BuildError::Serial {
                path: match &cfg.serial {
                    crate::config::SerialOut::File(p) => p.display().to_string(),
                    other => format!("{other:?}"),
                },
                source,
            })?;
        Ok(DeviceManager::new(
            &self.vm,
            &self.ram.mem,
            serial,
            events,
            self.config_mirror.take(),
            pager,
        )?)
    }
}

/// A VM with its devices attached, not yet running.
struct Parts {
    core: Core,
    devices: DeviceManager,
    events: Receiver<VmEvent>,
    events_tx: Sender<VmEvent>,
    nic_macs: Vec<[u8; 6]>,
    cfg: VmConfig,
    timing: Timing,
}

impl Parts {
    /// The platform and every device of `cfg` on `core` (a lazy
    /// restore's `pager` given to the vhost-user devices).
    fn attach(
        mut core: Core,
        cfg: VmConfig,
        nic_macs: Vec<[u8; 6]>,
        pager: Option<PagerHandle>,
        mut timing: Timing,
    ) -> Result<Parts> {
        let (events_tx, events) = channel();
        let mut devices = core.device_manager(&cfg, &events_tx, pager)?;
        timing.disk_handshake_us = attach_devices(&mut devices, &cfg, &nic_macs)?;
        Ok(Parts {
            core,
            devices,
            events,
            events_tx,
            nic_macs,
            cfg,
            timing,
        })
    }

    /// Starts the API, the devices' watchers, the console's threads and
    /// the vCPUs.
    fn start(self, first: First<'_>, pager: Option<PagerHandle>, t0: Instant) -> Result<Vm> {
        let Parts {
            core,
            devices,
            events,
            events_tx,
            nic_macs,
            cfg,
            mut timing,
        } = self;
        let (snapshots_tx, snapshots) = channel::<snapshot::Request>();
        let control = Arc::new(Control::new(cfg.cpus as usize).map_err(BuildError::KickSignal)?);
        let ended = Arc::new(EndWaiters::default());
        if let Some(path) = &cfg.api_socket {
            Api {
                control: Arc::clone(&control),
                config: cfg.clone(),
                events: events_tx.clone(),
                ended: Arc::clone(&ended),
                snapshots: snapshots_tx,
            }
            .serve(path)
            .map_err(|source| BuildError::Api {
                path: path.display().to_string(),
                source,
            })?;
        }
        devices.start_watchers(&control)?;
        let kvm_stats = start_vcpus(&core, &devices, &cfg, &first, &events_tx, &control)?;
        timing.first_run_us = t0.elapsed().as_micros() as u64;
        // Whether a lazy restore is done (memory filled, disks started): a
        // snapshot of the restored VM waits for it.
        let restore_done = Arc::new(RestoreDone::default());
        if pager.is_none() {
            restore_done.set(true);
        }
        Ok(Vm {
            kvm: core.kvm,
            vm: core.vm,
            ram: core.ram,
            devices,
            control,
            ended,
            events,
            events_tx,
            snapshots,
            restore_done,
            pager,
            nic_macs,
            kvm_stats,
            cfg,
            timing,
        })
    }
}

/// One thread per vCPU, each with its CPUID and its first state; with
/// the boot vCPU, the console's threads (its coalesced writes need a
/// vCPU). Each vCPU's KVM counters, where the kernel has them.
fn start_vcpus(
    core: &Core,
    devices: &DeviceManager,
    cfg: &VmConfig,
    first: &First<'_>,
    events: &Sender<VmEvent>,
    control: &Arc<Control>,
) -> Result<Vec<Option<VcpuStats>>> {
    let cpuid = core
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let machine = &devices.machine;
    let mut kvm_stats = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = core
            .vm
            .create_vcpu(id as u64)
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        // An older kernel has none: the metrics go without them.
        kvm_stats.push(
            VcpuStats::of(&vcpu)
                .inspect_err(|e| debug!("vCPU {id}: {e}"))
                .ok(),
        );
        vcpu.set_cpuid2(&vcpu::cpuid_for(id, &cpuid))
            .map_err(kvm("KVM_SET_CPUID2"))?;
        if id == 0 {
            let registers = machine.coalescable_registers();
            if let Some(c) =
                CoalescedWrites::set_up(&core.kvm, &core.vm, &vcpu, &[serial::PORT], &registers)?
            {
                let _ = machine.coalesced.set(c);
            }
            start_console_threads(devices, cfg)?;
        }
        match first {
            First::Boot(entry) if id == 0 => vcpu::set_entry_registers(&vcpu, entry).map_err(
                kvm("the boot vCPU's registers (KVM_SET_SREGS, KVM_SET_REGS)"),
            )?,
            First::Boot(_) => {}
            First::Restore(state) => snapshot::vcpu::restore(&vcpu, &state.vcpus[id as usize])?,
        }
        let m = Arc::clone(machine);
        let tx = events.clone();
        let ctl = Arc::clone(control);
        let affinity = cfg.vcpu_affinity.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // Before the vCPU's filter, which has no sched_setaffinity.
                if let Some(cpus) = affinity {
                    match cpus.pin_thread(id as usize) {
                        Ok(cpu) => debug!(vcpu = id, cpu, "pinned"),
                        // Checked at start; a CPU gone since leaves the
                        // vCPU where it was.
                        Err(e) => warn!(vcpu = id, "not pinned: {e}"),
                    }
                }
                vcpu::run(id, vcpu, &m, &tx, &ctl)
            })
            .map_err(|e| BuildError::Thread("vCPU", e))?;
        control.add_thread(&t);
    }
    Ok(kvm_stats)
}

/// The console's output thread (where there is something for it to do)
/// and `--serial-input`'s.
fn start_console_threads(devices: &DeviceManager, cfg: &VmConfig) -> Result<()> {
    let machine = &devices.machine;
    let port = devices.console_port();
    if machine.coalesced.get().is_some() || port.is_some() {
        let m = Arc::clone(machine);
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::confine(&crate::seccomp::CONSOLE) {
                    error!("console thread: {e}");
                    return;
                }
                crate::console::serve_console(&m, port.as_deref())
            })
            .map_err(|e| BuildError::Thread("console", e))?;
    }
    if cfg.serial_input {
        let m = Arc::clone(machine);
        std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::confine(&crate::seccomp::SERIAL_IN) {
                    error!("serial input thread: {e}");
                    return;
                }
                crate::console::feed_serial(&m)
            })
            .map_err(|e| BuildError::Thread("serial input", e))?;
    }
    Ok(())
}
