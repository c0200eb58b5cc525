//! Section 3: `convert` raw -> snap -> raw against `qemu-img convert`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use bench::stats::{spread, Spread};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use image_format::convert::{convert, Format};
use serde::Serialize;

use crate::cells::{fmt_bytes, fmt_spread};
use crate::clock::{seconds, REPS};
use crate::files::{files_equal, remove_if_exists, write_random_file};
use crate::{Plan, MIB};

/// One tool converting one way, timed.
#[derive(Debug, Serialize)]
struct ConvertRow {
    tool: String,
    from: String,
    to: String,
    seconds: Vec<f64>,
    gb_s: Vec<f64>,
    throughput: Spread,
}

/// Section 3's figures.
#[derive(Debug, Serialize)]
pub struct ConvertReport {
    bytes: u64,
    qemu_img: Option<String>,
    rows: Vec<ConvertRow>,
    /// raw -> snap -> raw gives back the input.
    img_round_trip_identical: bool,
    /// raw -> qcow2 -> raw gives back the input (checks the baseline).
    qemu_round_trip_identical: Option<bool>,
}

/// The first line of `qemu-img --version`, if it runs.
pub fn qemu_img_version() -> Option<String> {
    let out = Command::new("qemu-img").arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or_default().to_string())
}

/// `qemu-img convert` with a writeback cache: its default for convert is
/// "unsafe" (no sync at all), while the library syncs its output, so the
/// default would compare a page-cache copy with a durable one.
fn qemu_convert(input: &Path, from: &str, output: &Path, to: &str) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-t", "writeback", "-f", from, "-O", to])
        .arg(input)
        .arg(output)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img convert -f {from} -O {to} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The library's conversion, as `img convert` runs it.
fn img_convert(input: &Path, from: Format, output: &Path, to: Format) -> Result<()> {
    convert(input, Some(from), output, to, None, false, &mut |_, _| {})
        .with_context(|| format!("converting {} to {}", input.display(), output.display()))?;
    Ok(())
}

/// Touches `bytes` of fresh memory and frees it again. This VM hands idle
/// free memory back to the host (virtio-balloon free page reporting), and
/// the first touch of such a page costs a host fault: a conversion whose
/// output's page cache landed on such pages ran 3x slower here than one
/// that reused just-freed pages, whatever the tool. Done right before each
/// timed conversion, every one starts with the same hot free memory.
fn warm_free_memory(bytes: u64) {
    let mut pages = vec![0u8; bytes as usize];
    for b in pages.iter_mut().step_by(4096) {
        *b = 1;
    }
    // Keeps the stores: they are the point, though nothing reads them.
    std::hint::black_box(&pages);
}

