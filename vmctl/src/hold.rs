//! A VM paused by a vmctl verb (snapshot, backup) for the length of its
//! work, owned by the VM's supervisor and not only by that verb: the verb
//! writes `hold.json` (its pid) before it pauses and removes it after it
//! resumes; a supervisor that sees the verb end with the hold still there
//! (killed, Ctrl-C, a closed terminal) resumes the VM itself. A VM never
//! stays paused because the client that paused it is gone.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use cli_support::path_wait;
use serde::{Deserialize, Serialize};

use crate::process::{pidfd_of, wait_any};
use crate::state::{read_json, write_json, VmDir};

const HOLD: &str = "hold.json";

/// What a verb holding a VM paused says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRecord {
    /// The verb's process, and when it started (a pid alone may be
    /// another process's by the time it is looked at).
    pub pid: u32,
    pub started: u64,
    /// What it is doing (said when the supervisor takes over).
    pub what: String,
}

/// When process `pid` started (/proc/PID/stat's starttime), if it lives.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields are counted
    // after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn path(vm: &VmDir) -> PathBuf {
    vm.path.join(HOLD)
}

/// Held by this process while it lives (removed when dropped, after the
/// verb resumed the VM).
pub struct Held {
    path: PathBuf,
}

impl Held {
    pub fn take(vm: &VmDir, what: &str) -> Result<Held> {
        let pid = std::process::id();
        let record = HoldRecord {
            pid,
            started: start_time(pid).unwrap_or(0),
            what: what.to_string(),
        };
        write_json(&path(vm), &record)?;
        Ok(Held { path: path(vm) })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The holder's process, while it lives: None when the record names a
/// process that is gone (or another one now).
fn holder_alive(r: &HoldRecord) -> Option<std::os::fd::OwnedFd> {
    let fd = pidfd_of(r.pid).ok()?;
    // Checked after the pidfd is open: it then names this process or a
    // dead one, never a newer one.
    (start_time(r.pid) == Some(r.started)).then_some(fd)
}

/// The supervisor's side: until `stop` is readable, waits for holds and
/// for their holders to end; a holder that ended with its hold in place
/// has the VM resumed (resuming a running VM does nothing) and the hold
/// removed. `said` records what it did.
pub fn keep(vm: &VmDir, stop: &dyn AsFd, said: &dyn Fn(String)) {
    let hold = path(vm);
    loop {
        let (waited, _kept) = path_wait::wait_for(&hold, None, &[stop.as_fd()]);
        if waited != path_wait::Waited::Appeared {
            return;
        }
        let Ok(r) = read_json::<HoldRecord>(&hold) else {
            // Being written (write_json renames into place) or damaged:
            // looked at again shortly.
            if wait_any(&[stop], Some(Duration::from_millis(20)))[0] {
                return;
            }
            continue;
        };
        if let Some(alive) = holder_alive(&r) {
            // Until the holder ends (its hold removed first, normally).
            if wait_any(&[stop, &alive as &dyn AsFd], None)[0] {
                return;
            }
        }
        // The holder is gone; its hold, if still there, is taken over.
        if read_json::<HoldRecord>(&hold).is_ok_and(|now| now == r) {
            let resumed = crate::vm_api::resume(vm);
            let _ = std::fs::remove_file(&hold);
            said(match resumed {
                Ok(_) => format!(
                    "vmctl (pid {}) ended during {} with the VM held: resumed it",
                    r.pid, r.what
                ),
                Err(e) => format!(
                    "vmctl (pid {}) ended during {} with the VM held; resuming it: {}",
                    r.pid,
                    r.what,
                    cli_support::report(&e)
                ),
            });
        }
    }
}

/// The supervisor's keeper of holds, on a thread of its own for the
/// length of a run; stopped and joined when dropped.
pub struct Keeper {
    _thread: crate::stoppable::Stoppable,
}

impl Keeper {
    pub fn start(vm: &VmDir) -> Result<Keeper> {
        let vm = vm.clone();
        let thread = crate::stoppable::Stoppable::spawn("holds", move |stop| {
            keep(&vm, &stop, &|line| {
                crate::state::note(&vm, format_args!("{line}"))
            })
        })?;
        Ok(Keeper { _thread: thread })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_start_time_is_read_whatever_its_name() {
        assert!(start_time(std::process::id()).is_some());
        assert!(start_time(u32::MAX).is_none());
    }

    #[test]
    fn a_hold_lives_as_long_as_its_holder() {
        let d = tempfile::tempdir().expect("dir");
        let vm = VmDir {
            name: "a".into(),
            path: d.path().to_path_buf(),
        };
        let held = Held::take(&vm, "a test").expect("hold");
        let r: HoldRecord = read_json(&path(&vm)).expect("a record");
        assert!(holder_alive(&r).is_some());
        drop(held);
        assert!(!path(&vm).exists());
        let gone = HoldRecord {
            pid: r.pid,
            started: r.started + 1,
            what: r.what,
        };
        assert!(holder_alive(&gone).is_none(), "another process by that pid");
    }
}
