//! Networking end to end: a bench-guest VM with a virtio-net NIC whose
//! frames net-backend moves to a tap. Everything lives in a network
//! namespace the test makes and deletes (the tap, its address, the
//! traffic): nothing reaches the host's own namespace or beyond it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use test_infra::{
    bin, output_within, process_ticks, ready, s, Disk, Fixture, KillOnDrop as Process, Netns,
    Patience, QemuNic, QemuVm, RunningVm, VmmVm,
};

/// A persistent multi-queue tap in `ns` with `addr` on it, up: what the
/// host side keeps while backends come and go.
fn tap_with_address(ns: &Netns, tap: &str, addr: &str) {
    ns.tap(tap, true, None);
    ns.ip(&["addr", "add", addr, "dev", tap]);
}

/// net-backend on tap `tap` in `ns`, serving `sock`.
fn net_backend(ns: &Netns, tap: &str, sock: &Path) -> Process {
    net_backend_pairs(ns, tap, sock, 1)
}

/// net-backend with `pairs` queue pairs (a tap queue and a worker each).
fn net_backend_pairs(ns: &Netns, tap: &str, sock: &Path, pairs: u16) -> Process {
    let _ = std::fs::remove_file(sock);
    // Opening the tap and binding take milliseconds. (Its socket is in
    // another namespace's table: its file is what this side can see; the
    // vmm's connect_timeout_ms covers the moment between bind and listen.)
    test_infra::spawn_serving(
        &mut ns.command(&[
            &s(&bin("net-backend")),
            "--socket",
            &s(sock),
            "--tap",
            tap,
            "--queue-pairs",
            &pairs.to_string(),
        ]),
        sock,
        "net-backend",
        Duration::from_millis(50),
    )
}

/// `n` UDP datagrams from the namespace to the VM's echo port, each back
/// with its payload (one resent after a second without an answer: a
/// reconnecting backend may lose one).
fn udp_echoes(ns: &Netns, n: u32, vm: &RunningVm) {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(1)\n\
         for i in range({n}):\n\
         \x20   m = b'echo %d' % i\n\
         \x20   for attempt in range(10):\n\
         \x20       s.sendto(m, ('10.0.0.2', 7))\n\
         \x20       try:\n\
         \x20           d, a = s.recvfrom(2048)\n\
         \x20           if d == m: break\n\
         \x20       except socket.timeout: pass\n\
         \x20   else: raise SystemExit('no echo of %r' % m)\n\
         print('{n} echoed')"
    );
    let udp = output_within(
        &mut ns.command(&["python3", "-c", &script]),
        &Patience::new("udp echoes", Duration::from_secs(2)),
    )
    .expect("python runs");
    assert!(
        String::from_utf8_lossy(&udp.stdout).contains(&format!("{n} echoed")),
        "{}{}\nthe guest:\n{}",
        String::from_utf8_lossy(&udp.stdout),
        String::from_utf8_lossy(&udp.stderr),
        vm.console()
    );
}

fn nic_vm(sock: &Path, cmdline: &str) -> RunningVm {
    nic_vm_pairs(sock, cmdline, 1)
}

/// A VM whose NIC has `pairs` queue pairs (and the control queue).
fn nic_vm_pairs(sock: &Path, cmdline: &str, pairs: u16) -> RunningVm {
    let mut v = VmmVm::new(&bin("vmm"), cmdline);
    v.options = vec![
        "--net".into(),
        format!(
            "socket={},mac=52:54:00:00:00:02,num_queues={},connect_timeout_ms=10000",
            s(sock),
            2 * pairs
        ),
    ];
    let mut vm = v.spawn().expect("vmm starts");
    vm.wait_for_line(
        "nic:",
        &Patience::new("the guest's NIC set up", Duration::from_millis(100)),
    )
    .expect("the NIC comes up");
    vm
}

