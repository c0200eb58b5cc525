//! blk-backend serving snapshot-chain images to the bench guest under QEMU's
//! vhost-user-blk frontend (a frontend nobody here wrote).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;
use common::{bin, img, s};

use bench::guest::{have, kvm_available, BlkBackendProcess, Disk, GuestRun, Machine, QemuVm};

fn ready(test: &str) -> bool {
    kvm_available(test) && have("qemu-system-x86_64", test)
}

fn boot(sock: &Path, queues: u16, cmdline: &str) -> GuestRun {
    QemuVm {
        machine: Machine::Microvm,
        mem_mib: 512,
        disk: Disk::vhost_user(sock, queues),
        cmdline: cmdline.into(),
        timeout: Duration::from_secs(120),
    }
    .run()
    .expect("guest runs")
}

fn assert_ok(r: &GuestRun, what: &str) {
    assert!(r.ok(), "{what}: status {:?}\n{}", r.guest_status, r.serial);
}

#[test]
fn verify_on_a_clone_then_snapshot_and_clone_again() {
    if !ready("blk_backend_verify_snapshot_clone") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("base.img")), "1G"]);
    img(&["clone", &s(&d("base.img")), &s(&d("vm.img"))]);
    let sock = d("vm.sock");
    let backend = bin("blk-backend");
    let b = BlkBackendProcess::start(&backend, &d("vm.img"), &sock, 2, false).expect("backend");
    for (queues, irq) in [(1, false), (2, true)] {
        let base = format!("bs=64k qd=16 queues={queues} irq={}", irq as u8);
        let w = boot(&sock, 2, &format!("mode=write verify=1 gen=1 {base}"));
        assert_ok(&w, "write");
        let r = boot(&sock, 2, &format!("mode=read verify=1 expect_gen=1 {base}"));
        assert_ok(&r, "read");
        assert_eq!(r.field("reads"), (1 << 30) / 65536);
    }
    b.stop();
    // Snapshot, clone, boot on the clone: old data plus new writes.
    img(&["snapshot", "-c", "s1", &s(&d("vm.img"))]);
    img(&["clone", &s(&d("vm.img@s1")), &s(&d("vm2.img"))]);
    let sock2 = d("vm2.sock");
    let b = BlkBackendProcess::start(&backend, &d("vm2.img"), &sock2, 1, false).expect("backend");
    let r = boot(&sock2, 1, "mode=read verify=1 expect_gen=1 bs=64k qd=16");
    assert_ok(&r, "old data through the clone");
    let w = boot(
        &sock2,
        1,
        "mode=write verify=1 gen=2 bs=4k qd=16 offset=64M size=16M",
    );
    assert_ok(&w, "new writes on the clone");
    let r = boot(
        &sock2,
        1,
        "mode=read verify=1 expect_gen=2 bs=4k qd=16 offset=64M size=16M",
    );
    assert_ok(&r, "new data");
    let r = boot(
        &sock2,
        1,
        "mode=read verify=1 expect_gen=1 bs=64k qd=16 offset=80M size=64M",
    );
    assert_ok(&r, "old data around it");
    // Discard and write-zeroes on the overlay where the parent has data.
    for check in ["discard", "zeroes"] {
        let r = boot(
            &sock2,
            1,
            &format!("check={check} prefill=0 offset=200M size=8M bs=64k qd=4"),
        );
        assert_ok(&r, check);
    }
    b.stop();
    // The sealed snapshot never changed: its content still verifies as gen 1.
    let out = Command::new(bin("img"))
        .args(["check", &s(&d("vm2.img"))])
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn read_only_export_fails_writes_and_keeps_serving() {
    if !ready("blk_backend_read_only") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let image = dir.path().join("ro.img");
    img(&["create", image.to_str().expect("utf-8"), "64M"]);
    let sock = dir.path().join("ro.sock");
    let b = BlkBackendProcess::start(&bin("blk-backend"), &image, &sock, 1, true).expect("backend");
    let r = boot(&sock, 1, "mode=write bs=4k ios=8");
    assert_eq!(r.guest_status, Some(1), "{}", r.serial);
    assert_eq!(r.field("ioerr"), 8);
    let r = boot(&sock, 1, "mode=read bs=4k size=1M");
    assert_ok(&r, "reads after refused writes");
    b.stop();
}

