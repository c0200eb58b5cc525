//! An image from a registry into a store: the manifest and config first
//! (an image that is not a VM image of this layout is refused before
//! anything is fetched), then each disk layer the store lacks, bottom
//! first: its blob downloaded (its digest checked), its backup taken out
//! of the tar, checked to be the layer the manifest says, and restored
//! onto the layer below as a sealed layer (every record's checksum
//! checked before the layer appears). Layers the store has are not
//! fetched at all.

use std::path::Path;
use std::sync::Arc;

use oci_client::manifest::OciDescriptor;
use uuid::Uuid;

use crate::layout::{self, ImageConfig};
use crate::registry::{Registry, RegistryOptions};
use crate::store::{ImageRecord, Store};
use crate::{Blob, Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pulled {
    pub record: ImageRecord,
    pub blobs: Vec<Blob>,
}

/// The manifest's layers, checked against the config's chain.
struct Plan {
    /// (uuid, parent, blob), bottom first.
    disk: Vec<(Uuid, Option<Uuid>, OciDescriptor)>,
    kernel: Option<(OciDescriptor, bool)>,
    vm_state: Option<OciDescriptor>,
}

fn annotation<'a>(d: &'a OciDescriptor, key: &str) -> Option<&'a str> {
    d.annotations.as_ref()?.get(key).map(String::as_str)
}

fn plan(layers: &[OciDescriptor], chain: &[Uuid]) -> Result<Plan> {
    let mut disk = Vec::new();
    let mut kernel = None;
    let mut vm_state = None;
    for d in layers {
        if d.media_type != layout::LAYER_MEDIA_TYPE {
            return Err(Error::NotOurs(format!(
                "layer {} is {}, not {}",
                d.digest,
                d.media_type,
                layout::LAYER_MEDIA_TYPE
            )));
        }
        match annotation(d, layout::ANNOTATION_CONTENT) {
            Some(layout::CONTENT_DISK) => {
                let uuid = |key: &str| -> Result<Option<Uuid>> {
                    annotation(d, key)
                        .map(|u| {
                            u.parse().map_err(|_| {
                                Error::NotOurs(format!(
                                    "layer {}: {key} {u:?} is not a uuid",
                                    d.digest
                                ))
                            })
                        })
                        .transpose()
                };
                let own = uuid(layout::ANNOTATION_UUID)?.ok_or_else(|| {
                    Error::NotOurs(format!(
                        "layer {} has no {}",
                        d.digest,
                        layout::ANNOTATION_UUID
                    ))
                })?;
                disk.push((own, uuid(layout::ANNOTATION_PARENT)?, d.clone()));
            }
            Some(layout::CONTENT_KERNEL) if kernel.is_none() => {
                let initrd = annotation(d, layout::ANNOTATION_INITRD) == Some("true");
                kernel = Some((d.clone(), initrd));
            }
            Some(layout::CONTENT_VM_STATE) if vm_state.is_none() => vm_state = Some(d.clone()),
            other => {
                return Err(Error::NotOurs(format!(
                    "layer {} holds {:?}: not a disk layer, nor the one kernel or VM state",
                    d.digest,
                    other.unwrap_or("nothing this layout knows")
                )))
            }
        }
    }
    let uuids: Vec<Uuid> = disk.iter().map(|l| l.0).collect();
    if uuids != chain {
        return Err(Error::Layout(format!(
            "the manifest's disk layers ({uuids:?}) are not the config's chain ({chain:?})"
        )));
    }
    for (k, (uuid, parent, _)) in disk.iter().enumerate() {
        let below = k.checked_sub(1).map(|j| disk[j].0);
        if *parent != below {
            return Err(Error::Layout(format!(
                "layer {uuid} says its parent is {parent:?}, the layer below it is {below:?}"
            )));
        }
    }
    Ok(Plan {
        disk,
        kernel,
        vm_state,
    })
}

