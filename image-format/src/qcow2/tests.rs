//! These tests drive QEMU's own tools (`qemu-img`, `qemu-io`) to create reference images and
//! to check the images we write.

use super::*;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// A scratch directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("qcow2-test-{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs a QEMU tool in `dir`; panics with its output unless it exits 0.
fn run(dir: &TempDir, tool: &str, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .args(args)
        .current_dir(&dir.0)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_img(dir: &TempDir, args: &[&str]) -> Output {
    run(dir, "qemu-img", args)
}

/// Runs qemu-io on a qcow2 image with one `-c` per command.
fn qemu_io(dir: &TempDir, image: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for cmd in cmds {
        args.extend(["-c", cmd]);
    }
    args.push(image);
    let out = run(dir, "qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
}

/// The guest contents of `image` according to QEMU.
fn qemu_raw(dir: &TempDir, image: &str) -> Vec<u8> {
    qemu_img(dir, &["convert", "-O", "raw", image, "qemu-expected.raw"]);
    let data = fs::read(dir.join("qemu-expected.raw")).expect("read converted image");
    fs::remove_file(dir.join("qemu-expected.raw")).expect("remove converted image");
    data
}

/// Small deterministic PRNG (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn read_all(reader: &mut Qcow2Reader) -> Vec<u8> {
    let mut buf = vec![0u8; reader.virtual_size() as usize];
    reader.read_at(&mut buf, 0).expect("read whole image");
    buf
}

/// Extents must tile the requested range, be merged, and Zero runs must read as zeros.
fn check_extents(reader: &mut Qcow2Reader, expected: &[u8]) -> Vec<(u64, u64, Qcow2Extent)> {
    let size = reader.virtual_size();
    let extents = reader.extents(0, size).expect("extents");
    let mut pos = 0;
    for (i, &(start, len, kind)) in extents.iter().enumerate() {
        assert_eq!(start, pos, "extents must be consecutive: {extents:?}");
        assert!(len > 0);
        if i > 0 {
            assert_ne!(
                extents[i - 1].2,
                kind,
                "adjacent extents must be merged: {extents:?}"
            );
        }
        if kind == Qcow2Extent::Zero {
            assert!(
                is_zero(&expected[start as usize..(start + len) as usize]),
                "Zero extent with data at {start}"
            );
        }
        pos += len;
    }
    assert_eq!(pos, size);
    extents
}

fn kind_at(extents: &[(u64, u64, Qcow2Extent)], offset: u64) -> Qcow2Extent {
    extents
        .iter()
        .find(|&&(start, len, _)| start <= offset && offset < start + len)
        .map(|e| e.2)
        .expect("offset covered by extents")
}

/// Whole-image and random unaligned reads equal QEMU's view of the image.
fn assert_reads_match(reader: &mut Qcow2Reader, expected: &[u8], seed: u64) {
    assert_eq!(reader.virtual_size(), expected.len() as u64);
    assert!(
        read_all(reader) == expected,
        "whole-image read differs from qemu-img convert"
    );
    let mut rng = Rng(seed);
    for _ in 0..200 {
        let offset = rng.below(expected.len() as u64);
        let len = rng.below((expected.len() as u64 - offset).min(300 * KIB)) as usize;
        let mut buf = vec![0xeeu8; len];
        reader.read_at(&mut buf, offset).expect("random read");
        assert!(
            buf == expected[offset as usize..offset as usize + len],
            "read at {offset}+{len} differs"
        );
    }
}

#[test]
fn reads_images_written_by_qemu() {
    for (compat, cluster) in [
        ("0.10", "4k"),
        ("0.10", "64k"),
        ("1.1", "4k"),
        ("1.1", "64k"),
    ] {
        let dir = TempDir::new("qemu-written");
        let opts = format!("compat={compat},cluster_size={cluster}");
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "img.qcow2",
                "4M",
            ],
        );
        qemu_io(
            &dir,
            "img.qcow2",
            &[
                "write -P 0xab 0 64k",
                "write -z 1M 64k",
                "write -P 0x5a 100000 3000",
                "write -P 0x11 3M 700k",
                "write -z 3076k 8k",
                "write -P 0x22 4095k 1k",
            ],
        );
        let path = dir.join("img.qcow2");
        let expected = qemu_raw(&dir, "img.qcow2");
        let mut reader = Qcow2Reader::open(&path).expect("open");
        assert_eq!(
            reader.cluster_size(),
            if cluster == "4k" { 4096 } else { 65536 }
        );
        assert_reads_match(&mut reader, &expected, 1);

        let extents = check_extents(&mut reader, &expected);
        for offset in [
            0,
            63 * KIB,
            100000,
            3 * MIB,
            3 * MIB + 699 * KIB,
            4095 * KIB,
        ] {
            assert_eq!(
                kind_at(&extents, offset),
                Qcow2Extent::Data,
                "{opts} at {offset}: {extents:?}"
            );
        }
        assert_eq!(kind_at(&extents, 2 * MIB), Qcow2Extent::Zero, "{opts}");
        if compat == "1.1" {
            // v3 records `write -z` with the zero flag.
            assert_eq!(
                kind_at(&extents, MIB + 10),
                Qcow2Extent::Zero,
                "{opts}: {extents:?}"
            );
        }
        // Sub-range extents start and end exactly at the requested bounds.
        let part = reader.extents(1000, 5000).expect("partial extents");
        assert_eq!(part, vec![(1000, 5000, Qcow2Extent::Data)]);
        assert!(reader.extents(0, 0).expect("empty").is_empty());
    }
}

