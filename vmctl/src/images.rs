//! `vmctl image`: VM images in OCI registries (the `vm-oci` crate), pulled
//! into this state root's store (ROOT/images: sealed layers by uuid, one
//! record per reference), and `--image REF` for create and run, which
//! pulls on first use. A VM's disk is a clone of a pulled top layer, so
//! the store's layers are the bases of its chain: removing a reference
//! forgets it; `prune` deletes only layers no record and no VM stands on.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vm_oci::store::ImageRecord;
use vm_oci::{PushSource, RegistryOptions, Store};

use crate::state::{BackendMode, Placement, RestoreFrom, RestoreMemory, Root, Spec};

pub fn store(root: &Root) -> Result<Store> {
    Ok(Store::open(&root.path.join("images"))?)
}

/// Whether `image` (an --image argument) names a registry image rather
/// than a file: it is no file here, and reads as a reference with a
/// registry host (a dot or a port in its first part, or localhost), as
/// docker tells a registry from a Docker Hub name.
pub fn is_reference(image: &Path) -> bool {
    if image.exists() {
        return false;
    }
    let Some(s) = image.to_str() else {
        return false;
    };
    let Some((host, rest)) = s.split_once('/') else {
        return false;
    };
    !rest.is_empty()
        && (host.contains('.') || host.contains(':') || host == "localhost")
        && !host.starts_with('.')
        && (!s.contains('@') || s.contains("@sha256:"))
}

/// The pulled record of `reference`, pulling it if the store lacks it.
pub fn ensure_pulled(root: &Root, reference: &str, opts: &RegistryOptions) -> Result<ImageRecord> {
    let store = store(root)?;
    if let Some(r) = store.record(reference)? {
        let state_there = r
            .vm_state_digest
            .as_deref()
            .is_none_or(|d| store.vm_state_dir(d).join("state").is_file());
        if state_there
            && r.layers
                .iter()
                .enumerate()
                .all(|(k, u)| store.has_layer(*u, k.checked_sub(1).map(|j| r.layers[j])))
        {
            return Ok(r);
        }
    }
    Ok(pull(root, reference, opts, &mut |l| eprintln!("{l}"))?.record)
}

/// The top layer a VM's disk clones, the kernel and initrd files.
pub fn files_of(
    root: &Root,
    r: &ImageRecord,
) -> Result<(PathBuf, Option<PathBuf>, Option<PathBuf>)> {
    let store = store(root)?;
    let top = store.layer_path(*r.layers.last().context("an image with no disk layer")?);
    let kernel_dir = r.kernel_digest.as_deref().map(|d| store.kernel_dir(d));
    let kernel = kernel_dir.as_ref().map(|d| d.join("kernel"));
    let initrd = kernel_dir
        .filter(|_| r.has_initrd)
        .map(|d| d.join("initrd"));
    Ok((top, kernel, initrd))
}

/// What `create --from-snapshot REF` makes of a VM snapshot from a
/// registry (pulled on first use): a VM of its definition on a clone of
/// its disk, continuing from its state and memory in the store.
pub fn snapshot_spec(
    root: &Root,
    reference: &str,
    opts: &RegistryOptions,
    backend: BackendMode,
    placement: Placement,
    memory: RestoreMemory,
    scratch: bool,
) -> Result<Spec> {
    let record = ensure_pulled(root, reference, opts)?;
    let Some(digest) = record.vm_state_digest.as_deref() else {
        bail!("{reference} is a disk image, not a VM snapshot (make VMs of it with --image)");
    };
    let (top, kernel, initrd) = files_of(root, &record)?;
    let d = &record.defaults;
    Ok(Spec {
        image: top,
        kernel,
        initrd,
        cmdline: d.cmdline.clone().unwrap_or_default(),
        cpus: d.cpus.unwrap_or(1),
        memory: d.memory.unwrap_or(256 << 20),
        queues: d.queues.unwrap_or(1),
        disk_size: None,
        backend,
        scratch,
        restore: Some(RestoreFrom {
            dir: store(root)?.vm_state_dir(digest),
            memory,
        }),
        net: None,
        nat: false,
        shares: Vec::new(),
        placement,
        disk_limits: Default::default(),
    })
}

pub fn pull(
    root: &Root,
    reference: &str,
    opts: &RegistryOptions,
    say: &mut dyn FnMut(&str),
) -> Result<vm_oci::Pulled> {
    let store = store(root)?;
    vm_oci::pull(&store, reference, opts, say).with_context(|| format!("pulling {reference}"))
}

