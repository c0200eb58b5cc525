//! vmctl end to end, with real processes and the bench guest: a VM's whole
//! lifecycle (its console followed to its end), a disk backend killed under a verifying write (the
//! supervisor restarts it, the guest sees nothing), a killed vmm reported
//! as failed, racing starts, a fleet with one failing VM, bad input; VM
//! snapshots (a running VM saved by name, a fleet continuing from it) and
//! backups of running VMs restored into new VMs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use test_infra::{bin, build_guest, output_within, ready, Fixture, Patience, Vmctl};

fn golden(fx: &Fixture) -> PathBuf {
    fx.golden_base().0
}

fn until(what: &str, measured: Duration, mut f: impl FnMut() -> bool) {
    Patience::new(what, measured)
        .wait_until(|| Ok(f()))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_vm_lives_its_whole_lifecycle_and_its_clone_keeps_its_data() {
    if !ready("vmctl_lifecycle", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let image = base.to_str().expect("utf-8");
    v.ok(&[
        "create",
        "web",
        "--image",
        image,
        "--disk-size",
        "128M",
        "--cmdline",
        // Reads verifying the base's data through the clone for 3 s: paused
        // and resumed meanwhile.
        "mode=randread verify=1 expect_gen=7 size=8M duration_ms=3000 progress_ms=200 timeout_ms=60000",
    ]);
    assert_eq!(v.info("web")["state"], "defined");
    // The clone grew past its 64 MiB base: the guest sees 128 MiB.
    v.ok(&["start", "web"]);
    let list = v.ok(&["list"]);
    assert!(list.contains("web") && list.contains("running"), "{list}");
    assert_eq!(v.ok(&["pause", "web"]).trim(), "web: paused");
    assert_eq!(v.info("web")["state"], "paused");
    // Both verbs are idempotent, and say so.
    assert_eq!(v.ok(&["pause", "web"]).trim(), "web: paused (already)");
    assert_eq!(v.ok(&["resume", "web"]).trim(), "web: running");
    assert_eq!(v.info("web")["state"], "running");
    assert_eq!(v.ok(&["resume", "web"]).trim(), "web: running (already)");
    until(
        "a progress line in vmctl logs",
        Duration::from_millis(500),
        || v.ok(&["logs", "web"]).contains("progress:"),
    );
    // Followed from here to its end: the whole console, what came while
    // following included, and the follow ends with the VM.
    let (followed, waited) = std::thread::scope(|s| {
        let follow = s.spawn(|| v.call(&["logs", "web", "--follow"], Duration::from_secs(3)));
        let waited = v.call(&["wait", "web"], Duration::from_secs(3));
        (follow.join().expect("the follow"), waited)
    });
    let console = v.ok(&["logs", "web", "--tail", "5"]);
    assert!(waited.status.success(), "{waited:?}\n{console}");
    assert!(followed.status.success(), "{followed:?}");
    assert_eq!(
        String::from_utf8_lossy(&followed.stdout),
        v.ok(&["logs", "web"]),
        "vmctl logs --follow printed the console as kept"
    );
    let last = v.ok(&["logs", "web", "--tail", "1"]);
    assert!(last.contains("\"result\":\"ok\""), "{last}");
    assert!(last.contains("\"disk_bytes\":134217728"), "{last}");

    // It writes a range once (however long that takes: a time-bound
    // writer may not cover it on a loaded machine); started again on its
    // own clone, the base's data and what it wrote itself are both there.
    v.set_cmdline("web", "mode=write verify=1 gen=3 offset=16M size=8M");
    v.ok(&["start", "web"]);
    v.assert_exits_ok("web");
    v.set_cmdline("web", "mode=read verify=1 expect_gen=3 offset=16M size=8M");
    v.ok(&["start", "web"]);
    v.assert_exits_ok("web");
    v.set_cmdline("web", "mode=read verify=1 expect_gen=7 size=8M");
    v.ok(&["restart", "web"]);
    v.assert_exits_ok("web");

    // A graceful stop of a running VM, its guest at rest (its disk set
    // up, its vCPU halted).
    v.set_cmdline("web", "mode=idle");
    v.ok(&["start", "web"]);
    until("the guest at rest", Duration::from_millis(200), || {
        v.ok(&["logs", "web"]).contains("\"result\":\"idle\"")
    });
    let stopped = v.ok(&["stop", "web"]);
    assert!(stopped.contains("exited (0)"), "{stopped}");
    v.ok(&["delete", "web"]);
    assert!(!v.vm_dir("web").exists());
    assert!(v.fails(&["info", "web"]).contains("no VM named \"web\""));
}

#[test]
fn a_killed_backend_is_restarted_unseen_and_a_killed_vmm_is_a_failure() {
    if !ready("vmctl_supervision", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let (base, rate) = fx.golden_base();
    let image = base.to_str().expect("utf-8");
    // Two VMs on the host backend (the default) and one with a backend of
    // its own, all writing and verifying: a count of writes (2 s at the
    // fill's rate; a run, paused after its first progress line, has done
    // a fraction of it), so that the VMs, paused while the test looks
    // around, are still at work when their backends are killed, however
    // slow the machine or the test's own steps.
    let work = format!(
        "mode=randwrite verify=1 gen=4 size=8M ios={} progress_ms=200 timeout_ms=20000",
        rate * 2
    );
    for (name, own) in [("db", false), ("web", false), ("solo", true)] {
        let mut args = vec!["create", name, "--image", image, "--cmdline", &work];
        if own {
            args.extend(["--backend", "vm"]);
        }
        v.ok(&args);
        v.ok(&["start", name]);
        // Held as soon as its disk is set up: its run then lies ahead
        // whatever the machine's speed now (after the first progress line
        // a machine faster than when the rate was measured had finished).
        until("the disk set up", Duration::from_millis(500), || {
            v.ok(&["logs", name]).contains("device:")
        });
        v.ok(&["pause", name]);
    }
    // The host backend's daemon killed first: the VMs' supervisors start
    // another, which adopts the blk-backend still serving.
    let daemon_of = || -> Option<i64> {
        let text = std::fs::read_to_string(v.state.join("backend/status.json")).ok()?;
        serde_json::from_str::<Value>(&text).ok()?["daemon_pid"].as_i64()
    };
    let host = v.info("db")["backend-pid"].as_u64().expect("backend pid") as i32;
    let daemon = daemon_of().expect("the daemon's status");
    // SAFETY: killing the host backend's daemon, a process of this test's.
    assert_eq!(unsafe { libc::kill(daemon as i32, libc::SIGKILL) }, 0);
    until("another daemon", Duration::from_millis(100), || {
        daemon_of().is_some_and(|d| d != daemon)
    });
    assert_eq!(v.info("db")["backend-pid"], host, "adopted, not restarted");
    assert_eq!(
        v.info("web")["backend-pid"],
        host,
        "one backend serves both"
    );
    assert_eq!(v.info("db")["backend"], "host");
    let own = v.info("solo")["backend-pid"].as_u64().expect("backend pid") as i32;
    assert_ne!(own, host);
    for name in ["db", "web", "solo"] {
        v.ok(&["resume", name]);
    }
    // SAFETY: killing the VMs' disk backends, processes of this test's.
    assert_eq!(unsafe { libc::kill(host, libc::SIGKILL) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(own, libc::SIGKILL) }, 0);
    for name in ["db", "web", "solo"] {
        assert!(v.ok(&["wait", name]).contains("exited (0)"), "{name}");
        let last = v.ok(&["logs", name, "--tail", "1"]);
        assert!(
            last.contains("\"result\":\"ok\"") && last.contains("\"errors\":0"),
            "{name}: {last}"
        );
        assert_eq!(v.info(name)["backend-restarts"], 1, "{name}");
    }
    v.ok(&["delete", "web"]);
    v.ok(&["delete", "solo"]);
    // Nothing registered any more: the host backend's daemon ends by
    // itself (after lingering 2 s for the next VM).
    let status = v.state.join("backend/status.json");
    until(
        "the host backend ends when idle",
        Duration::from_secs(3),
        || !status.exists(),
    );
    // SAFETY: signal 0 only asks whether the process exists.
    until("blk-backend gone", Duration::from_millis(100), || unsafe {
        libc::kill(host, 0) != 0
    });

    // The vmm itself killed: failed, with the reason.
    v.set_cmdline("db", "mode=randread duration_ms=600000 progress_ms=200");
    v.ok(&["start", "db"]);
    let vmm = v.info("db")["pid"].as_u64().expect("vmm pid") as i32;
    // SAFETY: as above, the VM's vmm.
    assert_eq!(unsafe { libc::kill(vmm, libc::SIGKILL) }, 0);
    let out = v.call(&["wait", "db"], Duration::from_millis(100));
    assert!(!out.status.success());
    v.assert_failed("db", "killed by signal 9");

    // Its supervisor killed: the vmm goes with it (nothing runs
    // unwatched), the VM is failed, and the host backend drops its export.
    v.ok(&["start", "db"]);
    let vmm = v.info("db")["pid"].as_u64().expect("vmm pid") as i32;
    let status: Value = serde_json::from_str(
        &std::fs::read_to_string(v.vm_dir("db").join("status.json")).expect("status"),
    )
    .expect("json");
    let supervisor = status["supervisor_pid"].as_i64().expect("supervisor pid") as i32;
    // SAFETY: killing the VM's supervisor, a process of this test's.
    assert_eq!(unsafe { libc::kill(supervisor, libc::SIGKILL) }, 0);
    // SAFETY: signal 0 only asks whether the process exists.
    until(
        "the vmm ends with its supervisor",
        Duration::from_millis(100),
        || unsafe { libc::kill(vmm, 0) != 0 },
    );
    v.assert_failed("db", "supervisor is gone");
    until("its export dropped", Duration::from_millis(500), || {
        !v.state.join("backend/exports/db.json").exists()
    });

    // Two starts racing: one starts it, the other is told it runs.
    let spawn = || {
        Command::new(bin("vmctl"))
            .arg("--state-dir")
            .arg(&v.state)
            .args(["start", "db"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("vmctl")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    let wins = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(wins, 1, "{a:?}\n{b:?}");
    let loser = if a.status.success() { &b } else { &a };
    assert!(
        String::from_utf8_lossy(&loser.stderr).contains("already running"),
        "{loser:?}"
    );
    v.ok(&["delete", "db", "--force"]);
}

#[test]
fn a_fleet_reports_each_vm_and_fails_when_one_does() {
    if !ready("vmctl_fleet", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    // VM n reads its own MiB at offset n MiB: the base holds 8 MiB of
    // written data, so VM 8 reads past it and fails its verification.
    let out = v.call(
        &[
            "run",
            "--count",
            "8",
            "--name",
            "t",
            "--image",
            base.to_str().expect("utf-8"),
            "--cmdline",
            "mode=read verify=1 expect_gen=7 offset={n}M size=1M",
            "--rm",
            "--output",
            "json",
        ],
        // 8 short VMs: about 3 s alone, 6 s beside other tests here.
        Duration::from_secs(6),
    );
    assert!(!out.status.success(), "a failing VM fails the run");
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = report["vms"].as_array().expect("rows");
    assert_eq!(rows.len(), 8);
    assert_eq!(report["failed"], 1, "{report}");
    for (i, r) in rows.iter().enumerate() {
        let expect_ok = i + 1 < 8;
        assert_eq!(r["ok"], expect_ok, "{r}");
        assert_eq!(r["name"], format!("t-{}", i + 1));
        assert!(r["result"].is_object(), "every guest reported: {r}");
    }
    assert_eq!(rows[7]["result"]["result"], "fail");
    // --rm: nothing left.
    assert!(v.ok(&["list"]).lines().count() <= 1);
}

/// A vmctl call that saves a VM (its memory, its disk sealed live): 0.7 s
/// for a 256 MiB guest here alone.
const SAVING: Duration = Duration::from_secs(2);

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The VM's last console line is a run with no error and no failed
/// verification.
fn assert_clean_result(v: &Vmctl, name: &str) {
    let last = v.ok(&["logs", name, "--tail", "1"]);
    assert!(
        last.contains("\"result\":\"ok\"")
            && last.contains("\"errors\":0")
            && last.contains("\"verify_failures\":0"),
        "{name}: {last}"
    );
}

#[test]
fn a_running_vm_snapshotted_by_name_goes_on_and_a_fleet_continues_from_it() {
    if !ready("vmctl_snapshot", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let image = base.to_str().expect("utf-8");
    // A verifying writer for 3 s of its own time: snapshotted after its
    // first progress line, so mid-run on any machine.
    v.ok(&[
        "create",
        "src",
        "--image",
        image,
        "--cmdline",
        "mode=randwrite verify=1 gen=5 offset=16M size=8M duration_ms=3000 progress_ms=200 timeout_ms=60000",
    ]);
    // Not running: nothing to save.
    let e = v.fails(&["snapshot", "src", "s1"]);
    assert!(e.contains("VM src is not running"), "{e}");
    v.ok(&["start", "src"]);
    until("a progress line", Duration::from_millis(500), || {
        v.ok(&["logs", "src"]).contains("progress:")
    });
    let taken = json_of(&v.call(&["snapshot", "src", "s1", "--output", "json"], SAVING));
    assert_eq!(taken["name"], "s1");
    assert_eq!(taken["vm"], "src");
    assert!(
        taken["paused-ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{taken}"
    );
    // Holes for the pages the guest never touched: far less than its 256 MiB.
    let saved = taken["memory-bytes"].as_u64().expect("memory bytes");
    assert!(saved > 0 && saved < 64 << 20, "{taken}");
    assert_eq!(v.info("src")["state"], "running", "resumed");
    // Names are taken once; a snapshot needs a running VM by that name.
    assert!(v
        .fails(&["snapshot", "src", "s1"])
        .contains("a snapshot named \"s1\" already exists"));
    assert!(v
        .fails(&["snapshot", "nosuch", "s2"])
        .contains("no VM named \"nosuch\""));
    assert!(v
        .fails(&["snapshot", "src", "Bad/Name"])
        .contains("not a VM name"));
    // The original finishes its run on its disk's fresh top.
    v.assert_exits_ok("src");
    assert_clean_result(&v, "src");

    // Three VMs continue from the snapshot's instant, each on its own
    // clone of the sealed disk (their memory brought in on demand, the
    // default), and finish the same run verified.
    let out = v.call(
        &[
            "run",
            "--count",
            "3",
            "--name",
            "copy",
            "--from-snapshot",
            "s1",
            "--rm",
            "--output",
            "json",
        ],
        Duration::from_secs(6),
    );
    let report = json_of(&out);
    let rows = report["vms"].as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    for r in rows {
        assert_eq!(r["result"]["result"], "ok", "{r}");
        assert_eq!(r["result"]["verify_failures"], 0, "{r}");
        assert_eq!(r["result"]["errors"], 0, "{r}");
    }
    // A named VM from the snapshot, on a backend of its own, its memory
    // filled lazily; its first start continues the run, its next one
    // boots.
    v.ok(&[
        "create",
        "solo",
        "--from-snapshot",
        "s1",
        "--backend",
        "vm",
        "--restore-memory",
        "lazy",
    ]);
    assert!(v
        .fails(&["create", "other", "--from-snapshot", "nosuch"])
        .contains("no snapshot named \"nosuch\""));
    v.ok(&["start", "solo"]);
    v.assert_exits_ok("solo");
    assert_clean_result(&v, "solo");
    let console = v.ok(&["logs", "solo"]);
    assert!(
        !console.contains("device:"),
        "restored, the guest did not set its disk up again:\n{console}"
    );
    v.ok(&["start", "solo"]);
    v.assert_exits_ok("solo");
    assert!(
        v.ok(&["logs", "solo"]).contains("device:"),
        "the second start boots"
    );
    // Listed with its user; neither it nor its VM goes while used.
    let list: Value =
        serde_json::from_str(&v.ok(&["snapshots", "--output", "json"])).expect("json");
    assert_eq!(list[0]["name"], "s1", "{list}");
    assert_eq!(list[0]["used-by"], serde_json::json!(["solo"]), "{list}");
    let e = v.fails(&["snapshot-delete", "s1"]);
    assert!(e.contains("used by VM solo"), "{e}");
    let e = v.fails(&["delete", "src"]);
    assert!(e.contains("VM src has snapshots (s1)"), "{e}");
    v.ok(&["delete", "solo"]);
    v.ok(&["snapshot-delete", "s1"]);
    assert!(v.ok(&["snapshots"]).lines().count() == 1);
    v.ok(&["delete", "src"]);
}

#[test]
fn a_backup_of_a_running_vm_restores_into_a_new_vm_that_reads_it_back() {
    if !ready("vmctl_backup", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let dest = fx.path("backups/db");
    let d = dest.to_str().expect("utf-8");
    // It writes generation 3 at 16 MiB, then runs on at rest: backed up
    // running (on a backend of its own).
    v.ok(&[
        "create",
        "db",
        "--image",
        base.to_str().expect("utf-8"),
        "--backend",
        "vm",
        "--cmdline",
        "mode=write verify=1 gen=3 offset=16M size=8M",
    ]);
    v.ok(&["start", "db"]);
    v.assert_exits_ok("db");
    v.set_cmdline("db", "mode=idle");
    v.ok(&["start", "db"]);
    until("the guest at rest", Duration::from_millis(200), || {
        v.ok(&["logs", "db"]).contains("\"result\":\"idle\"")
    });
    // An incremental backup needs a full one first.
    let e = v.fails(&["backup", "db", d, "--incremental"]);
    assert!(e.contains("holds no backup to add to"), "{e}");
    let full = json_of(&v.call(&["backup", "db", d, "--output", "json"], SAVING));
    assert_eq!(full["incremental"], false, "{full}");
    // Generation 3's 8 MiB and the base's 8 MiB: the disk's data, no more.
    let data = full["data-bytes"].as_u64().expect("data bytes");
    assert!(((16 << 20)..(17 << 20)).contains(&data), "{full}");
    assert_eq!(v.info("db")["state"], "running");
    let e = v.fails(&["backup", "db", d]);
    assert!(e.contains("is not empty"), "{e}");
    v.ok(&["stop", "db"]);

    // Then generation 4 at 32 MiB, backed up incrementally while a
    // verifying writer runs elsewhere on the disk (paused around the seal,
    // it notices nothing).
    v.set_cmdline("db", "mode=write verify=1 gen=4 offset=32M size=8M");
    v.ok(&["start", "db"]);
    v.assert_exits_ok("db");
    v.set_cmdline(
        "db",
        "mode=randwrite verify=1 gen=9 offset=48M size=8M duration_ms=2000 progress_ms=200 timeout_ms=60000",
    );
    v.ok(&["start", "db"]);
    until("a progress line", Duration::from_millis(500), || {
        v.ok(&["logs", "db"]).contains("progress:")
    });
    let incr = json_of(&v.call(
        &["backup", "db", d, "--incremental", "--output", "json"],
        SAVING,
    ));
    assert_eq!(incr["incremental"], true, "{incr}");
    assert_eq!(incr["chain"], 2, "{incr}");
    // What changed since the full backup: generation 4's 8 MiB and what
    // the writer had written by then, not the base or generation 3 again.
    let data = incr["data-bytes"].as_u64().expect("data bytes");
    // (At most 16 MiB: a fast machine's writer covers all of its 8 MiB
    // before the seal.)
    assert!(((8 << 20)..=(16 << 20)).contains(&data), "{incr}");
    v.assert_exits_ok("db");
    assert_clean_result(&v, "db");

    // Restored into a new VM: the base's data, generation 3 and 4 read
    // back verified.
    let e = v.fails(&["restore", d, "db"]);
    assert!(e.contains("a VM named \"db\" already exists"), "{e}");
    v.ok(&["restore", d, "db2"]);
    for (gen, offset) in [(7, "0"), (3, "16M"), (4, "32M")] {
        v.set_cmdline(
            "db2",
            &format!("mode=read verify=1 expect_gen={gen} offset={offset} size=8M"),
        );
        v.ok(&["start", "db2"]);
        v.assert_exits_ok("db2");
    }
    // Another VM's backups are not added to.
    v.ok(&["create", "other", "--image", base.to_str().expect("utf-8")]);
    let e = v.fails(&["backup", "other", d, "--incremental"]);
    assert!(e.contains("holds backups of VM db, not of other"), "{e}");
    let e = v.fails(&["restore", &fx.path("nothing").display().to_string(), "db3"]);
    assert!(e.contains("not a vmctl backup directory"), "{e}");
    assert!(v.fails(&["info", "db3"]).contains("no VM named"));
}

#[test]
fn the_demo_runs_with_no_arguments() {
    if !ready("vmctl_demo", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let out = v.call(&["run"], Duration::from_secs(5));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("2 VMs: 2 ok, 0 failed"), "{text}");
}

#[test]
fn bad_input_is_refused_by_name_and_leaves_nothing_behind() {
    if !ready("vmctl_bad_input", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let image = base.to_str().expect("utf-8");
    for bad in ["../x", "", &"a".repeat(64), "Web", "_x"] {
        let e = v.fails(&["create", bad, "--image", image]);
        assert!(e.contains("is not a VM name"), "{bad:?}: {e}");
    }
    let e = v.fails(&["create", "x", "--image", "/nonexistent/disk.img@s"]);
    assert!(e.contains("no such image"), "{e}");
    assert!(
        !v.vm_dir("x").exists(),
        "a failed create left its directory"
    );
    // A bridge name that is no interface name; NAT without a NIC.
    for bad in ["br 0", "a/b", &"b".repeat(16)] {
        let e = v.fails(&["create", "x", "--image", image, "--net", bad]);
        assert!(e.contains("a bridge name is 1 to 15"), "{bad:?}: {e}");
    }
    assert!(
        !v.vm_dir("x").exists(),
        "a failed create left its directory"
    );
    let e = v.fails(&["create", "x", "--image", image, "--nat"]);
    assert!(e.contains("--net"), "{e}");
    // Sizes and counts the vmm would refuse at start are refused at
    // create, in one wording, and memory the host does not have too.
    for (flag, value, why) in [
        ("--memory", "0", "16 MiB to 64 GiB"),
        ("--memory", "1K", "16 MiB to 64 GiB"),
        ("--memory", "1T", "16 MiB to 64 GiB"),
        ("--memory", "60G", "more than this host has"),
        ("--memory", "100000000", "4 KiB pages"),
        ("--cpus", "0", "1..=32"),
        ("--cpus", "999", "1..=32"),
        ("--cpus", "33", "1..=32"),
        ("--queues", "0", "1 to 16"),
    ] {
        let e = v.fails(&["create", "x", "--image", image, flag, value]);
        assert!(e.contains(why), "{flag} {value}: {e}");
        assert!(!v.vm_dir("x").exists(), "{flag} {value} left its directory");
    }

    // A running VM is not deleted without --force.
    v.ok(&[
        "create",
        "busy",
        "--image",
        image,
        "--cmdline",
        "mode=randread duration_ms=600000 progress_ms=200",
    ]);
    v.ok(&["start", "busy"]);
    let e = v.fails(&["delete", "busy"]);
    assert!(e.contains("is running"), "{e}");
    // Another VM's writable top, in use, is not an image to clone.
    let top = v.vm_dir("busy").join("disk.img");
    let e = v.fails(&["create", "thief", "--image", top.to_str().expect("utf-8")]);
    assert!(e.contains("open for writing by process"), "{e}");
    assert!(
        !v.vm_dir("thief").exists(),
        "a failed create left its directory"
    );
    v.ok(&["delete", "busy", "--force"]);

    // A state directory this user may not write (root may write
    // anywhere: the check runs as nobody).
    let ro = fx.path("read-only");
    std::fs::create_dir(&ro).expect("dir");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("vmctl"))
        .arg("--state-dir")
        .arg(&ro)
        .args(["create", "x", "--image", image])
        .output()
        .expect("setpriv runs vmctl");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains(&format!("state directory {}", ro.display())),
        "{e}"
    );
    assert!(!ro.join("vms/x").exists());

    // The demo without its guest: an error naming what is missing, and no
    // process left holding the caller's output (a first version left the
    // base's filling backend running, and a script reading vmctl's
    // output waited for ever).
    let fresh = fx.path("fresh-state");
    let out = output_within(
        Command::new(bin("vmctl"))
            .env("VMCTL_BENCH_GUEST", "/nonexistent/guest.elf")
            .arg("--state-dir")
            .arg(&fresh)
            .arg("run"),
        &Patience::new("a demo that cannot start", Duration::from_millis(100)),
    )
    .expect("vmctl run ends and its output closes");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("VMCTL_BENCH_GUEST=/nonexistent/guest.elf: no such file"),
        "{e}"
    );
    let left = processes_mentioning(&fresh);
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn relative_paths_name_the_same_files_from_any_directory() {
    if !ready("vmctl_relative_paths", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    golden(&fx);
    std::fs::copy(
        build_guest().expect("the bench guest").elf,
        fx.path("guest.elf"),
    )
    .expect("a copy of the guest");
    // Defined from the fixture's directory with every path relative (a
    // first version handed the relative disk path to the host backend,
    // whose sandbox killed it for the getcwd that resolving it took) ...
    let from = |dir: &Path, state: &Path, args: &[&str]| {
        let out = output_within(
            Command::new(bin("vmctl"))
                .current_dir(dir)
                .arg("--state-dir")
                .arg(state)
                .args(args),
            &Patience::new("a vmctl call", Duration::from_millis(100)),
        )
        .expect("vmctl runs");
        assert!(
            out.status.success(),
            "vmctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    from(
        fx.dir(),
        Path::new("state"),
        &[
            "create",
            "rel",
            "--image",
            "base.img@golden",
            "--kernel",
            "guest.elf",
            "--cmdline",
            "mode=read verify=1 gen=7 size=8M",
        ],
    );
    // ... and started from another one: the guest reads its base's data.
    from(Path::new("/"), &v.state, &["start", "rel"]);
    v.assert_exits_ok("rel");
    let info = v.info("rel");
    assert_eq!(info["backend-restarts"], 0, "{info}");
    v.ok(&["delete", "rel"]);
}

#[test]
fn vms_made_from_a_working_image_do_not_deepen_its_chain() {
    if !ready("vmctl_recreate", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    // A working image (not sealed): a create snapshots it to clone it.
    let work = fx.image("work.img", "16M");
    let image = work.to_str().expect("utf-8");
    let seals = || {
        let mut v: Vec<String> = std::fs::read_dir(work.parent().expect("dir"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("work.img@"))
            .collect();
        v.sort();
        v
    };
    v.ok(&["create", "a", "--image", image]);
    assert_eq!(seals(), ["work.img@vmctl-a"]);
    // Nothing written to the image since: b clones the same snapshot.
    v.ok(&["create", "b", "--image", image]);
    assert_eq!(
        seals(),
        ["work.img@vmctl-a"],
        "an unchanged image is not sealed again"
    );
    // a's delete leaves it (b stands on it); b's folds it back.
    v.ok(&["delete", "a"]);
    assert_eq!(seals(), ["work.img@vmctl-a"], "b still needs it");
    v.ok(&["delete", "b"]);
    assert_eq!(seals(), Vec::<String>::new(), "nothing needs it any more");
    test_infra::img(&["check", image]);
    // Far more creates and deletes than a chain may be deep (250): the
    // image stays one layer, and a VM recreated under an old name is fine.
    for _ in 0..260 {
        v.ok(&["create", "a", "--image", image]);
        v.ok(&["delete", "a"]);
    }
    assert_eq!(seals(), Vec::<String>::new());
    test_infra::img(&["check", image]);
    // A seal a VM did not make is the user's: kept when the VM goes.
    test_infra::img(&["snapshot", "-c", "mine", image]);
    v.ok(&["create", "c", "--image", &format!("{image}@mine")]);
    v.ok(&["delete", "c"]);
    assert_eq!(seals(), ["work.img@mine"]);
}

/// Processes whose command line mentions `path`.
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

/// A tmpfs mounted for a test, lazily unmounted after it.
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(at: PathBuf, size: &str) -> Mounted {
        std::fs::create_dir_all(&at).expect("mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs at {}", at.display());
        Mounted(at)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full state filesystem: the guest's writes past the free space are
/// I/O errors it sees (it says so and exits 1), no process of vmctl's is
/// lost (the host backend was not restarted; the daemons' logs on that
/// same full filesystem cannot write and that is all), the console keeps
/// its last lines, and the record says why.
#[test]
fn a_full_state_filesystem_is_an_io_error_the_guest_sees() {
    if !ready("vmctl_full_disk", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let _state = Mounted::tmpfs(v.state.clone(), "40m");
    let base = fx.image("base.img", "128M");
    v.ok(&[
        "create",
        "full",
        "--image",
        base.to_str().expect("utf-8"),
        "--cmdline",
        "mode=write bs=64k size=100M",
    ]);
    v.ok(&["start", "full"]);
    let out = v.call(&["wait", "full"], Duration::from_secs(2));
    let said = String::from_utf8_lossy(&out.stdout);
    let console = v.ok(&["logs", "full", "--tail", "3"]);
    assert!(said.contains("exited (1)"), "{said}\n{console}");
    assert!(
        console.contains("\"result\":\"fail\"") && console.contains("\"ioerr\":"),
        "the console's last lines: {console}"
    );
    let info = v.info("full");
    assert_eq!(info["backend-restarts"], 0, "{info}");
    assert!(
        info["reason"].as_str().unwrap_or("").contains("is full"),
        "{info}"
    );
    // Room again: the same host backend serves the next VM.
    v.ok(&["delete", "full"]);
    v.ok(&[
        "create",
        "after",
        "--image",
        base.to_str().expect("utf-8"),
        "--cmdline",
        "mode=write verify=1 bs=64k size=4M",
    ]);
    v.ok(&["start", "after"]);
    v.assert_exits_ok("after");
    assert_eq!(v.info("after")["backend-restarts"], 0);
    v.ok(&["delete", "after"]);
}

/// Snapshots taken back to back of a VM under writes all succeed: each
/// seals the disk live (the backend ends its session, the vmm
/// reconnects), and the next one waits for that reconnect instead of
/// meeting the dead connection (GET_VRING_BASE: socket is broken, 30-40 %
/// of the time before).
#[test]
fn ten_snapshots_in_a_row_of_a_running_vm_all_succeed() {
    if !ready("vmctl_snapshots_in_a_row", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    writing_vm(&v, &base, "busy");
    for k in 0..10 {
        let out = v.call(&["snapshot", "busy", &format!("s{k}")], SAVING);
        assert!(
            out.status.success(),
            "snapshot {k} of 10: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listed = v.ok(&["snapshots"]);
    for k in 0..10 {
        assert!(listed.contains(&format!("s{k}")), "{listed}");
    }
    // The VM went on writing through all of it, without an error.
    assert_eq!(v.info("busy")["state"], "running");
    let console = v.ok(&["logs", "busy"]);
    assert!(!console.contains("ERROR"), "{console}");
    v.ok(&["kill", "busy"]);
    // Its disk is its top and the ten sealed layers in its directory:
    // what list and info count (the top alone before).
    let own: u64 = std::fs::read_dir(v.vm_dir("busy"))
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("disk.img"))
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            e.metadata().expect("stat").blocks() * 512
        })
        .sum();
    assert_eq!(v.info("busy")["disk-bytes"], own);
    for k in 0..10 {
        v.ok(&["snapshot-delete", &format!("s{k}")]);
    }
    v.ok(&["delete", "busy"]);
}

/// The kill points of a verb that takes `whole` when left alone: spread
/// over its length, in a seeded order, with a few past its end.
fn kill_points(whole: Duration, n: u32, seed: u64) -> Vec<Duration> {
    use rand::{seq::SliceRandom, SeedableRng};
    let mut points: Vec<Duration> = (0..n).map(|k| whole * k / (n - 3)).collect();
    points.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    points
}

/// `vmctl create` killed anywhere leaves a whole VM or nothing the next
/// verb cannot clean: the name is free again (or the VM is complete and
/// deletes), no half-made directory is left, list shows nothing half.
#[test]
fn a_create_killed_anywhere_leaves_a_vm_or_nothing() {
    if !ready("vmctl_create_killed", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let image = base.to_str().expect("utf-8").to_string();
    // What a whole create takes here.
    let t0 = std::time::Instant::now();
    v.ok(&["create", "whole", "--image", &image]);
    let whole = t0.elapsed();
    v.ok(&["delete", "whole"]);
    for (k, at) in kill_points(whole, 15, 28).into_iter().enumerate() {
        let finished = v.killed_after(&["create", "k", "--image", &image], at);
        // Whatever was left: list shows either the whole VM or nothing
        // (and cleans what a dead create left).
        let listed = v.ok(&["list", "--output", "json"]);
        let vms: Value = serde_json::from_str(&listed).expect("json");
        let there = vms
            .as_array()
            .expect("list")
            .iter()
            .any(|vm| vm["name"] == "k");
        let dirs: Vec<String> = std::fs::read_dir(v.state.join("vms"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            dirs.iter().all(|d| d == "k" && there),
            "kill {k} at {at:?} (finished: {finished}): {dirs:?}, listed: {there}"
        );
        if there {
            v.ok(&["info", "k"]);
            test_infra::img(&["check", &v.vm_dir("k").join("disk.img").to_string_lossy()]);
            v.ok(&["delete", "k"]);
        }
        // The name is free again.
        v.ok(&["create", "k", "--image", &image]);
        v.ok(&["delete", "k"]);
    }
}

/// `vmctl snapshot` killed anywhere (SIGKILL: what Ctrl-C, a closed
/// terminal or the OOM killer amount to for it): the VM is not left
/// paused (its supervisor resumes a VM whose holder died), and what the
/// snapshot left is finished (everything but its record was made) or
/// undone by the next vmctl: listed whole or not at all, its name free
/// again when undone.
#[test]
fn a_snapshot_killed_anywhere_leaves_the_vm_running_and_no_half_snapshot() {
    if !ready("vmctl_snapshot_killed", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    writing_vm(&v, &base, "held");
    let t0 = std::time::Instant::now();
    v.ok(&["snapshot", "held", "whole"]);
    let whole = t0.elapsed();
    for (k, at) in kill_points(whole, 12, 5).into_iter().enumerate() {
        let name = format!("k{k}");
        let finished = v.killed_after(&["snapshot", "held", &name], at);
        // Running again, by its supervisor's hand if not by vmctl's.
        until("the VM running again", Duration::from_millis(200), || {
            v.info("held")["state"] == "running"
        });
        let listed: Value =
            serde_json::from_str(&v.ok(&["snapshots", "--output", "json"])).expect("json");
        let there = listed
            .as_array()
            .expect("a list")
            .iter()
            .any(|s| s["name"] == name.as_str());
        let dirs: Vec<String> = std::fs::read_dir(v.state.join("snapshots"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            dirs.iter().all(|d| d == "whole" || (d == &name && there)),
            "kill {k} at {at:?} (finished: {finished}): {dirs:?}"
        );
        if there {
            v.ok(&["snapshot-delete", &name]);
        }
        // The name is free again, and a snapshot of it whole.
        let out = v.call(&["snapshot", "held", &name], SAVING);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        v.ok(&["snapshot-delete", &name]);
    }
    assert!(!v.ok(&["logs", "held"]).contains("ERROR"));
    let log = std::fs::read_to_string(v.vm_dir("held").join("supervisor.log")).unwrap_or_default();
    eprintln!(
        "the supervisor resumed the VM after {} of 12 kills",
        log.matches("ended during snapshot").count()
    );
    v.ok(&["kill", "held"]);
    v.ok(&["snapshot-delete", "whole"]);
    v.ok(&["delete", "held"]);
}

/// `vmctl run` ends its fleet on Ctrl-C (SIGINT to its process group,
/// here started with SIGINT ignored, as a non-interactive shell starts a
/// background job) and on --timeout: every VM killed and, with --rm,
/// removed with its clone; exit status 130 and 124.
#[test]
fn a_fleet_ends_on_ctrl_c_and_on_its_timeout_and_cleans_what_rm_promised() {
    if !ready("vmctl_run_interrupted", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let image = base.to_str().expect("utf-8").to_string();
    let forever = "mode=randread size=8M duration_ms=600000 progress_ms=200 timeout_ms=60000";
    let vms_left = || {
        std::fs::read_dir(v.state.join("vms"))
            .map(|d| d.flatten().count())
            .unwrap_or(0)
    };

    // --timeout.
    let out = v.call(
        &[
            "run",
            "--count",
            "2",
            "--image",
            &image,
            "--cmdline",
            forever,
            "--rm",
            "--timeout",
            "2",
        ],
        Duration::from_secs(3),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{err}");
    assert!(err.contains("--timeout 2 s passed"), "{err}");
    assert_eq!(vms_left(), 0, "--rm kept its promise");

    // Ctrl-C to the process group, SIGINT ignored at exec.
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin("vmctl"));
    cmd.arg("--state-dir")
        .arg(&v.state)
        .args([
            "run",
            "--count",
            "2",
            "--image",
            &image,
            "--cmdline",
            forever,
            "--rm",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    // SAFETY: signal() between fork and exec, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("vmctl run");
    until("both VMs running", Duration::from_millis(500), || {
        let l = v.ok(&["list"]);
        l.matches("running").count() == 2
    });
    // wait --timeout gives up on a VM that runs on: 124, still running.
    let out = v.call(&["wait", "run-1", "--timeout", "1"], Duration::from_secs(1));
    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stdout).contains("run-1: running"));
    // SAFETY: SIGINT to the process group we made for it.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let out = output_within_child(child);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("SIGINT"), "{err}");
    assert_eq!(vms_left(), 0, "--rm kept its promise");
}

/// A child's output once it ends (bounded: a fleet that ignores its
/// signal would hang the test otherwise).
fn output_within_child(mut child: std::process::Child) -> Output {
    let patience = Patience::new("vmctl run ending", Duration::from_secs(3));
    patience
        .wait_until(|| Ok(child.try_wait()?.is_some()))
        .unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("{e}")
        });
    child.wait_with_output().expect("output")
}

/// `vmctl backup` killed anywhere: the VM runs on (never left paused), and
/// the destination takes the next backup, full or incremental (a dead
/// backup's temporary stream and unlisted streams cleared), which
/// restores into a VM that reads its data back.
#[test]
fn a_backup_killed_anywhere_leaves_the_destination_usable() {
    if !ready("vmctl_backup_killed", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    resting_vm(&v, &base, "bk");
    let measure = fx.path("measure");
    let t0 = std::time::Instant::now();
    v.ok(&["backup", "bk", &measure.to_string_lossy()]);
    let whole = t0.elapsed();
    let dest = fx.path("dest");
    let d = dest.to_string_lossy().into_owned();
    for (k, at) in kill_points(whole, 10, 6).into_iter().enumerate() {
        let has_full = dest.join("backup.json").exists();
        let mut args = vec!["backup", "bk", d.as_str()];
        if has_full {
            args.push("--incremental");
        }
        let finished = v.killed_after(&args, at);
        until("the VM running again", Duration::from_millis(200), || {
            v.info("bk")["state"] == "running"
        });
        // The next backup goes through: full if none was completed yet,
        // else incremental.
        let mut args = vec!["backup", "bk", d.as_str()];
        if dest.join("backup.json").exists() {
            args.push("--incremental");
        }
        let out = v.call(&args, SAVING);
        assert!(
            out.status.success(),
            "kill {k} at {at:?} (finished: {finished}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let leftovers: Vec<String> = std::fs::read_dir(&dest)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Seals the killed backups left in the VM's chain were merged away by
    // the backups after them: the destination's last seal alone is left
    // (the measuring backup's directory keeps its own).
    let seals: Vec<String> = std::fs::read_dir(v.vm_dir("bk"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("disk.img@backup-"))
        .collect();
    assert_eq!(seals.len(), 2, "{seals:?}");
    v.ok(&["kill", "bk"]);
    restores_the_golden_data(&v, &d, "back");
}

/// A VM backed up again and again while it runs (every hour, for
/// months): each backup's seal is merged away once the next one is taken
/// (export-merge through the backend serving it), so the chain stays
/// short, and the 260th incremental backup (past the 250 layers a chain
/// may have) goes as the first did; deleting snapshots merges their seals
/// too. The chain restores.
#[test]
fn backups_and_snapshots_without_end_keep_a_running_vm_s_chain_short() {
    if !ready("vmctl_backups_without_end", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    resting_vm(&v, &base, "long");
    let dest = fx.path("backups");
    let d = dest.to_string_lossy().into_owned();
    let depth = || {
        let info: Value = serde_json::from_str(&String::from_utf8_lossy(
            &Command::new(bin("img"))
                .args(["info", "--output", "json", "--backing-chain"])
                .arg(v.vm_dir("long").join("disk.img"))
                .output()
                .expect("img info")
                .stdout,
        ))
        .expect("json");
        info.as_array().map_or(0, |a| a.len())
    };
    v.ok(&["backup", "long", &d]);
    for k in 1..=260 {
        let out = v.call(
            &["backup", "long", &d, "--incremental", "--output", "json"],
            SAVING,
        );
        let details = json_of(&out);
        assert_eq!(
            details["merged-previous-seal"], true,
            "backup {k}: {details}"
        );
    }
    // The top, the last backup's seal, the golden base's layers.
    assert!(depth() <= 4, "the chain: {} layers", depth());
    // Snapshots taken and deleted: their seals go with them.
    for k in 0..3 {
        v.call(&["snapshot", "long", &format!("s{k}")], SAVING);
        v.ok(&["snapshot-delete", &format!("s{k}")]);
    }
    assert!(depth() <= 4, "the chain: {} layers", depth());
    assert_eq!(v.info("long")["state"], "running");
    v.ok(&["kill", "long"]);
    restores_the_golden_data(&v, &d, "back");
}

/// What a virsh user reaches for: several names per verb, `--output
/// json` answers, `set` for a defined VM, autostart (and the boot unit
/// that runs it), shell completions and manual pages.
#[test]
fn verbs_take_several_names_and_answer_in_json_and_vms_are_reconfigured() {
    if !ready("vmctl_manage", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let image = base.to_str().expect("utf-8");
    let idle = "mode=idle";
    for n in ["a", "b", "c"] {
        let out = v.ok(&[
            "create",
            n,
            "--image",
            image,
            "--cmdline",
            idle,
            "--output",
            "json",
        ]);
        let info: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(info["state"], "defined", "{info}");
    }
    // set: checked as create checks, refused on a running VM.
    let e = v.fails(&["set", "a", "--cpus", "0"]);
    assert!(e.contains("1..=32"), "{e}");
    let e = v.fails(&["set", "a", "--memory", "1K"]);
    assert!(e.contains("16 MiB to 64 GiB"), "{e}");
    let set: Value = serde_json::from_str(&v.ok(&[
        "set", "a", "--cpus", "2", "--memory", "128M", "--output", "json",
    ]))
    .expect("json");
    assert_eq!(
        (set["cpus"].as_u64(), set["memory"].as_u64()),
        (Some(2), Some(128 << 20)),
        "{set}"
    );
    // Its disk grown, a NIC given and taken back (defined only: nothing
    // is plugged on this host until it starts).
    v.ok(&["set", "c", "--disk-size", "96M"]);
    let disk = v.vm_dir("c").join("disk.img");
    let info: Value = serde_json::from_slice(
        &Command::new(bin("img"))
            .args(["info", "--output", "json"])
            .arg(&disk)
            .output()
            .expect("img info")
            .stdout,
    )
    .expect("json");
    assert_eq!(info["virtual-size"], 96 << 20, "{info}");
    let e = v.fails(&["set", "c", "--disk-size", "32M"]);
    assert!(e.contains("disks only grow"), "{e}");
    v.ok(&["set", "c", "--net", "vmbr-set"]);
    assert_eq!(v.info("c")["bridge"], "vmbr-set");
    v.ok(&["set", "c", "--no-net"]);
    assert!(v.info("c")["bridge"].is_null(), "{}", v.info("c"));
    // autostart: a and b; the boot unit's verb starts those two only.
    v.ok(&["autostart", "a", "b"]);
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmctl/systemd/vmctl-autostart.service"),
    )
    .expect("the boot unit");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/vmctl start --autostart"),
        "{unit}"
    );
    let started: Value =
        serde_json::from_str(&v.ok(&["start", "--autostart", "--output", "json"])).expect("json");
    let names: Vec<&str> = started
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"], "{started}");
    assert_eq!(v.info("c")["state"], "defined");
    assert_eq!(v.info("a")["cpus"], 2);
    let e = v.fails(&["set", "a", "--cpus", "1"]);
    assert!(e.contains("is running: stop it first"), "{e}");
    v.ok(&["set", "a", "--autostart", "off"]);
    // Several names: the one that fails does not stop the others.
    let out = v.call(
        &["kill", "a", "nosuch", "b", "--output", "json"],
        Duration::from_millis(200),
    );
    assert_eq!(out.status.code(), Some(1));
    let killed: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(killed[0]["ok"], true, "{killed}");
    assert_eq!(killed[1]["ok"], false, "{killed}");
    assert!(
        killed[1]["error"]
            .as_str()
            .unwrap_or("")
            .contains("no VM named"),
        "{killed}"
    );
    assert_eq!(killed[2]["ok"], true, "{killed}");
    v.ok(&["delete", "a", "b", "c"]);
    assert!(v.ok(&["list"]).lines().count() <= 1);
    // Completions and manual pages, from the same definitions.
    let bash = v.ok(&["completions", "bash"]);
    assert!(
        bash.contains("snapshot-delete") && bash.contains("--autostart"),
        "completions"
    );
    let man = fx.path("man");
    v.ok(&["man", &man.to_string_lossy()]);
    let page = std::fs::read_to_string(man.join("vmctl-set.1")).expect("vmctl-set.1");
    assert!(page.contains("autostart"), "{page}");
}

/// `vmctl console`: what is typed reaches the guest's serial port and its
/// answer comes back; one attach at a time; Ctrl-] detaches and the VM
/// runs on; a later attach finds it where it was.
#[test]
fn the_console_takes_input_and_detaches_on_ctrl_bracket() {
    if !ready("vmctl_console", &[]) {
        return;
    }
    use std::io::{BufRead, Write};
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    v.ok(&[
        "create",
        "tty",
        "--image",
        base.to_str().expect("utf-8"),
        "--memory",
        "64M",
        "--cmdline",
        "mode=echo",
    ]);
    v.ok(&["start", "tty"]);
    until("the guest listening", Duration::from_millis(200), || {
        v.ok(&["logs", "tty"]).contains("echo: ready")
    });
    let attach = || {
        Command::new(bin("vmctl"))
            .arg("--state-dir")
            .arg(&v.state)
            .args(["console", "tty"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("vmctl console")
    };
    // Lines of the console's output, as they come.
    let lines_of = |c: &mut std::process::Child| {
        let (tx, rx) = std::sync::mpsc::channel();
        let out = c.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let wait_line = |rx: &std::sync::mpsc::Receiver<String>, want: &str| {
        let mut seen = Vec::new();
        let p = Patience::new("a console line", Duration::from_millis(200));
        p.wait_until(|| {
            while let Ok(l) = rx.try_recv() {
                seen.push(l);
            }
            Ok(seen.iter().any(|l| l.contains(want)))
        })
        .unwrap_or_else(|e| panic!("{e}: {seen:?}"));
    };
    let mut first = attach();
    let rx = lines_of(&mut first);
    let mut input = first.stdin.take().expect("stdin");
    // Attached once the client said so; then what is typed comes back.
    let mut typed = false;
    Patience::new("the echo of what was typed", Duration::from_millis(200))
        .wait_until(|| {
            if !typed {
                input.write_all(b"hello guest\n")?;
                typed = true;
            }
            Ok(v.ok(&["logs", "tty"]).contains("echo: hello guest"))
        })
        .expect("echoed");
    wait_line(&rx, "echo: hello guest");
    // A second attach meanwhile is turned away, saying why.
    let second = v.call(&["console", "tty"], Duration::from_millis(200));
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("attached elsewhere"),
        "{second:?}"
    );
    // Ctrl-]: detached, the VM runs on.
    input.write_all(&[0x1d]).expect("ctrl-]");
    let done = first.wait_with_output().expect("console ends");
    assert!(done.status.success());
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("detached"),
        "{done:?}"
    );
    assert_eq!(v.info("tty")["state"], "running");
    // Attached again: quit ends the guest, and with it the console.
    let mut again = attach();
    let rx = lines_of(&mut again);
    let mut input = again.stdin.take().expect("stdin");
    input.write_all(b"quit\n").expect("type");
    wait_line(&rx, "echo: quit");
    v.assert_exits_ok("tty");
    let done = again.wait_with_output().expect("console ends");
    assert!(done.status.success(), "{done:?}");
}

/// VM `name` on a clone of `base` (64 MiB), started, once its console
/// shows `shown`.
fn running_vm(v: &Vmctl, base: &Path, name: &str, cmdline: &str, shown: &str) {
    v.ok(&[
        "create",
        name,
        "--image",
        base.to_str().expect("utf-8"),
        "--memory",
        "64M",
        "--cmdline",
        cmdline,
    ]);
    v.ok(&["start", name]);
    until(shown, Duration::from_millis(500), || {
        v.ok(&["logs", name]).contains(shown)
    });
}

/// At rest (the bench guest's idle mode).
fn resting_vm(v: &Vmctl, base: &Path, name: &str) {
    running_vm(v, base, name, "mode=idle", "\"result\":\"idle\"");
}

/// Writing (verified random writes for ten minutes), past its first
/// progress line.
fn writing_vm(v: &Vmctl, base: &Path, name: &str) {
    running_vm(
        v,
        base,
        name,
        "mode=randwrite verify=1 gen=5 offset=16M size=8M duration_ms=600000 progress_ms=200 timeout_ms=60000",
        "progress:",
    );
}

/// The backups in `dest` restore into VM `name`, whose guest reads the
/// golden base's data back verified.
fn restores_the_golden_data(v: &Vmctl, dest: &str, name: &str) {
    v.ok(&["restore", dest, name]);
    v.set_cmdline(name, "mode=read verify=1 expect_gen=7 size=8M");
    v.ok(&["start", name]);
    v.assert_exits_ok(name);
}

/// The host CPUs a thread of `pid` named `name` may run on, as the kernel
/// prints them (`Cpus_allowed_list`), once it exists.
fn thread_cpus(pid: u64, name: &str) -> Option<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string());
        }
    }
    None
}

/// `--vcpu-affinity` and `--disk-worker-cpus`: the vmm's vCPU threads and
/// the disk's queue workers (in the VM's own backend and in the host's
/// shared one) run on the CPUs given, each VM on its own; `set` changes
/// and clears them; a CPU this host does not let us use is refused by
/// name with the definition unchanged.
#[test]
fn vcpus_and_disk_workers_run_on_the_host_cpus_given() {
    if !ready("vmctl_placement", &[]) {
        return;
    }
    let fx = Fixture::new();
    let v = Vmctl::new(&fx);
    let base = golden(&fx);
    let image = base.to_str().expect("utf-8");
    // Two CPUs this process may use (one, used twice, on a one-CPU host).
    let allowed = cpu_affinity::current_affinity().expect("this thread's CPUs");
    let allowed = allowed.cpus();
    let (first, last) = (
        allowed[0].to_string(),
        allowed[allowed.len() - 1].to_string(),
    );
    for (name, backend, vcpus, workers) in [
        ("own", "vm", &last, &first),
        ("shared", "host", &first, &last),
    ] {
        v.ok(&[
            "create",
            name,
            "--image",
            image,
            "--memory",
            "64M",
            "--cmdline",
            "mode=idle",
            "--backend",
            backend,
            "--vcpu-affinity",
            vcpus,
            "--disk-worker-cpus",
            workers,
        ]);
        let info = v.info(name);
        assert_eq!(
            (
                info["vcpu-affinity"].as_str(),
                info["disk-worker-cpus"].as_str()
            ),
            (Some(vcpus.as_str()), Some(workers.as_str())),
            "{info}"
        );
        v.ok(&["start", name]);
        until("the guest at rest", Duration::from_millis(500), || {
            v.ok(&["logs", name]).contains("\"result\":\"idle\"")
        });
        let info = v.info(name);
        let (vmm, backend) = (
            info["pid"].as_u64().expect("a vmm pid"),
            info["backend-pid"].as_u64().expect("a backend pid"),
        );
        assert_eq!(thread_cpus(vmm, "vcpu0").as_deref(), Some(vcpus.as_str()));
        // The queue's worker starts once the guest's driver set it up.
        until(
            "the disk's queue worker",
            Duration::from_millis(100),
            || thread_cpus(backend, "queue 0").is_some(),
        );
        assert_eq!(
            thread_cpus(backend, "queue 0").as_deref(),
            Some(workers.as_str()),
            "{name}"
        );
        v.ok(&["stop", name]);
    }
    // Bad lists and CPUs this host does not give us: refused by name,
    // nothing changed.
    let e = v.fails(&["set", "own", "--vcpu-affinity", "1000"]);
    assert!(
        e.contains("--vcpu-affinity 1000: CPU 1000 is not one this process may run on"),
        "{e}"
    );
    let e = v.fails(&["set", "own", "--disk-worker-cpus", "3-1"]);
    assert!(e.contains("a range runs from the lower CPU"), "{e}");
    let e = v.fails(&["create", "bad", "--image", image, "--vcpu-affinity", "x"]);
    assert!(e.contains("\"x\" is not a CPU number"), "{e}");
    assert!(!v.vm_dir("bad").exists());
    assert_eq!(v.info("own")["vcpu-affinity"].as_str(), Some(last.as_str()));
    // Cleared: the threads may run anywhere again.
    v.ok(&[
        "set",
        "own",
        "--vcpu-affinity",
        "any",
        "--disk-worker-cpus",
        "any",
    ]);
    let info = v.info("own");
    assert!(
        info["vcpu-affinity"].is_null() && info["disk-worker-cpus"].is_null(),
        "{info}"
    );
    v.ok(&["delete", "own", "shared"]);
}
