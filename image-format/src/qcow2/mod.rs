//! qcow2 (versions 2 and 3) reading and writing for `img convert`.
//!
//! The reader opens a qcow2 image read-only together with its backing chain (qcow2 or raw
//! backing files) and serves guest reads plus an allocation map ([`Qcow2Reader::extents`]).
//! Everything read from a file is validated before use so that a damaged or hostile image
//! yields [`Qcow2Error::Corrupt`] instead of a panic or a huge allocation.
//!
//! Not supported (refused with [`Qcow2Error::Unsupported`]): compressed clusters (there is no
//! zlib/zstd decoder here), encryption, external data files, extended L2 entries
//! (subclusters), unknown incompatible feature bits. Internal snapshots are ignored: only the
//! active L1 table is read.
//!
//! The writer produces a standalone qcow2 v3 image (16-bit refcounts, no backing file, no
//! header extensions). Data clusters are appended to the file as guest writes arrive; all
//! metadata (L2 tables, L1 table, refcount blocks and table, header) is written by
//! [`Qcow2Writer::finish`]. Until then cluster 0 is all zeros, so an interrupted conversion
//! never leaves a file that looks like a valid qcow2 image.
//!
//! On-disk format reference: `docs/interop/qcow2.txt` in the QEMU source tree.
//!
//! `reader` (an image and its backing chain, read), `writer` (a new image,
//! written), `tests` (both against QEMU's own tools); the format's
//! constants and the helpers both use are here.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Errors from reading or writing qcow2 images. Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a qcow2 image (wrong magic)")]
    NotQcow2 { path: PathBuf },
    #[error("{path}: unsupported qcow2 feature: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: corrupt qcow2 image: {what}")]
    Corrupt { path: PathBuf, what: String },
    /// A read or write reaches past the virtual disk size.
    #[error("{path}: range at offset {offset} with length {len} goes past the end of the {size}-byte virtual disk")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A caller-supplied parameter (cluster size, virtual size) cannot be used.
    #[error("{path}: invalid argument: {what}")]
    InvalidArgument { path: PathBuf, what: String },
}

/// What a guest range holds in the qcow2 chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Extent {
    /// Some layer of the chain has a data cluster there.
    Data,
    /// Reads as zeros: unallocated with no backing, zero flag, or past the backing file's end.
    Zero,
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Cluster sizes from 512 bytes to 2 MiB, the range QEMU accepts.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
const V2_HEADER_LENGTH: u64 = 72;
const V3_HEADER_LENGTH: u64 = 104;
/// Same cap as QEMU's QCOW_MAX_L1_SIZE; bounds the memory a hostile header can make us use.
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU refuses longer backing file names.
const MAX_BACKING_NAME: u64 = 1023;
/// Longest backing chain followed (not counting the opened image itself).
const MAX_BACKING_DEPTH: usize = 64;
/// Upper bound on the memory used by the per-image L2 table cache.
const L2_CACHE_BYTES: u64 = 8 << 20;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

/// L1 and L2 entries: "refcount is exactly one" flag.
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entries: compressed cluster descriptor.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entries: cluster reads as zeros.
const OFLAG_ZERO: u64 = 1;
/// Host offset bits 9..=55 of L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Refcount width written by [`Qcow2Writer`]: 2^4 = 16 bits.
const WRITER_REFCOUNT_ORDER: u32 = 4;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Qcow2Error + '_ {
    move |source| Qcow2Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn be_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_be_bytes(b)
}

/// Like `read_exact_at`, but bytes past the end of the file read as zeros (as QEMU does for a
/// last data cluster that is only partly present in the file).
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether `[offset, offset + len)` lies within `[0, limit)`, without overflowing.
fn fits(offset: u64, len: u64, limit: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= limit)
}

fn is_zero(buf: &[u8]) -> bool {
    // OR-folding a block has no early exit, so it vectorizes; blocks keep the early exit cheap.
    buf.chunks(512)
        .all(|block| block.iter().fold(0, |acc, &b| acc | b) == 0)
}

mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use reader::Qcow2Reader;
pub use writer::Qcow2Writer;
