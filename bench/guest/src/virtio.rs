//! Modern virtio-pci (virtio 1.x): the transport's capabilities, feature
//! negotiation, MSI-X, and split virtqueues with indirect descriptors and
//! event-index notification suppression.

use core::sync::atomic::{fence, Ordering};

use crate::mem::{rd16, rd32, rd8, wr16, wr32, wr64, wr8, Arena};
use crate::pci::{BarAllocator, Function};

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;

const STATUS_ACK: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 128;
pub const NO_VECTOR: u16 = 0xffff;
/// MSI vectors used: queue q interrupts on vector IRQ_BASE + q.
pub const IRQ_BASE: u8 = 0x40;

/// Common configuration registers.
mod cc {
    pub const DEVICE_FEATURE_SELECT: u64 = 0;
    pub const DEVICE_FEATURE: u64 = 4;
    pub const DRIVER_FEATURE_SELECT: u64 = 8;
    pub const DRIVER_FEATURE: u64 = 12;
    pub const CONFIG_MSIX_VECTOR: u64 = 16;
    pub const DEVICE_STATUS: u64 = 20;
    pub const QUEUE_SELECT: u64 = 22;
    pub const QUEUE_SIZE: u64 = 24;
    pub const QUEUE_MSIX_VECTOR: u64 = 26;
    pub const QUEUE_ENABLE: u64 = 28;
    pub const QUEUE_NOTIFY_OFF: u64 = 30;
    pub const QUEUE_DESC: u64 = 32;
    pub const QUEUE_DRIVER: u64 = 40;
    pub const QUEUE_DEVICE: u64 = 48;
}

pub struct Transport {
    pub common: u64,
    pub device_cfg: u64,
    notify_base: u64,
    notify_mult: u32,
    msix_table: Option<(u64, u16)>,
    msix_cap: Option<u16>,
    pub func: Function,
}

pub enum InitError {
    MissingCapability(&'static str),
    NoVersion1,
    FeaturesRejected,
    QueueUnavailable(u16),
    MsixVectorRejected(u16),
    OutOfMemory,
}

impl core::fmt::Debug for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::MissingCapability(what) => write!(f, "missing {what}"),
            InitError::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            InitError::FeaturesRejected => write!(f, "device rejected the features (FEATURES_OK not kept)"),
            InitError::QueueUnavailable(q) => write!(f, "queue {q} unavailable (size 0)"),
            InitError::MsixVectorRejected(q) => write!(f, "queue {q}: MSI-X vector not accepted"),
            InitError::OutOfMemory => write!(f, "out of guest memory for rings"),
        }
    }
}

impl Transport {
    pub fn new(func: Function, bars: &mut BarAllocator) -> Result<Transport, InitError> {
        let mut common = None;
        let mut device_cfg = None;
        let mut notify = None;
        let mut msix = None;
        let mut bar_addr = [None; 6];
        for (at, id) in func.capabilities() {
            if id == 0x11 {
                msix = Some(at);
                continue;
            }
            if id != 0x09 {
                continue;
            }
            let cfg_type = func.read8(at + 3);
            let bar = func.read8(at + 4);
            let offset = func.read32(at + 8) as u64;
            // Only these are used; type 5 (PCI config access) names no real BAR.
            if bar > 5 || !matches!(cfg_type, 1 | 2 | 4) {
                continue;
            }
            let base = match bar_addr[bar as usize] {
                Some(b) => b,
                None => {
                    let b = func.bar(bar, bars).ok_or(InitError::MissingCapability("BAR"))?;
                    bar_addr[bar as usize] = Some(b);
                    b
                }
            };
            match cfg_type {
                1 => common = common.or(Some(base + offset)),
                2 => notify = notify.or(Some((base + offset, func.read32(at + 16)))),
                4 => device_cfg = device_cfg.or(Some(base + offset)),
                _ => {}
            }
        }
        let msix_table = match msix {
            Some(at) => {
                let table = func.read32(at + 4);
                let bir = (table & 7) as u8;
                let base = match bar_addr.get(bir as usize).copied().flatten() {
                    Some(b) => Some(b),
                    None => func.bar(bir, bars),
                };
                let entries = (func.read16(at + 2) & 0x7ff) + 1;
                base.map(|b| (b + (table & !7) as u64, entries))
            }
            None => None,
        };
        func.enable();
        let (notify_base, notify_mult) = notify.ok_or(InitError::MissingCapability("notify"))?;
        Ok(Transport {
            common: common.ok_or(InitError::MissingCapability("common config"))?,
            device_cfg: device_cfg.ok_or(InitError::MissingCapability("device config"))?,
            notify_base,
            notify_mult,
            msix_table,
            msix_cap: msix,
            func,
        })
    }

