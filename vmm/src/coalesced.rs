//! Console writes without a userspace exit each (KVM's coalesced PIO).
//!
//! A guest writes its console one byte at a time, and every `out` to the
//! UART used to be a trip to userspace and back: about 25 us each under
//! PVM, 20 of the 24 ms a 1-I/O bench guest spends running. Registered as
//! a coalesced zone, writes to the UART's data port land in a ring KVM
//! shares with us (the kernel appends, we consume) and the vCPU goes on.
//!
//! The same holds for a virtio device's set-up registers (feature and
//! queue selectors, ring addresses: `virtio_pci::coalescable`), whose
//! writes only latch values that a later read or the status write acts
//! on: two dozen exits per device (about 25 us each under PVM) become
//! entries in the ring.
//!
//! Nothing a guest can observe changes: the UART has no interrupt line
//! (the guest polls it), and every exit drains the ring before it is
//! handled, so a read of the status register, a write to the line control
//! register (divisor latch) or the debug exit sees every byte written
//! before it, in order. Output that no exit follows (a progress line
//! during a long workload) is drained by the console thread: at most 10 ms
//! late while the guest writes, backing off to 500 ms when it does not
//! (`vm::serve_console`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use thiserror::Error;

use crate::devices::Bus;

/// The page of the vCPU mapping that holds the ring.
const RING_PAGE_OFFSET: i64 = kvm_bindings::KVM_COALESCED_MMIO_PAGE_OFFSET as i64;

#[derive(Debug, Error)]
pub enum CoalescedError {
    #[error("KVM_REGISTER_COALESCED_MMIO for port {port:#x}")]
    Register {
        port: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_REGISTER_COALESCED_MMIO for {addr:#x}")]
    RegisterMmio {
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("mapping KVM's coalesced-write ring")]
    Map(#[source] std::io::Error),
}

/// KVM's ring of coalesced writes for one VM.
pub struct CoalescedWrites {
    ring: *mut kvm_coalesced_mmio_ring,
    page_size: usize,
    /// Entries the ring holds.
    capacity: u32,
    /// One consumer at a time (vCPUs and the console thread).
    consumer: Mutex<()>,
}

// SAFETY: the ring is a shared mapping that lives as long as this value;
// its consumer index is only written under `consumer`, the producer
// index only read, atomically.
unsafe impl Send for CoalescedWrites {}
// SAFETY: as above.
unsafe impl Sync for CoalescedWrites {}

impl CoalescedWrites {
    /// Maps the VM's ring (through any vCPU's descriptor) and coalesces
    /// single-byte writes to `ports` and writes to the MMIO `ranges`
    /// (address, length). None when KVM cannot coalesce port writes: every
    /// write then exits, as before.
    pub fn set_up(
        kvm: &Kvm,
        vm: &VmFd,
        vcpu: &VcpuFd,
        ports: &[u64],
        ranges: &[(u64, u64)],
    ) -> Result<Option<CoalescedWrites>, CoalescedError> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return Ok(None);
        }
        // SAFETY: sysconf has no memory arguments.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        use std::os::fd::AsRawFd;
        // SAFETY: maps one page of the vCPU descriptor at the offset KVM
        // documents for the ring; the result is checked below and
        // unmapped in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                RING_PAGE_OFFSET * page_size as i64,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(CoalescedError::Map(std::io::Error::last_os_error()));
        }
        let writes = CoalescedWrites {
            ring: addr.cast(),
            page_size,
            capacity: ((page_size - size_of::<kvm_coalesced_mmio_ring>())
                / size_of::<kvm_coalesced_mmio>()) as u32,
            consumer: Mutex::new(()),
        };
        for &port in ports {
            vm.register_coalesced_mmio(IoEventAddress::Pio(port), 1)
                .map_err(|source| CoalescedError::Register { port, source })?;
        }
        for &(addr, len) in ranges {
            vm.register_coalesced_mmio(IoEventAddress::Mmio(addr), len as u32)
                .map_err(|source| CoalescedError::RegisterMmio { addr, source })?;
        }
        Ok(Some(writes))
    }

    fn indices(&self) -> (&AtomicU32, &AtomicU32) {
        // SAFETY: `first` and `last` are aligned u32s in the mapped page,
        // shared with the kernel: accessed only atomically.
        unsafe {
            (
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.ring).first)),
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.ring).last)),
            )
        }
    }

    /// Whether writes wait in the ring (no lock: a vCPU checks on every
    /// exit).
    pub fn pending(&self) -> bool {
        let (first, last) = self.indices();
        first.load(Ordering::Relaxed) != last.load(Ordering::Acquire)
    }

    /// Hands every waiting write to its device, in the guest's order; how
    /// many there were.
    pub fn drain(&self, pio: &Bus, mmio: &Bus) -> usize {
        if !self.pending() {
            return 0;
        }
        let _one = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        let (first, last) = self.indices();
        let mut n = 0;
        loop {
            let at = first.load(Ordering::Relaxed);
            if at == last.load(Ordering::Acquire) || at >= self.capacity {
                return n;
            }
            // SAFETY: `at` is below the ring's capacity, so the entry lies
            // in the mapped page; the kernel wrote it before publishing
            // `last` (acquired above).
            let entry: kvm_coalesced_mmio = unsafe {
                std::ptr::read_volatile(
                    std::ptr::addr_of!((*self.ring).coalesced_mmio)
                        .cast::<kvm_coalesced_mmio>()
                        .add(at as usize),
                )
            };
            let len = (entry.len as usize).min(entry.data.len());
            // SAFETY: both union members are plain u32s.
            let is_pio = unsafe { entry.__bindgen_anon_1.pio } != 0;
            let bus = if is_pio { pio } else { mmio };
            bus.write(entry.phys_addr, &entry.data[..len]);
            first.store((at + 1) % self.capacity, Ordering::Release);
            n += 1;
        }
    }
}

impl Drop for CoalescedWrites {
    fn drop(&mut self) {
        // SAFETY: the page mapped in set_up, not used after this.
        unsafe { libc::munmap(self.ring.cast(), self.page_size) };
    }
}
