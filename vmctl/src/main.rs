//! `vmctl`: named VMs with a whole lifecycle, and test fleets, on the
//! project's vmm and blk-backend.

mod binaries;
mod fleet;
mod hold;
mod host_backend;
mod network;
mod ops;
mod snapshots;
mod state;
mod supervisor;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::ops::Spec;
use crate::state::{BackendMode, Observed, RestoreMemory, Root};

#[derive(Parser)]
#[command(
    name = "vmctl",
    version,
    about = "Named VMs on the vmm and blk-backend: create, start, stop, pause, logs, delete; test fleets from one snapshot",
    after_help = "With no arguments, `vmctl run` runs the built-in demo: guests that verify a base's data through their own clones."
)]
struct Cli {
    /// Where VMs live (default: /var/lib/vmctl as root, else $XDG_STATE_HOME/vmctl).
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(clap::Args, Clone)]
struct VmOptions {
    /// The kernel (default: the built-in bench guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initramfs for --kernel (a Linux guest's first userspace).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line. In `run`, the words n and name in braces
    /// become each VM's number and name.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// vCPUs, 1 to 32.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=vmm::config::MAX_CPUS as i64))]
    cpus: u8,
    /// Guest memory (512M, 1G): 16 MiB to 64 GiB, at most the host's.
    #[arg(long, default_value = "256M")]
    memory: String,
    /// The disk's queues, 1 to 16.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Grow the VM's clone to this size (the new space reads as zeros).
    #[arg(long)]
    disk_size: Option<String>,
    /// Who serves the disk: the host's one blk-backend, or one of the VM's own.
    #[arg(long, value_enum, default_value_t = BackendMode::Host)]
    backend: BackendMode,
    /// A NIC on BRIDGE (default vmbr0, made with 10.88.0.1/24 on first
    /// use): a stable MAC, an address from the bridge's subnet, a tap
    /// while it runs.
    #[arg(long, num_args = 0..=1, default_missing_value = "vmbr0", value_name = "BRIDGE")]
    net: Option<String>,
    /// With --net: the bridge's subnet masqueraded to the host's other
    /// interfaces (nftables) while the VM runs.
    #[arg(long, requires = "net")]
    nat: bool,
    /// A host folder the guest mounts by TAG (virtio-fs, served by a
    /// virtiofsd of the VM's own while it runs): HOSTDIR:TAG; repeatable.
    #[arg(long = "share", value_name = "HOSTDIR:TAG")]
    shares: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Define a VM with its own writable clone of IMAGE (FILE@SNAPSHOT, or
    /// a working image, which is snapshotted first). Nothing runs yet.
    Create {
        /// The VM's name.
        name: String,
        /// The disk image to clone: FILE@SNAPSHOT, or a working image
        /// (snapshotted first, unless unchanged since its last snapshot).
        #[arg(long, required_unless_present = "from_snapshot")]
        image: Option<PathBuf>,
        /// A VM snapshot (`vmctl snapshot`) to continue from: its first
        /// start restores it on a clone of the snapshot's disk (cpus,
        /// memory, kernel and command line are the snapshot's).
        #[arg(long, conflicts_with = "image", value_name = "SNAPSHOT")]
        from_snapshot: Option<String>,
        /// With --from-snapshot: how its memory comes in.
        #[arg(long, value_enum, default_value_t = RestoreMemory::OnDemand)]
        restore_memory: RestoreMemory,
        #[command(flatten)]
        vm: VmOptions,
    },
    /// Save a running VM whole (vCPUs, devices, memory) with its disk at the
    /// same instant, as SNAPSHOT; it goes on running (or stays paused).
    Snapshot {
        /// The VM's name.
        name: String,
        /// The VM snapshot's name.
        snapshot: String,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Every VM snapshot: its VM, size, and the VMs made from it.
    Snapshots {
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Remove a VM snapshot (refused while VMs made from it exist).
    SnapshotDelete {
        /// The VM snapshot's name.
        snapshot: String,
    },
    /// Back up a VM's disk at one instant (live if it runs) into the
    /// directory DEST: in full, or with --incremental only what changed
    /// since DEST's last backup.
    Backup {
        /// The VM's name.
        name: String,
        /// The backup directory (made if missing).
        dest: PathBuf,
        /// Only what changed since DEST's last backup (taken by vmctl backup into DEST).
        #[arg(long)]
        incremental: bool,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// A new VM NAME on the disk DEST's backups restore to (defined as the
    /// backed-up VM was; it boots when started).
    Restore {
        /// The backup directory (made if missing).
        dest: PathBuf,
        /// The VM's name.
        name: String,
    },
    /// Start a defined (or ended) VM.
    Start {
        /// The VM's name.
        name: String,
    },
    /// Shut a VM down gracefully; forced after --timeout seconds.
    Stop {
        /// The VM's name.
        name: String,
        /// Seconds the guest has to shut down before it is killed.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// End a VM at once.
    Kill {
        /// The VM's name.
        name: String,
    },
    /// Stop a running VM's vCPUs where they are (its memory and devices
    /// kept); a paused VM stays paused.
    Pause {
        /// The VM's name.
        name: String,
    },
    /// Let a paused VM's vCPUs run on; a running VM goes on.
    Resume {
        /// The VM's name.
        name: String,
    },
    /// Stop (if running) and start again.
    Restart {
        /// The VM's name.
        name: String,
        /// Seconds the guest has to shut down before it is killed.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Every VM: state, pid, cpus, memory, disk, uptime.
    #[command(alias = "ps")]
    List {
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// One VM in full.
    Info {
        /// The VM's name.
        name: String,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// The VM's serial console (kept in a bounded file).
    Logs {
        /// The VM's name.
        name: String,
        /// Keep printing as the guest writes, until it ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Wait until the VMs end; print and return their exit status.
    Wait {
        /// The VMs' names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Give up after this many seconds (exit status 124; the VMs run on).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Remove a VM: its clone, sockets, logs, state.
    #[command(alias = "rm")]
    Delete {
        /// The VM's name.
        name: String,
        /// Kill it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// A test fleet: COUNT VMs cloned from IMAGE, started together, waited
    /// for, one row each and a summary (no arguments: the built-in demo).
    Run {
        /// How many VMs.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// VM names are PREFIX-1 .. PREFIX-COUNT.
        #[arg(long = "name", default_value = "run")]
        prefix: String,
        /// The disk image every VM clones (as create's --image; none: the
        /// built-in demo base).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Every VM continues from this VM snapshot (on a clone of its
        /// disk) instead of booting.
        #[arg(long, conflicts_with = "image", value_name = "SNAPSHOT")]
        from_snapshot: Option<String>,
        /// With --from-snapshot: how each VM's memory comes in (on demand:
        /// each takes host memory for the pages it touches).
        #[arg(long, value_enum, default_value_t = RestoreMemory::OnDemand)]
        restore_memory: RestoreMemory,
        #[command(flatten)]
        vm: VmOptions,
        /// Delete the VMs when they are done (also when the run is
        /// interrupted or times out).
        #[arg(long)]
        rm: bool,
        /// End the fleet after this many seconds: its VMs killed (exit
        /// status 124). Ctrl-C, SIGTERM and SIGHUP end it the same way.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// The bridges VMs of this state root use: list them, remove one.
    Network {
        #[command(subcommand)]
        action: NetworkCmd,
    },
    #[command(name = "__supervise", hide = true)]
    Supervise {
        /// The VM's name.
        name: String,
    },
    /// The host backend's daemon (started by the first VM that needs it).
    #[command(name = "__backend", hide = true)]
    Backend,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Every bridge this state root's VMs are on or that vmctl made for
    /// it: its subnet, its VMs.
    #[command(alias = "list")]
    Ls {
        /// human: a table to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Remove a bridge vmctl made for this state root (with its DHCP
    /// server and NAT rule); refused while a VM is defined on it.
    Rm {
        /// The bridge's name.
        bridge: String,
    },
}

fn spec(image: PathBuf, vm: &VmOptions) -> Result<Spec> {
    Ok(Spec {
        image,
        kernel: vm.kernel.clone(),
        initrd: vm.initrd.clone(),
        cmdline: vm.cmdline.clone(),
        cpus: vm.cpus,
        memory: cli_support::parse_size(&vm.memory).context("--memory")?,
        queues: vm.queues,
        disk_size: vm
            .disk_size
            .as_deref()
            .map(cli_support::parse_size)
            .transpose()
            .context("--disk-size")?,
        backend: vm.backend,
        scratch: false,
        restore: None,
        net: vm.net.clone(),
        nat: vm.nat,
        shares: {
            let shares = vm
                .shares
                .iter()
                .map(|s| crate::state::Share::parse(s))
                .collect::<Result<Vec<_>>>()?;
            for (i, a) in shares.iter().enumerate() {
                if shares[..i].iter().any(|b| b.tag == a.tag) {
                    bail!("--share: the tag {:?} is given twice", a.tag);
                }
            }
            shares
        },
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}G", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}M", n as f64 / (1u64 << 20) as f64),
        n => format!("{:.0}K", n as f64 / 1024.0),
    }
}

fn exit_code_of(states: &[(String, Observed)]) -> i32 {
    states
        .iter()
        .map(|(_, s)| match s {
            Observed::Exited(n) => *n,
            _ => 1,
        })
        .find(|&n| n != 0)
        .unwrap_or(0)
}

/// A fleet's rows and summary; its exit code (1 if any VM failed).
fn print_fleet(report: &fleet::FleetReport, output: Output, demo: bool) -> i32 {
    if output == Output::Json {
        print_json(&json!({
            "vms": report.rows,
            "failed": report.failed,
            "launched-s": report.launched_s,
            "running-s": report.running_s,
            "wall-s": report.wall_s,
            "interrupted": report.interrupted.as_ref().map(|(why, _)| why),
        }));
    } else {
        println!("{:<24} {:<14} {:>8}  RESULT", "NAME", "STATE", "WALL");
        for r in &report.rows {
            let result = &r["result"];
            let summary = match result.get("result") {
                None if result.is_null() => "(no result line)".to_string(),
                None => result.to_string(),
                Some(r) => format!(
                    "{} ({} I/Os, {} IOPS, {} errors, {} verify failures)",
                    r.as_str().unwrap_or("?"),
                    result["ios"],
                    result["iops"],
                    result["errors"],
                    result["verify_failures"]
                ),
            };
            println!(
                "{:<24} {:<14} {:>6}ms  {}",
                r["name"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["wall-ms"].as_u64().map_or("-".into(), |m| m.to_string()),
                summary.chars().take(160).collect::<String>()
            );
        }
        println!(
            "{} VMs: {} ok, {} failed, {:.2} s (all cloned and launched {:.2} s, all running {:.2} s){}",
            report.rows.len(),
            report.rows.len() - report.failed,
            report.failed,
            report.wall_s,
            report.launched_s,
            report.running_s,
            if demo {
                " (demo: each guest read and verified the base's data through its own clone)"
            } else {
                ""
            }
        );
    }
    if let Some((why, code)) = &report.interrupted {
        cli_support::say!("vmctl: the fleet was ended: {why}");
        return *code;
    }
    i32::from(report.failed > 0)
}

fn run(cli: Cli) -> Result<i32> {
    let root = Root::open(&cli.state_dir.unwrap_or_else(state::default_root))?;
    match cli.command {
        Cmd::Create {
            name,
            image,
            from_snapshot,
            restore_memory,
            vm,
        } => {
            let spec = match (image, from_snapshot) {
                (_, Some(snap)) => {
                    snapshots::Snapshot::open(&root, &snap)?.spec(vm.backend, restore_memory, false)
                }
                (Some(image), None) => spec(image, &vm)?,
                (None, None) => bail!("--image or --from-snapshot is needed"),
            };
            let vm = ops::create(&root, &name, &spec)?;
            println!("{}: defined ({})", vm.name, vm.path.display());
        }
        Cmd::Snapshot {
            name,
            snapshot,
            output,
        } => {
            let t = snapshots::snapshot(&root, &name, &snapshot)?;
            if output == Output::Json {
                print_json(&t.details);
            } else {
                println!(
                    "{name}: snapshot {snapshot} taken ({}, paused {:.1} ms)",
                    t.path.display(),
                    t.paused_ms
                );
            }
        }
        Cmd::Snapshots { output } => {
            let rows: Vec<Value> = snapshots::list(&root)?
                .iter()
                .map(|s| s.describe(&root))
                .collect();
            if output == Output::Json {
                print_json(&json!(rows));
            } else {
                println!(
                    "{:<20} {:<20} {:>4} {:>7} {:>9}  USED BY",
                    "NAME", "VM", "CPUS", "MEMORY", "SAVED"
                );
                for r in rows {
                    let users: Vec<&str> = r["used-by"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    println!(
                        "{:<20} {:<20} {:>4} {:>7} {:>9}  {}",
                        r["name"].as_str().unwrap_or(""),
                        r["vm"].as_str().unwrap_or(""),
                        r["cpus"],
                        human_bytes(r["memory"].as_u64().unwrap_or(0)),
                        human_bytes(r["memory-bytes"].as_u64().unwrap_or(0)),
                        if users.is_empty() {
                            "-".to_string()
                        } else {
                            users.join(",")
                        }
                    );
                }
            }
        }
        Cmd::SnapshotDelete { snapshot } => {
            snapshots::delete(&root, &snapshot)?;
            println!("snapshot {snapshot}: deleted");
        }
        Cmd::Backup {
            name,
            dest,
            incremental,
            output,
        } => {
            // Ctrl-C (or SIGTERM, SIGHUP) is said, not swallowed: DEST is
            // as it was before this backup (the next one clears what this
            // one leaves), and the VM's supervisor resumes it if it was
            // held paused.
            let signals = cli_support::exit_signals::ExitSignals::block()
                .context("blocking SIGINT, SIGTERM and SIGHUP")?;
            let shown = dest.display().to_string();
            std::thread::spawn(move || {
                let sig = signals.wait();
                cli_support::say!(
                    "\nvmctl: backup interrupted (signal {sig}): {shown} holds the backups it held before"
                );
                std::process::exit(128 + sig);
            });
            let mut bar = cli_support::progress::ProgressReport::new("backup", false);
            let t = snapshots::backup(&root, &name, &dest, incremental, &mut |d, t| {
                bar.update(d, t)
            })?;
            bar.done();
            if output == Output::Json {
                print_json(&t.details);
            } else {
                println!(
                    "{name}: {} backup {} ({} of data, paused {:.1} ms)",
                    if incremental { "incremental" } else { "full" },
                    t.path.display(),
                    human_bytes(t.details["data-bytes"].as_u64().unwrap_or(0)),
                    t.paused_ms
                );
            }
        }
        Cmd::Restore { dest, name } => {
            let vm = snapshots::restore(&root, &dest, &name)?;
            println!(
                "{}: defined from {} ({})",
                vm.name,
                dest.display(),
                vm.path.display()
            );
        }
        Cmd::Start { name } => {
            ops::start(&root, &name)?;
            println!("{name}: running");
        }
        Cmd::Stop { name, timeout } => {
            let s = ops::stop(&root, &name, Duration::from_secs(timeout))?;
            println!("{name}: {s}");
        }
        Cmd::Kill { name } => {
            let s = ops::kill(&root, &name)?;
            println!("{name}: {s}");
        }
        Cmd::Pause { name } => {
            let changed = ops::pause(&root, &name)?;
            println!("{name}: paused{}", if changed { "" } else { " (already)" });
        }
        Cmd::Resume { name } => {
            let changed = ops::resume(&root, &name)?;
            println!("{name}: running{}", if changed { "" } else { " (already)" });
        }
        Cmd::Restart { name, timeout } => {
            ops::restart(&root, &name, Duration::from_secs(timeout))?;
            println!("{name}: running");
        }
        Cmd::List { output } => {
            let rows: Vec<Value> = root
                .list()?
                .iter()
                .map(|vm| ops::describe(&root, vm))
                .collect::<Result<_>>()?;
            if output == Output::Json {
                print_json(&json!(rows));
            } else {
                println!(
                    "{:<20} {:<22} {:>8} {:>4} {:>7} {:>9} {:>9}  ADDRESS",
                    "NAME", "STATE", "PID", "CPUS", "MEMORY", "DISK", "UPTIME"
                );
                for r in rows {
                    let mut state = r["state"].as_str().unwrap_or("").to_string();
                    if let Some(n) = r["exit-status"].as_i64() {
                        state = format!("exited ({n})");
                    }
                    println!(
                        "{:<20} {:<22} {:>8} {:>4} {:>7} {:>9} {:>9}  {}",
                        r["name"].as_str().unwrap_or(""),
                        state,
                        r["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
                        r["cpus"],
                        human_bytes(r["memory"].as_u64().unwrap_or(0)),
                        human_bytes(r["disk-bytes"].as_u64().unwrap_or(0)),
                        r["uptime-s"]
                            .as_f64()
                            .map_or("-".into(), |s| format!("{s:.1}s")),
                        r["address"].as_str().unwrap_or("-"),
                    );
                }
            }
        }
        Cmd::Info { name, output } => {
            let v = ops::describe(&root, &root.vm(&name)?)?;
            if output == Output::Json {
                print_json(&v);
            } else if let Some(o) = v.as_object() {
                for (k, val) in o {
                    if !val.is_null() {
                        println!(
                            "{k}: {}",
                            val.as_str().map_or(val.to_string(), String::from)
                        );
                    }
                }
            }
        }
        Cmd::Logs { name, follow, tail } => {
            let vm = root.vm(&name)?;
            let text = ops::console_text(&vm);
            let lines: Vec<&str> = text.lines().collect();
            let from = tail.map_or(0, |t| lines.len().saturating_sub(t));
            for l in &lines[from..] {
                println!("{l}");
            }
            if follow {
                let mut shown = text.len();
                loop {
                    let active = vm.observed()?.is_active();
                    let now = ops::console_text(&vm);
                    if now.len() > shown {
                        print!("{}", &now[shown..]);
                        shown = now.len();
                    } else if now.len() < shown {
                        // Rotated: start over from what is kept.
                        shown = 0;
                        continue;
                    }
                    if !active {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Cmd::Wait {
            names,
            timeout,
            output,
        } => {
            let states = ops::wait(&root, &names, timeout.map(Duration::from_secs))?;
            let code = if states.iter().any(|(_, s)| s.is_active()) {
                124
            } else {
                exit_code_of(&states)
            };
            if output == Output::Json {
                print_json(&json!(states
                    .iter()
                    .map(|(n, s)| json!({ "name": n, "state": s.to_string(), "exit-status": match s { Observed::Exited(c) => Some(*c), _ => None } }))
                    .collect::<Vec<_>>()));
            } else {
                for (n, s) in &states {
                    println!("{n}: {s}");
                }
            }
            return Ok(code);
        }
        Cmd::Delete { name, force } => {
            ops::delete(&root, &name, force)?;
            println!("{name}: deleted");
        }
        Cmd::Run {
            count,
            prefix,
            image,
            from_snapshot,
            restore_memory,
            vm,
            rm,
            timeout,
            output,
        } => {
            let timeout = timeout.map(Duration::from_secs);
            let demo = image.is_none() && from_snapshot.is_none();
            if let Some(snap) = from_snapshot {
                let spec =
                    snapshots::Snapshot::open(&root, &snap)?.spec(vm.backend, restore_memory, rm);
                let report = fleet::run(&root, &prefix, count, &spec, rm, timeout)?;
                return Ok(print_fleet(&report, output, false));
            }
            let (image, vm, prefix, rm, count) = match image {
                Some(i) => (i, vm, prefix, rm, count),
                None => {
                    if !vm.cmdline.is_empty() || vm.kernel.is_some() {
                        bail!("--image is needed with --cmdline or --kernel (no image: the demo)");
                    }
                    let demo_vm = VmOptions {
                        cmdline: fleet::DEMO_READ.into(),
                        ..vm
                    };
                    let prefix = format!("demo{}", std::process::id());
                    (
                        fleet::demo_base(&root)?,
                        demo_vm,
                        prefix,
                        true,
                        count.max(2),
                    )
                }
            };
            let spec = Spec {
                scratch: rm,
                ..spec(image, &vm)?
            };
            let report = fleet::run(&root, &prefix, count, &spec, rm, timeout)?;
            return Ok(print_fleet(&report, output, demo));
        }
        Cmd::Network { action } => {
            let all: Vec<state::VmConfig> = root
                .list()?
                .iter()
                .filter_map(|vm| vm.config().ok())
                .collect();
            match action {
                NetworkCmd::Ls { output } => {
                    let bridges = network::list(&root, &all);
                    if output == Output::Json {
                        print_json(&serde_json::to_value(&bridges)?);
                    } else {
                        println!("{:<16} {:<18} {:<8} VMS", "BRIDGE", "SUBNET", "MADE");
                        for b in &bridges {
                            println!(
                                "{:<16} {:<18} {:<8} {}",
                                b.name,
                                b.subnet.as_deref().unwrap_or(if b.exists {
                                    "-"
                                } else {
                                    "(at first start)"
                                }),
                                if b.made_by_vmctl { "vmctl" } else { "-" },
                                b.vms.join(",")
                            );
                        }
                    }
                }
                NetworkCmd::Rm { bridge } => {
                    let _lock = network::allocation_lock(&root)?;
                    network::remove(&root, &bridge, &all)?;
                    println!("{bridge}: removed");
                }
            }
        }
        Cmd::Supervise { name } => {
            let vm = root.vm(&name)?;
            // A line on stdout tells the `vmctl start` that spawned us
            // that the VM runs; it may be gone: a failed write is no matter.
            supervisor::supervise(&root, &vm, || {
                use std::io::Write;
                let mut out = std::io::stdout();
                let _ = writeln!(out, "running").and_then(|()| out.flush());
            })?;
        }
        Cmd::Backend => host_backend::daemon(&root)?,
    }
    Ok(0)
}

fn main() {
    let cli = Cli::parse();
    let code = run(cli).unwrap_or_else(|e| {
        cli_support::say!("vmctl: error: {}", cli_support::report(&e));
        1
    });
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` says what every flag and argument of every verb is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() {
                    continue;
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "vmctl", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:?}");
    }

    /// Help text shows as written: clap reads `{n}` in it as a line break.
    #[test]
    fn help_texts_have_no_clap_markers() {
        let mut out = Vec::new();
        Cli::command()
            .find_subcommand_mut("run")
            .expect("run")
            .write_long_help(&mut out)
            .expect("help");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("the words n and name in braces"), "{text}");
    }
}
