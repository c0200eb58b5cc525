//! The boot figures: each VMM's time from exec to the guest's start
//! marker, where the vmm's goes, and the vmm's own memory.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use test_infra::{BlkBackendProcess, Disk, Machine, QemuConsole, QemuVm, VmmVm};

use crate::rows::{run_patience, Binaries};
use crate::Args;

/// What [`measure`] found.
pub struct Boot {
    /// Each VMM's name, its median boot in ms, and every run's.
    pub boots: Vec<(String, f64, Vec<f64>)>,
    /// The vmm's own timing of each boot (its metrics file).
    vmm_timing: Vec<serde_json::Value>,
    /// RssAnon, RssFile and RssShmem of a running vmm, KiB.
    vmm_rss_kib: (u64, u64, u64),
}

pub fn measure(a: &Args, bins: &Binaries) -> Result<Boot> {
    // Boot time to the start marker, whole process.
    let mut boots = Vec::new();
    let tmp = a.dir.join("bench-storage-boot.raw");
    std::fs::File::create(&tmp)?.set_len(64 << 20)?;
    for machine in [Machine::Microvm, Machine::Q35] {
        let mut t = Vec::new();
        for _ in 0..a.runs {
            let vm = QemuVm {
                machine,
                mem_mib: 256,
                disk: Disk::Builtin {
                    path: tmp.clone(),
                    readonly: false,
                    num_queues: 1,
                    iothread: false,
                    window: None,
                },
                cmdline: "mode=read bs=4k ios=1".into(),
                limit: run_patience(60),
                silence: run_patience(60),
                console: QemuConsole::Uart,
                nic: None,
            };
            let r = vm.run()?;
            t.push(
                r.to_marker
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .unwrap_or(f64::NAN),
            );
        }
        boots.push((
            format!("QEMU {machine:?}, virtio-blk"),
            bench::median(&t)?,
            t,
        ));
    }
    let _ = std::fs::remove_file(&tmp);
    // The same guest with a vhost-user-blk disk from blk-backend (started
    // beforehand, not timed): QEMU microvm + qboot against the vmm.
    let boot_img = a.dir.join("bench-storage-boot.snap");
    let _ = std::fs::remove_file(&boot_img);
    Command::new(&bins.img)
        .arg("create")
        .arg(&boot_img)
        .arg("64M")
        .status()?;
    let boot_sock = std::env::temp_dir().join(format!("bench-boot-{}.sock", std::process::id()));
    let b = BlkBackendProcess::start(&bins.backend, &boot_img, &boot_sock, 1, false)?;
    let metrics = a.dir.join("bench-storage-vmm-metrics.json");
    let mut vmm_timing: Vec<serde_json::Value> = Vec::new();
    for vmm in [false, true] {
        let mut t = Vec::new();
        for _ in 0..a.runs.max(5) {
            let r = if vmm {
                let r = VmmVm {
                    cpus: 1,
                    mem_mib: 256,
                    metrics_file: Some(metrics.clone()),
                    limit: run_patience(60),
                    silence: run_patience(60),
                    ..VmmVm::new(&bins.vmm, "mode=read bs=4k ios=1").with_disk(&boot_sock, 1)
                }
                .run()?;
                if let Ok(text) = std::fs::read_to_string(&metrics) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        vmm_timing.push(v["timing"].clone());
                    }
                }
                let _ = std::fs::remove_file(&metrics);
                r
            } else {
                QemuVm {
                    machine: Machine::Microvm,
                    mem_mib: 256,
                    disk: Disk::vhost_user(&boot_sock, 1),
                    cmdline: "mode=read bs=4k ios=1".into(),
                    limit: run_patience(60),
                    silence: run_patience(60),
                    console: QemuConsole::Uart,
                    nic: None,
                }
                .run()?
            };
            if !r.ok() {
                bail!("boot run failed:\n{}", r.serial);
            }
            t.push(
                r.to_marker
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .unwrap_or(f64::NAN),
            );
        }
        let name = if vmm {
            "vmm, vhost-user-blk (blk-backend)"
        } else {
            "QEMU Microvm, vhost-user-blk (blk-backend)"
        };
        boots.push((name.to_string(), bench::median(&t)?, t));
    }
    // The vmm's own memory beside the guest's (guest RAM is the shared
    // memfd mapping; RssAnon + RssFile is the vmm's).
    let vmm_rss_kib = {
        let mut running = VmmVm {
            cpus: 1,
            mem_mib: 512,
            metrics_file: None,
            limit: run_patience(60),
            silence: run_patience(60),
            ..VmmVm::new(
                &bins.vmm,
                "mode=randread bs=4k qd=32 duration_ms=2000 progress_ms=0",
            )
            .with_disk(&boot_sock, 1)
        }
        .spawn()?;
        std::thread::sleep(Duration::from_millis(1000));
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", running.pid())).unwrap_or_default();
        let field = |k: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        let r = (field("RssAnon:"), field("RssFile:"), field("RssShmem:"));
        let _ = running.running();
        running.wait()?;
        r
    };
    b.stop();
    let _ = std::fs::remove_file(&boot_img);
    Ok(Boot {
        boots,
        vmm_timing,
        vmm_rss_kib,
    })
}

