//! Lazy restore: guest memory filled from the snapshot while the guest
//! already runs.
//!
//! The guest memory's mappings in this process are registered with a
//! userfaultfd (missing-page mode, which shmem supports): a vCPU, KVM or a
//! vmm thread touching a page not yet in the memfd stops until the pager
//! thread has copied that page from the snapshot's memory file
//! (`UFFDIO_COPY`: the page enters the memfd whole).
//!
//! A vhost-user backend maps the same memfd in its own process. A page it
//! touched before the pager filled it would be a fresh page of zeros there,
//! and the snapshot's data would be lost. Two ways keep that from
//! happening:
//!
//! - A backend that offers vhost-user's postcopy messages (PAGEFAULT)
//!   registers its own mapping with a userfaultfd of its own and hands it
//!   over (POSTCOPY_ADVISE, then the memory table's reply gives its
//!   mapping's addresses): the pager serves that backend's faults as it
//!   serves the vmm's, so the disk runs from the first instant. A page
//!   brought in through either descriptor is in the memfd for both.
//! - A backend without them is started only once every data page is in
//!   (the guest's requests wait in their rings until then).
//!
//! The pager copies the snapshot's data in the background as well
//! (`Mode::Lazy`: the VM owns all its memory again after a while), or only
//! what is touched (`Mode::OnDemand`: a clone's memory is what it used; a
//! snapshot of it fills the rest first). Pages the snapshot holds no data
//! for (holes) are zeros either way.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PAGE: u64 = 4096;

/// The few userfaultfd calls the pager makes, over the `userfaultfd`
/// crate, in the shape the pager uses them.
struct Userfault(userfaultfd::Uffd);

/// What one `UFFDIO_COPY` did.
enum Copied {
    /// All of it went in.
    All,
    /// The first bytes went in; the kernel stopped there (a fault bringing
    /// the next page in, the mappings changing): the rest again.
    Part(u64),
    /// The first page is there already: it stays as it is.
    Exists,
    /// The range is no longer registered: nothing is copied there.
    Unregistered,
}

fn io_error(e: userfaultfd::Error) -> std::io::Error {
    match e {
        userfaultfd::Error::SystemError(errno)
        | userfaultfd::Error::CopyFailed(errno)
        | userfaultfd::Error::ZeropageFailed(errno) => {
            std::io::Error::from_raw_os_error(errno as i32)
        }
        e => std::io::Error::other(e),
    }
}

impl Userfault {
    /// Nonblocking, close-on-exec; kernel accesses (KVM's, a backend's
    /// io_uring's) fault to it too.
    fn new() -> Result<Userfault, userfaultfd::Error> {
        userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map(Userfault)
    }

