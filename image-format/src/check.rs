//! `img check [-r leaks|all]`: consistency of every layer of a chain, and
//! the repairs that keep content unchanged.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::disk::open_chain;
use crate::error::{io_at, Result};
use crate::header::FLAG_DIRTY;
use crate::layer::Layer;
use crate::lock::LockKind;
use crate::map::{AllocationMap, BlockState};
use crate::storage::Env;

/// What `-r` may fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    None,
    /// Leaked blocks and the dirty flag.
    Leaks,
    /// Also damaged header slots and invalid map entries.
    All,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LayerReport {
    pub path: PathBuf,
    pub uuid: String,
    pub sealed: bool,
    pub dirty: bool,
    /// Problems that make data wrong or unreadable.
    pub corruptions: Vec<String>,
    /// Space the map does not use (harmless), in blocks.
    pub leaked_blocks: u64,
    /// Notes that are not errors (a commit under way, a clean crash).
    pub notes: Vec<String>,
    pub repaired: Vec<String>,
}

/// `img check`: in qemu-img's keys (`filename`, `format`, `check-errors`,
/// `corruptions`, `leaks`, `total-clusters`, `allocated-clusters`,
/// `image-end-offset`), then per layer.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    #[serde(rename = "filename")]
    pub image: PathBuf,
    pub format: &'static str,
    /// 1 when the check could not be completed (the chain does not open).
    pub check_errors: usize,
    /// The chain could not be opened: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_error: Option<String>,
    pub corruptions: usize,
    /// Leaked blocks, over the whole chain.
    #[serde(rename = "leaks")]
    pub leaked_blocks: u64,
    /// The top layer's blocks, and those its map marks data.
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    /// The top layer file's length.
    pub image_end_offset: u64,
    pub repaired: usize,
    pub layers: Vec<LayerReport>,
    /// Who is using the image now, if anyone: its dirty flag and leaks are
    /// then those of a writer at work, not damage.
    #[serde(rename = "in-use", skip_serializing_if = "Option::is_none")]
    pub in_use: Option<String>,
}

impl CheckReport {
    /// qemu-img's exit codes: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.chain_error.is_some() {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaked_blocks > 0 {
            3
        } else {
            0
        }
    }
}

/// Checks (and with `mode`, repairs) the chain whose top is `path`.
pub fn check(env: &dyn Env, path: &Path, mode: RepairMode) -> Result<CheckReport> {
    let mut report = CheckReport {
        image: path.to_path_buf(),
        format: crate::info::FORMAT_NAME,
        in_use: env.lock_holder(path).ok().flatten().map(|h| h.to_string()),
        ..Default::default()
    };
    if mode != RepairMode::None {
        // Repairs are refused while a process has the image open, whether
        // or not anything needs repair (as qemu-img's -r is): an image
        // opened for writing is only marked dirty at its first write, so
        // the mark alone no longer tells.
        drop(env.lock(path, LockKind::Exclusive, "repair")?);
    }
    let chain = match open_chain(env, path, false) {
        Ok(c) => c,
        Err(e) => {
            // The top itself may still be checkable (a missing parent, say).
            let Ok(top) = Layer::open(env, path, false) else {
                return Err(e);
            };
            report.chain_error = Some(e.to_string());
            report.check_errors = 1;
            vec![top]
        }
    };
    {
        let top = &chain[0];
        report.total_clusters = top.header.blocks();
        report.allocated_clusters = crate::disk::load_valid_map(top)
            .map(|m| m.counts().0)
            .unwrap_or(0);
        report.image_end_offset = top.storage.len().map_err(io_at(path))?;
    }
    let paths: Vec<PathBuf> = chain.iter().map(|l| l.path.clone()).collect();
    drop(chain);
    for p in paths {
        let lr = check_layer(env, &p, mode)?;
        report.corruptions += lr.corruptions.len();
        report.leaked_blocks += lr.leaked_blocks;
        report.repaired += lr.repaired.len();
        report.layers.push(lr);
    }
    Ok(report)
}

