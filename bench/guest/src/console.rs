//! Where the guest's lines go: the UART until a virtio console is set up,
//! then its transmit queue. Under PVM every UART byte is a trapped and
//! emulated port write (about 4.4 us); a line on the virtio console is a
//! copy into guest memory and one doorbell (an ioeventfd: no exit to the
//! VMM's userspace).
//!
//! Lines go out in slots of a small buffer, round robin, without waiting
//! for the device, which returns each slot when it has written it. A
//! slot still in flight is waited for before it is reused, and every slot
//! before the guest exits (a VMM may end the VM the moment the exit port
//! is written, and QEMU does).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::mem::Arena;
use crate::pci::{self, BarAllocator};
use crate::time;
use crate::virtio::{self, write_desc, Transport, Virtqueue, NO_VECTOR};

/// transmitq0 (queue 0 is receiveq0, unused: the guest reads nothing).
const TRANSMIT: u16 = 1;
const SLOTS: u16 = 8;
const SLOT_BYTES: u64 = 1024;
/// How long the guest waits for the device to take its lines (TSC ticks,
/// about 10 s at this machine's rate, against the tens of microseconds it
/// takes: a starved VMM thread on a busy host must not count as a dead
/// device); a device that never does must not hang the guest, and its
/// lines go to the UART from then on.
const PATIENCE_TICKS: u64 = 24 << 30;
/// How long the guest spins for its slots (about 20 us) before it sleeps
/// between looks instead: the device's thread runs on the host's CPUs,
/// and a vCPU spinning on one of them can keep it from running for a
/// whole scheduler slice (3-4 ms measured on this 2-core host, the exit
/// of every 1-I/O VM waiting on it).
const SPIN_TICKS: u64 = 48_000;
/// The sleep between looks once spinning did not pay (the queue has no
/// interrupt: the LAPIC timer wakes the vCPU).
const NAP_NS: u64 = 50_000;

/// Sleeps taken waiting for the device (not the workload's: the report's
/// `halts` counts those alone).
static NAPS: AtomicU64 = AtomicU64::new(0);

/// How many times the console slept waiting for the device.
pub fn naps() -> u64 {
    NAPS.load(Ordering::Relaxed)
}

struct Port {
    /// Kept for the device's lifetime: its registers are the device.
    _transport: Transport,
    vq: Virtqueue,
    buffers: u64,
    /// The slot being filled, and how far.
    slot: u16,
    fill: u64,
    /// Slots handed to the device and not yet returned (one bit each).
    busy: u16,
}

struct Global {
    port: UnsafeCell<Option<Port>>,
    /// Set while a write is under way: a fault or panic reported in the
    /// middle of one goes to the UART instead of into a half-built line.
    busy: UnsafeCell<bool>,
}

// SAFETY: one vCPU, and interrupt handlers never write the console.
unsafe impl Sync for Global {}

static CONSOLE: Global = Global { port: UnsafeCell::new(None), busy: UnsafeCell::new(false) };

/// Finds a virtio console on the scanned buses and sends every line
/// through it from now on; false (the UART stays) when there is none or it
/// does not set up.
pub fn open(rsdp: u64, max_bus: u8, arena: &Arena) -> bool {
    let Some(access) = pci::config_access(rsdp) else {
        return false;
    };
    let mut hit = None;
    pci::functions(access, max_bus, |f| {
        let (vendor, device) = f.vendor_device();
        // 0x1043: modern virtio-console; 0x1003: transitional.
        if vendor == 0x1af4 && (device == 0x1043 || device == 0x1003) && hit.is_none() {
            hit = Some(f);
        }
    });
    let Some(func) = hit else {
        return false;
    };
    let mut bars = BarAllocator { next32: 0xd000_0000, end32: 0xd800_0000 };
    let Ok(t) = Transport::new(func, &mut bars) else {
        return false;
    };
    if t.negotiate(virtio::F_VERSION_1).is_err() {
        return false;
    }
    let Ok(mut vq) = t.setup_queue(TRANSMIT, SLOTS, NO_VECTOR, arena) else {
        return false;
    };
    if vq.size < SLOTS {
        return false;
    }
    vq.suppress_interrupts();
    let Some(buffers) = arena.alloc_untouched(SLOTS as u64 * SLOT_BYTES, 4096) else {
        return false;
    };
    t.driver_ok();
    // SAFETY: one vCPU; nothing holds a reference into CONSOLE now.
    unsafe { *CONSOLE.port.get() = Some(Port { _transport: t, vq, buffers, slot: 0, fill: 0, busy: 0 }) };
    true
}

impl Port {
    /// Takes back what the device returned.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.vq.pop_used() {
            self.busy &= !(1u16 << (id % SLOTS));
        }
    }

    /// Until the slots in `mask` are back; false if the device kept them.
    fn wait_for(&mut self, mask: u16) -> bool {
        let start = time::tsc();
        loop {
            self.reclaim();
            if self.busy & mask == 0 {
                return true;
            }
            let waited = time::tsc().wrapping_sub(start);
            if waited > PATIENCE_TICKS {
                return false;
            }
            if waited > SPIN_TICKS {
                let before = crate::rt::halts();
                crate::rt::wait_for_interrupt(crate::rt::irq_total(), NAP_NS);
                NAPS.fetch_add(crate::rt::halts() - before, Ordering::Relaxed);
            } else {
                core::hint::spin_loop();
            }
        }
    }

    /// Hands the filled part of the current slot to the device.
    fn send(&mut self) -> bool {
        if self.fill == 0 {
            return true;
        }
        let s = self.slot;
        write_desc(self.vq.desc_table(), s, self.buffers + s as u64 * SLOT_BYTES, self.fill as u32, 0, 0);
        self.busy |= 1 << s;
        self.vq.push(s);
        self.vq.publish();
        self.slot = (s + 1) % SLOTS;
        self.fill = 0;
        self.wait_for(1 << self.slot)
    }

    fn write(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            let at = self.buffers + self.slot as u64 * SLOT_BYTES + self.fill;
            // SAFETY: inside the slot (fill < SLOT_BYTES), guest RAM the
            // arena gave this port, not in the device's hands (the slot
            // was waited for when it became current).
            unsafe { core::ptr::write_volatile(at as *mut u8, b) };
            self.fill += 1;
            if (b == b'\n' || self.fill == SLOT_BYTES) && !self.send() {
                return false;
            }
        }
        true
    }
}

/// Writes `bytes` to the console.
pub fn write(bytes: &[u8]) {
    // SAFETY: one vCPU; `busy` keeps a write that interrupts another
    // (a fault while formatting) away from the port.
    unsafe {
        let busy = CONSOLE.busy.get();
        let port = &mut *CONSOLE.port.get();
        match port {
            Some(p) if !*busy => {
                *busy = true;
                if !p.write(bytes) {
                    // The device stopped taking lines: the UART it is.
                    *port = None;
                    crate::serial::write_bytes(b"console: the virtio console stopped taking output; the UART from here\n");
                }
                *busy = false;
            }
            _ => crate::serial::write_bytes(bytes),
        }
    }
}

/// Before the guest exits: every line handed over and taken.
pub fn finish() {
    // SAFETY: as `write`.
    unsafe {
        if *CONSOLE.busy.get() {
            return;
        }
        if let Some(p) = &mut *CONSOLE.port.get() {
            if p.send() {
                p.wait_for(u16::MAX);
            }
        }
    }
}

/// `core::fmt` onto the console.
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write(s.as_bytes());
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write;
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}