#[test]
fn reads_through_qcow2_backing_chain() {
    let dir = TempDir::new("chain");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(
        &dir,
        "base.qcow2",
        &["write -P 0xab 0 1M", "write -P 0xcd 3M 1M"],
    );
    // Top has smaller clusters and is larger than its base: past 4M it must read zeros.
    qemu_img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "6M",
        ],
    );
    qemu_io(
        &dir,
        "top.qcow2",
        &[
            "write -P 0x11 512k 6000",
            "write -z 3M 64k",
            "write -P 0x22 5M 4k",
            "write -P 0x33 4092k 8k",
        ],
    );
    let expected = qemu_raw(&dir, "top.qcow2");
    let mut reader = Qcow2Reader::open(&dir.join("top.qcow2")).expect("open");
    assert_eq!(reader.virtual_size(), 6 * MIB);
    assert_reads_match(&mut reader, &expected, 2);
    let extents = check_extents(&mut reader, &expected);
    assert_eq!(kind_at(&extents, 0), Qcow2Extent::Data); // from the base
    assert_eq!(kind_at(&extents, 512 * KIB), Qcow2Extent::Data); // from the top
    assert_eq!(kind_at(&extents, 2 * MIB), Qcow2Extent::Zero); // nowhere
    assert_eq!(kind_at(&extents, 3 * MIB), Qcow2Extent::Zero); // zero flag hides the base
    assert_eq!(kind_at(&extents, 3 * MIB + 64 * KIB), Qcow2Extent::Data); // base again
    assert_eq!(kind_at(&extents, 4 * MIB + 2 * KIB), Qcow2Extent::Data); // top, past base end
    assert_eq!(kind_at(&extents, 4 * MIB + 8 * KIB), Qcow2Extent::Zero); // past base end
    assert_eq!(kind_at(&extents, 5 * MIB), Qcow2Extent::Data);
}

#[test]
fn reads_through_raw_and_v2_backing() {
    let dir = TempDir::new("raw-chain");
    let mut base = vec![0u8; 2 * MIB as usize];
    Rng(7).fill(&mut base[..MIB as usize]);
    fs::write(dir.join("base.raw"), &base).expect("write base");
    qemu_img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "3M",
        ],
    );
    qemu_io(&dir, "mid.qcow2", &["write -P 0x44 1536k 1M"]);
    qemu_img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "3M",
        ],
    );
    qemu_io(&dir, "top.qcow2", &["write -P 0x55 100k 100k"]);
    let expected = qemu_raw(&dir, "top.qcow2");
    let mut reader = Qcow2Reader::open(&dir.join("top.qcow2")).expect("open");
    assert_reads_match(&mut reader, &expected, 3);
    let extents = check_extents(&mut reader, &expected);
    // The raw base counts as data over its whole length; past it only mid's writes do.
    assert_eq!(
        extents,
        vec![
            (0, 2560 * KIB, Qcow2Extent::Data),
            (2560 * KIB, 512 * KIB, Qcow2Extent::Zero)
        ]
    );
}

