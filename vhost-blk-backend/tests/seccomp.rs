//! Each blk-backend thread policy ends the process on a call it does not
//! allow, with one line naming the call and the policy (the normal
//! workloads, reconnects and kill -9 restarts run under these same
//! policies in the end-to-end tests, where they are on by default); an
//! open is refused with EACCES instead (glibc opens files of its own
//! accord, a queue worker's malloc when its heap first shrinks).

use vhost_blk_backend::seccomp::{MAIN, SESSION, WORKER};

const TEST: &str = "a_forbidden_call_ends_the_process_with_a_report_naming_it";

#[test]
fn a_forbidden_call_ends_the_process_with_a_report_naming_it() {
    for (policy, call) in [(WORKER, "socket"), (SESSION, "execve"), (MAIN, "socket")] {
        sandbox::assert_forbidden_call_is_reported(&policy, TEST, call);
    }
}

const OPEN_TEST: &str = "an_open_under_a_policy_without_it_fails_and_the_process_goes_on";

#[test]
fn an_open_under_a_policy_without_it_fails_and_the_process_goes_on() {
    for policy in [WORKER, SESSION] {
        sandbox::assert_open_is_refused_quietly(&policy, OPEN_TEST);
    }
}
