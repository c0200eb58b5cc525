//! What vmctl keeps on disk: a state root with one directory per VM,
//! holding its definition, its disk (a clone), its sockets, its console
//! and what became of its last run. vmctl itself is short-lived; this
//! directory is the truth every call reads.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error(
        "{0:?} is not a VM name: use 1 to 63 of a-z, 0-9, '-' and '_', starting with a letter or digit"
    )]
    BadName(String),
    #[error("no VM named {0:?} (vmctl list shows them)")]
    NoSuchVm(String),
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    #[error("state directory {path}: {what}")]
    Dir {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Checks a VM name: it becomes a directory and socket names.
pub fn check_name(name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName(name.to_string()))
    }
}

/// The state root: `vms/NAME/` per VM, `images/` for what vmctl makes
/// itself (the demo's base).
#[derive(Debug, Clone)]
pub struct Root {
    pub path: PathBuf,
}

/// The default root: /var/lib/vmctl as root, else $XDG_STATE_HOME/vmctl
/// (~/.local/state/vmctl).
pub fn default_root() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/vmctl");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vmctl"),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/state/vmctl"),
    }
}

fn dir_error(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> StateError {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |source| StateError::Dir { path, what, source }
}

impl Root {
    /// Opens the root, making it if needed; it must be writable.
    pub fn open(path: &Path) -> Result<Root, StateError> {
        std::fs::create_dir_all(path.join("vms")).map_err(dir_error(path, "cannot create it"))?;
        spread_subdirectories(&path.join("vms"));
        std::fs::create_dir_all(path.join("images"))
            .map_err(dir_error(path, "cannot create it"))?;
        // Writable, checked up front: not half-way through a create (by
        // asking, not by making a file: see spread_subdirectories).
        rustix::fs::accessat(
            rustix::fs::CWD,
            path,
            rustix::fs::Access::WRITE_OK,
            rustix::fs::AtFlags::EACCESS,
        )
        .map_err(|e| dir_error(path, "not writable")(e.into()))?;
        // Absolute: the paths under it go to other processes (the
        // supervisor, the host backend) that run in other directories.
        let path = std::path::absolute(path).map_err(dir_error(path, "cannot resolve it"))?;
        Ok(Root { path })
    }

    pub fn images(&self) -> PathBuf {
        self.path.join("images")
    }

    /// `snapshots/NAME/` per VM snapshot (`vmctl snapshot`).
    pub fn snapshots(&self) -> PathBuf {
        self.path.join("snapshots")
    }

    pub fn vm(&self, name: &str) -> Result<VmDir, StateError> {
        check_name(name)?;
        let path = self.path.join("vms").join(name);
        if !path.join("config.json").is_file() {
            return Err(StateError::NoSuchVm(name.to_string()));
        }
        Ok(VmDir {
            name: name.to_string(),
            path,
        })
    }

    /// Claims a new VM directory, locked (the lock held while the VM is
    /// made): exactly one of two racing creates wins. The directory is
    /// made aside, locked, then renamed into place, so a VM directory
    /// without its definition whose lock is free is one whose create was
    /// cut short: it is taken over.
    pub fn claim(&self, name: &str) -> Result<(VmDir, File), StateError> {
        check_name(name)?;
        let vms = self.path.join("vms");
        let path = vms.join(name);
        let aside = vms.join(format!(".claim-{}-{}", name, std::process::id()));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::create_dir(&aside).map_err(dir_error(&aside, "cannot create it"))?;
        let lock = File::open(&aside).map_err(dir_error(&aside, "cannot open it"))?;
        flock(&lock, true).map_err(dir_error(&aside, "cannot lock it"))?;
        for attempt in 0..2 {
            let cwd = rustix::fs::CWD;
            match rustix::fs::renameat_with(
                cwd,
                &aside,
                cwd,
                &path,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {
                    let vm = VmDir {
                        name: name.to_string(),
                        path,
                    };
                    return Ok((vm, lock));
                }
                Err(rustix::io::Errno::EXIST) if attempt == 0 && self.take_over_half_made(name) => {
                    continue;
                }
                Err(rustix::io::Errno::EXIST) => break,
                Err(e) => {
                    let _ = std::fs::remove_dir(&aside);
                    return Err(dir_error(&path, "cannot create it")(e.into()));
                }
            }
        }
        let _ = std::fs::remove_dir(&aside);
        Err(StateError::Exists(name.to_string()))
    }

    /// Removes `name`'s directory if it is a half-made VM whose maker is
    /// gone (no definition, its lock free); whether it did.
    pub fn take_over_half_made(&self, name: &str) -> bool {
        let path = self.path.join("vms").join(name);
        reap_if_abandoned(&path)
    }

    /// Every VM, by name.    /// Every VM, by name.
    pub fn list(&self) -> Result<Vec<VmDir>, StateError> {
        let vms = self.path.join("vms");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&vms).map_err(dir_error(&vms, "cannot read it"))? {
            let Ok(e) = e else { continue };
            let name = e.file_name().to_string_lossy().to_string();
            match self.vm(&name) {
                Ok(vm) => out.push(vm),
                // What an interrupted create left (and a claim made aside
                // that never moved into place) goes once nobody holds it.
                Err(_) => {
                    reap_if_abandoned(&e.path());
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// A VM's NIC, fixed when it is defined (what it does with it: `network`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub bridge: String,
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub gateway: std::net::Ipv4Addr,
    pub prefix: u8,
    /// The tap made for it while it runs.
    pub tap: String,
    /// Its bridge's subnet masqueraded to the uplink while it runs.
    #[serde(default)]
    pub nat: bool,
}

/// What a VM is: everything `vmctl start` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    /// The image it was cloned from (FILE@SNAPSHOT).
    pub image: String,
    /// None: the built-in bench guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    pub queues: u16,
    /// Who serves its disk.
    #[serde(default)]
    pub backend: BackendMode,
    pub created_unix: u64,
    /// A VM snapshot its next start continues from instead of booting:
    /// set by `create --from-snapshot`, cleared once the restored VM runs
    /// (its disk has moved on from the snapshot's, so a later start boots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreFrom>,
    /// Its NIC, if it has one (`--net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NicSpec>,
    /// Host folders shared with it (`--share DIR:TAG`), each served by a
    /// virtiofsd of its own while it runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<Share>,
    /// Started by `vmctl start --autostart` (the host's boot unit).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autostart: bool,
    /// Where its threads run on the host (none: anywhere).
    #[serde(default, skip_serializing_if = "Placement::is_anywhere")]
    pub placement: Placement,
    /// Its disk's rate limits (none: unlimited).
    #[serde(default, skip_serializing_if = "DiskLimits::is_none")]
    pub disk_limits: DiskLimits,
}

/// A VM's disk rate limits, enforced by the blk-backend serving it: its
/// own, and the group whose one budget it shares (a fleet's, `vmctl run
/// --disk-iops-group`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskLimits {
    #[serde(default, skip_serializing_if = "rate_limit::Limits::is_none")]
    pub limits: rate_limit::Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl DiskLimits {
    pub fn is_none(&self) -> bool {
        self.limits.is_none() && self.group.is_none()
    }
}

/// Where a VM's threads run on the host: its vCPUs (the vmm's
/// `--vcpu-affinity`) and its disk's queue workers (blk-backend's
/// `worker_cpus`, in the host backend's export or the VM's own backend),
/// each list spread one CPU per thread in turn (`cpu_affinity`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<cpu_affinity::CpuList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_workers: Option<cpu_affinity::CpuList>,
}

impl Placement {
    pub fn is_anywhere(&self) -> bool {
        self.vcpus.is_none() && self.disk_workers.is_none()
    }

    /// Refuses a CPU this host does not let the VM's processes use, by
    /// the option that named it.
    pub fn check(&self) -> anyhow::Result<()> {
        for (option, cpus) in [
            ("--vcpu-affinity", &self.vcpus),
            ("--disk-worker-cpus", &self.disk_workers),
        ] {
            if let Some(c) = cpus {
                c.check_allowed()
                    .map_err(|e| anyhow::anyhow!("{option} {c}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// A host folder a VM mounts by its tag (virtio-fs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    pub dir: PathBuf,
    pub tag: String,
}

impl Share {
    /// `HOSTDIR:TAG` (the tag after the last colon): an existing
    /// directory, kept absolute; a tag of 1 to 36 bytes.
    pub fn parse(spec: &str) -> anyhow::Result<Share> {
        let Some((dir, tag)) = spec.rsplit_once(':') else {
            anyhow::bail!("--share {spec:?}: HOSTDIR:TAG");
        };
        if tag.is_empty() || tag.len() > 36 || tag.contains(['\0', '/', ',', '=']) {
            anyhow::bail!("--share {spec:?}: a tag of 1 to 36 bytes, without '/', ',' or '='");
        }
        let dir = std::path::absolute(dir)?;
        if !dir.is_dir() {
            anyhow::bail!("--share {spec:?}: {} is not a directory", dir.display());
        }
        Ok(Share {
            dir,
            tag: tag.to_string(),
        })
    }
}

/// Where a restored VM continues from, and how its memory comes in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreFrom {
    /// The vmm's snapshot directory (`vmm --restore`).
    pub dir: PathBuf,
    pub memory: RestoreMemory,
}

/// How a restored VM's memory comes in (the vmm's `--restore-memory`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMemory {
    /// Only the pages the guest and its disk touch (clones of one snapshot
    /// take memory for what each uses).
    #[default]
    OnDemand,
    /// Touched pages at once, the rest in the background.
    Lazy,
    /// All of it before the guest runs.
    Copy,
}

impl RestoreMemory {
    pub fn as_arg(self) -> &'static str {
        match self {
            RestoreMemory::OnDemand => "on-demand",
            RestoreMemory::Lazy => "lazy",
            RestoreMemory::Copy => "copy",
        }
    }
}

/// Who serves a VM's disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendMode {
    /// The host's one blk-backend, serving every VM (the default: less
    /// memory per VM, faster starts).
    #[default]
    Host,
    /// A blk-backend of the VM's own (a crash there touches no other VM).
    Vm,
}

impl std::fmt::Display for BackendMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendMode::Host => "host",
            BackendMode::Vm => "vm",
        })
    }
}

