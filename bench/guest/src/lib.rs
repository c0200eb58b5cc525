//! The bench guest: a bare-metal virtio-blk workload generator. Boots through
//! PVH (boot.S), does the minimum at CPL0 and runs everything here at CPL3.
#![no_std]

use core::arch::global_asm;

global_asm!(include_str!("boot.S"), options(att_syntax));

mod rt;
mod serial;

#[no_mangle]
pub extern "C" fn guest_main() -> ! {
    serial::write_str("BENCH-GUEST START\n");
    rt::exit(0);
}
