//! The image every row measures: written end to end by a guest through
//! blk-backend (O_DIRECT), as a VM writes its disk, kept between runs
//! with `--keep`, and the window of its file that holds its data.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use test_infra::{BlkBackendProcess, Disk, Machine, QemuConsole, QemuVm};

use crate::rows::{run_patience, Binaries};

/// The image `snap` of `size` bytes, written (or kept from the last run
/// with `--keep`), and its data window.
pub fn prepare(keep: bool, bins: &Binaries, snap: &Path, size: u64) -> Result<(u64, u64)> {
    // (Not `img convert`: on this machine's ext4, a file first written
    // through the page cache takes O_DIRECT random writes at half the rate
    // of one written with O_DIRECT.)
    match data_window(snap, size) {
        Some(w) if keep => {
            eprintln!("[setup] reusing {} (kept by --keep)", snap.display());
            Ok(w)
        }
        _ => {
            write_image(&bins.img, &bins.backend, snap, size)?;
            data_window(snap, size).with_context(|| {
                format!(
                    "{}: its data is not one run in file order, so the raw rows \
                     cannot read the same bytes",
                    snap.display()
                )
            })
        }
    }
}

/// Removes the image `snap` and the snapshots beside it (`NAME@...`, a
/// chain's layers).
pub fn remove_image(snap: &Path) {
    let _ = std::fs::remove_file(snap);
    let (Some(dir), Some(name)) = (snap.parent(), snap.file_name()) else {
        return;
    };
    let prefix = format!("{}@", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Makes `snap` a `size`-byte image written end to end by a guest
/// through blk-backend.
fn write_image(img_bin: &Path, backend_bin: &Path, snap: &Path, size: u64) -> Result<()> {
    remove_image(snap);
    let st = Command::new(img_bin)
        .arg("create")
        .arg(snap)
        .arg(size.to_string())
        .status()?;
    if !st.success() {
        bail!("img create failed");
    }
    eprintln!("[setup] writing {} through blk-backend", snap.display());
    let sock = std::env::temp_dir().join(format!("bench-fill-{}.sock", std::process::id()));
    let b = BlkBackendProcess::start(backend_bin, snap, &sock, 1, false)?;
    let r = QemuVm {
        machine: Machine::Microvm,
        mem_mib: 512,
        disk: Disk::vhost_user(&sock, 1),
        cmdline: "mode=write bs=1m qd=8 progress_ms=0".into(),
        limit: run_patience(600),
        silence: run_patience(600),
        console: QemuConsole::Uart,
        nic: None,
    }
    .run()?;
    if !r.ok() {
        bail!("filling the image failed:\n{}", r.serial);
    }
    b.stop();
    Ok(())
}

/// Where a `size`-byte image keeps its data, as `(file offset, size)`,
/// when it is all there, one run in the order of the disk (an image
/// written front to back): a raw view of that window reads the same
/// bytes as the image. None otherwise (or when it is not such an image).
fn data_window(snap: &Path, size: u64) -> Option<(u64, u64)> {
    let disk = image_format::Disk::open_path(snap, false).ok()?;
    if disk.virtual_size() != size || disk.layers().len() != 1 {
        return None;
    }
    let mut start = None;
    for e in disk.resolve(0, size) {
        let image_format::Source::Layer {
            layer: 0,
            file_offset,
        } = e.source
        else {
            return None;
        };
        let base = file_offset.checked_sub(e.offset)?;
        if *start.get_or_insert(base) != base {
            return None;
        }
    }
    start.map(|s| (s, size))
}
