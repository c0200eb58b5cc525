//! Lazy restore: guest memory filled from the snapshot while the guest
//! already runs.
//!
//! The guest memory's mappings in this process are registered with a
//! userfaultfd (missing-page mode, which shmem supports): a vCPU, KVM or a
//! vmm thread touching a page not yet in the memfd stops until the pager
//! thread has copied that page from the snapshot's memory file
//! (`UFFDIO_COPY`: the page enters the memfd whole). Meanwhile the pager
//! copies every data range of the file in the background, largest pieces
//! first-come, skipping pages a fault already brought in.
//!
//! A vhost-user backend maps the same memfd in its own process, where no
//! userfaultfd watches: a page it touched before the pager filled it would
//! be a fresh page of zeros, and the snapshot's data would be lost. So a
//! backend must not touch guest memory before the pager is done: the vmm
//! starts the restored disks (their rings) only then. The guest runs from
//! the first instant; its disk requests wait in their rings (the kicks in
//! their eventfds) until the disks start. Pages the snapshot holds no data
//! for (holes) are zeros either way: whoever touches one first gets it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

const PAGE: u64 = 4096;
/// Bytes copied per background step: small enough that a fault waits
/// behind at most one of them.
const STEP: u64 = 256 << 10;

// The userfaultfd ABI (linux/userfaultfd.h).
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _rest: u64,
}

#[derive(Debug, Error)]
pub enum PagerError {
    #[error("userfaultfd: {0}")]
    Create(std::io::Error),
    #[error("userfaultfd: {what}: {source}")]
    Ioctl {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the pager thread: {0}")]
    Thread(std::io::Error),
    #[error("the pager thread: {0}")]
    Confine(sandbox::SandboxError),
    #[error("filling guest memory from {}: {source}", path.display())]
    Fill {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the pager thread reports when it is done.
type Outcome = (
    std::sync::Mutex<Option<Result<Stats, PagerError>>>,
    std::sync::Condvar,
);

/// A guest memory region as the pager sees it: where it is mapped here
/// and where its bytes are in the memfd (and the memory file).
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub host: u64,
    pub len: u64,
    pub file_offset: u64,
}

impl Region {
    /// The regions of `ram`, each at its offset in the memfd (the regions
    /// follow each other there, as `memory::create` lays them out).
    pub fn of(ram: &crate::memory::GuestRam) -> Vec<Region> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut file_offset = 0;
        ram.mem
            .iter()
            .map(|r| {
                let region = Region {
                    host: r.as_ptr() as u64,
                    len: r.len(),
                    file_offset,
                };
                file_offset += r.len();
                region
            })
            .collect()
    }
}

/// The pager, running. [`Pager::wait_filled`] returns once every data
/// page is in guest memory (and the registration is gone).
pub struct Pager {
    done: Arc<Outcome>,
}

/// What the pager did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    pub faults: u64,
    pub bytes: u64,
    pub ms: f64,
}

