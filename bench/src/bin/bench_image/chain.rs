//! Chains of layers with a chosen owner for every block: the ownership
//! patterns, the chains built from them, and the merged index `Disk::open`
//! would build for them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image_format::index::{Index, Owner};
use image_format::{ops, Disk, RealEnv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{BLOCK, KIB};

/// Ownership granularity of the interleaved chains: one run, one layer.
pub const RUN: u64 = 64 * KIB;
/// Fixed seed of the random ownership: every run builds the same chain.
const OWNER_SEED: u64 = 0x5eed_0a3e;

/// Runs of consecutive blocks whose entry in `owners` is `owner`, as
/// (first block, count): what that layer's map holds.
pub fn runs_of(owners: &[Owner], owner: Owner) -> impl Iterator<Item = (u64, u64)> + '_ {
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
pub fn interleaved_owners(blocks: u64, depth: usize) -> Vec<Owner> {
    let per_run = RUN / BLOCK as u64;
    (0..blocks)
        .map(|b| ((b / per_run) % depth as u64 + 1) as Owner)
        .collect()
}

/// Every block owned by a random one of `depth` layers: the worst case for
/// the index, where nearly every chunk has mixed owners.
pub fn random_owners(blocks: u64, depth: usize) -> Vec<Owner> {
    let mut rng = StdRng::seed_from_u64(OWNER_SEED);
    (0..blocks)
        .map(|_| rng.gen_range(1..=depth as Owner))
        .collect()
}

/// The merged index `Disk::open` would build for that ownership: layer by
/// layer from the base, one `set_range` per run of the layer's map (the same
/// calls, so the same allocations, as the real open).
pub fn simulated_index(owners: &[Owner], depth: usize) -> Index {
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
pub fn build_chain(
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
