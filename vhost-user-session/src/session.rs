//! One frontend's session as its queue workers see it: the mark the SIGBUS
//! handler sets when the frontend took away memory we had mapped, the
//! session's socket (shut down to end it), and the log limit every line
//! the frontend or its guest can cause goes through, whichever queue logs
//! it, so that restarting queues or reconnecting buys no fresh allowance.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::fence::{FenceError, GuardedRange, SessionFence};
use cli_support::log_limit::LogLimit;

#[derive(Debug)]
pub struct Session {
    pub(crate) fence: Arc<SessionFence>,
    socket: Option<UnixStream>,
    logs: Mutex<LogLimit>,
}

impl Session {
    pub fn new(fence: Arc<SessionFence>, socket: Option<UnixStream>) -> Session {
        Session {
            fence,
            socket,
            logs: Mutex::default(),
        }
    }

    /// A session of its own fence, on `socket` (None in tests).
    pub fn start(socket: Option<UnixStream>) -> Result<Session, FenceError> {
        Ok(Session::new(SessionFence::new()?, socket))
    }

    /// Guards `len` bytes at `start`, a mapping of the frontend's file, for
    /// as long as the returned range lives (not longer than the mapping).
    pub fn guard(&self, start: *const u8, len: usize) -> Result<GuardedRange, FenceError> {
        self.fence.guard(start, len)
    }

    /// Logs a line the peer caused, within the session's limit (ten in
    /// full, then a count a second).
    pub fn peer_caused(&self, line: impl FnOnce()) {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .emit(line, |n| {
                warn!("{n} more lines caused by this frontend or its guest (not logged one by one)")
            });
    }

    /// Reports what the limit left out, when the session ends.
    pub fn flush_logs(&self) {
        if let Some(n) = self
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remaining()
        {
            warn!("{n} more lines caused by this frontend or its guest (not logged one by one)");
        }
    }

    /// Whether the frontend hung up (its process may be gone).
    pub fn frontend_gone(&self) -> bool {
        let Some(s) = &self.socket else {
            return false;
        };
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(s),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll with no wait on the session's socket, open for the
        // call.
        let r = unsafe { libc::poll(&raw mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
    }

    /// Whether the frontend truncated memory this session had mapped (a
    /// fault there was contained), or a worker found it gone and said so
    /// with [`Session::lose_memory`].
    pub fn memory_lost(&self) -> bool {
        self.fence.tripped()
    }

    /// Marks the session's memory lost (a kernel copy into it failed and
    /// its files are shorter than mapped) and hangs up.
    pub fn lose_memory(&self) {
        self.fence.trip();
        self.hang_up();
    }

    /// Ends the session: the server sees the frontend gone and closes it.
    pub fn hang_up(&self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