/// What became of the VM's current or last run (written by its
/// supervisor).
/// Where a run is, as its supervisor records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    #[default]
    Starting,
    Running,
    Exited,
    Failed,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    pub supervisor_pid: Option<u32>,
    pub vmm_pid: Option<u32>,
    pub backend_pid: Option<u32>,
    /// The boot this run belongs to: after a reboot nothing runs.
    pub boot_id: String,
    pub started_unix_ms: u64,
    pub ended_unix_ms: Option<u64>,
    /// The vmm's exit status (exited).
    pub exit_status: Option<i32>,
    /// Why it failed (failed).
    pub reason: Option<String>,
    /// How many times the disk backend died and was started again.
    pub backend_restarts: u32,
    /// The host backend's restart count when this run began (its restarts
    /// since are this VM's).
    #[serde(default)]
    pub host_restarts_at_start: u32,
}

#[derive(Debug, Clone)]
pub struct VmDir {
    pub name: String,
    pub path: PathBuf,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn boot_id() -> String {
    // Read once per process: a fleet's supervisors asked for it at every
    // status they wrote or read.
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .clone()
}

/// Whether process `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

impl VmDir {
    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn status_path(&self) -> PathBuf {
        self.path.join("status.json")
    }
    /// Held by the VM's supervisor from before it records "starting"
    /// until it has recorded the end (or it died): what waiting for a VM's
    /// end waits for ([`lock_released`]).
    pub fn run_lock_path(&self) -> PathBuf {
        self.path.join("run.lock")
    }
    pub fn disk(&self) -> PathBuf {
        self.path.join("disk.img")
    }
    pub fn disk_socket(&self) -> PathBuf {
        self.path.join("disk.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.path.join("api.sock")
    }
    /// Its NIC's vhost-user socket (net-backend's).
    pub fn net_socket(&self) -> PathBuf {
        self.path.join("net.sock")
    }
    /// Where share `i`'s virtiofsd listens.
    pub fn share_socket(&self, i: usize) -> PathBuf {
        self.path.join(format!("fs{i}.sock"))
    }
    /// The control socket of the VM's own blk-backend (`--backend vm`).
    pub fn backend_control(&self) -> PathBuf {
        self.path.join("backend-control.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.path.join("console.log")
    }
    /// Where `vmctl console` attaches while the VM runs.
    pub fn console_socket(&self) -> PathBuf {
        self.path.join("console.sock")
    }

    pub fn config(&self) -> Result<VmConfig, StateError> {
        read_json(&self.config_path())
    }

    pub fn write_config(&self, c: &VmConfig) -> Result<(), StateError> {
        write_json(&self.config_path(), c)
    }

    /// The last run's status (None: never started).
    pub fn status(&self) -> Result<Option<Status>, StateError> {
        if !self.status_path().exists() {
            return Ok(None);
        }
        read_json(&self.status_path()).map(Some)
    }

    /// Status changes a few times per run: swapped in rather than
    /// renamed over (see [`write_json_swapped`]).
    pub fn write_status(&self, s: &Status) -> Result<(), StateError> {
        write_json_swapped(&self.status_path(), s)
    }

    /// Serializes vmctl calls on this VM (released when dropped): a lock
    /// on the directory itself, not on a file in it (a file more to make
    /// and delete per VM, see [`spread_subdirectories`]).
    pub fn lock(&self) -> Result<File, StateError> {
        let gone = || StateError::NoSuchVm(self.name.clone());
        let dir = File::open(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => gone(),
            _ => dir_error(&self.path, "cannot open it")(e),
        })?;
        flock(&dir, true).map_err(dir_error(&self.path, "cannot lock it"))?;
        // Deleted while this waited for the lock (a removed directory has
        // no links left): there is no VM by that name any more.
        use std::os::unix::fs::MetadataExt;
        if dir.metadata().map_or(true, |m| m.nlink() == 0) {
            return Err(gone());
        }
        Ok(dir)
    }

    /// The state as a user sees it now: a run whose supervisor is gone is
    /// failed, one from before a reboot is stopped.
    pub fn observed(&self) -> Result<Observed, StateError> {
        let Some(s) = self.status()? else {
            return Ok(Observed::Defined);
        };
        Ok(match s.state {
            RunState::Exited => Observed::Exited(s.exit_status.unwrap_or(-1)),
            RunState::Failed => Observed::Failed(s.reason.clone().unwrap_or_default()),
            _ if s.boot_id != boot_id() => Observed::Stopped,
            _ if !s.supervisor_pid.is_some_and(alive) => {
                Observed::Failed("its supervisor is gone (killed?)".into())
            }
            RunState::Starting => Observed::Starting,
            RunState::Running => Observed::Running,
        })
    }
}

/// A VM's state as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Defined,
    Starting,
    Running,
    Exited(i32),
    Failed(String),
    /// Ran before the host rebooted.
    Stopped,
}

impl Observed {
    pub fn is_active(&self) -> bool {
        matches!(self, Observed::Starting | Observed::Running)
    }
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Observed::Defined => write!(f, "defined"),
            Observed::Starting => write!(f, "starting"),
            Observed::Running => write!(f, "running"),
            Observed::Exited(n) => write!(f, "exited ({n})"),
            Observed::Failed(why) => write!(f, "failed: {why}"),
            Observed::Stopped => write!(f, "stopped"),
        }
    }
}

