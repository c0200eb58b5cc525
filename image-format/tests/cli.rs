//! The `img` tool as users run it, against qemu-img as the reference: what
//! `img convert` writes, qemu-img reads identically, and the other way round.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn img(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_img"))
        .args(args)
        .output()
        .expect("run img")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn have_qemu_img() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok();
    if !found {
        println!("SKIPPED: qemu-img is not installed (apt-get install qemu-utils)");
    }
    found
}

fn qemu(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A raw file with random data in scattered runs and holes between.
fn raw_disk(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
    let mut r = StdRng::seed_from_u64(seed);
    for _ in 0..40 {
        let len = r.gen_range(1..200_000u64);
        let off = r.gen_range(0..size - len);
        let data: Vec<u8> = (0..len).map(|_| r.gen()).collect();
        f.write_all_at(&data, off).expect("write");
    }
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

#[test]
fn convert_round_trips_agree_with_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new();
    let raw = d.p("in.raw");
    raw_disk(&raw, 64 * MIB, 1);
    let snap = d.p("disk.snap");
    ok(img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "snap",
        s(&raw),
        s(&snap),
    ]));
    // raw -> snap -> raw
    let back = d.p("back.raw");
    ok(img(&["convert", "-O", "raw", s(&snap), s(&back)]));
    ok(qemu(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(&raw),
        s(&back),
    ]));
    // snap -> qcow2: qemu-img finds it clean and identical.
    let q = d.p("out.qcow2");
    ok(img(&["convert", "-O", "qcow2", s(&snap), s(&q)]));
    ok(qemu(&["check", s(&q)]));
    ok(qemu(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&raw),
        s(&q),
    ]));
    // qcow2 with a backing file made and written by QEMU -> snap -> raw,
    // against qemu-img's own raw export.
    let qb = d.p("qbase.qcow2");
    let qt = d.p("qtop.qcow2");
    ok(qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&qb),
    ]));
    ok(qemu(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "qbase.qcow2",
        "-F",
        "qcow2",
        s(&qt),
    ]));
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 300k",
            "-c",
            "write -z 8M 1M",
            s(&qt),
        ])
        .output()
        .expect("qemu-io"));
    let from_q = d.p("fromq.snap");
    ok(img(&[
        "convert",
        "-p",
        "-f",
        "qcow2",
        "-O",
        "snap",
        s(&qt),
        s(&from_q),
    ]));
    let ours = d.p("ours.raw");
    let theirs = d.p("theirs.raw");
    ok(img(&["convert", "-O", "raw", s(&from_q), s(&ours)]));
    ok(qemu(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(&qt),
        s(&theirs),
    ]));
    ok(qemu(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(&ours),
        s(&theirs),
    ]));
    // The converted image is sparse: holes were not written.
    let info: serde_json::Value =
        serde_json::from_str(&ok(img(&["info", "--output", "json", s(&snap)]))).expect("json");
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert!(info["chain"][0]["data-bytes"].as_u64().expect("bytes") < 16 * MIB);
}

#[test]
fn snapshot_clone_commit_through_the_tool() {
    let d = Dir::new();
    let raw = d.p("in.raw");
    raw_disk(&raw, 16 * MIB, 2);
    let vm = d.p("vm.img");
    ok(img(&["convert", "-O", "snap", s(&raw), s(&vm)]));
    ok(img(&["snapshot", "-c", "golden", s(&vm)]));
    let list: serde_json::Value =
        serde_json::from_str(&ok(img(&["snapshot", "-l", "--output", "json", s(&vm)])))
            .expect("json");
    assert_eq!(list[0]["name"], "golden");
    let golden = d.p("vm.img@golden");
    let clone = d.p("clone.img");
    let out: serde_json::Value = serde_json::from_str(&ok(img(&[
        "clone",
        "--output",
        "json",
        s(&golden),
        s(&clone),
    ])))
    .expect("json");
    assert!(out["uuid"].is_string());
    let m: serde_json::Value =
        serde_json::from_str(&ok(img(&["map", "--output", "json", s(&clone)]))).expect("json");
    assert!(m
        .as_array()
        .expect("rows")
        .iter()
        .any(|e| e["depth"] == 1 && e["data"] == true));
    // Commit a clone with nothing in it: the base stays the same content.
    ok(img(&["commit", s(&clone)]));
    let back = d.p("back.raw");
    ok(img(&["convert", "-O", "raw", s(&clone), s(&back)]));
    assert_eq!(
        std::fs::read(&raw).expect("r"),
        std::fs::read(&back).expect("r")
    );
    // check JSON and exit code on a clean chain.
    let c: serde_json::Value =
        serde_json::from_str(&ok(img(&["check", "--output", "json", s(&clone)]))).expect("json");
    assert_eq!(c["corruptions"], 0);
    // Backup and restore through the tool.
    let bak = d.p("golden.bak");
    ok(img(&["backup", "-p", s(&golden), s(&bak)]));
    let restored = d.p("restored.img");
    ok(img(&["restore", s(&bak), s(&restored)]));
    let back2 = d.p("back2.raw");
    ok(img(&["convert", "-O", "raw", s(&restored), s(&back2)]));
    assert_eq!(
        std::fs::read(&raw).expect("r"),
        std::fs::read(&back2).expect("r")
    );
}

