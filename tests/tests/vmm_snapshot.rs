//! VM snapshots with vhost-user disks: a VM paused in the middle of a
//! verifying write run is snapshotted (`vmm api snapshot`), its disk
//! snapshotted live through blk-backend's control socket
//! (`export-snapshot`: the export closed clean, sealed, served again on a
//! fresh top; the vmm reconnects),
//! the original resumes and finishes, and three VMs restored from the
//! snapshot (`vmm --restore`, memory filled lazily by userfaultfd or
//! copied first) on clones of the disk snapshot finish the same run;
//! every disk then reads back verified, and holds its own writes only.
//! Damaged snapshots and snapshots that cannot be taken are refused by
//! name.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blk_control::{ClientError, ErrorClass, ExportArgs};
use test_infra::{
    bin, output_within, ready, s, BackendControl, BlkBackendProcess, Fixture, Patience, RunningVm,
    VmmVm,
};

use test_infra::vmm_api as api;

fn vm_on(sock: &Path, cmdline: &str) -> VmmVm {
    VmmVm::new(&bin("vmm"), cmdline).with_disk(sock, 1)
}

/// The backend's exports, added and removed at runtime.
struct Exports {
    ctl: BackendControl,
    _backend: BlkBackendProcess,
}

impl Exports {
    fn start(fx: &Fixture) -> Exports {
        let ctl_path = fx.path("control.sock");
        let backend = BlkBackendProcess::start_exports_with(
            &bin("blk-backend"),
            &[],
            &["--control", &s(&ctl_path)],
        )
        .expect("blk-backend starts");
        let ctl = BackendControl::connect(&ctl_path);
        ctl.set_timeout(Some(Duration::from_secs(120)));
        Exports {
            ctl,
            _backend: backend,
        }
    }

    fn add(&mut self, image: &Path) -> PathBuf {
        let sock = Fixture::socket_of(image);
        if let Err(e) = self.ctl.add(ExportArgs::new(&sock, image)) {
            panic!("export-add {}: {e}", image.display());
        }
        sock
    }

    /// The export's image sealed as `IMAGE@NAME` and served again on a
    /// fresh top (`export-snapshot`): that path.
    fn snapshot(&mut self, sock: &Path, name: &str) -> Result<PathBuf, ClientError> {
        self.ctl.snapshot(sock, name)
    }

    fn del(&mut self, sock: &Path) {
        if let Err(e) = self.ctl.del(sock) {
            panic!("export-del {}: {e}", sock.display());
        }
    }
}

/// The machine's rate for the workload, from a first pass over `size`:
/// the main run is sized from it, so that it lasts through the snapshot
/// on any machine.
fn measured_ios(sock: &Path, gen: u32, size: &str) -> u64 {
    let pass = vm_on(
        sock,
        &format!("mode=write verify=1 gen={gen} bs=4k qd=4 size={size}"),
    )
    .run()
    .expect("vmm runs");
    pass.assert_ok("the first pass");
    let rate = pass.field("iops").max(1);
    // About 2 s of writes, and at least two passes over the range (every
    // sector written, as the read-back verification needs).
    (rate * 2).max(2 * 16384)
}

fn started(v: &VmmVm) -> RunningVm {
    let mut running = v.spawn().expect("vmm starts");
    running
        .wait_for_line(
            "device:",
            &Patience::new("the guest's disk set up", Duration::from_millis(100)),
        )
        .expect("the workload starts");
    running
}

/// Reads `sock`'s disk back, every sector checked to be generation `gen`.
fn verify(sock: &Path, gen: u32, size: &str, what: &str) {
    let r = vm_on(
        sock,
        &format!("mode=read verify=1 expect_gen={gen} bs=64k qd=8 size={size}"),
    )
    .run()
    .expect("vmm runs");
    r.assert_ok(what);
    assert_eq!(r.field("verify_failures"), 0, "{what}");
}

