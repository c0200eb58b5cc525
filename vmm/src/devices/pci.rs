//! PCI: one bus of functions, configuration space through ports
//! 0xCF8/0xCFC, a host bridge at 00:00.0, and the config-space model that
//! devices share (registers, BAR sizing, capabilities).

use std::sync::{Arc, Mutex};

use super::config_mirror::{ConfigMirror, MirrorError};
use super::BusDevice;

pub const CONFIG_PORT: u64 = 0xcf8;
pub const CONFIG_PORT_LEN: u64 = 8;

pub trait PciDevice: Send {
    /// Dword `reg` of the function's 256-byte configuration space.
    fn config_read(&mut self, reg: usize) -> u32;
    /// A write of `data` at byte `offset` of dword `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
}

/// A type-0 configuration space: registers, which bits the guest may
/// write, and the BARs (fixed size, placed by us like firmware would; the
/// guest may size them, but not move them: the device's MMIO, ioeventfds
/// and MSI-X table stay where they were placed, and a BAR written with
/// anything but the sizing probe reads back its own address).
pub struct ConfigSpace {
    regs: [u32; 64],
    writable: [u32; 64],
    /// Per BAR: its size (0: none) and its fixed address.
    bar_size: [u32; 6],
    bar_addr: [u32; 6],
    /// A guest moving BARs is told once in the log.
    move_refused: bool,
    /// Next free capability offset.
    next_cap: usize,
    last_cap: usize,
}

impl ConfigSpace {
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, subsystem: (u16, u16)) -> Self {
        let mut c = ConfigSpace {
            regs: [0; 64],
            writable: [0; 64],
            bar_size: [0; 6],
            bar_addr: [0; 6],
            move_refused: false,
            next_cap: 0x40,
            last_cap: 0,
        };
        c.regs[0] = vendor as u32 | (device as u32) << 16;
        c.regs[2] = class << 8 | revision as u32;
        c.regs[11] = subsystem.0 as u32 | (subsystem.1 as u32) << 16;
        // Command: memory space, bus master, interrupt disable.
        c.writable[1] = 0x0000_0406;
        // Interrupt line.
        c.writable[15] = 0xff;
        c
    }

    /// A 32-bit memory BAR `n` of `size` bytes (a power of two) at `addr`.
    pub fn set_bar(&mut self, n: usize, addr: u32, size: u32) {
        debug_assert!(size.is_power_of_two() && addr.is_multiple_of(size));
        self.bar_size[n] = size;
        self.bar_addr[n] = addr;
        self.regs[4 + n] = addr;
        self.writable[4 + n] = !(size - 1);
    }

    pub fn bar(&self, n: usize) -> u32 {
        self.regs[4 + n] & !0xf
    }

    /// Appends a capability (`body` starts with its id; the next pointer
    /// is filled in); returns its offset.
    pub fn add_capability(&mut self, body: &[u8]) -> usize {
        let at = self.next_cap;
        let mut bytes = body.to_vec();
        bytes[1] = 0;
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(at + i, *b);
        }
        if self.last_cap == 0 {
            self.regs[13] = at as u32; // capabilities pointer
            self.regs[1] |= 1 << 20; // status: capability list
        } else {
            self.set_byte(self.last_cap + 1, at as u8);
        }
        self.last_cap = at;
        self.next_cap = (at + bytes.len() + 3) & !3;
        at
    }

    fn set_byte(&mut self, at: usize, b: u8) {
        let (r, s) = (at / 4, (at % 4) * 8);
        self.regs[r] = (self.regs[r] & !(0xff << s)) | (b as u32) << s;
    }

    /// Makes bits of a register writable by the guest.
    pub fn allow_write(&mut self, reg: usize, mask: u32) {
        self.writable[reg] |= mask;
    }

    /// Every register (for a snapshot).
    pub fn regs(&self) -> &[u32; 64] {
        &self.regs
    }

    /// Puts saved registers back; false unless there are 64. A BAR keeps
    /// the address this function was placed at, whatever was saved.
    pub fn set_regs(&mut self, regs: &[u32]) -> bool {
        let Ok(regs) = <[u32; 64]>::try_from(regs) else {
            return false;
        };
        self.regs = regs;
        for n in 0..6 {
            if self.bar_size[n] != 0
                && self.regs[4 + n] & self.writable[4 + n] != self.writable[4 + n]
            {
                self.regs[4 + n] = self.bar_addr[n];
            }
        }
        true
    }

    pub fn read(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= 64 || offset + data.len() > 4 {
            return;
        }
        let mut v = self.regs[reg];
        for (i, b) in data.iter().enumerate() {
            let s = (offset + i) * 8;
            v = (v & !(0xff << s)) | (*b as u32) << s;
        }
        let w = self.writable[reg];
        self.regs[reg] = (self.regs[reg] & !w) | (v & w);
        if let Some(n) = reg
            .checked_sub(4)
            .filter(|&n| n < 6 && self.bar_size[n] != 0)
        {
            let probe = self.regs[reg] & w == w;
            if !probe && self.regs[reg] != self.bar_addr[n] {
                if !self.move_refused {
                    self.move_refused = true;
                    tracing::warn!(
                        "the guest moved BAR {n} to {:#x}: refused, it stays at {:#x}",
                        v & w,
                        self.bar_addr[n]
                    );
                }
                self.regs[reg] = self.bar_addr[n];
            }
        }
    }

    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }
}

