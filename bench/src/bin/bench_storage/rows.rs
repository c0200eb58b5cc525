//! One cell of the table: a workload on one way of serving the disk,
//! run `--runs` times. The rows of a workload take turns run by run
//! (A, B, C, A, B, C, ...), so a drift of the machine during the
//! benchmark (another tenant on its disk, say) falls on every row alike
//! and each round's ratios compare runs minutes, not a whole table, apart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use bench::diskstat::Counters;
use serde::Serialize;
use test_infra::{
    BlkBackendProcess, Disk, Machine, Patience, QemuConsole, QemuVm, StorageDaemon, VmmVm,
};

use crate::Args;

#[derive(Clone, Copy, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: u32,
    /// Requests in flight per queue (per fio job).
    pub qd: u32,
    /// Queues, and as many guest vCPUs (fio jobs); QEMU's rows run one.
    pub queues: u16,
}

pub const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "4k randread QD1",
        rw: "randread",
        bs: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "4k randread QD32",
        rw: "randread",
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "4k randwrite QD32",
        rw: "randwrite",
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "4k randread QD32, 2 queues 2 vCPUs",
        rw: "randread",
        bs: 4096,
        qd: 32,
        queues: 2,
    },
    Workload {
        name: "4k randwrite QD32, 2 queues 2 vCPUs",
        rw: "randwrite",
        bs: 4096,
        qd: 32,
        queues: 2,
    },
    Workload {
        name: "128k seq read QD8",
        rw: "read",
        bs: 131072,
        qd: 8,
        queues: 1,
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Debug)]
pub enum Row {
    HostFio,
    /// Host fio with one core kept busy by a spinning thread, as a guest
    /// vCPU that polls its queue keeps one busy in the VM rows.
    HostFioBusyCore,
    QemuVirtioBlk,
    QemuQsd,
    QemuBlkBackend,
    VmmQsd,
    VmmBlkBackend,
    /// The same with both processes' seccomp filters off: what the filters
    /// cost.
    VmmBlkBackendNoSeccomp,
}

impl Row {
    /// Every row, in the table's order.
    const ALL: [Row; 8] = [
        Row::HostFio,
        Row::HostFioBusyCore,
        Row::QemuVirtioBlk,
        Row::QemuQsd,
        Row::QemuBlkBackend,
        Row::VmmQsd,
        Row::VmmBlkBackend,
        Row::VmmBlkBackendNoSeccomp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Row::HostFio => "host fio (io_uring, O_DIRECT)",
            Row::HostFioBusyCore => "host fio, one core kept busy (as a polling vCPU keeps it)",
            Row::QemuVirtioBlk => "QEMU virtio-blk (io_uring, direct, iothread)",
            Row::QemuQsd => "QEMU + qemu-storage-daemon vhost-user-blk",
            Row::QemuBlkBackend => "QEMU + blk-backend (snap image, io_uring, O_DIRECT)",
            Row::VmmQsd => "vmm + qemu-storage-daemon vhost-user-blk",
            Row::VmmBlkBackend => "vmm + blk-backend (snap image, io_uring, O_DIRECT)",
            Row::VmmBlkBackendNoSeccomp => "the same, seccomp off in both (--no-seccomp)",
        }
    }

    /// QEMU's rows boot one vCPU with one queue, whatever the workload.
    pub fn one_queue(self) -> bool {
        matches!(
            self,
            Row::QemuVirtioBlk | Row::QemuQsd | Row::QemuBlkBackend
        )
    }

    pub fn short(&self) -> &'static str {
        match self {
            Row::HostFio => "fio",
            Row::HostFioBusyCore => "fio-busy",
            Row::QemuVirtioBlk => "qemu",
            Row::QemuQsd => "qsd",
            Row::QemuBlkBackend => "blk-backend",
            Row::VmmQsd => "vmm-qsd",
            Row::VmmBlkBackend => "vmm-blk-backend",
            Row::VmmBlkBackendNoSeccomp => "vmm-blk-backend-no-seccomp",
        }
    }
}

#[derive(Clone, Serialize, Default)]
pub struct Sample {
    pub ios: f64,
    /// The backend's CPU seconds per million I/Os and its RSS (blk-backend rows).
    pub cpu_s_per_mio: Option<f64>,
    pub rss_mib: Option<f64>,
    pub iops: f64,
    pub mb_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// What the disk under the file did in the run (none on tmpfs).
    pub device: Option<bench::diskstat::Activity>,
}

