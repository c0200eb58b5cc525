//! The KVM VM: memory slots, the in-kernel interrupt controller, MSI
//! routes, devices on the port and MMIO buses, and one thread per vCPU
//! running KVM_RUN and dispatching its exits.

#[cfg(test)]
use crossbeam_channel::Receiver;
use crossbeam_channel::{unbounded as channel, Sender};
use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use tracing::{debug, error, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::api::types::{SnapshotAnswer, VmEnd};
use crate::api::{Api, EndWaiters};
use crate::boot;
use crate::coalesced::CoalescedWrites;
use crate::config::{SerialOut, VmConfig};
use crate::control::Control;
use crate::devices::config_mirror::ConfigMirror;
use crate::devices::debug_exit::DebugExit;
use crate::devices::pci::{HostBridge, PciBus, PciConfigIo, PciEcam};
use crate::devices::power::{self, AcpiPower, I8042};
use crate::devices::serial::Console;
use crate::devices::vhost_user::{Kind, VhostUserDevice};
use crate::devices::virtio_console::{ConsolePort, VirtioConsole};
use crate::devices::virtio_pci::{
    self, BackendLink, ReconnectError, SharedVirtioPci, VirtioPci, BAR_SIZE,
};
use crate::devices::{debug_exit, pci, serial, Bus};
pub use crate::events::VmEvent;
pub use crate::interrupts::MsiRouter;
use crate::memory::{self, PCI_MMIO_END, PCI_MMIO_START};
use crate::snapshot::{self, SnapshotError};

/// The console thread: writes out what the guest wrote that no exit did.
/// The UART's coalesced bytes have no doorbell, so they are looked for
/// every 10 ms while the guest writes, backing off to 500 ms when it does
/// not (any exit of the vCPU drains them sooner); the virtio console's
/// lines come out as it rings. An idle VM costs this thread 2 wakeups a
/// second.
fn serve_console(m: &Machine, port: Option<&ConsolePort>) -> ! {
    const FAST: std::time::Duration = std::time::Duration::from_millis(10);
    const SLOW: std::time::Duration = std::time::Duration::from_millis(500);
    let mut period = FAST;
    loop {
        let (changed, kick) = port.map_or((-1, None), |p| p.wait_fds());
        let mut fds = [changed, kick.unwrap_or(-1)].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: poll on two pollfds of this stack frame (a negative
        // descriptor is skipped). A doorbell closed meanwhile (a reset)
        // only ends this wait early: the next round asks again.
        let woken = unsafe { libc::poll(fds.as_mut_ptr(), 2, period.as_millis() as i32) } > 0;
        if let Some(p) = port {
            p.clear_doorbells();
        }
        let serial = m.coalesced.get().map_or(0, |c| c.drain(&m.pio, &m.mmio));
        let lines = port.map_or(0, |p| m.transmit_console(p));
        if serial + lines > 0 {
            m.flush_console();
            period = FAST;
        } else if !woken {
            period = (period * 2).min(SLOW);
        }
    }
}

/// `--serial-input`: standard input into the UART's receive FIFO as fast
/// as the guest reads it (what does not fit waits: looked at again after
/// 1 ms, backing off to 50 ms while the guest reads nothing), until
/// standard input ends.
fn feed_serial(m: &Machine) {
    use std::io::Read;
    let mut buf = [0u8; 256];
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        let mut wait = std::time::Duration::from_millis(1);
        while !rest.is_empty() {
            let took = m
                .console
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .feed(rest);
            rest = &rest[took..];
            if took == 0 {
                std::thread::sleep(wait);
                wait = (wait * 2).min(std::time::Duration::from_millis(50));
            } else {
                wait = std::time::Duration::from_millis(1);
            }
        }
    }
}

fn serial_out(s: &SerialOut) -> Result<Box<dyn Write + Send>> {
    Ok(match s {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::None => Box::new(std::io::sink()),
        SerialOut::File(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("--serial file={}", p.display()))?,
        ),
    })
}

/// The guest's two address spaces and the devices on them.
struct Machine {
    pio: Bus,
    mmio: Bus,
    console: Arc<Mutex<Console>>,
    /// Where each virtio device's BAR is, in the order they were added.
    virtio_bars: Mutex<Vec<u64>>,
    /// Console writes KVM holds for us (set once vCPU 0 exists).
    coalesced: std::sync::OnceLock<CoalescedWrites>,
}

impl Machine {
    /// The platform: serial console, debug exit, PCI configuration (ports
    /// and ECAM) with its host bridge, ACPI sleep control, the i8042 reset
    /// line. Returns the PCI bus, for the devices to come.
    fn new(
        serial: Box<dyn Write + Send>,
        events: &Sender<VmEvent>,
        config_mirror: Option<ConfigMirror>,
    ) -> Result<(Machine, Arc<Mutex<PciBus>>)> {
        let machine = Machine {
            pio: Bus::default(),
            mmio: Bus::default(),
            console: Arc::new(Mutex::new(Console::new(serial))),
            virtio_bars: Mutex::default(),
            coalesced: std::sync::OnceLock::new(),
        };
        machine
            .pio
            .insert(serial::PORT, serial::LEN, machine.console.clone())?;
        machine.pio.insert(
            debug_exit::PORT,
            debug_exit::LEN,
            Arc::new(Mutex::new(DebugExit::new(events.clone()))),
        )?;
        let pci_bus = Arc::new(Mutex::new(PciBus::new(config_mirror)));
        pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(Arc::new(Mutex::new(HostBridge::new())))?;
        machine.pio.insert(
            pci::CONFIG_PORT,
            pci::CONFIG_PORT_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(Arc::clone(&pci_bus)))),
        )?;
        machine.mmio.insert(
            crate::acpi::ECAM_BASE,
            crate::acpi::ECAM_LEN,
            Arc::new(Mutex::new(PciEcam::new(Arc::clone(&pci_bus)))),
        )?;
        machine.pio.insert(
            crate::acpi::SLEEP_CONTROL_PORT,
            3,
            Arc::new(Mutex::new(AcpiPower::new(events.clone()))),
        )?;
        machine.pio.insert(
            power::I8042_PORT,
            1,
            Arc::new(Mutex::new(I8042::new(events.clone()))),
        )?;
        Ok((machine, pci_bus))
    }

    /// Moves the virtio console's queued lines into the console's batch.
    fn transmit_console(&self, port: &ConsolePort) -> usize {
        let mut console = self.console.lock().unwrap_or_else(|e| e.into_inner());
        port.transmit(&mut |bytes| console.write_bytes(bytes))
    }

    /// Writes out the console's batch.
    fn flush_console(&self) {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }

    /// A virtio device on the PCI bus, its BAR the next one in the PCI
    /// window.
    fn add_virtio_pci(
        &self,
        pci_bus: &Arc<Mutex<PciBus>>,
        device: Box<dyn crate::devices::virtio_pci::VirtioDevice>,
        vm: &Arc<VmFd>,
        router: &Arc<MsiRouter>,
    ) -> Result<SharedVirtioPci> {
        let mut bars = self.virtio_bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = PCI_MMIO_START + bars.len() as u64 * BAR_SIZE as u64;
        if bar + BAR_SIZE as u64 > PCI_MMIO_END {
            bail!("too many devices for the PCI window");
        }
        let dev = Arc::new(Mutex::new(
            VirtioPci::new(device, bar as u32, vm, Arc::clone(router))
                .context("setting up the virtio-pci transport")?,
        ));
        pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(dev.clone())?;
        self.mmio.insert(bar, BAR_SIZE as u64, dev.clone())?;
        bars.push(bar);
        Ok(dev)
    }

    /// The virtio devices' registers whose writes KVM may coalesce.
    fn coalescable_registers(&self) -> Vec<(u64, u64)> {
        let bars = self.virtio_bars.lock().unwrap_or_else(|e| e.into_inner());
        bars.iter()
            .flat_map(|&b| virtio_pci::coalescable(b))
            .collect()
    }
}

