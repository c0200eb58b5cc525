//! The verbs that reach the filesystem inside an image: `export` (the
//! chain as one raw file through FUSE), `mount`/`umount` (that file on a
//! loop device, mounted on a directory), `fsck` (e2fsck over the export)
//! and `create --fs` (mkfs.ext4 into the new image's layer, filled from a
//! host directory if asked).
//!
//! Every export and mount is recorded in the run directory (`IMG_RUN_DIR`,
//! default `/run/img`, or `$XDG_RUNTIME_DIR/img` for other users) while
//! its process lives; one whose process died (kill -9) is stale, and the
//! next `img` that exports, mounts or unmounts cleans it up: its directory
//! and its file unmounted, its loop device detached.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cli_support::exit_signals::ExitSignals;
use image_format::export::Export;
use serde::{Deserialize, Serialize};

/// One export (and the mount on it, for `img mount`), as its process
/// recorded it.
#[derive(Serialize, Deserialize, Debug)]
struct Entry {
    pid: u32,
    image: PathBuf,
    /// The exported file (a FUSE mount over a regular file).
    file: PathBuf,
    /// Whether the export made `file` (and removes it).
    file_made: bool,
    /// `img mount`: the directory and the loop device.
    dir: Option<PathBuf>,
    loop_dev: Option<String>,
    readonly: bool,
}

fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMG_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
            return Path::new(&d).join("img");
        }
    }
    PathBuf::from("/run/img")
}

/// The entry's file: named by the exported file's path (one export per
/// file).
fn entry_path(file: &Path) -> PathBuf {
    // FNV-1a: stable across runs, no dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in file.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    run_dir().join(format!("{h:016x}.json"))
}

/// The file `img mount DIR`'s export serves (its log beside it, `.log`).
fn mount_export_file(dir: &Path) -> PathBuf {
    let key = entry_path(dir);
    let stem = key.file_stem().unwrap_or_default().to_string_lossy();
    run_dir().join(format!("export-{stem}"))
}

fn entries() -> Vec<(PathBuf, Entry)> {
    let Ok(dir) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let e = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, e))
        })
        .collect()
}

/// Whether the process runs: a zombie (dead, not yet reaped by whoever
/// adopted it) counts as gone.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command's closing parenthesis.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// `cmd ARGS`, which must succeed: what it printed, or its error output.
fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Cleans up after exports and mounts whose process died: directory and
/// file unmounted (lazily: a user may still be in it), loop device
/// detached, the file removed if the export made it.
fn clean_stale() -> Vec<Entry> {
    let mut cleaned = Vec::new();
    for (path, e) in entries() {
        if alive(e.pid) {
            continue;
        }
        if let Some(dir) = &e.dir {
            let _ = run("umount", &["-l", &dir.to_string_lossy()]);
        }
        if let Some(dev) = &e.loop_dev {
            let _ = run("losetup", &["-d", dev]);
        }
        let _ = run("umount", &["-l", &e.file.to_string_lossy()]);
        if e.file_made {
            let _ = std::fs::remove_file(&e.file);
        }
        let _ = std::fs::remove_file(&path);
        eprintln!(
            "img: cleaned up a stale export of {} at {} (its process {} is gone)",
            e.image.display(),
            e.dir.as_deref().unwrap_or(&e.file).display(),
            e.pid
        );
        cleaned.push(e);
    }
    cleaned
}

/// How an export is asked to run.
pub struct ExportArgs {
    pub image: PathBuf,
    pub file: PathBuf,
    pub readonly: bool,
    /// `img mount`'s daemon: mount the file's filesystem here.
    pub mount_dir: Option<PathBuf>,
}

