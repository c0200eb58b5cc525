//! The verbs on one VM. Each one that changes a VM holds its lock, so
//! concurrent vmctl calls on one VM happen one after the other.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image_format::{ops, Env, Layer, RealEnv, VolatileEnv};
use vmctl_api::{ShareInfo, VmInfo};

use crate::host_backend::HostBackend;
use crate::process::{pidfd_of, wait_any};
pub use crate::state::{allocated, define, Spec};
use crate::state::{now_ms, BackendMode, Observed, Root, RunState, VmConfig, VmDir};
use crate::supervisor::KILL_MARKER;

/// What a VM's clone of `image` is made from: the image itself if it is
/// sealed, else a snapshot of it made now (`vmctl-NAME`, as `img clone
/// --seal` does; `vmctl-NAME-2` and on when an earlier VM of that name
/// left its snapshot, which stays in the image's chain).
pub fn clone_source(image: &Path, name: &str) -> Result<PathBuf> {
    let env = RealEnv;
    let base =
        Layer::open(&env, image, false).with_context(|| format!("--image {}", image.display()))?;
    if base.header.sealed() {
        return Ok(image.to_path_buf());
    }
    if let Some(last) = unchanged_since_sealed(&env, &base)? {
        return Ok(last);
    }
    drop(base);
    let snapshot = std::iter::once(format!("vmctl-{name}"))
        .chain((2..).map(|n| format!("vmctl-{name}-{n}")))
        .find(|s| !ops::snapshot_path(image, s).exists())
        .expect("an unbounded sequence of names has a free one");
    ops::snapshot_create(&env, image, &snapshot)
        .with_context(|| format!("--image {}: snapshotting it to clone it", image.display()))
}

/// A VM's vCPUs, disk queues, memory and boot files, checked as the vmm
/// would check them at start (one definition: vmm::config) and against
/// this host now.
fn check_resources(
    cpus: u8,
    queues: u16,
    memory: u64,
    kernel: &Option<PathBuf>,
    initrd: &Option<PathBuf>,
) -> Result<()> {
    use vmm::config::{memory_problem, MAX_CPUS, MAX_DISK_QUEUES};
    if !(1..=MAX_CPUS).contains(&cpus) {
        bail!("--cpus {cpus}: 1 to {MAX_CPUS}");
    }
    if !(1..=MAX_DISK_QUEUES).contains(&queues) {
        bail!("--queues {queues}: 1 to {MAX_DISK_QUEUES}");
    }
    if let Some(why) = memory_problem(memory) {
        bail!("--memory {why}");
    }
    if let Some(total) = host_memory() {
        if memory > total {
            bail!("--memory {memory} bytes: more than this host has ({total} bytes)");
        }
    }
    for (what, p) in [("--kernel", kernel), ("--initrd", initrd)] {
        if let Some(p) = p {
            if !p.is_file() {
                bail!("{what} {}: no such file", p.display());
            }
        }
    }
    Ok(())
}

/// The host's memory (MemTotal), if /proc says.
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The sealed layer a working image stands on, when the image holds
/// nothing of its own (not a block written since that seal) and is closed
/// cleanly: a new seal would hold the same disk, one layer deeper.
fn unchanged_since_sealed(env: &RealEnv, top: &Layer) -> Result<Option<PathBuf>> {
    let Some(parent) = top.parent_path() else {
        return Ok(None);
    };
    // Open for writing anywhere (a served disk is marked dirty only at
    // its first write): not unchanged for sure; the snapshot it would
    // need is refused with the holder's name.
    if top.header.dirty()
        || env
            .lock(&top.path, image_format::lock::LockKind::Shared, "clone")
            .is_err()
    {
        return Ok(None);
    }
    let (data, zero) = top
        .load_map()
        .with_context(|| format!("--image {}", top.path.display()))?
        .counts();
    if data + zero > 0 {
        return Ok(None);
    }
    match Layer::open(env, &parent, false) {
        Ok(p) if p.header.sealed() && p.header.virtual_size == top.header.virtual_size => {
            Ok(Some(parent))
        }
        _ => Ok(None),
    }
}

