//! A sparse file (a VM snapshot's guest memory) as one tar entry of GNU
//! tar's sparse format ('S': a map of data extents, then only their
//! bytes), which GNU tar, Go's archive/tar (containerd) and the `tar`
//! crate all read. The extents come from the file's content, not from
//! how a filesystem happens to store it: runs of 4 KiB blocks that are
//! not all zeros. So the same memory is the same entry, byte for byte, on
//! every host, and an untouched page costs nothing.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Error, Result};

/// The unit of the extent map: a page.
pub const GRAIN: u64 = 4096;

/// The data extents (offset, length) of `path`: maximal runs of GRAIN
/// blocks that hold a byte other than zero, in order. Holes the
/// filesystem reports are skipped unread.
pub fn data_extents(path: &Path) -> Result<Vec<(u64, u64)>> {
    let file = File::open(path).map_err(Error::io(path))?;
    let size = file.metadata().map_err(Error::io(path))?.len();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        // The next region the filesystem stores (ENXIO: none is left).
        let data = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(Error::io(path)(e.into())),
        };
        let hole = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(data))
            .map_err(|e| Error::io(path)(e.into()))?
            .min(size);
        let mut at = data - data % GRAIN;
        while at < hole {
            let n = (buf.len() as u64).min(size - at) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(Error::io(path))?;
            for (k, block) in buf[..n].chunks(GRAIN as usize).enumerate() {
                if block.iter().all(|&b| b == 0) {
                    continue;
                }
                let off = at + k as u64 * GRAIN;
                let len = block.len() as u64;
                match extents.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => extents.push((off, len)),
                }
            }
            at += n as u64;
        }
        pos = hole.max(at);
    }
    Ok(extents)
}

/// The entry's header and its extension blocks: `name`, a file of
/// `real_size` bytes whose data is `extents` (stored after the header,
/// in order, padded to a whole block at the end). Fixed owner, mode and
/// time, as the layout's other entries.
pub fn header_blocks(name: &str, real_size: u64, extents: &[(u64, u64)]) -> Result<Vec<u8>> {
    let bad = |e: std::io::Error| Error::Layout(format!("tar entry {name}: {e}"));
    // The map ends at the file's end (a final empty extent there, as GNU
    // tar writes it), so a file ending in a hole keeps its size.
    let mut map: Vec<(u64, u64)> = extents.to_vec();
    map.push((real_size, 0));
    let stored: u64 = extents.iter().map(|e| e.1).sum();
    let mut h = tar::Header::new_gnu();
    h.set_path(name).map_err(bad)?;
    h.set_size(stored);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::GNUSparse);
    let (first, rest) = map.split_at(map.len().min(4));
    {
        let g = h.as_gnu_mut().expect("a GNU header");
        for (slot, (off, len)) in g.sparse.iter_mut().zip(first) {
            slot.set_offset(*off);
            slot.set_length(*len);
        }
        g.set_real_size(real_size);
        g.set_is_extended(!rest.is_empty());
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
    for (k, chunk) in chunks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, (off, len)) in ext.sparse_mut().iter_mut().zip(chunk.iter()) {
            slot.set_offset(*off);
            slot.set_length(*len);
        }
        ext.set_is_extended(k + 1 < chunks.len());
        out.extend_from_slice(ext.as_bytes());
    }
    Ok(out)
}

/// Writes what `entry` (a sparse entry or a plain one) holds into `to`,
/// leaving holes where it reads zeros, at its full size.
pub fn unpack(entry: &mut dyn Read, real_size: u64, to: &Path) -> Result<()> {
    let mut out = File::create(to).map_err(Error::io(to))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = read_full(entry, &mut buf).map_err(Error::io(to))?;
        if n == 0 {
            break;
        }
        for block in buf[..n].chunks(GRAIN as usize) {
            if block.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(block.len() as i64))
                    .map_err(Error::io(to))?;
            } else {
                out.write_all(block).map_err(Error::io(to))?;
            }
        }
        at += n as u64;
    }
    if at != real_size {
        return Err(Error::Layout(format!(
            "{}: the entry held {at} bytes, not {real_size}",
            to.display()
        )));
    }
    out.set_len(real_size).map_err(Error::io(to))?;
    out.sync_all().map_err(Error::io(to))
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `size` with data at `at` (offset, byte, length).
    fn sparse_file(dir: &Path, size: u64, at: &[(u64, u8, usize)]) -> std::path::PathBuf {
        let p = dir.join("memory");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        for (off, byte, len) in at {
            f.write_all_at(&vec![*byte; *len], *off).unwrap();
        }
        p
    }

    #[test]
    fn a_sparse_file_travels_as_its_data_and_comes_back_whole_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        // 40 MiB: data in 30 scattered pages (more than one extension
        // block of map), a zero page written inside data, a hole at the end.
        let size = 40u64 << 20;
        let mut at: Vec<(u64, u8, usize)> = (0..30)
            .map(|k| (k * (1 << 20) + 4096, k as u8 + 1, 4096))
            .collect();
        at.push(((4 << 20) + 16384, 0, 8192));
        at.push(((5 << 20) + 65536, 7, 12288));
        let src = sparse_file(dir.path(), size, &at);
        let extents = data_extents(&src).unwrap();
        assert_eq!(extents.len(), 31, "{extents:?}");
        assert!(extents.contains(&((5 << 20) + 65536, 12288)), "{extents:?}");
        let head = header_blocks("vm/snapshot/memory", size, &extents).unwrap();
        assert_eq!(
            head,
            header_blocks("vm/snapshot/memory", size, &data_extents(&src).unwrap()).unwrap(),
            "deterministic"
        );
        // The tar: header, data extents, padding, end.
        let mut tar = head.clone();
        let f = File::open(&src).unwrap();
        for (off, len) in &extents {
            let mut b = vec![0; *len as usize];
            f.read_exact_at(&mut b, *off).unwrap();
            tar.extend_from_slice(&b);
        }
        tar.extend_from_slice(&crate::layout::TAR_END);
        let stored = tar.len() as u64;
        assert!(
            stored < 1 << 20,
            "{stored} bytes for 40 MiB of mostly holes"
        );
        let mut archive = tar::Archive::new(std::io::Cursor::new(tar));
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some("vm/snapshot/memory"));
        let back = dir.path().join("back");
        unpack(&mut entry, size, &back).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&back).unwrap()) * 512;
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");
        // A wrong size is an error naming it.
        let e = unpack(&mut std::io::Cursor::new(vec![1u8; 512]), 4096, &back).unwrap_err();
        assert!(e.to_string().contains("not 4096"), "{e}");
    }
}