/// How a VM ended, and its counters.
pub struct Outcome {
    pub event: VmEvent,
    pub console: crate::devices::serial::ConsoleCounts,
    pub metrics: Vec<crate::control::VcpuMetrics>,
    pub timing: Timing,
}

/// Where start-up time went, in microseconds from `run` being called.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timing {
    /// KVM, memory and the kernel loaded.
    pub vm_and_kernel_us: u64,
    /// Connecting to every disk backend (handshake, memory table).
    pub disk_handshake_us: u64,
    /// Until the first vCPU thread was about to enter KVM_RUN.
    pub first_run_us: u64,
}

/// Builds the VM, runs it, and returns how it ended.
pub fn run(cfg: &VmConfig) -> Result<Outcome> {
    if cfg.seccomp {
        crate::seccomp::enable().context("seccomp")?;
    }
    cfg.validate()?;
    // A snapshot is read and checked whole before anything is built: a
    // damaged one is refused by name, with no VM half started.
    let restoring = match &cfg.restore {
        Some(dir) => Some(snapshot::read(dir).context("--restore")?),
        None => None,
    };
    let mut effective = cfg.clone();
    if let Some(s) = &restoring {
        effective.cpus = s.cpus;
        effective.memory = s.memory;
        check_restorable(s, cfg)?;
    }
    let cfg = &effective;
    let t0 = std::time::Instant::now();
    let kvm = Kvm::new().context("/dev/kvm")?;
    let vm = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
    vm.set_tss_address(0xfffb_d000)
        .context("KVM_SET_TSS_ADDR")?;
    let ram = memory::create(cfg.memory)?;
    // PCI configuration space as memory the guest reads without exits
    // (where KVM has read-only slots).
    let config_mirror = if kvm.check_extension(Cap::ReadonlyMem) {
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
        unsafe { vm.set_user_memory_region(r) }.context("KVM_SET_USER_MEMORY_REGION")?;
    }
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    let mut pager = None;
    let entry = match (&restoring, &cfg.restore) {
        (Some(state), Some(dir)) => {
            // The guest's memory as it was (its tables and kernel in it):
            // copied now, or brought in as the guest touches it.
            let file = dir.join(snapshot::MEMORY_FILE);
            match cfg.restore_memory {
                crate::config::RestoreMemory::Copy => {
                    snapshot::memory::load(&file, &ram.file, cfg.memory).context("--restore")?;
                }
                crate::config::RestoreMemory::Lazy | crate::config::RestoreMemory::OnDemand => {
                    let mode = if cfg.restore_memory == crate::config::RestoreMemory::Lazy {
                        snapshot::pager::Mode::Lazy
                    } else {
                        snapshot::pager::Mode::OnDemand
                    };
                    let regions = snapshot::pager::Region::of(&ram);
                    pager = Some(
                        snapshot::pager::Pager::start(regions, &file, mode, &crate::seccomp::PAGER)
                            .map_err(SnapshotError::from)
                            .context("--restore")?,
                    );
                }
            }
            for chip in &state.irqchips {
                vm.set_irqchip(chip).context("KVM_SET_IRQCHIP")?;
            }
            None
        }
        _ => {
            let rsdp = crate::acpi::write_tables(&ram.mem, cfg.cpus)
                .map_err(|e| anyhow!("writing the ACPI tables: {e}"))?;
            Some(if boot::is_bzimage(&cfg.kernel) {
                boot::load_bzimage(&ram, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline, rsdp)?
            } else {
                let e = boot::load_pvh(&ram, &cfg.kernel, cfg.initrd.as_deref(), &cfg.cmdline)?;
                boot::set_rsdp(&ram.mem, rsdp)?;
                e
            })
        }
    };
    let mut timing = Timing {
        vm_and_kernel_us: t0.elapsed().as_micros() as u64,
        ..Default::default()
    };

    let (events_tx, events) = channel();
    let (machine, pci_bus) = Machine::new(serial_out(&cfg.serial)?, &events_tx, config_mirror)?;
    let machine = Arc::new(machine);
    let router = Arc::new(MsiRouter::new(Arc::clone(&vm)));
    let mut disks = Vec::new();
    let t_disks = std::time::Instant::now();
    for d in &cfg.disks {
        let blk = VhostUserDevice::connect(
            &d.into(),
            Kind::Block {
                readonly: d.readonly,
            },
            &ram.mem,
            pager.as_ref().map(|p| p.handle()),
        )?;
        let dev = machine
            .add_virtio_pci(&pci_bus, Box::new(blk), &vm, &router)
            .with_context(|| format!("disk {}", d.socket.display()))?;
        disks.push(dev);
    }
    timing.disk_handshake_us = t_disks.elapsed().as_micros() as u64;
    // A restored NIC keeps the MAC its guest knows (check_restorable
    // refused a different one given).
    let nic_macs = cfg
        .nets
        .iter()
        .enumerate()
        .map(
            |(i, n)| match restoring.as_ref().and_then(|s| s.nics.get(i)) {
                Some(saved) => Ok(saved.mac),
                None => n.mac_bytes(),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    let mut nics = Vec::new();
    for (n, mac) in cfg.nets.iter().zip(&nic_macs) {
        let nic = VhostUserDevice::connect(
            &n.into(),
            Kind::Net {
                mac: *mac,
                pairs: n.num_queues / 2,
            },
            &ram.mem,
            pager.as_ref().map(|p| p.handle()),
        )?;
        let dev = machine
            .add_virtio_pci(&pci_bus, Box::new(nic), &vm, &router)
            .with_context(|| format!("nic {}", n.socket.display()))?;
        nics.push(dev);
    }
    let mut shares = Vec::new();
    for f in &cfg.fs {
        let share = VhostUserDevice::connect(
            &f.into(),
            Kind::Fs {
                tag: f.tag.clone(),
                request_queues: f.num_queues,
            },
            &ram.mem,
            pager.as_ref().map(|p| p.handle()),
        )?;
        let dev = machine
            .add_virtio_pci(&pci_bus, Box::new(share), &vm, &router)
            .with_context(|| format!("fs {}", f.socket.display()))?;
        shares.push(dev);
    }
    let console_dev = if cfg.virtio_console {
        let port = ConsolePort::new(ram.mem.clone()).context("the virtio console")?;
        let dev = machine
            .add_virtio_pci(
                &pci_bus,
                Box::new(VirtioConsole::new(Arc::clone(&port))),
                &vm,
                &router,
            )
            .context("the virtio console")?;
        Some((dev, port))
    } else {
        None
    };
    let console_port = console_dev.as_ref().map(|(_, p)| Arc::clone(p));
    if let Some(state) = &restoring {
        let deferred = restore_devices(
            state,
            &machine,
            &disks,
            &nics,
            console_dev.as_ref().map(|d| &d.0),
            pager.is_some(),
        )?;
        if let (Some(pager), true) = (&pager, deferred) {
            // A disk or NIC waits for all of memory: filled in the
            // background even on demand, or it would never start.
            if pager.handle().serving() {
                info!("a disk's or NIC's backend cannot page through the vmm: it starts once all of memory is in");
            }
            pager.handle().fill_all();
        }
        pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render_all();
    }
    let (snapshots_tx, snapshots) = channel::<snapshot::Request>();
    let control =
        Arc::new(Control::new(cfg.cpus as usize).context("installing the vCPU kick signal")?);
    let ended = Arc::new(EndWaiters::default());
    if let Some(path) = &cfg.api_socket {
        Api {
            control: Arc::clone(&control),
            config: cfg.clone(),
            events: events_tx.clone(),
            ended: Arc::clone(&ended),
            snapshots: snapshots_tx.clone(),
        }
        .serve(path)
        .with_context(|| format!("--api-socket {}", path.display()))?;
    }

    // Every vhost-user device's connection watched: the disks', the NICs'.
    let reconnect_timeouts = cfg
        .disks
        .iter()
        .map(|d| d.reconnect_timeout_ms)
        .chain(cfg.nets.iter().map(|n| n.reconnect_timeout_ms))
        .chain(cfg.fs.iter().map(|f| f.reconnect_timeout_ms));
    for (i, (dev, timeout_ms)) in disks
        .iter()
        .chain(&nics)
        .chain(&shares)
        .zip(reconnect_timeouts)
        .enumerate()
    {
        let Some(link) = dev.lock().unwrap_or_else(|e| e.into_inner()).backend_link() else {
            continue;
        };
        let ctl = Arc::clone(&control);
        let give_up_after = std::time::Duration::from_millis(timeout_ms);
        let name = if i < disks.len() {
            format!("disk{i}")
        } else {
            format!("nic{}", i - disks.len())
        };
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(e) = crate::seccomp::confine(&crate::seccomp::DISK) {
                    error!("device watcher: {e}: this device will not reconnect");
                    return;
                }
                watch_disk(link.as_ref(), &ctl, give_up_after)
            })
            .context("starting a device watcher")?;
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    if let Some(state) = &restoring {
        // The guest's clock goes on from the snapshot's instant, however
        // long ago it was taken (no KVM_CLOCK_REALTIME: its monotonic time
        // must not jump by the snapshot's age; a guest that asks for the
        // wall clock again, MSR_KVM_WALL_CLOCK_NEW, gets today's). Set
        // before any vCPU runs, so none sees the host's clock first.
        let clock = kvm_bindings::kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).context("KVM_SET_CLOCK")?;
    }
    let mut threads = Vec::new();
    let mut kvm_stats = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(id as u64)
            .with_context(|| format!("creating vCPU {id}"))?;
        // An older kernel has none: the metrics go without them.
        kvm_stats.push(
            crate::kvm_stats::VcpuStats::of(&vcpu)
                .inspect_err(|e| debug!("vCPU {id}: {e}"))
                .ok(),
        );
        let mut c = cpuid.clone();
        for e in c.as_mut_slice() {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id as u32) << 24,
                0xb | 0x1f => e.edx = id as u32,
                _ => {}
            }
        }
        vcpu.set_cpuid2(&c).context("KVM_SET_CPUID2")?;
        if id == 0 {
            let registers = machine.coalescable_registers();
            if let Some(c) = CoalescedWrites::set_up(&kvm, &vm, &vcpu, &[serial::PORT], &registers)?
            {
                let _ = machine.coalesced.set(c);
            }
            if machine.coalesced.get().is_some() || console_port.is_some() {
                let m = Arc::clone(&machine);
                let port = console_port.clone();
                std::thread::Builder::new()
                    .name("console".into())
                    .spawn(move || {
                        if let Err(e) = crate::seccomp::confine(&crate::seccomp::CONSOLE) {
                            error!("console thread: {e}");
                            return;
                        }
                        serve_console(&m, port.as_deref())
                    })
                    .context("starting the console thread")?;
            }
            if cfg.serial_input {
                let m = Arc::clone(&machine);
                std::thread::Builder::new()
                    .name("serial-in".into())
                    .spawn(move || {
                        if let Err(e) = crate::seccomp::confine(&crate::seccomp::SERIAL_IN) {
                            error!("serial input thread: {e}");
                            return;
                        }
                        feed_serial(&m)
                    })
                    .context("starting the serial input thread")?;
            }
            if let Some(entry) = &entry {
                let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
                let regs = if entry.long_mode {
                    boot::long_mode_registers(entry, &mut sregs)
                } else {
                    boot::pvh_registers(entry, &mut sregs)
                };
                vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
                vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
            }
        }
        if let Some(state) = &restoring {
            snapshot::vcpu::restore(&vcpu, &state.vcpus[id as usize]).context("--restore")?;
        }
        let m = Arc::clone(&machine);
        let tx = events_tx.clone();
        let ctl = Arc::clone(&control);
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(id, vcpu, &m, &tx, &ctl))
            .context("starting a vCPU thread")?;
        control.add_thread(&t);
        threads.push(t);
    }
    // Whether a lazy restore is done (memory filled, disks started): a
    // snapshot of the restored VM waits for it.
    let restore_done = Arc::new(RestoreDone::default());
    if pager.is_none() {
        restore_done.set(true);
    }
    let pager_handle = pager.as_ref().map(|p| p.handle());
    if let Some(pager) = pager {
        // Once every page of the snapshot is in memory, the disks whose
        // backends paged through the pager stop doing so, and the others
        // start (their backends read and write memory on their own).
        let devices: Vec<SharedVirtioPci> = disks.iter().chain(&nics).map(Arc::clone).collect();
        let tx = events_tx.clone();
        let done = Arc::clone(&restore_done);
        std::thread::Builder::new()
            .name("restore".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::confine(&crate::seccomp::VCPU) {
                    let _ = tx.send(VmEvent::Fault(format!("restore: {e}")));
                    return;
                }
                match pager.wait_filled() {
                    Ok(stats) => {
                        info!(
                            faults = stats.faults,
                            backend_faults = stats.backend_faults,
                            mib = stats.bytes >> 20,
                            ms = stats.ms,
                            "guest memory filled"
                        );
                        for d in &devices {
                            // Not under the transport's lock: the backend's
                            // reply is waited for.
                            let link = lock_device(d).backend_link();
                            if let Some(Err(e)) = link.map(|l| l.end_paging()) {
                                // It reconnects (without paging) if it is gone.
                                warn!("restore: a device's POSTCOPY_END: {e}");
                            }
                            if let Err(e) = lock_device(d).start_restored() {
                                done.set(false);
                                let _ = tx.send(VmEvent::Fault(format!("restore: a device: {e}")));
                                return;
                            }
                        }
                        pager.finish();
                        done.set(true);
                    }
                    Err(e) => {
                        done.set(false);
                        let _ = tx.send(VmEvent::Fault(format!("restore: {e}")));
                    }
                }
            })
            .context("starting the restore thread")?;
    }
    timing.first_run_us = t0.elapsed().as_micros() as u64;
    info!(setup_us = timing.first_run_us, "vm started");
    // Every thread is running: from here on the main thread only waits,
    // stops and reports.
    crate::seccomp::confine(&crate::seccomp::MAIN).context("seccomp")?;
    let taker = SnapshotTaker {
        kvm: &kvm,
        restore_done: &restore_done,
        pager: pager_handle,
        machine: &machine,
        disks: &disks,
        nics: &nics,
        nic_macs: &nic_macs,
        console: console_dev.as_ref(),
        vm: &vm,
        control: &control,
        ram: &ram,
        cfg,
    };
    drop(snapshots_tx);
    let mut snapshots = snapshots;
    let event = loop {
        crossbeam_channel::select! {
            recv(events) -> ev => break ev.map_err(|_| anyhow!("every vCPU ended"))?,
            recv(snapshots) -> req => match req {
                Ok(req) => {
                    let r = taker.take(&req.dir);
                    match &r {
                        Ok(a) => info!(dir = %a.dir.display(), ms = a.ms, saved_bytes = a.memory_saved_bytes, "snapshot taken"),
                        Err(e) => warn!("snapshot into {} failed: {e}", req.dir.display()),
                    }
                    let _ = req.reply.send(r);
                }
                // No API: nothing will ask.
                Err(_) => snapshots = crossbeam_channel::never(),
            },
        }
    };
    debug!("vm ended: {event:?}");
    // The guest's last console bytes, if no exit drained them, then its
    // last lines on the virtio console (in the order it wrote them: it
    // writes the UART before it sets the virtio console up).
    if let Some(c) = machine.coalesced.get() {
        c.drain(&machine.pio, &machine.mmio);
    }
    if let Some(p) = &console_port {
        machine.transmit_console(p);
    }
    machine.flush_console();
    if event != (VmEvent::Shutdown { force: true }) {
        // The vCPUs stop, then the disks' queues (the backends finish what
        // is in flight), so nothing is left half done.
        control.pause(std::time::Duration::from_secs(2));
        for d in &disks {
            d.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }
    control.stop();
    // Said before the process ends, which waits for KVM to let go of the VM.
    ended.answer(&VmEnd {
        exit_status: event.exit_status(),
        ended: event.describe(),
        console_bytes: machine
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .written(),
    });
    let console = machine
        .console
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .counts();
    let mut metrics = control.metrics();
    for (m, stats) in metrics.iter_mut().zip(&kvm_stats) {
        if let Some(s) = stats
            .as_ref()
            .and_then(|s| s.read().inspect_err(|e| debug!("vCPU {}: {e}", m.id)).ok())
        {
            m.kvm = s.into_iter().filter(|(_, v)| *v != 0).collect();
        }
    }
    Ok(Outcome {
        event,
        console,
        metrics,
        timing,
    })
}

