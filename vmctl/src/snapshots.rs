//! VM snapshots and disk backups, taken of running VMs:
//!
//! - `vmctl snapshot NAME SNAP`: the VM paused, its vCPUs, devices and
//!   memory saved by its vmm (`vm.snapshot` into `snapshots/SNAP/vm/`), its
//!   disk sealed live at the same instant by the blk-backend serving it
//!   (`export-snapshot`: `disk.img@SNAP` in the VM's directory, the VM
//!   going on on a fresh top), then resumed. `snapshots/SNAP/snapshot.json`
//!   records the VM's definition and the sealed disk.
//! - `create --from-snapshot SNAP` / `run --from-snapshot SNAP`: VMs with
//!   their own clone of the sealed disk whose first start continues from
//!   the snapshot (`vmm --restore`) instead of booting.
//! - `vmctl backup NAME DEST [--incremental]`: the disk sealed the same way
//!   (`disk.img@backup-N`), then `img backup` of it into DEST, a directory
//!   of backup streams with a manifest (`--incremental`: only what changed
//!   since DEST's last backup); `vmctl restore DEST NAME` makes a new VM
//!   on the restored chain.
//!
//! A VM's sealed disks stay in its directory (below its current disk in
//! its chain), so a VM with snapshots is not deleted until they are, as
//! virsh refuses to undefine a domain that has snapshots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use image_format::ops::Progress;
use image_format::{backup, ops, Env, RealEnv};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::host_backend::{self, HostBackend};
use crate::state::{allocated, define, Placement, Spec};
use crate::state::{
    check_name, now_ms, read_json, write_json, BackendMode, Observed, RestoreFrom, RestoreMemory,
    Root, VmConfig, VmDir,
};

const RECORD: &str = "snapshot.json";
/// Written first into a snapshot's directory: whose it is, so a snapshot
/// whose maker was killed can be finished or undone by the next vmctl.
const PENDING: &str = "pending.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pending {
    vm: String,
    /// The name its disk's sealed layer gets.
    seal: String,
}
const MANIFEST: &str = "backup.json";
/// In a VM's directory: each backup directory's last seal (what its next
/// incremental backup is taken against), so seals left by killed backups
/// are known as such.
const BACKUP_SEALS: &str = "backup-seals.json";

/// What `snapshots/NAME/snapshot.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub name: String,
    /// The VM it was taken of.
    pub vm: String,
    pub created_unix_ms: u64,
    /// The VM's disk at the snapshot's instant: a sealed layer, which every
    /// VM made from the snapshot clones.
    pub disk: PathBuf,
    /// The VM's definition then.
    pub config: VmConfig,
}

/// A VM snapshot of the state root.
pub struct Snapshot {
    pub dir: PathBuf,
    pub record: SnapshotRecord,
}

impl Snapshot {
    /// The snapshot `name` (what `vmctl snapshot` made).
    pub fn open(root: &Root, name: &str) -> Result<Snapshot> {
        check_name(name).context("snapshot name")?;
        let dir = root.snapshots().join(name);
        let record = dir.join(RECORD);
        if !record.is_file() {
            bail!("no snapshot named {name:?} (vmctl snapshots lists them)");
        }
        Ok(Snapshot {
            record: read_json(&record)?,
            dir,
        })
    }

    /// The vmm's snapshot directory (`vmm --restore` takes it).
    pub fn vm_state(&self) -> PathBuf {
        self.dir.join("vm")
    }

    /// What `create --from-snapshot` makes: a VM of the snapshot's
    /// definition on a clone of its disk, continuing from it.
    /// `placement`: the new VM's (a snapshot's host CPUs are its host's).
    pub fn spec(
        &self,
        backend: BackendMode,
        placement: Placement,
        memory: RestoreMemory,
        scratch: bool,
    ) -> Spec {
        let c = &self.record.config;
        Spec {
            image: self.record.disk.clone(),
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            cmdline: c.cmdline.clone(),
            cpus: c.cpus,
            memory: c.memory,
            queues: c.queues,
            disk_size: None,
            backend,
            scratch,
            restore: Some(RestoreFrom {
                dir: self.vm_state(),
                memory,
            }),
            // A snapshot holds no NIC and no shared folder (`snapshot`
            // refuses a VM that has them).
            net: None,
            nat: false,
            shares: Vec::new(),
            placement,
            disk_limits: Default::default(),
        }
    }

