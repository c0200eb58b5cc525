//! The scratch files: where they go, how they are made, compared and
//! removed.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::{DATA_SEED, MIB};

/// A scratch directory removed on drop, so an error half-way does not leave
/// gigabytes behind.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(parent: &Path, tag: &str) -> Result<Scratch> {
        let path = parent.join(format!("bench-image-{tag}-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        // Not create_dir_all: a mistyped parent is an error, not a new tree.
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Bytes free for an unprivileged user on `path`'s filesystem.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs only writes the struct it is given; an all-zero
    // statvfs is a valid value of that plain C struct.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `s` is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    Ok(s.f_bavail * s.f_frsize)
}

/// Removes `path`; that it is not there is no error.
pub fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Bytes the file occupies on disk (not its length).
pub fn allocated_bytes(path: &Path) -> Result<u64> {
    let m = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(m.blocks() * 512)
}

/// A file of `size` incompressible bytes, synced, so that neither a
/// compressing converter nor background writeback skews what comes after.
pub fn write_random_file(path: &Path, size: u64) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut rng = StdRng::seed_from_u64(DATA_SEED);
    let mut buf = vec![0u8; (8 * MIB).min(size) as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all_at(&buf[..n], off)
            .with_context(|| format!("writing {}", path.display()))?;
        off += n as u64;
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Byte-for-byte comparison (the strongest "same hash").
pub fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let fa = File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let fb = File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let len = fa.metadata()?.len();
    if fb.metadata()?.len() != len {
        return Ok(false);
    }
    let chunk = 8 * MIB;
    let (mut x, mut y) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk) as usize;
        fa.read_exact_at(&mut x[..n], off)
            .with_context(|| format!("reading {}", a.display()))?;
        fb.read_exact_at(&mut y[..n], off)
            .with_context(|| format!("reading {}", b.display()))?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}
