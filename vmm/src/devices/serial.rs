//! The 8250 console at 0x3f8 (vm-superio), written to stdout, a file or
//! nowhere, and with `--serial-input` fed from stdin. The guest polls
//! it; its interrupt line is not wired.

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

/// The console's output, written out when a batch of the guest's bytes
/// ends ([`Console::flush`]) rather than byte by byte: vm-superio flushes
/// after every byte, and a guest's line came to one system call per byte.
pub struct BatchedOut {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    /// Bytes handed to `out` so far (a reader of the other end of a pipe
    /// knows from this when it has the whole console).
    written: u64,
    /// Bytes the guest wrote, whichever way.
    accepted: u64,
}

impl BatchedOut {
    /// Bytes held before they go out regardless of batches.
    const LIMIT: usize = 64 << 10;

    fn emit(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.flush());
        if r.is_ok() {
            self.written += self.pending.len() as u64;
        }
        // A console nobody reads (a closed pipe) must not grow this.
        self.pending.clear();
        r
    }
}

impl Write for BatchedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.accepted += buf.len() as u64;
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= Self::LIMIT {
            self.emit()?;
        }
        Ok(buf.len())
    }

    /// vm-superio's flush after each byte: the batch's end decides.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Console {
    serial: Serial<NoIrq, NoEvents, BatchedOut>,
    /// Of the bytes accepted, those that came through the virtio console.
    virtio_bytes: u64,
}

/// Where the guest's console bytes came from (the metrics' `console`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ConsoleCounts {
    /// Through the UART: a port write (a trap) per byte.
    pub uart_bytes: u64,
    /// Through the virtio console: a doorbell per line.
    pub virtio_bytes: u64,
}

impl Console {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console {
            serial: Serial::new(
                NoIrq,
                BatchedOut {
                    out,
                    pending: Vec::new(),
                    written: 0,
                    accepted: 0,
                },
            ),
            virtio_bytes: 0,
        }
    }

    /// Writes out what the guest wrote so far (the end of a batch: an
    /// exit, a drained ring).
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().emit();
    }

    /// Output that did not come through the UART (the virtio console's
    /// lines), into the same batch.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        self.virtio_bytes += bytes.len() as u64;
        let _ = self.serial.writer_mut().write_all(bytes);
    }

    pub fn counts(&self) -> ConsoleCounts {
        ConsoleCounts {
            uart_bytes: self.serial.writer().accepted - self.virtio_bytes,
            virtio_bytes: self.virtio_bytes,
        }
    }

    /// Bytes for the guest to read (typed keys): as many as its receive
    /// FIFO takes now (0 when it is full: the guest has not read yet).
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Bytes written out so far.
    pub fn written(&self) -> u64 {
        self.serial.writer().written
    }
}

/// The UART's registers and receive buffer, as a snapshot keeps them
/// (vm-superio's `SerialState`, which has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("the serial port's saved receive buffer holds {0} bytes, more than its FIFO")]
pub struct SerialRestoreError(usize);

/// The two ways between vm-superio's state and ours, from one list of the
/// registers.
macro_rules! serial_state_fields {
    ($($f:ident),*) => {
        fn to_snapshot(s: vm_superio::serial::SerialState) -> SerialSnapshot {
            SerialSnapshot { $($f: s.$f,)* in_buffer: s.in_buffer }
        }
        fn from_snapshot(s: &SerialSnapshot) -> vm_superio::serial::SerialState {
            vm_superio::serial::SerialState { $($f: s.$f,)* in_buffer: s.in_buffer.clone() }
        }
    };
}

serial_state_fields!(
    baud_divisor_low,
    baud_divisor_high,
    interrupt_enable,
    interrupt_identification,
    line_control,
    line_status,
    modem_control,
    modem_status,
    scratch
);

impl Console {
    pub fn snapshot(&self) -> SerialSnapshot {
        to_snapshot(self.serial.state())
    }

    /// Puts the UART's registers back (the output stays where it goes).
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), SerialRestoreError> {
        // vm-superio's FIFO: checked first, so that a refusal leaves the
        // output where it was.
        if s.in_buffer.len() > 64 {
            return Err(SerialRestoreError(s.in_buffer.len()));
        }
        let state = from_snapshot(s);
        let out = BatchedOut {
            out: std::mem::replace(&mut self.serial.writer_mut().out, Box::new(std::io::sink())),
            pending: std::mem::take(&mut self.serial.writer_mut().pending),
            written: self.serial.writer().written,
            accepted: self.serial.writer().accepted,
        };
        match Serial::from_state(&state, NoIrq, NoEvents, out) {
            Ok(serial) => {
                self.serial = serial;
                Ok(())
            }
            Err(_) => Err(SerialRestoreError(s.in_buffer.len())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_uart_reads_back_what_the_guest_set() {
        let mut a = Console::new(Box::new(std::io::sink()));
        // Line control (8 data bits, divisor latch on), divisor 3, then
        // latch off, scratch and modem control.
        a.write(3, &[0x83]);
        a.write(0, &[3]);
        a.write(1, &[0]);
        a.write(3, &[0x03]);
        a.write(7, &[0x5a]);
        a.write(4, &[0x0b]);
        let saved = a.snapshot();
        let saved: SerialSnapshot =
            serde_json::from_slice(&serde_json::to_vec(&saved).expect("json")).expect("parse");
        let mut b = Console::new(Box::new(std::io::sink()));
        b.restore(&saved).expect("restore");
        for reg in 1..8u64 {
            let (mut x, mut y) = ([0u8], [0u8]);
            a.read(reg, &mut x);
            b.read(reg, &mut y);
            assert_eq!(x, y, "register {reg}");
        }
        assert_eq!(b.snapshot(), saved);
        let mut full = saved.clone();
        full.in_buffer = vec![0; 65];
        assert!(b.restore(&full).is_err(), "a receive buffer past the FIFO");
        assert_eq!(b.snapshot(), saved, "a refused restore changes nothing");
    }
}