/// An exclusive flock on `path` (made if missing), released when the file
/// is dropped. `wait`: block until it is free; otherwise None when another
/// process holds it.
pub fn lock_file(path: &Path, wait: bool) -> Result<Option<File>, StateError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(dir_error(path, "cannot open its lock"))?;
    match flock(&f, wait) {
        Ok(true) => Ok(Some(f)),
        Ok(false) => Ok(None),
        Err(e) => Err(dir_error(path, "cannot lock it")(e)),
    }
}

/// An exclusive flock on the directory `path`, released when the file is
/// dropped; None when another process holds it (and `wait` is not set).
pub fn lock_dir(path: &Path, wait: bool) -> Result<Option<File>, StateError> {
    let f = File::open(path).map_err(dir_error(path, "cannot open it"))?;
    match flock(&f, wait) {
        Ok(true) => Ok(Some(f)),
        Ok(false) => Ok(None),
        Err(e) => Err(dir_error(path, "cannot lock it")(e)),
    }
}

/// Removes the VM directory at `path` when it has no definition and
/// nobody holds its lock (its create was cut short); whether it did.
fn reap_if_abandoned(path: &Path) -> bool {
    if path.join("config.json").exists() {
        return false;
    }
    let Ok(dir) = File::open(path) else {
        return false;
    };
    if !matches!(flock(&dir, false), Ok(true)) {
        return false;
    }
    // Looked at again under the lock: the create may have finished.
    if path.join("config.json").exists() {
        return false;
    }
    std::fs::remove_dir_all(path).is_ok()
}