/// Pulls `reference` into `store`; `say`: a line per blob.
pub fn pull(
    store: &Store,
    reference: &str,
    opts: &RegistryOptions,
    say: &mut dyn FnMut(&str),
) -> Result<Pulled> {
    let registry = Registry::connect(reference, opts)?;
    let (manifest, manifest_digest, config) = registry.manifest_and_config()?;
    let config: ImageConfig = serde_json::from_str(&config)
        .map_err(|e| Error::NotOurs(format!("its config is not an image config: {e}")))?;
    let vm = config.vm()?;
    let plan = plan(&manifest.layers, &vm.layers)?;
    let _lock = store.lock()?;
    let env: Arc<dyn image_format::Env> = Arc::new(image_format::RealEnv);
    let mut blobs = Vec::new();
    for (uuid, parent, desc) in &plan.disk {
        let size = desc.size.max(0) as u64;
        if store.has_layer(*uuid, *parent) {
            say(&format!("layer {uuid}: in the store"));
            blobs.push(Blob {
                uuid: Some(*uuid),
                digest: desc.digest.clone(),
                size,
                transferred: false,
            });
            continue;
        }
        let out = store.layer_path(*uuid);
        if out.exists() {
            return Err(Error::Layout(format!(
                "{} is there but is not layer {uuid} on {parent:?} (a layer of another image with the same uuid?): remove it with `vmctl image prune`",
                out.display()
            )));
        }
        say(&format!(
            "layer {uuid}: fetching {} ({size} bytes)",
            desc.digest
        ));
        let tar = store.work(&format!("{uuid}.tar"));
        let backup = store.work(&format!("{uuid}.backup"));
        let done = (|| -> Result<()> {
            registry.pull_blob(desc, &tar)?;
            layout::extract(&tar, &[(&layout::layer_entry(*uuid), &backup)])?;
            let _ = std::fs::remove_file(&tar);
            let h = image_format::backup::read_header(&backup)?;
            if h.snapshot_uuid != *uuid || h.base_uuid != *parent {
                return Err(Error::Layout(format!(
                    "blob {} holds layer {} on {:?}, not {uuid} on {parent:?}",
                    desc.digest, h.snapshot_uuid, h.base_uuid
                )));
            }
            let base = parent.map(|p| store.layer_path(p));
            image_format::backup::restore(&env, &backup, base.as_deref(), &out, &mut |_, _| {})?;
            store.remember_blob(*uuid, &desc.digest, size, &registry.repository())
        })();
        let _ = std::fs::remove_file(&tar);
        let _ = std::fs::remove_file(&backup);
        done?;
        blobs.push(Blob {
            uuid: Some(*uuid),
            digest: desc.digest.clone(),
            size,
            transferred: true,
        });
    }
    let mut kernel_digest = None;
    let mut has_initrd = false;
    if let Some((desc, initrd)) = &plan.kernel {
        let fetched = fetch_kernel(store, &registry, desc, *initrd, say)?;
        blobs.push(Blob {
            uuid: None,
            digest: desc.digest.clone(),
            size: desc.size.max(0) as u64,
            transferred: fetched,
        });
        kernel_digest = Some(desc.digest.clone());
        has_initrd = *initrd;
    }
    let mut vm_state_digest = None;
    if let Some(desc) = &plan.vm_state {
        let fetched = fetch_vm_state(store, &registry, desc, say)?;
        blobs.push(Blob {
            uuid: None,
            digest: desc.digest.clone(),
            size: desc.size.max(0) as u64,
            transferred: fetched,
        });
        vm_state_digest = Some(desc.digest.clone());
    }
    let record = ImageRecord {
        reference: reference.to_string(),
        manifest_digest,
        layers: vm.layers,
        virtual_size: vm.virtual_size,
        defaults: vm.defaults,
        kernel_digest,
        has_initrd,
        vm_state_digest,
    };
    store.write_record(&record)?;
    Ok(Pulled { record, blobs })
}

