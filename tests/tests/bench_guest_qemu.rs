//! The bench guest under QEMU with KVM, against QEMU's own virtio-blk-pci and
//! against qemu-storage-daemon's vhost-user-blk export: two virtio-blk
//! implementations nobody here wrote. Each test prints a loud SKIPPED line
//! where /dev/kvm or QEMU is missing.

use std::path::Path;
use std::time::Duration;

use test_infra::{Disk, Fixture, GuestRun, Machine, Patience, QemuConsole, QemuVm, StorageDaemon};

const GIB: u64 = 1 << 30;

fn ready(test: &str) -> bool {
    test_infra::ready(test, &["qemu-system-x86_64"])
}

fn builtin(path: &Path, queues: u16, readonly: bool) -> Disk {
    Disk::builtin(path, queues, readonly)
}

fn run(disk: Disk, cmdline: &str) -> GuestRun {
    QemuVm::new(disk, cmdline).run().expect("guest runs")
}

fn assert_ok(r: &GuestRun, what: &str) {
    r.assert_ok(what);
}

/// Write with verify, then read with verify, over the whole 1 GiB disk.
fn write_then_read(disk: impl Fn() -> Disk, queues: u16, irq: bool) {
    let base = format!("bs=64k qd=16 queues={queues} irq={}", irq as u8);
    let w = run(disk(), &format!("mode=write verify=1 gen=7 {base}"));
    assert_ok(&w, "write pass");
    assert_eq!(w.field("writes"), GIB / 65536);
    assert_eq!(w.field("queues"), queues as u64);
    if irq {
        assert!(w.field("irqs") > 0, "completions came by interrupt");
    }
    let r = run(disk(), &format!("mode=read verify=1 expect_gen=7 {base}"));
    assert_ok(&r, "read pass");
    assert_eq!(r.field("reads"), GIB / 65536);
    assert_eq!(r.field("verify_failures"), 0);
}

