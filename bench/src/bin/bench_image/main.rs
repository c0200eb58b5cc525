//! `bench-image`: the snapshot-chain image format against baselines.
//!
//! Absolute numbers on a shared VM say little, so every figure is a ratio
//! against a baseline measured in the same run: a raw file read with `pread`,
//! `qemu-img`, one `fdatasync` in the same directory, a flat table of one
//! owner byte per block. Timed figures are the median of three runs after a
//! warm-up, with the min/max spread. Nothing here asserts a timing: goals are
//! reported as met or not met.
//!
//! Sections:
//! 1. read throughput of a chain of depth 1, 8 and 32 vs the same data in a
//!    raw file, from the page cache, on the root disk and on tmpfs;
//! 2. `snapshot_create` and `clone` latency on a 1 GiB and a 1 TiB disk;
//! 3. `convert` raw -> snap -> raw vs `qemu-img convert`;
//! 4. the footprint of a new 1 TiB image and the merged index's memory.

mod cells;
mod chain;
mod clock;
mod convert;
mod files;
mod footprint;
mod reads;
mod snapshots;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Parser;
use image_format::header::DEFAULT_BLOCK_SIZE;
use serde::Serialize;

use cells::fmt_bytes;
use convert::ConvertReport;
use files::{free_bytes, Scratch};
use footprint::FootprintReport;
use reads::ReadResult;
use snapshots::SnapshotReport;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Block size of every image made here (the format's default).
const BLOCK: u32 = DEFAULT_BLOCK_SIZE;
/// Fixed seed of the data written: every run writes the same bytes.
const DATA_SEED: u64 = 0x5eed_da7a;
/// Depth at which the read goal and the index figures are stated.
const GOAL_DEPTH: usize = 32;

#[derive(Parser)]
#[command(
    name = "bench-image",
    about = "Benchmarks the snapshot-chain image format against raw files and qemu-img; \
             every figure is a ratio against a baseline measured in the same run"
)]
struct Cli {
    /// Where the scratch files go (a fresh subdirectory, removed at the end).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Small sizes for a CI smoke run (about a minute).
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    out: bench::OutputArgs,
    /// The read benchmark runs a second time here (tmpfs: no disk below the
    /// page cache).
    #[arg(long, default_value = "/dev/shm")]
    shm_dir: PathBuf,
    /// Skip the second read benchmark on --shm-dir.
    #[arg(long)]
    no_shm: bool,
}

/// Sizes of one run: the full benchmark or the CI smoke run.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    read_set: u64,
    random_reads: usize,
    /// Each timed sequential run reads at least this much (several passes
    /// over a small data set), so it lasts long enough to time.
    seq_min_bytes: u64,
    snapshot_data: u64,
    snapshot_count: usize,
    convert_size: u64,
    /// The real chain with random 4 KiB ownership (section 4).
    random_chain: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                read_set: 64 * MIB,
                random_reads: 50_000,
                seq_min_bytes: 512 * MIB,
                snapshot_data: 16 * MIB,
                snapshot_count: 20,
                convert_size: 256 * MIB,
                random_chain: 64 * MIB,
            }
        } else {
            Plan {
                read_set: GIB,
                random_reads: 200_000,
                seq_min_bytes: 512 * MIB,
                snapshot_data: 16 * MIB,
                snapshot_count: 20,
                convert_size: 4 * GIB,
                random_chain: GIB,
            }
        }
    }

    /// Scratch space the root directory needs at its peak (section 3 holds
    /// the input and two outputs at once).
    fn root_space(&self) -> u64 {
        (3 * self.convert_size).max(2 * self.read_set) + GIB
    }
}

/// Every figure of a run, as `--json` writes it.
#[derive(Debug, Serialize)]
struct Report {
    quick: bool,
    plan: Plan,
    dir: PathBuf,
    shm_dir: Option<PathBuf>,
    cpus: usize,
    reads: Vec<ReadResult>,
    snapshots: SnapshotReport,
    convert: ConvertReport,
    footprint: FootprintReport,
    /// Wall time of each section and of the whole run.
    section_seconds: Vec<(String, f64)>,
    total_seconds: f64,
}

/// The run's tables: a heading and the run's times, then each section's.
fn markdown(r: &Report) -> String {
    let mut m = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        m,
        "# bench-image{}\n",
        if r.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(
        m,
        "{} CPUs; scratch in {}; total {:.0} s ({}).\n",
        r.cpus,
        r.dir.display(),
        r.total_seconds,
        r.section_seconds
            .iter()
            .map(|(n, s)| format!("{n} {s:.0} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    m + &reads::markdown(&r.reads, &r.plan)
        + &snapshots::markdown(&r.snapshots, &r.plan, &r.dir)
        + &convert::markdown(&r.convert, &r.dir)
        + &footprint::markdown(&r.footprint)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let plan = Plan::new(cli.quick);
    let started = Instant::now();
    let root = Scratch::new(&cli.dir, "root")?;
    let free = free_bytes(root.path())?;
    ensure!(
        free >= plan.root_space(),
        "{} has {} free, the benchmark needs {}",
        cli.dir.display(),
        fmt_bytes(free),
        fmt_bytes(plan.root_space())
    );
    let shm = if cli.no_shm {
        None
    } else if cli.shm_dir.is_dir() {
        let s = Scratch::new(&cli.shm_dir, "shm")?;
        let needed = 2 * plan.read_set + 64 * MIB;
        if free_bytes(s.path())? < needed {
            eprintln!(
                "warning: {} has less than {} free; skipping the tmpfs read benchmark",
                cli.shm_dir.display(),
                fmt_bytes(needed)
            );
            None
        } else {
            Some(s)
        }
    } else {
        eprintln!(
            "warning: {} is not a directory; skipping the tmpfs read benchmark",
            cli.shm_dir.display()
        );
        None
    };

    let mut section_seconds = Vec::new();
    let mut section = |name: &str, t: Instant| {
        section_seconds.push((name.to_string(), t.elapsed().as_secs_f64()));
    };

    let t = Instant::now();
    let root_label = format!("root disk ({})", cli.dir.display());
    let mut reads = reads::bench_reads(root.path(), &root_label, true, &plan)?;
    // Section 4 reads its real interleaved chain from the root-disk results.
    let root_reads = reads.len();
    if let Some(s) = &shm {
        let label = format!("tmpfs ({})", cli.shm_dir.display());
        reads.extend(reads::bench_reads(s.path(), &label, false, &plan)?);
    }
    section("reads", t);

    let t = Instant::now();
    let snapshots = snapshots::bench_snapshots(root.path(), &plan)?;
    section("snapshots", t);

    let t = Instant::now();
    let convert = convert::bench_convert(root.path(), &plan)?;
    section("convert", t);

    let t = Instant::now();
    let footprint = footprint::bench_footprint(root.path(), &plan, &reads[..root_reads])?;
    section("footprint", t);

    let report = Report {
        quick: cli.quick,
        plan,
        dir: cli.dir.clone(),
        shm_dir: shm.as_ref().map(|_| cli.shm_dir.clone()),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        reads,
        snapshots,
        convert,
        footprint,
        section_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    drop(shm);
    drop(root);

    cli.out.report(&markdown(&report), &report)
}
