//! The bench guest from the host's side: build it, boot it under QEMU or
//! the project's vmm, follow its console, and read back its result.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::patience::Patience;
use crate::workspace::repo_root;

/// The line the guest prints first.
pub const START_MARKER: &str = "BENCH-GUEST START";

/// The bench guest, built two ways from the same bytes.
#[derive(Clone, Debug)]
pub struct GuestKernels {
    /// A PVH ELF (QEMU's `-kernel`, the vmm).
    pub elf: PathBuf,
    /// A bzImage for the Linux 64-bit boot protocol (the vmm).
    pub bzimage: PathBuf,
}

/// The bench guest's command line as a test runs it: unless the test sets
/// its own, the guest gives its device a minute to answer (`timeout_ms`;
/// the guest's default is 5 s). Under a whole test suite running at once
/// on 2 cores, a single write to this machine's virtual disk once took
/// longer than 5 s and failed a run that was only slow; hangs are the
/// tests' patience's to catch.
fn guest_cmdline(cmdline: &str) -> String {
    if cmdline
        .split_ascii_whitespace()
        .any(|w| w.starts_with("timeout_ms="))
    {
        cmdline.to_string()
    } else {
        format!("{cmdline} timeout_ms=60000")
            .trim_start()
            .to_string()
    }
}

