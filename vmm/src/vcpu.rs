//! A vCPU's thread: KVM_RUN and its exits dispatched to the buses, until
//! the guest stops or the VM does; and what a vCPU is given at its start
//! (its CPUID, a booting guest's entry registers).

use crossbeam_channel::Sender;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot;
use crate::control::Control;
use crate::device_manager::Machine;
use crate::devices::serial;
use crate::events::VmEvent;

/// The host's supported CPUID as vCPU `id` sees it: its APIC ID in leaf 1
/// and the topology leaves.
pub fn cpuid_for(id: u8, supported: &CpuId) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id as u32) << 24,
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    c
}

/// The boot vCPU's registers at the kernel's entry.
pub fn set_entry_registers(vcpu: &VcpuFd, entry: &boot::Entry) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    let regs = if entry.long_mode {
        boot::long_mode_registers(entry, &mut sregs)
    } else {
        boot::pvh_registers(entry, &mut sregs)
    };
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)
}

fn dump(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
             rsi={:#x} rdi={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector
        ),
        _ => "registers unreadable".into(),
    }
}

pub fn run(id: u8, mut vcpu: VcpuFd, m: &Machine, events: &Sender<VmEvent>, ctl: &Control) {
    /// Tells the control the vCPU is gone, however the loop ends.
    struct Ended<'a>(&'a Control);
    impl Drop for Ended<'_> {
        fn drop(&mut self) {
            self.0.vcpu_ended();
        }
    }
    let _ended = Ended(ctl);
    let end = |ev: VmEvent| {
        let _ = events.send(ev);
    };
    if let Err(e) = crate::seccomp::confine(&crate::seccomp::VCPU) {
        end(VmEvent::Fault(format!("vCPU {id}: {e}")));
        return;
    }
    let stats = &ctl.stats[id as usize];
    let count = |c: &std::sync::atomic::AtomicU64| {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    loop {
        let mut save = |msrs: &[u32]| crate::snapshot::vcpu::save(id, &mut vcpu, msrs);
        if !ctl.vcpu_may_run(id as usize, &mut save) {
            return;
        }
        let t0 = std::time::Instant::now();
        let exit = vcpu.run();
        stats.run_ns.fetch_add(
            t0.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        // Console bytes the guest wrote before this exit reach the device
        // before the exit is handled (its order, as without coalescing).
        if let Some(c) = m.coalesced.get() {
            if c.drain(&m.pio, &m.mmio) > 0 {
                m.flush_console();
            }
        }
        match &exit {
            Ok(VcpuExit::IoOut(..)) => count(&stats.io_out),
            Ok(VcpuExit::IoIn(..)) => count(&stats.io_in),
            Ok(VcpuExit::MmioRead(..)) => count(&stats.mmio_read),
            Ok(VcpuExit::MmioWrite(..)) => count(&stats.mmio_write),
            Err(_) => count(&stats.interrupted),
            Ok(_) => count(&stats.other),
        }
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                m.pio.write(port as u64, data);
                if (serial::PORT..serial::PORT + serial::LEN).contains(&(port as u64)) {
                    m.flush_console();
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !m.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !m.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                m.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC a halt only exits when nothing
                // can wake the vCPU.
                end(VmEvent::PowerOff);
                return;
            }
            Ok(VcpuExit::Shutdown) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: triple fault; {}",
                    dump(&vcpu)
                )));
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                end(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reboot,
                    k => VmEvent::Fault(format!("vCPU {id}: system event {k}")),
                });
                return;
            }
            Ok(VcpuExit::InternalError) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: KVM internal error (an instruction KVM cannot emulate?); {}",
                    dump(&vcpu)
                )));
                return;
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: entry failed ({reason:#x}); {}",
                    dump(&vcpu)
                )));
                return;
            }
            Ok(other) => {
                let what = format!("{other:?}");
                end(VmEvent::Fault(format!(
                    "vCPU {id}: unexpected exit {what}; {}",
                    dump(&vcpu)
                )));
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                end(VmEvent::Fault(format!(
                    "vCPU {id}: KVM_RUN: {e}; {}",
                    dump(&vcpu)
                )));
                return;
            }
        }
    }
}
