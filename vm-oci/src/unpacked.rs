//! A VM image another program unpacked: containerd's snapshotter turns
//! each tar layer of an image into a directory (`vm/layers/UUID.backup`,
//! or `vm/kernel` and `vm/initrd`), and the containerd shim hands those
//! directories here, bottom first. Each disk layer the store lacks is
//! restored into it from the unpacked backup (verified as a pull verifies
//! it); a layer the store has is taken as it is, so an image containerd
//! and vmctl both hold is on disk once in the store (containerd's copy is
//! the compact backup). The kernel layer's key is the digest its tar has
//! in the registry: the layout's tars are deterministic, so hashing the
//! tar the files make gives it back without the registry.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{layout, Error, Result, Store};

/// What `import` made of an unpacked image: the files a VM runs from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Imported {
    /// The disk's layers, bottom first.
    pub layers: Vec<Uuid>,
    /// The top layer in the store (what a VM's disk clones).
    pub top: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The layers restored now (the others were in the store).
    pub restored: Vec<Uuid>,
}

/// What one unpacked layer directory holds.
enum Unpacked {
    Disk { uuid: Uuid, backup: PathBuf },
    Kernel { files: Vec<(String, PathBuf)> },
}

fn classify(dir: &Path) -> Result<Unpacked> {
    let not_ours = |what: &str| {
        Error::NotOurs(format!(
            "the unpacked layer {} {what} (a VM image has vm/layers/UUID.backup or vm/kernel in each layer)",
            dir.display()
        ))
    };
    let kernel = dir.join(layout::KERNEL_ENTRY);
    if kernel.is_file() {
        let mut files = vec![(layout::KERNEL_ENTRY.to_string(), kernel)];
        let initrd = dir.join(layout::INITRD_ENTRY);
        if initrd.is_file() {
            files.push((layout::INITRD_ENTRY.to_string(), initrd));
        }
        return Ok(Unpacked::Kernel { files });
    }
    let layers = dir.join("vm/layers");
    let entries = std::fs::read_dir(&layers).map_err(|_| not_ours("has neither"))?;
    let mut found = Vec::new();
    for e in entries {
        let e = e.map_err(Error::io(&layers))?;
        found.push(e.file_name().to_string_lossy().into_owned());
    }
    let [name] = found.as_slice() else {
        return Err(not_ours(&format!(
            "holds {} files in vm/layers, not one",
            found.len()
        )));
    };
    let uuid = name
        .strip_suffix(".backup")
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| not_ours(&format!("holds vm/layers/{name}, not UUID.backup")))?;
    if layout::layer_entry(uuid) != format!("vm/layers/{name}") {
        return Err(not_ours(&format!("names its layer {name:?} unusually")));
    }
    Ok(Unpacked::Disk {
        uuid,
        backup: layers.join(name),
    })
}

/// The digest of the tar `files` make in this layout.
fn tar_digest(files: &[(String, PathBuf)]) -> Result<String> {
    struct Hashing(sha2::Sha256);
    impl Write for Hashing {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            sha2::Digest::update(&mut self.0, b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Hashing(<sha2::Sha256 as sha2::Digest>::new());
    let named: Vec<(String, &Path)> = files
        .iter()
        .map(|(n, p)| (n.clone(), p.as_path()))
        .collect();
    layout::write_tar(&named, &mut h)?;
    Ok(format!("sha256:{:x}", sha2::Digest::finalize(h.0)))
}

/// Copies the kernel layer's files into the store under their digest (a
/// directory made whole, then renamed into place).
fn import_kernel(store: &Store, files: &[(String, PathBuf)]) -> Result<PathBuf> {
    let dir = store.kernel_dir(&tar_digest(files)?);
    if dir.join("kernel").is_file() {
        return Ok(dir);
    }
    let staged = store.work("kernel");
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged).map_err(Error::io(&staged))?;
    let done = (|| -> Result<()> {
        for (entry, from) in files {
            let name = Path::new(entry).file_name().expect("an entry names a file");
            let to = staged.join(name);
            std::fs::copy(from, &to).map_err(Error::io(from))?;
            std::fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(Error::io(&to))?;
        }
        std::fs::rename(&staged, &dir).map_err(Error::io(&dir))
    })();
    let _ = std::fs::remove_dir_all(&staged);
    done.map(|()| dir)
}

/// Brings the image unpacked in `dirs` (bottom first) into `store`.
pub fn import(store: &Store, dirs: &[PathBuf], say: &mut dyn FnMut(&str)) -> Result<Imported> {
    let layers: Vec<Unpacked> = dirs.iter().map(|d| classify(d)).collect::<Result<_>>()?;
    let _lock = store.lock()?;
    let env: Arc<dyn image_format::Env> = Arc::new(image_format::RealEnv);
    let mut chain: Vec<Uuid> = Vec::new();
    let mut restored = Vec::new();
    let mut kernel_dir = None;
    for layer in &layers {
        match layer {
            Unpacked::Kernel { files } => {
                if kernel_dir.is_some() {
                    return Err(Error::Layout("the image has two kernel layers".into()));
                }
                kernel_dir = Some((import_kernel(store, files)?, files.len() > 1));
            }
            Unpacked::Disk { uuid, backup } => {
                let parent = chain.last().copied();
                let h = image_format::backup::read_header(backup)?;
                if h.snapshot_uuid != *uuid || h.base_uuid != parent {
                    return Err(Error::Layout(format!(
                        "{} holds layer {} on {:?}, where the image's order needs {uuid} on {parent:?}",
                        backup.display(),
                        h.snapshot_uuid,
                        h.base_uuid
                    )));
                }
                if store.has_layer(*uuid, parent) {
                    say(&format!("layer {uuid}: in the store"));
                } else {
                    let out = store.layer_path(*uuid);
                    if out.exists() {
                        return Err(Error::Layout(format!(
                            "{} is there but is not layer {uuid} on {parent:?}: remove it with `vmctl image prune`",
                            out.display()
                        )));
                    }
                    say(&format!(
                        "layer {uuid}: restoring from {}",
                        backup.display()
                    ));
                    let base = parent.map(|p| store.layer_path(p));
                    image_format::backup::restore(
                        &env,
                        backup,
                        base.as_deref(),
                        &out,
                        &mut |_, _| {},
                    )?;
                    restored.push(*uuid);
                }
                chain.push(*uuid);
            }
        }
    }
    let top = *chain
        .last()
        .ok_or_else(|| Error::NotOurs("the image has no disk layer".into()))?;
    Ok(Imported {
        top: store.layer_path(top),
        layers: chain,
        kernel: kernel_dir.as_ref().map(|(d, _)| d.join("kernel")),
        initrd: kernel_dir
            .as_ref()
            .filter(|(_, i)| *i)
            .map(|(d, _)| d.join("initrd")),
        restored,
    })
}
