//! Probe: which of KVM's state ioctls work on this host, and does a vCPU
//! whose state was read from one VM and written into a fresh one carry on
//! where it stopped? (What a VM snapshot needs; PVM, the software KVM of
//! these machines, may lack some of what hardware KVM has.)
//!
//! `cargo run --release -p vmm --example kvm_state_probe [-- --json]`
//!
//! A tiny 32-bit guest (the PVH entry's mode) runs `out 0x10` and stops
//! there; every vCPU and VM state is read (GET), written back (SET), then
//! moved into a second VM with a copy of the memory, which must reach the
//! guest's next instruction, `out 0x11`, with the registers it left.

use std::process::ExitCode;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

const MEM: usize = 2 << 20;
const CODE: u64 = 0x1000;

/// Page-aligned anonymous memory for a VM (KVM wants page alignment).
struct Memory(&'static mut [u8]);

impl Memory {
    fn new() -> Memory {
        // SAFETY: a fresh private anonymous mapping, owned by the result.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        // SAFETY: MEM bytes just mapped, never unmapped (the probe ends).
        Memory(unsafe { std::slice::from_raw_parts_mut(p.cast(), MEM) })
    }
}

impl std::ops::Deref for Memory {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0
    }
}

impl std::ops::DerefMut for Memory {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0
    }
}

/// One probed call: its name and the error, if any.
struct Probe {
    name: &'static str,
    error: Option<String>,
    note: String,
}

fn record<T>(
    out: &mut Vec<Probe>,
    name: &'static str,
    r: Result<T, kvm_ioctls::Error>,
) -> Option<T> {
    match r {
        Ok(v) => {
            out.push(Probe {
                name,
                error: None,
                note: String::new(),
            });
            Some(v)
        }
        Err(e) => {
            out.push(Probe {
                name,
                error: Some(e.to_string()),
                note: String::new(),
            });
            None
        }
    }
}

/// A VM with the vmm's set-up (irqchip, PIT, TSS), `mem` as its memory.
fn vm_with(kvm: &Kvm, mem: &mut [u8]) -> VmFd {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).expect("KVM_CREATE_PIT2");
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mem.len() as u64,
        userspace_addr: mem.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `mem` outlives the VM (both live until main returns).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    vm
}

fn vcpu_of(kvm: &Kvm, vm: &VmFd) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("KVM_GET_SUPPORTED_CPUID");
    vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    vcpu
}

/// Runs until a port write; returns the port.
fn run_to_out(vcpu: &mut VcpuFd) -> Result<u16, String> {
    for _ in 0..16 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, _)) => return Ok(port),
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    Err("KVM_RUN kept being interrupted".into())
}

