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

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// Where a backing file reference in a qcow2 header points.
struct BackingRef {
    path: PathBuf,
    format: Option<String>,
}

/// How one guest cluster (or a run of them) of a single qcow2 layer is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Stored in this file at the given host offset.
    Data(u64),
    /// Reads as zeros (zero flag).
    Zero,
    /// Not allocated in this layer: defer to the backing file.
    Unallocated,
}

/// One qcow2 file of a chain.
struct Qcow2Image {
    path: PathBuf,
    file: File,
    file_size: u64,
    cluster_bits: u32,
    virtual_size: u64,
    l1: Vec<u64>,
    /// L2 tables by host offset. Cleared wholesale when full: conversions read sequentially,
    /// so anything smarter buys little.
    l2_cache: HashMap<u64, Box<[u64]>>,
    l2_cache_max: usize,
}

impl Qcow2Image {
    fn corrupt(&self, what: String) -> Qcow2Error {
        Qcow2Error::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Opens and validates one qcow2 file; returns it and its backing file reference.
    fn open(path: &Path) -> Result<(Self, Option<BackingRef>), Qcow2Error> {
        let corrupt = |what: String| Qcow2Error::Corrupt {
            path: path.to_owned(),
            what,
        };
        let unsupported = |what: String| Qcow2Error::Unsupported {
            path: path.to_owned(),
            what,
        };

        let file = File::open(path).map_err(io_err(path))?;
        let file_size = file.metadata().map_err(io_err(path))?.len();

        let mut magic = [0u8; 4];
        if file_size < 4 {
            return Err(Qcow2Error::NotQcow2 {
                path: path.to_owned(),
            });
        }
        file.read_exact_at(&mut magic, 0).map_err(io_err(path))?;
        if magic != QCOW2_MAGIC {
            return Err(Qcow2Error::NotQcow2 {
                path: path.to_owned(),
            });
        }
        if file_size < V2_HEADER_LENGTH {
            return Err(corrupt(format!(
                "file is truncated inside the header ({file_size} bytes)"
            )));
        }

        let mut hdr = [0u8; V3_HEADER_LENGTH as usize];
        let hdr_len = file_size.min(V3_HEADER_LENGTH) as usize;
        file.read_exact_at(&mut hdr[..hdr_len], 0)
            .map_err(io_err(path))?;

        let version = be_u32(&hdr, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("version {version}")));
        }
        if version == 3 && file_size < V3_HEADER_LENGTH {
            return Err(corrupt(format!(
                "file is truncated inside the header ({file_size} bytes)"
            )));
        }
        let backing_file_offset = be_u64(&hdr, 8);
        let backing_file_size = u64::from(be_u32(&hdr, 16));
        let cluster_bits = be_u32(&hdr, 20);
        let virtual_size = be_u64(&hdr, 24);
        let crypt_method = be_u32(&hdr, 32);
        let l1_size = u64::from(be_u32(&hdr, 36));
        let l1_table_offset = be_u64(&hdr, 40);
        let (incompatible, header_length) = if version == 3 {
            (be_u64(&hdr, 72), u64::from(be_u32(&hdr, 100)))
        } else {
            (0, V2_HEADER_LENGTH)
        };

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "invalid cluster_bits {cluster_bits} (must be {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if header_length
            < if version == 3 {
                V3_HEADER_LENGTH
            } else {
                V2_HEADER_LENGTH
            }
        {
            return Err(corrupt(format!(
                "header_length {header_length} is too small"
            )));
        }
        if header_length > cluster_size {
            return Err(corrupt(format!(
                "header_length {header_length} exceeds the cluster size"
            )));
        }

        // Incompatible features. The dirty bit only means refcounts may be stale (lazy
        // refcounts); the reader never uses refcounts, so such an image reads fine.
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "the image is marked corrupt (incompatible feature bit 1); \
                 repair it with `qemu-img check -r all`"
                    .into(),
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "external data file (incompatible feature bit 2)".into(),
            ));
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(unsupported(
                "extended L2 entries / subclusters (incompatible feature bit 4)".into(),
            ));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        // Bit 3 (compression type) is accepted: compressed clusters are refused when met.
        if crypt_method != 0 {
            return Err(unsupported(format!(
                "encryption (crypt_method {crypt_method})"
            )));
        }

        // Header extensions and the backing file name live in the first cluster.
        let first_len = file_size.min(cluster_size) as usize;
        let mut first = vec![0u8; first_len];
        file.read_exact_at(&mut first, 0).map_err(io_err(path))?;

        // Like QEMU: extensions end where the backing file name starts, if there is one.
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cluster_size
        };
        let backing_format = parse_extensions(&first, header_length, ext_end.min(first_len as u64))
            .map_err(|d| corrupt(d.to_string()))?;

        let backing = if backing_file_offset != 0 && backing_file_size != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name is {backing_file_size} bytes long (at most {MAX_BACKING_NAME})"
                )));
            }
            let name_end = backing_file_offset
                .checked_add(backing_file_size)
                .filter(|&end| end <= first_len as u64)
                .ok_or_else(|| {
                    corrupt(format!(
                        "backing file name at offset {backing_file_offset:#x} lies outside the first cluster"
                    ))
                })?;
            let name = &first[backing_file_offset as usize..name_end as usize];
            if name.starts_with(b"json:") {
                return Err(unsupported(
                    "backing file given as a json: specification".into(),
                ));
            }
            let name = Path::new(OsStr::from_bytes(name));
            // A relative backing file name is relative to the directory of this image.
            let resolved = match path.parent() {
                Some(dir) if name.is_relative() => dir.join(name),
                _ => name.to_owned(),
            };
            Some(BackingRef {
                path: resolved,
                format: backing_format,
            })
        } else {
            None
        };

        // The L1 table must cover the whole virtual disk and lie inside the file.
        let l2_entries = cluster_size / 8;
        let l2_coverage = cluster_size * l2_entries; // at most 2^39
        let l1_needed = virtual_size.div_ceil(l2_coverage);
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table has {l1_size} entries, more than the {} allowed",
                MAX_L1_BYTES / 8
            )));
        }
        if l1_size < l1_needed {
            return Err(corrupt(format!(
                "L1 table has {l1_size} entries but the {virtual_size}-byte virtual size needs {l1_needed}"
            )));
        }
        let mut l1 = Vec::new();
        if l1_size > 0 {
            if l1_table_offset & (cluster_size - 1) != 0 {
                return Err(corrupt(format!(
                    "L1 table offset {l1_table_offset:#x} is not cluster aligned"
                )));
            }
            if !fits(l1_table_offset, l1_bytes, file_size) {
                return Err(corrupt(format!(
                    "L1 table at offset {l1_table_offset:#x} ({l1_bytes} bytes) extends past the end \
                     of the file ({file_size} bytes)"
                )));
            }
            let mut raw = vec![0u8; l1_bytes as usize];
            file.read_exact_at(&mut raw, l1_table_offset)
                .map_err(io_err(path))?;
            l1 = raw
                .chunks_exact(8)
                .map(|c| be_u64(c, 0))
                .collect::<Vec<u64>>();
            check_l2_offsets(&l1, cluster_size, file_size).map_err(|d| corrupt(d.to_string()))?;
        }

        let image = Qcow2Image {
            path: path.to_owned(),
            file,
            file_size,
            cluster_bits,
            virtual_size,
            l1,
            l2_cache: HashMap::new(),
            l2_cache_max: (L2_CACHE_BYTES / cluster_size).max(4) as usize,
        };
        Ok((image, backing))
    }

    /// Returns entry `l2_index` of the L2 table at host offset `l2_offset`, reading the table
    /// into the cache if needed.
    fn l2_entry(
        &mut self,
        l2_offset: u64,
        l1_index: usize,
        l2_index: usize,
    ) -> Result<u64, Qcow2Error> {
        if let Some(table) = self.l2_cache.get(&l2_offset) {
            return Ok(table[l2_index]);
        }
        let cs = self.cluster_size();
        if l2_offset & (cs - 1) != 0 {
            return Err(self.corrupt(format!(
                "L2 table offset {l2_offset:#x} (L1 index {l1_index}) is not cluster aligned"
            )));
        }
        if !fits(l2_offset, cs, self.file_size) {
            return Err(self.corrupt(format!(
                "L2 table at offset {l2_offset:#x} (L1 index {l1_index}) extends past the end \
                 of the file ({} bytes)",
                self.file_size
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file
            .read_exact_at(&mut raw, l2_offset)
            .map_err(io_err(&self.path))?;
        let table: Box<[u64]> = raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
        let entry = table[l2_index];
        if self.l2_cache.len() >= self.l2_cache_max {
            self.l2_cache.clear();
        }
        self.l2_cache.insert(l2_offset, table);
        Ok(entry)
    }

    /// Maps the guest cluster containing `guest`. Also returns how many bytes from the start
    /// of that cluster are known to share the mapping kind (more than one cluster when a whole
    /// L2 table is missing), so sparse regions are skipped quickly.
    fn map_cluster(&mut self, guest: u64) -> Result<(Mapping, u64), Qcow2Error> {
        let cs = self.cluster_size();
        let l2_bits = self.cluster_bits - 3;
        let l2_entries = 1u64 << l2_bits;
        let l1_index = (guest >> (self.cluster_bits + l2_bits)) as usize;
        let l2_index = ((guest >> self.cluster_bits) & (l2_entries - 1)) as usize;

        // Guest offsets are below the virtual size and `open` checked that L1 covers it.
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Err(self.corrupt(format!(
                "guest offset {guest:#x} is not covered by the L1 table"
            )));
        };
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Mapping::Unallocated, (l2_entries - l2_index as u64) * cs));
        }
        let entry = self.l2_entry(l2_offset, l1_index, l2_index)?;

        let cluster_start = guest & !(cs - 1);
        if entry & OFLAG_COMPRESSED != 0 {
            return Err(Qcow2Error::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "compressed cluster at guest offset {cluster_start} ({cluster_start:#x}); \
                     compressed images cannot be read, decompress with `qemu-img convert -O qcow2`"
                ),
            });
        }
        // The zero flag wins even when a host cluster is preallocated behind it.
        if entry & OFLAG_ZERO != 0 {
            return Ok((Mapping::Zero, cs));
        }
        let host = entry & OFFSET_MASK;
        if host == 0 {
            return Ok((Mapping::Unallocated, cs));
        }
        if host & (cs - 1) != 0 {
            return Err(self.corrupt(format!(
                "data cluster offset {host:#x} for guest offset {cluster_start:#x} is not cluster aligned"
            )));
        }
        // A partly present last cluster is fine (its tail reads as zeros); one starting at or
        // past the end of the file is not.
        if host >= self.file_size {
            return Err(self.corrupt(format!(
                "data cluster at offset {host:#x} for guest offset {cluster_start:#x} lies past \
                 the end of the file ({} bytes)",
                self.file_size
            )));
        }
        Ok((Mapping::Data(host), cs))
    }

    /// Maps the longest run starting at `guest` (at most `max_len` bytes) with a uniform
    /// mapping: physically contiguous data, zeros, or unallocated. For data the returned host
    /// offset corresponds to `guest` itself.
    fn map_run(&mut self, guest: u64, max_len: u64) -> Result<(Mapping, u64), Qcow2Error> {
        let cs = self.cluster_size();
        let within = guest & (cs - 1);
        let (first, span) = self.map_cluster(guest)?;
        let first = match first {
            Mapping::Data(host) => Mapping::Data(host + within),
            other => other,
        };
        let mut len = (span - within).min(max_len);
        while len < max_len {
            let (next, span) = self.map_cluster(guest + len)?;
            let contiguous = match (first, next) {
                (Mapping::Data(h0), Mapping::Data(h)) => h == h0 + len,
                (a, b) => a == b,
            };
            if !contiguous {
                break;
            }
            len += span.min(max_len - len);
        }
        Ok((first, len))
    }
}

