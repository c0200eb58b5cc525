//! The library's operations on real files: content is what it must be after
//! every operation, sealed layers never change, and bad input is refused
//! with an error that names the file and the problem, writing nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image_format::backup::{backup, restore};
use image_format::check::{check, RepairMode};
use image_format::header::SLOT_SIZE;
use image_format::sim::SimEnv;
use image_format::{ops, Disk, Env, Error, Layer, RealEnv, VolatileEnv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn env() -> Arc<dyn Env> {
    Arc::new(RealEnv)
}

fn nop() -> impl FnMut(u64, u64) {
    |_, _| {}
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

fn read_all(path: &Path) -> Vec<u8> {
    let d = Disk::open_path(path, false).expect("open");
    let mut buf = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut buf, 0).expect("read");
    buf
}

/// Not a CRC: a slot that carries its own CRC leaves a CRC of the file unchanged.
fn file_hash(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).expect("read file").hash(&mut h);
    h.finish()
}

struct Dir(tempfile::TempDir);
impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().expect("tempdir"))
    }
    fn p(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// A base image with data in a few places, closed.
fn make_base(d: &Dir, name: &str, size: u64) -> (PathBuf, Vec<u8>) {
    let path = d.p(name);
    ops::create(env().as_ref(), &path, Some(size), 4096, None).expect("create");
    let mut disk = Disk::open_path(&path, true).expect("open");
    let mut expect = vec![0u8; size as usize];
    for (i, off) in [0u64, size / 2 + 512, size - 8192].into_iter().enumerate() {
        let data = pattern(i as u64, 12_000.min((size - off) as usize));
        disk.write_at(&data, off).expect("write");
        expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    disk.close().expect("close");
    (path, expect)
}

#[test]
fn writes_read_back_across_reopen_and_zero_state_hides_the_parent() {
    let d = Dir::new();
    let (base, mut expect) = make_base(&d, "base.img", 16 * MIB);
    assert_eq!(read_all(&base), expect);
    let top = d.p("top.img");
    ops::clone(env().as_ref(), &base, &top).expect("clone");
    let mut disk = Disk::open_path(&top, true).expect("open");
    // Zero a range the parent has data in, partly unaligned.
    disk.write_zeroes(1000, 9000).expect("zero");
    expect[1000..10_000].fill(0);
    // Unaligned write over parent data.
    let data = pattern(9, 3000);
    disk.write_at(&data, 5 * MIB + 100).expect("write");
    expect[(5 * MIB + 100) as usize..(5 * MIB + 3100) as usize].copy_from_slice(&data);
    disk.close().expect("close");
    assert_eq!(read_all(&top), expect);
    let map = image_format::info::map(&env(), &top).expect("map");
    assert!(
        map.iter().any(|e| e.depth == 1 && e.data),
        "base still serves some data"
    );
}

/// A chain opened for writing and only read is not touched: no dirty mark
/// at open, nothing to clear at close (a fleet's read-only use of its
/// clones costs no header write and no sync).
#[test]
fn a_writable_chain_only_read_is_left_as_it_was() {
    let sim = SimEnv::new(1);
    let env: Arc<dyn Env> = Arc::new(sim.clone());
    ops::create(env.as_ref(), Path::new("base"), Some(4 * MIB), 4096, None).expect("create");
    ops::clone(env.as_ref(), Path::new("base"), Path::new("top")).expect("clone");
    let before = sim.write_count();
    let mut t = Disk::open(Arc::clone(&env), Path::new("top"), true).expect("open");
    let mut buf = vec![0u8; 4096];
    t.read_at(&mut buf, 0).expect("read");
    assert!(!t.writes_begun());
    t.flush().expect("a flush with nothing written");
    t.close().expect("close");
    assert_eq!(sim.write_count(), before, "no write for a read-only use");
    // The first write marks it dirty (durably, before the data), and a
    // clean close clears the mark.
    let mut t = Disk::open(Arc::clone(&env), Path::new("top"), true).expect("open");
    t.write_at(&[5u8; 4096], 0).expect("write");
    assert!(t.top().header.dirty());
    t.close().expect("close");
    let t = Disk::open(Arc::clone(&env), Path::new("top"), false).expect("open");
    assert!(!t.top().header.dirty());
}

#[test]
fn aligned_write_into_fresh_overlay_is_one_write_with_no_copy_up() {
    let sim = SimEnv::new(1);
    let env: Arc<dyn Env> = Arc::new(sim.clone());
    ops::create(env.as_ref(), Path::new("base"), Some(4 * MIB), 4096, None).expect("create");
    let mut b = Disk::open(Arc::clone(&env), Path::new("base"), true).expect("open");
    b.write_at(&vec![7u8; 64 * 1024], 0).expect("fill");
    b.close().expect("close");
    ops::clone(env.as_ref(), Path::new("base"), Path::new("top")).expect("clone");
    let mut t = Disk::open(Arc::clone(&env), Path::new("top"), true).expect("open");
    // The top's dirty mark (a header write) comes with the first write.
    t.begin_writes().expect("dirty mark");
    let before = sim.write_count();
    t.write_at(&[1u8; 4096], 8192).expect("aligned write");
    assert_eq!(
        sim.write_count() - before,
        1,
        "one positioned write, no copy-up"
    );
    let before = sim.write_count();
    t.write_at(&[2u8; 100], 16_384 + 10)
        .expect("unaligned write");
    assert_eq!(
        sim.write_count() - before,
        1,
        "the one block, completed from the parent"
    );
    let mut buf = vec![0u8; 4096];
    t.read_at(&mut buf, 16_384).expect("read");
    assert_eq!(&buf[..10], &[7u8; 10]);
    assert_eq!(&buf[10..110], &[2u8; 100]);
    assert_eq!(&buf[110..], &[7u8; 3986][..]);
}

#[test]
fn snapshot_keeps_content_and_the_sealed_layer_never_changes() {
    let d = Dir::new();
    let (img, expect) = make_base(&d, "vm.img", 8 * MIB);
    let snap = ops::snapshot_create(env().as_ref(), &img, "s1").expect("snapshot");
    assert_eq!(snap, d.p("vm.img@s1"));
    let sealed_hash = file_hash(&snap);
    assert_eq!(read_all(&img), expect);
    let mut disk = Disk::open_path(&img, true).expect("open top");
    disk.write_at(&[9u8; 8192], 0).expect("write");
    disk.write_zeroes(5 * MIB, MIB).expect("zero");
    disk.close().expect("close");
    assert_eq!(file_hash(&snap), sealed_hash, "sealed layer untouched");
    assert_eq!(read_all(&snap), expect);
    // A sealed layer refuses writers.
    let err = Disk::open_path(&snap, true).unwrap_err();
    assert!(matches!(err, Error::Sealed { .. }), "{err}");
    let list = ops::snapshot_list(env().as_ref(), &img).expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "s1");
    // Apply reverts; the newer snapshot stays listed (off the chain now),
    // and its content stays as it was.
    ops::snapshot_create(env().as_ref(), &img, "s2").expect("snapshot 2");
    let s2_content = read_all(&img);
    ops::snapshot_apply(env().as_ref(), &img, "s1").expect("apply");
    assert_eq!(read_all(&img), expect);
    let list = ops::snapshot_list(env().as_ref(), &img).expect("list");
    let seen: Vec<(&str, Option<usize>)> =
        list.iter().map(|s| (s.name.as_str(), s.depth)).collect();
    assert_eq!(seen, vec![("s1", Some(1)), ("s2", None)]);
    assert_eq!(read_all(&d.p("vm.img@s2")), s2_content);
    // s2 stands on s1: deleting s1 is refused, naming s2, and changes nothing.
    let err = ops::snapshot_delete(&env(), &img, "s1", &mut nop()).unwrap_err();
    assert!(err.to_string().contains("vm.img@s2"), "{err}");
    assert!(snap.exists());
    assert!(
        ops::snapshot_create(env().as_ref(), &img, "s2").is_err(),
        "the name is taken"
    );
    // Off the chain, s2 goes with its file; then s1 folds into vm.img.
    ops::snapshot_delete(&env(), &img, "s2", &mut nop()).expect("delete s2");
    assert!(!d.p("vm.img@s2").exists());
    ops::snapshot_delete(&env(), &img, "s1", &mut nop()).expect("delete");
    assert_eq!(read_all(&img), expect);
    assert!(!snap.exists());
    assert!(ops::snapshot_list(env().as_ref(), &img)
        .expect("list")
        .is_empty());
}

#[test]
fn clones_share_a_base_and_stay_independent() {
    let d = Dir::new();
    let (base, expect) = make_base(&d, "base.img", 8 * MIB);
    let base_hash = file_hash(&base);
    let mut clones = Vec::new();
    for k in 0..4 {
        let c = d.p(&format!("c{k}.img"));
        ops::clone(env().as_ref(), &base, &c).expect("clone");
        clones.push(c);
    }
    assert!(Layer::open(env().as_ref(), &base, false)
        .expect("open")
        .header
        .sealed());
    let base_hash_sealed = file_hash(&base);
    assert_ne!(base_hash, base_hash_sealed, "the clone sealed the base");
    // All open at once, each writing its own data at the same offset.
    let mut disks: Vec<Disk> = clones
        .iter()
        .map(|c| Disk::open_path(c, true).expect("open"))
        .collect();
    for (k, disk) in disks.iter_mut().enumerate() {
        disk.write_at(&vec![k as u8 + 1; 4096], 4096)
            .expect("write");
    }
    for (k, disk) in disks.into_iter().enumerate() {
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 4096).expect("read");
        assert_eq!(buf, vec![k as u8 + 1; 4096]);
        disk.close().expect("close");
    }
    assert_eq!(file_hash(&base), base_hash_sealed);
    assert_eq!(read_all(&base), expect);
}

