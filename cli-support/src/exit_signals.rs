//! SIGTERM, SIGINT and SIGHUP (a closed terminal), taken by one thread: blocked before the process
//! starts its threads (which inherit the mask), then waited for where the
//! process decides how to end (unmounting, flushing), not in a handler.

use std::io;
use std::time::Duration;

/// The exit signals, blocked in the calling thread (and the threads it
/// starts from now on).
pub struct ExitSignals(libc::sigset_t);

impl ExitSignals {
    pub fn block() -> io::Result<ExitSignals> {
        // SAFETY: signal-mask calls on a local, initialised sigset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGHUP);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(ExitSignals(set))
        }
    }

    /// Waits for one: its number.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: sigwait on signals this thread blocked.
        unsafe { libc::sigwait(&self.0, &mut sig) };
        sig
    }

    /// Waits for one at most `limit`: its number, or None.
    pub fn wait_for(&self, limit: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: limit.as_secs() as libc::time_t,
            tv_nsec: limit.subsec_nanos() as libc::c_long,
        };
        // SAFETY: sigtimedwait on signals this thread blocked, with a
        // timespec of ours; no siginfo asked for.
        let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }
}

/// SIGTERM, SIGINT and SIGHUP caught by handlers (signal-hook's, each
/// writing to a socket pair of its own), for a process that starts
/// children: a blocked mask ([`ExitSignals`]) is inherited by every child
/// it starts (std leaves the mask as it is across exec), which then
/// cannot be stopped with SIGTERM; a handler is reset to the default by
/// exec. Catching also overrides an ignored SIGINT inherited from a
/// non-interactive shell.
pub struct CaughtSignals {
    read: Vec<(i32, std::os::unix::net::UnixStream)>,
}

impl CaughtSignals {
    pub fn catch() -> io::Result<CaughtSignals> {
        let mut read = Vec::new();
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            let (r, w) = std::os::unix::net::UnixStream::pair()?;
            w.set_nonblocking(true)?;
            signal_hook::low_level::pipe::register(sig, w)?;
            read.push((sig, r));
        }
        Ok(CaughtSignals { read })
    }

    /// Waits for one: its number.
    pub fn wait(&self) -> i32 {
        loop {
            if let Some(sig) = self.wait_for(Duration::from_secs(3600)) {
                return sig;
            }
        }
    }

    /// Waits for one at most `limit`: its number, or None.
    pub fn wait_for(&self, limit: Duration) -> Option<i32> {
        let mut fds: Vec<libc::pollfd> = self
            .read
            .iter()
            .map(|(_, r)| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(r),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = limit.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on pollfds of this frame, their count given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return None;
        }
        fds.iter()
            .zip(&self.read)
            .find(|(p, _)| p.revents != 0)
            .map(|(_, (sig, _))| *sig)
    }
}
