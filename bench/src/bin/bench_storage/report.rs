//! The tables: every cell against host fio, the round-by-round ratios of
//! the rows measured against each other, blk-backend's cost, the seccomp
//! filters' cost, and the SVG plot.

use anyhow::Result;
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};

use crate::rows::{Cell, Row, Sample};

pub fn svg(cells: &[Cell]) -> String {
    // One group per (storage, workload), one bar per row, IOPS relative to host fio.
    let groups: Vec<(String, &str)> = {
        let mut g = Vec::new();
        for c in cells {
            let k = (c.storage.clone(), c.workload.name);
            if !g.contains(&k) {
                g.push(k);
            }
        }
        g
    };
    let rows = [
        Row::HostFio,
        Row::QemuVirtioBlk,
        Row::QemuQsd,
        Row::QemuBlkBackend,
    ];
    let colors = ["#555555", "#4477aa", "#cc6677", "#228833"];
    let (gw, h, top) = (120.0, 300.0, 40.0);
    let width = 60.0 + gw * groups.len() as f64;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{}' font-family='sans-serif' font-size='10'>\n<text x='10' y='20' font-size='14'>IOPS relative to host fio (median)</text>\n",
        h + top + 90.0
    );
    for (gi, (storage, wl)) in groups.iter().enumerate() {
        let x0 = 50.0 + gi as f64 * gw;
        for (ri, row) in rows.iter().enumerate() {
            let cell = cells
                .iter()
                .find(|c| &c.storage == storage && c.workload.name == *wl && c.row == *row);
            // A bar for each cell with a ratio to host fio.
            if let Some(ratio) = cell.and_then(|c| vs_host_fio(cells, c).get()) {
                let bh = ratio.min(1.5) / 1.5 * h;
                s += &format!(
                    "<rect x='{}' y='{}' width='28' height='{}' fill='{}'/><text x='{}' y='{}'>{:.2}</text>\n",
                    x0 + ri as f64 * 32.0,
                    top + h - bh,
                    bh,
                    colors[ri],
                    x0 + ri as f64 * 32.0,
                    top + h - bh - 3.0,
                    ratio
                );
            }
        }
        s += &format!(
            "<text x='{x0}' y='{}'>{wl}</text><text x='{x0}' y='{}'>{storage}</text>\n",
            top + h + 15.0,
            top + h + 28.0
        );
    }
    for (ri, row) in rows.iter().enumerate() {
        s += &format!(
            "<rect x='10' y='{}' width='10' height='10' fill='{}'/><text x='25' y='{}'>{}</text>\n",
            top + h + 45.0 + ri as f64 * 14.0,
            colors[ri],
            top + h + 54.0 + ri as f64 * 14.0,
            row.label()
        );
    }
    s + "</svg>\n"
}

/// Every cell: its IOPS (median, spread), MB/s and latencies, and its
/// IOPS over host fio's on the same storage and workload.
pub fn storage_table(cells: &[Cell]) -> Table {
    let mut table = Table::new([
        ("storage", Left),
        ("workload", Left),
        ("row", Left),
        ("IOPS", Right),
        ("min–max", Right),
        ("MB/s", Right),
        ("p50 µs", Right),
        ("p99 µs", Right),
        ("p99.9 µs", Right),
        ("vs host fio", Right),
    ]);
    for c in cells {
        table.row([
            c.storage.clone(),
            c.workload.name.to_string(),
            c.label(),
            format!("{:.0}", c.median_iops),
            format!("{:.0}–{:.0}", c.min_iops, c.max_iops),
            format!("{:.1}", c.median_mb_s),
            format!("{:.1}", c.median_p50_us),
            format!("{:.1}", c.median_p99_us),
            format!("{:.1}", c.median_p999_us),
            vs_host_fio(cells, c).cell(2),
        ]);
    }
    table
}

/// A cell's median IOPS over host fio's on the same storage and workload.
fn vs_host_fio(cells: &[Cell], c: &Cell) -> Ratio {
    let fio = cells.iter().find(|b| {
        b.storage == c.storage && b.workload.name == c.workload.name && b.row == Row::HostFio
    });
    Ratio::of(c.median_iops, fio.map(|b| b.median_iops))
}

/// blk-backend's CPU and memory per cell, host fio's CPU beside them.
pub fn cost_table(cells: &[Cell]) -> Result<Table> {
    let mut table = Table::new([
        ("storage", Left),
        ("workload", Left),
        ("frontend", Left),
        ("CPU s per million I/Os", Right),
        ("RSS MiB", Right),
    ]);
    for c in cells.iter().filter(|c| {
        matches!(
            c.row,
            Row::QemuBlkBackend | Row::VmmBlkBackend | Row::HostFio
        )
    }) {
        // What a run measured (host fio has no backend whose memory to
        // take): a median, or an empty cell.
        let median_of = |f: fn(&Sample) -> Option<f64>| -> Result<Option<f64>> {
            let v: Vec<f64> = c.samples.iter().filter_map(f).collect();
            Ok(if v.is_empty() {
                None
            } else {
                Some(bench::median(&v)?)
            })
        };
        let cpu = median_of(|s| s.cpu_s_per_mio)?.map_or(String::new(), |v| format!("{v:.2}"));
        let rss = median_of(|s| s.rss_mib)?.map_or(String::new(), |v| format!("{v:.1}"));
        let frontend = match (c.row, &c.variant) {
            (Row::QemuBlkBackend, _) => "QEMU".to_string(),
            (Row::VmmBlkBackend, None) => "vmm".to_string(),
            (Row::VmmBlkBackend, Some(v)) => format!("vmm [{v}]"),
            _ => "none: host fio itself, for the kernel's share".to_string(),
        };
        table.row([
            c.storage.clone(),
            c.workload.name.to_string(),
            frontend,
            cpu,
            rss,
        ]);
    }
    Ok(table)
}