/// The disk `image` (its whole chain) as raw bytes.
fn raw_of(fx: &Fixture, image: &Path) -> Vec<u8> {
    let raw = fx.path("read-back.raw");
    let _ = std::fs::remove_file(&raw);
    test_infra::img(&["convert", "-q", &s(image), &s(&raw)]);
    let bytes = std::fs::read(&raw).expect("the raw read-back");
    std::fs::remove_file(&raw).expect("removing the read-back");
    bytes
}

/// Disks that parted at a snapshot (`at_snapshot`, their common content
/// then) each hold their own writes only: a sector two of them hold alike
/// is the snapshot's, and each wrote sectors of its own after it.
fn assert_own_writes_only(at_snapshot: &[u8], disks: &[(String, Vec<u8>)]) {
    const SECTOR: usize = 512;
    for (name, d) in disks {
        assert_eq!(d.len(), at_snapshot.len(), "{name}: size");
        let own = d
            .chunks(SECTOR)
            .zip(at_snapshot.chunks(SECTOR))
            .filter(|(a, b)| a != b)
            .count();
        assert!(own > 0, "{name} wrote nothing after the snapshot");
    }
    for (i, (a_name, a)) in disks.iter().enumerate() {
        for (b_name, b) in &disks[i + 1..] {
            let shared = (0..at_snapshot.len() / SECTOR)
                .filter(|&k| {
                    let r = k * SECTOR..(k + 1) * SECTOR;
                    a[r.clone()] == b[r.clone()] && a[r.clone()] != at_snapshot[r]
                })
                .count();
            assert_eq!(
                shared, 0,
                "{a_name} and {b_name} hold {shared} sectors alike that neither held at the snapshot"
            );
        }
    }
}

