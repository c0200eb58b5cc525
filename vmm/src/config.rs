//! What a VM is made of: parsed from the command line or a JSON file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    BadSize(#[from] cli_support::SizeError),
    #[error("--disk {spec:?}: {why}")]
    BadDisk { spec: String, why: SpecError },
    #[error("--net {spec:?}: {why}")]
    BadNet { spec: String, why: SpecError },
    #[error("--fs {spec:?}: {why}")]
    BadFs { spec: String, why: SpecError },
    #[error("--serial {0:?}: stdio, none or file=PATH")]
    BadSerial(String),
    #[error("{0}")]
    Invalid(String),
}

/// What is wrong with a device's `key=value,...` spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("expected key=value")]
    NotKeyValue,
    #[error("{0}: a number")]
    NotNumber(String),
    #[error("{0}: at most {max}", max = u16::MAX)]
    TooLarge(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("{0}= is missing")]
    Missing(&'static str),
    #[error("readonly takes on or off")]
    OnOff,
    #[error("mac: six hex bytes such as 52:54:00:12:34:56, unicast")]
    Mac,
    /// The endpoint's own check.
    #[error("{0}")]
    Endpoint(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOut {
    Stdio,
    None,
    File(PathBuf),
}

/// Where a vhost-user device's backend listens and how patiently it is
/// dealt with: the settings every vhost-user device has (Cloud
/// Hypervisor's `VhostUserConfig`), embedded in each device's config (in
/// JSON and on the command line its keys sit beside the device's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub socket: PathBuf,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// How long to wait for a backend that went away before the device's
    /// requests fail.
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

impl Endpoint {
    fn new(socket: PathBuf) -> Endpoint {
        Endpoint {
            socket,
            queue_size: default_queue_size(),
            reconnect_timeout_ms: default_reconnect_timeout(),
            reply_timeout_ms: default_reply_timeout(),
            connect_timeout_ms: 0,
        }
    }

    /// What is wrong with it, if anything.
    fn problem(&self) -> Option<String> {
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Some(format!("queue_size {}: a power of two", self.queue_size));
        }
        if self.reply_timeout_ms == 0 {
            return Some("reply_timeout_ms: a number of milliseconds above 0".into());
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    #[serde(flatten)]
    pub backend: Endpoint,
    #[serde(default = "one")]
    pub num_queues: u16,
    #[serde(default)]
    pub readonly: bool,
}

/// A NIC whose frames a vhost-user-net backend moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(flatten)]
    pub backend: Endpoint,
    /// The MAC the guest sees (`52:54:00:..`): a random locally
    /// administered one when not given.
    #[serde(default)]
    pub mac: Option<String>,
    /// Receive and transmit queues: two per queue pair.
    #[serde(default = "two")]
    pub num_queues: u16,
}

/// A shared folder: a virtio-fs device whose FUSE requests a
/// vhost-user-fs backend (virtiofsd) serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    #[serde(flatten)]
    pub backend: Endpoint,
    /// The name the guest mounts it by (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// Request queues (the high-priority queue comes on top).
    #[serde(default = "one")]
    pub num_queues: u16,
}

impl NetConfig {
    /// The MAC as bytes: the given one, or a random locally administered
    /// unicast one.
    pub fn mac_bytes(&self) -> Result<[u8; 6], ConfigError> {
        match &self.mac {
            Some(m) => parse_mac(m).ok_or_else(|| ConfigError::BadNet {
                spec: m.clone(),
                why: SpecError::Mac,
            }),
            None => {
                let mut b = [0u8; 6];
                // SAFETY: getrandom into a 6-byte buffer of ours.
                let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 6, 0) };
                if n != 6 {
                    // Never on Linux for 6 bytes; the pid keeps VMs apart.
                    b = [0, 0, 0, 0, 0, 0];
                    b[2..6].copy_from_slice(&std::process::id().to_le_bytes());
                }
                // Locally administered (bit 1), unicast (bit 0 clear).
                b[0] = (b[0] | 0x02) & !0x01;
                Ok(b)
            }
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`, a unicast address.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut b = [0u8; 6];
    for (o, p) in b.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    (b[0] & 1 == 0).then_some(b)
}

fn two() -> u16 {
    2
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
    /// vCPU `k`'s host CPU is the list's `k`-th, in turn (in JSON a
    /// string: `"0-1"`); none: wherever the kernel runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_affinity: Option<cpu_affinity::CpuList>,
    /// Bytes of guest memory (in JSON: a number of bytes or "512M").
    #[serde(deserialize_with = "memory_size")]
    pub memory: u64,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    #[serde(default = "stdio")]
    pub serial: SerialOut,
    /// A virtio console (the guest's hvc0) beside the UART, written to the
    /// same output: a line in one doorbell instead of a trap per byte.
    #[serde(default = "on")]
    pub virtio_console: bool,
    /// Standard input feeds the serial port's receive FIFO.
    #[serde(default)]
    pub serial_input: bool,
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

/// A device's `key=value,...` spec: the [`Endpoint`]'s keys and
/// `num_queues` (`queues` when not given) taken here, the device's own
/// keys given to `own`. The one parser of every vhost-user device's spec.
fn parse_spec(
    spec: &str,
    queues: u16,
    mut own: impl FnMut(&str, &str) -> Result<(), SpecError>,
) -> Result<(Endpoint, u16), SpecError> {
    let mut backend = Endpoint::new(PathBuf::new());
    let mut socket = None;
    let mut num_queues = queues;
    for kv in spec.split(',') {
        let (k, v) = kv.split_once('=').ok_or(SpecError::NotKeyValue)?;
        let number = |what: &str| -> Result<u64, SpecError> {
            v.parse().map_err(|_| SpecError::NotNumber(what.into()))
        };
        // Not `as u16`: 65537 queues would wrap to 1 and pass.
        let small = |what: &str| -> Result<u16, SpecError> {
            u16::try_from(number(what)?).map_err(|_| SpecError::TooLarge(what.into()))
        };
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "num_queues" => num_queues = small(k)?,
            "queue_size" => backend.queue_size = small(k)?,
            "reconnect_timeout_ms" => backend.reconnect_timeout_ms = number(k)?,
            "connect_timeout_ms" => backend.connect_timeout_ms = number(k)?,
            "reply_timeout_ms" => backend.reply_timeout_ms = number(k)?,
            _ => own(k, v)?,
        }
    }
    backend.socket = socket.ok_or(SpecError::Missing("socket"))?;
    if let Some(why) = backend.problem() {
        return Err(SpecError::Endpoint(why));
    }
    Ok((backend, num_queues))
}

pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let mut readonly = false;
    let (backend, num_queues) = parse_spec(spec, 1, |k, v| {
        readonly = match (k, v) {
            ("readonly", "on" | "true" | "1") => true,
            ("readonly", "off" | "false" | "0") => false,
            ("readonly", _) => return Err(SpecError::OnOff),
            _ => return Err(SpecError::UnknownKey(k.into())),
        };
        Ok(())
    })
    .map_err(|why| ConfigError::BadDisk {
        spec: spec.to_string(),
        why,
    })?;
    Ok(DiskConfig {
        backend,
        num_queues,
        readonly,
    })
}

pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let mut mac = None;
    let (backend, num_queues) = parse_spec(spec, 2, |k, v| match k {
        "mac" => {
            parse_mac(v).ok_or(SpecError::Mac)?;
            mac = Some(v.to_string());
            Ok(())
        }
        _ => Err(SpecError::UnknownKey(k.into())),
    })
    .map_err(|why| ConfigError::BadNet {
        spec: spec.to_string(),
        why,
    })?;
    Ok(NetConfig {
        backend,
        mac,
        num_queues,
    })
}

pub fn parse_fs(spec: &str) -> Result<FsConfig, ConfigError> {
    let mut tag = None;
    let bad = |why| ConfigError::BadFs {
        spec: spec.to_string(),
        why,
    };
    let (backend, num_queues) = parse_spec(spec, 1, |k, v| match k {
        "tag" => {
            tag = Some(v.to_string());
            Ok(())
        }
        _ => Err(SpecError::UnknownKey(k.into())),
    })
    .map_err(bad)?;
    Ok(FsConfig {
        backend,
        tag: tag.ok_or_else(|| bad(SpecError::Missing("tag")))?,
        num_queues,
    })
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

/// The most vCPUs a VM has.
pub const MAX_CPUS: u8 = 32;
/// Guest memory's bounds (a whole number of 4 KiB pages between).
pub const MIN_MEMORY: u64 = 16 << 20;
pub const MAX_MEMORY: u64 = 64 << 30;
/// The most queues a disk has.
pub const MAX_DISK_QUEUES: u16 = 16;

/// What is wrong with `memory` bytes of guest memory, if anything.
pub fn memory_problem(memory: u64) -> Option<String> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&memory) {
        return Some(format!("{memory} bytes: 16 MiB to 64 GiB"));
    }
    if !memory.is_multiple_of(4096) {
        return Some(format!("{memory} bytes: a whole number of 4 KiB pages"));
    }
    None
}

impl VmConfig {
    /// Rejects what cannot run, with the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return bad(format!("--cpus {}: 1 to {MAX_CPUS}", self.cpus));
        }
        if let Some(Err(e)) = self.vcpu_affinity.as_ref().map(|c| c.check_allowed()) {
            return bad(format!("--vcpu-affinity: {e}"));
        }
        if let Some(why) = memory_problem(self.memory) {
            return bad(format!("--memory {why}"));
        }
        // Each device: its endpoint's checks (one for every kind), then
        // its own.
        let devices = self
            .disks
            .iter()
            .map(|d| ("disk", &d.backend))
            .chain(self.nets.iter().map(|n| ("nic", &n.backend)))
            .chain(self.fs.iter().map(|f| ("fs", &f.backend)));
        for (noun, backend) in devices {
            if let Some(why) = backend.problem() {
                return bad(format!("{noun} {}: {why}", backend.socket.display()));
            }
        }
        for d in &self.disks {
            if d.num_queues == 0 || d.num_queues > MAX_DISK_QUEUES {
                return bad(format!(
                    "disk {}: num_queues 1 to {MAX_DISK_QUEUES}",
                    d.backend.socket.display()
                ));
            }
        }
        if self.disks.len() > 16 {
            return bad("at most 16 disks".into());
        }
        for n in &self.nets {
            if n.num_queues < 2 || n.num_queues > 16 || n.num_queues % 2 != 0 {
                return bad(format!(
                    "nic {}: num_queues 2 to 16, an even number (a receive and a transmit queue per pair)",
                    n.backend.socket.display()
                ));
            }
            n.mac_bytes()?;
        }
        if self.nets.len() > 8 {
            return bad("at most 8 NICs".into());
        }
        for f in &self.fs {
            let name = f.backend.socket.display();
            // virtio-fs's tag field: 36 bytes, no NUL inside.
            if f.tag.is_empty() || f.tag.len() > 36 || f.tag.contains('\0') {
                return bad(format!("fs {name}: tag of 1 to 36 bytes"));
            }
            if !(1..=16).contains(&f.num_queues) {
                return bad(format!("fs {name}: num_queues (request queues) 1 to 16"));
            }
        }
        if self.fs.len() > 8 {
            return bad("at most 8 shared folders".into());
        }
        if self.restore.is_some() && !self.fs.is_empty() {
            return bad("--restore with --fs: snapshots hold no shared folders".into());
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
        // 65537 does not wrap to a valid 1.
        let e = parse_disk("socket=/a,num_queues=65537").unwrap_err();
        assert!(e.to_string().contains("num_queues: at most 65535"), "{e}");
        assert!(parse_disk("socket=/a,queue_size=65536").is_err());
        assert_eq!(
            parse_serial("file=/tmp/s").unwrap(),
            SerialOut::File("/tmp/s".into())
        );
        assert!(parse_serial("tty").is_err());
    }

    #[test]
    fn nics_parse_or_say_why_not() {
        let n = parse_net("socket=/tmp/n.sock,mac=52:54:00:12:34:56,num_queues=4").unwrap();
        assert_eq!(n.num_queues, 4);
        assert_eq!(n.mac_bytes().unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let e = parse_net("socket=/tmp/n.sock,mac=01:00:5e:00:00:01").unwrap_err();
        assert!(e.to_string().contains("unicast"), "{e}");
        assert!(parse_net("socket=/a,mac=52:54:00:12:34").is_err());
        assert!(parse_net("mac=52:54:00:12:34:56").is_err());
        assert!(parse_net("socket=/a,speed=fast").is_err());
        // No MAC given: a random locally administered unicast one.
        let m = parse_net("socket=/a").unwrap().mac_bytes().unwrap();
        assert_eq!(m[0] & 0x03, 0x02, "{m:02x?}");
        // An odd or zero number of queues is no set of pairs.
        let mut cfg: VmConfig = serde_json::from_str(
            r#"{"kernel": "/k", "memory": "64M", "nets": [{"socket": "/a", "num_queues": 3}]}"#,
        )
        .unwrap();
        assert!(cfg.validate().unwrap_err().to_string().contains("even"));
        cfg.nets[0].num_queues = 2;
        cfg.validate().unwrap();
        // A restore keeps the snapshot's NICs: they are given again.
        cfg.restore = Some("/snap".into());
        cfg.validate().unwrap();
    }

    #[test]
    fn vcpu_affinity_reads_as_text_in_json_and_is_checked_against_the_host() {
        let cfg = |affinity: &str| -> VmConfig {
            serde_json::from_str(&format!(
                r#"{{"kernel": "/k", "memory": "64M", "vcpu_affinity": "{affinity}"}}"#
            ))
            .unwrap()
        };
        let here = cpu_affinity::current_affinity().unwrap();
        let ok = cfg(&here.to_string());
        assert_eq!(ok.vcpu_affinity.as_ref(), Some(&here));
        ok.validate().unwrap();
        let e = cfg("1000").validate().unwrap_err().to_string();
        assert!(
            e.contains("--vcpu-affinity: CPU 1000 is not one this process may run on"),
            "{e}"
        );
        let e = serde_json::from_str::<VmConfig>(
            r#"{"kernel": "/k", "memory": "64M", "vcpu_affinity": "0-"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not a CPU number"), "{e}");
    }
}