/// Waits for a disk's backend to go away, then reconnects to it as soon as
/// it is back (the guest's requests wait meanwhile, and the backend resumes
/// them from the inflight region). Through the device's link only: the
/// transport's lock, which the vCPUs' exits take, is never held while a
/// backend is waited for.
fn watch_disk(link: &dyn BackendLink, ctl: &Control, give_up_after: std::time::Duration) {
    // A guest whose driver keeps failing its device's start makes the
    // connection end again and again: those lines are bounded.
    let mut lines = cli_support::log_limit::LogLimit::default();
    loop {
        if ctl.state() == crate::control::RunState::Stopping {
            return;
        }
        let Some(fd) = link.connection_fd() else {
            return;
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // Until the connection ends: nothing else needs this thread (a VM
        // that stops closes or keeps its connections, and the state is
        // looked at on waking). An idle VM's watcher woke 5 times a
        // second for nothing before.
        // SAFETY: poll on one pollfd; the descriptor stays open while the
        // device holds its connection (a reconnect replaces it only here).
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n <= 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) == 0 {
            continue;
        }
        lines.emit(
            || warn!("a disk backend went away; reconnecting"),
            |n| warn!("{n} more disconnections (not logged one by one)"),
        );
        let t0 = std::time::Instant::now();
        let mut last = String::new();
        // Soon at first (a restarted backend is back in tens of ms), then
        // at most ten attempts a second for one that stays away.
        let mut pause = std::time::Duration::from_millis(10);
        loop {
            if ctl.state() == crate::control::RunState::Stopping {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
            match link.reconnect() {
                Ok(()) => {
                    let after_ms = t0.elapsed().as_millis() as u64;
                    lines.emit(
                        || info!(after_ms, "disk backend reconnected"),
                        |n| info!("{n} more reconnections (not logged one by one)"),
                    );
                    break;
                }
                Err(ReconnectError::Incompatible(why)) => {
                    // Waiting will not make it compatible: say so now.
                    error!("{why}: its requests fail from now on");
                    link.give_up();
                    return;
                }
                Err(ReconnectError::NotYet(e)) => {
                    // The same reason again is not logged again.
                    let e = e.to_string();
                    if e != last {
                        debug!("reconnect: {e}");
                        last = e;
                    }
                    if t0.elapsed() >= give_up_after {
                        warn!(
                            "a disk backend stayed away for {} ms: its requests fail from now on ({last})",
                            give_up_after.as_millis()
                        );
                        link.give_up();
                        return;
                    }
                }
            }
        }
    }
}

/// Refuses, before anything is built, a restore whose disks or console
/// do not match the snapshot's.
fn check_restorable(s: &snapshot::VmState, cfg: &VmConfig) -> Result<(), SnapshotError> {
    if s.disks.len() != cfg.disks.len() {
        return Err(SnapshotError::DiskCount {
            saved: s.disks.len(),
            given: cfg.disks.len(),
        });
    }
    for (saved, given) in s.disks.iter().zip(&cfg.disks) {
        if (saved.num_queues, saved.queue_size) != (given.num_queues, given.queue_size) {
            return Err(SnapshotError::Shape {
                device: format!("disk {}", given.socket.display()),
                saved_queues: saved.num_queues,
                saved_size: saved.queue_size,
                queues: given.num_queues,
                size: given.queue_size,
            });
        }
    }
    if s.nics.len() != cfg.nets.len() {
        return Err(SnapshotError::NicCount {
            saved: s.nics.len(),
            given: cfg.nets.len(),
        });
    }
    for (saved, given) in s.nics.iter().zip(&cfg.nets) {
        let socket = given.socket.display().to_string();
        if (saved.num_queues, saved.queue_size) != (given.num_queues, given.queue_size) {
            return Err(SnapshotError::Shape {
                device: format!("nic {socket}"),
                saved_queues: saved.num_queues,
                saved_size: saved.queue_size,
                queues: given.num_queues,
                size: given.queue_size,
            });
        }
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        if let Some(m) = &given.mac {
            if given.mac_bytes().ok() != Some(saved.mac) {
                return Err(SnapshotError::NicMac {
                    socket,
                    saved: mac(saved.mac),
                    given: m.clone(),
                });
            }
        }
    }
    if s.console.is_some() != cfg.virtio_console {
        let word = |b: bool| if b { "had" } else { "had no" };
        return Err(SnapshotError::ConsoleMismatch {
            had: word(s.console.is_some()),
            has: if cfg.virtio_console {
                "has"
            } else {
                "has none"
            },
        });
    }
    Ok(())
}

/// Puts the snapshot's devices back: the UART, each disk's transport (the
/// disk started on its new backend where the driver had started it, its
/// rings from the used index in the restored memory; during a lazy
/// restore (`paged`), a disk whose backend does not page through the
/// pager once the pager has filled memory), the console's. Whether a disk
/// waits for that.
fn restore_devices(
    s: &snapshot::VmState,
    machine: &Machine,
    disks: &[SharedVirtioPci],
    nics: &[SharedVirtioPci],
    console: Option<&SharedVirtioPci>,
    paged: bool,
) -> Result<bool, SnapshotError> {
    machine
        .console
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(&s.serial)?;
    let mut deferred = false;
    let saved_disks = s
        .disks
        .iter()
        .map(|d| (&d.transport, format!("disk {}", d.socket.display())));
    let saved_nics = s
        .nics
        .iter()
        .map(|n| (&n.transport, format!("nic {}", n.socket.display())));
    for (dev, (transport, device)) in disks
        .iter()
        .zip(saved_disks)
        .chain(nics.iter().zip(saved_nics))
    {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        let defer = paged
            && !d
                .backend_link()
                .is_some_and(|link| link.pages_through_pager());
        deferred |= defer && transport.activated;
        d.restore(transport, defer)
            .map_err(|source| SnapshotError::Transport { device, source })?;
    }
    if let (Some(dev), Some(saved)) = (console, &s.console) {
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(saved, false)
            .map_err(SnapshotError::Console)?;
    }
    Ok(deferred)
}

fn lock_device(d: &SharedVirtioPci) -> std::sync::MutexGuard<'_, VirtioPci> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a lazy restore has finished (`Some(true)`: memory filled and
/// disks started; `Some(false)`: it failed), for those who must wait.
#[derive(Default)]
struct RestoreDone {
    state: Mutex<Option<bool>>,
    changed: std::sync::Condvar,
}

impl RestoreDone {
    fn set(&self, ok: bool) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(ok);
        self.changed.notify_all();
    }

    /// Waits up to `limit`; whether the restore finished well.
    fn wait(&self, limit: std::time::Duration) -> Option<bool> {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .changed
            .wait_timeout_while(g, limit, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// What taking a snapshot needs of the running VM.
struct SnapshotTaker<'a> {
    kvm: &'a Kvm,
    restore_done: &'a RestoreDone,
    /// An on-demand restore's pager: told to fill the rest first.
    pager: Option<snapshot::pager::PagerHandle>,
    machine: &'a Machine,
    disks: &'a [SharedVirtioPci],
    nics: &'a [SharedVirtioPci],
    /// The MAC each NIC's guest knows (given, drawn at boot, or restored).
    nic_macs: &'a [[u8; 6]],
    console: Option<&'a (SharedVirtioPci, Arc<ConsolePort>)>,
    vm: &'a VmFd,
    control: &'a Control,
    ram: &'a memory::GuestRam,
    cfg: &'a VmConfig,
}

impl SnapshotTaker<'_> {
    /// Saves the paused VM into `dir`: the console drained, every disk's
    /// rings stopped (their backends finish what is in flight, so guest
    /// memory holds every completion), the vCPUs' state read by their own
    /// threads, the interrupt controllers, the clock, the devices, then
    /// memory; the disks are started again whatever happened. The VM
    /// stays paused.
    fn take(&self, dir: &std::path::Path) -> Result<SnapshotAnswer, SnapshotError> {
        let t0 = std::time::Instant::now();
        let state = self.control.state();
        if state != crate::control::RunState::Paused {
            return Err(crate::control::SaveError::NotPaused(state).into());
        }
        if !self.cfg.fs.is_empty() {
            return Err(SnapshotError::BackendStateUnsaved);
        }
        // A VM still being restored lazily has memory the snapshot would
        // miss (pages not yet filled) and disks not yet started.
        if let Some(p) = &self.pager {
            p.fill_all();
        }
        match self.restore_done.wait(std::time::Duration::from_secs(60)) {
            Some(true) => {}
            Some(false) => return Err(SnapshotError::RestoreFailed),
            None => return Err(SnapshotError::StillRestoring),
        }
        snapshot::prepare_dir(dir)?;
        let m = self.machine;
        if let Some(c) = m.coalesced.get() {
            c.drain(&m.pio, &m.mmio);
        }
        if let Some((_, port)) = self.console {
            m.transmit_console(port);
        }
        m.flush_console();
        // Disks and NICs: their rings stopped (a NIC's backend puts what
        // it has taken in the used rings), so memory holds all of it.
        let devices: Vec<(&SharedVirtioPci, String)> = self
            .disks
            .iter()
            .zip(&self.cfg.disks)
            .map(|(dev, d)| (dev, format!("disk {}", d.socket.display())))
            .chain(
                self.nics
                    .iter()
                    .zip(&self.cfg.nets)
                    .map(|(dev, n)| (dev, format!("nic {}", n.socket.display()))),
            )
            .collect();
        let mut paused = 0;
        let mut result = Ok(());
        for (dev, device) in &devices {
            if let Err(source) = lock_device(dev).pause() {
                result = Err(SnapshotError::Pause {
                    device: device.clone(),
                    source,
                });
                break;
            }
            paused += 1;
        }
        let saved = result.and_then(|()| self.save(dir));
        for (dev, device) in devices.iter().take(paused) {
            if let Err(e) = lock_device(dev).resume() {
                // Its watcher reconnects it (resume hung up).
                warn!("{device}: starting it again after the snapshot: {e}");
            }
        }
        if saved.is_err() {
            // Nothing half written is left to be mistaken for a snapshot.
            let _ = std::fs::remove_file(dir.join(snapshot::STATE_FILE));
            let _ = std::fs::remove_file(dir.join(snapshot::MEMORY_FILE));
        }
        let memory_saved = saved?;
        Ok(SnapshotAnswer {
            dir: dir.to_path_buf(),
            memory_bytes: self.cfg.memory,
            memory_saved_bytes: memory_saved,
            ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn save(&self, dir: &std::path::Path) -> Result<u64, SnapshotError> {
        use kvm_bindings::{
            kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
        };
        let kvm = |call| move |source| SnapshotError::Kvm { call, source };
        // Asked of KVM here, not at every VM's start: only a snapshot
        // needs the list.
        let msr_indices =
            snapshot::vcpu::msr_indices(self.kvm).map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let vcpus = self
            .control
            .save_vcpus(std::time::Duration::from_secs(10), &msr_indices)?;
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut chip)
                .map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let clock = self.vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        let serial = self
            .machine
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        let disks = self
            .disks
            .iter()
            .zip(&self.cfg.disks)
            .map(|(dev, d)| snapshot::DiskState {
                socket: d.socket.clone(),
                num_queues: d.num_queues,
                queue_size: d.queue_size,
                readonly: d.readonly,
                transport: dev.lock().unwrap_or_else(|e| e.into_inner()).save(),
            })
            .collect();
        let nics = self
            .nics
            .iter()
            .zip(&self.cfg.nets)
            .zip(self.nic_macs)
            .map(|((dev, n), mac)| snapshot::NicState {
                socket: n.socket.clone(),
                mac: *mac,
                num_queues: n.num_queues,
                queue_size: n.queue_size,
                transport: lock_device(dev).save(),
            })
            .collect();
        let console = self
            .console
            .map(|(dev, _)| dev.lock().unwrap_or_else(|e| e.into_inner()).save());
        let memory_saved = snapshot::memory::save(
            &self.ram.file,
            self.cfg.memory,
            &dir.join(snapshot::MEMORY_FILE),
        )?;
        let state = snapshot::VmState {
            cpus: self.cfg.cpus,
            memory: self.cfg.memory,
            vcpus,
            irqchips,
            clock,
            serial,
            disks,
            nics,
            console,
            memory_saved,
        };
        snapshot::state_file::write(&dir.join(snapshot::STATE_FILE), &state)?;
        Ok(memory_saved)
    }
}

fn dump(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             rsi={:#x} rdi={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector
        ),
        _ => "registers unreadable".into(),
    }
}

fn vcpu_loop(id: u8, mut vcpu: VcpuFd, m: &Machine, events: &Sender<VmEvent>, ctl: &Control) {
    /// Tells the control the vCPU is gone, however the loop ends.
    struct Ended<'a>(&'a Control);
    impl Drop for Ended<'_> {
        fn drop(&mut self) {
            self.0.vcpu_ended();
        }
    }
    let _ended = Ended(ctl);
    let end = |ev: VmEvent| {
        let _ = events.send(ev);
    };
    if let Err(e) = crate::seccomp::confine(&crate::seccomp::VCPU) {
        end(VmEvent::Fault(format!("vCPU {id}: {e}")));
        return;
    }
    let stats = &ctl.stats[id as usize];
    let count = |c: &std::sync::atomic::AtomicU64| {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    loop {
        let mut save = |msrs: &[u32]| crate::snapshot::vcpu::save(id, &mut vcpu, msrs);
        if !ctl.vcpu_may_run(id as usize, &mut save) {
            return;
        }
        let t0 = std::time::Instant::now();
        let exit = vcpu.run();
        stats.run_ns.fetch_add(
            t0.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        // Console bytes the guest wrote before this exit reach the device
        // before the exit is handled (its order, as without coalescing).
        if let Some(c) = m.coalesced.get() {
            if c.drain(&m.pio, &m.mmio) > 0 {
                m.flush_console();
            }
        }
        match &exit {
            Ok(VcpuExit::IoOut(..)) => count(&stats.io_out),
            Ok(VcpuExit::IoIn(..)) => count(&stats.io_in),
            Ok(VcpuExit::MmioRead(..)) => count(&stats.mmio_read),
            Ok(VcpuExit::MmioWrite(..)) => count(&stats.mmio_write),
            Err(_) => count(&stats.interrupted),
            Ok(_) => count(&stats.other),
        }
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                m.pio.write(port as u64, data);
                if (serial::PORT..serial::PORT + serial::LEN).contains(&(port as u64)) {
                    m.flush_console();
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !m.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !m.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                m.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC a halt only exits when nothing
                // can wake the vCPU.
                end(VmEvent::PowerOff);
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: triple fault; {}",
                    dump(&vcpu)
                )));
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                end(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reboot,
                    k => VmEvent::Fault(format!("vCPU {id}: system event {k}")),
                });
                return;
            }
            Ok(VcpuExit::InternalError) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: KVM internal error (an instruction KVM cannot emulate?); {}",
                    dump(&vcpu)
                )));
                return;
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: entry failed ({reason:#x}); {}",
                    dump(&vcpu)
                )));
                return;
            }
            Ok(other) => {
                let what = format!("{other:?}");
                end(VmEvent::Fault(format!(
                    "vCPU {id}: unexpected exit {what}; {}",
                    dump(&vcpu)
                )));
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: KVM_RUN: {e}; {}",
                    dump(&vcpu)
                )));
                return;
            }
        }
    }
}

