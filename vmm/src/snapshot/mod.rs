//! VM snapshots: what a paused VM is made of, saved into a directory and
//! read back by a new vmm process (docs/architecture.md, "Snapshots").
//!
//! - `state_file`: the versioned, checksummed file the state lives in.

pub mod state_file;
