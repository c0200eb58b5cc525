//! The storage table: the bench guest's workloads against each way of
//! serving a disk, beside host-native fio (the limit), on the same bytes
//! of one image on the root disk and on /dev/shm; and the guest's boot time
//! to its start marker. Median of N runs with the spread; one command writes
//! the markdown table, a JSON file and an SVG plot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use clap::Parser;
use serde::Serialize;
use test_infra::{
    kvm_available, BlkBackendProcess, Disk, Machine, Patience, QemuConsole, QemuVm, StorageDaemon,
    VmmVm,
};

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
    #[command(flatten)]
    out: bench::OutputArgs,
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Clone, Copy, Serialize)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: u32,
    /// Requests in flight per queue (per fio job).
    qd: u32,
    /// Queues, and as many guest vCPUs (fio jobs); QEMU's rows run one.
    queues: u16,
}

const WORKLOADS: [Workload; 6] = [
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
enum Row {
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
    fn label(self) -> &'static str {
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

    fn short(&self) -> &'static str {
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
struct Sample {
    ios: f64,
    /// The backend's CPU seconds per million I/Os and its RSS (blk-backend rows).
    cpu_s_per_mio: Option<f64>,
    rss_mib: Option<f64>,
    iops: f64,
    mb_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

#[derive(Serialize)]
struct Cell {
    storage: String,
    row: Row,
    workload: Workload,
    samples: Vec<Sample>,
    median_iops: f64,
    min_iops: f64,
    max_iops: f64,
    median_mb_s: f64,
    median_p50_us: f64,
    median_p99_us: f64,
    median_p999_us: f64,
}

/// Random reads through the image itself and through a chain of
/// `chain_depth` layers made on it (every layer but the new top sealed,
/// the data all in the bottom one), vmm + blk-backend with O_DIRECT for
/// every layer (`--base-io direct`): what the depth costs on the real
/// path. The image is left a chain: the last use of it in a run.
struct ChainRow {
    storage: String,
    workload: &'static str,
    depth1_iops: f64,
    deep_iops: f64,
    depth1_p50_us: f64,
    deep_p50_us: f64,
}

fn chain_rows(
    a: &Args,
    storage: &str,
    snap: &Path,
    img_bin: &Path,
    backend_bin: &Path,
    vmm_bin: &Path,
) -> Result<Vec<ChainRow>> {
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
                backend_bin,
                &[(snap.to_path_buf(), sock.clone())],
                &options,
            )?;
            let s = run_vmm(vmm_bin, &b.socket, w, a.seconds, &[]);
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
        let st = Command::new(img_bin)
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

/// Removes the image `snap` and the snapshots beside it (`NAME@...`, a
/// chain's layers).
fn remove_image(snap: &Path) {
    let _ = std::fs::remove_file(snap);
    let (Some(dir), Some(name)) = (snap.parent(), snap.file_name()) else {
        return;
    };
    let prefix = format!("{}@", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Makes `snap` a `size`-byte image written end to end by a guest
/// through blk-backend.
fn write_image(img_bin: &Path, backend_bin: &Path, snap: &Path, size: u64) -> Result<()> {
    remove_image(snap);
    let st = Command::new(img_bin)
        .arg("create")
        .arg(snap)
        .arg(size.to_string())
        .status()?;
    if !st.success() {
        bail!("img create failed");
    }
    eprintln!("[setup] writing {} through blk-backend", snap.display());
    let sock = std::env::temp_dir().join(format!("bench-fill-{}.sock", std::process::id()));
    let b = BlkBackendProcess::start(backend_bin, snap, &sock, 1, false)?;
    let r = QemuVm {
        machine: Machine::Microvm,
        mem_mib: 512,
        disk: Disk::vhost_user(&sock, 1),
        cmdline: "mode=write bs=1m qd=8 progress_ms=0".into(),
        limit: run_patience(600),
        silence: run_patience(600),
        console: QemuConsole::Uart,
        nic: None,
    }
    .run()?;
    if !r.ok() {
        bail!("filling the image failed:\n{}", r.serial);
    }
    b.stop();
    Ok(())
}

/// Where a `size`-byte image keeps its data, as `(file offset, size)`,
/// when it is all there, one run in the order of the disk (an image
/// written front to back): a raw view of that window reads the same
/// bytes as the image. None otherwise (or when it is not such an image).
fn data_window(snap: &Path, size: u64) -> Option<(u64, u64)> {
    let disk = image_format::Disk::open_path(snap, false).ok()?;
    if disk.virtual_size() != size || disk.layers().len() != 1 {
        return None;
    }
    let mut start = None;
    for e in disk.resolve(0, size) {
        let image_format::Source::Layer {
            layer: 0,
            file_offset,
        } = e.source
        else {
            return None;
        };
        let base = file_offset.checked_sub(e.offset)?;
        if *start.get_or_insert(base) != base {
            return None;
        }
    }
    start.map(|s| (s, size))
}

/// A thread that keeps one core busy until dropped.
struct BusyCore {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BusyCore {
    fn start() -> BusyCore {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
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

fn run_fio(file: &Path, (offset, size): (u64, u64), w: &Workload, seconds: u64) -> Result<Sample> {
    // fio's own CPU (its whole process, jobs included), the cost of the
    // kernel's I/O path with no guest and no backend around it.
    let cpu_before = children_cpu_s();
    let side = &bench::fio_job(
        file,
        "io_uring",
        (w.rw, &w.bs.to_string(), w.qd),
        seconds,
        &[
            format!("--offset={offset}"),
            format!("--size={size}"),
            format!("--numjobs={}", w.queues),
            "--group_reporting".into(),
        ],
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

fn run_vmm(
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
    })
}

fn run_guest(disk: Disk, w: &Workload, seconds: u64) -> Result<Sample> {
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

fn svg(cells: &[Cell]) -> String {
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

fn main() -> Result<()> {
    let a = Args::parse();
    if !kvm_available("bench-storage") {
        bail!("/dev/kvm is needed");
    }
    let size = a.size_gib << 30;
    // One image per storage, and every row on its bytes: blk-backend on
    // the image, fio, QEMU and qemu-storage-daemon on the window of the
    // same file where the image keeps its data (see `data_window`).
    let mut places = vec![("root disk".to_string(), a.dir.join("bench-storage.snap"))];
    if !a.no_shm {
        places.push((
            "/dev/shm".to_string(),
            PathBuf::from("/dev/shm/bench-storage.snap"),
        ));
    }
    let mut cells = Vec::new();
    let mut chains: Vec<ChainRow> = Vec::new();
    let backend_bin = bench::release_binary("blk-backend")?;
    let vmm_bin = bench::release_binary("vmm")?;
    let img_bin = bench::release_binary("img")?;
    for (storage, snap) in &places {
        // Written end to end by a guest through blk-backend (O_DIRECT),
        // as a VM writes its disk. (Not `img convert`: on this machine's
        // ext4, a file first written through the page cache takes O_DIRECT
        // random writes at half the rate of one written with O_DIRECT.)
        let window = match data_window(snap, size) {
            Some(w) if a.keep => {
                eprintln!("[setup] reusing {} (kept by --keep)", snap.display());
                w
            }
            _ => {
                write_image(&img_bin, &backend_bin, snap, size)?;
                data_window(snap, size).with_context(|| {
                    format!(
                        "{}: its data is not one run in file order, so the raw rows \
                         cannot read the same bytes",
                        snap.display()
                    )
                })?
            }
        };
        let sock = std::env::temp_dir().join(format!("bench-storage-{}.sock", std::process::id()));
        for w in WORKLOADS
            .iter()
            .filter(|w| a.only.as_ref().is_none_or(|o| w.name.contains(o.as_str())))
        {
            for row in [
                Row::HostFio,
                Row::HostFioBusyCore,
                Row::QemuVirtioBlk,
                Row::QemuQsd,
                Row::QemuBlkBackend,
                Row::VmmQsd,
                Row::VmmBlkBackend,
                Row::VmmBlkBackendNoSeccomp,
            ]
            .into_iter()
            .filter(|r| a.rows.is_empty() || a.rows.iter().any(|n| n == r.short()))
            // QEMU's rows here boot one vCPU.
            .filter(|r| w.queues == 1 || !r.label().starts_with("QEMU"))
            {
                let mut samples = Vec::new();
                for run in 0..a.runs {
                    eprintln!("[{storage}] {} / {} run {}", w.name, row.label(), run + 1);
                    let s = match row {
                        Row::HostFio => run_fio(snap, window, w, a.seconds)?,
                        Row::HostFioBusyCore => {
                            let _spinner = BusyCore::start();
                            run_fio(snap, window, w, a.seconds)?
                        }
                        Row::QemuVirtioBlk => run_guest(
                            Disk::Builtin {
                                path: snap.clone(),
                                readonly: false,
                                num_queues: 1,
                                iothread: true,
                                window: Some(window),
                            },
                            w,
                            a.seconds,
                        )?,
                        Row::QemuQsd => {
                            let d =
                                StorageDaemon::start_window(snap, Some(window), &sock, 1, true)?;
                            let s = run_guest(Disk::vhost_user(&d.socket, 1), w, a.seconds);
                            drop(d);
                            s?
                        }
                        Row::VmmQsd => {
                            let d = StorageDaemon::start_window(
                                snap,
                                Some(window),
                                &sock,
                                w.queues,
                                true,
                            )?;
                            let s = run_vmm(&vmm_bin, &d.socket, w, a.seconds, &[]);
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
                            backend_options.extend(a.backend_options.iter().map(String::as_str));
                            let b = BlkBackendProcess::start_exports_with(
                                &backend_bin,
                                &[(snap.clone(), sock.clone())],
                                &backend_options,
                            )?;
                            let mut s = if row != Row::QemuBlkBackend {
                                run_vmm(&vmm_bin, &b.socket, w, a.seconds, options)?
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
                    };
                    samples.push(s);
                }
                let iops =
                    bench::stats::spread(&samples.iter().map(|s| s.iops).collect::<Vec<f64>>())?;
                cells.push(Cell {
                    storage: storage.clone(),
                    row,
                    workload: *w,
                    median_iops: iops.median,
                    min_iops: iops.min,
                    max_iops: iops.max,
                    median_mb_s: bench::median(
                        &samples.iter().map(|s| s.mb_s).collect::<Vec<f64>>(),
                    )?,
                    median_p50_us: bench::median(
                        &samples.iter().map(|s| s.p50_us).collect::<Vec<f64>>(),
                    )?,
                    median_p99_us: bench::median(
                        &samples.iter().map(|s| s.p99_us).collect::<Vec<f64>>(),
                    )?,
                    median_p999_us: bench::median(
                        &samples.iter().map(|s| s.p999_us).collect::<Vec<f64>>(),
                    )?,
                    samples,
                });
            }
        }
        if a.chain_depth > 1 && (a.rows.is_empty() || a.rows.iter().any(|r| r == "vmm-blk-backend"))
        {
            chains.extend(chain_rows(
                &a,
                storage,
                snap,
                &img_bin,
                &backend_bin,
                &vmm_bin,
            )?);
        }
        if !a.keep {
            remove_image(snap);
        }
    }
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
    Command::new(&img_bin)
        .arg("create")
        .arg(&boot_img)
        .arg("64M")
        .status()?;
    let boot_sock = std::env::temp_dir().join(format!("bench-boot-{}.sock", std::process::id()));
    let b = BlkBackendProcess::start(&backend_bin, &boot_img, &boot_sock, 1, false)?;
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
                    ..VmmVm::new(&vmm_bin, "mode=read bs=4k ios=1").with_disk(&boot_sock, 1)
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
                &vmm_bin,
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

    let mut md = format!(
        "# Storage table (bench guest)\n\n{} GiB image written end to end by a guest through blk-backend; every row reads and writes the same bytes of the same file (blk-backend the image, the others the window of the file that holds its data); {} s per run; median of {} (min–max IOPS). Guest: 1 vCPU, 1 queue, polling, microvm + qboot. Ratios are against host fio in the same run.\n\n{}",
        a.size_gib,
        a.seconds,
        a.runs,
        storage_table(&cells)
    );
    md += &format!("\n## blk-backend cost\n\nThe backend process alone (every thread, the kernel's io_uring workers included), per million I/Os the guest completed; host fio's whole process on the same I/O beside it, the cost of the kernel's path alone.\n\n{}", cost_table(&cells)?);
    if !chains.is_empty() {
        md += &format!(
            "\n## Reads through a chain of {} layers\n\nvmm + blk-backend (`--base-io direct`: O_DIRECT for every layer), the image itself (depth 1) and the same image after {} snapshots (its data all in the bottom layer), same run.\n\n{}",
            a.chain_depth,
            a.chain_depth - 1,
            chain_table(&chains, a.chain_depth)
        );
    }
    md += &format!("\n## What the seccomp filters cost\n\nvmm + blk-backend with every thread filtered (the default) against both with `--no-seccomp`, same run, same image (the SIGBUS fence has no switch: on the hot path it is one atomic load per batch).\n\n{}", seccomp_table(&cells));
    md += &format!(
        "\n## Boot to the guest's start marker (exec to marker, whole VMM process)\n\n{}",
        boot_table(&boots)
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
    a.out.report(
        &md,
        &serde_json::json!({ "cells": cells, "boot_ms": boots }),
    )?;
    if let Some(p) = &a.svg {
        std::fs::write(p, svg(&cells))?;
    }
    Ok(())
}

/// Every cell: its IOPS (median, spread), MB/s and latencies, and its
/// IOPS over host fio's on the same storage and workload.
fn storage_table(cells: &[Cell]) -> Table {
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
            c.row.label().to_string(),
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
fn cost_table(cells: &[Cell]) -> Result<Table> {
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
        let frontend = match c.row {
            Row::QemuBlkBackend => "QEMU",
            Row::VmmBlkBackend => "vmm",
            _ => "none: host fio itself, for the kernel's share",
        };
        table.row([
            c.storage.clone(),
            c.workload.name.to_string(),
            frontend.to_string(),
            cpu,
            rss,
        ]);
    }
    Ok(table)
}

/// Reads through the image itself and through a chain of `depth` layers,
/// the chain's IOPS over the image's.
fn chain_table(chains: &[ChainRow], depth: u32) -> Table {
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

/// vmm + blk-backend filtered and unfiltered, filtered IOPS over
/// unfiltered.
fn seccomp_table(cells: &[Cell]) -> Table {
    let mut table = Table::new([
        ("storage", Left),
        ("workload", Left),
        ("IOPS filtered", Right),
        ("IOPS unfiltered", Right),
        ("ratio", Right),
    ]);
    for c in cells.iter().filter(|c| c.row == Row::VmmBlkBackend) {
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

/// A benchmark run's waits: the guest prints only when it is done, so a
/// hang is caught by its whole length, a few times over.
fn run_patience(seconds: u64) -> Patience {
    Patience::with_margin(
        format!("a benchmark run of about {seconds} s (the guest prints only at its end)"),
        Duration::from_secs(seconds),
        3,
    )
}
