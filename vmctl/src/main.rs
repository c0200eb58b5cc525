//! `vmctl`: named VMs with a whole lifecycle, and test fleets, on the
//! project's vmm and blk-backend.

mod binaries;
mod cli;
mod console;
mod fleet;
mod hold;
mod host_backend;
mod images;
mod logs;
mod network;
mod ops;
mod process;
mod snapshots;
mod state;
mod stoppable;
mod supervisor;
mod vm_api;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use crate::cli::{Cli, Cmd, ImageCmd, NetworkCmd, Output, VmOptions};
use crate::ops::Spec;
use crate::state::{Observed, Root};

fn parse_shares(given: &[String]) -> Result<Vec<crate::state::Share>> {
    let shares = given
        .iter()
        .map(|s| crate::state::Share::parse(s))
        .collect::<Result<Vec<_>>>()?;
    for (i, a) in shares.iter().enumerate() {
        if shares[..i].iter().any(|b| b.tag == a.tag) {
            bail!("--share: the tag {:?} is given twice", a.tag);
        }
    }
    Ok(shares)
}

/// What create and run make of IMAGE and the options: a registry image
/// (pulled on first use) brings its disk, kernel and defaults, which the
/// options override.
fn spec(root: &Root, image: PathBuf, vm: &VmOptions) -> Result<Spec> {
    let (mut image, mut kernel, mut initrd) = (image, vm.kernel.clone(), vm.initrd.clone());
    let mut defaults = vm_oci::VmDefaults::default();
    if images::is_reference(&image) {
        let reference = image.to_string_lossy().into_owned();
        let opts = vm_oci::RegistryOptions {
            insecure: vm.insecure,
            ..Default::default()
        };
        let record = images::ensure_pulled(root, &reference, &opts)?;
        let (top, k, i) = images::files_of(root, &record)?;
        image = top;
        if kernel.is_none() {
            (kernel, initrd) = (k, initrd.or(i));
        }
        defaults = record.defaults;
    }
    Ok(Spec {
        image,
        kernel,
        initrd,
        cmdline: if vm.cmdline.is_empty() {
            defaults.cmdline.unwrap_or_default()
        } else {
            vm.cmdline.clone()
        },
        cpus: vm.cpus.or(defaults.cpus).unwrap_or(1),
        memory: match &vm.memory {
            Some(m) => cli_support::parse_size(m).context("--memory")?,
            None => defaults.memory.unwrap_or(256 << 20),
        },
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
        shares: parse_shares(&vm.shares)?,
        placement: vm.placement(),
        disk_limits: vm.disk_limits()?,
    })
}

/// What create and run make of `--from-snapshot SNAP`: a VM snapshot of
/// this state root, or one from a registry (pulled on first use).
fn snapshot_spec(
    root: &Root,
    snap: &str,
    vm: &VmOptions,
    memory: crate::state::RestoreMemory,
    scratch: bool,
) -> Result<Spec> {
    let mut spec = if images::is_reference(std::path::Path::new(snap)) {
        let opts = vm_oci::RegistryOptions {
            insecure: vm.insecure,
            ..Default::default()
        };
        images::snapshot_spec(
            root,
            snap,
            &opts,
            vm.backend,
            vm.placement(),
            memory,
            scratch,
        )?
    } else {
        snapshots::Snapshot::open(root, snap)?.spec(vm.backend, vm.placement(), memory, scratch)
    };
    spec.disk_limits = vm.disk_limits()?;
    Ok(spec)
}

/// "2 of 3 blobs uploaded, 1048576 bytes".
fn transfer_summary(blobs: &[vm_oci::Blob], verb: &str) -> String {
    format!(
        "{} of {} blobs {verb}, {} bytes",
        blobs.iter().filter(|b| b.transferred).count(),
        blobs.len(),
        vm_oci::transferred_bytes(blobs)
    )
}

/// `value` as JSON, or the human line.
fn print_answer(
    output: Output,
    value: &impl serde::Serialize,
    human: impl FnOnce() -> String,
) -> Result<()> {
    if output == Output::Json {
        print_json(&serde_json::to_value(value)?);
    } else {
        println!("{}", human());
    }
    Ok(())
}

