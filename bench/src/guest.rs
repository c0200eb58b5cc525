//! Host side of the bench guest: build it, boot it under QEMU with a disk
//! (QEMU's own virtio-blk or a vhost-user-blk backend such as
//! qemu-storage-daemon), and read back its start marker and JSON line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The marker the guest prints first.
pub const START_MARKER: &str = "BENCH-GUEST START";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

/// Builds the guest once per process; returns the ELF's path.
pub fn build_guest() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = repo_root().join("bench/guest/build.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("{}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "building the bench guest failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let path = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string();
            Ok(PathBuf::from(path))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Whether KVM can be used here; says loudly why not.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("SKIPPED: {test}: /dev/kvm is not available on this machine");
    }
    ok
}

/// Whether a program is on PATH; says loudly why not.
pub fn have(program: &str, test: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        println!("SKIPPED: {test}: {program} is not installed");
    }
    ok
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// microvm + qboot: QEMU's fastest boot (ECAM only, no port config access).
    Microvm,
    /// q35 + SeaBIOS: slow firmware, config access through ports too.
    Q35,
}

#[derive(Clone, Debug)]
pub enum Disk {
    /// QEMU's own virtio-blk-pci on a raw file.
    Builtin {
        path: PathBuf,
        readonly: bool,
        num_queues: u16,
        iothread: bool,
    },
    /// vhost-user-blk-pci on a backend's socket; with `reconnect_ms`, QEMU
    /// reconnects to a backend that went away (its chardev's reconnect-ms).
    VhostUser {
        socket: PathBuf,
        num_queues: u16,
        reconnect_ms: Option<u32>,
    },
}

impl Disk {
    pub fn vhost_user(socket: &Path, num_queues: u16) -> Disk {
        Disk::VhostUser {
            socket: socket.to_path_buf(),
            num_queues,
            reconnect_ms: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct QemuVm {
    pub machine: Machine,
    pub mem_mib: u32,
    pub disk: Disk,
    pub cmdline: String,
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct GuestRun {
    /// Everything the guest printed.
    pub serial: String,
    /// The final JSON line, if any.
    pub result: Option<serde_json::Value>,
    /// The guest's own exit status (through the debug-exit port).
    pub guest_status: Option<i32>,
    /// From exec to the start marker.
    pub to_marker: Option<Duration>,
    pub total: Duration,
}

impl GuestRun {
    pub fn ok(&self) -> bool {
        self.guest_status == Some(0) && self.result.as_ref().is_some_and(|r| r["result"] == "ok")
    }
    pub fn field(&self, key: &str) -> u64 {
        self.result
            .as_ref()
            .and_then(|r| r[key].as_u64())
            .unwrap_or(0)
    }
}

impl QemuVm {
    pub fn command(&self, kernel: &Path) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        match self.machine {
            Machine::Microvm => {
                c.args(["-M", "microvm,pit=off,pic=off,rtc=off,pcie=on,acpi=on"]);
                c.args(["-bios", "/usr/share/qemu/qboot.rom"]);
            }
            Machine::Q35 => {
                c.args(["-M", "q35"]);
            }
        }
        c.args(["-enable-kvm", "-cpu", "host,arch-capabilities=off"]);
        c.args(["-m", &format!("{}M", self.mem_mib)]);
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ]);
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        c.arg("-kernel").arg(kernel);
        c.args(["-append", &self.cmdline]);
        match &self.disk {
            Disk::Builtin {
                path,
                readonly,
                num_queues,
                iothread,
            } => {
                c.arg("-drive").arg(format!(
                    "file={},format=raw,if=none,id=d0,cache.direct=on,aio=io_uring,discard=unmap,detect-zeroes=off{}",
                    path.display(),
                    if *readonly { ",readonly=on" } else { "" }
                ));
                if *iothread {
                    c.args(["-object", "iothread,id=io0"]);
                }
                c.arg("-device").arg(format!(
                    "virtio-blk-pci,drive=d0,num-queues={num_queues}{}",
                    if *iothread { ",iothread=io0" } else { "" }
                ));
            }
            Disk::VhostUser {
                socket,
                num_queues,
                reconnect_ms,
            } => {
                // vhost-user needs guest memory the backend can map.
                c.arg("-object").arg(format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    self.mem_mib
                ));
                c.args(["-machine", "memory-backend=mem"]);
                let reconnect = reconnect_ms
                    .map(|ms| format!(",reconnect-ms={ms}"))
                    .unwrap_or_default();
                c.arg("-chardev")
                    .arg(format!("socket,id=c0,path={}{reconnect}", socket.display()));
                c.arg("-device").arg(format!(
                    "vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"
                ));
            }
        }
        c
    }

    /// Boots the guest, waits for it to exit (or kills it at the timeout).
    pub fn run(&self) -> Result<GuestRun> {
        self.spawn()?.wait()
    }

    /// Boots the guest and returns while it runs.
    pub fn spawn(&self) -> Result<RunningVm> {
        let kernel = build_guest()?;
        spawn_vm(
            self.command(&kernel),
            self.timeout,
            ExitEncoding::QemuDebugExit,
        )
    }
}

/// How a VMM process reports the guest's debug-exit value.
#[derive(Clone, Copy, Debug)]
pub enum ExitEncoding {
    /// QEMU's isa-debug-exit: the process exits with (value << 1) | 1.
    QemuDebugExit,
    /// The project's vmm: the process exits with the value.
    Plain,
}

