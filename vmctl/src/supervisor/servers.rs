//! The processes that serve a running VM's devices beside its vmm: its own
//! blk-backend (`--backend vm`), the net-backend on its tap, a virtiofsd
//! per shared folder.

use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cli_support::path_wait;
use rustix::process::Signal;

use super::log_file;
use crate::binaries;
use crate::process::{self, Supervised};
use crate::state::{note, Root, VmConfig, VmDir};

/// Starts the VM's disk backend; the socket of a dead predecessor goes
/// first, so that the socket's presence means this one listens.
pub(super) fn start_backend(vm: &VmDir, config: &VmConfig) -> Result<Child> {
    let backend = binaries::program("blk-backend")?;
    let _ = std::fs::remove_file(vm.disk_socket());
    let _ = std::fs::remove_file(vm.backend_control());
    let mut cmd = Command::new(backend);
    // Its image closes cleanly on SIGTERM.
    process::die_with_parent(&mut cmd, Signal::TERM);
    let child = cmd
        .arg("--export")
        .arg(format!(
            "socket={},image={},num_queues={}{}",
            vm.disk_socket().display(),
            vm.disk().display(),
            config.queues,
            export_limits(&config.disk_limits.limits)
        ))
        .args(
            config
                .placement
                .disk_workers
                .iter()
                .flat_map(|c| ["--worker-cpus".to_string(), c.to_string()]),
        )
        // Where `vmctl snapshot` and `backup` seal the disk live.
        .arg("--control")
        .arg(vm.backend_control())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(vm, "backend.log")?)
        .spawn()
        .context("starting blk-backend")?;
    Ok(child)
}

/// The `--export` keys of a VM's own disk limits (vmctl's are a second's
/// budget each; a group is the host backend's alone).
fn export_limits(l: &rate_limit::Limits) -> String {
    let mut keys = String::new();
    if let Some(b) = l.ops {
        keys += &format!(",iops={}", b.size);
    }
    if let Some(b) = l.bytes {
        keys += &format!(",bw={}", b.size);
    }
    keys
}

/// Waits until the backend listens (its socket is there) or dies.
pub(super) fn wait_listening(vm: &VmDir, backend: &mut Supervised) -> Result<()> {
    // Opening the image and binding take milliseconds; a backend that
    // has not listened after 30 s is stuck. (Its socket is removed before
    // it starts: the socket's presence means it listens.)
    let until = Instant::now() + Duration::from_secs(30);
    let (waited, _) =
        path_wait::wait_for(&vm.disk_socket(), Some(until), &[backend.ended().as_fd()]);
    match waited {
        path_wait::Waited::Appeared => Ok(()),
        path_wait::Waited::Woken => {
            let st = backend.child_mut().wait()?;
            anyhow::bail!(
                "blk-backend ended at start ({st}); its log: {}",
                vm.path.join("backend.log").display()
            )
        }
        path_wait::Waited::TimedOut => anyhow::bail!("blk-backend did not listen within 30 s"),
    }
}

/// One virtiofsd per shared folder, for one run: a vhost-user-fs backend
/// on the folder. Its FUSE session (the guest's open files, the inodes it
/// looked up) lives in it, so one that dies is not started again: a new
/// one would answer the guest's requests with no session (the share fails
/// either way); the VM's log says which ended and why it stays down.
/// Dropped: stopped.
pub(super) struct ShareServers(pub(super) Vec<ShareServer>);

pub(super) struct ShareServer {
    child: Child,
    pub(super) ended: std::os::fd::OwnedFd,
    /// Its end was said.
    pub(super) said: bool,
}

