//! How a guest ends itself: the ACPI sleep control register (S5: power
//! off), the ACPI reset register, and the keyboard controller's reset
//! command (port 0x64, value 0xfe), which Linux also tries.

use std::sync::mpsc::Sender;

use super::BusDevice;
use crate::vm::VmEvent;

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
