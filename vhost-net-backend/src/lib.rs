//! A vhost-user-net backend over a multi-queue tap (`net-backend`): the
//! vmm's `--net` NICs, and QEMU's `-netdev vhost-user`, move their frames
//! through it. Its sessions (one frontend at a time, guarded against a
//! hostile one) are vhost-user-session's, shared with blk-backend.
//!
//! - `tap`: the tap's queues and offloads.
//! - `device`: what the device offers, its configuration, which virtqueue
//!   is what.
//! - `connection`: one session's vhost-user requests, its pair workers.
//! - `worker`: a queue pair's event loop (receive, transmit, control).
//! - `chain`: a descriptor chain's buffers, checked, read and written at
//!   logical offsets.

pub mod chain;
pub mod connection;
pub mod device;
pub mod tap;
pub mod worker;
