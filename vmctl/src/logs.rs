//! `vmctl logs NAME [--tail N] [--follow]`: the VM's console as kept
//! (console.log.1, then console.log), and with `--follow` what the guest
//! writes next, until the VM ends, woken by inotify (never a timer).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result};
use rustix::fs::inotify;

use crate::process::{pidfd_of, wait_any};
use crate::state::VmDir;

/// What is kept of the console: console.log.1 (the older half, once it
/// rotated), then console.log. Bytes as the guest wrote them (a guest may
/// write any).
pub fn console_bytes(vm: &VmDir) -> Vec<u8> {
    let mut bytes = std::fs::read(vm.console().with_extension("log.1")).unwrap_or_default();
    bytes.extend(std::fs::read(vm.console()).unwrap_or_default());
    bytes
}

/// The console as text (bytes that are not UTF-8 shown as U+FFFD).
pub fn console_text(vm: &VmDir) -> String {
    String::from_utf8_lossy(&console_bytes(vm)).into_owned()
}

/// Where the last `n` lines of `text` begin.
fn tail_start(text: &[u8], n: usize) -> usize {
    if n == 0 {
        return text.len();
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    body.iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
        .map_or(0, |(i, _)| i + 1)
}

/// Prints the console (its last `tail` lines); with `follow`, then what
/// comes until the VM is no longer active, byte for byte.
pub fn show(vm: &VmDir, tail: Option<usize>, follow: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if !follow {
        let text = console_bytes(vm);
        let from = tail.map_or(0, |t| tail_start(&text, t));
        out.write_all(&text[from..])?;
        // A last line the guest has not ended yet still ends the output.
        if from < text.len() && !text.ends_with(b"\n") {
            out.write_all(b"\n")?;
        }
        return Ok(out.flush()?);
    }
    // Watched before the first read: text written in between is seen.
    let watch = ConsoleWatch::new(vm)?;
    let mut following = Following::new(vm.console());
    let mut text = std::fs::read(vm.console().with_extension("log.1")).unwrap_or_default();
    following.read_new(&mut text)?;
    let from = tail.map_or(0, |t| tail_start(&text, t));
    out.write_all(&text[from..])?;
    out.flush()?;
    let mut new = Vec::new();
    loop {
        // Looked at before the text: the last text of a VM that ended is
        // printed before the end is believed.
        let active = vm.observed()?.is_active();
        new.clear();
        following.read_new(&mut new)?;
        out.write_all(&new)?;
        out.flush()?;
        if !active {
            return Ok(());
        }
        // Its supervisor's end, when it is killed and records nothing.
        let supervisor = vm
            .status()?
            .and_then(|s| s.supervisor_pid)
            .and_then(|pid| pidfd_of(pid).ok());
        watch.wait(supervisor.as_ref());
    }
}

/// The console file `--follow` reads, as `tail -F` does: kept open (after
/// a rotation renames it console.log.1, its last bytes are still read
/// from it), then the new file by that name from its start. Only what was
/// written since is read at each wake, not the whole console again.
struct Following {
    path: PathBuf,
    file: Option<(std::fs::File, u64)>,
    /// Bytes of `file` read so far.
    at: u64,
}

impl Following {
    fn new(path: PathBuf) -> Following {
        Following {
            path,
            file: None,
            at: 0,
        }
    }

    /// Appends to `into` what was written since the last call.
    fn read_new(&mut self, into: &mut Vec<u8>) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        loop {
            if let Some((f, _)) = &mut self.file {
                if f.metadata()?.len() < self.at {
                    // Cut short (a full disk's last resort): its start
                    // holds the newest lines.
                    self.at = 0;
                }
                f.seek(SeekFrom::Start(self.at))?;
                self.at += f.read_to_end(into)? as u64;
            }
            // Made, or rotated: the name holds another file now, read
            // from its start (the old one is done: nothing more is
            // written to it).
            let Ok(next) = std::fs::File::open(&self.path) else {
                return Ok(());
            };
            let ino = next.metadata()?.ino();
            if self.file.as_ref().is_some_and(|(_, i)| *i == ino) {
                return Ok(());
            }
            self.file = Some((next, ino));
            self.at = 0;
        }
    }
}

/// Wakes on what `--follow` prints or ends on: a write to console.log (a
/// watch on the file), the file made or rotated and the VM's record
/// rewritten (a watch on its directory for names made or moved in; not
/// for writes, or the disk image beside them would wake it at every I/O).
struct ConsoleWatch {
    fd: OwnedFd,
    console: PathBuf,
}

impl ConsoleWatch {
    fn new(vm: &VmDir) -> Result<ConsoleWatch> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .context("setting up an inotify watch")?;
        inotify::add_watch(
            &fd,
            &vm.path,
            inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
        )
        .with_context(|| format!("watching {}", vm.path.display()))?;
        let watch = ConsoleWatch {
            fd,
            console: vm.console(),
        };
        watch.arm();
        Ok(watch)
    }

    /// A watch on the console file now by that name (none yet: the
    /// directory's watch says when it is made).
    fn arm(&self) {
        let _ = inotify::add_watch(&self.fd, &self.console, inotify::WatchFlags::MODIFY);
    }

    /// Until something was written, made or moved in, or `also` is
    /// readable.
    fn wait(&self, also: Option<&OwnedFd>) {
        let mut fds: Vec<&dyn AsFd> = vec![&self.fd];
        if let Some(a) = also {
            fds.push(a);
        }
        wait_any(&fds, None);
        let mut events = [0u8; 4096];
        while rustix::io::read(&self.fd, &mut events).is_ok_and(|n| n > 0) {}
        self.arm();
    }
}

#[cfg(test)]
mod tests {
    use super::{tail_start, Following};
    use std::io::Write;

    #[test]
    fn following_reads_each_byte_once_through_rotations_and_a_cut() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("console.log");
        let mut f = Following::new(path.clone());
        let mut got = Vec::new();
        f.read_new(&mut got).expect("no file yet");
        assert!(got.is_empty());
        let append = |b: &[u8]| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut o| o.write_all(b))
                .expect("append")
        };
        append(b"one\n");
        f.read_new(&mut got).expect("read");
        append(b"two\n");
        f.read_new(&mut got).expect("read");
        // Written, then rotated before it was read; the new file after.
        append(b"three\n");
        std::fs::rename(&path, path.with_extension("log.1")).expect("rotate");
        append(b"four\n");
        f.read_new(&mut got).expect("read");
        assert_eq!(got, b"one\ntwo\nthree\nfour\n");
        // Cut short in place: its start again.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|o| o.set_len(0))
            .expect("cut");
        append(b"5\n");
        got.clear();
        f.read_new(&mut got).expect("read");
        assert_eq!(got, b"5\n");
    }

    #[test]
    fn the_tail_starts_at_its_first_line_however_the_text_ends() {
        let text = b"a\nbb\nccc\n";
        assert_eq!(&text[tail_start(text, 1)..], b"ccc\n");
        assert_eq!(&text[tail_start(text, 2)..], b"bb\nccc\n");
        assert_eq!(tail_start(text, 3), 0);
        assert_eq!(tail_start(text, 9), 0);
        assert_eq!(tail_start(text, 0), text.len());
        // A last line not ended yet is a line.
        let open = b"a\nbb";
        assert_eq!(&open[tail_start(open, 1)..], b"bb");
        assert_eq!(tail_start(b"", 1), 0);
    }
}