/// Section 3 in `dir`.
pub fn bench_convert(dir: &Path, plan: &Plan) -> Result<ConvertReport> {
    let size = plan.convert_size;
    let qemu = qemu_img_version();
    if qemu.is_none() {
        eprintln!("warning: qemu-img not found; section 3 has no baseline");
    }
    let input = dir.join("input.raw");
    eprintln!("[convert] writing {} of random data", fmt_bytes(size));
    write_random_file(&input, size)?;
    let snap = dir.join("image.snap");
    let back = dir.join("image-back.raw");
    let qcow2 = dir.join("image.qcow2");
    let qback = dir.join("qcow2-back.raw");
    let qcopy = dir.join("qemu-copy.raw");

    // Steps, in row order: img raw->snap, img snap->raw, qemu raw->qcow2,
    // qemu qcow2->raw, qemu raw->raw. A pair stays together (its second
    // step reads the first's output); the groups rotate every run so that
    // no tool always goes first or last.
    let groups: &[&[usize]] = if qemu.is_some() {
        &[&[0, 1], &[2, 3], &[4]]
    } else {
        &[&[0, 1]]
    };
    let step = |n: usize| match n {
        0 => img_convert(&input, Format::Raw, &snap, Format::Snap),
        1 => img_convert(&snap, Format::Snap, &back, Format::Raw),
        2 => qemu_convert(&input, "raw", &qcow2, "qcow2"),
        3 => qemu_convert(&qcow2, "qcow2", &qback, "raw"),
        _ => qemu_convert(&input, "raw", &qcopy, "raw"),
    };
    let mut secs: [Vec<f64>; 5] = Default::default();
    let mut img_identical = false;
    let mut qemu_identical = None;
    // Run 0 is the warm-up; it is also where the round trips are checked.
    for rep in 0..=REPS {
        eprintln!("[convert] run {rep} of {REPS} (0 = warm-up)");
        for g in 0..groups.len() {
            let group = groups[(rep + g) % groups.len()];
            for &n in group {
                warm_free_memory(size + 256 * MIB);
                let t = seconds(|| step(n))?;
                if rep > 0 {
                    secs[n].push(t);
                }
            }
            // Outputs go as soon as they are checked: the page cache must
            // keep holding the input.
            match group[0] {
                0 => {
                    if rep == 0 {
                        img_identical = files_equal(&input, &back)?;
                    }
                    remove_if_exists(&back)?;
                    remove_if_exists(&snap)?;
                }
                2 => {
                    if rep == 0 {
                        qemu_identical = Some(files_equal(&input, &qback)?);
                    }
                    remove_if_exists(&qback)?;
                    remove_if_exists(&qcow2)?;
                }
                _ => remove_if_exists(&qcopy)?,
            }
        }
    }
    remove_if_exists(&input)?;
    let labels = [
        ("img (library)", "raw", "snap"),
        ("img (library)", "snap", "raw"),
        ("qemu-img", "raw", "qcow2"),
        ("qemu-img", "qcow2", "raw"),
        ("qemu-img", "raw", "raw"),
    ];
    let rows = labels
        .iter()
        .zip(secs)
        .filter(|(_, s)| !s.is_empty())
        .map(|((tool, from, to), seconds)| {
            let gb_s: Vec<f64> = seconds.iter().map(|s| size as f64 / s / 1e9).collect();
            Ok(ConvertRow {
                tool: tool.to_string(),
                from: from.to_string(),
                to: to.to_string(),
                throughput: spread(&gb_s)?,
                gb_s,
                seconds,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ConvertReport {
        bytes: size,
        qemu_img: qemu,
        rows,
        img_round_trip_identical: img_identical,
        qemu_round_trip_identical: qemu_identical,
    })
}

/// Section 3's table and round trips.
pub fn markdown(c: &ConvertReport, dir: &Path) -> String {
    let mut m = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(m, "## 3. convert vs qemu-img convert\n");
    let _ = writeln!(
        m,
        "{} of random data in a raw file, in {}; outputs synced (qemu-img with \
         `-t writeback`; its convert default, `unsafe`, never syncs); input in the \
         page cache; one warm-up, then median of {REPS} (min–max), tools rotating \
         order every run, each conversion started with the same hot free memory \
         (this VM returns idle free pages to the host, and refaulting them tripled \
         a conversion's time). GB/s = 10^9 B/s of virtual disk. {}\n",
        fmt_bytes(c.bytes),
        dir.display(),
        c.qemu_img
            .as_deref()
            .map(|v| format!("Baseline: {v}."))
            .unwrap_or_else(|| "qemu-img not found: no baseline.".to_string()),
    );
    let _ = writeln!(m, "{}", table(c));
    let _ = writeln!(
        m,
        "Round trip raw → snap → raw: {}. qemu-img raw → qcow2 → raw: {}.\n",
        if c.img_round_trip_identical {
            "identical to the input"
        } else {
            "**DIFFERS from the input**"
        },
        match c.qemu_round_trip_identical {
            Some(true) => "identical to the input",
            Some(false) => "**DIFFERS from the input**",
            None => "not run",
        }
    );
    m
}

/// Every tool and direction: throughput, time, and throughput over
/// qemu-img's the same direction and raw to raw.
fn table(c: &ConvertReport) -> Table {
    let mut table = Table::new([
        ("conversion", Left),
        ("tool", Left),
        ("GB/s", Right),
        ("s", Right),
        ("vs qemu-img, same direction", Right),
        ("vs qemu-img raw→raw", Right),
    ]);
    let find = |from: &str, to: &str| {
        c.rows
            .iter()
            .find(|x| x.tool == "qemu-img" && x.from == from && x.to == to)
    };
    for x in &c.rows {
        // Empty on the baseline's own row.
        let vs = |baseline: Option<&ConvertRow>| match baseline {
            Some(q) if std::ptr::eq(q, x) => String::new(),
            q => Ratio::of(x.throughput.median, q.map(|q| q.throughput.median)).cell(2),
        };
        let same_direction = match (x.tool.as_str(), x.from.as_str()) {
            ("qemu-img", _) => String::new(),
            (_, "raw") => vs(find("raw", "qcow2")),
            _ => vs(find("qcow2", "raw")),
        };
        table.row([
            format!("{} → {}", x.from, x.to),
            x.tool.clone(),
            fmt_spread(&x.throughput, 2),
            bench::median(&x.seconds).map_or_else(|e| e.to_string(), |s| format!("{s:.2}")),
            same_direction,
            vs(find("raw", "raw")),
        ]);
    }
    table
}
