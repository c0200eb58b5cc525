//! Networking, vmm + net-backend (a multi-queue tap each) against QEMU's
//! virtio-net on its own tap device (vhost=off: this kernel has no
//! vhost-net), the same bench guest on both, in one run, everything in a
//! network namespace of the benchmark's own:
//! - one-way floods of UDP datagrams to the discard port, guest to host,
//!   host to guest and guest to guest, small (64 B on the wire) and full
//!   (1518 B) frames: the receiver's packets per second and throughput;
//! - echoes: a VM sending numbered, timestamped datagrams to an echo port
//!   (another VM's, or an echo server of this process's on the host side of
//!   the bridge), a window of them in flight: echoes per second and round
//!   trips.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bench::table::{
    Align::{Left, Right},
    Ratio, Table,
};
use clap::Parser;
use test_infra::{
    kvm_available, Disk, KillOnDrop as Process, Netns, NsThread, Patience, QemuNic, QemuVm,
    Received, RunningVm, VmmVm,
};

#[derive(Parser)]
#[command(
    about = "UDP floods (guest to host, host to guest, guest to guest) and echoes: vmm + net-backend vs QEMU's tap"
)]
struct Args {
    /// Datagrams per echo measurement.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Datagrams each flood sends.
    #[arg(long, default_value_t = 200_000)]
    flood_count: u64,
    /// UDP payload sizes (18: a 64-byte frame on the wire; 1472: a full
    /// 1518-byte one).
    #[arg(long, value_delimiter = ',', default_value = "18,1472")]
    payloads: Vec<u32>,
    /// Which measurements: flood, echo, or both.
    #[arg(long, value_delimiter = ',', default_value = "flood,echo")]
    only: Vec<String>,
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
    /// More arguments for net-backend (such as --tx-poll-us=N), repeated.
    #[arg(long, allow_hyphen_values = true)]
    backend_arg: Vec<String>,
    #[command(flatten)]
    out: bench::OutputArgs,
}

const SERVER: &str = "10.0.0.2";
const HOST: &str = "10.0.0.1";

/// A UDP echo server at HOST:7 in the namespace, until `stop`.
fn host_echo(ns: &Netns, stop: Arc<AtomicBool>) -> Result<NsThread<()>> {
    Ok(ns.thread(
        || {
            let sock = UdpSocket::bind((HOST, 7))?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(sock)
        },
        move |sock| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        },
    )?)
}

/// A MAC of its own for each QEMU guest (the vmm picks a random one).
fn next_qemu_mac() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        n >> 16 & 0xff,
        n >> 8 & 0xff,
        n & 0xff
    )
}