/// Renames the backing-format header extension so the reader has to probe the format.
fn hide_backing_format(path: &Path) {
    let mut data = fs::read(path).expect("read image");
    let ext = EXT_BACKING_FORMAT.to_be_bytes();
    let at = data[..4096]
        .windows(4)
        .position(|w| w == ext)
        .expect("backing format extension");
    data[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // unknown: skipped
    fs::write(path, data).expect("write image");
}

#[test]
fn probes_backing_format_when_not_recorded() {
    let dir = TempDir::new("probe");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    qemu_io(&dir, "base.qcow2", &["write -P 0x66 0 256k"]);
    fs::write(dir.join("base.raw"), vec![0x77u8; 512 * KIB as usize]).expect("write raw");
    for base in ["base.qcow2", "base.raw"] {
        let fmt = if base.ends_with("raw") {
            "raw"
        } else {
            "qcow2"
        };
        qemu_img(
            &dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base,
                "-F",
                fmt,
                "top.qcow2",
                "1M",
            ],
        );
        let expected = qemu_raw(&dir, "top.qcow2");
        hide_backing_format(&dir.join("top.qcow2"));
        let mut reader = Qcow2Reader::open(&dir.join("top.qcow2")).expect("open");
        assert!(
            read_all(&mut reader) == expected,
            "probed {base} reads differently"
        );
    }
}

#[test]
fn refuses_backing_loops() {
    let dir = TempDir::new("loops");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "self.qcow2", "1M"]);
    qemu_img(
        &dir,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    qemu_img(
        &dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M",
        ],
    );
    qemu_img(
        &dir,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    for image in ["self.qcow2", "a.qcow2", "b.qcow2"] {
        match Qcow2Reader::open(&dir.join(image)) {
            Err(Qcow2Error::Corrupt { what, .. }) => assert!(what.contains("loops"), "{what}"),
            other => panic!("{image}: expected a loop error, got {other:?}"),
        }
    }
    // A missing backing file is an I/O error naming it.
    qemu_img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "orphan.qcow2",
            "1M",
        ],
    );
    match Qcow2Reader::open(&dir.join("orphan.qcow2")) {
        Err(e @ Qcow2Error::Io { .. }) => assert!(e.to_string().contains("gone.qcow2"), "{e}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn refuses_deep_chains() {
    let dir = TempDir::new("deep");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "l0.qcow2", "1M"]);
    for i in 1..=MAX_BACKING_DEPTH + 1 {
        let (base, top) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        qemu_img(
            &dir,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", &base, "-F", "qcow2", &top, "1M",
            ],
        );
    }
    Qcow2Reader::open(&dir.join(&format!("l{MAX_BACKING_DEPTH}.qcow2")))
        .expect("64 backing files are fine");
    match Qcow2Reader::open(&dir.join(&format!("l{}.qcow2", MAX_BACKING_DEPTH + 1))) {
        Err(Qcow2Error::Unsupported { what, .. }) => {
            assert!(what.contains("backing chain"), "{what}")
        }
        other => panic!("expected a depth error, got {other:?}"),
    }
}

/// ORs `bits` into the v3 incompatible feature field of `path`.
fn set_incompatible(path: &Path, bits: u64) {
    let mut data = fs::read(path).expect("read image");
    let value = be_u64(&data, 72) | bits;
    data[72..80].copy_from_slice(&value.to_be_bytes());
    fs::write(path, data).expect("write image");
}

