//! Time in TSC ticks: kvmclock's nanoseconds at the TSC's rate where the
//! hypervisor offers kvmclock, the raw TSC (native at CPL3) elsewhere.
//!
//! kvmclock is what a restored snapshot's time goes on from: the host
//! sets it to the snapshot's instant (KVM_SET_CLOCK) and rewrites this
//! vCPU's pvclock page before the guest runs again, whatever the TSC did
//! meanwhile (on PVM the TSC at CPL3 is the host's own and cannot be put
//! back). A run restored an hour after its snapshot finds its deadlines
//! where they were.

use core::arch::x86_64::{__cpuid, _rdtsc};
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering};

extern "C" {
    static pvclock: [u8; 64];
    static pvclock_armed: u8;
}

/// The tick rate [`tsc`] counts at once kvmclock is in use (0 before).
static TICK_HZ: AtomicU64 = AtomicU64::new(0);

/// The raw TSC: unique stamps, never time across a snapshot.
#[inline]
pub fn raw_tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { _rdtsc() }
}

/// The guest's monotonic time in ticks (see the module's comment).
#[inline]
pub fn tsc() -> u64 {
    let mut hz = TICK_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        match kvmclock_hz() {
            Some(k) => {
                TICK_HZ.store(k, Ordering::Relaxed);
                hz = k;
            }
            None => return raw_tsc(),
        }
    }
    let ns = kvmclock_ns() as u128;
    (ns * hz as u128 / 1_000_000_000) as u64
}

/// The TSC's rate as kvmclock gives it, if the hypervisor offers
/// kvmclock (armed by boot.S).
fn kvmclock_hz() -> Option<u64> {
    // SAFETY: written by boot.S / by KVM; read-only here.
    let armed = unsafe { core::ptr::read_volatile(&raw const pvclock_armed) } != 0;
    if !armed {
        return None;
    }
    let base = &raw const pvclock as u64;
    let mul = crate::mem::rd32(base + 24) as u128;
    let shift = crate::mem::rd8(base + 28) as i8;
    if mul == 0 {
        return None;
    }
    // ns = ((ticks << shift) * mul) >> 32  =>  hz = 2^32 * 1e9 / (mul * 2^shift)
    let num: u128 = (1u128 << 32) * 1_000_000_000;
    let hz = if shift >= 0 {
        num / (mul << shift)
    } else {
        (num << (-shift)) / mul
    };
    Some(hz as u64)
}

/// kvmclock's nanoseconds (the pvclock ABI: version odd while the host
/// writes, read again until it is even and unchanged).
fn kvmclock_ns() -> u64 {
    let base = &raw const pvclock as u64;
    loop {
        let v1 = crate::mem::rd32(base);
        compiler_fence(Ordering::SeqCst);
        let tsc_timestamp = crate::mem::rd64(base + 8);
        let system_time = crate::mem::rd64(base + 16);
        let mul = crate::mem::rd32(base + 24) as u128;
        let shift = crate::mem::rd8(base + 28) as i8;
        let now = raw_tsc();
        compiler_fence(Ordering::SeqCst);
        let v2 = crate::mem::rd32(base);
        if v1 & 1 != 0 || v1 != v2 {
            continue;
        }
        let mut delta = now.wrapping_sub(tsc_timestamp) as u128;
        if delta > u64::MAX as u128 / 2 {
            // The TSC read before the host's update: no time passed.
            delta = 0;
        }
        let delta = if shift >= 0 {
            delta << shift
        } else {
            delta >> (-shift)
        };
        return system_time.wrapping_add(((delta * mul) >> 32) as u64);
    }
}

/// Ticks per second of [`tsc`], and where that figure came from: kvmclock
/// where there is one (its time is what [`tsc`] counts, so a `tsc_khz=`
/// on the command line cannot change it), else the command line, CPUID
/// leaf 0x15, or an assumed 2 GHz.
pub fn tsc_hz(cmdline_khz: Option<u64>) -> (u64, &'static str) {
    if let Some(hz) = kvmclock_hz() {
        TICK_HZ.store(hz, Ordering::Relaxed);
        return (hz, "kvmclock");
    }
    if let Some(k) = cmdline_khz {
        return (k * 1000, "cmdline");
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
