//! What the benchmarks share beyond the harness (`test-infra`, which boots
//! the bench guest and runs the backends): the test files they prepare,
//! their statistics, their tables, the binaries they measure.

pub mod diskstat;
pub mod environment;
pub mod launch;
pub mod stats;
pub mod table;

pub use stats::{median, percentile};

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};

/// `--markdown` and `--json`: where a benchmark writes its tables and its
/// figures besides stdout (one definition, flattened into every
/// benchmark's arguments).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Also write the tables (markdown) to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Also write every figure to this file, as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl OutputArgs {
    /// Prints `md`, and writes it and `figures` where the user asked.
    pub fn report(&self, md: &str, figures: &impl serde::Serialize) -> Result<()> {
        report(md, self.markdown.as_deref(), self.json.as_deref(), figures)
    }
}

/// Prints a benchmark's table, and writes it (markdown) and its figures
/// (JSON) where the user asked (`--markdown`, `--json`).
fn report(
    md: &str,
    markdown: Option<&Path>,
    json: Option<&Path>,
    figures: &impl serde::Serialize,
) -> Result<()> {
    print!("{md}");
    if let Some(p) = markdown {
        std::fs::write(p, md).with_context(|| format!("{}", p.display()))?;
    }
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_string_pretty(figures)?)
            .with_context(|| format!("{}", p.display()))?;
    }
    Ok(())
}

/// Why the release binaries could not be built (kept for every later
/// call in the process, hence cloneable).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    #[error("cargo build --release failed ({0})")]
    Failed(ExitStatus),
    #[error("running {cargo}")]
    NoCargo {
        cargo: String,
        #[source]
        error: Arc<std::io::Error>,
    },
}

/// One of the project's release binaries (`vmm`, `blk-backend`,
/// `net-backend`, `img`, `vmctl`, `containerd-shim-vmctl-v1`), beside the benchmark's own: a benchmark
/// measures what users run, not a debug build. They are built (or found
/// up to date: a no-op) once per benchmark, so that a benchmark never
/// measures a stale binary left from before a change.
pub fn release_binary(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<(), BuildError>> = OnceLock::new();
    let exe = std::env::current_exe().context("finding the benchmark itself")?;
    let p = exe.with_file_name(name);
    match BUILT.get_or_init(build_release) {
        Ok(()) if p.exists() => Ok(p),
        Ok(()) => bail!("{} is not among the release binaries", p.display()),
        // No cargo here (a copied benchmark): what is beside it, if there.
        Err(why) if p.exists() => {
            eprintln!(
                "[setup] {:#}: using {} as built",
                anyhow::Error::new(why.clone()),
                p.display()
            );
            Ok(p)
        }
        Err(why) => Err(anyhow::Error::new(why.clone()).context(format!(
            "{} is not built, and building it failed",
            p.display()
        ))),
    }
}

/// `cargo build --release` of the binaries the benchmarks measure.
fn build_release() -> std::result::Result<(), BuildError> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    // `cargo run` says which cargo; run directly, the one on PATH.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("[setup] building the release binaries (a no-op when up to date)");
    let status = Command::new(&cargo)
        .args(["build", "--release", "-q"])
        .args([
            "-p",
            "vmm",
            "-p",
            "vhost-blk-backend",
            "-p",
            "vhost-net-backend",
        ])
        .args([
            "-p",
            "image-format",
            "-p",
            "vmctl",
            "-p",
            "containerd-shim-vmctl",
        ])
        .current_dir(root)
        .status()
        .map_err(|e| BuildError::NoCargo {
            cargo,
            error: Arc::new(e),
        })?;
    if !status.success() {
        return Err(BuildError::Failed(status));
    }
    Ok(())
}

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

/// One fio job on `file` for `seconds` (O_DIRECT, time-based, JSON out),
/// `rw` with block size `bs` at depth `qd` on `engine`, plus `extra`
/// options: the figures of its `read` or `write` side (as `rw` is).
pub fn fio_job(
    file: &Path,
    engine: &str,
    (rw, bs, qd): (&str, &str, u32),
    seconds: u64,
    extra: &[String],
) -> Result<serde_json::Value> {
    let out = Command::new("fio")
        .args([
            "--name=b",
            "--direct=1",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--runtime={seconds}"))
        .args(extra)
        .output()
        .context("fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio json")?;
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    Ok(v["jobs"][0][side].clone())
}
