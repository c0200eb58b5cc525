//! The devices of a VM: the platform's (serial console, debug exit, PCI
//! configuration, ACPI power, the i8042 reset line) on the port and MMIO
//! buses the vCPUs dispatch to, the PCI bus and its slots, and every
//! virtio device, each vhost-user one attached the same way whatever its
//! kind, with the watcher that reconnects it.

#[cfg(test)]
use crossbeam_channel::Receiver;
use crossbeam_channel::Sender;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::VmFd;
use tracing::error;
use vm_memory::GuestMemoryMmap;

use crate::coalesced::CoalescedWrites;
use crate::config::{DiskConfig, Endpoint, FsConfig, NetConfig};
use crate::control::Control;
use crate::devices::config_mirror::ConfigMirror;
use crate::devices::debug_exit::DebugExit;
use crate::devices::pci::{HostBridge, PciBus, PciConfigIo, PciEcam};
use crate::devices::power::{self, AcpiPower, I8042};
use crate::devices::serial::Console;
use crate::devices::vhost_user::{self, Kind, VhostUserDevice};
use crate::devices::virtio_console::{ConsolePort, VirtioConsole};
use crate::devices::virtio_pci::{self, SharedVirtioPci, VirtioPci, BAR_SIZE};
use crate::devices::{debug_exit, pci, serial, Bus};
use crate::events::VmEvent;
use crate::interrupts::MsiRouter;
use crate::memory::{PCI_MMIO_END, PCI_MMIO_START};
use crate::snapshot::pager::PagerHandle;

