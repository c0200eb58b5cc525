//! One small process per running VM (`vmctl` started again as
//! `__supervise`, in a session of its own so it outlives the terminal):
//! it has the VM's disk served (an export on the host backend, or a
//! blk-backend of the VM's own which it starts again if it dies: the vmm
//! reconnects with its inflight state, the guest sees nothing), starts
//! the vmm, keeps the console in a bounded file and records how the vmm
//! ended. A vmm killed by a signal is `failed` with that reason, never a
//! stale `running`. It waits on pidfds: nothing polls while the VM runs.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use vmm::api::types::VmEnd;

mod console_file;
mod servers;

use console_file::{keep_console, ConsoleTap};
use servers::{start_backend, wait_listening, NicServer, ShareServers};

use anyhow::{Context, Result};
use cli_support::path_wait;

use crate::binaries;
use crate::host_backend::{ExportEntry, HostBackend};
use crate::process::{self, Supervised};
use crate::state::{
    boot_id, lock_file, note, now_ms, BackendMode, Root, RunState, Status, VmConfig, VmDir,
};

/// The console file's size before it is rotated (one older file is kept).
pub const CONSOLE_CAP: u64 = 1 << 20;
/// A marker vmctl leaves before it kills the vmm on purpose.
pub const KILL_MARKER: &str = "kill-requested";

fn log_file(vm: &VmDir, name: &str) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm.path.join(name))
        .with_context(|| format!("{}", vm.path.join(name).display()))
}

/// The vmm's own account of the VM's end (its API's `vm.wait`), which it
/// gives before tearing the VM down: the end is recorded without waiting
/// for the process to be gone (KVM releasing the VM took 5 ms of a 1-I/O
/// VM's life here, measured).
struct EndReport {
    stream: UnixStream,
}

impl EndReport {
    fn ask(api: &Path) -> Result<Self> {
        Ok(EndReport {
            stream: vmm::api::client::Client::new(api).ask_end()?,
        })
    }

    /// The answer, once the stream is readable: None when the vmm ended
    /// without one (killed) or said something else.
    fn read(mut self) -> Option<VmEnd> {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .ok()?;
        vmm::api::client::read_end(&mut self.stream).ok()
    }
}

/// A vmm whose end is recorded and that is still tearing down: reaped
/// after the record (`Drop`), and its console copier joined.
struct Exiting {
    vmm: Child,
    console: Option<ConsoleTap>,
    /// What it reported, and where to note a teardown that went otherwise.
    reported: i32,
    vm: VmDir,
    /// What waited for the API socket, closed last (see `path_wait`).
    _api_watch: path_wait::Kept,
}

impl Drop for Exiting {
    fn drop(&mut self) {
        // The record stands (the guest's end is what it says); a teardown
        // that crashed or was killed is noted beside it.
        match self.vmm.wait() {
            Ok(st) if st.code() == Some(self.reported) => {}
            Ok(st) => note(
                &self.vm,
                format_args!(
                    "the vmm reported exit status {} and then ended with {st}",
                    self.reported
                ),
            ),
            Err(e) => note(&self.vm, format_args!("reaping the vmm: {e}")),
        }
        if let Some(c) = self.console.take() {
            c.finish();
        }
    }
}

/// The supervisor's whole life: `ready` is called once the VM runs (its
/// API answers); returning without calling it means the start failed
/// (status.json says why). It runs as a process of its own (`vmctl
/// start`: the VM outlives vmctl) or as a thread of `vmctl run` (a fleet's
/// VMs live as long as the run that waits for them).
pub fn supervise(root: &Root, vm: &VmDir, ready: impl FnOnce()) -> Result<()> {
    let status = begin(vm)?;
    supervise_begun(root, vm, status, ready)
}

/// A run begun: its record, and the VM's run lock, held until its end is
/// recorded.
pub struct Begun {
    status: Status,
    run: std::fs::File,
}

