//! `img convert`: raw, qcow2 and snapshot-chain images into each other.
//! Only allocated ranges are read, all-zero blocks are not written, and the
//! output appears under its name only once complete.

use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::disk::{Disk, Source as ExtentSource};
use crate::error::{invalid, io_at, Error, Result};
use crate::header::{DEFAULT_BLOCK_SIZE, MAGIC};
use crate::layer::{Layer, NewLayer};
use crate::ops::Progress;
use crate::qcow2::{Qcow2Extent, Qcow2Reader, Qcow2Writer};
use crate::storage::{parent_dir, sibling, AlignedBuf, Env, RealEnv, RealFile, Storage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    /// This project's snapshot layer format.
    Snap,
}

/// A format name `img` does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?} (raw, qcow2 or snap)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownFormat> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "snap" => Ok(Format::Snap),
            other => Err(UnknownFormat(other.to_string())),
        }
    }
}

/// Guesses a file's format from its first bytes.
pub fn probe(path: &Path) -> Result<Format> {
    let mut head = [0u8; 8];
    let mut f = std::fs::File::open(path).map_err(io_at(path))?;
    let n = f.read(&mut head).map_err(io_at(path))?;
    Ok(if n == 8 && &head == MAGIC {
        Format::Snap
    } else if n >= 4 && head[..4] == *b"QFI\xfb" {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Something to read a virtual disk from.
pub trait ImageReader: Send {
    fn virtual_size(&self) -> u64;
    /// Ranges in `[off, off + len)` that may hold non-zero data, in order.
    fn data_ranges(&mut self, off: u64, len: u64) -> Result<Vec<(u64, u64)>>;
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()>;
}

/// Something to write a virtual disk to; starts out all zeros.
pub trait ImageWriter {
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()>;
    fn finish(self: Box<Self>) -> Result<()>;
}

struct RawReader {
    path: PathBuf,
    file: RealFile,
    size: u64,
}

impl ImageReader for RawReader {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn data_ranges(&mut self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(self
            .file
            .data_ranges(off, off + len)
            .map_err(io_at(&self.path))?
            .into_iter()
            .map(|(s, e)| (s, e - s))
            .collect())
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file.read_at(buf, off).map_err(io_at(&self.path))
    }
}

impl ImageReader for Qcow2Reader {
    fn virtual_size(&self) -> u64 {
        Qcow2Reader::virtual_size(self)
    }
    fn data_ranges(&mut self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(self
            .extents(off, len)?
            .into_iter()
            .filter(|e| e.2 == Qcow2Extent::Data)
            .map(|e| (e.0, e.1))
            .collect())
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        Ok(Qcow2Reader::read_at(self, buf, off)?)
    }
}

impl ImageReader for Disk {
    fn virtual_size(&self) -> u64 {
        Disk::virtual_size(self)
    }
    fn data_ranges(&mut self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in self.resolve(off, len) {
            if let ExtentSource::Layer { .. } = e.source {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == e.offset => last.1 += e.len,
                    _ => out.push((e.offset, e.len)),
                }
            }
        }
        Ok(out)
    }
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<()> {
        Disk::read_at(self, buf, off)
    }
}

struct RawWriter {
    path: PathBuf,
    file: RealFile,
    /// Bytes written since writeback was last started.
    unstarted: u64,
}

/// Start writeback every this many bytes: a bulk copy that leaves gigabytes
/// dirty for the final sync gets throttled hard by the kernel's dirty limits.
const WRITEBACK_EVERY: u64 = 64 << 20;

impl ImageWriter for RawWriter {
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        self.file.write_at(buf, off).map_err(io_at(&self.path))?;
        self.unstarted += buf.len() as u64;
        if self.unstarted >= WRITEBACK_EVERY {
            self.unstarted = 0;
            if let Some(fd) = self.file.raw_fd() {
                // SAFETY: sync_file_range on a descriptor we own; no memory
                // is touched. Only starts writeback: the final sync is what
                // the contract relies on, so its result can be ignored.
                unsafe {
                    libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
                }
            }
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync_data().map_err(io_at(&self.path))
    }
}

impl ImageWriter for Qcow2Writer {
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        Ok(Qcow2Writer::write_at(self, buf, off)?)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(Qcow2Writer::finish(*self)?)
    }
}

impl ImageWriter for Disk {
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<()> {
        Disk::write_at(self, buf, off)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Disk::close(*self)
    }
}

/// Opens `path` for reading as `format` (probed when `None`). A snap
/// image is locked shared while it is read, so reading one that is open
/// for writing is refused, unless `force_share` (qemu-img's `-U`): then
/// what is read may be changing under the reader.
pub fn open_reader(
    path: &Path,
    format: Option<Format>,
    force_share: bool,
) -> Result<Box<dyn ImageReader>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    Ok(match format {
        Format::Raw => {
            let file = OpenOptions::new()
                .read(true)
                .open(path)
                .map_err(io_at(path))?;
            let size = file.metadata().map_err(io_at(path))?.len();
            Box::new(RawReader {
                path: path.to_path_buf(),
                file: RealFile::new(file),
                size,
            })
        }
        Format::Qcow2 => Box::new(Qcow2Reader::open(path)?),
        Format::Snap if force_share => Box::new(Disk::open_unlocked(Arc::new(RealEnv), path)?),
        Format::Snap => Box::new(Disk::open(Arc::new(RealEnv), path, false)?),
    })
}

