//! Taking a running VM's snapshot: its devices quiesced, the state of its
//! vCPUs, interrupt controllers, clock and devices, then its memory.

use kvm_ioctls::{Kvm, VmFd};
use tracing::warn;

use super::restore::RestoreDone;
use super::SnapshotError;
use crate::api::types::SnapshotAnswer;
use crate::config::VmConfig;
use crate::control::Control;
use crate::device_manager::{lock_device, DeviceManager};
use crate::devices::virtio_pci::SharedVirtioPci;
use crate::memory;
use crate::snapshot;

/// What taking a snapshot needs of the running VM.
pub struct SnapshotTaker<'a> {
    pub kvm: &'a Kvm,
    pub restore_done: &'a RestoreDone,
    /// An on-demand restore's pager: told to fill the rest first.
    pub pager: Option<snapshot::pager::PagerHandle>,
    pub devices: &'a DeviceManager,
    /// The MAC each NIC's guest knows (given, drawn at boot, or restored).
    pub nic_macs: &'a [[u8; 6]],
    pub vm: &'a VmFd,
    pub control: &'a Control,
    pub ram: &'a memory::GuestRam,
    pub cfg: &'a VmConfig,
}

impl SnapshotTaker<'_> {
    /// Saves the paused VM into `dir`: the console drained, every disk's
    /// rings stopped (their backends finish what is in flight, so guest
    /// memory holds every completion), the vCPUs' state read by their own
    /// threads, the interrupt controllers, the clock, the devices, then
    /// memory; the disks are started again whatever happened. The VM
    /// stays paused.
    pub fn take(&self, dir: &std::path::Path) -> Result<SnapshotAnswer, SnapshotError> {
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
        let m = &self.devices.machine;
        if let Some(c) = m.coalesced.get() {
            c.drain(&m.pio, &m.mmio);
        }
        if let Some(port) = self.devices.console_port() {
            m.transmit_console(&port);
        }
        m.flush_console();
        // Disks and NICs: their rings stopped (a NIC's backend puts what
        // it has taken in the used rings), so memory holds all of it.
        let devices: Vec<(&SharedVirtioPci, &str)> = self
            .devices
            .disks
            .iter()
            .chain(&self.devices.nics)
            .map(|a| (&a.device, a.name.as_str()))
            .collect();
        let mut paused = 0;
        let mut result = Ok(());
        for (dev, device) in &devices {
            if let Err(source) = lock_device(dev).pause() {
                result = Err(SnapshotError::Pause {
                    device: device.to_string(),
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
            .devices
            .machine
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        let disks = self
            .devices
            .disks
            .iter()
            .zip(&self.cfg.disks)
            .map(|(dev, d)| snapshot::DiskState {
                socket: d.backend.socket.clone(),
                num_queues: d.num_queues,
                queue_size: d.backend.queue_size,
                readonly: d.readonly,
                transport: lock_device(&dev.device).save(),
            })
            .collect();
        let nics = self
            .devices
            .nics
            .iter()
            .zip(&self.cfg.nets)
            .zip(self.nic_macs)
            .map(|((dev, n), mac)| snapshot::NicState {
                socket: n.backend.socket.clone(),
                mac: *mac,
                num_queues: n.num_queues,
                queue_size: n.backend.queue_size,
                transport: lock_device(&dev.device).save(),
            })
            .collect();
        let console = self
            .devices
            .console
            .as_ref()
            .map(|(dev, _)| lock_device(dev).save());
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
