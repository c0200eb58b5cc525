//! Least privilege in practice: every thread of both processes runs under
//! its seccomp filter while a guest works (and the e2e suite as a whole
//! runs with the filters on), and blk-backend serves as an unprivileged
//! user once its sockets and images are open.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use test_infra::{bin, ready, BlkBackendProcess, Fixture, Patience, VmmVm};

/// (thread name, Seccomp mode) of every thread of process `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), mode));
    }
    out
}

fn uid_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:").map(|u| u.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn both_processes_run_confined_and_the_backend_as_nobody() {
    if !ready("least_privilege", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.image("vm.img", "64M");
    let sock = Fixture::socket_of(&image);
    let backend = BlkBackendProcess::start_exports_with(
        &bin("blk-backend"),
        &[(image.clone(), sock.clone())],
        &["--user", "nobody"],
    )
    .expect("blk-backend starts as nobody");
    // Its socket listens before it drops root (it binds as root first):
    // the change follows within milliseconds.
    Patience::new("blk-backend becomes nobody", Duration::from_millis(100))
        .wait_until(|| Ok(uid_of(backend.pid()) == "65534\t65534\t65534\t65534"))
        .unwrap_or_else(|e| panic!("{e}: {}", uid_of(backend.pid())));

    let mut v = VmmVm::new(
        &bin("vmm"),
        "mode=randwrite verify=1 gen=2 bs=4k qd=8 size=16M duration_ms=3000 progress_ms=200",
    )
    .with_disk(&sock, 1);
    v.silence = Patience::new("progress lines", Duration::from_millis(200));
    let mut running = v.spawn().expect("the vmm starts");
    running
        .wait_for_progress(
            1,
            &Patience::new("the first progress line", Duration::from_millis(200)),
        )
        .expect("the workload runs");
    for (pid, who) in [(running.pid(), "vmm"), (backend.pid(), "blk-backend")] {
        let threads = thread_seccomp(pid);
        eprintln!("{who}: {threads:?}");
        assert!(threads.len() >= 3, "{who}: {threads:?}");
        for (name, mode) in &threads {
            // KVM's own kernel threads count as the vmm's tasks.
            if name.starts_with("kvm") {
                continue;
            }
            assert_eq!(mode, "2", "{who} thread {name:?} runs without its filter");
        }
    }
    // Its crash shadows are in a directory only nobody can reach, each
    // readable by nobody alone.
    let shadows = std::path::Path::new("/run/blk-backend/65534");
    let m = std::fs::metadata(shadows).expect("nobody's shadow directory");
    assert_eq!((m.uid(), m.mode() & 0o777), (65534, 0o700));
    let owned: Vec<(u32, u32)> = std::fs::read_dir(shadows)
        .expect("ls")
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| (m.uid(), m.mode() & 0o777))
        .collect();
    assert!(!owned.is_empty(), "the writable image has a shadow");
    assert!(
        owned
            .iter()
            .all(|&(uid, mode)| mode == 0o600 && (uid == 65534 || uid == 0)),
        "{owned:?}"
    );
    let r = running.wait().expect("the vmm ends");
    r.assert_ok("the verifying workload on a backend that dropped root");
    backend.stop();
}

/// Crash shadows say where a layer's blocks are: a directory where any
/// local user could plant one (/dev/shm) is refused at start, by name.
#[test]
fn a_shadow_directory_others_may_write_is_refused() {
    if !ready("least_privilege_shadows", &[]) {
        return;
    }
    let fx = Fixture::new();
    let image = fx.image("vm.img", "16M");
    let sock = Fixture::socket_of(&image);
    let out = std::process::Command::new("timeout")
        .arg("60")
        .arg(bin("blk-backend"))
        .args(["--shadow-dir", "/dev/shm", "--socket"])
        .arg(&sock)
        .arg("--image")
        .arg(&image)
        .output()
        .expect("blk-backend runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused at start: {err}");
    assert!(
        err.contains("--shadow-dir /dev/shm") && err.contains("others may reach it"),
        "{err}"
    );
    // The image was not opened (nothing marked dirty).
    test_infra::img(&["check", image.to_str().expect("utf-8")]);
}
