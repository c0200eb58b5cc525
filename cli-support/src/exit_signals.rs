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
