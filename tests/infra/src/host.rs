//! What this machine offers. A test that needs what is missing says so in
//! a loud `SKIPPED` line (CI collects them) and passes nothing off as tested.

use std::path::Path;
use std::process::{Command, Stdio};

/// Whether KVM can be used here; says loudly why not.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("SKIPPED: {test}: /dev/kvm is not available on this machine");
    }
    ok
}

/// The CPU time process `pid` has used, in ticks of 10 ms (utime +
/// stime; 0 if it is gone): what a test measures to tell an idle process
/// from a spinning one, whatever the wall clock does on a busy machine.
pub fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|r| r.1.split_whitespace().collect())
        .unwrap_or_default();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Whether /dev/kvm is hardware virtualization (kvm_intel or kvm_amd), not
/// PVM's software kind, on which a stock Linux cannot reach userspace.
pub fn hardware_kvm() -> bool {
    Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists()
}

/// Whether a program is on PATH; says loudly why not.
pub fn have(program: &str, test: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        println!("SKIPPED: {test}: {program} is not installed");
    }
    ok
}

/// KVM and every one of `programs`: whether `test` can run here.
pub fn ready(test: &str, programs: &[&str]) -> bool {
    kvm_available(test) && programs.iter().all(|p| have(p, test))
}