/// The snapshot vmctl made of a working image to clone it (`IMAGE@vmctl-*`,
/// see [`clone_source`]): the working image and the snapshot's name.
fn made_for_cloning(base: &Path) -> Option<(PathBuf, String)> {
    let file = base.file_name()?.to_str()?;
    let (image, snap) = file.rsplit_once('@')?;
    if !snap.starts_with("vmctl-") {
        return None;
    }
    let image = base.with_file_name(image);
    (ops::snapshot_path(&image, snap) == base).then_some((image, snap.to_string()))
}

/// Folds the snapshot vmctl made of a working image for VM clones back
/// into the image once no clone stands on it any more, so creating and
/// deleting VMs from a working image does not deepen its chain. Left in
/// place when something still needs it or the
/// image is in use: it is a complete snapshot either way, and the next
/// delete of a VM cloned from it tries again.
fn release_clone_source(base: &Path) {
    let Some((image, snap)) = made_for_cloning(base) else {
        return;
    };
    if !base.exists() || !image.exists() {
        return;
    }
    let env: std::sync::Arc<dyn Env> = std::sync::Arc::new(RealEnv);
    let _ = ops::snapshot_delete(&env, &image, &snap, &mut |_, _| {});
}

/// Defines VM `name` and gives it its own writable clone of the image (a
/// working image is snapshotted first, as `img clone --seal` does).
/// Nothing is left behind when it fails.
pub fn create(root: &Root, name: &str, spec: &Spec) -> Result<VmDir> {
    check_resources(
        spec.cpus,
        spec.queues,
        spec.memory,
        &spec.kernel,
        &spec.initrd,
    )?;
    spec.placement.check()?;
    if !spec.image.exists() {
        bail!("--image {}: no such image", spec.image.display());
    }
    // Kept absolute: the VM starts later, from any directory.
    let absolute = |p: &Option<PathBuf>| -> Result<Option<PathBuf>> {
        p.as_deref()
            .map(|p| std::path::absolute(p).with_context(|| format!("resolving {}", p.display())))
            .transpose()
    };
    let (kernel, initrd) = (absolute(&spec.kernel)?, absolute(&spec.initrd)?);
    let image = std::path::absolute(&spec.image)
        .with_context(|| format!("resolving {}", spec.image.display()))?;
    define(root, name, |vm| {
        let env = RealEnv;
        let base_path = clone_source(&image, name)?;
        // The user's image above is flushed as ever; only the clone is
        // scratch.
        let clone_env: &dyn Env = if spec.scratch { &VolatileEnv } else { &env };
        let clone = ops::clone(clone_env, &base_path, &vm.disk())
            .with_context(|| format!("cloning {}", base_path.display()))?;
        if let Some(size) = spec.disk_size {
            let have = clone.header.virtual_size;
            drop(clone);
            if size < have {
                bail!("--disk-size {size}: smaller than the image's {have} bytes");
            }
            ops::resize(clone_env, &vm.disk(), size).context("--disk-size")?;
        }
        // Its address chosen and its definition written under one lock:
        // two VMs created at once get two addresses.
        let _allocating = spec
            .net
            .as_ref()
            .map(|_| crate::network::allocation_lock(root))
            .transpose()?;
        let net = match &spec.net {
            Some(bridge) => {
                let others: Vec<VmConfig> = root
                    .list()?
                    .iter()
                    .filter(|o| o.name != name)
                    .filter_map(|o| o.config().ok())
                    .collect();
                Some(crate::network::allocate(
                    root, name, bridge, spec.nat, &others,
                )?)
            }
            None => None,
        };
        vm.write_config(&VmConfig {
            name: name.to_string(),
            image: base_path.display().to_string(),
            kernel,
            initrd,
            cmdline: spec.cmdline.clone(),
            cpus: spec.cpus,
            memory: spec.memory,
            queues: spec.queues,
            backend: spec.backend,
            created_unix: now_ms() / 1000,
            restore: spec.restore.clone(),
            net,
            shares: spec.shares.clone(),
            autostart: false,
            placement: spec.placement.clone(),
            disk_limits: spec.disk_limits.clone(),
        })?;
        Ok(())
    })
}

