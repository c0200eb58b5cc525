//! A snapshot's state file: a fixed header, then the state as JSON.
//!
//! ```text
//! 0   8  magic "vmm-snap"
//! 8   4  format version (little endian)
//! 12  4  CRC-32C of the body
//! 16  8  body length in bytes
//! 24  .. body: the state, JSON
//! ```
//!
//! The version is checked before anything else is read, the length and
//! checksum before the body is parsed: a truncated, corrupted or foreign
//! file is refused by name, never half-restored. The file is written
//! beside its final name, flushed, then renamed over it, so a crash while
//! saving leaves the old state or none, never a torn one.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

const MAGIC: &[u8; 8] = b"vmm-snap";
const HEADER: usize = 24;

/// The state format this vmm writes and reads.
pub const VERSION: u32 = 1;

/// Larger than any state a VM has (vCPUs' XSAVE areas are the bulk: a few
/// KiB each), so a corrupted length cannot make the reader allocate
/// without bound.
const MAX_BODY: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a vmm snapshot state file", path.display())]
    NotAState { path: PathBuf },
    #[error(
        "{} is snapshot format version {found}; this vmm reads version {supported}",
        path.display()
    )]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{} is truncated: its header promises {expected} bytes of state, {found} are there", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{} is corrupted: its state does not match its checksum", path.display())]
    Checksum { path: PathBuf },
    #[error("{}: the state does not parse: {source}", path.display())]
    Body {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateFileError + '_ {
    move |source| StateFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `state` to `path` (atomically: a temporary file renamed over it).
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), StateFileError> {
    let body = serde_json::to_vec(state).map_err(|source| StateFileError::Body {
        path: path.to_path_buf(),
        source,
    })?;
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    header[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&header).map_err(io(&tmp))?;
    f.write_all(&body).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads the state in `path`, refusing a file that is not a whole,
/// intact state of this format version.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match f.read(&mut header[got..]).map_err(io(path))? {
            0 => break,
            n => got += n,
        }
    }
    if got < 8 || &header[..8] != MAGIC {
        return Err(StateFileError::NotAState {
            path: path.to_path_buf(),
        });
    }
    if got < HEADER {
        return Err(StateFileError::Truncated {
            path: path.to_path_buf(),
            expected: HEADER as u64,
            found: got as u64,
        });
    }
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(StateFileError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: VERSION,
        });
    }
    let crc = u32_at(12);
    let len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    let on_disk = f
        .metadata()
        .map_err(io(path))?
        .len()
        .saturating_sub(HEADER as u64);
    if len > MAX_BODY || on_disk < len {
        return Err(StateFileError::Truncated {
            path: path.to_path_buf(),
            expected: len,
            found: on_disk,
        });
    }
    let mut body = vec![0u8; len as usize];
    f.read_exact(&mut body).map_err(io(path))?;
    if crc32c::crc32c(&body) != crc {
        return Err(StateFileError::Checksum {
            path: path.to_path_buf(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| StateFileError::Body {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        regs: Vec<u64>,
    }

    fn state() -> State {
        State {
            name: "vm".into(),
            regs: (0..64).collect(),
        }
    }

    #[test]
    fn a_state_reads_back_as_written() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("state");
        write(&p, &state()).expect("write");
        assert_eq!(read::<State>(&p).expect("read"), state());
        assert!(
            !p.with_extension("tmp").exists(),
            "the temporary file is gone"
        );
    }

    #[test]
    fn a_damaged_or_foreign_state_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("state");
        write(&p, &state()).expect("write");
        let good = std::fs::read(&p).expect("bytes");
        type Check = fn(&StateFileError) -> bool;
        let mut cases: Vec<(&str, Vec<u8>, Check)> = Vec::new();
        cases.push(("truncated body", good[..good.len() - 5].to_vec(), |e| {
            matches!(e, StateFileError::Truncated { .. })
        }));
        cases.push(("truncated header", good[..12].to_vec(), |e| {
            matches!(e, StateFileError::Truncated { .. })
        }));
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x20;
        cases.push(("a flipped bit", flipped, |e| {
            matches!(e, StateFileError::Checksum { .. })
        }));
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        cases.push((
            "another version",
            newer,
            |e| matches!(e, StateFileError::Version { found, .. } if *found == VERSION + 1),
        ));
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(("an impossible length", huge, |e| {
            matches!(e, StateFileError::Truncated { .. })
        }));
        cases.push(("not a state", b"{\"name\": \"vm\"}".to_vec(), |e| {
            matches!(e, StateFileError::NotAState { .. })
        }));
        cases.push(("empty", Vec::new(), |e| {
            matches!(e, StateFileError::NotAState { .. })
        }));
        for (what, bytes, expected) in cases {
            std::fs::write(&p, &bytes).expect("write");
            let e = read::<State>(&p).expect_err(what);
            assert!(expected(&e), "{what}: {e}");
            assert!(e.to_string().contains("state"), "{what}: {e}");
        }
        std::fs::remove_file(&p).expect("rm");
        assert!(matches!(read::<State>(&p), Err(StateFileError::Io { .. })));
    }
}
