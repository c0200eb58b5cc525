//! A sealed snapshot's chain to a registry, as `layout` lays it out. Each
//! layer's blob is made (its backup against the layer below, wrapped in a
//! fixed tar header), its digest taken, and uploaded only if the registry
//! lacks it: a clone pushed after its base moves its own layer alone.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use uuid::Uuid;

use crate::layout::{self, ImageConfig, VmDefaults, VmImage};
use crate::registry::{Registry, RegistryOptions};
use crate::{Blob, Error, Result};

/// What to push.
#[derive(Debug, Clone)]
pub struct PushSource {
    /// A sealed snapshot (`FILE@NAME`): the disk's chain, to its bottom.
    pub snapshot: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub defaults: VmDefaults,
    /// A VM snapshot's vmm directory (`state` and `memory`): pushed as a
    /// layer of its own, so that VMs pulled from the image continue from
    /// it.
    pub vm_state: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PushReport {
    pub reference: String,
    pub manifest_digest: String,
    pub blobs: Vec<Blob>,
}

/// A blob's bytes, read on demand: a tar made of fixed headers and files.
struct TarParts {
    parts: Vec<Part>,
}

enum Part {
    Bytes(Vec<u8>),
    File(PathBuf),
    /// `len` bytes of a file from `offset`.
    Range(PathBuf, u64, u64),
}

impl TarParts {
    fn of(files: &[(String, &Path)]) -> Result<TarParts> {
        let mut parts = Vec::new();
        for (name, path) in files {
            let size = std::fs::metadata(path).map_err(Error::io(path))?.len();
            parts.push(Part::Bytes(layout::tar_header(name, size)?.to_vec()));
            parts.push(Part::File(path.to_path_buf()));
            parts.push(Part::Bytes(vec![0; layout::tar_padding(size)]));
        }
        parts.push(Part::Bytes(layout::TAR_END.to_vec()));
        Ok(TarParts { parts })
    }

    /// The vm-state layer of the vmm snapshot in `dir`: its state file,
    /// then its memory as a sparse entry (only the pages that hold data).
    fn of_vm_state(dir: &Path) -> Result<TarParts> {
        let state = dir.join("state");
        let memory = dir.join("memory");
        let size = std::fs::metadata(&state).map_err(Error::io(&state))?.len();
        let mut parts = vec![
            Part::Bytes(layout::tar_header(layout::STATE_ENTRY, size)?.to_vec()),
            Part::File(state),
            Part::Bytes(vec![0; layout::tar_padding(size)]),
        ];
        let real = std::fs::metadata(&memory)
            .map_err(Error::io(&memory))?
            .len();
        let extents = crate::sparse::data_extents(&memory)?;
        parts.push(Part::Bytes(crate::sparse::header_blocks(
            layout::MEMORY_ENTRY,
            real,
            &extents,
        )?));
        let stored: u64 = extents.iter().map(|e| e.1).sum();
        for (off, len) in extents {
            parts.push(Part::Range(memory.clone(), off, len));
        }
        parts.push(Part::Bytes(vec![0; layout::tar_padding(stored)]));
        parts.push(Part::Bytes(layout::TAR_END.to_vec()));
        Ok(TarParts { parts })
    }

    fn reader(&self) -> Result<Box<dyn Read + Send>> {
        let mut r: Box<dyn Read + Send> = Box::new(std::io::empty());
        for p in &self.parts {
            r = match p {
                Part::Bytes(b) => Box::new(r.chain(std::io::Cursor::new(b.clone()))),
                Part::File(path) => {
                    Box::new(r.chain(std::fs::File::open(path).map_err(Error::io(path))?))
                }
                Part::Range(path, offset, len) => {
                    let mut f = std::fs::File::open(path).map_err(Error::io(path))?;
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(*offset))
                        .map_err(Error::io(path))?;
                    Box::new(r.chain(f.take(*len)))
                }
            };
        }
        Ok(r)
    }
}

