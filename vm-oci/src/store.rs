//! A host's pulled images: sealed layers keyed by uuid (a layer pulled
//! once is never pulled again, nor stored twice), kernels by digest, and a
//! record per image reference naming its top layer.
//!
//! ```text
//! ROOT/layers/UUID.img           a sealed layer, its parent UUID.img beside it
//! ROOT/kernels/HEX/kernel|initrd  a kernel layer's files, by its digest
//! ROOT/states/HEX/state|memory   a VM snapshot's state layer's files
//! ROOT/refs/ESCAPED.json          what a reference pulled: its top, defaults
//! ROOT/blobs/UUID.json            a sealed layer's blob digest, once known
//! ROOT/tmp/                       work in progress (blobs, backups)
//! ROOT/lock                       held while a pull or a removal runs
//! ```
//!
//! Every step ends in a rename: a layer is there whole or not at all (the
//! restore writes a hidden file beside it first), so a pull that was
//! killed, ran out of disk or lost its registry leaves finished layers,
//! which the next pull keeps, and work files, which the next one removes.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::layout::VmDefaults;
use crate::{Error, Result};

/// What a pull of one reference left in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub reference: String,
    /// The manifest's digest, as the registry served it.
    pub manifest_digest: String,
    /// The disk's layers, bottom first.
    pub layers: Vec<Uuid>,
    pub virtual_size: u64,
    pub defaults: VmDefaults,
    /// The kernel layer's digest (its files under `kernels/`), if any.
    pub kernel_digest: Option<String>,
    pub has_initrd: bool,
    /// A VM snapshot's state layer's digest (its files under `states/`),
    /// if the image is one.
    #[serde(default)]
    pub vm_state_digest: Option<String>,
}

pub struct Store {
    root: PathBuf,
}

/// A sealed layer's blob, and the repositories (`registry/repository`)
/// it is known to be in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownBlob {
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub repositories: Vec<String>,
}

