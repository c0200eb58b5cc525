//! Shared folders: a bench-guest VM with a virtio-fs device whose FUSE
//! requests virtiofsd (the Rust one, a real component nobody here wrote)
//! serves from a host directory: FUSE_INIT, then a file the test wrote
//! looked up, opened and read whole, its bytes hashed in the guest and
//! compared with the host's; a file the guest creates and writes read
//! back on the host. Under the vmm directly and through vmctl's `--share`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use test_infra::{bin, ready, s, Fixture, KillOnDrop, Patience, VmmVm};

/// FNV-1a, as the bench guest hashes what it read.
fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A file of `len` bytes no two runs of which look alike.
fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// What the bench guest writes to an `out=` file: byte `i` of it.
fn guest_pattern(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect()
}

/// virtiofsd on `dir`, listening on `sock` once this returns.
fn virtiofsd(dir: &Path, sock: &Path) -> KillOnDrop {
    // It binds in milliseconds.
    test_infra::spawn_serving(
        Command::new("virtiofsd")
            .arg("--socket-path")
            .arg(sock)
            .arg("--shared-dir")
            .arg(dir)
            .args(["--cache", "auto"]),
        sock,
        "virtiofsd",
        Duration::from_millis(100),
    )
}

fn fs_vm(sock: &Path, cmdline: &str) -> test_infra::GuestRun {
    let mut v = VmmVm::new(&bin("vmm"), cmdline);
    v.options = vec![
        "--fs".into(),
        format!("socket={},tag=share,connect_timeout_ms=10000", s(sock)),
    ];
    v.run().expect("the vmm runs")
}

#[test]
fn a_guest_reads_a_host_file_through_virtiofsd() {
    if !ready("virtio_fs", &["virtiofsd"]) {
        return;
    }
    let fx = Fixture::new();
    let shared = fx.path("shared");
    std::fs::create_dir(&shared).expect("dir");
    // Several FUSE_READs' worth (each takes up to 64 KiB).
    let content = pattern(200_000);
    std::fs::write(shared.join("hello.bin"), &content).expect("w");

    let sock = fx.path("fs.sock");
    let _daemon = virtiofsd(&shared, &sock);
    // Several WRITEs' worth (each carries up to 64 KiB), not a whole
    // number of them.
    let out_size = 150_000;
    let run = fs_vm(
        &sock,
        &format!(
            "mode=fs tag=share file=hello.bin out=from-guest.bin out_size={out_size} \
             timeout_ms=10000"
        ),
    );
    run.assert_ok("the guest reading and writing through virtio-fs");
    assert!(
        run.serial.contains("fs: tag share with 1 request queue(s)"),
        "{}",
        run.serial
    );
    assert_eq!(run.field("size"), content.len() as u64, "{:?}", run.result);
    assert_eq!(run.field("read"), content.len() as u64, "{:?}", run.result);
    let result = run.result.clone().expect("a report");
    assert_eq!(result["fnv"], fnv(&content), "{result}");
    // What the guest wrote is on the host, byte for byte (and fsynced:
    // the guest's FUSE_FSYNC was answered before its report).
    assert_eq!(run.field("written"), out_size, "{result}");
    let written = std::fs::read(shared.join("from-guest.bin")).expect("the guest's file");
    assert_eq!(written.len() as u64, out_size);
    assert!(
        written == guest_pattern(out_size as usize),
        "the guest's bytes differ"
    );
    assert_eq!(result["out_fnv"], fnv(&written), "{result}");

    // A file that is not there: FUSE's ENOENT, by name, the VM ends.
    let sock = fx.path("fs2.sock");
    let _daemon = virtiofsd(&shared, &sock);
    let run = fs_vm(&sock, "mode=fs tag=share file=missing.bin timeout_ms=10000");
    assert!(!run.ok());
    assert!(
        run.serial.contains("FUSE_LOOKUP: FUSE error -2"),
        "{}",
        run.serial
    );
    // A tag the device does not have.
    let sock = fx.path("fs3.sock");
    let _daemon = virtiofsd(&shared, &sock);
    let run = fs_vm(&sock, "mode=fs tag=other file=hello.bin timeout_ms=10000");
    assert!(
        !run.ok() && run.serial.contains("no virtio-fs device has the tag"),
        "{}",
        run.serial
    );
}

