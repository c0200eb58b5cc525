//! What the PVH loader hands over: `hvm_start_info` (Xen's public header).

extern "C" {
    static pvh_start_info: u64;
    static __image_end: u8;
}

const MAGIC: u32 = 0x336e_c578;

#[derive(Clone, Copy)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct StartInfo {
    pub cmdline: &'static str,
    pub rsdp: u64,
    memmap: u64,
    memmap_entries: u32,
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: identity-mapped guest memory the loader filled in.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl StartInfo {
    pub fn get() -> Option<StartInfo> {
        // SAFETY: written once by boot.S before CPL3 starts.
        let p = unsafe { core::ptr::read_volatile(&raw const pvh_start_info) };
        if p == 0 || rd::<u32>(p) != MAGIC {
            return None;
        }
        let version: u32 = rd(p + 4);
        let cmdline_paddr: u64 = rd(p + 24);
        let cmdline = if cmdline_paddr == 0 {
            ""
        } else {
            let mut n = 0;
            while n < 4096 && rd::<u8>(cmdline_paddr + n) != 0 {
                n += 1;
            }
            // SAFETY: n bytes of the loader's command line, read-only forever.
            let bytes = unsafe { core::slice::from_raw_parts(cmdline_paddr as *const u8, n as usize) };
            core::str::from_utf8(bytes).unwrap_or("")
        };
        let (memmap, memmap_entries) = if version >= 1 { (rd(p + 40), rd(p + 48)) } else { (0, 0) };
        Some(StartInfo { cmdline, rsdp: rd(p + 32), memmap, memmap_entries })
    }

    pub fn memory(&self) -> impl Iterator<Item = MemRegion> + '_ {
        (0..self.memmap_entries as u64).map(move |i| {
            let e = self.memmap + i * 24;
            MemRegion { addr: rd(e), size: rd(e + 8), kind: rd(e + 16) }
        })
    }
}

/// First byte after the loaded image.
pub fn image_end() -> u64 {
    // Only the linker symbol's address is taken.
    &raw const __image_end as u64
}