/// Readable once nobody holds an exclusive lock on `path` (None: nobody
/// does now). A flock can be neither polled nor waited for with a
/// deadline: a thread takes it shared, blocking, lets go at once and then
/// closes its end of a pipe, whose other end this returns, to wait on
/// beside other descriptors ([`crate::process::wait_any`]). A thread still
/// blocked when its waiter gives up gets the lock later and lets go of it
/// as promptly, or ends with the process.
pub fn lock_released(path: &Path) -> Result<Option<OwnedFd>, StateError> {
    use rustix::fs::FlockOperation;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(dir_error(path, "cannot open its lock")(e)),
    };
    match rustix::fs::flock(&f, FlockOperation::NonBlockingLockShared) {
        Ok(()) => return Ok(None),
        Err(rustix::io::Errno::WOULDBLOCK) => {}
        Err(e) => return Err(dir_error(path, "cannot lock it")(e.into())),
    }
    let (released, said) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| dir_error(path, "cannot wait for its lock")(e.into()))?;
    std::thread::Builder::new()
        .name("lock wait".into())
        .spawn(move || {
            let _ = rustix::fs::flock(&f, FlockOperation::LockShared);
            // Let go before saying so.
            drop(f);
            drop(said);
        })
        .map_err(dir_error(path, "cannot wait for its lock"))?;
    Ok(Some(released))
}