    /// One another process made and handed over. Made nonblocking here:
    /// whatever a backend handed over, reading it never stops the pager
    /// (a descriptor that is no userfaultfd fails its first read, and the
    /// backend's faults are no longer served).
    fn from_fd(fd: OwnedFd) -> Userfault {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: fcntl on a descriptor we own, flags only.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        // SAFETY: the descriptor is a userfaultfd (the backend's
        // POSTCOPY_ADVISE answer), owned and given up here.
        Userfault(unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) })
    }

    fn register(&self, start: u64, len: u64) -> std::io::Result<()> {
        self.0
            .register(start as *mut libc::c_void, len as usize)
            .map(drop)
            .map_err(io_error)
    }

    fn unregister(&self, start: u64, len: u64) -> std::io::Result<()> {
        self.0
            .unregister(start as *mut libc::c_void, len as usize)
            .map_err(io_error)
    }

    fn wake(&self, start: u64, len: u64) -> std::io::Result<()> {
        self.0
            .wake(start as *mut libc::c_void, len as usize)
            .map_err(io_error)
    }

    /// Copies `src` in at `dst` of the registered memory, waking the
    /// faults waiting there.
    ///
    /// # Safety
    /// `dst..dst + src.len()` must lie in memory this descriptor registered.
    unsafe fn copy(&self, dst: u64, src: &[u8]) -> std::io::Result<Copied> {
        // SAFETY: from `src`, alive for the call, into registered memory
        // (the caller's promise); the kernel fills only missing pages.
        let r = unsafe {
            self.0.copy(
                src.as_ptr().cast(),
                dst as *mut libc::c_void,
                src.len(),
                true,
            )
        };
        match r {
            Ok(n) if n as u64 >= src.len() as u64 => Ok(Copied::All),
            Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) => Ok(Copied::Part(n as u64)),
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                Ok(Copied::Exists)
            }
            // The range is not registered (any more): the pager let go
            // of its own memory once every data page was in (a fault
            // queued as it did is read after), or a backend let go of its
            // mapping. Nothing to copy there, now or later: retrying it
            // was a fill that failed in 2 % of lazy restores under load.
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::ENOENT => {
                Ok(Copied::Unregistered)
            }
            // The mappings are changing (a non-cooperative event in
            // progress): nothing went in, the same copy again is right.
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EAGAIN => {
                Ok(Copied::Part(0))
            }
            Err(e) => Err(io_error(e)),
        }
    }

    /// The page addresses of the faults waiting now, at most `max`, into
    /// `out` (emptied first: the pager's one buffer, no allocation per
    /// look).
    fn faults(&self, max: usize, out: &mut Vec<u64>) -> std::io::Result<()> {
        out.clear();
        while out.len() < max {
            match self.0.read_event() {
                Ok(Some(userfaultfd::Event::Pagefault { addr, .. })) => {
                    out.push(addr as u64 & !(PAGE - 1))
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(())
    }
}

impl AsFd for Userfault {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Bytes copied per background step: small enough that a fault waits
/// behind at most one of them.
const STEP: u64 = 256 << 10;
/// Faults read per look at a descriptor, so that one busy backend keeps
/// no other (or the background copy) waiting long.
const FAULTS_PER_LOOK: usize = 64;

#[derive(Debug, Error)]
pub enum PagerError {
    #[error("userfaultfd: {0}")]
    Create(userfaultfd::Error),
    #[error("the pager's wake-up eventfd: {0}")]
    Wake(std::io::Error),
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
    #[error("the pager ended before guest memory was filled")]
    Ended,
}

/// How much of the snapshot the pager copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// What is touched at once, the rest in the background.
    Lazy,
    /// Only what is touched (until [`PagerHandle::fill_all`]).
    OnDemand,
}

/// A guest memory region as the pager sees it: where it is mapped (here,
/// or in a backend's process) and where its bytes are in the memfd (and
/// the memory file).
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

/// What the pager did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    pub faults: u64,
    /// Of those, the backends' (postcopy).
    pub backend_faults: u64,
    pub bytes: u64,
    pub ms: f64,
}

/// A backend's userfaultfd and where its mapping of each region is.
struct Peer {
    key: String,
    uffd: Userfault,
    regions: Vec<Region>,
}

/// What other threads tell the pager thread.
#[derive(Default)]
struct Requests {
    peers: Vec<Peer>,
    fill_all: bool,
    stop: bool,
}

struct Shared {
    requests: Mutex<Requests>,
    wake: EventFd,
    /// The vmm's regions (a peer's are the same at its addresses).
    regions: Vec<Region>,
    /// Some once every data page is in (or the pager failed).
    filled: Mutex<Option<Result<Stats, PagerError>>>,
    filled_changed: Condvar,
}

impl Shared {
    fn ask(&self, f: impl FnOnce(&mut Requests)) {
        f(&mut self.requests.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = self.wake.write(1);
    }

    fn report(&self, r: Result<Stats, PagerError>) {
        *self.filled.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.filled_changed.notify_all();
    }
}

/// What the disks and the snapshot taker hold of a running pager.
#[derive(Clone)]
pub struct PagerHandle(Arc<Shared>);

impl PagerHandle {
    /// Whether pages of the snapshot are still missing: a backend that
    /// connects now must page through the pager, or wait.
    pub fn serving(&self) -> bool {
        self.0
            .filled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }

    /// Takes a backend's userfaultfd (its mapping of the regions at
    /// `bases`, in the regions' order): its faults are served from now
    /// on, in place of those of an earlier connection under `key`.
    pub fn adopt(&self, key: &str, uffd: OwnedFd, bases: &[u64]) -> Result<(), PagerError> {
        if bases.len() != self.0.regions.len() {
            return Err(PagerError::Ioctl {
                what: "the backend's memory table reply",
                source: std::io::Error::other(format!(
                    "{} regions mapped, {} sent",
                    bases.len(),
                    self.0.regions.len()
                )),
            });
        }
        let regions = self
            .0
            .regions
            .iter()
            .zip(bases)
            .map(|(r, &host)| Region { host, ..*r })
            .collect();
        self.0.ask(|q| {
            q.peers.push(Peer {
                key: key.to_string(),
                uffd: Userfault::from_fd(uffd),
                regions,
            })
        });
        Ok(())
    }

    /// Copies in the rest of the snapshot as well (a snapshot of this VM
    /// needs all of its memory).
    pub fn fill_all(&self) {
        self.0.ask(|q| q.fill_all = true);
    }
}

/// The pager, running.
pub struct Pager {
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

impl Pager {
    /// Registers `regions` and starts serving them from `file` (laid out
    /// as the memfd: see `snapshot::memory`). The thread confines itself
    /// to `policy` once it runs.
    pub fn start(
        regions: Vec<Region>,
        file: &Path,
        mode: Mode,
        policy: &'static sandbox::Policy,
    ) -> Result<Pager, PagerError> {
        let src = File::open(file).map_err(|source| PagerError::File {
            path: file.to_path_buf(),
            source,
        })?;
        let uffd = Userfault::new().map_err(PagerError::Create)?;
        for r in &regions {
            uffd.register(r.host, r.len)
                .map_err(|source| PagerError::Ioctl {
                    what: "UFFDIO_REGISTER",
                    source,
                })?;
        }
        let shared = Arc::new(Shared {
            requests: Mutex::default(),
            wake: EventFd::new(EFD_NONBLOCK).map_err(PagerError::Wake)?,
            regions: regions.clone(),
            filled: Mutex::new(None),
            filled_changed: Condvar::new(),
        });
        let s2 = Arc::clone(&shared);
        let path = file.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("pager".into())
            .spawn(move || {
                let r = sandbox::confine(policy)
                    .map_err(PagerError::Confine)
                    .and_then(|()| {
                        serve(&s2, &uffd, &src, mode)
                            .map_err(|source| PagerError::Fill { path, source })
                    });
                if let Err(e) = r {
                    s2.report(Err(e));
                } else if s2
                    .filled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none()
                {
                    s2.report(Err(PagerError::Ended));
                }
            })
            .map_err(PagerError::Thread)?;
        Ok(Pager { shared, thread })
    }

    pub fn handle(&self) -> PagerHandle {
        PagerHandle(Arc::clone(&self.shared))
    }

    /// Waits until every data page is in guest memory: what it took, or
    /// why the pager failed (the guest then cannot go on). The pager still
    /// serves the backends' faults (on holes) until [`Pager::finish`].
    pub fn wait_filled(&self) -> Result<Stats, PagerError> {
        let mut g = self.shared.filled.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match &*g {
                Some(Ok(stats)) => return Ok(*stats),
                Some(Err(_)) => {
                    let Some(Err(e)) = g.replace(Err(PagerError::Ended)) else {
                        unreachable!("matched above")
                    };
                    return Err(e);
                }
                None => {}
            }
            g = self
                .shared
                .filled_changed
                .wait(g)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Ends the pager once no backend pages through it any more (each was
    /// sent POSTCOPY_END, or started only after the fill).
    pub fn finish(self) {
        self.shared.ask(|q| q.stop = true);
        let _ = self.thread.join();
    }
}

/// The memfd offset of address `addr` of `regions`, and the region.
fn offset_of(regions: &[Region], addr: u64) -> Option<(u64, &Region)> {
    regions
        .iter()
        .find(|r| r.host <= addr && addr < r.host + r.len)
        .map(|r| (r.file_offset + (addr - r.host), r))
}

/// Copies `len` bytes at memfd offset `off` (address `dst` of the mapping
/// `uffd` watches) from the file into guest memory. Pages already there
/// are left as they are; with `wake_existing`, whoever waits on them is
/// woken (they came in through another descriptor of the same memory).
fn copy_in(
    uffd: &Userfault,
    src: &File,
    buf: &mut [u8],
    (dst, off, len): (u64, u64, u64),
    wake_existing: bool,
) -> std::io::Result<u64> {
    let buf = &mut buf[..len as usize];
    // A hole reads as zeros, as the guest's page was.
    src.read_exact_at(buf, off)?;
    let mut done = 0u64;
    let mut copied = 0u64;
    // Attempts that moved nothing (a mapping change in progress): a few
    // are normal; they are tried again after a pause growing from 1 us to
    // 1 ms, so that whatever changes the mappings gets the CPU; endless
    // ones are an error, not a spin.
    let mut stalled: Option<(Instant, Duration)> = None;
    while done < len {
        // SAFETY: `dst..dst + len` lies in a region `uffd` registered (the
        // callers find it there); the kernel fills only missing pages.
        match unsafe { uffd.copy(dst + done, &buf[done as usize..]) }? {
            Copied::All => return Ok(copied + (len - done)),
            // Part of it went in (the kernel stops at a page a fault is
            // bringing in, or when the mappings change): the rest again.
            Copied::Part(0) => {
                let (since, pause) = stalled.get_or_insert((Instant::now(), PAUSE_FIRST));
                if since.elapsed() > STALL_PATIENCE {
                    return Err(std::io::Error::other(format!(
                        "UFFDIO_COPY made no progress for {} s",
                        STALL_PATIENCE.as_secs()
                    )));
                }
                std::thread::sleep(*pause);
                *pause = (*pause * 2).min(PAUSE_MAX);
            }
            Copied::Part(n) => {
                done += n;
                copied += n;
                stalled = None;
            }
            Copied::Unregistered => {
                // A fault queued as the range was let go may still wait:
                // woken, it faults again without us.
                if wake_existing {
                    uffd.wake(dst + done, len - done)?;
                }
                return Ok(copied);
            }
            // The next page is there already: left as it is, the rest again.
            Copied::Exists => {
                if wake_existing {
                    uffd.wake(dst + done, PAGE)?;
                }
                done += PAGE;
            }
        }
    }
    Ok(copied)
}

/// How long copies that move nothing are tried again before the fill
/// fails, and the pauses between them.
const STALL_PATIENCE: Duration = Duration::from_secs(10);
const PAUSE_FIRST: Duration = Duration::from_micros(1);
const PAUSE_MAX: Duration = Duration::from_millis(1);

/// Serves the faults waiting on `uffd` (whose mapping is `regions`); how
/// many. `pages` and `buf` are the pager's scratch.
fn serve_faults(
    uffd: &Userfault,
    regions: &[Region],
    src: &File,
    (pages, buf): (&mut Vec<u64>, &mut [u8]),
    stats: &mut Stats,
) -> std::io::Result<u64> {
    uffd.faults(FAULTS_PER_LOOK, pages)?;
    let faults = &*pages;
    for &page in faults {
        if let Some((off, _)) = offset_of(regions, page) {
            stats.bytes += copy_in(uffd, src, buf, (page, off, PAGE), true)?;
        }
    }
    Ok(faults.len() as u64)
}

/// The data ranges of the memory file, in background steps, first first.
fn background_work(src: &File, regions: &[Region]) -> std::io::Result<VecDeque<(u64, u64)>> {
    let mut todo = VecDeque::new();
    for r in regions {
        let mut at = r.file_offset;
        let end = r.file_offset + r.len;
        while let Some((s, e)) = super::memory::next_data(src, at, end)? {
            let mut p = s;
            while p < e {
                let n = (e - p).min(STEP);
                todo.push_back((p, n));
                p += n;
            }
            at = e;
        }
    }
    Ok(todo)
}

/// The pager's loop: faults first (the vmm's, then each backend's), a
/// background step between looks while there is work, else a wait for
/// the next fault or request. Every data page in, the vmm's own mappings
/// are let go (faults there from then on are on holes, which the memfd
/// gives without us); the backends' faults are served until `stop`.
fn serve(shared: &Shared, uffd: &Userfault, src: &File, mode: Mode) -> std::io::Result<()> {
    let t0 = std::time::Instant::now();
    let regions = &shared.regions;
    let mut buf = vec![0u8; STEP as usize];
    let mut pages = Vec::with_capacity(FAULTS_PER_LOOK);
    let mut stats = Stats::default();
    let mut todo = background_work(src, regions)?;
    let mut background = mode == Mode::Lazy;
    let mut peers: Vec<Peer> = Vec::new();
    let mut own_registered = true;
    loop {
        {
            let mut q = shared.requests.lock().unwrap_or_else(|e| e.into_inner());
            for p in q.peers.drain(..) {
                info!(backend = %p.key, "a backend pages through the restore's pager");
                peers.retain(|old| old.key != p.key);
                peers.push(p);
            }
            background |= q.fill_all;
            if q.stop {
                break;
            }
        }
        let mut served = serve_faults(uffd, regions, src, (&mut pages, &mut buf), &mut stats)?;
        stats.faults += served;
        let mut gone = Vec::new();
        for (i, p) in peers.iter().enumerate() {
            match serve_faults(&p.uffd, &p.regions, src, (&mut pages, &mut buf), &mut stats) {
                Ok(n) => {
                    stats.faults += n;
                    stats.backend_faults += n;
                    served += n;
                }
                // Its process is gone (its memory with it): so is it.
                Err(e) => {
                    warn!(backend = %p.key, "a backend's page faults: {e}; no longer served");
                    gone.push(i);
                }
            }
        }
        for i in gone.into_iter().rev() {
            peers.remove(i);
        }
        if served > 0 {
            continue;
        }
        if background {
            if let Some((off, len)) = todo.pop_front() {
                if let Some(r) = regions
                    .iter()
                    .find(|r| r.file_offset <= off && off < r.file_offset + r.len)
                {
                    stats.bytes += copy_in(
                        uffd,
                        src,
                        &mut buf,
                        (r.host + (off - r.file_offset), off, len),
                        false,
                    )?;
                }
                continue;
            }
            if own_registered {
                for r in regions {
                    uffd.unregister(r.host, r.len)?;
                }
                own_registered = false;
                stats.ms = t0.elapsed().as_secs_f64() * 1e3;
                shared.report(Ok(stats));
            }
        }
        // Nothing to do: wait for a fault or a request.
        let mut fds: Vec<libc::pollfd> = std::iter::once(shared.wake.as_raw_fd())
            .chain(std::iter::once(uffd.as_fd().as_raw_fd()))
            .chain(peers.iter().map(|p| p.uffd.as_fd().as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll on descriptors this thread holds open, the array
        // alive for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if fds[0].revents != 0 {
            let _ = shared.wake.read();
        }
        // A backend whose process ended: its descriptor hangs up.
        let hung: Vec<usize> = fds[2..]
            .iter()
            .enumerate()
            .filter(|(_, f)| f.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
            .map(|(i, _)| i)
            .collect();
        for i in hung.into_iter().rev() {
            warn!(backend = %peers[i].key, "a backend's userfaultfd hung up; no longer served");
            peers.remove(i);
        }
    }
    if own_registered {
        for r in regions {
            uffd.unregister(r.host, r.len)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// `src`'s memory saved as a snapshot's memory file (in `dir`), and a
    /// fresh guest memory of its size with a pager of `mode` on it; None
    /// (and a SKIPPED line) where there is no userfaultfd.
    fn restoring(
        src: &crate::memory::GuestRam,
        len: u64,
        mode: Mode,
        dir: &Path,
    ) -> Option<(crate::memory::GuestRam, Pager)> {
        let file = dir.join("memory");
        crate::snapshot::memory::save(&src.file, len, &file).expect("save");
        let dst = crate::memory::create(len).expect("memory");
        match Pager::start(Region::of(&dst), &file, mode, &crate::seccomp::PAGER) {
            Ok(p) => Some((dst, p)),
            Err(PagerError::Create(e)) => {
                eprintln!("SKIPPED: no userfaultfd here: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

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
        let Some((dst, pager)) = restoring(&src, len, Mode::Lazy, dir.path()) else {
            return;
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
        pager.finish();
        assert!(
            stats.bytes >= (8 << 20),
            "the data was copied in: {stats:?}"
        );
        let mut got = vec![0u8; len as usize];
        dst.mem.read_slice(&mut got, GuestAddress(0)).expect("read");
        assert!(got == *want, "the memory differs from the snapshot's");
    }

    /// On demand, memory holds the pages touched and no others: 64 pages
    /// read of a 16 MiB snapshot full of data bring in 64 pages; told to
    /// fill the rest, the whole memory is the snapshot's.
    #[test]
    fn memory_restored_on_demand_holds_only_the_pages_touched_until_filled() {
        use std::os::unix::fs::MetadataExt;
        let len: u64 = 16 << 20;
        let src = crate::memory::create(len).expect("memory");
        let want: Vec<u8> = (0..len).map(|i| (i % 253) as u8 | 1).collect();
        src.mem.write_slice(&want, GuestAddress(0)).expect("write");
        let dir = tempfile::tempdir().expect("dir");
        let Some((dst, pager)) = restoring(&src, len, Mode::OnDemand, dir.path()) else {
            return;
        };
        for k in 0..64u64 {
            let at = k * (len / 64) + 123;
            let got: u8 = dst.mem.read_obj(GuestAddress(at)).expect("read");
            assert_eq!(got, want[at as usize], "at {at:#x}");
        }
        let held = dst.file.metadata().expect("memfd").blocks() * 512;
        assert_eq!(held, 64 * PAGE, "the memfd holds the pages touched only");
        assert!(pager.handle().serving(), "pages are still missing");
        pager.handle().fill_all();
        pager.wait_filled().expect("filled");
        assert!(!pager.handle().serving());
        pager.finish();
        let mut got = vec![0u8; len as usize];
        dst.mem.read_slice(&mut got, GuestAddress(0)).expect("read");
        assert!(got == want, "the memory differs from the snapshot's");
    }

    /// A second mapping of the memory, registered with a userfaultfd of
    /// its own and handed to the pager (as a backend does by postcopy):
    /// pages read through it come in from the snapshot, and are then in
    /// the vmm's mapping too; pages the vmm brought in first read the same
    /// through it.
    #[test]
    fn a_backends_mapping_is_paged_through_the_pager() {
        use std::os::fd::AsRawFd;
        let len: u64 = 8 << 20;
        let src = crate::memory::create(len).expect("memory");
        let want: Vec<u8> = (0..len).map(|i| (i % 241) as u8 | 2).collect();
        src.mem.write_slice(&want, GuestAddress(0)).expect("write");
        let dir = tempfile::tempdir().expect("dir");
        let Some((dst, pager)) = restoring(&src, len, Mode::OnDemand, dir.path()) else {
            return;
        };
        // The "backend's" mapping: the same memfd, mapped again.
        // SAFETY: a new shared mapping of the whole memfd, unmapped below.
        let peer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dst.file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(peer, libc::MAP_FAILED);
        let uffd = Userfault::new().expect("userfaultfd");
        uffd.register(peer as u64, len).expect("register");
        let handed = uffd.0.as_fd().try_clone_to_owned().expect("dup");
        pager
            .handle()
            .adopt("peer", handed, &[peer as u64])
            .expect("adopt");
        let vmm_first = 5 * PAGE + 7;
        let got: u8 = dst.mem.read_obj(GuestAddress(vmm_first)).expect("read");
        assert_eq!(got, want[vmm_first as usize]);
        let reads: Vec<(u64, u8)> = (0..len)
            .step_by(PAGE as usize * 3)
            .chain([vmm_first])
            .map(|at| {
                // SAFETY: inside the peer mapping, mapped until the end.
                (at, unsafe { *(peer as *const u8).add(at as usize) })
            })
            .collect();
        for (at, got) in reads {
            assert_eq!(got, want[at as usize], "through the peer, at {at:#x}");
            let through_vmm: u8 = dst.mem.read_obj(GuestAddress(at)).expect("read");
            assert_eq!(
                through_vmm, got,
                "the vmm sees the page the peer brought in"
            );
        }
        pager.handle().fill_all();
        let stats = pager.wait_filled().expect("filled");
        assert!(stats.backend_faults > 0, "{stats:?}");
        pager.finish();
        uffd.unregister(peer as u64, len).expect("unregister");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(peer, len as usize) };
    }
}
