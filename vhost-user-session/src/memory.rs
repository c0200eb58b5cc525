//! The frontend's guest memory: each region checked against the file
//! behind it before it is mapped (a mapping past a file's end is accepted
//! by mmap, and the first access there kills the whole process with
//! SIGBUS, every other session with it), and guarded once mapped (see
//! `fence`) against the frontend truncating the file later.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vhost::vhost_user::Result as VuResult;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::fence::GuardedRange;
use crate::refuse;
use crate::session::Session;

/// A guest memory region as the frontend's address space sees it.
#[derive(Debug, Clone, Copy)]
pub struct Mapping {
    pub frontend_addr: u64,
    pub size: u64,
    pub guest_addr: u64,
}

/// A mapped region of the frontend's memory, guarded against the frontend
/// truncating its file under us.
#[derive(Debug, Clone)]
pub struct MappedRegion {
    pub at: Mapping,
    pub region: Arc<GuestRegionMmap>,
    _guard: Arc<GuardedRange>,
}

/// Maps one region of a memory table (or one added on its own), after
/// checking that it lies inside its file; guarded for `session`.
pub fn map_region(
    session: &Session,
    region: &VhostUserMemoryRegion,
    file: File,
) -> VuResult<MappedRegion> {
    let (at, size, offset) = (
        region.guest_phys_addr,
        region.memory_size,
        region.mmap_offset,
    );
    let file_len = file
        .metadata()
        .map_err(|e| refuse(format!("memory region at {at:#x}: its descriptor: {e}")))?
        .len();
    let end = offset.checked_add(size).ok_or_else(|| {
        refuse(format!(
            "memory region at {at:#x}: offset {offset:#x} + size {size:#x} overflows"
        ))
    })?;
    if size == 0 || end > file_len {
        return Err(refuse(format!(
            "memory region at {at:#x}+{size:#x} (file offset {offset:#x}) does not lie \
             inside its {file_len:#x}-byte file"
        )));
    }
    let mapped =
        GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(at)).ok_or_else(|| {
            refuse(format!(
                "memory region at {at:#x}+{size:#x} does not fit the address space"
            ))
        })?;
    let guard = session
        .fence
        .guard(mapped.as_ptr(), mapped.len() as usize)
        .map_err(|e| refuse(format!("memory region at {at:#x}: {e}")))?;
    Ok(MappedRegion {
        at: Mapping {
            frontend_addr: region.user_addr,
            size,
            guest_addr: at,
        },
        region: Arc::new(mapped),
        _guard: Arc::new(guard),
    })
}

/// The guest address of a frontend (virtual) address, if a region has it.
pub fn frontend_to_guest(regions: &[MappedRegion], addr: u64) -> Option<u64> {
    regions.iter().find_map(|MappedRegion { at: m, .. }| {
        (addr >= m.frontend_addr && addr - m.frontend_addr < m.size)
            .then(|| addr - m.frontend_addr + m.guest_addr)
    })
}

/// The guest memory these regions make.
pub fn guest_memory(regions: &[MappedRegion]) -> VuResult<GuestMemoryMmap> {
    GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| Arc::clone(&r.region)).collect())
        .map_err(|e| refuse(format!("memory regions overlap or are empty: {e}")))
}

/// The regions but the one at `guest_addr` of `size` bytes.
pub fn without(
    regions: &[MappedRegion],
    guest_addr: u64,
    size: u64,
) -> VuResult<Vec<MappedRegion>> {
    let mut left = regions.to_vec();
    left.retain(|r| !(r.at.guest_addr == guest_addr && r.at.size == size));
    if left.len() == regions.len() {
        return Err(refuse(format!(
            "no memory region at {guest_addr:#x}+{size:#x} to remove"
        )));
    }
    Ok(left)
}

/// Whether every region of `mem` still lies inside its file: a kernel
/// copy into guest memory (a tap's readv) that failed with EFAULT tells
/// a bad buffer address from memory the frontend took away by this.
pub fn still_backed(mem: &GuestMemoryMmap) -> bool {
    mem.iter().all(|r| {
        r.file_offset().is_none_or(|f| {
            f.file()
                .metadata()
                .is_ok_and(|m| m.len() >= f.start().saturating_add(r.len()))
        })
    })
}
