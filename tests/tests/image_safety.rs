//! Ordinary use must not corrupt an image: every process honours the
//! layer locks (a second writer, a chain operation on a served image, a
//! commit into a base a served clone stands on are refused, naming who
//! holds the image), a dead holder's locks go with it, and blk-backend
//! takes over a socket path only from a dead socket. No KVM needed.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use test_infra::{bin, img, output_within, s, BlkBackendProcess, Fixture, Patience};

/// An `img` or `blk-backend` run that ends on its own at once.
fn quick() -> Patience {
    Patience::new(
        "an img or blk-backend run that ends at once",
        Duration::from_millis(50),
    )
}

fn run(program: &str, args: &[&str]) -> Output {
    output_within(Command::new(bin(program)).args(args), &quick()).expect(program)
}

/// Runs `program ARGS`, which must fail with status 1 saying `expect`.
fn refused(program: &str, args: &[&str], expect: &str) -> String {
    let out = run(program, args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{program} {args:?}: {err}");
    assert!(
        err.contains(expect),
        "{program} {args:?}: {err:?} does not say {expect:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn serve(fx: &Fixture, image: &Path) -> BlkBackendProcess {
    fx.serve(image, 1)
}

#[test]
fn a_second_writer_is_refused_in_another_process_and_in_the_same_one() {
    let fx = Fixture::new();
    let vm = fx.base_and_clone("64M");
    let b = serve(&fx, &vm);
    let holder = format!("open for writing by process {}", b.pid());
    let other = s(&fx.path("other.sock"));
    let err = refused(
        "blk-backend",
        &["--socket", &other, "--image", &s(&vm)],
        &holder,
    );
    assert!(err.contains("vm.img"), "{err}");
    // Two exports of one image in one process.
    let (a, c) = (s(&fx.path("a.sock")), s(&fx.path("c.sock")));
    let (ea, ec) = (
        format!("socket={a},image={}", s(&vm)),
        format!("socket={c},image={}", s(&vm)),
    );
    let two_exports = ["--export", ea.as_str(), "--export", ec.as_str()];
    refused("blk-backend", &two_exports, "open for writing");
    b.stop();
    // With the first writer gone, the second export of the same image is
    // still refused (another open in the same process).
    refused("blk-backend", &two_exports, "by this process");
}

#[test]
fn chain_operations_are_refused_on_a_served_image_and_work_once_it_stops() {
    let fx = Fixture::new();
    let vm = fx.base_and_clone("64M");
    let base = fx.path("base.img");
    let (v, bs) = (s(&vm), s(&base));
    let b = serve(&fx, &vm);
    let live = format!("open for writing by process {}", b.pid());
    refused("img", &["snapshot", "-c", "x", &v], &live);
    refused("img", &["commit", &v], &live);
    refused("img", &["check", "-r", "all", &v], &live);
    refused("img", &["rebase", "-u", "-b", "", &v], &live);
    refused(
        "img",
        &["clone", "--seal", "x", &v, &s(&fx.path("new.img"))],
        &live,
    );
    // The base a served clone stands on is not sealed again or written.
    let other = fx.clone_of("base.img", "other.img");
    // Reading verbs work on it and say it is live; a convert needs -U.
    let info = ok("img", &["info", &v]);
    assert!(info.contains(&format!("in use: {live}")), "{info}");
    let json: serde_json::Value =
        serde_json::from_str(&ok("img", &["info", "--output", "json", &v])).expect("json");
    assert_eq!(json["chain"][0]["in-use"], live.as_str(), "{json}");
    ok("img", &["map", &v]);
    let check = run("img", &["check", &v]);
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("what this check sees may be changing"),
        "{check:?}"
    );
    let out = s(&fx.path("out.raw"));
    refused("img", &["convert", "-O", "raw", &v, &out], &live);
    ok("img", &["convert", "-U", "-O", "raw", &v, &out]);
    // Nothing was harmed, and once the backend stops everything works.
    b.stop();
    let info = ok("img", &["info", &v]);
    assert!(!info.contains("in use"), "{info}");
    img(&["check", &v]);
    img(&["snapshot", "-c", "x", &v]);
    img(&["commit", &s(&other)]);
    img(&["check", &bs]);
}

#[test]
fn a_killed_writer_s_locks_go_with_it() {
    let fx = Fixture::new();
    let vm = fx.base_and_clone("64M");
    let b = serve(&fx, &vm);
    let pid = b.pid();
    refused(
        "img",
        &["check", "-r", "all", &s(&vm)],
        &format!("process {pid}"),
    );
    b.kill();
    // The image is dirty (its writer died), not locked.
    img(&["check", "-r", "all", &s(&vm)]);
    let b = serve(&fx, &vm);
    b.stop();
    img(&["snapshot", "-c", "after", &s(&vm)]);
}

#[test]
fn blk_backend_takes_a_socket_path_only_from_a_dead_socket() {
    let fx = Fixture::new();
    let vm = fx.image("vm.img", "64M");
    let v = s(&vm);
    // A regular file given by mistake stays as it was.
    let file = fx.path("precious.dat");
    std::fs::write(&file, vec![7u8; 65536]).expect("write");
    refused(
        "blk-backend",
        &["--socket", &s(&file), "--image", &v],
        "a regular file is there",
    );
    assert_eq!(std::fs::read(&file).expect("read"), vec![7u8; 65536]);
    let dir = fx.path("a-dir");
    std::fs::create_dir(&dir).expect("mkdir");
    refused(
        "blk-backend",
        &["--socket", &s(&dir), "--image", &v],
        "a directory is there",
    );
    // Another backend's live socket is not taken over.
    let other = fx.image("other.img", "64M");
    let b = serve(&fx, &other);
    refused(
        "blk-backend",
        &["--socket", &s(&Fixture::socket_of(&other)), "--image", &v],
        "another process is listening on it",
    );
    // Nothing was opened for the refused runs: the image is clean.
    img(&["check", &v]);
    // A socket its backend left behind when killed is taken over.
    b.kill();
    assert!(Fixture::socket_of(&other).exists());
    let b = BlkBackendProcess::start(
        &bin("blk-backend"),
        &vm,
        &Fixture::socket_of(&other),
        1,
        false,
    )
    .expect("blk-backend on a stale socket");
    b.stop();
}
