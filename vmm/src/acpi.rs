//! ACPI tables for the guest: RSDP -> XSDT -> FADT (hardware-reduced, with
//! sleep and reset registers on ports), DSDT (the S5 sleep type), MADT
//! (one local APIC per vCPU and the I/O APIC), MCFG (ECAM for bus 0). A
//! PVH guest finds the RSDP through `hvm_start_info.rsdp_paddr`; it also
//! sits in the BIOS area, where a scanning guest looks.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the tables go: the BIOS read-only area (not RAM in the map).
pub const RSDP_ADDR: u64 = 0xe0000;
const TABLES: u64 = 0xe1000;
/// The ECAM window (bus 0 only: 1 MiB).
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_LEN: u64 = 1 << 20;
/// Sleep control (write SLP_TYP << 2 | SLP_EN to power off) and reset
/// registers, as ports.
pub const SLEEP_CONTROL_PORT: u64 = 0x600;
pub const SLEEP_STATUS_PORT: u64 = 0x601;
pub const RESET_PORT: u64 = 0x602;
pub const RESET_VALUE: u8 = 0x1;
const IOAPIC: u32 = 0xfec0_0000;
const LAPIC: u32 = 0xfee0_0000;

const OEM_ID: [u8; 6] = *b"SNAPVM";
const OEM_TABLE: [u8; 8] = *b"SNAPVMM ";

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn port(addr: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, addr)
}

/// Writes the tables; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64, vm_memory::GuestMemoryError> {
    let mut at = TABLES;
    let mut place = |data: &[u8]| -> Result<u64, vm_memory::GuestMemoryError> {
        let addr = at;
        mem.write_slice(data, GuestAddress(addr))?;
        at = (at + data.len() as u64 + 15) & !15;
        Ok(addr)
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, 1);
    // \_S5_: the sleep type a guest writes to power off (5: ours).
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut dsdt);
    let dsdt_addr = place(dsdt.as_slice())?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = port(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = port(SLEEP_STATUS_PORT);
    fadt.reset_reg = port(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    let fadt_addr = place(&bytes(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC, 0));
    let madt_addr = place(&bytes(&madt))?;

    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE, 1);
    mcfg.add_ecam(ECAM_BASE, 0, 0, 0);
    let mcfg_addr = place(&bytes(&mcfg))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(a);
    }
    let xsdt_addr = place(&bytes(&xsdt))?;
    mem.write_slice(
        &bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(RSDP_ADDR),
    )?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 2).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let len: u32 = mem.read_obj(GuestAddress(xsdt + 4)).unwrap();
        let mut x = vec![0u8; len as usize];
        mem.read_slice(&mut x, GuestAddress(xsdt)).unwrap();
        assert_eq!(sum(&x), 0);
        let mut sigs = Vec::new();
        for e in x[36..].chunks(8) {
            let a = u64::from_le_bytes(e.try_into().unwrap());
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(a)).unwrap();
            let l = u32::from_le_bytes(h[4..8].try_into().unwrap());
            let mut t = vec![0u8; l as usize];
            mem.read_slice(&mut t, GuestAddress(a)).unwrap();
            assert_eq!(sum(&t), 0, "{}", String::from_utf8_lossy(&h[..4]));
            sigs.push(String::from_utf8_lossy(&h[..4]).to_string());
        }
        assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
    }
}
