//! Who may use a layer file at the same time: advisory locks that every
//! process of the project takes and honours.
//!
//! Open file description locks (`F_OFD_SETLK`) on the whole file: they
//! belong to one open of the file, not to a process, so two opens in one
//! process conflict like two processes do (two exports of one image in one
//! blk-backend are refused), and the kernel drops them when the last
//! descriptor closes, a kill -9 included. A writer of a layer holds it
//! exclusive; whoever reads a layer as part of a chain it serves (a base
//! under a clone) holds it shared, so nobody can commit into a base while
//! a clone of it is served. Inspecting (`img info`, `map`, `check` without
//! repair) takes no lock and asks who holds one instead.
//!
//! The lock lives on a descriptor of its own, opened only for it, so the
//! layer's own descriptors (and the io_uring path's) are free to come and go.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a lock allows others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Others may read (hold it shared) too, nobody may write.
    Shared,
    /// Nobody else may hold any lock: this process writes the layer.
    Exclusive,
}

impl LockKind {
    fn fcntl_type(self) -> libc::c_short {
        match self {
            LockKind::Shared => libc::F_RDLCK as libc::c_short,
            LockKind::Exclusive => libc::F_WRLCK as libc::c_short,
        }
    }
}

/// A lock another open of the file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub kind: LockKind,
    /// The process that took it, where /proc/locks says.
    pub pid: Option<u32>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            LockKind::Exclusive => "open for writing",
            LockKind::Shared => "in use as a base of a served chain",
        };
        match self.pid {
            Some(pid) if pid == std::process::id() => {
                write!(f, "{what} by this process (another open of the same file)")
            }
            Some(pid) => write!(f, "{what} by process {pid}"),
            None => write!(f, "{what} by another process"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {holder}; refusing to {wanted} it (stop that user first)")]
    InUse {
        path: PathBuf,
        holder: Holder,
        wanted: &'static str,
    },
    /// The file could not be opened (it is missing, say).
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: locking it: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct ImageLock {
    /// `None` for an environment without locks (the crash harness's).
    _file: Option<File>,
}

impl ImageLock {
    /// A lock that guards nothing (environments without real files).
    pub fn none() -> ImageLock {
        ImageLock { _file: None }
    }
}

fn whole_file(kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end, however the file grows
    fl
}

/// Takes `kind` on `path` without waiting; `wanted` says what for, in the
/// error ("write", "commit into", ...).
pub fn acquire(path: &Path, kind: LockKind, wanted: &'static str) -> Result<ImageLock, LockError> {
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    // A write lock needs a descriptor open for writing (EBADF otherwise).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(kind == LockKind::Exclusive)
        .open(path)
        .map_err(|source| LockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let mut fl = whole_file(kind.fcntl_type());
    // SAFETY: F_OFD_SETLK on our own descriptor with a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if rc == 0 {
        return Ok(ImageLock { _file: Some(file) });
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            let holder = holder_of(&file, kind).map_err(io)?.unwrap_or(Holder {
                kind: LockKind::Exclusive,
                pid: None,
            });
            Err(LockError::InUse {
                path: path.to_path_buf(),
                holder,
                wanted,
            })
        }
        _ => Err(io(err)),
    }
}

/// Waits, at most `patience`, until no writer holds `path` (whoever
/// holds it exclusive lets go, or the file is gone): true then, false when
/// the patience ran out. The kernel does the waiting (`F_OFD_SETLKW` for
/// a shared lock, in a thread of its own that lets go of it at once), not
/// a poll; a thread still blocked when its caller gave up gets the lock
/// later and lets go as promptly, or ends with the process.
pub fn wait_for_writer(path: &Path, patience: std::time::Duration) -> Result<bool, LockError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(source) => {
            return Err(LockError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("layer lock wait".into())
        .spawn(move || {
            let mut fl = whole_file(LockKind::Shared.fcntl_type());
            // SAFETY: F_OFD_SETLKW on our own descriptor with a valid
            // flock; the lock goes with the descriptor, dropped below.
            let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &mut fl) };
            let got = if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            };
            drop(file);
            let _ = tx.send(got);
        })
        .map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    match rx.recv_timeout(patience) {
        Ok(Ok(())) => Ok(true),
        Ok(Err(source)) => Err(LockError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(false),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(LockError::Io {
            path: path.to_path_buf(),
            source: io::Error::other("the lock wait ended without an answer"),
        }),
    }
}