#[derive(Serialize)]
pub struct Cell {
    pub storage: String,
    pub row: Row,
    /// The variant's name (`--variant`), for its rows.
    pub variant: Option<String>,
    pub workload: Workload,
    pub samples: Vec<Sample>,
    pub median_iops: f64,
    pub min_iops: f64,
    pub max_iops: f64,
    pub median_mb_s: f64,
    pub median_p50_us: f64,
    pub median_p99_us: f64,
    pub median_p999_us: f64,
}

impl Cell {
    /// Its row's label, with its variant's name.
    pub fn label(&self) -> String {
        match &self.variant {
            Some(v) => format!("{} [{v}]", self.row.label()),
            None => self.row.label().to_string(),
        }
    }

    /// Requests it keeps in flight: the workload's depth on each of its
    /// queues (fio jobs); QEMU's rows run one queue.
    pub fn in_flight(&self) -> u32 {
        let queues = if self.row.one_queue() {
            1
        } else {
            self.workload.queues
        };
        self.workload.qd * u32::from(queues)
    }

    /// A cell of `samples` (each run's, in order).
    fn of(storage: &str, row: Row, workload: Workload, samples: Vec<Sample>) -> Result<Cell> {
        let median =
            |f: fn(&Sample) -> f64| bench::median(&samples.iter().map(f).collect::<Vec<f64>>());
        let iops = bench::stats::spread(&samples.iter().map(|s| s.iops).collect::<Vec<f64>>())?;
        Ok(Cell {
            storage: storage.to_string(),
            row,
            variant: None,
            workload,
            median_iops: iops.median,
            min_iops: iops.min,
            max_iops: iops.max,
            median_mb_s: median(|s| s.mb_s)?,
            median_p50_us: median(|s| s.p50_us)?,
            median_p99_us: median(|s| s.p99_us)?,
            median_p999_us: median(|s| s.p999_us)?,
            samples,
        })
    }
}

/// The project's binaries measured (release builds).
pub struct Binaries {
    pub backend: PathBuf,
    pub vmm: PathBuf,
    pub img: PathBuf,
}

/// Where a workload runs: the image, the window of its file that holds
/// its data (what the raw rows read), and the socket the disk is served
/// on.
pub struct Place<'a> {
    pub storage: &'a str,
    pub snap: &'a Path,
    pub window: (u64, u64),
    pub sock: PathBuf,
    /// The block device under the file ("vda"), whose counters each run
    /// reads; none on tmpfs.
    pub device: Option<String>,
    /// Where each side of a row runs (`--pin`); none: anywhere.
    pub pin: Option<Pinning>,
}

/// `--pin`: the side that waits for the disk (the backend's queue
/// workers, qemu-storage-daemon, host fio) on the CPU that takes the
/// disk's interrupts, the guest's vCPUs (or fio's busy core) on the others.
#[derive(Debug, Clone)]
pub struct Pinning {
    pub io: cpu_affinity::CpuList,
    pub guest: cpu_affinity::CpuList,
}

impl Pinning {
    /// `io_cpu` for I/O, every other CPU this process may use for the
    /// guest.
    pub fn around(io_cpu: usize) -> Result<Pinning> {
        let allowed = cpu_affinity::current_affinity()?;
        let others: Vec<String> = allowed
            .cpus()
            .iter()
            .filter(|&&c| c != io_cpu)
            .map(ToString::to_string)
            .collect();
        if others.is_empty() || !allowed.cpus().contains(&io_cpu) {
            bail!(
                "--pin needs CPU {io_cpu} and another beside it (this process may use {allowed})"
            );
        }
        Ok(Pinning {
            io: io_cpu.to_string().parse()?,
            guest: others.join(",").parse()?,
        })
    }

    /// The vmm's options for it.
    fn vmm_options(&self) -> Vec<String> {
        vec!["--vcpu-affinity".into(), self.guest.to_string()]
    }
}

/// vmm + blk-backend with options of its own (`--variant NAME=OPTIONS`):
/// a row more, taking its turn in each round beside the plain one, for an
/// A/B of a backend setting within one run.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub options: Vec<String>,
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Variant, String> {
        let (name, options) = s
            .split_once('=')
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| {
                format!("{s:?}: give a variant as NAME=OPTIONS (nopoll=\"--poll-us 0\")")
            })?;
        Ok(Variant {
            name: name.to_string(),
            options: options.split_whitespace().map(String::from).collect(),
        })
    }
}