/// An exclusive flock on `f`; false when it is held elsewhere and `wait`
/// is not set.
fn flock(f: &File, wait: bool) -> std::io::Result<bool> {
    use rustix::fs::FlockOperation;
    let how = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    match rustix::fs::flock(f, how) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) if !wait => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// VM directories are unrelated trees: ext4 places the subdirectories of a
/// "top directory" (`chattr +T`, FS_TOPDIR_FL: what /home is for) across
/// its block groups with the Orlov allocator instead of beside their
/// parent, and a VM's files go in its directory's group. A fleet that
/// makes and deletes a dozen files per VM then stops making every new file
/// scan one group's recently deleted inodes (ext4 without a journal skips
/// each inode freed in the last minute, one lookup at a time: 17 % of a
/// 50-VM fleet's CPU on this project's machines). Best effort: other
/// filesystems have no such flag.
fn spread_subdirectories(dir: &Path) {
    use rustix::fs::IFlags;
    let Ok(f) = File::open(dir) else {
        return;
    };
    if let Ok(flags) = rustix::fs::ioctl_getflags(&f) {
        if !flags.contains(IFlags::TOPDIR) {
            let _ = rustix::fs::ioctl_setflags(&f, flags | IFlags::TOPDIR);
        }
    }
}

pub fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> Result<T, StateError> {
    let text = std::fs::read_to_string(path).map_err(dir_error(path, "cannot read it"))?;
    serde_json::from_str(&text).map_err(|source| StateError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Written aside and renamed: a reader never sees half a file.
pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    write_atomically(path, to_json(path, v)?.as_bytes())
}

/// `bytes` written aside and renamed over `path`: a reader sees the old
/// file or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(dir_error(&tmp, "cannot write it"))?;
    std::fs::rename(&tmp, path).map_err(dir_error(path, "cannot write it"))
}

