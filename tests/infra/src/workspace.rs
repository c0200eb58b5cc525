//! The project's own binaries, built before a test runs them (so a test
//! never runs a stale one), and small helpers around them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/infra sits two levels below the root")
        .to_path_buf()
}

/// Where [`bin`] builds: a target directory of its own, so that its build
/// (whose features differ from a test build's) never swaps a binary under
/// a test that runs it from `target/debug` at the same moment.
pub const E2E_TARGET_DIR: &str = "target/e2e";

/// The build target every build of the workspace names (.cargo/config.toml,
/// for static binaries): its outputs sit in a directory of that name.
pub const BUILD_TARGET: &str = "x86_64-unknown-linux-gnu";

/// A debug binary of the workspace (`blk-backend`, `img`, `vmm`), built
/// once per process (tests in other processes wait on cargo's lock; once
/// built, the build is a no-op that rewrites nothing).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let root = repo_root();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "--target-dir", E2E_TARGET_DIR])
            .args([
                "-p",
                "vhost-blk-backend",
                "-p",
                "vhost-net-backend",
                "-p",
                "image-format",
                "-p",
                "vmm",
                "-p",
                "vmctl",
                "-p",
                "containerd-shim-vmctl",
            ])
            .current_dir(&root)
            .status()
            .expect("running cargo build");
        assert!(st.success(), "building the workspace binaries failed");
    });
    root.join(E2E_TARGET_DIR)
        .join(BUILD_TARGET)
        .join("debug")
        .join(name)
}

/// Runs `img` with `args`; panics with its error output if it fails.
pub fn img(args: &[&str]) {
    let out = Command::new(bin("img")).args(args).output().expect("img");
    assert!(
        out.status.success(),
        "img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A path as the `&str` command lines want.
pub fn s(p: &Path) -> String {
    p.to_str().expect("a UTF-8 path").to_string()
}

/// Runs `command` to its end and collects its output, as
/// [`Command::output`] does, but kills it and fails if it outlives
/// `patience` (a hang must not hang the test run).
pub fn output_within(
    command: &mut Command,
    patience: &crate::Patience,
) -> anyhow::Result<std::process::Output> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {:?}: {e}", command.get_program()))?;
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let mut status = None;
    if let Err(e) = patience.wait_until(|| {
        status = child.try_wait()?;
        Ok(status.is_some())
    }) {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = err.join().unwrap_or_default();
        anyhow::bail!("{e}; killed\nstderr:\n{}", String::from_utf8_lossy(&stderr));
    }
    // Its output closes with it, unless a process it left running holds
    // it: that is an error here, not a hang.
    if let Err(e) = patience.wait_until(|| Ok(out.is_finished() && err.is_finished())) {
        anyhow::bail!(
            "{e}: {:?} ended but its output is still open (a process it left running holds it?)",
            command.get_program()
        );
    }
    Ok(std::process::Output {
        status: status.expect("waited for"),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `vmm api --socket SOCK ARGS...`: (succeeded, what it printed: the
/// answer's JSON, an error's included).
pub fn vmm_api(sock: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = output_within(
        Command::new(bin("vmm"))
            .args(["api", "--socket", &s(sock)])
            .args(args),
        &crate::Patience::new("an API call", std::time::Duration::from_millis(100)),
    )
    .expect("vmm api");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// A command's standard output as JSON (a `--output json` answer); a
/// panic showing both its streams if it is not.
pub fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