    /// What `vmctl image push --vm-snapshot` sends: the sealed disk's
    /// chain, the VM's kernel, its state and memory, its definition as
    /// the image's defaults.
    pub fn push_source(&self) -> vm_oci::PushSource {
        let c = &self.record.config;
        vm_oci::PushSource {
            snapshot: self.record.disk.clone(),
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            defaults: vm_oci::VmDefaults {
                cpus: Some(c.cpus),
                memory: Some(c.memory),
                cmdline: Some(c.cmdline.clone()),
                queues: Some(c.queues),
            },
            vm_state: Some(self.vm_state()),
        }
    }

    /// As `list` shows it.
    pub fn describe(&self, root: &Root) -> Value {
        json!({
            "name": self.record.name,
            "vm": self.record.vm,
            "created-unix-ms": self.record.created_unix_ms,
            "cpus": self.record.config.cpus,
            "memory": self.record.config.memory,
            "memory-bytes": allocated(&self.vm_state().join("memory")),
            "disk": self.record.disk,
            "used-by": used_by(root, &self.record.disk),
        })
    }
}

/// The VMs cloned from `disk` (a snapshot's sealed disk).
fn used_by(root: &Root, disk: &Path) -> Vec<String> {
    let disk = disk.display().to_string();
    root.list()
        .unwrap_or_default()
        .into_iter()
        .filter(|vm| vm.config().is_ok_and(|c| c.image == disk))
        .map(|vm| vm.name)
        .collect()
}

/// A snapshot directory without its record whose maker is gone (killed
/// mid-way): finished when all it needed was made (the VM's state saved,
/// its disk sealed: only the record was missing), removed otherwise. One
/// a live `vmctl snapshot` is making (its directory locked) is left be.
fn settle(root: &Root, dir: &Path) {
    if dir.join(RECORD).exists() {
        return;
    }
    let Ok(Some(_lock)) = crate::state::lock_dir(dir, false) else {
        return;
    };
    if dir.join(RECORD).exists() {
        return;
    }
    let name = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let finished = (|| {
        let p: Pending = read_json(&dir.join(PENDING)).ok()?;
        let vm = root.vm(&p.vm).ok()?;
        let disk = ops::snapshot_path(&vm.disk(), &p.seal);
        let saved = dir.join("vm").join(vmm::snapshot::STATE_FILE);
        if !saved.is_file()
            || !image_format::Layer::open(&RealEnv, &disk, false)
                .ok()?
                .header
                .sealed()
        {
            return None;
        }
        let config = vm.config().ok()?;
        let record = SnapshotRecord {
            name: name.clone(),
            vm: p.vm,
            created_unix_ms: now_ms(),
            disk,
            config: VmConfig {
                restore: None,
                ..config
            },
        };
        write_json(&dir.join(RECORD), &record).ok()
    })();
    if finished.is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Every snapshot, by name (settling any whose maker died first).
pub fn list(root: &Root) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root.snapshots()) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".claim-") {
            // A claim whose maker died before it moved into place.
            if let Ok(Some(_l)) = crate::state::lock_dir(&e.path(), false) {
                let _ = std::fs::remove_dir_all(e.path());
            }
            continue;
        }
        settle(root, &e.path());
        if let Ok(s) = Snapshot::open(root, &e.file_name().to_string_lossy()) {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    Ok(out)
}

/// The snapshots taken of VM `name`: their disks are in its directory.
pub fn of_vm(root: &Root, name: &str) -> Result<Vec<String>> {
    Ok(list(root)?
        .into_iter()
        .filter(|s| s.record.vm == name)
        .map(|s| s.record.name)
        .collect())
}