fn spawn_vm(mut command: Command, timeout: Duration, exit: ExitEncoding) -> Result<RunningVm> {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let stdout = child.stdout.take().expect("piped");
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = std::sync::Arc::clone(&progress);
    let reader = std::thread::spawn(move || {
        let mut serial = String::new();
        let mut marker = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if marker.is_none() && line.contains(START_MARKER) {
                marker = Some(started.elapsed());
            }
            if line.starts_with("progress:") {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            serial.push_str(&line);
            serial.push('\n');
        }
        (serial, marker)
    });
    Ok(RunningVm {
        child,
        reader: Some(reader),
        started,
        timeout,
        progress,
        exit,
    })
}

/// The bench guest under the project's own `vmm`.
#[derive(Clone, Debug)]
pub struct VmmVm {
    /// The built `vmm` binary.
    pub vmm: PathBuf,
    pub cpus: u8,
    pub mem_mib: u32,
    /// vhost-user-blk disks: (socket, queues).
    pub disks: Vec<(PathBuf, u16)>,
    pub cmdline: String,
    pub timeout: Duration,
    /// Where the vmm writes its counters when the VM ends.
    pub metrics_file: Option<PathBuf>,
}

impl VmmVm {
    pub fn command(&self, kernel: &Path) -> Command {
        let mut c = Command::new(&self.vmm);
        c.arg("--kernel").arg(kernel);
        c.args(["--cpus", &self.cpus.to_string()]);
        c.args(["--memory", &format!("{}M", self.mem_mib)]);
        c.args(["--cmdline", &self.cmdline]);
        for (socket, queues) in &self.disks {
            c.arg("--disk")
                .arg(format!("socket={},num_queues={queues}", socket.display()));
        }
        if let Some(m) = &self.metrics_file {
            c.arg("--metrics-file").arg(m);
        }
        c
    }

    pub fn spawn(&self) -> Result<RunningVm> {
        let kernel = build_guest()?;
        spawn_vm(self.command(&kernel), self.timeout, ExitEncoding::Plain)
    }

    pub fn run(&self) -> Result<GuestRun> {
        self.spawn()?.wait()
    }
}

/// A guest booted with [`QemuVm::spawn`] or [`VmmVm::spawn`].
pub struct RunningVm {
    child: Child,
    reader: Option<std::thread::JoinHandle<(String, Option<Duration>)>>,
    started: Instant,
    timeout: Duration,
    progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
    exit: ExitEncoding,
}

impl RunningVm {
    /// Progress lines the guest printed so far.
    pub fn progress_lines(&self) -> u64 {
        self.progress.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The VMM process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the guest is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the guest to exit (or kills it at the timeout).
    pub fn wait(mut self) -> Result<GuestRun> {
        let (started, child) = (self.started, &mut self.child);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let total = started.elapsed();
        let (serial, to_marker) = self
            .reader
            .take()
            .expect("waited once")
            .join()
            .map_err(|_| anyhow!("serial reader died"))?;
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        let Some(status) = status else {
            bail!(
                "guest did not finish within {:?}; serial:\n{serial}\nqemu:\n{stderr}",
                self.timeout
            );
        };
        if to_marker.is_none() {
            bail!("the guest never started (qemu exited with {status}); qemu:\n{stderr}");
        }
        let guest_status = match self.exit {
            // isa-debug-exit: QEMU exits with (value << 1) | 1.
            ExitEncoding::QemuDebugExit => {
                status.code().filter(|c| c % 2 == 1).map(|c| (c - 1) / 2)
            }
            ExitEncoding::Plain => status.code(),
        };
        if guest_status.is_none() {
            bail!("qemu exited with {status} without the guest's exit; serial:\n{serial}\nqemu:\n{stderr}");
        }
        let result = serial
            .lines()
            .rev()
            .find(|l| l.starts_with("{\"bench_guest\""))
            .and_then(|l| serde_json::from_str(l).ok());
        Ok(GuestRun {
            serial,
            result,
            guest_status,
            to_marker,
            total,
        })
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        // A guest abandoned (a failed test) does not outlive its owner.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A qemu-storage-daemon serving a raw file as a vhost-user-blk export.
pub struct StorageDaemon {
    child: Child,
    pub socket: PathBuf,
}

impl StorageDaemon {
    pub fn start(image: &Path, socket: &Path, num_queues: u16, writable: bool) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring,discard=unmap",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0,discard=unmap"])
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
        let specs: Vec<String> = exports
            .iter()
            .map(|(image, socket)| format!("socket={},image={}", socket.display(), image.display()))
            .collect();
        let sockets: Vec<PathBuf> = exports.iter().map(|e| e.1.clone()).collect();
        Self::spawn_with(binary, &specs, &sockets, options)
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
        let mut c = Command::new(binary);
        c.args(options);
        // Quiet unless the caller asks (BLK_BACKEND_LOG=debug, say).
        c.env(
            "RUST_LOG",
            std::env::var("BLK_BACKEND_LOG").unwrap_or_else(|_| "warn".into()),
        );
        for (spec, socket) in specs.iter().zip(sockets) {
            let _ = std::fs::remove_file(socket);
            c.arg("--export").arg(spec);
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut b = BlkBackendProcess {
            child,
            socket: sockets.first().cloned().unwrap_or_default(),
        };
        for socket in sockets {
            wait_for_socket(&mut b.child, socket, "blk-backend")?;
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

    /// Kills it outright (SIGKILL), as a crash would, leaving the socket
    /// file in place.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.socket = PathBuf::new();
    }

    /// Asks it to stop (SIGTERM) and waits.
    pub fn stop(mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for BlkBackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Waits until a backend process listens on `socket` (or dies trying).
fn wait_for_socket(child: &mut Child, socket: &Path, name: &str) -> Result<()> {
    let t0 = Instant::now();
    while !socket.exists() {
        if let Some(s) = child.try_wait()? {
            bail!("{name} exited with {s} before listening");
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("{name} did not create {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
