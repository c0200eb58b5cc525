//! `blk-backend`: a vhost-user-blk server that serves snapshot chains built
//! with the `image-format` crate.
//!
//! - `server`: an export's socket, one frontend session at a time (the
//!   accept loop and the session are vhost-user-session's, shared with
//!   net-backend).
//! - `control`: the exports of the process, and the control socket that
//!   adds and removes them at runtime (its protocol, with the export spec
//!   and its one check, is the `blk-control` crate's).
//! - `connection`: an export's part of a session (what it offers, its
//!   queue workers, the inflight region).
//! - `inflight`: the shared region that lets a restarted backend resume.
//! - `postcopy`: a restoring vmm paging our faults in (PAGEFAULT).
//! - `worker`: a queue's event loop (kick, completions, stop).
//! - `uring`: a queue's io_uring and the requests in flight on it.
//! - `adaptive_poll`: how long a worker polls before it sleeps.
//! - `export`: an open chain and the request execution its workers share.
//! - `config`: the virtio-blk configuration space.
//! - `seccomp`: the system calls each kind of thread may make.
//!
//! Parsing and walking one descriptor chain (hostile input ends as an
//! IOERR/UNSUPP status, never a crash) is the `blk-request` crate's,
//! shared with the vmm.

pub mod adaptive_poll;
pub mod config;
pub mod connection;
pub mod control;
pub mod export;
pub mod inflight;
pub mod limits;
pub mod postcopy;
pub mod seccomp;
pub mod server;
pub mod uring;
pub mod worker;
