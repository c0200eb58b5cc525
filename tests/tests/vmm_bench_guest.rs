//! The project's vmm booting the bench guest: disks served by blk-backend
//! (from a clone of a base image) and by qemu-storage-daemon (a backend
//! nobody here wrote), and bad input turned into clear errors.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use bench::guest::{
    build_guest, have, kvm_available, BlkBackendProcess, GuestRun, StorageDaemon, VmmVm,
};
use common::{bin, img, s};

fn ready(test: &str) -> bool {
    kvm_available(test)
}

fn vm(cpus: u8, disks: &[(PathBuf, u16)], cmdline: &str) -> VmmVm {
    VmmVm {
        vmm: bin("vmm"),
        cpus,
        mem_mib: 256,
        disks: disks.to_vec(),
        cmdline: cmdline.into(),
        timeout: Duration::from_secs(120),
        metrics_file: None,
    }
}

fn assert_ok(r: &GuestRun, what: &str) {
    assert!(r.ok(), "{what}: status {:?}\n{}", r.guest_status, r.serial);
}

#[test]
fn bench_guest_verifies_on_a_blk_backend_clone_with_1_and_2_vcpus_and_queues() {
    if !ready("vmm_blk_backend_verify") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("base.img")), "512M"]);
    img(&["clone", &s(&d("base.img")), &s(&d("vm.img"))]);
    let sock = d("vm.sock");
    let b = BlkBackendProcess::start(&bin("blk-backend"), &d("vm.img"), &sock, 2, false)
        .expect("backend");
    for (gen, (cpus, queues, irq)) in [(1, 1, false), (2, 2, true), (1, 2, true), (2, 1, false)]
        .into_iter()
        .enumerate()
    {
        let gen = gen + 1;
        let disks = [(sock.clone(), queues)];
        let base = format!("bs=64k qd=16 queues={queues} irq={}", irq as u8);
        let w = vm(
            cpus,
            &disks,
            &format!("mode=write verify=1 gen={gen} {base}"),
        )
        .run()
        .expect("vmm runs");
        assert_ok(
            &w,
            &format!("write, {cpus} vCPUs, {queues} queues, irq {irq}"),
        );
        assert_eq!(w.field("writes"), (512 << 20) / 65536);
        let r = vm(
            cpus,
            &disks,
            &format!("mode=read verify=1 expect_gen={gen} {base}"),
        )
        .run()
        .expect("vmm runs");
        assert_ok(
            &r,
            &format!("read, {cpus} vCPUs, {queues} queues, irq {irq}"),
        );
        if irq {
            assert!(r.field("irqs") > 0, "MSI-X interrupts arrived");
        }
    }
    b.stop();
}

#[test]
fn the_same_guest_runs_on_qemu_storage_daemon() {
    if !ready("vmm_qsd") || !have("qemu-storage-daemon", "vmm_qsd") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(256 << 20))
        .expect("raw file");
    let sock = dir.path().join("qsd.sock");
    let _qsd = StorageDaemon::start(&raw, &sock, 2, true).expect("qemu-storage-daemon");
    let disks = [(sock.clone(), 2)];
    let w = vm(
        1,
        &disks,
        "mode=write verify=1 gen=7 bs=64k qd=16 queues=2 irq=1",
    )
    .run()
    .expect("vmm runs");
    assert_ok(&w, "write through qsd");
    let r = vm(
        1,
        &disks,
        "mode=read verify=1 expect_gen=7 bs=64k qd=16 queues=2",
    )
    .run()
    .expect("vmm runs");
    assert_ok(&r, "read through qsd");
}

