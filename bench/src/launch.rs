//! The fleet launch (`bench-fleet --launch`): what short-lived VMs cost
//! under vmctl, against the same VMs launched the way a QEMU user would
//! script them (qemu-storage-daemon + QEMU microvm + qboot per VM), in one
//! run.
//!
//! - One VM's whole life: `vmctl create`, `start`, `wait`, `delete` of a
//!   1-I/O bench guest, each a separate vmctl process (median of runs).
//! - A fleet: `vmctl run --count N` from one snapshot; the time from launch
//!   until each guest printed its start marker (read from each VM's console
//!   file as it appears), and host memory per VM beside guest memory (the
//!   PSS of every process the VM needs, shared pages counted once, guest
//!   memory, which is shared memory, left out) while all N run.
//! - The QEMU fleet: N qemu-storage-daemon + QEMU microvm pairs started
//!   together, each on its own (sparse) raw file, markers read from their
//!   consoles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use anyhow::{bail, Context, Result};
use test_infra::{Disk, Machine, Patience, QemuConsole, QemuVm, StorageDaemon};

pub struct LaunchOptions {
    pub count: usize,
    pub runs: usize,
    /// Fleets launched each way, alternating (the median is reported: a
    /// single run on this machine varies by 15 %).
    pub fleet_runs: usize,
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
}

