//! containerd of a test's own (Debian's containerd 1.6): its root, state
//! and sockets under the test's directory, our shim and vmctl on its PATH,
//! vmctl's state root given through `VMCTL_STATE_DIR`; `ctr` on its
//! socket, every call bounded. With the CRI plugin, a registry's
//! 127.0.0.1 address is reached over plain HTTP (as a kubelet's node
//! would be told in its own containerd config). Stopped on drop, with the
//! shims it left (and their sockets under /run/containerd/s).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::patience::Patience;
use crate::workspace::{bin, output_within};

pub const RUNTIME: &str = "io.containerd.vmctl.v1";
/// The CRI's runtime handler (a RuntimeClass's `handler`) for our shim.
pub const HANDLER: &str = "vmctl";

pub struct LocalContainerd {
    child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl LocalContainerd {
    /// containerd under `dir` with VMs in vmctl's state root `vmctl_state`;
    /// `cri`: with the CRI plugin (runtime handler `vmctl`, the sandbox
    /// image `sandbox_image`, plain HTTP to `registry`).
    pub fn start(
        dir: &Path,
        vmctl_state: &Path,
        cri: Option<(&str, &str)>,
    ) -> Result<LocalContainerd> {
        let shim = bin("containerd-shim-vmctl-v1");
        let bin_dir = shim.parent().expect("a binary's directory");
        Self::start_with(dir, vmctl_state, cri, bin_dir)
    }

    /// The same with the shim and vmctl from `bin_dir` (a benchmark's
    /// release build).
    pub fn start_with(
        dir: &Path,
        vmctl_state: &Path,
        cri: Option<(&str, &str)>,
        bin_dir: &Path,
    ) -> Result<LocalContainerd> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("c.sock");
        let state = dir.join("state");
        let mut config = format!(
            "version = 2\nroot = {:?}\nstate = {:?}\n[grpc]\n  address = {:?}\n",
            dir.join("root"),
            state,
            socket
        );
        match cri {
            None => config.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"),
            Some((registry, sandbox_image)) => config.push_str(&format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
    runtime_type = "{RUNTIME}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"#,
                cni = dir.join("cni").display()
            )),
        }
        // Keep the config before the `disabled_plugins` line valid TOML:
        // top-level keys must come before any table.
        let config = hoist_top_level(&config);
        let config_file = dir.join("config.toml");
        std::fs::write(&config_file, config)?;
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = dir.join("containerd.log");
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(&config_file)
            .env("PATH", path)
            .env("VMCTL_STATE_DIR", vmctl_state)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::OpenOptions::new().append(true).open(&log)?)
            .spawn()
            .context("starting containerd")?;
        // It listens within a second or so (the CRI plugin takes longest).
        let up = Patience::new("containerd listening", Duration::from_secs(1)).wait_until(|| {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "containerd ended ({st}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            Ok(UnixStream::connect(&socket).is_ok())
        });
        if let Err(e) = up {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(LocalContainerd {
            child,
            socket,
            state,
            log,
        })
    }

    /// `ctr` on this containerd, bounded by `measured` (what the call
    /// costs here; a wide margin over it).
    pub fn ctr(&self, args: &[&str], measured: Duration) -> Output {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).args(args);
        output_within(&mut c, &Patience::new(format!("ctr {args:?}"), measured))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ctr ARGS`, which must succeed: its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args, Duration::from_secs(2));
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The shim processes serving this containerd's tasks now (their
    /// working directory is a bundle under its state).
    pub fn shims(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else {
                continue;
            };
            let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
            if cwd.starts_with(&self.state)
                && exe
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim-vmctl"))
            {
                out.push(pid);
            }
        }
        out
    }
}

/// Moves top-level `key = value` lines above the first table.
fn hoist_top_level(config: &str) -> String {
    let (mut top, mut tables) = (String::new(), String::new());
    let mut in_table = false;
    for line in config.lines() {
        if line.starts_with('[') {
            in_table = true;
        }
        let top_level_key =
            !line.starts_with(' ') && !line.starts_with('[') && line.contains(" = ");
        if top_level_key && (!in_table || line.starts_with("disabled_plugins")) {
            top.push_str(line);
            top.push('\n');
        } else {
            tables.push_str(line);
            tables.push('\n');
        }
    }
    top + &tables
}

impl Drop for LocalContainerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child this struct owns (not yet reaped,
        // so its pid is still ours).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        for pid in self.shims() {
            // The shim's socket is named in its bundle's `address`.
            if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
                if let Ok(a) = std::fs::read_to_string(cwd.join("address")) {
                    let _ = std::fs::remove_file(a.trim().trim_start_matches("unix://"));
                }
            }
            // SAFETY: kill(2) on a process found above; at worst a pid
            // reused in between gets SIGKILL, as the test's own leftover.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}
