//! Loading a kernel and the state its first vCPU starts in.
//!
//! PVH (an ELF with XEN_ELFNOTE_PHYS32_ENTRY: the bench guest, Linux
//! vmlinux): the kernel starts in 32-bit protected mode without paging,
//! with %ebx pointing at an `hvm_start_info` that names the command line,
//! the memory map, the initrd and the ACPI tables.
//!
//! bzImage (Linux as distributions ship it): the 64-bit boot protocol, the
//! kernel entered at `startup_64` in long mode with %rsi pointing at the
//! zero page (`boot_params`).

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
pub const MODLIST: u64 = 0x6800;
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
    #[error(
        "initrd {path}: {size} bytes do not fit in guest memory below 4 GiB beside the kernel"
    )]
    InitrdTooBig { path: String, size: u64 },
    #[error("the command line is {0} bytes; at most {CMDLINE_MAX} - 1")]
    CmdlineTooLong(usize),
    #[error("the command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLongForKernel { len: usize, max: usize },
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the first vCPU starts, and in which mode.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub rip: u64,
    /// PVH: `hvm_start_info` (in %ebx); bzImage: the zero page (in %rsi).
    pub start_info: u64,
    pub kernel_end: u64,
    pub long_mode: bool,
}

/// linux-loader's message without the "Kernel Loader: " its every layer
/// repeats ("Kernel Loader: failed to load ELF kernel image: Kernel Loader:
/// Invalid entry address"): each cause once.
fn loader_reason(e: &linux_loader::loader::Error) -> String {
    e.to_string().replace("Kernel Loader: ", "")
}

/// The kernel's format, from its first bytes.
pub fn is_bzimage(kernel: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(kernel) else {
        return false;
    };
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0x202)).is_ok() && f.read_exact(&mut magic).is_ok() && &magic == b"HdrS"
}

/// `xloadflags`: the kernel has a 64-bit entry 0x200 into its image.
const XLF_KERNEL_64: u16 = 1;

/// The zero page, page tables and GDT of a 64-bit boot-protocol start.
const ZERO_PAGE: u64 = 0x7000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;

/// Loads a bzImage for the 64-bit boot protocol: the kernel at 1 MiB, a
/// zero page with the command line, the memory map, the initrd and the
/// RSDP; identity-mapped page tables for the first GiB.
pub fn load_bzimage(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<Entry, BootError> {
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::BzImage;
    let path = kernel.display().to_string();
    let mut f = File::open(kernel).map_err(|err| BootError::Open {
        path: path.clone(),
        err,
    })?;
    let loaded =
        BzImage::load(&ram.mem, None, &mut f, Some(GuestAddress(0x100000))).map_err(|e| {
            BootError::Kernel {
                path: path.clone(),
                why: loader_reason(&e),
            }
        })?;
    let hdr = loaded.setup_header.ok_or_else(|| BootError::Kernel {
        path: path.clone(),
        why: "no setup header".into(),
    })?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    // The 64-bit entry exists only where the kernel says so (protocol 2.12+).
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Kernel {
            path,
            why: format!(
                "this bzImage has no 64-bit entry point (boot protocol {}.{:02}, xloadflags {xloadflags:#x})",
                version >> 8,
                version & 0xff
            ),
        });
    }
    let cmdline_max = hdr.cmdline_size as usize;
    if cmdline.len() > cmdline_max {
        return Err(BootError::CmdlineTooLongForKernel {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    // What the kernel occupies from its load address once running (its
    // .bss, and for Linux the room to decompress in): the initrd stays
    // clear of it, not only of the file's bytes.
    let kernel_end = loaded
        .kernel_end
        .max(loaded.kernel_load.0 + u64::from(hdr.init_size));
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let mem = &ram.mem;
    let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(BootError::Memory);
    write_cmdline(mem, cmdline)?;
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.acpi_rsdp_addr = rsdp;
    let map = memory_map(ram);
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = kind;
    }
    params.e820_entries = map.len() as u8;
    if let Some(p) = initrd {
        let (at, len) = load_initrd(ram, p, kernel_end)?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    w(mem.write_obj(params, GuestAddress(ZERO_PAGE)))?;
    // Identity map of the first GiB with 2 MiB pages.
    w(mem.write_obj(PDPT | 3, GuestAddress(PML4)))?;
    w(mem.write_obj(PD | 3, GuestAddress(PDPT)))?;
    for i in 0..512u64 {
        w(mem.write_obj((i << 21) | 0x83, GuestAddress(PD + 8 * i)))?;
    }
    // GDT: null, 64-bit code, data.
    for (i, d) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .enumerate()
    {
        w(mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)))?;
    }
    Ok(Entry {
        // startup_64 sits 0x200 into the protected-mode kernel.
        rip: loaded.kernel_load.0 + 0x200,
        start_info: ZERO_PAGE,
        kernel_end,
        long_mode: true,
    })
}

