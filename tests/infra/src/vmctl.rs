//! vmctl as a test drives it: every call bounded (a hang is a failure
//! naming what it waited for), its answers read as text or JSON.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::fixture::Fixture;
use crate::guest::build_guest;
use crate::patience::Patience;
use crate::workspace::{bin, output_within};

/// vmctl on a state directory of the test's own.
pub struct Vmctl {
    pub state: PathBuf,
}

impl Vmctl {
    /// On the fixture's state root.
    pub fn new(fx: &Fixture) -> Vmctl {
        Vmctl::at(fx.path("state"))
    }

    /// On the state root `state` (two of them: two hosts).
    pub fn at(state: PathBuf) -> Vmctl {
        // The bench guest is vmctl's default kernel: built before.
        build_guest().expect("the bench guest");
        Vmctl { state }
    }

    /// A call answering in JSON (`--output json` added).
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("json")
    }

    /// A vmctl call that must not hang: a start or stop takes tens of ms
    /// here; a fleet of 8 short VMs about 2 s.
    pub fn call(&self, args: &[&str], measured: Duration) -> Output {
        output_within(
            Command::new(bin("vmctl"))
                .arg("--state-dir")
                .arg(&self.state)
                .args(args),
            &Patience::new("a vmctl call", measured),
        )
        .expect("vmctl runs")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.call(args, Duration::from_millis(100));
        assert!(
            out.status.success(),
            "vmctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A call that must fail; its error message.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.call(args, Duration::from_millis(100));
        assert!(!out.status.success(), "vmctl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn info(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["info", name, "--output", "json"])).expect("json")
    }

    /// Waits for the VM: it exits with status 0 (else its console says
    /// why).
    pub fn assert_exits_ok(&self, name: &str) {
        let out = self.call(&["wait", name], Duration::from_millis(100));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("exited (0)"),
            "{name}: {said}{}\nits console:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.ok(&["logs", name, "--tail", "5"])
        );
    }

    /// A 64 MiB VM `name` on `image` whose guest runs `cmdline` (a writer),
    /// run to its end (exit 0), its disk then sealed as `snapshot`: the
    /// clone's `FILE@SNAPSHOT`.
    pub fn sealed_clone(&self, name: &str, image: &str, cmdline: &str, snapshot: &str) -> String {
        self.ok(&[
            "create",
            name,
            "--image",
            image,
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
        ]);
        self.ok(&["start", name]);
        self.assert_exits_ok(name);
        let disk = self.vm_dir(name).join("disk.img");
        crate::img(&["snapshot", "-c", snapshot, &crate::s(&disk)]);
        format!("{}@{snapshot}", disk.display())
    }

    /// The VM is failed, and says why.
    pub fn assert_failed(&self, name: &str, reason: &str) {
        let info = self.info(name);
        assert_eq!(info["state"], "failed", "{info}");
        assert!(
            info["reason"].as_str().unwrap_or("").contains(reason),
            "{info}"
        );
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state.join("vms").join(name)
    }

    /// Gives a defined VM another workload for its next start (vmctl has
    /// no verb to edit a VM: its config file is the definition).
    pub fn set_cmdline(&self, name: &str, cmdline: &str) {
        let cfg = self.vm_dir(name).join("config.json");
        let mut c: Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).expect("config")).expect("json");
        c["cmdline"] = cmdline.into();
        std::fs::write(&cfg, c.to_string()).expect("config");
    }

    /// Runs `vmctl ARGS` and kills it with SIGKILL after `after` (or lets it
    /// finish first); whether it finished on its own.
    pub fn killed_after(&self, args: &[&str], after: Duration) -> bool {
        let mut child = Command::new(bin("vmctl"))
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("vmctl runs");
        let end = std::time::Instant::now() + after;
        loop {
            if let Some(_st) = child.try_wait().expect("wait") {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_micros(200)));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}
