//! Waiting for a path to appear (a socket a process beside this one is
//! about to make): an inotify watch on its directory wakes the waiter
//! when something is made there. A stat and a sleep in a loop did the
//! same for a fleet's vmms at 0.5 ms of CPU each (their disks' exports
//! waiting 100-200 ms behind the others'), and for their supervisors at
//! 1-2 ms each (waiting for the vmms' API sockets).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::inotify;

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The path exists.
    Appeared,
    /// One of the other descriptors became readable first (the process
    /// that was to make the path ended, say).
    Woken,
    /// The deadline passed.
    TimedOut,
}

/// The inotify instance a wait used, to be kept until the caller is done
/// with what it waited for. Closing an instance whose watch was just
/// removed waits for a grace period (15 ms here): the watch goes as soon
/// as the wait ends, the instance later, when its teardown is long done.
#[derive(Debug, Default)]
pub struct Kept {
    _fd: Option<OwnedFd>,
}

/// Until `path` exists, one of `also` is readable, or `until` passes.
/// Where no watch can be set up (no such directory, no inotify) it looks
/// again every few milliseconds.
pub fn wait_for(path: &Path, until: Option<Instant>, also: &[BorrowedFd<'_>]) -> (Waited, Kept) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let watch = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        .ok()
        .and_then(|fd| {
            let wd = inotify::add_watch(
                &fd,
                dir,
                inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
            )
            .ok()?;
            Some((fd, wd))
        });
    // Watched first, looked second: a path made in between is seen here,
    // one made after wakes the poll.
    let mut events = [0u8; 1024];
    let mut pause = Duration::from_millis(1);
    let waited = loop {
        if path.exists() {
            break Waited::Appeared;
        }
        let mut left = until.map(|u| u.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            break Waited::TimedOut;
        }
        if watch.is_none() {
            left = Some(left.map_or(pause, |l| l.min(pause)));
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        let timeout = left.and_then(|l| Timespec::try_from(l).ok());
        let mut fds: Vec<PollFd<'_>> = also
            .iter()
            .map(|fd| PollFd::from_borrowed_fd(*fd, PollFlags::IN))
            .collect();
        if let Some((fd, _)) = &watch {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => break Waited::TimedOut,
        }
        if fds[..also.len()].iter().any(|f| !f.revents().is_empty()) && !path.exists() {
            break Waited::Woken;
        }
        if let Some((fd, _)) = &watch {
            while rustix::io::read(fd, &mut events).is_ok_and(|n| n > 0) {}
        }
    };
    let kept = watch.map(|(fd, wd)| {
        let _ = inotify::remove_watch(&fd, wd);
        fd
    });
    (waited, Kept { _fd: kept })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

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
        let until = Instant::now() + Duration::from_secs(60);
        assert_eq!(wait_for(&path, Some(until), &[]).0, Waited::Appeared);
        maker.join().expect("maker");

        let t = Instant::now();
        let missing = dir.path().join("never.sock");
        let until = t + Duration::from_millis(30);
        assert_eq!(wait_for(&missing, Some(until), &[]).0, Waited::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(30));
        // No directory to watch: looked for again until the deadline.
        let gone = dir.path().join("no/such/dir.sock");
        let until = Instant::now() + Duration::from_millis(10);
        assert_eq!(wait_for(&gone, Some(until), &[]).0, Waited::TimedOut);
    }

    #[test]
    fn another_descriptor_ends_the_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        drop(b);
        let (waited, _kept) = wait_for(&dir.path().join("api.sock"), None, &[a.as_fd()]);
        assert_eq!(waited, Waited::Woken);
    }
}
