//! VM images as ordinary OCI container images (`layout`), kept on a host
//! in a store of sealed layers keyed by uuid (`store`), moved to and from
//! any registry by `push` and `pull` (over `registry`, oci-client on a
//! private tokio runtime): only what the other side lacks travels.

pub mod layout;
pub mod pull;
pub mod push;
pub mod registry;
pub mod sparse;
pub mod store;
pub mod unpacked;

use std::path::{Path, PathBuf};

pub use layout::VmDefaults;
pub use pull::{pull, Pulled};
pub use push::{push, PushReport, PushSource};
pub use registry::{Registry, RegistryOptions};
pub use store::Store;
pub use unpacked::Imported;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0:?} is not an image reference (registry/repository:tag, as docker writes them): {1}"
    )]
    BadReference(String, String),
    #[error("registry {registry}: {what}")]
    Registry { registry: String, what: String },
    #[error("not a VM image of this layout: {0}")]
    NotOurs(String),
    #[error("the image's layout: {0}")]
    Layout(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] image_format::Error),
}

impl Error {
    /// An I/O error on `path`, for `map_err`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One blob of a push or a pull.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Blob {
    /// The disk layer's uuid (none: the kernel layer or the config).
    pub uuid: Option<uuid::Uuid>,
    pub digest: String,
    pub size: u64,
    /// Whether it crossed: uploaded by a push, fetched by a pull (false:
    /// the other side had it).
    pub transferred: bool,
}

/// Bytes of `blobs` that crossed.
pub fn transferred_bytes(blobs: &[Blob]) -> u64 {
    blobs.iter().filter(|b| b.transferred).map(|b| b.size).sum()
}