/// The guest is the vmm's hostile peer: random port and MMIO accesses over
/// every device a guest can reach must never panic or hang the vmm, and
/// the devices answer sensibly afterwards.
#[cfg(test)]
mod guest_accesses {
    use super::*;
    use crate::devices::virtio_pci::{Interrupts, QueueConfig, VirtioDevice};
    use proptest::prelude::*;
    use vmm_sys_util::eventfd::EventFd;

    /// A virtio device that accepts whatever the driver does.
    struct Accepting;

    impl VirtioDevice for Accepting {
        fn device_id(&self) -> u16 {
            2
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn num_queues(&self) -> u16 {
            2
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _features: u64,
            _queues: &[QueueConfig],
            _kicks: &[EventFd],
            _interrupts: &dyn Interrupts,
        ) -> Result<(), crate::devices::virtio_pci::DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }

    /// The first virtio device's BAR.
    const BAR: u64 = PCI_MMIO_START;

    /// The platform, its virtio function, the VM's events and the PCI bus.
    type TestMachine = (
        Machine,
        SharedVirtioPci,
        Receiver<VmEvent>,
        Arc<Mutex<PciBus>>,
    );

    /// A VM with the platform devices and one virtio-pci function at
    /// slot 1; None (and a loud line) without KVM.
    fn machine() -> Option<TestMachine> {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIPPED: no /dev/kvm: the device models need a KVM VM (ioeventfds, irqfds)");
            return None;
        };
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let (tx, rx) = channel();
        let mirror = ConfigMirror::new().expect("configuration mirror");
        let (machine, pci_bus) =
            Machine::new(Box::new(std::io::sink()), &tx, Some(mirror)).expect("platform");
        let router = Arc::new(MsiRouter::new(Arc::clone(&vm)));
        let dev = machine
            .add_virtio_pci(&pci_bus, Box::new(Accepting), &vm, &router)
            .expect("virtio-pci");
        Some((machine, dev, rx, pci_bus))
    }