/// What a structure check found wrong (reported as the image's corruption).
#[derive(Debug, thiserror::Error)]
enum Damage {
    #[error("L2 table offset {offset:#x} (L1 index {index}) is not cluster aligned")]
    UnalignedL2 { offset: u64, index: usize },
    #[error(
        "L2 table at offset {offset:#x} (L1 index {index}) extends past the end of the file \
         ({file_size} bytes)"
    )]
    L2PastEnd {
        offset: u64,
        index: usize,
        file_size: u64,
    },
    #[error("L2 table at offset {0:#x} is used by several L1 entries")]
    SharedL2(u64),
    #[error(
        "header extension {kind:#x} at offset {offset:#x} ({len} bytes) overflows the header area"
    )]
    ExtensionOverflow { kind: u32, offset: u64, len: u64 },
}

/// Checks the L2 table offsets of an L1 table: cluster aligned, inside the file, and no table
/// used twice. The last rule bounds the work a hostile image can cause to its size: without
/// it, millions of L1 entries could point at one crafted L2 table.
fn check_l2_offsets(l1: &[u64], cluster_size: u64, file_size: u64) -> Result<(), Damage> {
    let mut offsets = Vec::new();
    for (index, entry) in l1.iter().enumerate() {
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            continue;
        }
        if offset & (cluster_size - 1) != 0 {
            return Err(Damage::UnalignedL2 { offset, index });
        }
        if !fits(offset, cluster_size, file_size) {
            return Err(Damage::L2PastEnd {
                offset,
                index,
                file_size,
            });
        }
        offsets.push(offset);
    }
    offsets.sort_unstable();
    if let Some(pair) = offsets.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(Damage::SharedL2(pair[0]));
    }
    Ok(())
}

/// Parses header extensions in `first[start..end]`; returns the backing format, if any.
/// Unknown extensions are skipped.
fn parse_extensions(first: &[u8], start: u64, end: u64) -> Result<Option<String>, Damage> {
    let mut format = None;
    let mut off = start;
    while off + 8 <= end {
        let at = off as usize;
        let kind = be_u32(first, at);
        let len = u64::from(be_u32(first, at + 4));
        if kind == EXT_END {
            break;
        }
        let data_start = off + 8;
        let data_end = data_start + len;
        if data_end > end {
            return Err(Damage::ExtensionOverflow {
                kind,
                offset: off,
                len,
            });
        }
        if kind == EXT_BACKING_FORMAT {
            let data = &first[data_start as usize..data_end as usize];
            let name = data.split(|&b| b == 0).next().unwrap_or_default();
            format = Some(String::from_utf8_lossy(name).into_owned());
        }
        // Extension data is padded to a multiple of 8 bytes.
        off = data_start + len.next_multiple_of(8);
    }
    Ok(format)
}

/// A raw backing file: its bytes are the guest bytes.
struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
}

enum Layer {
    Qcow2(Qcow2Image),
    Raw(RawImage),
}

impl Layer {
    fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(img) => img.virtual_size,
            Layer::Raw(raw) => raw.size,
        }
    }

    fn path(&self) -> &Path {
        match self {
            Layer::Qcow2(img) => &img.path,
            Layer::Raw(raw) => &raw.path,
        }
    }
}