impl ShareServers {
    pub(super) fn start(vm: &VmDir, shares: &[crate::state::Share]) -> Result<ShareServers> {
        let mut servers = ShareServers(Vec::new());
        for (i, share) in shares.iter().enumerate() {
            let socket = vm.share_socket(i);
            let _ = std::fs::remove_file(&socket);
            let program = binaries::program("virtiofsd").map_err(|_| {
                anyhow::anyhow!(
                    "--share needs virtiofsd (the Rust one: cargo install virtiofsd), on PATH or beside vmctl"
                )
            })?;
            let mut cmd = Command::new(program);
            process::die_with_parent(&mut cmd, Signal::TERM);
            cmd.arg("--socket-path")
                .arg(&socket)
                .arg("--shared-dir")
                .arg(&share.dir)
                .args(["--cache", "auto"])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(vm, &format!("virtiofsd-{i}.log"))?);
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting virtiofsd for {}", share.dir.display()))?;
            // Serving once its socket is there; one that ends first (a
            // folder gone, a bad option) fails the start now, with what
            // it said, not when the vmm gives up on the socket.
            let ended = process::pidfd(&child)?;
            let until = Instant::now() + Duration::from_secs(30);
            let (waited, _) = path_wait::wait_for(&socket, Some(until), &[ended.as_fd()]);
            let why = match waited {
                path_wait::Waited::Appeared => None,
                path_wait::Waited::Woken => Some(match child.wait() {
                    Ok(st) => format!("it ended at start ({st})"),
                    Err(e) => format!("it ended at start ({e})"),
                }),
                path_wait::Waited::TimedOut => Some("it made no socket within 30 s".to_string()),
            };
            servers.0.push(ShareServer {
                child,
                ended,
                said: false,
            });
            if let Some(why) = why {
                let log = vm.path.join(format!("virtiofsd-{i}.log"));
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let said = said
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                anyhow::bail!(
                    "share {}:{}: virtiofsd: {why}{}{said}",
                    share.dir.display(),
                    share.tag,
                    if said.is_empty() { "" } else { ": " },
                );
            }
        }
        Ok(servers)
    }

    /// Says, once, that share `i`'s virtiofsd ended and why it is not
    /// started again.
    pub(super) fn ended(&mut self, vm: &VmDir, i: usize) {
        let Some(s) = self.0.get_mut(i) else {
            return;
        };
        s.said = true;
        let how = match s.child.wait() {
            Ok(st) => st.to_string(),
            Err(e) => e.to_string(),
        };
        note(
            vm,
            format_args!(
                "virtiofsd of share {i} ended ({how}); not started again: the guest's FUSE session lived in it, so its mount fails from now on (see virtiofsd-{i}.log)"
            ),
        );
    }
}

impl Drop for ShareServers {
    fn drop(&mut self) {
        for s in &mut self.0 {
            process::stop(&mut s.child, process::STOP_GRACE);
        }
    }
}

/// A VM's NIC while it runs: its tap plugged into its bridge, and a
/// net-backend serving it, started again if it dies (the vmm reconnects;
/// the guest's link comes back). Dropped: the backend stopped, the tap
/// gone.
pub(super) struct NicServer {
    root: Root,
    vm: VmDir,
    nic: crate::state::NicSpec,
    pub(super) backend: Supervised,
}

impl NicServer {
    pub(super) fn start(root: &Root, vm: &VmDir, nic: &crate::state::NicSpec) -> Result<NicServer> {
        crate::network::plug(root, nic).context("plugging the VM's NIC")?;
        let shared = crate::network::allocation_lock(root).and_then(|_lock| {
            if nic.nat {
                crate::network::ensure_nat(root, nic).context("masquerading the VM's bridge")?;
            }
            let all: Vec<VmConfig> = root
                .list()?
                .iter()
                .filter_map(|o| o.config().ok())
                .collect();
            crate::network::ensure_dhcp(root, nic, &all).context("DHCP on the VM's bridge")
        });
        if let Err(e) = shared {
            crate::network::unplug(nic);
            return Err(e);
        }
        let spawn = {
            let (vm, tap) = (vm.clone(), nic.tap.clone());
            move || -> Result<Child> {
                let _ = std::fs::remove_file(vm.net_socket());
                let mut cmd = Command::new(binaries::program("net-backend")?);
                process::die_with_parent(&mut cmd, Signal::TERM);
                cmd.arg("--socket")
                    .arg(vm.net_socket())
                    .args(["--tap", &tap])
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log_file(&vm, "net-backend.log")?)
                    .spawn()
                    .context("starting net-backend")
            }
        };
        let backend = match Supervised::start("net-backend", spawn) {
            Ok(b) => b,
            Err(e) => {
                crate::network::unplug(nic);
                return Err(e);
            }
        };
        Ok(NicServer {
            root: root.clone(),
            vm: vm.clone(),
            nic: nic.clone(),
            backend,
        })
    }
}

impl Drop for NicServer {
    fn drop(&mut self) {
        self.backend.stop();
        crate::network::unplug(&self.nic);
        // The bridge's DHCP server goes with its last running VM, the
        // masquerade with its last running NAT VM.
        let Ok(_lock) = crate::network::allocation_lock(&self.root) else {
            return;
        };
        let others: Vec<crate::state::NicSpec> = self
            .root
            .list()
            .unwrap_or_default()
            .iter()
            .filter(|o| o.name != self.vm.name && o.observed().is_ok_and(|s| s.is_active()))
            .filter_map(|o| o.config().ok().and_then(|c| c.net))
            .filter(|n| n.bridge == self.nic.bridge)
            .collect();
        if others.is_empty() {
            crate::network::stop_dhcp(&self.root, &self.nic.bridge);
        }
        if self.nic.nat && !others.iter().any(|n| n.nat) {
            crate::network::drop_nat(&self.root, &self.nic.bridge);
        }
    }
}
