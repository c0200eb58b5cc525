//! Guest memory in a snapshot: the memfd's bytes in a sparse file of the
//! same size. Only what the guest touched is copied (the memfd's data
//! ranges, found with SEEK_DATA/SEEK_HOLE), and pages of zeros within
//! them stay holes, so a snapshot of a VM that used 20 MiB of its 2 GiB
//! takes 20 MiB on disk, and a restore copies no more.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// What is copied and tested for zeros at a time.
const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

#[derive(Debug, Error)]
pub enum MemoryFileError {
    #[error("guest memory: {what}: {source}")]
    Memfd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds {found} bytes of guest memory; the snapshot's VM has {expected}", path.display())]
    Size {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
}

/// The next data range at or after `from` in `f` (before `end`), by
/// SEEK_DATA and SEEK_HOLE; `None` past the last.
pub(crate) fn next_data(f: &File, from: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    if from >= end {
        return Ok(None);
    }
    let seek = |whence| {
        // SAFETY: lseek on a descriptor we hold; no memory is involved.
        let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    let start = match seek(libc::SEEK_DATA) {
        Ok(s) => s,
        // ENXIO: no data at or after `from`.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    if start >= end {
        return Ok(None);
    }
    // SEEK_HOLE from the data found (a file's end counts as a hole).
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), start as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((start, (hole as u64).min(end))))
}

/// Copies the data of `src` (its first `len` bytes) into `dst` at the
/// same offsets, leaving holes where `src` has holes or pages of zeros.
/// Returns the bytes written.
fn copy_sparse(
    src: &File,
    dst: &File,
    len: u64,
    read_err: &dyn Fn(std::io::Error) -> MemoryFileError,
    write_err: &dyn Fn(std::io::Error) -> MemoryFileError,
) -> Result<u64, MemoryFileError> {
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut at = 0u64;
    while let Some((start, end)) = next_data(src, at, len).map_err(read_err)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], off).map_err(read_err)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    dst.write_all_at(page, off + (i * PAGE) as u64)
                        .map_err(write_err)?;
                    written += page.len() as u64;
                }
            }
            off += n as u64;
        }
        at = end;
    }
    Ok(written)
}

/// Saves `len` bytes of guest memory from `memfd` into a new sparse file
/// at `path`. Returns the bytes of data it holds.
pub fn save(memfd: &File, len: u64, path: &Path) -> Result<u64, MemoryFileError> {
    let file_err = |source| MemoryFileError::File {
        path: path.to_path_buf(),
        source,
    };
    let dst = File::create(path).map_err(file_err)?;
    dst.set_len(len).map_err(file_err)?;
    let written = copy_sparse(
        memfd,
        &dst,
        len,
        &|source| MemoryFileError::Memfd {
            what: "reading it",
            source,
        },
        &|source| MemoryFileError::File {
            path: path.to_path_buf(),
            source,
        },
    )?;
    dst.sync_all().map_err(file_err)?;
    Ok(written)
}

/// Fills a fresh (all holes) memfd of `len` bytes from the file `path`
/// saved by [`save`]. Returns the bytes copied.
pub fn load(path: &Path, memfd: &File, len: u64) -> Result<u64, MemoryFileError> {
    let file_err = |source| MemoryFileError::File {
        path: path.to_path_buf(),
        source,
    };
    let src = File::open(path).map_err(file_err)?;
    let found = src.metadata().map_err(file_err)?.len();
    if found != len {
        return Err(MemoryFileError::Size {
            path: path.to_path_buf(),
            expected: len,
            found,
        });
    }
    copy_sparse(
        &src,
        memfd,
        len,
        &|source| MemoryFileError::File {
            path: path.to_path_buf(),
            source,
        },
        &|source| MemoryFileError::Memfd {
            what: "writing it",
            source,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn memfd(len: u64) -> File {
        let ram = crate::memory::create(len).expect("guest memory");
        ram.file
    }

    #[test]
    fn only_what_the_guest_touched_is_saved_and_it_comes_back_whole() {
        let len = 64 << 20;
        let src = memfd(len);
        // Touched: two runs of data, a page of zeros written (touched, but
        // zeros), and the very last page.
        src.write_all_at(&[0xa5; 3 * PAGE], 5 * PAGE as u64)
            .expect("w");
        src.write_all_at(&[0u8; PAGE], 40 * PAGE as u64).expect("w");
        src.write_all_at(b"tail", len - 4).expect("w");
        src.write_all_at(&vec![0x3c; 2 << 20], 16 << 20).expect("w");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("memory");
        let saved = save(&src, len, &path).expect("save");
        assert_eq!(saved, (3 * PAGE + PAGE + (2 << 20)) as u64);
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), len, "the file has the memory's size");
        assert!(
            meta.blocks() * 512 <= saved + (64 << 10),
            "sparse: {} bytes allocated for {saved} of data",
            meta.blocks() * 512
        );
        let dst = memfd(len);
        assert_eq!(load(&path, &dst, len).expect("load"), saved);
        let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        for off in (0..len).step_by(CHUNK) {
            src.read_exact_at(&mut a, off).expect("r");
            dst.read_exact_at(&mut b, off).expect("r");
            assert!(a == b, "memory differs in the MiB at {off:#x}");
        }
    }

    #[test]
    fn a_memory_file_of_another_size_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("memory");
        save(&memfd(8 << 20), 8 << 20, &path).expect("save");
        let e = load(&path, &memfd(16 << 20), 16 << 20).expect_err("wrong size");
        assert!(matches!(e, MemoryFileError::Size { .. }), "{e}");
        assert!(e.to_string().contains("16777216"), "{e}");
    }
}
