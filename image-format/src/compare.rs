//! `img compare` and `img measure`, as qemu-img's: whether two virtual
//! disks (any of the formats `convert` reads) hold the same bytes, and
//! what a snap image of a disk's contents would take.

use crate::convert::ImageReader;
use crate::error::Result;
use crate::header::layout;

/// Bytes compared at a time.
const CHUNK: u64 = 1 << 20;

/// What `compare` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// The first byte that differs (past the smaller disk's end: one that
    /// is not zero in the larger).
    ContentMismatch {
        offset: u64,
    },
    /// `strict` and the sizes differ.
    SizeMismatch {
        a: u64,
        b: u64,
    },
}

/// Compares `a` and `b` byte for byte over the smaller's size; past it,
/// the larger must read as zeros (or, with `strict`, the sizes must be
/// equal). Ranges where neither holds data are not read. `progress`
/// gets (bytes done, bytes in all).
pub fn compare(
    a: &mut dyn ImageReader,
    b: &mut dyn ImageReader,
    strict: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<Comparison> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if strict && size_a != size_b {
        return Ok(Comparison::SizeMismatch {
            a: size_a,
            b: size_b,
        });
    }
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < common {
        let len = CHUNK.min(common - off);
        if !a.data_ranges(off, len)?.is_empty() || !b.data_ranges(off, len)?.is_empty() {
            let (x, y) = (&mut buf_a[..len as usize], &mut buf_b[..len as usize]);
            a.read_at(x, off)?;
            b.read_at(y, off)?;
            if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
                return Ok(Comparison::ContentMismatch {
                    offset: off + i as u64,
                });
            }
        }
        off += len;
        progress(off, total);
    }
    // The larger one's tail must read as zeros.
    let larger: &mut dyn ImageReader = if size_a > size_b { a } else { b };
    while off < total {
        let len = CHUNK.min(total - off);
        if !larger.data_ranges(off, len)?.is_empty() {
            let x = &mut buf_a[..len as usize];
            larger.read_at(x, off)?;
            if let Some(i) = x.iter().position(|&p| p != 0) {
                return Ok(Comparison::ContentMismatch {
                    offset: off + i as u64,
                });
            }
        }
        off += len;
        progress(off, total);
    }
    Ok(Comparison::Identical)
}

/// What a snap image would take: `required` for the data the source holds
/// (its data ranges, whole blocks), `fully_allocated` with every block
/// written. With no source, an empty image of `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Measure {
    pub required: u64,
    pub fully_allocated: u64,
}

pub fn measure(
    source: Option<&mut dyn ImageReader>,
    size: u64,
    block_size: u32,
) -> Result<Measure> {
    let bs = u64::from(block_size);
    let size = source.as_ref().map_or(size, |s| s.virtual_size());
    let (_, data_offset) = layout(size, block_size);
    let fully_allocated = data_offset + size.div_ceil(bs) * bs;
    let Some(src) = source else {
        return Ok(Measure {
            required: data_offset,
            fully_allocated,
        });
    };
    // Blocks touched by a data range, each counted once.
    let mut blocks = 0u64;
    let mut last_block: Option<u64> = None;
    let mut off = 0;
    while off < size {
        let len = (64 * CHUNK).min(size - off);
        for (start, n) in src.data_ranges(off, len)? {
            let (first, end) = (start / bs, (start + n).div_ceil(bs));
            let first = match last_block {
                Some(l) if l >= first => l + 1,
                _ => first,
            };
            if end > first {
                blocks += end - first;
                last_block = Some(end - 1);
            }
        }
        off += len;
    }
    Ok(Measure {
        required: data_offset + blocks * bs,
        fully_allocated,
    })
}
