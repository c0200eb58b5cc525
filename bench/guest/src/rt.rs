//! Runtime odds and ends a freestanding binary needs: exit, panics, faults,
//! and the memory functions the compiler calls.

use core::arch::asm;

/// Leaves through the debug-exit port (QEMU's isa-debug-exit at 0xf4, and
/// the vmm's): the host sees status `(code << 1) | 1`.
pub fn exit(code: u8) -> ! {
    crate::console::finish();
    crate::serial::outb(0xf4, code);
    // Not reached under a VMM with the exit device; spin otherwise.
    loop {
        core::hint::spin_loop();
    }
}

extern "C" {
    static mut halt_requested: u8;
}

/// Halts the vCPU until the VMM ends the VM: at rest it costs the host no
/// CPU (a halted vCPU sleeps in the kernel). `hlt` is CPL0's and PVM does
/// not deliver `int n` from CPL3 through the IDT, so this asks for the halt
/// and raises an exception, whose handler (boot.S) sees the request and
/// halts with interrupts off instead of reporting a fault.
pub fn halt_forever() -> ! {
    // SAFETY: a byte only this function writes and the exception stub
    // reads; `ud2` raises #UD, whose handler never returns here.
    unsafe {
        core::ptr::write_volatile(&raw mut halt_requested, 1);
        asm!("ud2", options(noreturn))
    }
}

extern "C" {
    static mut wait_requested: u8;
    static mut wait_seen: u64;
    static mut wait_timer_ns: u64;
    #[link_name = "irq_total"]
    static IRQ_TOTAL: u64;
    #[link_name = "halt_count"]
    static HALT_COUNT: u64;
}

/// Times `wait_for_interrupt` halted the vCPU (`wait=halt`).
pub fn halts() -> u64 {
    // SAFETY: a counter the exception stub increments; read-only here.
    unsafe { core::ptr::read_volatile(&raw const HALT_COUNT) }
}

/// Interrupts taken so far (every vector from 32 up).
pub fn irq_total() -> u64 {
    // SAFETY: a counter the interrupt stub increments; read-only here.
    unsafe { core::ptr::read_volatile(&raw const IRQ_TOTAL) }
}

/// Sleeps in `hlt` until an interrupt comes, unless one came since `seen`
/// (`irq_total()` read before the caller last looked at its devices, so a
/// completion between that look and the halt is not slept through), and
/// for about `max_ns` at most (the LAPIC timer wakes it: the caller's
/// deadlines still hold). `hlt` is CPL0's: as in `halt_forever`, a request
/// and a `ud2`, whose handler (boot.S) halts and returns past it.
pub fn wait_for_interrupt(seen: u64, max_ns: u64) {
    // SAFETY: bytes only this function writes and the exception stub
    // reads (one vCPU); the stub returns to the instruction after `ud2`.
    unsafe {
        core::ptr::write_volatile(&raw mut wait_seen, seen);
        core::ptr::write_volatile(&raw mut wait_timer_ns, max_ns.clamp(1_000, u32::MAX as u64));
        core::ptr::write_volatile(&raw mut wait_requested, 1);
        asm!("ud2");
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("PANIC: {}", info);
    exit(0x7e);
}

extern "C" {
    static fault_info: [u64; 4];
}

/// Called at CPL0 by the exception stub: report and leave.
#[no_mangle]
pub extern "C" fn guest_fault() -> ! {
    // SAFETY: written by the stub just before this call.
    let f = unsafe { core::ptr::read_volatile(&raw const fault_info) };
    crate::println!(
        "FAULT: exception {} error {:#x} at rip {:#x} (cr2 {:#x})",
        f[0], f[1], f[2], f[3]
    );
    exit(0x7d);
}

// The compiler's memory intrinsics: no libc here.

/// # Safety
/// As C's memcpy.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; rep movsb copies forward.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memmove.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize + n) {
        // SAFETY: no overlap that a forward copy would clobber.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag, restored after.
    unsafe {
        asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

/// # Safety
/// As C's memset.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memcmp.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller's contract: both ranges are n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
