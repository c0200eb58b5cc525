//! An address space of devices: a vCPU's port or MMIO exit finds its
//! device here by address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("{base:#x}+{len:#x} overlaps a device already there")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

#[derive(Default)]
pub struct Bus {
    /// base -> (length, device)
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Overlap> {
        let mut d = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        let clash = d
            .range(..end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| b + l > base);
        if clash || len == 0 {
            return Err(Overlap { base, len });
        }
        d.insert(base, (len, dev));
        Ok(())
    }

    pub fn remove(&self, base: u64) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&base);
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let d = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, (len, dev)) = d.range(..=addr).next_back()?;
        (addr - base < *len).then(|| (addr - base, Arc::clone(dev)))
    }

    /// False when no device is there (the caller decides what that means).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn devices_are_found_by_address_and_may_not_overlap() {
        let bus = Bus::default();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x14, 8, Arc::new(Mutex::new(Echo(2)))).is_err());
        assert!(bus.insert(0x8, 9, Arc::new(Mutex::new(Echo(2)))).is_err());
        bus.insert(0x18, 8, Arc::new(Mutex::new(Echo(5)))).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.read(0x18, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x20, &mut b));
        assert!(!bus.read(0x0, &mut b));
    }
}
