//! `img backup` and `img restore`: a snapshot, or the delta between two
//! snapshots of one chain, as a compact stream of its allocated blocks
//! (FORMAT.md, "Backup stream").

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use uuid::Uuid;

use crate::disk::{load_valid_map, open_chain, Disk, Source};
use crate::error::{invalid, io_at, Error, Result};
use crate::header::{FLAG_SEALED, MAX_NAME};
use crate::layer::{relative_parent_path, Layer, NewLayer};
use crate::map::BlockState;
use crate::ops::Progress;
use crate::storage::{parent_dir, sibling, AlignedBuf, Env};

pub const BACKUP_MAGIC: &[u8; 8] = b"SNAPBKUP";
const BACKUP_VERSION: u32 = 1;
const HEADER_LEN: usize = 4096;
const KIND_END: u32 = 0;
const KIND_DATA: u32 = 1;
const KIND_ZERO: u32 = 2;
/// Largest data record; keeps restore's buffer bounded.
const MAX_RECORD: u64 = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupHeader {
    pub virtual_size: u64,
    pub block_size: u32,
    pub snapshot_uuid: Uuid,
    /// The snapshot this is a delta against; `None` for a full backup.
    pub base_uuid: Option<Uuid>,
    pub name: String,
}

impl BackupHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(BACKUP_MAGIC);
        b[8..12].copy_from_slice(&BACKUP_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[24..28].copy_from_slice(&self.block_size.to_le_bytes());
        b[32..48].copy_from_slice(self.snapshot_uuid.as_bytes());
        if let Some(u) = self.base_uuid {
            b[48..64].copy_from_slice(u.as_bytes());
        }
        let name = self.name.as_bytes();
        let n = name.len().min(MAX_NAME);
        b[64..66].copy_from_slice(&(n as u16).to_le_bytes());
        b[66..66 + n].copy_from_slice(&name[..n]);
        let crc = crc32c::crc32c(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8; HEADER_LEN]) -> Result<BackupHeader> {
        let bad = |what: &str| Error::BadBackup {
            path: path.to_path_buf(),
            what: what.to_string(),
        };
        if &b[0..8] != BACKUP_MAGIC {
            return Err(bad("not a backup (wrong magic)"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut u64b = [0u8; 8];
        u64b.copy_from_slice(&b[16..24]);
        if u32_at(8) != BACKUP_VERSION {
            return Err(bad(&format!("unsupported version {}", u32_at(8))));
        }
        if u32_at(HEADER_LEN - 4) != crc32c::crc32c(&b[..HEADER_LEN - 4]) {
            return Err(bad("header checksum mismatch"));
        }
        let virtual_size = u64::from_le_bytes(u64b);
        let block_size = u32_at(24);
        crate::header::validate_geometry(virtual_size, block_size)
            .map_err(|e| bad(&e.to_string()))?;
        let n = u16::from_le_bytes([b[64], b[65]]) as usize;
        if n > MAX_NAME {
            return Err(bad("name too long"));
        }
        let uuid = |r: std::ops::Range<usize>| Uuid::from_slice(&b[r]).unwrap_or_default();
        Ok(BackupHeader {
            virtual_size,
            block_size,
            snapshot_uuid: uuid(32..48),
            base_uuid: Some(uuid(48..64)).filter(|u| !u.is_nil()),
            name: String::from_utf8(b[66..66 + n].to_vec()).map_err(|_| bad("name not UTF-8"))?,
        })
    }
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackupStats {
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub file_bytes: u64,
}

fn record_header(offset: u64, len: u64, kind: u32, crc: u32) -> [u8; 24] {
    let mut r = [0u8; 24];
    r[0..8].copy_from_slice(&offset.to_le_bytes());
    r[8..16].copy_from_slice(&len.to_le_bytes());
    r[16..20].copy_from_slice(&kind.to_le_bytes());
    r[20..24].copy_from_slice(&crc.to_le_bytes());
    r
}

/// `img backup [--from BASE_SNAPSHOT] SNAPSHOT OUT`. SNAPSHOT must be sealed
/// (a backup of a disk that is still changing would not be one snapshot).
pub fn backup(
    env: &Arc<dyn Env>,
    snapshot: &Path,
    from: Option<&Path>,
    out: &Path,
    progress: Progress,
) -> Result<BackupStats> {
    let disk = Disk::open(Arc::clone(env), snapshot, false)?;
    let top = disk.top();
    if !top.header.sealed() {
        return Err(invalid(
            snapshot,
            "not sealed: back up a snapshot (`img snapshot -c NAME FILE` makes one)",
        ));
    }
    let bs = disk.block_size();
    let size = disk.virtual_size();
    // The layers whose changes the backup carries: all, or those above `from`.
    let (base_uuid, first_layer) = match from {
        None => (None, 0),
        Some(f) => {
            let fl = Layer::open(env.as_ref(), f, false)?;
            let k = disk
                .layers()
                .iter()
                .position(|l| l.header.uuid == fl.header.uuid)
                .ok_or_else(|| {
                    invalid(
                        f,
                        format!(
                            "not in the chain of {}: no delta possible",
                            snapshot.display()
                        ),
                    )
                })?;
            (Some(fl.header.uuid), k + 1)
        }
    };
    // Blocks any of those layers touched.
    let mut touched = crate::map::AllocationMap::new(disk.index().blocks(), size / bs / 4 + 1);
    for layer in &disk.layers()[first_layer..] {
        let map = load_valid_map(layer)?;
        for (s, n, _) in map.runs(0, map.blocks()) {
            touched.set_range(s, n, BlockState::Data);
        }
    }
    let header = BackupHeader {
        virtual_size: size,
        block_size: bs as u32,
        snapshot_uuid: top.header.uuid,
        base_uuid,
        name: top.header.name.clone(),
    };
    let tmp = sibling(
        out,
        format!(
            ".{}.backup-tmp",
            out.file_name().unwrap_or_default().to_string_lossy()
        ),
    );
    let file = File::create(&tmp).map_err(io_at(out))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut stats = BackupStats::default();
    let mut stream_crc = 0u32;
    let result = (|| -> Result<()> {
        w.write_all(&header.encode()).map_err(io_at(out))?;
        let mut buf = AlignedBuf::new(MAX_RECORD as usize);
        for (s, n, _) in touched.runs(0, touched.blocks()).collect::<Vec<_>>() {
            let (off, len) = (s * bs, n * bs);
            for e in disk.resolve(off, len) {
                let mut at = e.offset;
                while at < e.offset + e.len {
                    let n = (e.offset + e.len - at).min(MAX_RECORD);
                    let rec = match e.source {
                        Source::Zero => {
                            stats.zero_bytes += n;
                            record_header(at, n, KIND_ZERO, 0)
                        }
                        Source::Layer { .. } => {
                            disk.read_at(&mut buf[..n as usize], at)?;
                            stats.data_bytes += n;
                            record_header(at, n, KIND_DATA, crc32c::crc32c(&buf[..n as usize]))
                        }
                    };
                    stream_crc = crc32c::crc32c_append(stream_crc, &rec);
                    w.write_all(&rec).map_err(io_at(out))?;
                    if let Source::Layer { .. } = e.source {
                        w.write_all(&buf[..n as usize]).map_err(io_at(out))?;
                    }
                    stats.records += 1;
                    at += n;
                    progress(at, size);
                }
            }
        }
        w.write_all(&record_header(0, stats.records, KIND_END, stream_crc))
            .map_err(io_at(out))?;
        let file = w.into_inner().map_err(|e| Error::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_at(out))?;
        stats.file_bytes = file.metadata().map_err(io_at(out))?.len();
        std::fs::rename(&tmp, out).map_err(io_at(out))?;
        env.sync_dir(&parent_dir(out)).map_err(io_at(out))?;
        progress(size, size);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|_| stats)
}

/// Reads a backup's header.
pub fn read_header(path: &Path) -> Result<BackupHeader> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact(&mut h).map_err(|e| Error::BadBackup {
        path: path.to_path_buf(),
        what: format!("truncated header: {e}"),
    })?;
    BackupHeader::decode(path, &h)
}

/// `img restore [-b BASE] BACKUP OUT`: OUT becomes a sealed layer with the
/// backed-up snapshot's uuid and content (on BASE for a delta). Every
/// record is checked before OUT appears; a bad backup leaves nothing.
pub fn restore(
    env: &Arc<dyn Env>,
    backup: &Path,
    base: Option<&Path>,
    out: &Path,
    progress: Progress,
) -> Result<BackupStats> {
    let header = read_header(backup)?;
    if env.exists(out) {
        return Err(invalid(out, "already exists"));
    }
    let parent = match (header.base_uuid, base) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(invalid(
                backup,
                "a full backup needs no base (-b); restore it on its own",
            ))
        }
        (Some(u), None) => {
            return Err(invalid(
                backup,
                format!("a delta backup: restore it with -b on the snapshot with uuid {u}"),
            ))
        }
        (Some(u), Some(b)) => {
            let chain = open_chain(env.as_ref(), b, false)?;
            let l = &chain[0];
            if l.header.uuid != u {
                return Err(invalid(
                    b,
                    format!("uuid {} is not the delta's base {u}", l.header.uuid),
                ));
            }
            if !l.header.sealed() {
                return Err(invalid(b, "the base must be sealed (a snapshot)"));
            }
            if l.header.virtual_size > header.virtual_size
                || l.header.block_size != header.block_size
            {
                return Err(invalid(b, "geometry differs from the backup's"));
            }
            Some((relative_parent_path(out, b)?, u))
        }
    };
    let tmp: PathBuf = sibling(
        out,
        format!(
            ".{}.restore-tmp",
            out.file_name().unwrap_or_default().to_string_lossy()
        ),
    );
    Layer::create(
        env.as_ref(),
        &tmp,
        &NewLayer {
            virtual_size: header.virtual_size,
            block_size: header.block_size,
            parent,
            sealed: false,
            name: header.name.clone(),
            uuid: Some(header.snapshot_uuid),
        },
    )?;
    let result = (|| -> Result<BackupStats> {
        let mut disk = Disk::open(Arc::clone(env), &tmp, true)?;
        let stats = apply_records(backup, &header, &mut disk, progress)?;
        disk.close()?;
        let mut l = Layer::open(env.as_ref(), &tmp, true)?;
        l.update_header(|h| h.flags |= FLAG_SEALED)?;
        env.rename(&tmp, out).map_err(io_at(out))?;
        env.sync_dir(&parent_dir(out)).map_err(io_at(out))?;
        Ok(stats)
    })()
    .map_err(|e| e.renamed(&tmp, out));
    if result.is_err() {
        let _ = env.remove(&tmp);
    }
    result
}

fn apply_records(
    path: &Path,
    header: &BackupHeader,
    disk: &mut Disk,
    progress: Progress,
) -> Result<BackupStats> {
    let bad = |what: String| Error::BadBackup {
        path: path.to_path_buf(),
        what,
    };
    let file = File::open(path).map_err(io_at(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut skip = [0u8; HEADER_LEN];
    r.read_exact(&mut skip).map_err(io_at(path))?;
    let mut stats = BackupStats::default();
    let mut stream_crc = 0u32;
    let mut buf = AlignedBuf::new(MAX_RECORD as usize);
    let bs = header.block_size as u64;
    loop {
        let mut rec = [0u8; 24];
        r.read_exact(&mut rec).map_err(|_| {
            bad(format!(
                "truncated after {} records (no end record)",
                stats.records
            ))
        })?;
        let offset = u64::from_le_bytes(rec[0..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
        let kind = u32::from_le_bytes(rec[16..20].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(rec[20..24].try_into().expect("4 bytes"));
        if kind == KIND_END {
            if len != stats.records || crc != stream_crc {
                return Err(bad(format!(
                    "end record says {len} records (crc {crc:#x}), the stream has {} (crc {stream_crc:#x})",
                    stats.records
                )));
            }
            return Ok(stats);
        }
        stream_crc = crc32c::crc32c_append(stream_crc, &rec);
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= header.virtual_size);
        if !in_range || len == 0 || offset % bs != 0 || len % bs != 0 {
            return Err(bad(format!(
                "record {} ({offset}+{len}) is outside the disk or not block-aligned",
                stats.records
            )));
        }
        match kind {
            KIND_DATA => {
                if len > MAX_RECORD {
                    return Err(bad(format!("record {} is too long ({len})", stats.records)));
                }
                let data = &mut buf[..len as usize];
                r.read_exact(data)
                    .map_err(|_| bad(format!("record {} truncated", stats.records)))?;
                if crc32c::crc32c(data) != crc {
                    return Err(bad(format!(
                        "record {} at offset {offset}: data checksum mismatch",
                        stats.records
                    )));
                }
                disk.write_at(data, offset)?;
                stats.data_bytes += len;
            }
            KIND_ZERO => {
                disk.write_zeroes(offset, len)?;
                stats.zero_bytes += len;
            }
            other => {
                return Err(bad(format!(
                    "record {} has unknown kind {other}",
                    stats.records
                )))
            }
        }
        stats.records += 1;
        progress(offset + len, header.virtual_size);
    }
}
