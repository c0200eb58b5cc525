//! What a benchmark ran on, reported beside its figures so that a figure
//! in the record can be checked on another machine: the kernel and CPUs,
//! the tools measured against, and for each file measured its filesystem,
//! its extents and the block device under it (what it is, its I/O
//! scheduler and queue limits). Everything is read from /proc and /sys
//! (and `filefrag`, from e2fsprogs, for the extents); what cannot be read
//! is left out, not guessed.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::table::{Align, Table};

/// The machine.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_gib: f64,
    /// `fio --version`, `qemu-storage-daemon --version`: what the
    /// baselines were.
    pub tools: Vec<String>,
}

/// One file measured.
#[derive(Debug, Clone, Serialize)]
pub struct Storage {
    /// What the benchmark calls it ("root disk").
    pub name: String,
    pub path: PathBuf,
    /// Its filesystem's type and source, as mounted.
    pub filesystem: Option<String>,
    /// How many extents the file is in (`filefrag`): one written in
    /// order is in few; none where the filesystem keeps no extents.
    pub extents: Option<u64>,
    pub device: Option<BlockDevice>,
}

/// The block device (the whole disk, for a partition) under a file.
#[derive(Debug, Clone, Serialize)]
pub struct BlockDevice {
    pub name: String,
    /// The model, or the vendor id of a virtual disk (0x1af4: virtio).
    pub model: String,
    /// The active I/O scheduler.
    pub scheduler: String,
    pub nr_requests: Option<u64>,
    pub hw_queues: usize,
    pub rotational: bool,
    pub max_sectors_kb: Option<u64>,
    /// The interrupts its MSI vectors raised since boot, per CPU (empty:
    /// none found): where its completions land, and so where a thread
    /// that waits for them is woken without a cross-CPU wakeup.
    pub interrupts_per_cpu: Vec<u64>,
}

impl Host {
    pub fn now(tools: &[&str]) -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(String::new, |(_, m)| m.trim().to_string());
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        Host {
            kernel: rustix::system::uname()
                .release()
                .to_string_lossy()
                .into_owned(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_gib: mem_kib / (1 << 20) as f64,
            tools: tools.iter().filter_map(|t| version_of(t)).collect(),
        }
    }
}

/// A tool's first line of `--version`; None when it is not there.
fn version_of(tool: &str) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

impl Storage {
    /// `path` (a file that exists) as it lies now.
    pub fn of(name: &str, path: &Path) -> Storage {
        let dev = rustix::fs::stat(path)
            .ok()
            .map(|st| (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev)));
        Storage {
            name: name.to_string(),
            path: path.to_path_buf(),
            filesystem: dev.and_then(mounted_filesystem),
            extents: extents(path),
            device: dev.and_then(|(major, minor)| BlockDevice::of(major, minor)),
        }
    }

    /// One line: filesystem, extents, device.
    pub fn describe(&self) -> String {
        let mut s = self.filesystem.clone().unwrap_or_else(|| "?".into());
        if let Some(n) = self.extents {
            s += &format!(", the file in {n} extents");
        }
        if let Some(d) = &self.device {
            s += &format!(
                "; {} ({}): scheduler {}, {} hardware queue(s), nr_requests {}, max {} KiB per request, {}",
                d.name,
                d.model,
                d.scheduler,
                d.hw_queues,
                d.nr_requests.map_or("?".into(), |n| n.to_string()),
                d.max_sectors_kb.map_or("?".into(), |n| n.to_string()),
                if d.rotational { "rotational" } else { "non-rotational" }
            );
            let total: u64 = d.interrupts_per_cpu.iter().sum();
            if total > 0 {
                let shares: Vec<String> = d
                    .interrupts_per_cpu
                    .iter()
                    .enumerate()
                    .map(|(cpu, n)| format!("CPU {cpu} {:.0} %", *n as f64 * 100.0 / total as f64))
                    .collect();
                s += &format!("; its interrupts since boot: {}", shares.join(", "));
            }
        }
        s
    }
}

/// The type and source of the filesystem mounted as device `major:minor`
/// (/proc/self/mountinfo: field 3 is the device, after " - " come the
/// type and the source).
fn mounted_filesystem((major, minor): (u32, u32)) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dev = format!("{major}:{minor}");
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        if fields.get(2) != Some(&dev.as_str()) {
            return None;
        }
        let rest = l.split_once(" - ")?.1;
        let mut it = rest.split(' ');
        let (fstype, source) = (it.next()?, it.next().unwrap_or(""));
        Some(format!("{fstype} on {source}"))
    })
}

/// The file's extent count, from `filefrag` ("PATH: N extents found").
fn extents(path: &Path) -> Option<u64> {
    let out = Command::new("filefrag").arg(path).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (_, tail) = text.trim_end().rsplit_once(": ")?;
    tail.split_whitespace().next()?.parse().ok()
}

