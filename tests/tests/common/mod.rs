//! What the end-to-end tests share: the workspace binaries, built now so a
//! test never runs a stale one, and `img`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A debug binary of the workspace (blk-backend, img, vmm).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root");
    BUILT.call_once(|| {
        let st = Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "-p",
                "vhost-blk-backend",
                "-p",
                "image-format",
                "-p",
                "vmm",
            ])
            .current_dir(root)
            .status()
            .expect("cargo build");
        assert!(st.success(), "building the workspace binaries failed");
    });
    root.join("target/debug").join(name)
}

pub fn img(args: &[&str]) {
    let out = Command::new(bin("img")).args(args).output().expect("img");
    assert!(
        out.status.success(),
        "img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn s(p: &Path) -> String {
    p.to_str().expect("utf-8").to_string()
}
