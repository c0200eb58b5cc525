//! Linux under the vmm. Here (PVM, no hardware virtualization) a stock
//! kernel cannot reach userspace (../shared/KVM-ON-THIS-MACHINE.md), so the
//! test that always runs proves what these machines allow: Linux booted
//! through its PVH entry prints its banner and echoes the memory map and
//! the command line the vmm gave it. The full test (userspace, fio with
//! verify on a blk-backend disk, poweroff) runs where hardware KVM exists.
//! The 64-bit boot protocol is proven in every run by the bench guest's
//! bzImage (vmm_boot.rs); Debian's bzImage here needs minutes of its
//! decompressor under emulation, so its test runs where hardware KVM
//! exists, or here when asked for (`E2E_SLOW=1`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use test_infra::{bin, hardware_kvm, kvm_available, s, Fixture, Patience};

/// The Linux guest (kernel from Debian's cloud package, initramfs with
/// busybox and fio), built once (.ci/setup builds it beforehand).
fn linux_guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root");
    let out = Command::new("bash")
        .arg(root.join("guest-artifacts/linux/build.sh"))
        .output()
        .expect("running the Linux guest builder");
    assert!(
        out.status.success(),
        "building the Linux guest failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a path")
            .trim(),
    )
}

/// Whether the slow tests were asked for (`E2E_SLOW=1`).
fn slow_tests() -> bool {
    std::env::var("E2E_SLOW").is_ok_and(|v| v == "1")
}

