//! The host's disk backend, vmctl's default: one `blk-backend --control`
//! per state root serves every running VM's disk (measured against a
//! backend per VM in docs/benchmarks.md: less memory per VM and faster
//! starts). A small daemon (`vmctl __backend`, started by the first VM
//! that needs it, in a session of its own) owns that process:
//!
//! - Each VM's supervisor registers its export in `backend/exports/NAME.json`
//!   and adds it through the control socket (`export-add`); when its vmm
//!   ends it removes the entry and the export (`export-del`).
//! - When `blk-backend` dies the daemon starts it again at once and adds
//!   every registered export back: each vmm reconnects with its inflight
//!   state and its guest sees nothing.
//! - An entry whose supervisor is gone (killed) is dropped; with nothing
//!   registered for a while the daemon ends, and the next VM starts it again.
//!
//! `backend/registry.lock` orders registrations against the daemon's
//! re-adds and its decision to end; `backend/daemon.lock` keeps it to one
//! daemon per state root.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blk_control::{Client, ClientError, ErrorClass, ExportArgs};
use serde::{Deserialize, Serialize};

use crate::binaries;
use crate::process;
use crate::state::{alive, boot_id, lock_file, now_ms, read_json, write_json, Root};
use cli_support::path_wait;

/// How long the daemon outlives its last export (a fleet's VMs come and go
/// one after another; a new daemon costs a process start).
const LINGER: Duration = Duration::from_secs(2);
/// How often the daemon looks for entries whose supervisor is gone (each
/// look reads every entry: 0.4 ms for two VMs here, so a quarter of a
/// second cost a host at rest more than its VMs did).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// One VM's export, as registered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportEntry {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub num_queues: u16,
    /// Its queue workers' host CPUs (`worker_cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_cpus: Option<cpu_affinity::CpuList>,
    /// Its rate limits and group, as the VM's definition has them now.
    #[serde(default, skip_serializing_if = "crate::state::DiskLimits::is_none")]
    pub limits: crate::state::DiskLimits,
    /// The VM's supervisor: when it is gone, so is the entry.
    pub owner_pid: u32,
}

/// A rate-limit group, as registered: its limits, and the process whose
/// VMs use it (a `vmctl run`); when that process is gone, so is the group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupEntry {
    pub limits: rate_limit::Limits,
    pub owner_pid: u32,
}

/// What the daemon tells `vmctl info` about the process it runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostStatus {
    pub daemon_pid: u32,
    pub backend_pid: Option<u32>,
    /// How many times blk-backend died and was started again.
    pub restarts: u32,
    pub boot_id: String,
    pub started_unix_ms: u64,
}

/// How long a command's answer may take: commands take milliseconds (an
/// image opened, closed or sealed); one that has not answered in a minute
/// will not.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// A connection to the blk-backend control socket at `path`, for a
/// command or a few.
pub fn control(path: &Path) -> Result<Client, ClientError> {
    Client::connect(path, Some(ANSWER_WITHIN))
}

pub struct HostBackend {
    root: PathBuf,
    dir: PathBuf,
}

impl HostBackend {
    /// The host backend of `root`, its directory made if needed.
    pub fn of(root: &Root) -> Result<HostBackend> {
        let host = HostBackend::at(root);
        std::fs::create_dir_all(host.dir.join("exports"))
            .with_context(|| format!("creating {}", host.dir.display()))?;
        Ok(host)
    }

    /// The host backend of `root`, to read its status (creates nothing).
    pub fn at(root: &Root) -> HostBackend {
        HostBackend {
            root: root.path.clone(),
            dir: root.path.join("backend"),
        }
    }

    pub fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn entry(&self, name: &str) -> PathBuf {
        self.dir.join("exports").join(format!("{name}.json"))
    }

    fn status_path(&self) -> PathBuf {
        self.dir.join("status.json")
    }

    /// The daemon's status, when one runs on this boot.
    pub fn status(&self) -> Option<HostStatus> {
        let s: HostStatus = read_json(&self.status_path()).ok()?;
        (s.boot_id == boot_id() && alive(s.daemon_pid)).then_some(s)
    }