/// Builds the guest once per process.
pub fn build_guest() -> Result<GuestKernels> {
    // The failure is kept for every later caller: shared, since an error
    // is not Clone.
    static BUILT: OnceLock<Result<GuestKernels, std::sync::Arc<anyhow::Error>>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let script = repo_root().join("bench/guest/build.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .with_context(|| script.display().to_string())?;
            if !out.status.success() {
                return Err(anyhow!(
                    "building the bench guest failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            }
            let elf = PathBuf::from(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim(),
            );
            let bzimage = elf.with_extension("bzImage");
            Ok(GuestKernels { elf, bzimage })
        })
        .clone()
        .map_err(|e| anyhow!("{e:#}"))
}

/// Which kernel a VM boots.
#[derive(Clone, Debug, Default)]
pub enum Kernel {
    /// The bench guest's PVH ELF.
    #[default]
    BenchElf,
    /// The bench guest's bzImage (the vmm's 64-bit boot protocol path).
    BenchBzImage,
    /// Any other kernel file.
    File(PathBuf),
}

impl Kernel {
    pub fn path(&self) -> Result<PathBuf> {
        Ok(match self {
            Kernel::BenchElf => build_guest()?.elf,
            Kernel::BenchBzImage => build_guest()?.bzimage,
            Kernel::File(p) => p.clone(),
        })
    }
}

/// The longest stretch a guest's console stays quiet in a normal run:
/// SeaBIOS under q35 takes about 4.5 s to the first line here, and a
/// running workload prints a progress line every second (`progress_ms`).
pub fn default_silence() -> Patience {
    Patience::new(
        "the guest's next console line (q35 firmware to the first line; progress lines 1 s apart)",
        Duration::from_millis(4500),
    )
}

/// A whole guest run, boot to exit, sized from the longest in the suite: a
/// 3 GiB verifying write across three blk-backend restarts, about 20 s
/// here (its test, with a 1 GiB read-back, took 28 s). The silence watchdog
/// catches a hang long before this; this is the backstop.
pub fn default_limit() -> Patience {
    Patience::new("the guest's whole run", Duration::from_secs(30))
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
    /// QEMU's own virtio-blk-pci on a raw file, or on the `(offset,
    /// size)` window of a file (its raw driver's offset= and size=).
    Builtin {
        path: PathBuf,
        readonly: bool,
        num_queues: u16,
        iothread: bool,
        window: Option<(u64, u64)>,
    },
    /// vhost-user-blk-pci on a backend's socket; with `reconnect_ms`, QEMU
    /// reconnects to a backend that went away (its chardev's reconnect-ms).
    VhostUser {
        socket: PathBuf,
        num_queues: u16,
        reconnect_ms: Option<u32>,
    },
    /// No disk (a guest that only uses its NIC).
    None,
}

/// A QEMU guest's NIC (virtio-net-pci) and its MAC.
#[derive(Clone, Debug)]
pub enum QemuNic {
    /// QEMU's own tap device (userspace, vhost=off: this kernel has no
    /// vhost-net), on an existing tap.
    Tap { ifname: String, mac: String },
    /// `-netdev vhost-user` on a net backend's socket (ours, net-backend).
    VhostUser { socket: PathBuf, mac: String },
}

impl Disk {
    pub fn vhost_user(socket: &Path, num_queues: u16) -> Disk {
        Disk::VhostUser {
            socket: socket.to_path_buf(),
            num_queues,
            reconnect_ms: None,
        }
    }

    /// QEMU's virtio-blk on a raw file, with an iothread.
    pub fn builtin(path: &Path, num_queues: u16, readonly: bool) -> Disk {
        Disk::Builtin {
            path: path.to_path_buf(),
            readonly,
            num_queues,
            iothread: true,
            window: None,
        }
    }
}

/// The bench guest under QEMU.
#[derive(Clone, Debug)]
pub struct QemuVm {
    pub machine: Machine,
    pub mem_mib: u32,
    pub disk: Disk,
    pub cmdline: String,
    /// The whole run, boot to exit.
    pub limit: Patience,
    /// Between two console lines.
    pub silence: Patience,
    pub console: QemuConsole,
    pub nic: Option<QemuNic>,
}

/// Where a QEMU guest's console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QemuConsole {
    /// The UART, on standard output.
    Uart,
    /// The UART and a virtio console (virtio-serial's `virtconsole`, which
    /// the bench guest reports through once it finds it) on standard
    /// output, through one multiplexed character device.
    UartAndVirtio,
    /// The virtio console on standard output, the UART into this file.
    VirtioWithUartTo(PathBuf),
}
#[derive(Debug)]
pub struct GuestRun {
    /// Everything the guest printed.
    pub serial: String,
    /// The final JSON line (`{"bench_guest":...}`), if any.
    pub result: Option<serde_json::Value>,
    /// The boot report (`{"boot_info":...}`): what the loader handed over.
    pub boot_info: Option<serde_json::Value>,
    /// The guest's own exit status (through the debug-exit port).
    pub guest_status: Option<i32>,
    /// From exec to the start marker.
    pub to_marker: Option<Duration>,
    pub total: Duration,
    /// What the VMM process wrote to stderr (its log).
    pub stderr: String,
}

impl GuestRun {
    pub fn ok(&self) -> bool {
        self.guest_status == Some(0) && self.result.as_ref().is_some_and(|r| r["result"] == "ok")
    }

    /// A number from the result line (0 if absent).
    pub fn field(&self, key: &str) -> u64 {
        self.result
            .as_ref()
            .and_then(|r| r[key].as_u64())
            .unwrap_or(0)
    }

    /// The report of a `mode=fuzz` run that the vmm saw to its end: the
    /// guest reported and exited 0, and nothing panicked. Panics with the
    /// console and the vmm's log if not.
    pub fn assert_fuzzed(&self, what: &str) -> &serde_json::Value {
        let result = self
            .result
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: no report:\n{}\n{}", self.serial, self.stderr));
        assert_eq!(result["phase"], "fuzz", "{what}: {}", self.serial);
        assert_eq!(self.guest_status, Some(0), "{what}: {}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{what}: {}", self.stderr);
        result
    }

    /// Panics with the console unless the run passed.
    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.ok(),
            "{what}: the guest failed (status {:?}):\n{}",
            self.guest_status,
            self.serial
        );
    }
}

