//! Waiting for a backend's socket to appear, for a vmm started beside its
//! backend (as vmctl starts them, so that the vmm's exec and KVM set-up
//! overlap the export's): an inotify watch on the socket's directory wakes
//! the waiter when something is made there. A stat and a sleep in a loop
//! did the same for a fleet's vmms at 0.5 ms of CPU each, their exports
//! waiting 100-200 ms behind the others'.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Instant;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::inotify;

/// The inotify instance a wait used. Closing one waits for a grace period
/// (15 ms here) while its watch is being torn down: the watch is removed
/// as soon as the wait ends and the instance kept until the device goes
/// (by then the teardown is long done and closing costs nothing).
#[derive(Debug)]
pub struct Watch {
    _fd: OwnedFd,
}

/// Until `path` exists or `until` passes (whichever first). `None` when no
/// watch could be set up (the directory does not exist, no inotify): the
/// caller then looks again after a pause.
pub fn wait_for(path: &Path, until: Instant) -> Option<Watch> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).ok()?;
    let wd = inotify::add_watch(
        &fd,
        dir,
        inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
    )
    .ok()?;
    // Watched first, looked second: a socket made in between is seen here,
    // one made after wakes the poll.
    let mut events = [0u8; 1024];
    while !path.exists() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = Timespec::try_from(left).ok();
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
        while rustix::io::read(&fd, &mut events).is_ok_and(|n| n > 0) {}
    }
    let _ = inotify::remove_watch(&fd, wd);
    Some(Watch { _fd: fd })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_path_made_later_ends_the_wait_and_a_missing_one_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backend.sock");
        let maker = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                std::fs::write(&path, b"").expect("made");
            })
        };
        // Generous: the wait must end when the file appears, not at this.
        assert!(wait_for(&path, Instant::now() + Duration::from_secs(60)).is_some());
        assert!(path.exists());
        maker.join().expect("maker");

        let t = Instant::now();
        let missing = dir.path().join("never.sock");
        assert!(wait_for(&missing, t + Duration::from_millis(30)).is_some());
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(!missing.exists());
        // No directory to watch: the caller falls back to looking again.
        assert!(wait_for(&dir.path().join("no/such/dir.sock"), Instant::now()).is_none());
    }
}
