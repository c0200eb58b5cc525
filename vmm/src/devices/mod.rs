//! Devices and the buses vCPU exits reach them through.
//!
//! - `bus`: address ranges -> devices (one for ports, one for MMIO).
//! - `serial`: the 8250 console (vm-superio).
//! - `debug_exit`: the test-guest exit port (QEMU's isa-debug-exit).
//! - `pci`: configuration space through ports 0xCF8/0xCFC and ECAM, the host bridge.
//! - `config_mirror`: configuration space as read-only guest memory (only writes exit).
//! - `power`: ACPI sleep/reset registers and the i8042 reset line.
//! - `virtio_pci`: the modern virtio-pci transport with MSI-X.
//! - `virtio_console`: the guest's console as a virtqueue (hvc0), beside the UART.
//! - `vhost_user`: a device (a disk, a NIC) whose queues a vhost-user backend serves.
//! - `io_error`: a disk whose backend is gone for good fails requests.
//! - `deadline`: no wait on a backend's reply outlives its deadline.

pub mod bus;
pub mod config_mirror;
pub mod deadline;
pub mod debug_exit;
pub mod io_error;
pub mod pci;
pub mod power;
pub mod serial;
pub mod vhost_user;
pub mod virtio_console;
pub mod virtio_pci;

pub use bus::{Bus, BusDevice};
