//! The end-to-end harness: what the tests in `tests/tests/` and the
//! benchmarks in `bench/` both need to put real processes and real guests
//! to work (Cloud Hypervisor's `test_infra` is the model).
//!
//! - [`patience`]: every wait here exists to catch a hang, so it is sized
//!   from a measured cost with a wide margin and says so when it runs out;
//! - [`workspace`]: the project's binaries, built before they are run;
//! - [`host`]: what this machine offers (KVM, hardware KVM, programs),
//!   with a loud `SKIPPED` line for a test that cannot run;
//! - [`guest`]: the bench guest (a PVH ELF and a bzImage), booted under
//!   QEMU ([`QemuVm`]) or the project's vmm ([`VmmVm`]), its console and
//!   result read back;
//! - [`backend`]: blk-backend and qemu-storage-daemon as child processes;
//! - [`fixture`]: a test's scratch directory with its images and backends;
//! - [`vhost_frontend`]: an in-process vhost-user frontend writing rings
//!   by hand, for backends' protocol and hostile-guest tests;
//! - [`registry`]: a container registry (docker-registry) of a test's own;
//! - [`containerd`]: containerd of a test's own, with our shim on its PATH;
//! - [`slurm`]: a one-node Slurm cluster (munged, slurmctld, slurmd) of a test's own;
//! - [`vmctl`]: vmctl on a state root of the test's, every call bounded.

pub mod backend;
pub mod containerd;
pub mod fixture;
pub mod guest;
pub mod host;
pub mod memory;
pub mod netns;
pub mod patience;
pub mod registry;
pub mod slurm;
pub mod vhost_frontend;
pub mod vmctl;
pub mod workspace;

pub use backend::{listening, BackendControl, BlkBackendProcess, StorageDaemon};
pub use containerd::LocalContainerd;
pub use fixture::Fixture;
pub use guest::{
    build_guest, Disk, GuestKernels, GuestRun, Kernel, Machine, QemuConsole, QemuNic, QemuVm,
    RunningVm, VmmDisk, VmmVm, START_MARKER,
};
pub use host::{hardware_kvm, have, kvm_available, process_ticks, ready};
pub use memory::memfd_guest_memory;
pub use netns::{spawn_serving, KillOnDrop, Netns, NsThread, Received};
pub use patience::Patience;
pub use registry::LocalRegistry;
pub use slurm::LocalSlurm;
pub use vmctl::Vmctl;
pub use workspace::{bin, img, output_within, repo_root, s, stdout_json, vmm_api};