fn main() -> ExitCode {
    let json = std::env::args().any(|a| a == "--json");
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kvm_state_probe: /dev/kvm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut mem = Memory::new();
    // mov eax, 0x5eed; mov ebx, 0x1234; out 0x10, al; inc ebx; out 0x11, al; hlt
    let code = [
        0xb8, 0xed, 0x5e, 0x00, 0x00, 0xbb, 0x34, 0x12, 0x00, 0x00, 0xe6, 0x10, 0x43, 0xe6, 0x11,
        0xf4,
    ];
    mem[CODE as usize..CODE as usize + code.len()].copy_from_slice(&code);
    let vm = vm_with(&kvm, &mut mem);
    let mut vcpu = vcpu_of(&kvm, &vm);
    // 32-bit flat protected mode, as the PVH entry starts.
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    let flat = vmm::boot::segment;
    sregs.cs = flat(0x8, 0xb);
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = flat(0x10, 0x3);
    }
    sregs.cr0 = 0x11; // PE | ET
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");
    match run_to_out(&mut vcpu) {
        Ok(0x10) => {}
        other => {
            eprintln!("kvm_state_probe: the guest did not reach its first port write: {other:?}");
            return ExitCode::FAILURE;
        }
    }

    let mut probes = Vec::new();
    let p = &mut probes;
    // Every state a snapshot takes, read and written back in place.
    let regs = record(p, "KVM_GET_REGS", vcpu.get_regs());
    if let Some(r) = &regs {
        record(p, "KVM_SET_REGS", vcpu.set_regs(r));
    }
    let sregs = record(p, "KVM_GET_SREGS", vcpu.get_sregs());
    if let Some(s) = &sregs {
        record(p, "KVM_SET_SREGS", vcpu.set_sregs(s));
    }
    let fpu = record(p, "KVM_GET_FPU", vcpu.get_fpu());
    if let Some(f) = &fpu {
        record(p, "KVM_SET_FPU", vcpu.set_fpu(f));
    }
    let xsave = record(p, "KVM_GET_XSAVE", vcpu.get_xsave());
    if let Some(x) = &xsave {
        // SAFETY: a buffer KVM_GET_XSAVE filled, of the size it uses.
        record(p, "KVM_SET_XSAVE", unsafe { vcpu.set_xsave(x) });
    }
    let xcrs = record(p, "KVM_GET_XCRS", vcpu.get_xcrs());
    if let Some(x) = &xcrs {
        record(p, "KVM_SET_XCRS", vcpu.set_xcrs(x));
    }
    let debugregs = record(p, "KVM_GET_DEBUGREGS", vcpu.get_debug_regs());
    if let Some(d) = &debugregs {
        record(p, "KVM_SET_DEBUGREGS", vcpu.set_debug_regs(d));
    }
    let lapic = record(p, "KVM_GET_LAPIC", vcpu.get_lapic());
    if let Some(l) = &lapic {
        record(p, "KVM_SET_LAPIC", vcpu.set_lapic(l));
    }
    let events = record(p, "KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events());
    if let Some(e) = &events {
        record(p, "KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(e));
    }
    let mp = record(p, "KVM_GET_MP_STATE", vcpu.get_mp_state());
    if let Some(m) = mp {
        record(p, "KVM_SET_MP_STATE", vcpu.set_mp_state(m));
    }
    let tsc_khz = record(p, "KVM_GET_TSC_KHZ", vcpu.get_tsc_khz());
    if let Some(k) = tsc_khz {
        if let Some(last) = p.last_mut() {
            last.note = format!("{k} kHz");
        }
        record(p, "KVM_SET_TSC_KHZ", vcpu.set_tsc_khz(k));
        if let Some(last) = p.last_mut() {
            last.note = "the same frequency".into();
        }
    }
    // MSRs: every index KVM lists, read in one call; the count read says
    // how many it could.
    let msr_list = record(p, "KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list());
    let mut msrs_read = None;
    if let Some(list) = &msr_list {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = list
            .as_slice()
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let listed = entries.len();
        // Read one by one, so that one MSR KVM cannot read does not hide
        // the rest (KVM_GET_MSRS stops at the first failure).
        let mut readable = Vec::new();
        let mut unreadable = Vec::new();
        for e in &entries {
            let mut one = Msrs::from_entries(&[*e]).expect("one MSR");
            match vcpu.get_msrs(&mut one) {
                Ok(1) => readable.push(one.as_slice()[0]),
                _ => unreadable.push(e.index),
            }
        }
        p.push(Probe {
            name: "KVM_GET_MSRS",
            error: None,
            note: format!(
                "{} of {listed} listed MSRs readable{}",
                readable.len(),
                if unreadable.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; not: {}",
                        unreadable
                            .iter()
                            .map(|i| format!("{i:#x}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                }
            ),
        });
        let all = Msrs::from_entries(&readable).expect("MSRs");
        match vcpu.set_msrs(&all) {
            Ok(n) if n == readable.len() => p.push(Probe {
                name: "KVM_SET_MSRS",
                error: None,
                note: format!("all {n} written back"),
            }),
            Ok(n) => p.push(Probe {
                name: "KVM_SET_MSRS",
                error: Some(format!(
                    "stopped at {:#x} ({n} of {} written)",
                    readable[n].index,
                    readable.len()
                )),
                note: String::new(),
            }),
            Err(e) => p.push(Probe {
                name: "KVM_SET_MSRS",
                error: Some(e.to_string()),
                note: String::new(),
            }),
        }
        msrs_read = Some(readable);
    }
    let clock = record(p, "KVM_GET_CLOCK", vm.get_clock());
    if let Some(c) = &clock {
        let back = kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        record(p, "KVM_SET_CLOCK", vm.set_clock(&back));
        if let Some(last) = p.last_mut() {
            last.note = format!("flags {:#x}", c.flags);
        }
    }
    let mut chips = Vec::new();
    for (id, name, set) in [
        (
            KVM_IRQCHIP_PIC_MASTER,
            "KVM_GET_IRQCHIP (PIC master)",
            "KVM_SET_IRQCHIP (PIC master)",
        ),
        (
            KVM_IRQCHIP_PIC_SLAVE,
            "KVM_GET_IRQCHIP (PIC slave)",
            "KVM_SET_IRQCHIP (PIC slave)",
        ),
        (
            KVM_IRQCHIP_IOAPIC,
            "KVM_GET_IRQCHIP (IOAPIC)",
            "KVM_SET_IRQCHIP (IOAPIC)",
        ),
    ] {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        if record(p, name, vm.get_irqchip(&mut chip)).is_some() {
            record(p, set, vm.set_irqchip(&chip));
            chips.push(chip);
        }
    }
    let pit = record(p, "KVM_GET_PIT2", vm.get_pit2());
    if let Some(s) = &pit {
        record(p, "KVM_SET_PIT2", vm.set_pit2(s));
    }
    let caps = [
        ("KVM_CAP_XSAVE2", kvm.check_extension_int(Cap::Xsave2)),
        (
            "KVM_CAP_ADJUST_CLOCK",
            kvm.check_extension_int(Cap::AdjustClock),
        ),
        (
            "KVM_CAP_VCPU_EVENTS",
            kvm.check_extension_int(Cap::VcpuEvents),
        ),
        (
            "KVM_CAP_TSC_CONTROL",
            kvm.check_extension_int(Cap::TscControl),
        ),
        (
            "KVM_CAP_GET_TSC_KHZ",
            kvm.check_extension_int(Cap::GetTscKhz),
        ),
        ("KVM_CAP_DEBUGREGS", kvm.check_extension_int(Cap::Debugregs)),
        ("KVM_CAP_XCRS", kvm.check_extension_int(Cap::Xcrs)),
    ];

    // The move: a second VM with a copy of the memory, every state written
    // in the order a restore uses, then run on.
    let mut mem2 = Memory::new();
    mem2.copy_from_slice(&mem);
    let vm2 = vm_with(&kvm, &mut mem2);
    let mut vcpu2 = vcpu_of(&kvm, &vm2);
    let mut restore_errors = Vec::new();
    let mut step = |what: &str, r: Result<(), kvm_ioctls::Error>| {
        if let Err(e) = r {
            restore_errors.push(format!("{what}: {e}"));
        }
    };
    if let Some(s) = &sregs {
        step("sregs", vcpu2.set_sregs(s));
    }
    if let Some(x) = &xsave {
        // SAFETY: as above.
        step("xsave", unsafe { vcpu2.set_xsave(x) });
    } else if let Some(f) = &fpu {
        step("fpu", vcpu2.set_fpu(f));
    }
    if let Some(x) = &xcrs {
        step("xcrs", vcpu2.set_xcrs(x));
    }
    if let Some(r) = &regs {
        step("regs", vcpu2.set_regs(r));
    }
    if let Some(m) = &msrs_read {
        let all = Msrs::from_entries(m).expect("MSRs");
        step("msrs", vcpu2.set_msrs(&all).map(drop));
    }
    if let Some(d) = &debugregs {
        step("debugregs", vcpu2.set_debug_regs(d));
    }
    if let Some(l) = &lapic {
        step("lapic", vcpu2.set_lapic(l));
    }
    if let Some(m) = mp {
        step("mp_state", vcpu2.set_mp_state(m));
    }
    if let Some(e) = &events {
        step("vcpu_events", vcpu2.set_vcpu_events(e));
    }
    for chip in &chips {
        step("irqchip", vm2.set_irqchip(chip));
    }
    if let Some(s) = &pit {
        step("pit2", vm2.set_pit2(s));
    }
    if let Some(c) = &clock {
        let back = kvm_clock_data {
            clock: c.clock,
            ..Default::default()
        };
        step("clock", vm2.set_clock(&back));
    }
    let moved = match run_to_out(&mut vcpu2) {
        Ok(0x11) => match vcpu2.get_regs() {
            Ok(r) if r.rax == 0x5eed && r.rbx == 0x1235 => Ok(()),
            Ok(r) => Err(format!(
                "reached out 0x11 with rax {:#x} rbx {:#x} (expected 0x5eed, 0x1235)",
                r.rax, r.rbx
            )),
            Err(e) => Err(format!("KVM_GET_REGS: {e}")),
        },
        Ok(port) => Err(format!("wrote port {port:#x} instead of 0x11")),
        Err(e) => Err(e),
    };

    if json {
        let v = serde_json::json!({
            "ioctls": probes.iter().map(|p| serde_json::json!({
                "ioctl": p.name, "ok": p.error.is_none(), "error": p.error, "note": p.note,
            })).collect::<Vec<_>>(),
            "caps": caps.iter().map(|(n, v)| serde_json::json!({"cap": n, "value": v})).collect::<Vec<_>>(),
            "restore_errors": restore_errors,
            "moved_vcpu_continues": moved.is_ok(),
            "moved_error": moved.as_ref().err(),
        });
        println!("{v:#}");
    } else {
        println!("| ioctl | result | note |\n|---|---|---|");
        for p in &probes {
            println!(
                "| {} | {} | {} |",
                p.name,
                p.error
                    .as_deref()
                    .map_or("ok".into(), |e| format!("fails: {e}")),
                p.note
            );
        }
        println!();
        for (n, v) in caps {
            println!("{n}: {v}");
        }
        println!();
        if restore_errors.is_empty() {
            println!("every state written into a fresh VM");
        } else {
            println!(
                "writing into a fresh VM failed: {}",
                restore_errors.join("; ")
            );
        }
        match &moved {
            Ok(()) => println!("the moved vCPU ran on to its next instruction with its registers"),
            Err(e) => println!("the moved vCPU did not carry on: {e}"),
        }
    }
    if moved.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