fn to_json<T: Serialize>(path: &Path, v: &T) -> Result<String, StateError> {
    serde_json::to_string_pretty(v).map_err(|source| StateError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Written into the file beside (`NAME.next`) and swapped with it in one
/// step (RENAME_EXCHANGE): a reader never sees half a file, and the old
/// contents stay beside, to be written over next time. A file rewritten
/// several times per run then costs no new inode and no deleted one each
/// time: on ext4 without a journal a new inode is looked for past every
/// inode deleted in the last minutes, one lookup each (a fleet's VMs
/// spent a fifth of their supervisors' time there). The first write, or
/// a filesystem without the exchange, renames.
pub fn write_json_swapped<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    let next = path.with_extension("json.next");
    // Written over and then cut to length, not truncated first: ext4
    // flushes a file truncated to nothing when it is closed (its
    // auto_da_alloc), a disk write per status change.
    let text = to_json(path, v)?;
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&next)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.set_len(text.len() as u64)
        });
    written.map_err(dir_error(&next, "cannot write it"))?;
    let cwd = rustix::fs::CWD;
    match rustix::fs::renameat_with(cwd, &next, cwd, path, rustix::fs::RenameFlags::EXCHANGE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            std::fs::rename(&next, path).map_err(dir_error(path, "cannot write it"))
        }
        Err(e) => Err(dir_error(path, "cannot write it")(e.into())),
    }
}

/// What `create` is given.
#[derive(Debug, Clone)]
pub struct Spec {
    pub image: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory: u64,
    pub queues: u16,
    /// Grow the clone to this many bytes (the new space reads as zeros).
    pub disk_size: Option<u64>,
    pub backend: BackendMode,
    /// A scratch clone (`run --rm`: deleted when the fleet ends): made
    /// without flushes, since nothing of it is wanted after a crash.
    pub scratch: bool,
    /// A VM snapshot's saved state its first start continues from (the
    /// image is then that snapshot's sealed disk).
    pub restore: Option<RestoreFrom>,
    /// A NIC on this bridge.
    pub net: Option<String>,
    /// Its bridge's subnet masqueraded to the uplink.
    pub nat: bool,
    /// Host folders shared with it.
    pub shares: Vec<Share>,
    pub placement: Placement,
    pub disk_limits: DiskLimits,
}

/// Claims VM `name` and has `make` give it its disk and definition;
/// nothing is left behind when that fails.
pub fn define(
    root: &Root,
    name: &str,
    make: impl FnOnce(&VmDir) -> anyhow::Result<()>,
) -> anyhow::Result<VmDir> {
    let (vm, _making) = root.claim(name)?;
    if let Err(e) = make(&vm) {
        let _ = std::fs::remove_dir_all(&vm.path);
        return Err(e);
    }
    Ok(vm)
}