#[test]
fn builtin_virtio_blk_write_then_read_verify_1_and_2_queues_poll_and_irq() {
    if !ready("builtin_virtio_blk_write_then_read_verify") {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", GIB);
    for (queues, irq) in [(1, false), (2, false), (1, true), (2, true)] {
        write_then_read(|| builtin(&img, 2, false), queues, irq);
    }
}

#[test]
fn qemu_storage_daemon_vhost_user_write_then_read_verify() {
    if !test_infra::ready(
        "qemu_storage_daemon_vhost_user",
        &["qemu-system-x86_64", "qemu-storage-daemon"],
    ) {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", GIB);
    let sock = fx.path("vhost.sock");
    for (queues, irq) in [(1, false), (2, true), (2, false), (1, true)] {
        // A fresh daemon per boot, as a real deployment restarts with its VM.
        let daemon = StorageDaemon::start(&img, &sock, 2, true).expect("daemon");
        let socket = daemon.socket.clone();
        write_then_read(|| Disk::vhost_user(&socket, 2), queues, irq);
        drop(daemon);
    }
}

#[test]
fn corruption_between_write_and_read_is_found_and_located() {
    if !ready("corruption_between_write_and_read") {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", 64 << 20);
    let w = run(builtin(&img, 1, false), "mode=write verify=1 bs=64k qd=8");
    assert_ok(&w, "write");
    // Flip bytes inside sector 20483 (byte offset 0xa00600).
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    f.write_all_at(b"corrupt!", 0xa0_0600 + 100)
        .expect("corrupt");
    drop(f);
    let r = run(builtin(&img, 1, false), "mode=read verify=1 bs=64k qd=8");
    assert!(!r.ok(), "verify must fail:\n{}", r.serial);
    assert_eq!(r.guest_status, Some(1));
    assert_eq!(r.field("verify_failures"), 1);
    assert!(
        r.serial
            .contains("VERIFY FAILED: sector 20483 (byte offset 0xa00600)"),
        "{}",
        r.serial
    );
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    if !ready("discard_and_write_zeroes") {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", 64 << 20);
    for check in ["discard", "zeroes"] {
        let r = run(
            builtin(&img, 1, false),
            &format!("check={check} offset=1M size=8M bs=64k qd=4"),
        );
        assert_ok(&r, check);
        assert!(r.serial.contains("reads back zeros"), "{}", r.serial);
        assert!(r.field("discards") + r.field("write_zeroes") > 0);
    }
}

#[test]
fn read_only_disk_fails_writes_with_ioerr() {
    if !ready("read_only_disk") {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", 64 << 20);
    let r = run(builtin(&img, 1, true), "mode=write bs=4k ios=16");
    assert_eq!(r.guest_status, Some(1), "{}", r.serial);
    assert_eq!(r.field("ioerr"), 16, "{}", r.serial);
    assert!(r.serial.contains("failed: IOERR"), "{}", r.serial);
    // Reads still work on it.
    let r = run(builtin(&img, 1, true), "mode=read bs=4k size=1M");
    assert_ok(&r, "read of a read-only disk");
}

#[test]
fn q35_with_port_config_access_boots_and_runs() {
    if !ready("q35_boot") {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", 64 << 20);
    let vm = QemuVm {
        machine: Machine::Q35,
        ..QemuVm::new(
            builtin(&img, 1, false),
            "mode=randwrite bs=4k qd=4 ios=2000 verify=1 flush_every=100",
        )
    };
    let r = vm.run().expect("runs");
    assert_ok(&r, "q35");
    assert!(r.field("flushes") >= 19, "{}", r.serial);
}

#[test]
fn bad_arguments_and_missing_devices_fail_clearly() {
    if !ready("bad_arguments") {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", 64 << 20);
    let r = run(builtin(&img, 1, false), "mode=sideways");
    assert_eq!(r.guest_status, Some(2));
    assert!(
        r.serial.contains("bad argument \"mode=sideways\""),
        "{}",
        r.serial
    );
    // Its report is JSON a script reads, the quotes escaped.
    let report = r
        .result
        .as_ref()
        .unwrap_or_else(|| panic!("a JSON report: {}", r.serial));
    assert_eq!(
        report["error"], "bad argument \"mode=sideways\"",
        "{report}"
    );
    let r = run(builtin(&img, 1, false), "disk=3");
    assert_eq!(r.guest_status, Some(3));
    assert!(
        r.serial.contains("virtio-blk device not found (1 present"),
        "{}",
        r.serial
    );
    let r = run(builtin(&img, 1, false), "offset=1G");
    assert_eq!(r.guest_status, Some(2));
}

#[test]
fn a_backend_that_stops_answering_fails_the_run_instead_of_hanging() {
    if !test_infra::ready(
        "backend_stops_answering",
        &["qemu-system-x86_64", "qemu-storage-daemon"],
    ) {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", 64 << 20);
    let sock = fx.path("vhost.sock");
    let daemon = StorageDaemon::start(&img, &sock, 1, true).expect("daemon");
    // A long run: the guest ends only through its own request timeout.
    let vm = QemuVm {
        mem_mib: 256,
        ..QemuVm::new(
            Disk::vhost_user(&sock, 1),
            "mode=randread bs=4k qd=8 duration_ms=600000 timeout_ms=2000 progress_ms=100",
        )
    };
    let mut guest = vm.spawn().expect("guest starts");
    guest
        .wait_for_progress(
            1,
            &Patience::new("the first progress line", Duration::from_millis(300)),
        )
        .expect("the workload runs");
    drop(daemon); // SIGKILL: the backend vanishes mid-run
                  // The harness would kill a guest that hangs (its console goes quiet);
                  // this one ends by itself, saying why.
    let r = guest.wait().expect("guest exits by itself");
    assert_eq!(r.guest_status, Some(4), "{}", r.serial);
    assert!(
        r.serial.contains("device stopped answering"),
        "{}",
        r.serial
    );
}

/// The guest's virtio console driver against QEMU's virtio-serial (a
/// device nobody here wrote): with the UART in a file of its own, only the
/// start marker (written before the PCI scan) goes there, and the whole
/// report, the last line included, comes through the virtio console
/// before QEMU ends the VM at the guest's exit.
#[test]
fn the_guest_reports_through_qemus_virtio_console() {
    if !ready("the_guest_reports_through_qemus_virtio_console") {
        return;
    }
    let fx = Fixture::new();
    let img = fx.raw("d.raw", 64 << 20);
    let uart = fx.path("uart.txt");
    let cmdline = "mode=write verify=1 gen=3 size=4M";
    let r = QemuVm {
        console: QemuConsole::VirtioWithUartTo(uart.clone()),
        ..QemuVm::new(builtin(&img, 1, false), cmdline)
    }
    .run()
    .expect("guest runs");
    assert_ok(&r, "a write reported through the virtio console");
    assert!(r.boot_info.is_some(), "{}", r.serial);
    assert!(r.serial.contains("device: "), "{}", r.serial);
    assert!(!r.serial.contains("BENCH-GUEST START"), "{}", r.serial);
    assert_eq!(
        std::fs::read_to_string(&uart).expect("the UART's file"),
        "BENCH-GUEST START\n"
    );
    // Both on one output, and the guest told to keep to the UART: the
    // same report either way.
    for (console, cmdline) in [
        (QemuConsole::UartAndVirtio, cmdline.to_string()),
        (
            QemuConsole::UartAndVirtio,
            format!("{cmdline} console=serial"),
        ),
    ] {
        let r = QemuVm {
            console,
            ..QemuVm::new(builtin(&img, 1, false), &cmdline)
        }
        .run()
        .expect("guest runs");
        assert_ok(&r, &cmdline);
        let lines: Vec<&str> = r.serial.lines().collect();
        assert_eq!(lines.first(), Some(&"BENCH-GUEST START"), "{}", r.serial);
        assert!(lines[1].starts_with("{\"boot_info\""), "{}", r.serial);
        assert!(lines[2].starts_with("device: "), "{}", r.serial);
    }
}