/// The kernel layer's files into the store (a directory made whole, then
/// renamed into place); whether it had to be fetched.
fn fetch_kernel(
    store: &Store,
    registry: &Registry,
    desc: &OciDescriptor,
    initrd: bool,
    say: &mut dyn FnMut(&str),
) -> Result<bool> {
    let dir = store.kernel_dir(&desc.digest);
    if dir.join("kernel").is_file() {
        say(&format!("the kernel: in the store ({})", desc.digest));
        return Ok(false);
    }
    say(&format!("the kernel: fetching {}", desc.digest));
    let tar = store.work("kernel.tar");
    let staged = store.work("kernel");
    std::fs::create_dir_all(&staged).map_err(Error::io(&staged))?;
    let done = (|| -> Result<()> {
        registry.pull_blob(desc, &tar)?;
        let kernel = staged.join("kernel");
        let initrd_path = staged.join("initrd");
        let mut wanted: Vec<(&str, &Path)> = vec![(layout::KERNEL_ENTRY, &kernel)];
        if initrd {
            wanted.push((layout::INITRD_ENTRY, &initrd_path));
        }
        layout::extract(&tar, &wanted)?;
        std::fs::rename(&staged, &dir).map_err(Error::io(&dir))
    })();
    let _ = std::fs::remove_file(&tar);
    let _ = std::fs::remove_dir_all(&staged);
    done.map(|()| true)
}

/// A VM snapshot's state and memory into the store (a directory made
/// whole, then renamed into place; the memory sparse); whether it had to
/// be fetched.
fn fetch_vm_state(
    store: &Store,
    registry: &Registry,
    desc: &OciDescriptor,
    say: &mut dyn FnMut(&str),
) -> Result<bool> {
    let dir = store.vm_state_dir(&desc.digest);
    if dir.join("state").is_file() {
        say(&format!("the VM's state: in the store ({})", desc.digest));
        return Ok(false);
    }
    say(&format!(
        "the VM's state and memory: fetching {}",
        desc.digest
    ));
    let tar = store.work("vm-state.tar");
    let staged = store.work("vm-state");
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged).map_err(Error::io(&staged))?;
    let done = (|| -> Result<()> {
        registry.pull_blob(desc, &tar)?;
        layout::extract(
            &tar,
            &[
                (layout::STATE_ENTRY, &staged.join("state")),
                (layout::MEMORY_ENTRY, &staged.join("memory")),
            ],
        )?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
        }
        std::fs::rename(&staged, &dir).map_err(Error::io(&dir))
    })();
    let _ = std::fs::remove_file(&tar);
    let _ = std::fs::remove_dir_all(&staged);
    done.map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn disk(uuid: u128, parent: Option<u128>) -> OciDescriptor {
        let mut a = BTreeMap::new();
        a.insert(
            layout::ANNOTATION_CONTENT.to_string(),
            layout::CONTENT_DISK.to_string(),
        );
        a.insert(
            layout::ANNOTATION_UUID.to_string(),
            Uuid::from_u128(uuid).to_string(),
        );
        if let Some(p) = parent {
            a.insert(
                layout::ANNOTATION_PARENT.to_string(),
                Uuid::from_u128(p).to_string(),
            );
        }
        OciDescriptor {
            media_type: layout::LAYER_MEDIA_TYPE.into(),
            digest: format!("sha256:{uuid:064x}"),
            annotations: Some(a),
            ..OciDescriptor::default()
        }
    }

    #[test]
    fn a_manifest_must_make_the_config_s_chain() {
        let chain = [Uuid::from_u128(1), Uuid::from_u128(2)];
        let p = plan(&[disk(1, None), disk(2, Some(1))], &chain).unwrap();
        assert_eq!(p.disk.len(), 2);
        assert!(p.kernel.is_none());
        let e = |layers: &[OciDescriptor]| plan(layers, &chain).err().unwrap().to_string();
        assert!(e(&[disk(2, Some(1)), disk(1, None)]).contains("are not the config's chain"));
        assert!(e(&[disk(1, None), disk(2, Some(9))]).contains("says its parent is"));
        let mut gz = disk(1, None);
        gz.media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        assert!(e(&[gz, disk(2, Some(1))]).contains("not application/vnd.oci.image.layer.v1.tar"));
        let mut bare = disk(1, None);
        bare.annotations = None;
        assert!(e(&[bare, disk(2, Some(1))])
            .contains("not a disk layer, nor the one kernel or VM state"));
    }
}
