//! `blk-backend`: a vhost-user-blk server that serves snapshot chains built
//! with the `image-format` crate.
//!
//! - `config`: the virtio-blk configuration space the frontend reads.
//! - `request`: parsing and validating one descriptor chain (hostile input
//!   ends as an IOERR/UNSUPP status, never a crash).
//! - `backend`: the vhost-user-backend glue and the request execution.

pub mod backend;
pub mod config;
pub mod request;
pub mod uring;
