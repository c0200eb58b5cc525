//! The project's vmm booting the bench guest: disks served by blk-backend
//! (from a clone of a base image) and by qemu-storage-daemon (a backend
//! nobody here wrote), the control API, backends that die, and bad input
//! turned into clear errors.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use test_infra::{
    bin, build_guest, img, output_within, ready, s, BlkBackendProcess, Fixture, GuestRun, Patience,
    RunningVm, StorageDaemon, VmmDisk, VmmVm,
};

/// The bench guest under the vmm on one disk.
fn vm(cpus: u8, sock: &Path, queues: u16, cmdline: &str) -> VmmVm {
    VmmVm {
        cpus,
        ..VmmVm::new(&bin("vmm"), cmdline).with_disk(sock, queues)
    }
}

/// A vmm run that ends at once (bad input, a fault): about 50 ms here.
fn quick() -> Patience {
    Patience::new("a vmm that fails at start", Duration::from_millis(50))
}

/// A vmm told to wait for its disk (`connect_timeout_ms`, as vmctl starts
/// the vmm and the disk's export together) waits for a backend that is
/// not there yet, and runs once it listens.
#[test]
fn a_vmm_started_before_its_backend_waits_for_it() {
    if !ready("vmm_waits_for_backend", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.base_and_clone("64M");
    let sock = Fixture::socket_of(&image);
    let mut v = VmmVm::new(&bin("vmm"), "mode=write verify=1 gen=3 size=8M");
    v.disks.push(VmmDisk {
        connect_timeout_ms: Some(600_000),
        ..VmmDisk::new(&sock, 1)
    });
    let guest = v.spawn().expect("vmm starts");
    // Its only thread sleeps in poll on an inotify watch of the socket's
    // directory (nothing else in a vmm polls before its disks are
    // connected), not in a loop of looks and sleeps.
    let wchan = format!("/proc/{}/wchan", guest.pid());
    Patience::new("the vmm waiting for its backend", Duration::from_millis(20))
        .wait_until(|| Ok(std::fs::read_to_string(&wchan).is_ok_and(|w| w.contains("poll"))))
        .expect("the vmm waits");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", guest.pid()))
        .expect("its descriptors")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    assert!(
        fds.iter().any(|l| l.contains("inotify")),
        "no inotify watch among {fds:?}"
    );
    let _b = fx.serve(&image, 1);
    let run = guest.wait().expect("vmm ends");
    run.assert_ok("a write once the backend listened");
    assert_eq!(run.field("verify_failures"), 0);
}

#[test]
fn bench_guest_verifies_on_a_blk_backend_clone_with_1_and_2_vcpus_and_queues() {
    if !ready("vmm_blk_backend_verify", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.base_and_clone("512M");
    let b = fx.serve(&image, 2);
    let sock = Fixture::socket_of(&image);
    // (vCPUs, queues, how the guest waits: polling, interrupts it spins
    // for, interrupts it sleeps in hlt for).
    for (gen, (cpus, queues, wait)) in [
        (1, 1, "poll"),
        (2, 2, "irq=1"),
        (1, 2, "irq=1"),
        (2, 1, "poll"),
        (2, 2, "wait=halt"),
    ]
    .into_iter()
    .enumerate()
    {
        let gen = gen + 1;
        let irq = wait != "poll";
        let base = format!("bs=64k qd=16 queues={queues} {}", wait.replace("poll", ""));
        let what = format!("{cpus} vCPUs, {queues} queues, {wait}");
        let w = vm(
            cpus,
            &sock,
            queues,
            &format!("mode=write verify=1 gen={gen} {base}"),
        )
        .run()
        .expect("vmm runs");
        w.assert_ok(&format!("write, {what}"));
        assert_eq!(w.field("writes"), (512 << 20) / 65536);
        let r = vm(
            cpus,
            &sock,
            queues,
            &format!("mode=read verify=1 expect_gen={gen} {base}"),
        )
        .run()
        .expect("vmm runs");
        r.assert_ok(&format!("read, {what}"));
        if irq {
            assert!(r.field("irqs") > 0, "MSI-X interrupts arrived");
        }
        // Only a halting guest halts, and it does while its I/O is out.
        let halts = r.field("halts");
        assert_eq!(halts > 0, wait == "wait=halt", "{what}: {halts} halts");
    }
    b.stop();
}

/// Writes and reads back with verification through `sock` (served with
/// 2 queues): 64 KiB requests on 2 queues, and unaligned buffers
/// (bs=1536 with 512-byte sectors: the guest's data need not sit on
/// block boundaries) on 1.
fn write_then_verify(sock: &Path) {
    for (gen, base) in [
        (1, "bs=64k qd=16 queues=2"),
        (2, "bs=1536 qd=4 queues=1 size=4194304"),
    ] {
        let queues = if base.contains("queues=2") { 2 } else { 1 };
        let w = vm(
            1,
            sock,
            queues,
            &format!("mode=write verify=1 gen={gen} {base}"),
        )
        .run()
        .expect("vmm runs");
        w.assert_ok(&format!("write, {base}"));
        let r = vm(
            1,
            sock,
            queues,
            &format!("mode=read verify=1 expect_gen={gen} {base}"),
        )
        .run()
        .expect("vmm runs");
        r.assert_ok(&format!("read, {base}"));
        assert!(r.field("reads") > 0, "{base}: it read");
    }
}

/// Guest memory registered with each queue's io_uring as fixed buffers
/// (`--fixed-buffers`) on a real disk: the same bytes, and the backend
/// says it registered them.
#[test]
fn guest_memory_as_fixed_buffers_serves_the_same_bytes() {
    if !ready("vmm_blk_backend_fixed_buffers", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.base_and_clone("64M");
    let sock = Fixture::socket_of(&image);
    let log = fx.path("blk-backend.log");
    let b = BlkBackendProcess::start_exports_logging_to(
        &bin("blk-backend"),
        &[(image.clone(), sock.clone())],
        &["--fixed-buffers", "--num-queues", "2"],
        &log,
    )
    .expect("blk-backend starts");
    write_then_verify(&sock);
    b.stop();
    let log = std::fs::read_to_string(&log).expect("the backend's log");
    assert!(
        log.contains("MiB of guest memory registered as fixed buffers"),
        "no registration in the log:\n{log}"
    );
    assert!(!log.contains("not registered"), "{log}");
}

/// A chain in memory (tmpfs): blk-backend reads and writes its layers
/// itself rather than through its io_uring; the data and the answers are
/// the same, through the clone and, after a snapshot, through a clone of
/// that.
#[test]
fn a_chain_in_memory_is_served_byte_for_byte() {
    if !ready("vmm_blk_backend_in_memory", &[]) {
        return;
    }
    let fx = Fixture::in_memory();
    let image = fx.base_and_clone("64M");
    let b = fx.serve(&image, 2);
    write_then_verify(&Fixture::socket_of(&image));
    b.stop();
    // The written clone sealed and cloned again: its data reads back
    // through two layers in memory.
    img(&["snapshot", "-c", "sealed", &s(&image)]);
    let again = fx.clone_of("vm.img@sealed", "again.img");
    let b = fx.serve(&again, 1);
    let r = vm(
        1,
        &Fixture::socket_of(&again),
        1,
        "mode=read verify=1 expect_gen=2 bs=1536 qd=4 size=4194304",
    )
    .run()
    .expect("vmm runs");
    r.assert_ok("read through a clone of the sealed clone");
    b.stop();
}

#[test]
fn the_same_guest_runs_on_qemu_storage_daemon() {
    if !ready("vmm_qsd", &["qemu-storage-daemon"]) {
        return;
    }
    let fx = Fixture::new();
    let raw = fx.raw("disk.raw", 256 << 20);
    let sock = fx.path("qsd.sock");
    let _qsd = StorageDaemon::start(&raw, &sock, 2, true).expect("qemu-storage-daemon");
    let w = vm(
        1,
        &sock,
        2,
        "mode=write verify=1 gen=7 bs=64k qd=16 queues=2 irq=1",
    )
    .run()
    .expect("vmm runs");
    w.assert_ok("write through qsd");
    let r = vm(
        1,
        &sock,
        2,
        "mode=read verify=1 expect_gen=7 bs=64k qd=16 queues=2",
    )
    .run()
    .expect("vmm runs");
    r.assert_ok("read through qsd");
}

/// Runs the vmm with `args`, which must make it fail; returns (status, stderr).
fn vmm_fails(args: &[&str]) -> (i32, String) {
    let out = output_within(Command::new(bin("vmm")).args(args), &quick()).expect("vmm runs");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "vmm panicked: {err}");
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn bad_input_is_a_clear_error_and_nothing_is_left_running() {
    if !ready("vmm_bad_input", &[]) {
        return;
    }
    let fx = Fixture::new();
    let garbage = fx.path("garbage");
    std::fs::write(&garbage, vec![0x5au8; 65536]).expect("write");
    let k = s(&build_guest().expect("bench guest").elf);
    let nobody = s(&fx.path("nobody.sock"));
    let kernel = |more: &[&str]| -> Vec<String> {
        let mut v = vec!["--kernel".to_string(), k.clone()];
        v.extend(more.iter().map(|m| m.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), s(&fx.path("missing"))],
            "No such file",
        ),
        (vec!["--kernel".into(), s(&garbage)], "not a kernel"),
        // Told to die with a parent that is not its parent: refused, not
        // left running unwatched.
        (
            kernel(&["--parent-pid", "1"]),
            "--parent-pid 1: the parent is",
        ),
        // Each cause once (linux-loader repeats its own prefix).
        (
            vec!["--kernel".into(), "/bin/true".into()],
            "not a kernel this VMM can boot: failed to load ELF kernel image: Invalid entry address",
        ),
        (
            kernel(&["--disk", &format!("socket={nobody}")]),
            "is a backend listening",
        ),
        (kernel(&["--memory", "1K"]), "16 MiB"),
        (kernel(&["--memory", "lots"]), "size"),
        (kernel(&["--cpus", "0"]), "--cpus"),
        (kernel(&["--disk", "num_queues=2"]), "socket= is missing"),
        (kernel(&["--serial", "tty"]), "--serial"),
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
    let cfg = fx.path("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/x", "memory": "big"}"#).expect("write");
    let (code, err) = vmm_fails(&["--config", &s(&cfg)]);
    assert_ne!(code, 0);
    assert!(err.contains("memory"), "{err}");
    // A key it does not know, and options beside --config, are errors,
    // not silently ignored.
    std::fs::write(&cfg, format!(r#"{{"kernel": "{k}", "colour": "red"}}"#)).expect("write");
    let (code, err) = vmm_fails(&["--config", &s(&cfg)]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown field `colour`"), "{err}");
    std::fs::write(&cfg, format!(r#"{{"kernel": "{k}"}}"#)).expect("write");
    let (code, err) = vmm_fails(&["--config", &s(&cfg), "--cpus", "2"]);
    assert_ne!(code, 0);
    assert!(err.contains("--config") && err.contains("--cpus"), "{err}");
}

#[test]
fn a_json_config_boots_like_the_command_line() {
    if !ready("vmm_json_config", &[]) {
        return;
    }
    let fx = Fixture::new();
    let kernel = build_guest().expect("bench guest").elf;
    let cfg = fx.path("vm.json");
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
    let out = output_within(
        Command::new(bin("vmm")).args(["--config", &s(&cfg)]),
        &Patience::new("a diskless bench guest run", Duration::from_millis(100)),
    )
    .expect("vmm");
    let serial = String::from_utf8_lossy(&out.stdout);
    assert!(serial.contains("BENCH-GUEST START"), "{serial}");
    // No disk: the guest says so and exits 3 (its "no device" status).
    assert_eq!(out.status.code(), Some(3), "{serial}");
}

use test_infra::vmm_api as api;

/// The guest's "device:" line: its disk is set up and the workload starts.
fn workload_started() -> Patience {
    Patience::new(
        "the guest's disk set up (its \"device:\" line)",
        Duration::from_millis(100),
    )
}

/// Pause in the middle of a verifying workload, resume, finish; the
/// counters show no userspace exit per guest I/O; shutdown through the API
/// (graceful and forced) ends the VM with status 0.
#[test]
fn control_api_pauses_resumes_and_shuts_down_and_no_exit_rides_the_data_path() {
    if !ready("vmm_control_api", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.image("vm.img", "256M");
    let b = fx.serve(&image, 1);
    let sock = Fixture::socket_of(&image);
    let api_sock = fx.path("api.sock");
    let metrics = fx.path("metrics.json");
    // Sequential 4 KiB writes over 64 MiB, wrapping around: every block is
    // written (verify needs that). The run must last through the
    // measurement window and the pause on any machine, so a first pass
    // over the 64 MiB measures this machine's rate and the main run is
    // sized from it to about 4 s.
    let pass = vm(
        1,
        &sock,
        1,
        "mode=write verify=1 gen=5 bs=4k qd=16 size=64M",
    )
    .run()
    .expect("vmm runs");
    pass.assert_ok("the first pass");
    let rate = pass.field("iops").max(1);
    let ios = (rate * 4).max(2 * 16384);
    let start = |cmdline: &str, seconds: u64| {
        let mut v = vm(1, &sock, 1, cmdline);
        v.api_socket = Some(api_sock.clone());
        v.metrics_file = Some(metrics.clone());
        v.silence = Patience::new(
            "a workload that prints nothing until its end",
            Duration::from_secs(seconds),
        );
        let mut running = v.spawn().expect("vmm starts");
        running
            .wait_for_line("device:", &workload_started())
            .expect("the workload starts");
        running
    };
    let mut vm_run = start(
        &format!("mode=write verify=1 gen=5 bs=4k qd=16 size=64M ios={ios} progress_ms=0"),
        ios / rate,
    );
    // Userspace exits over half a second of the workload (the guest prints
    // nothing meanwhile): the data path must not exit at all.
    let exits_now = || {
        let (ok, body) = api(&api_sock, &["metrics"]);
        assert!(ok, "{body}");
        let m: serde_json::Value = serde_json::from_str(&body).expect("json");
        m["vcpus"][0]["exits"]["total"].as_u64().expect("total")
    };
    let (e1, t1) = (exits_now(), std::time::Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let (e2, window) = (exits_now(), t1.elapsed());
    assert!(
        vm_run.running(),
        "the workload ended inside the measurement window: give it more ios"
    );
    let (ok, body) = api(&api_sock, &["pause"]);
    assert!(ok && body.contains("paused"), "{body}");
    let (_, info) = api(&api_sock, &["info"]);
    assert!(info.contains("\"state\":\"paused\""), "{info}");
    // Paused for a while: the guest's clock runs on, its requests wait.
    std::thread::sleep(Duration::from_millis(700));
    let (ok, body) = api(&api_sock, &["resume"]);
    assert!(ok && body.contains("running"), "{body}");
    let (ok, _) = api(&api_sock, &["resume"]);
    assert!(!ok, "resuming a running VM is refused");
    let run = vm_run.wait().expect("vmm ends");
    run.assert_ok("the write across pause and resume");
    let iops = run
        .result
        .as_ref()
        .and_then(|r| r["iops"].as_f64())
        .expect("iops");
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
        m["vcpus"][0]["exits"]["total"],
        run.field("ios")
    );
    // The console's bytes do not exit one by one (KVM coalesces them; the
    // output is whole and in order, as the result line parsed above shows).
    let port_writes = m["vcpus"][0]["exits"]["io_out"].as_u64().expect("io_out");
    assert!(
        port_writes < 16 && run.serial.len() > 500,
        "{port_writes} port-write exits for {} console bytes",
        run.serial.len()
    );
    // Finding the disk reads PCI configuration space from memory: the bus
    // scan, capability lists and BARs are about 60 reads, which used to be
    // as many exits; what still exits is the virtio registers' reads.
    let mmio_reads = m["vcpus"][0]["exits"]["mmio_read"]
        .as_u64()
        .expect("mmio_read");
    assert!(
        mmio_reads < 30,
        "{mmio_reads} MMIO-read exits: configuration reads exit again"
    );
    // The virtio devices' set-up writes (selectors, ring addresses) wait
    // in KVM's coalesced ring: what exits is the status byte's writes and
    // PCI configuration writes, about 12 for the disk and the console
    // (46 when every register write exited).
    let mmio_writes = m["vcpus"][0]["exits"]["mmio_write"]
        .as_u64()
        .expect("mmio_write");
    assert!(
        mmio_writes < 25,
        "{mmio_writes} MMIO-write exits: set-up writes exit again"
    );
    // KVM's own counters of the vCPU (this kernel has binary statistics):
    // every exit, including the ioeventfd kicks and faults the kernel
    // handled, so at least the ones this process saw.
    let kvm = &m["vcpus"][0]["kvm"];
    let kvm_exits = kvm["exits"].as_u64().unwrap_or(0);
    let seen = m["vcpus"][0]["exits"]["total"].as_u64().unwrap_or(0);
    assert!(
        kvm_exits >= seen && kvm["pf_fixed"].as_u64().unwrap_or(0) > 0,
        "KVM's counters {kvm} against {seen} exits seen"
    );
    // The data survived the pause.
    let r = vm(
        1,
        &sock,
        1,
        "mode=read verify=1 expect_gen=5 bs=4k qd=16 size=64M",
    )
    .run()
    .expect("vmm runs");
    r.assert_ok("read back after pause/resume");

    // Shutdown, graceful then forced, while a long workload runs.
    for force in [false, true] {
        let running = start(
            "mode=randread bs=4k qd=16 duration_ms=600000 progress_ms=0",
            1,
        );
        // A client of vm.wait, connected (and so accepted) before the
        // shutdown request.
        let mut waiter = std::os::unix::net::UnixStream::connect(&api_sock).expect("connect");
        waiter
            .write_all(b"GET /api/v1/vm.wait HTTP/1.1\r\nHost: vmm\r\n\r\n")
            .expect("vm.wait");
        let mut args = vec!["shutdown"];
        if force {
            args.push("--force");
        }
        let (ok, body) = api(&api_sock, &args);
        assert!(ok, "{body}");
        let r = running.wait().expect("vmm ends");
        assert_eq!(r.guest_status, Some(0), "shutdown (force {force})");
        // The waiter heard how the VM ended, and how much console there is.
        let mut answer = String::new();
        waiter.read_to_string(&mut answer).expect("vm.wait answer");
        let end: serde_json::Value =
            serde_json::from_str(answer.split_once("\r\n\r\n").expect("a body").1).expect("json");
        assert_eq!(end["exit_status"], 0, "{answer}");
        assert!(
            end["ended"]
                .as_str()
                .is_some_and(|e| e.contains("shut down")),
            "{answer}"
        );
        assert_eq!(
            end["console_bytes"].as_u64(),
            Some(r.serial.len() as u64),
            "{answer}"
        );
    }
    b.stop();
}

/// kill -9 blk-backend while the guest writes (verifying, two queues,
/// MSI-X) under the vmm; start it again: the vmm reconnects, replays the
/// session with the same inflight region, and the guest sees no error.
#[test]
fn kill_9_and_restart_the_backend_under_the_vmm_loses_nothing() {
    if !ready("vmm_kill_9_restart", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.base_and_clone("1G");
    let sock = Fixture::socket_of(&image);
    let mut b = fx.serve(&image, 2);
    let mut guest = vm(
        1,
        &sock,
        2,
        "mode=write verify=1 gen=9 bs=16k qd=32 queues=2 irq=1 ios=196608 progress_ms=100 timeout_ms=20000",
    )
    .spawn()
    .expect("vmm starts");
    // Progress lines come 100 ms apart.
    let next_lines = Patience::new("two more progress lines", Duration::from_millis(200));
    for k in 0..3u64 {
        guest
            .wait_for_progress(2 + 2 * k, &next_lines)
            .expect("the workload goes on");
        assert!(guest.running(), "the workload ended before kill {k}");
        b.kill();
        std::thread::sleep(Duration::from_millis(100));
        b = fx.serve(&image, 2);
    }
    let w = guest.wait().expect("vmm runs");
    w.assert_ok("writes across 3 backend kills");
    assert_eq!(w.field("errors"), 0);
    // Three passes over the disk: long enough to kill the backend in.
    assert_eq!(w.field("writes"), 3 * (1 << 30) / 16384);
    let r = vm(
        1,
        &sock,
        2,
        "mode=read verify=1 expect_gen=9 bs=64k qd=16 queues=2",
    )
    .run()
    .expect("vmm runs");
    r.assert_ok("read back");
    b.stop();
}

/// A random-write guest on a blk-backend disk with `reconnect_timeout_ms`,
/// running, its backend just killed: the start of every lost-backend test.
/// Returns the guest and the image (its socket beside it).
fn guest_that_lost_its_backend(fx: &Fixture, reconnect_timeout_ms: u64) -> (RunningVm, PathBuf) {
    let image = fx.image("vm.img", "256M");
    let b = fx.serve(&image, 1);
    let mut v = VmmVm::new(
        &bin("vmm"),
        "mode=randwrite bs=4k qd=16 duration_ms=4000 progress_ms=100 timeout_ms=20000",
    );
    v.disks.push(VmmDisk {
        reconnect_timeout_ms: Some(reconnect_timeout_ms),
        ..VmmDisk::new(&Fixture::socket_of(&image), 1)
    });
    let mut guest = v.spawn().expect("vmm starts");
    guest
        .wait_for_progress(
            1,
            &Patience::new("the first progress line", Duration::from_millis(200)),
        )
        .expect("the workload runs");
    b.kill();
    (guest, image)
}

/// A backend that dies and never comes back: after the disk's reconnect
/// timeout the vmm fails the guest's requests with IOERR (those the dead
/// backend had in flight, then every new one), so the guest reports I/O
/// errors and ends instead of waiting forever.
#[test]
fn a_backend_that_never_comes_back_gives_the_guest_io_errors() {
    if !ready("vmm_backend_gone", &[]) {
        return;
    }
    let fx = Fixture::new();
    let (mut guest, image) = guest_that_lost_its_backend(&fx, 1000);
    // Something that accepts and hangs up at once stands where the
    // backend was: the vmm's attempts are counted, and must come at most
    // about ten a second (backing off), not fifty.
    let sock = Fixture::socket_of(&image);
    std::fs::remove_file(&sock).expect("the dead socket");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let t0 = std::time::Instant::now();
    let mut attempts = 0u32;
    while guest.running() {
        match listener.accept() {
            Ok(_) => attempts += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let window = t0.elapsed().as_secs_f64();
    let r: GuestRun = guest.wait().expect("the vmm ends by itself");
    eprintln!("{attempts} reconnect attempts while the guest ran on for {window:.1} s");
    assert!(attempts >= 1, "the vmm tried to reconnect");
    // Within the 1 s reconnect timeout: at most 15 attempts (after 10 ms,
    // 20, 40, 80, then every 100 ms), however long the guest runs on.
    assert!(attempts <= 15, "{attempts} attempts: no back-off");
    let result = r.result.as_ref().expect("the guest reported");
    assert_eq!(result["result"], "fail", "{}", r.serial);
    assert!(r.field("ioerr") > 0, "{}", r.serial);
    assert_eq!(result["timed_out"], false, "{}", r.serial);
    assert_ne!(r.guest_status, Some(0));
}

/// A backend that comes back with other features (read-only now) cannot
/// carry the session on: the vmm says so at once and fails the guest's
/// requests, instead of retrying until a reconnect timeout (ten minutes
/// here, far past the guest's own 20 s request timeout, which would show
/// as `timed_out`).
#[test]
fn a_backend_that_comes_back_with_other_features_is_given_up_at_once() {
    if !ready("vmm_backend_other_features", &[]) {
        return;
    }
    let fx = Fixture::new();
    let (guest, image) = guest_that_lost_its_backend(&fx, 600_000);
    let b = fx.serve_readonly(&image, 1);
    let r = guest.wait().expect("the vmm ends by itself");
    let result = r.result.as_ref().expect("the guest reported");
    assert!(r.field("ioerr") > 0, "{}", r.serial);
    assert_eq!(result["timed_out"], false, "{}\n{}", r.serial, r.stderr);
    assert!(
        r.stderr.contains("came back with other features"),
        "{}",
        r.stderr
    );
    b.stop();
}

/// A kernel that faults at its first instruction: the vmm reports the
/// fault with the vCPU's registers and a non-zero status, and exits.
#[test]
fn a_faulting_guest_is_reported_with_its_registers() {
    if !ready("vmm_guest_fault", &[]) {
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
    let fx = Fixture::new();
    let kernel = fx.path("fault.elf");
    std::fs::write(&kernel, &e).expect("write");
    let (code, err) = vmm_fails(&["--kernel", &s(&kernel), "--memory", "64M"]);
    assert_ne!(code, 0);
    assert!(err.contains("guest fault"), "{err}");
    assert!(err.contains("rip="), "registers are printed: {err}");
}

/// A backend that stops answering (SIGSTOP: alive, its socket open, the
/// kernel still accepting connections for it) costs the vmm a deadline,
/// never a hang: at start the vmm fails with a clear error; under a
/// running guest the control API still answers and a graceful shutdown,
/// which asks the backend to stop its queues, ends the VM.
#[test]
fn a_backend_that_stops_answering_costs_a_deadline_not_a_hang() {
    if !ready("vmm_silent_backend", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.image("vm.img", "64M");
    let b = fx.serve(&image, 1);
    let sock = Fixture::socket_of(&image);
    let freeze = |on: bool| b.freeze(on);
    let with_deadline = |cmdline: &str| {
        let mut v = VmmVm::new(&bin("vmm"), cmdline);
        v.disks.push(VmmDisk {
            reply_timeout_ms: Some(2000),
            reconnect_timeout_ms: Some(600_000),
            ..VmmDisk::new(&sock, 1)
        });
        v
    };

    // At start: the handshake's first reply never comes.
    freeze(true);
    let failed = with_deadline("mode=boot").run();
    freeze(false);
    let why = match failed {
        Ok(r) => panic!("the vmm ran on a silent backend:\n{}", r.stderr),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        why.contains("GET_FEATURES: no reply within 2000 ms"),
        "the error names the request and the deadline:\n{why}"
    );

    // Under a running guest: the API answers, and a graceful shutdown
    // (GET_VRING_BASE to a backend that cannot reply) ends the VM.
    let api_sock = fx.path("api.sock");
    let mut v = with_deadline("mode=randread bs=4k qd=4 duration_ms=600000 progress_ms=200");
    v.api_socket = Some(api_sock.clone());
    let mut running = v.spawn().expect("the vmm starts");
    running
        .wait_for_progress(
            1,
            &Patience::new("the first progress line", Duration::from_millis(200)),
        )
        .expect("the workload runs");
    freeze(true);
    let (ok, info) = api(&api_sock, &["info"]);
    assert!(ok && info.contains("running"), "{info}");
    let (ok, body) = api(&api_sock, &["shutdown"]);
    assert!(ok, "{body}");
    let r = running.wait().expect("the VM ends");
    freeze(false);
    assert!(
        r.stderr.contains("no reply within 2000 ms"),
        "the stop named the deadline:\n{}",
        r.stderr
    );
    b.stop();
}

/// The guest's report through the vmm's virtio console: the UART carries
/// only the start marker (written before the PCI scan), the virtio console
/// the rest, in order and whole; with the device off, or the guest told to
/// keep to the UART, all of it goes through the UART.
#[test]
fn the_virtio_console_carries_the_report_and_the_uart_only_the_marker() {
    if !ready("vmm_virtio_console", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.base_and_clone("64M");
    let _b = fx.serve(&image, 1);
    let sock = Fixture::socket_of(&image);
    let metrics = fx.path("metrics.json");
    for (device, extra, through_virtio) in [
        ("on", "", true),
        ("off", "", false),
        ("on", " console=serial", false),
    ] {
        let what = format!("--virtio-console {device}{extra}");
        let mut v = vm(
            1,
            &sock,
            1,
            &format!("mode=write verify=1 gen=2 size=4M{extra}"),
        );
        v.options = vec!["--virtio-console".into(), device.into()];
        v.metrics_file = Some(metrics.clone());
        let run = v.run().expect("vmm runs");
        run.assert_ok(&what);
        let lines: Vec<&str> = run.serial.lines().collect();
        assert_eq!(
            lines.first(),
            Some(&"BENCH-GUEST START"),
            "{what}: {}",
            run.serial
        );
        assert!(
            lines[1].starts_with("{\"boot_info\""),
            "{what}: {}",
            run.serial
        );
        assert!(lines[2].starts_with("device: "), "{what}: {}", run.serial);
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&metrics).expect("metrics"))
                .expect("json");
        let (uart, virtio) = (
            m["console"]["uart_bytes"].as_u64().expect("uart_bytes"),
            m["console"]["virtio_bytes"].as_u64().expect("virtio_bytes"),
        );
        assert_eq!(uart + virtio, run.serial.len() as u64, "{what}");
        if through_virtio {
            assert_eq!(uart, "BENCH-GUEST START\n".len() as u64, "{what}");
        } else {
            assert_eq!(virtio, 0, "{what}");
        }
    }
}
