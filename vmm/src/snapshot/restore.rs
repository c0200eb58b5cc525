//! Restoring a VM from a snapshot: the checks made before anything is
//! built, the devices put back, and the thread that finishes a lazy
//! restore (memory filled, the waiting devices started).

use std::path::Path;
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use tracing::{info, warn};

use super::pager::{Mode, Pager, Region};
use super::{SnapshotError, VmState};
use crate::config::{RestoreMemory, VmConfig};
use crate::device_manager::{lock_device, DeviceManager};
use crate::devices::virtio_pci::SharedVirtioPci;
use crate::events::VmEvent;
use crate::memory::GuestRam;

/// Refuses, before anything is built, a restore whose disks or console
/// do not match the snapshot's.
pub fn check_restorable(s: &VmState, cfg: &VmConfig) -> Result<(), SnapshotError> {
    if s.disks.len() != cfg.disks.len() {
        return Err(SnapshotError::DiskCount {
            saved: s.disks.len(),
            given: cfg.disks.len(),
        });
    }
    for (saved, given) in s.disks.iter().zip(&cfg.disks) {
        if (saved.num_queues, saved.queue_size) != (given.num_queues, given.backend.queue_size) {
            return Err(SnapshotError::Shape {
                device: format!("disk {}", given.backend.socket.display()),
                saved_queues: saved.num_queues,
                saved_size: saved.queue_size,
                queues: given.num_queues,
                size: given.backend.queue_size,
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
        let socket = given.backend.socket.display().to_string();
        if (saved.num_queues, saved.queue_size) != (given.num_queues, given.backend.queue_size) {
            return Err(SnapshotError::Shape {
                device: format!("nic {socket}"),
                saved_queues: saved.num_queues,
                saved_size: saved.queue_size,
                queues: given.num_queues,
                size: given.backend.queue_size,
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
pub fn restore_devices(
    s: &VmState,
    devices: &DeviceManager,
    paged: bool,
) -> Result<bool, SnapshotError> {
    devices
        .machine
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
    for (dev, (transport, device)) in devices
        .disks
        .iter()
        .zip(saved_disks)
        .chain(devices.nics.iter().zip(saved_nics))
    {
        let mut d = lock_device(&dev.device);
        let defer = paged
            && !d
                .backend_link()
                .is_some_and(|link| link.pages_through_pager());
        deferred |= defer && transport.activated;
        d.restore(transport, defer)
            .map_err(|source| SnapshotError::Transport { device, source })?;
    }
    if let (Some((dev, _)), Some(saved)) = (&devices.console, &s.console) {
        lock_device(dev)
            .restore(saved, false)
            .map_err(SnapshotError::Console)?;
    }
    Ok(deferred)
}

/// Whether a lazy restore has finished (`Some(true)`: memory filled and
/// disks started; `Some(false)`: it failed), for those who must wait.
#[derive(Default)]
pub struct RestoreDone {
    state: Mutex<Option<bool>>,
    changed: std::sync::Condvar,
}

impl RestoreDone {
    pub fn set(&self, ok: bool) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(ok);
        self.changed.notify_all();
    }

    /// Waits up to `limit`; whether the restore finished well.
    pub fn wait(&self, limit: std::time::Duration) -> Option<bool> {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .changed
            .wait_timeout_while(g, limit, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// Brings the snapshot's memory (in `dir`) into the guest's: copied now,
/// or a pager that brings pages in as the guest touches them (and, lazy,
/// in the background).
pub fn fill_memory(
    dir: &Path,
    ram: &GuestRam,
    memory: u64,
    how: RestoreMemory,
) -> Result<Option<Pager>, SnapshotError> {
    let file = dir.join(super::MEMORY_FILE);
    let mode = match how {
        RestoreMemory::Copy => {
            super::memory::load(&file, &ram.file, memory)?;
            return Ok(None);
        }
        RestoreMemory::Lazy => Mode::Lazy,
        RestoreMemory::OnDemand => Mode::OnDemand,
    };
    let pager = Pager::start(Region::of(ram), &file, mode, &crate::seccomp::PAGER)?;
    Ok(Some(pager))
}

/// A lazy restore's end, in a thread of its own: once every page of the
/// snapshot is in memory, the devices whose backends paged through the
/// pager stop doing so, and the others start (their backends read and
/// write memory on their own); `done` says how it went.
pub fn finish_in_background(
    pager: Pager,
    devices: Vec<SharedVirtioPci>,
    events: Sender<VmEvent>,
    done: Arc<RestoreDone>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("restore".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::confine(&crate::seccomp::VCPU) {
                let _ = events.send(VmEvent::Fault(format!("restore: {e}")));
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
                            let _ = events.send(VmEvent::Fault(format!("restore: a device: {e}")));
                            return;
                        }
                    }
                    pager.finish();
                    done.set(true);
                }
                Err(e) => {
                    done.set(false);
                    let _ = events.send(VmEvent::Fault(format!("restore: {e}")));
                }
            }
        })?;
    Ok(())
}
