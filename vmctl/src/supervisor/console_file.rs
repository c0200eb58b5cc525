//! The console file of a running VM: the vmm's output copied into it by a
//! thread of its own, rotated at CONSOLE_CAP, its last lines kept when the
//! disk fills.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::CONSOLE_CAP;
use crate::state::VmDir;

/// Copies the console into console.log, rotating it at CONSOLE_CAP.
/// The console's copier: a thread appending the vmm's output to the
/// console file, and how many bytes it has copied.
pub(super) struct ConsoleTap {
    thread: std::thread::JoinHandle<()>,
    /// Bytes copied, and whether the copier has stopped.
    copied: Arc<(Mutex<(u64, bool)>, Condvar)>,
}

impl ConsoleTap {
    /// Until `bytes` were copied (the vmm's count at its end), the copier
    /// stopped (a full disk), or `limit`.
    pub(super) fn wait_for(&self, bytes: u64, limit: Duration) {
        let (count, more) = &*self.copied;
        let guard = count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = more.wait_timeout_while(guard, limit, |(n, stopped)| *n < bytes && !*stopped);
    }

    /// Until the copier has the console's end (the vmm's output closed);
    /// the bytes it copied.
    pub(super) fn finish(self) -> u64 {
        let _ = self.thread.join();
        let (count, _) = &*self.copied;
        count.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// Tells a console waiter the copier stopped, however it stops.
struct CopierStopped(Arc<(Mutex<(u64, bool)>, Condvar)>);

impl Drop for CopierStopped {
    fn drop(&mut self) {
        let (count, more) = &*self.0;
        count.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        more.notify_all();
    }
}

pub(super) fn keep_console(
    vm: &VmDir,
    mut from: impl Read + Send + 'static,
    attached: crate::console::Attached,
    relay: Option<crate::console::Relay>,
) -> ConsoleTap {
    let path = vm.console();
    let copied = Arc::new((Mutex::new((0u64, false)), Condvar::new()));
    let counter = Arc::clone(&copied);
    let thread = std::thread::spawn(move || {
        let _stopped = CopierStopped(Arc::clone(&counter));
        // Served as long as there is a console to copy (closed after).
        let _relay = relay;
        let mut file = ConsoleFile::open(path);
        let mut buf = [0u8; 8192];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // The pipe is always drained, whatever became of the file:
            // a vmm blocked on its console would stop its guest.
            file.append(&buf[..n]);
            crate::console::tee(&attached, &buf[..n]);
            let (count, more) = &*counter;
            count.lock().unwrap_or_else(|e| e.into_inner()).0 += n as u64;
            more.notify_all();
        }
        file.close();
    });
    ConsoleTap { thread, copied }
}

/// What the console keeps in memory while its file takes nothing (a full
/// disk): its last bytes, written out when there is room again or at
/// the end.
const CONSOLE_TAIL: usize = 64 << 10;

/// The console file, rotated at CONSOLE_CAP, that keeps its last lines
/// when the disk fills: what cannot be written is held (the last
/// CONSOLE_TAIL bytes) and written when room comes back, or at the end,
/// after a line saying how much was lost and why (the console's own older
/// bytes are given up for it if need be).
struct ConsoleFile {
    path: std::path::PathBuf,
    out: Option<std::fs::File>,
    written: u64,
    /// Bytes not written yet (the newest CONSOLE_TAIL of them), how many
    /// were dropped before those, and why the file took none.
    held: std::collections::VecDeque<u8>,
    dropped: u64,
    why: Option<std::io::Error>,
    retry_at: Option<Instant>,
}

impl ConsoleFile {
    fn open(path: std::path::PathBuf) -> ConsoleFile {
        let (out, why) = match Self::open_append(&path) {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(e)),
        };
        let written = out
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        ConsoleFile {
            path,
            out,
            written,
            held: Default::default(),
            dropped: 0,
            why,
            retry_at: None,
        }
    }

