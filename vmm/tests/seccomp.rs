//! Each vmm thread policy ends the process on a call it does not allow,
//! with one line naming the call and the policy (every end-to-end test
//! runs the vmm under these same policies, on by default).

use vmm::seccomp::{API, DEADLINES, DISK, MAIN, VCPU};

const TEST: &str = "a_forbidden_call_ends_the_process_with_a_report_naming_it";

#[test]
fn a_forbidden_call_ends_the_process_with_a_report_naming_it() {
    for (policy, call, nr) in [
        (VCPU, "socket", 41),
        (DISK, "openat", 257),
        (API, "socket", 41),
        (DEADLINES, "socket", 41),
        (MAIN, "execve", 59),
    ] {
        let Some((status, stderr)) = sandbox::forbidden_call_outcome(&policy, TEST, call) else {
            continue;
        };
        assert_eq!(
            status,
            Some(sandbox::FORBIDDEN_EXIT),
            "{}: {stderr}",
            policy.name
        );
        let report = format!(
            "under the \"{}\" policy made a forbidden system call: {call} ({nr})",
            policy.name
        );
        assert!(stderr.contains(&report), "{}: {stderr}", policy.name);
    }
}
