//! Power-loss harness for the crash contract (FORMAT.md): random writes,
//! discards, write-zeroes, flushes, snapshots and commits on a simulated
//! filesystem whose power goes out after a random number of mutating calls
//! (so inside any operation, not only between them). After each crash: the
//! chain reopens, `check` finds no corruption, and every sector reads back
//! either its last flushed content or something written after that flush.
//!
//! `CRASH_ITERATIONS` (default 1000) and `CRASH_SEED` tune a run.

use std::path::Path;
use std::sync::Arc;

use image_format::check::{check, RepairMode};
use image_format::sim::SimEnv;
use image_format::{ops, Disk, Env};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECTOR: usize = 512;
const DISK_SIZE: u64 = 1 << 20;
const SECTORS: usize = DISK_SIZE as usize / SECTOR;
const BLOCK: u32 = 4096;

/// Every sector written carries a tag (the write's id and the sector
/// number) repeated over its 512 bytes, so a read proves which write it
/// came from. Tag 0 is zeros.
fn sector_bytes(tag: u64) -> [u8; SECTOR] {
    let mut b = [0u8; SECTOR];
    for c in b.chunks_mut(8) {
        c.copy_from_slice(&tag.to_le_bytes());
    }
    b
}

fn decode(b: &[u8]) -> Option<u64> {
    let tag = u64::from_le_bytes(b[..8].try_into().ok()?);
    b.chunks(8).all(|c| c == tag.to_le_bytes()).then_some(tag)
}

/// What each sector may hold after a crash.
struct Model {
    flushed: Vec<u64>,
    /// Tags written since the last completed flush.
    since_flush: Vec<Vec<u64>>,
    latest: Vec<u64>,
    /// Writes whose every sector was covered by a completed flush.
    durable_writes: u64,
    pending_writes: u64,
}

impl Model {
    fn new() -> Self {
        Model {
            flushed: vec![0; SECTORS],
            since_flush: vec![Vec::new(); SECTORS],
            latest: vec![0; SECTORS],
            durable_writes: 0,
            pending_writes: 0,
        }
    }
    fn write(&mut self, first: usize, tags: &[u64]) {
        for (i, &t) in tags.iter().enumerate() {
            self.since_flush[first + i].push(t);
            self.latest[first + i] = t;
        }
        self.pending_writes += 1;
    }
    fn flushed_ok(&mut self) {
        self.flushed.clone_from(&self.latest);
        for s in &mut self.since_flush {
            s.clear();
        }
        self.durable_writes += self.pending_writes;
        self.pending_writes = 0;
    }
    fn allowed(&self, sector: usize, tag: u64) -> bool {
        self.flushed[sector] == tag || self.since_flush[sector].contains(&tag)
    }
}

#[derive(Default, Debug)]
struct Totals {
    iterations: u64,
    crashes_inside_ops: u64,
    ops: u64,
    writes: u64,
    durable_writes_checked: u64,
    sectors_checked: u64,
    flushed_sectors_checked: u64,
    losses: u64,
    corruptions: u64,
    leaked_blocks_found: u64,
    snapshots: u64,
    commits: u64,
}

const TOP: &str = "vm/disk.img";

fn open(env: &Arc<dyn Env>) -> Disk {
    Disk::open(Arc::clone(env), Path::new(TOP), true).expect("reopen after crash")
}

/// Runs ops until the power goes out (an error) or the script ends.
fn run_script(
    env: &Arc<dyn Env>,
    rng: &mut StdRng,
    model: &mut Model,
    totals: &mut Totals,
    next_tag: &mut u64,
) -> Result<(), image_format::Error> {
    let mut disk = Some(Disk::open(Arc::clone(env), Path::new(TOP), true)?);
    let mut snap_no = 0;
    for _ in 0..rng.gen_range(5..60) {
        totals.ops += 1;
        let d = disk.as_mut().expect("disk open between ops");
        match rng.gen_range(0..100) {
            0..=49 => {
                // Aligned or not, 1 to 24 sectors.
                let first = rng.gen_range(0..SECTORS);
                let n = rng.gen_range(1..=24).min(SECTORS - first);
                let tags: Vec<u64> = (0..n)
                    .map(|i| {
                        *next_tag += 1;
                        (*next_tag << 20) | (first + i) as u64
                    })
                    .collect();
                let mut buf = Vec::with_capacity(n * SECTOR);
                for &t in &tags {
                    buf.extend_from_slice(&sector_bytes(t));
                }
                model.write(first, &tags);
                totals.writes += 1;
                d.write_at(&buf, (first * SECTOR) as u64)?;
            }
            50..=61 => {
                let first = rng.gen_range(0..SECTORS);
                let n = rng.gen_range(1..=40).min(SECTORS - first);
                model.write(first, &vec![0; n]);
                if rng.gen_bool(0.5) {
                    d.discard((first * SECTOR) as u64, (n * SECTOR) as u64)?;
                } else {
                    d.write_zeroes((first * SECTOR) as u64, (n * SECTOR) as u64)?;
                }
            }
            62..=84 => {
                d.flush()?;
                model.flushed_ok();
            }
            85..=94 => {
                disk.take().expect("open").close()?;
                model.flushed_ok();
                snap_no += 1;
                ops::snapshot_create(env.as_ref(), Path::new(TOP), &format!("s{snap_no}"))?;
                totals.snapshots += 1;
                disk = Some(Disk::open(Arc::clone(env), Path::new(TOP), true)?);
            }
            _ => {
                let depth = disk.as_ref().expect("open").layers().len();
                disk.take().expect("open").close()?;
                model.flushed_ok();
                if depth > 1 {
                    ops::commit(env.as_ref(), Path::new(TOP), false, &mut |_, _| {})?;
                    totals.commits += 1;
                }
                disk = Some(Disk::open(Arc::clone(env), Path::new(TOP), true)?);
            }
        }
    }
    Ok(())
}

