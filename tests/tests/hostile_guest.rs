//! A guest is the vmm's hostile peer, and through the vmm blk-backend's: a
//! bench guest in `mode=fuzz` writes junk to everything it can reach of its
//! disk (registers, ring addresses, rings, PCI configuration, BARs) while
//! another VM runs a verifying workload on another export of the same
//! blk-backend process. Neither the vmm nor the backend may crash, hang or
//! flood its log, and the other VM must not notice.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use test_infra::{bin, ready, BlkBackendProcess, Fixture, VmmDisk, VmmVm};

const SEEDS: [u64; 4] = [1, 2, 3, 4];
const WRITES: u64 = 20_000;

#[test]
fn junk_from_one_guest_leaves_the_vmm_the_backend_and_the_other_vm_standing() {
    if !ready("vmm_guest_fuzz", &[]) {
        return;
    }
    let fx = Fixture::new();
    let victim = fx.image("fuzzed.img", "64M");
    let other = fx.image("other.img", "64M");
    let log = fx.path("blk-backend.log");
    let exports: Vec<(PathBuf, PathBuf)> = [&victim, &other]
        .iter()
        .map(|i| (i.to_path_buf(), Fixture::socket_of(i)))
        .collect();
    let backend =
        BlkBackendProcess::start_exports_logging_to(&bin("blk-backend"), &exports, &[], &log)
            .expect("blk-backend starts");

    // The other VM: verifying workloads, one after another, for as long
    // as the attacks last (however long that is on this machine).
    let attacks_done = Arc::new(AtomicBool::new(false));
    let bystander = {
        let done = Arc::clone(&attacks_done);
        let sock = Fixture::socket_of(&other);
        std::thread::spawn(move || {
            let (mut runs, mut failures) = (0u32, Vec::new());
            while !done.load(Ordering::SeqCst) || runs == 0 {
                let r = VmmVm::new(
                    &bin("vmm"),
                    &format!(
                        "mode=randwrite verify=1 gen={} bs=4k qd=8 size=16M ios=2000",
                        runs + 1
                    ),
                )
                .with_disk(&sock, 1)
                .run()
                .expect("the bystander runs");
                if !r.ok() {
                    failures.push(format!("{}\nits vmm's log:\n{}", r.serial, r.stderr));
                }
                runs += 1;
            }
            (runs, failures)
        })
    };

    let mut vmm_lines = 0usize;
    for seed in SEEDS {
        let mut v = VmmVm::new(&bin("vmm"), &format!("mode=fuzz seed={seed} ios={WRITES}"));
        // A backend that refuses the junk is given up on quickly: the
        // guest's junk goes on against the vmm's own IOERR path too.
        v.disks.push(VmmDisk {
            reconnect_timeout_ms: Some(300),
            reply_timeout_ms: Some(5000),
            ..VmmDisk::new(&Fixture::socket_of(&victim), 1)
        });
        let r = v.run().expect("the fuzzed vmm runs");
        let result = r.result.as_ref().unwrap_or_else(|| {
            panic!(
                "seed {seed}: no report from the guest:\n{}\n{}",
                r.serial, r.stderr
            )
        });
        assert_eq!(result["phase"], "fuzz", "seed {seed}: {}", r.serial);
        assert_eq!(result["writes"], WRITES, "seed {seed}");
        assert_eq!(r.guest_status, Some(0), "seed {seed}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "seed {seed}: {}", r.stderr);
        vmm_lines = vmm_lines.max(r.stderr.lines().count());
        eprintln!(
            "seed {seed}: {WRITES} junk writes in {} ms, vmm logged {} lines",
            r.total.as_millis(),
            r.stderr.lines().count()
        );
    }
    attacks_done.store(true, Ordering::SeqCst);
    let (runs, failures) = bystander.join().expect("the bystander");
    eprintln!(
        "the bystander: {runs} verifying runs, {} failed",
        failures.len()
    );
    if !failures.is_empty() {
        // What the backend said about the bystander's export, for the
        // diagnosis (the fixture and its log go with the test).
        let other_sock = Fixture::socket_of(&other).display().to_string();
        let said: Vec<String> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&other_sock) || l.contains("ERROR"))
            .map(str::to_string)
            .collect();
        panic!(
            "the other export's VM failed:\n{}\nblk-backend on that export (last 40 lines):\n{}",
            failures.join("\n"),
            said[said.len().saturating_sub(40)..].join("\n")
        );
    }
    // Alive and well: it answers SIGTERM cleanly.
    backend.stop();
    let logged = std::fs::read_to_string(&log).expect("the backend's log");
    let lines = logged.lines().count();
    eprintln!(
        "blk-backend logged {lines} lines over {} attacks; the vmm at most {vmm_lines} per run",
        SEEDS.len()
    );
    // Bounded: per session, a few lines of its own (connected, closed,
    // why) and the rate-limited ones (ten, then a count a second); each
    // fuzzing run lasts seconds and reconnects a few times.
    assert!(lines < 400, "blk-backend logged {lines} lines:\n{logged}");
    assert!(
        vmm_lines < 400,
        "the vmm logged {vmm_lines} lines in one run"
    );
}
