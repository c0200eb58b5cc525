//! Each vmm thread policy ends the process on a call it does not allow,
//! with one line naming the call and the policy (every end-to-end test
//! runs the vmm under these same policies, on by default); an open is
//! refused with EACCES instead (glibc opens files of its own accord).

use vmm::seccomp::{API, DEADLINES, MAIN, VCPU, VHOST_USER};

const TEST: &str = "a_forbidden_call_ends_the_process_with_a_report_naming_it";

#[test]
fn a_forbidden_call_ends_the_process_with_a_report_naming_it() {
    for (policy, call) in [
        (VCPU, "socket"),
        (VHOST_USER, "execve"),
        (API, "socket"),
        (DEADLINES, "socket"),
        (MAIN, "execve"),
    ] {
        sandbox::assert_forbidden_call_is_reported(&policy, TEST, call);
    }
}

const OPEN_TEST: &str = "an_open_under_a_policy_without_it_fails_and_the_process_goes_on";

#[test]
fn an_open_under_a_policy_without_it_fails_and_the_process_goes_on() {
    for policy in [VCPU, VHOST_USER, DEADLINES] {
        sandbox::assert_open_is_refused_quietly(&policy, OPEN_TEST);
    }
}