#[test]
fn the_namespace_pings_a_vm_through_its_tap_and_udp_echoes_come_back() {
    if !ready("net_ping", &["ip", "ping"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "ping");
    let sock = fx.path("net.sock");
    tap_with_address(&ns, "tap0", "10.0.0.1/24");
    // The guest is told its link's MTU: the tap's.
    ns.ip(&["link", "set", "tap0", "mtu", "1400"]);
    let _backend = net_backend(&ns, "tap0", &sock);
    let mut vm = nic_vm(&sock, "mode=net ip=10.0.0.2 progress_ms=100");
    assert!(
        vm.console()
            .contains("nic: 52:54:00:00:00:02 10.0.0.2 link up mtu 1400"),
        "{}",
        vm.console()
    );
    // ARP, then three echoes: each answered (a reply takes microseconds;
    // ping's own wait, -W, only catches a hang).
    let ping = ns.ping("10.0.0.2", 3);
    assert!(
        ping.status.success(),
        "{}\nthe guest:\n{}",
        String::from_utf8_lossy(&ping.stdout),
        vm.console()
    );
    assert!(String::from_utf8_lossy(&ping.stdout).contains("3 received"));
    // Ten UDP datagrams to the echo port, each back with its payload.
    udp_echoes(&ns, 10, &vm);
    // The guest counted them (its next progress line).
    let lines = vm.progress_lines();
    vm.wait_for_progress(
        lines + 1,
        &Patience::new("a progress line", Duration::from_millis(200)),
    )
    .expect("progress");
    let last = vm
        .console()
        .lines()
        .rev()
        .find(|l| l.starts_with("progress:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("icmp 3 udp 10") && !last.contains("arp 0"),
        "{last}"
    );
}

#[test]
fn floods_between_a_vm_and_the_host_are_counted_exactly_at_both_ends() {
    if !ready("net_flood", &["ip", "ping"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "flood");
    let sock = fx.path("net.sock");
    tap_with_address(&ns, "tap0", "10.0.0.1/24");
    // A device of two pairs (the bench guest drives the first: it does
    // not negotiate MQ, so the others stay unused).
    let _backend = net_backend_pairs(&ns, "tap0", &sock, 2);

    // Host to guest: 2000 datagrams of 100 bytes, in bursts of 100 (the
    // guest's 256 receive buffers and the tap's queue hold a burst: none
    // is dropped), to the guest's discard port; the guest counts them and
    // ends once they stop for 5 s (bursts come 10 ms apart: a wide margin
    // for a busy host).
    // A NIC of one pair on it is refused by name (the control queue's
    // place would differ), the backend serving on.
    let mut one = VmmVm::new(&bin("vmm"), "mode=net ip=10.0.0.2");
    one.options = vec![
        "--net".into(),
        format!("socket={},connect_timeout_ms=10000", s(&sock)),
    ];
    let refused = format!("{:#}", one.run().expect_err("a NIC of one pair is refused"));
    assert!(
        refused.contains(&format!(
            "nic {}: the backend serves 2 queue pairs (its control queue after them), this NIC has 1: give num_queues=4",
            s(&sock)
        )),
        "{refused}"
    );
    let vm = nic_vm_pairs(
        &sock,
        "mode=net ip=10.0.0.2 progress_ms=0 sink_idle_ms=5000 wait=halt",
        2,
    );
    assert!(ns.ping("10.0.0.2", 1).status.success(), "{}", vm.console());
    let (sent, _) = ns
        .udp_flood(
            "10.0.0.1",
            ("10.0.0.2", 9),
            2000,
            100,
            Some((100, Duration::from_millis(10))),
        )
        .expect("a sender in the namespace")
        .join();
    assert_eq!(sent, 2000);
    let run = vm.wait().expect("the sink ends");
    run.assert_ok("the guest counting a flood");
    assert_eq!(run.field("discarded"), 2000, "{:?}", run.result);
    assert_eq!(run.field("discarded_bytes"), 200_000, "{:?}", run.result);

    // Guest to host: 20000 datagrams of 18 bytes (64-byte frames) as fast
    // as the ring takes them, the vCPU asleep while it is full; the
    // host's socket (room for all of them) counts every one.
    let sink = ns
        .udp_sink(
            "10.0.0.1",
            9,
            Duration::from_secs(30),
            // The sink's end: 5 s without a datagram (the guest sends
            // without pause; a wide margin for a stalled vCPU).
            Duration::from_secs(5),
        )
        .expect("a sink in the namespace");
    let vm = nic_vm_pairs(
        &sock,
        "mode=net ip=10.0.0.2 peer=10.0.0.1 flood=1 count=20000 payload=18 wait=halt timeout_ms=10000",
        2,
    );
    let run = vm.wait().expect("the flood ends");
    run.assert_ok("the guest flooding the host");
    assert_eq!(run.field("sent"), 20000, "{:?}", run.result);
    let got = sink.join();
    assert_eq!(got.datagrams, 20000, "{got:?}");
    assert_eq!(got.bytes, 20000 * 18, "{got:?}");
}

#[test]
fn a_net_backend_killed_during_a_flood_comes_back_and_echoes_resume() {
    if !ready("net_backend_kill", &["ip"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "kill");
    let sock = fx.path("net.sock");
    tap_with_address(&ns, "tap0", "10.0.0.1/24");
    let backend = net_backend(&ns, "tap0", &sock);
    let mut vm = nic_vm(&sock, "mode=net ip=10.0.0.2 progress_ms=100");
    udp_echoes(&ns, 5, &vm);
    // A flood of datagrams from the namespace (as fast as python sends
    // them), the backend killed under it and started again.
    let flood = Process(
        ns.command(&[
            "python3",
            "-c",
            "import socket, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             end = time.time() + 600\n\
             while time.time() < end:\n\
             \x20   try: s.sendto(b'flood', ('10.0.0.2', 7))\n\
             \x20   except OSError: time.sleep(0.001)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the flood"),
    );
    // The datagrams the guest has echoed, from its last progress line.
    let echoed = |vm: &RunningVm| -> u64 {
        vm.console()
            .lines()
            .rev()
            .find(|l| l.starts_with("progress:"))
            .and_then(|l| l.split("udp ").nth(1)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let under_flood = Patience::new("progress under the flood", Duration::from_millis(200));
    let lines = vm.progress_lines();
    vm.wait_for_progress(lines + 2, &under_flood)
        .expect("the guest runs");
    drop(backend);
    let before = echoed(&vm);
    let _backend = net_backend(&ns, "tap0", &sock);
    // The vmm reconnects (its watcher sees the hang-up) and the guest,
    // which never noticed, goes on counting the flood's datagrams.
    let mut now = before;
    Patience::new(
        "the flood's echoes after the restart",
        Duration::from_millis(500),
    )
    .wait_until(|| {
        now = echoed(&vm);
        Ok(now > before + 100)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {before} echoed before, {now} since:\n{}",
            vm.console()
        )
    });
    drop(flood);
    // The flood over, every datagram is echoed again.
    udp_echoes(&ns, 5, &vm);
    assert!(vm.running(), "the VM lives on:\n{}", vm.console());
}

#[test]
fn vmctl_gives_vms_addresses_on_a_bridge_and_takes_everything_away_on_delete() {
    if !ready("vmctl_net", &["ip", "ping"]) {
        return;
    }
    test_infra::build_guest().expect("the bench guest");
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "vmctl");
    let base = fx.image("base.img", "16M");
    let v = VmctlIn::new(&ns, &fx);
    let vmctl = |args: &[&str]| v.ok(args);
    let info = |name: &str| -> serde_json::Value {
        serde_json::from_str(&vmctl(&["info", name, "--output", "json"])).expect("json")
    };
    // a: a NIC and nothing else; b: a VM at rest beside its disk (idle
    // mode), which answers on its NIC all the same.
    for (name, cmdline) in [
        ("a", "mode=net progress_ms=100"),
        ("b", "mode=idle irq=1 wait=halt"),
    ] {
        vmctl(&[
            "create",
            name,
            "--image",
            &s(&base),
            "--net",
            "--cmdline",
            cmdline,
        ]);
        vmctl(&["start", name]);
    }
    let (a, b) = (info("a"), info("b"));
    assert_eq!(a["address"], "10.88.0.2", "{a}");
    assert_eq!(b["address"], "10.88.0.3", "{b}");
    assert_ne!(a["mac"], b["mac"]);
    assert_eq!(a["bridge"], "vmbr0");
    let list = vmctl(&["list"]);
    assert!(
        list.contains("10.88.0.2") && list.contains("10.88.0.3"),
        "{list}"
    );
    // The bridge's side (its address is the namespace's) reaches both.
    for addr in ["10.88.0.2", "10.88.0.3"] {
        let ping = ns.ping(addr, 2);
        assert!(
            ping.status.success(),
            "{addr}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }
    // A guest that asks for its address (ip=dhcp) gets the one vmctl gave
    // it from the bridge's DHCP server (dnsmasq), and answers there.
    if test_infra::have("dnsmasq", "vmctl_net_dhcp") {
        vmctl(&[
            "create",
            "c",
            "--image",
            &s(&base),
            "--net",
            "--cmdline",
            "mode=net ip=dhcp progress_ms=100 timeout_ms=30000",
        ]);
        vmctl(&["start", "c"]);
        assert_eq!(info("c")["address"], "10.88.0.4");
        Patience::new("the DHCP lease", Duration::from_millis(500))
            .wait_until(|| Ok(vmctl(&["logs", "c"]).contains("nic: ")))
            .unwrap_or_else(|e| panic!("{e}: {}", vmctl(&["logs", "c"])));
        let console = vmctl(&["logs", "c"]);
        assert!(console.contains(" 10.88.0.4 link up"), "{console}");
        let ping = ns.ping("10.88.0.4", 2);
        assert!(ping.status.success(), "{console}");
        vmctl(&["delete", "--force", "c"]);
    }
    // Each VM's tap is a port of the bridge; a deleted VM leaves none.
    let ports = || -> String {
        let out = ns
            .command(&["ip", "-o", "link", "show", "master", "vmbr0"])
            .output()
            .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (tap_a, tap_b) = (
        a["tap"].as_str().expect("a's tap").to_string(),
        b["tap"].as_str().expect("b's tap").to_string(),
    );
    assert!(
        ports().contains(&tap_a) && ports().contains(&tap_b),
        "{}",
        ports()
    );
    // vmctl snapshots no VM with a NIC (every copy restored from it
    // would wake up with its MAC and address): refused by name.
    let refused = output_within(
        &mut v.command(&["snapshot", "a", "s1"]),
        &Patience::new("a vmctl call", Duration::from_millis(200)),
    )
    .expect("vmctl runs");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && why.contains("VM a has a NIC"),
        "{why}"
    );
    vmctl(&["delete", "--force", "a"]);
    assert!(!ports().contains(&tap_a), "{}", ports());
    let gone = ns
        .command(&["ip", "link", "show", "dev", &tap_a])
        .output()
        .expect("ip");
    assert!(!gone.status.success(), "a's tap is gone");
    assert!(ports().contains(&tap_b));
    vmctl(&["delete", "--force", "b"]);
    assert!(!ports().contains(&tap_b), "{}", ports());
}

/// vmctl inside the namespace, unchanged, on a state directory of the
/// test's own.
struct VmctlIn<'a> {
    ns: &'a Netns,
    state: std::path::PathBuf,
}

impl<'a> VmctlIn<'a> {
    fn new(ns: &'a Netns, fx: &Fixture) -> VmctlIn<'a> {
        test_infra::build_guest().expect("the bench guest");
        VmctlIn {
            ns,
            state: fx.path("state"),
        }
    }

    /// A call that must succeed: its output. (A start or a delete takes
    /// tens of milliseconds here.)
    /// `vmctl ARGS` on this state directory, in the namespace.
    fn command(&self, args: &[&str]) -> Command {
        let mut all = vec![s(&bin("vmctl")), "--state-dir".into(), s(&self.state)];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.ns.command(&all)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = output_within(
            &mut self.command(args),
            &Patience::new("a vmctl call", Duration::from_millis(200)),
        )
        .expect("vmctl runs");
        assert!(
            out.status.success(),
            "vmctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn every_vm_of_a_fleet_answers_on_its_address_while_its_disk_workload_runs() {
    if !ready("net_fleet", &["ip", "ping"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "fleet");
    let base = fx.image("base.img", "16M");
    let v = VmctlIn::new(&ns, &fx);
    // Three VMs reading their disks for 6 s (interrupt-driven: halted
    // between completions), each with a NIC on vmbr0; the run waits for
    // all of them.
    let mut command = v.command(&[
        "run",
        "--count",
        "3",
        "--name",
        "fleet",
        "--image",
        &s(&base),
        "--net",
        "--cmdline",
        "mode=randread duration_ms=6000 irq=1 wait=halt progress_ms=0",
        "--output",
        "json",
    ]);
    let run = std::thread::spawn(move || {
        output_within(
            &mut command,
            &Patience::new("the fleet's run", Duration::from_secs(7)),
        )
    });
    // Each VM, once its NIC is up, answers pings on the address vmctl
    // gave it (its own of the three) while its disk workload runs. (Three
    // boots take well under a second here.)
    let mut addresses = Vec::new();
    for i in 1..=3 {
        let name = format!("fleet-{i}");
        let logs = || -> String {
            v.command(&["logs", &name])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout).into_owned()
                        + &String::from_utf8_lossy(&o.stderr)
                })
                .unwrap_or_default()
        };
        Patience::new("a fleet VM's NIC", Duration::from_millis(500))
            .wait_until(|| Ok(logs().contains(" link up")))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", logs()));
        let info: serde_json::Value =
            serde_json::from_str(&v.ok(&["info", &name, "--output", "json"])).expect("json");
        let addr = info["address"].as_str().expect("an address").to_string();
        assert!(logs().contains(&format!(" {addr} link up")), "{}", logs());
        let ping = ns.ping(&addr, 2);
        assert!(
            ping.status.success(),
            "{name} at {addr}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        addresses.push(addr);
    }
    addresses.sort();
    assert_eq!(addresses, ["10.88.0.2", "10.88.0.3", "10.88.0.4"]);
    let out = run
        .join()
        .expect("the runner thread")
        .expect("vmctl run ends");
    let report = test_infra::stdout_json(&out);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    for vm in report["vms"].as_array().expect("rows") {
        assert_eq!(vm["result"]["result"], "ok", "{vm}");
        assert!(vm["result"]["ios"].as_u64().unwrap_or(0) > 0, "{vm}");
    }
}

#[test]
fn two_vms_on_one_bridge_exchange_udp_with_counts_on_both_ends() {
    if !ready("net_two_vms", &["ip"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "pair");
    let base = fx.image("base.img", "16M");
    let v = VmctlIn::new(&ns, &fx);
    let image = s(&base);
    // Both interrupt-driven: halted while nothing arrives (a fleet's idle
    // VMs spin no host core).
    v.ok(&[
        "create",
        "srv",
        "--image",
        &image,
        "--net",
        "--cmdline",
        "mode=net progress_ms=100 wait=halt",
    ]);
    v.ok(&["start", "srv"]);
    // 2000 datagrams of 256 bytes, 8 in flight, to srv's echo port.
    v.ok(&[
        "create",
        "cli",
        "--image",
        &image,
        "--net",
        "--cmdline",
        "mode=net peer=10.88.0.2 count=2000 window=8 payload=256 timeout_ms=20000 wait=halt",
    ]);
    v.ok(&["start", "cli"]);
    let waited = v.ok(&["wait", "cli"]);
    let last = v.ok(&["logs", "cli", "--tail", "1"]);
    assert!(waited.contains("exited (0)"), "{waited}{last}");
    let report: serde_json::Value = serde_json::from_str(last.trim()).expect("the report");
    eprintln!("the client: {report}");
    assert_eq!(report["received"], 2000, "{report}");
    assert_eq!(report["bogus"], 0, "{report}");
    // The server echoed every one of them (its next progress line).
    let echoed = || -> u64 {
        v.ok(&["logs", "srv"])
            .lines()
            .rev()
            .find(|l| l.starts_with("progress:"))
            .and_then(|l| l.split("udp ").nth(1)?.trim().parse().ok())
            .unwrap_or(0)
    };
    Patience::new("srv's progress line", Duration::from_millis(200))
        .wait_until(|| Ok(echoed() >= 2000))
        .unwrap_or_else(|e| panic!("{e}: {}", v.ok(&["logs", "srv", "--tail", "3"])));
    assert_eq!(echoed(), 2000);
    v.ok(&["delete", "--force", "srv"]);
    v.ok(&["delete", "cli"]);
}

/// QEMU as a peer: a QEMU VM on QEMU's own tap device (userspace,
/// vhost=off) on one bridge with a VM of ours: both answer the namespace,
/// and QEMU's guest exchanges 500 datagrams with ours, every one echoed.
/// (QEMU's `-netdev vhost-user` on net-backend is not here yet: QEMU
/// 10 sends SET_VRING_ENABLE before SET_FEATURES to a vhost-user NIC, which
/// the vhost crate's request handler refuses as an inactive feature.)
/// A QEMU bench guest with `nic`, run inside `ns` to its end.
fn qemu_guest_in(ns: &Netns, nic: QemuNic, cmdline: &str) -> test_infra::GuestRun {
    let mut qemu = QemuVm::new(Disk::None, cmdline);
    qemu.mem_mib = 256;
    qemu.nic = Some(nic);
    let ns_name = ns.name.clone();
    qemu.spawn_wrapped(move |q| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns_name])
            .arg(q.get_program())
            .args(q.get_args());
        c
    })
    .expect("QEMU starts in the namespace")
    .wait()
    .expect("the QEMU guest ends")
}

#[test]
fn qemu_peers_on_our_bridge_talk_to_our_vm() {
    if !ready("net_qemu_peer", &["ip", "ping", "qemu-system-x86_64"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "qemu");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    // Ours: vmm + net-backend, answering at 10.0.0.2.
    ns.tap("tap-ours", true, Some("br0"));
    let ours_sock = fx.path("ours.sock");
    let _ours_backend = net_backend(&ns, "tap-ours", &ours_sock);
    let ours = nic_vm(&ours_sock, "mode=net ip=10.0.0.2 progress_ms=100");

    // QEMU's own tap device (a single-queue tap), at 10.0.0.4, a client
    // of ours.
    ns.tap("tap-qemu", false, Some("br0"));
    let run = qemu_guest_in(
        &ns,
        QemuNic::Tap {
            ifname: "tap-qemu".into(),
            mac: "52:54:00:00:00:04".into(),
        },
        "mode=net ip=10.0.0.4 peer=10.0.0.2 count=500 window=4 timeout_ms=20000",
    );
    run.assert_ok("QEMU's guest on its own tap, a client of ours");
    assert_eq!(run.field("received"), 500, "{:?}", run.result);

    // QEMU's virtio-net on `-netdev vhost-user`: our net-backend serves
    // QEMU as it serves the vmm (QEMU enables the rings before it sets the
    // features: third_party/README.md), at 10.0.0.5.
    ns.tap("tap-qemu-vu", true, Some("br0"));
    let vu_sock = fx.path("qemu-vu.sock");
    let _vu_backend = net_backend(&ns, "tap-qemu-vu", &vu_sock);
    let run = qemu_guest_in(
        &ns,
        QemuNic::VhostUser {
            socket: vu_sock.clone(),
            mac: "52:54:00:00:00:05".into(),
        },
        "mode=net ip=10.0.0.5 peer=10.0.0.2 count=500 window=4 timeout_ms=20000",
    );
    run.assert_ok("QEMU's guest on our net-backend, a client of ours");
    assert_eq!(run.field("received"), 500, "{:?}", run.result);

    let ping = ns.ping("10.0.0.2", 2);
    assert!(
        ping.status.success(),
        "{}\nours:\n{}",
        String::from_utf8_lossy(&ping.stdout),
        ours.console()
    );
}

#[test]
fn vmctl_masquerades_a_nat_bridge_while_its_vm_runs_and_leaves_no_rule() {
    if !ready("vmctl_nat", &["ip", "nft"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "nat");
    let base = fx.image("base.img", "16M");
    let v = VmctlIn::new(&ns, &fx);
    let ruleset = || -> String {
        let out = ns
            .command(&["nft", "list", "ruleset"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!ruleset().contains("vmctl"));
    let forward = || {
        let out = ns
            .command(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .output()
            .expect("cat");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // As found: off (a new namespace's default), and off again after.
    assert_eq!(forward(), "0");
    v.ok(&[
        "create",
        "gw",
        "--image",
        &s(&base),
        "--net",
        "--nat",
        "--cmdline",
        "mode=net",
    ]);
    v.ok(&["start", "gw"]);
    let rules = ruleset();
    assert!(
        rules.contains("ip saddr 10.88.0.0/24 oifname != \"vmbr0\" masquerade"),
        "{rules}"
    );
    let forwarding = ns
        .command(&["cat", "/proc/sys/net/ipv4/ip_forward"])
        .output()
        .expect("cat");
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout).trim(), "1");
    // No traffic is sent anywhere: the rule's presence is what is checked.
    v.ok(&["delete", "--force", "gw"]);
    assert!(!ruleset().contains("vmctl"), "{}", ruleset());
    assert_eq!(forward(), "0", "IPv4 forwarding set back as it was found");
}

/// Two state roots in one namespace never hand out addresses on one
/// bridge (the second is refused by name), a new bridge gets a subnet
/// of its own, an interface that is no bridge is refused at create, and
/// `vmctl network ls/rm` shows and removes what vmctl made.
#[test]
fn bridges_are_one_state_root_s_each_with_a_subnet_of_their_own() {
    if !ready("vmctl_net_bridges", &["ip"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "brs");
    let base = fx.image("base.img", "16M");
    let a = VmctlIn::new(&ns, &fx);
    let b = VmctlIn {
        ns: &ns,
        state: fx.path("state-b"),
    };
    let fails = |v: &VmctlIn, args: &[&str]| -> String {
        let out = output_within(
            &mut v.command(args),
            &Patience::new("a vmctl call", Duration::from_millis(200)),
        )
        .expect("vmctl runs");
        assert!(!out.status.success(), "vmctl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let idle = "mode=idle irq=1 wait=halt";
    a.ok(&[
        "create",
        "a1",
        "--image",
        &s(&base),
        "--net",
        "--cmdline",
        idle,
    ]);
    a.ok(&["start", "a1"]);
    // b's VM on a's bridge: refused, naming a's state root.
    let e = fails(&b, &["create", "b1", "--image", &s(&base), "--net"]);
    assert!(
        e.contains("hands out addresses for vmctl state root") && e.contains(&s(&a.state)),
        "{e}"
    );
    // On a bridge of its own: another subnet.
    b.ok(&[
        "create",
        "b1",
        "--image",
        &s(&base),
        "--net",
        "br-b",
        "--cmdline",
        idle,
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&b.ok(&["info", "b1", "--output", "json"])).expect("json");
    assert_eq!(info["address"], "10.88.1.2", "{info}");
    b.ok(&["start", "b1"]);
    // Without net-backend (a vmctl alone in a directory, none on PATH):
    // refused at create, before any bridge or DHCP server is made.
    let lonely = fx.path("lonely");
    std::fs::create_dir(&lonely).expect("dir");
    std::fs::copy(bin("vmctl"), lonely.join("vmctl")).expect("copy");
    let out = ns
        .command(&[
            &s(&lonely.join("vmctl")),
            "--state-dir",
            &s(&a.state),
            "create",
            "y",
            "--image",
            &s(&base),
            "--net",
            "br-y",
        ])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .expect("vmctl");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("--net needs net-backend"),
        "{e}"
    );
    assert!(!a.state.join("vms/y").exists());
    // An interface that is no bridge.
    let e = fails(&a, &["create", "x", "--image", &s(&base), "--net", "lo"]);
    assert!(e.contains("lo is an interface but not a bridge"), "{e}");
    // network ls / rm.
    let listed: serde_json::Value =
        serde_json::from_str(&a.ok(&["network", "ls", "--output", "json"])).expect("json");
    assert_eq!(listed[0]["name"], "vmbr0", "{listed}");
    assert_eq!(listed[0]["subnet"], "10.88.0.1/24", "{listed}");
    assert_eq!(listed[0]["made-by-vmctl"], true, "{listed}");
    assert_eq!(listed[0]["vms"][0], "a1", "{listed}");
    let e = fails(&a, &["network", "rm", "vmbr0"]);
    assert!(e.contains("has VMs defined on it (a1)"), "{e}");
    let e = fails(&a, &["network", "rm", "br-b"]);
    assert!(
        e.contains("was not made by vmctl for this state root"),
        "{e}"
    );
    a.ok(&["delete", "--force", "a1"]);
    a.ok(&["network", "rm", "vmbr0"]);
    let gone = ns
        .command(&["ip", "link", "show", "dev", "vmbr0"])
        .output()
        .expect("ip");
    assert!(!gone.status.success(), "vmbr0 removed");
    b.ok(&["delete", "--force", "b1"]);
    b.ok(&["network", "rm", "br-b"]);
}

#[test]
fn a_vm_with_a_nic_is_snapshotted_and_its_restored_copy_answers_on_its_address() {
    if !ready("net_snapshot", &["ip", "ping"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "snap");
    let sock = fx.path("net.sock");
    tap_with_address(&ns, "tap0", "10.0.0.1/24");
    let _backend = net_backend(&ns, "tap0", &sock);
    // No mac=: the one drawn at boot is what the snapshot's guest knows,
    // and what its restored copy keeps.
    let net = format!("socket={},connect_timeout_ms=10000", s(&sock));
    let api_sock = fx.path("api.sock");
    let mut v = VmmVm::new(&bin("vmm"), "mode=net ip=10.0.0.2 progress_ms=100");
    v.options = vec!["--net".into(), net.clone()];
    v.api_socket = Some(api_sock.clone());
    let mut original = v.spawn().expect("vmm starts");
    original
        .wait_for_line(
            "nic:",
            &Patience::new("the guest's NIC set up", Duration::from_millis(100)),
        )
        .expect("the NIC comes up");
    let mac = original
        .console()
        .lines()
        .find_map(|l| l.strip_prefix("nic: ").map(|r| r[..17].to_string()))
        .expect("the guest's MAC");
    udp_echoes(&ns, 10, &original);
    let snap = fx.path("snap");
    assert!(test_infra::vmm_api(&api_sock, &["pause"]).0, "pause");
    let (ok, out) = test_infra::vmm_api(&api_sock, &["snapshot", "--dir", &s(&snap)]);
    assert!(ok, "snapshot of a VM with a NIC: {out}");
    drop(original);

    // Given again as the snapshot had it, or refused by name: a NIC
    // missing, another MAC.
    let restore = |options: Vec<String>| {
        let mut v = VmmVm::new(&bin("vmm"), "");
        v.restore = Some(snap.clone());
        v.options = options;
        v
    };
    let refused = |options: Vec<String>| {
        let e = restore(options).run().expect_err("a restore refused");
        format!("{e:#}")
    };
    let missing = refused(vec![]);
    assert!(missing.contains("had 1 NICs; 0 were given"), "{missing}");
    let other_mac = refused(vec!["--net".into(), format!("{net},mac=52:54:00:00:00:99")]);
    assert!(
        other_mac.contains(&format!("knows its NIC as {mac}")),
        "{other_mac}"
    );

    // Restored on the same backend (a new session): the guest goes on
    // answering on its address, with its MAC.
    let mut restored = restore(vec!["--net".into(), net.clone()])
        .spawn()
        .expect("the restored vmm starts");
    let lines = restored.progress_lines();
    restored
        .wait_for_progress(
            lines + 1,
            &Patience::new("the restored guest's progress", Duration::from_millis(100)),
        )
        .expect("the restored guest runs");
    udp_echoes(&ns, 10, &restored);
    let ping = ns.ping("10.0.0.2", 3);
    assert!(
        ping.status.success(),
        "{}\nthe guest:\n{}",
        String::from_utf8_lossy(&ping.stdout),
        restored.console()
    );
    let neigh = ns
        .command(&["ip", "neigh", "show", "10.0.0.2"])
        .output()
        .expect("ip neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(neigh.contains(&mac), "{neigh} (the guest's MAC is {mac})");
}

/// A guest as net-backend's hostile peer: a bench guest in `mode=fuzz
/// fuzz=nic` writes junk to everything it can reach of its NIC (features,
/// ring sizes and addresses, rings, the control queue, notify, MSI-X, PCI
/// configuration) under the real vmm, four seeds one after another, while
/// broadcasts from the namespace keep its receive path busy and a
/// bystander VM on another net-backend on the same bridge answers echoes
/// and pings all along. The attacked net-backend must stay up, go back to
/// idle after each attack, keep its log bounded, and serve a new VM.
#[test]
fn junk_from_a_guest_on_its_nic_leaves_net_backend_and_the_vm_beside_it_standing() {
    if !ready("net_fuzz", &["ip", "ping", "python3"]) {
        return;
    }
    let fx = Fixture::new();
    let ns = Netns::new("vmmtest", "fuzz");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    ns.tap("tapv", true, Some("br0"));
    ns.tap("tapb", true, Some("br0"));
    let (victim_sock, bystander_sock) = (fx.path("victim.sock"), fx.path("bystander.sock"));
    let log = fx.path("victim-net-backend.log");
    let mut victim = test_infra::spawn_serving(
        ns.command(&[
            &s(&bin("net-backend")),
            "--socket",
            &s(&victim_sock),
            "--tap",
            "tapv",
        ])
        .stderr(std::fs::File::create(&log).expect("the log")),
        &victim_sock,
        "the attacked net-backend",
        Duration::from_millis(50),
    );
    let _bystander_backend = net_backend(&ns, "tapb", &bystander_sock);
    let bystander = nic_vm(&bystander_sock, "mode=net ip=10.0.0.2 wait=halt");

    // Echoes from the bystander, and broadcasts the fuzzed NIC receives,
    // until the stop file appears; every echo must come back.
    let stop = fx.path("traffic.stop");
    let script = format!(
        "import socket, os\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(1)\n\
         b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         b.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n\
         i = 0\n\
         while not os.path.exists('{stop}'):\n\
         \x20   m = b'echo %d' % i\n\
         \x20   for attempt in range(10):\n\
         \x20       s.sendto(m, ('10.0.0.2', 7))\n\
         \x20       b.sendto(b'for the fuzzed nic %d' % i, ('10.0.0.255', 9))\n\
         \x20       try:\n\
         \x20           d, a = s.recvfrom(2048)\n\
         \x20           if d == m: break\n\
         \x20       except socket.timeout: pass\n\
         \x20   else: raise SystemExit('no echo of %r' % m)\n\
         \x20   i += 1\n\
         print('%d echoed' % i)",
        stop = s(&stop)
    );
    let traffic = ns
        .command(&["python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    let traffic = Process(traffic);

    let pid = victim.0.id();
    for seed in [1u64, 2, 3, 4] {
        let nic = format!(
            "socket={},mac=52:54:00:00:00:05,num_queues=2",
            s(&victim_sock)
        );
        let r = VmmVm::fuzzing(&bin("vmm"), "nic", seed, 20_000, "--net", &nic)
            .run()
            .expect("the fuzzed vmm runs");
        let result = r.assert_fuzzed(&format!("seed {seed}"));
        assert!(
            victim.0.try_wait().expect("wait").is_none(),
            "seed {seed}: net-backend died:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // Idle once its frontend is gone: what it spends in a second.
        let before = process_ticks(pid);
        std::thread::sleep(Duration::from_secs(1));
        let spent = process_ticks(pid) - before;
        eprintln!(
            "seed {seed}: {} junk writes in {} ms; net-backend then used {spent} ticks in an idle second",
            result["writes"],
            r.total.as_millis()
        );
        assert!(
            spent <= 15,
            "seed {seed}: net-backend spent {spent} ticks idle"
        );
        // The bystander answers pings between attacks.
        let ping = ns.ping("10.0.0.2", 2);
        assert!(ping.status.success(), "{}", bystander.console());
    }
    std::fs::write(&stop, b"").expect("stop file");
    let mut traffic = traffic;
    let out = output_of(&mut traffic.0);
    assert!(
        out.contains("echoed"),
        "the bystander's echoes: {out}\n{}",
        bystander.console()
    );
    eprintln!("the bystander during the attacks: {}", out.trim());

    // A new VM on the attacked net-backend is served.
    let fresh = nic_vm(&victim_sock, "mode=net ip=10.0.0.3 wait=halt");
    let ping = ns.ping("10.0.0.3", 3);
    assert!(
        ping.status.success(),
        "the next VM on the attacked net-backend:\n{}",
        fresh.console()
    );
    drop(fresh);
    let _ = victim.0.kill();
    let _ = victim.0.wait();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let lines = logged.lines().count();
    eprintln!("the attacked net-backend logged {lines} lines over 4 attacks");
    // A few lines an attack (each queue broken once, sessions ended).
    assert!(
        lines <= 4 * 40,
        "net-backend logged {lines} lines:\n{logged}"
    );
}

/// What a child that was told to stop printed, once it ended.
fn output_of(child: &mut std::process::Child) -> String {
    let out = Patience::new("the traffic to stop", Duration::from_secs(2))
        .wait_until(|| Ok(child.try_wait()?.is_some()));
    let mut text = String::new();
    use std::io::Read;
    if let Some(o) = child.stdout.as_mut() {
        let _ = o.read_to_string(&mut text);
    }
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut text);
    }
    if let Err(e) = out {
        text.push_str(&format!("\n{e}"));
    }
    text
}