/// Every row `a` asks for of workload `w` (and each variant of
/// vmm + blk-backend), their runs taking turns.
pub fn measure(a: &Args, bins: &Binaries, place: &Place, w: &Workload) -> Result<Vec<Cell>> {
    let mut rows: Vec<(Row, Option<&Variant>)> = Vec::new();
    for row in Row::ALL
        .into_iter()
        .filter(|r| a.rows.is_empty() || a.rows.iter().any(|n| n == r.short()))
        .filter(|r| w.queues == 1 || !r.one_queue())
    {
        rows.push((row, None));
        if row == Row::VmmBlkBackend {
            rows.extend(a.variants.iter().map(|v| (row, Some(v))));
        }
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); rows.len()];
    for run in 0..a.runs {
        for ((row, variant), samples) in rows.iter().zip(&mut samples) {
            eprintln!(
                "[{}] {} / {}{} run {}",
                place.storage,
                w.name,
                row.label(),
                variant.map_or(String::new(), |v| format!(" [{}]", v.name)),
                run + 1
            );
            // Dirty pages of what ran before (a build, the last row's
            // files) written back now, not in the middle of this run.
            rustix::fs::sync();
            let before = place.device.as_deref().and_then(Counters::read);
            let mut sample = run_row(a, bins, place, (*row, *variant), w)?;
            let after = place.device.as_deref().and_then(Counters::read);
            sample.device = after.zip(before).and_then(|(a, b)| a.since(&b));
            samples.push(sample);
        }
    }
    rows.into_iter()
        .zip(samples)
        .map(|((row, variant), samples)| {
            let mut c = Cell::of(place.storage, row, *w, samples)?;
            c.variant = variant.map(|v| v.name.clone());
            Ok(c)
        })
        .collect()
}

/// One run of `row` (with a variant's backend options) on workload `w`.
fn run_row(
    a: &Args,
    bins: &Binaries,
    place: &Place,
    (row, variant): (Row, Option<&Variant>),
    w: &Workload,
) -> Result<Sample> {
    let (snap, window, sock) = (place.snap, place.window, &place.sock);
    let pin = place.pin.as_ref();
    let vmm_pin = pin.map(Pinning::vmm_options).unwrap_or_default();
    let io_cpus = pin.map(|p| p.io.to_string());
    Ok(match row {
        Row::HostFio => run_fio(snap, window, w, a.seconds, pin)?,
        Row::HostFioBusyCore => {
            let _spinner = BusyCore::start(pin.map(|p| p.guest.for_thread(0)));
            run_fio(snap, window, w, a.seconds, pin)?
        }
        Row::QemuVirtioBlk => run_guest(
            Disk::Builtin {
                path: snap.to_path_buf(),
                readonly: false,
                num_queues: 1,
                iothread: true,
                window: Some(window),
            },
            w,
            a.seconds,
        )?,
        Row::QemuQsd => {
            // QEMU's vCPUs cannot be placed from its command line: its
            // rows run unpinned, both sides.
            let d = StorageDaemon::start_window(snap, Some(window), sock, 1, true, None)?;
            let s = run_guest(Disk::vhost_user(&d.socket, 1), w, a.seconds);
            drop(d);
            s?
        }
        Row::VmmQsd => {
            let d = StorageDaemon::start_window(
                snap,
                Some(window),
                sock,
                w.queues,
                true,
                io_cpus.as_deref(),
            )?;
            let options: Vec<&str> = vmm_pin.iter().map(String::as_str).collect();
            let s = run_vmm(&bins.vmm, &d.socket, w, a.seconds, &options);
            drop(d);
            s?
        }
        Row::VmmBlkBackend | Row::VmmBlkBackendNoSeccomp | Row::QemuBlkBackend => {
            // Both processes take --no-seccomp; the
            // backend alone the number of queues.
            let options: &[&str] = if row == Row::VmmBlkBackendNoSeccomp {
                &["--no-seccomp"]
            } else {
                &[]
            };
            let queues = w.queues.to_string();
            let mut backend_options = vec!["--num-queues", &queues];
            backend_options.extend_from_slice(options);
            let mut vmm_options = options.to_vec();
            if let (Some(io), Row::VmmBlkBackend | Row::VmmBlkBackendNoSeccomp) = (&io_cpus, row) {
                backend_options.extend(["--worker-cpus", io]);
                vmm_options.extend(vmm_pin.iter().map(String::as_str));
            }
            backend_options.extend(a.backend_options.iter().map(String::as_str));
            backend_options.extend(
                variant
                    .iter()
                    .flat_map(|v| v.options.iter().map(String::as_str)),
            );
            let b = BlkBackendProcess::start_exports_with(
                &bins.backend,
                &[(snap.to_path_buf(), sock.clone())],
                &backend_options,
            )?;
            let mut s = if row != Row::QemuBlkBackend {
                run_vmm(&bins.vmm, &b.socket, w, a.seconds, &vmm_options)?
            } else {
                run_guest(Disk::vhost_user(&b.socket, 1), w, a.seconds)?
            };
            if let Some((cpu, rss)) = b.usage() {
                s.cpu_s_per_mio = Some(cpu / (s.ios / 1e6).max(1e-9));
                s.rss_mib = Some(rss as f64 / (1 << 20) as f64);
            }
            b.stop();
            s
        }
    })
}

