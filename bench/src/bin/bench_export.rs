//! Images reached from the host: `img export` (our chain as one file
//! through FUSE) against qemu-storage-daemon's FUSE export of a qcow2
//! holding the same data, fio on each in turn, in one run; and
//! `img create --fs ext4 --from` on a tree against mkfs.ext4 into a raw
//! file followed by `img convert`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use clap::Parser;
use test_infra::{KillOnDrop, Patience};

#[derive(Parser)]
#[command(
    about = "img export vs qemu-storage-daemon's FUSE export (fio), and img create --fs --from vs mkfs + img convert"
)]
struct Args {
    /// The image's size (filled with random data).
    #[arg(long, default_value = "1G", value_parser = cli_support::parse_size)]
    size: u64,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Measurements per cell (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The tree for the mkfs rows: bytes of files (4 MiB each).
    #[arg(long, default_value = "1G", value_parser = cli_support::parse_size)]
    tree: u64,
    /// Where the images go (a real disk, not tmpfs).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[command(flatten)]
    out: bench::OutputArgs,
}

/// One fio job.
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

const JOBS: [Job; 4] = [
    Job {
        name: "seq read 1M",
        rw: "read",
        bs: "1M",
        qd: 4,
    },
    Job {
        name: "seq write 1M",
        rw: "write",
        bs: "1M",
        qd: 4,
    },
    Job {
        name: "rand read 4k",
        rw: "randread",
        bs: "4k",
        qd: 16,
    },
    Job {
        name: "rand write 4k",
        rw: "randwrite",
        bs: "4k",
        qd: 16,
    },
];

#[derive(serde::Serialize)]
struct Cell {
    job: &'static str,
    export: &'static str,
    mb_s: f64,
    iops: f64,
}

/// fio on `file` (O_DIRECT through the FUSE file, libaio): MB/s and IOPS.
fn fio(file: &Path, job: &Job, seconds: u64, size: u64) -> Result<(f64, f64)> {
    let side = bench::fio_job(
        file,
        "libaio",
        (job.rw, job.bs, job.qd),
        seconds,
        &[format!("--size={size}")],
    )?;
    Ok((
        side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        side["iops"].as_f64().unwrap_or(0.0),
    ))
}

/// Waits until `file` is served at `size` bytes (an export mounted).
fn served(file: &Path, size: u64) -> Result<()> {
    Patience::new("an export", Duration::from_millis(500))
        .wait_until(|| Ok(std::fs::metadata(file).is_ok_and(|m| m.len() == size)))?;
    Ok(())
}

fn ours(img: &Path, image: &Path, file: &Path, size: u64) -> Result<KillOnDrop> {
    let child = KillOnDrop(
        Command::new(img)
            .arg("export")
            .arg(image)
            .arg(file)
            .stdout(Stdio::null())
            .spawn()
            .context("img export")?,
    );
    served(file, size)?;
    Ok(child)
}

fn qsd(qcow2: &Path, file: &Path, size: u64) -> Result<KillOnDrop> {
    std::fs::File::create(file)?;
    let child = KillOnDrop(
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f,cache.direct=off",
                qcow2.display()
            ))
            .args(["--blockdev", "driver=qcow2,file=f,node-name=q"])
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e,node-name=q,mountpoint={},writable=on",
                file.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .context("qemu-storage-daemon")?,
    );
    served(file, size)?;
    Ok(child)
}

fn stop(mut child: KillOnDrop) {
    // SAFETY: kill with a signal number, on our child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let _ = child.0.wait();
}

/// The tree for the mkfs rows: `bytes` of random data in 4 MiB files, 16
/// to a directory.
fn make_tree(root: &Path, bytes: u64) -> Result<()> {
    let files = bytes.div_ceil(4 << 20);
    for i in 0..files {
        let d = root.join(format!("d{:03}", i / 16));
        std::fs::create_dir_all(&d)?;
        bench::fill_random(&d.join(format!("f{i:05}")), 4 << 20)?;
    }
    Ok(())
}

/// Each job's two exports, ours first, its MB/s over
/// qemu-storage-daemon's on our row.
fn exports_table(cells: &[Cell]) -> Table {
    let mut table = Table::new([
        ("job", Left),
        ("export", Left),
        ("MB/s", Right),
        ("IOPS", Right),
        ("vs qemu-storage-daemon", Right),
    ]);
    for pair in cells.chunks(2) {
        for (k, c) in pair.iter().enumerate() {
            table.row([
                c.job.to_string(),
                c.export.to_string(),
                format!("{:.1}", c.mb_s),
                format!("{:.0}", c.iops),
                Ratio::pair_cell(pair, k, |c| c.mb_s, 2),
            ]);
        }
    }
    table
}