/// Creates a writer for a new image at `path`.
pub fn create_writer(
    path: &Path,
    format: Format,
    size: u64,
    cluster_size: Option<u32>,
) -> Result<Box<dyn ImageWriter>> {
    Ok(match format {
        Format::Raw => {
            let env = RealEnv;
            let file = env.create(path).map_err(io_at(path))?;
            file.set_len(size).map_err(io_at(path))?;
            drop(file);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_at(path))?;
            Box::new(RawWriter {
                path: path.to_path_buf(),
                file: RealFile::new(file),
                unstarted: 0,
            })
        }
        Format::Qcow2 => Box::new(Qcow2Writer::create(
            path,
            size,
            cluster_size.unwrap_or(65536),
        )?),
        Format::Snap => {
            let env: Arc<dyn Env> = Arc::new(RealEnv);
            let block_size = cluster_size.unwrap_or(DEFAULT_BLOCK_SIZE);
            // A raw source need not be a whole number of blocks: round up.
            let size = size.div_ceil(block_size as u64) * block_size as u64;
            Layer::create(env.as_ref(), path, &NewLayer::standalone(size, block_size))?;
            Box::new(Disk::open(env, path, true)?)
        }
    })
}

#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConvertStats {
    pub virtual_size: u64,
    /// Bytes read from allocated ranges of the source.
    pub bytes_read: u64,
    /// Bytes written (non-zero blocks).
    pub bytes_written: u64,
}

/// Copies everything `reader` holds into `writer`, skipping zero blocks.
pub fn copy_image(
    reader: &mut dyn ImageReader,
    writer: &mut dyn ImageWriter,
    progress: Progress,
) -> Result<ConvertStats> {
    const CHUNK: u64 = 2 << 20;
    let size = reader.virtual_size();
    let mut stats = ConvertStats {
        virtual_size: size,
        ..Default::default()
    };
    let mut buf = AlignedBuf::new(CHUNK as usize);
    let mut at = 0;
    while at < size {
        let window = (size - at).min(64 * CHUNK);
        for (s, len) in reader.data_ranges(at, window)? {
            let mut off = s;
            while off < s + len {
                let n = (s + len - off).min(CHUNK) as usize;
                reader.read_at(&mut buf[..n], off)?;
                stats.bytes_read += n as u64;
                stats.bytes_written += write_nonzero(writer, &buf[..n], off)?;
                off += n as u64;
                progress(off, size);
            }
        }
        at += window;
        progress(at, size);
    }
    Ok(stats)
}

/// Writes the runs of `chunk` that are not all zeros; returns bytes written.
fn write_nonzero(writer: &mut dyn ImageWriter, chunk: &[u8], off: u64) -> Result<u64> {
    const ZERO_GRAIN: usize = 4096;
    let n = chunk.len();
    let is_zero = |r: &[u8]| r.iter().all(|&b| b == 0);
    let mut written = 0;
    let mut i = 0;
    while i < n {
        let g = (n - i).min(ZERO_GRAIN - ((off as usize + i) % ZERO_GRAIN));
        if is_zero(&chunk[i..i + g]) {
            i += g;
            continue;
        }
        let mut j = i + g;
        while j < n {
            let g2 = (n - j).min(ZERO_GRAIN);
            if is_zero(&chunk[j..j + g2]) {
                break;
            }
            j += g2;
        }
        writer.write_at(&chunk[i..j], off + i as u64)?;
        written += (j - i) as u64;
        i = j;
    }
    Ok(written)
}

/// `img convert [-f FMT] [-O FMT] IN OUT`.
pub fn convert(
    input: &Path,
    in_format: Option<Format>,
    output: &Path,
    out_format: Format,
    cluster_size: Option<u32>,
    force_share: bool,
    progress: Progress,
) -> Result<ConvertStats> {
    let mut reader = open_reader(input, in_format, force_share)?;
    if std::fs::canonicalize(input).ok() == std::fs::canonicalize(output).ok() && output.exists() {
        return Err(invalid(output, "input and output are the same file"));
    }
    let name = output
        .file_name()
        .ok_or_else(|| invalid(output, "not a file name"))?;
    let tmp = sibling(output, format!(".{}.convert-tmp", name.to_string_lossy()));
    let result = (|| {
        let mut writer = create_writer(&tmp, out_format, reader.virtual_size(), cluster_size)?;
        let stats = copy_image(reader.as_mut(), writer.as_mut(), progress)?;
        writer.finish()?;
        std::fs::rename(&tmp, output).map_err(io_at(output))?;
        RealEnv
            .sync_dir(&parent_dir(output))
            .map_err(io_at(output))?;
        Ok(stats)
    })()
    .map_err(|e: Error| e.renamed(&tmp, output));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
