//! The 8250 console at 0x3f8 (vm-superio), written to stdout, a file or
//! nowhere. The guest polls it; its interrupt line is not wired.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use super::BusDevice;

pub const PORT: u64 = 0x3f8;
pub const LEN: u64 = 8;

/// An interrupt line nobody listens to (the console is polled).
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Console {
    serial: Serial<NoIrq, NoEvents, Box<dyn Write + Send>>,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console {
            serial: Serial::new(NoIrq, out),
        }
    }
}

impl BusDevice for Console {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.serial.write(offset as u8, data[0]);
        }
    }
}
