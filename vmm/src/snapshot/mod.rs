//! VM snapshots: what a paused VM is made of, saved into a directory and
//! read back by a new vmm process (docs/architecture.md, "Snapshots").
//!
//! A snapshot directory holds `state` (every vCPU's and device's state,
//! the interrupt controllers and the clock, and each disk's identity: a
//! versioned, checksummed file, see `state_file`) and `memory` (guest
//! memory as a sparse file, see `memory`).
//!
//! - `state_file`: the versioned, checksummed file the state lives in.
//! - `vcpu`: a vCPU's state, saved from one VM and restored into another.
//! - `memory`: guest memory as a sparse file.
//! - `pager`: lazy restore (userfaultfd): the guest runs while its memory
//!   is filled.

pub mod memory;
pub mod pager;
pub mod restore;
pub mod state_file;
pub mod take;
pub mod vcpu;

use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::devices::serial::{SerialRestoreError, SerialSnapshot};
use crate::devices::virtio_pci::{DeviceError, TransportRestoreError, TransportState};
use memory::MemoryFileError;
use state_file::StateFileError;
use vcpu::{VcpuState, VcpuStateError};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// A disk as the snapshot knows it: the shape the guest saw (a restored
/// VM's disk must have it) and its transport.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskState {
    /// The socket it was served on when the snapshot was taken (a restore
    /// names the socket of the disk it gives the VM, usually a clone).
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    pub transport: TransportState,
}

/// A NIC as the snapshot knows it: the MAC and queues the guest saw (a
/// restored VM's NIC keeps them) and its transport.
#[derive(Debug, Serialize, Deserialize)]
pub struct NicState {
    /// The net-backend socket it had (a restore names its own).
    pub socket: PathBuf,
    pub mac: [u8; 6],
    pub num_queues: u16,
    pub queue_size: u16,
    pub transport: TransportState,
}

/// Everything of a paused VM but its memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub cpus: u8,
    pub memory: u64,
    pub vcpus: Vec<VcpuState>,
    /// KVM's PIC master, PIC slave and IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub clock: kvm_clock_data,
    pub serial: SerialSnapshot,
    pub disks: Vec<DiskState>,
    /// (Snapshots from before NICs were saved have none.)
    #[serde(default)]
    pub nics: Vec<NicState>,
    /// The virtio console's transport, if the VM has one.
    pub console: Option<TransportState>,
    /// Bytes of guest memory the memory file holds data for.
    pub memory_saved: u64,
}

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error(
        "a VM with shared folders cannot be snapshotted: virtiofsd's state (the guest's open files) is not saved (remove its --fs)"
    )]
    BackendStateUnsaved,
    #[error("{}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: exists and is not empty: a snapshot goes into a new directory", .0.display())]
    NotEmpty(PathBuf),
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    #[error(transparent)]
    Vcpus(#[from] crate::control::SaveError),
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error("{call}: {source}")]
    Kvm {
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    /// `device`: "disk SOCKET" or "nic SOCKET".
    #[error("stopping {device} for the snapshot: {source}")]
    Pause { device: String, source: DeviceError },
    #[error("{device}: {source}")]
    Transport {
        device: String,
        source: TransportRestoreError,
    },
    #[error("the virtio console: {0}")]
    Console(TransportRestoreError),
    #[error(transparent)]
    Serial(#[from] SerialRestoreError),
    #[error("the snapshot's VM had {saved} disks; {given} were given (--disk, in the same order)")]
    DiskCount { saved: usize, given: usize },
    /// `device`: "disk SOCKET" or "nic SOCKET".
    #[error(
        "{device}: the snapshot's had {saved_queues} queues of {saved_size}; \
         this one is given {queues} of {size}"
    )]
    Shape {
        device: String,
        saved_queues: u16,
        saved_size: u16,
        queues: u16,
        size: u16,
    },
    #[error("the snapshot's VM had {saved} NICs; {given} were given (--net, in the same order)")]
    NicCount { saved: usize, given: usize },
    #[error(
        "nic {socket}: the snapshot's guest knows its NIC as {saved}; this one is given mac={given} \
         (leave mac= out to keep the snapshot's)"
    )]
    NicMac {
        socket: String,
        saved: String,
        given: String,
    },
    #[error("the snapshot's VM {had} a virtio console; this one {has} (--virtio-console)")]
    ConsoleMismatch {
        had: &'static str,
        has: &'static str,
    },
    #[error(transparent)]
    Pager(#[from] pager::PagerError),
    #[error("the VM is still being restored (its memory filled from its snapshot): try again")]
    StillRestoring,
    #[error("the VM's own restore failed: there is nothing consistent to save")]
    RestoreFailed,
    #[error("the snapshot holds {states} vCPU states for {cpus} vCPUs")]
    VcpuCount { states: usize, cpus: u8 },
}

/// A snapshot asked for through the control API, taken by the thread
/// that owns the VM's devices.
pub struct Request {
    pub dir: PathBuf,
    pub reply: crossbeam_channel::Sender<Result<crate::api::types::SnapshotAnswer, SnapshotError>>,
}

/// Refuses a directory that holds anything (a snapshot never overwrites
/// another), creating it if it is missing.
pub fn prepare_dir(dir: &Path) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(SnapshotError::NotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// Reads a snapshot's state, checking that it is whole and consistent
/// before anything is built from it.
pub fn read(dir: &Path) -> Result<VmState, SnapshotError> {
    let state: VmState = state_file::read(&dir.join(STATE_FILE))?;
    if state.vcpus.len() != state.cpus as usize {
        return Err(SnapshotError::VcpuCount {
            states: state.vcpus.len(),
            cpus: state.cpus,
        });
    }
    let memory = dir.join(MEMORY_FILE);
    let len = std::fs::metadata(&memory)
        .map_err(|source| SnapshotError::Dir {
            path: memory.clone(),
            source,
        })?
        .len();
    if len != state.memory {
        return Err(MemoryFileError::Size {
            path: memory,
            expected: state.memory,
            found: len,
        }
        .into());
    }
    Ok(state)
}