/// Pushes `src` as `reference`. `work`: a directory for the layers'
/// backups while they are made (each removed once uploaded). `known`: a
/// store whose record of layers' blobs spares remaking the blob of a
/// layer the registry has (a base pushed or pulled before); the blobs
/// made are recorded there. `say`: a line per blob, for progress.
pub fn push(
    src: &PushSource,
    reference: &str,
    opts: &RegistryOptions,
    work: &Path,
    known: Option<&crate::Store>,
    say: &mut dyn FnMut(&str),
) -> Result<PushReport> {
    let registry = Registry::connect(reference, opts)?;
    let env: Arc<dyn image_format::Env> = Arc::new(image_format::RealEnv);
    let mut chain = image_format::disk::open_chain(env.as_ref(), &src.snapshot, false)?;
    chain.reverse();
    let top = chain.last().expect("a chain has a top");
    if !top.header.sealed() {
        return Err(Error::Layout(format!(
            "{}: not sealed: push a snapshot (FILE@NAME; `img snapshot -c NAME FILE` makes one)",
            src.snapshot.display()
        )));
    }
    let virtual_size = top.header.virtual_size;
    let paths: Vec<(PathBuf, Uuid, Option<Uuid>)> = chain
        .iter()
        .map(|l| (l.path.clone(), l.header.uuid, l.header.parent_uuid))
        .collect();
    drop(chain);
    let mut blobs = Vec::new();
    let mut descriptors = Vec::new();
    for (k, (path, uuid, parent)) in paths.iter().enumerate() {
        let cached = known.and_then(|s| s.blob_of(*uuid));
        let there = match &cached {
            Some(c) => registry.blob_exists(&c.digest)? || mounted(&registry, c, say)?,
            None => false,
        };
        let backup = work.join(format!(".push-{uuid}.backup"));
        let _ = std::fs::remove_file(&backup);
        let from = k.checked_sub(1).map(|j| paths[j].0.as_path());
        let (digest, size, uploaded) = match cached.filter(|_| there) {
            Some(c) => {
                say(&format!(
                    "layer {uuid}: {} ({} bytes) is there already",
                    c.digest, c.size
                ));
                (c.digest, c.size, false)
            }
            None => {
                let made = image_format::backup::backup(&env, path, from, &backup, &mut |_, _| {})
                    .map_err(Error::from);
                let pushed = made.and_then(|_| {
                    let tar = TarParts::of(&[(layout::layer_entry(*uuid), &backup)])?;
                    upload(&registry, &tar, say, &format!("layer {uuid}"))
                });
                let _ = std::fs::remove_file(&backup);
                pushed?
            }
        };
        if let Some(s) = known {
            s.remember_blob(*uuid, &digest, size, &registry.repository())?;
        }
        let mut annotations = BTreeMap::new();
        annotations.insert(
            layout::ANNOTATION_CONTENT.into(),
            layout::CONTENT_DISK.into(),
        );
        annotations.insert(layout::ANNOTATION_UUID.into(), uuid.to_string());
        if let Some(p) = parent {
            annotations.insert(layout::ANNOTATION_PARENT.into(), p.to_string());
        }
        descriptors.push(descriptor(&digest, size, annotations));
        blobs.push(Blob {
            uuid: Some(*uuid),
            digest,
            size,
            transferred: uploaded,
        });
    }
    if let Some(kernel) = &src.kernel {
        let mut files = vec![(layout::KERNEL_ENTRY.to_string(), kernel.as_path())];
        if let Some(i) = &src.initrd {
            files.push((layout::INITRD_ENTRY.to_string(), i.as_path()));
        }
        let tar = TarParts::of(&files)?;
        let (digest, size, uploaded) = upload(&registry, &tar, say, "the kernel")?;
        let mut annotations = BTreeMap::new();
        annotations.insert(
            layout::ANNOTATION_CONTENT.into(),
            layout::CONTENT_KERNEL.into(),
        );
        if src.initrd.is_some() {
            annotations.insert(layout::ANNOTATION_INITRD.into(), "true".into());
        }
        descriptors.push(descriptor(&digest, size, annotations));
        blobs.push(Blob {
            uuid: None,
            digest,
            size,
            transferred: uploaded,
        });
    } else if src.initrd.is_some() {
        return Err(Error::Layout("an initrd needs a kernel".into()));
    }
    if let Some(dir) = &src.vm_state {
        let tar = TarParts::of_vm_state(dir)?;
        let (digest, size, uploaded) = upload(&registry, &tar, say, "the VM's state and memory")?;
        let mut annotations = BTreeMap::new();
        annotations.insert(
            layout::ANNOTATION_CONTENT.into(),
            layout::CONTENT_VM_STATE.into(),
        );
        descriptors.push(descriptor(&digest, size, annotations));
        blobs.push(Blob {
            uuid: None,
            digest,
            size,
            transferred: uploaded,
        });
    }
    let image = VmImage {
        defaults: src.defaults.clone(),
        layers: paths.iter().map(|p| p.1).collect(),
        virtual_size,
    };
    let config = ImageConfig::new(
        &image,
        descriptors.iter().map(|d| d.digest.clone()).collect(),
    )
    .to_bytes();
    let config_file = work.join(".push-config.json");
    std::fs::write(&config_file, &config).map_err(Error::io(&config_file))?;
    let pushed = upload_file(&registry, &config_file, say, "the config");
    let _ = std::fs::remove_file(&config_file);
    let (config_digest, config_size, uploaded) = pushed?;
    blobs.push(Blob {
        uuid: None,
        digest: config_digest.clone(),
        size: config_size,
        transferred: uploaded,
    });
    let manifest = OciImageManifest {
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        config: OciDescriptor {
            media_type: layout::CONFIG_MEDIA_TYPE.into(),
            digest: config_digest,
            size: config_size as i64,
            ..OciDescriptor::default()
        },
        layers: descriptors,
        ..OciImageManifest::default()
    };
    let manifest_digest = registry.push_manifest(manifest)?;
    say(&format!("{reference}: manifest {manifest_digest}"));
    Ok(PushReport {
        reference: reference.to_string(),
        manifest_digest,
        blobs,
    })
}

