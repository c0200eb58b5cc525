//! A vCPU's state as KVM exposes it, read from a stopped vCPU and written
//! into a fresh one (in the order Firecracker restores it: MP state,
//! registers, special registers, XSAVE, XCRs, debug registers, LAPIC,
//! MSRs, then pending events, which depend on the rest).
//!
//! A vCPU that stopped on a port or MMIO read has the value in its run
//! structure, not yet in its registers: KVM puts it there on the next
//! KVM_RUN. [`save`] completes that first (KVM_RUN with `immediate_exit`
//! set, which finishes the instruction and returns at once), as QEMU and
//! Firecracker do, so the saved registers hold what the guest read.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// The TSC frequency the guest saw (KVM cannot always change it: see
    /// [`VcpuStateError::TscFrequency`]).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Error)]
pub enum VcpuStateError {
    #[error("vCPU {id}: {call}: {source}")]
    Kvm {
        id: u8,
        call: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM took {written} of {total} MSRs (it refused {index:#x})")]
    Msrs {
        id: u8,
        written: usize,
        total: usize,
        index: u32,
    },
    #[error(
        "vCPU {id}: the snapshot's guest ran with a {saved} kHz TSC and this host's KVM \
         cannot give it that frequency (it runs at {here} kHz and cannot scale: {source})"
    )]
    TscFrequency {
        id: u8,
        saved: u32,
        here: u32,
        source: kvm_ioctls::Error,
    },
}

/// The MSR indices a snapshot saves: every index KVM lists.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, kvm_ioctls::Error> {
    Ok(kvm.get_msr_index_list()?.as_slice().to_vec())
}

/// Reads the state of a vCPU that is not running (its thread parked, or
/// stopped at an exit), completing a pending port or MMIO read first.
/// MSRs KVM lists but cannot read on this vCPU are left out.
pub fn save(id: u8, vcpu: &mut VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let kvm = |call| move |source| VcpuStateError::Kvm { id, call, source };
    vcpu.set_kvm_immediate_exit(1);
    let completed = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(e),
        // Nothing was pending and KVM did not even enter: fine too.
        Ok(_) => Ok(()),
    };
    vcpu.set_kvm_immediate_exit(0);
    completed.map_err(kvm("KVM_RUN (immediate exit)"))?;
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for &index in msr_indices {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| VcpuStateError::Msrs {
            id,
            written: 0,
            total: 1,
            index,
        })?;
        if let Ok(1) = vcpu.get_msrs(&mut one) {
            msrs.push(one.as_slice()[0]);
        }
    }
    Ok(VcpuState {
        id,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: vcpu.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?,
    })
}

