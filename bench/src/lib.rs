//! What the benchmarks share beyond the harness (`test-infra`, which boots
//! the bench guest and runs the backends): the test files they prepare.

pub mod launch;

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Writes `size` bytes of random data to `path` with fio (O_DIRECT, 1 MiB
/// writes), the way every storage benchmark here prepares its file.
pub fn fill_random(path: &Path, size: u64) -> Result<()> {
    let st = Command::new("fio")
        .args([
            "--name=fill",
            "--rw=write",
            "--bs=1M",
            "--ioengine=io_uring",
            "--direct=1",
        ])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .args(["--refill_buffers=1", "--output=/dev/null"])
        .status()
        .context("fio")?;
    if !st.success() {
        bail!("fio could not fill {}", path.display());
    }
    Ok(())
}