    /// The register windows a driver writes: (address, length) of the
    /// common configuration, the device configuration, the notify area and
    /// the MSI-X table.
    pub fn windows(&self) -> [(u64, u64); 4] {
        let (msix, entries) = self.msix_table.unwrap_or((self.common, 0));
        [
            (self.common, 0x38),
            (self.device_cfg, 0x40),
            (self.notify_base, (self.notify_mult.max(2) as u64) * 16),
            (msix, 16 * entries as u64),
        ]
    }

    /// Resets, offers `wanted` and returns what was agreed.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, InitError> {
        wr8(self.common + cc::DEVICE_STATUS, 0);
        while rd8(self.common + cc::DEVICE_STATUS) != 0 {
            core::hint::spin_loop();
        }
        wr8(self.common + cc::DEVICE_STATUS, STATUS_ACK);
        wr8(self.common + cc::DEVICE_STATUS, STATUS_ACK | STATUS_DRIVER);
        let mut offered = 0u64;
        for half in 0..2u32 {
            wr32(self.common + cc::DEVICE_FEATURE_SELECT, half);
            offered |= (rd32(self.common + cc::DEVICE_FEATURE) as u64) << (32 * half);
        }
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(InitError::NoVersion1);
        }
        let agreed = offered & wanted;
        for half in 0..2u32 {
            wr32(self.common + cc::DRIVER_FEATURE_SELECT, half);
            wr32(self.common + cc::DRIVER_FEATURE, (agreed >> (32 * half)) as u32);
        }
        wr8(self.common + cc::DEVICE_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if rd8(self.common + cc::DEVICE_STATUS) & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(InitError::FeaturesRejected);
        }
        wr16(self.common + cc::CONFIG_MSIX_VECTOR, NO_VECTOR);
        Ok(agreed)
    }

    fn fail(&self) {
        wr8(self.common + cc::DEVICE_STATUS, STATUS_FAILED);
    }

    pub fn driver_ok(&self) {
        wr8(
            self.common + cc::DEVICE_STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// Turns MSI-X on with queue q's entry aimed at vector IRQ_BASE + q.
    pub fn enable_msix(&self, queues: u16) -> bool {
        self.enable_msix_from(queues, IRQ_BASE)
    }

    /// Turns MSI-X on with queue q's entry aimed at vector `first` + q
    /// (devices that share the guest keep apart their vectors' counts).
    pub fn enable_msix_from(&self, queues: u16, first: u8) -> bool {
        let (Some((table, entries)), Some(cap)) = (self.msix_table, self.msix_cap) else {
            return false;
        };
        for q in 0..queues.min(entries) {
            let e = table + 16 * q as u64;
            wr32(e, 0xfee0_0000); // to the BSP's LAPIC
            wr32(e + 4, 0);
            wr32(e + 8, (first as u32) + q as u32);
            wr32(e + 12, 0); // unmasked
        }
        let v = self.func.read32(cap);
        self.func.write32(cap, (v | (1 << 31)) & !(1 << 30));
        true
    }

    /// Sets up queue `index` with `size` entries (or the device's maximum).
    pub fn setup_queue(&self, index: u16, size: u16, vector: u16, arena: &Arena) -> Result<Virtqueue, InitError> {
        wr16(self.common + cc::QUEUE_SELECT, index);
        let max = rd16(self.common + cc::QUEUE_SIZE);
        if max == 0 {
            return Err(InitError::QueueUnavailable(index));
        }
        let size = if size == 0 { max } else { size.min(max) };
        // Power of two for split rings.
        let size = 1u16 << (15 - size.leading_zeros() as u16);
        wr16(self.common + cc::QUEUE_SIZE, size);
        let n = size as u64;
        let desc = arena.alloc(16 * n, 4096).ok_or(InitError::OutOfMemory)?;
        let avail = arena.alloc(6 + 2 * n, 4096).ok_or(InitError::OutOfMemory)?;
        let used = arena.alloc(6 + 8 * n, 4096).ok_or(InitError::OutOfMemory)?;
        wr64(self.common + cc::QUEUE_DESC, desc);
        wr64(self.common + cc::QUEUE_DRIVER, avail);
        wr64(self.common + cc::QUEUE_DEVICE, used);
        wr16(self.common + cc::QUEUE_MSIX_VECTOR, vector);
        if vector != NO_VECTOR && rd16(self.common + cc::QUEUE_MSIX_VECTOR) != vector {
            return Err(InitError::MsixVectorRejected(index));
        }
        let notify_off = rd16(self.common + cc::QUEUE_NOTIFY_OFF) as u64;
        wr16(self.common + cc::QUEUE_ENABLE, 1);
        Ok(Virtqueue {
            index,
            size,
            desc,
            avail,
            used,
            notify: self.notify_base + notify_off * self.notify_mult as u64,
            avail_idx: 0,
            last_used: 0,
            kicked_at: 0,
            event_idx: false,
            interrupts: true,
            kicks: 0,
        })
    }
}

/// One split virtqueue.
pub struct Virtqueue {
    pub index: u16,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    avail_idx: u16,
    last_used: u16,
    /// avail_idx at the last notification (for event-index suppression).
    kicked_at: u16,
    pub event_idx: bool,
    /// False in polling mode: used_event is then never re-armed.
    interrupts: bool,
    pub kicks: u64,
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Writes one descriptor into a table at `table`.
pub fn write_desc(table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let d = table + 16 * i as u64;
    wr64(d, addr);
    wr32(d + 8, len);
    wr16(d + 12, flags);
    wr16(d + 14, next);
}

impl Virtqueue {
    pub fn desc_table(&self) -> u64 {
        self.desc
    }

    /// Makes descriptor `head` available (not yet visible: see `publish`).
    pub fn push(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        wr16(self.avail + 4 + 2 * slot as u64, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes pushed entries and notifies the device if it asked to be.
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        wr16(self.avail + 2, self.avail_idx);
        // The index store must be visible before reading avail_event.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let event = rd16(self.used + 4 + 8 * self.size as u64);
            // vring_need_event(event, new, old)
            self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(self.kicked_at)
        } else {
            rd16(self.used) & 1 == 0 // VRING_USED_F_NO_NOTIFY
        };
        self.kicked_at = self.avail_idx;
        if kick {
            self.kicks += 1;
            wr16(self.notify, self.index);
        }
    }

    /// The next completion: (descriptor head, bytes written).
    ///
    /// With event-index suppression, an empty ring re-arms the interrupt
    /// (used_event = last seen) and looks once more: a completion published
    /// while the device still read the old used_event raises no interrupt,
    /// and x86 may order our used_event store after the used-index load
    /// unless a full fence sits between them.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let mut idx = rd16(self.used + 2);
        if idx == self.last_used {
            if !self.event_idx || !self.interrupts {
                return None;
            }
            wr16(self.avail + 4 + 2 * self.size as u64, self.last_used);
            fence(Ordering::SeqCst);
            idx = rd16(self.used + 2);
            if idx == self.last_used {
                return None;
            }
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        let id = rd32(e) as u16;
        let len = rd32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// One interrupt once `n` more entries are used (with event-index
    /// suppression; without it, one per entry), until `suppress_interrupts`.
    pub fn interrupt_after(&mut self, n: u16) {
        self.interrupts = true;
        wr16(self.avail, 0);
        wr16(self.avail + 4 + 2 * self.size as u64, self.last_used.wrapping_add(n.max(1) - 1));
        // Armed before the caller looks at the used index again.
        fence(Ordering::SeqCst);
    }

    /// Polling mode: ask for no interrupts.
    pub fn suppress_interrupts(&mut self) {
        self.interrupts = false;
        wr16(self.avail, 1); // VRING_AVAIL_F_NO_INTERRUPT
    }
}
