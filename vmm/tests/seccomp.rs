//! Each vmm thread policy ends the process on a call it does not allow,
//! with one line naming the call and the policy (every end-to-end test
//! runs the vmm under these same policies, on by default).

use vmm::seccomp::{API, DEADLINES, DISK, MAIN, VCPU};

const TEST: &str = "a_forbidden_call_ends_the_process_with_a_report_naming_it";

#[test]
fn a_forbidden_call_ends_the_process_with_a_report_naming_it() {
    for (policy, call) in [
        (VCPU, "socket"),
        (DISK, "openat"),
        (API, "socket"),
        (DEADLINES, "socket"),
        (MAIN, "execve"),
    ] {
        sandbox::assert_forbidden_call_is_reported(&policy, TEST, call);
    }
}