/// Removes a snapshot's saved VM (its memory and state); refused while VMs
/// made from it exist. Its sealed disk stays where it is, below the
/// source VM's current disk (it is part of that VM's chain).
pub fn delete(root: &Root, name: &str) -> Result<()> {
    let snap = Snapshot::open(root, name)?;
    let users = used_by(root, &snap.record.disk);
    if !users.is_empty() {
        bail!(
            "snapshot {name} is used by VM {}: delete {} first",
            users.join(", "),
            if users.len() == 1 { "it" } else { "them" }
        );
    }
    // Whose it is, then the record, first: a removal cut short leaves no
    // snapshot that half exists (the next vmctl removes the rest).
    let _ = std::fs::remove_file(snap.dir.join(PENDING));
    std::fs::remove_file(snap.dir.join(RECORD))
        .with_context(|| format!("removing {}", snap.dir.display()))?;
    std::fs::remove_dir_all(&snap.dir)
        .with_context(|| format!("removing {}", snap.dir.display()))?;
    // Its disk's seal, below the VM's current disk, is needed no more.
    if let Ok(vm) = root.vm(&snap.record.vm) {
        if let (Ok(_lock), Ok(config)) = (vm.lock(), vm.config()) {
            merge_seal(root, &vm, config.backend, &snap.record.disk);
        }
    }
    Ok(())
}

