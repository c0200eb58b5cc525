//! `img info` and `img map`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::disk::{Disk, Source};
use crate::error::Result;
use crate::storage::Env;

/// One layer, described as qemu-img describes an image (its keys), with
/// what a snap layer adds. Every JSON key here and in the other outputs of
/// `img` is kebab-case, as qemu-img's are.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LayerInfo {
    pub filename: PathBuf,
    pub format: &'static str,
    pub virtual_size: u64,
    pub cluster_size: u32,
    /// Space the file occupies on disk (real filesystem only).
    pub actual_size: Option<u64>,
    pub dirty_flag: bool,
    /// The parent as the layer names it (relative to its directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The parent's path as it opens from here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<&'static str>,
    pub uuid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_uuid: Option<String>,
    /// The snapshot's name, for a named sealed layer.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub snapshot_name: String,
    pub sealed: bool,
    pub generation: u64,
    /// Bytes the layer's own map marks `data` and `zero`.
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Who is using the layer now ("open for writing by process 4242"),
    /// from the locks (crate::lock); absent when nobody is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_use: Option<String>,
}

/// `img info`: the top layer in qemu-img's keys, and the whole chain.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    #[serde(flatten)]
    pub top: LayerInfo,
    pub chain_depth: usize,
    /// Top first (the top again, then its parent, ...).
    pub chain: Vec<LayerInfo>,
    /// Memory the chain's merged index takes.
    pub index_bytes: usize,
}

pub const FORMAT_NAME: &str = "snap";

pub fn info(env: &Arc<dyn Env>, path: &Path) -> Result<ImageInfo> {
    // Unlocked: info works on an image in use, and says so.
    let disk = Disk::open_unlocked(Arc::clone(env), path)?;
    let mut chain = Vec::new();
    for layer in disk.layers().iter().rev() {
        let h = &layer.header;
        let map = layer.load_map()?;
        let (data, zero) = map.counts();
        let bs = h.block_size as u64;
        let parent = layer.parent_path();
        chain.push(LayerInfo {
            filename: layer.path.clone(),
            format: FORMAT_NAME,
            virtual_size: h.virtual_size,
            cluster_size: h.block_size,
            actual_size: std::fs::metadata(&layer.path)
                .ok()
                .map(|m| m.blocks() * 512),
            dirty_flag: h.dirty(),
            backing_filename: h.parent_path.clone(),
            backing_filename_format: parent.as_ref().map(|_| FORMAT_NAME),
            full_backing_filename: parent,
            uuid: h.uuid.to_string(),
            backing_uuid: h.parent_uuid.map(|u| u.to_string()),
            snapshot_name: h.name.clone(),
            sealed: h.sealed(),
            generation: h.generation,
            data_bytes: data * bs,
            zero_bytes: zero * bs,
            in_use: env
                .lock_holder(&layer.path)
                .ok()
                .flatten()
                .map(|h| h.to_string()),
        });
    }
    let mut top = chain[0].clone();
    top.filename = path.to_path_buf();
    Ok(ImageInfo {
        top,
        chain_depth: chain.len(),
        index_bytes: disk.index().memory_bytes(),
        chain,
    })
}

impl ImageInfo {
    /// The human form, in qemu-img's style.
    pub fn to_text(&self) -> String {
        let t = &self.top;
        let mut s = format!(
            "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\ncluster_size: {}\nchain depth: {}\n",
            t.filename.display(),
            t.format,
            human(t.virtual_size),
            t.virtual_size,
            t.actual_size.map(human).unwrap_or_else(|| "unknown".into()),
            t.cluster_size,
            self.chain_depth
        );
        for (i, l) in self.chain.iter().enumerate() {
            s += &format!(
                "layer {i}: {}{}{}{}\n    uuid: {}\n    data: {}, zero: {}\n",
                l.filename.display(),
                if l.sealed { " [sealed]" } else { "" },
                if l.dirty_flag { " [dirty]" } else { "" },
                if l.snapshot_name.is_empty() {
                    String::new()
                } else {
                    format!(" snapshot {:?}", l.snapshot_name)
                },
                l.uuid,
                human(l.data_bytes),
                human(l.zero_bytes)
            );
            if let Some(p) = &l.backing_filename {
                s += &format!("    backing file: {p}\n");
            }
            if let Some(u) = &l.in_use {
                s += &format!("    in use: {u}\n");
            }
        }
        s
    }
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u])
            .replace(".000 ", " ")
            .to_string()
    }
}

/// One row of `img map`, like qemu-img's JSON map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// 0 = the top layer, 1 = its parent, ...
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    /// The file and file offset holding the data.
    pub filename: Option<PathBuf>,
    pub offset: Option<u64>,
}

pub fn map(env: &Arc<dyn Env>, path: &Path) -> Result<Vec<MapEntry>> {
    // Unlocked: a map of an image in use is a snapshot of a moving target.
    let disk = Disk::open_unlocked(Arc::clone(env), path)?;
    let depth = disk.layers().len();
    let mut out: Vec<MapEntry> = Vec::new();
    for e in disk.resolve(0, disk.virtual_size()) {
        let entry = match e.source {
            Source::Zero => MapEntry {
                start: e.offset,
                length: e.len,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                filename: None,
                offset: None,
            },
            Source::Layer { layer, file_offset } => MapEntry {
                start: e.offset,
                length: e.len,
                depth: depth - 1 - layer,
                present: true,
                zero: false,
                data: true,
                filename: Some(disk.layer_path(layer).clone()),
                offset: Some(file_offset),
            },
        };
        // The index splits at chunk boundaries only when owners change, but
        // keep the output canonical anyway.
        if let Some(last) = out.last_mut() {
            let contiguous = last.start + last.length == entry.start
                && last.depth == entry.depth
                && last.data == entry.data
                && last.filename == entry.filename;
            if contiguous {
                last.length += entry.length;
                continue;
            }
        }
        out.push(entry);
    }
    Ok(out)
}
