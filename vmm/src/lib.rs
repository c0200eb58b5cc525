//! `vmm`: owns vCPUs and guest memory and nothing else on the data path;
//! its disks, NICs and shared folders are vhost-user devices served by
//! `blk-backend`, `net-backend` and virtiofsd (or any vhost-user backend of
//! their kind). It never touches a request: kicks go guest -> ioeventfd ->
//! backend, completions backend -> irqfd -> guest.
//!
//! - `config`: the VM's description (command line or JSON).
//! - `memory`: guest memory (memfd, shareable) and the physical layout.
//! - `acpi`: the ACPI tables (FADT, DSDT, MADT, MCFG).
//! - `boot`: loading a kernel (PVH ELF) and the registers it starts with.
//! - `events`: how a VM ends (`VmEvent`), as devices and vCPUs report it.
//! - `interrupts`: MSI routes of the devices' GSIs.
//! - `builder`: a VM built, booted (`build_for_boot`) or restored
//!   (`build_from_snapshot`): KVM, memory slots, devices, threads.
//! - `device_manager`: the platform's devices on the buses, the PCI bus,
//!   every virtio device attached (one `attach_vhost_user` for any
//!   vhost-user kind) and their watchers.
//! - `vcpu`: a vCPU's thread, its exits, its CPUID and entry registers.
//! - `console`: the console's output and input threads.
//! - `vm`: a VM's life: run until it ends, snapshots meanwhile, stopped
//!   in order, reported.
//! - `control`: run state (pause, resume, stop) and the vCPU counters.
//! - `api`: the HTTP/JSON control API on a Unix socket: its typed
//!   requests and answers (`api::types`) and its client (`api::client`).
//! - `devices`: port and MMIO buses, serial, debug exit, PCI, virtio-pci,
//!   the vhost-user frontend and its watcher, the virtio console.
//! - `snapshot`: a paused VM saved to a directory (`take`), read back and
//!   restored (`restore`, `pager`).
//! - `seccomp`: each thread's system-call filter.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod coalesced;
pub mod config;
pub mod console;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod events;
pub mod interrupts;
pub mod kvm_stats;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