/// The host bridge at 00:00.0 (so a guest probing device 0 finds a bus).
pub struct HostBridge(ConfigSpace);

impl HostBridge {
    pub fn new() -> Self {
        HostBridge(ConfigSpace::new(0x8086, 0x0d57, 0x06_00_00, 0, (0, 0)))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.0.read(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.0.write(reg, offset, data)
    }
}

/// Bus 0's 32 device slots (function 0 only), and, when the VM maps one,
/// the memory copy of their configuration space that the guest reads
/// (kept equal to what a read through the ports or ECAM returns: every
/// change to a function's configuration space goes through `write`).
#[derive(Default)]
pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    mirror: Option<ConfigMirror>,
}

impl PciBus {
    pub fn new(mirror: Option<ConfigMirror>) -> Self {
        PciBus {
            slots: (0..32).map(|_| None).collect(),
            mirror,
        }
    }

    /// Puts `dev` in the next free slot; returns the slot.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)? as u8;
        if let Some(m) = &self.mirror {
            m.attach(slot)?;
        }
        self.slots[slot as usize] = Some(dev);
        self.render(slot);
        Ok(slot)
    }

    /// The memory copy the guest reads, if the VM maps one.
    pub fn mirror(&self) -> Option<&ConfigMirror> {
        self.mirror.as_ref()
    }

    /// Copies every function's configuration space into the mirror again
    /// (after a restore changed them behind the bus).
    pub fn render_all(&self) {
        for slot in 0..self.slots.len() as u8 {
            self.render(slot);
        }
    }

    /// Copies slot `slot`'s configuration space into the mirror.
    fn render(&self, slot: u8) {
        let (Some(m), Some(Some(d))) = (&self.mirror, self.slots.get(slot as usize)) else {
            return;
        };
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        for reg in 0..64 {
            m.store(slot, reg, d.config_read(reg));
        }
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    pub fn read(&self, bus: u8, dev: u8, func: u8, reg: usize) -> u32 {
        match self.function(bus, dev, func) {
            Some(d) => d.lock().unwrap_or_else(|e| e.into_inner()).config_read(reg),
            None => 0xffff_ffff,
        }
    }

    pub fn write(&self, bus: u8, dev: u8, func: u8, reg: usize, offset: usize, data: &[u8]) {
        if let Some(d) = self.function(bus, dev, func) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(reg, offset, data);
            self.render(dev);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    #[error(transparent)]
    Mirror(#[from] MirrorError),
}

/// PCI Express enhanced configuration access (ECAM): bus 0's configuration
/// spaces as memory (the MCFG table points here).
pub struct PciEcam {
    bus: Arc<Mutex<PciBus>>,
}

impl PciEcam {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciEcam { bus }
    }

    fn target(offset: u64) -> (u8, u8, u8, usize, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            ((offset & 0xfff) >> 2) as usize,
            (offset & 3) as usize,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg, at) = Self::target(offset);
        let v = if reg < 64 {
            self.bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(b, d, f, reg)
        } else {
            // Extended configuration space: nothing there.
            if self
                .bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(b, d, f, 0)
                == 0xffff_ffff
            {
                0xffff_ffff
            } else {
                0
            }
        };
        fill_from(data, v, at);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, reg, at) = Self::target(offset);
        if reg < 64 && at + data.len() <= 4 {
            self.bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(b, d, f, reg, at, data);
        }
    }
}

/// Fills a read of any width from the 32-bit register `v`, starting at
/// its byte `at`; bytes past the register read as ones where nothing is
/// (as a PCI bus does) — here simply as the register's absent bytes, 0xff.
fn fill_from(data: &mut [u8], v: u32, at: usize) {
    let bytes = v.to_le_bytes();
    for (i, x) in data.iter_mut().enumerate() {
        *x = bytes.get(at + i).copied().unwrap_or(0xff);
    }
}

