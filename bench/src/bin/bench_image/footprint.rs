//! Section 4: the footprint of a new image and the merged index's memory,
//! simulated and real.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use image_format::index::{Index, CHUNK_BLOCKS};
use image_format::{ops, Disk, RealEnv};
use serde::Serialize;

use crate::cells::{fmt_bytes, met};
use crate::chain::{build_chain, interleaved_owners, random_owners, simulated_index};
use crate::convert::qemu_img_version;
use crate::files::allocated_bytes;
use crate::reads::ReadResult;
use crate::{Plan, BLOCK, GIB, GOAL_DEPTH, MIB, TIB};

/// Virtual size of the simulated index.
const SIM_SIZE: u64 = 100 * GIB;
/// The goals: the index of an interleaved chain of depth `GOAL_DEPTH`
/// under this, and a new 1 TiB image under `FOOTPRINT_GOAL` on disk.
const INDEX_GOAL: u64 = 16 * MIB;
const FOOTPRINT_GOAL: u64 = MIB;

/// One index's memory.
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

/// A real chain's index beside the simulation of the same ownership.
#[derive(Debug, Serialize)]
struct RealVsSimulated {
    pattern: String,
    real: IndexFigure,
    simulated: IndexFigure,
}

/// Section 4's figures.
#[derive(Debug, Serialize)]
pub struct FootprintReport {
    new_image_size: u64,
    new_image_bytes_on_disk: u64,
    /// Baseline: `qemu-img create -f qcow2` of the same size.
    qcow2_bytes_on_disk: Option<u64>,
    simulated: Vec<IndexFigure>,
    real: Vec<RealVsSimulated>,
}

/// The figures of an index of `memory_bytes` with `mixed_chunks` over a
/// `size`-byte disk.
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

/// The figures of `index`.
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

/// Section 4 in `dir`; the real interleaved chain is the one `reads`
/// (section 1, root disk) measured.
pub fn bench_footprint(dir: &Path, plan: &Plan, reads: &[ReadResult]) -> Result<FootprintReport> {
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

/// Section 4's tables.
pub fn markdown(f: &FootprintReport) -> String {
    let mut m = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(m, "## 4. Disk footprint and index memory\n");
    let _ = writeln!(m, "{}", footprint_table(f));
    let _ = writeln!(
        m,
        "Real chains opened with `Disk::open` vs the simulation of the same ownership \
         (`Index::memory_bytes`, which counts vector capacity; *formula*: 4 B per \
         64 KiB chunk + 16 B per mixed chunk, without the slab vector's doubling \
         slack):\n"
    );
    m += &real_table(f).to_string();
    m
}

/// The new image against qcow2's, the simulated indexes against a flat
/// table of one owner byte per block.
fn footprint_table(f: &FootprintReport) -> Table {
    let mut table = Table::new([
        ("figure", Left),
        ("this format", Right),
        ("baseline", Right),
        ("ratio", Right),
        ("goal", Left),
    ]);
    table.row([
        format!("new {} image, bytes on disk", fmt_bytes(f.new_image_size)),
        fmt_bytes(f.new_image_bytes_on_disk),
        f.qcow2_bytes_on_disk
            .map(|q| format!("{} (qcow2, `qemu-img create`)", fmt_bytes(q)))
            .unwrap_or_else(|| "—".to_string()),
        Ratio::of(
            f.new_image_bytes_on_disk as f64,
            f.qcow2_bytes_on_disk.map(|q| q as f64),
        )
        .cell(3),
        format!(
            "< {}: {}",
            fmt_bytes(FOOTPRINT_GOAL),
            met(f.new_image_bytes_on_disk < FOOTPRINT_GOAL)
        ),
    ]);
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
        table.row([
            format!(
                "index memory, {} depth {}, {} (simulated; {} mixed chunks; formula {})",
                fmt_bytes(x.virtual_size),
                x.depth,
                x.pattern,
                x.mixed_chunks,
                fmt_bytes(x.formula_bytes),
            ),
            fmt_bytes(x.memory_bytes as u64),
            format!("{} (owner byte per block)", fmt_bytes(x.flat_table_bytes)),
            Ratio::of(x.memory_bytes as f64, x.flat_table_bytes as f64).cell(3),
            goal,
        ]);
    }
    table
}

/// Each real chain's index against its simulation, and per GiB against
/// the simulated `SIM_SIZE` chain's.
fn real_table(f: &FootprintReport) -> Table {
    let mut table = Table::new([
        ("chain".to_string(), Left),
        ("real index".into(), Right),
        ("simulated, same size".into(), Right),
        ("real/sim".into(), Right),
        ("real per GiB".into(), Right),
        (format!("simulated {} per GiB", fmt_bytes(SIM_SIZE)), Right),
        (
            format!("formula per GiB, real / {}", fmt_bytes(SIM_SIZE)),
            Right,
        ),
    ]);
    let per_gib = |bytes: u64, size: u64| fmt_bytes(bytes * GIB / size);
    for x in &f.real {
        let sim100 = f.simulated.iter().find(|s| s.pattern == x.pattern);
        table.row([
            format!(
                "{} depth {}, {}",
                fmt_bytes(x.real.virtual_size),
                x.real.depth,
                x.pattern
            ),
            format!(
                "{} ({} mixed)",
                fmt_bytes(x.real.memory_bytes as u64),
                x.real.mixed_chunks
            ),
            format!(
                "{} ({} mixed)",
                fmt_bytes(x.simulated.memory_bytes as u64),
                x.simulated.mixed_chunks
            ),
            Ratio::of(x.real.memory_bytes as f64, x.simulated.memory_bytes as f64).cell(3),
            per_gib(x.real.memory_bytes as u64, x.real.virtual_size),
            sim100
                .map(|s| per_gib(s.memory_bytes as u64, s.virtual_size))
                .unwrap_or_else(|| "—".to_string()),
            format!(
                "{} / {}",
                per_gib(x.real.formula_bytes, x.real.virtual_size),
                sim100
                    .map(|s| per_gib(s.formula_bytes, s.virtual_size))
                    .unwrap_or_else(|| "—".to_string())
            ),
        ]);
    }
    table
}
