//! vmctl as the shim runs it (as runc's shim runs runc): a child process
//! per verb, its JSON answer read into vmctl-api's types. The state root
//! is vmctl's own choice (`VMCTL_STATE_DIR` in containerd's environment
//! passes through to it, else vmctl's default).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde::de::DeserializeOwned;
use sha2::Digest;
use vm_oci::{Imported, VmDefaults};
use vmctl_api::{VerbRow, VmInfo, WaitRow};

use crate::Error;

/// The vmctl binary: `VMCTL` if set, else the one beside this shim, else
/// the first on PATH.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VMCTL") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("vmctl")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("vmctl"))
}

/// The VM of task `id` in `namespace`: the same name in every process of
/// the shim (the `delete` action has nothing else to go on). Readable
/// when the two make a valid vmctl name, else a digest of them.
pub fn vm_name(namespace: &str, id: &str) -> String {
    let plain = format!("{namespace}-{id}");
    let valid = plain.len() <= 63
        && plain
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && plain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if valid {
        return plain;
    }
    let h = sha2::Sha256::digest(format!("{namespace}/{id}").as_bytes());
    format!(
        "ctrd-{}",
        h.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

pub struct Vmctl {
    bin: PathBuf,
}

impl Vmctl {
    pub fn new() -> Vmctl {
        Vmctl { bin: binary() }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).stdin(Stdio::null());
        c
    }

    /// Runs a verb to its end; its stdout, or an error with its stderr.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, Error> {
        let out = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| Error::Vmctl(format!("{}: {e}", self.bin.display())))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(Error::Vmctl(format!(
            "vmctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    fn json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T, Error> {
        let out = self.run(args)?;
        serde_json::from_slice(&out)
            .map_err(|e| Error::Vmctl(format!("vmctl {}: its answer: {e}", args.join(" "))))
    }

    /// The image containerd unpacked in `dirs` (bottom first), in vmctl's
    /// store.
    pub fn import(&self, dirs: &[PathBuf]) -> Result<Imported, Error> {
        let mut args = vec!["image", "import", "--output", "json"];
        let dirs: Vec<&str> = dirs
            .iter()
            .map(|d| d.to_str().unwrap_or_default())
            .collect();
        args.extend(dirs);
        self.json(&args)
    }

    /// Defines VM `name` on `image` with `vm`'s settings (vmctl's
    /// defaults for what is unset).
    pub fn create(&self, name: &str, image: &Imported, vm: &VmDefaults) -> Result<VmInfo, Error> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut args: Vec<String> = vec![
            "create".into(),
            name.into(),
            "--image".into(),
            path(&image.top),
        ];
        if let Some(k) = &image.kernel {
            args.extend(["--kernel".into(), path(k)]);
        }
        if let Some(i) = &image.initrd {
            args.extend(["--initrd".into(), path(i)]);
        }
        if let Some(c) = vm.cpus {
            args.extend(["--cpus".into(), c.to_string()]);
        }
        if let Some(m) = vm.memory {
            args.extend(["--memory".into(), m.to_string()]);
        }
        if let Some(c) = &vm.cmdline {
            args.extend(["--cmdline".into(), c.clone()]);
        }
        args.extend(["--output".into(), "json".into()]);
        self.json(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    pub fn info(&self, name: &str) -> Result<VmInfo, Error> {
        self.json(&["info", name, "--output", "json"])
    }

    /// Starts VM `name`: the vmm's pid.
    pub fn start(&self, name: &str) -> Result<u32, Error> {
        let rows: Vec<VerbRow> = self.json(&["start", name, "--output", "json"])?;
        rows.into_iter()
            .find_map(|r| r.pid)
            .ok_or_else(|| Error::Vmctl(format!("vmctl start {name}: no pid in its answer")))
    }

    /// stop, kill, pause, resume: the verb on VM `name`.
    pub fn verb(&self, verb: &str, name: &str, extra: &[&str]) -> Result<(), Error> {
        let mut args = vec![verb, name];
        args.extend_from_slice(extra);
        self.run(&args).map(drop)
    }

    /// Removes VM `name` (killed first if it runs); one that is not there
    /// is fine.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        self.run(&["delete", "--force", "--if-exists", name])
            .map(drop)
    }

    /// Until VM `name` ends: how it ended. (wait's own exit status is the
    /// VM's, so a failing guest is an answer: its JSON is read whatever
    /// the status.)
    pub fn wait(&self, name: &str) -> Result<WaitRow, Error> {
        let args = ["wait", name, "--output", "json"];
        let out = self
            .command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| Error::Vmctl(format!("{}: {e}", self.bin.display())))?;
        match serde_json::from_slice::<Vec<WaitRow>>(&out.stdout) {
            Ok(rows) if !rows.is_empty() => Ok(rows.into_iter().next().expect("not empty")),
            _ => Err(Error::Vmctl(format!(
                "vmctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }

    /// `vmctl stop NAME --timeout SECS` as a child of its own (a SIGKILL
    /// that comes while it waits ends it first: it holds the VM's lock).
    pub fn spawn_stop(&self, name: &str, timeout_s: u64) -> Result<Child, Error> {
        self.command(&["stop", name, "--timeout", &timeout_s.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Vmctl(format!("{}: {e}", self.bin.display())))
    }

    /// `vmctl logs --follow NAME` writing into `out` until the VM ends.
    pub fn follow_console(&self, name: &str, out: std::fs::File) -> Result<Child, Error> {
        self.command(&["logs", "--follow", name])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::Vmctl(format!("{}: {e}", self.bin.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_s_vm_name_is_stable_and_valid() {
        assert_eq!(vm_name("default", "vm1"), "default-vm1");
        let k8s = vm_name("k8s.io", &"a".repeat(64));
        assert_eq!(k8s, vm_name("k8s.io", &"a".repeat(64)));
        assert!(k8s.starts_with("ctrd-") && k8s.len() == 21, "{k8s}");
        assert_ne!(vm_name("k8s.io", "b"), vm_name("k8s.io", "c"));
    }
}