/// Records that this process supervises the VM from now on ("starting"):
/// from here `list` shows it active and another start is refused.
pub fn begin(vm: &VmDir) -> Result<Begun> {
    // Taken before the record: whoever sees "starting" can wait for it.
    let run = lock_file(&vm.run_lock_path(), true)?.context("the VM's run lock")?;
    let status = Status {
        state: RunState::Starting,
        supervisor_pid: Some(std::process::id()),
        boot_id: boot_id(),
        started_unix_ms: now_ms(),
        ..Default::default()
    };
    let _ = std::fs::remove_file(vm.path.join(KILL_MARKER));
    vm.write_status(&status)?;
    Ok(Begun { status, run })
}

/// The rest of the supervisor's life, once [`begin`] recorded it.
pub fn supervise_begun(root: &Root, vm: &VmDir, begun: Begun, ready: impl FnOnce()) -> Result<()> {
    let Begun {
        mut status,
        run: run_lock,
    } = begun;
    let config = vm.config()?;
    let mut exiting = None;
    let outcome = run(root, vm, &config, &mut status, &mut exiting, ready);
    if let Err(e) = &outcome {
        status.state = RunState::Failed;
        status.reason = Some(cli_support::report(e));
    }
    status.ended_unix_ms = Some(now_ms());
    vm.write_status(&status)?;
    // Recorded: whoever waits for the end is told now, not after the
    // teardown below.
    drop(run_lock);
    // Only now: the vmm that reported its end finishes its teardown.
    drop(exiting);
    outcome
}

/// Who serves the disk during this run.
enum Disk {
    Host(HostBackend),
    Own(Supervised),
}

fn run(
    root: &Root,
    vm: &VmDir,
    config: &VmConfig,
    status: &mut Status,
    exiting: &mut Option<Exiting>,
    ready: impl FnOnce(),
) -> Result<()> {
    // Its NIC's tap on its bridge and a net-backend on it, before the vmm
    // (which waits for the socket, `connect_timeout_ms`); both gone with
    // this run.
    let mut nic = match &config.net {
        Some(nic) => Some(NicServer::start(root, vm, nic)?),
        None => None,
    };
    // Each shared folder's virtiofsd, also before the vmm; ended with
    // this run.
    let mut shares = ShareServers::start(vm, &config.shares)?;
    // The vmm first: its exec and KVM set-up overlap the disk's (an export
    // added, or a backend started), and it waits for the disk's socket to
    // listen (`connect_timeout_ms`).
    let (mut vmm, console) = spawn_vmm(vm, config)?;
    status.vmm_pid = Some(vmm.id());
    let mut disk = match serve_disk(root, vm, config, status) {
        Ok(d) => d,
        Err(e) => {
            let _ = vmm.kill();
            let _ = vmm.wait();
            if let Some(c) = console {
                c.finish();
            }
            return Err(e);
        }
    };
    let outcome = match vmm.try_wait() {
        // Ended while its disk was being served. A guest that wrote to its
        // console ran: a short one's whole life fits in that window once
        // the export exists (the vmm connects as soon as the socket
        // listens). Otherwise it gave up waiting for the disk, or failed on
        // its own: the start failed.
        Ok(Some(st)) => {
            if console.is_some_and(|c| c.finish() > 0) {
                record_exit(vm, status, st);
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "the vmm ended ({st}) before its disk was served; see vmm.log"
                ))
            }
        }
        _ => run_vmm(
            vm,
            config,
            status,
            Children {
                disk: &mut disk,
                nic: nic.as_mut(),
                shares: &mut shares,
            },
            (vmm, console),
            exiting,
            ready,
        ),
    };
    match &mut disk {
        Disk::Host(host) => {
            status.backend_restarts = host.status().map_or(0, |h| {
                h.restarts.saturating_sub(status.host_restarts_at_start)
            });
            if let Err(e) = host.detach(&vm.name, &vm.disk_socket()) {
                note(
                    vm,
                    format_args!("ending the disk's export: {}", cli_support::report(&e)),
                );
            }
        }
        Disk::Own(backend) => backend.stop(),
    }
    outcome
}