/// `img create --fs --from` (`ours_s` seconds) against mkfs + convert
/// (`theirs_s`): the speed ratio is their time over ours.
fn mkfs_table(tree: u64, ours_s: f64, theirs_s: f64) -> Table {
    let mut table = Table::new([
        (format!("{tree} of files into ext4"), Left),
        ("seconds".into(), Right),
        ("speed vs mkfs + convert".into(), Right),
    ]);
    table
        .row([
            "img create --fs ext4 --from".to_string(),
            format!("{ours_s:.2}"),
            Ratio::of(theirs_s, ours_s).times(2),
        ])
        .row([
            "mkfs.ext4 -d on a raw file + img convert".to_string(),
            format!("{theirs_s:.2}"),
            String::new(),
        ]);
    table
}

fn main() -> Result<()> {
    let a = Args::parse();
    let img = bench::release_binary("img")?;
    let work = tempfile::tempdir_in(&a.dir)?;
    let w = |n: &str| work.path().join(n);
    std::env::set_var("IMG_RUN_DIR", w("run"));

    // The same bytes in both formats.
    eprintln!("preparing {} bytes of data", a.size);
    let raw = w("data.raw");
    bench::fill_random(&raw, a.size)?;
    let snap = w("data.img");
    let qcow2 = w("data.qcow2");
    let run = |c: &mut Command| -> Result<()> {
        let st = c.status()?;
        if !st.success() {
            bail!("{c:?}: {st}");
        }
        Ok(())
    };
    run(Command::new(&img)
        .args(["convert", "-q", "-O", "snap"])
        .arg(&raw)
        .arg(&snap))?;
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2))?;
    std::fs::remove_file(&raw)?;

    const EXPORTS: [&str; 2] = ["img export", "qemu-storage-daemon"];
    let mut cells = Vec::new();
    for job in &JOBS {
        // The two exports take turns, each run starting with nothing dirty
        // in the page cache: the writeback of one run's writes does not
        // fall on the next one's measurement, and drift hits both alike.
        let mut mb = [Vec::new(), Vec::new()];
        let mut iops = [Vec::new(), Vec::new()];
        for run in 0..a.runs {
            for (k, export) in EXPORTS.iter().enumerate() {
                eprintln!("[{}] {export}, run {}", job.name, run + 1);
                // SAFETY: sync has no preconditions.
                unsafe { libc::sync() };
                let file = w("export.raw");
                let child = if k == 0 {
                    ours(&img, &snap, &file, a.size)?
                } else {
                    qsd(&qcow2, &file, a.size)?
                };
                let r = fio(&file, job, a.seconds, a.size);
                stop(child);
                let (m, i) = r?;
                mb[k].push(m);
                iops[k].push(i);
            }
        }
        for (k, (mb, iops)) in mb.into_iter().zip(iops).enumerate() {
            cells.push(Cell {
                job: job.name,
                export: EXPORTS[k],
                mb_s: bench::median(&mb)?,
                iops: bench::median(&iops)?,
            });
        }
    }

    // mkfs rows.
    eprintln!("making a {}-byte tree", a.tree);
    let tree = w("tree");
    make_tree(&tree, a.tree)?;
    let fs_size = (a.tree * 2).max(256 << 20).to_string();
    let mut ours_s = Vec::new();
    let mut theirs_s = Vec::new();
    for _ in 0..a.runs {
        let out = w("fs.img");
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        run(Command::new(&img)
            .args(["create", "-q", "--fs", "ext4", "--from"])
            .arg(&tree)
            .arg(&out)
            .arg(&fs_size))?;
        ours_s.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&out)?;

        let raw = w("fs.raw");
        let conv = w("fs-conv.img");
        let _ = std::fs::remove_file(&conv);
        let t = Instant::now();
        run(Command::new("truncate").args(["-s", &fs_size]).arg(&raw))?;
        run(Command::new("mkfs.ext4")
            .args(["-F", "-q", "-d"])
            .arg(&tree)
            .arg(&raw))?;
        run(Command::new(&img)
            .args(["convert", "-q", "-O", "snap"])
            .arg(&raw)
            .arg(&conv))?;
        theirs_s.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&raw)?;
        std::fs::remove_file(&conv)?;
    }
    let (o, t) = (bench::median(&ours_s)?, bench::median(&theirs_s)?);

    let md = format!("{}\n{}", exports_table(&cells), mkfs_table(a.tree, o, t));
    #[derive(serde::Serialize)]
    struct Figures {
        exports: Vec<Cell>,
        create_fs_s: f64,
        mkfs_raw_convert_s: f64,
    }
    a.out.report(
        &md,
        &Figures {
            exports: cells,
            create_fs_s: o,
            mkfs_raw_convert_s: t,
        },
    )
}