/// 64-bit mode with the identity map on, as the boot protocol's 64-bit
/// entry expects (%rsi: the zero page).
pub fn long_mode_registers(entry: &Entry, sregs: &mut kvm_sregs) -> kvm_regs {
    let mut code = segment(0x8, 0xb);
    code.l = 1;
    code.db = 0;
    sregs.cs = code;
    let data = segment(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = 0x500; // LME | LMA
    kvm_regs {
        rip: entry.rip,
        rsi: entry.start_info,
        rflags: 2,
        ..Default::default()
    }
}

/// The command line, NUL-terminated, at [`CMDLINE`].
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE))
        .map_err(BootError::Memory)
}

/// The guest's memory map: low RAM, RAM from 1 MiB (and above 4 GiB),
/// the ECAM window reserved.
fn memory_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<(u64, u64, u32)> = vec![(0, LOW_RAM_END, E820_RAM)];
    for &(at, len) in &ram.ranges {
        if at == 0 {
            map.push((0x100000, len - 0x100000, E820_RAM));
        } else {
            map.push((at, len, E820_RAM));
        }
    }
    // The ECAM window is not RAM, and not for the guest to place BARs in.
    map.push((crate::acpi::ECAM_BASE, crate::acpi::ECAM_LEN, E820_RESERVED));
    map
}

/// Copies an initrd as high as RAM below 4 GiB allows: (address, size).
fn load_initrd(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|err| BootError::Open {
        path: shown.clone(),
        err,
    })?;
    let at = initrd_address(ram, data.len() as u64, kernel_end).ok_or(BootError::InitrdTooBig {
        path: shown,
        size: data.len() as u64,
    })?;
    ram.mem
        .write_slice(&data, GuestAddress(at))
        .map_err(BootError::Memory)?;
    Ok((at, data.len() as u64))
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Points `hvm_start_info.rsdp_paddr` at the ACPI tables.
pub fn set_rsdp(mem: &GuestMemoryMmap, rsdp: u64) -> Result<(), BootError> {
    mem.write_obj(rsdp, GuestAddress(START_INFO + 32))
        .map_err(BootError::Memory)
}

/// Where an initrd goes: page-aligned, as high as RAM below 4 GiB allows.
fn initrd_address(ram: &GuestRam, size: u64, kernel_end: u64) -> Option<u64> {
    let low_end = ram.ranges.first().map(|r| r.1)?;
    let at = low_end.checked_sub(size)? & !0xfff;
    (at >= kernel_end).then_some(at)
}