/// The VM's disk served: an export on the host backend, or a backend of
/// its own (listening).
fn serve_disk(root: &Root, vm: &VmDir, config: &VmConfig, status: &mut Status) -> Result<Disk> {
    Ok(match config.backend {
        BackendMode::Host => {
            let host = HostBackend::of(root)?;
            host.attach(
                &vm.name,
                &ExportEntry {
                    socket: vm.disk_socket(),
                    image: vm.disk(),
                    num_queues: config.queues,
                    worker_cpus: config.placement.disk_workers.clone(),
                    limits: config.disk_limits.clone(),
                    owner_pid: std::process::id(),
                },
            )
            .context("serving the disk on the host backend")?;
            status.host_restarts_at_start = host.status().map_or(0, |s| s.restarts);
            Disk::Host(host)
        }
        BackendMode::Vm => {
            let (vm2, config2) = (vm.clone(), config.clone());
            let mut backend =
                Supervised::start("blk-backend", move || start_backend(&vm2, &config2))?;
            wait_listening(vm, &mut backend)?;
            status.backend_pid = Some(backend.pid());
            Disk::Own(backend)
        }
    })
}

/// How long a vmm waits at start for its disk's socket to listen: the
/// export is added (or the backend started) meanwhile, in milliseconds,
/// unless the host backend's daemon has to be started first or many VMs
/// start at once.
const DISK_CONNECT_TIMEOUT_MS: u64 = 120_000;

/// The kernel command line: the VM's, and its NIC's address (`ip=`).
fn cmdline_of(config: &VmConfig) -> String {
    match &config.net {
        // A command line with its own ip= (ip=dhcp: the guest asks the
        // bridge's DHCP server) keeps it.
        Some(_)
            if config
                .cmdline
                .split_whitespace()
                .any(|w| w.starts_with("ip=")) =>
        {
            config.cmdline.clone()
        }
        Some(nic) => format!("{} {}", config.cmdline, nic.kernel_ip_arg(&config.name))
            .trim()
            .to_string(),
        None => config.cmdline.clone(),
    }
}

/// Starts the vmm, its console copied to the console file.
fn spawn_vmm(vm: &VmDir, config: &VmConfig) -> Result<(Child, Option<ConsoleTap>)> {
    let mut cmd = Command::new(binaries::program("vmm")?);
    match &config.restore {
        // It continues from the snapshot: its vCPUs, memory size and
        // devices are the snapshot's.
        Some(from) => cmd
            .arg("--restore")
            .arg(&from.dir)
            .args(["--restore-memory", from.memory.as_arg()]),
        None => cmd
            .arg("--kernel")
            .arg(match &config.kernel {
                Some(k) => k.clone(),
                None => binaries::bench_guest()?,
            })
            .args(["--cpus", &config.cpus.to_string()])
            .args(["--memory", &config.memory.to_string()])
            .args(["--cmdline", &cmdline_of(config)]),
    };
    cmd.arg("--disk")
        .arg(format!(
            "socket={},num_queues={},connect_timeout_ms={DISK_CONNECT_TIMEOUT_MS}",
            vm.disk_socket().display(),
            config.queues
        ))
        .arg("--api-socket")
        .arg(vm.api_socket());
    if let Some(cpus) = &config.placement.vcpus {
        cmd.arg("--vcpu-affinity").arg(cpus.to_string());
    }
    if let (Some(i), None) = (&config.initrd, &config.restore) {
        cmd.arg("--initrd").arg(i);
    }
    if let Some(nic) = &config.net {
        cmd.arg("--net").arg(crate::network::vmm_arg(
            nic,
            &vm.net_socket(),
            DISK_CONNECT_TIMEOUT_MS,
        ));
    }
    for (i, share) in config.shares.iter().enumerate() {
        cmd.arg("--fs").arg(format!(
            "socket={},tag={},connect_timeout_ms={DISK_CONNECT_TIMEOUT_MS}",
            vm.share_socket(i).display(),
            share.tag
        ));
    }
    // The vmm dies with this supervisor (it asks the kernel itself: no
    // code between fork and exec, so the spawn copies no page tables of a
    // fleet run's large process).
    cmd.args(["--parent-pid", &std::process::id().to_string()]);
    // Its serial port reads what `vmctl console` types (crate::console).
    cmd.arg("--serial-input");
    let mut vmm = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log_file(vm, "vmm.log")?)
        .spawn()
        .context("starting the vmm")?;
    let attached = crate::console::Attached::default();
    let relay = match vmm.stdin.take() {
        Some(input) => Some(crate::console::Relay::serve(
            vm,
            input,
            Arc::clone(&attached),
        )?),
        None => None,
    };
    let console = vmm
        .stdout
        .take()
        .map(|out| keep_console(vm, out, attached, relay));
    Ok((vmm, console))
}