    #[derive(Debug, Clone)]
    struct Access {
        mmio: bool,
        addr: u64,
        len: usize,
        value: u64,
        write: bool,
    }

    fn access() -> impl Strategy<Value = Access> {
        let port = prop_oneof![
            0xcf8u64..0xd00,
            0x3f8u64..0x400,
            0xf0u64..0xf8,
            0x600u64..0x604,
            0x60u64..0x68,
            any::<u16>().prop_map(u64::from),
        ];
        let mmio = prop_oneof![
            // Common config, ISR, device config, notify, MSI-X table, PBA.
            BAR..BAR + 0x40,
            BAR + 0x1000..BAR + 0x1004,
            BAR + 0x2000..BAR + 0x2100,
            BAR + 0x3000..BAR + 0x3010,
            BAR + 0x4000..BAR + 0x4040,
            BAR + 0x6000..BAR + 0x6010,
            BAR..BAR + BAR_SIZE as u64,
            crate::acpi::ECAM_BASE..crate::acpi::ECAM_BASE + crate::acpi::ECAM_LEN,
            // The two functions' headers and capabilities.
            crate::acpi::ECAM_BASE..crate::acpi::ECAM_BASE + 0x100,
            crate::acpi::ECAM_BASE + (1 << 15)..crate::acpi::ECAM_BASE + (1 << 15) + 0x100,
            any::<u64>(),
        ];
        let len = prop_oneof![Just(1usize), Just(2), Just(4), Just(8)];
        (any::<bool>(), port, mmio, len, any::<u64>(), any::<bool>()).prop_map(
            |(is_mmio, port, mmio, len, value, write)| Access {
                mmio: is_mmio,
                addr: if is_mmio { mmio } else { port },
                len,
                value,
                write,
            },
        )
    }

