//! `net-backend --socket PATH --tap NAME [--queue-pairs N]`: serves one
//! vhost-user-net frontend at a time on PATH, its frames on tap NAME (one
//! tap queue per queue pair). When a frontend goes, the next one is
//! served (a vmm reconnects after this process is restarted, too).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use vhost_net_backend::{device::NetDevice, tap};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

#[derive(Parser)]
#[command(
    name = "net-backend",
    version,
    about = "vhost-user-net backend over a multi-queue tap"
)]
struct Args {
    /// The vhost-user socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// The tap (made if it does not exist; removed with this process then).
    #[arg(long)]
    tap: String,
    /// Receive/transmit queue pairs (one tap queue and one worker each).
    #[arg(long, default_value_t = 1)]
    queue_pairs: usize,
    #[arg(long, default_value_t = 256)]
    queue_size: usize,
}

fn run(a: Args) -> Result<()> {
    if !(1..=8).contains(&a.queue_pairs) {
        anyhow::bail!("--queue-pairs {}: 1 to 8", a.queue_pairs);
    }
    let taps = tap::open(&a.tap, a.queue_pairs)?;
    let device = Arc::new(NetDevice::new(taps, a.queue_size));
    tracing::info!(tap = a.tap, pairs = a.queue_pairs, socket = %a.socket.display(), "serving");
    // A frontend that breaks the protocol over and over is told about in
    // a few lines, not one per session.
    let mut ended = cli_support::log_limit::LogLimit::default();
    loop {
        let mut daemon = VhostUserDaemon::new(
            "net-backend".into(),
            Arc::clone(&device),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("starting the vhost-user daemon")?;
        device
            .watch_taps(&daemon.get_epoll_handlers())
            .context("watching the tap")?;
        match daemon.serve(&a.socket) {
            Ok(()) => tracing::info!("the frontend went away; waiting for the next"),
            Err(e) => ended.emit(
                || tracing::warn!("the session ended: {e}; waiting for the next frontend"),
                |n| tracing::warn!("{n} more sessions ended in errors (not logged one by one)"),
            ),
        }
    }
}

fn main() {
    cli_support::init_logging("warn");
    if let Err(e) = run(Args::parse()) {
        cli_support::say!("net-backend: error: {}", cli_support::report(&e));
        std::process::exit(1);
    }
}
