//! A VM's control API (its vmm's socket), asked in the vmm's own typed
//! requests and answers (`vmm::api::types`).

use std::path::Path;

use anyhow::{Context, Result};
use vmm::api::client::Client;
use vmm::api::types::{ShutdownRequest, SnapshotAnswer, SnapshotRequest};

use crate::state::VmDir;

fn client(vm: &VmDir) -> Client {
    Client::new(vm.api_socket())
}

fn context(vm: &VmDir, what: &str) -> String {
    format!("VM {}: {what} through its control API", vm.name)
}

/// Whether the VM is paused now.
pub fn paused(vm: &VmDir) -> Result<bool> {
    client(vm)
        .paused()
        .with_context(|| context(vm, "asking its state"))
}

pub fn pause(vm: &VmDir) -> Result<()> {
    client(vm)
        .pause()
        .with_context(|| context(vm, "pausing it"))?;
    Ok(())
}

pub fn resume(vm: &VmDir) -> Result<()> {
    client(vm)
        .resume()
        .with_context(|| context(vm, "resuming it"))?;
    Ok(())
}

/// Asks for an orderly end (the vCPUs and disks stopped first).
pub fn shutdown(vm: &VmDir) -> Result<()> {
    client(vm)
        .shutdown(ShutdownRequest { force: false })
        .with_context(|| context(vm, "shutting it down"))?;
    Ok(())
}

/// The paused VM's snapshot into `dir`.
pub fn snapshot(vm: &VmDir, dir: &Path) -> Result<SnapshotAnswer> {
    client(vm)
        .snapshot(&SnapshotRequest {
            dir: dir.to_path_buf(),
        })
        .with_context(|| context(vm, &format!("a snapshot into {}", dir.display())))
}
