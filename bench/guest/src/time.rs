//! Time from the TSC (native at CPL3), its rate from kvmclock.

use core::arch::x86_64::{__cpuid, _rdtsc};

extern "C" {
    static pvclock: [u8; 64];
    static pvclock_armed: u8;
}

#[inline]
pub fn tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { _rdtsc() }
}

/// TSC ticks per second, and where that figure came from.
pub fn tsc_hz(cmdline_khz: Option<u64>) -> (u64, &'static str) {
    if let Some(k) = cmdline_khz {
        return (k * 1000, "cmdline");
    }
    // SAFETY: written by boot.S / by KVM; read-only here.
    let armed = unsafe { core::ptr::read_volatile(&raw const pvclock_armed) } != 0;
    if armed {
        let base = &raw const pvclock as u64;
        let mul = crate::mem::rd32(base + 24) as u128;
        let shift = crate::mem::rd8(base + 28) as i8;
        if mul != 0 {
            // ns = ((ticks << shift) * mul) >> 32  =>  hz = 2^32 * 1e9 / (mul * 2^shift)
            let num: u128 = (1u128 << 32) * 1_000_000_000;
            let hz = if shift >= 0 {
                num / (mul << shift)
            } else {
                (num << (-shift)) / mul
            };
            return (hz as u64, "kvmclock");
        }
    }
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return (l.ecx as u64 * l.ebx as u64 / l.eax as u64, "cpuid-15h");
        }
    }
    (2_000_000_000, "assumed-2GHz")
}

pub struct Clock {
    pub hz: u64,
}

impl Clock {
    pub fn ns(&self, ticks: u64) -> u64 {
        (ticks as u128 * 1_000_000_000 / self.hz as u128) as u64
    }
    pub fn ticks(&self, ns: u64) -> u64 {
        (ns as u128 * self.hz as u128 / 1_000_000_000) as u64
    }
}
