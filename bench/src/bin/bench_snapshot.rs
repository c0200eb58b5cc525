//! VM snapshots: how long a snapshot takes, how long a VM restored from
//! it takes to run again (to its first guest instruction, and to the
//! guest's next console line), and what memory each of N VMs restored
//! from one snapshot costs the host, for guests of several memory sizes,
//! restored by copying memory first, lazily (faults and a background
//! copy) and on demand (only what the guest and its disk touch).
//! The guest: the bench guest reading its disk at random (QD1), reporting
//! progress every 100 ms; its disk on blk-backend, snapshotted with
//! `export-snapshot`, every restored VM on a clone of the sealed layer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::table::{
    Align::{Left, Right},
    Table,
};
use blk_control::ExportArgs;
use clap::Parser;
use test_infra::{
    img, kvm_available, s, vmm_api, BackendControl, BlkBackendProcess, Patience, VmmVm,
};

#[derive(Parser)]
#[command(about = "Snapshot and restore times, and the memory of VMs restored from one snapshot")]
struct Args {
    /// Guest memory sizes, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,512,2048")]
    mem_mib: Vec<u32>,
    /// Share of guest memory the guest writes before it is snapshotted
    /// (percent: memory in use, which a snapshot saves and a restore
    /// copies).
    #[arg(long, default_value_t = 50)]
    touch_pct: u32,
    /// Restores measured per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// VMs restored from one snapshot at once, for their memory.
    #[arg(long, default_value_t = 20)]
    clones: usize,
    /// Scratch directory.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[command(flatten)]
    out: bench::OutputArgs,
}

#[derive(serde::Serialize)]
struct SizeResult {
    mem_mib: u32,
    /// How the restores filled guest memory (the vmm's --restore-memory).
    restore_memory: &'static str,
    snapshot_ms: f64,
    memory_saved_mib: f64,
    /// Restore to the first vCPU entering KVM_RUN (inside the vmm).
    restore_to_run_ms: Vec<f64>,
    /// Restore, from exec, to the guest's next console line.
    restore_to_line_ms: Vec<f64>,
    /// Host memory of each restored VM: its guest memory's allocated pages
    /// and the vmm's own PSS.
    clone_pss_mib: Vec<f64>,
}