/// Who holds a lock on `path` that would stop a writer (any lock), if anyone.
pub fn holder(path: &Path) -> io::Result<Option<Holder>> {
    holder_of(&File::open(path)?, LockKind::Exclusive)
}

/// The lock that would stop `kind` on `file`, if any.
fn holder_of(file: &File, kind: LockKind) -> io::Result<Option<Holder>> {
    let mut fl = whole_file(kind.fcntl_type());
    // SAFETY: F_OFD_GETLK on our own descriptor with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let kind = match fl.l_type as libc::c_int {
        libc::F_UNLCK => return Ok(None),
        libc::F_WRLCK => LockKind::Exclusive,
        _ => LockKind::Shared,
    };
    // OFD locks report no pid through fcntl or /proc/locks (-1); the
    // holder's descriptors list them.
    let meta = file.metadata()?;
    let pid = holder_pid_from_fdinfo(meta.dev(), meta.ino(), kind);
    Ok(Some(Holder { kind, pid }))
}

/// The process holding a lock of `kind` on the inode, if it can be found.
/// /proc/locks shows OFD locks with pid -1, but each holder's descriptor
/// lists its locks in /proc/PID/fdinfo/FD ("lock:" lines), so the holder
/// is looked for there (only after a conflict: it reads every process's
/// descriptors).
fn holder_pid_from_fdinfo(dev: u64, ino: u64, kind: LockKind) -> Option<u32> {
    let id = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    let want = match kind {
        LockKind::Exclusive => "WRITE",
        LockKind::Shared => "READ",
    };
    let holds = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("lock:"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|f| f.len() >= 7 && f[6] == id && f[4] == want)
    };
    let me = std::process::id();
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_to_string(fd.path()).is_ok_and(|t| holds(&t)))
        {
            // Another process is the better answer when this one holds
            // the same kind too (two opens in one process).
            if pid != me {
                return Some(pid);
            }
            found = Some(pid);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_the_writer_ends_when_it_lets_go_or_the_patience_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("layer");
        std::fs::write(&p, b"x").unwrap();
        let w = acquire(&p, LockKind::Exclusive, "write").unwrap();
        let short = std::time::Duration::from_millis(50);
        assert!(!wait_for_writer(&p, short).unwrap(), "the writer holds it");
        // A waiter started before the writer lets go: it ends whichever
        // comes first.
        let q = p.clone();
        let waiter = std::thread::spawn(move || {
            wait_for_writer(&q, std::time::Duration::from_secs(600)).unwrap()
        });
        drop(w);
        assert!(waiter.join().unwrap());
        // Readers do not stop it; a file gone has no writer.
        let _r = acquire(&p, LockKind::Shared, "read").unwrap();
        assert!(wait_for_writer(&p, short).unwrap());
        assert!(wait_for_writer(&dir.path().join("gone"), short).unwrap());
    }

    #[test]
    fn writers_exclude_everyone_readers_share_and_dropping_releases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("layer");
        std::fs::write(&p, b"x").unwrap();
        let w = acquire(&p, LockKind::Exclusive, "write").unwrap();
        // A second open, even in this process, is refused, naming us.
        let err = acquire(&p, LockKind::Exclusive, "write").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("open for writing"), "{msg}");
        assert!(msg.contains("by this process"), "{msg}");
        assert!(acquire(&p, LockKind::Shared, "read").is_err());
        assert_eq!(
            holder(&p).unwrap().map(|h| h.kind),
            Some(LockKind::Exclusive)
        );
        drop(w);
        assert_eq!(holder(&p).unwrap(), None);
        let r1 = acquire(&p, LockKind::Shared, "read").unwrap();
        let _r2 = acquire(&p, LockKind::Shared, "read").unwrap();
        let err = acquire(&p, LockKind::Exclusive, "commit into").unwrap_err();
        assert!(err.to_string().contains("in use as a base"), "{err}");
        drop(r1);
    }
}