/// The processes serving a running VM's devices, watched beside its vmm.
struct Children<'a> {
    disk: &'a mut Disk,
    nic: Option<&'a mut NicServer>,
    shares: &'a mut ShareServers,
}

/// What woke the supervisor of a running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woke {
    /// The vmm ended.
    Vmm,
    /// Its end report came.
    Reported,
    /// The VM's own blk-backend ended.
    DiskBackend,
    /// The host backend's daemon ended.
    Daemon,
    NetBackend,
    /// Share `i`'s virtiofsd ended.
    Share(usize),
}

fn run_vmm(
    vm: &VmDir,
    config: &VmConfig,
    status: &mut Status,
    children: Children<'_>,
    (mut vmm, console): (Child, Option<ConsoleTap>),
    exiting: &mut Option<Exiting>,
    ready: impl FnOnce(),
) -> Result<()> {
    let vmm_end = process::pidfd(&vmm)?;
    // Running once its API answers (the socket appears just before the
    // vCPUs start, milliseconds after exec), or it ended first.
    let (_, api_watch) = path_wait::wait_for(&vm.api_socket(), None, &[vmm_end.as_fd()]);
    status.state = RunState::Running;
    vm.write_status(status)?;
    if config.restore.is_some() {
        // Restored once: its disk has moved on from the snapshot's, so
        // its next start boots.
        vm.write_config(&VmConfig {
            restore: None,
            ..config.clone()
        })?;
    }
    ready();
    // A verb that pauses the VM for its work and ends without resuming it
    // (killed): the VM is resumed here.
    let _holds = crate::hold::Keeper::start(vm)
        .map_err(|e| note(vm, format_args!("watching for holds: {e}")))
        .ok();
    // Without the report (an API that does not answer) the end is the
    // vmm's exit, as before.
    let mut report = EndReport::ask(&vm.api_socket()).ok();
    let mut daemon_lost = false;
    let Children { disk, nic, shares } = children;
    let mut nic = nic;
    let ended = loop {
        // The host backend's daemon is watched too: killed, it is started
        // again (adopting the blk-backend that still serves), so a later
        // crash of that backend is still repaired.
        let daemon_end = match &*disk {
            Disk::Host(host) if !daemon_lost => {
                match host.status().map(|h| process::pidfd_of(h.daemon_pid)) {
                    Some(Ok(end)) => Some(end),
                    _ => {
                        if let Err(e) = host.revive() {
                            note(
                                vm,
                                format_args!(
                                    "reviving the host backend's daemon: {}",
                                    cli_support::report(&e)
                                ),
                            );
                            daemon_lost = true;
                        }
                        continue;
                    }
                }
            }
            _ => None,
        };
        let woke = {
            let mut sources: Vec<(Woke, &dyn AsFd)> = vec![(Woke::Vmm, &vmm_end)];
            if let Some(r) = &report {
                sources.push((Woke::Reported, &r.stream));
            }
            if let Disk::Own(backend) = &*disk {
                sources.push((Woke::DiskBackend, backend.ended()));
            }
            if let Some(end) = &daemon_end {
                sources.push((Woke::Daemon, end));
            }
            if let Some(n) = &nic {
                sources.push((Woke::NetBackend, n.backend.ended()));
            }
            for (i, s) in shares.0.iter().enumerate().filter(|(_, s)| !s.said) {
                sources.push((Woke::Share(i), &s.ended));
            }
            let fds: Vec<&dyn AsFd> = sources.iter().map(|(_, fd)| *fd).collect();
            let readable = process::wait_any(&fds, None);
            sources
                .iter()
                .zip(readable)
                .filter(|(_, r)| *r)
                .map(|((w, _), _)| *w)
                .collect::<Vec<Woke>>()
        };
        if woke.contains(&Woke::Reported) {
            match report.take().and_then(EndReport::read) {
                Some(end) => break Ended::Reported(end),
                // Killed, or an answer that is no report: the exit decides.
                None => continue,
            }
        }
        if woke.contains(&Woke::Vmm) {
            break Ended::Exited(vmm.wait()?);
        }
        // A restart's backoff is cut short by the vmm's end.
        let interrupt: [&dyn AsFd; 1] = [&vmm_end];
        for w in woke {
            match w {
                Woke::DiskBackend => {
                    if let Disk::Own(backend) = &mut *disk {
                        // The vmm reconnects to a new one with its inflight
                        // state.
                        if let Some(how) = backend.restart(&interrupt)? {
                            note(
                                vm,
                                format_args!("{} ended ({how}); started it again", backend.name),
                            );
                            status.backend_pid = Some(backend.pid());
                            status.backend_restarts += 1;
                            vm.write_status(status)?;
                        }
                    }
                }
                Woke::Daemon => note(
                    vm,
                    format_args!("the host backend's daemon ended; starting it again"),
                ),
                Woke::NetBackend => {
                    if let Some(n) = nic.as_deref_mut() {
                        // The vmm reconnects; the guest's link comes back.
                        match n.backend.restart(&interrupt) {
                            Ok(Some(how)) => note(
                                vm,
                                format_args!("{} ended ({how}); started it again", n.backend.name),
                            ),
                            Ok(None) => {}
                            Err(e) => {
                                note(vm, format_args!("net-backend: {}", cli_support::report(&e)));
                                nic = None;
                            }
                        }
                    }
                }
                Woke::Share(i) => shares.ended(vm, i),
                Woke::Vmm | Woke::Reported => {}
            }
        }
    };
    let ended = match ended {
        Ended::Reported(end) => {
            // The record comes with the whole console (the copier is a
            // pipe's read behind the vmm's last write).
            if let Some(c) = &console {
                c.wait_for(end.console_bytes, Duration::from_secs(5));
            }
            status.state = RunState::Exited;
            status.exit_status = Some(end.exit_status);
            if end.exit_status != 0 {
                status.reason = full_disk(vm);
            }
            *exiting = Some(Exiting {
                vmm,
                console,
                reported: end.exit_status,
                vm: vm.clone(),
                _api_watch: api_watch,
            });
            return Ok(());
        }
        Ended::Exited(st) => st,
    };
    if let Some(c) = console {
        c.finish();
    }
    record_exit(vm, status, ended);
    Ok(())
}