/// Writes `s` into a fresh vCPU (its CPUID already set).
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    let id = s.id;
    let kvm = |call| move |source| VcpuStateError::Kvm { id, call, source };
    let here = vcpu.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
    if here != s.tsc_khz {
        vcpu.set_tsc_khz(s.tsc_khz)
            .map_err(|source| VcpuStateError::TscFrequency {
                id,
                saved: s.tsc_khz,
                here,
                source,
            })?;
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: an XSAVE area KVM_GET_XSAVE filled, of the size it has.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuStateError::Msrs {
        id,
        written: 0,
        total: s.msrs.len(),
        index: s.msrs.first().map_or(0, |m| m.index),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != s.msrs.len() {
        return Err(VcpuStateError::Msrs {
            id,
            written,
            total: s.msrs.len(),
            index: s.msrs[written].index,
        });
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{VcpuExit, VmFd};

    const MEM: usize = 2 << 20;

    /// A VM like the vmm's (TSS, irqchip) on `mem`, and its one vCPU.
    fn vm_on(kvm: &Kvm, mem: &crate::memory::GuestRam) -> (VmFd, VcpuFd) {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(0xfffb_d000).expect("TSS");
        vm.create_irq_chip().expect("irqchip");
        let r = mem.mem.iter().next().expect("a region");
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `mem` outlives the VM in each test.
        unsafe { vm.set_user_memory_region(region) }.expect("memory");
        let vcpu = vm.create_vcpu(0).expect("vCPU");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("CPUID");
        vcpu.set_cpuid2(&cpuid).expect("CPUID");
        (vm, vcpu)
    }

    fn run(vcpu: &mut VcpuFd, port_in: Option<u8>) -> (bool, u16) {
        loop {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(port, _)) => return (false, port),
                Ok(VcpuExit::IoIn(port, data)) => {
                    if let Some(v) = port_in {
                        data[0] = v;
                    }
                    return (true, port);
                }
                Err(e) if e.errno() == libc::EINTR => continue,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    /// A guest stopped on a port read is saved (the value it read lands
    /// in its registers), its memory copied, and the state written into a
    /// new VM, which runs on from the next instruction.
    #[test]
    fn a_vcpu_saved_mid_read_carries_on_in_a_new_vm() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        };
        let ram = crate::memory::create(MEM as u64).expect("memory");
        // mov eax, 0x5eed00; mov ebx, 0x1234; out 0x10, al; in al, 0x12;
        // inc ebx; out 0x11, al; hlt
        let code = [
            0xb8, 0x00, 0xed, 0x5e, 0x00, 0xbb, 0x34, 0x12, 0x00, 0x00, 0xe6, 0x10, 0xe4, 0x12,
            0x43, 0xe6, 0x11, 0xf4,
        ];
        use std::os::unix::fs::FileExt;
        ram.file.write_all_at(&code, 0x1000).expect("code");
        let (_vm, mut vcpu) = vm_on(&kvm, &ram);
        let mut sregs = vcpu.get_sregs().expect("sregs");
        let flat = crate::boot::segment;
        sregs.cs = flat(8, 0xb);
        sregs.ds = flat(0x10, 3);
        sregs.es = flat(0x10, 3);
        sregs.ss = flat(0x10, 3);
        sregs.cr0 = 0x11;
        vcpu.set_sregs(&sregs).expect("sregs");
        let mut regs = vcpu.get_regs().expect("regs");
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).expect("regs");
        assert_eq!(run(&mut vcpu, None), (false, 0x10));
        // Stopped on `in al, 0x12`, the value given but not yet taken.
        assert_eq!(run(&mut vcpu, Some(0x77)), (true, 0x12));
        let indices = msr_indices(&kvm).expect("MSR list");
        let state = save(0, &mut vcpu, &indices).expect("save");
        assert_eq!(
            state.regs.rax, 0x5eed77,
            "the read value is in the saved rax"
        );
        // Through the state file's form (JSON) and back.
        let json = serde_json::to_vec(&state).expect("serialize");
        let state: VcpuState = serde_json::from_slice(&json).expect("deserialize");

        let ram2 = crate::memory::create(MEM as u64).expect("memory");
        let dir = tempfile::tempdir().expect("dir");
        let saved = dir.path().join("memory");
        crate::snapshot::memory::save(&ram.file, MEM as u64, &saved).expect("save memory");
        crate::snapshot::memory::load(&saved, &ram2.file, MEM as u64).expect("load memory");
        let (_vm2, mut vcpu2) = vm_on(&kvm, &ram2);
        restore(&vcpu2, &state).expect("restore");
        assert_eq!(run(&mut vcpu2, None), (false, 0x11));
        let r = vcpu2.get_regs().expect("regs");
        assert_eq!((r.rax, r.rbx), (0x5eed77, 0x1235));
    }

    #[test]
    fn a_tsc_frequency_kvm_cannot_give_is_refused_by_name() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        };
        if kvm.check_extension(kvm_ioctls::Cap::TscControl) {
            eprintln!("SKIPPED: this KVM scales TSC frequencies (hardware KVM)");
            return;
        }
        let ram = crate::memory::create(MEM as u64).expect("memory");
        let (_vm, mut vcpu) = vm_on(&kvm, &ram);
        let mut state = save(0, &mut vcpu, &[]).expect("save");
        state.tsc_khz /= 2;
        let (_vm2, vcpu2) = vm_on(&kvm, &ram);
        let e = restore(&vcpu2, &state).expect_err("another frequency");
        assert!(matches!(e, VcpuStateError::TscFrequency { .. }), "{e}");
        assert!(e.to_string().contains("kHz"), "{e}");
    }
}