/// Runs the vmm with `args`; returns (status, stderr).
fn vmm_fails(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("vmm"))
        .args(args)
        .output()
        .expect("vmm runs");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "vmm panicked: {err}");
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn bad_input_is_a_clear_error_and_nothing_is_left_running() {
    if !ready("vmm_bad_input") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 65536]).expect("write");
    let kernel = build_guest().expect("bench guest");
    let k = s(&kernel);
    let nobody = s(&dir.path().join("nobody.sock"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), s(&dir.path().join("missing"))],
            "No such file",
        ),
        (vec!["--kernel".into(), s(&garbage)], "not a kernel"),
        (vec!["--kernel".into(), "/bin/true".into()], "not a kernel"),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--disk".into(),
                format!("socket={nobody}"),
            ],
            "is a backend listening",
        ),
        (
            vec!["--kernel".into(), k.clone(), "--memory".into(), "1K".into()],
            "16 MiB",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--memory".into(),
                "lots".into(),
            ],
            "size",
        ),
        (
            vec!["--kernel".into(), k.clone(), "--cpus".into(), "0".into()],
            "--cpus",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--disk".into(),
                "num_queues=2".into(),
            ],
            "socket= is missing",
        ),
        (
            vec![
                "--kernel".into(),
                k.clone(),
                "--serial".into(),
                "tty".into(),
            ],
            "--serial",
        ),
    ];
    for (args, expect) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = vmm_fails(&argv);
        assert_ne!(code, 0, "{argv:?} succeeded");
        assert!(
            err.contains(expect),
            "{argv:?}: {err:?} does not say {expect:?}"
        );
    }
    // A JSON config with a mistake names it.
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/x", "memory": "big"}"#).expect("write");
    let (code, err) = vmm_fails(&["--config", &s(&cfg)]);
    assert_ne!(code, 0);
    assert!(err.contains("memory"), "{err}");
}

#[test]
fn a_json_config_boots_like_the_command_line() {
    if !ready("vmm_json_config") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = build_guest().expect("bench guest");
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        serde_json::json!({
            "kernel": kernel,
            "cmdline": "mode=read bs=4k ios=1",
            "cpus": 1,
            "memory": 64u64 << 20,
            "serial": "stdio"
        })
        .to_string(),
    )
    .expect("write");
    let out = Command::new(bin("vmm"))
        .args(["--config", &s(&cfg)])
        .output()
        .expect("vmm");
    let serial = String::from_utf8_lossy(&out.stdout);
    assert!(serial.contains("BENCH-GUEST START"), "{serial}");
    // No disk: the guest says so and exits 3 (its "no device" status).
    assert_eq!(out.status.code(), Some(3), "{serial}");
}

fn api(sock: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("vmm"))
        .args(["api", "--socket", &s(sock)])
        .args(args)
        .output()
        .expect("vmm api");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// Pause in the middle of a verifying workload, resume, finish; the
