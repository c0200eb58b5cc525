//! Every error names the file and the problem.

use std::io;
use std::path::PathBuf;

use crate::header::HeaderError;
use crate::map::MapError;
use crate::qcow2::Qcow2Error;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{path}: truncated: the file is {actual} bytes, its header needs {needed}")]
    Truncated {
        path: PathBuf,
        actual: u64,
        needed: u64,
    },
    #[error("{path}: corrupt allocation map: {source}")]
    CorruptMap {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("{path}: parent {parent} cannot be opened: {source}")]
    MissingParent {
        path: PathBuf,
        parent: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: parent {parent} has uuid {found}, this layer expects {expected}")]
    ParentUuidMismatch {
        path: PathBuf,
        parent: PathBuf,
        expected: uuid::Uuid,
        found: uuid::Uuid,
    },
    #[error("{path}: the chain has a cycle: parent {parent} is already in it")]
    Cycle { path: PathBuf, parent: PathBuf },
    #[error(
        "{path}: chain deeper than {max} layers, more than img opens; \
         rebase it onto a layer further down (`img rebase -b {} {path}` \
         copies what its parent holds into it: one layer fewer)",
        skip_to.display()
    )]
    ChainTooDeep {
        path: PathBuf,
        max: usize,
        /// The top's grandparent: a base the rebase can open.
        skip_to: PathBuf,
    },
    #[error("{path}: parent {parent} is {parent_size} bytes, larger than this layer's {size}")]
    SizeMismatch {
        path: PathBuf,
        parent: PathBuf,
        size: u64,
        parent_size: u64,
    },
    #[error("{path}: parent {parent} has block size {parent_block}, this layer {block}")]
    BlockSizeMismatch {
        path: PathBuf,
        parent: PathBuf,
        block: u32,
        parent_block: u32,
    },
    #[error("{path}: parent {parent} is neither sealed nor closed cleanly (open for writing elsewhere?), so it could still change under this layer")]
    ParentNotSealed { path: PathBuf, parent: PathBuf },
    #[error("{path}: the layer is sealed (a snapshot); write to a clone of it instead")]
    Sealed { path: PathBuf },
    #[error("{path}: opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("{path}: range {offset}+{len} is past the end of the {size}-byte disk")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: bad backup: {what}")]
    BadBackup { path: PathBuf, what: String },
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `map_err(io_at(path))`: an I/O error that names its file.
pub fn io_at(path: &std::path::Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn invalid(path: &std::path::Path, what: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

impl Error {
    /// The same error naming `to` where it named `from`: an operation that
    /// builds its result in a temporary file reports the file the user
    /// asked for, never the temporary one.
    pub fn renamed(mut self, from: &std::path::Path, to: &std::path::Path) -> Error {
        match &mut self {
            Error::Io { path, .. }
            | Error::Header { path, .. }
            | Error::Truncated { path, .. }
            | Error::CorruptMap { path, .. }
            | Error::Sealed { path }
            | Error::ReadOnly { path }
            | Error::OutOfRange { path, .. }
            | Error::Invalid { path, .. }
            | Error::BadBackup { path, .. }
                if path.as_path() == from =>
            {
                *path = to.to_path_buf();
            }
            Error::Qcow2(
                Qcow2Error::Io { path, .. }
                | Qcow2Error::NotQcow2 { path }
                | Qcow2Error::Unsupported { path, .. }
                | Qcow2Error::Corrupt { path, .. }
                | Qcow2Error::InvalidArgument { path, .. },
            ) if path.as_path() == from => {
                *path = to.to_path_buf();
            }
            _ => {}
        }
        self
    }
}