#[test]
fn a_vm_snapshotted_mid_run_goes_on_and_its_restored_copies_finish_the_run() {
    if !ready("vmm_snapshot", &[]) {
        return;
    }
    let fx = Fixture::new();
    let mut exports = Exports::start(&fx);
    let size = "64M";
    // Polling and interrupt-driven (MSI-X) guests.
    for (gen, wait) in [(7u32, ""), (8, "irq=1")] {
        let image = fx.image(&format!("vm{gen}.img"), size);
        let sock = exports.add(&image);
        let ios = measured_ios(&sock, gen, size);
        let api_sock = fx.path(&format!("api{gen}.sock"));
        let run = format!("mode=write verify=1 gen={gen} bs=4k qd=4 size={size} ios={ios} {wait}");
        // The run reports only at its end: about 2 s of writes, longer
        // with its restored copies beside it.
        let silence = Patience::new("a run that reports at its end", Duration::from_secs(4));
        let mut original = vm_on(&sock, &run);
        original.api_socket = Some(api_sock.clone());
        original.silence = silence.clone();
        let original = started(&original);
        let snap = fx.path(&format!("snap{gen}"));
        assert!(api(&api_sock, &["pause"]).0, "pause");
        let (ok, out) = api(&api_sock, &["snapshot", "--dir", &s(&snap)]);
        assert!(ok, "snapshot: {out}");
        let taken: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
        assert!(
            taken["memory_saved_bytes"].as_u64().unwrap_or(u64::MAX) < 256 << 20,
            "memory is saved sparse: {taken}"
        );
        // The disk's snapshot at the same instant: the export closed (the
        // image flushed and closed clean), sealed, served again on a fresh
        // top (the vmm reconnects).
        let r = exports.snapshot(&sock, "s1");
        let sealed = fx.path(&format!("vm{gen}.img@s1"));
        assert_eq!(
            r.as_ref().map_err(ToString::to_string),
            Ok(&sealed),
            "export-snapshot"
        );
        // Refused by name, and the export serves on: a name taken, an
        // export that is not there.
        let again = exports.snapshot(&sock, "s1").expect_err("a name taken");
        assert!(again.is_refused(ErrorClass::GenericError), "{again}");
        assert!(
            again.refusal().is_some_and(|r| r.desc.contains("exists")),
            "{again}"
        );
        let none = exports
            .snapshot(&fx.path("nothing.sock"), "s1")
            .expect_err("no export");
        assert!(none.is_refused(ErrorClass::DeviceNotFound), "{none}");
        let clones: Vec<PathBuf> = (0..3)
            .map(|k| fx.clone_of(&format!("vm{gen}.img@s1"), &format!("r{gen}-{k}.img")))
            .collect();
        let restored: Vec<RunningVm> = clones
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let sock = exports.add(c);
                let mut v = vm_on(&sock, "");
                v.restore = Some(snap.clone());
                v.log = Some("info".into());
                // On demand (only what the guest and its backend touch;
                // snapshotted again below, which fills the rest first),
                // copied first, and lazily (the default: memory brought
                // in on touch and in the background).
                if k == 0 {
                    v.api_socket = Some(fx.path(&format!("api{gen}-r0.sock")));
                    v.options = vec!["--restore-memory".into(), "on-demand".into()];
                } else if k == 1 {
                    v.options = vec!["--restore-memory".into(), "copy".into()];
                }
                v.silence = silence.clone();
                v.spawn().expect("a restored vmm starts")
            })
            .collect();
        assert!(api(&api_sock, &["resume"]).0, "resume");
        // A restored VM can itself be snapshotted.
        let r0_api = fx.path(&format!("api{gen}-r0.sock"));
        let mut restored = restored;
        let serving = Patience::new("the restored VM's API socket", Duration::from_millis(50))
            .wait_until(|| Ok(r0_api.exists() || !restored[0].running()));
        if serving.is_err() || !r0_api.exists() {
            let why = serving.err().map(|e| e.to_string()).unwrap_or_default();
            let run = restored.remove(0).wait();
            panic!(
                "the restored VM serves no API ({why}): {:?}",
                run.map(|r| r.serial)
            );
        }
        assert!(api(&r0_api, &["pause"]).0, "pause the restored VM");
        let (ok, out) = api(
            &r0_api,
            &[
                "snapshot",
                "--dir",
                &s(&fx.path(&format!("snap{gen}-again"))),
            ],
        );
        assert!(ok, "a restored VM snapshotted again: {out}");
        assert!(api(&r0_api, &["resume"]).0, "resume the restored VM");

        let done = original.wait().expect("the original ends");
        done.assert_ok(&format!("the original, {gen}"));
        assert_eq!(
            done.field("writes"),
            ios,
            "the original wrote its whole run"
        );
        for (k, r) in restored.into_iter().enumerate() {
            let done = r.wait().expect("a restored VM ends");
            done.assert_ok(&format!("restored copy {k}, {gen}"));
            // Restored on demand, the disk ran at once: its backend's
            // faults went to the vmm's pager (postcopy). (Lazily, this
            // small a memory is often all in before the disk connects.)
            if k == 0 {
                assert!(
                    done.stderr
                        .contains("a backend pages through the restore's pager"),
                    "restored copy {k}: its disk did not page through the vmm:\n{}",
                    done.stderr
                );
            }
            assert_eq!(
                done.field("writes"),
                ios,
                "restored copy {k} finished the run"
            );
        }
        verify(&sock, gen, size, "the original's disk");
        for c in &clones {
            verify(
                &Fixture::socket_of(c),
                gen,
                size,
                &format!("{}", c.display()),
            );
        }
        // Each disk holds its own writes only: closed, read back whole
        // from the host, no sector written after the snapshot is alike in
        // two of them (each write is stamped with its VM's TSC).
        exports.del(&sock);
        for c in &clones {
            exports.del(&Fixture::socket_of(c));
        }
        let at_snapshot = raw_of(&fx, &sealed);
        let disks: Vec<(String, Vec<u8>)> = std::iter::once(image.clone())
            .chain(clones.iter().cloned())
            .map(|d| (d.display().to_string(), raw_of(&fx, &d)))
            .collect();
        assert_own_writes_only(&at_snapshot, &disks);
    }
}

