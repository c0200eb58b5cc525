//! `vmm`: runs one VM. Its disks are vhost-user-blk backends' sockets.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use vmm::config::{self, VmConfig};
use vmm::vm::{self, VmEvent};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "KVM virtual machine monitor with vhost-user-blk disks",
    after_help = "Exit status: the value a test guest writes to the debug-exit port (0xf4), \
                  0 when the guest powers off, 1 on a fault (the vCPU registers are printed) \
                  or an error."
)]
struct Args {
    /// The kernel: a PVH ELF (the bench guest, a Linux vmlinux).
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = "")]
    cmdline: String,
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory: a size such as 512M or 2G.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// A vhost-user-blk disk: socket=PATH[,num_queues=N,queue_size=N,readonly=on]; repeatable.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// stdio, none or file=PATH.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// The whole VM as a JSON file (the same fields as the options).
    #[arg(long, conflicts_with_all = ["kernel", "disks"])]
    config: Option<PathBuf>,
}

fn config_of(a: Args) -> Result<VmConfig> {
    if let Some(p) = a.config {
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()))?;
        return serde_json::from_str(&text).with_context(|| format!("{}", p.display()));
    }
    Ok(VmConfig {
        kernel: a.kernel.context("--kernel is required")?,
        initrd: a.initrd,
        cmdline: a.cmdline,
        cpus: a.cpus,
        memory: config::parse_size(&a.memory)?,
        disks: a
            .disks
            .iter()
            .map(|d| config::parse_disk(d))
            .collect::<Result<_, _>>()?,
        api_socket: a.api_socket,
        serial: config::parse_serial(&a.serial)?,
    })
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let code = match config_of(Args::parse()).and_then(|c| vm::run(&c)) {
        Ok(VmEvent::GuestExit(code)) => code as i32,
        Ok(VmEvent::PowerOff) => 0,
        Ok(VmEvent::Reboot) => {
            eprintln!("vmm: the guest asked for a reboot; stopping");
            0
        }
        Ok(VmEvent::Fault(what)) => {
            eprintln!("vmm: guest fault: {what}");
            1
        }
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            1
        }
    };
    std::process::exit(code)
}
