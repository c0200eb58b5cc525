//! Reads through a chain of layers against the image itself: what the
//! depth costs on the real path.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use test_infra::BlkBackendProcess;

use crate::rows::{run_vmm, Binaries, Workload, WORKLOADS};
use crate::Args;

/// Random reads through the image itself and through a chain of
/// `chain_depth` layers made on it (every layer but the new top sealed,
/// the data all in the bottom one), vmm + blk-backend with O_DIRECT for
/// every layer (`--base-io direct`): what the depth costs on the real
/// path. The image is left a chain: the last use of it in a run.
pub struct ChainRow {
    pub storage: String,
    pub workload: &'static str,
    pub depth1_iops: f64,
    pub deep_iops: f64,
    pub depth1_p50_us: f64,
    pub deep_p50_us: f64,
}

pub fn chain_rows(a: &Args, storage: &str, snap: &Path, bins: &Binaries) -> Result<Vec<ChainRow>> {
    let reads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| w.rw == "randread" && w.queues == 1 && w.bs == 4096)
        .collect();
    let sock = std::env::temp_dir().join(format!("bench-chain-{}.sock", std::process::id()));
    let measure = |w: &Workload| -> Result<(f64, f64)> {
        let mut iops = Vec::new();
        let mut p50 = Vec::new();
        for run in 0..a.runs {
            eprintln!("[{storage}] chain {} run {}", w.name, run + 1);
            let mut options = vec!["--base-io", "direct"];
            options.extend(a.backend_options.iter().map(String::as_str));
            let b = BlkBackendProcess::start_exports_with(
                &bins.backend,
                &[(snap.to_path_buf(), sock.clone())],
                &options,
            )?;
            let s = run_vmm(&bins.vmm, &b.socket, w, a.seconds, &[]);
            b.stop();
            let s = s?;
            iops.push(s.iops);
            p50.push(s.p50_us);
        }
        Ok((bench::median(&iops)?, bench::median(&p50)?))
    };
    let shallow: Vec<(f64, f64)> = reads.iter().map(|w| measure(w)).collect::<Result<_>>()?;
    eprintln!("[{storage}] making a chain of {} layers", a.chain_depth);
    for k in 1..a.chain_depth {
        let st = Command::new(&bins.img)
            .args(["snapshot", "-q", "-c", &format!("d{k}")])
            .arg(snap)
            .status()?;
        if !st.success() {
            bail!("img snapshot -c d{k} {} failed", snap.display());
        }
    }
    let deep: Vec<(f64, f64)> = reads.iter().map(|w| measure(w)).collect::<Result<_>>()?;
    Ok(reads
        .iter()
        .zip(shallow.iter().zip(&deep))
        .map(|(w, (s, d))| ChainRow {
            storage: storage.to_string(),
            workload: w.name,
            depth1_iops: s.0,
            deep_iops: d.0,
            depth1_p50_us: s.1,
            deep_p50_us: d.1,
        })
        .collect())
}

/// Reads through the image itself and through a chain of `depth` layers,
/// the chain's IOPS over the image's.
pub fn chain_table(chains: &[ChainRow], depth: u32) -> Table {
    let mut table = Table::new([
        ("storage".to_string(), Left),
        ("workload".into(), Left),
        ("depth 1 IOPS".into(), Right),
        (format!("depth {depth} IOPS"), Right),
        ("ratio".into(), Right),
        ("p50 µs depth 1".into(), Right),
        (format!("p50 µs depth {depth}"), Right),
    ]);
    for c in chains {
        table.row([
            c.storage.clone(),
            c.workload.to_string(),
            format!("{:.0}", c.depth1_iops),
            format!("{:.0}", c.deep_iops),
            Ratio::of(c.deep_iops, c.depth1_iops).cell(2),
            format!("{:.1}", c.depth1_p50_us),
            format!("{:.1}", c.deep_p50_us),
        ]);
    }
    table
}