/// A thread that keeps one core busy until dropped.
struct BusyCore {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BusyCore {
    /// On `cpu`, or anywhere.
    fn start(cpu: Option<usize>) -> BusyCore {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            if let Some(c) = cpu {
                if let Err(e) = cpu_affinity::pin_current_thread(c) {
                    eprintln!("the busy core runs unpinned: {e}");
                }
            }
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        BusyCore {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CPU seconds used by this process's children that were waited for.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn run_fio(
    file: &Path,
    (offset, size): (u64, u64),
    w: &Workload,
    seconds: u64,
    pin: Option<&Pinning>,
) -> Result<Sample> {
    // fio's own CPU (its whole process, jobs included), the cost of the
    // kernel's I/O path with no guest and no backend around it.
    let cpu_before = children_cpu_s();
    let mut options = vec![
        format!("--offset={offset}"),
        format!("--size={size}"),
        format!("--numjobs={}", w.queues),
        "--group_reporting".into(),
    ];
    // Pinned as the backend is: its jobs where the disk's completions land.
    options.extend(pin.map(|p| format!("--cpus_allowed={}", p.io)));
    let side = &bench::fio_job(
        file,
        "io_uring",
        (w.rw, &w.bs.to_string(), w.qd),
        seconds,
        &options,
    )?;
    let pct = |k: &str| side["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    let ios = side["total_ios"].as_f64().unwrap_or(0.0);
    let cpu = children_cpu_s() - cpu_before;
    Ok(Sample {
        ios,
        cpu_s_per_mio: (ios > 0.0).then(|| cpu / ios * 1e6),
        rss_mib: None,
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mb_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
        device: None,
    })
}

fn guest_cmdline(w: &Workload, seconds: u64) -> String {
    format!(
        "mode={} bs={} qd={} queues={} duration_ms={} progress_ms=0",
        if w.rw == "read" { "read" } else { w.rw },
        w.bs,
        w.qd,
        w.queues,
        seconds * 1000
    )
}

pub fn run_vmm(
    vmm: &Path,
    socket: &Path,
    w: &Workload,
    seconds: u64,
    options: &[&str],
) -> Result<Sample> {
    let r = VmmVm {
        cpus: w.queues as u8,
        mem_mib: 512,
        metrics_file: None,
        limit: run_patience(seconds + 60),
        silence: run_patience(seconds + 60),
        options: options.iter().map(|o| o.to_string()).collect(),
        ..VmmVm::new(vmm, &guest_cmdline(w, seconds)).with_disk(socket, w.queues)
    }
    .run()?;
    sample_of(&r)
}

fn sample_of(r: &test_infra::GuestRun) -> Result<Sample> {
    let Some(j) = r.result.as_ref().filter(|_| r.ok()) else {
        bail!("guest failed:\n{}", r.serial);
    };
    let f = |k: &str| j[k].as_f64().unwrap_or(0.0);
    let lat = |k: &str| j["lat_ns"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Sample {
        ios: f("ios"),
        cpu_s_per_mio: None,
        rss_mib: None,
        iops: f("iops"),
        mb_s: f("mb_s"),
        p50_us: lat("p50"),
        p99_us: lat("p99"),
        p999_us: lat("p99_9"),
        device: None,
    })
}

pub fn run_guest(disk: Disk, w: &Workload, seconds: u64) -> Result<Sample> {
    let vm = QemuVm {
        machine: Machine::Microvm,
        mem_mib: 512,
        disk,
        cmdline: guest_cmdline(w, seconds),
        limit: run_patience(seconds + 60),
        silence: run_patience(seconds + 60),
        console: QemuConsole::Uart,
        nic: None,
    };
    sample_of(&vm.run()?)
}

/// A benchmark run's waits: the guest prints only when it is done, so a
/// hang is caught by its whole length, a few times over.
pub fn run_patience(seconds: u64) -> Patience {
    Patience::with_margin(
        format!("a benchmark run of about {seconds} s (the guest prints only at its end)"),
        Duration::from_secs(seconds),
        3,
    )
}