/// counters show no userspace exit per guest I/O; shutdown through the API
/// (graceful and forced) ends the VM with status 0.
#[test]
fn control_api_pauses_resumes_and_shuts_down_and_no_exit_rides_the_data_path() {
    if !ready("vmm_control_api") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("vm.img")), "256M"]);
    let sock = d("vm.sock");
    let b = BlkBackendProcess::start(&bin("blk-backend"), &d("vm.img"), &sock, 1, false)
        .expect("backend");
    let api_sock = d("api.sock");
    let metrics = d("metrics.json");
    let kernel = build_guest().expect("bench guest");
    let start = |cmdline: &str| {
        Command::new(bin("vmm"))
            .args(["--kernel", &s(&kernel), "--memory", "256M"])
            .args(["--disk", &format!("socket={}", s(&sock))])
            .args([
                "--api-socket",
                &s(&api_sock),
                "--metrics-file",
                &s(&metrics),
            ])
            .args(["--cmdline", cmdline])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("vmm starts")
    };
    let wait_api = || {
        let t0 = std::time::Instant::now();
        while !api(&api_sock, &["info"]).0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no API socket");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Sequential writes that wrap around 64 MiB, 120,000 of them: every
    // block of it is written (verify needs that), several times over,
    // however fast the machine and however long the pause.
    let vm = start("mode=write verify=1 gen=5 bs=4k qd=16 size=64M ios=120000 progress_ms=0");
    wait_api();
    // Userspace exits over half a second of the workload (the guest prints
    // nothing meanwhile): the data path must not exit at all.
    let exits_now = || {
        let (ok, body) = api(&api_sock, &["metrics"]);
        assert!(ok, "{body}");
        let m: serde_json::Value = serde_json::from_str(&body).expect("json");
        m["vcpus"][0]["exits"]["total"].as_u64().expect("total")
    };
    std::thread::sleep(Duration::from_millis(300));
    let (e1, t1) = (exits_now(), std::time::Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let (e2, window) = (exits_now(), t1.elapsed());
    let (ok, body) = api(&api_sock, &["pause"]);
    assert!(ok && body.contains("paused"), "{body}");
    let (_, info) = api(&api_sock, &["info"]);
    assert!(info.contains("\"state\":\"paused\""), "{info}");
    std::thread::sleep(Duration::from_millis(700));
    let (ok, body) = api(&api_sock, &["resume"]);
    assert!(ok && body.contains("running"), "{body}");
    let (ok, _) = api(&api_sock, &["resume"]);
    assert!(!ok, "resuming a running VM is refused");
    let out = vm.wait_with_output().expect("vmm ends");
    let serial = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{serial}");
    let result: serde_json::Value = serde_json::from_str(
        serial
            .lines()
            .rev()
            .find(|l| l.starts_with("{\"bench_guest\""))
            .expect("result line"),
    )
    .expect("json");
    assert_eq!(result["result"], "ok", "{serial}");
    let iops = result["iops"].as_f64().expect("iops");
    let ios_in_window = iops * window.as_secs_f64();
    let per_io = (e2 - e1) as f64 / ios_in_window;
    eprintln!(
        "{} userspace exits during {:.0} guest I/Os: {per_io:.4} per I/O",
        e2 - e1,
        ios_in_window
    );
    assert!(
        per_io < 0.01,
        "{} exits for about {ios_in_window:.0} I/Os",
        e2 - e1
    );
    // The whole run, set-up and console output included, for the record.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).expect("metrics")).expect("json");
    eprintln!(
        "whole run: {} exits for {} I/Os",
        m["vcpus"][0]["exits"]["total"], result["ios"]
    );
    // The data survived the pause.
    let r = vm_read(
        &sock,
        "mode=read verify=1 expect_gen=5 bs=4k qd=16 size=64M",
    );
    assert_ok(&r, "read back after pause/resume");

    // Shutdown, graceful then forced, while a long workload runs.
    for force in [false, true] {
        let vm = start("mode=randread bs=4k qd=16 duration_ms=60000 progress_ms=0");
        wait_api();
        let mut args = vec!["shutdown"];
        if force {
            args.push("--force");
        }
        let (ok, body) = api(&api_sock, &args);
        assert!(ok, "{body}");
        let out = vm.wait_with_output().expect("vmm ends");
        assert_eq!(out.status.code(), Some(0), "shutdown (force {force})");
    }
    b.stop();
}

fn vm_read(sock: &std::path::Path, cmdline: &str) -> GuestRun {
    vm(1, &[(sock.to_path_buf(), 1)], cmdline)
        .run()
        .expect("vmm runs")
}

/// kill -9 blk-backend while the guest writes (verifying, two queues,
/// MSI-X) under the vmm; start it again: the vmm reconnects, replays the
/// session with the same inflight region, and the guest sees no error.
#[test]
fn kill_9_and_restart_the_backend_under_the_vmm_loses_nothing() {
    if !ready("vmm_kill_9_restart") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("base.img")), "1G"]);
    img(&["clone", &s(&d("base.img")), &s(&d("vm.img"))]);
    let sock = d("vm.sock");
    let backend = bin("blk-backend");
    let mut b = BlkBackendProcess::start(&backend, &d("vm.img"), &sock, 2, false).expect("backend");
    let disks = [(sock.clone(), 2)];
    let mut guest = vm(
        1,
        &disks,
        "mode=write verify=1 gen=9 bs=16k qd=32 queues=2 irq=1 ios=196608 progress_ms=100 timeout_ms=20000",
    )
    .spawn()
    .expect("vmm starts");
    for k in 0..3u64 {
        let t0 = std::time::Instant::now();
        while guest.progress_lines() < 2 + 2 * k && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(guest.running(), "the workload ended before kill {k}");
        b.kill();
        std::thread::sleep(Duration::from_millis(100));
        b = BlkBackendProcess::start(&backend, &d("vm.img"), &sock, 2, false)
            .expect("backend restarts");
    }
    let w = guest.wait().expect("vmm runs");
    assert_ok(&w, "writes across 3 backend kills");
    assert_eq!(w.field("errors"), 0);
    // Three passes over the disk: long enough to kill the backend in.
    assert_eq!(w.field("writes"), 3 * (1 << 30) / 16384);
    let r = vm(
        1,
        &disks,
        "mode=read verify=1 expect_gen=9 bs=64k qd=16 queues=2",
    )
    .run()
    .expect("vmm runs");
    assert_ok(&r, "read back");
    b.stop();
}