impl QemuVm {
    /// A microvm with 512 MiB and the default waits.
    pub fn new(disk: Disk, cmdline: &str) -> QemuVm {
        QemuVm {
            machine: Machine::Microvm,
            mem_mib: 512,
            disk,
            cmdline: cmdline.into(),
            limit: default_limit(),
            silence: default_silence(),
            console: QemuConsole::Uart,
            nic: None,
        }
    }

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
        c.args(["-nodefaults", "-no-user-config", "-nographic"]);
        let virtio_console = |c: &mut Command, chardev: &str| {
            c.args(["-device", "virtio-serial-pci,id=vser0"]);
            c.arg("-device")
                .arg(format!("virtconsole,bus=vser0.0,chardev={chardev}"));
        };
        match &self.console {
            QemuConsole::Uart => {
                c.args(["-serial", "stdio"]);
            }
            QemuConsole::UartAndVirtio => {
                c.args([
                    "-chardev",
                    "stdio,id=con0,mux=on",
                    "-serial",
                    "chardev:con0",
                ]);
                virtio_console(&mut c, "con0");
            }
            QemuConsole::VirtioWithUartTo(file) => {
                c.arg("-serial").arg(format!("file:{}", file.display()));
                c.args(["-chardev", "stdio,id=con0"]);
                virtio_console(&mut c, "con0");
            }
        }
        c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        c.arg("-kernel").arg(kernel);
        c.args(["-append", &guest_cmdline(&self.cmdline)]);
        match &self.disk {
            Disk::Builtin {
                path,
                readonly,
                num_queues,
                iothread,
                window,
            } => {
                c.arg("-drive").arg(format!(
                    "file={},format=raw,if=none,id=d0,cache.direct=on,aio=io_uring,discard=unmap,detect-zeroes=off{}{}",
                    path.display(),
                    if *readonly { ",readonly=on" } else { "" },
                    window.map_or(String::new(), |(o, n)| format!(",offset={o},size={n}"))
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
                let reconnect = reconnect_ms
                    .map(|ms| format!(",reconnect-ms={ms}"))
                    .unwrap_or_default();
                c.arg("-chardev")
                    .arg(format!("socket,id=c0,path={}{reconnect}", socket.display()));
                c.arg("-device").arg(format!(
                    "vhost-user-blk-pci,chardev=c0,num-queues={num_queues}"
                ));
            }
            Disk::None => {}
        }
        match &self.nic {
            Some(QemuNic::Tap { ifname, mac }) => {
                c.arg("-netdev").arg(format!(
                    "tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off"
                ));
                c.arg("-device")
                    .arg(format!("virtio-net-pci,netdev=n0,mac={mac}"));
            }
            Some(QemuNic::VhostUser { socket, mac }) => {
                c.arg("-chardev")
                    .arg(format!("socket,id=n0c,path={}", socket.display()));
                c.arg("-netdev")
                    .arg("vhost-user,id=n0,chardev=n0c,queues=1");
                c.arg("-device")
                    .arg(format!("virtio-net-pci,netdev=n0,mac={mac}"));
            }
            None => {}
        }
        // vhost-user needs guest memory the backend can map.
        if matches!(self.disk, Disk::VhostUser { .. })
            || matches!(self.nic, Some(QemuNic::VhostUser { .. }))
        {
            c.arg("-object").arg(format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                self.mem_mib
            ));
            c.args(["-machine", "memory-backend=mem"]);
        }
        c
    }

    /// Boots the guest and waits for it to exit.
    pub fn run(&self) -> Result<GuestRun> {
        self.spawn()?.wait()
    }

    /// Boots the guest and returns while it runs.
    pub fn spawn(&self) -> Result<RunningVm> {
        self.spawn_wrapped(|c| c)
    }

