//! Section 2: `snapshot_create` and `clone` latency on a small and a huge
//! disk, against one `fdatasync`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bench::stats::spread;
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use image_format::{ops, Disk, RealEnv};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::Serialize;

use crate::cells::{fmt_bytes, met};
use crate::clock::seconds;
use crate::{Plan, BLOCK, DATA_SEED, GIB, TIB};

/// The goal: a snapshot and a clone of a 1 TiB disk take under this.
const LATENCY_GOAL_MS: f64 = 5.0;

/// One operation's times.
#[derive(Debug, Serialize)]
struct Latency {
    samples_ms: Vec<f64>,
    median_ms: f64,
    p90_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn new(samples_ms: Vec<f64>) -> Result<Latency> {
        let s = spread(&samples_ms)?;
        Ok(Latency {
            median_ms: s.median,
            p90_ms: bench::percentile(&samples_ms, 90.0)?,
            max_ms: s.max,
            samples_ms,
        })
    }
}

/// Snapshot and clone times on a disk of one size.
#[derive(Debug, Serialize)]
struct SnapshotResult {
    virtual_size: u64,
    data_bytes: u64,
    snapshot: Latency,
    clone: Latency,
}

/// Section 2's figures.
#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    /// Baseline: a 4 KiB write plus `fdatasync` in the same directory.
    fdatasync: Latency,
    sizes: Vec<SnapshotResult>,
}

/// Section 2 in `dir`.
pub fn bench_snapshots(dir: &Path, plan: &Plan) -> Result<SnapshotReport> {
    let env = RealEnv;
    let fdatasync = {
        let path = dir.join("fsync-probe");
        let f = File::create(&path)?;
        let buf = vec![0x5au8; 4096];
        let mut samples = Vec::new();
        for _ in 0..plan.snapshot_count {
            samples.push(
                1e3 * seconds(|| {
                    f.write_all_at(&buf, 0)?;
                    f.sync_data()?;
                    Ok(())
                })?,
            );
        }
        fs::remove_file(&path)?;
        Latency::new(samples)
    };
    let mut sizes = Vec::new();
    for size in [GIB, TIB] {
        eprintln!("[snapshots] {} disk", fmt_bytes(size));
        let d = dir.join(format!("snap-{}", fmt_bytes(size).replace(' ', "")));
        fs::create_dir(&d)?;
        let top = d.join("disk");
        ops::create(&env, &top, Some(size), BLOCK, None)
            .with_context(|| format!("creating {}", top.display()))?;
        // A little data, spread over the disk so the map is not all one page.
        {
            let mut disk = Disk::open_path(&top, true)?;
            let pieces = 16;
            let piece = plan.snapshot_data / pieces;
            let mut buf = vec![0u8; piece as usize];
            let mut rng = StdRng::seed_from_u64(DATA_SEED);
            for i in 0..pieces {
                rng.fill_bytes(&mut buf);
                disk.write_at(&buf, i * (size / pieces))?;
            }
            disk.close()?;
        }
        let mut snap = PathBuf::new();
        let mut snapshot_ms = Vec::new();
        for n in 0..plan.snapshot_count {
            snapshot_ms.push(
                1e3 * seconds(|| {
                    snap = ops::snapshot_create(&env, &top, &format!("s{n:02}"))?;
                    Ok(())
                })?,
            );
        }
        let mut clone_ms = Vec::new();
        for n in 0..plan.snapshot_count {
            let new = d.join(format!("clone{n:02}"));
            clone_ms.push(
                1e3 * seconds(|| {
                    ops::clone(&env, &snap, &new)?;
                    Ok(())
                })?,
            );
        }
        fs::remove_dir_all(&d)?;
        sizes.push(SnapshotResult {
            virtual_size: size,
            data_bytes: plan.snapshot_data,
            snapshot: Latency::new(snapshot_ms)?,
            clone: Latency::new(clone_ms)?,
        });
    }
    Ok(SnapshotReport {
        fdatasync: fdatasync?,
        sizes,
    })
}

/// Section 2's tables.
pub fn markdown(s: &SnapshotReport, p: &Plan, dir: &Path) -> String {
    let mut m = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(m, "## 2. Snapshot and clone latency\n");
    let _ = writeln!(
        m,
        "{} of data written, then {} `snapshot_create` in a row on the same image and \
         {} `clone` of the newest snapshot, in {} (fsyncs included). Baseline: a 4 KiB \
         write + `fdatasync` there: median {:.2} ms, p90 {:.2} ms, max {:.2} ms.\n",
        fmt_bytes(p.snapshot_data),
        p.snapshot_count,
        p.snapshot_count,
        dir.display(),
        s.fdatasync.median_ms,
        s.fdatasync.p90_ms,
        s.fdatasync.max_ms,
    );
    m += &latency_table(s).to_string();
    if let [small, big] = &s.sizes[..] {
        let _ = write!(m, "\n{}", scaling_table(small, big));
    }
    let _ = writeln!(m);
    m
}

/// Every size and operation, its median over the fdatasync baseline's.
fn latency_table(s: &SnapshotReport) -> Table {
    let mut table = Table::new([
        ("disk", Left),
        ("operation", Left),
        ("median ms", Right),
        ("p90 ms", Right),
        ("max ms", Right),
        ("median / fdatasync", Right),
    ]);
    for x in &s.sizes {
        for (op, l) in [("snapshot", &x.snapshot), ("clone", &x.clone)] {
            table.row([
                fmt_bytes(x.virtual_size),
                op.to_string(),
                format!("{:.2}", l.median_ms),
                format!("{:.2}", l.p90_ms),
                format!("{:.2}", l.max_ms),
                Ratio::of(l.median_ms, s.fdatasync.median_ms).cell(1),
            ]);
        }
    }
    table
}

/// The big disk's times over the small one's, and the goal.
fn scaling_table(small: &SnapshotResult, big: &SnapshotResult) -> Table {
    let mut table = Table::new([
        ("operation".to_string(), Left),
        ("1 TiB / 1 GiB median".into(), Right),
        ("1 TiB / 1 GiB p90".into(), Right),
        (format!("goal: 1 TiB median < {LATENCY_GOAL_MS} ms"), Left),
    ]);
    for (op, a, b) in [
        ("snapshot", &small.snapshot, &big.snapshot),
        ("clone", &small.clone, &big.clone),
    ] {
        table.row([
            op.to_string(),
            Ratio::of(b.median_ms, a.median_ms).cell(2),
            Ratio::of(b.p90_ms, a.p90_ms).cell(2),
            format!(
                "{} ({:.2} ms)",
                met(b.median_ms < LATENCY_GOAL_MS),
                b.median_ms
            ),
        ]);
    }
    table
}
