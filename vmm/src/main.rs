//! `vmm`: runs one VM (its disks are vhost-user-blk backends' sockets), or
//! talks to a running one's control API (`vmm api`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use vmm::config::{self, VmConfig};
use vmm::vm::{self, VmEvent};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "KVM virtual machine monitor with vhost-user-blk disks",
    args_conflicts_with_subcommands = true,
    after_help = "Exit status: the value a test guest writes to the debug-exit port (0xf4), \
                  0 when the guest powers off or the VM is shut down through the API, 1 on a \
                  fault (the vCPU registers are printed) or an error."
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The kernel: a PVH ELF (the bench guest, a Linux vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "")]
    cmdline: String,
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Host CPUs for the vCPU threads, as taskset -c writes them (0-3,6):
    /// vCPU k runs on the list's k-th CPU, in turn. Default: wherever the
    /// kernel runs them. With --restore too.
    #[arg(long, value_name = "LIST")]
    vcpu_affinity: Option<cpu_affinity::CpuList>,
    /// Guest memory: a size such as 512M or 2G.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// A vhost-user-blk disk: socket=PATH[,num_queues=N,queue_size=N,readonly=on,
    /// connect_timeout_ms=N,reconnect_timeout_ms=N,reply_timeout_ms=N]; repeatable.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,
    /// A vhost-user-net NIC: socket=PATH[,mac=52:54:00:..,num_queues=N (2 per
    /// queue pair),queue_size=N,connect_timeout_ms=N,reconnect_timeout_ms=N,
    /// reply_timeout_ms=N]; repeatable.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<String>,
    /// A shared folder (virtio-fs) a vhost-user-fs backend such as
    /// virtiofsd serves: socket=PATH,tag=TAG[,num_queues=N (request
    /// queues),queue_size=N,connect_timeout_ms=N,reconnect_timeout_ms=N,
    /// reply_timeout_ms=N]; repeatable.
    #[arg(long = "fs", value_name = "SPEC")]
    fs: Vec<String>,
    /// Serve the control API (HTTP/JSON) on this Unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// stdio, none or file=PATH.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// A virtio console (the guest's hvc0) beside the serial port, its
    /// output where --serial's goes: on or off.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    virtio_console: String,
    /// What comes on standard input goes to the guest's serial port (its
    /// receive FIFO, as typed keys do), e.g. vmctl console's keystrokes.
    #[arg(long)]
    serial_input: bool,
    /// The whole VM as a JSON file (the same fields as the options, which
    /// it therefore excludes).
    #[arg(
        long,
        conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "vcpu_affinity", "memory", "disks", "nets", "fs", "api_socket", "serial", "virtio_console", "serial_input"]
    )]
    config: Option<PathBuf>,
    /// Start from a snapshot directory (`vmm api ... snapshot`) instead of
    /// booting: its vCPUs, devices and memory, on the --disk sockets given
    /// (in the snapshot's order; usually clones of the disks' snapshots).
    /// The snapshot's vCPU count and memory size replace --cpus/--memory.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    restore: Option<PathBuf>,
    /// How --restore fills guest memory: lazy (the guest runs at once, its
    /// pages brought in on first touch and in the background; the disks
    /// start once all are in) or copy (all of it first).
    #[arg(long, value_enum, default_value_t = config::RestoreMemory::Lazy, requires = "restore")]
    restore_memory: config::RestoreMemory,
    /// When the VM ends, write its counters (exits by reason, time in the
    /// guest, per vCPU) here as JSON.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
    /// Run without seccomp filters (each thread is otherwise confined to
    /// the system calls it needs, and any other call ends the vmm with a
    /// report naming it).
    #[arg(long)]
    no_seccomp: bool,
    /// End (SIGKILL) when process PID, the one that started this vmm, ends:
    /// a supervisor that dies takes its VM along instead of leaving it
    /// unwatched. Refused at once when PID is no longer the parent.
    #[arg(long, value_name = "PID")]
    parent_pid: Option<u32>,
}

#[derive(Subcommand)]
enum Command {
    /// Talks to a running vmm's control API.
    Api {
        /// The vmm's --api-socket.
        #[arg(long)]
        socket: PathBuf,
        #[command(subcommand)]
        request: ApiRequest,
    },
}

#[derive(Subcommand)]
enum ApiRequest {
    Info,
    /// Until the VM ends: its exit status, how it ended, the console bytes
    /// it wrote (answered before the vmm process is gone).
    Wait,
    Pause,
    Resume,
    Metrics,
    Shutdown {
        /// End at once, without stopping the disks' queues first.
        #[arg(long)]
        force: bool,
    },
    /// Saves the paused VM into a new directory (vCPUs, devices, memory;
    /// its disks' rings stopped and started again around it): `vmm
    /// --restore DIR` starts a VM from it.
    Snapshot {
        /// The directory to create (or an empty one).
        #[arg(long)]
        dir: PathBuf,
    },
}