    fn run(m: &Machine, a: &Access) {
        let bus = if a.mmio { &m.mmio } else { &m.pio };
        if a.write {
            bus.write(a.addr, &a.value.to_le_bytes()[..a.len]);
        } else {
            let mut d = [0u8; 8];
            bus.read(a.addr, &mut d[..a.len]);
        }
    }

    fn config_dword(m: &Machine, dev: u64, reg: u64) -> u32 {
        let mut v = [0u8; 4];
        m.mmio
            .read(crate::acpi::ECAM_BASE + (dev << 15) + 4 * reg, &mut v);
        u32::from_le_bytes(v)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_accesses_never_panic_and_the_devices_still_answer(
            accesses in proptest::collection::vec(access(), 1..1500)
        ) {
            let Some((m, _dev, _events, bus)) = machine() else {
                return Ok(());
            };
            for a in &accesses {
                run(&m, a);
            }
            // What the guest reads from memory is what an exit would
            // answer, for every function and register (the extended space
            // sampled).
            for function in 0..256u64 {
                for off in (0..256u64).step_by(4).chain([0x100, 0x800, 0xffc]) {
                    let at = (function << 12) + off;
                    let mut v = [0u8; 4];
                    m.mmio.read(crate::acpi::ECAM_BASE + at, &mut v);
                    let seen = bus
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .mirror()
                        .expect("a mirror")
                        .guest_read(at as usize);
                    prop_assert_eq!(
                        seen,
                        u32::from_le_bytes(v),
                        "function {:#x} offset {:#x}", function, off
                    );
                }
            }
            // The host bridge and the virtio function are where they were,
            // and the BAR did not move.
            prop_assert_eq!(config_dword(&m, 0, 0), 0x0d57_8086);
            prop_assert_eq!(config_dword(&m, 1, 0), 0x1042_1af4);
            prop_assert_eq!(config_dword(&m, 1, 4) & !0xf, BAR as u32);
        }
    }