#[test]
fn many_processes_read_clones_of_one_base_at_once() {
    let d = Dir::new();
    let raw = d.p("in.raw");
    raw_disk(&raw, 32 * MIB, 3);
    let base = d.p("base.img");
    ok(img(&["convert", "-O", "snap", s(&raw), s(&base)]));
    let mut children = Vec::new();
    for k in 0..6 {
        let c = d.p(&format!("c{k}.img"));
        ok(img(&["create", "-b", s(&base), s(&c)]));
        let out = d.p(&format!("c{k}.raw"));
        children.push((
            Command::new(env!("CARGO_BIN_EXE_img"))
                .args(["convert", "-O", "raw", s(&c), s(&out)])
                .spawn()
                .expect("spawn"),
            out,
        ));
    }
    let expect = std::fs::read(&raw).expect("read");
    for (mut child, out) in children {
        assert!(child.wait().expect("wait").success());
        assert_eq!(std::fs::read(&out).expect("read"), expect);
    }
}

#[test]
fn every_verb_has_help_and_bad_input_gets_a_clear_error() {
    for verb in [
        "create", "info", "map", "snapshot", "clone", "commit", "rebase", "check", "repair",
        "convert", "backup", "restore", "compare", "measure", "export", "mount", "umount", "fsck",
    ] {
        let out = ok(img(&[verb, "--help"]));
        assert!(out.contains("Usage"), "{verb}: {out}");
    }
    let d = Dir::new();
    let junk = d.p("junk.img");
    std::fs::write(&junk, vec![0x42u8; 10_000]).expect("write");
    let o = img(&["info", s(&junk)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("junk.img") && err.contains("wrong magic"),
        "{err}"
    );
    let o = img(&["create", s(&d.p("x.img")), "12Q"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown size suffix 'Q'"));
    // Sizes in the user's terms, not a header's.
    let o = img(&["create", s(&d.p("x.img")), "1k"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("virtual size 1024 is not a non-zero multiple of the block size 4096")
            && !err.contains("header"),
        "{err}"
    );
    // Each cause once.
    let o = img(&["info", s(&d.p("missing.img"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(o.status.code(), Some(1));
    let o = img(&["convert", "-O", "vmdk", s(&junk), s(&d.p("y"))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown format"));
    let o = img(&["check", s(&junk)]);
    assert_eq!(o.status.code(), Some(1));
    // Progress lines appear on a non-terminal stderr with -p.
    let raw = d.p("r.raw");
    raw_disk(&raw, 4 * MIB, 4);
    let o = img(&["convert", "-p", "-O", "snap", s(&raw), s(&d.p("r.img"))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("100.00/100%"));
}

/// The README's `img` block, run as written, in order, in a fresh directory
/// with `img` first on PATH: every line must succeed, and what it leaves
/// must check clean.
#[test]
fn the_readme_img_block_runs_as_written() {
    if !have_qemu_img() {
        return;
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let section = readme
        .split("## `img` in a few lines")
        .nth(1)
        .expect("the README's img section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its sh block");
    let d = Dir::new();
    // The qcow2 the block starts from, with data in it.
    ok(qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&d.p("debian.qcow2")),
        "64M",
    ]));
    let io = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 3M",
            s(&d.p("debian.qcow2")),
        ])
        .output()
        .expect("qemu-io");
    assert!(io.status.success(), "{io:?}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_img")).parent().expect("dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", line])
            .current_dir(d.0.path())
            .env("PATH", &path)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "README line failed: {line}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every image it made opens and checks clean; the content came through.
    for image in [
        "base.img",
        "base.img@golden",
        "vm17.img",
        "vm17.img@v1",
        "v1.img",
        "empty.img",
    ] {
        ok(img(&["check", s(&d.p(image))]));
    }
    let cmp = qemu(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        s(&d.p("debian.qcow2")),
        s(&d.p("out.qcow2")),
    ]);
    assert!(cmp.status.success(), "{cmp:?}");
}

/// The chain mistakes a user makes by hand are refused, say why, and
/// change nothing: cloning a working disk, committing an empty layer,
/// deleting a snapshot clones stand on.
#[test]
fn chain_mistakes_are_refused_and_change_nothing() {
    let d = Dir::new();
    let base = d.p("base.img");
    ok(img(&["create", s(&base), "16M"]));
    // Forgot the @NAME: the working disk is not sealed behind its back.
    let o = img(&["clone", s(&base), s(&d.p("new.img"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is a working disk, not a snapshot") && err.contains("--seal"),
        "{err}"
    );
    assert!(!d.p("new.img").exists());
    assert!(!ok(img(&["info", s(&base)])).contains("[sealed]"));
    // --seal NAME snapshots it first, and base.img goes on as an overlay.
    ok(img(&[
        "clone",
        "--seal",
        "golden",
        s(&base),
        s(&d.p("new.img")),
    ]));
    ok(img(&[
        "clone",
        s(&d.p("base.img@golden")),
        s(&d.p("other.img")),
    ]));
    let golden_uuid = || {
        let v: serde_json::Value = serde_json::from_str(&ok(img(&[
            "info",
            "--output",
            "json",
            s(&d.p("base.img@golden")),
        ])))
        .expect("json");
        v["chain"][0]["uuid"].as_str().expect("uuid").to_string()
    };
    let before = golden_uuid();
    // An empty clone commits nothing and changes no identity.
    let out = ok(img(&["commit", s(&d.p("new.img"))]));
    assert!(out.contains("Nothing to commit"), "{out}");
    assert_eq!(golden_uuid(), before);
    ok(img(&["check", s(&d.p("other.img"))]));
    // A snapshot clones stand on is not deleted from under them.
    let o = img(&["snapshot", "-d", "golden", s(&base)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("new.img") && err.contains("other.img"),
        "{err}"
    );
    assert!(d.p("base.img@golden").exists());
    for image in ["base.img", "new.img", "other.img"] {
        ok(img(&["check", s(&d.p(image))]));
    }
}

/// qemu-img's spellings work: long options, -f snap, -q, -U; a usage error
/// exits 1, never 2 or 3 (check's "corrupt" and "leaks").
#[test]
fn qemu_img_spellings_are_taken() {
    let d = Dir::new();
    let (base, top) = (d.p("base.img"), d.p("top.img"));
    let o = img(&["create", "-q", "--format", "snap", s(&base), "16M"]);
    assert!(ok(o).is_empty(), "-q prints nothing");
    ok(img(&[
        "create",
        "--backing",
        s(&base),
        "--backing-format",
        "snap",
        s(&top),
    ]));
    ok(img(&["info", "-f", "snap", "-U", s(&top)]));
    ok(img(&["map", "--format", "snap", "--force-share", s(&top)]));
    ok(img(&["snapshot", "--create", "s1", s(&top)]));
    assert!(ok(img(&["snapshot", "--list", s(&top)])).contains("s1"));
    assert!(ok(img(&["check", "-q", "--repair", "leaks", s(&top)])).is_empty());
    ok(img(&["commit", "--progress", "-f", "snap", s(&top)]));
    ok(img(&["rebase", "--unsafe", "--backing", "", s(&top)]));
    let o = img(&["info", "-f", "qcow2", s(&top)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only snap"));
    for bad in [
        &["frobnicate"][..],
        &["check", "--repair", "everything", s(&top)],
        &["info"],
    ] {
        let o = img(bad);
        assert_eq!(o.status.code(), Some(1), "{bad:?}: {o:?}");
    }
    assert_eq!(img(&["--help"]).status.code(), Some(0));
}

/// `info --backing-chain --output json` is qemu-img's array with qemu-img's
/// keys, and `check --output json` carries qemu-img's keys: a script
/// written for qemu-img reads both.
#[test]
fn json_outputs_use_qemu_img_s_keys() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new();
    // qemu-img's own answer for a two-image qcow2 chain: the keys to match.
    ok(qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&d.p("b.qcow2")),
        "16M",
    ]));
    ok(qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        s(&d.p("t.qcow2")),
    ]));
    let theirs: serde_json::Value = serde_json::from_str(&ok(qemu(&[
        "info",
        "--backing-chain",
        "--output",
        "json",
        s(&d.p("t.qcow2")),
    ])))
    .expect("json");
    ok(img(&["create", "-q", s(&d.p("b.img")), "16M"]));
    ok(img(&[
        "create",
        "-q",
        "-b",
        s(&d.p("b.img")),
        s(&d.p("t.img")),
    ]));
    let ours: serde_json::Value = serde_json::from_str(&ok(img(&[
        "info",
        "--backing-chain",
        "--output",
        "json",
        s(&d.p("t.img")),
    ])))
    .expect("json");
    let (theirs, ours) = (
        theirs.as_array().expect("array"),
        ours.as_array().expect("array"),
    );
    assert_eq!(ours.len(), 2);
    for key in [
        "filename",
        "format",
        "virtual-size",
        "cluster-size",
        "actual-size",
        "dirty-flag",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
    ] {
        assert!(
            theirs[0].get(key).is_some(),
            "qemu-img has no {key:?}: {}",
            theirs[0]
        );
        assert!(
            ours[0].get(key).is_some(),
            "img has no {key:?}: {}",
            ours[0]
        );
    }
    assert_eq!(ours[0]["backing-filename"], "b.img");
    assert_eq!(ours[0]["virtual-size"], 16 * MIB);
    assert!(ours[1].get("backing-filename").is_none());
    // Every key, everywhere, in one style.
    let mut keys = Vec::new();
    fn walk(v: &serde_json::Value, keys: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| {
                keys.push(k.clone());
                walk(v, keys)
            }),
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, keys)),
            _ => {}
        }
    }
    for args in [
        &["info", "--output", "json", s(&d.p("t.img"))][..],
        &["map", "--output", "json", s(&d.p("t.img"))],
        &["check", "--output", "json", s(&d.p("t.img"))],
        &["snapshot", "-l", "--output", "json", s(&d.p("t.img"))],
        &["commit", "--output", "json", s(&d.p("t.img"))],
    ] {
        walk(
            &serde_json::from_str(&ok(img(args))).expect("json"),
            &mut keys,
        );
    }
    let bad: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains('_') || k.chars().any(|c| c.is_uppercase()))
        .collect();
    assert!(bad.is_empty(), "keys not in kebab-case: {bad:?}");
    let check: serde_json::Value =
        serde_json::from_str(&ok(img(&["check", "--output", "json", s(&d.p("t.img"))])))
            .expect("json");
    for key in [
        "filename",
        "format",
        "check-errors",
        "corruptions",
        "leaks",
        "total-clusters",
        "allocated-clusters",
        "image-end-offset",
    ] {
        assert!(check.get(key).is_some(), "check has no {key:?}: {check}");
    }
    assert_eq!(check["total-clusters"], 16 * MIB / 4096);
}

