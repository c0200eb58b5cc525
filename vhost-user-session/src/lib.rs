//! One vhost-user frontend's session with a backend, guarded against a
//! hostile frontend or the guest behind it. What blk-backend learned, in
//! one place for every backend (blk-backend, net-backend):
//!
//! - `server`: the listening socket, one session at a time; a session
//!   that breaks the protocol ends with its reason, the next is served.
//! - `handler`: every vhost-user request of a session, a backend's own
//!   part behind the `Device` trait.
//! - `session`: what a session's workers share: its log limit (every
//!   line a peer can cause goes through it), its memory fence, hanging up.
//! - `fence`: faults in memory a frontend truncated under us end that
//!   session, not the process (a SIGBUS handler).
//! - `memory`: the memory table, each region checked against its file
//!   before it is mapped.
//! - `queues`: the vring messages' state, eventfds made nonblocking.
//! - `rings`: a ring no driver could write breaks its queue once.
//! - `eventfd`: why no eventfd a frontend sends can hold a worker.
//! - `worker`: a queue worker's thread and its stop.

pub mod eventfd;
pub mod fence;
pub mod handler;
pub mod memory;
pub mod queues;
pub mod rings;
pub mod server;
pub mod session;
pub mod worker;

pub use session::Session;

/// A request refused: the server closes the session and logs why (once).
pub fn refuse(why: String) -> vhost::vhost_user::Error {
    vhost::vhost_user::Error::ReqHandlerError(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        why,
    ))
}
