//! How a VM image lies in an OCI image (docs/scale-out.md, "The image
//! layout"): an ordinary container image, so that registries, containerd
//! and kubelet take it as any other.
//!
//! - One layer per sealed layer of the disk's chain, bottom first: an
//!   uncompressed tar holding one file, `vm/layers/UUID.backup`, that
//!   layer's own blocks as `img backup` writes them (a delta against the
//!   layer below; the bottom one whole). The tar's header is fixed (mode
//!   0644, owner 0, time 0), so the same sealed layer is the same blob,
//!   with the same digest, in every image and every registry.
//! - The kernel (and initrd) in a layer of their own, `vm/kernel` and
//!   `vm/initrd`, when the image names one.
//! - The config's labels: the VM's defaults (vCPUs, memory, command line)
//!   and the chain's uuids; each disk layer's descriptor carries its uuid
//!   and its parent's, so a pull knows which layers it already has before
//!   it fetches anything.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Error;

/// The layers: plain tars (a backup stream compresses poorly, and a
/// registry or containerd unpacks a plain tar without a decompressor).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// The config label that marks an image as a VM image of this layout.
pub const LABEL_FORMAT: &str = "io.vmctl.image.format";
pub const FORMAT_VERSION: &str = "1";
pub const LABEL_CPUS: &str = "io.vmctl.vm.cpus";
pub const LABEL_MEMORY: &str = "io.vmctl.vm.memory";
pub const LABEL_CMDLINE: &str = "io.vmctl.vm.cmdline";
pub const LABEL_QUEUES: &str = "io.vmctl.vm.queues";
/// The disk's layers, bottom first, as uuids separated by commas.
pub const LABEL_LAYERS: &str = "io.vmctl.disk.layers";
pub const LABEL_VIRTUAL_SIZE: &str = "io.vmctl.disk.virtual-size";

/// A layer descriptor's annotations: what it holds.
pub const ANNOTATION_CONTENT: &str = "io.vmctl.layer.content";
pub const CONTENT_DISK: &str = "disk-layer";
pub const CONTENT_KERNEL: &str = "kernel";
/// A VM snapshot's vCPU and device state and its guest memory (a VM that
/// continues from it rather than booting).
pub const CONTENT_VM_STATE: &str = "vm-state";
pub const ANNOTATION_UUID: &str = "io.vmctl.layer.uuid";
pub const ANNOTATION_PARENT: &str = "io.vmctl.layer.parent-uuid";
/// On the kernel layer: "true" when it holds an initrd too.
pub const ANNOTATION_INITRD: &str = "io.vmctl.layer.initrd";

/// Where a disk layer's backup lies in its tar.
pub fn layer_entry(uuid: Uuid) -> String {
    format!("vm/layers/{uuid}.backup")
}
pub const KERNEL_ENTRY: &str = "vm/kernel";
pub const INITRD_ENTRY: &str = "vm/initrd";
/// The vm-state layer's entries: the vmm's `state` file, and its
/// `memory` as a sparse entry (`sparse`).
pub const STATE_ENTRY: &str = "vm/snapshot/state";
pub const MEMORY_ENTRY: &str = "vm/snapshot/memory";

/// What a VM made from the image starts with unless told otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefaults {
    pub cpus: Option<u8>,
    pub memory: Option<u64>,
    pub cmdline: Option<String>,
    /// The disk's queues (a VM snapshot's: its devices were saved with
    /// them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
}

/// The image's vCPUs as a container's environment variable.
pub const ENV_CPUS: &str = "VMCTL_CPUS";
/// The image's guest memory in bytes, likewise.
pub const ENV_MEMORY: &str = "VMCTL_MEMORY";

impl VmDefaults {
    /// cpus and memory as `NAME=VALUE` environment entries.
    pub fn to_env(&self) -> Vec<String> {
        let mut env = Vec::new();
        if let Some(c) = self.cpus {
            env.push(format!("{ENV_CPUS}={c}"));
        }
        if let Some(m) = self.memory {
            env.push(format!("{ENV_MEMORY}={m}"));
        }
        env
    }

    /// The defaults a container engine passed on in a task's process:
    /// `args` (the command line, none if empty) and `env` (`NAME=VALUE`;
    /// other variables are ignored). A value that is not a number is an
    /// error naming it.
    pub fn from_process(args: &[String], env: &[String]) -> Result<VmDefaults, Error> {
        let mut d = VmDefaults {
            cmdline: (!args.is_empty()).then(|| args.join(" ")),
            ..VmDefaults::default()
        };
        for e in env {
            let Some((k, v)) = e.split_once('=') else {
                continue;
            };
            let bad = || Error::Layout(format!("{k}={v:?} is not a number"));
            match k {
                ENV_CPUS => d.cpus = Some(v.parse().map_err(|_| bad())?),
                ENV_MEMORY => d.memory = Some(v.parse().map_err(|_| bad())?),
                _ => {}
            }
        }
        Ok(d)
    }
}