fn vmctl(o: &LaunchOptions, state: &Path, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(o.bin_dir.join("vmctl"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .context("running vmctl")?;
    Ok(out)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// PSS beside shared memory (guest RAM is a shared mapping), KiB.
fn private_pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |k: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    field("Pss:").saturating_sub(field("Pss_Shmem:"))
}

/// Processes whose command line mentions `needle`.
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// How the VMs' disks are served in a direct fleet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serving {
    /// A blk-backend process per VM.
    PerVm,
    /// One blk-backend for the host, each VM's export added through its
    /// control socket.
    PerHost,
}

/// Until something listens on `path` (its file appears at bind, a
/// moment before listen).
fn wait_listening(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !test_infra::listening(path) {
        if Instant::now() > deadline {
            bail!("nothing listens on {}", path.display());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// A process's CPU time so far, every thread's, in nanoseconds (the
/// scheduler's own account, /proc/PID/task/TID/schedstat: clock ticks
/// were too coarse for what an idle VM costs).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// What VMs at rest cost: `count` named VMs whose guests idle, each
/// started with `vmctl start`; (MiB per VM beside guest memory, CPU ms per
/// VM per second, wall ms of each `vmctl stop`).
struct AtRest {
    mib_per_vm: f64,
    cpu_ms_per_vm_s: f64,
    stop_ms: f64,
}

fn at_rest(o: &LaunchOptions, state: &Path, base: &str, count: usize) -> Result<AtRest> {
    let names: Vec<String> = (1..=count).map(|i| format!("rest-{i}")).collect();
    for n in &names {
        for args in [
            &["create", n, "--image", base, "--cmdline", "mode=idle"][..],
            &["start", n][..],
        ] {
            let out = vmctl(o, state, args)?;
            if !out.status.success() {
                bail!("vmctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    // Settled: every guest printed its idle line.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !names.iter().all(|n| {
        std::fs::read_to_string(state.join(format!("vms/{n}/console.log")))
            .is_ok_and(|c| c.contains("\"result\":\"idle\""))
    }) {
        if Instant::now() > deadline {
            bail!("idle guests did not settle within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let pids = pids_mentioning(&state.to_string_lossy());
    let kib: u64 = pids.iter().copied().map(private_pss_kib).sum();
    let before: u64 = pids.iter().copied().map(cpu_ns).sum();
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    let after: u64 = pids.iter().copied().map(cpu_ns).sum();
    let cpu_ms = after.saturating_sub(before) as f64 / 1e6;
    let mut stops = Vec::new();
    for n in &names {
        let t = Instant::now();
        let out = vmctl(o, state, &["stop", n])?;
        if !out.status.success() {
            bail!("vmctl stop {n}: {}", String::from_utf8_lossy(&out.stderr));
        }
        stops.push(ms(t));
        let _ = vmctl(o, state, &["delete", n])?;
    }
    Ok(AtRest {
        mib_per_vm: kib as f64 / 1024.0 / count as f64,
        cpu_ms_per_vm_s: cpu_ms / window.as_secs_f64() / count as f64,
        stop_ms: crate::median(&stops)?,
    })
}

/// `count` vmms on clones of `base`, their disks served per VM or by one
/// host backend, without vmctl: (start markers since launch in ms, host
/// memory per VM in KiB beside guest memory, measured while all run if
/// `measure_memory`).
fn direct_fleet(
    o: &LaunchOptions,
    work: &Path,
    base: &Path,
    serving: Serving,
    count: usize,
    cmdline: &str,
    measure_memory: bool,
) -> Result<(Vec<f64>, f64)> {
    use std::io::BufRead;
    let tag = if serving == Serving::PerHost {
        "host"
    } else {
        "vm"
    };
    let dir = work.join(format!("direct-{tag}-{count}"));
    std::fs::create_dir_all(&dir)?;
    let backend_bin = o.bin_dir.join("blk-backend");
    // Ended however this returns (an error too): nothing left running.
    struct Backends(Vec<std::process::Child>);
    impl Drop for Backends {
        fn drop(&mut self) {
            for b in &mut self.0 {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(b.id() as i32, libc::SIGTERM) };
                let _ = b.wait();
            }
        }
    }
    let mut backends = Backends(Vec::new());
    let mut ctl = None;
    if serving == Serving::PerHost {
        let path = dir.join("host.ctl");
        backends.0.push(
            Command::new(&backend_bin)
                .arg("--control")
                .arg(&path)
                .stderr(std::fs::File::create(work.join("host-backend.log"))?)
                .spawn()?,
        );
        wait_listening(&path)?;
        ctl = Some(blk_control::Client::connect(&path, None)?);
    }
    let t0 = Instant::now();
    let mut vmms = Vec::new();
    for k in 0..count {
        let disk = dir.join(format!("d{k}.img"));
        let sock = dir.join(format!("d{k}.sock"));
        image_format::ops::clone(&image_format::RealEnv, base, &disk)?;
        match &mut ctl {
            Some(c) => {
                c.add(blk_control::ExportArgs::new(&sock, &disk))
                    .with_context(|| {
                        std::fs::read_to_string(work.join("host-backend.log")).unwrap_or_default()
                    })?;
            }
            None => {
                backends.0.push(
                    Command::new(&backend_bin)
                        .arg("--export")
                        .arg(format!(
                            "socket={},image={}",
                            sock.display(),
                            disk.display()
                        ))
                        .stderr(Stdio::null())
                        .spawn()?,
                );
                wait_listening(&sock)?;
            }
        }
        let mut vmm = Command::new(o.bin_dir.join("vmm"))
            .arg("--kernel")
            .arg(test_infra::build_guest()?.elf)
            .args(["--memory", "256M", "--cmdline", cmdline])
            .arg("--disk")
            .arg(format!("socket={}", sock.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = vmm.stdout.take().context("vmm stdout")?;
        let marker = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                match line {
                    Ok(l) if l.contains("BENCH-GUEST START") => return Some(t0.elapsed()),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            None
        });
        vmms.push((vmm, marker));
    }
    let mut kib = 0u64;
    if measure_memory {
        std::thread::sleep(Duration::from_millis(500));
        kib = vmms
            .iter()
            .map(|(v, _)| v.id())
            .chain(backends.0.iter().map(|b| b.id()))
            .map(private_pss_kib)
            .sum();
    }
    let mut markers = Vec::new();
    for (mut vmm, marker) in vmms {
        let st = vmm.wait()?;
        if !st.success() {
            bail!("a vmm of the {tag} fleet ended with {st}");
        }
        let m = marker.join().ok().flatten().context("no start marker")?;
        markers.push(m.as_secs_f64() * 1000.0);
    }
    drop(ctl);
    drop(backends);
    let _ = std::fs::remove_dir_all(&dir);
    Ok((markers, kib as f64 / count as f64))
}

/// The run's scratch directory, removed however the run ends (a failed
/// run used to leave 17 MB behind).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(o: &LaunchOptions) -> Result<String> {
    let scratch = Scratch(o.dir.join(format!("bench-launch-{}", std::process::id())));
    let work = scratch.0.clone();
    std::fs::create_dir_all(&work)?;
    let state = work.join("state");
    // The base: vmctl's demo base, made on first use in this state root.
    let out = vmctl(o, &state, &["run", "--count", "1"])?;
    if !out.status.success() {
        bail!(
            "vmctl's demo failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let base = state.join("images/demo.img@golden");
    let base_s = base.to_str().context("utf-8 path")?;
    let one_io = "mode=read ios=1 progress_ms=0";

    // One VM's life, step by step.
    let mut steps: HashMap<&str, Vec<f64>> = HashMap::new();
    for _ in 0..o.runs {
        let mut step = |name: &'static str, args: &[&str]| -> Result<()> {
            let t = Instant::now();
            let out = vmctl(o, &state, args)?;
            if !out.status.success() {
                bail!("vmctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            steps.entry(name).or_default().push(ms(t));
            Ok(())
        };
        step(
            "create",
            &["create", "life", "--image", base_s, "--cmdline", one_io],
        )?;
        step("start", &["start", "life"])?;
        step("wait", &["wait", "life"])?;
        step("delete", &["delete", "life"])?;
    }
    let step_ms = |s: &str| crate::median(steps.get(s).map_or(&[][..], |v| &v[..]));
    let life_total: f64 = ["create", "start", "wait", "delete"]
        .iter()
        .map(|s| step_ms(s))
        .sum::<Result<f64, _>>()?;

    // The vmctl fleet: markers as they appear.
    let fleet =
        |count: usize, cmdline: &str, measure_memory: bool| -> Result<(Vec<f64>, f64, f64)> {
            let t0 = Instant::now();
            let mut child = Command::new(o.bin_dir.join("vmctl"))
                .arg("--state-dir")
                .arg(&state)
                .args([
                    "run",
                    "--count",
                    &count.to_string(),
                    "--name",
                    "f",
                    "--image",
                    base_s,
                ])
                .args(["--cmdline", cmdline, "--rm", "--output", "json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            let mut seen: Vec<Option<f64>> = vec![None; count];
            let mut memory_kib = 0u64;
            let deadline = Instant::now() + Duration::from_secs(600);
            while seen.iter().any(Option::is_none) && Instant::now() < deadline {
                // Looking costs the fleet CPU: a stat per unseen console
                // every 2 ms, its first bytes read once they are there (the
                // marker is the guest's first line).
                for (i, s) in seen.iter_mut().enumerate().filter(|(_, s)| s.is_none()) {
                    let console = state.join(format!("vms/f-{}/console.log", i + 1));
                    if std::fs::metadata(&console).is_ok_and(|m| m.len() >= 17)
                        && std::fs::read(&console)
                            .is_ok_and(|b| b.windows(17).any(|w| w == b"BENCH-GUEST START"))
                    {
                        *s = Some(ms(t0));
                    }
                }
                if child.try_wait()?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if measure_memory {
                std::thread::sleep(Duration::from_millis(500));
                let needle = state.to_string_lossy().to_string();
                memory_kib = pids_mentioning(&needle)
                    .into_iter()
                    .chain(pids_mentioning("vmctl-bench-marker"))
                    .map(private_pss_kib)
                    .sum();
            }
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!(
                    "the fleet failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let markers: Vec<f64> = seen.into_iter().flatten().collect();
            if markers.len() != count {
                bail!(
                    "{} of {count} guests printed their start marker",
                    markers.len()
                );
            }
            Ok((markers, ms(t0), memory_kib as f64 / count as f64))
        };
    // The QEMU fleet, launched together.
    let qemu_fleet = |run: usize| -> Result<(Vec<f64>, f64)> {
        let t0 = Instant::now();
        let mut daemons = Vec::new();
        let mut vms = Vec::new();
        for k in 0..o.count {
            let raw = work.join(format!("q{run}-{k}.raw"));
            std::fs::File::create(&raw)?.set_len(64 << 20)?;
            let sock = work.join(format!("q{run}-{k}.sock"));
            daemons.push(StorageDaemon::start(&raw, &sock, 1, true)?);
            let started = Instant::now();
            let vm = QemuVm {
                machine: Machine::Microvm,
                mem_mib: 256,
                disk: Disk::vhost_user(&sock, 1),
                cmdline: one_io.into(),
                limit: Patience::new("a 1-I/O guest under QEMU", Duration::from_millis(500)),
                silence: Patience::new("a 1-I/O guest under QEMU", Duration::from_millis(500)),
                console: QemuConsole::Uart,
                nic: None,
            }
            .spawn()?;
            vms.push((started, vm));
        }
        let mut q_markers = Vec::new();
        for (started, vm) in vms {
            let r = vm.wait()?;
            let to_marker = r
                .to_marker
                .context("a QEMU guest printed no start marker")?;
            q_markers
                .push((started - t0).as_secs_f64() * 1000.0 + to_marker.as_secs_f64() * 1000.0);
        }
        let q_wall = ms(t0);
        drop(daemons);
        for k in 0..o.count {
            let _ = std::fs::remove_file(work.join(format!("q{run}-{k}.raw")));
        }
        Ok((q_markers, q_wall))
    };
    let last = |m: &[f64]| m.iter().cloned().fold(0.0, f64::max);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..o.fleet_runs.max(1) {
        let (m, wall, _) = fleet(o.count, one_io, false)?;
        ours.push((last(&m), m, wall));
        let (m, wall) = qemu_fleet(run)?;
        theirs.push((last(&m), m, wall));
    }
    // The runs listed in order of the time to the last marker; the median
    // run of each reported.
    ours.sort_by(|a, b| a.0.total_cmp(&b.0));
    theirs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let median_run = |runs: &[(f64, Vec<f64>, f64)]| {
        crate::stats::median_run(&runs.iter().map(|r| r.0).collect::<Vec<_>>())
    };
    let list = |runs: &[(f64, Vec<f64>, f64)]| {
        runs.iter()
            .map(|r| format!("{:.0}", r.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (our_runs, their_runs) = (list(&ours), list(&theirs));
    let (_, markers, fleet_wall) = ours.swap_remove(median_run(&ours)?);
    let (_, q_markers, q_wall) = theirs.swap_remove(median_run(&theirs)?);
    // Memory with every VM alive: a workload that lasts, light (qd 1,
    // interrupts).
    let mem_count = o.count.min(16);
    let (_, _, kib_per_vm) = fleet(
        mem_count,
        "mode=randread qd=1 irq=1 duration_ms=10000 timeout_ms=60000 progress_ms=0",
        true,
    )?;

    // VMs at rest: started one by one with `vmctl start` (each its own
    // supervisor process, as a user's named VMs are), their guests idle
    // (device set up, vCPU halted): the memory and CPU each costs its host.
    let rest = at_rest(o, &state, base_s, mem_count)?;

    // The two ways of serving a fleet's disks, vmm only (no vmctl).
    let light = "mode=randread qd=1 irq=1 duration_ms=10000 timeout_ms=60000 progress_ms=0";
    let mut serving = Vec::new();
    for (mode, name) in [
        (Serving::PerVm, "a blk-backend per VM"),
        (Serving::PerHost, "one blk-backend per host (--control)"),
    ] {
        let (m, _) = direct_fleet(o, &work, &base, mode, o.count, one_io, false)?;
        let (_, kib) = direct_fleet(o, &work, &base, mode, mem_count, light, true)?;
        serving.push((name, m, kib));
    }
    drop(scratch);

    let all = markers.iter().cloned().fold(0.0, f64::max);
    let q_all = q_markers.iter().cloned().fold(0.0, f64::max);
    let mut fleet_table = Table::new([
        ("", Left),
        ("vmctl (vmm + blk-backend, clones of one snapshot)", Right),
        ("QEMU microvm + qboot + qemu-storage-daemon", Right),
        ("ratio", Right),
    ]);
    fleet_table
        .row([
            format!(
                "all {} start markers printed, ms (median of {} runs)",
                o.count,
                o.fleet_runs.max(1)
            ),
            format!("{all:.0}"),
            format!("{q_all:.0}"),
            Ratio::of(q_all, all).times(1),
        ])
        .row([
            "the runs, ms".to_string(),
            our_runs,
            their_runs,
            String::new(),
        ])
        .row([
            "per-VM start marker p50 / p99, ms".to_string(),
            format!(
                "{:.0} / {:.0}",
                crate::percentile(&markers, 50.0)?,
                crate::percentile(&markers, 99.0)?
            ),
            format!(
                "{:.0} / {:.0}",
                crate::percentile(&q_markers, 50.0)?,
                crate::percentile(&q_markers, 99.0)?
            ),
            String::new(),
        ])
        .row([
            "whole fleet done, ms".to_string(),
            format!("{fleet_wall:.0}"),
            format!("{q_wall:.0}"),
            Ratio::of(q_wall, fleet_wall).times(1),
        ]);
    let mut md = format!(
        "## Fleet launch ({} VMs, bench guest, 1-I/O workload, 2-core PVM host)\n\n{fleet_table}",
        o.count
    );
    md += &format!(
        "\nHost memory per VM beside its guest memory ({mem_count} VMs of one `vmctl run` with a light workload, PSS of the run, the vmms and the host blk-backend, guest RAM excluded): {:.2} MiB; goal under 3 MiB.\n\nAt rest ({mem_count} named VMs, each started by `vmctl start` with its own supervisor, guests idle with their disk set up): {:.2} MiB per VM beside guest memory, {:.3} ms of host CPU per VM per second (every thread of the VMs' processes and the host backend, over 2 s); `vmctl stop` (graceful) {:.1} ms (median).\n",
        kib_per_vm / 1024.0,
        rest.mib_per_vm,
        rest.cpu_ms_per_vm_s,
        rest.stop_ms
    );
    let mut serving_table = Table::new([
        (String::new(), Left),
        ("all start markers, ms".into(), Right),
        ("per-VM marker p50 / p99, ms".into(), Right),
        (
            format!("host memory per VM beside guest memory ({mem_count} running), MiB"),
            Right,
        ),
    ]);
    for (name, m, kib) in &serving {
        serving_table.row([
            name.to_string(),
            format!("{:.0}", m.iter().cloned().fold(0.0, f64::max)),
            format!(
                "{:.0} / {:.0}",
                crate::percentile(m, 50.0)?,
                crate::percentile(m, 99.0)?
            ),
            format!("{:.2}", kib / 1024.0),
        ]);
    }
    md += &format!(
        "\n### Serving a fleet's disks: a backend per VM or one per host ({} VMs, vmm without vmctl)\n\n{serving_table}",
        o.count
    );
    md += &format!(
        "\nOne 1-I/O VM's life under vmctl (median of {} runs, each step a vmctl process, ms): create {:.1}, start {:.1}, wait {:.1}, delete {:.1}; total {life_total:.1} (goal under 30).\n",
        o.runs,
        step_ms("create")?,
        step_ms("start")?,
        step_ms("wait")?,
        step_ms("delete")?
    );
    Ok(md)
}
