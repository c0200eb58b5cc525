//! A network namespace of a test's (or a benchmark's) own: its bridges,
//! taps, addresses and traffic live there and go with it, so nothing
//! reaches the host's own namespace or beyond it.

use std::process::{Child, Command, Output};
use std::time::Duration;

use crate::patience::Patience;
use crate::workspace::output_within;

/// The namespace, deleted (with everything in it) when dropped. Its set-up
/// steps panic with what `ip` said: they fail only on a broken host.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `PREFIX-TAG-PID`, its loopback up.
    pub fn new(prefix: &str, tag: &str) -> Netns {
        let name = format!("{prefix}-{tag}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(st.success(), "ip netns add {name}");
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `cmd` inside the namespace.
    pub fn command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(cmd);
        c
    }

    /// `ip ARGS` inside the namespace, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        let out = self.command(&all).output().expect("ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A persistent tap with virtio-net headers, multi-queue for
    /// net-backend (QEMU's own tap device opens a single-queue one), on
    /// `bridge` if given, up.
    pub fn tap(&self, name: &str, multi_queue: bool, bridge: Option<&str>) {
        let mut add = vec!["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"];
        if multi_queue {
            add.push("multi_queue");
        }
        self.ip(&add);
        if let Some(b) = bridge {
            self.ip(&["link", "set", name, "master", b]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// `count` pings of `addr` from the namespace, 0.2 s apart (ping's own
    /// 5 s wait per reply only catches a hang).
    pub fn ping(&self, addr: &str, count: u32) -> Output {
        output_within(
            &mut self.command(&[
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "5",
                addr,
            ]),
            &Patience::new("ping", Duration::from_secs(1)),
        )
        .expect("ping runs")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process (a backend, a flood) ended with its owner however the
/// owner ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