/// Serves the export until SIGTERM or SIGINT, or until someone unmounts
/// the file; then unmounts what it mounted and flushes the image. With a
/// mount directory: the file on a loop device, mounted there; a line
/// `ready` on stdout once it is.
pub fn export(a: ExportArgs) -> Result<()> {
    clean_stale();
    let signals = ExitSignals::block().context("blocking SIGTERM and SIGINT")?;
    let file = std::path::absolute(&a.file).context("the export's file")?;
    let file_made = !file.exists();
    let export = Export::open(&a.image, a.readonly)
        .with_context(|| format!("opening {}", a.image.display()))?;
    let session = export.mount(&file)?;
    let mut entry = Entry {
        pid: std::process::id(),
        image: std::path::absolute(&a.image)?,
        file: file.clone(),
        file_made,
        dir: None,
        loop_dev: None,
        readonly: a.readonly,
    };
    let record = |e: &Entry| -> Result<()> {
        std::fs::create_dir_all(run_dir()).context("the run directory")?;
        let p = entry_path(&e.file);
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(e)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    };
    record(&entry)?;
    let outcome = (|| -> Result<()> {
        if let Some(dir) = &a.mount_dir {
            let dir = std::path::absolute(dir)?;
            let mut args = vec!["--find", "--show"];
            if a.readonly {
                args.push("--read-only");
            }
            let f = file.to_string_lossy().into_owned();
            args.push(&f);
            let dev = run("losetup", &args)?;
            // Recorded before the mount: a process killed in between leaves
            // a loop device for the next img to detach.
            entry.loop_dev = Some(dev.clone());
            record(&entry)?;
            let mut margs = Vec::new();
            if a.readonly {
                margs.extend(["-o", "ro"]);
            }
            let d = dir.to_string_lossy().into_owned();
            margs.extend([dev.as_str(), d.as_str()]);
            run("mount", &margs).map_err(|e| {
                e.context(format!(
                    "mounting {} on {}{}",
                    a.image.display(),
                    dir.display(),
                    if a.readonly {
                        " (a filesystem whose journal needs replaying, after a crash, \
                         mounts writable only, once: or img fsck -r)"
                    } else {
                        " (no filesystem the kernel knows?)"
                    }
                ))
            })?;
            entry.dir = Some(dir.clone());
            record(&entry)?;
        }
        println!("ready");
        std::io::stdout().flush()?;
        // Until a signal, or the file unmounted under us.
        loop {
            if signals.wait_for(Duration::from_millis(200)).is_some() || session.is_finished() {
                break;
            }
        }
        Ok(())
    })();
    let unmounted = unmount_dir(&entry);
    // The FUSE file unmounted: the session ends and flushes the image.
    let closed = session.join().context("closing the image");
    if file_made {
        let _ = std::fs::remove_file(&file);
    }
    let _ = std::fs::remove_file(entry_path(&file));
    outcome.and(unmounted).and(closed)
}