/// The store held by one process (a pull, a removal): released on drop.
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// The store at `root`, made if missing.
    pub fn open(root: &Path) -> Result<Store> {
        for d in ["layers", "kernels", "refs", "tmp", "blobs"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(Error::io(&p))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Waits for any other pull or removal in this store, then holds it;
    /// what a dead holder left half done is cleaned first.
    pub fn lock(&self) -> Result<StoreLock> {
        let p = self.root.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(Error::io(&p))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(&p)(e.into()))?;
        let lock = StoreLock { _file: file };
        self.clean()?;
        Ok(lock)
    }

    /// Removes what an unfinished operation left: work files, and a
    /// restore's hidden layer or a half-made kernel directory.
    fn clean(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(Error::io(&tmp))?.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
        let layers = self.root.join("layers");
        for e in std::fs::read_dir(&layers)
            .map_err(Error::io(&layers))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with("-tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// A work file's path (under the lock: nobody else works here).
    pub fn work(&self, name: &str) -> PathBuf {
        self.root.join("tmp").join(name)
    }

    pub fn layer_path(&self, uuid: Uuid) -> PathBuf {
        self.root.join("layers").join(format!("{uuid}.img"))
    }

    /// Whether layer `uuid` is here, sealed, on `parent`.
    pub fn has_layer(&self, uuid: Uuid, parent: Option<Uuid>) -> bool {
        let p = self.layer_path(uuid);
        match image_format::Layer::open(&image_format::RealEnv, &p, false) {
            Ok(l) => l.header.sealed() && l.header.uuid == uuid && l.header.parent_uuid == parent,
            Err(_) => false,
        }
    }

    /// What is known of sealed layer `uuid`'s blob (it never changes: a
    /// sealed layer does not).
    pub fn blob_of(&self, uuid: Uuid) -> Option<KnownBlob> {
        let p = self.root.join("blobs").join(format!("{uuid}.json"));
        serde_json::from_slice(&std::fs::read(p).ok()?).ok()
    }

    /// Remembers layer `uuid`'s blob (a push made or found it, a pull
    /// fetched it) and that `repository` holds it.
    pub fn remember_blob(
        &self,
        uuid: Uuid,
        digest: &str,
        size: u64,
        repository: &str,
    ) -> Result<()> {
        let p = self.root.join("blobs").join(format!("{uuid}.json"));
        let tmp = self
            .root
            .join("blobs")
            .join(format!(".{uuid}.{}", std::process::id()));
        let mut known = self
            .blob_of(uuid)
            .filter(|k| k.digest == digest)
            .unwrap_or(KnownBlob {
                digest: digest.to_string(),
                size,
                repositories: Vec::new(),
            });
        if !known.repositories.iter().any(|r| r == repository) {
            known.repositories.push(repository.to_string());
        }
        std::fs::write(&tmp, serde_json::to_vec(&known).expect("serializes"))
            .map_err(Error::io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(Error::io(&p))
    }

    pub fn kernel_dir(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("kernels").join(hex)
    }

    /// A VM snapshot's state and memory (`state`, `memory`), by its
    /// layer's digest.
    pub fn vm_state_dir(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("states").join(hex)
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", escape(reference)))
    }

    /// The record of `reference`, if it was pulled.
    pub fn record(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let p = self.record_path(reference);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Error::io(&p)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&p)(e)),
        }
    }

    /// Writes `r` as its reference's record (atomically: the old one or
    /// the new one, never half).
    pub fn write_record(&self, r: &ImageRecord) -> Result<()> {
        let p = self.record_path(&r.reference);
        let tmp = self.work(&format!("record-{}", escape(&r.reference)));
        let bytes = serde_json::to_vec_pretty(r).expect("a record serializes");
        std::fs::write(&tmp, bytes).map_err(Error::io(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(Error::io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(Error::io(&p))
    }

    /// Every record, by reference.
    pub fn records(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(Error::io(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some(r) = self.record(&unescape(stem))? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Forgets `reference` (its layers stay until a prune finds nothing
    /// uses them).
    pub fn remove_record(&self, reference: &str) -> Result<bool> {
        let p = self.record_path(reference);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(&p)(e)),
        }
    }
}

/// A reference as a file name: bytes other than letters, digits, '.' and
/// '-' as %XX, so that two references never share a name.
fn escape(reference: &str) -> String {
    let mut s = String::new();
    for b in reference.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn unescape(name: &str) -> String {
    let b = name.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&name[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_make_distinct_file_names_that_read_back() {
        for r in [
            "127.0.0.1:5000/vm/base:golden",
            "127.0.0.1:5000/vm_base:golden",
            "registry.example/a/b@sha256:00ff",
        ] {
            assert_eq!(unescape(&escape(r)), r);
            assert!(!escape(r).contains('/'));
        }
        assert_ne!(escape("a/b:c"), escape("a_b:c"));
    }

    #[test]
    fn records_are_written_whole_and_listed_and_a_lock_cleans_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let r = ImageRecord {
            reference: "127.0.0.1:5000/vm:1".into(),
            manifest_digest: "sha256:ab".into(),
            layers: vec![Uuid::from_u128(5)],
            virtual_size: 1 << 20,
            defaults: VmDefaults::default(),
            kernel_digest: None,
            has_initrd: false,
            vm_state_digest: None,
        };
        s.write_record(&r).unwrap();
        assert_eq!(s.record(&r.reference).unwrap(), Some(r.clone()));
        assert_eq!(s.records().unwrap(), vec![r.clone()]);
        std::fs::write(s.work("half.tar"), b"x").unwrap();
        std::fs::write(dir.path().join("layers/.x.img.restore-tmp"), b"x").unwrap();
        let _l = s.lock().unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(!dir.path().join("layers/.x.img.restore-tmp").exists());
        assert!(s.remove_record(&r.reference).unwrap());
        assert_eq!(s.records().unwrap(), vec![]);
    }
}
