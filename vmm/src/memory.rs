//! Guest memory: one memfd (so a vhost-user backend can map it too),
//! mapped as RAM below the PCI hole and, past 3 GiB of RAM, above 4 GiB.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Start of the 32-bit hole: PCI MMIO, ECAM, IOAPIC, LAPIC.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where 32-bit PCI BARs go.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_END: u64 = 0xe000_0000;
/// RAM resumes here when there is more than the hole leaves below it.
pub const HIGH_RAM_START: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("creating the guest memory memfd: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the guest memory to {size} bytes: {err}")]
    Size { size: u64, err: std::io::Error },
    #[error("mapping guest memory: {0}")]
    Map(#[from] vm_memory::mmap::MmapRegionError),
    #[error("guest memory region at {at:#x} of {len} bytes overflows the address space")]
    Overflow { at: u64, len: u64 },
    #[error("guest memory regions: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
}

/// Guest memory and the memfd behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub file: File,
    /// (guest address, size) of each RAM range.
    pub ranges: Vec<(u64, u64)>,
}

/// The RAM ranges for `size` bytes.
pub fn layout(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, size - MMIO_HOLE_START),
        ]
    }
}

pub fn create(size: u64) -> Result<GuestRam, MemoryError> {
    // SAFETY: memfd_create with a valid name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor we just created and own alone.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|err| MemoryError::Size { size, err })?;
    // Its size is final: a backend that maps it can trust it never shrinks
    // under its mapping (which would turn its accesses into SIGBUS).
    // SAFETY: fcntl F_ADD_SEALS on a memfd we own.
    if unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    } != 0
    {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    let ranges = layout(size);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for &(at, len) in &ranges {
        let f = file.try_clone().map_err(MemoryError::Memfd)?;
        let region = MmapRegion::<()>::from_file(FileOffset::new(f, offset), len as usize)?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(at))
                .ok_or(MemoryError::Overflow { at, len })?,
        );
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions)?;
    Ok(GuestRam { mem, file, ranges })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memfd_is_sealed_against_shrinking_and_growing() {
        let ram = create(16 << 20).unwrap();
        assert!(ram.file.set_len(8 << 20).is_err(), "shrunk");
        assert!(ram.file.set_len(32 << 20).is_err(), "grown");
        assert_eq!(ram.file.metadata().unwrap().len(), 16 << 20);
    }
}