/// The image config as this layout writes it: an OCI image config
/// (architecture, OS, the layers' diff ids) whose labels carry the VM.
/// Written without timestamps, so the same content is the same digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub config: ConfigBody,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigBody {
    #[serde(rename = "Labels", default)]
    pub labels: BTreeMap<String, String>,
    /// The defaults again as a container's environment, which engines
    /// copy into the task's OCI spec (containerd and the CRI do not pass
    /// an image's labels to a runtime).
    #[serde(rename = "Env", default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// The kernel command line's words, as a container's command (what
    /// `ctr run REF NAME ARGS` and a pod's `args` override).
    #[serde(rename = "Cmd", default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// What the config says about the VM and its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmImage {
    pub defaults: VmDefaults,
    /// Bottom first.
    pub layers: Vec<Uuid>,
    pub virtual_size: u64,
}

impl ImageConfig {
    /// `diff_ids`: every layer's digest, in the manifest's order (the
    /// layers are uncompressed, so a diff id is the layer's digest).
    pub fn new(image: &VmImage, diff_ids: Vec<String>) -> ImageConfig {
        let mut labels = BTreeMap::new();
        labels.insert(LABEL_FORMAT.into(), FORMAT_VERSION.into());
        let d = &image.defaults;
        if let Some(c) = d.cpus {
            labels.insert(LABEL_CPUS.into(), c.to_string());
        }
        if let Some(m) = d.memory {
            labels.insert(LABEL_MEMORY.into(), m.to_string());
        }
        if let Some(c) = &d.cmdline {
            labels.insert(LABEL_CMDLINE.into(), c.clone());
        }
        if let Some(q) = d.queues {
            labels.insert(LABEL_QUEUES.into(), q.to_string());
        }
        labels.insert(
            LABEL_LAYERS.into(),
            image
                .layers
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
        labels.insert(LABEL_VIRTUAL_SIZE.into(), image.virtual_size.to_string());
        ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            config: ConfigBody {
                labels,
                env: d.to_env(),
                cmd: d
                    .cmdline
                    .as_deref()
                    .map(|c| c.split_ascii_whitespace().map(String::from).collect())
                    .unwrap_or_default(),
            },
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids,
            },
        }
    }

    /// The VM this config describes; an image without this layout's
    /// labels is refused by name (not a VM image pushed by us).
    pub fn vm(&self) -> Result<VmImage, Error> {
        let l = &self.config.labels;
        match l.get(LABEL_FORMAT).map(String::as_str) {
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::NotOurs(format!(
                    "its layout version is {v:?}; this build reads {FORMAT_VERSION:?}"
                )))
            }
            None => {
                return Err(Error::NotOurs(format!(
                    "its config has no {LABEL_FORMAT} label (not a VM image: push one with `vmctl image push`)"
                )))
            }
        }
        let number = |key: &str| -> Result<Option<u64>, Error> {
            l.get(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| Error::NotOurs(format!("label {key}={v:?} is not a number")))
                })
                .transpose()
        };
        let layers = l
            .get(LABEL_LAYERS)
            .ok_or_else(|| Error::NotOurs(format!("no {LABEL_LAYERS} label")))?
            .split(',')
            .map(|u| {
                u.parse()
                    .map_err(|_| Error::NotOurs(format!("{LABEL_LAYERS}: {u:?} is not a uuid")))
            })
            .collect::<Result<Vec<Uuid>, _>>()?;
        let cpus = number(LABEL_CPUS)?
            .map(|c| {
                u8::try_from(c)
                    .map_err(|_| Error::NotOurs(format!("label {LABEL_CPUS}={c} is too many")))
            })
            .transpose()?;
        let queues = number(LABEL_QUEUES)?
            .map(|q| {
                u16::try_from(q)
                    .map_err(|_| Error::NotOurs(format!("label {LABEL_QUEUES}={q} is too many")))
            })
            .transpose()?;
        Ok(VmImage {
            defaults: VmDefaults {
                cpus,
                memory: number(LABEL_MEMORY)?,
                cmdline: l.get(LABEL_CMDLINE).cloned(),
                queues,
            },
            layers,
            virtual_size: number(LABEL_VIRTUAL_SIZE)?
                .ok_or_else(|| Error::NotOurs(format!("no {LABEL_VIRTUAL_SIZE} label")))?,
        })
    }

    /// The config's bytes (serde's field order: the same config, the same
    /// bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a config of strings serializes")
    }
}

const BLOCK: u64 = 512;

/// A tar entry's fixed header: a regular file, mode 0644, owned by 0:0,
/// time 0, no user or group names.
pub fn tar_header(name: &str, size: u64) -> Result<[u8; 512], Error> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)
        .map_err(|e| Error::Layout(format!("tar entry {name}: {e}")))?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

/// Zeros that pad an entry of `size` bytes to a whole block.
pub fn tar_padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

/// A tar's end: two zero blocks.
pub const TAR_END: [u8; 1024] = [0; 1024];