/// Blocks whose data-area space is allocated while the map does not say
/// `data`, counted per filesystem page (the unit that can be freed).
fn leaked_units(layer: &Layer, map: &AllocationMap) -> Result<Vec<(u64, u64)>> {
    let h = &layer.header;
    let bs = h.block_size as u64;
    let unit = bs.max(4096);
    let per_unit = unit / bs;
    let start = h.data_offset;
    let end = h.data_offset + h.virtual_size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in layer
        .storage
        .data_ranges(start, end)
        .map_err(io_at(&layer.path))?
    {
        let first_unit = (s - start) / unit;
        let end_unit = (e - start).div_ceil(unit);
        let mut u = first_unit;
        while u < end_unit {
            let b0 = u * per_unit;
            // Skip runs the map fully covers quickly.
            let any_data =
                (b0..(b0 + per_unit).min(map.blocks())).any(|b| map.get(b) == BlockState::Data);
            if !any_data {
                let (off, len) = (u * unit, unit.min(h.virtual_size - u * unit));
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == off => last.1 += len,
                    _ => out.push((off, len)),
                }
            }
            u += 1;
        }
    }
    Ok(out)
}

fn check_layer(env: &dyn Env, path: &Path, mode: RepairMode) -> Result<LayerReport> {
    let layer = Layer::open(env, path, false)?;
    let h = layer.header.clone();
    let mut r = LayerReport {
        path: path.to_path_buf(),
        uuid: h.uuid.to_string(),
        sealed: h.sealed(),
        dirty: h.dirty(),
        ..Default::default()
    };
    let damaged_slot = layer.other_slot_damage.clone();
    if let Some(d) = &damaged_slot {
        // The current slot is intact; the spare one is not: what a header
        // update interrupted by a crash leaves. Harmless, and repairable.
        r.notes.push(format!(
            "spare header slot damaged (an interrupted header update): {d}"
        ));
    }
    if h.dirty() {
        r.notes.push(
            "not closed cleanly: writes after its last flush may be lost, space may have leaked"
                .into(),
        );
    }
    if h.parent_uuid_next.is_some() {
        r.notes
            .push("a commit into the parent is under way: run `img commit` again to finish".into());
    }
    let mut map = layer.load_map()?;
    let invalid = map.invalid_entries(usize::MAX);
    for e in invalid.iter().take(20) {
        r.corruptions.push(format!("map: {e}"));
    }
    if invalid.len() > 20 {
        r.corruptions
            .push(format!("map: {} more invalid entries", invalid.len() - 20));
    }
    let leaks = leaked_units(&layer, &map)?;
    let bs = h.block_size as u64;
    r.leaked_blocks = leaks.iter().map(|l| l.1.div_ceil(bs)).sum();
    drop(layer);

    let fix_slot = mode != RepairMode::None && damaged_slot.is_some();
    let fix_corruption = mode == RepairMode::All && !invalid.is_empty();
    let fix_leaks = mode != RepairMode::None && (!leaks.is_empty() || h.dirty());
    if !(fix_corruption || fix_leaks || fix_slot) {
        return Ok(r);
    }
    let _lock = env.lock(path, LockKind::Exclusive, "repair")?;
    let mut layer = Layer::open(env, path, true)?;
    if fix_corruption {
        let ranges = layer
            .storage
            .data_ranges(h.data_offset, h.data_offset + h.virtual_size)
            .map_err(io_at(path))?;
        let has_data = |b: u64| {
            let (s, e) = (h.data_offset + b * bs, h.data_offset + (b + 1) * bs);
            ranges.iter().any(|&(rs, re)| rs < e && s < re)
        };
        let n = map.fix_invalid(has_data);
        layer.flush_map(&mut map)?;
        r.repaired.push(format!("reset {n} invalid map entries"));
        r.corruptions.retain(|c| !c.starts_with("map:"));
    }
    if fix_leaks {
        for (off, len) in &leaks {
            layer
                .storage
                .punch_hole(h.data_offset + off, *len)
                .map_err(io_at(path))?;
        }
        layer.storage.sync_data().map_err(io_at(path))?;
        if !leaks.is_empty() {
            r.repaired
                .push(format!("freed {} leaked blocks", r.leaked_blocks));
            r.leaked_blocks = 0;
        }
    }
    // Rewriting the header fixes the spare slot and (with leaks gone) clears dirty.
    let clear_dirty = fix_leaks && h.dirty();
    if fix_slot || clear_dirty {
        layer.update_header(|hh| {
            if clear_dirty {
                hh.flags &= !FLAG_DIRTY
            }
        })?;
        if fix_slot {
            // Both slots must be good: write once more so the spare is current too.
            layer.update_header(|_| {})?;
            r.repaired.push("rewrote the damaged header slot".into());
            r.notes.retain(|c| !c.starts_with("spare header slot"));
        }
        if clear_dirty {
            r.repaired.push("cleared the dirty flag".into());
            r.dirty = false;
        }
    }
    Ok(r)
}
