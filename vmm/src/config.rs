//! What a VM is made of: parsed from the command line or a JSON file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    BadSize(#[from] cli_support::SizeError),
    #[error("--disk {spec:?}: {why}")]
    BadDisk { spec: String, why: String },
    #[error("--serial {0:?}: stdio, none or file=PATH")]
    BadSerial(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOut {
    Stdio,
    None,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub socket: PathBuf,
    #[serde(default = "one")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub readonly: bool,
    /// How long to wait for a backend that went away before the disk's
    /// requests fail with I/O errors.
    #[serde(default = "default_reconnect_timeout")]
    pub reconnect_timeout_ms: u64,
    /// How long any vhost-user request waits for the backend's reply; past
    /// it the backend counts as gone (reconnect, then I/O errors): no vmm
    /// thread waits on a backend without a deadline.
    #[serde(default = "default_reply_timeout")]
    pub reply_timeout_ms: u64,
    /// How long to wait at start for a backend that is not listening yet
    /// (0: fail at once). A supervisor that starts the backend and the vmm
    /// together sets it, so neither waits for the other's start-up.
    #[serde(default)]
    pub connect_timeout_ms: u64,
}

fn default_reply_timeout() -> u64 {
    // Stopping a queue waits for its in-flight I/O in the backend: seconds
    // on a slow disk at a deep queue, never tens of them.
    10_000
}

fn default_reconnect_timeout() -> u64 {
    30_000
}

fn one() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    256
}

/// A key the vmm does not know is an error, not silently ignored: a typo
/// must not boot a different VM than the one written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel to boot (none when the VM is restored from a snapshot).
    #[serde(default)]
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "one_cpu")]
    pub cpus: u8,
    /// Bytes of guest memory (in JSON: a number of bytes or "512M").
    #[serde(deserialize_with = "memory_size")]
    pub memory: u64,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    #[serde(default = "stdio")]
    pub serial: SerialOut,
    /// A virtio console (the guest's hvc0) beside the UART, written to the
    /// same output: a line in one doorbell instead of a trap per byte.
    #[serde(default = "on")]
    pub virtio_console: bool,
    /// Each thread confined to the system calls it needs (seccomp); off
    /// only to find out what a new path needs.
    #[serde(default = "on")]
    pub seccomp: bool,
    /// Start from this snapshot directory instead of booting: its vCPUs,
    /// devices and memory (the number of vCPUs and the memory size are
    /// the snapshot's), on the disks given here (in the snapshot's order).
    #[serde(default)]
    pub restore: Option<PathBuf>,
    /// How a restore fills guest memory: `lazy` (the guest runs at once,
    /// its pages filled on first touch and in the background), `on-demand`
    /// (only the pages the guest and its backends touch: clones of one
    /// snapshot take memory for what they use) or `copy` (all of it before
    /// the guest runs). A disk whose backend cannot page through the vmm
    /// (vhost-user postcopy) starts once all of memory is in.
    #[serde(default)]
    pub restore_memory: RestoreMemory,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMemory {
    #[default]
    Lazy,
    OnDemand,
    Copy,
}

fn on() -> bool {
    true
}

fn one_cpu() -> u8 {
    1
}
fn stdio() -> SerialOut {
    SerialOut::Stdio
}

fn memory_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(t) => {
            parse_size(&t).map_err(|e| serde::de::Error::custom(format!("memory: {e}")))
        }
    }
}

/// "512M", "1.5G", "1048576": as img and qemu-img read sizes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    Ok(cli_support::parse_size(s)?)
}

pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let err = |why: &str| ConfigError::BadDisk {
        spec: spec.to_string(),
        why: why.to_string(),
    };
    let mut d = DiskConfig {
        socket: PathBuf::new(),
        num_queues: 1,
        queue_size: 256,
        readonly: false,
        reconnect_timeout_ms: default_reconnect_timeout(),
        reply_timeout_ms: default_reply_timeout(),
        connect_timeout_ms: 0,
    };
    let mut socket = None;
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| err("expected key=value"))?;
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "num_queues" => d.num_queues = v.parse().map_err(|_| err("num_queues: a number"))?,
            "queue_size" => d.queue_size = v.parse().map_err(|_| err("queue_size: a number"))?,
            "reconnect_timeout_ms" => {
                d.reconnect_timeout_ms = v
                    .parse()
                    .map_err(|_| err("reconnect_timeout_ms: a number"))?
            }
            "connect_timeout_ms" => {
                d.connect_timeout_ms = v.parse().map_err(|_| err("connect_timeout_ms: a number"))?
            }
            "reply_timeout_ms" => {
                d.reply_timeout_ms = v
                    .parse()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .ok_or_else(|| err("reply_timeout_ms: a number of milliseconds above 0"))?
            }
            "readonly" => {
                d.readonly = match v {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => return Err(err("readonly takes on or off")),
                }
            }
            _ => return Err(err(&format!("unknown key {k:?}"))),
        }
    }
    d.socket = socket.ok_or_else(|| err("socket= is missing"))?;
    Ok(d)
}

pub fn parse_serial(s: &str) -> Result<SerialOut, ConfigError> {
    match s {
        "stdio" => Ok(SerialOut::Stdio),
        "none" => Ok(SerialOut::None),
        _ => s
            .strip_prefix("file=")
            .map(|p| SerialOut::File(PathBuf::from(p)))
            .ok_or_else(|| ConfigError::BadSerial(s.to_string())),
    }
}

impl VmConfig {
    /// Rejects what cannot run, with the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.cpus == 0 || self.cpus > 32 {
            return bad(format!("--cpus {}: 1 to 32", self.cpus));
        }
        if self.memory < 16 << 20 || self.memory > 64 << 30 {
            return bad(format!("--memory {} bytes: 16 MiB to 64 GiB", self.memory));
        }
        if !self.memory.is_multiple_of(4096) {
            return bad("--memory: a whole number of 4 KiB pages".into());
        }
        for d in &self.disks {
            if d.num_queues == 0 || d.num_queues > 16 {
                return bad(format!("disk {}: num_queues 1 to 16", d.socket.display()));
            }
            if !d.queue_size.is_power_of_two() || d.queue_size < 2 {
                return bad(format!(
                    "disk {}: queue_size a power of two",
                    d.socket.display()
                ));
            }
        }
        if self.disks.len() > 16 {
            return bad("at most 16 disks".into());
        }
        if self.restore.is_none() && self.kernel.as_os_str().is_empty() {
            return bad("--kernel is required (or --restore a snapshot)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_disks_and_serial_parse_or_say_why_not() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999G").is_err());
        let d = parse_disk("socket=/tmp/a.sock,num_queues=2,readonly=on").unwrap();
        assert_eq!((d.num_queues, d.readonly), (2, true));
        assert!(parse_disk("num_queues=2").is_err());
        assert!(parse_disk("socket=/a,colour=red").is_err());
        assert_eq!(
            parse_serial("file=/tmp/s").unwrap(),
            SerialOut::File("/tmp/s".into())
        );
        assert!(parse_serial("tty").is_err());
    }
}
