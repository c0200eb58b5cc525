//! `net-backend --socket PATH --tap NAME [--queue-pairs N]`: serves one
//! vhost-user-net frontend at a time on PATH, its frames on tap NAME (one
//! tap queue per queue pair). When a frontend goes, the next one is
//! served (a vmm reconnects after this process is restarted, too).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use vhost::vhost_user::Listener;
use vhost_net_backend::{connection, device::NetDevice, tap};
use vhost_user_session::server::StopHandle;

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
    /// The largest queue a frontend may set up (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: usize,
}

fn run(a: Args) -> Result<()> {
    if !(1..=8).contains(&a.queue_pairs) {
        anyhow::bail!("--queue-pairs {}: 1 to 8", a.queue_pairs);
    }
    if !(2..=32768).contains(&a.queue_size) || !a.queue_size.is_power_of_two() {
        anyhow::bail!(
            "--queue-size {}: a power of two from 2 to 32768",
            a.queue_size
        );
    }
    let taps = tap::open(&a.tap, a.queue_pairs)?;
    let device = Arc::new(NetDevice::new(taps, a.queue_size));
    vhost_user_session::fence::install().context("guest memory fence")?;
    let listener = Listener::new(&a.socket, true)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("listening on {}", a.socket.display()))?;
    tracing::info!(tap = a.tap, pairs = a.queue_pairs, socket = %a.socket.display(), "serving");
    let name = a.socket.display().to_string();
    vhost_user_session::server::serve(
        &name,
        listener,
        &StopHandle::default(),
        |session| connection::connect(&device, session),
        || {},
    );
    Ok(())
}

fn main() {
    cli_support::init_logging("warn");
    if let Err(e) = run(Args::parse()) {
        cli_support::say!("net-backend: error: {}", cli_support::report(&e));
        std::process::exit(1);
    }
}