/// Whether blob `c` could be linked into the registry's repository from
/// another repository of the same registry known to hold it.
fn mounted(
    registry: &Registry,
    c: &crate::store::KnownBlob,
    say: &mut dyn FnMut(&str),
) -> Result<bool> {
    for from in &c.repositories {
        if registry.mount(from, &c.digest)? {
            say(&format!("{}: mounted from {from}", c.digest));
            return Ok(true);
        }
    }
    Ok(false)
}

fn descriptor(digest: &str, size: u64, annotations: BTreeMap<String, String>) -> OciDescriptor {
    OciDescriptor {
        media_type: layout::LAYER_MEDIA_TYPE.into(),
        digest: digest.to_string(),
        size: size as i64,
        annotations: Some(annotations),
        ..OciDescriptor::default()
    }
}

/// The blob's digest and size, and whether it had to be uploaded.
fn upload(
    registry: &Registry,
    tar: &TarParts,
    say: &mut dyn FnMut(&str),
    what: &str,
) -> Result<(String, u64, bool)> {
    let (digest, size) =
        layout::digest_of(&mut tar.reader()?).map_err(|e| Error::Layout(format!("{what}: {e}")))?;
    if registry.blob_exists(&digest)? {
        say(&format!("{what}: {digest} ({size} bytes) is there already"));
        return Ok((digest, size, false));
    }
    say(&format!("{what}: uploading {digest} ({size} bytes)"));
    registry.push_blob(&digest, size, tar.reader()?)?;
    Ok((digest, size, true))
}

fn upload_file(
    registry: &Registry,
    path: &Path,
    say: &mut dyn FnMut(&str),
    what: &str,
) -> Result<(String, u64, bool)> {
    let parts = TarParts {
        parts: vec![Part::File(path.to_path_buf())],
    };
    upload(registry, &parts, say, what)
}
