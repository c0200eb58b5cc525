//! Loading a kernel and the state its first vCPU starts in.
//!
//! PVH (an ELF with XEN_ELFNOTE_PHYS32_ENTRY: the bench guest, Linux
//! vmlinux): the kernel starts in 32-bit protected mode without paging,
//! with %ebx pointing at an `hvm_start_info` that names the command line
//! and the memory map.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::GuestRam;

/// Where the boot structures go (below the kernel's usual 1 MiB).
pub const START_INFO: u64 = 0x6000;
pub const MEMMAP: u64 = 0x7000;
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// RAM below the legacy hole (EBDA, VGA, BIOS) that the map offers.
const LOW_RAM_END: u64 = 0x9fc00;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("{path}: not a kernel this VMM can boot: {why}")]
    Kernel { path: String, why: String },
    #[error("{path}: an ELF without a PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvh { path: String },
    #[error("the command line is {0} bytes; at most {CMDLINE_MAX} - 1")]
    CmdlineTooLong(usize),
    #[error("writing boot data into guest memory: {0}")]
    Memory(String),
}

/// Where the first vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub rip: u64,
    pub start_info: u64,
    pub kernel_end: u64,
}

const E820_RAM: u32 = 1;

/// Loads a PVH kernel and writes its start info, memory map and command line.
pub fn load_pvh(ram: &GuestRam, kernel: &Path, cmdline: &str) -> Result<Entry, BootError> {
    let path = kernel.display().to_string();
    let mut f = File::open(kernel).map_err(|err| BootError::Open {
        path: path.clone(),
        err,
    })?;
    let loaded = Elf::load(&ram.mem, None, &mut f, Some(GuestAddress(0x100000))).map_err(|e| {
        BootError::Kernel {
            path: path.clone(),
            why: e.to_string(),
        }
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvh { path });
    };
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mem = &ram.mem;
    let w = |r: Result<(), vm_memory::GuestMemoryError>| {
        r.map_err(|e| BootError::Memory(e.to_string()))
    };
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    w(mem.write_slice(&line, GuestAddress(CMDLINE)))?;
    // The memory map: low RAM, RAM from 1 MiB, and any RAM above 4 GiB.
    let mut map: Vec<(u64, u64, u32)> = vec![(0, LOW_RAM_END, E820_RAM)];
    for &(at, len) in &ram.ranges {
        if at == 0 {
            map.push((0x100000, len - 0x100000, E820_RAM));
        } else {
            map.push((at, len, E820_RAM));
        }
    }
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        let e = GuestAddress(MEMMAP + 24 * i as u64);
        w(mem.write_obj(addr, e))?;
        w(mem.write_obj(size, GuestAddress(e.0 + 8)))?;
        w(mem.write_obj(kind, GuestAddress(e.0 + 16)))?;
        w(mem.write_obj(0u32, GuestAddress(e.0 + 20)))?;
    }
    write_start_info(mem, map.len() as u32).map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(Entry {
        rip: entry.0,
        start_info: START_INFO,
        kernel_end: loaded.kernel_end,
    })
}

/// `struct hvm_start_info` (Xen's public arch-x86/hvm/start_info.h), version 1.
fn write_start_info(
    mem: &GuestMemoryMmap,
    entries: u32,
) -> Result<(), vm_memory::GuestMemoryError> {
    let at = |off: u64| GuestAddress(START_INFO + off);
    mem.write_obj(0x336e_c578u32, at(0))?; // magic "xEn3" with the top bit set
    mem.write_obj(1u32, at(4))?; // version
    mem.write_obj(0u32, at(8))?; // flags
    mem.write_obj(0u32, at(12))?; // nr_modules
    mem.write_obj(0u64, at(16))?; // modlist_paddr
    mem.write_obj(CMDLINE, at(24))?; // cmdline_paddr
    mem.write_obj(0u64, at(32))?; // rsdp_paddr
    mem.write_obj(MEMMAP, at(40))?; // memmap_paddr
    mem.write_obj(entries, at(48))?; // memmap_entries
    mem.write_obj(0u32, at(52))?;
    Ok(())
}

fn segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The PVH entry state: flat 32-bit protected mode, paging off.
pub fn pvh_registers(entry: &Entry, sregs: &mut kvm_sregs) -> kvm_regs {
    sregs.cs = segment(0x8, 0xb);
    let data = segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    kvm_regs {
        rip: entry.rip,
        rbx: entry.start_info,
        rflags: 2,
        ..Default::default()
    }
}
