//! The 8250 UART at 0x3f8: port I/O at CPL3 (IOPL=3).

use core::arch::asm;

const COM1: u16 = 0x3f8;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O is allowed at CPL3 by IOPL=3; the ports are devices.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

/// The whole string in one `rep outsb`: one trap into the hypervisor for
/// the string instead of one per byte where the UART's port writes are
/// coalesced (our vmm), the same bytes one by one elsewhere.
pub fn write_bytes(s: &[u8]) {
    // SAFETY: reads `s.len()` bytes from `s` (DF is clear by the ABI);
    // port I/O is allowed at CPL3 by IOPL=3.
    unsafe {
        asm!(
            "rep outsb",
            in("dx") COM1,
            inout("rsi") s.as_ptr() => _,
            inout("rcx") s.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

/// A byte the UART received, if one waits (its line status says so).
pub fn read_byte() -> Option<u8> {
    (inb(COM1 + 5) & 1 != 0).then(|| inb(COM1))
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: as outb.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as outb.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags)) }
    v
}