/// Bytes a file occupies on disk.
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// A line in the VM's supervisor.log (restarts, what a run noticed).
pub fn note(vm: &VmDir, what: std::fmt::Arguments) {
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(vm.path.join("supervisor.log"))
        .and_then(|mut f| writeln!(f, "{what}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swapped_writes_leave_the_latest_in_place_and_make_no_new_files() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().expect("dir");
        let path = d.path().join("status.json");
        write_json_swapped(&path, &1u32).expect("first");
        write_json_swapped(&path, &2u32).expect("second");
        let inodes = |p: &Path| std::fs::metadata(p).expect("there").ino();
        let pair = [inodes(&path), inodes(&path.with_extension("json.next"))];
        write_json_swapped(&path, &3u32).expect("third");
        assert_eq!(read_json::<u32>(&path).expect("read"), 3);
        // The two files swap places: no inode made or freed.
        let mut now = [inodes(&path), inodes(&path.with_extension("json.next"))];
        now.sort();
        let mut before = pair;
        before.sort();
        assert_eq!(now, before);
        assert_eq!(std::fs::read_dir(d.path()).expect("list").count(), 2);
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "vm-1", "x_y", "0abc", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "A",
            "-a",
            "_a",
            "a/b",
            "a.b",
            &"a".repeat(64),
            "a b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    /// Where the filesystem has the flag (ext4), VM directories are spread
    /// over its block groups; a VM's lock is its directory's, and holds
    /// off a second taker until dropped.
    #[test]
    fn vm_directories_are_spread_and_locked_in_place() {
        let d = tempfile::tempdir().expect("dir");
        let root = Root::open(d.path()).expect("root");
        let vms = File::open(d.path().join("vms")).expect("vms");
        match rustix::fs::ioctl_getflags(&vms) {
            Ok(flags) => assert!(flags.contains(rustix::fs::IFlags::TOPDIR), "{flags:?}"),
            Err(e) => eprintln!("no inode flags here ({e}): nothing to check"),
        }
        let (vm, claimed) = root.claim("a").expect("claim");
        drop(claimed);
        let held = vm.lock().expect("lock");
        let again = File::open(&vm.path).expect("dir");
        assert!(
            !flock(&again, false).expect("try"),
            "a second lock while held"
        );
        drop(held);
        assert!(flock(&again, false).expect("try"), "free once dropped");
        assert_eq!(
            std::fs::read_dir(&vm.path).expect("list").count(),
            0,
            "no lock file"
        );
    }

    /// A run recorded under another boot (the host rebooted since) shows
    /// as stopped; one whose supervisor is gone as failed; an ended one as
    /// it ended.
    #[test]
    fn what_a_recorded_run_looks_like_now() {
        let d = tempfile::tempdir().expect("dir");
        let root = Root::open(d.path()).expect("root");
        let (vm, _claimed) = root.claim("vm").expect("claim");
        assert_eq!(vm.observed().expect("observed"), Observed::Defined);
        let running = Status {
            state: RunState::Running,
            supervisor_pid: Some(std::process::id()),
            boot_id: boot_id(),
            ..Default::default()
        };
        vm.write_status(&running).expect("status");
        assert_eq!(vm.observed().expect("observed"), Observed::Running);
        vm.write_status(&Status {
            boot_id: "another boot".into(),
            ..running.clone()
        })
        .expect("status");
        assert_eq!(vm.observed().expect("observed"), Observed::Stopped);
        vm.write_status(&Status {
            supervisor_pid: Some(u32::MAX),
            ..running.clone()
        })
        .expect("status");
        assert!(matches!(
            vm.observed().expect("observed"),
            Observed::Failed(_)
        ));
        vm.write_status(&Status {
            state: RunState::Exited,
            exit_status: Some(3),
            ..running
        })
        .expect("status");
        assert_eq!(vm.observed().expect("observed"), Observed::Exited(3));
    }

    #[test]
    fn two_claims_of_one_name_one_wins() {
        let d = tempfile::tempdir().expect("dir");
        let root = Root::open(d.path()).expect("root");
        let first = root.claim("vm").expect("first");
        let e = root.claim("vm").expect_err("second");
        assert!(e.to_string().contains("already exists"), "{e}");
        // A claim whose maker died (its lock gone) without a definition
        // is taken over; one with a definition is a VM.
        drop(first);
        let (vm, _second) = root.claim("vm").expect("taken over");
        std::fs::write(vm.path.join("config.json"), "{}").expect("config");
        drop(_second);
        assert!(root.claim("vm").is_err());
        assert_eq!(
            std::fs::read_dir(d.path().join("vms")).expect("ls").count(),
            1
        );
    }

    /// A verb that waited for the lock of a VM being deleted finds no VM
    /// (it said "No such file or directory (os error 2)" before).
    #[test]
    fn a_vm_deleted_while_waiting_for_its_lock_is_no_vm() {
        let d = tempfile::tempdir().expect("dir");
        let root = Root::open(d.path()).expect("root");
        let (vm, claimed) = root.claim("a").expect("claim");
        drop(claimed);
        let held = vm.lock().expect("lock");
        let waiter = {
            let vm = vm.clone();
            std::thread::spawn(move || vm.lock().map(drop))
        };
        // The waiter is blocked on the lock (or not there yet: both end
        // the same way).
        std::fs::remove_dir_all(&vm.path).expect("delete");
        drop(held);
        let got = waiter.join().expect("thread");
        assert!(
            matches!(got, Err(StateError::NoSuchVm(ref n)) if n == "a"),
            "{got:?}"
        );
    }
}
