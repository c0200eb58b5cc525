//! Memory a frontend can take away after we mapped it.
//!
//! Guest memory and the inflight region are the frontend's files. A
//! frontend can `ftruncate` them after we checked and mapped them, and the
//! next access to a page past the new end raises SIGBUS, which by default
//! ends the whole process: every other session in it with the one that
//! misbehaved. Sealing cannot help here (only the file's owner can seal
//! it; our own vmm does), and checking the size before each access races
//! with the truncation.
//!
//! So faults are contained where they happen. Each such mapping is
//! registered as a *guarded range* of its session. A SIGBUS handler looks
//! the faulting address up: inside a guarded range it maps a private zero
//! page over the faulting page (the access then completes, reading zeros or
//! writing into nothing), marks the session *tripped* and returns; anywhere
//! else it restores the previous handler and lets the access fault again,
//! so real bugs still die as they would have. The session's workers check
//! the mark after each batch of requests and end the session (one log
//! line); every other session goes on.
//!
//! Kernel accesses never get here: io_uring reading or writing a missing
//! page fails that request with EFAULT, and the request is answered IOERR.
//!
//! The tables are fixed arrays of atomics so the handler takes no lock and
//! allocates nothing (it must be async-signal-safe).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use thiserror::Error;

/// Guarded ranges and sessions one process can have at once.
const RANGES: usize = 4096;
const SESSIONS: usize = 1024;

/// A range slot: `end == 0` free; `end == CLAIMED` being filled.
struct RangeSlot {
    start: AtomicUsize,
    end: AtomicUsize,
    session: AtomicUsize,
}

const CLAIMED: usize = usize::MAX;

#[allow(clippy::declare_interior_mutable_const)]
const FREE_RANGE: RangeSlot = RangeSlot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    session: AtomicUsize::new(0),
};
static RANGE_TABLE: [RangeSlot; RANGES] = [FREE_RANGE; RANGES];
/// One past the highest range slot ever used: the handler scans no further.
static RANGES_USED: AtomicUsize = AtomicUsize::new(0);

#[allow(clippy::declare_interior_mutable_const)]
const NO: AtomicBool = AtomicBool::new(false);
static SESSION_IN_USE: [AtomicBool; SESSIONS] = [NO; SESSIONS];
static SESSION_TRIPPED: [AtomicBool; SESSIONS] = [NO; SESSIONS];
/// Faults contained since the process started (for tests and figures).
static CONTAINED: AtomicUsize = AtomicUsize::new(0);

static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// The action SIGBUS had before ours, to hand back faults that are not ours.
static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::zeroed();

#[derive(Debug, Error)]
pub enum FenceError {
    #[error("this process already guards {SESSIONS} sessions")]
    TooManySessions,
    #[error("this process already guards {RANGES} memory ranges")]
    TooManyRanges,
    #[error("cannot install the SIGBUS handler")]
    Handler(#[source] std::io::Error),
}

/// One session's mark: tripped when a fault hit any of its ranges.
#[derive(Debug)]
pub struct SessionFence {
    index: usize,
}

impl SessionFence {
    pub fn new() -> Result<Arc<SessionFence>, FenceError> {
        install()?;
        for (i, used) in SESSION_IN_USE.iter().enumerate() {
            if used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                SESSION_TRIPPED[i].store(false, Ordering::Release);
                return Ok(Arc::new(SessionFence { index: i }));
            }
        }
        Err(FenceError::TooManySessions)
    }

    /// Whether the frontend took away memory this session had mapped.
    pub fn tripped(&self) -> bool {
        SESSION_TRIPPED[self.index].load(Ordering::Acquire)
    }

    /// Marks the session as the handler would (memory found gone by other
    /// means: a kernel copy into it failed).
    pub fn trip(&self) {
        SESSION_TRIPPED[self.index].store(true, Ordering::Release);
    }

