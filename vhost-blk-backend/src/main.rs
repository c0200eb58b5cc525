//! `blk-backend`: serves snapshot-chain images as vhost-user-blk devices,
//! one socket per export; several exports can share one process (a fleet
//! on one host shares the base layers' descriptors and page cache).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use blk_control::{ExportArgs, Settings};
use clap::Parser;
use vhost_blk_backend::control::{self, Exports};
use vhost_blk_backend::export::BaseIo;
use vhost_blk_backend::seccomp;

#[derive(Parser)]
#[command(
    name = "blk-backend",
    version,
    about = "vhost-user-blk server for snapshot-chain images",
    after_help = "Either --socket and --image for one export, or --export once per export:\n  \
                  --export socket=PATH,image=PATH[,readonly=on][,num_queues=N][,queue_size=N][,poll_us=N][,fixed_buffers=on][,submit_batch=N][,worker_cpus=LIST]\n    \
                  [,iops=N][,iops_burst=N][,bw=BYTES][,bw_burst=BYTES][,limit_group=NAME]\n\n\
                  Rate limits (iops and bw per second, Firecracker's token buckets) and the\n\
                  groups whose one budget several exports share are changed live through the\n\
                  control socket (export-set-limits, group-set, group-del, group-list).\n\n\
                  A frontend that reconnects after this process was killed and restarted\n\
                  resumes where it was: requests in flight run again (the vhost-user inflight\n\
                  region) and completed writes are found in the crash shadow (--shadow-dir)."
)]
struct Args {
    /// The vhost-user socket to listen on (with --image).
    #[arg(long, requires = "image")]
    socket: Option<PathBuf>,
    /// The image (top of a snapshot chain) to serve (with --socket).
    #[arg(long, requires = "socket")]
    image: Option<PathBuf>,
    /// Serve read-only (the guest sees VIRTIO_BLK_F_RO).
    #[arg(long)]
    readonly: bool,
    #[arg(long, default_value_t = Settings::default().num_queues)]
    num_queues: usize,
    #[arg(long, default_value_t = Settings::default().queue_size)]
    queue_size: usize,
    /// One export: socket=PATH,image=PATH[,readonly=on,num_queues=N,queue_size=N].
    #[arg(long = "export", value_name = "SPEC")]
    exports: Vec<String>,
    /// How read-only base layers are read: through the page cache (shared
    /// by every clone of a base on this host) or with O_DIRECT.
    #[arg(long, value_enum, default_value_t = BaseIo::Page)]
    base_io: BaseIo,
    /// Microseconds a queue worker keeps polling its queue and io_uring
    /// after the last request before it sleeps; guest kicks stay off while
    /// it polls. 0 turns polling off (lowest CPU use when idle).
    #[arg(long, default_value_t = Settings::default().poll_us)]
    poll_us: u64,
    /// Register guest memory with each queue's io_uring as fixed buffers:
    /// O_DIRECT requests skip pinning their pages, at the price of every
    /// page of guest memory allocated and pinned while the queue runs.
    #[arg(long)]
    fixed_buffers: bool,
    /// Reads and writes a queue worker hands the kernel per io_uring_enter
    /// at most (a request in several pieces makes several): it submits as
    /// soon as this many are queued, so the disk starts on the first of a
    /// batch while the rest are parsed. 0 submits a whole batch in one
    /// call (fewest system calls). On a virtual disk a large batch is one
    /// notification of its host, answered late as one.
    #[arg(long, default_value_t = Settings::default().submit_batch)]
    submit_batch: u32,
    /// Host CPUs for the queue workers, as taskset -c writes them
    /// (0-3,6): queue k's worker runs on the list's k-th CPU, in turn (the
    /// vmm's --vcpu-affinity places vCPUs the same way). Default: wherever
    /// the kernel runs them.
    #[arg(long, value_name = "LIST")]
    worker_cpus: Option<cpu_affinity::CpuList>,
    /// Where the crash shadows of writable images live: a tmpfs, so they
    /// survive this process but not a reboot, that only the serving user
    /// can reach (made with mode 0700 if missing; one others may write,
    /// such as /dev/shm, is refused). Default: /run/blk-backend/UID as
    /// root (UID the serving user's, --user's if given),
    /// $XDG_RUNTIME_DIR/blk-backend otherwise. "none" turns them off.
    #[arg(long)]
    shadow_dir: Option<PathBuf>,
    /// Run without seccomp filters (each thread is otherwise confined to
    /// the system calls it needs, and any other call ends the process with
    /// a report naming it).
    #[arg(long)]
    no_seccomp: bool,
    /// Become this user once every socket listens and every image is
    /// open (its uid and group, no supplementary groups): a backend that
    /// a guest subverted holds no root.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// A control socket (JSON lines, like QMP): export-add, export-del,
    /// export-list at runtime. With it, no --export is needed at start.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

impl Args {
    /// The settings of every export that does not give its own.
    fn settings(&self) -> Settings {
        Settings {
            readonly: self.readonly,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            poll_us: self.poll_us,
            fixed_buffers: self.fixed_buffers,
            submit_batch: self.submit_batch,
            worker_cpus: self.worker_cpus.clone(),
        }
    }
}

/// The crash shadows' directory, made and checked (FORMAT.md, "The crash
/// shadow"): with --user, that user's, since it writes the shadows of the
/// exports added once it runs.
fn shadow_dir(a: &Args) -> Result<Option<PathBuf>> {
    use image_format::shadow;
    let user = a.user.as_deref().map(sandbox::lookup_user).transpose()?;
    let serving_uid = user.map_or(rustix::process::geteuid().as_raw(), |(uid, _)| uid);
    let dir = match &a.shadow_dir {
        Some(d) if d.as_os_str() == "none" => return Ok(None),
        Some(d) => d.clone(),
        None => shadow::default_dir(serving_uid).context(
            "no directory for crash shadows: XDG_RUNTIME_DIR is not set (give --shadow-dir DIR, or \"none\")",
        )?,
    };
    let prepared = (|| {
        shadow::prepare_dir(&dir)?;
        if let Some((uid, gid)) = user {
            rustix::fs::chown(
                &dir,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            )?;
        }
        std::io::Result::Ok(())
    })();
    prepared.with_context(|| format!("--shadow-dir {}", dir.display()))?;
    Ok(Some(dir))
}

fn main() {
    cli_support::init_logging("info");
    if let Err(e) = run(Args::parse()) {
        cli_support::say!("blk-backend: error: {}", cli_support::report(&e));
        std::process::exit(1);
    }
}

fn run(a: Args) -> Result<()> {
    let settings = a.settings();
    // Every export takes these unless it gives its own: wrong ones fail
    // here, not at the first export-add.
    settings.check()?;
    let mut specs = Vec::new();
    if let (Some(socket), Some(image)) = (&a.socket, &a.image) {
        specs.push(ExportArgs::new(socket, image).resolve(&settings)?);
    }
    for list in &a.exports {
        let export = list
            .parse::<ExportArgs>()
            .and_then(|e| e.resolve(&settings));
        specs.push(export.with_context(|| format!("--export {list:?}"))?);
    }
    if specs.is_empty() && a.control.is_none() {
        bail!("nothing to serve: give --socket and --image, --export, or --control");
    }
    let shadow_dir = shadow_dir(&a)?;
    // SIGTERM/SIGINT go to one thread that ends every session and closes
    // every image cleanly.
    let signals =
        cli_support::exit_signals::ExitSignals::block().context("blocking SIGTERM and SIGINT")?;
    // Every image opens (and every socket listens) before anything is
    // served: a bad export is a clear error at start, not a half-up process.
    // Sockets first: a bad --socket must not leave an image opened (and
    // marked dirty) behind it.
    for spec in &specs {
        control::clear_stale_socket(&spec.socket)?;
    }
    let exports = Arc::new(Exports::new(a.base_io, shadow_dir));
    let control_listener = match &a.control {
        Some(p) => {
            control::clear_stale_socket(p)?;
            Some(
                std::os::unix::net::UnixListener::bind(p)
                    .with_context(|| format!("--control {}", p.display()))?,
            )
        }
        None => None,
    };
    // The SIGBUS fence is in place before any session maps guest memory
    // (and before seccomp, which does not let threads change handlers).
    vhost_user_session::fence::install().context("guest memory fence")?;
    let mut prepared = Vec::new();
    for spec in specs {
        let image = spec.image.clone();
        match exports.prepare(spec) {
            Ok(p) => prepared.push(p),
            Err(e) => {
                // Nothing half up: what opened closes again.
                prepared.into_iter().for_each(control::Prepared::abandon);
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("serving {}", image.display()));
            }
        }
    }
    // Sockets and images of --export are open: root is not needed any
    // more (exports added later through --control open as this user).
    // Before any thread starts: a thread under seccomp could not follow
    // the process's change of user.
    if let Some(user) = &a.user {
        let (uid, gid) = sandbox::drop_privileges(user)?;
        tracing::info!(user, uid, gid, "running as an unprivileged user");
    }
    vhost_blk_backend::postcopy::probe_paging();
    if !a.no_seccomp {
        sandbox::enable("blk-backend").context("seccomp")?;
    }
    for p in prepared {
        exports.serve(p).context("starting an export's thread")?;
    }
    if let Some(listener) = control_listener {
        let exports = Arc::clone(&exports);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if let Err(e) = sandbox::confine(&seccomp::CONTROL) {
                    tracing::error!("the control socket is off: {e}");
                    return;
                }
                control::serve_control(exports, settings, listener)
            })
            .context("starting the control thread")?;
    }
    // Every session runs: from here on this thread waits, stops, closes.
    sandbox::confine(&seccomp::MAIN).context("seccomp")?;
    let sig = signals.wait();
    tracing::info!(signal = sig, "shutting down");
    let clean = exports.shutdown_all();
    if let Some(p) = &a.control {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(i32::from(!clean))
}