/// A scratch clone (VolatileEnv: no flushes) is an ordinary image: it
/// reads as its base, grows, takes writes and checks clean through the
/// real filesystem's view.
#[test]
fn a_scratch_clone_is_an_ordinary_image() {
    let d = Dir::new();
    let (base, expect) = make_base(&d, "base.img", 8 * MIB);
    let c = d.p("scratch.img");
    ops::clone(&VolatileEnv, &base, &c).expect("clone");
    assert_eq!(read_all(&c), expect);
    ops::resize(&VolatileEnv, &c, 12 * MIB).expect("resize");
    let mut grown = expect.clone();
    grown.resize(12 * MIB as usize, 0);
    assert_eq!(read_all(&c), grown);
    let mut disk = Disk::open_path(&c, true).expect("open");
    disk.write_at(&[9u8; 4096], 10 * MIB).expect("write");
    disk.close().expect("close");
    grown[10 * MIB as usize..10 * MIB as usize + 4096].fill(9);
    assert_eq!(read_all(&c), grown);
    let report = check(env().as_ref(), &c, RepairMode::None).expect("check");
    assert_eq!(report.exit_code(), 0, "{report:?}");
    assert_eq!(read_all(&base), expect);
}

#[test]
fn commit_merges_into_the_parent_and_other_clones_are_told() {
    let d = Dir::new();
    let (base, mut expect) = make_base(&d, "base.img", 8 * MIB);
    let top = d.p("top.img");
    let other = d.p("other.img");
    ops::clone(env().as_ref(), &base, &top).expect("clone");
    ops::clone(env().as_ref(), &base, &other).expect("clone");
    let mut disk = Disk::open_path(&top, true).expect("open");
    let data = pattern(3, 70_000);
    disk.write_at(&data, 3 * MIB + 7).expect("write");
    expect[(3 * MIB + 7) as usize..(3 * MIB + 7) as usize + data.len()].copy_from_slice(&data);
    disk.write_zeroes(0, 8192).expect("zero");
    expect[..8192].fill(0);
    disk.close().expect("close");
    // other.img stands on the base too: refused, naming it, nothing changed.
    let base_hash = file_hash(&base);
    let err = ops::commit(env().as_ref(), &top, false, &mut nop()).unwrap_err();
    assert!(err.to_string().contains("other.img"), "{err}");
    assert_eq!(file_hash(&base), base_hash);
    Disk::open_path(&other, false).expect("the other clone still opens");
    // Forced, it goes ahead and the other clone is told why it cannot open.
    let stats = ops::commit(env().as_ref(), &top, true, &mut nop()).expect("commit");
    assert!(stats.data_bytes >= 70_000);
    assert_eq!(read_all(&top), expect);
    assert_eq!(read_all(&base), expect);
    let top_layer = Layer::open(env().as_ref(), &top, false).expect("open");
    assert_eq!(
        top_layer.load_map().expect("map").counts(),
        (0, 0),
        "top is empty"
    );
    let err = Disk::open_path(&other, false).unwrap_err();
    assert!(matches!(err, Error::ParentUuidMismatch { .. }), "{err}");
    assert!(err.to_string().contains("other.img"), "{err}");
    assert_eq!(
        check(env().as_ref(), &top, RepairMode::None)
            .expect("check")
            .exit_code(),
        0
    );
}

