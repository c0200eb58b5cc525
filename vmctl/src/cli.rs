//! vmctl's command line: every verb, flag and argument with its help
//! (what `--help`, the completions and the manual pages are made from).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::state::{BackendMode, Placement, RestoreMemory};

#[derive(Parser)]
#[command(
    name = "vmctl",
    version,
    about = "Named VMs on the vmm and blk-backend: create, start, stop, pause, logs, delete; test fleets from one snapshot",
    after_help = "With no arguments, `vmctl run` runs the built-in demo: guests that verify a base's data through their own clones."
)]
pub struct Cli {
    /// Where VMs live (default: /var/lib/vmctl as root, else $XDG_STATE_HOME/vmctl).
    #[arg(long, global = true, value_name = "DIR", env = "VMCTL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Human,
    Json,
}

#[derive(clap::Args, Clone)]
pub struct VmOptions {
    /// The kernel (default: the built-in bench guest).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initramfs for --kernel (a Linux guest's first userspace).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (default: a registry image's). In `run`,
    /// the words n and name in braces become each VM's number and name.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// vCPUs, 1 to 32 (default: a registry image's, else 1).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=vmm::config::MAX_CPUS as i64))]
    pub cpus: Option<u8>,
    /// Guest memory (512M, 1G): 16 MiB to 64 GiB, at most the host's
    /// (default: a registry image's, else 256M).
    #[arg(long)]
    pub memory: Option<String>,
    /// With --image REF: plain HTTP to a registry that is not on this host
    /// (one on this host never needs it).
    #[arg(long)]
    pub insecure: bool,
    /// The disk's queues, 1 to 16.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Grow the VM's clone to this size (the new space reads as zeros).
    #[arg(long)]
    pub disk_size: Option<String>,
    /// Who serves the disk: the host's one blk-backend, or one of the VM's own.
    #[arg(long, value_enum, default_value_t = BackendMode::Host)]
    pub backend: BackendMode,
    /// A NIC on BRIDGE (default vmbr0, made with 10.88.0.1/24 on first
    /// use): a stable MAC, an address from the bridge's subnet, a tap
    /// while it runs.
    #[arg(long, num_args = 0..=1, default_missing_value = "vmbr0", value_name = "BRIDGE")]
    pub net: Option<String>,
    /// With --net: the bridge's subnet masqueraded to the host's other
    /// interfaces (nftables) while the VM runs.
    #[arg(long, requires = "net")]
    pub nat: bool,
    /// A host folder the guest mounts by TAG (virtio-fs, served by a
    /// virtiofsd of the VM's own while it runs): HOSTDIR:TAG; repeatable.
    #[arg(long = "share", value_name = "HOSTDIR:TAG")]
    pub shares: Vec<String>,
    /// Host CPUs for its vCPUs, as taskset -c writes them (0-3,6): vCPU k
    /// runs on the list's k-th CPU, in turn.
    #[arg(long, value_name = "LIST")]
    pub vcpu_affinity: Option<cpu_affinity::CpuList>,
    /// Host CPUs for its disk's queue workers in blk-backend: queue k's on
    /// the list's k-th CPU, in turn (the host backend's export, or the
    /// VM's own backend).
    #[arg(long, value_name = "LIST")]
    pub disk_worker_cpus: Option<cpu_affinity::CpuList>,
    /// The disk's I/O operations a second at most (reads, writes,
    /// discards; blk-backend's token bucket, a second's worth deep).
    #[arg(long, value_name = "N")]
    pub disk_iops: Option<u64>,
    /// The disk's bytes a second at most (50M: reads and writes).
    #[arg(long, value_name = "SIZE")]
    pub disk_bw: Option<String>,
}

impl VmOptions {
    pub fn placement(&self) -> Placement {
        Placement {
            vcpus: self.vcpu_affinity.clone(),
            disk_workers: self.disk_worker_cpus.clone(),
        }
    }

    /// `--disk-iops` and `--disk-bw`, checked.
    pub fn disk_limits(&self) -> anyhow::Result<crate::state::DiskLimits> {
        disk_limits(self.disk_iops, self.disk_bw.as_deref(), None)
    }
}