/// Reads `buf.len()` guest bytes at `offset` from `layers[0]`, falling through to
/// `layers[1..]` for unallocated clusters. The caller keeps the range inside `layers[0]`.
fn read_layers(layers: &mut [Layer], buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
    let Some((layer, backing)) = layers.split_first_mut() else {
        buf.fill(0);
        return Ok(());
    };
    match layer {
        Layer::Raw(raw) => read_full_at(&raw.file, buf, offset).map_err(io_err(&raw.path)),
        Layer::Qcow2(img) => {
            let mut pos = 0;
            while pos < buf.len() {
                let guest = offset + pos as u64;
                let (mapping, len) = img.map_run(guest, (buf.len() - pos) as u64)?;
                let chunk = &mut buf[pos..pos + len as usize];
                match mapping {
                    Mapping::Data(host) => {
                        read_full_at(&img.file, chunk, host).map_err(io_err(&img.path))?
                    }
                    Mapping::Zero => chunk.fill(0),
                    Mapping::Unallocated => read_backing(backing, chunk, guest)?,
                }
                pos += len as usize;
            }
            Ok(())
        }
    }
}

/// Reads from a backing chain (possibly empty); bytes past its virtual size read as zeros.
fn read_backing(backing: &mut [Layer], buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
    let avail = match backing.first() {
        Some(layer) => layer
            .virtual_size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize,
        None => 0,
    };
    let (inside, past_end) = buf.split_at_mut(avail);
    if !inside.is_empty() {
        read_layers(backing, inside, offset)?;
    }
    past_end.fill(0);
    Ok(())
}

/// Appends a run to `out`, merging it with the previous one when adjacent and of the same kind.
fn push_extent(out: &mut Vec<(u64, u64, Qcow2Extent)>, start: u64, len: u64, kind: Qcow2Extent) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.2 == kind && last.0 + last.1 == start {
            last.1 += len;
            return;
        }
    }
    out.push((start, len, kind));
}

/// Appends the extents of `[offset, offset + len)` of `layers[0]` (with its backing chain).
fn layer_extents(
    layers: &mut [Layer],
    offset: u64,
    len: u64,
    out: &mut Vec<(u64, u64, Qcow2Extent)>,
) -> Result<(), Qcow2Error> {
    let Some((layer, backing)) = layers.split_first_mut() else {
        push_extent(out, offset, len, Qcow2Extent::Zero);
        return Ok(());
    };
    let img = match layer {
        // Raw files are reported as data throughout: holes are not worth probing for here.
        Layer::Raw(_) => {
            push_extent(out, offset, len, Qcow2Extent::Data);
            return Ok(());
        }
        Layer::Qcow2(img) => img,
    };
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let (mapping, run) = img.map_run(pos, end - pos)?;
        match mapping {
            Mapping::Data(_) => push_extent(out, pos, run, Qcow2Extent::Data),
            Mapping::Zero => push_extent(out, pos, run, Qcow2Extent::Zero),
            Mapping::Unallocated => {
                let avail = match backing.first() {
                    Some(b) => b.virtual_size().saturating_sub(pos).min(run),
                    None => 0,
                };
                if avail > 0 {
                    layer_extents(backing, pos, avail, out)?;
                }
                push_extent(out, pos + avail, run - avail, Qcow2Extent::Zero);
            }
        }
        pos += run;
    }
    Ok(())
}

/// Read-only access to a qcow2 image and its backing chain.
pub struct Qcow2Reader {
    /// `layers[0]` is the opened image; `layers[i + 1]` is the backing file of `layers[i]`.
    layers: Vec<Layer>,
    virtual_size: u64,
    cluster_size: u64,
}

impl fmt::Debug for Qcow2Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Reader")
            .field(
                "chain",
                &self.layers.iter().map(Layer::path).collect::<Vec<_>>(),
            )
            .field("virtual_size", &self.virtual_size)
            .field("cluster_size", &self.cluster_size)
            .finish()
    }
}

impl Qcow2Reader {
    /// Opens a qcow2 file read-only, following its backing file (relative to the file's directory;
    /// a backing file that is qcow2 or raw; backing_fmt honoured if present, else probe by magic).
    /// Detects backing cycles and limits the chain to 64 backing files.
    pub fn open(path: &Path) -> Result<Self, Qcow2Error> {
        let (top, mut next) = Qcow2Image::open(path)?;
        let virtual_size = top.virtual_size;
        let cluster_size = top.cluster_size();
        let mut seen = HashSet::new();
        seen.insert(fs::canonicalize(path).map_err(io_err(path))?);
        let mut layers = vec![Layer::Qcow2(top)];

        while let Some(backing) = next.take() {
            let referrer = layers.last().map_or(path, Layer::path).to_owned();
            if layers.len() > MAX_BACKING_DEPTH {
                return Err(Qcow2Error::Unsupported {
                    path: path.to_owned(),
                    what: format!("backing chain longer than {MAX_BACKING_DEPTH} files"),
                });
            }
            let canonical = fs::canonicalize(&backing.path).map_err(io_err(&backing.path))?;
            if !seen.insert(canonical) {
                return Err(Qcow2Error::Corrupt {
                    path: referrer,
                    what: format!("backing chain loops back to {}", backing.path.display()),
                });
            }
            let is_qcow2 = match backing.format.as_deref() {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(other) => {
                    return Err(Qcow2Error::Unsupported {
                        path: referrer,
                        what: format!(
                            "backing file format {other:?} (only qcow2 and raw are supported)"
                        ),
                    })
                }
                None => probe_qcow2(&backing.path)?,
            };
            if is_qcow2 {
                let (image, further) = Qcow2Image::open(&backing.path)?;
                layers.push(Layer::Qcow2(image));
                next = further;
            } else {
                let file = File::open(&backing.path).map_err(io_err(&backing.path))?;
                let size = file.metadata().map_err(io_err(&backing.path))?.len();
                layers.push(Layer::Raw(RawImage {
                    path: backing.path,
                    file,
                    size,
                }));
            }
        }
        Ok(Qcow2Reader {
            layers,
            virtual_size,
            cluster_size,
        })
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Cluster size of the opened (top) image.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        if !fits(offset, len, self.virtual_size) {
            return Err(Qcow2Error::OutOfRange {
                path: self.layers[0].path().to_owned(),
                offset,
                len,
                size: self.virtual_size,
            });
        }
        Ok(())
    }

    /// Fills `buf` with guest bytes at `offset` (any alignment). Past the end: error.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
        self.check_range(offset, buf.len() as u64)?;
        read_layers(&mut self.layers, buf, offset)
    }

    /// Describes [offset, offset+len) as consecutive runs (start, len, kind), merged where
    /// adjacent runs have the same kind. Data = some layer of the chain has a data cluster
    /// there (a raw backing file counts as data throughout); Zero otherwise.
    pub fn extents(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, Qcow2Extent)>, Qcow2Error> {
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        layer_extents(&mut self.layers, offset, len, &mut out)?;
        Ok(out)
    }
}

/// Probes a backing file without a recorded format: qcow2 if it has the magic, raw otherwise.
fn probe_qcow2(path: &Path) -> Result<bool, Qcow2Error> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    read_full_at(&file, &mut magic, 0).map_err(io_err(path))?;
    Ok(magic == QCOW2_MAGIC)
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Creates a standalone qcow2 v3 image.
///
/// Layout: cluster 0 holds the header; data clusters follow in allocation order; `finish`
/// then appends the L2 tables, the L1 table, the refcount blocks and the refcount table.
/// Nothing is ever freed, so every cluster up to the end of the file has refcount 1.
pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    virtual_size: u64,
    cluster_bits: u32,
    /// One slot per L1 entry. An L2 table maps guest clusters to host offsets (0 = unallocated).
    l2_tables: Vec<Option<Box<[u64]>>>,
    /// Host offset of the next cluster to allocate.
    next_host: u64,
}

impl fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("cluster_size", &(1u64 << self.cluster_bits))
            .field("next_host", &self.next_host)
            .finish()
    }
}

