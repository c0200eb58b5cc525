//! blk-backend serving snapshot-chain images to the bench guest under QEMU's
//! vhost-user-blk frontend (a frontend nobody here wrote).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use test_infra::{bin, img, s, BlkBackendProcess, Disk, Fixture, GuestRun, Patience, QemuVm};

fn ready(test: &str) -> bool {
    test_infra::ready(test, &["qemu-system-x86_64"])
}

fn boot(sock: &Path, queues: u16, cmdline: &str) -> GuestRun {
    QemuVm::new(Disk::vhost_user(sock, queues), cmdline)
        .run()
        .expect("guest runs")
}

fn assert_ok(r: &GuestRun, what: &str) {
    r.assert_ok(what);
}

#[test]
fn verify_on_a_clone_then_snapshot_and_clone_again() {
    if !ready("blk_backend_verify_snapshot_clone") {
        return;
    }
    let fx = Fixture::new();
    let d = |n: &str| fx.path(n);
    fx.base_and_clone("1G");
    let sock = d("vm.sock");
    let b = fx.serve(&d("vm.img"), 2);
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
    fx.clone_of("vm.img@s1", "vm2.img");
    let sock2 = d("vm2.sock");
    let b = fx.serve(&d("vm2.img"), 1);
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
    let fx = Fixture::new();
    let image = fx.image("ro.img", "64M");
    let sock = Fixture::socket_of(&image);
    let b = fx.serve_readonly(&image, 1);
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
    let fx = Fixture::new();
    let d = |n: &str| fx.path(n);
    fx.image("base.img", "1G");
    // The base gets data before it is cloned.
    let base_sock = d("base.sock");
    let b = fx.serve(&d("base.img"), 1);
    assert_ok(
        &boot(
            &base_sock,
            1,
            "mode=write verify=1 gen=2 bs=64k qd=8 size=64M",
        ),
        "base",
    );
    b.stop();
    fx.clone_of("base.img", "a.img");
    fx.clone_of("base.img", "b.img");
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
    // where per-export data-path descriptors would make 6. Each export
    // also holds the base's shared lock on a descriptor of its own (its
    // fdinfo lists the lock).
    let (mut io_fds, mut lock_fds) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{}/fd", b.pid())).expect("fds") {
        let e = e.expect("fd");
        if std::fs::read_link(e.path()).ok().as_deref() != Some(d("base.img").as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{}/fdinfo/{}",
            b.pid(),
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if info
            .lines()
            .any(|l| l.starts_with("lock:") && l.contains(" READ "))
        {
            lock_fds += 1;
        } else {
            io_fds += 1;
        }
    }
    assert!(io_fds <= 4, "{io_fds} descriptors on the base");
    assert_eq!(lock_fds, 2, "one shared lock on the base per export");
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
        use std::io::{Read, Write};
        let mut junk = std::os::unix::net::UnixStream::connect(&sa).expect("connect");
        let _ = junk.write_all(&[0xffu8; 64]);
        // The backend hangs up on it (end of file, or a reset), in about a
        // millisecond here.
        let hang_up = Patience::new(
            "blk-backend hanging up on garbage",
            Duration::from_millis(1),
        );
        junk.set_read_timeout(Some(hang_up.limit()))
            .expect("timeout");
        let mut rest = Vec::new();
        if let Err(e) = junk.read_to_end(&mut rest) {
            assert!(
                e.kind() == std::io::ErrorKind::ConnectionReset,
                "{}: {e}",
                hang_up.explain(hang_up.limit())
            );
        }
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
    let fx = Fixture::new();
    let d = |n: &str| fx.path(n);
    fx.base_and_clone("1G");
    let sock = d("vm.sock");
    let vm = |cmdline: &str| {
        QemuVm::new(
            Disk::VhostUser {
                socket: sock.clone(),
                num_queues: 2,
                reconnect_ms: Some(50),
            },
            cmdline,
        )
    };
    // Progress lines come 100 ms apart.
    let next_lines = Patience::new("two more progress lines", Duration::from_millis(200));
    for (round, kills) in [(1u32, 1usize), (2, 3)] {
        let mut b = fx.serve(&d("vm.img"), 2);
        // Sequential 64k writes that cover the disk; each block's header
        // names the generation.
        let mut guest = vm(&format!(
            "mode=write verify=1 gen={round} bs=16k qd=32 queues=2 irq=1 ios=196608 progress_ms=100 timeout_ms=20000"
        ))
        .spawn()
        .expect("guest starts");
        for k in 0..kills {
            // Let the workload get going, then kill it mid-flight.
            guest
                .wait_for_progress(2 + 2 * k as u64, &next_lines)
                .expect("the workload goes on");
            assert!(
                guest.running(),
                "round {round}: the workload ended before kill {k}"
            );
            b.kill();
            std::thread::sleep(Duration::from_millis(100));
            b = fx.serve(&d("vm.img"), 2);
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