/// A name is taken only once: a directory made by exactly one of two
/// racing callers. It is made aside, locked, given `first` (what it
/// is), then renamed into place, so a directory there without its record
/// and unlocked is one whose maker died (see `settle`). The lock is held
/// while the returned file lives.
fn claim_dir(dir: &Path, what: &str, first: impl Fn(&Path) -> Result<()>) -> Result<std::fs::File> {
    let parent = dir.parent().context("a snapshot directory has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("{}", parent.display()))?;
    let aside = parent.join(format!(
        ".claim-{}-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&aside);
    std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
    let made = (|| {
        let lock = crate::state::lock_dir(&aside, true)?.context("locking it")?;
        first(&aside)?;
        let cwd = rustix::fs::CWD;
        match rustix::fs::renameat_with(cwd, &aside, cwd, dir, rustix::fs::RenameFlags::NOREPLACE) {
            Ok(()) => Ok(lock),
            Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => {
                bail!("{what} already exists ({})", dir.display())
            }
            Err(e) => {
                Err(std::io::Error::from(e)).with_context(|| format!("creating {}", dir.display()))
            }
        }
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&aside);
    }
    made
}

/// Seals the VM's disk as `disk.img@NAME`: while it runs, by the
/// blk-backend that serves it (the session ends; the vmm reconnects to a
/// fresh top); stopped, directly.
fn seal_disk(root: &Root, vm: &VmDir, backend: BackendMode, name: &str) -> Result<PathBuf> {
    if !vm.observed()?.is_active() {
        return ops::snapshot_create(&RealEnv, &vm.disk(), name)
            .with_context(|| format!("sealing {}", vm.disk().display()));
    }
    let control = match backend {
        BackendMode::Host => HostBackend::at(root).control(),
        BackendMode::Vm => vm.backend_control(),
    };
    host_backend::control(&control)
        .and_then(|mut c| c.snapshot(&vm.disk_socket(), name))
        .with_context(|| format!("VM {}: sealing its disk live", vm.name))
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Merges away the sealed layers in the VM's directory that nothing
/// needs: not a VM snapshot's disk, not a backup directory's last seal
/// (`backup-seals.json`). Such a seal is what a snapshot or backup killed
/// half-way left (its seal made, its record not).
fn sweep_orphan_seals(root: &Root, vm: &VmDir, backend: BackendMode) {
    let mut needed: Vec<PathBuf> =
        read_json::<std::collections::BTreeMap<PathBuf, PathBuf>>(&vm.path.join(BACKUP_SEALS))
            .map(|m| m.into_values().collect())
            .unwrap_or_default();
    let Ok(snaps) = list(root) else {
        return;
    };
    needed.extend(snaps.iter().map(|s| canonical(&s.record.disk)));
    let prefix = format!(
        "{}@",
        vm.disk().file_name().unwrap_or_default().to_string_lossy()
    );
    let Ok(entries) = std::fs::read_dir(&vm.path) else {
        return;
    };
    for e in entries.flatten() {
        let p = canonical(&e.path());
        if e.file_name().to_string_lossy().starts_with(&prefix) && !needed.contains(&p) {
            merge_seal(root, vm, backend, &p);
        }
    }
}

/// Folds a sealed layer of the VM's chain that nothing needs any more (a
/// past backup's, a deleted snapshot's) into the layer above it, so the
/// chain stays as short as what is kept: through the backend that serves
/// the disk while the VM runs (`export-merge`: its session ends and the
/// vmm reconnects, as for a seal), directly otherwise. Whether it went;
/// refused (and left, whole) when something else stands on it.
fn merge_seal(root: &Root, vm: &VmDir, backend: BackendMode, seal: &Path) -> bool {
    let prefix = format!(
        "{}@",
        vm.disk().file_name().unwrap_or_default().to_string_lossy()
    );
    let Some(name) = seal
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix(&prefix))
    else {
        return false;
    };
    if seal.parent() != Some(vm.path.as_path()) || !seal.exists() {
        return false;
    }
    if !vm.observed().is_ok_and(|o| o.is_active()) {
        let env: Arc<dyn Env> = Arc::new(RealEnv);
        return ops::snapshot_delete(&env, &vm.disk(), name, &mut |_, _| {}).is_ok();
    }
    let control = match backend {
        BackendMode::Host => HostBackend::at(root).control(),
        BackendMode::Vm => vm.backend_control(),
    };
    host_backend::control(&control)
        .and_then(|mut c| c.merge(&vm.disk_socket(), name))
        .is_ok()
}

/// Runs `f` with the VM held: a running VM not paused already is paused
/// first and resumed after, whatever `f` did. What `f` gave (or the
/// pause's error), whether the resume went well, and how long it took.
fn while_paused<T>(
    vm: &VmDir,
    running: bool,
    what: &str,
    f: impl FnOnce() -> Result<T>,
) -> (Result<T>, Result<()>, f64) {
    let t0 = Instant::now();
    let mut paused_here = None;
    let outcome = (|| {
        if running && !crate::vm_api::paused(vm)? {
            // Held before it pauses: if this process dies from here on,
            // the VM's supervisor resumes it (crate::hold).
            let held = crate::hold::Held::take(vm, what)?;
            crate::vm_api::pause(vm)?;
            paused_here = Some(held);
        }
        f()
    })();
    let resumed = match paused_here {
        Some(held) => {
            let r = crate::vm_api::resume(vm);
            drop(held);
            r
        }
        None => Ok(()),
    };
    (outcome, resumed, t0.elapsed().as_secs_f64() * 1000.0)
}

/// What a snapshot or a backup reports.
pub struct Taken {
    pub path: PathBuf,
    /// How long the VM was paused for it.
    pub paused_ms: f64,
    pub details: Value,
}

/// `vmctl snapshot NAME SNAP`: the running VM saved whole, its disk at the
/// same instant. The VM goes on (or stays paused, if it was) whatever
/// happens; a failed snapshot leaves nothing.
pub fn snapshot(root: &Root, name: &str, snap: &str) -> Result<Taken> {
    check_name(snap).context("snapshot name")?;
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    let config = vm.config()?;
    if config.net.is_some() || !config.shares.is_empty() {
        // Every VM restored from it would wake up with this one's MAC and
        // address on the same bridge (and a share's open files are
        // virtiofsd's, not saved). `vmm` snapshots a NIC; fleets of them
        // need an address each first.
        bail!(
            "VM {name} has a NIC or a shared folder: vmctl snapshots VMs without them              (restored copies would share its MAC and address); `vmctl backup` saves its disk"
        );
    }
    match vm.observed()? {
        Observed::Running => {}
        other => bail!(
            "VM {name} is not running ({other}): a snapshot holds a running VM's memory \
             (`vmctl backup` saves a VM's disk)"
        ),
    }
    let dir = root.snapshots().join(snap);
    settle(root, &dir);
    if dir.exists() {
        bail!(
            "a snapshot named {snap:?} already exists ({})",
            dir.display()
        );
    }
    // The disk's sealed layer, named for this attempt alone: a killed
    // snapshot's seal may still be being made by the backend when its
    // name is taken again (what it leaves is merged away, see
    // `sweep_orphan_seals`).
    let seal = format!("{snap}-{}", now_ms());
    // Locked while it is made; whose it is, written first (see `settle`).
    let _making = claim_dir(&dir, &format!("a snapshot named {snap:?}"), |d| {
        let pending = Pending {
            vm: name.to_string(),
            seal: seal.clone(),
        };
        Ok(write_json(&d.join(PENDING), &pending)?)
    })?;
    let (taken, resumed, paused_ms) = while_paused(&vm, true, &format!("snapshot {snap}"), || {
        crate::vm_api::snapshot(&vm, &dir.join("vm"))?;
        let disk = seal_disk(root, &vm, config.backend, &seal)?;
        let record = SnapshotRecord {
            name: snap.to_string(),
            vm: name.to_string(),
            created_unix_ms: now_ms(),
            disk,
            config: VmConfig {
                restore: None,
                ..config.clone()
            },
        };
        write_json(&dir.join(RECORD), &record)?;
        Ok(record)
    });
    let record = match taken {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.context(format!("VM {name}: snapshot {snap}")));
        }
    };
    resumed.with_context(|| format!("VM {name}: resuming it after snapshot {snap}"))?;
    sweep_orphan_seals(root, &vm, config.backend);
    let s = Snapshot { dir, record };
    let mut details = s.describe(root);
    details["paused-ms"] = json!(paused_ms);
    Ok(Taken {
        details,
        path: s.dir,
        paused_ms,
    })
}

/// What a backup directory's `backup.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    /// The VM backed up.
    vm: String,
    /// Its definition at the last backup (what `vmctl restore` gives the
    /// new VM).
    config: VmConfig,
    /// The full backup first, then each incremental one on the one before.
    backups: Vec<BackupItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupItem {
    /// The backup stream, in the backup directory.
    file: String,
    /// The VM's sealed disk it was taken of (the next incremental backup
    /// is a delta against it).
    disk_snapshot: PathBuf,
    created_unix_ms: u64,
    /// Bytes of data and of zeros it carries.
    data_bytes: u64,
    zero_bytes: u64,
}

/// `vmctl backup NAME DEST [--incremental]`: the VM's disk sealed at one
/// instant (paused around it if it runs), and written to DEST as a backup
/// stream: in full into a new (or empty) DEST, or, incremental, only what
/// changed since DEST's last backup.
pub fn backup(
    root: &Root,
    name: &str,
    dest: &Path,
    incremental: bool,
    progress: Progress,
) -> Result<Taken> {
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    let config = vm.config()?;
    let manifest_path = dest.join(MANIFEST);
    // One backup into DEST at a time; what a dead one left is removed.
    let _dest_lock = if dest.is_dir() {
        let l = crate::state::lock_dir(dest, false)?.with_context(|| {
            format!("{}: another backup is being written there", dest.display())
        })?;
        clear_dead_backup(dest);
        Some(l)
    } else {
        None
    };
    let mut manifest = if incremental {
        let m: Manifest = read_json(&manifest_path).with_context(|| {
            format!(
                "--incremental: {} holds no backup to add to (a full backup first: vmctl backup {name} {})",
                dest.display(),
                dest.display()
            )
        })?;
        if m.vm != name {
            bail!(
                "--incremental: {} holds backups of VM {}, not of {name}",
                dest.display(),
                m.vm
            );
        }
        let Some(last) = m.backups.last() else {
            bail!(
                "{}: a manifest with no backup in it",
                manifest_path.display()
            );
        };
        if !last.disk_snapshot.exists() {
            bail!(
                "--incremental: the disk snapshot of {}'s last backup ({}) is gone: take a full backup",
                dest.display(),
                last.disk_snapshot.display()
            );
        }
        m
    } else {
        match std::fs::read_dir(dest) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    bail!(
                        "{} is not empty: a full backup goes to a new or empty directory (--incremental adds to one)",
                        dest.display()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dest)
                    .with_context(|| format!("creating {}", dest.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("{}", dest.display())),
        }
        Manifest {
            vm: name.to_string(),
            config: config.clone(),
            backups: Vec::new(),
        }
    };
    let from = manifest.backups.last().map(|b| b.disk_snapshot.clone());
    // Sealed at one instant: a running VM is paused around it (its
    // in-flight requests complete first), so the backup holds exactly the
    // writes the guest had been told were done.
    let running = vm.observed()? == Observed::Running;
    let seal_name = format!("backup-{}", now_ms());
    let (sealed, resumed, paused_ms) = while_paused(&vm, running, "a backup", || {
        seal_disk(root, &vm, config.backend, &seal_name)
    });
    let sealed = sealed?;
    resumed.with_context(|| format!("VM {name}: resuming it after sealing its disk"))?;
    let file = format!("{}.bkp", manifest.backups.len());
    let env: Arc<dyn Env> = Arc::new(RealEnv);
    // A new DEST made above is locked from here on.
    let _dest_lock = match _dest_lock {
        Some(l) => l,
        None => crate::state::lock_dir(dest, true)?.context("locking the backup directory")?,
    };
    let stats = backup_chain(&env, &sealed, from.as_deref(), &dest.join(&file), progress)
        .with_context(|| format!("backing up {}", sealed.display()))?;
    manifest.config = VmConfig {
        restore: None,
        ..config
    };
    manifest.backups.push(BackupItem {
        file: file.clone(),
        disk_snapshot: sealed.clone(),
        created_unix_ms: now_ms(),
        data_bytes: stats.data_bytes,
        zero_bytes: stats.zero_bytes,
    });
    write_json(&manifest_path, &manifest)?;
    // The seal the last backup was taken of is needed no more (the next
    // incremental one is a delta against this one's): merged away, so a
    // VM backed up every hour for months keeps a short chain.
    let merged = manifest
        .backups
        .len()
        .checked_sub(2)
        .map(|k| manifest.backups[k].disk_snapshot.clone())
        .filter(|prev| prev != &sealed)
        .is_some_and(|prev| merge_seal(root, &vm, config.backend, &prev));
    // Each backup directory's last seal is kept (its next incremental
    // backup is taken against it); any other backup seal in the VM's
    // chain is one a killed backup left: merged away too.
    let kept_path = vm.path.join(BACKUP_SEALS);
    let mut kept: std::collections::BTreeMap<PathBuf, PathBuf> =
        read_json(&kept_path).unwrap_or_default();
    kept.insert(canonical(dest), canonical(&sealed));
    write_json(&kept_path, &kept)?;
    sweep_orphan_seals(root, &vm, config.backend);
    Ok(Taken {
        path: dest.join(&file),
        paused_ms,
        details: json!({
            "vm": name,
            "backup": dest.join(&file),
            "incremental": from.is_some(),
            "disk-snapshot": sealed,
            "data-bytes": stats.data_bytes,
            "zero-bytes": stats.zero_bytes,
            "file-bytes": stats.file_bytes,
            "chain": manifest.backups.len(),
            "merged-previous-seal": merged,
            "paused-ms": paused_ms,
        }),
    })
}

/// `backup::backup`, waiting out a writer of a layer of the chain. A
/// killed verb's merge (`export-merge`: its request sent, its client gone)
/// can still be running in the backend, or start only now, serialized
/// after this backup's own seal: a layer under the seal is then open for
/// writing until the merge ends, and the backend always lets go of it
/// then. Anyone else's writer (a user's `img` on a layer) is waited for no
/// longer than `WRITER_PATIENCE`, then reported.
fn backup_chain(
    env: &Arc<dyn Env>,
    sealed: &Path,
    from: Option<&Path>,
    out: &Path,
    progress: image_format::ops::Progress,
) -> image_format::Result<backup::BackupStats> {
    const WRITER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);
    const TRIES: usize = 5;
    let mut tries = 0;
    loop {
        match backup::backup(env, sealed, from, out, &mut *progress) {
            Err(image_format::Error::Lock(image_format::lock::LockError::InUse {
                path,
                holder,
                wanted,
            })) if holder.kind == image_format::lock::LockKind::Exclusive
                && holder.pid != Some(std::process::id())
                && tries < TRIES =>
            {
                tries += 1;
                cli_support::say!("vmctl: {}: {holder}; waiting for it", path.display());
                if !image_format::lock::wait_for_writer(&path, WRITER_PATIENCE)? {
                    return Err(image_format::lock::LockError::InUse {
                        path,
                        holder,
                        wanted,
                    }
                    .into());
                }
            }
            other => return other,
        }
    }
}

