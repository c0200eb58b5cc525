//! The system calls each kind of blk-backend thread may make once it is
//! set up (the model and its reasons: the `sandbox` crate). Found by
//! tracing every path the tests drive (`strace -ff`, per thread) and by
//! reading the code those paths run.
//!
//! A thread's filter is inherited by the threads it starts, which can only
//! narrow it: a session thread starts its queue workers, so the session
//! policy holds the workers' calls too, and each worker narrows to its own.

use sandbox::Policy;

/// File I/O on an open chain (the synchronous path, flushes, growing the
/// top, the crash shadow), shared by workers, sessions and the main
/// thread's final close.
const IMAGE_IO: &[&str] = &[
    "access",
    "faccessat",
    "faccessat2",
    "fallocate",
    "fdatasync",
    "fstat",
    // Whether a layer lives in memory (Export::open).
    "fstatfs",
    "fsync",
    "ftruncate",
    "lseek",
    "newfstatat",
    "pread64",
    "preadv",
    "preadv2",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "statx",
];

/// A queue worker: its io_uring (where kicks, completions and the stop
/// arrive too), the synchronous request path, and hanging up a session
/// whose memory went away.
pub const WORKER: Policy = Policy {
    name: "queue worker",
    groups: &[IMAGE_IO, &["fcntl", "io_uring_enter", "read", "shutdown"]],
};

/// A session (an export's socket): accepting a frontend, its vhost-user
/// messages (memory tables to map, the inflight region to create),
/// starting queue workers, whose calls it must hold, and at the end
/// removing its socket.
pub const SESSION: Policy = Policy {
    name: "session",
    groups: &[
        IMAGE_IO,
        sandbox::EVENT_LOOP,
        &[
            "accept4",
            "clone",
            "clone3",
            "eventfd2",
            "fcntl",
            "io_uring_enter",
            "io_uring_register",
            "io_uring_setup",
            "ioctl",
            "memfd_create",
            "poll",
            "ppoll",
            "read",
            "recvmsg",
            // A worker pins itself to its CPU (`worker_cpus`) before it
            // narrows its inherited filter to its own.
            "sched_setaffinity",
            "seccomp",
            "sendmsg",
            "shutdown",
            "unlink",
            "unlinkat",
            // Postcopy: a userfaultfd for a restoring vmm.
            "userfaultfd",
        ],
    ],
};

/// The main thread once every session runs: it waits for SIGTERM/SIGINT,
/// ends the sessions and closes every image cleanly (headers, locks, the
/// crash shadow removed).
pub const MAIN: Policy = Policy {
    name: "main",
    groups: &[
        IMAGE_IO,
        &[
            "fcntl",
            "getdents64",
            "openat",
            "rename",
            "rt_sigtimedwait",
            "shutdown",
            "unlink",
            "unlinkat",
        ],
    ],
};

/// The control socket: it adds exports (opens images, listens, starts
/// their session threads, whose calls it must hold) and removes them (ends
/// sessions, closes images, removes sockets).
pub const CONTROL: Policy = Policy {
    name: "control",
    groups: &[
        IMAGE_IO,
        sandbox::EVENT_LOOP,
        &[
            "accept4",
            "bind",
            "clone",
            "clone3",
            "connect",
            "eventfd2",
            "fcntl",
            "flock",
            "getdents64",
            // The crash shadows' directory is checked as this user's.
            "geteuid",
            "io_uring_enter",
            "io_uring_register",
            "io_uring_setup",
            "ioctl",
            // export-snapshot: the sealed layer's second name.
            "link",
            "linkat",
            "listen",
            "memfd_create",
            "mkdir",
            "openat",
            "poll",
            "ppoll",
            "read",
            "readlink",
            "recvfrom",
            "recvmsg",
            "rename",
            // The workers of its sessions pin themselves (`worker_cpus`).
            "sched_setaffinity",
            "seccomp",
            "sendmsg",
            "sendto",
            "shutdown",
            "socket",
            "umask",
            "unlink",
            "unlinkat",
            // The sessions it starts inherit its filter (postcopy).
            "userfaultfd",
        ],
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_compiles() {
        for p in [WORKER, SESSION, MAIN, CONTROL] {
            p.compile().unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
