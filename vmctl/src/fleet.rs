//! `vmctl run`: a test fleet in one command. N clones of one snapshot,
//! N VMs started together, waited for, one row each (exit status, wall
//! time, the guest's last JSON line) and a summary. With no image it runs
//! the built-in demo: a base made and filled on first use, guests that
//! verify its data through their clones.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image_format::{ops, RealEnv};
use serde_json::{json, Value};

use crate::binaries;
use crate::ops::{
    clone_source, create, delete, kill, start_in_process, wait_started, Spec, Starting,
};
use crate::state::VmDir;

/// One VM of a fleet being launched: made and started, or why not.
type Slot = std::sync::Mutex<Option<Result<(VmDir, Starting)>>>;

/// Clones made at once in a fleet (each one's flush to disk overlaps the
/// others' work; more would only queue on 2 cores).
const MAKERS: usize = 3;
use crate::state::{Observed, Root};

/// The demo base: 64 MiB whose first 16 MiB a guest wrote with generation
/// 7, sealed as `demo.img@golden`.
pub const DEMO_SNAPSHOT: &str = "golden";
pub const DEMO_READ: &str = "mode=read verify=1 expect_gen=7 size=16M";

/// The demo's base snapshot, made (and filled by a guest) on first use.
pub fn demo_base(root: &Root) -> Result<PathBuf> {
    let base = root.images().join("demo.img");
    let snap = ops::snapshot_path(&base, DEMO_SNAPSHOT);
    if snap.exists() {
        return Ok(snap);
    }
    cli_support::say!("vmctl: making the demo base {} (once)", snap.display());
    let _ = std::fs::remove_file(&base);
    ops::create(&RealEnv, &base, Some(64 << 20), 4096, None).context("creating the demo base")?;
    fill(&base, "mode=write verify=1 gen=7 size=16M")?;
    ops::snapshot_create(&RealEnv, &base, DEMO_SNAPSHOT).context("sealing the demo base")
}

/// A backend that ends with this value, however the caller returns.
struct OwnBackend(Child);

impl Drop for OwnBackend {
    fn drop(&mut self) {
        crate::process::stop(&mut self.0, crate::process::STOP_GRACE);
    }
}