/// Writes a tar of `files` (entry name, file) to `out`, as the layout's
/// layers are written: in the order given, fixed headers.
pub fn write_tar(files: &[(String, &Path)], out: &mut dyn Write) -> Result<(), Error> {
    for (name, path) in files {
        let mut f = std::fs::File::open(path).map_err(Error::io(path))?;
        let size = f.metadata().map_err(Error::io(path))?.len();
        out.write_all(&tar_header(name, size)?)
            .map_err(Error::io(path))?;
        let copied = std::io::copy(&mut f, out).map_err(Error::io(path))?;
        if copied != size {
            return Err(Error::Layout(format!(
                "{} changed while it was read",
                path.display()
            )));
        }
        out.write_all(&[0u8; 512][..tar_padding(size)])
            .map_err(Error::io(path))?;
    }
    out.write_all(&TAR_END)
        .map_err(|e| Error::Layout(format!("writing a tar: {e}")))
}

/// Copies the entries of the tar at `tar_path` whose names are in
/// `wanted` to the paths given beside them; an entry that is missing, is
/// not a regular file or comes twice is an error naming it. Other entries
/// (directories a builder added) are skipped.
pub fn extract(tar_path: &Path, wanted: &[(&str, &Path)]) -> Result<(), Error> {
    let file = std::fs::File::open(tar_path).map_err(Error::io(tar_path))?;
    let mut archive = tar::Archive::new(file);
    let mut found = vec![false; wanted.len()];
    let bad = |what: String| Error::Layout(format!("{}: {what}", tar_path.display()));
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("not a tar: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| bad(format!("an entry's name: {e}")))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let Some(k) = wanted.iter().position(|(n, _)| *n == name) else {
            continue;
        };
        if found[k] {
            return Err(bad(format!("{name} comes twice")));
        }
        // A regular file, or one written sparse (guest memory).
        let real_size =
            match entry.header().entry_type() {
                tar::EntryType::Regular => entry.size(),
                tar::EntryType::GNUSparse => entry
                    .header()
                    .as_gnu()
                    .and_then(|g| g.real_size().ok())
                    .ok_or_else(|| bad(format!("{name}: a sparse entry without its size")))?,
                _ => return Err(bad(format!("{name} is not a regular file"))),
            };
        found[k] = true;
        crate::sparse::unpack(&mut entry, real_size, wanted[k].1)?;
    }
    if let Some(k) = found.iter().position(|f| !f) {
        return Err(bad(format!("no {} in it", wanted[k].0)));
    }
    Ok(())
}

/// sha256 of everything `r` yields, as a digest (`sha256:HEX`), and its
/// length.
pub fn digest_of(r: &mut dyn Read) -> std::io::Result<(String, u64)> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((format!("sha256:{:x}", h.finalize()), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_files_make_the_same_tar_and_it_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![7u8; 1000]).unwrap();
        let entry = layer_entry(Uuid::nil());
        let mut one = Vec::new();
        write_tar(&[(entry.clone(), &a)], &mut one).unwrap();
        // Another file of the same bytes, made later, with another mode.
        let b = dir.path().join("b");
        std::fs::write(&b, vec![7u8; 1000]).unwrap();
        std::fs::set_permissions(&b, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mut two = Vec::new();
        write_tar(&[(entry.clone(), &b)], &mut two).unwrap();
        assert_eq!(one, two);
        assert_eq!(one.len(), 512 + 1024 + 1024);
        let t = dir.path().join("t.tar");
        std::fs::write(&t, &one).unwrap();
        let out = dir.path().join("out");
        extract(&t, &[(&entry, &out)]).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 1000]);
        let e = extract(&t, &[("vm/kernel", &out)]).unwrap_err().to_string();
        assert!(e.contains("no vm/kernel in it"), "{e}");
        std::fs::write(&t, b"not a tar at all, too short").unwrap();
        assert!(extract(&t, &[(&entry, &out)]).is_err());
    }

    #[test]
    fn a_config_carries_the_vm_and_a_foreign_one_is_refused_by_name() {
        let image = VmImage {
            defaults: VmDefaults {
                cpus: Some(2),
                memory: Some(256 << 20),
                cmdline: Some("mode=idle".into()),
                queues: None,
            },
            layers: vec![Uuid::from_u128(1), Uuid::from_u128(2)],
            virtual_size: 64 << 20,
        };
        let c = ImageConfig::new(&image, vec!["sha256:aa".into(), "sha256:bb".into()]);
        let bytes = c.to_bytes();
        assert_eq!(
            bytes,
            ImageConfig::new(&image, c.rootfs.diff_ids.clone()).to_bytes()
        );
        let back: ImageConfig = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.vm().unwrap(), image);
        let foreign: ImageConfig = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Labels":{"maintainer":"x"}},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let e = foreign.vm().unwrap_err().to_string();
        assert!(e.contains("no io.vmctl.image.format label"), "{e}");
    }
}