/// A backend that dies and never comes back: after the disk's reconnect
/// timeout the vmm fails the guest's requests with IOERR (those the dead
/// backend had in flight, then every new one), so the guest reports I/O
/// errors and ends instead of waiting forever.
#[test]
fn a_backend_that_never_comes_back_gives_the_guest_io_errors() {
    if !ready("vmm_backend_gone") {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("vm.img")), "256M"]);
    let sock = d("vm.sock");
    let b = BlkBackendProcess::start(&bin("blk-backend"), &d("vm.img"), &sock, 1, false)
        .expect("backend");
    let kernel = build_guest().expect("bench guest");
    let t0 = std::time::Instant::now();
    let mut vmm = Command::new(bin("vmm"))
        .args(["--kernel", &s(&kernel), "--memory", "256M"])
        .args([
            "--disk",
            &format!("socket={},reconnect_timeout_ms=1000", s(&sock)),
        ])
        .args([
            "--cmdline",
            "mode=randwrite bs=4k qd=16 duration_ms=4000 progress_ms=500 timeout_ms=20000",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("vmm starts");
    std::thread::sleep(Duration::from_millis(700));
    b.kill();
    let status = loop {
        if let Some(st) = vmm.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = vmm.kill();
            panic!("the vmm hung after its backend died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut serial = String::new();
    std::io::Read::read_to_string(&mut vmm.stdout.take().expect("piped"), &mut serial)
        .expect("serial");
    let result: serde_json::Value = serde_json::from_str(
        serial
            .lines()
            .rev()
            .find(|l| l.starts_with("{\"bench_guest\""))
            .expect("the guest reported"),
    )
    .expect("json");
    assert_eq!(result["result"], "fail", "{serial}");
    assert!(result["ioerr"].as_u64().unwrap_or(0) > 0, "{serial}");
    assert_eq!(result["timed_out"], false, "{serial}");
    assert_ne!(status.code(), Some(0));
}

/// A kernel that faults at its first instruction: the vmm reports the
/// fault with the vCPU's registers and a non-zero status, and exits.
#[test]
fn a_faulting_guest_is_reported_with_its_registers() {
    if !ready("vmm_guest_fault") {
        return;
    }
    // An ELF64 executable: one PT_LOAD (file 0x100.., 16 bytes of int3 at
    // 1 MiB) and the PVH entry note pointing at it.
    let mut e = vec![0u8; 0x110];
    let put = |e: &mut Vec<u8>, at: usize, b: &[u8]| e[at..at + b.len()].copy_from_slice(b);
    put(&mut e, 0, b"\x7fELF\x02\x01\x01");
    put(&mut e, 16, &[2, 0, 62, 0, 1, 0, 0, 0]);
    put(&mut e, 24, &0x100000u64.to_le_bytes());
    put(&mut e, 32, &64u64.to_le_bytes());
    put(&mut e, 52, &[64, 0, 56, 0, 2, 0]);
    for (at, kind, off, addr, size) in [
        (64, 1u32, 0x100u64, 0x100000u64, 16u64),
        (120, 4, 0xe0, 0, 20),
    ] {
        put(&mut e, at, &kind.to_le_bytes());
        put(&mut e, at + 8, &off.to_le_bytes());
        put(&mut e, at + 16, &addr.to_le_bytes());
        put(&mut e, at + 24, &addr.to_le_bytes());
        put(&mut e, at + 32, &size.to_le_bytes());
        put(&mut e, at + 40, &size.to_le_bytes());
        put(&mut e, at + 48, &4u64.to_le_bytes());
    }
    put(&mut e, 0xe0, &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0]);
    put(&mut e, 0xec, b"Xen\0");
    put(&mut e, 0xf0, &0x100000u32.to_le_bytes());
    put(&mut e, 0x100, &[0xcc; 16]);
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("fault.elf");
    std::fs::write(&kernel, &e).expect("write");
    let t0 = std::time::Instant::now();
    let (code, err) = vmm_fails(&["--kernel", &s(&kernel), "--memory", "64M"]);
    assert_ne!(code, 0);
    assert!(err.contains("guest fault"), "{err}");
    assert!(err.contains("rip="), "registers are printed: {err}");
    assert!(t0.elapsed() < Duration::from_secs(60));
}