/// Where a request's time goes, per cell on a disk: the time from one
/// request to the next in its slot (the requests kept in flight over the
/// rate, by Little's law), the part of it spent in the host's block layer
/// and device (from the disk's counters), and what is left: the time in
/// the guest, the frontend and the backend, or in fio itself. A row that
/// keeps fewer requests at the device than it has in flight waits
/// outside it. Medians over the runs. The disk's time is per disk
/// request, over the whole run (the VM's start and end do next to no
/// I/O); the split holds where each I/O is one disk request (the last
/// column says).
pub fn wait_table(cells: &[Cell]) -> Result<Option<Table>> {
    let mut table = Table::new([
        ("storage", Left),
        ("workload", Left),
        ("row", Left),
        ("IOPS", Right),
        ("in flight", Right),
        ("µs per request", Right),
        ("in the device, µs", Right),
        ("outside it, µs", Right),
        ("at the device on average", Right),
        ("disk requests per I/O", Right),
    ]);
    let mut any = false;
    for c in cells {
        let depth = c.in_flight() as f64;
        let per_run: Vec<[f64; 4]> = c
            .samples
            .iter()
            .filter(|s| s.iops > 0.0 && s.ios > 0.0)
            .filter_map(|s| {
                let d = s.device?;
                Some([
                    depth / s.iops * 1e6,
                    d.mean_us,
                    d.in_flight(s.iops),
                    d.ios as f64 / s.ios,
                ])
            })
            .collect();
        if per_run.is_empty() {
            continue;
        }
        let median =
            |f: fn(&[f64; 4]) -> f64| bench::median(&per_run.iter().map(f).collect::<Vec<f64>>());
        table.row([
            c.storage.clone(),
            c.workload.name.to_string(),
            c.label(),
            format!("{:.0}", c.median_iops),
            format!("{depth:.0}"),
            format!("{:.0}", median(|r| r[0])?),
            format!("{:.0}", median(|r| r[1])?),
            format!("{:.0}", median(|r| r[0] - r[1])?),
            format!("{:.1}", median(|r| r[2])?),
            format!("{:.2}", median(|r| r[3])?),
        ]);
        any = true;
    }
    Ok(any.then_some(table))
}

/// vmm + blk-backend filtered and unfiltered, filtered IOPS over
/// unfiltered.
pub fn seccomp_table(cells: &[Cell]) -> Table {
    let mut table = Table::new([
        ("storage", Left),
        ("workload", Left),
        ("IOPS filtered", Right),
        ("IOPS unfiltered", Right),
        ("ratio", Right),
    ]);
    for c in cells
        .iter()
        .filter(|c| c.row == Row::VmmBlkBackend && c.variant.is_none())
    {
        if let Some(off) = cells.iter().find(|o| {
            o.row == Row::VmmBlkBackendNoSeccomp
                && o.storage == c.storage
                && o.workload.name == c.workload.name
        }) {
            table.row([
                c.storage.clone(),
                c.workload.name.to_string(),
                format!("{:.0}", c.median_iops),
                format!("{:.0}", off.median_iops),
                Ratio::of(c.median_iops, off.median_iops).cell(3),
            ]);
        }
    }
    table
}

/// The rows measured against each other, round by round: ours over the
/// baseline's IOPS within each round, the median and spread of those
/// ratios (blk-backend over qsd and over host fio with a core busy, each
/// `--variant` over the plain row). None when no pair was run.
pub fn paired_table(cells: &[Cell]) -> Result<Option<Table>> {
    const PAIRS: [(Row, Row); 3] = [
        (Row::VmmBlkBackend, Row::VmmQsd),
        (Row::QemuBlkBackend, Row::QemuQsd),
        (Row::VmmBlkBackend, Row::HostFioBusyCore),
    ];
    let mut table = Table::new([
        ("storage", Left),
        ("workload", Left),
        ("ours", Left),
        ("over", Left),
        ("median", Right),
        ("min–max", Right),
        ("each round", Left),
    ]);
    let mut any = false;
    for ours in cells {
        let same_place = |b: &&Cell| {
            b.storage == ours.storage
                && b.workload.name == ours.workload.name
                && b.variant.is_none()
        };
        // Each pair's baseline; a variant's is the plain row.
        let mut bases: Vec<&Cell> = PAIRS
            .iter()
            .filter(|(mine, _)| *mine == ours.row)
            .filter_map(|(_, theirs)| cells.iter().filter(same_place).find(|b| b.row == *theirs))
            .collect();
        if ours.variant.is_some() {
            bases.extend(cells.iter().filter(same_place).find(|b| b.row == ours.row));
        }
        for base in bases {
            let iops = |c: &Cell| {
                c.samples
                    .iter()
                    .map(|s: &Sample| s.iops)
                    .collect::<Vec<f64>>()
            };
            let Some(ratios) = Ratio::per_run(&iops(ours), &iops(base)) else {
                continue;
            };
            let spread = bench::stats::spread(&ratios)?;
            table.row([
                ours.storage.clone(),
                ours.workload.name.to_string(),
                ours.label(),
                base.label(),
                format!("{:.2}", spread.median),
                format!("{:.2}–{:.2}", spread.min, spread.max),
                ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]);
            any = true;
        }
    }
    Ok(any.then_some(table))
}