/// A guest of the stack: ours (vmm + net-backend on `tap`) or QEMU's.
fn guest(
    a: &Args,
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
            .args(&a.backend_arg)
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
            mac: next_qemu_mac(),
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
struct EchoCell {
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
fn measure_echo(
    a: &Args,
    ns: &Netns,
    dir: &Path,
    (ours, to_host): (bool, bool),
    payload: u32,
    window: u32,
) -> Result<EchoCell> {
    let stack = stack_name(ours);
    let tag = format!(
        "{}{}",
        if ours { "o" } else { "q" },
        if to_host { "h" } else { "g" }
    );
    let _server = if to_host {
        None
    } else {
        let (mut server, backend) = guest(
            a,
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
            a,
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
    Ok(EchoCell {
        path: if to_host { "guest-host" } else { "guest-guest" },
        stack,
        payload,
        window,
        echoes_per_s: bench::median(&rates)?,
        rtt_p50_us: bench::median(&p50)?,
        rtt_p99_us: bench::median(&p99)?,
    })
}

/// One flood cell's figures: the receiver's.
#[derive(serde::Serialize, Clone)]
struct FloodCell {
    /// "guest-host", "host-guest" or "guest-guest".
    path: &'static str,
    stack: &'static str,
    payload: u32,
    /// Bytes on the wire per frame (Ethernet header and FCS included).
    frame_bytes: u32,
    sent: u64,
    /// The sender's rate (the guest's count, or the host's sends).
    sent_pps: f64,
    /// A guest sender's notifications to its device (with event-index
    /// suppression: only when the device asked for one).
    kicks: Option<u64>,
    received: u64,
    /// The receiver's rate, first datagram to last.
    pps: f64,
    mbit_s: f64,
}

/// Which way a flood goes.
#[derive(Clone, Copy, PartialEq)]
enum Flow {
    GuestToHost,
    HostToGuest,
    GuestToGuest,
}

impl Flow {
    fn name(self) -> &'static str {
        match self {
            Flow::GuestToHost => "guest-host",
            Flow::HostToGuest => "host-guest",
            Flow::GuestToGuest => "guest-guest",
        }
    }
}

fn stack_name(ours: bool) -> &'static str {
    if ours {
        "vmm + net-backend"
    } else {
        "QEMU tap"
    }
}

/// A flood datagram's bytes on the wire: Ethernet (14), IPv4 (20), UDP
/// (8), the payload, the FCS (4); never under Ethernet's 64.
fn frame_bytes(payload: u32) -> u32 {
    (14 + 20 + 8 + payload + 4).max(64)
}

/// A guest counting the datagrams to its discard port at SERVER, done half
/// a second after they stop.
fn sink_guest(
    a: &Args,
    ns: &Netns,
    ours: bool,
    tap: &str,
    dir: &Path,
) -> Result<(RunningVm, Option<Process>)> {
    let (mut vm, backend) = guest(
        a,
        ns,
        ours,
        tap,
        dir,
        &format!(
            "mode=net ip={SERVER} progress_ms=0 sink_idle_ms=500 wait={}",
            a.guest_wait
        ),
    )?;
    vm.wait_for_line(
        "nic:",
        &Patience::new("the sink's NIC", Duration::from_secs(2)),
    )?;
    Ok((vm, backend))
}

/// A guest sending `count` datagrams to `peer`:9 as fast as its ring
/// takes them.
fn flood_guest(
    a: &Args,
    ns: &Netns,
    ours: bool,
    tap: &str,
    dir: &Path,
    peer: &str,
    payload: u32,
) -> Result<(RunningVm, Option<Process>)> {
    guest(
        a,
        ns,
        ours,
        tap,
        dir,
        &format!(
            "mode=net ip=10.0.0.20 peer={peer} flood=1 count={} payload={payload} timeout_ms=20000 wait={}",
            a.flood_count, a.guest_wait
        ),
    )
}

/// One flood, run `a.runs` times: the figures of the run whose receiver's
/// rate is the median.
fn measure_flood(
    a: &Args,
    ns: &Netns,
    dir: &Path,
    ours: bool,
    flow: Flow,
    payload: u32,
) -> Result<FloodCell> {
    let stack = stack_name(ours);
    let what = format!("{}, {stack}, {payload} B", flow.name());
    let mut runs = Vec::new();
    for run in 0..a.runs {
        let tag = format!(
            "{}f{}{payload}r{run}",
            if ours { "o" } else { "q" },
            flow as u8
        );
        let (sent, sent_pps, kicks, received) = match flow {
            Flow::GuestToHost => {
                let sink =
                    ns.udp_sink(HOST, 9, Duration::from_secs(60), Duration::from_millis(500))?;
                let (vm, _b) = flood_guest(a, ns, ours, &format!("{tag}c"), dir, HOST, payload)?;
                let r = vm.wait()?;
                if !r.ok() {
                    bail!("{what}: the flooding guest failed:\n{}", r.serial);
                }
                (
                    r.field("sent"),
                    r.field("pps") as f64,
                    Some(r.field("kicks")),
                    sink.join(),
                )
            }
            Flow::HostToGuest => {
                let (vm, _b) = sink_guest(a, ns, ours, &format!("{tag}s"), dir)?;
                // The guest's MAC known before the flood (an unresolved
                // neighbour queues a few datagrams, drops the rest).
                if !ns.ping(SERVER, 1).status.success() {
                    bail!("{what}: the sink does not answer a ping:\n{}", vm.console());
                }
                let (sent, took) = ns
                    .udp_flood(HOST, (SERVER, 9), a.flood_count, payload as usize, None)?
                    .join();
                let sent_pps = sent as f64 / took.as_secs_f64().max(1e-9);
                let r = vm.wait()?;
                if !r.ok() {
                    bail!("{what}: the sink failed:\n{}", r.serial);
                }
                (
                    sent,
                    sent_pps,
                    None,
                    Received {
                        datagrams: r.field("discarded"),
                        bytes: r.field("discarded_bytes"),
                        span: Duration::from_nanos(r.field("discard_ns")),
                    },
                )
            }
            Flow::GuestToGuest => {
                let (sink, _sb) = sink_guest(a, ns, ours, &format!("{tag}s"), dir)?;
                let (vm, _b) = flood_guest(a, ns, ours, &format!("{tag}c"), dir, SERVER, payload)?;
                let r = vm.wait()?;
                if !r.ok() {
                    bail!("{what}: the flooding guest failed:\n{}", r.serial);
                }
                let s = sink.wait()?;
                if !s.ok() {
                    bail!("{what}: the sink failed:\n{}", s.serial);
                }
                (
                    r.field("sent"),
                    r.field("pps") as f64,
                    Some(r.field("kicks")),
                    Received {
                        datagrams: s.field("discarded"),
                        bytes: s.field("discarded_bytes"),
                        span: Duration::from_nanos(s.field("discard_ns")),
                    },
                )
            }
        };
        if received.datagrams < 2 {
            bail!("{what}: {} of {sent} datagrams arrived", received.datagrams);
        }
        runs.push((received.pps(), sent, sent_pps, kicks, received.datagrams));
    }
    let middle = bench::stats::median_run(&runs.iter().map(|r| r.0).collect::<Vec<_>>())?;
    let (pps, sent, sent_pps, kicks, received) = runs[middle];
    Ok(FloodCell {
        path: flow.name(),
        stack,
        payload,
        frame_bytes: frame_bytes(payload),
        sent,
        sent_pps,
        kicks,
        received,
        pps,
        mbit_s: pps * f64::from(frame_bytes(payload)) * 8.0 / 1e6,
    })
}

/// The floods, ours then QEMU's for each, with our receiver's packets per
/// second over QEMU's on our row.
fn flood_table(floods: &[FloodCell]) -> Table {
    let mut table = Table::new([
        ("flood", Left),
        ("frame", Right),
        ("stack", Left),
        ("sent", Right),
        ("sent pps", Right),
        ("sender kicks", Right),
        ("received", Right),
        ("received pps", Right),
        ("Mbit/s", Right),
        ("pps vs QEMU", Right),
    ]);
    for pair in floods.chunks(2) {
        for (k, c) in pair.iter().enumerate() {
            table.row([
                c.path.to_string(),
                format!("{} B", c.frame_bytes),
                c.stack.to_string(),
                c.sent.to_string(),
                format!("{:.0}", c.sent_pps),
                c.kicks.map_or("-".into(), |k| k.to_string()),
                c.received.to_string(),
                format!("{:.0}", c.pps),
                format!("{:.0}", c.mbit_s),
                Ratio::pair_cell(pair, k, |c| c.pps, 2),
            ]);
        }
    }
    table
}

/// The echoes, ours then QEMU's for each, with our echo rate and median
/// round trip over QEMU's on our row.
fn echo_table(echoes: &[EchoCell]) -> Table {
    let mut table = Table::new([
        ("echo", Left),
        ("frame", Right),
        ("in flight", Right),
        ("stack", Left),
        ("echoes/s", Right),
        ("RTT p50 us", Right),
        ("RTT p99 us", Right),
        ("echoes/s vs QEMU", Right),
        ("RTT p50 vs QEMU", Right),
    ]);
    for pair in echoes.chunks(2) {
        for (k, c) in pair.iter().enumerate() {
            table.row([
                c.path.to_string(),
                format!("{} B", frame_bytes(c.payload)),
                c.window.to_string(),
                c.stack.to_string(),
                format!("{:.0}", c.echoes_per_s),
                format!("{:.1}", c.rtt_p50_us),
                format!("{:.1}", c.rtt_p99_us),
                Ratio::pair_cell(pair, k, |e| e.echoes_per_s, 2),
                Ratio::pair_cell(pair, k, |e| e.rtt_p50_us, 2),
            ]);
        }
    }
    table
}

#[derive(serde::Serialize)]
struct Figures {
    floods: Vec<FloodCell>,
    echoes: Vec<EchoCell>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !kvm_available("bench-net") {
        return Ok(());
    }
    for m in &a.only {
        if m != "flood" && m != "echo" {
            bail!("--only {m}: flood or echo");
        }
    }
    let ns = Netns::new("benchnet", "bridge");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    // Frames between the bridge's ports are not passed through iptables
    // (br_netfilter's default where it is loaded; a VM bridge seldom wants
    // it): the path measured is the bridge's, the same for both stacks.
    if Path::new("/proc/sys/net/bridge").exists() {
        let st = ns
            .command(&[
                "sysctl",
                "-q",
                "-w",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ])
            .status()?;
        if !st.success() {
            bail!("sysctl net.bridge.* in the namespace: {st}");
        }
    }
    let dir = tempfile::tempdir()?;
    let mut figures = Figures {
        floods: Vec::new(),
        echoes: Vec::new(),
    };
    if a.only.iter().any(|m| m == "flood") {
        for flow in [Flow::GuestToHost, Flow::HostToGuest, Flow::GuestToGuest] {
            for &payload in &a.payloads {
                for ours in [true, false] {
                    eprintln!("[flood {}, {payload} B] {}", flow.name(), stack_name(ours));
                    figures
                        .floods
                        .push(measure_flood(&a, &ns, dir.path(), ours, flow, payload)?);
                }
            }
        }
    }
    if a.only.iter().any(|m| m == "echo") {
        let stop = Arc::new(AtomicBool::new(false));
        let echo = host_echo(&ns, Arc::clone(&stop))?;
        for to_host in [false, true] {
            for &payload in &a.payloads {
                for window in [1, a.window] {
                    for ours in [true, false] {
                        eprintln!(
                            "[echo {}, {payload} B, window {window}] {}",
                            if to_host { "guest-host" } else { "guest-guest" },
                            stack_name(ours)
                        );
                        figures.echoes.push(measure_echo(
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
        stop.store(true, Ordering::Relaxed);
        echo.join();
    }
    let mut md = String::new();
    if !figures.floods.is_empty() {
        md += &format!("{}\n", flood_table(&figures.floods));
    }
    if !figures.echoes.is_empty() {
        md += &echo_table(&figures.echoes).to_string();
    }
    a.out.report(&md, &figures)
}
