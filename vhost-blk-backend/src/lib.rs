//! `blk-backend`: a vhost-user-blk server that serves snapshot chains built
//! with the `image-format` crate.
//!
//! - `server`: an export's socket, one frontend session at a time.
//! - `control`: the exports of the process, and the control socket that
//!   adds and removes them at runtime.
//! - `connection`: the vhost-user requests of one session.
//! - `inflight`: the shared region that lets a restarted backend resume.
//! - `worker`: a queue's event loop (kick, completions, stop).
//! - `export`: an open chain and the request execution its workers share.
//!
//! Parsing and walking one descriptor chain (hostile input ends as an
//! IOERR/UNSUPP status, never a crash) is the `blk-request` crate's,
//! shared with the vmm.
//! - `uring`: a queue's io_uring and the requests in flight on it.
//! - `config`: the virtio-blk configuration space.
//! - `seccomp`: the system calls each kind of thread may make.

pub mod adaptive_poll;
pub mod config;
pub mod connection;
pub mod control;
pub mod export;
pub mod inflight;
pub mod seccomp;
pub mod server;
pub mod uring;
pub mod worker;
