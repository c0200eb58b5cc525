//! `blk-backend`: serves a snapshot-chain image as a vhost-user-blk device.

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
    about = "vhost-user-blk server for snapshot-chain images"
)]
struct Args {
    /// The vhost-user socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// The image (top layer of a chain).
    #[arg(long)]
    image: PathBuf,
    /// Serve read-only (writes fail with IOERR).
    #[arg(long)]
    readonly: bool,
    #[arg(long, default_value_t = 1)]
    num_queues: usize,
    #[arg(long, default_value_t = 256)]
    queue_size: usize,
    /// Serve one connection and exit (default: serve again after a disconnect).
    #[arg(long)]
    once: bool,
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
    if !(1..=64).contains(&a.num_queues) {
        bail!("--num-queues must be 1 to 64, not {}", a.num_queues);
    }
    if !a.queue_size.is_power_of_two() || !(2..=32768).contains(&a.queue_size) {
        bail!(
            "--queue-size must be a power of two from 2 to 32768, not {}",
            a.queue_size
        );
    }
    // SIGTERM/SIGINT go to one thread that closes the image cleanly.
    let signals = block_exit_signals()?;
    let disk = Disk::open_path(&a.image, !a.readonly)?;
    let backend = Arc::new(BlkBackend::new(
        disk,
        a.readonly,
        a.num_queues,
        a.queue_size,
    ));
    // One listening socket for the process's life: a frontend that
    // reconnects while the previous session is torn down waits in the
    // backlog instead of finding no socket.
    {
        let backend = Arc::clone(&backend);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = wait_signal(&signals);
                tracing::info!(signal = sig, "shutting down");
                match backend.shutdown() {
                    Ok(_held) => std::process::exit(0),
                    Err(e) => {
                        eprintln!("blk-backend: error: closing the image: {e}");
                        std::process::exit(1)
                    }
                }
            })
            .context("starting the signal thread")?;
    }
    let mut listener = Listener::new(&a.socket, true)
        .with_context(|| format!("listening on {}", a.socket.display()))?;
    tracing::info!(socket = %a.socket.display(), image = %a.image.display(), "serving");
    loop {
        let mut daemon = VhostUserDaemon::new(
            "blk-backend".into(),
            Arc::clone(&backend),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let r = daemon.start(&mut listener).and_then(|_| {
            // Each queue's worker also waits on its ring's completions.
            for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
                if let Err(e) = handler.register_listener(
                    backend.ring_eventfd(q),
                    vmm_sys_util::epoll::EventSet::IN,
                    (a.num_queues + 1 + q) as u64,
                ) {
                    tracing::error!("queue {q}: cannot watch its io_uring: {e}");
                }
            }
            daemon.wait()
        });
        // The frontend's memory goes away with it: let in-flight I/O land.
        backend.quiesce();
        backend
            .flush()
            .context("flushing after the connection ended")?;
        match r {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => {
                tracing::info!("frontend disconnected")
            }
            Err(e) => tracing::warn!("connection ended: {e:?}"),
        }
        if a.once {
            break;
        }
    }
    drop(backend);
    Ok(())
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