#[test]
fn feature_bits() {
    let dir = TempDir::new("features");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    qemu_io(&dir, "img.qcow2", &["write -P 0x99 4k 4k"]);
    let expected = qemu_raw(&dir, "img.qcow2");
    let path = dir.join("img.qcow2");

    // Dirty (lazy refcounts) images are readable.
    set_incompatible(&path, INCOMPAT_DIRTY);
    let mut reader = Qcow2Reader::open(&path).expect("dirty image opens");
    assert!(read_all(&mut reader) == expected);

    set_incompatible(&path, 1 << 10);
    assert!(matches!(
        Qcow2Reader::open(&path),
        Err(Qcow2Error::Unsupported { .. })
    ));
    set_incompatible(&path, INCOMPAT_CORRUPT);
    assert!(matches!(
        Qcow2Reader::open(&path),
        Err(Qcow2Error::Corrupt { .. })
    ));

    let cases: [(&str, &[&str]); 3] = [
        ("extended L2", &["-o", "extended_l2=on"]),
        ("external data file", &["-o", "data_file=data.raw"]),
        (
            "encryption",
            &[
                "--object",
                "secret,id=sec0,data=123456",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0",
            ],
        ),
    ];
    for (what, opts) in cases {
        let _ = fs::remove_file(dir.join("f.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend(["f.qcow2", "1M"]);
        qemu_img(&dir, &args);
        match Qcow2Reader::open(&dir.join("f.qcow2")) {
            Err(Qcow2Error::Unsupported { what: msg, .. }) => {
                assert!(msg.contains(what), "{msg}")
            }
            other => panic!("{what}: expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn refuses_compressed_clusters() {
    let dir = TempDir::new("compressed");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "1M"]);
    qemu_io(&dir, "src.qcow2", &["write -P 0x12 192k 64k"]);
    qemu_img(
        &dir,
        &["convert", "-c", "-O", "qcow2", "src.qcow2", "c.qcow2"],
    );
    let mut reader = Qcow2Reader::open(&dir.join("c.qcow2")).expect("compressed image opens");
    // Unallocated parts are still readable.
    let mut buf = vec![1u8; 64 * KIB as usize];
    reader
        .read_at(&mut buf, 0)
        .expect("read unallocated cluster");
    assert!(is_zero(&buf));
    for result in [
        reader.read_at(&mut buf, 200 * KIB).map(|_| ()),
        reader.extents(0, MIB).map(|_| ()),
    ] {
        match result {
            Err(e @ Qcow2Error::Unsupported { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("compressed") && msg.contains("196608"),
                    "{msg}"
                );
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
}

/// Overwrites bytes of `path` at `offset`.
fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for patching");
    file.write_all_at(bytes, offset).expect("patch");
}

fn open_and_read_all(path: &Path) -> Result<Vec<u8>, Qcow2Error> {
    let mut reader = Qcow2Reader::open(path)?;
    let mut buf = vec![0u8; reader.virtual_size().min(8 * MIB) as usize];
    reader.read_at(&mut buf, 0)?;
    reader.extents(0, reader.virtual_size())?;
    Ok(buf)
}

#[test]
fn hostile_headers() {
    let dir = TempDir::new("hostile");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "good.qcow2", "4M"]);
    qemu_io(
        &dir,
        "good.qcow2",
        &["write -P 0xab 0 64k", "write -P 0xcd 2M 64k"],
    );
    let good = fs::read(dir.join("good.qcow2")).expect("read image");
    let fresh = |name: &str| {
        let path = dir.join(name);
        fs::write(&path, &good).expect("copy image");
        path
    };
    let expect_corrupt = |path: &Path, needle: &str| match open_and_read_all(path) {
        Err(Qcow2Error::Corrupt { what, .. }) => {
            assert!(what.contains(needle), "{}: {what}", path.display())
        }
        other => panic!(
            "{}: expected Corrupt, got {:?}",
            path.display(),
            other.map(|b| b.len())
        ),
    };

    open_and_read_all(&fresh("copy.qcow2")).expect("unmodified copy reads");

    let empty = dir.join("empty.qcow2");
    fs::write(&empty, b"").expect("write");
    assert!(matches!(
        open_and_read_all(&empty),
        Err(Qcow2Error::NotQcow2 { .. })
    ));

    let magic = fresh("magic.qcow2");
    patch(&magic, 0, b"QFI\0");
    assert!(matches!(
        open_and_read_all(&magic),
        Err(Qcow2Error::NotQcow2 { .. })
    ));

    let version = fresh("version.qcow2");
    patch(&version, 4, &7u32.to_be_bytes());
    assert!(matches!(
        open_and_read_all(&version),
        Err(Qcow2Error::Unsupported { .. })
    ));

    // Truncated inside the header, inside the metadata, and inside the data.
    let header_cut = fresh("header-cut.qcow2");
    OpenOptions::new()
        .write(true)
        .open(&header_cut)
        .and_then(|f| f.set_len(50))
        .expect("truncate");
    expect_corrupt(&header_cut, "truncated");
    let l1_offset = be_u64(&good, 40);
    let meta_cut = fresh("meta-cut.qcow2");
    OpenOptions::new()
        .write(true)
        .open(&meta_cut)
        .and_then(|f| f.set_len(l1_offset))
        .expect("truncate");
    expect_corrupt(&meta_cut, "L1 table");
    let data_cut = fresh("data-cut.qcow2");
    OpenOptions::new()
        .write(true)
        .open(&data_cut)
        .and_then(|f| f.set_len(good.len() as u64 - 64 * KIB))
        .expect("truncate");
    expect_corrupt(&data_cut, "past the end of the file");

    let l1_far = fresh("l1-far.qcow2");
    patch(&l1_far, 40, &(1u64 << 40).to_be_bytes());
    expect_corrupt(&l1_far, "L1 table");

    let l1_huge = fresh("l1-huge.qcow2");
    patch(&l1_huge, 36, &u32::MAX.to_be_bytes());
    expect_corrupt(&l1_huge, "L1 table");

    let l1_small = fresh("l1-small.qcow2");
    patch(&l1_small, 24, &(1u64 << 62).to_be_bytes()); // virtual size the L1 cannot cover
    expect_corrupt(&l1_small, "L1 table");

    let l2_far = fresh("l2-far.qcow2");
    patch(
        &l2_far,
        l1_offset,
        &((1u64 << 40) | OFLAG_COPIED).to_be_bytes(),
    );
    expect_corrupt(&l2_far, "L2 table");

    let l2_shared = fresh("l2-shared.qcow2");
    qemu_img(
        &dir,
        &["resize", "-q", "-f", "qcow2", "l2-shared.qcow2", "1G"],
    ); // two L1 entries
    let resized = fs::read(&l2_shared).expect("read image");
    let l1 = be_u64(&resized, 40) as usize;
    patch(&l2_shared, l1 as u64 + 8, &resized[l1..l1 + 8]);
    expect_corrupt(&l2_shared, "several L1 entries");

    let l2_unaligned = fresh("l2-unaligned.qcow2");
    patch(
        &l2_unaligned,
        l1_offset,
        &(0x10200u64 | OFLAG_COPIED).to_be_bytes(),
    );
    expect_corrupt(&l2_unaligned, "not cluster aligned");

    let cluster_bits = fresh("cluster-bits.qcow2");
    patch(&cluster_bits, 20, &40u32.to_be_bytes());
    expect_corrupt(&cluster_bits, "cluster_bits");

    let ext = fresh("ext.qcow2");
    patch(
        &ext,
        be_u32(&good, 100).into(),
        &[0, 0, 0, 9, 0xff, 0xff, 0, 0],
    );
    expect_corrupt(&ext, "header extension");

    let backing = fresh("backing.qcow2");
    patch(&backing, 8, &65000u64.to_be_bytes());
    patch(&backing, 16, &1000u32.to_be_bytes());
    expect_corrupt(&backing, "backing file name");
}

/// Random corruption of the metadata must give errors, never panics or huge allocations.
#[test]
fn fuzzed_metadata_never_panics() {
    let dir = TempDir::new("fuzz");
    qemu_img(
        &dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "good.qcow2",
            "256k",
        ],
    );
    qemu_io(
        &dir,
        "good.qcow2",
        &[
            "write -P 0xab 0 8k",
            "write -P 0xcd 100k 30k",
            "write -z 200k 4k",
        ],
    );
    let good = fs::read(dir.join("good.qcow2")).expect("read image");
    let meta_end = 6 * 512; // header, refcount table and block, L1, L2
    let path = dir.join("fuzz.qcow2");
    let mut rng = Rng(0x5eed);
    let mut outcomes = [0usize; 2];
    for _ in 0..500 {
        let mut data = good.clone();
        // Mostly the header and the tables right after it, sometimes anywhere.
        let range = if rng.below(4) == 0 {
            data.len() as u64
        } else {
            meta_end
        };
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(range) as usize;
            data[at] ^= 1 << rng.below(8);
        }
        fs::write(&path, &data).expect("write fuzzed image");
        outcomes[usize::from(open_and_read_all(&path).is_ok())] += 1;
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

#[test]
fn out_of_range_accesses_fail() {
    let dir = TempDir::new("range");
    qemu_img(&dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    let mut reader = Qcow2Reader::open(&dir.join("img.qcow2")).expect("open");
    let mut buf = [0u8; 16];
    reader.read_at(&mut buf, MIB - 16).expect("read at the end");
    assert!(matches!(
        reader.read_at(&mut buf, MIB - 8),
        Err(Qcow2Error::OutOfRange { .. })
    ));
    assert!(matches!(
        reader.read_at(&mut buf, u64::MAX - 4),
        Err(Qcow2Error::OutOfRange { .. })
    ));
    assert!(matches!(
        reader.extents(MIB, 1),
        Err(Qcow2Error::OutOfRange { .. })
    ));

    let mut writer = Qcow2Writer::create(&dir.join("w.qcow2"), MIB, 65536).expect("create");
    assert!(matches!(
        writer.write_at(&buf, MIB - 8),
        Err(Qcow2Error::OutOfRange { .. })
    ));
}

#[test]
fn writer_rejects_bad_parameters() {
    let dir = TempDir::new("params");
    let path = dir.join("w.qcow2");
    for cs in [0, 256, 1000, 4 << 20] {
        assert!(
            matches!(
                Qcow2Writer::create(&path, MIB, cs),
                Err(Qcow2Error::InvalidArgument { .. })
            ),
            "{cs}"
        );
    }
    assert!(matches!(
        Qcow2Writer::create(&path, 1000, 65536),
        Err(Qcow2Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Qcow2Writer::create(&path, 1 << 62, 512),
        Err(Qcow2Error::InvalidArgument { .. })
    ));
}

/// `qemu-img check` must find no errors and no leaks (exit code 0; 3 would mean leaks).
fn assert_qemu_check_clean(dir: &TempDir, image: &str) {
    let out = qemu_img(dir, &["check", "-f", "qcow2", image]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No errors were found"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
}

/// Random writes through `Qcow2Writer`, mirrored into an in-memory raw image, then checked
/// by QEMU and read back through `Qcow2Reader`.
fn writer_round_trip(cluster_size: u32, virtual_size: u64, writes: usize, seed: u64) {
    let dir = TempDir::new(&format!("writer-{cluster_size}"));
    let mut rng = Rng(seed);
    let mut expected = vec![0u8; virtual_size as usize];
    let mut writer =
        Qcow2Writer::create(&dir.join("out.qcow2"), virtual_size, cluster_size).expect("create");
    let cs = u64::from(cluster_size);
    for i in 0..writes {
        let (offset, len) = match rng.below(4) {
            // cluster-aligned multi-cluster writes
            0 => {
                let offset = rng.below(virtual_size / cs) * cs;
                (offset, (rng.below(4) + 1) * cs)
            }
            // small unaligned writes
            1 => (rng.below(virtual_size), rng.below(3 * KIB) + 1),
            // larger unaligned writes, crossing several clusters
            _ => (rng.below(virtual_size), rng.below(256 * KIB) + 1),
        };
        let len = len.min(virtual_size - offset) as usize;
        let mut buf = vec![0u8; len];
        match i % 5 {
            0 => {} // zeros: allocate nothing new, overwrite existing data
            1 => {
                // data with a zero cluster-sized hole in the middle
                rng.fill(&mut buf);
                let mid = len / 2;
                buf[mid..(mid + cs as usize).min(len)].fill(0);
            }
            _ => rng.fill(&mut buf),
        }
        writer.write_at(&buf, offset).expect("write");
        expected[offset as usize..offset as usize + len].copy_from_slice(&buf);
    }
    writer.finish().expect("finish");
    fs::write(dir.join("expected.raw"), &expected).expect("write expected image");

    assert_qemu_check_clean(&dir, "out.qcow2");
    qemu_img(
        &dir,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "expected.raw",
            "out.qcow2",
        ],
    );
    assert!(qemu_raw(&dir, "out.qcow2") == expected);

    let mut reader = Qcow2Reader::open(&dir.join("out.qcow2")).expect("open written image");
    assert_eq!(reader.cluster_size(), cs);
    assert_reads_match(&mut reader, &expected, seed);
    check_extents(&mut reader, &expected);
}

#[test]
fn writer_64k_clusters() {
    writer_round_trip(65536, 32 * MIB, 300, 11);
}

#[test]
fn writer_4k_clusters() {
    writer_round_trip(4096, 16 * MIB + 512, 300, 12);
}

#[test]
fn writer_2m_clusters() {
    writer_round_trip(2 << 20, 12 * MIB, 60, 13);
}

/// 512-byte clusters: dozens of refcount blocks, a multi-cluster refcount table and L1.
#[test]
fn writer_512_byte_clusters_full_disk() {
    let dir = TempDir::new("writer-512-full");
    let size = 12 * MIB;
    let mut data = vec![0u8; size as usize];
    Rng(21).fill(&mut data);
    let mut writer = Qcow2Writer::create(&dir.join("out.qcow2"), size, 512).expect("create");
    // Write in a scrambled order of 64 KiB pieces.
    let pieces = (size / (64 * KIB)) as usize;
    let mut order: Vec<usize> = (0..pieces).collect();
    let mut rng = Rng(22);
    for i in (1..pieces).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for piece in order {
        let start = piece * 64 * KIB as usize;
        writer
            .write_at(&data[start..start + 64 * KIB as usize], start as u64)
            .expect("write");
    }
    writer.finish().expect("finish");
    fs::write(dir.join("expected.raw"), &data).expect("write expected image");
    assert_qemu_check_clean(&dir, "out.qcow2");
    qemu_img(
        &dir,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "expected.raw",
            "out.qcow2",
        ],
    );
    let header = fs::read(dir.join("out.qcow2")).expect("read image");
    assert!(
        be_u32(&header, 56) > 1,
        "refcount table should span several clusters"
    );
}

#[test]
fn writer_zero_writes_allocate_nothing() {
    let dir = TempDir::new("writer-zero");
    let path = dir.join("out.qcow2");
    let mut writer = Qcow2Writer::create(&path, 8 * MIB, 65536).expect("create");
    writer
        .write_at(&vec![0u8; 3 * MIB as usize], 1000)
        .expect("write zeros");
    writer.finish().expect("finish");
    // Header, L1, one refcount block, refcount table: no L2 tables, no data clusters.
    assert_eq!(fs::metadata(&path).expect("stat").len(), 4 * 65536);
    assert_qemu_check_clean(&dir, "out.qcow2");
    let mut reader = Qcow2Reader::open(&path).expect("open");
    assert_eq!(
        reader.extents(0, 8 * MIB).expect("extents"),
        vec![(0, 8 * MIB, Qcow2Extent::Zero)]
    );
}

#[test]
fn writer_empty_and_sparse_huge_disks() {
    let dir = TempDir::new("writer-sizes");
    Qcow2Writer::create(&dir.join("empty.qcow2"), 0, 65536)
        .expect("create")
        .finish()
        .expect("finish");
    assert_qemu_check_clean(&dir, "empty.qcow2");
    let reader = Qcow2Reader::open(&dir.join("empty.qcow2")).expect("open");
    assert_eq!(reader.virtual_size(), 0);

    // 1 TiB, a few scattered writes: several L2 tables far apart, one small file.
    let size = 1 << 40;
    let mut writer = Qcow2Writer::create(&dir.join("huge.qcow2"), size, 65536).expect("create");
    let writes = [
        (0u64, 0x11u8),
        (size / 3 + 12345, 0x22),
        (size - 4096, 0x33),
    ];
    for (offset, byte) in writes {
        writer.write_at(&[byte; 4096], offset).expect("write");
    }
    writer.finish().expect("finish");
    assert_qemu_check_clean(&dir, "huge.qcow2");
    let info = qemu_img(&dir, &["info", "--output=json", "huge.qcow2"]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("\"virtual-size\": 1099511627776"));
    let mut reader = Qcow2Reader::open(&dir.join("huge.qcow2")).expect("open");
    for (offset, byte) in writes {
        let mut buf = [0u8; 4097];
        let start = offset.min(size - 4097);
        reader.read_at(&mut buf, start).expect("read");
        let at = (offset - start) as usize;
        assert!(buf[at..at + 4096].iter().all(|&b| b == byte));
    }
    let extents = reader.extents(0, size).expect("extents");
    assert_eq!(
        extents.iter().filter(|e| e.2 == Qcow2Extent::Data).count(),
        3,
        "{extents:?}"
    );
}