/// The status of a vmm that ended without its report (killed, or gone
/// before anyone asked): its exit code, or how it was killed.
fn record_exit(vm: &VmDir, status: &mut Status, ended: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    let killed_on_purpose = vm.path.join(KILL_MARKER).exists();
    match (ended.code(), ended.signal()) {
        (Some(code), _) => {
            status.state = RunState::Exited;
            status.exit_status = Some(code);
            if code != 0 {
                status.reason = full_disk(vm);
            }
        }
        (None, Some(sig)) if killed_on_purpose => {
            status.state = RunState::Exited;
            status.exit_status = Some(128 + sig);
            status.reason = Some("killed by vmctl kill".into());
        }
        (None, sig) => {
            status.state = RunState::Failed;
            status.reason = Some(format!(
                "the vmm was killed by signal {}",
                sig.map_or("?".to_string(), |s| s.to_string())
            ));
        }
    }
}

/// Why a VM whose guest failed may have failed, when its directory's
/// filesystem (its disk's, its console's) is full: the guest's writes
/// were refused (I/O errors it saw) and its console may be cut.
fn full_disk(vm: &VmDir) -> Option<String> {
    let st = rustix::fs::statvfs(&vm.path).ok()?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    (free < 1 << 20).then(|| {
        format!(
            "the filesystem of {} is full ({free} bytes free): the guest's disk writes were refused",
            vm.path.display()
        )
    })
}

/// How the vmm's run ended: its report (the process is still tearing
/// down), or the process's exit.
enum Ended {
    Reported(VmEnd),
    Exited(std::process::ExitStatus),
}