#[test]
fn rebase_keeps_content_unless_unsafe() {
    let d = Dir::new();
    let (base, _) = make_base(&d, "base.img", 8 * MIB);
    let top = d.p("top.img");
    ops::clone(env().as_ref(), &base, &top).expect("clone");
    let mut disk = Disk::open_path(&top, true).expect("open");
    disk.write_at(&[5u8; 4096], 2 * MIB).expect("write");
    disk.close().expect("close");
    let before = read_all(&top);
    // Onto nothing: everything the base served is copied up.
    ops::rebase(&env(), &top, None, false, false, &mut nop()).expect("rebase");
    assert_eq!(read_all(&top), before);
    assert!(Layer::open(env().as_ref(), &top, false)
        .expect("open")
        .header
        .parent_path
        .is_none());
    // Onto another base, safely: same content again.
    let other = d.p("other.img");
    ops::create(env().as_ref(), &other, Some(8 * MIB), 4096, None).expect("create");
    let mut o = Disk::open_path(&other, true).expect("open");
    o.write_at(&[0xeeu8; 65536], 0).expect("write");
    o.close().expect("close");
    ops::rebase(&env(), &top, Some(&other), false, false, &mut nop()).expect("rebase");
    assert_eq!(read_all(&top), before);
    // Unsafe: header only; content now shows the new base where top has nothing.
    let third = d.p("third.img");
    ops::create(env().as_ref(), &third, Some(8 * MIB), 4096, None).expect("create");
    let mut t = Disk::open_path(&third, true).expect("open");
    t.write_at(&[0x11u8; 4096], 7 * MIB).expect("write");
    t.close().expect("close");
    ops::rebase(&env(), &top, Some(&third), true, false, &mut nop()).expect("rebase -u");
    let after = read_all(&top);
    assert_eq!(
        &after[(7 * MIB) as usize..(7 * MIB + 4096) as usize],
        &[0x11u8; 4096][..]
    );
    // A base whose chain contains the layer itself is a cycle.
    let err = ops::rebase(&env(), &third, Some(&top), true, true, &mut nop()).unwrap_err();
    assert!(matches!(err, Error::Cycle { .. }), "{err}");
}

