//! The system calls each kind of vmm thread may make once it is set up
//! (issue 10; Firecracker's model: one filter per thread kind, installed
//! by the thread itself, anything else reported by name and fatal). The
//! lists come from tracing every path the end-to-end tests drive (`strace
//! -ff` per thread) and from reading the code those paths run; a call
//! that is missing shows up as a one-line report naming it, and
//! `--no-seccomp` runs without filters meanwhile.

use sandbox::Policy;

/// A vCPU: KVM_RUN and the exits it handles itself: the console, MSI-X
/// and irqfd changes, and a device the driver starts or resets (the
/// vhost-user messages to its backend, eventfds for polled queues).
pub const VCPU: Policy = Policy {
    name: "vcpu",
    groups: &[&[
        "eventfd2", "fcntl", "ioctl", "poll", "ppoll", "recvmsg", "sendmsg", "shutdown",
    ]],
};

/// A vhost-user device's watcher (a disk's, a NIC's, a shared folder's):
/// it waits for the backend to go, reconnects (a new connection and the
/// whole handshake), or starts the thread that fails the guest's requests
/// (which runs under this same filter).
pub const VHOST_USER: Policy = Policy {
    name: "vhost-user watcher",
    groups: &[
        sandbox::EVENT_LOOP,
        &[
            "clone", "clone3", "connect", "eventfd2", "fcntl", "poll", "ppoll", "pread64", "read",
            "recvmsg", "sendmsg", "shutdown", "socket",
        ],
    ],
};

/// The control API: one connection at a time, and pausing (signals to
/// the vCPU threads).
pub const API: Policy = Policy {
    name: "api",
    groups: &[&[
        "accept4",
        "fcntl",
        "poll",
        "read",
        "recvfrom",
        "sendto",
        "setsockopt",
        "tgkill",
    ]],
};

/// The console thread: waits for the virtio console's doorbell (or a
/// while), and writes what the guest wrote.
pub const CONSOLE: Policy = Policy {
    name: "console",
    groups: &[&["fcntl", "poll", "ppoll", "read"]],
};

/// `--serial-input`: reads standard input and hands it to the UART.
pub const SERIAL_IN: Policy = Policy {
    name: "serial input",
    groups: &[&["read"]],
};

/// The lazy restore's pager: page faults read from its userfaultfd and
/// answered, the snapshot's memory file read, pages copied in (ioctls).
pub const PAGER: Policy = Policy {
    name: "pager",
    groups: &[&[
        "fcntl", "ioctl", "lseek", "poll", "ppoll", "pread64", "read",
    ]],
};

/// The deadline watchdog: waits, and shuts a silent backend's connection.
pub const DEADLINES: Policy = Policy {
    name: "deadlines",
    groups: &[&["shutdown"]],
};

/// The main thread once the VM runs: it waits for the VM's end, stops the
/// vCPUs (signals) and the disks (the backends' replies), answers the
/// API's `vm.wait` clients, reads KVM's statistics, writes the metrics
/// file and exits; and takes snapshots (a new directory, the state file
/// written and renamed into place, guest memory copied by its data
/// ranges).
pub const MAIN: Policy = Policy {
    name: "main",
    groups: &[&[
        "fcntl",
        "fsync",
        "ftruncate",
        "getdents64",
        "ioctl",
        "lseek",
        "mkdir",
        "mkdirat",
        "newfstatat",
        "openat",
        "poll",
        "pread64",
        "pwrite64",
        "read",
        "recvmsg",
        "rename",
        "renameat",
        "renameat2",
        "sendmsg",
        "sendto",
        "shutdown",
        "statx",
        "tgkill",
        "unlink",
        "write",
    ]],
};

pub use sandbox::confine;

/// Turns filtering on (the vmm's threads confine themselves from now on).
pub fn enable() -> Result<(), sandbox::SandboxError> {
    sandbox::enable("vmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_compiles() {
        for p in [
            VCPU, VHOST_USER, API, CONSOLE, SERIAL_IN, DEADLINES, MAIN, PAGER,
        ] {
            p.compile().unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