/// Why a device could not be made or attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("placing a device on a bus")]
    Bus(#[from] crate::devices::bus::Overlap),
    #[error("adding a device to the PCI bus")]
    Pci(#[from] crate::devices::pci::PciError),
    #[error("too many devices for the PCI window")]
    PciWindowFull,
    #[error("setting up the virtio-pci transport")]
    Transport(#[from] crate::devices::virtio_pci::TransportError),
    /// The backend refused or could not be reached (the error names it).
    #[error(transparent)]
    Backend(#[from] vhost_user::VhostUserError),
    #[error("{name}")]
    Device {
        name: String,
        #[source]
        source: Box<AttachError>,
    },
    #[error("the virtio console")]
    Console(#[source] std::io::Error),
    #[error("starting a device watcher")]
    Watcher(#[source] std::io::Error),
}

/// The guest's two address spaces and the devices on them.
pub struct Machine {
    pub pio: Bus,
    pub mmio: Bus,
    pub console: Arc<Mutex<Console>>,
    /// Where each virtio device's BAR is, in the order they were added.
    virtio_bars: Mutex<Vec<u64>>,
    /// Console writes KVM holds for us (set once vCPU 0 exists).
    pub coalesced: std::sync::OnceLock<CoalescedWrites>,
}

impl Machine {
    /// The platform: serial console, debug exit, PCI configuration (ports
    /// and ECAM) with its host bridge, ACPI sleep control, the i8042 reset
    /// line. Returns the PCI bus, for the devices to come.
    pub fn new(
        serial: Box<dyn Write + Send>,
        events: &Sender<VmEvent>,
        config_mirror: Option<ConfigMirror>,
    ) -> Result<(Machine, Arc<Mutex<PciBus>>), AttachError> {
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
    pub fn transmit_console(&self, port: &ConsolePort) -> usize {
        let mut console = self.console.lock().unwrap_or_else(|e| e.into_inner());
        port.transmit(&mut |bytes| console.write_bytes(bytes))
    }

    /// Writes out the console's batch.
    pub fn flush_console(&self) {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }

    /// A virtio device on the PCI bus, its BAR the next one in the PCI
    /// window.
    pub fn add_virtio_pci(
        &self,
        pci_bus: &Arc<Mutex<PciBus>>,
        device: Box<dyn crate::devices::virtio_pci::VirtioDevice>,
        vm: &Arc<VmFd>,
        router: &Arc<MsiRouter>,
    ) -> Result<SharedVirtioPci, AttachError> {
        let mut bars = self.virtio_bars.lock().unwrap_or_else(|e| e.into_inner());
        let bar = PCI_MMIO_START + bars.len() as u64 * BAR_SIZE as u64;
        if bar + BAR_SIZE as u64 > PCI_MMIO_END {
            return Err(AttachError::PciWindowFull);
        }
        let dev = Arc::new(Mutex::new(VirtioPci::new(
            device,
            bar as u32,
            vm,
            Arc::clone(router),
        )?));
        pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(dev.clone())?;
        self.mmio.insert(bar, BAR_SIZE as u64, dev.clone())?;
        bars.push(bar);
        Ok(dev)
    }

    /// The virtio devices' registers whose writes KVM may coalesce.
    pub fn coalescable_registers(&self) -> Vec<(u64, u64)> {
        let bars = self.virtio_bars.lock().unwrap_or_else(|e| e.into_inner());
        bars.iter()
            .flat_map(|&b| virtio_pci::coalescable(b))
            .collect()
    }
}

/// A transport's lock, even if a thread panicked holding it.
pub fn lock_device(d: &SharedVirtioPci) -> std::sync::MutexGuard<'_, VirtioPci> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// A vhost-user device on the PCI bus.
pub struct Attached {
    /// How lines name it: `disk /run/vm.sock`.
    pub name: String,
    pub device: SharedVirtioPci,
    /// How long its watcher waits for a backend that went away.
    pub reconnect_timeout: Duration,
}

/// Makes the VM's devices and owns them: the platform on the buses, the
/// PCI bus and its slots, the virtio devices by kind.
pub struct DeviceManager {
    /// What the vCPUs dispatch their exits to.
    pub machine: Arc<Machine>,
    pci_bus: Arc<Mutex<PciBus>>,
    vm: Arc<VmFd>,
    router: Arc<MsiRouter>,
    memory: GuestMemoryMmap,
    /// A lazy restore's pager, which a capable backend's faults go to.
    pager: Option<PagerHandle>,
    pub disks: Vec<Attached>,
    pub nics: Vec<Attached>,
    pub shares: Vec<Attached>,
    /// The virtio console and its port, if the VM has one.
    pub console: Option<(SharedVirtioPci, Arc<ConsolePort>)>,
}

impl DeviceManager {
    /// The platform's devices, on a VM with its memory and interrupt
    /// controller.
    pub fn new(
        vm: &Arc<VmFd>,
        memory: &GuestMemoryMmap,
        serial: Box<dyn Write + Send>,
        events: &Sender<VmEvent>,
        config_mirror: Option<ConfigMirror>,
        pager: Option<PagerHandle>,
    ) -> Result<DeviceManager, AttachError> {
        let (machine, pci_bus) = Machine::new(serial, events, config_mirror)?;
        Ok(DeviceManager {
            machine: Arc::new(machine),
            pci_bus,
            vm: Arc::clone(vm),
            router: Arc::new(MsiRouter::new(Arc::clone(vm))),
            memory: memory.clone(),
            pager,
            disks: Vec::new(),
            nics: Vec::new(),
            shares: Vec::new(),
            console: None,
        })
    }

    /// Any vhost-user device: its backend connected (handshake, memory
    /// table), its transport in the next PCI slot.
    pub fn attach_vhost_user(
        &self,
        kind: Kind,
        endpoint: &Endpoint,
    ) -> Result<Attached, AttachError> {
        let name = format!("{} {}", kind.noun(), endpoint.socket.display());
        let device = VhostUserDevice::connect(endpoint, kind, &self.memory, self.pager.clone())?;
        let device = self
            .machine
            .add_virtio_pci(&self.pci_bus, Box::new(device), &self.vm, &self.router)
            .map_err(|e| AttachError::Device {
                name: name.clone(),
                source: Box::new(e),
            })?;
        Ok(Attached {
            name,
            device,
            reconnect_timeout: Duration::from_millis(endpoint.reconnect_timeout_ms),
        })
    }

    pub fn attach_disks(&mut self, disks: &[DiskConfig]) -> Result<(), AttachError> {
        for d in disks {
            let kind = Kind::Block {
                readonly: d.readonly,
                queues: d.num_queues,
            };
            let disk = self.attach_vhost_user(kind, &d.backend)?;
            self.disks.push(disk);
        }
        Ok(())
    }

    /// NICs, each with the MAC its guest is to see.
    pub fn attach_nics(&mut self, nics: &[NetConfig], macs: &[[u8; 6]]) -> Result<(), AttachError> {
        for (n, mac) in nics.iter().zip(macs) {
            let kind = Kind::Net {
                mac: *mac,
                pairs: n.num_queues / 2,
            };
            let nic = self.attach_vhost_user(kind, &n.backend)?;
            self.nics.push(nic);
        }
        Ok(())
    }

    pub fn attach_shares(&mut self, shares: &[FsConfig]) -> Result<(), AttachError> {
        for f in shares {
            let kind = Kind::Fs {
                tag: f.tag.clone(),
                request_queues: f.num_queues,
            };
            let share = self.attach_vhost_user(kind, &f.backend)?;
            self.shares.push(share);
        }
        Ok(())
    }

    /// The virtio console (the guest's hvc0).
    pub fn attach_console(&mut self) -> Result<(), AttachError> {
        let port = ConsolePort::new(self.memory.clone()).map_err(AttachError::Console)?;
        let dev = self
            .machine
            .add_virtio_pci(
                &self.pci_bus,
                Box::new(VirtioConsole::new(Arc::clone(&port))),
                &self.vm,
                &self.router,
            )
            .map_err(|e| AttachError::Device {
                name: "the virtio console".into(),
                source: Box::new(e),
            })?;
        self.console = Some((dev, port));
        Ok(())
    }

    /// Every vhost-user device, disks first.
    pub fn vhost_user(&self) -> impl Iterator<Item = &Attached> {
        self.disks.iter().chain(&self.nics).chain(&self.shares)
    }

    /// The console's port, if the VM has a virtio console.
    pub fn console_port(&self) -> Option<Arc<ConsolePort>> {
        self.console.as_ref().map(|(_, p)| Arc::clone(p))
    }

    /// The PCI configuration space as restored devices left it, rendered
    /// for the guest's reads.
    pub fn render_pci(&self) {
        self.pci_bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render_all();
    }

    /// One watcher thread per vhost-user device, reconnecting it when its
    /// backend goes away (named for its kind: `disk0`, `nic0`, `fs0`).
    pub fn start_watchers(&self, control: &Arc<Control>) -> Result<(), AttachError> {
        for (list, noun) in [
            (&self.disks, "disk"),
            (&self.nics, "nic"),
            (&self.shares, "fs"),
        ] {
            for (i, a) in list.iter().enumerate() {
                let Some(link) = lock_device(&a.device).backend_link() else {
                    continue;
                };
                let ctl = Arc::clone(control);
                let give_up_after = a.reconnect_timeout;
                std::thread::Builder::new()
                    .name(format!("{noun}{i}"))
                    .spawn(move || {
                        if let Err(e) = crate::seccomp::confine(&crate::seccomp::VHOST_USER) {
                            error!("device watcher: {e}: this device will not reconnect");
                            return;
                        }
                        vhost_user::watch::watch(noun, link.as_ref(), &ctl, give_up_after)
                    })
                    .map_err(AttachError::Watcher)?;
            }
        }
        Ok(())
    }

    /// Stops the disks' queues (their backends finish what is in flight).
    pub fn shut_disks_down(&self) {
        for d in &self.disks {
            lock_device(&d.device).shutdown();
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
    use crossbeam_channel::unbounded as channel;
    use kvm_ioctls::Kvm;
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