/// Host memory a restored VM holds: the pages its guest memory (the
/// vmm's memfd) has allocated, whether mapped yet or not (a restore writes
/// them into the memfd; the process's page tables see them only once the
/// guest touches them), plus the vmm's own proportional set size.
fn vm_memory_mib(pid: u32) -> f64 {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let kib = v.split_whitespace().next()?.parse::<f64>().ok()?;
            match k {
                "Pss" => Some(kib),
                "Pss_Shmem" => Some(-kib),
                _ => None,
            }
        })
        .sum::<f64>()
        / 1024.0;
    let guest = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:guest-ram"))
        })
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.blocks() as f64 * 512.0)
        .fold(0.0, f64::max)
        / (1 << 20) as f64;
    own + guest
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn measure(a: &Args, mem_mib: u32, mode: &'static str, work: &Path) -> Result<SizeResult> {
    let work = &work.join(mode);
    std::fs::create_dir_all(work)?;
    let ctl_path = work.join("control.sock");
    let _backend = BlkBackendProcess::start_exports_with(
        &bench::release_binary("blk-backend")?,
        &[],
        &["--control", &s(&ctl_path)],
    )?;
    let mut ctl = BackendControl::connect(&ctl_path);
    let add = |ctl: &mut BackendControl, image: &Path| -> Result<PathBuf> {
        let sock = image.with_extension("sock");
        ctl.add(ExportArgs::new(&sock, image))
            .with_context(|| format!("export-add {}", image.display()))?;
        Ok(sock)
    };
    let image = work.join(format!("vm{mem_mib}.img"));
    img(&["create", &s(&image), "64M"]);
    let sock = add(&mut ctl, &image)?;
    let api = work.join(format!("api{mem_mib}.sock"));
    let touch = (mem_mib as u64 * a.touch_pct as u64 / 100) << 20;
    let vmm = bench::release_binary("vmm")?;
    let mut v = VmmVm::new(
        &vmm,
        &format!(
            "mode=randread bs=4k qd=1 size=64M duration_ms=3600000 progress_ms=100 touch={touch}"
        ),
    )
    .with_disk(&sock, 1);
    v.mem_mib = mem_mib;
    v.api_socket = Some(api.clone());
    let mut original = v.spawn()?;
    original.wait_for_progress(
        2,
        &Patience::new("progress lines", Duration::from_millis(200)),
    )?;
    let call = |sock: &Path, args: &[&str]| -> Result<String> {
        let (ok, out) = vmm_api(sock, args);
        if !ok {
            bail!("vmm api {args:?}: {out}");
        }
        Ok(out)
    };
    call(&api, &["pause"])?;
    let snap = work.join(format!("snap{mem_mib}"));
    let taken: serde_json::Value =
        serde_json::from_str(call(&api, &["snapshot", "--dir", &s(&snap)])?.trim())?;
    ctl.snapshot(&sock, "s").context("export-snapshot")?;
    call(&api, &["shutdown", "--force"])?;
    let _ = original.wait();

    // VM k restored on a clone of its own, served before the clock starts.
    let mut start_restored =
        |k: usize| -> Result<(test_infra::RunningVm, PathBuf, PathBuf, Instant)> {
            let clone = work.join(format!("r{mem_mib}-{k}.img"));
            img(&[
                "clone",
                &s(&work.join(format!("vm{mem_mib}.img@s"))),
                &s(&clone),
            ]);
            let sock = add(&mut ctl, &clone)?;
            let api_k = work.join(format!("api{mem_mib}-{k}.sock"));
            let metrics = work.join(format!("m{mem_mib}-{k}.json"));
            let mut v = VmmVm::new(&vmm, "").with_disk(&sock, 1);
            v.restore = Some(snap.clone());
            v.options = vec!["--restore-memory".into(), mode.into()];
            v.api_socket = Some(api_k.clone());
            v.metrics_file = Some(metrics.clone());
            let t0 = Instant::now();
            Ok((v.spawn()?, api_k, metrics, t0))
        };
    let next_line = Patience::new("a restored guest's next line", Duration::from_millis(200));
    let mut to_run = Vec::new();
    let mut to_line = Vec::new();
    for k in 0..a.runs {
        let (mut running, api_k, metrics, t0) = start_restored(k)?;
        let lines = running.progress_lines();
        running.wait_for_progress(lines + 1, &next_line)?;
        to_line.push(t0.elapsed().as_secs_f64() * 1e3);
        call(&api_k, &["shutdown", "--force"])?;
        let _ = running.wait();
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&metrics)?)?;
        to_run.push(m["timing"]["first_run_us"].as_f64().unwrap_or(0.0) / 1e3);
    }
    // N restored at once, each on its own clone: their memory. Each holds
    // a copy of the snapshot's memory (on demand: of what it touches): no
    // more of them than a third of the host's available memory holds.
    let available = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(u64::MAX, |kib| kib << 10);
    let clones = a
        .clones
        .min((available / 3 / (touch + (16 << 20))).max(1) as usize);
    if clones < a.clones {
        eprintln!(
            "[{mem_mib} MiB] {clones} restored at once, not {}: host memory",
            a.clones
        );
    }
    let mut fleet = Vec::new();
    for k in 0..clones {
        let (running, api_k, _, _) = start_restored(a.runs + k)?;
        fleet.push((running, api_k));
    }
    let saved_mib = taken["memory_saved_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    for (running, _) in &mut fleet {
        let lines = running.progress_lines();
        running.wait_for_progress(lines + 1, &next_line)?;
        if mode == "on-demand" {
            // Only what the guest and its disk touch comes in: measured
            // after a few more lines of its work.
            let lines = running.progress_lines();
            running.wait_for_progress(lines + 3, &next_line)?;
            continue;
        }
        // A lazy restore fills memory in the background: measured once
        // the snapshot's pages are all in.
        Patience::new("a restored VM's memory filled", Duration::from_secs(2))
            .wait_until(|| Ok(vm_memory_mib(running.pid()) >= saved_mib))
            .with_context(|| {
                format!(
                    "{:.1} MiB of {saved_mib:.1}; console:\n{}",
                    vm_memory_mib(running.pid()),
                    running.console()
                )
            })?;
    }
    let pss: Vec<f64> = fleet.iter().map(|(r, _)| vm_memory_mib(r.pid())).collect();
    for (running, api_k) in fleet {
        let _ = call(&api_k, &["shutdown", "--force"]);
        let _ = running.wait();
    }
    Ok(SizeResult {
        mem_mib,
        restore_memory: mode,
        snapshot_ms: taken["ms"].as_f64().unwrap_or(0.0),
        memory_saved_mib: taken["memory_saved_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        restore_to_run_ms: to_run,
        restore_to_line_ms: to_line,
        clone_pss_mib: pss,
    })
}

/// Each size and way of restoring: snapshot, restore and memory figures.
fn results_table(results: &[SizeResult]) -> Result<Table> {
    let mut table = Table::new([
        ("guest memory", Right),
        ("restore", Left),
        ("snapshot ms", Right),
        ("memory saved MiB", Right),
        ("restore to KVM_RUN ms (median, p90)", Right),
        ("restore to the guest's next line ms (median)", Right),
        ("host memory per restored VM MiB (median, max)", Right),
    ]);
    for r in results {
        let max = r.clone_pss_mib.iter().copied().fold(0.0, f64::max);
        table.row([
            format!("{} MiB", r.mem_mib),
            r.restore_memory.to_string(),
            format!("{:.1}", r.snapshot_ms),
            format!("{:.1}", r.memory_saved_mib),
            format!(
                "{:.2}, {:.2}",
                bench::median(&r.restore_to_run_ms)?,
                bench::percentile(&r.restore_to_run_ms, 90.0)?
            ),
            format!("{:.1}", bench::median(&r.restore_to_line_ms)?),
            format!("{:.1}, {max:.1}", bench::median(&r.clone_pss_mib)?),
        ]);
    }
    Ok(table)
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !kvm_available("bench-snapshot") {
        return Ok(());
    }
    let work = a.dir.join(format!("bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("{}", work.display()))?;
    let _scratch = Scratch(work.clone());
    let mut results = Vec::new();
    for &m in &a.mem_mib {
        for mode in ["copy", "lazy", "on-demand"] {
            eprintln!(
                "[{m} MiB, {mode}] snapshot, {} restores, {} restored at once",
                a.runs, a.clones
            );
            results.push(measure(&a, m, mode, &work)?);
        }
    }
    let md = results_table(&results)?.to_string();
    a.out.report(&md, &results)
}
