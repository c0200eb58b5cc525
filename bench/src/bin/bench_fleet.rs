//! A fleet on one host: N clones of one base image served by one
//! blk-backend process, the guests booted one after another, each reading
//! the whole disk at random. Measured for both ways of reading the shared
//! read-only base (`--base-io page`: the host page cache, one copy for the
//! fleet; `--base-io direct`: O_DIRECT, no host caching), in one run: guest
//! IOPS for the first guest (cold) and the others, and what the host's page
//! cache grew by.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use clap::Parser;
use test_infra::{kvm_available, BlkBackendProcess, Disk, Machine, Patience, QemuConsole, QemuVm};

#[derive(Parser)]
#[command(about = "N clones of one base on one blk-backend: page cache vs O_DIRECT for the base")]
struct Args {
    /// Clones (guests, one after another).
    #[arg(long, default_value_t = 4)]
    clones: usize,
    /// Base image size in GiB (fully written with random data).
    #[arg(long, default_value_t = 1)]
    size_gib: u64,
    /// Seconds each guest reads.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Scratch directory (the root disk).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[command(flatten)]
    out: bench::OutputArgs,
    /// The fleet launch instead: vmctl run --count N against N QEMU +
    /// qemu-storage-daemon pairs, and one VM's life step by step.
    #[arg(long)]
    launch: bool,
    /// VMs in the launch.
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Runs of the one-VM life (the median is reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Fleets launched each way, alternating (the median run is reported:
    /// one run of either fleet varies by 15-30 % on this machine, and the
    /// median of 5 still moved the ratio by a tenth from one invocation to
    /// the next).
    #[arg(long, default_value_t = 7)]
    fleet_runs: usize,
}

#[derive(serde::Serialize)]
struct ModeResult {
    mode: &'static str,
    /// Guest IOPS, in boot order.
    iops: Vec<f64>,
    p50_us: Vec<f64>,
    /// Host page cache growth over the whole fleet run, MiB.
    page_cache_growth_mib: f64,
    backend_rss_mib: f64,
}

fn cached_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("Cached:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Drops `path`'s pages from the host page cache.
fn evict(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    // SAFETY: advice on a descriptor we hold; no memory is touched.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        bail!(
            "posix_fadvise({}): {}",
            path.display(),
            std::io::Error::from_raw_os_error(r)
        );
    }
    Ok(())
}

fn img(bin: &Path, args: &[&Path]) -> Result<()> {
    let st = Command::new(bin).args(args).status().context("img")?;
    if !st.success() {
        bail!("img {args:?} failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !kvm_available("bench-fleet") {
        bail!("/dev/kvm is needed");
    }
    if a.launch {
        let exe_dir = bench::release_binary("vmctl")?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let md = bench::launch::run(&bench::launch::LaunchOptions {
            count: a.count,
            runs: a.runs,
            fleet_runs: a.fleet_runs,
            dir: a.dir.clone(),
            bin_dir: exe_dir.clone(),
        })?;
        print!("{md}");
        if let Some(p) = &a.out.markdown {
            std::fs::write(p, &md)?;
        }
        return Ok(());
    }
    let (backend, img_bin) = (
        bench::release_binary("blk-backend")?,
        bench::release_binary("img")?,
    );
    let work = a.dir.join(format!("bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let raw = work.join("base.raw");
    eprintln!("[setup] {} GiB of random data", a.size_gib);
    bench::fill_random(&raw, a.size_gib << 30)?;
    let base = work.join("base.snap");
    Command::new(&img_bin)
        .args(["convert", "-f", "raw", "-O", "snap"])
        .arg(&raw)
        .arg(&base)
        .status()?;
    std::fs::remove_file(&raw)?;
    let mut results = Vec::new();
    for (mode, flag) in [("page", "page"), ("direct", "direct")] {
        let mut exports = Vec::new();
        for k in 0..a.clones {
            let clone = work.join(format!("vm{k}-{mode}.snap"));
            let _ = std::fs::remove_file(&clone);
            // An overlay on the base (sealed by the first one, in place).
            img(
                &img_bin,
                &[Path::new("create"), Path::new("-b"), &base, &clone],
            )?;
            exports.push((clone, work.join(format!("vm{k}.sock"))));
        }
        evict(&base)?;
        let before = cached_kib();
        let b = BlkBackendProcess::start_exports_with(&backend, &exports, &["--base-io", flag])?;
        let (mut iops, mut p50) = (Vec::new(), Vec::new());
        for (k, (_, sock)) in exports.iter().enumerate() {
            eprintln!("[{mode}] guest {}", k + 1);
            let r = QemuVm {
                machine: Machine::Microvm,
                mem_mib: 512,
                disk: Disk::vhost_user(sock, 1),
                cmdline: format!(
                    "mode=randread bs=4k qd=32 duration_ms={} progress_ms=0",
                    a.seconds * 1000
                ),
                limit: run_patience(a.seconds + 60),
                silence: run_patience(a.seconds + 60),
                console: QemuConsole::Uart,
                nic: None,
            }
            .run()?;
            let Some(j) = r.result.as_ref().filter(|_| r.ok()) else {
                bail!("guest failed:\n{}", r.serial);
            };
            iops.push(j["iops"].as_f64().unwrap_or(0.0));
            p50.push(j["lat_ns"]["p50"].as_f64().unwrap_or(0.0) / 1000.0);
        }
        let rss = b.usage().map_or(0.0, |u| u.1 as f64 / (1 << 20) as f64);
        let growth = cached_kib().saturating_sub(before) as f64 / 1024.0;
        b.stop();
        results.push(ModeResult {
            mode,
            iops,
            p50_us: p50,
            page_cache_growth_mib: growth,
            backend_rss_mib: rss,
        });
    }
    let _ = std::fs::remove_dir_all(&work);

    let mut md = format!(
        "{} clones of one {} GiB base (fully written) on one blk-backend process, root disk ({}); guests one after another, each 4k random reads at QD32 over the whole disk for {} s (1 vCPU, 1 queue, polling, microvm + qboot). Host page cache growth: `Cached` in /proc/meminfo over the fleet run, the base evicted first.\n\n",
        a.clones,
        a.size_gib,
        a.dir.display(),
        a.seconds
    );
    md += &results_table(&results).to_string();
    if let [p, d] = &results[..] {
        md += &format!(
            "\nPage cache vs O_DIRECT: first guest {}, later guests {}.\n",
            Ratio::of(p.iops.first().copied(), d.iops.first().copied()).times(2),
            Ratio::of(later_guests(p), later_guests(d)).times(2)
        );
    }
    a.out.report(&md, &results)
}

/// The median IOPS of the guests after the first, if there were any.
fn later_guests(r: &ModeResult) -> Option<f64> {
    bench::median(r.iops.get(1..)?).ok()
}

/// Each way of reading the base: every guest's IOPS and latency, the host
/// page cache's growth and blk-backend's memory.
fn results_table(results: &[ModeResult]) -> Table {
    let mut table = Table::new([
        ("base read through", Left),
        ("guest 1 IOPS (cold)", Right),
        ("guests 2.. median IOPS", Right),
        ("each guest IOPS", Left),
        ("p50 µs", Left),
        ("host page cache growth", Right),
        ("blk-backend RSS", Right),
    ]);
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for r in results {
        table.row([
            if r.mode == "page" {
                "page cache (`--base-io page`)"
            } else {
                "O_DIRECT (`--base-io direct`)"
            }
            .to_string(),
            format!("{:.0}", r.iops.first().copied().unwrap_or(0.0)),
            later_guests(r).map_or_else(|| "-".to_string(), |m| format!("{m:.0}")),
            list(&r.iops),
            list(&r.p50_us),
            format!("{:.0} MiB", r.page_cache_growth_mib),
            format!("{:.1} MiB", r.backend_rss_mib),
        ]);
    }
    table
}

/// A benchmark run's waits: the guest prints only when it is done, so a
/// hang is caught by its whole length, a few times over.
fn run_patience(seconds: u64) -> Patience {
    Patience::with_margin(
        format!("a benchmark run of about {seconds} s (the guest prints only at its end)"),
        Duration::from_secs(seconds),
        3,
    )
}
