//! Section 1: read throughput by chain depth against a raw file.

mod figure;

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use bench::stats::Spread;
use bench::table::{
    Align::{Left, Right},
    Table, NO_RATIO,
};
use image_format::Disk;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::cells::{fmt_bytes, fmt_ratio_spread, fmt_spread, met};
use crate::chain::{build_chain, interleaved_owners, RUN};
use crate::clock::REPS;
use crate::{Plan, BLOCK, DATA_SEED, GOAL_DEPTH, MIB};
use figure::{time_reads, ReadFigure, RANDOM_READ, SEQ_READ};

const DEPTHS: [usize; 3] = [1, 8, 32];
/// Fixed seed of the random offsets: every run reads the same ones.
const OFFSET_SEED: u64 = 0x5eed_0ff5;
/// The goal: a chain of depth `GOAL_DEPTH` reads at least this fraction of
/// the raw file's throughput.
const READ_GOAL_RATIO: f64 = 0.95;

/// One chain depth on one storage, with the page cache filled one way.
#[derive(Debug, Serialize)]
pub struct ReadResult {
    storage: String,
    /// How the page cache got the data: "as written" (both files by the
    /// same 64 KiB writes) or "re-read" (dropped, then read back).
    cache: String,
    pub depth: usize,
    pub data_bytes: u64,
    /// Every byte read through the chain equals the raw file's.
    identical: bool,
    sequential: ReadFigure,
    random: ReadFigure,
    random_reads: usize,
    pub index_memory_bytes: usize,
    pub mixed_chunks: usize,
}

/// Section 1 in `dir`. With `evictable` (a disk-backed filesystem), every
/// depth is timed twice: with the cache as written, then dropped and read
/// back, because the page cache's folio sizes follow how pages got there
/// (big readahead folios for the raw file read sequentially, 64 KiB ones
/// for the layer files read in interleaved pieces), and that alone moves
/// page-cache throughput by tens of percent on ext4.
pub fn bench_reads(
    dir: &Path,
    storage: &str,
    evictable: bool,
    plan: &Plan,
) -> Result<Vec<ReadResult>> {
    let size = plan.read_set;
    ensure!(
        size / RUN * RUN == size,
        "the data set must be whole 64 KiB runs"
    );
    let mut rng = StdRng::seed_from_u64(OFFSET_SEED);
    let offsets: Vec<u64> = (0..plan.random_reads)
        .map(|_| rng.gen_range(0..size / RANDOM_READ) * RANDOM_READ)
        .collect();
    let passes = plan.seq_min_bytes.div_ceil(size).max(1);
    let mut results = Vec::new();
    for depth in DEPTHS {
        eprintln!(
            "[reads/{storage}] writing {} as a chain of depth {depth} and a raw file",
            fmt_bytes(size)
        );
        let chain_dir = dir.join(format!("chain-{depth}"));
        fs::create_dir(&chain_dir)?;
        let raw_path = chain_dir.join("data.raw");
        let raw = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&raw_path)
            .with_context(|| format!("creating {}", raw_path.display()))?;
        let owners = interleaved_owners(size / BLOCK as u64, depth);
        let top = build_chain(
            &chain_dir,
            size,
            &owners,
            depth,
            |off, buf| {
                // Seeded per run, so the bytes do not depend on write order.
                ensure!(off % RUN == 0 && buf.len() as u64 == RUN);
                StdRng::seed_from_u64(DATA_SEED ^ (off / RUN)).fill_bytes(buf);
                Ok(())
            },
            Some(&raw),
        )?;
        raw.sync_data()
            .with_context(|| format!("syncing {}", raw_path.display()))?;
        let disk =
            Disk::open_path(&top, false).with_context(|| format!("opening {}", top.display()))?;
        ensure!(
            disk.layers().len() == depth,
            "expected a chain of {depth} layers, {} has {}",
            top.display(),
            disk.layers().len()
        );
        eprintln!("[reads/{storage}] depth {depth}: comparing and timing");
        let mut caches = vec!["as written"];
        if evictable {
            caches.push("re-read");
        }
        for cache in caches {
            if cache == "re-read" {
                evict_from_cache(&raw).context("evicting the raw file")?;
                for layer in disk.layers() {
                    if let Some(fd) = layer.storage.raw_fd() {
                        evict_fd(fd)
                            .with_context(|| format!("evicting {}", layer.path.display()))?;
                    }
                }
            }
            // Reads chain and raw file alternately, 8 MiB at a time: after
            // an eviction this is what brings both back into the cache.
            let identical = chain_equals_raw(&disk, &raw, size)?;
            if !identical {
                eprintln!("ERROR: the chain of depth {depth} reads differently from the raw file");
            }
            let (sequential, random) = time_reads(&disk, &raw, size, passes, &offsets)?;
            results.push(ReadResult {
                storage: storage.to_string(),
                cache: cache.to_string(),
                depth,
                data_bytes: size,
                identical,
                sequential,
                random,
                random_reads: offsets.len(),
                index_memory_bytes: disk.index().memory_bytes(),
                mixed_chunks: disk.index().mixed_chunks(),
            });
        }
        drop(disk);
        drop(raw);
        fs::remove_dir_all(&chain_dir)
            .with_context(|| format!("removing {}", chain_dir.display()))?;
    }
    Ok(results)
}