/// What `vmctl set` changes in a VM's definition (None: unchanged).
#[derive(Default)]
pub struct Changes {
    pub cpus: Option<u8>,
    pub memory: Option<u64>,
    pub queues: Option<u16>,
    pub cmdline: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub shares: Option<Vec<crate::state::Share>>,
    pub autostart: Option<bool>,
    /// Its disk grown to this size (the new space reads as zeros).
    pub disk_size: Option<u64>,
    /// A NIC on this bridge from now on (`Some(None)`: no NIC).
    pub net: Option<Option<String>>,
    /// With a new NIC: its bridge masqueraded.
    pub nat: bool,
    /// Its vCPUs' host CPUs from now on (`Some(None)`: anywhere).
    pub vcpu_affinity: Option<Option<cpu_affinity::CpuList>>,
    /// Its disk workers' host CPUs from now on (`Some(None)`: anywhere).
    pub disk_worker_cpus: Option<Option<cpu_affinity::CpuList>>,
    /// Its disk's operations a second at most (`Some(None)`: unlimited);
    /// changed live on a running VM, as `disk_bw`.
    pub disk_iops: Option<Option<u64>>,
    /// Its disk's bytes a second at most.
    pub disk_bw: Option<Option<u64>>,
}

/// `vmctl set NAME ...`: a defined VM's definition changed, checked as
/// `create` checks it; the VM must not be running (the change applies
/// from its next start), except for autostart and the disk's limits,
/// which a running VM takes at once. Whether the change reached a
/// running VM.
pub fn set(root: &Root, name: &str, ch: &Changes) -> Result<bool> {
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    let mut c = vm.config()?;
    let only_autostart = ch.cpus.is_none()
        && ch.memory.is_none()
        && ch.queues.is_none()
        && ch.cmdline.is_none()
        && ch.kernel.is_none()
        && ch.initrd.is_none()
        && ch.shares.is_none()
        && ch.disk_size.is_none()
        && ch.net.is_none()
        && ch.vcpu_affinity.is_none()
        && ch.disk_worker_cpus.is_none();
    let running = vm.observed()?.is_active();
    if !only_autostart && running {
        bail!("VM {name} is running: stop it first (its definition changes for its next start)");
    }
    let absolute = |p: &PathBuf| -> Result<PathBuf> {
        std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
    };
    if let Some(v) = ch.cpus {
        c.cpus = v;
    }
    if let Some(v) = ch.memory {
        c.memory = v;
    }
    if let Some(v) = ch.queues {
        c.queues = v;
    }
    if let Some(v) = &ch.cmdline {
        c.cmdline = v.clone();
    }
    if let Some(v) = &ch.kernel {
        c.kernel = Some(absolute(v)?);
    }
    if let Some(v) = &ch.initrd {
        c.initrd = Some(absolute(v)?);
    }
    if let Some(v) = &ch.shares {
        c.shares = v.clone();
    }
    if let Some(v) = ch.autostart {
        c.autostart = v;
    }
    if let Some(v) = &ch.vcpu_affinity {
        c.placement.vcpus = v.clone();
    }
    if let Some(v) = &ch.disk_worker_cpus {
        c.placement.disk_workers = v.clone();
    }
    let limits_changed = ch.disk_iops.is_some() || ch.disk_bw.is_some();
    if let Some(v) = ch.disk_iops {
        c.disk_limits.limits.ops = v.map(rate_limit::BucketSpec::per_second);
    }
    if let Some(v) = ch.disk_bw {
        c.disk_limits.limits.bytes = v.map(rate_limit::BucketSpec::per_second);
    }
    c.disk_limits
        .limits
        .check()
        .context("--disk-iops/--disk-bw")?;
    check_resources(c.cpus, c.queues, c.memory, &c.kernel, &c.initrd)?;
    c.placement.check()?;
    // The NIC: a new one (its address allocated as create does) or none;
    // its address is free again once the definition says so.
    let _allocating = ch
        .net
        .as_ref()
        .map(|_| crate::network::allocation_lock(root))
        .transpose()?;
    if let Some(net) = &ch.net {
        c.net = match net {
            None => None,
            Some(bridge) => {
                let others: Vec<VmConfig> = root
                    .list()?
                    .iter()
                    .filter(|o| o.name != name)
                    .filter_map(|o| o.config().ok())
                    .collect();
                Some(crate::network::allocate(
                    root, name, bridge, ch.nat, &others,
                )?)
            }
        };
    }
    if let Some(size) = ch.disk_size {
        let have = Layer::open(&RealEnv, &vm.disk(), false)
            .with_context(|| format!("{}", vm.disk().display()))?
            .header
            .virtual_size;
        if size < have {
            bail!("--disk-size {size}: smaller than the disk's {have} bytes (disks only grow)");
        }
        if size > have {
            ops::resize(&RealEnv, &vm.disk(), size).context("--disk-size")?;
        }
    }
    vm.write_config(&c)?;
    if running && limits_changed {
        apply_disk_limits(root, &vm, &c)?;
    }
    Ok(running && limits_changed)
}

