//! A vhost-user device's watcher: the thread that waits for its backend
//! to go away and reconnects it (one per device: disks, NICs, shared
//! folders alike).

use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::control::{Control, RunState};
use crate::devices::virtio_pci::{BackendLink, ReconnectError};

/// Waits for a disk's backend to go away, then reconnects to it as soon as
/// it is back (the guest's requests wait meanwhile, and the backend resumes
/// them from the inflight region). Through the device's link only: the
/// transport's lock, which the vCPUs' exits take, is never held while a
/// backend is waited for.
pub fn watch(noun: &str, link: &dyn BackendLink, ctl: &Control, give_up_after: Duration) {
    // A guest whose driver keeps failing its device's start makes the
    // connection end again and again: those lines are bounded.
    let mut lines = cli_support::log_limit::LogLimit::default();
    loop {
        if ctl.state() == RunState::Stopping {
            return;
        }
        let Some(fd) = link.connection_fd() else {
            return;
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // Until the connection ends: nothing else needs this thread (a VM
        // that stops closes or keeps its connections, and the state is
        // looked at on waking). An idle VM's watcher woke 5 times a
        // second for nothing before.
        // SAFETY: poll on one pollfd; the descriptor stays open while the
        // device holds its connection (a reconnect replaces it only here).
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n <= 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) == 0 {
            continue;
        }
        lines.emit(
            || warn!("a {noun} backend went away; reconnecting"),
            |n| warn!("{n} more disconnections (not logged one by one)"),
        );
        let t0 = std::time::Instant::now();
        let mut last = String::new();
        // Soon at first (a restarted backend is back in tens of ms), then
        // at most ten attempts a second for one that stays away.
        let mut pause = Duration::from_millis(10);
        loop {
            if ctl.state() == RunState::Stopping {
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
            match link.reconnect() {
                Ok(()) => {
                    let after_ms = t0.elapsed().as_millis() as u64;
                    lines.emit(
                        || info!(after_ms, "{noun} backend reconnected"),
                        |n| info!("{n} more reconnections (not logged one by one)"),
                    );
                    break;
                }
                Err(ReconnectError::Incompatible(why)) => {
                    // Waiting will not make it compatible: say so now.
                    error!("{why}: its requests fail from now on");
                    link.give_up();
                    return;
                }
                Err(ReconnectError::NotYet(e)) => {
                    // The same reason again is not logged again.
                    let e = e.to_string();
                    if e != last {
                        debug!("reconnect: {e}");
                        last = e;
                    }
                    if t0.elapsed() >= give_up_after {
                        warn!(
                            "a {noun} backend stayed away for {} ms: its requests fail from now on ({last})",
                            give_up_after.as_millis()
                        );
                        link.give_up();
                        return;
                    }
                }
            }
        }
    }
}
