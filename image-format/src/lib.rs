//! Sparse copy-on-write snapshot layers: the on-disk format (FORMAT.md), the
//! chain library with its merged index, and the operations behind `img`.

pub mod dependants;
pub mod disk;
pub mod error;
pub mod header;
pub mod index;
pub mod layer;
pub mod lock;
pub mod map;
pub mod qcow2;
pub mod shadow;
pub mod sim;
pub mod storage;

pub use disk::{ChainView, Disk, Extent, IndexChange, Source};
pub use error::{Error, Result};
pub use layer::{Layer, NewLayer};
pub use map::BlockState;
pub use storage::{Env, RealEnv, Storage, VolatileEnv};
pub mod backup;
pub mod check;
pub mod compare;
pub mod convert;
pub mod export;
pub mod info;
pub mod ops;