/// Configuration mechanism #1: address at 0xCF8, data at 0xCFC-0xCFF.
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        let a = self.address;
        (a & 0x8000_0000 != 0).then_some({
            (
                (a >> 16) as u8,
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 0x7) as u8,
                ((a & 0xfc) >> 2) as usize,
            )
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset < 4 {
            self.address
        } else {
            match self.target() {
                Some((b, d, f, reg)) => {
                    let v = self
                        .bus
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .read(b, d, f, reg);
                    return fill_from(data, v, (offset - 4) as usize);
                }
                None => 0xffff_ffff,
            }
        };
        fill_from(data, v, offset as usize);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        if let Some((b, d, f, reg)) = self.target() {
            let at = (offset - 4) as usize;
            if at + data.len() <= 4 {
                self.bus
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(b, d, f, reg, at, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_size_like_hardware_and_read_only_bits_stay() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 1, (0x1af4, 2));
        c.set_bar(0, 0xc000_0000, 0x8000);
        c.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(4), 0xffff_8000);
        c.write(4, 0, &0xc000_0000u32.to_le_bytes());
        assert_eq!(c.bar(0), 0xc000_0000);
        // A move (whole or one byte at a time) is refused.
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bar(0), 0xc000_0000);
        c.write(4, 3, &[0xe0]);
        assert_eq!(c.bar(0), 0xc000_0000);
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0), 0x1042_1af4);
        let at = c.add_capability(&[0x11, 0, 1, 2]);
        let at2 = c.add_capability(&[0x09, 0, 3]);
        assert_eq!(c.read(13), at as u32);
        assert_eq!((c.read(at / 4) >> 8) & 0xff, at2 as u32);
    }

    /// The guest's memory copy follows every write, through ECAM or the
    /// ports: BAR sizing, the command register; absent functions read as
    /// ones, a present one's extended space as zeros.
    #[test]
    fn the_mirror_reads_what_an_exit_would() {
        let mut dev = ConfigSpace::new(0x1af4, 0x1042, 0x01_80_00, 1, (0x1af4, 2));
        dev.set_bar(0, 0xc000_0000, 0x8000);
        struct Dev(ConfigSpace);
        impl PciDevice for Dev {
            fn config_read(&mut self, reg: usize) -> u32 {
                self.0.read(reg)
            }
            fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
                self.0.write(reg, offset, data)
            }
        }
        let mut bus = PciBus::new(Some(ConfigMirror::new().expect("mirror")));
        bus.add(Arc::new(Mutex::new(HostBridge::new())))
            .expect("slot");
        bus.add(Arc::new(Mutex::new(Dev(dev)))).expect("slot");
        let bus = Arc::new(Mutex::new(bus));
        let mut ecam = PciEcam::new(Arc::clone(&bus));
        let mut io = PciConfigIo::new(Arc::clone(&bus));
        let seen = |at: usize| {
            bus.lock()
                .unwrap_or_else(|e| e.into_inner())
                .mirror()
                .expect("mirror")
                .guest_read(at)
        };
        let slot1 = 1 << 15;
        assert_eq!(seen(0), 0x0d57_8086);
        assert_eq!(seen(slot1), 0x1042_1af4);
        assert_eq!(seen(slot1 + 0x10), 0xc000_0000);
        assert_eq!(seen(slot1 + 0x100), 0, "extended space of a function");
        assert_eq!(seen(slot1 + (1 << 12)), u32::MAX, "function 1 of slot 1");
        assert_eq!(seen(2 << 15), u32::MAX, "an empty slot");
        // BAR sizing through ECAM, then the address back.
        ecam.write(slot1 as u64 + 0x10, &u32::MAX.to_le_bytes());
        assert_eq!(seen(slot1 + 0x10), 0xffff_8000);
        ecam.write(slot1 as u64 + 0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(seen(slot1 + 0x10), 0xc000_0000);
        // The command register through the ports, one byte.
        io.write(0, &(0x8000_0000u32 | 1 << 11 | 4).to_le_bytes());
        io.write(4, &[0x06]);
        assert_eq!(seen(slot1 + 4) & 0xffff, 0x0006);
    }

    #[test]
    fn config_ports_reach_the_host_bridge_and_nothing_elsewhere() {
        let mut bus = PciBus::new(None);
        bus.add(Arc::new(Mutex::new(HostBridge::new())))
            .expect("a free slot");
        let mut io = PciConfigIo::new(Arc::new(Mutex::new(bus)));
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut v = [0u8; 4];
        io.read(4, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0d57_8086);
        io.write(0, &(0x8000_0000u32 | 3 << 11).to_le_bytes());
        io.read(4, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0xffff_ffff);
    }
}