/// `vmctl image ...`.
fn image_verb(root: &Root, action: ImageCmd) -> Result<i32> {
    let mut say = |l: &str| eprintln!("{l}");
    match action {
        ImageCmd::Push {
            snapshot,
            reference,
            kernel,
            initrd,
            cmdline,
            cpus,
            memory,
            vm_snapshot,
            insecure,
            output,
        } => {
            let src = if vm_snapshot {
                let name = snapshot.to_str().context("a VM snapshot's name")?;
                snapshots::Snapshot::open(root, name)?.push_source()
            } else {
                vm_oci::PushSource {
                    snapshot,
                    kernel,
                    initrd,
                    defaults: vm_oci::VmDefaults {
                        cpus,
                        memory: memory
                            .as_deref()
                            .map(cli_support::parse_size)
                            .transpose()
                            .context("--memory")?,
                        cmdline,
                        queues: None,
                    },
                    vm_state: None,
                }
            };
            let opts = vm_oci::RegistryOptions {
                insecure,
                ..Default::default()
            };
            let report = images::push(root, &src, &reference, &opts, &mut say)?;
            let moved = transfer_summary(&report.blobs, "uploaded");
            print_answer(output, &report, || {
                format!(
                    "{reference}: pushed ({moved}; manifest {})",
                    report.manifest_digest
                )
            })?;
        }
        ImageCmd::Pull {
            reference,
            insecure,
            output,
        } => {
            let opts = vm_oci::RegistryOptions {
                insecure,
                ..Default::default()
            };
            let pulled = images::pull(root, &reference, &opts, &mut say)?;
            let moved = transfer_summary(&pulled.blobs, "fetched");
            print_answer(output, &pulled, || format!("{reference}: pulled ({moved})"))?;
        }
        ImageCmd::Import { dirs, output } => {
            let store = images::store(root)?;
            let imported = vm_oci::unpacked::import(&store, &dirs, &mut say)?;
            print_answer(output, &imported, || {
                format!(
                    "{}: {} layers, {} restored",
                    imported.top.display(),
                    imported.layers.len(),
                    imported.restored.len()
                )
            })?;
        }
        ImageCmd::Ls { output } => {
            let listed = images::list(root)?;
            if output == Output::Json {
                print_json(&serde_json::to_value(&listed)?);
            } else {
                println!("{:<48} {:<8} {:<10} VMS", "IMAGE", "LAYERS", "SIZE");
                for l in &listed {
                    println!(
                        "{:<48} {:<8} {:<10} {}",
                        l.record.reference,
                        l.record.layers.len(),
                        l.record.virtual_size,
                        l.vms.join(",")
                    );
                }
            }
        }
        ImageCmd::Rm { reference } => {
            images::remove(root, &reference)?;
            println!("{reference}: removed");
        }
        ImageCmd::Prune => {
            let (n, bytes) = images::prune(root)?;
            println!("pruned {n} layers and kernels ({bytes} bytes)");
        }
    }
    Ok(0)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `cmd`'s manual page as NAME.1 in `dir`, and its visible verbs' as
/// NAME-VERB.1 (and theirs); how many pages.
fn write_man_pages(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> Result<usize> {
    // (clap names are &'static: a short-lived process lends it one.)
    let page_name: &'static str = Box::leak(name.to_string().into_boxed_str());
    let cmd = cmd.clone().name(page_name);
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).with_context(|| format!("{}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        n += write_man_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}

/// Runs `verb` on each named VM in turn, the rest going on when one
/// fails: a line each (`NAME: STATE`, or an error on stderr), or one JSON
/// list of `{name, ok, state | error}`. Exit status 1 if any failed.
/// What a verb left a VM as: its state in a word, and the vmm's pid if it
/// runs.
struct Outcome {
    state: String,
    pid: Option<u32>,
}

impl From<&str> for Outcome {
    fn from(state: &str) -> Outcome {
        Outcome::from(state.to_string())
    }
}

impl From<String> for Outcome {
    fn from(state: String) -> Outcome {
        Outcome { state, pid: None }
    }
}

fn each_vm(names: &[String], output: Output, verb: impl Fn(&str) -> Result<Outcome>) -> i32 {
    let mut rows = Vec::new();
    let mut failed = false;
    for n in names {
        let row = match verb(n) {
            Ok(done) => {
                if output == Output::Human {
                    println!("{n}: {}", done.state);
                }
                vmctl_api::VerbRow {
                    name: n.clone(),
                    ok: true,
                    state: Some(done.state),
                    error: None,
                    pid: done.pid,
                }
            }
            Err(e) => {
                failed = true;
                let why = cli_support::report(&e);
                if output == Output::Human {
                    cli_support::say!("vmctl: error: {why}");
                }
                vmctl_api::VerbRow {
                    name: n.clone(),
                    ok: false,
                    state: None,
                    error: Some(why),
                    pid: None,
                }
            }
        };
        rows.push(row);
    }
    if output == Output::Json {
        print_json(&serde_json::to_value(rows).expect("rows of strings serialize"));
    }
    i32::from(failed)
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
    // What needs no state root.
    match &cli.command {
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "vmctl", &mut std::io::stdout());
            return Ok(0);
        }
        Cmd::Man { dir } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
            let written = write_man_pages(&Cli::command(), "vmctl", dir)?;
            println!("{written} pages in {}", dir.display());
            return Ok(0);
        }
        _ => {}
    }
    let root = Root::open(&cli.state_dir.unwrap_or_else(state::default_root))?;
    match cli.command {
        Cmd::Create {
            name,
            image,
            from_snapshot,
            restore_memory,
            vm,
            output,
        } => {
            let spec = match (image, from_snapshot) {
                (_, Some(snap)) => snapshot_spec(&root, &snap, &vm, restore_memory, false)?,
                (Some(image), None) => spec(&root, image, &vm)?,
                (None, None) => bail!("--image or --from-snapshot is needed"),
            };
            let vm = ops::create(&root, &name, &spec)?;
            if output == Output::Json {
                print_json(&serde_json::to_value(ops::describe(&root, &vm)?)?);
            } else {
                println!("{}: defined ({})", vm.name, vm.path.display());
            }
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
        Cmd::SnapshotDelete { snapshot, output } => {
            snapshots::delete(&root, &snapshot)?;
            if output == Output::Json {
                print_json(&json!({ "name": snapshot, "deleted": true }));
            } else {
                println!("snapshot {snapshot}: deleted");
            }
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
            let signals = cli_support::exit_signals::CaughtSignals::catch()
                .context("catching SIGINT, SIGTERM and SIGHUP")?;
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
        Cmd::Restore { dest, name, output } => {
            let vm = snapshots::restore(&root, &dest, &name)?;
            if output == Output::Json {
                print_json(&serde_json::to_value(ops::describe(&root, &vm)?)?);
                return Ok(0);
            }
            println!(
                "{}: defined from {} ({})",
                vm.name,
                dest.display(),
                vm.path.display()
            );
        }
        Cmd::Start {
            names,
            autostart,
            output,
        } => {
            let names = if autostart {
                root.list()?
                    .into_iter()
                    .filter(|vm| vm.config().is_ok_and(|c| c.autostart))
                    .filter(|vm| !vm.observed().is_ok_and(|o| o.is_active()))
                    .map(|vm| vm.name)
                    .collect()
            } else {
                names
            };
            return Ok(each_vm(&names, output, |n| {
                ops::start(&root, n)?;
                let pid = root.vm(n)?.status()?.and_then(|s| s.vmm_pid);
                Ok(Outcome {
                    state: "running".into(),
                    pid,
                })
            }));
        }
        Cmd::Set {
            name,
            cpus,
            memory,
            queues,
            cmdline,
            kernel,
            initrd,
            shares,
            no_shares,
            disk_size,
            net,
            nat,
            no_net,
            autostart,
            vcpu_affinity,
            disk_worker_cpus,
            disk_iops,
            disk_bw,
            output,
        } => {
            let none_or = |v: Option<String>, what: &str, parse: &dyn Fn(&str) -> Result<u64>| {
                v.map(|v| match v.as_str() {
                    "none" => Ok(None),
                    v => parse(v)
                        .map(Some)
                        .with_context(|| format!("{what} {v:?}: a number, or none")),
                })
                .transpose()
            };
            let disk_iops = none_or(disk_iops, "--disk-iops", &|v| Ok(v.parse::<u64>()?))?;
            let disk_bw = none_or(disk_bw, "--disk-bw", &|v| {
                Ok(cli_support::parse_size(v.trim_end_matches("/s"))?)
            })?;
            let changes = ops::Changes {
                disk_iops,
                disk_bw,
                cpus,
                memory: memory
                    .as_deref()
                    .map(cli_support::parse_size)
                    .transpose()
                    .context("--memory")?,
                queues,
                cmdline,
                kernel,
                initrd,
                shares: if no_shares {
                    Some(Vec::new())
                } else if shares.is_empty() {
                    None
                } else {
                    Some(parse_shares(&shares)?)
                },
                autostart,
                disk_size: disk_size
                    .as_deref()
                    .map(cli_support::parse_size)
                    .transpose()
                    .context("--disk-size")?,
                net: if no_net { Some(None) } else { net.map(Some) },
                nat,
                vcpu_affinity: vcpu_affinity.map(|c| c.0),
                disk_worker_cpus: disk_worker_cpus.map(|c| c.0),
            };
            let live = ops::set(&root, &name, &changes)?;
            if output == Output::Json {
                print_json(&serde_json::to_value(ops::describe(
                    &root,
                    &root.vm(&name)?,
                )?)?);
            } else if live {
                println!("{name}: changed (its disk's limits at once)");
            } else {
                println!("{name}: changed (from its next start)");
            }
        }
        Cmd::Autostart { names, off, output } => {
            return Ok(each_vm(&names, output, |n| {
                let changes = ops::Changes {
                    autostart: Some(!off),
                    ..Default::default()
                };
                ops::set(&root, n, &changes)?;
                Ok(if off { "autostart off" } else { "autostart on" }.into())
            }));
        }
        Cmd::Stop {
            names,
            timeout,
            output,
        } => {
            return Ok(each_vm(&names, output, |n| {
                Ok(ops::stop(&root, n, Duration::from_secs(timeout))?
                    .to_string()
                    .into())
            }));
        }
        Cmd::Kill { names, output } => {
            return Ok(each_vm(&names, output, |n| {
                Ok(ops::kill(&root, n)?.to_string().into())
            }));
        }
        Cmd::Pause { names, output } => {
            return Ok(each_vm(&names, output, |n| {
                let changed = ops::pause(&root, n)?;
                Ok(format!("paused{}", if changed { "" } else { " (already)" }).into())
            }));
        }
        Cmd::Resume { names, output } => {
            return Ok(each_vm(&names, output, |n| {
                let changed = ops::resume(&root, n)?;
                Ok(format!("running{}", if changed { "" } else { " (already)" }).into())
            }));
        }
        Cmd::Restart {
            names,
            timeout,
            output,
        } => {
            return Ok(each_vm(&names, output, |n| {
                ops::restart(&root, n, Duration::from_secs(timeout))?;
                Ok("running".into())
            }));
        }
        Cmd::List { output } => {
            let rows: Vec<Value> = root
                .list()?
                .iter()
                .map(|vm| Ok(serde_json::to_value(ops::describe(&root, vm)?)?))
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
            let v = serde_json::to_value(ops::describe(&root, &root.vm(&name)?)?)?;
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
        Cmd::Logs { name, follow, tail } => logs::show(&root.vm(&name)?, tail, follow)?,
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
                let rows: Vec<vmctl_api::WaitRow> = states
                    .iter()
                    .map(|(n, s)| vmctl_api::WaitRow {
                        name: n.clone(),
                        state: s.to_string(),
                        exit_status: match s {
                            Observed::Exited(c) => Some(*c),
                            _ => None,
                        },
                    })
                    .collect();
                print_json(&serde_json::to_value(rows)?);
            } else {
                for (n, s) in &states {
                    println!("{n}: {s}");
                }
            }
            return Ok(code);
        }
        Cmd::Delete {
            names,
            force,
            if_exists,
            output,
        } => {
            return Ok(each_vm(&names, output, |n| {
                match ops::delete(&root, n, force) {
                    Err(e)
                        if if_exists
                            && matches!(
                                e.downcast_ref::<crate::state::StateError>(),
                                Some(crate::state::StateError::NoSuchVm(_))
                            ) =>
                    {
                        Ok("not there".into())
                    }
                    Err(e) => Err(e),
                    Ok(()) => Ok("deleted".into()),
                }
            }));
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
            disk_iops_group,
            output,
        } => {
            let timeout = timeout.map(Duration::from_secs);
            let demo = image.is_none() && from_snapshot.is_none();
            if let Some(snap) = from_snapshot {
                let spec = snapshot_spec(&root, &snap, &vm, restore_memory, rm)?;
                let report =
                    fleet::run_limited(&root, &prefix, count, spec, rm, timeout, disk_iops_group)?;
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
                ..spec(&root, image, &vm)?
            };
            let report =
                fleet::run_limited(&root, &prefix, count, spec, rm, timeout, disk_iops_group)?;
            return Ok(print_fleet(&report, output, demo));
        }
        Cmd::Completions { .. } | Cmd::Man { .. } => unreachable!("answered above"),
        Cmd::Console { name } => console::attach(&root, &name)?,
        Cmd::Image { action } => return image_verb(&root, action),
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