/// Runs the bench guest on `image` itself (its own backend and vmm).
fn fill(image: &Path, cmdline: &str) -> Result<()> {
    // Everything that can be missing is looked for first: nothing is
    // started for a run that cannot happen.
    let kernel = binaries::bench_guest()?;
    let vmm = binaries::program("vmm")?;
    let sock = image.with_extension("fill.sock");
    let backend = OwnBackend(
        Command::new(binaries::program("blk-backend")?)
            .arg("--export")
            .arg(format!(
                "socket={},image={}",
                sock.display(),
                image.display()
            ))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting blk-backend")?,
    );
    // Listening once its socket is there (it binds and listens at once),
    // unless it ended first or is stuck.
    let ended = crate::process::pidfd(&backend.0)?;
    let until = Instant::now() + Duration::from_secs(30);
    let (waited, _) = cli_support::path_wait::wait_for(&sock, Some(until), &[ended.as_fd()]);
    if waited != cli_support::path_wait::Waited::Appeared {
        bail!("blk-backend did not listen on {}", sock.display());
    }
    let out = Command::new(vmm)
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "256M", "--cmdline", cmdline])
        .arg("--disk")
        // The socket exists once bound; the vmm's connect waits out the
        // moment until the backend listens.
        .arg(format!(
            "socket={},connect_timeout_ms=10000",
            sock.display()
        ))
        .output()
        .context("running the vmm")?;
    drop(backend);
    if !out.status.success() {
        bail!(
            "filling {} failed ({}):\n{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// `{n}` (1-based) and `{name}` in a fleet's command line, per VM.
pub fn expand(cmdline: &str, n: usize, name: &str) -> String {
    cmdline
        .replace("{n}", &n.to_string())
        .replace("{name}", name)
}

/// The guest's last JSON line on its console, if it printed one.
fn last_json(text: &str) -> Option<Value> {
    text.lines()
        .rev()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
}

pub struct FleetReport {
    pub rows: Vec<Value>,
    pub failed: usize,
    /// Every clone made and every supervisor spawned.
    pub launched_s: f64,
    /// Every VM running (or already ended).
    pub running_s: f64,
    pub wall_s: f64,
    /// Why the fleet was ended before its VMs were done (Ctrl-C, a
    /// signal, --timeout), and the exit status that says so.
    pub interrupted: Option<(String, i32)>,
}

/// Ends a fleet on Ctrl-C, SIGTERM, SIGHUP or its --timeout: every VM of
/// it that runs is killed (and later removed if --rm), from a thread of
/// its own; VMs not started yet are not started.
struct Stopper {
    why: Arc<Mutex<Option<(String, i32)>>>,
}

impl Stopper {
    /// Catches the exit signals and waits for one, or `timeout`.
    fn start(root: &Root, names: &[String], timeout: Option<Duration>) -> Result<Stopper> {
        // Caught, not blocked: a blocked mask would pass to every vmm and
        // net-backend the fleet starts, and their SIGTERMs would not land.
        let signals = cli_support::exit_signals::CaughtSignals::catch()
            .context("catching SIGINT, SIGTERM and SIGHUP")?;
        let why = Arc::new(Mutex::new(None));
        let (root, names, said) = (root.clone(), names.to_vec(), Arc::clone(&why));
        std::thread::Builder::new()
            .name("fleet-stopper".into())
            .spawn(move || {
                let reason = match timeout {
                    Some(t) => match signals.wait_for(t) {
                        Some(sig) => signal_reason(sig),
                        None => (format!("--timeout {} s passed", t.as_secs()), 124),
                    },
                    None => signal_reason(signals.wait()),
                };
                *said.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                kill_all(&root, &names);
            })
            .context("starting the fleet's stopper")?;
        Ok(Stopper { why })
    }

    fn stopped(&self) -> Option<(String, i32)> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn signal_reason(sig: i32) -> (String, i32) {
    let name = match sig {
        libc::SIGINT => "SIGINT (Ctrl-C)",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP (terminal closed)",
        _ => "a signal",
    };
    (format!("{name} received"), 128 + sig)
}

/// Kills every VM of `names` that runs.
fn kill_all(root: &Root, names: &[String]) {
    for n in names {
        if let Ok(vm) = root.vm(n) {
            if vm.observed().is_ok_and(|o| o.is_active()) {
                let _ = kill(root, n);
            }
        }
    }
}

/// Creates `count` VMs PREFIX-1..N from `spec`, starts them all, waits for
/// all; removes them after if `remove`.
/// `run`, the fleet's disks sharing one budget of `iops_group`
/// operations a second when given (a rate-limit group on the host
/// backend, `run-PREFIX`, made before the first VM starts and removed
/// after the last ends).
pub fn run_limited(
    root: &Root,
    prefix: &str,
    count: usize,
    mut spec: Spec,
    remove: bool,
    timeout: Option<Duration>,
    iops_group: Option<u64>,
) -> Result<FleetReport> {
    let Some(iops) = iops_group else {
        return run(root, prefix, count, &spec, remove, timeout);
    };
    if spec.backend != crate::state::BackendMode::Host {
        bail!("--disk-iops-group: the fleet's disks share a budget on the host backend, not --backend vm");
    }
    let limits = rate_limit::Limits {
        ops: Some(rate_limit::BucketSpec::per_second(iops)),
        bytes: None,
    };
    limits.check().context("--disk-iops-group")?;
    let group = format!("run-{prefix}");
    let host = crate::host_backend::HostBackend::of(root)?;
    host.set_group(&group, limits)
        .with_context(|| format!("making the fleet's rate-limit group {group}"))?;
    spec.disk_limits.group = Some(group.clone());
    let report = run(root, prefix, count, &spec, remove, timeout);
    let removed = host.remove_group(&group);
    let report = report?;
    removed.with_context(|| format!("removing the fleet's rate-limit group {group}"))?;
    Ok(report)
}

pub fn run(
    root: &Root,
    prefix: &str,
    count: usize,
    spec: &Spec,
    remove: bool,
    timeout: Option<Duration>,
) -> Result<FleetReport> {
    if count == 0 {
        bail!("--count 0: nothing to run");
    }
    let t0 = Instant::now();
    let names: Vec<String> = (1..=count).map(|i| format!("{prefix}-{i}")).collect();
    let stopper = Stopper::start(root, &names, timeout)?;
    // A working image is snapshotted once (as the first VM's create would
    // do) and every VM clones that snapshot: makers at work at once must
    // not each seal the same image.
    let sealed;
    let spec = if spec.restore.is_none() && spec.image.exists() {
        sealed = Spec {
            image: clone_source(&std::path::absolute(&spec.image)?, &names[0])?,
            ..spec.clone()
        };
        &sealed
    } else {
        spec
    };
    let mut made = Vec::new();
    let outcome = (|| -> Result<FleetReport> {
        // Each VM starts as soon as its clone exists, so the next clones
        // are made while it boots. The first is made alone (it may seal a
        // working image for the rest); then a few makers at once, so that
        // one clone's flush to disk overlaps the next one's work.
        let launch = |i: usize| -> Result<(VmDir, Starting)> {
            let name = &names[i];
            let s = Spec {
                cmdline: expand(&spec.cmdline, i + 1, name),
                ..spec.clone()
            };
            let vm = create(root, name, &s)?;
            if let Some((why, _)) = stopper.stopped() {
                // Made, not started: not the fleet's any more.
                if remove {
                    let _ = delete(root, name, true);
                }
                bail!("the fleet was ended: {why}");
            }
            let _lock = vm.lock()?;
            let st = start_in_process(root, &vm)?;
            Ok((vm, st))
        };
        let slots: Vec<Slot> = (0..count).map(|_| std::sync::Mutex::new(None)).collect();
        *slots[0].lock().unwrap_or_else(|e| e.into_inner()) = Some(launch(0));
        let next = std::sync::atomic::AtomicUsize::new(1);
        std::thread::scope(|scope| {
            for _ in 0..MAKERS.min(count.saturating_sub(1)) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(launch(i));
                });
            }
        });
        let mut starting = Vec::new();
        let mut first_error = None;
        for slot in slots {
            match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(Ok((vm, st))) => {
                    made.push(vm);
                    starting.push(st);
                }
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => {}
            }
        }
        // Started by a maker after the stopper's sweep: killed now.
        if stopper.stopped().is_some() {
            kill_all(root, &names);
        }
        if let Some(e) = first_error.filter(|_| stopper.stopped().is_none()) {
            // Those that started end with this process (their vmms die
            // with their supervising threads) and, with --rm, are removed.
            return Err(e);
        }
        let launched_s = t0.elapsed().as_secs_f64();
        // A VM that failed to start is a failed row, not the fleet's end.
        for (vm, s) in made.iter().zip(&starting) {
            let _ = wait_started(vm, s);
        }
        let running_s = t0.elapsed().as_secs_f64();
        let mut rows = Vec::new();
        let mut failed = 0;
        for (vm, s) in made.iter().zip(&starting) {
            s.wait_ended();
            let observed = vm.observed()?;
            let status = vm.status()?.unwrap_or_default();
            let ok = observed == Observed::Exited(0);
            failed += usize::from(!ok);
            let wall_ms = status
                .ended_unix_ms
                .map(|e| e.saturating_sub(status.started_unix_ms));
            rows.push(json!({
                "name": vm.name,
                "ok": ok,
                "state": observed.to_string(),
                "exit-status": match observed { Observed::Exited(n) => Some(n), _ => None },
                "wall-ms": wall_ms,
                "result": last_json(&crate::logs::console_text(vm)),
            }));
        }
        Ok(FleetReport {
            rows,
            failed,
            launched_s,
            running_s,
            wall_s: t0.elapsed().as_secs_f64(),
            interrupted: stopper.stopped(),
        })
    })();
    if remove {
        for vm in &made {
            let _ = delete(root, &vm.name, true);
        }
    }
    outcome
}