/// Unmounts `img mount`'s directory (its data flushed through the loop
/// device into the export) and detaches the loop device; waits until the
/// kernel has let go of the file.
fn unmount_dir(e: &Entry) -> Result<()> {
    let Some(dev) = &e.loop_dev else {
        return Ok(());
    };
    if let Some(dir) = &e.dir {
        let d = dir.to_string_lossy();
        if let Err(err) = run("umount", &[&d]) {
            // Busy (a shell in it, a writer): detached now, finished when
            // its last user leaves; the loop device lets go of the file then.
            eprintln!("img: {err:#}; unmounting lazily");
            run("umount", &["-l", &d])?;
        }
    }
    run("losetup", &["-d", dev])?;
    // losetup -d returns before the device has let go of its file, and a
    // lazily unmounted filesystem keeps it until its last user leaves: the
    // export serves until then (what they write still reaches the image).
    let sysfs = format!(
        "/sys/block/{}/loop/backing_file",
        dev.trim_start_matches("/dev/")
    );
    let began = Instant::now();
    let mut told = false;
    while Path::new(&sysfs).exists() {
        if !told && began.elapsed() > Duration::from_secs(5) {
            eprintln!("img: waiting for the last user of {dev} to leave");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// `img mount`: an export daemon for IMAGE with DIR mounted; returns once
/// it is.
pub fn mount(image: &Path, dir: &Path, readonly: bool) -> Result<()> {
    clean_stale();
    let dir = std::path::absolute(dir)?;
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    if let Some((_, e)) = entries()
        .into_iter()
        .find(|(_, e)| e.dir.as_ref() == Some(&dir))
    {
        bail!(
            "{}: {} is mounted there already (img umount first)",
            dir.display(),
            e.image.display()
        );
    }
    std::fs::create_dir_all(run_dir()).context("the run directory")?;
    let file = mount_export_file(&dir);
    let log = file.with_extension("log");
    let me = std::env::current_exe().context("finding img itself")?;
    let mut cmd = Command::new(me);
    cmd.arg("export")
        .arg(image)
        .arg(&file)
        .arg("--mount-dir")
        .arg(&dir);
    if readonly {
        cmd.arg("--readonly");
    }
    // Its own process group: a terminal's ^C to this command is not its.
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).context("the export's log")?)
        .spawn()
        .context("starting the export")?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("the export's output")?;
    let _ = std::io::BufReader::new(stdout).read_line(&mut line);
    if line.trim() != "ready" {
        let _ = child.wait();
        let why = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        bail!("{}", why.trim().trim_start_matches("img: error: "));
    }
    Ok(())
}

/// `img umount DIR`: the export daemon told to finish (DIR unmounted, the
/// image flushed), waited for.
pub fn umount(dir: &Path) -> Result<()> {
    let cleaned = clean_stale();
    let dir = std::path::absolute(dir)?;
    if let Some(e) = cleaned.iter().find(|e| e.dir.as_ref() == Some(&dir)) {
        // What the user asked for is done; what it cost is said.
        eprintln!(
            "img: {} is unmounted; its export (process {}) had ended without unmounting \
             (killed?), so what was written through the mount since its last sync never \
             reached {}: the image holds what was synced before (img check -r all {} \
             if it reports leaks)",
            dir.display(),
            e.pid,
            e.image.display(),
            e.image.display()
        );
        let _ = std::fs::remove_file(mount_export_file(&dir).with_extension("log"));
        return Ok(());
    }
    let Some((_, e)) = entries()
        .into_iter()
        .find(|(_, e)| e.dir.as_ref() == Some(&dir))
    else {
        bail!("{}: no image is mounted there by img", dir.display());
    };
    // SAFETY: kill with a signal number, on a pid from our record.
    unsafe { libc::kill(e.pid as i32, libc::SIGTERM) };
    // Unmounting flushes what the filesystem holds; a large cache takes a
    // while: the bound only catches a hang.
    let until = Instant::now() + Duration::from_secs(600);
    while alive(e.pid) {
        if Instant::now() > until {
            bail!(
                "{}: the export (process {}) did not finish in 600 s",
                dir.display(),
                e.pid
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(mount_export_file(&dir).with_extension("log"));
    Ok(())
}

/// An export for the length of one job: mounted on a file of the run
/// directory, unmounted (and the image flushed) when dropped.
struct Scoped {
    session: Option<image_format::export::ExportSession>,
    file: PathBuf,
}

impl Scoped {
    fn new(image: &Path, readonly: bool, what: &str) -> Result<Scoped> {
        clean_stale();
        std::fs::create_dir_all(run_dir()).context("the run directory")?;
        let file = run_dir().join(format!("{what}-{}", std::process::id()));
        let export = Export::open(image, readonly)
            .with_context(|| format!("opening {}", image.display()))?;
        let session = export.mount(&file)?;
        Ok(Scoped {
            session: Some(session),
            file,
        })
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.join() {
                eprintln!("img: closing the image: {e}");
            }
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// `img fsck IMAGE [-r]`: the container checked first, then e2fsck over
/// the export (read-only: -n; with -r: -y, writing the repair to the
/// image's top); e2fsck's exit status.
pub fn fsck(image: &Path, repair: bool, quiet: bool) -> Result<ExitCode> {
    let export = Scoped::new(image, !repair, "fsck")?;
    let f = export.file.to_string_lossy().into_owned();
    let mut args = vec!["-f", if repair { "-y" } else { "-n" }];
    if !quiet && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        args.push("-C0");
    }
    args.push(&f);
    let status = Command::new("e2fsck")
        .args(&args)
        .stdin(Stdio::null())
        .status()
        .context("running e2fsck (e2fsprogs)")?;
    drop(export);
    Ok(ExitCode::from(status.code().unwrap_or(8) as u8))
}

/// `img create --fs ext4`: mkfs.ext4 straight into the new image's
/// layer file, at its data offset (a snap layer's data area is the disk's
/// bytes in place), filled from `from` if given; then every block it
/// wrote is noted in the map. Space mkfs leaves untouched stays
/// unallocated. (The image is new, with nothing below it: no
/// copy-on-write to do, and nothing to go through an export for.)
pub fn make_fs(image: &Path, from: Option<&Path>, label: Option<&str>, quiet: bool) -> Result<()> {
    if let Some(d) = from {
        if !d.is_dir() {
            bail!("--from {}: not a directory", d.display());
        }
    }
    let mut disk = image_format::Disk::open_path(image, true)
        .with_context(|| format!("opening {}", image.display()))?;
    if disk.layers().len() != 1 {
        bail!(
            "{}: a filesystem is made in a new image, not a clone",
            image.display()
        );
    }
    disk.begin_writes()?;
    let options = format!(
        // No discard pass (the image reads as zeros already) and lazy
        // tables: only what the filesystem uses is written.
        "offset={},nodiscard,lazy_itable_init=1,lazy_journal_init=1",
        disk.top().data_offset()
    );
    let f = disk.path().to_string_lossy().into_owned();
    let size = format!("{}k", disk.virtual_size() / 1024);
    let from = from.map(|d| d.to_string_lossy().into_owned());
    // No discard pass (the image reads as zeros already) and lazy tables:
    // only what the filesystem uses is written.
    let mut args = vec!["-F", "-t", "ext4", "-E", &options];
    if quiet {
        args.push("-q");
    }
    if let Some(d) = &from {
        args.extend(["-d", d]);
    }
    if let Some(l) = label {
        args.extend(["-L", l]);
    }
    args.extend([f.as_str(), size.as_str()]);
    let status = Command::new("mkfs.ext4")
        .args(&args)
        .stdin(Stdio::null())
        .status()
        .context("running mkfs.ext4 (e2fsprogs)")?;
    if !status.success() {
        bail!("mkfs.ext4 failed ({status})");
    }
    disk.note_data_in_top()?;
    disk.close()?;
    Ok(())
}
