//! An export's listening socket: one frontend connection at a time; a
//! connection that breaks the protocol or goes away is closed with its
//! reason logged and the next one is served. The socket stays bound for
//! the export's life, so a frontend reconnecting after a backend restart
//! or a dropped session finds it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};

use crate::connection::{Connection, Session};
use crate::export::Export;
use crate::memory_fence::SessionFence;

/// Lets another thread end an export's serving loop.
#[derive(Default)]
pub struct StopHandle {
    stopping: AtomicBool,
    active: Mutex<Option<UnixStream>>,
}

impl StopHandle {
    /// Ends the current session (its workers drain) and the loop.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(s) = self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// Waits up to `ms` for the listener to have a connection.
fn readable(listener: &Listener, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Serves `export` on `listener` until `stop` says so.
pub fn serve(export: Arc<Export>, listener: Listener, stop: Arc<StopHandle>) {
    let name = export.spec.socket.display().to_string();
    while !stop.stopping() {
        if !readable(&listener, 200) {
            continue;
        }
        let stream = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                warn!(socket = %name, "accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        match stream.try_clone() {
            Ok(c) => *stop.active.lock().unwrap_or_else(|e| e.into_inner()) = Some(c),
            Err(e) => warn!(socket = %name, "cannot keep a handle on the session: {e}"),
        }
        if stop.stopping() {
            break;
        }
        info!(socket = %name, "frontend connected");
        let fence = match SessionFence::new() {
            Ok(f) => f,
            Err(e) => {
                warn!(socket = %name, "cannot set up a session: {e}");
                continue;
            }
        };
        let session = Arc::new(Session::new(fence, stream.try_clone().ok()));
        let conn = match Connection::new(Arc::clone(&export), Arc::clone(&session)) {
            Ok(c) => Arc::new(Mutex::new(c)),
            Err(e) => {
                warn!(socket = %name, "cannot set up a session: {e}");
                continue;
            }
        };
        let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(&conn));
        let why = loop {
            if let Err(e) = handler.handle_request() {
                break e;
            }
            if session.memory_lost() {
                break VuError::Disconnected;
            }
        };
        match why {
            _ if session.memory_lost() => warn!(
                socket = %name,
                "closing the session: the frontend truncated memory it had shared \
                 (the faults were contained; no other session is affected)"
            ),
            VuError::Disconnected | VuError::PartialMessage if stop.stopping() => {}
            VuError::Disconnected => info!(socket = %name, "frontend disconnected"),
            e => warn!(socket = %name, "closing the session: {e}"),
        }
        drop(handler);
        conn.lock().unwrap_or_else(|e| e.into_inner()).close();
        session.flush_logs();
        *stop.active.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(e) = export.flush() {
            warn!(socket = %name, "flush after the session: {e}");
        }
    }
}