    fn registry_lock(&self) -> Result<std::fs::File> {
        lock_file(&self.dir.join("registry.lock"), true)?.context("the backend registry's lock")
    }

    /// Registers VM `name`'s export and has the host backend serve it,
    /// starting the daemon when none runs.
    pub fn attach(&self, name: &str, entry: &ExportEntry) -> Result<()> {
        let _lock = self.registry_lock()?;
        write_json(&self.entry(name), entry)?;
        let added = self.ensure_running().and_then(|()| match self.add(entry) {
            Err(e) if e.is_refused(ErrorClass::ExportExists) => Ok(()),
            other => Ok(other?),
        });
        if added.is_err() {
            let _ = std::fs::remove_file(self.entry(name));
        }
        added
    }

    fn group_file(&self, name: &str) -> PathBuf {
        self.dir.join("groups").join(format!("{name}.json"))
    }

    /// Makes (or changes) rate-limit group `name` on the host backend,
    /// registered so that a restarted backend has it again.
    pub fn set_group(&self, name: &str, limits: rate_limit::Limits) -> Result<()> {
        let _lock = self.registry_lock()?;
        std::fs::create_dir_all(self.dir.join("groups"))?;
        let entry = GroupEntry {
            limits,
            owner_pid: std::process::id(),
        };
        write_json(&self.group_file(name), &entry)?;
        self.ensure_running()?;
        Ok(self.client()?.group_set(name, limits)?)
    }

    /// Removes group `name` (its exports gone first).
    pub fn remove_group(&self, name: &str) -> Result<()> {
        let _lock = self.registry_lock()?;
        let _ = std::fs::remove_file(self.group_file(name));
        match self.client().and_then(|mut c| c.group_del(name)) {
            Err(e) if !e.is_unreachable() && !e.to_string().contains("no rate-limit group") => {
                Err(e.into())
            }
            _ => Ok(()),
        }
    }

    /// VM `name`'s export held to `limits` from its next request (and so
    /// registered, for a restarted backend).
    pub fn set_limits(&self, name: &str, limits: &crate::state::DiskLimits) -> Result<()> {
        let _lock = self.registry_lock()?;
        let path = self.entry(name);
        let mut e: ExportEntry = read_json(&path).context("the VM's export is not registered")?;
        e.limits = limits.clone();
        write_json(&path, &e)?;
        Ok(self
            .client()?
            .set_limits(&e.socket, limits.limits, limits.group.as_deref())?)
    }

    fn registered_groups(&self) -> Vec<(String, GroupEntry)> {
        let Ok(dir) = std::fs::read_dir(self.dir.join("groups")) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter_map(|p| {
                let name = p.file_stem()?.to_str()?.to_string();
                read_json(&p).ok().map(|g| (name, g))
            })
            .collect()
    }