/// Loads a PVH kernel (and an initrd, as the first module) and writes its
/// start info, memory map and command line.
pub fn load_pvh(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<Entry, BootError> {
    let path = kernel.display().to_string();
    let mut f = File::open(kernel).map_err(|err| BootError::Open {
        path: path.clone(),
        err,
    })?;
    let loaded = Elf::load(&ram.mem, None, &mut f, Some(GuestAddress(0x100000))).map_err(|e| {
        BootError::Kernel {
            path: path.clone(),
            why: loader_reason(&e),
        }
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvh { path });
    };
    let mem = &ram.mem;
    let w = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(BootError::Memory);
    write_cmdline(mem, cmdline)?;
    let map = memory_map(ram);
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        let e = GuestAddress(MEMMAP + 24 * i as u64);
        w(mem.write_obj(addr, e))?;
        w(mem.write_obj(size, GuestAddress(e.0 + 8)))?;
        w(mem.write_obj(kind, GuestAddress(e.0 + 16)))?;
        w(mem.write_obj(0u32, GuestAddress(e.0 + 20)))?;
    }
    write_start_info(mem, map.len() as u32).map_err(BootError::Memory)?;
    if let Some(path) = initrd {
        let (at, len) = load_initrd(ram, path, loaded.kernel_end)?;
        // One `hvm_modlist_entry`: paddr, size, cmdline_paddr, reserved.
        w(mem.write_obj(at, GuestAddress(MODLIST)))?;
        w(mem.write_obj(len, GuestAddress(MODLIST + 8)))?;
        w(mem.write_obj(0u64, GuestAddress(MODLIST + 16)))?;
        w(mem.write_obj(0u64, GuestAddress(MODLIST + 24)))?;
        w(mem.write_obj(1u32, GuestAddress(START_INFO + 12)))?;
        w(mem.write_obj(MODLIST, GuestAddress(START_INFO + 16)))?;
    }
    Ok(Entry {
        rip: entry.0,
        start_info: START_INFO,
        kernel_end: loaded.kernel_end,
        long_mode: false,
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

/// A flat 4 GiB segment (code or data by `type_`), as the PVH and the
/// 64-bit entries set them up.
pub fn segment(selector: u16, type_: u8) -> kvm_segment {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit ELF with one loadable segment and a PVH note.
    fn pvh_elf(entry: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x200];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // executable
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&(0x100000u64).to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&2u16.to_le_bytes()); // phnum
        let ph = |e: &mut Vec<u8>, at: usize, kind: u32, off: u64, addr: u64, size: u64| {
            e[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            e[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            e[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
            e[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
            e[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
            e[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
            e[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
        };
        ph(&mut e, 64, 1, 0x180, 0x100000, 0x80); // PT_LOAD
        ph(&mut e, 120, 4, 0x100, 0, 20); // PT_NOTE
                                          // The note: namesz 4 ("Xen"), descsz 4, type 18 (PHYS32_ENTRY).
        e[0x100..0x104].copy_from_slice(&4u32.to_le_bytes());
        e[0x104..0x108].copy_from_slice(&4u32.to_le_bytes());
        e[0x108..0x10c].copy_from_slice(&18u32.to_le_bytes());
        e[0x10c..0x110].copy_from_slice(b"Xen\0");
        e[0x110..0x114].copy_from_slice(&entry.to_le_bytes());
        e
    }

    /// A bzImage of `image` bytes behind one setup sector: protocol 2.15,
    /// loaded high, with the given xloadflags, cmdline_size and init_size.
    fn bzimage(image: usize, xloadflags: u16, cmdline_size: u32, init_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1024 + image];
        b[0x1f1] = 1; // setup_sects
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 1; // LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
        b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        b[1024..].fill(0xcd);
        b
    }

    #[test]
    fn the_zero_page_names_the_command_line_memory_map_initrd_and_rsdp() {
        use linux_loader::loader::bootparam::boot_params;
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        // 64 KiB in the file, 40 MiB once running.
        std::fs::write(&kernel, bzimage(65536, XLF_KERNEL_64, 255, 40 << 20)).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0x5au8; 20 << 20]).unwrap();
        let ram = crate::memory::create(64 << 20).unwrap();
        let e = load_bzimage(&ram, &kernel, Some(&initrd), "console=ttyS0 x=1", 0xe0000).unwrap();
        assert_eq!(e.rip, 0x100200, "startup_64");
        assert!(e.long_mode);
        assert_eq!(
            e.kernel_end,
            0x100000 + (40 << 20),
            "init_size, not the file"
        );
        let m = &ram.mem;
        let zp: boot_params = m.read_obj(GuestAddress(e.start_info)).unwrap();
        let hdr = zp.hdr;
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(
            { hdr.cmdline_size },
            255,
            "the kernel's limit is left as it said"
        );
        let mut line = [0u8; 18];
        m.read_slice(&mut line, GuestAddress(hdr.cmd_line_ptr as u64))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 x=1\0");
        let (at, size) = (hdr.ramdisk_image as u64, hdr.ramdisk_size as u64);
        assert_eq!(size, 20 << 20);
        assert_eq!(at % 4096, 0);
        assert!(at >= e.kernel_end && at + size <= 64 << 20, "{at:#x}");
        assert_eq!(m.read_obj::<u8>(GuestAddress(at + size - 1)).unwrap(), 0x5a);
        assert_eq!({ zp.acpi_rsdp_addr }, 0xe0000);
        let map: Vec<(u64, u64, u32)> = zp.e820_table[..zp.e820_entries as usize]
            .iter()
            .map(|r| (r.addr, r.size, r.r#type))
            .collect();
        assert_eq!(
            map,
            vec![
                (0, LOW_RAM_END, E820_RAM),
                (0x100000, (64 << 20) - 0x100000, E820_RAM),
                (crate::acpi::ECAM_BASE, crate::acpi::ECAM_LEN, E820_RESERVED),
            ]
        );
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100000)).unwrap(), 0xcd);
    }

    #[test]
    fn a_bzimage_the_vmm_cannot_enter_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ram = crate::memory::create(64 << 20).unwrap();
        let kernel = dir.path().join("bzImage");
        // No 64-bit entry point.
        std::fs::write(&kernel, bzimage(4096, 0, 255, 4096)).unwrap();
        let err = load_bzimage(&ram, &kernel, None, "", 0).unwrap_err();
        assert!(err.to_string().contains("no 64-bit entry point"), "{err}");
        // A command line longer than the kernel takes.
        std::fs::write(&kernel, bzimage(4096, XLF_KERNEL_64, 8, 4096)).unwrap();
        let err = load_bzimage(&ram, &kernel, None, "console=ttyS0", 0).unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
        // An initrd that only fits over the running kernel.
        std::fs::write(&kernel, bzimage(4096, XLF_KERNEL_64, 255, 60 << 20)).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0u8; 8 << 20]).unwrap();
        let err = load_bzimage(&ram, &kernel, Some(&initrd), "", 0).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn pvh_start_info_names_the_command_line_memory_map_and_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k.elf");
        std::fs::write(&kernel, pvh_elf(0x100040)).unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0xabu8; 10000]).unwrap();
        let ram = crate::memory::create(64 << 20).unwrap();
        let e = load_pvh(&ram, &kernel, Some(&initrd), "hello=1").unwrap();
        assert_eq!((e.rip, e.start_info), (0x100040, START_INFO));
        let m = &ram.mem;
        let r32 = |a: u64| m.read_obj::<u32>(GuestAddress(a)).unwrap();
        let r64 = |a: u64| m.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r32(START_INFO), 0x336e_c578);
        assert_eq!(r32(START_INFO + 12), 1, "one module");
        let (at, size) = (r64(MODLIST), r64(MODLIST + 8));
        assert_eq!(size, 10000);
        assert_eq!(at % 4096, 0);
        assert!(at + size <= 64 << 20 && at >= e.kernel_end);
        assert_eq!(m.read_obj::<u8>(GuestAddress(at + 9999)).unwrap(), 0xab);
        let mut line = [0u8; 8];
        m.read_slice(&mut line, GuestAddress(r64(START_INFO + 24)))
            .unwrap();
        assert_eq!(&line, b"hello=1\0");
        assert_eq!(r32(START_INFO + 48), 3, "low RAM, RAM from 1 MiB, ECAM");
        // A missing initrd is an error naming it.
        let err = load_pvh(&ram, &kernel, Some(&dir.path().join("nope")), "").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