/// A running VM's disk held to its definition's limits from its next
/// request, by whichever blk-backend serves it.
fn apply_disk_limits(root: &Root, vm: &VmDir, c: &VmConfig) -> Result<()> {
    let l = &c.disk_limits;
    match c.backend {
        BackendMode::Host => HostBackend::of(root)?.set_limits(&vm.name, l),
        BackendMode::Vm => Ok(
            crate::host_backend::control(&vm.backend_control())?.set_limits(
                &vm.disk_socket(),
                l.limits,
                l.group.as_deref(),
            )?,
        ),
    }
    .with_context(|| format!("changing the running VM {}'s disk limits", vm.name))
}

/// Starts the VM's supervisor (detached: it outlives vmctl and the
/// terminal) and waits until the VM runs or fails.
pub fn start(root: &Root, name: &str) -> Result<()> {
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    let starting = start_locked(root, &vm)?;
    wait_started(&vm, &starting)
}

/// A supervisor on its way up: its word that the VM runs (true), then
/// its end (false).
pub struct Starting {
    said: std::sync::mpsc::Receiver<bool>,
}

impl Starting {
    /// Until the supervisor ended (the VM did, and its end is recorded).
    pub fn wait_ended(&self) {
        while let Ok(true) = self.said.recv() {}
    }
}

/// Refuses a VM that runs; removes what its last run left (the caller
/// holds the VM's lock).
fn clear_for_start(vm: &VmDir) -> Result<()> {
    if vm.observed()?.is_active() {
        bail!("VM {} is already running", vm.name);
    }
    for stale in [vm.api_socket(), vm.status_path()] {
        let _ = std::fs::remove_file(stale);
    }
    Ok(())
}