    /// Unregisters the VM's export and ends it (its image closes cleanly
    /// before this returns).
    pub fn detach(&self, name: &str, socket: &Path) -> Result<()> {
        let _lock = self.registry_lock()?;
        let _ = std::fs::remove_file(self.entry(name));
        match self.client().and_then(|mut c| c.del(socket)) {
            Ok(()) => Ok(()),
            // Not served (the backend restarted without it, or is gone):
            // nothing holds the image.
            Err(e) if e.is_refused(ErrorClass::DeviceNotFound) || e.is_unreachable() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn add(&self, e: &ExportEntry) -> Result<(), ClientError> {
        self.client()?.add(ExportArgs {
            num_queues: Some(e.num_queues.into()),
            worker_cpus: e.worker_cpus.clone(),
            limits: e.limits.limits,
            limit_group: e.limits.group.clone(),
            ..ExportArgs::new(&e.socket, &e.image)
        })
    }

    /// A connection to the backend's control socket.
    fn client(&self) -> Result<Client, ClientError> {
        control(&self.control())
    }

    fn reachable(&self) -> bool {
        UnixStream::connect(self.control()).is_ok()
    }

    /// Starts the daemon unless its backend answers; until it does. The
    /// caller holds the registry lock, so two VMs never start two daemons.
    fn ensure_running(&self) -> Result<()> {
        if self.reachable() {
            return Ok(());
        }
        // A daemon lives whose backend does not answer: it is starting
        // that again (it ended), or the daemon is on its way out. Until it
        // answers, or the daemon is gone and another is needed.
        if let Some(pid) = self.status().map(|s| s.daemon_pid) {
            if let Ok(daemon) = process::pidfd_of(pid) {
                let until = Instant::now() + START_PATIENCE;
                if until_answers(self, daemon.as_fd(), until).0 == path_wait::Waited::Appeared {
                    return Ok(());
                }
            }
        }
        self.spawn_daemon_until(|| self.reachable())
    }

    /// Starts a daemon again when the one that ran is gone (killed): it
    /// adopts the blk-backend that still serves, or starts one. Any
    /// supervisor that sees the daemon end calls this; the one daemon lock
    /// keeps it to one.
    pub fn revive(&self) -> Result<HostStatus> {
        let _lock = self.registry_lock()?;
        if let Some(s) = self.status() {
            return Ok(s);
        }
        self.spawn_daemon_until(|| self.status().is_some() && self.reachable())?;
        self.status()
            .context("the host backend's daemon ended as it started")
    }

    /// Spawns `vmctl __backend`; until `up` holds (or it ended).
    fn spawn_daemon_until(&self, up: impl Fn() -> bool) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        let mut cmd = Command::new(std::env::current_exe().context("finding vmctl itself")?);
        cmd.arg("--state-dir")
            .arg(&self.root)
            .arg("__backend")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        crate::process::own_session(&mut cmd);
        // The daemon says it serves on a pipe (a byte, or its end if it
        // ends first): waited for with its pidfd, not looked for.
        let (ready, said) = process::Ready::pipe(&mut cmd)?;
        let mut daemon = cmd.spawn().context("starting the host backend's daemon")?;
        drop(said);
        let ended = process::pidfd(&daemon)?;
        // Starting blk-backend takes milliseconds; one that has not
        // answered in 30 s is stuck.
        let deadline = Instant::now() + START_PATIENCE;
        let mut ready = Some(ready);
        let outcome = loop {
            if up() {
                break Ok(());
            }
            if let Some(st) = daemon.try_wait()? {
                break Err(anyhow::anyhow!(
                    "the host backend's daemon ended at start ({st}); see {}",
                    self.dir.join("daemon.log").display()
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(anyhow::anyhow!(
                    "the host backend did not answer within 30 s"
                ));
            }
            let mut fds: Vec<&dyn AsFd> = vec![&ended];
            if let Some(r) = &ready {
                fds.push(r);
            }
            let woke = process::wait_any(&fds, Some(left));
            if woke.get(1) == Some(&true) {
                // Said (up is true now), or its end: waited on no more.
                ready = None;
            }
        };
        // Reaped whenever it ends (it outlives this process).
        std::thread::spawn(move || {
            let _ = daemon.wait();
        });
        outcome
    }

    fn registered(&self) -> Vec<(PathBuf, ExportEntry)> {
        let Ok(dir) = std::fs::read_dir(self.dir.join("exports")) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| read_json(&p).ok().map(|e| (p, e)))
            .collect()
    }
}

/// The blk-backend the daemon watches: its child, or one a killed daemon
/// left serving and a new one adopted.
struct Watched {
    child: Option<Child>,
    pid: u32,
    end: OwnedFd,
    /// It ended (and was reaped if ours).
    done: bool,
}

/// However the daemon ends (an error too), its backend ends with it.
impl Drop for Watched {
    fn drop(&mut self) {
        if !self.done {
            self.stop();
        }
    }
}

impl Watched {
    fn child(child: Child) -> Result<Watched> {
        Ok(Watched {
            pid: child.id(),
            end: process::pidfd(&child)?,
            child: Some(child),
            done: false,
        })
    }

    /// The previous daemon's backend, when it still serves.
    fn adopt(host: &HostBackend, before: &HostStatus) -> Option<Watched> {
        let pid = before.backend_pid?;
        let end = process::pidfd_of(pid).ok()?;
        (before.boot_id == boot_id() && alive(pid) && host.reachable()).then_some(Watched {
            child: None,
            pid,
            end,
            done: false,
        })
    }

    /// How it ended (reaped, when it is our child).
    fn ended(&mut self) -> String {
        self.done = true;
        match self.child.as_mut().map(Child::wait) {
            Some(Ok(st)) => st.to_string(),
            _ => "ended".into(),
        }
    }

    /// SIGTERM (it closes every image), SIGKILL after a grace period.
    fn stop(&mut self) {
        // The backend we watch (alive: its pidfd is not readable, or the
        // signal goes nowhere).
        process::stop_pid(self.pid, &self.end, process::STOP_GRACE);
        self.ended();
    }
}

fn start_backend(host: &HostBackend) -> Result<Child> {
    // A dead predecessor's socket goes first: its presence then means this
    // one listens.
    let _ = std::fs::remove_file(host.control());
    let mut backend = Command::new(binaries::program("blk-backend")?)
        .arg("--control")
        .arg(host.control())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(host.dir.join("backend.log"))?,
        )
        .spawn()
        .context("starting blk-backend")?;
    let ended = process::pidfd(&backend)?;
    let (waited, _kept) = until_answers(host, ended.as_fd(), Instant::now() + START_PATIENCE);
    match waited {
        path_wait::Waited::Appeared => Ok(backend),
        path_wait::Waited::Woken => {
            let st = backend.wait()?;
            bail!(
                "blk-backend ended at start ({st}); its log: {}",
                host.dir.join("backend.log").display()
            )
        }
        path_wait::Waited::TimedOut => {
            process::stop(&mut backend, process::STOP_GRACE);
            bail!("blk-backend did not answer on its control socket within 30 s")
        }
    }
}

/// Starting blk-backend takes milliseconds; one that has not answered in
/// 30 s is stuck.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// Until the backend's control socket answers (`Appeared`), `ended` is
/// readable (`Woken`) or `until` passed. The socket appears when a backend
/// binds it (a dead backend's is removed as soon as it is seen dead),
/// waited for, not looked for; it answers once that backend listens,
/// microseconds later: that window alone is looked at again, 1 ms apart.
fn until_answers(
    host: &HostBackend,
    ended: BorrowedFd<'_>,
    until: Instant,
) -> (path_wait::Waited, path_wait::Kept) {
    loop {
        let (waited, kept) = path_wait::wait_for(&host.control(), Some(until), &[ended]);
        if waited != path_wait::Waited::Appeared || host.reachable() {
            return (waited, kept);
        }
        if process::wait_any(&[&ended], Some(Duration::from_millis(1)))[0] {
            return (path_wait::Waited::Woken, kept);
        }
        if Instant::now() > until {
            return (path_wait::Waited::TimedOut, kept);
        }
    }
}

/// Adds every registered export whose supervisor lives; drops the others.
fn add_registered(host: &HostBackend) {
    let Ok(_lock) = host.registry_lock() else {
        return;
    };
    // The groups first: exports name them.
    for (name, g) in host.registered_groups() {
        if !alive(g.owner_pid) {
            let _ = std::fs::remove_file(host.group_file(&name));
            continue;
        }
        if let Err(err) = host.client().and_then(|mut c| c.group_set(&name, g.limits)) {
            cli_support::say!(
                "vmctl __backend: making rate-limit group {name} again: {}",
                cli_support::report(&err.into())
            );
        }
    }
    for (path, e) in host.registered() {
        if !alive(e.owner_pid) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match host.add(&e) {
            Err(err) if !err.is_refused(ErrorClass::ExportExists) => cli_support::say!(
                "vmctl __backend: adding {} back: {}",
                e.socket.display(),
                cli_support::report(&err.into())
            ),
            _ => {}
        }
    }
}

/// Drops entries whose supervisor is gone (and their exports).
fn drop_orphans(host: &HostBackend) {
    let orphans: Vec<_> = host
        .registered()
        .into_iter()
        .filter(|(_, e)| !alive(e.owner_pid))
        .collect();
    if orphans.is_empty() {
        return;
    }
    let Ok(_lock) = host.registry_lock() else {
        return;
    };
    // Read again under the lock: the VM may have started again meanwhile,
    // its new entry in the old one's place.
    for (path, _) in orphans {
        let Ok(e) = read_json::<ExportEntry>(&path) else {
            continue;
        };
        if alive(e.owner_pid) {
            continue;
        }
        let _ = std::fs::remove_file(&path);
        let _ = host.client().and_then(|mut c| c.del(&e.socket));
    }
}

/// Drops rate-limit groups whose `vmctl run` is gone (killed: its VMs,
/// threads of it, went with it), once no export is in them.
fn drop_orphan_groups(host: &HostBackend) {
    let orphans: Vec<String> = host
        .registered_groups()
        .into_iter()
        .filter(|(_, g)| !alive(g.owner_pid))
        .map(|(n, _)| n)
        .collect();
    if orphans.is_empty() {
        return;
    }
    let Ok(_lock) = host.registry_lock() else {
        return;
    };
    for name in orphans {
        match host.client().and_then(|mut c| c.group_del(&name)) {
            // Still in use (its exports not dropped yet): the next round.
            Err(e) if e.to_string().contains("is shared by") => {}
            _ => {
                let _ = std::fs::remove_file(host.group_file(&name));
            }
        }
    }
}

/// The daemon's whole life (`vmctl __backend`).
pub fn daemon(root: &Root) -> Result<()> {
    // Whoever started it waits for its word (taken first: nothing this
    // daemon starts inherits it).
    let ready = process::Said::inherited();
    let host = HostBackend::of(root)?;
    let Some(one) = the_one_daemon(&host, START_PATIENCE)? else {
        return Ok(());
    };
    let before: Option<HostStatus> = read_json(&host.status_path()).ok();
    let mut status = HostStatus {
        daemon_pid: std::process::id(),
        boot_id: boot_id(),
        started_unix_ms: now_ms(),
        ..Default::default()
    };
    let mut backend = match before.as_ref().and_then(|b| Watched::adopt(&host, b)) {
        Some(w) => {
            cli_support::say!(
                "vmctl __backend: adopting blk-backend {} (its daemon was gone)",
                w.pid
            );
            status.restarts = before.map_or(0, |b| b.restarts);
            w
        }
        None => Watched::child(start_backend(&host)?)?,
    };
    status.backend_pid = Some(backend.pid);
    write_json(&host.status_path(), &status)?;
    // Up (its status written, its backend listening) before the exports
    // are added back: whoever started it holds the registry's lock while
    // it waits, and adding takes that lock.
    if let Some(r) = ready {
        r.say();
    }
    add_registered(&host);
    let mut idle_since: Option<Instant> = None;
    let mut restarts = process::Backoff::new();
    loop {
        if process::wait_any(&[&backend.end], Some(HOUSEKEEPING))[0] {
            let how = backend.ended();
            cli_support::say!(
                "vmctl __backend: blk-backend ended ({how}); starting it again and adding back every export"
            );
            // Its socket goes at once: whoever waits for the backend to
            // answer waits for the next one's.
            let _ = std::fs::remove_file(host.control());
            // One that keeps dying at once is not restarted in a loop.
            std::thread::sleep(restarts.delay());
            backend = Watched::child(start_backend(&host)?)?;
            restarts.started();
            status.backend_pid = Some(backend.pid);
            status.restarts += 1;
            write_json(&host.status_path(), &status)?;
            add_registered(&host);
            continue;
        }
        drop_orphans(&host);
        drop_orphan_groups(&host);
        if !host.dir.join("exports").is_dir() {
            // The state directory was removed: nothing left to serve.
            return Ok(());
        }
        if !host.registered().is_empty() {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < LINGER {
            continue;
        }
        // Idle: end, unless a VM is registering right now.
        let Some(_lock) = lock_file(&host.dir.join("registry.lock"), false)? else {
            continue;
        };
        if !host.registered().is_empty() {
            continue;
        }
        let _ = std::fs::remove_file(host.status_path());
        backend.stop();
        let _ = std::fs::remove_file(host.control());
        // This daemon's lock goes before the registry's: a VM that takes
        // the registry's lock next and starts a daemon finds it free.
        drop(one);
        return Ok(());
    }
}

/// The one daemon lock per root; None when another daemon serves (this one
/// is not needed). Daemons are started under the registry's lock and an
/// idle daemon ends under it, so another holds the daemon lock while it
/// starts (its backend answers before its status is written: a VM whose
/// supervisor then asks for a daemon starts this one), or while it ends
/// otherwise (an error: the lock goes with its process). Waited for until
/// it serves (its backend answers and its status is there) or lets go.
fn the_one_daemon(host: &HostBackend, patience: Duration) -> Result<Option<std::fs::File>> {
    let path = host.dir.join("daemon.lock");
    let until = Instant::now() + patience;
    // Readable once the holder lets go (one thread per holder).
    let mut released: Option<OwnedFd> = None;
    loop {
        if let Some(lock) = lock_file(&path, false)? {
            return Ok(Some(lock));
        }
        if host.status().is_some() && host.reachable() {
            return Ok(None);
        }
        if Instant::now() > until {
            bail!("another daemon holds the backend's lock and does not serve");
        }
        if released.is_none() {
            released = crate::state::lock_released(&path)?;
        }
        let Some(let_go) = &released else {
            // Free already: taken above next time round.
            continue;
        };
        let (waited, _kept) = until_answers(host, let_go.as_fd(), until);
        if waited == path_wait::Waited::Appeared {
            // Its status is written next (or is there already, a dead
            // predecessor's: looked at again once the holder is up).
            let _ = path_wait::wait_for(&host.status_path(), Some(until), &[let_go.as_fd()]);
        }
        if process::wait_any(&[let_go], Some(Duration::ZERO))[0] {
            released = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that holds the lock (here: the test) and then serves: its
    /// backend's socket listening, then its status written.
    fn serve_later(
        host: &HostBackend,
    ) -> std::thread::JoinHandle<std::os::unix::net::UnixListener> {
        let (control, status) = (host.control(), host.status_path());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let listening = std::os::unix::net::UnixListener::bind(&control).expect("bind");
            std::thread::sleep(Duration::from_millis(50));
            let s = HostStatus {
                daemon_pid: std::process::id(),
                boot_id: boot_id(),
                ..Default::default()
            };
            write_json(&status, &s).expect("status");
            listening
        })
    }

    #[test]
    fn a_second_daemon_ends_once_the_first_serves_and_takes_over_from_one_that_ends() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = Root::open(d.path()).expect("root");
        let host = HostBackend::of(&root).expect("host");
        let lock = host.dir.join("daemon.lock");

        // The first starts (its lock held, nothing served yet) and then
        // serves: the second is not needed. Before, it waited for the lock
        // until its 30 s patience ran out, and whoever started it with it.
        let first = lock_file(&lock, false).expect("lock").expect("free");
        let serving = serve_later(&host);
        // Woken by the first's serving, not by its own patience (an hour
        // here): a wait for the lock alone would end in an hour, or fail.
        let second = {
            let host = HostBackend::of(&root).expect("host");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ =
                    tx.send(the_one_daemon(&host, Duration::from_secs(3600)).map(|l| l.is_none()));
            });
            rx.recv_timeout(Duration::from_secs(300))
                .expect("woken when the first serves, not by its patience")
        };
        assert!(second.expect("no error"), "the first serves");
        drop(serving.join().expect("served"));
        std::fs::remove_file(host.status_path()).expect("status");
        std::fs::remove_file(host.control()).expect("control");

        // The first ends without serving: the second takes over.
        let ends = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(first);
        });
        assert!(
            the_one_daemon(&host, Duration::from_secs(3600))
                .expect("no error")
                .is_some(),
            "the lock, once let go"
        );
        ends.join().expect("ended");
    }
}