fn config_of(a: &Args) -> Result<VmConfig> {
    if let Some(p) = &a.config {
        let text = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        let mut cfg: VmConfig =
            serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
        cfg.seccomp &= !a.no_seccomp;
        if a.restore.is_some() {
            cfg.restore = a.restore.clone();
            cfg.restore_memory = a.restore_memory;
        }
        return Ok(cfg);
    }
    Ok(VmConfig {
        kernel: match (&a.kernel, &a.restore) {
            (Some(k), _) => k.clone(),
            (None, Some(_)) => PathBuf::new(),
            (None, None) => bail!("--kernel is required (or --restore a snapshot)"),
        },
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        cpus: a.cpus,
        vcpu_affinity: a.vcpu_affinity.clone(),
        memory: config::parse_size(&a.memory)?,
        disks: a
            .disks
            .iter()
            .map(|d| config::parse_disk(d))
            .collect::<Result<_, _>>()?,
        nets: a
            .nets
            .iter()
            .map(|n| config::parse_net(n))
            .collect::<Result<_, _>>()?,
        fs: a
            .fs
            .iter()
            .map(|f| config::parse_fs(f))
            .collect::<Result<_, _>>()?,
        api_socket: a.api_socket.clone(),
        serial: config::parse_serial(&a.serial)?,
        virtio_console: a.virtio_console == "on",
        serial_input: a.serial_input,
        seccomp: !a.no_seccomp,
        restore: a.restore.clone(),
        restore_memory: a.restore_memory,
    })
}

fn api(socket: &std::path::Path, request: &ApiRequest) -> Result<i32> {
    let (method, path, body) = match request {
        ApiRequest::Snapshot { dir } => {
            // The vmm may run elsewhere in the tree: it is told where.
            let dir = std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
            let body = serde_json::to_string(&vmm::api::types::SnapshotRequest { dir })?;
            ("PUT", "/api/v1/vm.snapshot", Some(body))
        }
        ApiRequest::Info => ("GET", "/api/v1/vm.info", None),
        ApiRequest::Metrics => ("GET", "/api/v1/vm.metrics", None),
        ApiRequest::Wait => ("GET", vmm::api::WAIT, None),
        ApiRequest::Pause => ("PUT", "/api/v1/vm.pause", None),
        ApiRequest::Resume => ("PUT", "/api/v1/vm.resume", None),
        ApiRequest::Shutdown { force } => (
            "PUT",
            "/api/v1/vm.shutdown",
            Some(serde_json::to_string(&vmm::api::types::ShutdownRequest {
                force: *force,
            })?),
        ),
    };
    let (code, body) = vmm::api::call(socket, method, path, body.as_deref())
        .with_context(|| format!("{}", socket.display()))?;
    cli_support::say_out!("{body}");
    if code != 200 {
        bail!("the vmm answered {code}");
    }
    Ok(0)
}

fn run(a: Args) -> Result<i32> {
    if let Some(Command::Api { socket, request }) = &a.command {
        return api(socket, request);
    }
    if let Some(pid) = a.parent_pid {
        die_with_parent(pid)?;
    }
    let cfg = config_of(&a)?;
    let out = vm::run(&cfg)?;
    if let Some(p) = &a.metrics_file {
        // The VM's end is the guest's: a metrics file that cannot be
        // written (a full disk) is said, and the guest's status stands.
        let written = std::fs::write(
            p,
            serde_json::json!({
                "vcpus": out.metrics,
                "timing": out.timing,
                "console": out.console,
            })
            .to_string(),
        );
        if let Err(e) = written {
            cli_support::say!("vmm: --metrics-file {}: {e}", p.display());
        }
    }
    match &out.event {
        VmEvent::Reboot => cli_support::say!("vmm: the guest asked for a reboot; stopping"),
        VmEvent::Fault(what) => cli_support::say!("vmm: guest fault: {what}"),
        _ => {}
    }
    Ok(out.event.exit_status())
}

/// PR_SET_PDEATHSIG, then a check that `pid` is still the parent (it may
/// have ended before the request: the signal would then never come).
/// Done here rather than between fork and exec by the parent, so that the
/// parent can start us with posix_spawn (no copy of its page tables).
fn die_with_parent(pid: u32) -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error()).context("--parent-pid: PR_SET_PDEATHSIG");
    }
    // SAFETY: getppid has no arguments.
    let parent = unsafe { libc::getppid() } as u32;
    if parent != pid {
        bail!("--parent-pid {pid}: the parent is {parent} (process {pid} ended already?)");
    }
    Ok(())
}

fn main() {
    // One malloc arena for every thread: the vmm's threads allocate little
    // once the VM runs, and an arena per thread cost each VM a dozen
    // system calls and the pages they touched.
    sandbox::malloc_arenas(1);
    cli_support::init_logging("warn");
    let code = run(Args::parse()).unwrap_or_else(|e| {
        cli_support::say!("vmm: error: {}", cli_support::report(&e));
        1
    });
    std::process::exit(code)
}