    /// The same, QEMU's command line wrapped by `wrap` (run inside a
    /// network namespace, say).
    pub fn spawn_wrapped(&self, wrap: impl FnOnce(Command) -> Command) -> Result<RunningVm> {
        let kernel = build_guest()?.elf;
        RunningVm::spawn(
            wrap(self.command(&kernel)),
            ExitEncoding::QemuDebugExit,
            self.limit.clone(),
            self.silence.clone(),
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

/// A vhost-user-blk disk of the vmm.
#[derive(Clone, Debug)]
pub struct VmmDisk {
    pub socket: PathBuf,
    pub num_queues: u16,
    /// How long the vmm waits for a backend that went away.
    pub reconnect_timeout_ms: Option<u64>,
    /// How long the vmm waits for any reply of the backend.
    pub reply_timeout_ms: Option<u64>,
    /// How long the vmm waits at start for a backend not listening yet.
    pub connect_timeout_ms: Option<u64>,
}

impl VmmDisk {
    pub fn new(socket: &Path, num_queues: u16) -> VmmDisk {
        VmmDisk {
            socket: socket.to_path_buf(),
            num_queues,
            reconnect_timeout_ms: None,
            reply_timeout_ms: None,
            connect_timeout_ms: None,
        }
    }
}

/// The bench guest (or another kernel) under the project's own `vmm`.
#[derive(Clone, Debug)]
pub struct VmmVm {
    /// The built `vmm` binary.
    pub vmm: PathBuf,
    pub kernel: Kernel,
    pub initrd: Option<PathBuf>,
    pub cpus: u8,
    pub mem_mib: u32,
    pub disks: Vec<VmmDisk>,
    pub cmdline: String,
    /// The whole run, boot to exit.
    pub limit: Patience,
    /// Between two console lines.
    pub silence: Patience,
    /// Where the vmm writes its counters when the VM ends.
    pub metrics_file: Option<PathBuf>,
    /// The control API's socket.
    pub api_socket: Option<PathBuf>,
    /// More options for the vmm (`--no-seccomp`, say).
    pub options: Vec<String>,
    /// Start from this snapshot directory instead of booting the kernel
    /// (its vCPUs and memory are the snapshot's: `kernel`, `cmdline`,
    /// `cpus` and `mem_mib` are not passed).
    pub restore: Option<PathBuf>,
    /// The vmm's log filter (RUST_LOG; its default is warnings only).
    pub log: Option<String>,
}

impl VmmVm {
    /// The bench guest's ELF on 1 vCPU and 256 MiB, no disk, default waits.
    pub fn new(vmm: &Path, cmdline: &str) -> VmmVm {
        VmmVm {
            vmm: vmm.to_path_buf(),
            kernel: Kernel::BenchElf,
            initrd: None,
            cpus: 1,
            mem_mib: 256,
            disks: Vec::new(),
            cmdline: cmdline.into(),
            limit: default_limit(),
            silence: default_silence(),
            metrics_file: None,
            api_socket: None,
            options: Vec::new(),
            restore: None,
            log: None,
        }
    }

    /// A bench guest in `mode=fuzz fuzz=TARGET` (its `ios` junk writes
    /// from `seed`) whose device is `flag BACKEND` (`--net`, `--fs`: the
    /// backend's socket and options), given up on quickly when the junk
    /// makes its backend refuse it, so that the junk goes on against the
    /// vmm's own handling too.
    pub fn fuzzing(
        vmm: &Path,
        target: &str,
        seed: u64,
        ios: u64,
        flag: &str,
        backend: &str,
    ) -> VmmVm {
        let mut v = VmmVm::new(
            vmm,
            &format!("mode=fuzz fuzz={target} seed={seed} ios={ios}"),
        );
        v.options = vec![
            flag.into(),
            format!(
                "{backend},connect_timeout_ms=10000,reconnect_timeout_ms=300,reply_timeout_ms=5000"
            ),
        ];
        v
    }

    /// The same with one disk.
    pub fn with_disk(mut self, socket: &Path, num_queues: u16) -> VmmVm {
        self.disks.push(VmmDisk::new(socket, num_queues));
        self
    }

    pub fn command(&self) -> Result<Command> {
        let mut c = Command::new(&self.vmm);
        if let Some(log) = &self.log {
            c.env("RUST_LOG", log);
        }
        if let Some(dir) = &self.restore {
            c.arg("--restore").arg(dir);
        } else {
            c.arg("--kernel").arg(self.kernel.path()?);
            if let Some(i) = &self.initrd {
                c.arg("--initrd").arg(i);
            }
            c.args(["--cpus", &self.cpus.to_string()]);
            c.args(["--memory", &format!("{}M", self.mem_mib)]);
            c.args(["--cmdline", &guest_cmdline(&self.cmdline)]);
        }
        c.args(&self.options);
        for d in &self.disks {
            let mut spec = format!("socket={},num_queues={}", d.socket.display(), d.num_queues);
            if let Some(ms) = d.reconnect_timeout_ms {
                spec.push_str(&format!(",reconnect_timeout_ms={ms}"));
            }
            if let Some(ms) = d.reply_timeout_ms {
                spec.push_str(&format!(",reply_timeout_ms={ms}"));
            }
            if let Some(ms) = d.connect_timeout_ms {
                spec.push_str(&format!(",connect_timeout_ms={ms}"));
            }
            c.arg("--disk").arg(spec);
        }
        if let Some(m) = &self.metrics_file {
            c.arg("--metrics-file").arg(m);
        }
        if let Some(a) = &self.api_socket {
            c.arg("--api-socket").arg(a);
        }
        Ok(c)
    }

    pub fn spawn(&self) -> Result<RunningVm> {
        RunningVm::spawn(
            self.command()?,
            ExitEncoding::Plain,
            self.limit.clone(),
            self.silence.clone(),
        )
    }

    pub fn run(&self) -> Result<GuestRun> {
        self.spawn()?.wait()
    }
}

/// The console as the reader thread sees it.
#[derive(Default)]
struct Console {
    text: String,
    lines: u64,
    progress: u64,
    marker: Option<Duration>,
    last_line: Option<Instant>,
    closed: bool,
}

/// A guest booted with [`QemuVm::spawn`] or [`VmmVm::spawn`].
pub struct RunningVm {
    child: Child,
    console: Arc<(Mutex<Console>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
    started: Instant,
    limit: Patience,
    silence: Patience,
    exit: ExitEncoding,
}

impl RunningVm {
    fn spawn(
        mut command: Command,
        exit: ExitEncoding,
        limit: Patience,
        silence: Patience,
    ) -> Result<RunningVm> {
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", command.get_program()))?;
        let stdout = child.stdout.take().expect("piped");
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let shared = Arc::clone(&console);
        let reader = std::thread::spawn(move || {
            let (lock, changed) = &*shared;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
                if c.marker.is_none() && line.contains(START_MARKER) {
                    c.marker = Some(started.elapsed());
                }
                if line.starts_with("progress:") {
                    c.progress += 1;
                }
                c.lines += 1;
                c.last_line = Some(Instant::now());
                c.text.push_str(&line);
                c.text.push('\n');
                changed.notify_all();
            }
            lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
            changed.notify_all();
        });
        Ok(RunningVm {
            child,
            console,
            reader: Some(reader),
            started,
            limit,
            silence,
            exit,
        })
    }

    /// Progress lines the guest printed so far.
    pub fn progress_lines(&self) -> u64 {
        self.console
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .progress
    }

    /// The console so far.
    pub fn console(&self) -> String {
        self.console
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    /// Waits until the console satisfies `seen` (checked on each new line);
    /// Err if the guest ends first or `patience` runs out.
    pub fn wait_for(
        &mut self,
        patience: &Patience,
        seen: impl Fn(&str, u64) -> bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        let (lock, changed) = &*self.console;
        let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if seen(&c.text, c.progress) {
                return Ok(());
            }
            if c.closed {
                bail!(
                    "the guest ended while waiting for {}:\n{}",
                    patience.what,
                    c.text
                );
            }
            if patience.expired(t0) {
                bail!("{}\nconsole:\n{}", patience.explain(t0.elapsed()), c.text);
            }
            c = changed
                .wait_timeout(c, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for `n` progress lines in all.
    pub fn wait_for_progress(&mut self, n: u64, patience: &Patience) -> Result<()> {
        self.wait_for(patience, |_, p| p >= n)
    }

    /// Waits for a console line containing `text`.
    pub fn wait_for_line(&mut self, text: &str, patience: &Patience) -> Result<()> {
        self.wait_for(patience, |console, _| console.contains(text))
    }

    /// The VMM process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the guest is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the guest to exit. A guest whose console stays quiet past
    /// its `silence`, or that runs past its `limit`, is killed and the
    /// error says which wait ran out and what it was sized from.
    pub fn wait(mut self) -> Result<GuestRun> {
        let started = self.started;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break Ok(s);
            }
            let quiet_since = self
                .console
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .last_line
                .unwrap_or(started);
            if self.silence.expired(quiet_since) {
                break Err(self.silence.explain(quiet_since.elapsed()));
            }
            if self.limit.expired(started) {
                break Err(self.limit.explain(started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if status.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let total = started.elapsed();
        if let Some(r) = self.reader.take() {
            r.join().map_err(|_| anyhow!("the console reader died"))?;
        }
        let (serial, to_marker) = {
            let c = self.console.0.lock().unwrap_or_else(|e| e.into_inner());
            (c.text.clone(), c.marker)
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        let status = match status {
            Ok(s) => s,
            Err(why) => bail!("{why}; the VM was killed\nconsole:\n{serial}\nstderr:\n{stderr}"),
        };
        // (The marker goes to the UART: with the UART elsewhere, the other
        // lines on this console show the guest ran.)
        if to_marker.is_none() && serial.is_empty() {
            bail!("the guest never started (the VMM exited with {status}); stderr:\n{stderr}");
        }
        let guest_status = match self.exit {
            // isa-debug-exit: QEMU exits with (value << 1) | 1.
            ExitEncoding::QemuDebugExit => {
                status.code().filter(|c| c % 2 == 1).map(|c| (c - 1) / 2)
            }
            ExitEncoding::Plain => status.code(),
        };
        if guest_status.is_none() {
            bail!("the VMM exited with {status} without the guest's exit; console:\n{serial}\nstderr:\n{stderr}");
        }
        let json_line = |prefix: &str| {
            serial
                .lines()
                .rev()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| serde_json::from_str(l).ok())
        };
        Ok(GuestRun {
            result: json_line("{\"bench_guest\""),
            boot_info: json_line("{\"boot_info\""),
            serial,
            guest_status,
            to_marker,
            total,
            stderr,
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