/// Spawns the supervisor; the caller holds the VM's lock.
pub fn start_locked(root: &Root, vm: &VmDir) -> Result<Starting> {
    clear_for_start(vm)?;
    let exe = std::env::current_exe().context("finding vmctl itself")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm.path.join("supervisor.log"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir")
        .arg(&root.path)
        .arg("__supervise")
        .arg(&vm.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    crate::process::own_session(&mut cmd);
    let mut child = cmd.spawn().context("starting the VM's supervisor")?;
    let out = child.stdout.take();
    let (tx, said) = std::sync::mpsc::channel();
    // Its one line (or the end of its output), then reaped when it ends,
    // however long this vmctl lives (a fleet run).
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        if let Some(out) = out {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let _ = tx.send(line.trim() == "running");
        let _ = child.wait();
        let _ = tx.send(false);
    });
    Ok(Starting { said })
}

/// Supervises the VM from a thread of this process (a fleet run: its
/// VMs live as long as it does, and no process per VM is spawned for
/// them). The caller holds the VM's lock.
pub fn start_in_process(root: &Root, vm: &VmDir) -> Result<Starting> {
    clear_for_start(vm)?;
    // Recorded before the caller lets go of the VM's lock: a start racing
    // this one then sees it active.
    let begun = crate::supervisor::begin(vm)?;
    let (tx, said) = std::sync::mpsc::channel();
    let (root, vm) = (root.clone(), vm.clone());
    std::thread::Builder::new()
        .name(format!("supervise {}", vm.name))
        .spawn(move || {
            let ready = tx.clone();
            if let Err(e) = crate::supervisor::supervise_begun(&root, &vm, begun, move || {
                let _ = ready.send(true);
            }) {
                // Recorded in its status; here for the supervisor log.
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(vm.path.join("supervisor.log"))
                    .and_then(|mut f| writeln!(f, "vmctl: error: {}", cli_support::report(&e)));
            }
            let _ = tx.send(false);
        })
        .context("starting a supervisor thread")?;
    Ok(Starting { said })
}

/// Until the VM runs (its API answers) or its start failed.
pub fn wait_started(vm: &VmDir, starting: &Starting) -> Result<()> {
    // Starting takes milliseconds (an export, a vmm, a boot); a start
    // that has not happened after a minute is stuck.
    let running = match starting.said.recv_timeout(Duration::from_secs(60)) {
        Ok(running) => running,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            bail!("VM {} did not start within 60 s", vm.name)
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => false,
    };
    if running {
        return Ok(());
    }
    let status = vm.status()?;
    match status.as_ref().map(|s| s.state) {
        Some(RunState::Exited) => Ok(()),
        Some(RunState::Failed) => bail!(
            "VM {} failed to start: {}",
            vm.name,
            status.and_then(|s| s.reason).unwrap_or_default()
        ),
        _ => bail!(
            "VM {}: its supervisor ended at start (see {})",
            vm.name,
            vm.path.join("supervisor.log").display()
        ),
    }
}

fn require_running(vm: &VmDir) -> Result<()> {
    match vm.observed()? {
        Observed::Running => Ok(()),
        other => bail!("VM {} is not running ({other})", vm.name),
    }
}

/// Pauses a running VM; one paused already stays so. Whether it was
/// running until now.
pub fn pause(root: &Root, name: &str) -> Result<bool> {
    set_paused(root, name, true)
}

/// Resumes a paused VM; one running already goes on. Whether it was
/// paused until now.
pub fn resume(root: &Root, name: &str) -> Result<bool> {
    set_paused(root, name, false)
}

/// Pause and resume, both idempotent (as `virsh suspend`/`resume` of a
/// domain already so are not: a script wants the state, not a quarrel).
fn set_paused(root: &Root, name: &str, paused: bool) -> Result<bool> {
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    require_running(&vm)?;
    if crate::vm_api::paused(&vm)? == paused {
        return Ok(false);
    }
    if paused {
        crate::vm_api::pause(&vm)?;
    } else {
        crate::vm_api::resume(&vm)?;
    }
    Ok(true)
}

/// Until the VM is no longer active (true), or `deadline` passed (false).
/// Its supervisor holds the run lock from before it records "starting"
/// until it has recorded the end, and its death lets go of it too: this
/// waits for the lock, and so wakes when the record is there.
fn until_ended(vm: &VmDir, deadline: Option<Instant>) -> Result<bool> {
    loop {
        if !vm.observed()?.is_active() {
            return Ok(true);
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Ok(false);
        }
        if let Some(released) = crate::state::lock_released(&vm.run_lock_path())? {
            wait_any(&[&released], left);
            continue;
        }
        // Nobody holds the lock, yet the record says active: a supervisor
        // on its way out (a killed process lets go of its locks before it
        // is gone) or one from a vmctl before the run lock. Its end is the
        // news.
        let supervisor = vm.status()?.and_then(|s| s.supervisor_pid);
        match supervisor.map(pidfd_of) {
            Some(Ok(gone)) => {
                wait_any(&[&gone], left);
            }
            // Gone already: the record reads as ended now.
            _ => {
                if vm.observed()?.is_active() {
                    // Not the supervisor's record any more (it would read
                    // as ended): a new run began meanwhile, wait for it.
                    continue;
                }
                return Ok(true);
            }
        }
    }
}

/// Until the VM is no longer active, or `limit` passed (false).
fn wait_ended(vm: &VmDir, limit: Duration) -> Result<bool> {
    until_ended(vm, Some(Instant::now() + limit))
}

/// Graceful shutdown through the API; forced after `timeout`.
pub fn stop(root: &Root, name: &str, timeout: Duration) -> Result<Observed> {
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    stop_locked(&vm, timeout)
}

fn stop_locked(vm: &VmDir, timeout: Duration) -> Result<Observed> {
    if !vm.observed()?.is_active() {
        bail!("VM {} is not running ({})", vm.name, vm.observed()?);
    }
    let asked = crate::vm_api::shutdown(vm).is_ok();
    if !asked || !wait_ended(vm, timeout)? {
        kill_locked(vm)?;
    }
    Ok(vm.observed()?)
}

pub fn kill(root: &Root, name: &str) -> Result<Observed> {
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    if !vm.observed()?.is_active() {
        bail!("VM {} is not running ({})", vm.name, vm.observed()?);
    }
    kill_locked(&vm)?;
    Ok(vm.observed()?)
}

fn kill_locked(vm: &VmDir) -> Result<()> {
    std::fs::write(vm.path.join(KILL_MARKER), b"")?;
    if let Some(pid) = vm.status()?.and_then(|s| s.vmm_pid) {
        // The VM's vmm, whose pid its supervisor recorded and which is
        // still alive (checked by observed()).
        let _ = crate::process::signal(pid, rustix::process::Signal::KILL);
    }
    // The supervisor records the end within milliseconds of the vmm's.
    if !wait_ended(vm, Duration::from_secs(30))? {
        bail!("VM {}: still running after SIGKILL", vm.name);
    }
    Ok(())
}

pub fn restart(root: &Root, name: &str, timeout: Duration) -> Result<()> {
    let vm = root.vm(name)?;
    let _lock = vm.lock()?;
    if vm.observed()?.is_active() {
        stop_locked(&vm, timeout)?;
    }
    let starting = start_locked(root, &vm)?;
    wait_started(&vm, &starting)
}

/// Removes the VM: its clone, sockets, logs and state.
pub fn delete(root: &Root, name: &str, force: bool) -> Result<()> {
    let vm = match root.vm(name) {
        // What a create cut short left: removed, as the user asked.
        Err(crate::state::StateError::NoSuchVm(_)) if root.take_over_half_made(name) => {
            return Ok(());
        }
        r => r?,
    };
    let _lock = vm.lock()?;
    // Their disks are sealed layers below this VM's, in its directory.
    let snapshots = crate::snapshots::of_vm(root, name)?;
    if !snapshots.is_empty() {
        bail!(
            "VM {name} has snapshots ({}): delete them first (vmctl snapshot-delete SNAPSHOT)",
            snapshots.join(", ")
        );
    }
    if vm.observed()?.is_active() {
        if !force {
            bail!("VM {name} is running: stop it first (vmctl stop {name}), or delete --force");
        }
        kill_locked(&vm)?;
    }
    let base = vm.config().ok().map(|c| PathBuf::from(c.image));
    std::fs::remove_dir_all(&vm.path).with_context(|| format!("removing {}", vm.path.display()))?;
    if let Some(base) = base {
        release_clone_source(&base);
    }
    Ok(())
}

/// Bytes the VM's own disk layers occupy: its top and the sealed layers
/// below it that live in its directory (its snapshots' and backups'), not
/// the base image it shares with others.
fn disk_bytes(vm: &VmDir) -> u64 {
    let Ok(chain) = image_format::disk::open_chain(&RealEnv, &vm.disk(), false) else {
        return allocated(&vm.disk());
    };
    chain
        .iter()
        .filter(|l| l.path.parent() == Some(vm.path.as_path()))
        .map(|l| allocated(&l.path))
        .sum()
}

/// One VM as `list` and `info` show it.
pub fn describe(root: &Root, vm: &VmDir) -> Result<VmInfo> {
    let c = vm.config()?;
    let status = vm.status()?;
    let observed = vm.observed()?;
    let mut state = match &observed {
        Observed::Exited(_) => "exited".to_string(),
        Observed::Failed(_) => "failed".to_string(),
        o => o.to_string(),
    };
    if observed == Observed::Running && crate::vm_api::paused(vm).unwrap_or(false) {
        state = "paused".into();
    }
    let active = observed.is_active();
    // The process serving its disk now, and its restarts during this run.
    let (backend_pid, backend_restarts) = match c.backend {
        BackendMode::Vm => (
            status
                .as_ref()
                .filter(|_| active)
                .and_then(|s| s.backend_pid),
            status.as_ref().map_or(0, |s| s.backend_restarts),
        ),
        BackendMode::Host => match (HostBackend::at(root).status(), &status) {
            (Some(h), Some(s)) if active => (
                h.backend_pid,
                h.restarts.saturating_sub(s.host_restarts_at_start),
            ),
            // Counted by its supervisor when the run ended.
            (_, s) => (None, s.as_ref().map_or(0, |s| s.backend_restarts)),
        },
    };
    let uptime_s = status
        .as_ref()
        .filter(|_| active)
        .map(|s| (now_ms().saturating_sub(s.started_unix_ms)) as f64 / 1000.0);
    Ok(VmInfo {
        name: c.name,
        state,
        exit_status: match observed {
            Observed::Exited(n) => Some(n),
            _ => None,
        },
        reason: match &observed {
            Observed::Failed(r) => Some(r.clone()),
            _ => status.as_ref().and_then(|s| s.reason.clone()),
        },
        pid: status.as_ref().filter(|_| active).and_then(|s| s.vmm_pid),
        cpus: c.cpus,
        vcpu_affinity: c.placement.vcpus.as_ref().map(ToString::to_string),
        disk_worker_cpus: c.placement.disk_workers.as_ref().map(ToString::to_string),
        memory: c.memory,
        image: c.image,
        disk: vm.disk(),
        disk_bytes: disk_bytes(vm),
        disk_iops: c.disk_limits.limits.ops.map(|b| b.size),
        disk_bw: c.disk_limits.limits.bytes.map(|b| b.size),
        disk_limit_group: c.disk_limits.group.clone(),
        uptime_s,
        backend: c.backend.to_string(),
        backend_restarts,
        backend_pid,
        kernel: c.kernel,
        cmdline: c.cmdline,
        queues: c.queues,
        address: c.net.as_ref().map(|n| n.address.to_string()),
        mac: c.net.as_ref().map(|n| n.mac.clone()),
        bridge: c.net.as_ref().map(|n| n.bridge.clone()),
        tap: c.net.as_ref().filter(|_| active).map(|n| n.tap.clone()),
        shares: c
            .shares
            .iter()
            .map(|s| ShareInfo {
                dir: s.dir.clone(),
                tag: s.tag.clone(),
            })
            .collect(),
        dir: vm.path.clone(),
    })
}

/// Until every VM has ended, or `limit` (from now) passed: each one's
/// state then (one still running shows as running).
pub fn wait(
    root: &Root,
    names: &[String],
    limit: Option<Duration>,
) -> Result<Vec<(String, Observed)>> {
    let vms: Vec<VmDir> = names.iter().map(|n| root.vm(n)).collect::<Result<_, _>>()?;
    let deadline = limit.map(|l| Instant::now() + l);
    let mut out = Vec::new();
    for vm in vms {
        until_ended(&vm, deadline)?;
        out.push((vm.name.clone(), vm.observed()?));
    }
    Ok(out)
}
