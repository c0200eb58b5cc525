//! The bench crate's library: building the bench guest and running it under
//! a VMM (QEMU now; the project's vmm later), collecting its JSON result.

pub mod guest;
