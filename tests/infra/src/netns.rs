//! A network namespace of a test's (or a benchmark's) own: its bridges,
//! taps, addresses and traffic live there and go with it, so nothing
//! reaches the host's own namespace or beyond it.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::patience::Patience;
use crate::workspace::output_within;

/// The namespace, deleted (with everything in it) when dropped. Its set-up
/// steps panic with what `ip` said: they fail only on a broken host.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `PREFIX-TAG-PID`, its loopback up.
    pub fn new(prefix: &str, tag: &str) -> Netns {
        let name = format!("{prefix}-{tag}-{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(st.success(), "ip netns add {name}");
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `cmd` inside the namespace.
    pub fn command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(cmd);
        c
    }

    /// `ip ARGS` inside the namespace, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        let out = self.command(&all).output().expect("ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A persistent tap with virtio-net headers, multi-queue for
    /// net-backend (QEMU's own tap device opens a single-queue one), on
    /// `bridge` if given, up.
    pub fn tap(&self, name: &str, multi_queue: bool, bridge: Option<&str>) {
        let mut add = vec!["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"];
        if multi_queue {
            add.push("multi_queue");
        }
        self.ip(&add);
        if let Some(b) = bridge {
            self.ip(&["link", "set", name, "master", b]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// A thread of this process moved into the namespace (its sockets
    /// live there): `setup` runs first, and its answer comes back before
    /// this returns (a socket bound before the traffic starts); then
    /// `run` with what it made.
    pub fn thread<S, T: Send + 'static>(
        &self,
        setup: impl FnOnce() -> std::io::Result<S> + Send + 'static,
        run: impl FnOnce(S) -> T + Send + 'static,
    ) -> std::io::Result<NsThread<T>> {
        let ns_file = std::fs::File::open(format!("/var/run/netns/{}", self.name))?;
        let (tx, rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let t = std::thread::spawn(move || {
            // SAFETY: setns on a namespace file held open, for this thread
            // only; the result is checked.
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = tx.send(Err(std::io::Error::last_os_error()));
                return None;
            }
            match setup() {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    Some(run(s))
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    None
                }
            }
        });
        rx.recv().map_err(std::io::Error::other)??;
        Ok(NsThread(t))
    }

    /// Counts the UDP datagrams to `addr:port` in the namespace (a socket
    /// with room for a long burst), until they stop for `idle` (or none
    /// came within `first`).
    pub fn udp_sink(
        &self,
        addr: &str,
        port: u16,
        first: Duration,
        idle: Duration,
    ) -> std::io::Result<NsThread<Received>> {
        let addr = addr.to_string();
        self.thread(
            move || {
                let sock = UdpSocket::bind((addr.as_str(), port))?;
                sock.set_read_timeout(Some(Duration::from_millis(20)))?;
                let bytes: libc::c_int = 64 << 20;
                // SAFETY: setsockopt on a socket we own with an int option
                // (root's SO_RCVBUFFORCE: past net.core.rmem_max).
                let rc = unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&bytes as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(sock)
            },
            move |sock| {
                let began = Instant::now();
                let mut buf = [0u8; 2048];
                let mut r = Received::default();
                let (mut first_at, mut last_at) = (None, began);
                loop {
                    let now = Instant::now();
                    match first_at {
                        None if now - began > first => break,
                        Some(_) if now - last_at > idle => break,
                        _ => {}
                    }
                    if let Ok(n) = sock.recv(&mut buf) {
                        last_at = Instant::now();
                        first_at.get_or_insert(last_at);
                        r.datagrams += 1;
                        r.bytes += n as u64;
                    }
                }
                r.span = first_at.map_or(Duration::ZERO, |f| last_at - f);
                r
            },
        )
    }

    /// Sends `count` datagrams of `payload` bytes from `from` (port any)
    /// to `to`, from a thread in the namespace: as fast as the stack takes
    /// them, or `burst` at a time with a pause between. How many the stack
    /// accepted, and how long that took.
    pub fn udp_flood(
        &self,
        from: &str,
        to: (&str, u16),
        count: u64,
        payload: usize,
        burst: Option<(u64, Duration)>,
    ) -> std::io::Result<NsThread<(u64, Duration)>> {
        let (from, to) = (from.to_string(), (to.0.to_string(), to.1));
        self.thread(
            move || {
                let sock = UdpSocket::bind((from.as_str(), 0))?;
                sock.connect((to.0.as_str(), to.1))?;
                Ok(sock)
            },
            move |sock| {
                let buf = vec![0x5a; payload];
                let began = Instant::now();
                let mut sent = 0;
                for i in 0..count {
                    if let Some((n, pause)) = burst {
                        if i > 0 && i % n == 0 {
                            std::thread::sleep(pause);
                        }
                    }
                    if sock.send(&buf).is_ok() {
                        sent += 1;
                    }
                }
                (sent, began.elapsed())
            },
        )
    }

    /// `count` pings of `addr` from the namespace, 0.2 s apart (ping's own
    /// 5 s wait per reply only catches a hang).
    pub fn ping(&self, addr: &str, count: u32) -> Output {
        output_within(
            &mut self.command(&[
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                // Only catches a hang: a reply held up by a busy host
                // (both cores taken) still counts.
                "-W",
                "20",
                addr,
            ]),
            &Patience::new("ping", Duration::from_secs(1)),
        )
        .expect("ping runs")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// What `Netns::udp_sink` counted: datagrams, their payload bytes, and
/// the time from the first to the last.
#[derive(Debug, Default, Clone, Copy)]
pub struct Received {
    pub datagrams: u64,
    pub bytes: u64,
    pub span: Duration,
}

impl Received {
    /// Datagrams per second, first to last.
    pub fn pps(&self) -> f64 {
        self.datagrams.saturating_sub(1) as f64 / self.span.as_secs_f64().max(1e-9)
    }
}

/// A thread in a namespace (`Netns::thread`) whose set-up succeeded.
pub struct NsThread<T>(std::thread::JoinHandle<Option<T>>);

impl<T> NsThread<T> {
    /// What its `run` returned (its panic, passed on).
    pub fn join(self) -> T {
        match self.0.join() {
            Ok(t) => t.expect("a thread whose set-up succeeded runs on"),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

/// `command` started (its output dropped), returned once its socket file
/// `socket` exists: a backend that binds in about `measured`.
pub fn spawn_serving(
    command: &mut Command,
    socket: &std::path::Path,
    what: &str,
    measured: Duration,
) -> KillOnDrop {
    let child = command
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let child = KillOnDrop(child);
    Patience::new(format!("{what}'s socket"), measured)
        .wait_until(|| Ok(socket.exists()))
        .unwrap_or_else(|e| panic!("{what} listens: {e}"));
    child
}

/// A child process (a backend, a flood) ended with its owner however the
/// owner ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
