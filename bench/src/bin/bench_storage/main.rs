//! The storage table: the bench guest's workloads against each way of
//! serving a disk, beside host-native fio (the limit), on the same bytes
//! of one image on the root disk and on /dev/shm; what it ran on; and the
//! guest's boot time to its start marker. Median of N runs with the
//! spread, the rows of a workload taking turns run by run; one command
//! writes the markdown tables, a JSON file and an SVG plot.

mod boot;
mod chain;
mod image;
mod report;
mod rows;

use std::path::PathBuf;

use anyhow::{bail, Result};
use bench::environment::{Host, Storage};
use clap::Parser;
use test_infra::kvm_available;

use rows::{Binaries, Place, WORKLOADS};

#[derive(Parser)]
#[command(
    about = "Bench-guest storage table: QEMU virtio-blk, QEMU + qemu-storage-daemon, host fio"
)]
struct Args {
    /// Only the workloads whose name contains this (e.g. "QD32").
    #[arg(long)]
    only: Option<String>,
    /// Only these rows: fio, qemu, qsd, blk-backend, vmm-qsd, vmm-blk-backend
    /// (comma-separated); "none" runs only the boot and memory figures.
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// Runs per cell (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Size of the test image in GiB.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Root-disk scratch directory.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Skip the /dev/shm rows.
    #[arg(long)]
    no_shm: bool,
    /// Layers of the chain whose reads are compared with the image's own
    /// (vmm + blk-backend, O_DIRECT for every layer); 0 skips it.
    #[arg(long, default_value_t = 32)]
    chain_depth: u32,
    /// Keep the test images (bench-storage.snap in --dir and /dev/shm)
    /// for the next run, which then skips writing them; removed otherwise.
    #[arg(long)]
    keep: bool,
    /// An option for blk-backend in its rows, repeatable (an A/B of
    /// `--fixed-buffers` or `--poll-us 0`, say).
    #[arg(
        long = "backend-option",
        value_name = "OPTION",
        allow_hyphen_values = true
    )]
    backend_options: Vec<String>,
    /// vmm + blk-backend once more with these backend options, as a row
    /// of its own that takes its turn in each round (NAME=OPTIONS,
    /// repeatable): `--variant nopoll="--poll-us 0"`.
    #[arg(long = "variant", value_name = "NAME=OPTIONS")]
    variants: Vec<rows::Variant>,
    /// Pin each side of the rows: what waits for the disk (blk-backend's
    /// queue workers, qemu-storage-daemon, host fio) on the CPU that takes
    /// the disk's interrupts (on tmpfs, the last CPU), the guest's vCPUs
    /// (fio's busy core) on the others. QEMU's rows stay unpinned.
    #[arg(long)]
    pin: bool,
    #[command(flatten)]
    out: bench::OutputArgs,
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !kvm_available("bench-storage") {
        bail!("/dev/kvm is needed");
    }
    let size = a.size_gib << 30;
    // One image per storage, and every row on its bytes: blk-backend on
    // the image, fio, QEMU and qemu-storage-daemon on the window of the
    // same file where the image keeps its data (see `image::data_window`).
    let mut places = vec![("root disk".to_string(), a.dir.join("bench-storage.snap"))];
    if !a.no_shm {
        places.push((
            "/dev/shm".to_string(),
            PathBuf::from("/dev/shm/bench-storage.snap"),
        ));
    }
    let bins = Binaries {
        backend: bench::release_binary("blk-backend")?,
        vmm: bench::release_binary("vmm")?,
        img: bench::release_binary("img")?,
    };
    let host = Host::now(&["fio", "qemu-storage-daemon"]);
    let mut storages = Vec::new();
    let mut cells = Vec::new();
    let mut chains = Vec::new();
    let mut pinned = Vec::new();
    for (storage, snap) in &places {
        let window = image::prepare(a.keep, &bins, snap, size)?;
        // As the rows find it (its extents, its disk's queue).
        let described = Storage::of(storage, snap);
        let device = described.device.as_ref().map(|d| d.name.clone());
        let pin = if a.pin {
            let last = cpu_affinity::current_affinity()?
                .cpus()
                .iter()
                .copied()
                .max()
                .unwrap_or(0);
            let io = described
                .device
                .as_ref()
                .and_then(|d| d.interrupt_cpu())
                .unwrap_or(last);
            let p = rows::Pinning::around(io)?;
            eprintln!("[{storage}] I/O on CPU {}, the guest on {}", p.io, p.guest);
            pinned.push(format!(
                "{storage}: I/O on CPU {}, vCPUs on {}",
                p.io, p.guest
            ));
            Some(p)
        } else {
            None
        };
        storages.push(described);
        let place = Place {
            storage,
            snap,
            window,
            sock: std::env::temp_dir().join(format!("bench-storage-{}.sock", std::process::id())),
            device,
            pin,
        };
        for w in WORKLOADS
            .iter()
            .filter(|w| a.only.as_ref().is_none_or(|o| w.name.contains(o.as_str())))
        {
            cells.extend(rows::measure(&a, &bins, &place, w)?);
        }
        if a.chain_depth > 1 && (a.rows.is_empty() || a.rows.iter().any(|r| r == "vmm-blk-backend"))
        {
            chains.extend(chain::chain_rows(&a, storage, snap, &bins)?);
        }
        if !a.keep {
            image::remove_image(snap);
        }
    }
    let boot = boot::measure(&a, &bins)?;

    let mut md = format!(
        "# Storage table (bench guest)\n\n{} GiB image written end to end by a guest through blk-backend; every row reads and writes the same bytes of the same file (blk-backend the image, the others the window of the file that holds its data); {} s per run; median of {} (min–max IOPS), the rows of a workload taking turns run by run. Guest: 1 vCPU, 1 queue, polling, microvm + qboot. Ratios are against host fio in the same run.\n\n{}",
        a.size_gib,
        a.seconds,
        a.runs,
        report::storage_table(&cells)
    );
    if !pinned.is_empty() {
        md += &format!(
            "\nPinned (`--pin`; QEMU's rows are not): {}.\n",
            pinned.join("; ")
        );
    }
    md += &format!(
        "\n## Ran on\n\n{}",
        bench::environment::table(&host, &storages)
    );
    if let Some(t) = report::paired_table(&cells)? {
        md += &format!("\n## Round by round\n\nEach round ran the rows of a workload one after the other on the same file; a ratio is taken within a round, then its median and spread over the rounds.\n\n{t}");
    }
    if let Some(t) = report::wait_table(&cells)? {
        md += &format!("\n## Where a request waits\n\nThe time from one request to the next in its slot (requests in flight over IOPS), the part spent in the host's block layer and disk (its `/sys/block/DEV/stat` counters over the run), and what is left, spent in the guest, the frontend and the backend (or in fio); medians of the runs. A row that keeps fewer requests at the disk than it has in flight waits outside it. The split holds where each I/O is one disk request (the last column: above 1.00, other I/O shared the disk or requests were split).\n\n{t}");
    }
    md += &format!("\n## blk-backend cost\n\nThe backend process alone (every thread, the kernel's io_uring workers included), per million I/Os the guest completed; host fio's whole process on the same I/O beside it, the cost of the kernel's path alone.\n\n{}", report::cost_table(&cells)?);
    if !chains.is_empty() {
        md += &format!(
            "\n## Reads through a chain of {} layers\n\nvmm + blk-backend (`--base-io direct`: O_DIRECT for every layer), the image itself (depth 1) and the same image after {} snapshots (its data all in the bottom layer), same run.\n\n{}",
            a.chain_depth,
            a.chain_depth - 1,
            chain::chain_table(&chains, a.chain_depth)
        );
    }
    md += &format!("\n## What the seccomp filters cost\n\nvmm + blk-backend with every thread filtered (the default) against both with `--no-seccomp`, same run, same image (the SIGBUS fence has no switch: on the hot path it is one atomic load per batch).\n\n{}", report::seccomp_table(&cells));
    md += &boot.markdown()?;
    a.out.report(
        &md,
        &serde_json::json!({
            "ran_on": { "host": host, "storage": storages },
            "cells": cells,
            "boot_ms": boot.boots,
        }),
    )?;
    if let Some(p) = &a.svg {
        std::fs::write(p, report::svg(&cells))?;
    }
    Ok(())
}
