//! Booting a VM through containerd: `ctr run` of a cached VM image
//! (containerd 1.6, containerd-shim-vmctl-v1, vmctl) against vmctl on its
//! own with the same image, each timed from the command to the guest's
//! start marker on its console: vmctl start of a defined VM (the
//! baseline), vmctl create + start (what the shim has vmctl do), and ctr
//! run. The three alternate round by round in one run; containerd's
//! overhead is ctr run less vmctl start, within each round.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::stats::spread;
use bench::table::{
    Align::{Left, Right},
    Table,
};
use clap::Parser;
use test_infra::containerd::RUNTIME;
use test_infra::{LocalContainerd, LocalRegistry, START_MARKER};

#[derive(Parser)]
#[command(
    about = "Booting a VM through containerd (ctr run) against vmctl start, to the guest's start marker"
)]
struct Args {
    /// Rounds (each boots one VM each way).
    #[arg(long, default_value_t = 15)]
    runs: usize,
    /// Where the image, the registry, containerd and vmctl keep their files.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[command(flatten)]
    out: bench::OutputArgs,
}

#[derive(serde::Serialize)]
struct Figures {
    /// Milliseconds to the start marker, round by round.
    vmctl_start_ms: Vec<f64>,
    vmctl_create_start_ms: Vec<f64>,
    ctr_run_ms: Vec<f64>,
    /// `ctr version`: the client's own start and one call.
    ctr_version_ms: Vec<f64>,
    /// ctr run less vmctl start, round by round.
    overhead_ms: Vec<f64>,
    /// The same less ctr's own start (what a kubelet, connected for
    /// good, does not pay per pod).
    overhead_without_client_ms: Vec<f64>,
}

/// Runs `cmd` and times it to the start marker on its stdout; then lets it
/// end (a guest of mode=boot exits at once).
fn to_marker(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let out = child.stdout.take().expect("piped");
    let mut seen = None;
    for line in BufReader::new(out).lines() {
        if seen.is_none() && line?.contains(START_MARKER) {
            seen = Some(t.elapsed());
        }
    }
    let st = child.wait()?;
    match seen {
        Some(d) if st.success() => Ok(d.as_secs_f64() * 1e3),
        _ => bail!("{cmd:?}: {st}, start marker seen: {}", seen.is_some()),
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let vmctl = bench::release_binary("vmctl")?;
    let img = bench::release_binary("img")?;
    bench::release_binary("containerd-shim-vmctl-v1")?;
    let work = tempfile::tempdir_in(&a.dir)?;
    let dir = work.path();
    let reg = LocalRegistry::start(dir)?;
    let base = dir.join("base.img");
    run(Command::new(&img).arg("create").arg(&base).arg("64M"))?;
    run(Command::new(&img)
        .args(["snapshot", "-c", "golden"])
        .arg(&base))?;
    let reference = format!("{}/vms/boot:1", reg.address);
    let node = dir.join("node");
    let vm = |args: &[&str]| -> Command {
        let mut c = Command::new(&vmctl);
        c.env("VMCTL_STATE_DIR", &node).args(args);
        c
    };
    run(vm(&["image", "push"])
        .arg(format!("{}@golden", base.display()))
        .args([&reference, "--cmdline", "mode=boot", "--memory", "64M"]))?;
    let bin_dir = vmctl.parent().unwrap_or(Path::new("."));
    let c = LocalContainerd::start_with(&dir.join("containerd"), &node, None, bin_dir)?;
    let pulled = c.ctr(
        &["image", "pull", "--plain-http", &reference],
        Duration::from_secs(2),
    );
    if !pulled.status.success() {
        bail!(
            "ctr image pull: {}",
            String::from_utf8_lossy(&pulled.stderr)
        );
    }
    // The store has the image before the rounds: each way boots a cached
    // image.
    run(&mut vm(&["image", "pull", &reference]))?;
    let sock = c.socket.to_string_lossy().into_owned();
    let mut f = Figures {
        vmctl_start_ms: Vec::new(),
        vmctl_create_start_ms: Vec::new(),
        ctr_run_ms: Vec::new(),
        ctr_version_ms: Vec::new(),
        overhead_ms: Vec::new(),
        overhead_without_client_ms: Vec::new(),
    };
    // One round of each first, unmeasured: the page cache warm for all.
    for k in 0..=a.runs {
        let defined = format!("defined-{k}");
        run(&mut vm(&["create", &defined, "--image", &reference]))?;
        let start = {
            let t = Instant::now();
            run(&mut vm(&["start", &defined]))?;
            let started = t.elapsed().as_secs_f64() * 1e3;
            started + to_marker(&mut vm(&["logs", "--follow", &defined]))?
        };
        run(&mut vm(&["delete", "--force", &defined]))?;
        let fresh = format!("fresh-{k}");
        let create_start = {
            let t = Instant::now();
            run(&mut vm(&["create", &fresh, "--image", &reference]))?;
            run(&mut vm(&["start", &fresh]))?;
            let started = t.elapsed().as_secs_f64() * 1e3;
            started + to_marker(&mut vm(&["logs", "--follow", &fresh]))?
        };
        run(&mut vm(&["delete", "--force", &fresh]))?;
        let ctr = to_marker(Command::new("ctr").args([
            "--address",
            &sock,
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            &reference,
            &format!("ctr-{k}"),
        ]))?;
        let version = {
            let t = Instant::now();
            run(Command::new("ctr").args(["--address", &sock, "version"]))?;
            t.elapsed().as_secs_f64() * 1e3
        };
        eprintln!("round {k}: vmctl start {start:.1} ms, create+start {create_start:.1} ms, ctr run {ctr:.1} ms, ctr version {version:.1} ms");
        if k == 0 {
            continue;
        }
        f.vmctl_start_ms.push(start);
        f.vmctl_create_start_ms.push(create_start);
        f.ctr_run_ms.push(ctr);
        f.ctr_version_ms.push(version);
        f.overhead_ms.push(ctr - start);
        f.overhead_without_client_ms.push(ctr - start - version);
    }
    let mut t = Table::new([
        ("to the guest's start marker", Left),
        ("median ms", Right),
        ("min–max ms", Right),
    ]);
    for (what, v) in [
        ("vmctl start (a defined VM)", &f.vmctl_start_ms),
        ("vmctl create + start", &f.vmctl_create_start_ms),
        ("ctr run (containerd, the shim, vmctl)", &f.ctr_run_ms),
        (
            "ctr version (the client's start and one call)",
            &f.ctr_version_ms,
        ),
        (
            "containerd's overhead: ctr run − vmctl start",
            &f.overhead_ms,
        ),
        (
            "the same without ctr's own start (as kubelet drives it)",
            &f.overhead_without_client_ms,
        ),
    ] {
        let s = spread(v)?;
        t.row([
            what.to_string(),
            format!("{:.1}", s.median),
            format!("{:.1}–{:.1}", s.min, s.max),
        ]);
    }
    let md = format!(
        "### Booting through containerd ({} rounds)\n\n{}\nGoal: containerd's overhead under 50 ms.\n",
        a.runs,
        t
    );
    a.out.report(&md, &f)
}
