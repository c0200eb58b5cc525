//! A sealed layer knows every layer made on it, in whatever directory
//! (vmctl keeps clones in each VM's own): `img snapshot -d` and `img
//! commit` refuse to break one, notes that name nothing any more are
//! pruned, and a layer made before notes existed is noted when it is next
//! opened for writing.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use image_format::disk::Disk;
use image_format::RealEnv;

fn img(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_img"))
        .args(args)
        .output()
        .expect("run img")
}

fn ok(args: &[&str]) -> String {
    let o = img(args);
    assert!(
        o.status.success(),
        "img {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `img ARGS` must fail; its error text.
fn refused(args: &[&str]) -> String {
    let o = img(args);
    assert!(!o.status.success(), "img {args:?} should have been refused");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The notes beside `dir`'s layers.
fn notes(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".child-"))
        .collect();
    v.sort();
    v
}

/// pb.img@gold in one directory, the working image pb.img on it, and a
/// clone of gold in another directory (as `vmctl create --image
/// pb.img@gold` makes).
struct Setup {
    _tmp: tempfile::TempDir,
    images: std::path::PathBuf,
    vms: std::path::PathBuf,
    pb: std::path::PathBuf,
    gold: std::path::PathBuf,
    clone: std::path::PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tmp");
    let images = tmp.path().join("images");
    let vms = tmp.path().join("vms/pbvm");
    std::fs::create_dir_all(&images).expect("mkdir");
    std::fs::create_dir_all(&vms).expect("mkdir");
    let pb = images.join("pb.img");
    ok(&["create", s(&pb), "4M"]);
    ok(&["snapshot", "-c", "gold", s(&pb)]);
    let gold = images.join("pb.img@gold");
    let clone = vms.join("disk.img");
    ok(&["clone", s(&gold), s(&clone)]);
    Setup {
        _tmp: tmp,
        images,
        vms,
        pb,
        gold,
        clone,
    }
}

#[test]
fn a_clone_in_another_directory_keeps_its_parent() {
    let t = setup();
    // Deleting gold would fold it into pb.img and leave the clone without
    // its parent: refused, naming the clone.
    let err = refused(&["snapshot", "-d", "gold", s(&t.pb)]);
    assert!(err.contains(s(&t.clone)), "names the clone: {err}");
    assert!(t.gold.exists());
    // Committing another clone of gold into it would change gold under
    // the clone.
    let other = t.images.join("other.img");
    ok(&["create", "-b", s(&t.gold), s(&other)]);
    let mut d = Disk::open(Arc::new(RealEnv), &other, true).expect("open");
    d.write_at(&[9u8; 4096], 0).expect("write");
    d.close().expect("close");
    let err = refused(&["commit", s(&other)]);
    assert!(err.contains(s(&t.clone)), "names the clone: {err}");
    std::fs::remove_file(t.images.join("other.img")).expect("rm");

    // The clone still opens, its chain whole.
    ok(&["check", s(&t.clone)]);

    // A snapshot of the clone, taken in its own directory: what stands on
    // gold is the snapshot now, and it is what gold's deletion names.
    ok(&["snapshot", "-c", "s1", s(&t.clone)]);
    let snap = t.vms.join("disk.img@s1");
    let err = refused(&["snapshot", "-d", "gold", s(&t.pb)]);
    assert!(err.contains(s(&snap)), "names the clone's snapshot: {err}");

    // Once the clone and its snapshot are gone, their notes name nothing:
    // pruned, and gold can go.
    std::fs::remove_dir_all(&t.vms).expect("rm");
    ok(&["snapshot", "-d", "gold", s(&t.pb)]);
    assert!(!t.gold.exists());
    assert_eq!(notes(&t.images), Vec::<String>::new(), "stale notes pruned");
    ok(&["check", s(&t.pb)]);
}

#[test]
fn a_clone_rebased_elsewhere_no_longer_holds_its_old_parent() {
    let t = setup();
    ok(&["create", s(&t.images.join("base2.img")), "4M"]);
    ok(&["snapshot", "-c", "g2", s(&t.images.join("base2.img"))]);
    let g2 = t.images.join("base2.img@g2");
    ok(&["rebase", "-b", s(&g2), s(&t.clone)]);
    // gold has no dependant but pb.img itself now.
    ok(&["snapshot", "-d", "gold", s(&t.pb)]);
    // g2 knows the clone.
    let err = refused(&["snapshot", "-d", "g2", s(&t.images.join("base2.img"))]);
    assert!(err.contains(s(&t.clone)), "names the clone: {err}");
}

#[test]
fn a_clone_without_a_note_is_noted_when_opened_for_writing() {
    let t = setup();
    // As a layer made before notes existed: its note removed.
    for n in notes(&t.images) {
        std::fs::remove_file(t.images.join(n)).expect("rm");
    }
    // Opened for writing (what blk-backend does when it serves it).
    let mut d = Disk::open(Arc::new(RealEnv), &t.clone, true).expect("open");
    d.write_at(&[7u8; 4096], 0).expect("write");
    d.close().expect("close");
    assert_eq!(notes(&t.images).len(), 1, "noted again");
    let err = refused(&["snapshot", "-d", "gold", s(&t.pb)]);
    assert!(err.contains(s(&t.clone)), "names the clone: {err}");
}

#[test]
fn a_moved_clone_is_found_at_its_new_place_once_written() {
    let t = setup();
    let moved_dir = t.vms.parent().expect("vms").join("pbvm2");
    std::fs::create_dir_all(&moved_dir).expect("mkdir");
    let moved = moved_dir.join("disk.img");
    std::fs::rename(&t.clone, &moved).expect("mv");
    let mut d = Disk::open(Arc::new(RealEnv), &moved, true).expect("open");
    d.write_at(&[7u8; 4096], 0).expect("write");
    d.close().expect("close");
    let err = refused(&["snapshot", "-d", "gold", s(&t.pb)]);
    assert!(
        err.contains(s(&moved)),
        "names the clone where it is: {err}"
    );
}

/// No verb makes a chain deeper than what the readers open; one found
/// too deep (made by hand, or by an older version) is refused with the
/// rebase that shortens it, which works.
#[test]
fn chains_stop_at_what_the_readers_open() {
    use image_format::disk::MAX_DEPTH;
    use image_format::{ops, Layer, VolatileEnv};
    let tmp = tempfile::tempdir().expect("tmp");
    let env: Arc<dyn image_format::Env> = Arc::new(VolatileEnv);
    let top = tmp.path().join("deep.img");
    ops::create(&*env, &top, Some(1 << 20), 4096, None).expect("create");
    // One snapshot a layer: a chain of MAX_DEPTH layers, the most that
    // opens, each snapshot with a block of its own.
    for i in 1..MAX_DEPTH {
        let mut d = Disk::open(Arc::clone(&env), &top, true).expect("open");
        d.write_at(&[i as u8; 4096], (i as u64 % 200) * 4096)
            .expect("write");
        d.close().expect("close");
        ops::snapshot_create(&*env, &top, &format!("s{i}")).expect("snapshot");
    }
    assert_eq!(
        image_format::disk::open_chain(&*env, &top, false)
            .expect("opens")
            .len(),
        MAX_DEPTH
    );
    // One more snapshot, a clone, a rebase -u onto the deepest: refused,
    // naming the way out, nothing written.
    let listed = std::fs::read_dir(tmp.path()).expect("dir").count();
    let err = ops::snapshot_create(&*env, &top, "one-more")
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("250 layers deep") && err.contains("img snapshot -d"),
        "{err}"
    );
    ops::create(
        &*env,
        &tmp.path().join("flat.img"),
        Some(1 << 20),
        4096,
        None,
    )
    .expect("create");
    let err = ops::rebase(
        &env,
        &tmp.path().join("flat.img"),
        Some(&top),
        true,
        false,
        &mut |_, _| {},
    )
    .expect_err("refused")
    .to_string();
    assert!(err.contains("one more would pass"), "{err}");
    std::fs::remove_file(tmp.path().join("flat.img")).expect("rm");
    assert_eq!(std::fs::read_dir(tmp.path()).expect("dir").count(), listed);

    // A chain one too deep, made by hand: the error names the rebase, and
    // the rebase it names gives a chain that opens with the same content.
    let before = {
        let d = Disk::open(Arc::clone(&env), &top, false).expect("open");
        let mut b = vec![0u8; 1 << 20];
        d.read_at(&mut b, 0).expect("read");
        b
    };
    let extra = tmp.path().join("extra.img");
    ops::create(&*env, &extra, Some(1 << 20), 4096, None).expect("create");
    let mut l = Layer::open(&*env, &extra, true).expect("open");
    let top_uuid = Layer::open(&*env, &top, false).expect("top").header.uuid;
    ops::ensure_sealed(&*env, &top).expect("seal the old top");
    // A clone of the sealed top would be one too deep: refused.
    let err = ops::clone(&*env, &top, &tmp.path().join("c.img"))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("one more would pass"), "{err}");
    assert!(!tmp.path().join("c.img").exists());
    l.update_header(|h| {
        h.parent_path = Some("deep.img".into());
        h.parent_uuid = Some(top_uuid);
    })
    .expect("by hand");
    drop(l);
    let err = Disk::open(Arc::clone(&env), &extra, false)
        .expect_err("too deep")
        .to_string();
    let grandparent = tmp.path().join(format!("deep.img@s{}", MAX_DEPTH - 1));
    assert!(
        err.contains(&format!("img rebase -b {}", grandparent.display())),
        "{err}"
    );
    ops::rebase(
        &env,
        &extra,
        Some(&grandparent),
        false,
        false,
        &mut |_, _| {},
    )
    .expect("the rebase it names");
    let d = Disk::open(Arc::clone(&env), &extra, false).expect("opens now");
    let mut after = vec![0u8; 1 << 20];
    d.read_at(&mut after, 0).expect("read");
    assert!(after == before, "the same content, one layer fewer");
}
