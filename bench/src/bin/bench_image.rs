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

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Parser;
use image_format::convert::{convert, Format};
use image_format::header::DEFAULT_BLOCK_SIZE;
use image_format::index::{Index, Owner, CHUNK_BLOCKS};
use image_format::{ops, Disk, RealEnv, Storage};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Block size of every image made here (the format's default).
const BLOCK: u32 = DEFAULT_BLOCK_SIZE;
/// Ownership granularity of the interleaved chains: one run, one layer.
const RUN: u64 = 64 * KIB;
const SEQ_READ: u64 = 128 * KIB;
const RANDOM_READ: u64 = 4 * KIB;
const DEPTHS: [usize; 3] = [1, 8, 32];
/// Depth at which the read goal and the index figures are stated.
const GOAL_DEPTH: usize = 32;
/// Timed runs per figure (after one warm-up).
const REPS: usize = 3;
/// Fixed seeds: every run reads the same offsets and writes the same bytes.
const DATA_SEED: u64 = 0x5eed_da7a;
const OFFSET_SEED: u64 = 0x5eed_0ff5;
const OWNER_SEED: u64 = 0x5eed_0a3e;
/// Virtual size of the simulated index (section 4).
const SIM_SIZE: u64 = 100 * GIB;
const INDEX_GOAL: u64 = 16 * MIB;
const FOOTPRINT_GOAL: u64 = MIB;
const LATENCY_GOAL_MS: f64 = 5.0;
const READ_GOAL_RATIO: f64 = 0.95;

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

// ---------------------------------------------------------------------------
// Statistics

use bench::stats::{spread, Spread};

fn seconds(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// MB/s in decimal megabytes, as `dd` and `fio` print them.
fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

// ---------------------------------------------------------------------------
// Files

/// A scratch directory removed on drop, so an error half-way does not leave
/// gigabytes behind.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path, tag: &str) -> Result<Scratch> {
        let path = parent.join(format!("bench-image-{tag}-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        // Not create_dir_all: a mistyped parent is an error, not a new tree.
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

fn free_bytes(path: &Path) -> Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs only writes the struct it is given; an all-zero
    // statvfs is a valid value of that plain C struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `s` is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    Ok(s.f_bavail * s.f_frsize)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Bytes the file occupies on disk (not its length).
fn allocated_bytes(path: &Path) -> Result<u64> {
    let m = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(m.blocks() * 512)
}

/// A file of `size` incompressible bytes, synced, so that neither a
/// compressing converter nor background writeback skews what comes after.
fn write_random_file(path: &Path, size: u64) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut rng = StdRng::seed_from_u64(DATA_SEED);
    let mut buf = vec![0u8; (8 * MIB).min(size) as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all_at(&buf[..n], off)
            .with_context(|| format!("writing {}", path.display()))?;
        off += n as u64;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Byte-for-byte comparison (the strongest "same hash").
fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let fa = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let fb = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let len = fa.metadata()?.len();
    if fb.metadata()?.len() != len {
        return Ok(false);
    }
    let chunk = 8 * MIB;
    let (mut x, mut y) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk) as usize;
        fa.read_exact_at(&mut x[..n], off)
            .with_context(|| format!("reading {}", a.display()))?;
        fb.read_exact_at(&mut y[..n], off)
            .with_context(|| format!("reading {}", b.display()))?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

// ---------------------------------------------------------------------------
// Chains

/// Runs of consecutive blocks whose entry in `owners` is `owner`, as
/// (first block, count): what that layer's map holds.
fn runs_of(owners: &[Owner], owner: Owner) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut b = 0;
    std::iter::from_fn(move || {
        while b < owners.len() && owners[b] != owner {
            b += 1;
        }
        if b == owners.len() {
            return None;
        }
        let start = b;
        while b < owners.len() && owners[b] == owner {
            b += 1;
        }
        Some((start as u64, (b - start) as u64))
    })
}

/// The owner (1 = base) of every block when 64 KiB runs go round-robin to
/// `depth` layers.
fn interleaved_owners(blocks: u64, depth: usize) -> Vec<Owner> {
    let per_run = RUN / BLOCK as u64;
    (0..blocks)
        .map(|b| ((b / per_run) % depth as u64 + 1) as Owner)
        .collect()
}

/// Every block owned by a random one of `depth` layers: the worst case for
/// the index, where nearly every chunk has mixed owners.
fn random_owners(blocks: u64, depth: usize) -> Vec<Owner> {
    let mut rng = StdRng::seed_from_u64(OWNER_SEED);
    (0..blocks)
        .map(|_| rng.gen_range(1..=depth as Owner))
        .collect()
}

/// The merged index `Disk::open` would build for that ownership: layer by
/// layer from the base, one `set_range` per run of the layer's map (the same
/// calls, so the same allocations, as the real open).
fn simulated_index(owners: &[Owner], depth: usize) -> Index {
    let mut index = Index::new(owners.len() as u64);
    for owner in 1..=depth as Owner {
        for (start, count) in runs_of(owners, owner) {
            index.set_range(start, count, owner);
        }
    }
    index
}

/// Builds a chain of `depth` layers at `dir/disk` in which layer k holds
/// the blocks whose owner is k + 1, with the bytes `data(offset, buf)`
/// provides; a `snapshot_create` seals each layer before the next. Writes
/// are at most 64 KiB, like a guest's, whatever the runs. Each write also
/// goes to `mirror` at the same offset, right after, so that a raw copy's
/// page-cache pages are made the same way and at the same time as the
/// chain's (both shape later copy throughput: folio sizes, and which
/// memory the pages land in).
fn build_chain(
    dir: &Path,
    size: u64,
    owners: &[Owner],
    depth: usize,
    mut data: impl FnMut(u64, &mut [u8]) -> Result<()>,
    mirror: Option<&File>,
) -> Result<PathBuf> {
    let env = RealEnv;
    let top = dir.join("disk");
    ops::create(&env, &top, Some(size), BLOCK, None)
        .with_context(|| format!("creating {}", top.display()))?;
    let bs = BLOCK as u64;
    let mut buf = vec![0u8; RUN as usize];
    for k in 0..depth {
        if k > 0 {
            ops::snapshot_create(&env, &top, &format!("layer{:02}", k - 1))
                .with_context(|| format!("snapshot of {}", top.display()))?;
        }
        let mut disk = Disk::open_path(&top, true)
            .with_context(|| format!("opening {} for writing", top.display()))?;
        for (start, count) in runs_of(owners, (k + 1) as Owner) {
            let (mut off, end) = (start * bs, (start + count) * bs);
            while off < end {
                let n = (end - off).min(buf.len() as u64) as usize;
                data(off, &mut buf[..n])?;
                disk.write_at(&buf[..n], off)
                    .with_context(|| format!("writing {}", top.display()))?;
                if let Some(m) = mirror {
                    m.write_all_at(&buf[..n], off)
                        .context("writing the raw copy")?;
                }
                off += n as u64;
            }
        }
        disk.close()
            .with_context(|| format!("closing {}", top.display()))?;
    }
    Ok(top)
}

// ---------------------------------------------------------------------------
// 1. Read throughput by chain depth

/// One read pattern timed three ways, alternately, so that drift (a
/// neighbour's build, the page cache) hits every side alike: through the
/// library, on the raw file, and as the same `pread`s on the layer files
/// issued without the library (ownership computed from the pattern). The
/// third side splits chain/raw into the library's own cost (chain/preads)
/// and the cost of the data living in many files (preads/raw).
#[derive(Debug, Serialize)]
struct ReadFigure {
    bytes_per_run: u64,
    chain_mb_s: Vec<f64>,
    raw_mb_s: Vec<f64>,
    preads_mb_s: Vec<f64>,
    chain: Spread,
    raw: Spread,
    preads: Spread,
    /// Per run: chain / raw and chain / preads.
    chain_vs_raw: Spread,
    chain_vs_preads: Spread,
}

/// Runs every side once to warm up, then `REPS` times, rotating which goes
/// first; MB/s per side per run.
fn interleaved_runs(
    bytes: u64,
    sides: &mut [&mut dyn FnMut() -> Result<()>],
) -> Result<Vec<Vec<f64>>> {
    for side in sides.iter_mut() {
        side()?;
    }
    let n = sides.len();
    let mut out = vec![Vec::new(); n];
    for rep in 0..REPS {
        for j in 0..n {
            let k = (rep + j) % n;
            out[k].push(mb_s(bytes, seconds(&mut *sides[k])?));
        }
    }
    Ok(out)
}

fn read_figure(
    bytes: u64,
    chain: &mut dyn FnMut() -> Result<()>,
    raw: &mut dyn FnMut() -> Result<()>,
    preads: &mut dyn FnMut() -> Result<()>,
) -> Result<ReadFigure> {
    let runs = interleaved_runs(bytes, &mut [chain, raw, preads])?;
    let [c, r, p]: [Vec<f64>; 3] = runs
        .try_into()
        .map_err(|_| anyhow!("expected three sides"))?;
    let ratio = |a: &[f64], b: &[f64]| {
        let v: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
        spread(&v)
    };
    Ok(ReadFigure {
        bytes_per_run: bytes,
        chain: spread(&c)?,
        raw: spread(&r)?,
        preads: spread(&p)?,
        chain_vs_raw: ratio(&c, &r)?,
        chain_vs_preads: ratio(&c, &p)?,
        chain_mb_s: c,
        raw_mb_s: r,
        preads_mb_s: p,
    })
}

#[derive(Debug, Serialize)]
struct ReadResult {
    storage: String,
    /// How the page cache got the data: "as written" (both files by the
    /// same 64 KiB writes) or "re-read" (dropped, then read back).
    cache: String,
    depth: usize,
    data_bytes: u64,
    /// Every byte read through the chain equals the raw file's.
    identical: bool,
    sequential: ReadFigure,
    random: ReadFigure,
    random_reads: usize,
    index_memory_bytes: usize,
    mixed_chunks: usize,
}

/// A buffer that starts on a page boundary. Copies out of the page cache
/// run up to twice as fast into a page-aligned buffer as into malloc's
/// 16-byte-aligned ones, which would swamp any chain/raw difference; both
/// sides get one, as a guest's I/O buffers are page-aligned.
struct PageBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    const PAGE: usize = 4096;

    fn new(len: u64) -> PageBuf {
        let len = len as usize;
        let bytes = vec![0u8; len + Self::PAGE];
        let start = bytes.as_ptr().align_offset(Self::PAGE);
        PageBuf { bytes, start, len }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// Reads `buf.len()` bytes at `off` of an interleaved chain straight from
/// its layer files: run i lives in layer i % depth at the layer's data
/// offset. With one layer the whole read is one piece, as the library
/// makes it.
fn read_layers(layers: &[(&dyn Storage, u64)], buf: &mut [u8], off: u64) -> io::Result<()> {
    let depth = layers.len() as u64;
    let mut at = 0;
    while at < buf.len() {
        let pos = off + at as u64;
        let run = pos / RUN;
        let end = if depth == 1 {
            buf.len()
        } else {
            buf.len().min(((run + 1) * RUN - off) as usize)
        };
        let (storage, data_offset) = layers[(run % depth) as usize];
        storage.read_at(&mut buf[at..end], data_offset + pos)?;
        at = end;
    }
    Ok(())
}

/// Sequential and random reads: chain, raw file, direct layer preads.
fn time_reads(
    disk: &Disk,
    raw: &File,
    size: u64,
    passes: u64,
    offsets: &[u64],
) -> Result<(ReadFigure, ReadFigure)> {
    let layers: Vec<(&dyn Storage, u64)> = disk
        .layers()
        .iter()
        .map(|l| (l.storage.as_ref(), l.data_offset()))
        .collect();
    let layers = &layers;
    let sequential = {
        let (mut cbuf, mut rbuf, mut pbuf) = (
            PageBuf::new(SEQ_READ),
            PageBuf::new(SEQ_READ),
            PageBuf::new(SEQ_READ),
        );
        let each = |f: &mut dyn FnMut(u64) -> Result<()>| -> Result<()> {
            for _ in 0..passes {
                for off in (0..size).step_by(SEQ_READ as usize) {
                    f(off)?;
                }
            }
            Ok(())
        };
        read_figure(
            passes * size,
            &mut || each(&mut |off| Ok(disk.read_at(cbuf.get(), off)?)),
            &mut || each(&mut |off| Ok(raw.read_exact_at(rbuf.get(), off)?)),
            &mut || each(&mut |off| Ok(read_layers(layers, pbuf.get(), off)?)),
        )?
    };
    let random = {
        let (mut cbuf, mut rbuf, mut pbuf) = (
            PageBuf::new(RANDOM_READ),
            PageBuf::new(RANDOM_READ),
            PageBuf::new(RANDOM_READ),
        );
        let each = |f: &mut dyn FnMut(u64) -> Result<()>| -> Result<()> {
            for &off in offsets {
                f(off)?;
            }
            Ok(())
        };
        read_figure(
            offsets.len() as u64 * RANDOM_READ,
            &mut || each(&mut |off| Ok(disk.read_at(cbuf.get(), off)?)),
            &mut || each(&mut |off| Ok(raw.read_exact_at(rbuf.get(), off)?)),
            &mut || each(&mut |off| Ok(read_layers(layers, pbuf.get(), off)?)),
        )?
    };
    Ok((sequential, random))
}

/// Section 1 in `dir`. With `evictable` (a disk-backed filesystem), every
/// depth is timed twice: with the cache as written, then dropped and read
/// back, because the page cache's folio sizes follow how pages got there
/// (big readahead folios for the raw file read sequentially, 64 KiB ones
/// for the layer files read in interleaved pieces), and that alone moves
/// page-cache throughput by tens of percent on ext4.
fn bench_reads(dir: &Path, storage: &str, evictable: bool, plan: &Plan) -> Result<Vec<ReadResult>> {
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

fn evict_from_cache(file: &File) -> Result<()> {
    file.sync_data()?;
    Ok(evict_fd(file.as_raw_fd())?)
}

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

// ---------------------------------------------------------------------------
// 2. Snapshot and clone latency

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

#[derive(Debug, Serialize)]
struct SnapshotResult {
    virtual_size: u64,
    data_bytes: u64,
    snapshot: Latency,
    clone: Latency,
}

#[derive(Debug, Serialize)]
struct SnapshotReport {
    /// Baseline: a 4 KiB write plus `fdatasync` in the same directory.
    fdatasync: Latency,
    sizes: Vec<SnapshotResult>,
}

fn bench_snapshots(dir: &Path, plan: &Plan) -> Result<SnapshotReport> {
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

// ---------------------------------------------------------------------------
// 3. Convert vs qemu-img

#[derive(Debug, Serialize)]
struct ConvertRow {
    tool: String,
    from: String,
    to: String,
    seconds: Vec<f64>,
    gb_s: Vec<f64>,
    throughput: Spread,
}

#[derive(Debug, Serialize)]
struct ConvertReport {
    bytes: u64,
    qemu_img: Option<String>,
    rows: Vec<ConvertRow>,
    /// raw -> snap -> raw gives back the input.
    img_round_trip_identical: bool,
    /// raw -> qcow2 -> raw gives back the input (checks the baseline).
    qemu_round_trip_identical: Option<bool>,
}

fn qemu_img_version() -> Option<String> {
    let out = Command::new("qemu-img").arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or_default().to_string())
}

/// `qemu-img convert` with a writeback cache: its default for convert is
/// "unsafe" (no sync at all), while the library syncs its output, so the
/// default would compare a page-cache copy with a durable one.
fn qemu_convert(input: &Path, from: &str, output: &Path, to: &str) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-t", "writeback", "-f", from, "-O", to])
        .arg(input)
        .arg(output)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img convert -f {from} -O {to} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn img_convert(input: &Path, from: Format, output: &Path, to: Format) -> Result<()> {
    convert(input, Some(from), output, to, None, false, &mut |_, _| {})
        .with_context(|| format!("converting {} to {}", input.display(), output.display()))?;
    Ok(())
}

/// Touches `bytes` of fresh memory and frees it again. This VM hands idle
/// free memory back to the host (virtio-balloon free page reporting), and
/// the first touch of such a page costs a host fault: a conversion whose
/// output's page cache landed on such pages ran 3x slower here than one
/// that reused just-freed pages, whatever the tool. Done right before each
/// timed conversion, every one starts with the same hot free memory.
fn warm_free_memory(bytes: u64) {
    let mut pages = vec![0u8; bytes as usize];
    for b in pages.iter_mut().step_by(4096) {
        *b = 1;
    }
    // Keeps the stores: they are the point, though nothing reads them.
    std::hint::black_box(&pages);
}

fn bench_convert(dir: &Path, plan: &Plan) -> Result<ConvertReport> {
    let size = plan.convert_size;
    let qemu = qemu_img_version();
    if qemu.is_none() {
        eprintln!("warning: qemu-img not found; section 3 has no baseline");
    }
    let input = dir.join("input.raw");
    eprintln!("[convert] writing {} of random data", fmt_bytes(size));
    write_random_file(&input, size)?;
    let snap = dir.join("image.snap");
    let back = dir.join("image-back.raw");
    let qcow2 = dir.join("image.qcow2");
    let qback = dir.join("qcow2-back.raw");
    let qcopy = dir.join("qemu-copy.raw");

    // Steps, in row order: img raw->snap, img snap->raw, qemu raw->qcow2,
    // qemu qcow2->raw, qemu raw->raw. A pair stays together (its second
    // step reads the first's output); the groups rotate every run so that
    // no tool always goes first or last.
    let groups: &[&[usize]] = if qemu.is_some() {
        &[&[0, 1], &[2, 3], &[4]]
    } else {
        &[&[0, 1]]
    };
    let step = |n: usize| match n {
        0 => img_convert(&input, Format::Raw, &snap, Format::Snap),
        1 => img_convert(&snap, Format::Snap, &back, Format::Raw),
        2 => qemu_convert(&input, "raw", &qcow2, "qcow2"),
        3 => qemu_convert(&qcow2, "qcow2", &qback, "raw"),
        _ => qemu_convert(&input, "raw", &qcopy, "raw"),
    };
    let mut secs: [Vec<f64>; 5] = Default::default();
    let mut img_identical = false;
    let mut qemu_identical = None;
    // Run 0 is the warm-up; it is also where the round trips are checked.
    for rep in 0..=REPS {
        eprintln!("[convert] run {rep} of {REPS} (0 = warm-up)");
        for g in 0..groups.len() {
            let group = groups[(rep + g) % groups.len()];
            for &n in group {
                warm_free_memory(size + 256 * MIB);
                let t = seconds(|| step(n))?;
                if rep > 0 {
                    secs[n].push(t);
                }
            }
            // Outputs go as soon as they are checked: the page cache must
            // keep holding the input.
            match group[0] {
                0 => {
                    if rep == 0 {
                        img_identical = files_equal(&input, &back)?;
                    }
                    remove_if_exists(&back)?;
                    remove_if_exists(&snap)?;
                }
                2 => {
                    if rep == 0 {
                        qemu_identical = Some(files_equal(&input, &qback)?);
                    }
                    remove_if_exists(&qback)?;
                    remove_if_exists(&qcow2)?;
                }
                _ => remove_if_exists(&qcopy)?,
            }
        }
    }
    remove_if_exists(&input)?;
    let labels = [
        ("img (library)", "raw", "snap"),
        ("img (library)", "snap", "raw"),
        ("qemu-img", "raw", "qcow2"),
        ("qemu-img", "qcow2", "raw"),
        ("qemu-img", "raw", "raw"),
    ];
    let rows = labels
        .iter()
        .zip(secs)
        .filter(|(_, s)| !s.is_empty())
        .map(|((tool, from, to), seconds)| {
            let gb_s: Vec<f64> = seconds.iter().map(|s| size as f64 / s / 1e9).collect();
            Ok(ConvertRow {
                tool: tool.to_string(),
                from: from.to_string(),
                to: to.to_string(),
                throughput: spread(&gb_s)?,
                gb_s,
                seconds,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ConvertReport {
        bytes: size,
        qemu_img: qemu,
        rows,
        img_round_trip_identical: img_identical,
        qemu_round_trip_identical: qemu_identical,
    })
}

// ---------------------------------------------------------------------------
// 4. Footprint and index memory

#[derive(Debug, Serialize)]
struct IndexFigure {
    virtual_size: u64,
    depth: usize,
    pattern: String,
    memory_bytes: usize,
    mixed_chunks: usize,
    /// FORMAT.md's formula, 4 bytes per 64 KiB chunk plus 16 per mixed
    /// chunk: `memory_bytes` without the slack of the slab vector, which
    /// grows by doubling.
    formula_bytes: u64,
    /// Baseline: one owner byte per block.
    flat_table_bytes: u64,
}

#[derive(Debug, Serialize)]
struct RealVsSimulated {
    pattern: String,
    real: IndexFigure,
    simulated: IndexFigure,
}

#[derive(Debug, Serialize)]
struct FootprintReport {
    new_image_size: u64,
    new_image_bytes_on_disk: u64,
    /// Baseline: `qemu-img create -f qcow2` of the same size.
    qcow2_bytes_on_disk: Option<u64>,
    simulated: Vec<IndexFigure>,
    real: Vec<RealVsSimulated>,
}

fn index_figure(
    memory_bytes: usize,
    mixed_chunks: usize,
    size: u64,
    depth: usize,
    pattern: &str,
) -> IndexFigure {
    let blocks = size / BLOCK as u64;
    IndexFigure {
        virtual_size: size,
        depth,
        pattern: pattern.to_string(),
        memory_bytes,
        mixed_chunks,
        formula_bytes: blocks.div_ceil(CHUNK_BLOCKS) * 4 + mixed_chunks as u64 * 16,
        flat_table_bytes: blocks,
    }
}

fn figure_of(index: &Index, size: u64, depth: usize, pattern: &str) -> IndexFigure {
    index_figure(
        index.memory_bytes(),
        index.mixed_chunks(),
        size,
        depth,
        pattern,
    )
}

const INTERLEAVED: &str = "64 KiB runs interleaved";
const RANDOM: &str = "random 4 KiB blocks";

fn bench_footprint(dir: &Path, plan: &Plan, reads: &[ReadResult]) -> Result<FootprintReport> {
    let env = RealEnv;
    let new = dir.join("new-1t");
    ops::create(&env, &new, Some(TIB), BLOCK, None)?;
    let new_image_bytes_on_disk = allocated_bytes(&new)?;
    let qcow2_bytes_on_disk = if qemu_img_version().is_some() {
        let q = dir.join("new-1t.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("1T")
            .output()
            .context("running qemu-img create")?;
        ensure!(
            out.status.success(),
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let bytes = allocated_bytes(&q)?;
        fs::remove_file(&q)?;
        Some(bytes)
    } else {
        None
    };
    fs::remove_file(&new)?;

    eprintln!("[index] simulating {} chains", fmt_bytes(SIM_SIZE));
    let blocks = SIM_SIZE / BLOCK as u64;
    let simulated = vec![
        figure_of(
            &simulated_index(&interleaved_owners(blocks, GOAL_DEPTH), GOAL_DEPTH),
            SIM_SIZE,
            GOAL_DEPTH,
            INTERLEAVED,
        ),
        figure_of(
            &simulated_index(&random_owners(blocks, GOAL_DEPTH), GOAL_DEPTH),
            SIM_SIZE,
            GOAL_DEPTH,
            RANDOM,
        ),
    ];

    let mut real = Vec::new();
    // The interleaved chain of section 1 (root disk) is the real one here.
    if let Some(r) = reads.iter().find(|r| r.depth == GOAL_DEPTH) {
        let owners = interleaved_owners(r.data_bytes / BLOCK as u64, GOAL_DEPTH);
        real.push(RealVsSimulated {
            pattern: INTERLEAVED.to_string(),
            real: index_figure(
                r.index_memory_bytes,
                r.mixed_chunks,
                r.data_bytes,
                GOAL_DEPTH,
                INTERLEAVED,
            ),
            simulated: figure_of(
                &simulated_index(&owners, GOAL_DEPTH),
                r.data_bytes,
                GOAL_DEPTH,
                INTERLEAVED,
            ),
        });
    }
    let size = plan.random_chain;
    eprintln!(
        "[index] building a real {} chain with random 4 KiB ownership",
        fmt_bytes(size)
    );
    let owners = random_owners(size / BLOCK as u64, GOAL_DEPTH);
    let chain_dir = dir.join("random-chain");
    fs::create_dir(&chain_dir)?;
    // The content does not matter to the index, only who owns each block.
    let top = build_chain(
        &chain_dir,
        size,
        &owners,
        GOAL_DEPTH,
        |_, buf| {
            buf.fill(0xa5);
            Ok(())
        },
        None,
    )?;
    let disk = Disk::open_path(&top, false)?;
    real.push(RealVsSimulated {
        pattern: RANDOM.to_string(),
        real: figure_of(disk.index(), size, GOAL_DEPTH, RANDOM),
        simulated: figure_of(
            &simulated_index(&owners, GOAL_DEPTH),
            size,
            GOAL_DEPTH,
            RANDOM,
        ),
    });
    drop(disk);
    fs::remove_dir_all(&chain_dir)?;
    Ok(FootprintReport {
        new_image_size: TIB,
        new_image_bytes_on_disk,
        qcow2_bytes_on_disk,
        simulated,
        real,
    })
}

// ---------------------------------------------------------------------------
// Report

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

fn fmt_bytes(b: u64) -> String {
    let units = [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)];
    for (name, unit) in units {
        if b >= unit {
            let v = b as f64 / unit as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0} {name}")
            } else {
                format!("{v:.2} {name}")
            };
        }
    }
    format!("{b} B")
}

fn fmt_spread(s: &Spread, decimals: usize) -> String {
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        s.median,
        s.min,
        s.max,
        d = decimals
    )
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let p = &r.plan;
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
    let _ = writeln!(
        m,
        "| storage | cache | depth | reads | chain MB/s | raw MB/s | chain/raw | \
         layer preads MB/s | chain/layer preads | index |"
    );
    let _ = writeln!(m, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for x in &r.reads {
        for (name, f) in [
            (format!("seq {}", fmt_bytes(SEQ_READ)), &x.sequential),
            (format!("random {}", fmt_bytes(RANDOM_READ)), &x.random),
        ] {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                x.storage,
                x.cache,
                x.depth,
                name,
                fmt_spread(&f.chain, 0),
                fmt_spread(&f.raw, 0),
                fmt_spread(&f.chain_vs_raw, 3),
                fmt_spread(&f.preads, 0),
                fmt_spread(&f.chain_vs_preads, 3),
                fmt_bytes(x.index_memory_bytes as u64),
            );
        }
    }
    let _ = writeln!(m);
    let differ: Vec<String> = r
        .reads
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
    for x in r.reads.iter().filter(|x| x.depth == GOAL_DEPTH) {
        let _ = writeln!(
            m,
            "Goal, depth {GOAL_DEPTH} within 5 % of raw ({}, cache {}): sequential {:.3} {}, \
             random {:.3} {}.  ",
            x.storage,
            x.cache,
            x.sequential.chain_vs_raw.median,
            met(x.sequential.chain_vs_raw.median >= READ_GOAL_RATIO),
            x.random.chain_vs_raw.median,
            met(x.random.chain_vs_raw.median >= READ_GOAL_RATIO),
        );
    }
    let _ = writeln!(m);

    let s = &r.snapshots;
    let _ = writeln!(m, "## 2. Snapshot and clone latency\n");
    let _ = writeln!(
        m,
        "{} of data written, then {} `snapshot_create` in a row on the same image and \
         {} `clone` of the newest snapshot, in {} (fsyncs included). Baseline: a 4 KiB \
         write + `fdatasync` there: median {:.2} ms, p90 {:.2} ms, max {:.2} ms.\n",
        fmt_bytes(p.snapshot_data),
        p.snapshot_count,
        p.snapshot_count,
        r.dir.display(),
        s.fdatasync.median_ms,
        s.fdatasync.p90_ms,
        s.fdatasync.max_ms,
    );
    let _ = writeln!(
        m,
        "| disk | operation | median ms | p90 ms | max ms | median / fdatasync |"
    );
    let _ = writeln!(m, "|---|---|---:|---:|---:|---:|");
    for x in &s.sizes {
        for (op, l) in [("snapshot", &x.snapshot), ("clone", &x.clone)] {
            let _ = writeln!(
                m,
                "| {} | {op} | {:.2} | {:.2} | {:.2} | {:.1} |",
                fmt_bytes(x.virtual_size),
                l.median_ms,
                l.p90_ms,
                l.max_ms,
                l.median_ms / s.fdatasync.median_ms,
            );
        }
    }
    if let [small, big] = &s.sizes[..] {
        let _ = writeln!(m);
        let _ = writeln!(
            m,
            "| operation | 1 TiB / 1 GiB median | 1 TiB / 1 GiB p90 | goal: 1 TiB median < {LATENCY_GOAL_MS} ms |"
        );
        let _ = writeln!(m, "|---|---:|---:|---|");
        for (op, a, b) in [
            ("snapshot", &small.snapshot, &big.snapshot),
            ("clone", &small.clone, &big.clone),
        ] {
            let _ = writeln!(
                m,
                "| {op} | {:.2} | {:.2} | {} ({:.2} ms) |",
                b.median_ms / a.median_ms,
                b.p90_ms / a.p90_ms,
                met(b.median_ms < LATENCY_GOAL_MS),
                b.median_ms,
            );
        }
    }
    let _ = writeln!(m);

    let c = &r.convert;
    let _ = writeln!(m, "## 3. convert vs qemu-img convert\n");
    let _ = writeln!(
        m,
        "{} of random data in a raw file, in {}; outputs synced (qemu-img with \
         `-t writeback`; its convert default, `unsafe`, never syncs); input in the \
         page cache; one warm-up, then median of {REPS} (min–max), tools rotating \
         order every run, each conversion started with the same hot free memory \
         (this VM returns idle free pages to the host, and refaulting them tripled \
         a conversion's time). GB/s = 10^9 B/s of virtual disk. {}\n",
        fmt_bytes(c.bytes),
        r.dir.display(),
        c.qemu_img
            .as_deref()
            .map(|v| format!("Baseline: {v}."))
            .unwrap_or_else(|| "qemu-img not found: no baseline.".to_string()),
    );
    let _ = writeln!(
        m,
        "| conversion | tool | GB/s | s | vs qemu-img, same direction | vs qemu-img raw→raw |"
    );
    let _ = writeln!(m, "|---|---|---:|---:|---:|---:|");
    let find = |from: &str, to: &str| {
        c.rows
            .iter()
            .find(|x| x.tool == "qemu-img" && x.from == from && x.to == to)
    };
    for x in &c.rows {
        let same = match (x.tool.as_str(), x.from.as_str()) {
            ("qemu-img", _) => None,
            (_, "raw") => find("raw", "qcow2"),
            _ => find("qcow2", "raw"),
        };
        let vs = |q: Option<&ConvertRow>| match q {
            Some(q) if x.tool != "qemu-img" || q.from != x.from || q.to != x.to => {
                format!("{:.2}", x.throughput.median / q.throughput.median)
            }
            _ => "—".to_string(),
        };
        let _ = writeln!(
            m,
            "| {} → {} | {} | {} | {} | {} | {} |",
            x.from,
            x.to,
            x.tool,
            fmt_spread(&x.throughput, 2),
            bench::median(&x.seconds).map_or_else(|e| e.to_string(), |s| format!("{s:.2}")),
            vs(same),
            vs(find("raw", "raw")),
        );
    }
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Round trip raw → snap → raw: {}. qemu-img raw → qcow2 → raw: {}.\n",
        if c.img_round_trip_identical {
            "identical to the input"
        } else {
            "**DIFFERS from the input**"
        },
        match c.qemu_round_trip_identical {
            Some(true) => "identical to the input",
            Some(false) => "**DIFFERS from the input**",
            None => "not run",
        }
    );

    let f = &r.footprint;
    let _ = writeln!(m, "## 4. Disk footprint and index memory\n");
    let _ = writeln!(m, "| figure | this format | baseline | ratio | goal |");
    let _ = writeln!(m, "|---|---:|---:|---:|---|");
    let _ = writeln!(
        m,
        "| new {} image, bytes on disk | {} | {} | {} | < {}: {} |",
        fmt_bytes(f.new_image_size),
        fmt_bytes(f.new_image_bytes_on_disk),
        f.qcow2_bytes_on_disk
            .map(|q| format!("{} (qcow2, `qemu-img create`)", fmt_bytes(q)))
            .unwrap_or_else(|| "—".to_string()),
        f.qcow2_bytes_on_disk
            .map(|q| format!("{:.3}", f.new_image_bytes_on_disk as f64 / q as f64))
            .unwrap_or_else(|| "—".to_string()),
        fmt_bytes(FOOTPRINT_GOAL),
        met(f.new_image_bytes_on_disk < FOOTPRINT_GOAL),
    );
    for x in &f.simulated {
        let goal = if x.pattern == INTERLEAVED {
            format!(
                "< {}: {}",
                fmt_bytes(INDEX_GOAL),
                met((x.memory_bytes as u64) < INDEX_GOAL)
            )
        } else {
            "reported".to_string()
        };
        let _ = writeln!(
            m,
            "| index memory, {} depth {}, {} (simulated; {} mixed chunks; formula {}) \
             | {} | {} (owner byte per block) | {:.3} | {goal} |",
            fmt_bytes(x.virtual_size),
            x.depth,
            x.pattern,
            x.mixed_chunks,
            fmt_bytes(x.formula_bytes),
            fmt_bytes(x.memory_bytes as u64),
            fmt_bytes(x.flat_table_bytes),
            x.memory_bytes as f64 / x.flat_table_bytes as f64,
        );
    }
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Real chains opened with `Disk::open` vs the simulation of the same ownership \
         (`Index::memory_bytes`, which counts vector capacity; *formula*: 4 B per \
         64 KiB chunk + 16 B per mixed chunk, without the slab vector's doubling \
         slack):\n"
    );
    let _ = writeln!(
        m,
        "| chain | real index | simulated, same size | real/sim | real per GiB | \
         simulated {} per GiB | formula per GiB, real / {} |",
        fmt_bytes(SIM_SIZE),
        fmt_bytes(SIM_SIZE)
    );
    let _ = writeln!(m, "|---|---:|---:|---:|---:|---:|---:|");
    let per_gib = |bytes: u64, size: u64| fmt_bytes(bytes * GIB / size);
    for x in &f.real {
        let sim100 = f.simulated.iter().find(|s| s.pattern == x.pattern);
        let _ = writeln!(
            m,
            "| {} depth {}, {} | {} ({} mixed) | {} ({} mixed) | {:.3} | {} | {} | {} / {} |",
            fmt_bytes(x.real.virtual_size),
            x.real.depth,
            x.pattern,
            fmt_bytes(x.real.memory_bytes as u64),
            x.real.mixed_chunks,
            fmt_bytes(x.simulated.memory_bytes as u64),
            x.simulated.mixed_chunks,
            x.real.memory_bytes as f64 / x.simulated.memory_bytes as f64,
            per_gib(x.real.memory_bytes as u64, x.real.virtual_size),
            sim100
                .map(|s| per_gib(s.memory_bytes as u64, s.virtual_size))
                .unwrap_or_else(|| "—".to_string()),
            per_gib(x.real.formula_bytes, x.real.virtual_size),
            sim100
                .map(|s| per_gib(s.formula_bytes, s.virtual_size))
                .unwrap_or_else(|| "—".to_string()),
        );
    }
    m
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
    let mut reads = bench_reads(root.path(), &root_label, true, &plan)?;
    // Section 4 reads its real interleaved chain from the root-disk results.
    let root_reads = reads.len();
    if let Some(s) = &shm {
        let label = format!("tmpfs ({})", cli.shm_dir.display());
        reads.extend(bench_reads(s.path(), &label, false, &plan)?);
    }
    section("reads", t);

    let t = Instant::now();
    let snapshots = bench_snapshots(root.path(), &plan)?;
    section("snapshots", t);

    let t = Instant::now();
    let convert = bench_convert(root.path(), &plan)?;
    section("convert", t);

    let t = Instant::now();
    let footprint = bench_footprint(root.path(), &plan, &reads[..root_reads])?;
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
