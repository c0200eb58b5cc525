//! A VM's life: built (by [`crate::builder`]), run until it ends, asked
//! for snapshots meanwhile, stopped in order, and reported.

use tracing::{debug, info, warn};

use crate::api::types::VmEnd;
pub use crate::builder::Timing;
use crate::builder::{self, Vm};
use crate::config::VmConfig;
pub use crate::events::VmEvent;
pub use crate::interrupts::MsiRouter;
use crate::snapshot::{self, take::SnapshotTaker, SnapshotError};

/// Why a VM did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("seccomp")]
    Seccomp(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("--restore")]
    Restore(#[from] SnapshotError),
    #[error(transparent)]
    Build(#[from] builder::BuildError),
    #[error("every vCPU ended without a word")]
    NoVcpus,
}

/// How a VM ended, and its counters.
pub struct Outcome {
    pub event: VmEvent,
    pub console: crate::devices::serial::ConsoleCounts,
    pub metrics: Vec<crate::control::VcpuMetrics>,
    pub timing: Timing,
}

/// Builds the VM (booted, or restored from `--restore`), runs it, and
/// returns how it ended.
pub fn run(cfg: &VmConfig) -> Result<Outcome, RunError> {
    if cfg.seccomp {
        crate::seccomp::enable()?;
    }
    cfg.validate()?;
    let vm = match &cfg.restore {
        Some(dir) => {
            // A snapshot is read and checked whole before anything is
            // built: a damaged one is refused by name, with no VM half
            // started.
            let state = snapshot::read(dir)?;
            snapshot::restore::check_restorable(&state, cfg)?;
            builder::build_from_snapshot(cfg, dir, &state)?
        }
        None => builder::build_for_boot(cfg)?,
    };
    info!(setup_us = vm.timing.first_run_us, "vm started");
    // Every thread is running: from here on the main thread only waits,
    // stops and reports.
    crate::seccomp::confine(&crate::seccomp::MAIN)?;
    let event = wait_for_end(&vm)?;
    debug!("vm ended: {event:?}");
    Ok(stop(vm, event))
}

/// Serves snapshot requests until the VM ends; how it ended.
fn wait_for_end(vm: &Vm) -> Result<VmEvent, RunError> {
    let taker = SnapshotTaker {
        kvm: &vm.kvm,
        restore_done: &vm.restore_done,
        pager: vm.pager.clone(),
        devices: &vm.devices,
        nic_macs: &vm.nic_macs,
        vm: &vm.vm,
        control: &vm.control,
        ram: &vm.ram,
        cfg: &vm.cfg,
    };
    let mut snapshots = vm.snapshots.clone();
    loop {
        crossbeam_channel::select! {
            recv(vm.events) -> ev => return ev.map_err(|_| RunError::NoVcpus),
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
    }
}

/// The VM stopped in order after `event`: the console's last bytes out,
/// the vCPUs and disks stopped (unless forced), the end told to whoever
/// waits for it; its counters.
fn stop(vm: Vm, event: VmEvent) -> Outcome {
    let machine = &vm.devices.machine;
    // The guest's last console bytes, if no exit drained them, then its
    // last lines on the virtio console (in the order it wrote them: it
    // writes the UART before it sets the virtio console up).
    if let Some(c) = machine.coalesced.get() {
        c.drain(&machine.pio, &machine.mmio);
    }
    if let Some(p) = vm.devices.console_port() {
        machine.transmit_console(&p);
    }
    machine.flush_console();
    if event != (VmEvent::Shutdown { force: true }) {
        // The vCPUs stop, then the disks' queues (the backends finish what
        // is in flight), so nothing is left half done.
        vm.control.pause(std::time::Duration::from_secs(2));
        vm.devices.shut_disks_down();
    }
    vm.control.stop();
    let (console_bytes, counts) = {
        let console = machine.console.lock().unwrap_or_else(|e| e.into_inner());
        (console.written(), console.counts())
    };
    // Said before the process ends, which waits for KVM to let go of the VM.
    vm.ended.answer(&VmEnd {
        exit_status: event.exit_status(),
        ended: event.describe(),
        console_bytes,
    });
    let mut metrics = vm.control.metrics();
    for (m, stats) in metrics.iter_mut().zip(&vm.kvm_stats) {
        if let Some(s) = stats
            .as_ref()
            .and_then(|s| s.read().inspect_err(|e| debug!("vCPU {}: {e}", m.id)).ok())
        {
            m.kvm = s.into_iter().filter(|(_, v)| *v != 0).collect();
        }
    }
    Outcome {
        event,
        console: counts,
        metrics,
        timing: vm.timing,
    }
}
