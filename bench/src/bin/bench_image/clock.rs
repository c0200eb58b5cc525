//! Timing: how long a step takes, and the throughput it makes.

use anyhow::Result;
use std::time::Instant;

/// Timed runs per figure (after one warm-up).
pub const REPS: usize = 3;

/// How long `f` takes, in seconds.
pub fn seconds(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// MB/s in decimal megabytes, as `dd` and `fio` print them.
pub fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}
