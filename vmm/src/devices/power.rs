//! How a guest ends itself: the ACPI sleep control register (S5: power
//! off), the ACPI reset register, and the keyboard controller's reset
//! command (port 0x64, value 0xfe), which Linux also tries.

use crossbeam_channel::Sender;

use super::BusDevice;
use crate::events::VmEvent;

pub const I8042_PORT: u64 = 0x64;
const I8042_RESET: u8 = 0xfe;
const SLP_EN: u8 = 1 << 5;

/// Ports 0x600 (sleep control), 0x601 (sleep status), 0x602 (reset).
pub struct AcpiPower {
    events: Sender<VmEvent>,
}

impl AcpiPower {
    pub fn new(events: Sender<VmEvent>) -> Self {
        AcpiPower { events }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            // SLP_TYP 5 (our \_S5_) with SLP_EN.
            (0, Some(&v)) if v & SLP_EN != 0 && (v >> 2) & 7 == 5 => {
                let _ = self.events.send(VmEvent::PowerOff);
            }
            (2, Some(&v)) if v == crate::acpi::RESET_VALUE => {
                let _ = self.events.send(VmEvent::Reboot);
            }
            _ => {}
        }
    }
}

/// The i8042 keyboard controller, as far as its reset line goes.
pub struct I8042 {
    events: Sender<VmEvent>,
}

impl I8042 {
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&I8042_RESET) {
            let _ = self.events.send(VmEvent::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_s5_powers_off_resets_reboot_and_other_writes_do_nothing() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut p = AcpiPower::new(tx.clone());
        p.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        p.write(0, &[3 << 2 | SLP_EN]); // another sleep state
        assert!(rx.try_recv().is_err());
        p.write(0, &[5 << 2 | SLP_EN]);
        assert_eq!(rx.try_recv().ok(), Some(VmEvent::PowerOff));
        p.write(2, &[crate::acpi::RESET_VALUE]);
        assert_eq!(rx.try_recv().ok(), Some(VmEvent::Reboot));
        let mut k = I8042::new(tx);
        k.write(0, &[0xd1]);
        assert!(rx.try_recv().is_err());
        k.write(0, &[0xfe]);
        assert_eq!(rx.try_recv().ok(), Some(VmEvent::Reboot));
    }
}
