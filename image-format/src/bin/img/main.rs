//! `img`: create, inspect, snapshot, clone, commit, rebase, check, repair,
//! convert, back up and restore snapshot-chain images. Verbs that qemu-img
//! also has take qemu-img's arguments.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use image_format::check::{check, RepairMode};
use image_format::convert::{convert, open_reader, Format};
use image_format::header::DEFAULT_BLOCK_SIZE;
use image_format::{backup, info, ops, Env, RealEnv};

mod fs;

#[derive(Parser)]
#[command(
    name = "img",
    version,
    about = "Sparse copy-on-write snapshot images: create, inspect, snapshot, clone, commit, check, convert, back up"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options qemu-img takes on most verbs.
#[derive(clap::Args, Clone, Default)]
struct Common {
    /// The image's format: only snap here (accepted as qemu-img takes it).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Print nothing but errors (the exit status still tells).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Read an image another process is writing (reading verbs never lock;
    /// accepted as qemu-img takes it).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
}

/// Set by -q: human output is not printed.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// println! for human output, silenced by -q.
macro_rules! say {
    ($($arg:tt)*) => {
        if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            println!($($arg)*);
        }
    };
}

/// Filesystems `img create --fs` makes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FsType {
    Ext4,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Repair {
    Leaks,
    All,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an image, or an overlay on BASE (which gets sealed).
    Create {
        /// Image format; only "snap" is created here (use convert for others).
        #[arg(short = 'f', long = "format", default_value = "snap")]
        format: String,
        /// Base image: the new image is a writable overlay on it.
        #[arg(short = 'b', long = "backing")]
        base: Option<PathBuf>,
        /// Base format (must be snap; accepted for qemu-img compatibility).
        #[arg(short = 'F', long = "backing-format")]
        base_format: Option<String>,
        /// Options: cluster_size=N (the block size, 512..64k, default 4k).
        #[arg(short = 'o', long = "options")]
        options: Option<String>,
        /// Print nothing but errors.
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Put a filesystem in it (mkfs.ext4 straight into the new layer's
        /// data area: only what the filesystem writes takes space).
        #[arg(long, value_enum, conflicts_with = "base")]
        fs: Option<FsType>,
        /// With --fs: fill it with this host directory's tree (mkfs.ext4 -d).
        #[arg(long, requires = "fs", value_name = "DIR")]
        from: Option<PathBuf>,
        /// With --fs: the filesystem's label.
        #[arg(long, requires = "fs")]
        label: Option<String>,
        file: PathBuf,
        /// Virtual size: bytes or with a k/M/G/T suffix (defaults to the base's).
        size: Option<String>,
    },
    /// Compare two disks' contents (raw, qcow2 or snap), as qemu-img
    /// compare: exit 0 identical, 1 different, 2 on an error. Past the
    /// smaller one's end the larger must read as zeros, unless -s.
    Compare {
        /// A's format (probed if not given).
        #[arg(short = 'f', value_name = "FMT")]
        format_a: Option<String>,
        /// B's format (probed if not given).
        #[arg(short = 'F', value_name = "FMT")]
        format_b: Option<String>,
        /// Strict: images of different sizes differ.
        #[arg(short = 's', long)]
        strict: bool,
        #[arg(short = 'p', long)]
        progress: bool,
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Read images other processes are writing.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        a: PathBuf,
        b: PathBuf,
    },
    /// How much a snap image of FILE's contents would take (or an empty
    /// one of --size), as qemu-img measure.
    Measure {
        /// An empty image of this size instead of FILE.
        #[arg(long, conflicts_with = "file")]
        size: Option<String>,
        /// FILE's format (probed if not given).
        #[arg(short = 'f', value_name = "FMT")]
        format: Option<String>,
        /// The target format: snap only.
        #[arg(short = 'O', value_name = "FMT", default_value = "snap")]
        out_format: String,
        /// Options: cluster_size=N.
        #[arg(short = 'o', long = "options")]
        options: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(required_unless_present = "size")]
        file: Option<PathBuf>,
    },
    /// Serve IMAGE on the host as one raw file, FILE (made if missing),
    /// through FUSE until interrupted or FILE is unmounted: reads through
    /// the chain, writes to its top, fsync a flush.
    Export {
        image: PathBuf,
        file: PathBuf,
        /// Refuse writes (the image is opened shared, not exclusively).
        #[arg(long)]
        readonly: bool,
        /// (img mount's own: the file on a loop device, mounted on DIR.)
        #[arg(long, hide = true, value_name = "DIR")]
        mount_dir: Option<PathBuf>,
    },
    /// Mount the filesystem inside IMAGE on DIR (an export on a loop
    /// device, run in the background until `img umount DIR`).
    Mount {
        image: PathBuf,
        dir: PathBuf,
        #[arg(long)]
        readonly: bool,
    },
    /// Unmount what `img mount` mounted on DIR: the filesystem's data
    /// flushed into the image, the export ended.
    Umount { dir: PathBuf },
    /// Check the filesystem inside IMAGE (after the container): e2fsck,
    /// read-only unless -r; e2fsck's exit status.
    Fsck {
        image: PathBuf,
        /// Repair what e2fsck finds (written to the image's top).
        #[arg(short = 'r', long)]
        repair: bool,
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Describe an image and its chain.
    Info {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// With --output json, the chain as qemu-img prints it: an array of
        /// images, top first (the human form always shows the chain).
        #[arg(long)]
        backing_chain: bool,
        file: PathBuf,
    },
    /// Which layer holds each extent of the disk.
    Map {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        file: PathBuf,
    },
    /// Named snapshots: list, create, apply, delete.
    Snapshot {
        #[command(flatten)]
        common: Common,
        /// List the snapshots in the chain (and those of FILE newer than a revert).
        #[arg(short = 'l', long = "list", group = "action")]
        list: bool,
        /// Seal the current contents as snapshot NAME (FILE@NAME); FILE continues as a new overlay.
        #[arg(short = 'c', long = "create", value_name = "NAME", group = "action")]
        create: Option<String>,
        /// Revert FILE to snapshot NAME (drops what FILE holds now).
        #[arg(short = 'a', long = "apply", value_name = "NAME", group = "action")]
        apply: Option<String>,
        /// Delete snapshot NAME, folding its data into the layer above it.
        #[arg(short = 'd', long = "delete", value_name = "NAME", group = "action")]
        delete: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        file: PathBuf,
    },
    /// Create NEW, a writable overlay on the snapshot BASE (FILE@NAME).
    Clone {
        /// A snapshot (FILE@NAME); a working disk only with --seal.
        base: PathBuf,
        new: PathBuf,
        /// BASE is a working disk: snapshot it as BASE@NAME first (as
        /// `img snapshot -c NAME BASE`) and clone that.
        #[arg(long, value_name = "NAME")]
        seal: Option<String>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Merge FILE into its parent; FILE is left empty on it.
    Commit {
        #[command(flatten)]
        common: Common,
        /// Show progress.
        #[arg(short = 'p', long = "progress")]
        progress: bool,
        /// Commit even into a parent other layers stand on (they will no
        /// longer open).
        #[arg(long)]
        force: bool,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        file: PathBuf,
    },
    /// Grow FILE to SIZE (or by +SIZE), as qemu-img resize: the new space
    /// reads as zeros. Snapshots do not change; shrinking is refused.
    Resize {
        #[command(flatten)]
        common: Common,
        file: PathBuf,
        /// The new size (512M, 2G), or +SIZE to grow by.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Change FILE's parent to BASE ("" for none), keeping FILE's content.
    Rebase {
        #[command(flatten)]
        common: Common,
        /// The new parent ("" for none).
        #[arg(short = 'b', long = "backing")]
        base: String,
        /// Base format (must be snap; accepted for qemu-img compatibility).
        #[arg(short = 'F', long = "backing-format")]
        base_format: Option<String>,
        /// Change only the header, copying nothing (content may change).
        #[arg(short = 'u', long = "unsafe")]
        unsafe_: bool,
        #[arg(short = 'p', long = "progress")]
        progress: bool,
        file: PathBuf,
    },
    /// Check the chain for corruption and leaked space.
    Check {
        #[command(flatten)]
        common: Common,
        /// Repair: leaks (space, dirty flag) or all (also damaged header slots and map entries).
        #[arg(short = 'r', long = "repair", value_enum)]
        repair: Option<Repair>,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        file: PathBuf,
    },
    /// Same as `check -r all`.
    Repair {
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        file: PathBuf,
    },
    /// Convert between raw, qcow2 and snap.
    Convert {
        /// Input format (probed when absent).
        #[arg(short = 'f', long = "source-format")]
        in_format: Option<String>,
        /// Output format.
        #[arg(short = 'O', long = "target-format", default_value = "raw")]
        out_format: String,
        /// Options: cluster_size=N.
        #[arg(short = 'o', long = "options")]
        options: Option<String>,
        #[arg(short = 'p', long = "progress")]
        progress: bool,
        /// Print nothing but errors.
        #[arg(short = 'q', long)]
        quiet: bool,
        /// Read the input even while another process writes it (its content
        /// may be changing): qemu-img's -U.
        #[arg(short = 'U', long)]
        force_share: bool,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        input: PathBuf,
        out: PathBuf,
    },
    /// Back up SNAPSHOT (a sealed layer), or its delta since --from, into OUT.
    Backup {
        /// An older snapshot of the same chain: store only what changed since.
        #[arg(long)]
        from: Option<PathBuf>,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        snapshot: PathBuf,
        out: PathBuf,
    },
    /// Restore a backup as the sealed layer OUT (on BASE for a delta).
    Restore {
        #[arg(short = 'b')]
        base: Option<PathBuf>,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        backup: PathBuf,
        out: PathBuf,
    },
}

/// Parses "10G", "512k", "1.5G", "1048576" (binary units, like qemu-img).
fn parse_size(s: &str) -> Result<u64> {
    Ok(cli_support::parse_size(s)?)
}

/// `cluster_size=N` from a qemu-img style -o list.
fn cluster_size(options: &Option<String>) -> Result<Option<u32>> {
    let Some(o) = options else { return Ok(None) };
    let mut out = None;
    for kv in o.split(',') {
        match kv.split_once('=') {
            Some(("cluster_size", v)) => {
                let n = parse_size(v)?;
                out = Some(u32::try_from(n).context("cluster_size too large")?);
            }
            _ => bail!("unsupported option {kv:?} (supported: cluster_size=N)"),
        }
    }
    Ok(out)
}

use cli_support::progress::ProgressReport;

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn snap_only(format: &Option<String>, what: &str) -> Result<()> {
    match format.as_deref() {
        None | Some("snap") => Ok(()),
        Some(f) => bail!(
            "{what} format {f:?} is not supported here: only snap (convert other formats first)"
        ),
    }
}

impl Cmd {
    fn common(&self) -> Option<&Common> {
        match self {
            Cmd::Info { common, .. }
            | Cmd::Map { common, .. }
            | Cmd::Snapshot { common, .. }
            | Cmd::Commit { common, .. }
            | Cmd::Rebase { common, .. }
            | Cmd::Resize { common, .. }
            | Cmd::Check { common, .. } => Some(common),
            _ => None,
        }
    }

    fn quiet(&self) -> bool {
        match self {
            Cmd::Create { quiet, .. }
            | Cmd::Convert { quiet, .. }
            | Cmd::Fsck { quiet, .. }
            | Cmd::Compare { quiet, .. } => *quiet,
            other => other.common().is_some_and(|c| c.quiet),
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let env: Arc<dyn Env> = Arc::new(RealEnv);
    if let Some(c) = cli.cmd.common() {
        snap_only(&c.format, "image")?;
    }
    QUIET.store(cli.cmd.quiet(), std::sync::atomic::Ordering::Relaxed);
    match cli.cmd {
        Cmd::Create {
            format,
            base,
            base_format,
            options,
            file,
            size,
            fs,
            from,
            label,
            quiet,
        } => {
            snap_only(&Some(format), "image")?;
            snap_only(&base_format, "base")?;
            let size = size.as_deref().map(parse_size).transpose()?;
            let bs = cluster_size(&options)?.unwrap_or(DEFAULT_BLOCK_SIZE);
            let l = ops::create(env.as_ref(), &file, size, bs, base.as_deref())?;
            say!(
                "Formatting '{}', fmt=snap size={} cluster_size={}{}",
                file.display(),
                l.header.virtual_size,
                l.header.block_size,
                base.map(|b| format!(" backing_file={}", b.display()))
                    .unwrap_or_default()
            );
            drop(l);
            if let Some(FsType::Ext4) = fs {
                if let Err(e) = fs::make_fs(&file, from.as_deref(), label.as_deref(), quiet) {
                    // Nothing half-made is left behind.
                    let _ = std::fs::remove_file(&file);
                    return Err(e);
                }
            }
        }
        Cmd::Compare {
            format_a,
            format_b,
            strict,
            progress,
            force_share,
            a,
            b,
            ..
        } => {
            // qemu-img's codes: 0 identical, 1 different, 2 an error.
            let outcome = (|| -> Result<image_format::compare::Comparison> {
                let fmt = |f: Option<String>| -> Result<Option<Format>> {
                    f.map(|f| f.parse().map_err(anyhow::Error::from))
                        .transpose()
                };
                let mut ra = open_reader(&a, fmt(format_a)?, force_share)
                    .with_context(|| format!("{}", a.display()))?;
                let mut rb = open_reader(&b, fmt(format_b)?, force_share)
                    .with_context(|| format!("{}", b.display()))?;
                let mut pr = ProgressReport::new("compare", progress);
                let r =
                    image_format::compare::compare(ra.as_mut(), rb.as_mut(), strict, |d, t| {
                        pr.update(d, t)
                    })?;
                pr.done();
                Ok(r)
            })();
            use image_format::compare::Comparison;
            return Ok(match outcome {
                Ok(Comparison::Identical) => {
                    say!("Images are identical.");
                    ExitCode::SUCCESS
                }
                Ok(Comparison::ContentMismatch { offset }) => {
                    say!("Content mismatch at offset {offset}!");
                    ExitCode::from(1)
                }
                Ok(Comparison::SizeMismatch { a, b }) => {
                    say!("Strict mode: Image size mismatch! ({a} and {b} bytes)");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("img: error: {}", cli_support::report(&e));
                    ExitCode::from(2)
                }
            });
        }
        Cmd::Measure {
            size,
            format,
            out_format,
            options,
            output,
            force_share,
            file,
        } => {
            snap_only(&Some(out_format), "target")?;
            let bs = cluster_size(&options)?.unwrap_or(DEFAULT_BLOCK_SIZE);
            let m = match file {
                Some(f) => {
                    let fmt: Option<Format> = format
                        .map(|x| x.parse())
                        .transpose()
                        .map_err(anyhow::Error::msg)?;
                    let mut r = open_reader(&f, fmt, force_share)
                        .with_context(|| format!("{}", f.display()))?;
                    image_format::compare::measure(Some(r.as_mut()), 0, bs)?
                }
                None => {
                    let size = parse_size(size.as_deref().unwrap_or("0"))?;
                    image_format::compare::measure(None, size, bs)?
                }
            };
            match output {
                Output::Json => print_json(&m)?,
                Output::Human => {
                    say!("required size: {}", m.required);
                    say!("fully allocated size: {}", m.fully_allocated);
                }
            }
        }
        Cmd::Export {
            image,
            file,
            readonly,
            mount_dir,
        } => fs::export(fs::ExportArgs {
            image,
            file,
            readonly,
            mount_dir,
        })?,
        Cmd::Mount {
            image,
            dir,
            readonly,
        } => fs::mount(&image, &dir, readonly)?,
        Cmd::Umount { dir } => fs::umount(&dir)?,
        Cmd::Fsck {
            image,
            repair,
            quiet,
        } => {
            // The container first: e2fsck on a damaged one would be
            // reading garbage.
            let r = check(env.as_ref(), &image, RepairMode::None)?;
            if r.exit_code() == 2 {
                eprintln!(
                    "img: {}: the container has {} errors (img check; img repair first)",
                    image.display(),
                    r.corruptions
                );
                return Ok(ExitCode::from(8));
            }
            return fs::fsck(&image, repair, quiet);
        }
        Cmd::Info {
            output,
            file,
            backing_chain,
            ..
        } => {
            let i = info::info(&env, &file)?;
            match output {
                // qemu-img's shape: one image, or the chain as an array.
                Output::Json if backing_chain => print_json(&i.chain)?,
                Output::Json => print_json(&i)?,
                Output::Human => print!("{}", i.to_text()),
            }
        }
        Cmd::Map { output, file, .. } => {
            let m = info::map(&env, &file)?;
            match output {
                Output::Json => print_json(&m)?,
                Output::Human => {
                    println!(
                        "{:<20}{:<20}{:<8}{:<8}File",
                        "Offset", "Length", "Depth", "Kind"
                    );
                    for e in m {
                        println!(
                            "{:<#20x}{:<#20x}{:<8}{:<8}{}",
                            e.start,
                            e.length,
                            e.depth,
                            if e.data { "data" } else { "zero" },
                            e.filename
                                .map(|f| f.display().to_string())
                                .unwrap_or_default()
                        );
                    }
                }
            }
        }
        Cmd::Snapshot {
            list,
            create,
            apply,
            delete,
            output,
            file,
            ..
        } => {
            if let Some(name) = create {
                let p = ops::snapshot_create(env.as_ref(), &file, &name)?;
                if output == Output::Json {
                    print_json(&serde_json::json!({ "snapshot": p, "image": file }))?;
                }
            } else if let Some(name) = apply {
                ops::snapshot_apply(env.as_ref(), &file, &name)?;
            } else if let Some(name) = delete {
                let mut pr = ProgressReport::new("delete", false);
                ops::snapshot_delete(&env, &file, &name, &mut |d, t| pr.update(d, t))?;
                pr.done();
            } else {
                let _ = list;
                let l = ops::snapshot_list(env.as_ref(), &file)?;
                match output {
                    Output::Json => print_json(&l)?,
                    Output::Human => {
                        println!("Snapshot list:");
                        let width = l.iter().map(|s| s.name.len()).max().unwrap_or(0).max(4);
                        println!("{:<6} {:<width$} {:<36} File", "Depth", "Name", "UUID");
                        for s in l {
                            // Off the chain: newer than what FILE was reverted to.
                            let depth = s.depth.map_or("-".to_string(), |d| d.to_string());
                            println!(
                                "{:<6} {:<width$} {:<36} {}",
                                depth,
                                s.name,
                                s.uuid,
                                s.path.display()
                            );
                        }
                    }
                }
            }
        }
        Cmd::Clone {
            base,
            new,
            seal,
            output,
        } => {
            let base = match seal {
                Some(name) => ops::snapshot_create(env.as_ref(), &base, &name)?,
                None => {
                    // A working disk is not a base: cloning it would seal it
                    // under whoever uses it next.
                    let l = image_format::Layer::open(env.as_ref(), &base, false)?;
                    if !l.header.sealed() {
                        bail!(
                            "{b} is a working disk, not a snapshot: clone a snapshot of it \
                             ({b}@NAME, from `img snapshot -c NAME {b}`), or give --seal NAME \
                             to take that snapshot now",
                            b = base.display()
                        );
                    }
                    base
                }
            };
            let l = ops::clone(env.as_ref(), &base, &new)?;
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "image": new, "uuid": l.header.uuid, "base": base
                }))?,
                Output::Human => say!("{}: clone of {}", new.display(), base.display()),
            }
        }
        Cmd::Commit {
            progress,
            force,
            output,
            file,
            ..
        } => {
            let mut pr = ProgressReport::new("commit", progress);
            let s = ops::commit(env.as_ref(), &file, force, &mut |d, t| pr.update(d, t))?;
            pr.done();
            match output {
                Output::Json => print_json(&s)?,
                Output::Human if s.data_bytes + s.zero_bytes == 0 => {
                    say!("Nothing to commit: {} holds no data.", file.display())
                }
                Output::Human => say!("Image committed."),
            }
        }
        Cmd::Resize { file, size, .. } => {
            let old = image_format::Layer::open(env.as_ref(), &file, false)?
                .header
                .virtual_size;
            let new = if let Some(more) = size.strip_prefix('+') {
                old.checked_add(parse_size(more)?)
                    .with_context(|| format!("{size}: too large"))?
            } else if size.starts_with('-') {
                bail!("{size}: shrinking is not supported (images only grow)");
            } else {
                parse_size(&size)?
            };
            ops::resize(env.as_ref(), &file, new)?;
            say!("Image resized.");
        }
        Cmd::Rebase {
            base,
            base_format,
            unsafe_,
            progress,
            file,
            ..
        } => {
            snap_only(&base_format, "base")?;
            let base = (!base.is_empty()).then(|| PathBuf::from(base));
            let mut pr = ProgressReport::new("rebase", progress);
            ops::rebase(&env, &file, base.as_deref(), unsafe_, false, &mut |d, t| {
                pr.update(d, t)
            })?;
            pr.done();
        }
        Cmd::Check {
            repair,
            output,
            file,
            ..
        } => return do_check(env.as_ref(), &file, repair, output),
        Cmd::Repair { output, file } => {
            return do_check(env.as_ref(), &file, Some(Repair::All), output)
        }
        Cmd::Convert {
            in_format,
            out_format,
            options,
            progress,
            force_share,
            output,
            input,
            out,
            ..
        } => {
            let inf: Option<Format> = in_format
                .map(|f| f.parse())
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let outf: Format = out_format.parse()?;
            let mut pr = ProgressReport::new("convert", progress);
            let s = convert(
                &input,
                inf,
                &out,
                outf,
                cluster_size(&options)?,
                force_share,
                &mut |d, t| pr.update(d, t),
            )?;
            pr.done();
            if output == Output::Json {
                print_json(&s)?;
            }
        }
        Cmd::Backup {
            from,
            progress,
            output,
            snapshot,
            out,
        } => {
            let mut pr = ProgressReport::new("backup", progress);
            let s = backup::backup(&env, &snapshot, from.as_deref(), &out, &mut |d, t| {
                pr.update(d, t)
            })?;
            pr.done();
            match output {
                Output::Json => print_json(&s)?,
                Output::Human => println!(
                    "{}: {} records, {} data, {} zero, {} in the file",
                    out.display(),
                    s.records,
                    info::human(s.data_bytes),
                    info::human(s.zero_bytes),
                    info::human(s.file_bytes)
                ),
            }
        }
        Cmd::Restore {
            base,
            progress,
            output,
            backup: b,
            out,
        } => {
            let mut pr = ProgressReport::new("restore", progress);
            let s = backup::restore(&env, &b, base.as_deref(), &out, &mut |d, t| pr.update(d, t))?;
            pr.done();
            match output {
                Output::Json => print_json(&s)?,
                Output::Human => println!(
                    "{}: restored {} data, {} zero (sealed; clone it to write)",
                    out.display(),
                    info::human(s.data_bytes),
                    info::human(s.zero_bytes)
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn do_check(
    env: &dyn Env,
    file: &Path,
    repair: Option<Repair>,
    output: Output,
) -> Result<ExitCode> {
    let mode = match repair {
        None => RepairMode::None,
        Some(Repair::Leaks) => RepairMode::Leaks,
        Some(Repair::All) => RepairMode::All,
    };
    let r = check(env, file, mode)?;
    match output {
        Output::Json => print_json(&r)?,
        Output::Human => {
            if let Some(u) = &r.in_use {
                say!(
                    "Note: {} is {u}: what this check sees may be changing.",
                    file.display()
                );
            }
            if let Some(e) = &r.chain_error {
                say!("ERROR chain: {e}");
            }
            for l in &r.layers {
                for c in &l.corruptions {
                    say!("ERROR {}: {c}", l.path.display());
                }
                if l.leaked_blocks > 0 {
                    say!("Leaked blocks in {}: {}", l.path.display(), l.leaked_blocks);
                }
                for n in &l.notes {
                    say!("Note {}: {n}", l.path.display());
                }
                for f in &l.repaired {
                    say!("Repaired {}: {f}", l.path.display());
                }
            }
            match r.exit_code() {
                0 => say!("No errors were found on the image."),
                2 => say!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                    r.corruptions
                ),
                3 => say!(
                    "\n{} leaked blocks were found on the image.\nThis means waste of disk space, but no harm to data.",
                    r.leaked_blocks
                ),
                _ => {}
            }
        }
    }
    Ok(ExitCode::from(r.exit_code() as u8))
}

fn main() -> ExitCode {
    // `img map big.img | head` ends quietly when head has read enough, as
    // Unix tools do, instead of panicking on the closed pipe.
    // SAFETY: restoring the default disposition of one signal before any
    // thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // (fuser's own lines: a reply to a request the kernel dropped as an
    // export unmounts is no news.)
    cli_support::init_logging("warn,fuser=off");
    // A usage error exits 1, as qemu-img's do: 2 and 3 are check's
    // "corrupt" and "leaks", and a script must not mistake one for the other.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS // --help, --version
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("img: error: {}", cli_support::report(&e));
            ExitCode::FAILURE
        }
    }
}