    /// Guards `len` bytes at `start` (a mapping of the frontend's file)
    /// for as long as the returned value lives; it must not outlive the
    /// mapping.
    pub fn guard(
        self: &Arc<Self>,
        start: *const u8,
        len: usize,
    ) -> Result<GuardedRange, FenceError> {
        let (start, end) = (start as usize, (start as usize).saturating_add(len));
        for (i, slot) in RANGE_TABLE.iter().enumerate() {
            if slot
                .end
                .compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.start.store(start, Ordering::Release);
                slot.session.store(self.index, Ordering::Release);
                RANGES_USED.fetch_max(i + 1, Ordering::AcqRel);
                // Published last: the handler reads a whole slot or none.
                slot.end.store(end, Ordering::Release);
                return Ok(GuardedRange {
                    slot: i,
                    _session: Arc::clone(self),
                });
            }
        }
        Err(FenceError::TooManyRanges)
    }
}

impl Drop for SessionFence {
    fn drop(&mut self) {
        SESSION_IN_USE[self.index].store(false, Ordering::Release);
    }
}

/// A registered mapping; unregistered when dropped.
#[derive(Debug)]
pub struct GuardedRange {
    slot: usize,
    /// The session's index stays claimed while a range points at it.
    _session: Arc<SessionFence>,
}

impl Drop for GuardedRange {
    fn drop(&mut self) {
        RANGE_TABLE[self.slot].end.store(0, Ordering::Release);
    }
}

/// Faults contained so far in this process.
pub fn contained_faults() -> usize {
    CONTAINED.load(Ordering::Relaxed)
}

/// Installs the SIGBUS handler (once; sessions do it themselves if it is
/// not there yet, but a process under seccomp installs it before).
pub fn install() -> Result<(), FenceError> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid starting point; the handler
        // has the SA_SIGINFO signature, and PREVIOUS is written here once,
        // before any handler can run, and only read by the handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let previous = std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>();
            if libc::sigaction(libc::SIGBUS, &action, previous) != 0 {
                result = Err(FenceError::Handler(std::io::Error::last_os_error()));
            }
        }
    });
    result
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo.
    let addr = unsafe { (*info).si_addr() } as usize;
    let used = RANGES_USED.load(Ordering::Acquire);
    for slot in &RANGE_TABLE[..used.min(RANGES)] {
        let end = slot.end.load(Ordering::Acquire);
        if end == 0 || end == CLAIMED {
            continue;
        }
        let start = slot.start.load(Ordering::Acquire);
        if addr < start || addr >= end {
            continue;
        }
        let page = addr & !(PAGE.load(Ordering::Relaxed) - 1);
        // SAFETY: the page lies in a mapping of the frontend's file that a
        // live GuardedRange vouches for; replacing it with private zeros
        // only changes what that (already lost) page holds. mmap is
        // async-signal-safe.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE.load(Ordering::Relaxed),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            break;
        }
        let session = slot.session.load(Ordering::Acquire);
        SESSION_TRIPPED[session.min(SESSIONS - 1)].store(true, Ordering::Release);
        CONTAINED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Not a guarded page: the fault is a real one. The previous action
    // (Rust's own, or the default) takes it when the access runs again.
    // SAFETY: PREVIOUS was filled by sigaction before this handler was
    // installed; sigaction is async-signal-safe.
    unsafe {
        let previous = std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>();
        libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn a_fault_in_a_guarded_mapping_trips_its_session_only() {
        // SAFETY: memfd_create with a valid name; checked.
        let fd = unsafe { libc::memfd_create(c"fence-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a descriptor we own alone.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(4 * 4096).expect("size");
        let map = memmap2::MmapOptions::new()
            .len(4 * 4096)
            .map_raw(&file)
            .expect("map");
        let victim = SessionFence::new().expect("session");
        let bystander = SessionFence::new().expect("session");
        let _guard = victim.guard(map.as_ptr(), 4 * 4096).expect("guard");
        file.set_len(4096).expect("shrink");
        let before = contained_faults();
        // SAFETY: inside the mapping; the page is gone, which is the point.
        let v = unsafe { std::ptr::read_volatile(map.as_ptr().add(2 * 4096)) };
        assert_eq!(v, 0, "a contained fault reads zeros");
        // SAFETY: as above, a write into the replaced page.
        unsafe { std::ptr::write_volatile(map.as_mut_ptr().add(3 * 4096), 7) };
        assert!(victim.tripped());
        assert!(!bystander.tripped());
        assert_eq!(contained_faults() - before, 2);
    }
}
