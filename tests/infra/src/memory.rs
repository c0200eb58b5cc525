//! Fake guest memory for tests that play the frontend's part: a memfd (as
//! the vmm's guest memory is), so that a backend can map it too.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// `size` bytes of guest memory at guest address 0, in a memfd.
pub fn memfd_guest_memory(size: usize) -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor we own alone.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).expect("sizing the memfd");
    let region = MmapRegion::<()>::from_file(FileOffset::new(file, 0), size).expect("mmap");
    let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("a region");
    GuestMemoryMmap::from_regions(vec![region]).expect("guest memory")
}

/// The memfd behind guest memory made by [`memfd_guest_memory`]: a
/// hostile frontend's test truncates it under the backend.
pub fn memory_file(mem: &GuestMemoryMmap) -> &File {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter()
        .next()
        .and_then(|r| r.file_offset())
        .map(|f| f.file())
        .expect("a memfd-backed region")
}