impl Qcow2Writer {
    /// Creates (or truncates) `path` as a qcow2 v3 image without backing file.
    ///
    /// `cluster_size` must be a power of two in 512..=2 MiB (65536 is QEMU's default) and
    /// `virtual_size` a multiple of 512 (QEMU refuses other sizes).
    pub fn create(path: &Path, virtual_size: u64, cluster_size: u32) -> Result<Self, Qcow2Error> {
        let invalid = |what: String| Qcow2Error::InvalidArgument {
            path: path.to_owned(),
            what,
        };
        let cs = u64::from(cluster_size);
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_size.trailing_zeros())
        {
            return Err(invalid(format!(
                "cluster size {cluster_size} is not a power of two between 512 and 2 MiB"
            )));
        }
        if virtual_size & 511 != 0 {
            return Err(invalid(format!(
                "virtual size {virtual_size} is not a multiple of 512"
            )));
        }
        let l1_size = virtual_size.div_ceil(cs * (cs / 8));
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(invalid(format!(
                "virtual size {virtual_size} is too large for {cluster_size}-byte clusters"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        // Reserve cluster 0 for the header, written last.
        file.set_len(cs).map_err(io_err(path))?;
        Ok(Qcow2Writer {
            path: path.to_owned(),
            file,
            virtual_size,
            cluster_bits: cluster_size.trailing_zeros(),
            l2_tables: vec![None; l1_size as usize],
            next_host: cs,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// (L1 index, L2 index) of the guest cluster containing `guest`.
    fn indices(&self, guest: u64) -> (usize, usize) {
        let l2_bits = self.cluster_bits - 3;
        let l1 = guest >> (self.cluster_bits + l2_bits);
        let l2 = (guest >> self.cluster_bits) & ((1 << l2_bits) - 1);
        (l1 as usize, l2 as usize)
    }

    fn host_cluster(&self, guest: u64) -> Option<u64> {
        let (l1, l2) = self.indices(guest);
        self.l2_tables[l1]
            .as_ref()
            .map(|t| t[l2])
            .filter(|&h| h != 0)
    }

    /// Assigns a new host cluster (at the end of the file) to the guest cluster of `guest`.
    /// The cluster reads as zeros until written: it lies past the current end of the file.
    fn allocate(&mut self, guest: u64) -> Result<u64, Qcow2Error> {
        let cs = self.cluster_size();
        let host = self.next_host;
        if host + cs > OFFSET_MASK {
            return Err(Qcow2Error::InvalidArgument {
                path: self.path.clone(),
                what: "image grows past the largest host offset qcow2 can address".into(),
            });
        }
        let entries = (cs / 8) as usize;
        let (l1, l2) = self.indices(guest);
        self.l2_tables[l1].get_or_insert_with(|| vec![0u64; entries].into_boxed_slice())[l2] = host;
        self.next_host += cs;
        Ok(host)
    }

    /// Writes guest data at any offset/length (random order, partial clusters, overwrites).
    /// A newly allocated cluster starts as zeros; all-zero data for an unallocated cluster
    /// allocates nothing.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), Qcow2Error> {
        let len = buf.len() as u64;
        if !fits(offset, len, self.virtual_size) {
            return Err(Qcow2Error::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.virtual_size,
            });
        }
        let cs = self.cluster_size();
        // Pieces going to consecutive host offsets are gathered into one write:
        // (host offset, start in buf, length).
        let mut pending: Option<(u64, usize, usize)> = None;
        let mut pos = 0;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let within = guest & (cs - 1);
            let n = (cs - within).min((buf.len() - pos) as u64) as usize;
            let chunk = &buf[pos..pos + n];
            let host = match self.host_cluster(guest) {
                Some(host) => Some(host + within),
                None if is_zero(chunk) => None,
                None => Some(self.allocate(guest)? + within),
            };
            match host {
                Some(host) => match pending.as_mut() {
                    Some((start, _, plen)) if *start + *plen as u64 == host => *plen += n,
                    _ => {
                        if let Some(p) = pending.replace((host, pos, n)) {
                            self.write_piece(buf, p)?;
                        }
                    }
                },
                None => {
                    if let Some(p) = pending.take() {
                        self.write_piece(buf, p)?;
                    }
                }
            }
            pos += n;
        }
        if let Some(p) = pending {
            self.write_piece(buf, p)?;
        }
        Ok(())
    }

    fn write_piece(
        &self,
        buf: &[u8],
        (host, start, len): (u64, usize, usize),
    ) -> Result<(), Qcow2Error> {
        self.file
            .write_all_at(&buf[start..start + len], host)
            .map_err(io_err(&self.path))
    }

    /// Writes L2 tables, L1, refcount table/blocks and header, then fsyncs.
    pub fn finish(self) -> Result<(), Qcow2Error> {
        let cs = self.cluster_size();
        let mut next = self.next_host;

        // L2 tables. Every cluster has refcount 1, hence OFLAG_COPIED on all entries.
        let mut l1 = vec![0u64; self.l2_tables.len()];
        let mut table_buf = vec![0u8; cs as usize];
        for (slot, table) in l1.iter_mut().zip(&self.l2_tables) {
            let Some(table) = table else { continue };
            for (bytes, &host) in table_buf.chunks_exact_mut(8).zip(table.iter()) {
                let entry = if host == 0 { 0 } else { host | OFLAG_COPIED };
                bytes.copy_from_slice(&entry.to_be_bytes());
            }
            self.file
                .write_all_at(&table_buf, next)
                .map_err(io_err(&self.path))?;
            *slot = next | OFLAG_COPIED;
            next += cs;
        }

        // L1 table (none at all for an empty disk, like QEMU).
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_offset = if l1.is_empty() { 0 } else { next };
        if !l1.is_empty() {
            self.file
                .write_all_at(&l1_bytes, l1_offset)
                .map_err(io_err(&self.path))?;
            next += (l1_bytes.len() as u64).div_ceil(cs) * cs;
        }

        // Refcount blocks and table go last; they must count themselves, so iterate to the
        // fixed point (it converges in a couple of rounds).
        let used = next / cs;
        let per_block = (cs * 8) >> WRITER_REFCOUNT_ORDER;
        let per_table_cluster = cs / 8;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = used + blocks + table_clusters;
            let b = total.div_ceil(per_block);
            let t = b.div_ceil(per_table_cluster);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        let total = used + blocks + table_clusters;
        let blocks_offset = next;
        let table_offset = blocks_offset + blocks * cs;
        let Ok(table_clusters_u32) = u32::try_from(table_clusters) else {
            return Err(Qcow2Error::InvalidArgument {
                path: self.path.clone(),
                what: "refcount table too large".into(),
            });
        };

        let mut reftable = vec![0u8; (table_clusters * cs) as usize];
        let mut block_buf = vec![0u8; cs as usize];
        for b in 0..blocks {
            let first = b * per_block;
            let in_use = total.saturating_sub(first).min(per_block) as usize;
            block_buf.fill(0);
            for entry in block_buf.chunks_exact_mut(2).take(in_use) {
                entry.copy_from_slice(&1u16.to_be_bytes());
            }
            let offset = blocks_offset + b * cs;
            self.file
                .write_all_at(&block_buf, offset)
                .map_err(io_err(&self.path))?;
            reftable[b as usize * 8..][..8].copy_from_slice(&offset.to_be_bytes());
        }
        self.file
            .write_all_at(&reftable, table_offset)
            .map_err(io_err(&self.path))?;
        self.file.set_len(total * cs).map_err(io_err(&self.path))?;
        // Metadata must be durable before the header makes the image valid.
        self.file.sync_all().map_err(io_err(&self.path))?;

        // Header followed by the end-of-extensions marker (8 zero bytes).
        let mut header = vec![0u8; V3_HEADER_LENGTH as usize + 8];
        let mut put =
            |off: usize, bytes: &[u8]| header[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &QCOW2_MAGIC);
        put(4, &3u32.to_be_bytes()); // version
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(36, &(l1.len() as u32).to_be_bytes()); // create() capped it at 4 Mi entries
        put(40, &l1_offset.to_be_bytes());
        put(48, &table_offset.to_be_bytes());
        put(56, &table_clusters_u32.to_be_bytes());
        put(96, &WRITER_REFCOUNT_ORDER.to_be_bytes());
        put(100, &(V3_HEADER_LENGTH as u32).to_be_bytes());
        // Backing file, encryption, snapshots and feature bits all stay zero.
        self.file
            .write_all_at(&header, 0)
            .map_err(io_err(&self.path))?;
        self.file.sync_all().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    //! These tests drive QEMU's own tools (`qemu-img`, `qemu-io`) to create reference images and
    //! to check the images we write.

    use super::*;
    use std::process::{Command, Output};
    use std::sync::atomic::{AtomicU32, Ordering};

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    /// A scratch directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("qcow2-test-{}-{tag}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Runs a QEMU tool in `dir`; panics with its output unless it exits 0.
    fn run(dir: &TempDir, tool: &str, args: &[&str]) -> Output {
        let out = Command::new(tool)
            .args(args)
            .current_dir(&dir.0)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} (install qemu-utils): {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn qemu_img(dir: &TempDir, args: &[&str]) -> Output {
        run(dir, "qemu-img", args)
    }

    /// Runs qemu-io on a qcow2 image with one `-c` per command.
    fn qemu_io(dir: &TempDir, image: &str, cmds: &[&str]) {
        let mut args = vec!["-f", "qcow2"];
        for cmd in cmds {
            args.extend(["-c", cmd]);
        }
        args.push(image);
        let out = run(dir, "qemu-io", &args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
    }

    /// The guest contents of `image` according to QEMU.
    fn qemu_raw(dir: &TempDir, image: &str) -> Vec<u8> {
        qemu_img(dir, &["convert", "-O", "raw", image, "qemu-expected.raw"]);
        let data = fs::read(dir.join("qemu-expected.raw")).expect("read converted image");
        fs::remove_file(dir.join("qemu-expected.raw")).expect("remove converted image");
        data
    }

    /// Small deterministic PRNG (xorshift64*), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn fill(&mut self, buf: &mut [u8]) {
            for chunk in buf.chunks_mut(8) {
                let v = self.next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
    }

    fn read_all(reader: &mut Qcow2Reader) -> Vec<u8> {
        let mut buf = vec![0u8; reader.virtual_size() as usize];
        reader.read_at(&mut buf, 0).expect("read whole image");
        buf
    }

    /// Extents must tile the requested range, be merged, and Zero runs must read as zeros.
    fn check_extents(reader: &mut Qcow2Reader, expected: &[u8]) -> Vec<(u64, u64, Qcow2Extent)> {
        let size = reader.virtual_size();
        let extents = reader.extents(0, size).expect("extents");
        let mut pos = 0;
        for (i, &(start, len, kind)) in extents.iter().enumerate() {
            assert_eq!(start, pos, "extents must be consecutive: {extents:?}");
            assert!(len > 0);
            if i > 0 {
                assert_ne!(
                    extents[i - 1].2,
                    kind,
                    "adjacent extents must be merged: {extents:?}"
                );
            }
            if kind == Qcow2Extent::Zero {
                assert!(
                    is_zero(&expected[start as usize..(start + len) as usize]),
                    "Zero extent with data at {start}"
                );
            }
            pos += len;
        }
        assert_eq!(pos, size);
        extents
    }

    fn kind_at(extents: &[(u64, u64, Qcow2Extent)], offset: u64) -> Qcow2Extent {
        extents
            .iter()
            .find(|&&(start, len, _)| start <= offset && offset < start + len)
            .map(|e| e.2)
            .expect("offset covered by extents")
    }

    /// Whole-image and random unaligned reads equal QEMU's view of the image.
    fn assert_reads_match(reader: &mut Qcow2Reader, expected: &[u8], seed: u64) {
        assert_eq!(reader.virtual_size(), expected.len() as u64);
        assert!(
            read_all(reader) == expected,
            "whole-image read differs from qemu-img convert"
        );
        let mut rng = Rng(seed);
        for _ in 0..200 {
            let offset = rng.below(expected.len() as u64);
            let len = rng.below((expected.len() as u64 - offset).min(300 * KIB)) as usize;
            let mut buf = vec![0xeeu8; len];
            reader.read_at(&mut buf, offset).expect("random read");
            assert!(
                buf == expected[offset as usize..offset as usize + len],
                "read at {offset}+{len} differs"
            );
        }
    }

    #[test]
    fn reads_images_written_by_qemu() {
        for (compat, cluster) in [
            ("0.10", "4k"),
            ("0.10", "64k"),
            ("1.1", "4k"),
            ("1.1", "64k"),
        ] {
            let dir = TempDir::new("qemu-written");
            let opts = format!("compat={compat},cluster_size={cluster}");
            qemu_img(
                &dir,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    "img.qcow2",
                    "4M",
                ],
            );
            qemu_io(
                &dir,
                "img.qcow2",
                &[
                    "write -P 0xab 0 64k",
                    "write -z 1M 64k",
                    "write -P 0x5a 100000 3000",
                    "write -P 0x11 3M 700k",
                    "write -z 3076k 8k",
                    "write -P 0x22 4095k 1k",
                ],
            );
            let path = dir.join("img.qcow2");
            let expected = qemu_raw(&dir, "img.qcow2");
            let mut reader = Qcow2Reader::open(&path).expect("open");
            assert_eq!(
                reader.cluster_size(),
                if cluster == "4k" { 4096 } else { 65536 }
            );
            assert_reads_match(&mut reader, &expected, 1);

            let extents = check_extents(&mut reader, &expected);
            for offset in [
                0,
                63 * KIB,
                100000,
                3 * MIB,
                3 * MIB + 699 * KIB,
                4095 * KIB,
            ] {
                assert_eq!(
                    kind_at(&extents, offset),
                    Qcow2Extent::Data,
                    "{opts} at {offset}: {extents:?}"
                );
            }
            assert_eq!(kind_at(&extents, 2 * MIB), Qcow2Extent::Zero, "{opts}");
            if compat == "1.1" {
                // v3 records `write -z` with the zero flag.
                assert_eq!(
                    kind_at(&extents, MIB + 10),
                    Qcow2Extent::Zero,
                    "{opts}: {extents:?}"
                );
            }
            // Sub-range extents start and end exactly at the requested bounds.
            let part = reader.extents(1000, 5000).expect("partial extents");
            assert_eq!(part, vec![(1000, 5000, Qcow2Extent::Data)]);
            assert!(reader.extents(0, 0).expect("empty").is_empty());
        }
    }

    #[test]
    fn reads_through_qcow2_backing_chain() {
        let dir = TempDir::new("chain");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
        qemu_io(
            &dir,
            "base.qcow2",
            &["write -P 0xab 0 1M", "write -P 0xcd 3M 1M"],
        );
        // Top has smaller clusters and is larger than its base: past 4M it must read zeros.
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "6M",
            ],
        );
        qemu_io(
            &dir,
            "top.qcow2",
            &[
                "write -P 0x11 512k 6000",
                "write -z 3M 64k",
                "write -P 0x22 5M 4k",
                "write -P 0x33 4092k 8k",
            ],
        );
        let expected = qemu_raw(&dir, "top.qcow2");
        let mut reader = Qcow2Reader::open(&dir.join("top.qcow2")).expect("open");
        assert_eq!(reader.virtual_size(), 6 * MIB);
        assert_reads_match(&mut reader, &expected, 2);
        let extents = check_extents(&mut reader, &expected);
        assert_eq!(kind_at(&extents, 0), Qcow2Extent::Data); // from the base
        assert_eq!(kind_at(&extents, 512 * KIB), Qcow2Extent::Data); // from the top
        assert_eq!(kind_at(&extents, 2 * MIB), Qcow2Extent::Zero); // nowhere
        assert_eq!(kind_at(&extents, 3 * MIB), Qcow2Extent::Zero); // zero flag hides the base
        assert_eq!(kind_at(&extents, 3 * MIB + 64 * KIB), Qcow2Extent::Data); // base again
        assert_eq!(kind_at(&extents, 4 * MIB + 2 * KIB), Qcow2Extent::Data); // top, past base end
        assert_eq!(kind_at(&extents, 4 * MIB + 8 * KIB), Qcow2Extent::Zero); // past base end
        assert_eq!(kind_at(&extents, 5 * MIB), Qcow2Extent::Data);
    }

    #[test]
    fn reads_through_raw_and_v2_backing() {
        let dir = TempDir::new("raw-chain");
        let mut base = vec![0u8; 2 * MIB as usize];
        Rng(7).fill(&mut base[..MIB as usize]);
        fs::write(dir.join("base.raw"), &base).expect("write base");
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "mid.qcow2",
                "3M",
            ],
        );
        qemu_io(&dir, "mid.qcow2", &["write -P 0x44 1536k 1M"]);
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "3M",
            ],
        );
        qemu_io(&dir, "top.qcow2", &["write -P 0x55 100k 100k"]);
        let expected = qemu_raw(&dir, "top.qcow2");
        let mut reader = Qcow2Reader::open(&dir.join("top.qcow2")).expect("open");
        assert_reads_match(&mut reader, &expected, 3);
        let extents = check_extents(&mut reader, &expected);
        // The raw base counts as data over its whole length; past it only mid's writes do.
        assert_eq!(
            extents,
            vec![
                (0, 2560 * KIB, Qcow2Extent::Data),
                (2560 * KIB, 512 * KIB, Qcow2Extent::Zero)
            ]
        );
    }

    /// Renames the backing-format header extension so the reader has to probe the format.
    fn hide_backing_format(path: &Path) {
        let mut data = fs::read(path).expect("read image");
        let ext = EXT_BACKING_FORMAT.to_be_bytes();
        let at = data[..4096]
            .windows(4)
            .position(|w| w == ext)
            .expect("backing format extension");
        data[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // unknown: skipped
        fs::write(path, data).expect("write image");
    }

    #[test]
    fn probes_backing_format_when_not_recorded() {
        let dir = TempDir::new("probe");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
        qemu_io(&dir, "base.qcow2", &["write -P 0x66 0 256k"]);
        fs::write(dir.join("base.raw"), vec![0x77u8; 512 * KIB as usize]).expect("write raw");
        for base in ["base.qcow2", "base.raw"] {
            let fmt = if base.ends_with("raw") {
                "raw"
            } else {
                "qcow2"
            };
            qemu_img(
                &dir,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    base,
                    "-F",
                    fmt,
                    "top.qcow2",
                    "1M",
                ],
            );
            let expected = qemu_raw(&dir, "top.qcow2");
            hide_backing_format(&dir.join("top.qcow2"));
            let mut reader = Qcow2Reader::open(&dir.join("top.qcow2")).expect("open");
            assert!(
                read_all(&mut reader) == expected,
                "probed {base} reads differently"
            );
        }
    }

    #[test]
    fn refuses_backing_loops() {
        let dir = TempDir::new("loops");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "self.qcow2", "1M"]);
        qemu_img(
            &dir,
            &[
                "rebase",
                "-u",
                "-b",
                "self.qcow2",
                "-F",
                "qcow2",
                "self.qcow2",
            ],
        );
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
        qemu_img(
            &dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
            ],
        );
        qemu_img(
            &dir,
            &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
        );
        for image in ["self.qcow2", "a.qcow2", "b.qcow2"] {
            match Qcow2Reader::open(&dir.join(image)) {
                Err(Qcow2Error::Corrupt { what, .. }) => assert!(what.contains("loops"), "{what}"),
                other => panic!("{image}: expected a loop error, got {other:?}"),
            }
        }
        // A missing backing file is an I/O error naming it.
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "gone.qcow2",
                "-F",
                "qcow2",
                "orphan.qcow2",
                "1M",
            ],
        );
        match Qcow2Reader::open(&dir.join("orphan.qcow2")) {
            Err(e @ Qcow2Error::Io { .. }) => assert!(e.to_string().contains("gone.qcow2"), "{e}"),
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    #[test]
    fn refuses_deep_chains() {
        let dir = TempDir::new("deep");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "l0.qcow2", "1M"]);
        for i in 1..=MAX_BACKING_DEPTH + 1 {
            let (base, top) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
            qemu_img(
                &dir,
                &[
                    "create", "-q", "-f", "qcow2", "-u", "-b", &base, "-F", "qcow2", &top, "1M",
                ],
            );
        }
        Qcow2Reader::open(&dir.join(&format!("l{MAX_BACKING_DEPTH}.qcow2")))
            .expect("64 backing files are fine");
        match Qcow2Reader::open(&dir.join(&format!("l{}.qcow2", MAX_BACKING_DEPTH + 1))) {
            Err(Qcow2Error::Unsupported { what, .. }) => {
                assert!(what.contains("backing chain"), "{what}")
            }
            other => panic!("expected a depth error, got {other:?}"),
        }
    }

    /// ORs `bits` into the v3 incompatible feature field of `path`.
    fn set_incompatible(path: &Path, bits: u64) {
        let mut data = fs::read(path).expect("read image");
        let value = be_u64(&data, 72) | bits;
        data[72..80].copy_from_slice(&value.to_be_bytes());
        fs::write(path, data).expect("write image");
    }

    #[test]
    fn feature_bits() {
        let dir = TempDir::new("features");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
        qemu_io(&dir, "img.qcow2", &["write -P 0x99 4k 4k"]);
        let expected = qemu_raw(&dir, "img.qcow2");
        let path = dir.join("img.qcow2");

        // Dirty (lazy refcounts) images are readable.
        set_incompatible(&path, INCOMPAT_DIRTY);
        let mut reader = Qcow2Reader::open(&path).expect("dirty image opens");
        assert!(read_all(&mut reader) == expected);

        set_incompatible(&path, 1 << 10);
        assert!(matches!(
            Qcow2Reader::open(&path),
            Err(Qcow2Error::Unsupported { .. })
        ));
        set_incompatible(&path, INCOMPAT_CORRUPT);
        assert!(matches!(
            Qcow2Reader::open(&path),
            Err(Qcow2Error::Corrupt { .. })
        ));

        let cases: [(&str, &[&str]); 3] = [
            ("extended L2", &["-o", "extended_l2=on"]),
            ("external data file", &["-o", "data_file=data.raw"]),
            (
                "encryption",
                &[
                    "--object",
                    "secret,id=sec0,data=123456",
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec0",
                ],
            ),
        ];
        for (what, opts) in cases {
            let _ = fs::remove_file(dir.join("f.qcow2"));
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            args.extend_from_slice(opts);
            args.extend(["f.qcow2", "1M"]);
            qemu_img(&dir, &args);
            match Qcow2Reader::open(&dir.join("f.qcow2")) {
                Err(Qcow2Error::Unsupported { what: msg, .. }) => {
                    assert!(msg.contains(what), "{msg}")
                }
                other => panic!("{what}: expected Unsupported, got {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_compressed_clusters() {
        let dir = TempDir::new("compressed");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]);
        qemu_io(&dir, "src.qcow2", &["write -P 0x12 192k 64k"]);
        qemu_img(
            &dir,
            &["convert", "-c", "-O", "qcow2", "src.qcow2", "c.qcow2"],
        );
        let mut reader = Qcow2Reader::open(&dir.join("c.qcow2")).expect("compressed image opens");
        // Unallocated parts are still readable.
        let mut buf = vec![1u8; 64 * KIB as usize];
        reader
            .read_at(&mut buf, 0)
            .expect("read unallocated cluster");
        assert!(is_zero(&buf));
        for result in [
            reader.read_at(&mut buf, 200 * KIB).map(|_| ()),
            reader.extents(0, MIB).map(|_| ()),
        ] {
            match result {
                Err(e @ Qcow2Error::Unsupported { .. }) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("compressed") && msg.contains("196608"),
                        "{msg}"
                    );
                }
                other => panic!("expected Unsupported, got {other:?}"),
            }
        }
    }

    /// Overwrites bytes of `path` at `offset`.
    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open for patching");
        file.write_all_at(bytes, offset).expect("patch");
    }

    fn open_and_read_all(path: &Path) -> Result<Vec<u8>, Qcow2Error> {
        let mut reader = Qcow2Reader::open(path)?;
        let mut buf = vec![0u8; reader.virtual_size().min(8 * MIB) as usize];
        reader.read_at(&mut buf, 0)?;
        reader.extents(0, reader.virtual_size())?;
        Ok(buf)
    }

    #[test]
    fn hostile_headers() {
        let dir = TempDir::new("hostile");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "4M"]);
        qemu_io(
            &dir,
            "good.qcow2",
            &["write -P 0xab 0 64k", "write -P 0xcd 2M 64k"],
        );
        let good = fs::read(dir.join("good.qcow2")).expect("read image");
        let fresh = |name: &str| {
            let path = dir.join(name);
            fs::write(&path, &good).expect("copy image");
            path
        };
        let expect_corrupt = |path: &Path, needle: &str| match open_and_read_all(path) {
            Err(Qcow2Error::Corrupt { what, .. }) => {
                assert!(what.contains(needle), "{}: {what}", path.display())
            }
            other => panic!(
                "{}: expected Corrupt, got {:?}",
                path.display(),
                other.map(|b| b.len())
            ),
        };

        open_and_read_all(&fresh("copy.qcow2")).expect("unmodified copy reads");

        let empty = dir.join("empty.qcow2");
        fs::write(&empty, b"").expect("write");
        assert!(matches!(
            open_and_read_all(&empty),
            Err(Qcow2Error::NotQcow2 { .. })
        ));

        let magic = fresh("magic.qcow2");
        patch(&magic, 0, b"QFI\0");
        assert!(matches!(
            open_and_read_all(&magic),
            Err(Qcow2Error::NotQcow2 { .. })
        ));

        let version = fresh("version.qcow2");
        patch(&version, 4, &7u32.to_be_bytes());
        assert!(matches!(
            open_and_read_all(&version),
            Err(Qcow2Error::Unsupported { .. })
        ));

        // Truncated inside the header, inside the metadata, and inside the data.
        let header_cut = fresh("header-cut.qcow2");
        OpenOptions::new()
            .write(true)
            .open(&header_cut)
            .and_then(|f| f.set_len(50))
            .expect("truncate");
        expect_corrupt(&header_cut, "truncated");
        let l1_offset = be_u64(&good, 40);
        let meta_cut = fresh("meta-cut.qcow2");
        OpenOptions::new()
            .write(true)
            .open(&meta_cut)
            .and_then(|f| f.set_len(l1_offset))
            .expect("truncate");
        expect_corrupt(&meta_cut, "L1 table");
        let data_cut = fresh("data-cut.qcow2");
        OpenOptions::new()
            .write(true)
            .open(&data_cut)
            .and_then(|f| f.set_len(good.len() as u64 - 64 * KIB))
            .expect("truncate");
        expect_corrupt(&data_cut, "past the end of the file");

        let l1_far = fresh("l1-far.qcow2");
        patch(&l1_far, 40, &(1u64 << 40).to_be_bytes());
        expect_corrupt(&l1_far, "L1 table");

        let l1_huge = fresh("l1-huge.qcow2");
        patch(&l1_huge, 36, &u32::MAX.to_be_bytes());
        expect_corrupt(&l1_huge, "L1 table");

        let l1_small = fresh("l1-small.qcow2");
        patch(&l1_small, 24, &(1u64 << 62).to_be_bytes()); // virtual size the L1 cannot cover
        expect_corrupt(&l1_small, "L1 table");

        let l2_far = fresh("l2-far.qcow2");
        patch(
            &l2_far,
            l1_offset,
            &((1u64 << 40) | OFLAG_COPIED).to_be_bytes(),
        );
        expect_corrupt(&l2_far, "L2 table");

        let l2_shared = fresh("l2-shared.qcow2");
        qemu_img(
            &dir,
            &["resize", "-q", "-f", "qcow2", "l2-shared.qcow2", "1G"],
        ); // two L1 entries
        let resized = fs::read(&l2_shared).expect("read image");
        let l1 = be_u64(&resized, 40) as usize;
        patch(&l2_shared, l1 as u64 + 8, &resized[l1..l1 + 8]);
        expect_corrupt(&l2_shared, "several L1 entries");

        let l2_unaligned = fresh("l2-unaligned.qcow2");
        patch(
            &l2_unaligned,
            l1_offset,
            &(0x10200u64 | OFLAG_COPIED).to_be_bytes(),
        );
        expect_corrupt(&l2_unaligned, "not cluster aligned");

        let cluster_bits = fresh("cluster-bits.qcow2");
        patch(&cluster_bits, 20, &40u32.to_be_bytes());
        expect_corrupt(&cluster_bits, "cluster_bits");

        let ext = fresh("ext.qcow2");
        patch(
            &ext,
            be_u32(&good, 100).into(),
            &[0, 0, 0, 9, 0xff, 0xff, 0, 0],
        );
        expect_corrupt(&ext, "header extension");

        let backing = fresh("backing.qcow2");
        patch(&backing, 8, &65000u64.to_be_bytes());
        patch(&backing, 16, &1000u32.to_be_bytes());
        expect_corrupt(&backing, "backing file name");
    }

    /// Random corruption of the metadata must give errors, never panics or huge allocations.
    #[test]
    fn fuzzed_metadata_never_panics() {
        let dir = TempDir::new("fuzz");
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                "good.qcow2",
                "256k",
            ],
        );
        qemu_io(
            &dir,
            "good.qcow2",
            &[
                "write -P 0xab 0 8k",
                "write -P 0xcd 100k 30k",
                "write -z 200k 4k",
            ],
        );
        let good = fs::read(dir.join("good.qcow2")).expect("read image");
        let meta_end = 6 * 512; // header, refcount table and block, L1, L2
        let path = dir.join("fuzz.qcow2");
        let mut rng = Rng(0x5eed);
        let mut outcomes = [0usize; 2];
        for _ in 0..500 {
            let mut data = good.clone();
            // Mostly the header and the tables right after it, sometimes anywhere.
            let range = if rng.below(4) == 0 {
                data.len() as u64
            } else {
                meta_end
            };
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(range) as usize;
                data[at] ^= 1 << rng.below(8);
            }
            fs::write(&path, &data).expect("write fuzzed image");
            outcomes[usize::from(open_and_read_all(&path).is_ok())] += 1;
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }

    #[test]
    fn out_of_range_accesses_fail() {
        let dir = TempDir::new("range");
        qemu_img(&dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
        let mut reader = Qcow2Reader::open(&dir.join("img.qcow2")).expect("open");
        let mut buf = [0u8; 16];
        reader.read_at(&mut buf, MIB - 16).expect("read at the end");
        assert!(matches!(
            reader.read_at(&mut buf, MIB - 8),
            Err(Qcow2Error::OutOfRange { .. })
        ));
        assert!(matches!(
            reader.read_at(&mut buf, u64::MAX - 4),
            Err(Qcow2Error::OutOfRange { .. })
        ));
        assert!(matches!(
            reader.extents(MIB, 1),
            Err(Qcow2Error::OutOfRange { .. })
        ));

        let mut writer = Qcow2Writer::create(&dir.join("w.qcow2"), MIB, 65536).expect("create");
        assert!(matches!(
            writer.write_at(&buf, MIB - 8),
            Err(Qcow2Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn writer_rejects_bad_parameters() {
        let dir = TempDir::new("params");
        let path = dir.join("w.qcow2");
        for cs in [0, 256, 1000, 4 << 20] {
            assert!(
                matches!(
                    Qcow2Writer::create(&path, MIB, cs),
                    Err(Qcow2Error::InvalidArgument { .. })
                ),
                "{cs}"
            );
        }
        assert!(matches!(
            Qcow2Writer::create(&path, 1000, 65536),
            Err(Qcow2Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            Qcow2Writer::create(&path, 1 << 62, 512),
            Err(Qcow2Error::InvalidArgument { .. })
        ));
    }

    /// `qemu-img check` must find no errors and no leaks (exit code 0; 3 would mean leaks).
    fn assert_qemu_check_clean(dir: &TempDir, image: &str) {
        let out = qemu_img(dir, &["check", "-f", "qcow2", image]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("No errors were found"), "{text}");
        assert!(!text.contains("leaked"), "{text}");
    }

    /// Random writes through `Qcow2Writer`, mirrored into an in-memory raw image, then checked
    /// by QEMU and read back through `Qcow2Reader`.
    fn writer_round_trip(cluster_size: u32, virtual_size: u64, writes: usize, seed: u64) {
        let dir = TempDir::new(&format!("writer-{cluster_size}"));
        let mut rng = Rng(seed);
        let mut expected = vec![0u8; virtual_size as usize];
        let mut writer = Qcow2Writer::create(&dir.join("out.qcow2"), virtual_size, cluster_size)
            .expect("create");
        let cs = u64::from(cluster_size);
        for i in 0..writes {
            let (offset, len) = match rng.below(4) {
                // cluster-aligned multi-cluster writes
                0 => {
                    let offset = rng.below(virtual_size / cs) * cs;
                    (offset, (rng.below(4) + 1) * cs)
                }
                // small unaligned writes
                1 => (rng.below(virtual_size), rng.below(3 * KIB) + 1),
                // larger unaligned writes, crossing several clusters
                _ => (rng.below(virtual_size), rng.below(256 * KIB) + 1),
            };
            let len = len.min(virtual_size - offset) as usize;
            let mut buf = vec![0u8; len];
            match i % 5 {
                0 => {} // zeros: allocate nothing new, overwrite existing data
                1 => {
                    // data with a zero cluster-sized hole in the middle
                    rng.fill(&mut buf);
                    let mid = len / 2;
                    buf[mid..(mid + cs as usize).min(len)].fill(0);
                }
                _ => rng.fill(&mut buf),
            }
            writer.write_at(&buf, offset).expect("write");
            expected[offset as usize..offset as usize + len].copy_from_slice(&buf);
        }
        writer.finish().expect("finish");
        fs::write(dir.join("expected.raw"), &expected).expect("write expected image");

        assert_qemu_check_clean(&dir, "out.qcow2");
        qemu_img(
            &dir,
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                "expected.raw",
                "out.qcow2",
            ],
        );
        assert!(qemu_raw(&dir, "out.qcow2") == expected);

        let mut reader = Qcow2Reader::open(&dir.join("out.qcow2")).expect("open written image");
        assert_eq!(reader.cluster_size(), cs);
        assert_reads_match(&mut reader, &expected, seed);
        check_extents(&mut reader, &expected);
    }

    #[test]
    fn writer_64k_clusters() {
        writer_round_trip(65536, 32 * MIB, 300, 11);
    }

    #[test]
    fn writer_4k_clusters() {
        writer_round_trip(4096, 16 * MIB + 512, 300, 12);
    }

    #[test]
    fn writer_2m_clusters() {
        writer_round_trip(2 << 20, 12 * MIB, 60, 13);
    }

    /// 512-byte clusters: dozens of refcount blocks, a multi-cluster refcount table and L1.
    #[test]
    fn writer_512_byte_clusters_full_disk() {
        let dir = TempDir::new("writer-512-full");
        let size = 12 * MIB;
        let mut data = vec![0u8; size as usize];
        Rng(21).fill(&mut data);
        let mut writer = Qcow2Writer::create(&dir.join("out.qcow2"), size, 512).expect("create");
        // Write in a scrambled order of 64 KiB pieces.
        let pieces = (size / (64 * KIB)) as usize;
        let mut order: Vec<usize> = (0..pieces).collect();
        let mut rng = Rng(22);
        for i in (1..pieces).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for piece in order {
            let start = piece * 64 * KIB as usize;
            writer
                .write_at(&data[start..start + 64 * KIB as usize], start as u64)
                .expect("write");
        }
        writer.finish().expect("finish");
        fs::write(dir.join("expected.raw"), &data).expect("write expected image");
        assert_qemu_check_clean(&dir, "out.qcow2");
        qemu_img(
            &dir,
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                "expected.raw",
                "out.qcow2",
            ],
        );
        let header = fs::read(dir.join("out.qcow2")).expect("read image");
        assert!(
            be_u32(&header, 56) > 1,
            "refcount table should span several clusters"
        );
    }

    #[test]
    fn writer_zero_writes_allocate_nothing() {
        let dir = TempDir::new("writer-zero");
        let path = dir.join("out.qcow2");
        let mut writer = Qcow2Writer::create(&path, 8 * MIB, 65536).expect("create");
        writer
            .write_at(&vec![0u8; 3 * MIB as usize], 1000)
            .expect("write zeros");
        writer.finish().expect("finish");
        // Header, L1, one refcount block, refcount table: no L2 tables, no data clusters.
        assert_eq!(fs::metadata(&path).expect("stat").len(), 4 * 65536);
        assert_qemu_check_clean(&dir, "out.qcow2");
        let mut reader = Qcow2Reader::open(&path).expect("open");
        assert_eq!(
            reader.extents(0, 8 * MIB).expect("extents"),
            vec![(0, 8 * MIB, Qcow2Extent::Zero)]
        );
    }

    #[test]
    fn writer_empty_and_sparse_huge_disks() {
        let dir = TempDir::new("writer-sizes");
        Qcow2Writer::create(&dir.join("empty.qcow2"), 0, 65536)
            .expect("create")
            .finish()
            .expect("finish");
        assert_qemu_check_clean(&dir, "empty.qcow2");
        let reader = Qcow2Reader::open(&dir.join("empty.qcow2")).expect("open");
        assert_eq!(reader.virtual_size(), 0);

        // 1 TiB, a few scattered writes: several L2 tables far apart, one small file.
        let size = 1 << 40;
        let mut writer = Qcow2Writer::create(&dir.join("huge.qcow2"), size, 65536).expect("create");
        let writes = [
            (0u64, 0x11u8),
            (size / 3 + 12345, 0x22),
            (size - 4096, 0x33),
        ];
        for (offset, byte) in writes {
            writer.write_at(&[byte; 4096], offset).expect("write");
        }
        writer.finish().expect("finish");
        assert_qemu_check_clean(&dir, "huge.qcow2");
        let info = qemu_img(&dir, &["info", "--output=json", "huge.qcow2"]);
        assert!(String::from_utf8_lossy(&info.stdout).contains("\"virtual-size\": 1099511627776"));
        let mut reader = Qcow2Reader::open(&dir.join("huge.qcow2")).expect("open");
        for (offset, byte) in writes {
            let mut buf = [0u8; 4097];
            let start = offset.min(size - 4097);
            reader.read_at(&mut buf, start).expect("read");
            let at = (offset - start) as usize;
            assert!(buf[at..at + 4096].iter().all(|&b| b == byte));
        }
        let extents = reader.extents(0, size).expect("extents");
        assert_eq!(
            extents.iter().filter(|e| e.2 == Qcow2Extent::Data).count(),
            3,
            "{extents:?}"
        );
    }
}