    /// What a driver programmed into a transport (any sequence of
    /// accesses) is what a fresh transport restored from its saved state
    /// answers: configuration space (through ECAM and the mirror), the
    /// common configuration of every queue, the MSI-X table.
    #[test]
    fn a_restored_transport_answers_as_the_saved_one_did() {
        let Some((m, dev, _events, _bus)) = machine() else {
            return;
        };
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        for _ in 0..16 {
            let accesses = proptest::collection::vec(access(), 1..800)
                .new_tree(&mut runner)
                .expect("accesses")
                .current();
            for a in &accesses {
                run(&m, a);
            }
            let saved = dev.lock().unwrap_or_else(|e| e.into_inner()).save();
            // Through the state file's form.
            let saved: crate::devices::virtio_pci::TransportState =
                serde_json::from_slice(&serde_json::to_vec(&saved).expect("json")).expect("parse");
            let (m2, dev2, _events2, bus2) = machine().expect("a second VM");
            dev2.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(&saved, false)
                .expect("restore");
            bus2.lock().unwrap_or_else(|e| e.into_inner()).render_all();
            let read = |m: &Machine, addr: u64, len: usize| {
                let mut v = [0u8; 8];
                m.mmio.read(addr, &mut v[..len]);
                u64::from_le_bytes(v)
            };
            for reg in 0..64 {
                assert_eq!(
                    config_dword(&m, 1, reg),
                    config_dword(&m2, 1, reg),
                    "config {reg}"
                );
            }
            for q in 0..2u16 {
                for m_ in [&m, &m2] {
                    m_.mmio.write(BAR + 0x16, &q.to_le_bytes());
                }
                for off in (0..0x38).step_by(2) {
                    assert_eq!(
                        read(&m, BAR + off, 2),
                        read(&m2, BAR + off, 2),
                        "queue {q} +{off:#x}"
                    );
                }
            }
            for off in (0..3 * 16).step_by(4) {
                assert_eq!(
                    read(&m, BAR + 0x4000 + off, 4),
                    read(&m2, BAR + 0x4000 + off, 4),
                    "MSI-X +{off}"
                );
            }
        }
    }