#[test]
fn vmctl_shares_a_host_folder_with_its_vm() {
    if !ready("vmctl_share", &["virtiofsd"]) {
        return;
    }
    test_infra::build_guest().expect("the bench guest");
    let fx = Fixture::new();
    let shared = fx.path("shared");
    std::fs::create_dir(&shared).expect("dir");
    let content = pattern(70_000);
    std::fs::write(shared.join("data.bin"), &content).expect("w");
    let base = fx.image("base.img", "16M");
    let vmctl = |args: &[&str]| {
        let mut all = vec!["--state-dir".to_string(), s(&fx.path("state"))];
        all.extend(args.iter().map(|a| a.to_string()));
        test_infra::output_within(
            Command::new(bin("vmctl")).args(&all),
            &Patience::new("a vmctl run", Duration::from_secs(2)),
        )
        .expect("vmctl runs")
    };
    let out = vmctl(&[
        "run",
        "--image",
        &s(&base),
        "--share",
        &format!("{}:share", s(&shared)),
        "--cmdline",
        "mode=fs tag=share file=data.bin timeout_ms=10000",
        "--rm",
        "--output",
        "json",
    ]);
    let report = test_infra::stdout_json(&out);
    assert!(out.status.success(), "{report}");
    let vm = &report["vms"][0];
    assert_eq!(vm["result"]["result"], "ok", "{vm}");
    assert_eq!(vm["result"]["fnv"], fnv(&content), "{vm}");

    // Bad shares are refused by name, nothing made.
    for (share, why) in [
        (
            format!("{}:share", s(&fx.path("nowhere"))),
            "is not a directory",
        ),
        (s(&shared).to_string(), "HOSTDIR:TAG"),
        (
            format!("{}:{}", s(&shared), "t".repeat(37)),
            "a tag of 1 to 36 bytes",
        ),
    ] {
        let out = vmctl(&["create", "bad", "--image", &s(&base), "--share", &share]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{share}: {err}");
    }
    // A share whose folder went away after the VM was made: virtiofsd
    // ends at once, and so does the start, with what it said (it waited
    // for the vmm to give up on the socket before, 120 s).
    let gone = fx.path("gone");
    std::fs::create_dir(&gone).expect("dir");
    let out = vmctl(&[
        "create",
        "gone",
        "--image",
        &s(&base),
        "--share",
        &format!("{}:g", s(&gone)),
        "--cmdline",
        "mode=fs tag=g file=x timeout_ms=10000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir(&gone).expect("rm");
    let out = vmctl(&["start", "gone"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("virtiofsd: it ended at start"),
        "{err}"
    );
    let info = test_infra::stdout_json(&vmctl(&["info", "gone", "--output", "json"]));
    assert_eq!(info["state"], "failed", "{info}");
    assert!(
        info["reason"].as_str().unwrap_or("").contains(&s(&gone)),
        "{info}"
    );
    assert!(vmctl(&["delete", "gone"]).status.success());
    let list = vmctl(&["list"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("bad"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
}

/// A guest as the hostile peer of its shared folder: a bench guest in
/// `mode=fuzz fuzz=fs` writes junk to everything it can reach of its
/// virtio-fs device (features, queue sizes and addresses, rings, notify,
/// MSI-X, PCI configuration) under the real vmm, which hands the rings to
/// virtiofsd. The vmm must see the guest to its end with a bounded log,
/// whatever virtiofsd makes of it; the host's folder serves the next VM.
#[test]
fn junk_from_a_guest_on_its_shared_folder_leaves_the_vmm_standing() {
    if !ready("virtio_fs_fuzz", &["virtiofsd"]) {
        return;
    }
    let fx = Fixture::new();
    let shared = fx.path("shared");
    std::fs::create_dir(&shared).expect("dir");
    let content = pattern(10_000);
    std::fs::write(shared.join("hello.bin"), &content).expect("w");
    for seed in [1u64, 2] {
        let sock = fx.path(&format!("fuzz{seed}.sock"));
        let mut daemon = virtiofsd(&shared, &sock);
        let share = format!("socket={},tag=share", s(&sock));
        let r = VmmVm::fuzzing(&bin("vmm"), "fs", seed, 20_000, "--fs", &share)
            .run()
            .expect("the fuzzed vmm runs");
        let result = r.assert_fuzzed(&format!("seed {seed}"));
        let lines = r.stderr.lines().count();
        let virtiofsd_alive = daemon.0.try_wait().expect("wait").is_none();
        eprintln!(
            "seed {seed}: {} junk writes in {} ms, the vmm logged {lines} lines, \
             virtiofsd {}",
            result["writes"],
            r.total.as_millis(),
            if virtiofsd_alive { "still up" } else { "ended" }
        );
        assert!(
            lines < 400,
            "seed {seed}: the vmm logged {lines} lines:\n{}",
            r.stderr
        );
    }
    let sock = fx.path("after.sock");
    let _daemon = virtiofsd(&shared, &sock);
    let run = fs_vm(&sock, "mode=fs tag=share file=hello.bin timeout_ms=10000");
    run.assert_ok("a VM after the attacks");
    assert_eq!(run.result.clone().expect("a report")["fnv"], fnv(&content));
}

/// The virtiofsd processes (its sandbox forks one) whose command line
/// contains `needle`.
fn virtiofsds_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "virtiofsd")
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// A shared folder's virtiofsd killed while its VM runs: its FUSE session
/// lived in it, so it is not started again; the VM's supervisor says so
/// once in the VM's log, the VM goes on running, and a stop ends it in
/// order.
#[test]
fn a_share_server_killed_under_a_running_vm_is_said_and_the_vm_goes_on() {
    if !ready("vmctl_share_killed", &["virtiofsd"]) {
        return;
    }
    test_infra::build_guest().expect("the bench guest");
    let fx = Fixture::new();
    let shared = fx.path("shared");
    std::fs::create_dir(&shared).expect("dir");
    let base = fx.image("base.img", "16M");
    let state = fx.path("state");
    let vmctl = |args: &[&str]| {
        let mut all = vec!["--state-dir".to_string(), s(&state)];
        all.extend(args.iter().map(|a| a.to_string()));
        let out = test_infra::output_within(
            Command::new(bin("vmctl")).args(&all),
            &Patience::new("a vmctl run", Duration::from_secs(2)),
        )
        .expect("vmctl runs");
        assert!(
            out.status.success(),
            "vmctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    vmctl(&[
        "create",
        "idler",
        "--image",
        &s(&base),
        "--share",
        &format!("{}:share", s(&shared)),
        "--cmdline",
        "mode=idle",
    ]);
    vmctl(&["start", "idler"]);
    let share_socket = state.join("vms/idler/fs0.sock");
    let servers = virtiofsds_with(&s(&share_socket));
    assert!(!servers.is_empty(), "a virtiofsd serves the share");
    for pid in servers {
        // SAFETY: a signal to the virtiofsd this test's VM runs.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let log = state.join("vms/idler/supervisor.log");
    Patience::new("the supervisor noticing", Duration::from_millis(100))
        .wait_until(|| {
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("virtiofsd of share 0 ended"))
        })
        .expect("said");
    let said = std::fs::read_to_string(&log).expect("log");
    assert!(said.contains("not started again"), "{said}");
    assert!(
        virtiofsds_with(&s(&share_socket)).is_empty(),
        "none started again"
    );
    let info = test_infra::stdout_json(&vmctl(&["info", "idler", "--output", "json"]));
    assert_eq!(info["state"], "running", "{info}");
    vmctl(&["stop", "idler"]);
    let info = test_infra::stdout_json(&vmctl(&["info", "idler", "--output", "json"]));
    assert_ne!(info["state"], "failed", "{info}");
    // Said once, not at every wake of the supervisor.
    let said = std::fs::read_to_string(&log).expect("log");
    assert_eq!(
        said.matches("virtiofsd of share 0 ended").count(),
        1,
        "{said}"
    );
    vmctl(&["delete", "idler"]);
}
