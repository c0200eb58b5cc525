//! Where the programs a VM needs are: `vmm` and `blk-backend` beside this
//! `vmctl` (one build, one directory) or on PATH; the built-in bench
//! guest in the build's `guest/` directory.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MissingBinary {
    #[error("{0} is neither beside vmctl nor on PATH (build it: cargo build --release)")]
    Program(&'static str),
    #[error(
        "the built-in bench guest is not built (bash bench/guest/build.sh; or give --kernel, or VMCTL_BENCH_GUEST=PATH)"
    )]
    BenchGuest,
    #[error("VMCTL_BENCH_GUEST={0}: no such file")]
    BenchGuestAt(PathBuf),
}

/// The directory vmctl runs from (resolved once per process: a fleet
/// looked it up for every VM it started).
fn exe_dir() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        std::env::current_exe()
            .ok()?
            .canonicalize()
            .ok()?
            .parent()
            .map(Path::to_path_buf)
    })
    .clone()
}

/// `name` beside vmctl, else on PATH.
pub fn program(name: &'static str) -> Result<PathBuf, MissingBinary> {
    if let Some(p) = exe_dir().map(|d| d.join(name)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(MissingBinary::Program(name))
}

/// The bench guest: $VMCTL_BENCH_GUEST, else `guest/bench-guest.elf` in
/// the build tree vmctl runs from.
pub fn bench_guest() -> Result<PathBuf, MissingBinary> {
    if let Some(p) = std::env::var_os("VMCTL_BENCH_GUEST") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(MissingBinary::BenchGuestAt(p))
        };
    }
    let dir = exe_dir().ok_or(MissingBinary::BenchGuest)?;
    dir.ancestors()
        .take(4)
        .flat_map(|a| {
            [
                a.join("guest/bench-guest.elf"),
                a.join("target/guest/bench-guest.elf"),
            ]
        })
        .find(|p| p.is_file())
        .ok_or(MissingBinary::BenchGuest)
}