    /// A masked MSI-X vector keeps what arrives as its pending bit (PBA),
    /// and unmasking hands it to KVM (the irqfd is attached again).
    #[test]
    fn a_masked_vector_sets_its_pending_bit_and_unmasking_clears_it() {
        let Some((m, dev, _events, _bus)) = machine() else {
            return;
        };
        // MSI-X on: message control (the capability's upper half) bit 15.
        let cap = {
            let mut at = config_dword(&m, 1, 13) as u64 & 0xfc;
            while config_dword(&m, 1, at / 4) & 0xff != 0x11 {
                at = (config_dword(&m, 1, at / 4) >> 8) as u64 & 0xfc;
            }
            at
        };
        m.mmio.write(
            crate::acpi::ECAM_BASE + (1 << 15) + cap + 2,
            &0x8000u16.to_le_bytes(),
        );
        let entry = BAR + 0x4000;
        let pba = |m: &Machine| {
            let mut v = [0u8; 8];
            m.mmio.read(BAR + 0x6000, &mut v);
            u64::from_le_bytes(v)
        };
        m.mmio.write(entry, &0xfee0_0000u32.to_le_bytes());
        m.mmio.write(entry + 8, &0x31u32.to_le_bytes());
        m.mmio.write(entry + 12, &0u32.to_le_bytes()); // unmasked
        assert_eq!(pba(&m), 0);
        m.mmio.write(entry + 12, &1u32.to_le_bytes()); // masked
        assert_eq!(pba(&m), 0, "nothing arrived yet");
        let notifier = {
            let d = dev.lock().unwrap_or_else(|e| e.into_inner());
            d.notifier_for_tests(0).try_clone().expect("eventfd")
        };
        notifier.write(1).expect("interrupt");
        assert_eq!(pba(&m), 1, "the interrupt is pending while masked");
        m.mmio.write(entry + 12, &0u32.to_le_bytes()); // unmasked
        assert_eq!(pba(&m), 0, "unmasked: handed to KVM");
    }
}