#[test]
fn backup_and_restore_full_and_delta() {
    let d = Dir::new();
    let (img, expect1) = make_base(&d, "vm.img", 16 * MIB);
    let s1 = ops::snapshot_create(env().as_ref(), &img, "s1").expect("snap");
    let mut disk = Disk::open_path(&img, true).expect("open");
    disk.write_at(&pattern(7, 200_000), 9 * MIB).expect("write");
    disk.write_zeroes(0, 4096).expect("zero");
    disk.close().expect("close");
    let s2 = ops::snapshot_create(env().as_ref(), &img, "s2").expect("snap");
    let expect2 = read_all(&s2);

    let full = d.p("s1.bak");
    let fs = backup(&env(), &s1, None, &full, &mut nop()).expect("backup");
    assert!(
        fs.file_bytes < 64 * 1024,
        "only allocated blocks: {}",
        fs.file_bytes
    );
    let delta = d.p("s2-since-s1.bak");
    let ds = backup(&env(), &s2, Some(&s1), &delta, &mut nop()).expect("delta");
    assert!(ds.zero_bytes >= 4096 && ds.data_bytes >= 200_000);
    assert!(
        ds.file_bytes < 300_000,
        "the delta holds the change only: {}",
        ds.file_bytes
    );

    let r1 = d.p("restored-s1.img");
    restore(&env(), &full, None, &r1, &mut nop()).expect("restore full");
    assert_eq!(read_all(&r1), expect1);
    let r2 = d.p("restored-s2.img");
    restore(&env(), &delta, Some(&r1), &r2, &mut nop()).expect("restore delta");
    assert_eq!(read_all(&r2), expect2);
    // The restored snapshot can be cloned and written like the original.
    ops::clone(env().as_ref(), &r2, &d.p("vm2.img")).expect("clone restored");

    // A delta on the wrong base, and damaged backups: refused, nothing left behind.
    let err = restore(&env(), &delta, Some(&s2), &d.p("x.img"), &mut nop()).unwrap_err();
    assert!(err.to_string().contains("is not the delta's base"), "{err}");
    let mut bytes = std::fs::read(&delta).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let bad = d.p("bad.bak");
    std::fs::write(&bad, &bytes).expect("write");
    let err = restore(&env(), &bad, Some(&r1), &d.p("y.img"), &mut nop()).unwrap_err();
    assert!(matches!(err, Error::BadBackup { .. }), "{err}");
    assert!(err.to_string().contains("bad.bak"), "{err}");
    std::fs::write(&bad, &bytes[..bytes.len() - 30]).expect("write");
    let err = restore(&env(), &bad, Some(&r1), &d.p("y.img"), &mut nop()).unwrap_err();
    assert!(matches!(err, Error::BadBackup { .. }), "{err}");
    assert!(!d.p("y.img").exists() && !d.p("x.img").exists());
    let leftovers: Vec<_> = std::fs::read_dir(d.0.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            // Notes of who stands on a layer are not temporary.
            n.starts_with('.') && !image_format::dependants::is_note(&n)
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // Backing up a writable top is refused: it is not one snapshot.
    let err = backup(&env(), &img, None, &d.p("z.bak"), &mut nop()).unwrap_err();
    assert!(err.to_string().contains("not sealed"), "{err}");
}

#[test]
fn check_finds_and_repair_fixes_invalid_map_entries_and_leaks() {
    let d = Dir::new();
    let (img, expect) = make_base(&d, "vm.img", 8 * MIB);
    let layer = Layer::open(env().as_ref(), &img, false).expect("open");
    let (map_off, data_off) = (layer.header.map_offset, layer.header.data_offset);
    drop(layer);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .expect("open");
    use std::os::unix::fs::FileExt;
    // Block 1000 gets the invalid state 3; data lands at block 1500 with no map entry.
    f.write_all_at(&[0b1100_0000], map_off + 250)
        .expect("poke map");
    f.write_all_at(&[0xaa; 4096], data_off + 1500 * 4096)
        .expect("leak");
    drop(f);
    let err = Disk::open_path(&img, false).unwrap_err();
    assert!(matches!(err, Error::CorruptMap { .. }), "{err}");
    assert!(err.to_string().contains("block 1003"), "{err}");
    let r = check(env().as_ref(), &img, RepairMode::None).expect("check");
    assert_eq!((r.corruptions, r.leaked_blocks, r.exit_code()), (1, 1, 2));
    let r = check(env().as_ref(), &img, RepairMode::All).expect("repair");
    assert_eq!(r.repaired, 2, "{r:?}");
    let r = check(env().as_ref(), &img, RepairMode::None).expect("check");
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(read_all(&img), expect);
}

#[test]
fn a_terabyte_image_is_tiny_and_works_at_its_far_end() {
    let d = Dir::new();
    let img = d.p("big.img");
    ops::create(env().as_ref(), &img, Some(1 << 40), 4096, None).expect("create");
    let disk_bytes = std::fs::metadata(&img).expect("stat").blocks() * 512;
    assert!(
        disk_bytes < MIB,
        "a new 1 TiB image takes {disk_bytes} bytes"
    );
    let mut disk = Disk::open_path(&img, true).expect("open");
    disk.write_at(&[3u8; 4096], (1 << 40) - 4096)
        .expect("write at the end");
    let err = disk.write_at(&[3u8; 4096], 1 << 40).unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    disk.close().expect("close");
    let disk = Disk::open_path(&img, false).expect("reopen");
    let mut buf = [0u8; 4096];
    disk.read_at(&mut buf, (1 << 40) - 4096).expect("read");
    assert_eq!(buf, [3u8; 4096]);
}

#[test]
fn merged_index_is_small_for_a_large_deep_chain() {
    use image_format::index::Index;
    // 100 GiB of 4 KiB blocks, depth 32, written in interleaved 64 KiB runs.
    let blocks = (100u64 << 30) / 4096;
    let mut idx = Index::new(blocks);
    let mut run = 0u64;
    while run * 16 < blocks {
        idx.set_range(run * 16, 16, (run % 32 + 1) as u8);
        run += 1;
    }
    assert!(idx.memory_bytes() < 16 << 20, "{}", idx.memory_bytes());
    assert_eq!(idx.mixed_chunks(), 0);
}

// ---- bad input ----

fn assert_refused(path: &Path, expect: &str) {
    let before = file_hash(path);
    let err = Disk::open_path(path, true).unwrap_err().to_string();
    assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    assert!(
        err.contains(
            &path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .to_string()
        ),
        "error names the file: {err}"
    );
    assert_eq!(file_hash(path), before, "nothing written");
}

#[test]
fn malformed_files_are_refused_with_the_file_and_the_reason() {
    let d = Dir::new();
    let (img, _) = make_base(&d, "good.img", 4 * MIB);
    let bytes = std::fs::read(&img).expect("read");

    let p = d.p("truncated.img");
    std::fs::write(&p, &bytes[..bytes.len() - 4096]).expect("write");
    assert_refused(&p, "truncated");

    let p = d.p("short.img");
    std::fs::write(&p, &bytes[..100]).expect("write");
    assert_refused(&p, "too short");

    let p = d.p("magic.img");
    let mut b = bytes.clone();
    b[..8].copy_from_slice(b"NOTMAGIC");
    b[SLOT_SIZE..SLOT_SIZE + 8].copy_from_slice(b"NOTMAGIC");
    std::fs::write(&p, &b).expect("write");
    assert_refused(&p, "wrong magic");

    let p = d.p("crc.img");
    let mut b = bytes.clone();
    for slot in [0, SLOT_SIZE] {
        b[slot + 40] ^= 0x10; // block size bits, checksum now wrong
    }
    std::fs::write(&p, &b).expect("write");
    assert_refused(&p, "checksum mismatch");

    let p = d.p("empty.img");
    std::fs::write(&p, b"").expect("write");
    assert_refused(&p, "too short");

    let err = Disk::open_path(&d.p("nonexistent.img"), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nonexistent.img") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn broken_chains_are_refused() {
    let d = Dir::new();
    let (base, _) = make_base(&d, "base.img", 4 * MIB);
    let top = d.p("top.img");
    ops::clone(env().as_ref(), &base, &top).expect("clone");

    // Missing parent.
    std::fs::rename(&base, d.p("moved.img")).expect("mv");
    assert_refused(&top, "parent");
    let err = Disk::open_path(&top, false).unwrap_err();
    assert!(matches!(err, Error::MissingParent { .. }), "{err}");
    std::fs::rename(d.p("moved.img"), &base).expect("mv back");

    // Parent whose uuid does not match: another image under the same name.
    std::fs::rename(&base, d.p("orig.img")).expect("mv");
    let (_, _) = make_base(&d, "base.img", 4 * MIB);
    ops::ensure_sealed(env().as_ref(), &base).expect("seal");
    assert_refused(&top, "expects");
    std::fs::rename(d.p("orig.img"), &base).expect("mv back");

    // A cycle: base's header pointed at top (crafted).
    let top_uuid = Layer::open(env().as_ref(), &top, false)
        .expect("open")
        .header
        .uuid;
    let mut b = Layer::open(env().as_ref(), &base, true).expect("open");
    b.update_header(|h| {
        h.parent_path = Some("top.img".into());
        h.parent_uuid = Some(top_uuid);
    })
    .expect("craft");
    drop(b);
    assert_refused(&top, "cycle");
    let mut b = Layer::open(env().as_ref(), &base, true).expect("open");
    b.update_header(|h| {
        h.parent_path = None;
        h.parent_uuid = None;
    })
    .expect("uncraft");
    drop(b);

    // A parent larger than its child.
    let big = d.p("big.img");
    ops::create(env().as_ref(), &big, Some(8 * MIB), 4096, None).expect("create");
    ops::ensure_sealed(env().as_ref(), &big).expect("seal");
    let small = d.p("small.img");
    let err = ops::create(env().as_ref(), &small, Some(4 * MIB), 4096, Some(&big)).unwrap_err();
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
    assert!(!small.exists(), "nothing created");

    // Writing a sealed layer, a too-large write, bad geometry.
    let err = Disk::open_path(&base, true).unwrap_err();
    assert!(matches!(err, Error::Sealed { .. }), "{err}");
    let err = ops::create(env().as_ref(), &d.p("odd.img"), Some(1000), 4096, None).unwrap_err();
    assert!(
        err.to_string().contains("multiple of the block size"),
        "{err}"
    );
    let err = ops::create(env().as_ref(), &d.p("odd.img"), Some(MIB), 3000, None).unwrap_err();
    assert!(err.to_string().contains("power of two"), "{err}");
    let err = ops::create(env().as_ref(), &top, Some(MIB), 4096, None).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn an_unwritable_file_is_refused_without_damage() {
    let d = Dir::new();
    let (img, _) = make_base(&d, "ro.img", 4 * MIB);
    // Root ignores permission bits; the immutable attribute still holds.
    let ok = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&img)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        println!(
            "SKIPPED: an_unwritable_file_is_refused_without_damage: chattr +i not available here"
        );
        return;
    }
    let before = file_hash(&img);
    let err = Disk::open_path(&img, true).unwrap_err().to_string();
    let _ = std::process::Command::new("chattr")
        .arg("-i")
        .arg(&img)
        .status();
    assert!(
        err.contains("ro.img") && err.contains("not permitted"),
        "{err}"
    );
    assert_eq!(file_hash(&img), before);
}

/// A process that dies without a flush (kill -9) loses nothing it completed
/// to the kernel when its successor adopts the crash shadow; without the
/// shadow (a reboot) the on-disk map stands and the parent shows through.
#[test]
fn a_crashed_writer_s_completed_writes_come_back_through_the_crash_shadow() {
    let d = Dir::new();
    let (base, expect) = make_base(&d, "base.img", 4 * MIB);
    let top = d.p("top.img");
    ops::clone(env().as_ref(), &base, &top).expect("clone");
    let shadows_root = Dir::new();
    let shadows = shadows_root.p("shadows");
    image_format::shadow::prepare_dir(&shadows).expect("a private directory");

    let mut disk = Disk::open_path(&top, true).expect("open");
    assert_eq!(disk.attach_crash_shadow(&shadows).expect("attach"), 0);
    let data = pattern(7, 8192);
    disk.write_at(&data, 0).expect("write");
    disk.write_zeroes(2 * MIB + 512, 4096).expect("zero");
    // Dies: no flush, no close.
    disk.simulate_kill();

    // The on-disk map alone (what a reboot leaves) still shows the parent.
    let fresh = Disk::open_path(&top, false).expect("open ro");
    let mut got = vec![0u8; 8192];
    fresh.read_at(&mut got, 0).expect("read");
    assert_eq!(got, expect[..8192]);
    drop(fresh);

    let mut disk = Disk::open_path(&top, true).expect("reopen");
    let adopted = disk.attach_crash_shadow(&shadows).expect("attach");
    assert!(adopted >= 3, "adopted {adopted} blocks");
    disk.read_at(&mut got, 0).expect("read");
    assert_eq!(got, data);
    let mut z = vec![1u8; 4096];
    disk.read_at(&mut z, 2 * MIB + 512).expect("read");
    assert!(z.iter().all(|&b| b == 0));
    disk.close().expect("close");
    assert!(
        std::fs::read_dir(&shadows).expect("dir").next().is_none(),
        "a clean close removes the shadow"
    );
    // Durable now: a plain reopen sees it.
    let fresh = Disk::open_path(&top, false).expect("open ro");
    fresh.read_at(&mut got, 0).expect("read");
    assert_eq!(got, data);
}

/// A copy of the index fed with the disk's changes resolves like the disk.
#[test]
fn a_chain_view_fed_with_index_changes_resolves_like_the_disk() {
    let d = Dir::new();
    let (base, _) = make_base(&d, "base.img", 4 * MIB);
    let top = d.p("top.img");
    ops::clone(env().as_ref(), &base, &top).expect("clone");
    let mut disk = Disk::open_path(&top, true).expect("open");
    disk.track_index_changes();
    let mut view = disk.view();
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..200 {
        let off = rng.gen_range(0..4 * MIB - 70_000) & !511;
        let len = rng.gen_range(1..64) * 1024;
        match rng.gen_range(0..3) {
            0 => disk.write_zeroes(off, len).expect("zero"),
            1 => disk
                .write_at(&pattern(off, len as usize), off)
                .expect("write"),
            _ => {
                let aligned = off & !4095;
                let (_, _) = disk.direct_write_target(aligned, 8192).expect("target");
                disk.note_written(aligned, 8192);
            }
        }
        for c in disk.take_index_changes() {
            view.apply(c);
        }
        let a: Vec<_> = disk.resolve(0, 4 * MIB).collect();
        let b: Vec<_> = view.resolve(0, 4 * MIB).collect();
        assert_eq!(a, b);
    }
    disk.note_written(0, 8192);
    disk.take_index_changes()
        .into_iter()
        .for_each(|c| view.apply(c));
    assert!(view.top_owns(0, 8192));
    disk.write_zeroes(4096, 4096).expect("zero");
    disk.take_index_changes()
        .into_iter()
        .for_each(|c| view.apply(c));
    assert!(view.top_owns(0, 4096) && !view.top_owns(0, 8192));
}

/// A base that a served clone stands on (its chain open, as a backend has
/// it) cannot be committed into, even by a forced commit of another clone:
/// the refusal names the lock's holder.
#[test]
fn a_base_in_use_under_a_served_clone_is_not_committed_into() {
    let d = Dir::new();
    let (base, expect) = make_base(&d, "base.img", 4 * MIB);
    let (served, other) = (d.p("served.img"), d.p("other.img"));
    ops::clone(env().as_ref(), &base, &served).expect("clone");
    ops::clone(env().as_ref(), &base, &other).expect("clone");
    let mut o = Disk::open_path(&other, true).expect("open");
    o.write_at(&pattern(11, 8192), 0).expect("write");
    o.close().expect("close");
    let live = Disk::open_path(&served, true).expect("served");
    let err = ops::commit(env().as_ref(), &other, true, &mut nop()).unwrap_err();
    assert!(
        err.to_string()
            .contains("in use as a base of a served chain by this process"),
        "{err}"
    );
    drop(live);
    assert_eq!(read_all(&base), expect, "nothing was written");
    assert_eq!(read_all(&served), expect);
}

/// `resize` grows a working image: old data stays, the new space reads as
/// zeros (past the base's end too); a fresh clone grows past its map's
/// space; shrinking, snapshots and a grow that would move data are refused
/// by name.
#[test]
fn resize_grows_a_working_image_and_refuses_what_it_cannot_do() {
    use image_format::{ops, Disk, RealEnv};
    let d = tempfile::tempdir().expect("dir");
    let base = d.path().join("base.img");
    ops::create(&RealEnv, &base, Some(8 << 20), 4096, None).expect("create");
    {
        let mut disk = Disk::open_path(&base, true).expect("open");
        disk.write_at(&[0xab; 4096], (8 << 20) - 4096)
            .expect("write");
        disk.close().expect("close");
    }
    let snap = ops::snapshot_create(&RealEnv, &base, "s").expect("snapshot");
    let clone = d.path().join("clone.img");
    ops::clone(&RealEnv, &snap, &clone).expect("clone");
    assert_eq!(
        ops::resize(&RealEnv, &clone, 16 << 20).expect("grow"),
        8 << 20
    );
    {
        let mut disk = Disk::open_path(&clone, true).expect("open");
        let mut buf = vec![1u8; 8192];
        disk.read_at(&mut buf, (8 << 20) - 4096).expect("read");
        assert_eq!(&buf[..4096], &[0xab; 4096][..], "the base's data");
        assert_eq!(&buf[4096..], &[0u8; 4096][..], "new space reads zeros");
        disk.write_at(&[0xcd; 4096], (16 << 20) - 4096)
            .expect("write at the new end");
        disk.close().expect("close");
    }
    let e = ops::resize(&RealEnv, &clone, 4 << 20).expect_err("shrink");
    assert!(e.to_string().contains("shrinking"), "{e}");
    let e = ops::resize(&RealEnv, &snap, 32 << 20).expect_err("snapshot");
    assert!(e.to_string().contains("snapshot"), "{e}");
    // 16 MiB of map covers 64 GiB: past that the data would have to move.
    let e = ops::resize(&RealEnv, &clone, 1 << 40).expect_err("data would move");
    assert!(e.to_string().contains("moved"), "{e}");
    // A fresh clone holds no data: its data area just moves.
    let fresh = d.path().join("fresh.img");
    ops::clone(&RealEnv, &snap, &fresh).expect("clone");
    ops::resize(&RealEnv, &fresh, 1 << 40).expect("grow a fresh clone");
    let disk = Disk::open_path(&fresh, false).expect("open");
    let mut buf = vec![1u8; 4096];
    disk.read_at(&mut buf, (8 << 20) - 4096).expect("read");
    assert_eq!(buf, vec![0xab; 4096]);
    disk.read_at(&mut buf, (1 << 40) - 4096)
        .expect("read the far end");
    assert_eq!(buf, vec![0u8; 4096]);
}
