//! Filesystem images from the host side: `img create --fs ext4 --from`,
//! `img export` (the chain as one file through FUSE), `img mount` /
//! `img umount` (that file on a loop device), `img fsck`; the locks that
//! keep a VM's backend and an export from writing one image at once.
//! Each test keeps its exports' records in a run directory of its own.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use test_infra::{bin, output_within, s, BlkBackendProcess, Fixture, KillOnDrop, Patience};

/// Whether this host can mount exports: root, /dev/fuse, loop devices,
/// e2fsprogs. A loud line if not.
fn fs_ready(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = [
        ("root", root),
        ("/dev/fuse", Path::new("/dev/fuse").exists()),
        ("/dev/loop-control", Path::new("/dev/loop-control").exists()),
        ("mkfs.ext4", which("mkfs.ext4")),
        ("e2fsck", which("e2fsck")),
        ("losetup", which("losetup")),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(what, _)| what)
    .collect();
    if !missing.is_empty() {
        println!("SKIPPED: {test}: needs {}", missing.join(", "));
    }
    missing.is_empty()
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(program).is_file())
}

/// `img` with this test's run directory.
struct Img {
    run_dir: PathBuf,
}

impl Img {
    fn new(fx: &Fixture) -> Img {
        Img {
            run_dir: fx.path("run"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("img"));
        c.args(args).env("IMG_RUN_DIR", &self.run_dir);
        c
    }

    /// A call to its end. (mkfs of a few hundred MiB, an unmount that
    /// flushes: a second or two here.)
    fn out(&self, args: &[&str]) -> Output {
        output_within(
            &mut self.command(args),
            &Patience::new("an img call", Duration::from_secs(3)),
        )
        .expect("img runs")
    }

    /// A call that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.out(args);
        assert!(
            o.status.success(),
            "img {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Mounts `image` read-only on `mnt`, checks it holds `tree`, unmounts.
    fn holds_tree(&self, image: &Path, mnt: &Path, tree: &Path) {
        self.ok(&["mount", "--readonly", &s(image), &s(mnt)]);
        same_tree(tree, mnt);
        self.ok(&["umount", &s(mnt)]);
    }

    /// `img export [--readonly] IMAGE FILE` running, once FILE serves
    /// the image (`size` bytes).
    fn export(&self, image: &Path, file: &Path, readonly: bool, size: u64) -> KillOnDrop {
        let mut args = vec!["export".to_string()];
        if readonly {
            args.push("--readonly".into());
        }
        args.extend([s(image), s(file)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = KillOnDrop(
            self.command(&args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("img export"),
        );
        Patience::new("the export", Duration::from_millis(200))
            .wait_until(|| Ok(std::fs::metadata(file).is_ok_and(|m| m.len() == size)))
            .expect("the export serves");
        child
    }

    /// Ends an export as a user does (SIGTERM: unmounted, flushed, the
    /// image closed clean) and waits for it.
    fn end(&self, mut export: KillOnDrop) {
        // SAFETY: kill on our child.
        unsafe { libc::kill(export.0.id() as i32, libc::SIGTERM) };
        Patience::new("the export's end", Duration::from_secs(2))
            .wait_until(|| Ok(export.0.try_wait()?.is_some()))
            .expect("the export ends");
    }

    /// The exports running now, as their records say.
    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_dir(&self.run_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn is_mountpoint(p: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(p)
        .status()
        .is_ok_and(|s| s.success())
}

/// `diff -r` of two trees (symlinks compared as links), lost+found aside.
fn same_tree(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference", "-x", "lost+found"])
        .arg(a)
        .arg(b)
        .output()
        .expect("diff");
    assert!(
        out.status.success(),
        "{} and {} differ:\n{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A tree with what trips filesystem builders: nested directories,
/// symlinks (relative, absolute, dangling), a 100 MiB sparse file with
/// data at its start, middle and end, odd names, modes.
fn awkward_tree(root: &Path) {
    let deep = root.join("a/b/c/d");
    std::fs::create_dir_all(&deep).expect("dirs");
    std::fs::write(deep.join("leaf.txt"), b"deep down\n").expect("w");
    std::fs::write(root.join("a/hello.txt"), b"hello\n").expect("w");
    std::os::unix::fs::symlink("hello.txt", root.join("a/rel-link")).expect("ln");
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).expect("ln");
    std::os::unix::fs::symlink("nowhere/at/all", root.join("dangling")).expect("ln");
    for name in [
        "sp ace",
        "ünïcödé-ñame",
        "-leading-dash",
        ".hidden",
        "tab\there",
        &"long".repeat(60),
    ] {
        std::fs::write(root.join(name), name.as_bytes()).expect("w");
    }
    let sparse = std::fs::File::create(root.join("sparse-100M")).expect("sparse");
    sparse.set_len(100 << 20).expect("len");
    use std::os::unix::fs::FileExt;
    for at in [0u64, 50 << 20, (100 << 20) - 4096] {
        sparse
            .write_all_at(&[0xa5u8; 4096], at)
            .expect("sparse data");
    }
    let script = root.join("run.sh");
    std::fs::write(&script, b"#!/bin/sh\necho hi\n").expect("w");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = root.join("a/secret");
    std::fs::write(&secret, b"s").expect("w");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// The awkward tree at `tree` in the fixture, and an ext4 image `name`
/// of `size` made from it (labelled `awkward`), with a mount directory.
fn image_from_tree(fx: &Fixture, img: &Img, name: &str, size: &str) -> (PathBuf, PathBuf, PathBuf) {
    let tree = fx.path("tree");
    awkward_tree(&tree);
    let image = fx.path(name);
    img.ok(&[
        "create",
        "-q",
        "--fs",
        "ext4",
        "--from",
        &s(&tree),
        "--label",
        "awkward",
        &s(&image),
        size,
    ]);
    let mnt = fx.path("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    (tree, image, mnt)
}

/// Bytes the image's files take on the disk.
fn allocated(paths: &[&Path]) -> u64 {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).expect("stat").blocks() * 512)
        .sum()
}

#[test]
fn an_ext4_image_made_from_a_tree_reads_back_identical_through_img_mount() {
    if !fs_ready("fs_from_tree") {
        return;
    }
    let fx = Fixture::new();
    let img = Img::new(&fx);
    let (tree, image, mnt) = image_from_tree(&fx, &img, "fs.img", "512M");
    // Sparse: the 100 MiB file's holes and the space mkfs left alone
    // take nothing (its data is 12 KiB; ext4's own metadata a few MiB).
    let used = allocated(&[&image]);
    assert!(used < 24 << 20, "the image takes {used} bytes");

    img.ok(&["mount", "--readonly", &s(&image), &s(&mnt)]);
    assert!(is_mountpoint(&mnt));
    same_tree(&tree, &mnt);
    for (name, mode) in [("run.sh", 0o755), ("a/secret", 0o600)] {
        let m = std::fs::metadata(mnt.join(name)).expect("stat").mode() & 0o7777;
        assert_eq!(m, mode, "{name}'s mode");
    }
    let inside = std::fs::metadata(mnt.join("sparse-100M")).expect("stat");
    assert_eq!(inside.len(), 100 << 20);
    assert!(
        inside.blocks() * 512 < 1 << 20,
        "the sparse file stays sparse inside: {} bytes",
        inside.blocks() * 512
    );
    let label = Command::new("blkid")
        .args(["-s", "LABEL", "-o", "value"])
        .arg(
            img.records()[0]["loop_dev"]
                .as_str()
                .expect("a loop device"),
        )
        .output()
        .expect("blkid");
    assert_eq!(String::from_utf8_lossy(&label.stdout).trim(), "awkward");
    // A read-only mount refuses writes.
    assert!(std::fs::write(mnt.join("new"), b"x").is_err());
    img.ok(&["umount", &s(&mnt)]);
    assert!(!is_mountpoint(&mnt));
    assert!(img.records().is_empty(), "{:?}", img.records());
    // The container and the filesystem are clean.
    img.ok(&["check", &s(&image)]);
    let fsck = img.out(&["fsck", "-q", &s(&image)]);
    assert_eq!(fsck.status.code(), Some(0), "{fsck:?}");
}

#[test]
fn a_clone_written_through_img_mount_leaves_its_base_and_a_sibling_untouched() {
    if !fs_ready("fs_clone_isolation") {
        return;
    }
    let fx = Fixture::new();
    let img = Img::new(&fx);
    let (tree, base, mnt) = image_from_tree(&fx, &img, "base.img", "256M");
    img.ok(&["snapshot", "-c", "golden", &s(&base)]);
    let (a, b) = (fx.path("a.img"), fx.path("b.img"));
    let golden = format!("{}@golden", s(&base));
    img.ok(&["clone", &golden, &s(&a)]);
    img.ok(&["clone", &golden, &s(&b)]);
    let sealed = PathBuf::from(&golden);
    let digest = |p: &Path| -> Vec<u8> { std::fs::read(p).expect("read whole") };
    let (sealed_before, b_before) = (digest(&sealed), digest(&b));

    img.ok(&["mount", &s(&a), &s(&mnt)]);
    std::fs::write(mnt.join("a/hello.txt"), b"changed in a\n").expect("w");
    std::fs::remove_file(mnt.join("sp ace")).expect("rm");
    std::fs::write(mnt.join("new-in-a"), vec![7u8; 3 << 20]).expect("w");
    img.ok(&["umount", &s(&mnt)]);

    assert!(digest(&sealed) == sealed_before, "the sealed base changed");
    assert!(digest(&b) == b_before, "the sibling clone changed");
    // a has its changes, b the base's tree.
    img.ok(&["mount", "--readonly", &s(&a), &s(&mnt)]);
    assert_eq!(
        std::fs::read(mnt.join("a/hello.txt")).expect("r"),
        b"changed in a\n"
    );
    assert!(!mnt.join("sp ace").exists());
    assert_eq!(
        std::fs::read(mnt.join("new-in-a")).expect("r"),
        vec![7u8; 3 << 20]
    );
    img.ok(&["umount", &s(&mnt)]);
    img.holds_tree(&b, &mnt, &tree);
}

#[test]
fn img_fsck_reports_a_damaged_filesystem_and_repairs_it_with_r() {
    if !fs_ready("fs_fsck") {
        return;
    }
    let fx = Fixture::new();
    let img = Img::new(&fx);
    let (tree, image, mnt) = image_from_tree(&fx, &img, "fs.img", "256M");
    // The group descriptors (block 1 of a 4 KiB-block ext4) zeroed
    // through an export, as a bad write would leave them.
    let file = fx.path("export.raw");
    let export = img.export(&image, &file, false, 256 << 20);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open the export");
        f.write_all_at(&[0u8; 4096], 4096).expect("zero the GDT");
        f.sync_all().expect("fsync: the format's flush");
    }
    // SAFETY: kill with a signal number, on our child.
    unsafe { libc::kill(export.0.id() as i32, libc::SIGTERM) };
    drop(export);

    let damaged = img.out(&["fsck", "-q", &s(&image)]);
    assert_eq!(
        damaged.status.code(),
        Some(4),
        "e2fsck -n's status for errors left: {}",
        String::from_utf8_lossy(&damaged.stdout)
    );
    let repaired = img.out(&["fsck", "-r", "-q", &s(&image)]);
    assert_eq!(
        repaired.status.code(),
        Some(1),
        "e2fsck -y's status for errors corrected: {}",
        String::from_utf8_lossy(&repaired.stdout)
    );
    let clean = img.out(&["fsck", "-q", &s(&image)]);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");
    img.holds_tree(&image, &mnt, &tree);
}

#[test]
fn exports_end_cleanly_when_unmounted_during_writes_killed_or_read_only() {
    if !fs_ready("fs_export_ends") {
        return;
    }
    let fx = Fixture::new();
    let img = Img::new(&fx);
    let image = fx.path("fs.img");
    img.ok(&["create", "-q", "--fs", "ext4", &s(&image), "256M"]);
    let mnt = fx.path("mnt");
    std::fs::create_dir(&mnt).expect("mnt");

    // Unmounted while a writer is at it: the writer finishes (the
    // filesystem detached lazily, the export waiting for it), then all
    // it wrote is in the image.
    img.ok(&["mount", &s(&image), &s(&mnt)]);
    let mut writer = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=48", "status=none"])
        .arg(format!("of={}", s(&mnt.join("big"))))
        .spawn()
        .expect("dd");
    // Unmounted once the writer has its file open and is writing (not on
    // a timer: a slow machine may start dd late).
    Patience::new("dd's first megabyte", Duration::from_millis(50))
        .wait_until(|| Ok(std::fs::metadata(mnt.join("big")).is_ok_and(|m| m.len() > 0)))
        .expect("dd writes");
    img.ok(&["umount", &s(&mnt)]);
    assert!(writer.wait().expect("dd").success());
    assert!(!is_mountpoint(&mnt));
    img.ok(&["check", &s(&image)]);
    assert_eq!(img.out(&["fsck", "-q", &s(&image)]).status.code(), Some(0));
    img.ok(&["mount", "--readonly", &s(&image), &s(&mnt)]);
    assert_eq!(
        std::fs::metadata(mnt.join("big")).expect("stat").len(),
        48 << 20
    );
    img.ok(&["umount", &s(&mnt)]);

    // kill -9 of the export: what was synced before is in the image; the
    // next img cleans the dead mount, loop device and record up.
    img.ok(&["mount", &s(&image), &s(&mnt)]);
    std::fs::write(mnt.join("synced"), b"before the kill\n").expect("w");
    assert!(Command::new("sync")
        .arg("-f")
        .arg(mnt.join("synced"))
        .status()
        .expect("sync")
        .success());
    let pid = img.records()[0]["pid"].as_u64().expect("a pid") as i32;
    // SAFETY: kill on the export's pid from its record.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    Patience::new("the export's death", Duration::from_millis(50))
        .wait_until(|| Ok(!Path::new(&format!("/proc/{pid}")).exists()))
        .expect("dead");
    // (Writable: the journal of a filesystem cut off mid-life is replayed
    // as it mounts.)
    let again = img.out(&["mount", &s(&image), &s(&mnt)]);
    assert!(
        again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("cleaned up a stale export"),
        "{again:?}"
    );
    assert_eq!(
        std::fs::read(mnt.join("synced")).expect("r"),
        b"before the kill\n"
    );
    img.ok(&["umount", &s(&mnt)]);
    assert!(img.records().is_empty());

    // img umount of a mount whose export was killed: done, and it says
    // what was lost and why (it failed before: "no image is mounted
    // there", after cleaning the mount up).
    img.ok(&["mount", &s(&image), &s(&mnt)]);
    let pid = img.records()[0]["pid"].as_u64().expect("a pid") as i32;
    // SAFETY: kill on the export's pid from its record.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    Patience::new("the export's death", Duration::from_millis(50))
        .wait_until(|| Ok(!Path::new(&format!("/proc/{pid}")).exists()))
        .expect("dead");
    let out = img.out(&["umount", &s(&mnt)]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && said.contains("is unmounted")
            && said.contains("since its last sync"),
        "{out:?}"
    );
    assert!(img.records().is_empty());

    // A read-only export refuses writes.
    let file = fx.path("ro.raw");
    let export = img.export(&image, &file, true, 256 << 20);
    let opened = std::fs::OpenOptions::new().write(true).open(&file);
    assert!(opened.is_err(), "a read-only export opened for writing");
    drop(export);
}

#[test]
fn a_vm_backend_and_a_writable_export_of_one_image_refuse_each_other() {
    if !fs_ready("fs_locks") {
        return;
    }
    let fx = Fixture::new();
    let img = Img::new(&fx);
    let image = fx.path("fs.img");
    img.ok(&["create", "-q", "--fs", "ext4", &s(&image), "64M"]);
    let mnt = fx.path("mnt");
    std::fs::create_dir(&mnt).expect("mnt");

    // A VM's backend serving it writable: no writable export, no mount.
    let sock = fx.path("disk.sock");
    let backend = BlkBackendProcess::start(&bin("blk-backend"), &image, &sock, 1, false)
        .expect("blk-backend");
    for args in [
        vec!["export".to_string(), s(&image), s(&fx.path("x.raw"))],
        vec!["mount".to_string(), s(&image), s(&mnt)],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let refused = img.out(&args);
        let why = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success()
                && why.contains(&format!("open for writing by process {}", backend.pid())),
            "img {args:?}: {why}"
        );
    }
    assert!(!is_mountpoint(&mnt));
    drop(backend);

    // A mount holding it: the backend refuses to serve it.
    img.ok(&["mount", &s(&image), &s(&mnt)]);
    let pid = img.records()[0]["pid"].as_u64().expect("a pid");
    let out = Command::new(bin("blk-backend"))
        .arg("--export")
        .arg(format!("socket={},image={}", s(&sock), s(&image)))
        .output()
        .expect("blk-backend");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && why.contains(&format!("process {pid}")),
        "{why}"
    );
    img.ok(&["umount", &s(&mnt)]);
}

#[test]
fn a_debian_root_filesystem_built_from_packages_checks_clean_and_holds_its_system() {
    if !fs_ready("fs_debian_rootfs") {
        return;
    }
    if !which("debootstrap") {
        println!("SKIPPED: fs_debian_rootfs: needs debootstrap (apt-get install debootstrap)");
        return;
    }
    // Built once (debootstrap from Debian's mirror, then img create --fs
    // ext4 --from): a few minutes; kept in target/rootfs.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .to_path_buf();
    let built = output_within(
        Command::new("bash")
            .arg(root.join("guest-artifacts/rootfs/build.sh"))
            .arg(bin("img")),
        &Patience::new(
            "building the Debian root filesystem",
            Duration::from_secs(240),
        ),
    )
    .expect("the rootfs builder runs");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let image = PathBuf::from(
        String::from_utf8_lossy(&built.stdout)
            .lines()
            .last()
            .expect("a path")
            .trim(),
    );
    let fx = Fixture::new();
    let img = Img::new(&fx);
    // Sparse: 2 GiB virtual, the system's few hundred MiB allocated.
    let used = allocated(&[&image]);
    assert!(used < 1 << 30, "the image takes {used} bytes");
    img.ok(&["check", &s(&image)]);
    let fsck = img.out(&["fsck", "-q", &s(&image)]);
    assert_eq!(fsck.status.code(), Some(0), "{fsck:?}");
    // Read through a clone of it, as a VM would get one.
    let golden = fx.path("golden.img");
    std::fs::copy(&image, &golden).expect("copy");
    img.ok(&["snapshot", "-c", "base", &s(&golden)]);
    let clone = fx.path("vm.img");
    img.ok(&["clone", &format!("{}@base", s(&golden)), &s(&clone)]);
    let mnt = fx.path("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    img.ok(&["mount", "--readonly", &s(&clone), &s(&mnt)]);
    let os = std::fs::read_to_string(mnt.join("etc/os-release")).expect("os-release");
    assert!(os.contains("VERSION_CODENAME=bookworm"), "{os}");
    let init = std::fs::read_link(mnt.join("sbin/init")).expect("/sbin/init");
    assert!(s(&init).contains("systemd"), "{}", init.display());
    assert!(mnt.join("usr/bin/apt").is_file());
    let fstab = std::fs::read_to_string(mnt.join("etc/fstab")).expect("fstab");
    assert!(fstab.contains("LABEL=rootfs / ext4"), "{fstab}");
    img.ok(&["umount", &s(&mnt)]);
}

/// One piece of a writer's work: bytes written at an offset, or a hole
/// punched there.
enum Change {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
}

#[test]
fn concurrent_writes_through_an_export_land_as_written_copy_on_write_included() {
    if !fs_ready("fs_export_concurrent_writes") {
        return;
    }
    use std::os::unix::fs::FileExt;
    const SIZE: u64 = 32 << 20;
    const BLOCK: u64 = 64 << 10;
    const PAGE: u64 = 4096;
    const WRITERS: u64 = 4;
    let fx = Fixture::new();
    let img = Img::new(&fx);
    // A sealed base (data in the first half, nothing in the second) and a
    // clone of it: every first write to a block is a copy-on-write.
    // Seeded: a failure is the same run again.
    let mut rng = StdRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let bytes = |rng: &mut StdRng, len: usize| {
        let mut b = vec![0u8; len];
        rng.fill_bytes(&mut b);
        b
    };
    let mut model = bytes(&mut rng, (SIZE / 2) as usize);
    model.resize(SIZE as usize, 0);
    let raw = fx.path("base.raw");
    std::fs::write(&raw, &model[..(SIZE / 2) as usize]).expect("w");
    std::fs::File::options()
        .write(true)
        .open(&raw)
        .and_then(|f| f.set_len(SIZE))
        .expect("grow");
    let base = fx.path("base.img");
    img.ok(&["convert", "-q", "-O", "snap", &s(&raw), &s(&base)]);
    img.ok(&["snapshot", "-c", "golden", &s(&base)]);
    let golden = format!("{}@golden", s(&base));
    let clone = fx.path("clone.img");
    img.ok(&["clone", &golden, &s(&clone)]);
    let sealed_before = std::fs::read(&golden).expect("read the base");

    // Disjoint ranges of any length and alignment, dealt to the writers in
    // turn: neighbours, often in one block, are written by different
    // writers at once (two copy-on-writes of one block racing); some are
    // whole aligned blocks, some holes punched. Writers 0 and 1 write with
    // O_DIRECT (whole pages: the export's parallel direct writes), 2 and
    // 3 through the page cache (any offset and length).
    let direct = |writer: u64| writer < 2;
    let mut work: Vec<Vec<Change>> = (0..WRITERS).map(|_| Vec::new()).collect();
    let mut at = 0;
    let mut i = 0;
    while at < SIZE {
        let (mut start, mut len) = match rng.gen_range(0..6) {
            0 => {
                let start = at.next_multiple_of(BLOCK);
                (start, BLOCK * rng.gen_range(1..=4))
            }
            _ => (at + rng.gen_range(0..4096), rng.gen_range(1..=3 * BLOCK)),
        };
        if direct(i % WRITERS) {
            start = start.next_multiple_of(PAGE);
            len = len.next_multiple_of(PAGE);
        }
        if start >= SIZE {
            break;
        }
        let len = len.min(SIZE - start);
        let change = if rng.gen_range(0..10) == 0 {
            Change::Punch(start, len)
        } else {
            Change::Write(start, bytes(&mut rng, len as usize))
        };
        work[(i % WRITERS) as usize].push(change);
        at = start + len;
        i += 1;
    }
    assert!(i > 100, "{i} ranges");

    let file = fx.path("clone.raw");
    let export = img.export(&clone, &file, false, SIZE);
    let start = std::sync::Barrier::new(WRITERS as usize);
    std::thread::scope(|scope| {
        for (writer, changes) in work.iter().enumerate() {
            let (file, start) = (&file, &start);
            scope.spawn(move || {
                let mut options = std::fs::File::options();
                options.write(true);
                if direct(writer as u64) {
                    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_DIRECT);
                }
                let f = options.open(file).expect("open the export");
                // O_DIRECT's buffer: page-aligned.
                let mut staging = vec![0u8; (4 * BLOCK + PAGE) as usize];
                let aligned = staging.as_ptr().align_offset(PAGE as usize);
                start.wait();
                for c in changes {
                    match c {
                        Change::Write(offset, data) if direct(writer as u64) => {
                            let buf = &mut staging[aligned..aligned + data.len()];
                            buf.copy_from_slice(data);
                            f.write_all_at(buf, *offset).expect("direct write")
                        }
                        Change::Write(offset, data) => {
                            f.write_all_at(data, *offset).expect("write")
                        }
                        Change::Punch(offset, len) => {
                            // SAFETY: fallocate on a descriptor we own.
                            let r = unsafe {
                                libc::fallocate(
                                    std::os::fd::AsRawFd::as_raw_fd(&f),
                                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                    *offset as i64,
                                    *len as i64,
                                )
                            };
                            assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
                        }
                    }
                }
                f.sync_all().expect("fsync");
            });
        }
    });
    for c in work.iter().flatten() {
        match c {
            Change::Write(offset, data) => {
                model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
            }
            Change::Punch(offset, len) => {
                model[*offset as usize..(*offset + *len) as usize].fill(0)
            }
        }
    }
    let first_difference = |got: &[u8]| got.iter().zip(&model).position(|(a, b)| a != b);
    let served = std::fs::read(&file).expect("read the export");
    assert_eq!(first_difference(&served), None, "through the export");

    // Ended (SIGTERM: flushed and closed); what the image holds.
    img.end(export);
    img.ok(&["check", &s(&clone)]);
    let out = fx.path("out.raw");
    img.ok(&["convert", "-q", "-O", "raw", &s(&clone), &s(&out)]);
    let stored = std::fs::read(&out).expect("read");
    assert_eq!(stored.len() as u64, SIZE);
    assert_eq!(first_difference(&stored), None, "in the image");
    assert!(
        std::fs::read(&golden).expect("read the base") == sealed_before,
        "the sealed base changed"
    );
}

#[test]
fn an_export_answers_seek_data_and_seek_hole_from_the_chain() {
    if !fs_ready("fs_export_lseek") {
        return;
    }
    use std::os::fd::AsRawFd;
    const MIB: u64 = 1 << 20;
    let fx = Fixture::new();
    let img = Img::new(&fx);
    // Data at 8 MiB in the base, at 40 MiB in the clone on it; the rest
    // held by no layer.
    let raw = fx.path("base.raw");
    let mut bytes = vec![0u8; (64 * MIB) as usize];
    bytes[(8 * MIB) as usize..(9 * MIB) as usize].fill(0xa5);
    std::fs::write(&raw, &bytes).expect("w");
    let base = fx.path("base.img");
    img.ok(&["convert", "-q", "-O", "snap", &s(&raw), &s(&base)]);
    img.ok(&["snapshot", "-c", "s", &s(&base)]);
    let clone = fx.path("clone.img");
    img.ok(&["clone", &format!("{}@s", s(&base)), &s(&clone)]);
    let file = fx.path("clone.raw");
    let export = img.export(&clone, &file, false, 64 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options()
            .write(true)
            .open(&file)
            .expect("open");
        f.write_all_at(&vec![0x5a; MIB as usize], 40 * MIB)
            .expect("w");
        f.sync_all().expect("fsync");
    }
    let f = std::fs::File::open(&file).expect("open");
    let seek = |offset: u64, whence: i32| -> Result<u64, i32> {
        // SAFETY: lseek on a descriptor we own; no memory is touched.
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset as i64, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(r as u64)
        }
    };
    let (data, hole) = (libc::SEEK_DATA, libc::SEEK_HOLE);
    assert_eq!(seek(0, data), Ok(8 * MIB));
    assert_eq!(seek(0, hole), Ok(0));
    assert_eq!(seek(8 * MIB + 5, data), Ok(8 * MIB + 5));
    assert_eq!(seek(8 * MIB, hole), Ok(9 * MIB));
    assert_eq!(seek(9 * MIB, data), Ok(40 * MIB), "the clone's own data");
    assert_eq!(seek(40 * MIB, hole), Ok(41 * MIB));
    assert_eq!(seek(41 * MIB, data), Err(libc::ENXIO));
    assert_eq!(seek(41 * MIB, hole), Ok(41 * MIB));
    assert_eq!(seek(64 * MIB, data), Err(libc::ENXIO));
    // A sparse copy takes only the data (and equals the file).
    let copy = fx.path("copy.raw");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&file)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(st.success());
    let allocated = std::fs::metadata(&copy).expect("stat").blocks() * 512;
    assert!(allocated <= 4 * MIB, "{allocated} bytes allocated");
    drop(f);
    img.end(export);
    img.ok(&["check", &s(&clone)]);
}
