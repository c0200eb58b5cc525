//! A bump allocator over guest RAM: rings, request buffers, latency samples.
//! Nothing is ever freed; the guest runs one workload and exits.

use core::cell::Cell;

pub struct Arena {
    next: Cell<u64>,
    end: u64,
}

impl Arena {
    pub fn new(start: u64, end: u64) -> Arena {
        Arena { next: Cell::new(start), end }
    }

    pub fn free_bytes(&self) -> u64 {
        self.end.saturating_sub(self.next.get())
    }

    /// `size` zeroed bytes at `align`; None when RAM runs out.
    pub fn alloc(&self, size: u64, align: u64) -> Option<u64> {
        let at = self.next.get().div_ceil(align) * align;
        let end = at.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next.set(end);
        // SAFETY: [at, end) is RAM the arena owns and nothing else uses.
        unsafe { core::ptr::write_bytes(at as *mut u8, 0, size as usize) };
        Some(at)
    }

    /// `size` bytes at `align`, not zeroed: touching memory costs a page
    /// fault per page under a software-virtualized MMU (PVM: about 15 us
    /// each), and a buffer written before it is read need not be cleared.
    pub fn alloc_untouched(&self, size: u64, align: u64) -> Option<u64> {
        let at = self.next.get().div_ceil(align) * align;
        let end = at.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next.set(end);
        Some(at)
    }

    /// A buffer of plain integers, not zeroed (see `alloc_untouched`):
    /// only for element types every bit pattern is a value of.
    pub fn samples(&self, n: usize) -> Option<&'static mut [u32]> {
        let at = self.alloc_untouched((n * core::mem::size_of::<u32>()) as u64, 4096)?;
        // SAFETY: RAM the arena owns from now on, aligned for u32; any bit
        // pattern is a u32, so the slice is valid whatever the RAM holds.
        Some(unsafe { core::slice::from_raw_parts_mut(at as *mut u32, n) })
    }

    pub fn slice<T: Copy>(&self, n: usize) -> Option<&'static mut [T]> {
        let at = self.alloc((n * core::mem::size_of::<T>()) as u64, 4096)?;
        // SAFETY: fresh zeroed memory, suitably aligned, owned from now on by the slice.
        Some(unsafe { core::slice::from_raw_parts_mut(at as *mut T, n) })
    }
}

/// MMIO and shared-memory access.
#[inline]
pub fn rd32(addr: u64) -> u32 {
    // SAFETY: callers pass device registers or ring memory, identity-mapped.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
#[inline]
pub fn wr32(addr: u64, v: u32) {
    // SAFETY: as rd32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}
#[inline]
pub fn rd16(addr: u64) -> u16 {
    // SAFETY: as rd32.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}
#[inline]
pub fn wr16(addr: u64, v: u16) {
    // SAFETY: as rd32.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}
#[inline]
pub fn rd8(addr: u64) -> u8 {
    // SAFETY: as rd32.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}
#[inline]
pub fn wr8(addr: u64, v: u8) {
    // SAFETY: as rd32.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}
#[inline]
pub fn rd64(addr: u64) -> u64 {
    // SAFETY: as rd32.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}
#[inline]
pub fn wr64(addr: u64, v: u64) {
    // Two halves: some devices take 64-bit registers only as two 32-bit writes.
    wr32(addr, v as u32);
    wr32(addr + 4, (v >> 32) as u32);
}
