//! Least privilege, as Firecracker's jailer and seccomp filters practise
//! it, for `vmm` and `blk-backend`:
//!
//! - `seccomp`: each thread confines itself, once it is set up, to the
//!   system calls its kind of work needs ([`Policy`], built with
//!   Firecracker's `seccompiler`). Any other call traps; the SIGSYS
//!   reporter writes one line naming the call and the thread, and ends the
//!   process (exit status [`FORBIDDEN_EXIT`]) before the call can do
//!   anything.
//! - `user`: dropping root for a named user once sockets and files are open.
//!
//! Filters are per thread (seccomp's own granularity): a thread's filter
//! is inherited by the threads it starts later, which then narrow it to
//! their own policy.

mod seccomp;
mod syscall_names;
mod user;

pub use seccomp::{
    assert_forbidden_call_is_reported, assert_open_is_refused_quietly, confine, enable, inherited,
    install_reporter, malloc_arenas, syscall_name, Policy, SandboxError, EVENT_LOOP, EVERY_THREAD,
    FORBIDDEN_EXIT,
};
pub use user::{drop_privileges, lookup as lookup_user, UserError};
