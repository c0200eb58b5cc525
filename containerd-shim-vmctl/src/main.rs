//! containerd-shim-vmctl-v1: containerd's runtime `io.containerd.vmctl.v1`.
//! containerd runs it per task (`start` forks the daemon that serves the
//! task API on a socket, `delete` cleans after a daemon that died); the
//! task is a VM that vmctl makes and runs (`task`), from the VM image
//! containerd pulled and unpacked (`spec`).

mod console;
mod events;
mod shim;
mod spec;
mod stats;
mod task;
mod vmctl;

/// What the shim cannot do for a task, said to containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The task's bundle or rootfs is not what a VM is made from.
    #[error("{0}")]
    Bundle(String),
    /// vmctl refused or failed (its own message).
    #[error("{0}")]
    Vmctl(String),
}

fn main() {
    let config = containerd_shim::Config {
        // vmctl runs as child processes the shim waits for itself: no
        // reaper thread may take their exits, and VMs started by vmctl
        // are vmctl's, not the shim's, to reap.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<shim::VmShim>(shim::RUNTIME_ID, Some(config));
}
