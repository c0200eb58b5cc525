//! Deadlines on waiting for a backend's reply.
//!
//! The vhost crate retries a socket call that would block or was
//! interrupted, without limit, so a socket timeout (SO_RCVTIMEO) turns a
//! blocked wait into a spinning one instead of ending it. So a wait is
//! bounded from outside: while a thread talks to a backend it holds an
//! [`Armed`] deadline; a watchdog thread shuts the connection down when the
//! deadline passes, and the blocked call then fails as it would on a
//! backend that went away (the device's watcher reconnects, or fails the
//! guest's requests once the backend stays away).

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Waits {
    next_id: u64,
    /// id -> (connection, deadline, fired)
    waits: BTreeMap<u64, (RawFd, Instant, Arc<AtomicBool>)>,
    /// When the watchdog wakes next on its own (None: only when told).
    /// A deadline later than that needs no wake-up: a handshake arms and
    /// disarms one per message, and waking the watchdog for each cost a
    /// VM's start 20 context switches.
    wakes_at: Option<Instant>,
}

struct Watchdog {
    state: Mutex<Waits>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::new(Watchdog {
            state: Mutex::default(),
            wake: Condvar::new(),
        }));
        // Without its thread no deadline fires; a vmm that cannot start
        // one is in no state to run a VM either, but it must not panic.
        if let Err(e) = std::thread::Builder::new()
            .name("deadlines".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::confine(&crate::seccomp::DEADLINES) {
                    tracing::error!("deadline watchdog: {e}: no deadline fires");
                    return;
                }
                w.run()
            })
        {
            tracing::error!("cannot start the deadline watchdog: {e}");
        }
        w
    })
}

impl Watchdog {
    fn run(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            st.waits.retain(|_, (fd, at, fired)| {
                if *at > now {
                    return true;
                }
                fired.store(true, Ordering::SeqCst);
                // SAFETY: shutdown on a connection whose owner holds the
                // Armed value for it, so the descriptor is still its own.
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
                false
            });
            let next = st.waits.values().map(|w| w.1).min();
            st.wakes_at = next;
            st = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    self.wake
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// A wait on connection `fd` that must end within its deadline; dropping
/// it disarms the deadline. The connection must stay open while it lives.
pub struct Armed {
    id: u64,
    fired: Arc<AtomicBool>,
}

/// Arms a deadline `timeout` from now on connection `fd`.
pub fn arm(fd: RawFd, timeout: Duration) -> Armed {
    let w = watchdog();
    let fired = Arc::new(AtomicBool::new(false));
    let mut st = w.state.lock().unwrap_or_else(|e| e.into_inner());
    let id = st.next_id;
    st.next_id += 1;
    let at = Instant::now() + timeout;
    st.waits.insert(id, (fd, at, Arc::clone(&fired)));
    if st.wakes_at.is_none_or(|t| at < t) {
        st.wakes_at = Some(at);
        w.wake.notify_one();
    }
    Armed { id, fired }
}

impl Armed {
    /// Whether the deadline passed (and the connection was shut down).
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Armed {
    /// Disarmed without waking the watchdog: at worst it wakes once at the
    /// old deadline and finds nothing due.
    fn drop(&mut self) {
        let w = watchdog();
        w.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waits
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_wait_past_its_deadline_ends_and_one_within_it_is_left_alone() {
        let (mut a, _b) = UnixStream::pair().expect("pair");
        let armed = arm(a.as_raw_fd(), Duration::from_millis(50));
        let mut buf = [0u8; 1];
        // Blocks until the watchdog shuts the socket down: end of file.
        assert_eq!(a.read(&mut buf).expect("read"), 0);
        assert!(armed.fired());

        let (c, mut d) = UnixStream::pair().expect("pair");
        let armed = arm(c.as_raw_fd(), Duration::from_secs(3600));
        std::io::Write::write_all(&mut d, b"x").expect("write");
        let mut c = c;
        assert_eq!(c.read(&mut buf).expect("read"), 1);
        assert!(!armed.fired());

        // A shorter deadline armed while the watchdog sleeps until a
        // longer one still fires on time; a disarmed one never does.
        let (e, _f) = UnixStream::pair().expect("pair");
        let gone = arm(e.as_raw_fd(), Duration::from_millis(20));
        drop(gone);
        let (mut g, _h) = UnixStream::pair().expect("pair");
        let short = arm(g.as_raw_fd(), Duration::from_millis(50));
        assert_eq!(g.read(&mut buf).expect("read"), 0);
        assert!(short.fired());
        drop(armed);
    }
}
