//! One read pattern timed three ways (chain, raw file, layer preads).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use anyhow::{anyhow, Result};
use bench::stats::{spread, Spread};
use bench::table::Ratio;
use image_format::{Disk, Storage};
use serde::Serialize;

use crate::chain::RUN;
use crate::clock::{mb_s, seconds, REPS};
use crate::KIB;

/// The size of each sequential read.
pub const SEQ_READ: u64 = 128 * KIB;
/// The size of each random read.
pub const RANDOM_READ: u64 = 4 * KIB;

/// One read pattern timed three ways, alternately, so that drift (a
/// neighbour's build, the page cache) hits every side alike: through the
/// library, on the raw file, and as the same `pread`s on the layer files
/// issued without the library (ownership computed from the pattern). The
/// third side splits chain/raw into the library's own cost (chain/preads)
/// and the cost of the data living in many files (preads/raw).
#[derive(Debug, Serialize)]
pub struct ReadFigure {
    bytes_per_run: u64,
    chain_mb_s: Vec<f64>,
    raw_mb_s: Vec<f64>,
    preads_mb_s: Vec<f64>,
    pub chain: Spread,
    pub raw: Spread,
    pub preads: Spread,
    /// Per run: chain / raw and chain / preads (none when a run had no
    /// ratio, see `bench::table`).
    pub chain_vs_raw: Option<Spread>,
    pub chain_vs_preads: Option<Spread>,
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

/// The three sides timed, with their spreads and per-run ratios.
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
    let ratio = |a: &[f64], b: &[f64]| Ratio::per_run(a, b).map(|v| spread(&v)).transpose();
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
pub fn time_reads(
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
