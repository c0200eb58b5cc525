//! What the loader handed over, through whichever door the guest came in:
//! PVH (`hvm_start_info`, Xen's public header; %ebx at entry) or the Linux
//! 64-bit boot protocol (the zero page, `struct boot_params`; %rsi at
//! entry). Both name the same things: the command line, the memory map,
//! the ACPI RSDP and an initrd; the rest of the guest reads them from here
//! and never asks which protocol it was.

extern "C" {
    static pvh_start_info: u64;
    static linux_boot_params: u64;
    static __image_end: u8;
}

const PVH_MAGIC: u32 = 0x336e_c578;
/// "HdrS" at offset 0x202 of the zero page: the setup header is there.
const LINUX_HDR_MAGIC: u32 = 0x5372_6448;
/// The zero page holds at most this many e820 entries.
const E820_MAX: u32 = 128;
/// The longest command line read (the vmm's own limit is 4095).
const CMDLINE_MAX: u64 = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pvh,
    Linux64,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "pvh",
            Protocol::Linux64 => "linux64",
        }
    }
}

#[derive(Clone, Copy)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    pub protocol: Protocol,
    pub cmdline: &'static str,
    pub rsdp: u64,
    /// (guest-physical address, bytes) of the initrd, if the loader gave one.
    pub initrd: Option<(u64, u64)>,
    memmap: u64,
    memmap_entries: u32,
    /// Bytes per memory-map entry: 24 in PVH, 20 in the zero page.
    entry_size: u64,
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: identity-mapped guest memory the loader filled in.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn cstr(addr: u64) -> &'static str {
    if addr == 0 {
        return "";
    }
    let mut n = 0;
    while n < CMDLINE_MAX && rd::<u8>(addr + n) != 0 {
        n += 1;
    }
    // SAFETY: n bytes of the loader's command line, read-only forever.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, n as usize) };
    core::str::from_utf8(bytes).unwrap_or("")
}

impl BootInfo {
    pub fn get() -> Option<BootInfo> {
        // SAFETY: each is written at most once by boot.S before CPL3 starts.
        let (pvh, linux) = unsafe {
            (
                core::ptr::read_volatile(&raw const pvh_start_info),
                core::ptr::read_volatile(&raw const linux_boot_params),
            )
        };
        if pvh != 0 {
            Self::from_pvh(pvh)
        } else if linux != 0 {
            Self::from_zero_page(linux)
        } else {
            None
        }
    }

    fn from_pvh(p: u64) -> Option<BootInfo> {
        if rd::<u32>(p) != PVH_MAGIC {
            return None;
        }
        let version: u32 = rd(p + 4);
        let (memmap, memmap_entries) = if version >= 1 { (rd(p + 40), rd(p + 48)) } else { (0, 0) };
        // The first module is the initrd (hvm_modlist_entry: paddr, size).
        let nr_modules: u32 = rd(p + 12);
        let modlist: u64 = rd(p + 16);
        let initrd = (nr_modules > 0 && modlist != 0).then(|| (rd(modlist), rd(modlist + 8)));
        Some(BootInfo {
            protocol: Protocol::Pvh,
            cmdline: cstr(rd(p + 24)),
            rsdp: rd(p + 32),
            initrd,
            memmap,
            memmap_entries,
            entry_size: 24,
        })
    }

    /// `struct boot_params` (Linux's arch/x86/include/uapi/asm/bootparam.h).
    fn from_zero_page(z: u64) -> Option<BootInfo> {
        if rd::<u32>(z + 0x202) != LINUX_HDR_MAGIC {
            return None;
        }
        let hi = |off: u64| (rd::<u32>(z + off) as u64) << 32;
        let cmdline = rd::<u32>(z + 0x228) as u64 | hi(0x0c8);
        let initrd_at = rd::<u32>(z + 0x218) as u64 | hi(0x0c0);
        let initrd_len = rd::<u32>(z + 0x21c) as u64 | hi(0x0c4);
        Some(BootInfo {
            protocol: Protocol::Linux64,
            cmdline: cstr(cmdline),
            rsdp: rd(z + 0x070),
            initrd: (initrd_len > 0).then_some((initrd_at, initrd_len)),
            memmap: z + 0x2d0,
            memmap_entries: (rd::<u8>(z + 0x1e8) as u32).min(E820_MAX),
            entry_size: 20,
        })
    }

    /// The memory map, in the loader's order. Both formats start an entry
    /// with the address, the size and the type.
    pub fn memory(&self) -> impl Iterator<Item = MemRegion> + '_ {
        (0..self.memmap_entries as u64).map(move |i| {
            let e = self.memmap + i * self.entry_size;
            MemRegion { addr: rd(e), size: rd(e + 8), kind: rd(e + 16) }
        })
    }

    /// One JSON line naming everything the loader handed over, so a test
    /// can compare it with what the loader meant to give. The initrd's
    /// CRC-32C proves its bytes arrived, not only its address.
    pub fn report(&self) {
        crate::print!("{{\"boot_info\":1,\"protocol\":\"{}\",\"cmdline\":\"", self.protocol.name());
        for c in self.cmdline.chars() {
            match c {
                '"' => crate::print!("\\\""),
                '\\' => crate::print!("\\\\"),
                c if (c as u32) < 0x20 => crate::print!("\\u{:04x}", c as u32),
                c => crate::print!("{}", c),
            }
        }
        crate::print!("\",\"rsdp\":{},\"e820\":[", self.rsdp);
        for (i, r) in self.memory().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            crate::print!("{}[{},{},{}]", sep, r.addr, r.size, r.kind);
        }
        crate::print!("],\"initrd\":");
        match self.initrd {
            Some((at, len)) => {
                crate::print!("{{\"addr\":{},\"size\":{},\"crc32c\":{}}}", at, len, crc32c(at, len))
            }
            None => crate::print!("null"),
        }
        crate::print!(",\"image_end\":{}}}\n", image_end());
    }
}

/// CRC-32C of guest memory, with SSE4.2's crc32 instruction (the guest is
/// built for x86-64-v2, which has it; this runs at CPL3, natively).
fn crc32c(at: u64, len: u64) -> u32 {
    use core::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc: u64 = 0xffff_ffff;
    let mut p = at;
    let end = at + len;
    // SAFETY: the CPU has SSE4.2 (target-cpu=x86-64-v2).
    unsafe {
        while p + 8 <= end {
            crc = _mm_crc32_u64(crc, rd::<u64>(p));
            p += 8;
        }
        let mut c = crc as u32;
        while p < end {
            c = _mm_crc32_u8(c, rd::<u8>(p));
            p += 1;
        }
        !c
    }
}

/// First byte after the loaded image.
pub fn image_end() -> u64 {
    // Only the linker symbol's address is taken.
    &raw const __image_end as u64
}