/// An operation that builds its result in a temporary file names the file
/// the user asked for when it fails, never the temporary one.
#[test]
fn failures_name_the_file_asked_for_not_a_temporary_one() {
    let d = Dir::new();
    let raw = d.p("in.raw");
    std::fs::write(&raw, vec![1u8; 1 << 20]).expect("raw");
    let gone = d.p("gone");
    let cases: Vec<(Vec<String>, PathBuf)> = vec![
        (
            vec!["create".into(), s(&gone.join("x.img")).into(), "1M".into()],
            gone.join("x.img"),
        ),
        (
            vec![
                "convert".into(),
                "-f".into(),
                "raw".into(),
                "-O".into(),
                "snap".into(),
                s(&raw).into(),
                s(&gone.join("o.img")).into(),
            ],
            gone.join("o.img"),
        ),
        (
            vec![
                "convert".into(),
                "-f".into(),
                "raw".into(),
                "-O".into(),
                "qcow2".into(),
                s(&raw).into(),
                s(&gone.join("o.qcow2")).into(),
            ],
            gone.join("o.qcow2"),
        ),
    ];
    for (args, named) in cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = img(&argv);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{argv:?}: {err}");
        // Temporary files are hidden siblings: ".NAME.something".
        let hidden = format!("{}/.", s(&gone));
        assert!(
            err.contains(s(&named)) && !err.contains(&hidden),
            "{argv:?}: {err}"
        );
    }
}

