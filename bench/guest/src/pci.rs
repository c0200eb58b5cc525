//! PCI configuration space (ECAM when ACPI describes it, else ports
//! 0xCF8/0xCFC), device enumeration, BARs and capabilities.

use crate::mem::{rd32, wr32};
use crate::serial::{inl, outl};

#[derive(Clone, Copy)]
pub enum ConfigAccess {
    Ports,
    Ecam { base: u64, last_bus: u8 },
}

#[derive(Clone, Copy)]
pub struct Function {
    pub access: ConfigAccess,
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl Function {
    pub fn read32(&self, off: u16) -> u32 {
        match self.access {
            ConfigAccess::Ports => {
                outl(0xcf8, self.port_address(off));
                inl(0xcfc)
            }
            ConfigAccess::Ecam { base, .. } => rd32(self.ecam_address(base, off)),
        }
    }
    pub fn write32(&self, off: u16, v: u32) {
        match self.access {
            ConfigAccess::Ports => {
                outl(0xcf8, self.port_address(off));
                outl(0xcfc, v)
            }
            ConfigAccess::Ecam { base, .. } => wr32(self.ecam_address(base, off), v),
        }
    }
    fn port_address(&self, off: u16) -> u32 {
        0x8000_0000
            | (self.bus as u32) << 16
            | (self.dev as u32) << 11
            | (self.func as u32) << 8
            | (off as u32 & 0xfc)
    }
    fn ecam_address(&self, base: u64, off: u16) -> u64 {
        base + ((self.bus as u64) << 20 | (self.dev as u64) << 15 | (self.func as u64) << 12 | (off as u64 & 0xffc))
    }
    pub fn read16(&self, off: u16) -> u16 {
        (self.read32(off & !3) >> ((off & 2) * 8)) as u16
    }
    pub fn read8(&self, off: u16) -> u8 {
        (self.read32(off & !3) >> ((off & 3) * 8)) as u8
    }
    pub fn vendor_device(&self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    /// Capabilities: (offset, id) pairs.
    pub fn capabilities(&self) -> Capabilities {
        let has = self.read16(6) & (1 << 4) != 0;
        Capabilities { f: *self, next: if has { self.read8(0x34) & !3 } else { 0 }, left: 48 }
    }

    /// Memory decoding and bus mastering on, legacy INTx off.
    pub fn enable(&self) {
        let cmd = self.read32(4) & 0xffff;
        self.write32(4, cmd | 0x2 | 0x4 | 0x400);
    }

    /// BAR `n`'s address, assigning one from `alloc` when firmware left it unset.
    pub fn bar(&self, n: u8, alloc: &mut BarAllocator) -> Option<u64> {
        let off = 0x10 + 4 * n as u16;
        let lo = self.read32(off);
        if lo & 1 != 0 {
            return None; // I/O BAR: not used by virtio 1.x
        }
        let is64 = (lo >> 1) & 3 == 2;
        let hi = if is64 { self.read32(off + 4) } else { 0 };
        let addr = ((hi as u64) << 32) | (lo & !0xf) as u64;
        if addr != 0 {
            return Some(addr);
        }
        // Size it (decoding off meanwhile), then place it.
        let cmd = self.read32(4);
        self.write32(4, cmd & !0x3);
        self.write32(off, 0xffff_ffff);
        let mut mask = (self.read32(off) & !0xf) as u64;
        if is64 {
            self.write32(off + 4, 0xffff_ffff);
            mask |= (self.read32(off + 4) as u64) << 32;
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        let size = (!mask).wrapping_add(1);
        if size == 0 {
            return None;
        }
        let at = alloc.take(size, is64)?;
        self.write32(off, at as u32);
        if is64 {
            self.write32(off + 4, (at >> 32) as u32);
        }
        self.write32(4, cmd);
        Some(at)
    }
}

pub struct Capabilities {
    f: Function,
    next: u8,
    left: u32,
}

impl Iterator for Capabilities {
    type Item = (u16, u8);
    fn next(&mut self) -> Option<(u16, u8)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next as u16;
        let id = self.f.read8(at);
        self.next = self.f.read8(at + 1) & !3;
        Some((at, id))
    }
}

/// MMIO windows for BARs firmware did not assign.
pub struct BarAllocator {
    pub next32: u64,
    pub end32: u64,
}

impl BarAllocator {
    fn take(&mut self, size: u64, _is64: bool) -> Option<u64> {
        let at = self.next32.div_ceil(size) * size;
        if at + size > self.end32 {
            return None;
        }
        self.next32 = at + size;
        Some(at)
    }
}

/// How to reach config space: ECAM from ACPI's MCFG, else the ports if
/// they answer.
pub fn config_access(rsdp: u64) -> Option<ConfigAccess> {
    if let Some((base, last_bus)) = crate::acpi::find_ecam(rsdp) {
        return Some(ConfigAccess::Ecam { base, last_bus });
    }
    let f = Function { access: ConfigAccess::Ports, bus: 0, dev: 0, func: 0 };
    (f.read32(0) != 0xffff_ffff).then_some(ConfigAccess::Ports)
}

/// Every function present on buses 0..=`max_bus`, in order. (Each config
/// read is a VM exit; scanning all 256 buses would cost tens of ms, and the
/// VMMs this guest meets put their devices on bus 0.)
pub fn functions(access: ConfigAccess, max_bus: u8, mut visit: impl FnMut(Function)) {
    let last_bus = match access {
        ConfigAccess::Ports => max_bus,
        ConfigAccess::Ecam { last_bus, .. } => last_bus.min(max_bus),
    };
    for bus in 0..=last_bus {
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let f = Function { access, bus, dev, func };
                let (vendor, _) = f.vendor_device();
                if vendor == 0xffff {
                    if func == 0 {
                        break;
                    }
                    continue;
                }
                visit(f);
                // Single-function devices answer on every function number.
                if func == 0 && f.read8(0x0e) & 0x80 == 0 {
                    break;
                }
            }
        }
    }
}
