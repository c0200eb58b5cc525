//! The processes vmctl starts and watches (blk-backend, net-backend,
//! virtiofsd, the vmm, the host backend's daemon): how they are started
//! (in a session of their own, or dying with their parent), watched (a
//! pidfd each, waited on together), stopped (SIGTERM, then SIGKILL after
//! a deadline) and started again (with a backoff, so one that dies at
//! once is not restarted in a loop faster than it can fail).

use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal};

/// Runs `cmd` in a session of its own: no terminal hang-up reaches it.
pub fn own_session(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid in the child before exec: a system call, touches no
    // memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
}

/// `cmd` gets `signal` when the thread that spawned it ends (its
/// supervisor killed): nothing it started outlives it unwatched.
pub fn die_with_parent(cmd: &mut Command, signal: Signal) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl in the child before exec: a system call, touches no
    // memory of ours.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(signal))?;
            Ok(())
        });
    }
}

fn pid(pid: u32) -> std::io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// A pidfd of any process (a child's cannot be reused before it is
/// reaped; another's is checked alive by the caller right after).
pub fn pidfd_of(p: u32) -> std::io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(pid(p)?, PidfdFlags::empty())?)
}

/// A pidfd of our own child.
pub fn pidfd(child: &Child) -> std::io::Result<OwnedFd> {
    pidfd_of(child.id())
}

/// Sends `signal` to process `p`.
pub fn signal(p: u32, signal: Signal) -> std::io::Result<()> {
    Ok(rustix::process::kill_process(pid(p)?, signal)?)
}

/// Whether process `p` exists (signal 0 reaches it).
pub fn exists(p: u32) -> bool {
    pid(p).is_ok_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// Until one of `fds` is readable (a process ended, an answer came) or
/// `timeout` passed; which ones are.
pub fn wait_any(fds: &[&dyn AsFd], timeout: Option<Duration>) -> Vec<bool> {
    let mut polled: Vec<PollFd> = fds
        .iter()
        .map(|fd| PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::IN))
        .collect();
    let timeout = timeout.map(|t| rustix::event::Timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: t.subsec_nanos().into(),
    });
    match rustix::event::poll(&mut polled, timeout.as_ref()) {
        Ok(n) if n > 0 => polled.iter().map(|p| !p.revents().is_empty()).collect(),
        _ => vec![false; fds.len()],
    }
}

/// The env variable that gives a child the descriptor it says it is ready
/// on.
const READY_FD: &str = "VMCTL_READY_FD";

/// The parent's end of a readiness pipe: readable once the child said it
/// is ready (a byte), or ended without saying (its end of the pipe
/// closed).
pub struct Ready(OwnedFd);

impl AsFd for Ready {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Ready {
    /// A pipe whose writing end `cmd`'s child inherits (named in its
    /// environment); that end, returned too, is to be dropped once the
    /// child is spawned.
    pub fn pipe(cmd: &mut Command) -> std::io::Result<(Ready, OwnedFd)> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let raw = w.as_raw_fd();
        cmd.env(READY_FD, raw.to_string());
        // SAFETY: fcntl in the child before exec: a system call on a
        // descriptor the child has (inherited, its close-on-exec cleared
        // so that exec keeps it), touches no memory of ours.
        unsafe {
            cmd.pre_exec(move || {
                let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                Ok(())
            });
        }
        Ok((Ready(r), w))
    }
}

/// A child's end of its readiness pipe, when it was started with one.
pub struct Said(OwnedFd);

impl Said {
    /// The descriptor the parent named, taken out of the environment and
    /// closed on exec (nothing this process starts keeps it).
    pub fn inherited() -> Option<Said> {
        use std::os::fd::FromRawFd;
        let raw: i32 = std::env::var(READY_FD).ok()?.parse().ok()?;
        std::env::remove_var(READY_FD);
        // Not ours unless it is an open descriptor the parent left us: a
        // stale or foreign value is ignored.
        rustix::io::fcntl_getfd(
            // SAFETY: only borrowed to ask whether it is open.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) },
        )
        .ok()?;
        // SAFETY: the parent made this descriptor for us (`Ready::pipe`)
        // and nothing else in this process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).ok()?;
        Some(Said(fd))
    }