#[test]
fn damaged_snapshots_and_impossible_snapshots_are_refused_by_name() {
    if !ready("vmm_snapshot_refusals", &[]) {
        return;
    }
    let fx = Fixture::new();
    let mut exports = Exports::start(&fx);
    let image = fx.image("vm.img", "16M");
    let sock = exports.add(&image);
    let api_sock = fx.path("api.sock");
    let mut v = vm_on(
        &sock,
        "mode=randread bs=4k qd=1 size=16M duration_ms=600000",
    );
    v.api_socket = Some(api_sock.clone());
    v.log = Some("info".into());
    let running = started(&v);
    // Running: a snapshot needs a pause.
    let (ok, out) = api(&api_sock, &["snapshot", "--dir", &s(&fx.path("early"))]);
    assert!(!ok && out.contains("pause it first"), "{out}");
    assert!(api(&api_sock, &["pause"]).0);
    // Its backend gone: a clear error, and the VM goes on afterwards.
    exports.del(&sock);
    let (ok, out) = api(&api_sock, &["snapshot", "--dir", &s(&fx.path("nobackend"))]);
    assert!(!ok && out.contains("for the snapshot"), "{out}");
    exports.add(&image);
    // Into a directory that holds something: refused.
    let full = fx.path("full");
    std::fs::create_dir(&full).expect("dir");
    std::fs::write(full.join("x"), b"x").expect("file");
    let (ok, out) = api(&api_sock, &["snapshot", "--dir", &s(&full)]);
    assert!(!ok && out.contains("not empty"), "{out}");
    // The backend back, a good one.
    let snap = fx.path("snap");
    let good = Patience::new(
        "a snapshot once the disk reconnected",
        Duration::from_millis(100),
    );
    good.wait_until(|| Ok(api(&api_sock, &["snapshot", "--dir", &s(&snap)]).0))
        .expect("a snapshot once the backend is back");
    let (ok, out) = api(&api_sock, &["shutdown", "--force"]);
    if !ok {
        let log = running.wait().map(|r| r.stderr).unwrap_or_default();
        panic!("shutdown --force: {out}\nthe vmm's log:\n{log}");
    }
    let _ = running.wait();

    let restore = |dir: &Path, disks: &[&Path]| {
        let mut c = Command::new(bin("vmm"));
        c.arg("--restore").arg(dir).args(["--serial", "none"]);
        for d in disks {
            c.arg("--disk").arg(format!("socket={}", d.display()));
        }
        let out = output_within(
            &mut c,
            &Patience::new("a refused restore", Duration::from_millis(100)),
        )
        .expect("vmm");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let copy = |name: &str| {
        let d = fx.path(name);
        std::fs::create_dir(&d).expect("dir");
        for f in ["state", "memory"] {
            std::fs::copy(snap.join(f), d.join(f)).expect("copy");
        }
        d
    };
    let state = std::fs::read(snap.join("state")).expect("state");
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated",
            Box::new(|d: &Path| {
                std::fs::write(d.join("state"), &state[..state.len() / 2]).expect("w")
            }),
            "truncated",
        ),
        (
            "corrupted",
            Box::new(|d: &Path| {
                let mut b = state.clone();
                let at = b.len() - 10;
                b[at] ^= 0x01;
                std::fs::write(d.join("state"), b).expect("w")
            }),
            "corrupted",
        ),
        (
            "another version",
            Box::new(|d: &Path| {
                let mut b = state.clone();
                b[8..12].copy_from_slice(&99u32.to_le_bytes());
                std::fs::write(d.join("state"), b).expect("w")
            }),
            "version 99",
        ),
        (
            "no memory",
            Box::new(|d: &Path| std::fs::remove_file(d.join("memory")).expect("rm")),
            "memory",
        ),
        (
            "memory of another size",
            Box::new(|d: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("memory"))
                    .expect("open")
                    .set_len(1 << 20)
                    .expect("len")
            }),
            "memory",
        ),
    ];
    for (what, damage, says) in cases {
        let d = copy(&format!("bad-{}", what.replace(' ', "-")));
        damage(&d);
        let (code, err) = restore(&d, &[&sock]);
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(err.contains(says), "{what}: {err}");
    }
    // The snapshot whole, but not the disks it had.
    let (code, err) = restore(&snap, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1 disks; 0 were given"), "{err}");
}

