//! A test's scratch space: a directory of its own with the images and the
//! backends it sets up, all gone when the test ends (passed or not).

use std::path::{Path, PathBuf};

use crate::backend::BlkBackendProcess;
use crate::workspace::{bin, img, s};

pub struct Fixture {
    dir: tempfile::TempDir,
}

/// A failed test's scratch directory is kept, and named, when
/// `E2E_KEEP_FAILED` is set: the images, the vmctl state and every log of a
/// failure that happens once in many runs.
impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("E2E_KEEP_FAILED").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("E2E_KEEP_FAILED: kept {}", self.dir.path().display());
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    /// A fresh directory on a real disk (/var/tmp: not tmpfs, so O_DIRECT
    /// and the backends' page-cache behaviour are those of a real file).
    pub fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir_in("/var/tmp").expect("a scratch directory in /var/tmp"),
        }
    }

    /// A fresh directory in memory (/dev/shm, tmpfs): where blk-backend
    /// copies the bytes itself instead of going through its io_uring.
    pub fn in_memory() -> Fixture {
        Fixture {
            dir: tempfile::tempdir_in("/dev/shm").expect("a scratch directory in /dev/shm"),
        }
    }

    /// `name` inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `img create NAME SIZE` (a sparse snapshot-format image).
    pub fn image(&self, name: &str, size: &str) -> PathBuf {
        let p = self.path(name);
        img(&["create", &s(&p), size]);
        p
    }

    /// A writable overlay NAME on PARENT: `img clone PARENT NAME` for a
    /// snapshot (`base.img@s1`), `img create -b PARENT NAME` for a plain
    /// image (which seals it in place, as a golden base is).
    pub fn clone_of(&self, parent: &str, name: &str) -> PathBuf {
        let p = self.path(name);
        if parent.contains('@') {
            img(&["clone", &s(&self.path(parent)), &s(&p)]);
        } else {
            img(&["create", "-q", "-b", &s(&self.path(parent)), &s(&p)]);
        }
        p
    }

    /// A base image of `size` and a clone of it, `vm.img`: what a VM's
    /// disk usually is.
    pub fn base_and_clone(&self, size: &str) -> PathBuf {
        self.image("base.img", size);
        self.clone_of("base.img", "vm.img")
    }

    /// A sparse raw file of `size` bytes.
    pub fn raw(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .expect("a raw file");
        p
    }

    /// The socket that [`Fixture::serve`] puts beside an image.
    pub fn socket_of(image: &Path) -> PathBuf {
        image.with_extension("sock")
    }

    /// blk-backend serving `image` (read-write) on `IMAGE.sock`.
    /// A 64 MiB base whose first 8 MiB a guest wrote with generation 7,
    /// sealed as base.img@golden; and the write rate (IOPS) of the guest
    /// that filled it, what a workload that must last a while is sized
    /// from.
    pub fn golden_base(&self) -> (PathBuf, u64) {
        let base = self.image("base.img", "64M");
        let b = self.serve(&base, 1);
        let fill = crate::VmmVm::new(&bin("vmm"), "mode=write verify=1 gen=7 size=8M")
            .with_disk(&Self::socket_of(&base), 1)
            .run()
            .expect("the fill runs");
        fill.assert_ok("writing the base");
        b.stop();
        img(&["snapshot", "-c", "golden", &s(&base)]);
        (self.path("base.img@golden"), fill.field("iops").max(1))
    }

    pub fn serve(&self, image: &Path, num_queues: u16) -> BlkBackendProcess {
        BlkBackendProcess::start(
            &bin("blk-backend"),
            image,
            &Self::socket_of(image),
            num_queues,
            false,
        )
        .expect("blk-backend starts")
    }

    /// The same, read-only.
    pub fn serve_readonly(&self, image: &Path, num_queues: u16) -> BlkBackendProcess {
        BlkBackendProcess::start(
            &bin("blk-backend"),
            image,
            &Self::socket_of(image),
            num_queues,
            true,
        )
        .expect("blk-backend starts")
    }
}