#[test]
fn power_loss_never_loses_flushed_writes() {
    let iterations: u64 = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut totals = Totals::default();
    let mut failures = Vec::new();
    for it in 0..iterations {
        let sim = SimEnv::new(seed ^ it.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let env: Arc<dyn Env> = Arc::new(sim.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(it));
        ops::create(env.as_ref(), Path::new(TOP), Some(DISK_SIZE), BLOCK, None).expect("create");
        let mut model = Model::new();
        let mut next_tag = 0;
        // Somewhere in the script, or (when the count is large) after it.
        sim.set_countdown(Some(rng.gen_range(1..600)));
        let r = run_script(&env, &mut rng, &mut model, &mut totals, &mut next_tag);
        if sim.is_dead() {
            totals.crashes_inside_ops += 1;
        } else if let Err(e) = r {
            panic!("iteration {it}: an operation failed without a crash: {e}");
        }
        sim.crash();
        totals.iterations += 1;

        // Reopen, check, read back.
        let report = check(env.as_ref(), Path::new(TOP), RepairMode::None).expect("check runs");
        if report.chain_error.is_some() || report.corruptions > 0 {
            totals.corruptions += 1;
            failures.push(format!("iteration {it}: check: {report:?}"));
            continue;
        }
        totals.leaked_blocks_found += report.leaked_blocks;
        let disk = open(&env);
        let mut buf = vec![0u8; DISK_SIZE as usize];
        disk.read_at(&mut buf, 0).expect("read back");
        for s in 0..SECTORS {
            totals.sectors_checked += 1;
            if model.flushed[s] != 0 {
                totals.flushed_sectors_checked += 1;
            }
            let ok =
                decode(&buf[s * SECTOR..(s + 1) * SECTOR]).is_some_and(|t| model.allowed(s, t));
            if !ok {
                totals.losses += 1;
                if failures.len() < 10 {
                    failures.push(format!(
                        "iteration {it}: sector {s}: got {:?}, flushed {:#x}, since {:x?}",
                        decode(&buf[s * SECTOR..(s + 1) * SECTOR]),
                        model.flushed[s],
                        model.since_flush[s]
                    ));
                }
            }
        }
        totals.durable_writes_checked += model.durable_writes;
        drop(disk);
        // Repair leaves a fully clean chain.
        check(env.as_ref(), Path::new(TOP), RepairMode::All).expect("repair");
        let after = check(env.as_ref(), Path::new(TOP), RepairMode::None).expect("check");
        if after.exit_code() != 0 {
            failures.push(format!("iteration {it}: not clean after repair: {after:?}"));
        }
    }
    println!(
        "crash harness: {} iterations ({} power losses inside an operation), {} operations, {} writes ({} durable writes checked), {} snapshots, {} commits, {} sectors checked ({} holding flushed data), losses: {}, corrupt reopens: {}, leaked blocks found and repaired: {}",
        totals.iterations,
        totals.crashes_inside_ops,
        totals.ops,
        totals.writes,
        totals.durable_writes_checked,
        totals.snapshots,
        totals.commits,
        totals.sectors_checked,
        totals.flushed_sectors_checked,
        totals.losses,
        totals.corruptions,
        totals.leaked_blocks_found
    );
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    assert_eq!(totals.losses, 0);
    assert!(totals.durable_writes_checked > 0 && totals.snapshots > 0 && totals.commits > 0);
}
