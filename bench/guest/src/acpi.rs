//! Just enough ACPI to find PCI Express ECAM: RSDP -> XSDT/RSDT -> MCFG.

use crate::mem::{rd32, rd64, rd8};

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(addr + i))) == 0
}

fn find_rsdp(hint: u64) -> Option<u64> {
    let is_rsdp = |a: u64| rd64(a) == u64::from_le_bytes(*b"RSD PTR ") && checksum_ok(a, 20);
    if hint != 0 && is_rsdp(hint) {
        return Some(hint);
    }
    // Firmware without PVH's pointer (qboot, SeaBIOS): the EBDA's first
    // KiB, then the BIOS area.
    let ebda = (crate::mem::rd16(0x40e) as u64) << 4;
    let ebda_hit = if (0x80000..0xa0000).contains(&ebda) {
        (ebda..ebda + 1024).step_by(16).find(|&a| is_rsdp(a))
    } else {
        None
    };
    ebda_hit.or_else(|| (0xe0000u64..0x100000).step_by(16).find(|&a| is_rsdp(a)))
}

/// ECAM base and the last bus it covers, for PCI segment 0.
pub fn find_ecam(rsdp_hint: u64) -> Option<(u64, u8)> {
    let rsdp = find_rsdp(rsdp_hint)?;
    let revision = rd8(rsdp + 15);
    let (root, entry_size) = if revision >= 2 && rd64(rsdp + 24) != 0 {
        (rd64(rsdp + 24), 8)
    } else {
        (rd32(rsdp + 16) as u64, 4)
    };
    if root == 0 {
        return None;
    }
    let len = rd32(root + 4) as u64;
    if !(36..=65536).contains(&len) {
        return None;
    }
    let n = (len - 36) / entry_size;
    let mut fadt = None;
    for i in 0..n {
        let at = root + 36 + i * entry_size;
        let table = if entry_size == 8 { rd64(at) } else { rd32(at) as u64 };
        if table != 0 && rd32(table) == u32::from_le_bytes(*b"FACP") {
            fadt = Some(table);
        }
        if table == 0 || rd32(table) != u32::from_le_bytes(*b"MCFG") {
            continue;
        }
        let tlen = rd32(table + 4) as u64;
        let mut e = table + 44;
        while e + 16 <= table + tlen {
            let base = rd64(e);
            let segment = rd32(e + 8) & 0xffff;
            let start_bus = rd8(e + 10);
            let end_bus = rd8(e + 11);
            if segment == 0 && start_bus == 0 {
                return Some((base, end_bus));
            }
            e += 16;
        }
    }
    // No MCFG (QEMU's microvm): the host bridge's `Name (_CBA, base)` in the DSDT.
    let fadt = fadt?;
    let flen = rd32(fadt + 4) as u64;
    let dsdt = if flen >= 148 && rd64(fadt + 140) != 0 { rd64(fadt + 140) } else { rd32(fadt + 40) as u64 };
    if dsdt == 0 || rd32(dsdt) != u32::from_le_bytes(*b"DSDT") {
        return None;
    }
    let dlen = (rd32(dsdt + 4) as u64).min(1 << 20);
    let end = dsdt + dlen;
    let cba = u32::from_le_bytes(*b"_CBA");
    // `Name (_CBA, base)` where a firmware declares it...
    let named = (dsdt + 36..end.saturating_sub(14)).find_map(|a| {
        if rd8(a) != 0x08 || rd32(a + 1) != cba {
            return None;
        }
        match rd8(a + 5) {
            0x0c => Some((rd32(a + 6) as u64, 255)), // DWordConst
            0x0e => Some((rd64(a + 6), 255)),        // QWordConst
            _ => None,
        }
    });
    if named.is_some() {
        return named;
    }
    // ...else the memory range QEMU's generic host bridge reserves for ECAM:
    // the QWord memory descriptor in the _CRS of the PNP0C02 device.
    let pnp = u64::from_le_bytes(*b"PNP0C02\0");
    let res = (dsdt + 36..end.saturating_sub(8)).find(|&a| rd64(a) == pnp)?;
    (res..(res + 512).min(end.saturating_sub(46))).find_map(|a| {
        (rd8(a) == 0x8a && crate::mem::rd16(a + 1) == 0x2b && rd8(a + 3) == 0).then(|| {
            let len = rd64(a + 38);
            (rd64(a + 14), ((len >> 20).clamp(1, 256) - 1) as u8)
        })
    })
}
