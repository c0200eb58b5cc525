//! PCI configuration space as guest memory that only writes exit.
//!
//! Configuration reads are most of what a driver does while it looks for
//! its device (a bus scan, the capability lists, the BARs: about 60 reads
//! for one disk), and each read through ECAM is a VM exit: 25-40 us apiece
//! under this host's software virtualization, a few under hardware KVM.
//! Configuration space only changes when the guest writes it, so the
//! vmm keeps a copy of bus 0's ECAM window in memory that the VM maps
//! read-only (a `KVM_MEM_READONLY` slot): reads are ordinary memory reads,
//! writes still exit to the vmm, which applies them and renders the
//! function's page again before the vCPU resumes.
//!
//! Memory: eight pages of ones (what a PCI bus answers where nothing is)
//! mapped at every device's eight functions, and one page per present
//! function mapped over its function 0: the 1 MiB guest-physical window
//! costs about 40 KiB of host memory and 32 + 1 per device mappings (one
//! per page would be 256 `mmap` calls, 2 ms of start-up).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

/// Bus 0's ECAM window: 32 devices x 8 functions x 4 KiB.
pub const WINDOW_LEN: usize = 1 << 20;
const PAGE: usize = 4096;
const SLOTS: usize = 32;
/// A device's eight functions.
const STRIDE: usize = 8 * PAGE;
/// Pages of the backing memfd: pages 0-7 are all ones, page 8 + s is slot
/// s's function 0.
const ONES_PAGES: usize = 8;
const FILE_PAGES: usize = ONES_PAGES + SLOTS;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("creating the PCI configuration memfd: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the PCI configuration memfd: {0}")]
    Size(std::io::Error),
    #[error("mapping the PCI configuration window: {0}")]
    Map(std::io::Error),
}

/// Bus 0's configuration space, readable by the guest without exits.
pub struct ConfigMirror {
    _file: File,
    /// The memfd's pages, writable: where the vmm renders.
    pages: NonNull<u8>,
    /// The guest's 1 MiB window (read-only; KVM maps this range).
    window: NonNull<u8>,
}

// SAFETY: the mappings are owned by this value and only touched through
// volatile dword accesses; which thread does so does not matter.
unsafe impl Send for ConfigMirror {}
// SAFETY: concurrent use from several threads is memory-safe: every access
// is an aligned, bounds-checked volatile dword, and `attach` only replaces
// a mapping inside the reservation with another (a reader sees either).
// Keeping the contents consistent (one render at a time) is the PCI bus's
// job: it holds its lock around `attach` and `store`.
unsafe impl Sync for ConfigMirror {}

fn map(
    at: *mut u8,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: usize,
) -> Result<NonNull<u8>, MirrorError> {
    // SAFETY: a mapping request the kernel validates; with MAP_FIXED, `at`
    // always lies inside a reservation this module owns (see `new`).
    let p = unsafe { libc::mmap(at.cast(), len, prot, flags, fd, offset as libc::off_t) };
    if p == libc::MAP_FAILED {
        return Err(MirrorError::Map(std::io::Error::last_os_error()));
    }
    NonNull::new(p.cast()).ok_or_else(|| MirrorError::Map(std::io::ErrorKind::Other.into()))
}

impl ConfigMirror {
    pub fn new() -> Result<Self, MirrorError> {
        // SAFETY: memfd_create with a valid name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"pci-config".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MirrorError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor we just created and own alone.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len((FILE_PAGES * PAGE) as u64)
            .map_err(MirrorError::Size)?;
        let pages = map(
            std::ptr::null_mut(),
            FILE_PAGES * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )?;
        // The window is reserved first, then every device's functions
        // mapped to the pages of ones; `attach` later maps present
        // functions over them.
        let window = match map(
            std::ptr::null_mut(),
            WINDOW_LEN,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        ) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: unmapping the mapping made just above.
                unsafe { libc::munmap(pages.as_ptr().cast(), FILE_PAGES * PAGE) };
                return Err(e);
            }
        };
        let mirror = ConfigMirror {
            _file: file,
            pages,
            window,
        };
        for i in 0..ONES_PAGES * PAGE / 4 {
            mirror.store_file(i * 4, u32::MAX);
        }
        for slot in 0..SLOTS {
            mirror.map_window(slot * STRIDE, STRIDE, 0)?;
        }
        Ok(mirror)
    }

    /// Maps `len` bytes of the memfd from page `file_page` at byte `at`
    /// of the window.
    fn map_window(&self, at: usize, len: usize, file_page: usize) -> Result<(), MirrorError> {
        assert!(at.is_multiple_of(PAGE) && at + len <= WINDOW_LEN);
        map(
            // SAFETY: inside the reservation (checked above).
            unsafe { self.window.as_ptr().add(at) },
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_FIXED,
            self._file.as_raw_fd(),
            file_page * PAGE,
        )
        .map(drop)
    }

    /// A volatile dword store at byte `at` of the memfd's pages.
    fn store_file(&self, at: usize, v: u32) {
        assert!(at.is_multiple_of(4) && at < FILE_PAGES * PAGE);
        // SAFETY: aligned and inside the writable mapping (checked above);
        // volatile because the guest reads these bytes concurrently.
        unsafe { std::ptr::write_volatile(self.pages.as_ptr().add(at).cast::<u32>(), v) }
    }

    /// The guest's window: the start address and length KVM maps.
    pub fn window(&self) -> (u64, u64) {
        (self.window.as_ptr() as u64, WINDOW_LEN as u64)
    }

    /// Slot `slot`'s function 0 is present: its page, zeroed (the extended
    /// space reads as zeros), appears in the window. Functions 1-7 stay
    /// absent.
    pub fn attach(&self, slot: u8) -> Result<(), MirrorError> {
        let slot = slot as usize;
        assert!(slot < SLOTS);
        for reg in 0..PAGE / 4 {
            self.store_file((ONES_PAGES + slot) * PAGE + reg * 4, 0);
        }
        self.map_window(slot * STRIDE, PAGE, ONES_PAGES + slot)
    }

    /// Dword `reg` (of the first 64) of slot `slot`'s function 0.
    pub fn store(&self, slot: u8, reg: usize, v: u32) {
        assert!((slot as usize) < SLOTS && reg < 64);
        self.store_file((ONES_PAGES + slot as usize) * PAGE + reg * 4, v)
    }

    /// What the guest reads at byte `offset` (dword-aligned) of the window.
    pub fn guest_read(&self, offset: usize) -> u32 {
        assert!(offset.is_multiple_of(4) && offset < WINDOW_LEN);
        // SAFETY: aligned and inside the window, every page of which is
        // mapped readable from `new` on.
        unsafe { std::ptr::read_volatile(self.window.as_ptr().add(offset).cast::<u32>()) }
    }
}

impl Drop for ConfigMirror {
    fn drop(&mut self) {
        // SAFETY: both mappings were made by `new` and nothing borrows them
        // past `self` (KVM's slot is gone with the VM, which this outlives
        // only in tests, which have no VM).
        unsafe {
            libc::munmap(self.window.as_ptr().cast(), WINDOW_LEN);
            libc::munmap(self.pages.as_ptr().cast(), FILE_PAGES * PAGE);
        }
    }
}