/// Drops the file's clean pages from the page cache (a no-op on tmpfs,
/// where the cache is the storage). Written pages must be synced first.
fn evict_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: posix_fadvise only reads its integer arguments.
    match unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Syncs `file` and drops its pages from the page cache.
fn evict_from_cache(file: &File) -> Result<()> {
    file.sync_data()?;
    Ok(evict_fd(file.as_raw_fd())?)
}

/// Whether the chain reads the raw file's bytes, read alternately 8 MiB
/// at a time.
fn chain_equals_raw(disk: &Disk, raw: &File, size: u64) -> Result<bool> {
    let chunk = 8 * MIB;
    let (mut x, mut y) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(chunk) as usize;
        disk.read_at(&mut x[..n], off)?;
        raw.read_exact_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// Section 1's tables and findings.
pub fn markdown(reads: &[ReadResult], p: &Plan) -> String {
    let mut m = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(m, "## 1. Read throughput by chain depth vs a raw file\n");
    let _ = writeln!(
        m,
        "{} of random data; layer k of a depth-D chain owns the 64 KiB runs i with \
         i % D == k; each 64 KiB write to the chain goes to the raw file right after, \
         so both files' cached pages are made alike. Reads from \
         the page cache after a warm-up: sequential {} reads ({} per run) and {} \
         random {} reads (fixed seed), into page-aligned buffers. *chain*: \
         `Disk::read_at`; *raw*: `pread` on the raw file; *layer preads*: the same \
         `pread`s the chain needs, issued on the layer files without the library \
         (chain/layer preads is the library's own cost; layer preads/raw the cost of \
         the data living in D files). Cache *as written*: the pages the writes left; \
         *re-read*: dropped (`POSIX_FADV_DONTNEED`) and read back (8 MiB reads, \
         alternating), so readahead sizes the raw file's folios while the layer \
         files' interleaved pieces get small ones (tmpfs has only the first). MB/s = 10^6 B/s, median \
         of {REPS} (min–max); ratios are per run (the sides alternate). Index = the \
         merged index's memory.\n",
        fmt_bytes(p.read_set),
        fmt_bytes(SEQ_READ),
        fmt_bytes(p.read_set * p.seq_min_bytes.div_ceil(p.read_set).max(1)),
        p.random_reads,
        fmt_bytes(RANDOM_READ),
    );
    let _ = writeln!(m, "{}", table(reads));
    let differ: Vec<String> = reads
        .iter()
        .filter(|x| !x.identical)
        .map(|x| format!("{} depth {}", x.storage, x.depth))
        .collect();
    let _ = writeln!(
        m,
        "Content: {}.\n",
        if differ.is_empty() {
            "every chain read back byte-for-byte equal to the raw file".to_string()
        } else {
            format!("**chain differs from the raw file**: {}", differ.join(", "))
        }
    );
    for x in reads.iter().filter(|x| x.depth == GOAL_DEPTH) {
        let _ = writeln!(
            m,
            "Goal, depth {GOAL_DEPTH} within 5 % of raw ({}, cache {}): sequential {}, \
             random {}.  ",
            x.storage,
            x.cache,
            goal(x.sequential.chain_vs_raw.as_ref()),
            goal(x.random.chain_vs_raw.as_ref()),
        );
    }
    let _ = writeln!(m);
    m
}

/// Each depth, storage and cache: the three sides' MB/s and the ratios.
fn table(reads: &[ReadResult]) -> Table {
    let mut table = Table::new([
        ("storage", Left),
        ("cache", Left),
        ("depth", Right),
        ("reads", Left),
        ("chain MB/s", Right),
        ("raw MB/s", Right),
        ("chain/raw", Right),
        ("layer preads MB/s", Right),
        ("chain/layer preads", Right),
        ("index", Right),
    ]);
    for x in reads {
        for (name, f) in [
            (format!("seq {}", fmt_bytes(SEQ_READ)), &x.sequential),
            (format!("random {}", fmt_bytes(RANDOM_READ)), &x.random),
        ] {
            table.row([
                x.storage.clone(),
                x.cache.clone(),
                x.depth.to_string(),
                name,
                fmt_spread(&f.chain, 0),
                fmt_spread(&f.raw, 0),
                fmt_ratio_spread(f.chain_vs_raw.as_ref(), 3),
                fmt_spread(&f.preads, 0),
                fmt_ratio_spread(f.chain_vs_preads.as_ref(), 3),
                fmt_bytes(x.index_memory_bytes as u64),
            ]);
        }
    }
    table
}

/// The median chain/raw ratio against the goal: "0.981 met".
fn goal(chain_vs_raw: Option<&Spread>) -> String {
    match chain_vs_raw {
        Some(s) => format!("{:.3} {}", s.median, met(s.median >= READ_GOAL_RATIO)),
        None => format!("{NO_RATIO} {}", met(false)),
    }
}
