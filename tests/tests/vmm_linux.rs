//! Linux under the vmm. Here (PVM, no hardware virtualization) a stock
//! kernel cannot reach userspace (../shared/KVM-ON-THIS-MACHINE.md), so the
//! test that always runs proves what these machines allow: Linux booted
//! through its PVH entry prints its banner and echoes the memory map and
//! the command line the vmm gave it. The full test (userspace, fio with
//! verify on a blk-backend disk, poweroff) runs where hardware KVM exists.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench::guest::{kvm_available, BlkBackendProcess};
use common::{bin, img, s};

/// The Linux guest (kernel from Debian's cloud package, initramfs with
/// busybox and fio), built once.
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

fn hardware_kvm() -> bool {
    Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists()
}

/// Runs the vmm until every `wanted` text has appeared on the console (or
/// `limit` passes); returns the console output and which were seen.
fn boot_until(
    args: &[String],
    wanted: &[&str],
    limit: Duration,
) -> (String, Vec<bool>, Option<i32>) {
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
    while t0.elapsed() < limit && !seen.iter().all(|&x| x) {
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
    if status.is_none() {
        let _ = child.kill();
    }
    // Always reaped, whichever way the loop ended.
    if let Ok(s) = child.wait() {
        status = status.or(s.code());
    }
    (console, seen, status)
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
    let (console, seen, _) = boot_until(&args, &wanted, Duration::from_secs(180));
    for (w, s) in wanted.iter().zip(&seen) {
        assert!(*s, "the console never showed {w:?}:\n{console}");
    }
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
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let d = |n: &str| dir.path().join(n);
    img(&["create", &s(&d("base.img")), "1G"]);
    img(&["clone", &s(&d("base.img")), &s(&d("vm.img"))]);
    let sock = d("vm.sock");
    let b = BlkBackendProcess::start(&bin("blk-backend"), &d("vm.img"), &sock, 2, false)
        .expect("backend");
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
    let (console, seen, status) = boot_until(
        &args,
        &["LINUX-GUEST USERSPACE", "LINUX-GUEST FIO OK"],
        Duration::from_secs(300),
    );
    assert!(seen[0], "no userspace:\n{console}");
    assert!(seen[1], "fio with verify did not pass:\n{console}");
    // The guest's poweroff (ACPI S5) ends the vmm with status 0.
    assert_eq!(status, Some(0), "{console}");
    b.stop();
}

/// The distribution's bzImage through the 64-bit boot protocol: its
/// decompressor runs, then the kernel prints its banner and the memory
/// map the vmm put in the zero page.
#[test]
fn a_bzimage_starts_through_the_64_bit_boot_protocol() {
    if !kvm_available("vmm_linux_bzimage") {
        return;
    }
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
    let (console, seen, _) = boot_until(&args, &wanted, Duration::from_secs(120));
    assert!(
        seen.iter().all(|&x| x),
        "the console never showed {wanted:?}:\n{console}"
    );
}
