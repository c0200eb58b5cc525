//! A backend's listening socket: one frontend connection at a time; a
//! connection that breaks the protocol or goes away is closed with its
//! reason logged (once) and the next one is served. The socket stays bound
//! for the backend's life, so a frontend reconnecting after a restart or a
//! dropped session finds it.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, Listener, VhostUserBackendReqHandlerMut,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::session::Session;

/// What a session's request handler does when the session ends: its
/// workers stop (they can always be stopped: nothing they wait on blocks).
pub trait Served: VhostUserBackendReqHandlerMut {
    fn close(&mut self);
}

/// Lets another thread end a serving loop.
pub struct StopHandle {
    stopping: AtomicBool,
    /// Frontends served so far.
    sessions: AtomicU64,
    active: Mutex<Option<UnixStream>>,
    /// Wakes the accept loop at once (it waits on the listener and this).
    wake: Option<EventFd>,
}

impl Default for StopHandle {
    fn default() -> Self {
        StopHandle {
            stopping: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            active: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK).ok(),
        }
    }
}

impl StopHandle {
    /// Ends the current session (its workers drain) and the loop.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
        if let Some(s) = self
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Frontends served so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Whether a frontend is connected now.
    pub fn connected(&self) -> bool {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// Waits until the listener has a connection or `stop` is woken; without
/// a wake descriptor, at most 200 ms at a time.
fn readable(listener: &Listener, stop: &StopHandle) -> bool {
    let mut pfds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.wake.as_ref().map_or(-1, |w| w.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let wait = if stop.wake.is_some() { -1 } else { 200 };
    // SAFETY: poll on two pollfds (a negative fd is ignored by poll).
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, wait) };
    n > 0 && pfds[0].revents & libc::POLLIN != 0
}

/// Serves frontends on `listener` until `stop` says so, one at a time:
/// `open` makes each session's request handler, `after` runs when one
/// ended. `name` names the socket in the log.
pub fn serve<C: Served>(
    name: &str,
    listener: Listener,
    stop: &StopHandle,
    mut open: impl FnMut(Arc<Session>) -> std::io::Result<C>,
    mut after: impl FnMut(),
) {
    while !stop.stopping() {
        if !readable(&listener, stop) {
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
        stop.sessions.fetch_add(1, Ordering::Relaxed);
        let session = match Session::start(stream.try_clone().ok()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                warn!(socket = %name, "cannot set up a session: {e}");
                continue;
            }
        };
        let conn = match open(Arc::clone(&session)) {
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
                "closing the session: the frontend took away memory it had shared \
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
        after();
    }
}
