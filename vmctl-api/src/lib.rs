//! vmctl's answers with `--output json`, typed: vmctl serializes these,
//! and what drives vmctl as a program (containerd-shim-vmctl-v1, scripts
//! in Rust) deserializes the same structs, so the two ends cannot drift.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `vmctl info NAME` (and each row of `vmctl list`, and what create,
/// start and set print).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmInfo {
    pub name: String,
    /// defined, starting, running, paused, exited, failed or stopped.
    pub state: String,
    /// How an exited VM ended: the guest's status, 128 + signal if it was
    /// killed.
    pub exit_status: Option<i32>,
    pub reason: Option<String>,
    /// The vmm's pid while it runs.
    pub pid: Option<u32>,
    pub cpus: u8,
    pub vcpu_affinity: Option<String>,
    pub disk_worker_cpus: Option<String>,
    pub memory: u64,
    pub image: String,
    pub disk: PathBuf,
    pub disk_bytes: u64,
    /// The disk's rate limits (operations and bytes a second) and the
    /// group whose budget it shares.
    #[serde(default)]
    pub disk_iops: Option<u64>,
    #[serde(default)]
    pub disk_bw: Option<u64>,
    #[serde(default)]
    pub disk_limit_group: Option<String>,
    pub uptime_s: Option<f64>,
    pub backend: String,
    pub backend_restarts: u32,
    /// The process serving its disk while it runs.
    pub backend_pid: Option<u32>,
    pub kernel: Option<PathBuf>,
    pub cmdline: String,
    pub queues: u16,
    pub address: Option<String>,
    pub mac: Option<String>,
    pub bridge: Option<String>,
    pub tap: Option<String>,
    pub shares: Vec<ShareInfo>,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInfo {
    pub dir: PathBuf,
    pub tag: String,
}

/// One VM of a verb on VMs by name (start, stop, kill, pause, resume,
/// restart, delete, autostart) with `--output json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerbRow {
    pub name: String,
    pub ok: bool,
    /// What the VM is now (`running`, `deleted`, ...), if it went well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Why not, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The vmm's pid, when the verb left the VM running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// One VM of `vmctl wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WaitRow {
    pub name: String,
    /// As `vmctl list` words it (`exited (3)`, `running`, ...).
    pub state: String,
    /// None while it runs (the wait timed out) or if it failed to start.
    pub exit_status: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_row_reads_back_in_kebab_case() {
        let row = WaitRow {
            name: "a".into(),
            state: "exited (3)".into(),
            exit_status: Some(3),
        };
        let text = serde_json::to_string(&row).unwrap();
        assert!(text.contains("\"exit-status\":3"), "{text}");
        assert_eq!(serde_json::from_str::<WaitRow>(&text).unwrap(), row);
    }
}
