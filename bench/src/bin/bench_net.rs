//! Networking: a bench-guest VM sending numbered datagrams to a UDP echo
//! port and counting the echoes (its report: echoes per second, round
//! trips), to another VM on the same bridge (guest to guest) and to the
//! host's side of the bridge (guest to host and back: an echo server of
//! this process's in the namespace), on the project's stack (vmm +
//! net-backend on a multi-queue tap each) and on QEMU's (virtio-net on its
//! own tap device, vhost=off: this kernel has no vhost-net), in one run.
//! Everything lives in a network namespace of the benchmark's own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use test_infra::{
    kvm_available, Disk, KillOnDrop as Process, Netns, Patience, QemuNic, QemuVm, RunningVm, VmmVm,
};

#[derive(Parser)]
#[command(about = "Guest-to-guest UDP round trips and echo rates: vmm + net-backend vs QEMU's tap")]
struct Args {
    /// Datagrams per measurement.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// UDP payload sizes.
    #[arg(long, value_delimiter = ',', default_value = "64,1472")]
    payloads: Vec<u32>,
    /// Datagrams in flight for the rate rows (the latency rows have 1).
    #[arg(long, default_value_t = 32)]
    window: u32,
    /// Measurements per cell (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// How the guests wait for frames: halt (interrupts; an idle guest
    /// leaves its host core) or poll (spinning on the rings).
    #[arg(long, default_value = "halt", value_parser = ["halt", "poll"])]
    guest_wait: String,
    #[arg(long)]
    markdown: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

const SERVER: &str = "10.0.0.2";
const HOST: &str = "10.0.0.1";

/// A UDP echo server at HOST:7 in the namespace: a thread of this process
/// moved into it (its socket lives there), until `stop`.
fn host_echo(
    ns: &Netns,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let path = format!("/var/run/netns/{}", ns.name);
    let ns_file = std::fs::File::open(&path).with_context(|| path.clone())?;
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let t = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file we hold open, for this thread.
        if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            let _ = tx.send(Err(anyhow::anyhow!("setns: {e}")));
            return;
        }
        let sock = match std::net::UdpSocket::bind((HOST, 7)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.into()));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        let mut buf = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    rx.recv().context("the host echo server")??;
    Ok(t)
}

/// A guest of the stack: ours (vmm + net-backend on `tap`) or QEMU's.
fn guest(
    ns: &Netns,
    ours: bool,
    tap: &str,
    dir: &Path,
    cmdline: &str,
) -> Result<(RunningVm, Option<Process>)> {
    let limit = Patience::new("a networking guest's run", Duration::from_secs(60));
    if ours {
        ns.tap(tap, true, Some("br0"));
        let sock = dir.join(format!("{tap}.sock"));
        let _ = std::fs::remove_file(&sock);
        let backend = Process(
            ns.command(&[
                bench::release_binary("net-backend")?
                    .to_str()
                    .context("a UTF-8 path")?,
                "--socket",
                sock.to_str().context("a UTF-8 path")?,
                "--tap",
                tap,
            ])
            .stdout(Stdio::null())
            .spawn()?,
        );
        let mut v = VmmVm::new(&bench::release_binary("vmm")?, cmdline);
        v.options = vec![
            "--net".into(),
            format!("socket={},connect_timeout_ms=10000", sock.display()),
        ];
        v.limit = limit.clone();
        v.silence = limit;
        Ok((v.spawn()?, Some(backend)))
    } else {
        ns.tap(tap, false, Some("br0"));
        let mut q = QemuVm::new(Disk::None, cmdline);
        q.mem_mib = 256;
        q.nic = Some(QemuNic::Tap {
            ifname: tap.into(),
            mac: format!("52:54:00:00:{:02x}:01", tap.len() + usize::from(ours)),
        });
        q.limit = limit.clone();
        q.silence = limit;
        let ns_name = ns.name.clone();
        let vm = q.spawn_wrapped(move |c| {
            let mut w = Command::new("ip");
            w.args(["netns", "exec", &ns_name])
                .arg(c.get_program())
                .args(c.get_args());
            w
        })?;
        Ok((vm, None))
    }
}