/// Pushes a sealed snapshot (FILE@SNAPSHOT) as `reference`.
pub fn push(
    root: &Root,
    src: &PushSource,
    reference: &str,
    opts: &RegistryOptions,
    say: &mut dyn FnMut(&str),
) -> Result<vm_oci::PushReport> {
    // The layers' backups are made here while they upload, one directory
    // per push; a killed push's is removed by the next one.
    let pushing = root.path.join("images").join("pushing");
    std::fs::create_dir_all(&pushing).with_context(|| pushing.display().to_string())?;
    for e in std::fs::read_dir(&pushing)?.flatten() {
        let pid = e.file_name().to_string_lossy().parse::<i32>().ok();
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let work = pushing.join(std::process::id().to_string());
    std::fs::create_dir_all(&work)?;
    let known = store(root)?;
    let pushed = vm_oci::push(src, reference, opts, &work, Some(&known), say);
    let _ = std::fs::remove_dir_all(&work);
    pushed.with_context(|| format!("pushing {} as {reference}", src.snapshot.display()))
}

/// The layers of `disk`'s chain, each path canonical (a clone names its
/// parent relative to itself: ../../images/layers/UUID.img).
fn chain_of(disk: &Path) -> Vec<PathBuf> {
    image_format::disk::open_chain(&image_format::RealEnv, disk, false)
        .map(|c| c.into_iter().map(|l| canonical(&l.path)).collect())
        .unwrap_or_default()
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Store layers some VM's disk stands on (canonical paths).
fn layers_in_use(root: &Root, store: &Store) -> Result<BTreeSet<PathBuf>> {
    let layers = canonical(&store.root().join("layers"));
    let mut used = BTreeSet::new();
    for vm in root.list()? {
        used.extend(
            chain_of(&vm.disk())
                .into_iter()
                .filter(|l| l.starts_with(&layers)),
        );
    }
    Ok(used)
}

/// Store directories (kernels, VM states) some VM's definition names:
/// its kernel's, its initrd's, the state it continues from.
fn dirs_in_use(root: &Root) -> Result<BTreeSet<PathBuf>> {
    let mut used = BTreeSet::new();
    for vm in root.list()? {
        let Ok(c) = vm.config() else { continue };
        let files = [c.kernel.as_deref(), c.initrd.as_deref()];
        used.extend(
            files
                .into_iter()
                .flatten()
                .filter_map(Path::parent)
                .map(canonical),
        );
        used.extend(c.restore.as_ref().map(|r| canonical(&r.dir)));
    }
    Ok(used)
}

/// What `image ls` shows: each record and the VMs on it.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub record: ImageRecord,
    pub vms: Vec<String>,
}

pub fn list(root: &Root) -> Result<Vec<Listed>> {
    let store = store(root)?;
    let mut out = Vec::new();
    let vms: Vec<(String, Vec<PathBuf>)> = root
        .list()?
        .into_iter()
        .map(|vm| (vm.name.clone(), chain_of(&vm.disk())))
        .collect();
    for record in store.records()? {
        let top = record
            .layers
            .last()
            .map(|u| canonical(&store.layer_path(*u)));
        let on: Vec<String> = vms
            .iter()
            .filter(|(_, chain)| top.as_ref().is_some_and(|t| chain.contains(t)))
            .map(|(n, _)| n.clone())
            .collect();
        out.push(Listed { record, vms: on });
    }
    Ok(out)
}

/// Forgets `reference` (its layers stay for the VMs on them; `prune`
/// removes what nothing uses).
pub fn remove(root: &Root, reference: &str) -> Result<()> {
    let store = store(root)?;
    let _lock = store.lock()?;
    if !store.remove_record(reference)? {
        bail!("no image {reference} in this state root (vmctl image ls lists them)");
    }
    Ok(())
}

/// Deletes the layers and kernels no record and no VM uses; what it freed.
pub fn prune(root: &Root) -> Result<(usize, u64)> {
    let store = store(root)?;
    let _lock = store.lock()?;
    let mut keep = layers_in_use(root, &store)?;
    let mut dirs = dirs_in_use(root)?;
    for r in store.records()? {
        keep.extend(r.layers.iter().map(|u| canonical(&store.layer_path(*u))));
        if let Some(d) = &r.kernel_digest {
            dirs.insert(canonical(&store.kernel_dir(d)));
        }
        if let Some(d) = &r.vm_state_digest {
            dirs.insert(canonical(&store.vm_state_dir(d)));
        }
    }
    let (mut removed, mut bytes) = (0, 0);
    let layers = store.root().join("layers");
    for e in std::fs::read_dir(&layers)?.flatten() {
        let p = e.path();
        if keep.contains(&canonical(&p)) || p.extension().is_none_or(|x| x != "img") {
            continue;
        }
        bytes += crate::state::allocated(&p);
        std::fs::remove_file(&p).with_context(|| p.display().to_string())?;
        removed += 1;
    }
    // The notes image-format keeps beside a parent about its children.
    for e in std::fs::read_dir(&layers)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(parent) = n.strip_prefix('.').and_then(|r| r.split(".child-").next()) {
            if n.contains(".child-") && !layers.join(parent).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for kind in ["kernels", "states"] {
        for e in std::fs::read_dir(store.root().join(kind))
            .into_iter()
            .flatten()
            .flatten()
        {
            if !dirs.contains(&canonical(&e.path())) {
                bytes += std::fs::read_dir(e.path())
                    .map(|d| {
                        d.flatten()
                            .map(|f| crate::state::allocated(&f.path()))
                            .sum()
                    })
                    .unwrap_or(0);
                std::fs::remove_dir_all(e.path())?;
                removed += 1;
            }
        }
    }
    Ok((removed, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_told_from_files() {
        for r in [
            "127.0.0.1:5000/vm/base:golden",
            "registry.example/team/vm:v2",
            "localhost/vm:1",
            "localhost:5000/vm@sha256:00",
        ] {
            assert!(is_reference(Path::new(r)), "{r}");
        }
        for f in [
            "base.img@golden",
            "vm/base.img",
            "base.img",
            "dir/base.img@golden",
        ] {
            assert!(!is_reference(Path::new(f)), "{f}");
        }
    }
}
