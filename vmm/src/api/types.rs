//! The control API's requests and answers: one definition, used by the
//! vmm that answers and by every client (`vmm api`, vmctl).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::DiskConfig;
pub use crate::control::{RunState, VcpuMetrics};

/// `GET vm.info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: RunState,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub kernel: PathBuf,
    pub disks: Vec<DiskConfig>,
    pub uptime_ms: u64,
}

/// The answer of `vm.pause` and `vm.resume`: the state now.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StateAnswer {
    pub state: RunState,
}

/// `GET vm.metrics`.
#[derive(Debug, Serialize)]
pub struct Metrics {
    pub vcpus: Vec<VcpuMetrics>,
}

/// `PUT vm.shutdown`'s body (none, or `{}`: an orderly end).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// At once, without stopping the vCPUs and disks first.
    #[serde(default)]
    pub force: bool,
}

/// `vm.shutdown`'s answer, sent before the VM is told.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ShutdownAnswer {
    pub state: RunState,
    pub force: bool,
}

/// `PUT vm.snapshot`'s body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where the snapshot goes: an absolute path.
    pub dir: PathBuf,
}

/// A snapshot taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotAnswer {
    pub dir: PathBuf,
    pub memory_bytes: u64,
    /// What the memory file holds (its holes not counted).
    pub memory_saved_bytes: u64,
    pub ms: f64,
}

/// `GET vm.wait`'s answer once the VM has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEnd {
    /// The vmm's exit status to come.
    pub exit_status: i32,
    /// How it ended, in words.
    pub ended: String,
    /// Console bytes written in all: a reader of the vmm's output has
    /// the whole console once it has read this many.
    pub console_bytes: u64,
}

/// Every refusal's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