#[derive(serde::Serialize, Clone)]
struct Cell {
    /// "guest-guest" or "guest-host".
    path: &'static str,
    stack: &'static str,
    payload: u32,
    window: u32,
    echoes_per_s: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
}

/// One cell: a client VM of the stack against a server VM of the same
/// stack (`to_host` false) or the host's echo server.
fn measure(
    a: &Args,
    ns: &Netns,
    dir: &Path,
    (ours, to_host): (bool, bool),
    payload: u32,
    window: u32,
) -> Result<Cell> {
    let stack = if ours {
        "vmm + net-backend"
    } else {
        "QEMU tap"
    };
    let tag = format!(
        "{}{}",
        if ours { "o" } else { "q" },
        if to_host { "h" } else { "g" }
    );
    let _server = if to_host {
        None
    } else {
        let (mut server, backend) = guest(
            ns,
            ours,
            &format!("{tag}s{payload}w{window}"),
            dir,
            &format!("mode=net ip={SERVER} progress_ms=0 wait={}", a.guest_wait),
        )?;
        server.wait_for_line(
            "nic:",
            &Patience::new("the server's NIC", Duration::from_secs(2)),
        )?;
        Some((server, backend))
    };
    let peer = if to_host { HOST } else { SERVER };
    let mut rates = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for run in 0..a.runs {
        let (client, _cb) = guest(
            ns,
            ours,
            &format!("{tag}c{payload}w{window}r{run}"),
            dir,
            &format!(
                "mode=net ip=10.0.0.{} peer={peer} count={} window={window} payload={payload} timeout_ms=20000 wait={}",
                10 + run,
                a.count,
                a.guest_wait
            ),
        )?;
        let r = client.wait()?;
        if !r.ok() || r.field("received") != a.count {
            bail!(
                "{stack}, {payload} B, window {window}: the client failed:\n{}",
                r.serial
            );
        }
        rates.push(r.field("pps") as f64);
        p50.push(r.field("rtt_p50_ns") as f64 / 1e3);
        p99.push(r.field("rtt_p99_ns") as f64 / 1e3);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Cell {
        path: if to_host { "guest-host" } else { "guest-guest" },
        stack,
        payload,
        window,
        echoes_per_s: median(rates),
        rtt_p50_us: median(p50),
        rtt_p99_us: median(p99),
    })
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !kvm_available("bench-net") {
        return Ok(());
    }
    let ns = Netns::new("benchnet", "bridge");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let dir = tempfile::tempdir()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echo = host_echo(&ns, std::sync::Arc::clone(&stop))?;
    let mut cells = Vec::new();
    for to_host in [false, true] {
        for &payload in &a.payloads {
            for window in [1, a.window] {
                for ours in [true, false] {
                    eprintln!(
                        "[{}, {payload} B, window {window}] {}",
                        if to_host { "guest-host" } else { "guest-guest" },
                        if ours {
                            "vmm + net-backend"
                        } else {
                            "QEMU tap"
                        }
                    );
                    cells.push(measure(
                        &a,
                        &ns,
                        dir.path(),
                        (ours, to_host),
                        payload,
                        window,
                    )?);
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echo.join();
    let mut md = String::from(
        "| path | payload | in flight | stack | echoes/s | RTT p50 us | RTT p99 us | echoes/s vs QEMU | RTT p50 vs QEMU |\n|---|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for pair in cells.chunks(2) {
        let (o, q) = (&pair[0], &pair[1]);
        for c in pair {
            md += &format!(
                "| {} | {} B | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |\n",
                c.path,
                c.payload,
                c.window,
                c.stack,
                c.echoes_per_s,
                c.rtt_p50_us,
                c.rtt_p99_us,
                if std::ptr::eq(c, o) {
                    format!("{:.2}x", o.echoes_per_s / q.echoes_per_s.max(1.0))
                } else {
                    String::new()
                },
                if std::ptr::eq(c, o) {
                    format!("{:.2}x", o.rtt_p50_us / q.rtt_p50_us.max(0.001))
                } else {
                    String::new()
                },
            );
        }
    }
    bench::report(&md, a.markdown.as_deref(), a.json.as_deref(), &cells)
}
