//! VM snapshots: what a paused VM is made of, saved into a directory and
//! read back by a new vmm process (docs/architecture.md, "Snapshots").
//!
//! - `state_file`: the versioned, checksummed file the state lives in.
//! - `vcpu`: a vCPU's state, saved from one VM and restored into another.
//! - `memory`: guest memory as a sparse file.

pub mod memory;
pub mod state_file;
pub mod vcpu;
