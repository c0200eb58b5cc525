//! The I/O APIC's registers, in userspace (KVM's split irqchip: the local
//! APICs stay in the kernel, the PIC and I/O APIC are not created there).
//!
//! Why not the in-kernel ones: KVM's PIC and I/O APIC sit on its I/O buses,
//! and adding or removing anything there waits for a grace period. A VM
//! with them took 13-17 ms to destroy on this host and its first memory
//! slot 5-9 ms to add (measured); without them, 0.7 ms. Every device of
//! this vmm interrupts through MSI-X and the console is polled, so no
//! legacy line is wired: the I/O APIC is here because ACPI's MADT describes
//! one and a guest programs it (its redirection entries are kept and read
//! back like the 82093AA's; nothing is ever raised on its 24 pins).

use super::BusDevice;

pub const BASE: u64 = 0xfec0_0000;
pub const LEN: u64 = 0x1000;
/// The pins KVM reserves below the MSI routes (KVM_CAP_SPLIT_IRQCHIP).
pub const PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
/// Version 0x11 (82093AA) and the highest redirection entry.
const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);
/// A redirection entry at reset: masked.
const MASKED: u64 = 1 << 16;
/// Bits the guest cannot set: delivery status (12) and remote IRR (14),
/// which only the I/O APIC itself drives.
const READ_ONLY_BITS: u64 = (1 << 12) | (1 << 14);

pub struct IoApic {
    select: u32,
    id: u32,
    table: [u64; PINS],
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    pub fn new() -> Self {
        IoApic {
            select: 0,
            id: 0,
            table: [MASKED; PINS],
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_ARBITRATION => self.id,
            r if (REG_TABLE..REG_TABLE + 2 * PINS as u32).contains(&r) => {
                let entry = self.table[((r - REG_TABLE) / 2) as usize];
                if r % 2 == 0 {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, v: u32) {
        match self.select {
            REG_ID => self.id = v & 0x0f00_0000,
            r if (REG_TABLE..REG_TABLE + 2 * PINS as u32).contains(&r) => {
                let e = &mut self.table[((r - REG_TABLE) / 2) as usize];
                let (shift, mask) = if r % 2 == 0 {
                    (0, 0xffff_ffffu64)
                } else {
                    (32, 0xffff_ffff_0000_0000u64)
                };
                let writable = mask & !READ_ONLY_BITS;
                *e = (*e & !writable) | (((v as u64) << shift) & writable);
            }
            _ => {}
        }
    }
}

impl BusDevice for IoApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            IOREGSEL => self.select,
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The registers are 32 bits wide and written whole.
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(word);
        match offset {
            IOREGSEL => self.select = v & 0xff,
            IOWIN => self.write_register(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(a: &mut IoApic, r: u32) -> u32 {
        a.write(IOREGSEL, &r.to_le_bytes());
        let mut v = [0u8; 4];
        a.read(IOWIN, &mut v);
        u32::from_le_bytes(v)
    }

    fn set(a: &mut IoApic, r: u32, v: u32) {
        a.write(IOREGSEL, &r.to_le_bytes());
        a.write(IOWIN, &v.to_le_bytes());
    }

    #[test]
    fn registers_read_back_like_an_82093aa() {
        let mut a = IoApic::new();
        assert_eq!(reg(&mut a, REG_VERSION), 0x0017_0011);
        // Every entry starts masked.
        for pin in 0..PINS as u32 {
            assert_eq!(reg(&mut a, REG_TABLE + 2 * pin), 1 << 16);
        }
        set(&mut a, REG_ID, 0x0200_00ff);
        assert_eq!(reg(&mut a, REG_ID), 0x0200_0000);
        // Pin 4: vector 0x24, unmasked, level; delivery status and remote
        // IRR stay clear whatever the guest writes.
        set(&mut a, REG_TABLE + 8, 0x0000_f024);
        set(&mut a, REG_TABLE + 9, 0x0100_0000);
        assert_eq!(reg(&mut a, REG_TABLE + 8), 0x0000_a024);
        assert_eq!(reg(&mut a, REG_TABLE + 9), 0x0100_0000);
        // Past the table, and partial writes: nothing happens.
        set(&mut a, REG_TABLE + 2 * PINS as u32, 5);
        assert_eq!(reg(&mut a, REG_TABLE + 2 * PINS as u32), 0);
        a.write(IOWIN, &[1, 2]);
        assert_eq!(reg(&mut a, REG_TABLE + 8), 0x0000_a024);
    }
}