/// `img map ... | head` ends quietly when head is done (SIGPIPE, as Unix
/// tools do), not with a panic on the closed pipe.
#[test]
fn a_closed_pipe_ends_img_quietly() {
    let d = Dir::new();
    // Every other 4 KiB block written: thousands of extents to list.
    let raw = d.p("striped.raw");
    let mut data = vec![0u8; 16 << 20];
    for (i, block) in data.chunks_mut(4096).enumerate() {
        if i % 2 == 0 {
            block.fill(0xa5);
        }
    }
    std::fs::write(&raw, &data).expect("raw");
    let image = d.p("striped.img");
    ok(img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "snap",
        s(&raw),
        s(&image),
    ]));
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} map {} | head -c 100 >/dev/null; echo \"status ${{PIPESTATUS[0]}}\"",
            env!("CARGO_BIN_EXE_img"),
            s(&image)
        ))
        .output()
        .expect("bash");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // 141: ended by SIGPIPE, as `cat` would be; never 101 (a panic).
    assert!(
        stdout.contains("status 141") || stdout.contains("status 0"),
        "{stdout}{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn compare_and_measure_answer_as_qemu_img_does() {
    if !have_qemu_img() {
        return;
    }
    let d = Dir::new();
    let raw = d.p("a.raw");
    raw_disk(&raw, 16 * MIB, 11);
    let snap = d.p("a.img");
    ok(img(&["convert", "-O", "snap", s(&raw), s(&snap)]));
    let qcow = d.p("a.qcow2");
    ok(qemu(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]));
    // The same contents in three formats: identical, whichever way round.
    for (x, y) in [(&snap, &raw), (&raw, &qcow), (&qcow, &snap)] {
        let o = img(&["compare", s(x), s(y)]);
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Images are identical."));
    }
    // One byte changed through a clone: both tools name its offset.
    ok(img(&["snapshot", "-c", "s", s(&snap)]));
    let clone = d.p("b.img");
    ok(img(&["clone", &format!("{}@s", s(&snap)), s(&clone)]));
    let changed = d.p("b.raw");
    std::fs::copy(&raw, &changed).expect("copy");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&changed)
            .expect("open");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 5_000_123).expect("read");
        f.write_all_at(&[b[0] ^ 0xff], 5_000_123).expect("write");
    }
    let ours = img(&["compare", s(&snap), s(&changed)]);
    let theirs = qemu(&["compare", s(&snap.with_extension("raw")), s(&changed)]);
    assert_eq!(ours.status.code(), Some(1), "{ours:?}");
    assert_eq!(theirs.status.code(), Some(1), "{theirs:?}");
    assert!(
        String::from_utf8_lossy(&ours.stdout).contains("Content mismatch at offset 5000123!"),
        "{ours:?}"
    );
    // A larger disk whose tail is zeros: identical unless -s.
    let bigger = d.p("big.raw");
    std::fs::copy(&raw, &bigger).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bigger)
        .expect("open")
        .set_len(20 * MIB)
        .expect("grow");
    assert_eq!(
        img(&["compare", s(&snap), s(&bigger)]).status.code(),
        Some(0)
    );
    assert_eq!(
        img(&["compare", "-s", s(&snap), s(&bigger)]).status.code(),
        Some(1)
    );
    // A missing image: 2, as qemu-img.
    let o = img(&["compare", s(&snap), s(&d.p("missing.img"))]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.img"));

    // measure: an empty image of a size, and one holding raw's data.
    let m: serde_json::Value =
        serde_json::from_str(&ok(img(&["measure", "--size", "1G", "--output", "json"])))
            .expect("json");
    let full = m["fully-allocated"].as_u64().expect("fully-allocated");
    assert!((1 << 30..(1 << 30) + 2 * MIB).contains(&full), "{m}");
    assert!(m["required"].as_u64().expect("required") <= 2 * MIB, "{m}");
    let m: serde_json::Value =
        serde_json::from_str(&ok(img(&["measure", "--output", "json", s(&raw)]))).expect("json");
    let required = m["required"].as_u64().expect("required");
    // What the converted image's data takes (its sealed layer now: the
    // snapshot above moved it there) is what measure said, less the
    // header and map area (at most 2 MiB here, mostly holes).
    use std::os::unix::fs::MetadataExt;
    let sealed = PathBuf::from(format!("{}@s", s(&snap)));
    let taken = std::fs::metadata(&sealed).expect("stat").blocks() * 512;
    assert!(
        required + 64 * 1024 >= taken && required <= taken + 2 * MIB,
        "measure says {required}, the image takes {taken}"
    );
}