fn ioctl(
    fd: &OwnedFd,
    what: &'static str,
    req: u64,
    arg: *mut libc::c_void,
) -> Result<(), PagerError> {
    // SAFETY: a userfaultfd ioctl with the argument struct its number
    // names, alive for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) } < 0 {
        return Err(PagerError::Ioctl {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Pager {
    /// Registers `regions` and starts filling them from `file` (laid out
    /// as the memfd: see `snapshot::memory`). The thread confines itself
    /// to `policy` once it runs.
    pub fn start(
        regions: Vec<Region>,
        file: &Path,
        policy: &'static sandbox::Policy,
    ) -> Result<Pager, PagerError> {
        let src = File::open(file).map_err(|source| PagerError::File {
            path: file.to_path_buf(),
            source,
        })?;
        // SAFETY: the userfaultfd system call with flags only; the result
        // is checked and owned below.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(PagerError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just created, owned from here on.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(&uffd, "UFFDIO_API", UFFDIO_API, (&raw mut api).cast())?;
        for r in &regions {
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: r.host,
                    len: r.len,
                },
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            ioctl(
                &uffd,
                "UFFDIO_REGISTER",
                UFFDIO_REGISTER,
                (&raw mut reg).cast(),
            )?;
        }
        let done: Arc<Outcome> = Arc::new((std::sync::Mutex::new(None), std::sync::Condvar::new()));
        let d2 = Arc::clone(&done);
        let path = file.to_path_buf();
        std::thread::Builder::new()
            .name("pager".into())
            .spawn(move || {
                let r = sandbox::confine(policy)
                    .map_err(PagerError::Confine)
                    .and_then(|()| {
                        fill(&uffd, &src, &regions)
                            .map_err(|source| PagerError::Fill { path, source })
                    });
                let (m, c) = &*d2;
                *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                c.notify_all();
            })
            .map_err(PagerError::Thread)?;
        Ok(Pager { done })
    }

    /// Waits until every data page is in guest memory: what it took, or
    /// why the pager failed (the guest then cannot go on).
    pub fn wait_filled(self) -> Result<Stats, PagerError> {
        let (m, c) = &*self.done;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = c.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The memfd offset of host address `addr`, if guest memory.
fn offset_of(regions: &[Region], addr: u64) -> Option<(u64, &Region)> {
    regions
        .iter()
        .find(|r| r.host <= addr && addr < r.host + r.len)
        .map(|r| (r.file_offset + (addr - r.host), r))
}

/// Copies `len` bytes at memfd offset `off` (host address `dst`) from the
/// file into guest memory. Pages already there are left as they are.
fn copy_in(
    uffd: &OwnedFd,
    src: &File,
    buf: &mut [u8],
    dst: u64,
    off: u64,
    len: u64,
) -> std::io::Result<u64> {
    let buf = &mut buf[..len as usize];
    // A hole reads as zeros, as the guest's page was.
    src.read_exact_at(buf, off)?;
    let mut done = 0u64;
    let mut copied = 0u64;
    // Attempts that moved nothing (a mapping change in progress): a few
    // are normal, endless ones an error, not a spin.
    let mut stalls = 0u32;
    while done < len {
        let mut c = UffdioCopy {
            dst: dst + done,
            src: buf.as_ptr() as u64 + done,
            len: len - done,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY from the rest of a buffer of `len` bytes
        // into registered guest memory.
        let r = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY as _, &raw mut c) };
        if r == 0 {
            return Ok(copied + (len - done));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // Part of it went in (the kernel stops at a page a fault is
            // bringing in, or when the mappings change): the rest again.
            Some(libc::EAGAIN) => {
                let n = c.copy.max(0) as u64;
                done += n;
                copied += n;
                if n == 0 {
                    stalls += 1;
                    if stalls > 10_000 {
                        return Err(e);
                    }
                    std::thread::yield_now();
                }
            }
            // The next page is there already (a fault brought it): left
            // as it is, the rest again.
            Some(libc::EEXIST) => done += PAGE,
            _ => return Err(e),
        }
    }
    Ok(copied)
}

/// The pager's loop: faults first, the background copy between them.
fn fill(uffd: &OwnedFd, src: &File, regions: &[Region]) -> std::io::Result<Stats> {
    let t0 = std::time::Instant::now();
    let mut buf = vec![0u8; STEP as usize];
    let mut stats = Stats::default();
    // The background work: every data range of the file, in steps.
    let mut todo: Vec<(u64, u64)> = Vec::new();
    for r in regions {
        let mut at = r.file_offset;
        let end = r.file_offset + r.len;
        while let Some((s, e)) = super::memory::next_data(src, at, end)? {
            let mut p = s;
            while p < e {
                let n = (e - p).min(STEP);
                todo.push((p, n));
                p += n;
            }
            at = e;
        }
    }
    todo.reverse();
    loop {
        // Faults waiting: served first (nonblocking reads until none).
        let mut msg = [UffdMsg {
            event: 0,
            _reserved: [0; 7],
            flags: 0,
            address: 0,
            _rest: 0,
        }; 16];
        loop {
            // SAFETY: reading whole uffd_msg records into a buffer of them.
            let n = unsafe {
                libc::read(
                    uffd.as_raw_fd(),
                    msg.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msg),
                )
            };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if n == 0 || e.raw_os_error() == Some(libc::EAGAIN) {
                    break;
                }
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for m in &msg[..n as usize / std::mem::size_of::<UffdMsg>()] {
                if m.event != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let page = m.address & !(PAGE - 1);
                if let Some((off, _)) = offset_of(regions, page) {
                    stats.bytes += copy_in(uffd, src, &mut buf, page, off, PAGE)?;
                    stats.faults += 1;
                }
            }
        }
        let Some((off, len)) = todo.pop() else {
            break;
        };
        let region = regions
            .iter()
            .find(|r| r.file_offset <= off && off < r.file_offset + r.len)
            .copied();
        if let Some(r) = region {
            stats.bytes += copy_in(
                uffd,
                src,
                &mut buf,
                r.host + (off - r.file_offset),
                off,
                len,
            )?;
        }
    }
    // Every data page is in: faults from here on are on holes (zeros),
    // which the memfd gives without us.
    for r in regions {
        let mut range = UffdioRange {
            start: r.host,
            len: r.len,
        };
        // SAFETY: unregistering a range registered above.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &raw mut range) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // A fault that raced with the unregistering is woken by the close.
    stats.ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Guest memory filled lazily while four threads read it at random
    /// (faults racing the background copy, both ways round): every byte
    /// read, and the whole memory afterwards, is the snapshot's; holes
    /// read as zeros.
    #[test]
    fn memory_filled_lazily_reads_as_the_snapshot_however_it_is_touched() {
        let len: u64 = 32 << 20;
        let src = crate::memory::create(len).expect("memory");
        // Data in three runs (one not page-aligned at its ends), holes
        // between them.
        let mut want = vec![0u8; len as usize];
        for (at, n) in [
            (0x1000u64, 3 << 20),
            (9 << 20, 5 << 20),
            ((20 << 20) + 100, 70_000),
        ] {
            for i in 0..n as u64 {
                want[(at + i) as usize] = ((at + i) % 251) as u8 | 1;
            }
            src.mem
                .write_slice(
                    &want[at as usize..(at + n as u64) as usize],
                    GuestAddress(at),
                )
                .expect("write");
        }
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("memory");
        crate::snapshot::memory::save(&src.file, len, &file).expect("save");

        let dst = crate::memory::create(len).expect("memory");
        let regions = Region::of(&dst);
        let pager = match Pager::start(regions, &file, &crate::seccomp::PAGER) {
            Ok(p) => p,
            Err(PagerError::Create(e)) => {
                eprintln!("SKIPPED: no userfaultfd here: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let want = std::sync::Arc::new(want);
        let readers: Vec<_> = (0..4u64)
            .map(|t| {
                let (mem, want) = (dst.mem.clone(), std::sync::Arc::clone(&want));
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t + 1);
                    for _ in 0..2000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let at = x % (len - 8);
                        let got: u64 = mem.read_obj(GuestAddress(at)).expect("read");
                        let expect = u64::from_le_bytes(
                            want[at as usize..at as usize + 8].try_into().expect("8"),
                        );
                        assert_eq!(got, expect, "at {at:#x}");
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().expect("a reader");
        }
        let stats = pager.wait_filled().expect("filled");
        assert!(
            stats.bytes >= (8 << 20),
            "the data was copied in: {stats:?}"
        );
        let mut got = vec![0u8; len as usize];
        dst.mem.read_slice(&mut got, GuestAddress(0)).expect("read");
        assert!(got == *want, "the memory differs from the snapshot's");
    }
}