/// What a backup killed mid-way left in DEST (the caller holds DEST's
/// lock, so no backup is being written there): its temporary stream, and
/// streams the manifest does not list (written, the manifest not yet).
fn clear_dead_backup(dest: &Path) {
    let listed: Vec<String> = read_json::<Manifest>(&dest.join(MANIFEST))
        .map(|m| m.backups.into_iter().map(|b| b.file).collect())
        .unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(dest) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let ours_unlisted = n
            .strip_suffix(".bkp")
            .is_some_and(|k| k.parse::<u64>().is_ok())
            && !listed.contains(&n);
        if (n.starts_with('.') && n.ends_with(".backup-tmp")) || ours_unlisted {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `vmctl restore DEST NAME`: a new VM NAME on the chain DEST's backups
/// restore to (the full one, then each incremental one on it), defined as
/// the backed-up VM was; it boots when started.
pub fn restore(root: &Root, dest: &Path, name: &str) -> Result<VmDir> {
    let manifest: Manifest = read_json(&dest.join(MANIFEST))
        .with_context(|| format!("{}: not a vmctl backup directory", dest.display()))?;
    if manifest.backups.is_empty() {
        bail!("{}: a manifest with no backup in it", dest.display());
    }
    define(root, name, |vm| {
        let env: Arc<dyn Env> = Arc::new(RealEnv);
        let mut below: Option<PathBuf> = None;
        for (i, item) in manifest.backups.iter().enumerate() {
            let layer = vm.path.join(format!("backup-{i}.img"));
            backup::restore(
                &env,
                &dest.join(&item.file),
                below.as_deref(),
                &layer,
                &mut |_, _| {},
            )
            .with_context(|| format!("restoring {}", dest.join(&item.file).display()))?;
            // The layer before it is needed no more once this one holds
            // what it lacked of it: folded in, so a chain of hundreds of
            // backups restores into three layers, not hundreds.
            if i >= 1 {
                ops::merge_down(env.as_ref(), &layer)
                    .with_context(|| format!("folding {} into the layer below", layer.display()))?;
            }
            below = Some(layer);
        }
        let top = below.context("no backup restored")?;
        ops::clone(&RealEnv, &top, &vm.disk())
            .with_context(|| format!("cloning {}", top.display()))?;
        vm.write_config(&VmConfig {
            name: name.to_string(),
            image: top.display().to_string(),
            created_unix: now_ms() / 1000,
            restore: None,
            net: None,
            shares: Vec::new(),
            ..manifest.config.clone()
        })?;
        Ok(())
    })
}