    /// Ready: the parent wakes.
    pub fn say(self) {
        let _ = rustix::io::write(&self.0, b"1");
    }
}

/// How long a stopped process has to end on SIGTERM (it closes its
/// images) before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops our child: SIGTERM, SIGKILL if it has not ended within `grace`,
/// then reaped. One that has ended already is only reaped.
pub fn stop(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return; // reaped already: its pid may be another's now
    }
    let ended = pidfd(child);
    // A signal to our own child, not yet reaped.
    let _ = signal(child.id(), Signal::TERM);
    let in_time = match &ended {
        Ok(fd) => wait_any(&[fd], Some(grace))[0],
        Err(_) => false,
    };
    if !in_time {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Stops process `p`, which is not our child (adopted: its pidfd taken
/// while it was known alive): SIGTERM, SIGKILL after `grace`; whether it
/// has ended.
pub fn stop_pid(p: u32, ended: &OwnedFd, grace: Duration) -> bool {
    let _ = signal(p, Signal::TERM);
    if wait_any(&[ended], Some(grace))[0] {
        return true;
    }
    let _ = signal(p, Signal::KILL);
    wait_any(&[ended], Some(grace))[0]
}

/// When a process that keeps dying may be started again: at once the
/// first time, then after 10 ms, doubling to at most 5 s while it keeps
/// dying within a minute of its start; one that ran longer starts again
/// at once.
#[derive(Debug)]
pub struct Backoff {
    started: Instant,
    next: Duration,
    /// A restart's time, when its wait was interrupted.
    pending: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MOST: Duration = Duration::from_secs(5);
    /// A run this long counts as healthy: the backoff starts over.
    const HEALTHY: Duration = Duration::from_secs(60);

    /// A process started now.
    pub fn new() -> Backoff {
        Backoff {
            started: Instant::now(),
            next: Duration::ZERO,
            pending: None,
        }
    }

    /// How long to wait before starting it again, now that it died; the
    /// wait after the next death grows.
    pub fn delay(&mut self) -> Duration {
        if self.started.elapsed() >= Self::HEALTHY {
            self.next = Duration::ZERO;
        }
        let delay = self.next;
        self.next = (self.next * 2).clamp(Self::FIRST, Self::MOST);
        delay
    }

    /// It was started again.
    pub fn started(&mut self) {
        self.started = Instant::now();
    }
}

/// A child that is started again when it dies: how it is spawned, the
/// running one, its pidfd, its backoff.
pub struct Supervised {
    /// How lines name it.
    pub name: String,
    spawn: Box<dyn FnMut() -> anyhow::Result<Child> + Send>,
    child: Child,
    ended: OwnedFd,
    backoff: Backoff,
    /// Times it was started again.
    pub restarts: u32,
}

impl Supervised {
    /// Starts it.
    pub fn start(
        name: impl Into<String>,
        mut spawn: impl FnMut() -> anyhow::Result<Child> + Send + 'static,
    ) -> anyhow::Result<Supervised> {
        let child = spawn()?;
        let ended = pidfd(&child)?;
        Ok(Supervised {
            name: name.into(),
            spawn: Box::new(spawn),
            child,
            ended,
            backoff: Backoff::new(),
            restarts: 0,
        })
    }

    /// Readable once the running process has ended.
    pub fn ended(&self) -> &OwnedFd {
        &self.ended
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Starts it again after it ended (reaped here), once its backoff has
    /// passed: how it had ended, or None when one of `interrupt` turned
    /// readable first (asked again later, it waits out the rest).
    pub fn restart(&mut self, interrupt: &[&dyn AsFd]) -> anyhow::Result<Option<String>> {
        let how = match self.child.wait() {
            Ok(st) => st.to_string(),
            Err(e) => e.to_string(),
        };
        let delay = self.backoff.pending.take().unwrap_or_else(|| {
            let d = self.backoff.delay();
            Instant::now() + d
        });
        let left = delay.saturating_duration_since(Instant::now());
        if !left.is_zero() && wait_any(interrupt, Some(left)).contains(&true) {
            self.backoff.pending = Some(delay);
            return Ok(None);
        }
        let child = (self.spawn)()?;
        self.ended = pidfd(&child)?;
        self.child = child;
        self.backoff.started();
        self.restarts += 1;
        Ok(Some(how))
    }

    /// Stops it (see [`stop`]).
    pub fn stop(&mut self) {
        stop(&mut self.child, STOP_GRACE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_keeps_dying_waits_longer_each_time_and_a_healthy_one_does_not() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| b.delay()).collect();
        assert_eq!(delays[0], Duration::ZERO, "the first restart is at once");
        assert_eq!(delays[1], Duration::from_millis(10));
        assert_eq!(delays[2], Duration::from_millis(20));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(5), "capped");
        // One that ran a minute starts over.
        b.started = Instant::now() - Duration::from_secs(61);
        assert_eq!(b.delay(), Duration::ZERO);
    }

    #[test]
    fn a_supervised_child_is_started_again_and_stopped_for_good() {
        let mut s = Supervised::start("sleeper", || Ok(Command::new("sleep").arg("30").spawn()?))
            .expect("start");
        let first = s.pid();
        assert!(!wait_any(&[s.ended()], Some(Duration::from_millis(10)))[0]);
        signal(first, Signal::KILL).expect("kill");
        assert!(wait_any(&[s.ended()], Some(Duration::from_secs(10)))[0]);
        let how = s.restart(&[]).expect("restart").expect("not interrupted");
        assert!(how.contains("signal"), "{how}");
        assert_ne!(s.pid(), first);
        assert_eq!(s.restarts, 1);
        assert!(exists(s.pid()));
        // Dying again at once: its restart waits its backoff, and
        // something else to attend to (a readable fd) comes first.
        signal(s.pid(), Signal::KILL).expect("kill");
        assert!(wait_any(&[s.ended()], Some(Duration::from_secs(10)))[0]);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        std::io::Write::write_all(&mut a, b"!").expect("write");
        assert!(s.restart(&[&b]).expect("restart").is_none());
        assert_eq!(s.restarts, 1);
        assert!(s.restart(&[]).expect("restart").is_some());
        assert_eq!(s.restarts, 2);
        s.stop();
        use std::os::unix::process::ExitStatusExt;
        let st = s.child_mut().try_wait().expect("reaped").expect("stopped");
        assert_eq!(st.signal(), Some(libc::SIGTERM), "{st}");
    }

    #[test]
    fn a_child_says_it_is_ready_or_its_end_wakes_the_parent() {
        let read = |r: &Ready| {
            let mut b = [0u8; 1];
            rustix::io::read(r, &mut b).expect("read")
        };
        // Says it, then goes on running: its word wakes the parent.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "printf 1 >&\"$VMCTL_READY_FD\"; exec sleep 30"]);
        let (ready, said) = Ready::pipe(&mut cmd).expect("pipe");
        let mut child = cmd.spawn().expect("sh");
        drop(said);
        assert!(wait_any(&[&ready], Some(Duration::from_secs(30)))[0]);
        assert_eq!(read(&ready), 1, "a byte, not the pipe's end");
        stop(&mut child, STOP_GRACE);
        // Ends without a word: the pipe's end wakes it all the same.
        let mut cmd = Command::new("true");
        let (ready, said) = Ready::pipe(&mut cmd).expect("pipe");
        let mut child = cmd.spawn().expect("true");
        drop(said);
        assert!(wait_any(&[&ready], Some(Duration::from_secs(30)))[0]);
        assert_eq!(read(&ready), 0, "the pipe's end");
        child.wait().expect("reaped");
    }

    #[test]
    fn stop_ends_a_child_that_ignores_sigterm() {
        // An ignored signal stays ignored across exec: sleep ignores it.
        let mut c = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; exec sleep 30"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        // Stopped only once the trap is set (a TERM before would end it
        // and prove nothing).
        let mut ready = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(c.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("ready");
        stop(&mut c, Duration::from_millis(200));
        use std::os::unix::process::ExitStatusExt;
        let st = c.try_wait().expect("reaped").expect("ended");
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    }
}