/// Runs the vmm until every `wanted` text has appeared on the console (or
/// `patience` runs out, or the vmm ends); returns the console output,
/// which were seen, the exit status and how long it took.
fn boot_until(
    args: &[String],
    wanted: &[&str],
    patience: &Patience,
) -> (String, Vec<bool>, Option<i32>, Duration) {
    let mut child = Command::new(bin("vmm"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let mut console = String::new();
    let mut seen = vec![false; wanted.len()];
    let mut status = None;
    while !patience.expired(t0) && !seen.iter().all(|&x| x) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                for (i, w) in wanted.iter().enumerate() {
                    seen[i] |= line.contains(w);
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(s)) = child.try_wait() {
                    status = s.code();
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let took = t0.elapsed();
    if status.is_none() {
        let _ = child.kill();
    }
    // Always reaped, whichever way the loop ended.
    if let Ok(s) = child.wait() {
        status = status.or(s.code());
    }
    if !seen.iter().all(|&x| x) && patience.expired(t0) {
        console.push_str(&format!("\n[{}]\n", patience.explain(took)));
    }
    (console, seen, status, took)
}

#[test]
fn linux_through_pvh_prints_its_banner_and_echoes_the_memory_map_and_command_line() {
    if !kvm_available("vmm_linux_pvh_banner") {
        return;
    }
    let guest = linux_guest();
    let token = "vmm-test-token=7f3a91";
    let args: Vec<String> = vec![
        "--kernel".into(),
        s(&guest.join("vmlinux")),
        "--memory".into(),
        "512M".into(),
        "--cmdline".into(),
        format!("console=ttyS0 earlyprintk=serial,ttyS0 {token}"),
    ];
    let wanted = [
        "Linux version",
        token,
        // The map the vmm wrote into hvm_start_info, as Linux read it.
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved",
    ];
    // About 15 s to the banner here (CPL0 emulated), seconds elsewhere.
    let patience = Patience::new(
        "Linux's banner and memory map through PVH",
        Duration::from_secs(15),
    );
    let (console, seen, _, took) = boot_until(&args, &wanted, &patience);
    for (w, s) in wanted.iter().zip(&seen) {
        assert!(*s, "the console never showed {w:?}:\n{console}");
    }
    eprintln!(
        "Linux through PVH: banner and memory map in {:.1} s",
        took.as_secs_f64()
    );
    eprintln!(
        "{}",
        console
            .lines()
            .filter(|l| wanted.iter().any(|w| l.contains(w)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn linux_boots_to_userspace_and_runs_fio_with_verify_on_a_blk_backend_disk() {
    if !kvm_available("vmm_linux_fio") {
        return;
    }
    if !hardware_kvm() {
        eprintln!(
            "SKIPPED: vmm_linux_fio: /dev/kvm here is not hardware virtualization \
             (no kvm_intel or kvm_amd): a stock Linux cannot reach userspace; \
             this test runs on hosts that have it"
        );
        return;
    }
    let guest = linux_guest();
    let fx = Fixture::new();
    let image = fx.base_and_clone("1G");
    let sock = Fixture::socket_of(&image);
    let b = fx.serve(&image, 2);
    let args: Vec<String> = vec![
        "--kernel".into(),
        s(&guest.join("vmlinux")),
        "--initrd".into(),
        s(&guest.join("initramfs.cpio")),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "1G".into(),
        "--disk".into(),
        format!("socket={},num_queues=2", s(&sock)),
        "--cmdline".into(),
        "console=ttyS0 fio=1 panic=-1".into(),
    ];
    // Not measured here (no hardware KVM): a Linux boot with fio over
    // 1 GiB takes well under a minute on hardware virtualization.
    let patience = Patience::new(
        "Linux userspace and fio with verify over 1 GiB",
        Duration::from_secs(30),
    );
    let (console, seen, status, _) = boot_until(
        &args,
        &["LINUX-GUEST USERSPACE", "LINUX-GUEST FIO OK"],
        &patience,
    );
    assert!(seen[0], "no userspace:\n{console}");
    assert!(seen[1], "fio with verify did not pass:\n{console}");
    // The guest's poweroff (ACPI S5) ends the vmm with status 0.
    assert_eq!(status, Some(0), "{console}");
    b.stop();
}

/// virtio-fs from a real kernel: Linux mounts a virtiofsd share by its
/// tag, reads a file the test wrote, writes one the test reads back.
#[test]
fn linux_mounts_a_virtiofs_share_and_writes_through_it() {
    if !kvm_available("vmm_linux_virtiofs") {
        return;
    }
    if !hardware_kvm() {
        eprintln!(
            "SKIPPED: vmm_linux_virtiofs: /dev/kvm here is not hardware virtualization \
             (no kvm_intel or kvm_amd): a stock Linux cannot reach userspace; \
             the bench guest's FUSE over virtio-fs runs here (virtio_fs.rs)"
        );
        return;
    }
    if !test_infra::have("virtiofsd", "vmm_linux_virtiofs") {
        return;
    }
    let guest = linux_guest();
    let fx = Fixture::new();
    let shared = fx.path("shared");
    std::fs::create_dir(&shared).expect("dir");
    std::fs::write(shared.join("from-host.txt"), "written by the host\n").expect("w");
    let sock = fx.path("fs.sock");
    let _daemon = test_infra::spawn_serving(
        Command::new("virtiofsd")
            .arg("--socket-path")
            .arg(&sock)
            .arg("--shared-dir")
            .arg(&shared),
        &sock,
        "virtiofsd",
        Duration::from_millis(100),
    );
    let args: Vec<String> = vec![
        "--kernel".into(),
        s(&guest.join("vmlinux")),
        "--initrd".into(),
        s(&guest.join("initramfs.cpio")),
        "--memory".into(),
        "512M".into(),
        "--fs".into(),
        format!("socket={},tag=hostshare", s(&sock)),
        "--cmdline".into(),
        "console=ttyS0 virtiofs=hostshare panic=-1".into(),
    ];
    // Not measured here (no hardware KVM): a Linux boot to its initramfs
    // takes a few seconds on hardware virtualization.
    let patience = Patience::new("Linux and a virtiofs mount", Duration::from_secs(20));
    let (console, seen, status, _) = boot_until(
        &args,
        &[
            "LINUX-GUEST VIRTIOFS READ written by the host",
            "LINUX-GUEST VIRTIOFS OK",
        ],
        &patience,
    );
    assert!(
        seen[0],
        "the guest did not read the host's file:\n{console}"
    );
    assert!(seen[1], "the guest's write and unmount:\n{console}");
    assert_eq!(
        std::fs::read_to_string(shared.join("from-guest.txt")).expect("the guest's file"),
        "written by the guest\n"
    );
    assert_eq!(status, Some(0), "{console}");
}

/// The distribution's bzImage through the 64-bit boot protocol: its
/// decompressor runs, then the kernel prints its banner and the memory
/// map the vmm put in the zero page. Under PVM the decompressor runs at an
/// emulated CPL0: about 150 s to the banner (measured 2026-11-27), so here
/// it runs only when asked for; the protocol itself is proven in every run
/// by the bench guest's bzImage (vmm_boot.rs).
#[test]
fn a_debian_bzimage_starts_through_the_64_bit_boot_protocol() {
    if !kvm_available("vmm_linux_bzimage") {
        return;
    }
    let measured = if hardware_kvm() {
        // Not measured on hardware KVM: decompressing takes about a second there.
        Duration::from_secs(5)
    } else if slow_tests() {
        Duration::from_secs(150)
    } else {
        println!(
            "SKIPPED: vmm_linux_bzimage: /dev/kvm here is PVM, where Debian's bzImage \
             takes minutes to decompress (about 150 s measured); E2E_SLOW=1 runs it. \
             The 64-bit boot protocol is covered by vmm_boot's bench-guest bzImage."
        );
        return;
    };
    let guest = linux_guest();
    let args: Vec<String> = vec![
        "--kernel".into(),
        s(&guest.join("bzImage")),
        "--memory".into(),
        "512M".into(),
        "--cmdline".into(),
        "console=ttyS0 earlyprintk=serial,ttyS0 vmm-bzimage-token=19c2".into(),
    ];
    let wanted = vec![
        "Linux version",
        "vmm-bzimage-token=19c2",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved",
    ];
    let patience =
        Patience::with_margin("Debian's bzImage to its banner and memory map", measured, 4);
    let (console, seen, _, took) = boot_until(&args, &wanted, &patience);
    assert!(
        seen.iter().all(|&x| x),
        "the console never showed {wanted:?}:\n{console}"
    );
    eprintln!(
        "Debian bzImage: banner and memory map in {:.1} s",
        took.as_secs_f64()
    );
}