impl Boot {
    /// The boot section of the report.
    pub fn markdown(&self) -> Result<String> {
        let (boots, vmm_timing, vmm_rss_kib) = (&self.boots, &self.vmm_timing, self.vmm_rss_kib);
        let mut md = String::new();
        md += &format!(
            "\n## Boot to the guest's start marker (exec to marker, whole VMM process)\n\n{}",
            boot_table(boots)
        );
        let med_of = |name: &str| boots.iter().find(|b| b.0.starts_with(name)).map(|b| b.1);
        if let (Some(v), Some(q)) = (med_of("vmm"), med_of("QEMU Microvm, vhost-user")) {
            md += &format!(
                "\nvmm / QEMU microvm + qboot, same guest and disk: {} ({v:.1} ms vs {q:.1} ms); goals: under 0.2 and under 20 ms.\n",
                Ratio::of(v, q).cell(3)
            );
        }
        let med_t = |k: &str| {
            let ms: Vec<f64> = vmm_timing.iter().filter_map(|t| t[k].as_f64()).collect();
            bench::median(&ms).map(|us| us / 1000.0)
        };
        if !vmm_timing.is_empty() {
            let first = med_t("first_run_us")?;
            let marker = med_of("vmm").unwrap_or(f64::NAN);
            md += &format!(
                "\nWhere the vmm's boot time goes (median, ms): KVM, memory and kernel loaded {:.2}; disk backend handshake {:.2}; first KVM_RUN at {:.2}; the guest from there to its marker {:.2} (process exec and exit around it make up the rest).\n",
                med_t("vm_and_kernel_us")?,
                med_t("disk_handshake_us")?,
                first,
                marker - first
            );
        }
        md += &format!(
            "\nvmm resident memory beside the guest's, during a 4k random-read run with 512 MiB of guest memory: {:.2} MiB (RssAnon {} KiB + RssFile {} KiB; the guest memory it touched, RssShmem, {} KiB); goal under 5 MiB.\n",
            (vmm_rss_kib.0 + vmm_rss_kib.1) as f64 / 1024.0,
            vmm_rss_kib.0,
            vmm_rss_kib.1,
            vmm_rss_kib.2
        );
        Ok(md)
    }
}

/// Each VMM's boot time: the median and every run.
fn boot_table(boots: &[(String, f64, Vec<f64>)]) -> Table {
    let mut table = Table::new([("VMM", Left), ("median ms", Right), ("runs ms", Left)]);
    for (m, med, all) in boots {
        table.row([
            m.clone(),
            format!("{med:.1}"),
            all.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    table
}