#[test]
fn one_process_serves_several_exports_and_a_bad_peer_only_loses_its_session() {
    if !ready("blk_backend_several_exports") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("base.img")), "1G"]);
    // The base gets data before it is cloned.
    let base_sock = d("base.sock");
    let b = BlkBackendProcess::start(&bin("blk-backend"), &d("base.img"), &base_sock, 1, false)
        .expect("backend");
    assert_ok(
        &boot(
            &base_sock,
            1,
            "mode=write verify=1 gen=2 bs=64k qd=8 size=64M",
        ),
        "base",
    );
    b.stop();
    img(&["clone", &s(&d("base.img")), &s(&d("a.img"))]);
    img(&["clone", &s(&d("base.img")), &s(&d("b.img"))]);
    let (sa, sb) = (d("a.sock"), d("b.sock"));
    let b = BlkBackendProcess::start_exports_with(
        &bin("blk-backend"),
        &[(d("a.img"), sa.clone()), (d("b.img"), sb.clone())],
        &["--base-io", "direct"],
    )
    .expect("backend");
    // Both clones read the base through the data path's shared
    // descriptors (one O_DIRECT, one buffered for unaligned reads, for the
    // whole process) beside the library's own (one per export): 4 here,
    // where per-export data-path descriptors would make 6.
    let base_fds = std::fs::read_dir(format!("/proc/{}/fd", b.pid()))
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t == &d("base.img"))
        .count();
    assert!(base_fds <= 4, "{base_fds} descriptors on the base");
    for sock in [&sa, &sb] {
        assert_ok(
            &boot(
                sock,
                1,
                "mode=read verify=1 expect_gen=2 bs=64k qd=8 size=64M",
            ),
            "base data through a clone",
        );
    }
    // A peer that speaks garbage on export a.
    {
        use std::io::Write;
        let mut junk = std::os::unix::net::UnixStream::connect(&sa).expect("connect");
        let _ = junk.write_all(&[0xffu8; 64]);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Export b is unaffected, and export a serves its next frontend.
    let w = boot(&sb, 1, "mode=write verify=1 gen=3 bs=64k qd=8");
    assert_ok(&w, "export b");
    let w = boot(&sa, 1, "mode=write verify=1 gen=4 bs=64k qd=8");
    assert_ok(&w, "export a after the bad peer");
    // Each clone holds its own data.
    assert_ok(
        &boot(&sb, 1, "mode=read verify=1 expect_gen=3 bs=64k qd=8"),
        "b reads b",
    );
    assert_ok(
        &boot(&sa, 1, "mode=read verify=1 expect_gen=4 bs=64k qd=8"),
        "a reads a",
    );
    b.stop();
}

/// kill -9 the backend while the guest writes (verifying, two queues,
/// interrupts), start it again on the same socket: QEMU reconnects, the
/// requests that were in flight run again from the inflight region, the
/// writes the dead process completed come back from its crash shadow, and
/// the guest sees no error. A full read pass then verifies every block.
#[test]
fn kill_9_and_restart_during_a_verifying_write_loses_nothing() {
    if !ready("blk_backend_kill_9_restart") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("base.img")), "1G"]);
    img(&["clone", &s(&d("base.img")), &s(&d("vm.img"))]);
    let sock = d("vm.sock");
    let backend = bin("blk-backend");
    let vm = |cmdline: &str| QemuVm {
        machine: Machine::Microvm,
        mem_mib: 512,
        disk: Disk::VhostUser {
            socket: sock.clone(),
            num_queues: 2,
            reconnect_ms: Some(50),
        },
        cmdline: cmdline.into(),
        timeout: Duration::from_secs(180),
    };
    for (round, kills) in [(1u32, 1usize), (2, 3)] {
        let mut b =
            BlkBackendProcess::start(&backend, &d("vm.img"), &sock, 2, false).expect("backend");
        // Sequential 64k writes that cover the disk; each block's header
        // names the generation.
        let mut guest = vm(&format!(
            "mode=write verify=1 gen={round} bs=16k qd=32 queues=2 irq=1 ios=196608 progress_ms=100 timeout_ms=20000"
        ))
        .spawn()
        .expect("guest starts");
        for k in 0..kills {
            // Let the workload get going, then kill it mid-flight.
            let t0 = std::time::Instant::now();
            while guest.progress_lines() < 2 + 2 * k as u64
                && t0.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                guest.running(),
                "round {round}: the workload ended before kill {k}"
            );
            b.kill();
            std::thread::sleep(Duration::from_millis(100));
            b = BlkBackendProcess::start(&backend, &d("vm.img"), &sock, 2, false)
                .expect("backend restarts");
        }
        let w = guest.wait().expect("guest runs");
        assert_ok(
            &w,
            &format!("round {round}: writes across {kills} backend kill(s)"),
        );
        assert_eq!(w.field("errors"), 0);
        // Three passes over the disk: long enough to kill the backend in.
        assert_eq!(w.field("writes"), 3 * (1 << 30) / 16384);
        // Each restart shows as a pause, not as an error.
        let max_ms = w
            .result
            .as_ref()
            .and_then(|r| r["lat_ns"]["max"].as_u64())
            .unwrap_or(0)
            / 1_000_000;
        eprintln!(
            "round {round}: {kills} kill(s), {} writes, longest wait {max_ms} ms",
            w.field("writes")
        );
        // Every block reads back as this round wrote it, through the
        // restarted backend (nothing flushed it in between).
        let r = vm(&format!(
            "mode=read verify=1 expect_gen={round} bs=64k qd=16 queues=2"
        ))
        .run()
        .expect("guest runs");
        assert_ok(&r, &format!("round {round}: read back"));
        b.stop();
    }
    let out = Command::new(bin("img"))
        .args(["check", &s(&d("vm.img"))])
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