impl BlockDevice {
    /// The disk that holds device `major:minor` (major 0: no device, as
    /// tmpfs).
    fn of(major: u32, minor: u32) -> Option<BlockDevice> {
        if major == 0 {
            return None;
        }
        let mut dir = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
        // A partition's queue is its disk's, one directory up.
        if dir.join("partition").exists() {
            dir = dir.parent()?.to_path_buf();
        }
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        let scheduler = read("queue/scheduler").map(|s| {
            s.split_whitespace()
                .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
                .unwrap_or(&s)
                .to_string()
        });
        let model = read("device/model")
            .filter(|m| !m.is_empty())
            .or_else(|| read("device/vendor").map(|v| format!("vendor {v}")))
            .unwrap_or_else(|| "?".into());
        Some(BlockDevice {
            name: dir.file_name()?.to_string_lossy().into_owned(),
            model,
            scheduler: scheduler.unwrap_or_else(|| "?".into()),
            nr_requests: read("queue/nr_requests").and_then(|v| v.parse().ok()),
            hw_queues: std::fs::read_dir(dir.join("mq")).map_or(0, |d| d.count()),
            rotational: read("queue/rotational").is_some_and(|v| v == "1"),
            max_sectors_kb: read("queue/max_sectors_kb").and_then(|v| v.parse().ok()),
            interrupts_per_cpu: device_irqs(&dir)
                .map(|irqs| interrupts_per_cpu(&irqs))
                .unwrap_or_default(),
        })
    }

    /// The CPU that took most of its interrupts (None: none seen).
    pub fn interrupt_cpu(&self) -> Option<usize> {
        let (cpu, n) = self
            .interrupts_per_cpu
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| **n)?;
        (*n > 0).then_some(cpu)
    }
}

/// The MSI vectors of the PCI function behind disk `dir` (its `device`
/// link leads to the driver's device, as virtio1 or nvme0, a level or two
/// below the function that lists them in `msi_irqs`).
fn device_irqs(dir: &Path) -> Option<Vec<u32>> {
    let mut d = std::fs::canonicalize(dir.join("device")).ok()?;
    for _ in 0..4 {
        if let Ok(entries) = std::fs::read_dir(d.join("msi_irqs")) {
            return Some(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect(),
            );
        }
        d = d.parent()?.to_path_buf();
    }
    None
}

/// Interrupts of `irqs` per CPU, from /proc/interrupts.
fn interrupts_per_cpu(irqs: &[u32]) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    parse_interrupts(&text, irqs)
}

/// A header of CPUs, then `IRQ: count per CPU ... chip and name`.
fn parse_interrupts(text: &str, irqs: &[u32]) -> Vec<u64> {
    let mut lines = text.lines();
    let cpus = lines.next().map_or(0, |h| h.split_whitespace().count());
    let mut sum = vec![0u64; cpus];
    for l in lines {
        let Some((irq, counts)) = l.trim_start().split_once(':') else {
            continue;
        };
        if !irq.parse().is_ok_and(|n: u32| irqs.contains(&n)) {
            continue;
        }
        for (cpu, n) in counts.split_whitespace().take(cpus).enumerate() {
            sum[cpu] += n.parse::<u64>().unwrap_or(0);
        }
    }
    sum
}

/// The "ran on" table: the host, then each storage.
pub fn table(host: &Host, storages: &[Storage]) -> Table {
    let mut t = Table::new([("", Align::Left), ("", Align::Left)]);
    t.row(["kernel".to_string(), host.kernel.clone()]);
    t.row([
        "CPUs".to_string(),
        format!("{} x {}", host.cpus, host.cpu_model),
    ]);
    t.row(["memory".to_string(), format!("{:.1} GiB", host.mem_gib)]);
    for tool in &host.tools {
        t.row(["baseline".to_string(), tool.clone()]);
    }
    for s in storages {
        t.row([s.name.clone(), s.describe()]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_s_interrupts_are_summed_per_cpu_from_its_vectors_only() {
        let text = "           CPU0       CPU1       \n 35:          0          1  PCI-MSIX-0000:00:02.0   0-edge      virtio1-config\n 36:          5   14319942  PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\n 37:        700          3  PCI-MSIX-0000:00:03.0   0-edge      virtio2-config\nNMI:          0          0   Non-maskable interrupts\n";
        assert_eq!(parse_interrupts(text, &[35, 36]), [5, 14319943]);
        assert_eq!(parse_interrupts(text, &[99]), [0, 0]);
        let d = |v: Vec<u64>| BlockDevice {
            name: "vda".into(),
            model: "?".into(),
            scheduler: "none".into(),
            nr_requests: None,
            hw_queues: 1,
            rotational: false,
            max_sectors_kb: None,
            interrupts_per_cpu: v,
        };
        assert_eq!(d(vec![5, 14319943]).interrupt_cpu(), Some(1));
        assert_eq!(d(vec![0, 0]).interrupt_cpu(), None);
        assert_eq!(d(Vec::new()).interrupt_cpu(), None);
    }

    #[test]
    fn a_file_here_is_found_on_its_filesystem_and_a_tmpfs_has_no_disk() {
        let host = Host::now(&[]);
        assert!(!host.kernel.is_empty() && host.cpus > 0, "{host:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, vec![1u8; 1 << 16]).expect("write");
        let s = Storage::of("here", &f);
        assert!(s.filesystem.is_some(), "{s:?}");
        if Path::new("/dev/shm").is_dir() {
            let shm = tempfile::tempfile_in("/dev/shm").map(|_| ());
            if shm.is_ok() {
                let p = PathBuf::from(format!("/dev/shm/env-test-{}", std::process::id()));
                std::fs::write(&p, b"x").expect("write");
                let s = Storage::of("shm", &p);
                let _ = std::fs::remove_file(&p);
                assert!(s.device.is_none(), "{s:?}");
                assert!(
                    s.filesystem
                        .as_deref()
                        .is_some_and(|f| f.starts_with("tmpfs")),
                    "{s:?}"
                );
            }
        }
    }
}
