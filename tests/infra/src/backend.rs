//! Storage backends as child processes: the project's blk-backend and
//! qemu-storage-daemon (a vhost-user-blk server nobody here wrote).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::patience::Patience;

/// A qemu-storage-daemon serving a raw file as a vhost-user-blk export.
pub struct StorageDaemon {
    child: Child,
    pub socket: PathBuf,
}

impl StorageDaemon {
    pub fn start(image: &Path, socket: &Path, num_queues: u16, writable: bool) -> Result<Self> {
        Self::start_window(image, None, socket, num_queues, writable, None)
    }

    /// Serves the `(offset, size)` window of `image` (its raw driver's
    /// offset= and size=), or all of it; on the host CPUs `cpus` (a
    /// `taskset -c` list: it has no option of its own for where its
    /// threads run), or anywhere.
    pub fn start_window(
        image: &Path,
        window: Option<(u64, u64)>,
        socket: &Path,
        num_queues: u16,
        writable: bool,
        cpus: Option<&str>,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = match cpus {
            Some(list) => {
                let mut c = Command::new("taskset");
                c.args(["-c", list, "qemu-storage-daemon"]);
                c
            }
            None => Command::new("qemu-storage-daemon"),
        };
        let child = cmd
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring,discard=unmap",
                image.display()
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=raw,node-name=disk0,file=file0,discard=unmap{}",
                window.map_or(String::new(), |(o, n)| format!(",offset={o},size={n}"))
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={num_queues}",
                socket.display(),
                if writable { "on" } else { "off" }
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu-storage-daemon")?;
        let mut d = StorageDaemon {
            child,
            socket: socket.to_path_buf(),
        };
        wait_for_socket(&mut d.child, socket, "qemu-storage-daemon")?;
        Ok(d)
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Our own blk-backend serving an image, as a child process.
pub struct BlkBackendProcess {
    child: Child,
    pub socket: PathBuf,
}

/// `--export` values for (image, socket) pairs, and the sockets.
fn export_specs(exports: &[(PathBuf, PathBuf)]) -> (Vec<String>, Vec<PathBuf>) {
    let specs = exports
        .iter()
        .map(|(image, socket)| format!("socket={},image={}", socket.display(), image.display()))
        .collect();
    (specs, exports.iter().map(|e| e.1.clone()).collect())
}

impl BlkBackendProcess {
    /// `binary`: the built `blk-backend`.
    pub fn start(
        binary: &Path,
        image: &Path,
        socket: &Path,
        num_queues: u16,
        readonly: bool,
    ) -> Result<Self> {
        let spec = format!(
            "socket={},image={},num_queues={num_queues},readonly={}",
            socket.display(),
            image.display(),
            if readonly { "on" } else { "off" }
        );
        Self::spawn(binary, &[spec], &[socket.to_path_buf()])
    }

    /// Starts it with one `--export` per (image, socket) and waits for every socket.
    pub fn start_exports(binary: &Path, exports: &[(PathBuf, PathBuf)]) -> Result<Self> {
        Self::start_exports_with(binary, exports, &[])
    }

    /// The same with extra command-line options (`--base-io direct`, say).
    pub fn start_exports_with(
        binary: &Path,
        exports: &[(PathBuf, PathBuf)],
        options: &[&str],
    ) -> Result<Self> {
        let (specs, sockets) = export_specs(exports);
        Self::spawn_with(binary, &specs, &sockets, options)
    }

    /// The same, its log (at `info`) going to `log` instead of the
    /// test's output, for a test that counts what it logged.
    pub fn start_exports_logging_to(
        binary: &Path,
        exports: &[(PathBuf, PathBuf)],
        options: &[&str],
        log: &Path,
    ) -> Result<Self> {
        let (specs, sockets) = export_specs(exports);
        let file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        Self::spawn_logging(binary, &specs, &sockets, options, Stdio::from(file), "info")
    }

    fn spawn(binary: &Path, specs: &[String], sockets: &[PathBuf]) -> Result<Self> {
        Self::spawn_with(binary, specs, sockets, &[])
    }

    fn spawn_with(
        binary: &Path,
        specs: &[String],
        sockets: &[PathBuf],
        options: &[&str],
    ) -> Result<Self> {
        Self::spawn_logging(binary, specs, sockets, options, Stdio::inherit(), "warn")
    }

    fn spawn_logging(
        binary: &Path,
        specs: &[String],
        sockets: &[PathBuf],
        options: &[&str],
        stderr: Stdio,
        level: &str,
    ) -> Result<Self> {
        let mut c = Command::new(binary);
        c.args(options);
        // Quiet unless the caller asks (BLK_BACKEND_LOG=debug, say).
        c.env(
            "RUST_LOG",
            std::env::var("BLK_BACKEND_LOG").unwrap_or_else(|_| level.into()),
        );
        // A socket left by a killed backend stays: blk-backend itself
        // takes over a dead socket (and refuses anything else there).
        for spec in specs {
            c.arg("--export").arg(spec);
        }
        let stale: Vec<_> = sockets.iter().map(|s| inode(s)).collect();
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut b = BlkBackendProcess {
            child,
            socket: sockets.first().cloned().unwrap_or_default(),
        };
        for (socket, stale) in sockets.iter().zip(stale) {
            wait_for_new_socket(&mut b.child, socket, stale, "blk-backend")?;
        }
        Ok(b)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (CPU seconds used so far, resident set in bytes), from /proc.
    pub fn usage(&self) -> Option<(f64, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let cpu =
            (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / hz;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let rss_kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some((cpu, rss_kb * 1024))
    }

    /// Stops it (SIGSTOP) or lets it go on (SIGCONT): alive, its sockets
    /// open, and not answering meanwhile.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: signalling our own child process.
        let r = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(r, 0, "signalling blk-backend");
    }

    /// Kills it outright (SIGKILL), as a crash would, leaving the socket
    /// file in place.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.socket = PathBuf::new();
    }

    /// Asks it to stop (SIGTERM) and waits; panics if it does not end (it
    /// is killed first), or if it ends with a failure status.
    pub fn stop(mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // It ends every session, flushes and closes every image and exits:
        // 9-27 ms measured here idle; up to 1.6 s with the disk busy.
        let patience = Patience::new("blk-backend ending on SIGTERM", Duration::from_millis(1600));
        let mut status = None;
        let waited = patience.wait_until(|| {
            status = self.child.try_wait()?;
            Ok(status.is_some())
        });
        if let Err(e) = waited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("{e}");
        }
        let status = status.expect("waited for");
        assert!(
            status.success(),
            "blk-backend ended with {status} on SIGTERM"
        );
    }
}

impl Drop for BlkBackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// What is at `path`, if anything: its inode and change time (an inode
/// number alone is reused at once when a socket is replaced).
fn inode(path: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Whether a socket bound at `path` listens: its file appears at bind, a
/// moment before listen (a backend frozen or slow in between refuses
/// connections), and connecting to find out would be a session.
/// /proc/net/unix flags a listening socket with __SO_ACCEPTCON (0x10000).
pub fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        // Without the table (not Linux?), the file's presence must do.
        return true;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Waits until a backend process listens on `socket` (or dies trying).
fn wait_for_socket(child: &mut Child, socket: &Path, name: &str) -> Result<()> {
    wait_for_new_socket(child, socket, None, name)
}

/// The same where a dead socket (inode `stale`) may still be in the way:
/// only a socket other than that one counts.
fn wait_for_new_socket(
    child: &mut Child,
    socket: &Path,
    stale: Option<(u64, i64, i64)>,
    name: &str,
) -> Result<()> {
    // Both listen within about 60 ms of their start here (blk-backend 34 ms,
    // qemu-storage-daemon 59 ms, measured with the machine busy).
    let patience = Patience::new(
        format!("{name} listening on {}", socket.display()),
        Duration::from_millis(50),
    );
    patience.wait_until(|| {
        match inode(socket) {
            Some(ino) if Some(ino) != stale && listening(socket) => return Ok(true),
            _ => {}
        }
        if let Some(s) = child.try_wait()? {
            bail!("{name} exited with {s} before listening");
        }
        Ok(false)
    })?;
    Ok(())
}

/// A client of blk-backend's control socket (JSON lines, like QMP): the
/// protocol's own typed client ([`blk_control::Client`], which it derefs
/// to), connected once the socket listens.
pub struct BackendControl(blk_control::Client);

impl BackendControl {
    /// Connects, waiting for the socket to listen.
    pub fn connect(path: &Path) -> BackendControl {
        let mut client = None;
        Patience::new("the control socket", Duration::from_millis(50))
            .wait_until(|| {
                client = blk_control::Client::connect(path, None).ok();
                Ok(client.is_some())
            })
            .expect("blk-backend listens on its control socket");
        BackendControl(client.expect("connected"))
    }

    /// How long a reply may take before the call fails (none: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) {
        self.0.set_timeout(timeout).expect("timeout");
    }

    /// Sends one line as it is (one no command writes: not JSON, a command
    /// that does not exist), returns the reply line.
    pub fn raw(&mut self, text: &str) -> serde_json::Value {
        let line = self.0.raw(text).expect("reply");
        serde_json::from_str(&line).expect("a JSON reply")
    }
}

impl std::ops::Deref for BackendControl {
    type Target = blk_control::Client;
    fn deref(&self) -> &blk_control::Client {
        &self.0
    }
}

impl std::ops::DerefMut for BackendControl {
    fn deref_mut(&mut self) -> &mut blk_control::Client {
        &mut self.0
    }
}
