//! Devices and the buses vCPU exits reach them through.
//!
//! - `bus`: address ranges -> devices (one for ports, one for MMIO).
//! - `serial`: the 8250 console (vm-superio).
//! - `debug_exit`: the test-guest exit port (QEMU's isa-debug-exit).
//! - `pci`: configuration space through ports 0xCF8/0xCFC and the host bridge.
//! - `virtio_pci`: the modern virtio-pci transport with MSI-X.
//! - `vhost_user_blk`: a disk whose queues a vhost-user backend serves.

pub mod bus;
pub mod debug_exit;
pub mod pci;
pub mod serial;
pub mod vhost_user_blk;
pub mod virtio_pci;

pub use bus::{Bus, BusDevice};