/// A VM restored on demand whose disk backend is killed mid-run: the new
/// backend pages through the vmm's pager again (postcopy on the new
/// session), the guest finishes its verifying writes with no error, and
/// the disk reads back.
#[test]
fn a_backend_killed_during_an_on_demand_restore_pages_through_the_vmm_again() {
    if !ready("vmm_snapshot_backend_kill", &[]) {
        return;
    }
    let fx = Fixture::new();
    let size = "16M";
    let image = fx.image("vm.img", size);
    let sock = Fixture::socket_of(&image);
    let b = fx.serve(&image, 1);
    let ios = measured_ios(&sock, 3, size);
    // Half of its memory holds data: there is something to page in.
    let run = format!(
        "mode=randwrite verify=1 gen=3 bs=4k qd=4 size={size} ios={ios} progress_ms=100 timeout_ms=20000 touch=128M"
    );
    let api_sock = fx.path("api.sock");
    let mut v = vm_on(&sock, &run);
    v.api_socket = Some(api_sock.clone());
    let mut original = started(&v);
    let line = Patience::new("the next progress line", Duration::from_millis(200));
    original.wait_for_progress(1, &line).expect("progress");
    assert!(api(&api_sock, &["pause"]).0, "pause");
    let snap = fx.path("snap");
    let (ok, out) = api(&api_sock, &["snapshot", "--dir", &s(&snap)]);
    assert!(ok, "snapshot: {out}");
    assert!(api(&api_sock, &["shutdown", "--force"]).0, "shutdown");
    let _ = original.wait();
    b.stop();
    // Its disk sealed (offline here) and cloned for the restored VM.
    test_infra::img(&["snapshot", "-c", "s", &s(&image)]);
    let clone = fx.clone_of("vm.img@s", "r.img");
    let backend = fx.serve(&clone, 1);
    let mut r = vm_on(&Fixture::socket_of(&clone), "");
    r.restore = Some(snap);
    r.options = vec!["--restore-memory".into(), "on-demand".into()];
    r.log = Some("info".into());
    r.silence = Patience::new("a run that reports at its end", Duration::from_secs(4));
    let mut restored = r.spawn().expect("the restored vmm starts");
    let lines = restored.progress_lines();
    restored
        .wait_for_progress(lines + 1, &line)
        .expect("the restored guest goes on");
    assert!(restored.running(), "the run ended before the kill");
    backend.kill();
    std::thread::sleep(Duration::from_millis(100));
    let backend = fx.serve(&clone, 1);
    let done = restored.wait().expect("the restored VM ends");
    done.assert_ok("restored on demand, across a backend kill");
    assert_eq!(done.field("errors"), 0);
    let paged = done
        .stderr
        .matches("a backend pages through the restore's pager")
        .count();
    assert_eq!(
        paged, 2,
        "the first backend and the one after the kill paged through the vmm:\n{}",
        done.stderr
    );
    verify(&Fixture::socket_of(&clone), 3, size, "the restored disk");
    backend.stop();
}

