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
//! - `vm`: the KVM VM, its vCPU threads and their exits.
//! - `control`: run state (pause, resume, stop) and the vCPU counters.
//! - `api`: the HTTP/JSON control API on a Unix socket, and its client.
//! - `devices`: port and MMIO buses, serial, debug exit, PCI.
//! - `snapshot`: a paused VM saved to a directory, and read back.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod coalesced;
pub mod config;
pub mod control;
pub mod devices;
pub mod events;
pub mod interrupts;
pub mod kvm_stats;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod vm;
