//! `blk-backend`: serves snapshot-chain images as vhost-user-blk devices,
//! one socket per export; several exports can share one process (a fleet
//! on one host shares the base layers' page cache).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use image_format::Disk;
use vhost::vhost_user::Listener;
use vhost_blk_backend::backend::BlkBackend;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Parser)]
#[command(
    name = "blk-backend",
    version,
    about = "vhost-user-blk server for snapshot-chain images",
    after_help = "Either --socket and --image for one export, or --export once per export:\n  \
                  --export socket=PATH,image=PATH[,readonly=on][,num_queues=N][,queue_size=N]"
)]
struct Args {
    /// The vhost-user socket to listen on.
    #[arg(long, requires = "image")]
    socket: Option<PathBuf>,
    /// The image (top layer of a chain).
    #[arg(long, requires = "socket")]
    image: Option<PathBuf>,
    /// Serve read-only (writes fail with IOERR).
    #[arg(long)]
    readonly: bool,
    #[arg(long, default_value_t = 1)]
    num_queues: usize,
    #[arg(long, default_value_t = 256)]
    queue_size: usize,
    /// An export: socket=PATH,image=PATH[,readonly=on][,num_queues=N][,queue_size=N]
    #[arg(long = "export", value_name = "SPEC")]
    exports: Vec<String>,
}

#[derive(Debug, Clone)]
struct Export {
    socket: PathBuf,
    image: PathBuf,
    readonly: bool,
    num_queues: usize,
    queue_size: usize,
}

impl Export {
    fn check(self) -> Result<Self> {
        if !(1..=64).contains(&self.num_queues) {
            bail!("num_queues must be 1 to 64, not {}", self.num_queues);
        }
        if !self.queue_size.is_power_of_two() || !(2..=32768).contains(&self.queue_size) {
            bail!(
                "queue_size must be a power of two from 2 to 32768, not {}",
                self.queue_size
            );
        }
        Ok(self)
    }

    fn parse(spec: &str, defaults: &Args) -> Result<Export> {
        let (mut socket, mut image) = (None, None);
        let mut e = Export {
            socket: PathBuf::new(),
            image: PathBuf::new(),
            readonly: defaults.readonly,
            num_queues: defaults.num_queues,
            queue_size: defaults.queue_size,
        };
        for kv in spec.split(',') {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--export {spec:?}: {kv:?} is not key=value"))?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "image" => image = Some(PathBuf::from(v)),
                "readonly" => {
                    e.readonly = match v {
                        "on" | "true" | "1" => true,
                        "off" | "false" | "0" => false,
                        _ => bail!("--export {spec:?}: readonly takes on or off"),
                    }
                }
                "num_queues" => e.num_queues = v.parse().context("num_queues")?,
                "queue_size" => e.queue_size = v.parse().context("queue_size")?,
                _ => bail!("--export {spec:?}: unknown key {k:?}"),
            }
        }
        e.socket = socket.with_context(|| format!("--export {spec:?}: socket= is missing"))?;
        e.image = image.with_context(|| format!("--export {spec:?}: image= is missing"))?;
        e.check()
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("blk-backend: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let mut exports = Vec::new();
    if let (Some(socket), Some(image)) = (&a.socket, &a.image) {
        exports.push(
            Export {
                socket: socket.clone(),
                image: image.clone(),
                readonly: a.readonly,
                num_queues: a.num_queues,
                queue_size: a.queue_size,
            }
            .check()?,
        );
    }
    for spec in &a.exports {
        exports.push(Export::parse(spec, &a)?);
    }
    if exports.is_empty() {
        bail!("nothing to serve: give --socket and --image, or --export");
    }
    // SIGTERM/SIGINT go to one thread that closes every image cleanly.
    let signals = block_exit_signals()?;
    // Every image opens (and every socket listens) before anything is
    // served: a bad export is a clear error at start, not a half-up process.
    let mut serving = Vec::new();
    for e in exports {
        let disk = Disk::open_path(&e.image, !e.readonly)?;
        let backend = Arc::new(BlkBackend::new(
            disk,
            e.readonly,
            e.num_queues,
            e.queue_size,
        ));
        // One listening socket for the export's life: a frontend that
        // reconnects while the previous session is torn down waits in the
        // backlog instead of finding no socket.
        let listener = Listener::new(&e.socket, true)
            .with_context(|| format!("listening on {}", e.socket.display()))?;
        tracing::info!(socket = %e.socket.display(), image = %e.image.display(), "serving");
        serving.push((e, backend, listener));
    }
    let backends: Vec<Arc<BlkBackend>> = serving.iter().map(|s| Arc::clone(&s.1)).collect();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = wait_signal(&signals);
            tracing::info!(signal = sig, "shutting down");
            let mut held = Vec::new();
            let mut failed = false;
            for b in &backends {
                match b.shutdown() {
                    Ok(guard) => held.push(guard),
                    Err(e) => {
                        eprintln!("blk-backend: error: closing an image: {e}");
                        failed = true;
                    }
                }
            }
            std::process::exit(i32::from(failed))
        })
        .context("starting the signal thread")?;
    let threads: Vec<_> = serving
        .into_iter()
        .map(|(e, backend, listener)| {
            std::thread::Builder::new()
                .name(format!("export {}", e.socket.display()))
                .spawn(move || serve_export(e, backend, listener))
        })
        .collect::<std::io::Result<_>>()
        .context("starting export threads")?;
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            tracing::error!("an export stopped: {e:#}");
        }
    }
    Ok(())
}

/// Serves one export's connections, one after another, forever. A broken
/// session ends that session only.
fn serve_export(e: Export, backend: Arc<BlkBackend>, mut listener: Listener) -> Result<()> {
    loop {
        let mut daemon = VhostUserDaemon::new(
            "blk-backend".into(),
            Arc::clone(&backend),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|err| anyhow::anyhow!("{err:?}"))?;
        let r = daemon.start(&mut listener).and_then(|_| {
            // Each queue's worker also waits on its ring's completions.
            for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Err(err) = handler.register_listener(
                    backend.ring_eventfd(q),
                    vmm_sys_util::epoll::EventSet::IN,
                    (e.num_queues + 1 + q) as u64,
                ) {
                    tracing::error!("queue {q}: cannot watch its io_uring: {err}");
                }
            }
            daemon.wait()
        });
        // The frontend's memory goes away with it: let in-flight I/O land.
        backend.quiesce();
        if let Err(err) = backend.flush() {
            tracing::error!(socket = %e.socket.display(), "flush after the session: {err}");
        }
        match r {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => {
                tracing::info!(socket = %e.socket.display(), "frontend disconnected")
            }
            Err(err) => {
                tracing::warn!(socket = %e.socket.display(), "session ended: {err:?}")
            }
        }
    }
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts).
fn block_exit_signals() -> Result<libc::sigset_t> {
    // SAFETY: plain signal-mask calls on a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("pthread_sigmask failed");
        }
        Ok(set)
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait on signals this process blocked.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}