/// A snapshot restored long after it was taken (issue 28): the guest's
/// time goes on from the snapshot's instant (kvmclock as saved), not from
/// the host's now. A run with writes in flight at the snapshot, restored
/// after several times its I/O timeout, finishes its run as it would
/// have: no request timed out, its duration counted without the age.
#[test]
fn a_snapshot_restored_long_after_goes_on_from_its_instant() {
    if !ready("vmm_snapshot_age", &[]) {
        return;
    }
    let fx = Fixture::new();
    let mut exports = Exports::start(&fx);
    let image = fx.image("aged.img", "64M");
    let sock = exports.add(&image);
    // Every sector of the range written first (the read-back at the end
    // checks each one; random writes for a while need not reach all).
    vm_on(&sock, "mode=write verify=1 gen=3 bs=64k qd=8 size=16M")
        .run()
        .expect("the fill runs")
        .assert_ok("filling the disk");
    let api_sock = fx.path("aged-api.sock");
    // 3 s of verifying random writes, 16 in flight, each given 1 s.
    let (duration_ms, timeout_ms) = (3000u64, 1000u64);
    let run = format!(
        "mode=randwrite verify=1 gen=3 bs=4k qd=16 size=16M duration_ms={duration_ms} \
         timeout_ms={timeout_ms} progress_ms=250"
    );
    let mut original = vm_on(&sock, &run);
    original.api_socket = Some(api_sock.clone());
    let mut original = started(&original);
    original
        .wait_for_progress(
            1,
            &Patience::new("the run's first progress line", Duration::from_millis(250)),
        )
        .expect("the run goes");
    assert!(api(&api_sock, &["pause"]).0, "pause");
    let snap = fx.path("aged-snap");
    let (ok, out) = api(&api_sock, &["snapshot", "--dir", &s(&snap)]);
    assert!(ok, "snapshot: {out}");
    if let Err(e) = exports.snapshot(&sock, "s1") {
        panic!("export-snapshot: {e}");
    }
    assert!(api(&api_sock, &["resume"]).0, "resume");
    original
        .wait()
        .expect("the original ends")
        .assert_ok("the original");

    // The snapshot ages: well past the guest's I/O timeout (and the
    // run's whole duration) before it is restored.
    let age = Duration::from_millis(3 * duration_ms);
    std::thread::sleep(age);
    let clone = fx.clone_of("aged.img@s1", "aged-r.img");
    let clone_sock = exports.add(&clone);
    let mut v = vm_on(&clone_sock, "");
    v.restore = Some(snap.clone());
    let done = v.run().expect("the restored VM runs");
    done.assert_ok("the restored copy");
    assert_eq!(done.field("errors"), 0, "no request timed out");
    // Its run counted the time it ran, not the snapshot's age: about
    // `duration_ms` (plus the pause around the snapshot), far below
    // duration + age, which a guest that saw the host's clock reports (or
    // it ends at once, having "run" for the whole age).
    let elapsed_ms = done.field("elapsed_ns") / 1_000_000;
    assert!(
        elapsed_ms >= duration_ms && elapsed_ms < duration_ms + age.as_millis() as u64 / 2,
        "the run's elapsed time {elapsed_ms} ms: {duration_ms} ms of run, restored {} ms after its snapshot",
        age.as_millis()
    );
    assert!(done.field("writes") > 0);
    exports.del(&clone_sock);
    verify_gen_on(&clone, 3);
}

/// The disk at `image`, read back through a fresh backend: every sector
/// the run wrote is of generation `gen`.
fn verify_gen_on(image: &Path, gen: u32) {
    let sock = Fixture::socket_of(image);
    let b = BlkBackendProcess::start_exports_with(
        &bin("blk-backend"),
        &[(image.to_path_buf(), sock.clone())],
        &[],
    )
    .expect("blk-backend");
    let r = vm_on(
        &sock,
        &format!("mode=read verify=1 expect_gen={gen} bs=64k qd=8 size=16M"),
    )
    .run()
    .expect("vmm runs");
    r.assert_ok("reading the restored copy's disk back");
    assert_eq!(r.field("verify_failures"), 0);
    b.stop();
}