/// Disk limits from `--disk-iops N` and `--disk-bw SIZE` (a second's
/// budget each), in `group`; bad values refused by name.
pub fn disk_limits(
    iops: Option<u64>,
    bw: Option<&str>,
    group: Option<String>,
) -> anyhow::Result<crate::state::DiskLimits> {
    use anyhow::Context;
    let bw = bw
        .map(|b| cli_support::parse_size(b.trim_end_matches("/s")))
        .transpose()
        .context("--disk-bw")?;
    let limits = rate_limit::Limits {
        ops: iops.map(rate_limit::BucketSpec::per_second),
        bytes: bw.map(rate_limit::BucketSpec::per_second),
    };
    limits.check().context("--disk-iops/--disk-bw")?;
    Ok(crate::state::DiskLimits { limits, group })
}

/// A CPU list, or `any` for none (`vmctl set`).
#[derive(Debug, Clone)]
pub struct CpusOrAny(pub Option<cpu_affinity::CpuList>);

impl std::str::FromStr for CpusOrAny {
    type Err = cpu_affinity::CpuError;

    fn from_str(s: &str) -> Result<CpusOrAny, Self::Err> {
        Ok(CpusOrAny(match s {
            "any" => None,
            list => Some(list.parse()?),
        }))
    }
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Define a VM with its own writable clone of IMAGE (FILE@SNAPSHOT, a
    /// working image, which is snapshotted first, or a registry image,
    /// pulled on first use). Nothing runs yet.
    Create {
        /// The VM's name.
        name: String,
        /// The disk image to clone: FILE@SNAPSHOT, a working image
        /// (snapshotted first, unless unchanged since its last snapshot),
        /// or a registry image REF (registry/repository:tag, pulled into
        /// this state root's store on first use; its kernel and defaults
        /// come with it).
        #[arg(long, required_unless_present = "from_snapshot")]
        image: Option<PathBuf>,
        /// A VM snapshot (`vmctl snapshot`) to continue from: its first
        /// start restores it on a clone of the snapshot's disk (cpus,
        /// memory, kernel and command line are the snapshot's). A
        /// registry reference (pushed with `image push --vm-snapshot`) is
        /// pulled on first use.
        #[arg(long, conflicts_with = "image", value_name = "SNAPSHOT")]
        from_snapshot: Option<String>,
        /// With --from-snapshot: how its memory comes in.
        #[arg(long, value_enum, default_value_t = RestoreMemory::OnDemand)]
        restore_memory: RestoreMemory,
        #[command(flatten)]
        vm: VmOptions,
        /// human: a line; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Save a running VM whole (vCPUs, devices, memory) with its disk at the
    /// same instant, as SNAPSHOT; it goes on running (or stays paused).
    Snapshot {
        /// The VM's name.
        name: String,
        /// The VM snapshot's name.
        snapshot: String,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Every VM snapshot: its VM, size, and the VMs made from it.
    Snapshots {
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Remove a VM snapshot (refused while VMs made from it exist).
    SnapshotDelete {
        /// The VM snapshot's name.
        snapshot: String,
        /// human: a line; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Back up a VM's disk at one instant (live if it runs) into the
    /// directory DEST: in full, or with --incremental only what changed
    /// since DEST's last backup.
    Backup {
        /// The VM's name.
        name: String,
        /// The backup directory (made if missing).
        dest: PathBuf,
        /// Only what changed since DEST's last backup (taken by vmctl backup into DEST).
        #[arg(long)]
        incremental: bool,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// A new VM NAME on the disk DEST's backups restore to (defined as the
    /// backed-up VM was; it boots when started).
    Restore {
        /// The backup directory (what vmctl backup wrote).
        dest: PathBuf,
        /// The VM's name.
        name: String,
        /// human: a line; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Start a defined (or ended) VM.
    Start {
        /// The VMs' names (each done in turn; one that fails does not stop the rest).
        #[arg(required_unless_present = "autostart", value_name = "NAME")]
        names: Vec<String>,
        /// Every VM marked autostart that is not running (what the host's
        /// boot unit, vmctl/systemd/vmctl-autostart.service, runs).
        #[arg(long, conflicts_with = "names")]
        autostart: bool,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Shut a VM down gracefully; forced after --timeout seconds.
    Stop {
        /// The VMs' names (each done in turn; one that fails does not stop the rest).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Seconds the guest has to shut down before it is killed.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// End a VM at once.
    Kill {
        /// The VMs' names (each done in turn; one that fails does not stop the rest).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Stop a running VM's vCPUs where they are (its memory and devices
    /// kept); a paused VM stays paused.
    Pause {
        /// The VMs' names (each done in turn; one that fails does not stop the rest).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Let a paused VM's vCPUs run on; a running VM goes on.
    Resume {
        /// The VMs' names (each done in turn; one that fails does not stop the rest).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Stop (if running) and start again.
    Restart {
        /// The VMs' names (each done in turn; one that fails does not stop the rest).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Seconds the guest has to shut down before it is killed.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Every VM: state, pid, cpus, memory, disk, uptime.
    #[command(alias = "ps")]
    List {
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// One VM in full.
    Info {
        /// The VM's name.
        name: String,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// The VM's serial console (kept in a bounded file).
    Logs {
        /// The VM's name.
        name: String,
        /// Keep printing as the guest writes, until it ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Attach to a running VM's serial console, input included; Ctrl-]
    /// detaches (the VM runs on). One attach at a time.
    Console {
        /// The VM's name.
        name: String,
    },
    /// Wait until the VMs end; print and return their exit status.
    Wait {
        /// The VMs' names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Give up after this many seconds (exit status 124; the VMs run on).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Remove a VM: its clone, sockets, logs, state.
    #[command(alias = "rm")]
    Delete {
        /// The VMs' names (each done in turn; one that fails does not stop the rest).
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Kill it first if it runs.
        #[arg(long)]
        force: bool,
        /// A VM that is not there is no error (as `rm -f` takes a missing
        /// file): scripts and the containerd shim clean up with it.
        #[arg(long)]
        if_exists: bool,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// A test fleet: COUNT VMs cloned from IMAGE, started together, waited
    /// for, one row each and a summary (no arguments: the built-in demo).
    Run {
        /// How many VMs.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// VM names are PREFIX-1 .. PREFIX-COUNT.
        #[arg(long = "name", default_value = "run")]
        prefix: String,
        /// The disk image every VM clones (as create's --image; none: the
        /// built-in demo base).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Every VM continues from this VM snapshot (on a clone of its
        /// disk) instead of booting; a registry reference is pulled on
        /// first use.
        #[arg(long, conflicts_with = "image", value_name = "SNAPSHOT")]
        from_snapshot: Option<String>,
        /// With --from-snapshot: how each VM's memory comes in (on demand:
        /// each takes host memory for the pages it touches).
        #[arg(long, value_enum, default_value_t = RestoreMemory::OnDemand)]
        restore_memory: RestoreMemory,
        #[command(flatten)]
        vm: VmOptions,
        /// Delete the VMs when they are done (also when the run is
        /// interrupted or times out).
        #[arg(long)]
        rm: bool,
        /// End the fleet after this many seconds: its VMs killed (exit
        /// status 124). Ctrl-C, SIGTERM and SIGHUP end it the same way.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// The whole fleet's disks held to N I/O operations a second
        /// between them (one budget they share: a rate-limit group on the
        /// host backend, removed when the run ends).
        #[arg(long, value_name = "N")]
        disk_iops_group: Option<u64>,
        /// human: a table or lines to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Change a defined VM's definition (from its next start; it must not
    /// be running, except to change --autostart).
    Set {
        /// The VM's name.
        name: String,
        /// vCPUs, 1 to 32.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=vmm::config::MAX_CPUS as i64))]
        cpus: Option<u8>,
        /// Guest memory (512M, 1G): 16 MiB to 64 GiB, at most the host's.
        #[arg(long)]
        memory: Option<String>,
        /// The disk's queues, 1 to 16.
        #[arg(long)]
        queues: Option<u16>,
        /// The kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// The kernel.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// An initramfs for the kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The VM's shared folders from now on (HOSTDIR:TAG; repeatable).
        #[arg(
            long = "share",
            value_name = "HOSTDIR:TAG",
            conflicts_with = "no_shares"
        )]
        shares: Vec<String>,
        /// No shared folders from now on.
        #[arg(long)]
        no_shares: bool,
        /// Grow the VM's disk to this size (the new space reads as zeros).
        #[arg(long)]
        disk_size: Option<String>,
        /// A NIC on BRIDGE from now on (default vmbr0), with a new address.
        #[arg(long, num_args = 0..=1, default_missing_value = "vmbr0", value_name = "BRIDGE", conflicts_with = "no_net")]
        net: Option<String>,
        /// With --net: the bridge's subnet masqueraded while the VM runs.
        #[arg(long, requires = "net")]
        nat: bool,
        /// No NIC from now on.
        #[arg(long)]
        no_net: bool,
        /// Host CPUs for its vCPUs (0-3,6), or any.
        #[arg(long, value_name = "LIST|any")]
        vcpu_affinity: Option<CpusOrAny>,
        /// Host CPUs for its disk's queue workers (0-3,6), or any.
        #[arg(long, value_name = "LIST|any")]
        disk_worker_cpus: Option<CpusOrAny>,
        /// The disk's I/O operations a second at most, or none; changed
        /// live on a running VM.
        #[arg(long, value_name = "N|none")]
        disk_iops: Option<String>,
        /// The disk's bytes a second at most (50M), or none; changed live.
        #[arg(long, value_name = "SIZE|none")]
        disk_bw: Option<String>,
        /// Whether `vmctl start --autostart` (the host's boot) starts it.
        #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
        autostart: Option<bool>,
        /// human: a line; json: the VM as info shows it.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Mark VMs to be started at the host's boot (`vmctl start
    /// --autostart`, run by vmctl/systemd/vmctl-autostart.service), or
    /// unmark them with --off.
    Autostart {
        /// The VMs' names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Unmark them.
        #[arg(long)]
        off: bool,
        /// human: a line each; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// A completion script for SHELL on stdout (bash: save it as
    /// /usr/share/bash-completion/completions/vmctl).
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Manual pages for vmctl and each of its verbs, written into DIR
    /// (vmctl.1, vmctl-create.1, ...: `man -l DIR/vmctl.1`).
    Man {
        /// Where the pages go (made if missing).
        dir: PathBuf,
    },
    /// The bridges VMs of this state root use: list them, remove one.
    Network {
        #[command(subcommand)]
        action: NetworkCmd,
    },
    /// VM images in OCI registries: push a snapshot, pull, list, remove,
    /// prune the store.
    Image {
        #[command(subcommand)]
        action: ImageCmd,
    },
    #[command(name = "__supervise", hide = true)]
    Supervise {
        /// The VM's name.
        name: String,
    },
    /// The host backend's daemon (started by the first VM that needs it).
    #[command(name = "__backend", hide = true)]
    Backend,
}

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Every bridge this state root's VMs are on or that vmctl made for
    /// it: its subnet, its VMs.
    #[command(alias = "list")]
    Ls {
        /// human: a table to read; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Remove a bridge vmctl made for this state root (with its DHCP
    /// server and NAT rule); refused while a VM is defined on it.
    Rm {
        /// The bridge's name.
        bridge: String,
    },
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Push a sealed snapshot (FILE@SNAPSHOT) as an ordinary OCI image:
    /// a layer per sealed layer of its chain (those the registry has are
    /// not uploaded again), the kernel in a layer of its own, the VM's
    /// defaults in its config's labels; with --vm-snapshot a VM snapshot,
    /// its memory and state in a layer of their own.
    Push {
        /// What: a disk's snapshot, FILE@SNAPSHOT; with --vm-snapshot, a
        /// VM snapshot's name (vmctl snapshot).
        snapshot: PathBuf,
        /// Where: registry/repository:tag.
        reference: String,
        /// A kernel to ship with it (default: VMs use the bench guest).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// An initramfs for --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// The VMs' default command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// The VMs' default vCPUs.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=vmm::config::MAX_CPUS as i64))]
        cpus: Option<u8>,
        /// The VMs' default memory (512M).
        #[arg(long)]
        memory: Option<String>,
        /// Push the VM snapshot named SNAPSHOT: its disk, its memory and
        /// vCPU and device state (a layer of their own), its VM's kernel
        /// and definition; VMs made with `--from-snapshot REF` continue
        /// from it.
        #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "cpus", "memory"])]
        vm_snapshot: bool,
        /// Plain HTTP to a registry that is not on this host.
        #[arg(long)]
        insecure: bool,
        /// human: a line per blob; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Fetch an image into this state root's store: only the layers it
    /// lacks, each checked (digest, then every record) before use.
    Pull {
        /// registry/repository:tag
        reference: String,
        /// Plain HTTP to a registry that is not on this host.
        #[arg(long)]
        insecure: bool,
        /// human: a line per blob; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Bring in an image another program unpacked, one directory per
    /// layer, bottom first (what containerd's snapshotter made of a VM
    /// image; the containerd shim calls this): each disk layer the store
    /// lacks is restored from the directory's backup, checked; prints the
    /// files a VM runs from (create --image TOP --kernel KERNEL).
    Import {
        /// The layers' directories, bottom first.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// human: a line; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// The images pulled into this state root, and the VMs on each.
    #[command(alias = "list")]
    Ls {
        /// human: a table; json: one document for scripts.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Forget a pulled image (its layers stay while VMs stand on them;
    /// `prune` deletes what nothing uses).
    Rm {
        /// registry/repository:tag, as pulled.
        reference: String,
    },
    /// Delete the store's layers and kernels no image and no VM uses.
    Prune,
}

pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{s:?}: on or off")),
    }
}