    fn open_append(p: &Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.why.is_none() && self.write(bytes).is_ok() {
            return;
        }
        self.hold(bytes);
        // Room may come back (a file deleted): tried again now and then,
        // not on every read.
        let now = Instant::now();
        if self.retry_at.is_none_or(|t| now >= t) {
            self.retry_at = Some(now + Duration::from_secs(1));
            self.flush_held(false);
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.written + bytes.len() as u64 > CONSOLE_CAP {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            self.out = None;
            self.written = 0;
        }
        let out = match &mut self.out {
            Some(f) => f,
            None => self.out.insert(Self::open_append(&self.path)?),
        };
        let result = out.write_all(bytes);
        if let Err(e) = result {
            // What a failed append left is cut off again (a partial line).
            let _ = out.set_len(self.written);
            // The older file is the first thing given up for room.
            if std::fs::remove_file(self.path.with_extension("log.1")).is_ok() {
                if let Some(out) = &mut self.out {
                    if out.write_all(bytes).is_ok() {
                        self.written += bytes.len() as u64;
                        return Ok(());
                    }
                    let _ = out.set_len(self.written);
                }
            }
            self.why = Some(e);
            return Err(std::io::Error::other("console file full"));
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn hold(&mut self, bytes: &[u8]) {
        self.held.extend(bytes);
        let over = self.held.len().saturating_sub(CONSOLE_TAIL);
        self.held.drain(..over);
        self.dropped += over as u64;
    }

    /// Writes what is held after a line saying what was lost. At the end
    /// (`last`), the file's own bytes are given up if that is the only
    /// room there is, and then as much of the end as fits.
    fn flush_held(&mut self, last: bool) {
        if self.held.is_empty() && self.why.is_none() {
            return;
        }
        let why = self
            .why
            .take()
            .map_or_else(|| "unknown".to_string(), |e| e.to_string());
        let held: Vec<u8> = self.held.iter().copied().collect();
        let dropped = self.dropped;
        let text = |keep: usize| {
            let lost = dropped + (held.len() - keep) as u64;
            let mut t = format!(
                "\n[vmctl: the console file took no more ({why}): {lost} bytes lost; its last {keep} bytes follow]\n"
            )
            .into_bytes();
            t.extend_from_slice(&held[held.len() - keep..]);
            t
        };
        if self.write(&text(held.len())).is_ok() {
            self.held.clear();
            self.dropped = 0;
            return;
        }
        if !last {
            return;
        }
        // The newest lines matter most: the file starts again with them,
        // as many as fit.
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&self.path) {
            let _ = f.set_len(0);
        }
        self.out = None;
        self.written = 0;
        let mut keep = held.len();
        loop {
            if self.write(&text(keep)).is_ok() || keep == 0 {
                return;
            }
            keep /= 2;
            // Whole lines: from the first line start in what is kept.
            if let Some(nl) = held[held.len() - keep..].iter().position(|&b| b == b'\n') {
                keep -= nl + 1;
            }
        }
    }

    fn close(mut self) {
        self.flush_held(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A console on a filesystem that fills up keeps its last lines,
    /// after one saying how much was lost and why.
    #[test]
    fn a_console_on_a_full_disk_keeps_its_last_lines() {
        if !rustix::process::geteuid().is_root() {
            println!("SKIPPED: a console on a full disk: needs root (mount)");
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount");
        assert!(st.success());
        let path = dir.path().join("console.log");
        let mut c = ConsoleFile::open(path.clone());
        let lines: Vec<String> = (0..20_000).map(|i| format!("line {i:05}\n")).collect();
        for l in &lines {
            c.append(l.as_bytes());
        }
        c.close();
        let kept = std::fs::read_to_string(&path).expect("read");
        let _ = Command::new("umount").arg(dir.path()).status();
        assert!(
            kept.contains("No space left on device") && kept.contains("bytes lost"),
            "{}",
            &kept[..kept.len().min(300)]
        );
        assert!(kept.ends_with("line 19999\n"), "the last line is kept");
        // What follows the note is the console's end, whole lines in order.
        let after = kept.rsplit_once("follow]\n").expect("the note").1;
        let first = after.lines().next().expect("a line");
        let k: usize = first
            .strip_prefix("line ")
            .and_then(|n| n.parse().ok())
            .expect("a whole line");
        let tail: String = lines[k..].concat();
        assert_eq!(after, tail);
    }
}
