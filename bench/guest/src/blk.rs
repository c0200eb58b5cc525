//! virtio-blk: finding the device, negotiating, its configuration.

use crate::config::Config;
use crate::mem::{rd16, rd32, rd64, Arena};
use crate::pci::{self, BarAllocator, ConfigAccess, Function};
use crate::virtio::{self, InitError, Transport, Virtqueue, NO_VECTOR};

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_CONFIG_WCE: u64 = 1 << 11;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub struct Device {
    /// Kept for the device's lifetime: its registers are the device.
    _transport: Transport,
    pub features: u64,
    pub capacity_sectors: u64,
    pub blk_size: u32,
    pub device_queues: u16,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub queues: [Option<Virtqueue>; 16],
    pub nqueues: u16,
    pub irq: bool,
}

#[derive(Debug)]
pub enum FindError {
    NoConfigAccess,
    NotFound { found: u8 },
    Init(InitError),
}

/// The `cfg.disk`-th virtio-blk function on the scanned buses.
fn find(access: ConfigAccess, cfg: &Config) -> Result<Function, FindError> {
    let mut found = 0u8;
    let mut hit = None;
    pci::functions(access, cfg.max_bus, |f| {
        let (vendor, device) = f.vendor_device();
        // 0x1042: modern virtio-blk; 0x1001: transitional (also has the modern caps).
        if vendor == 0x1af4 && (device == 0x1042 || device == 0x1001) {
            if found == cfg.disk && hit.is_none() {
                hit = Some(f);
            }
            found += 1;
        }
    });
    hit.ok_or(FindError::NotFound { found })
}

impl Device {
    pub fn transport(&self) -> &Transport {
        &self._transport
    }

    pub fn open(rsdp: u64, cfg: &Config, arena: &Arena) -> Result<Device, FindError> {
        let access = pci::config_access(rsdp).ok_or(FindError::NoConfigAccess)?;
        let func = find(access, cfg)?;
        // Only for BARs firmware left unset (QEMU's microvm with qboot): its
        // 32-bit PCI window, which 64-bit BARs may use as well.
        let mut bars = BarAllocator { next32: 0xc000_0000, end32: 0xe000_0000 };
        let t = Transport::new(func, &mut bars).map_err(FindError::Init)?;
        let mut wanted = virtio::F_VERSION_1
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_RO
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY
            | F_CONFIG_WCE
            | F_MQ
            | F_DISCARD
            | F_WRITE_ZEROES;
        if cfg.indirect {
            wanted |= virtio::F_INDIRECT_DESC;
        }
        if cfg.event_idx {
            wanted |= virtio::F_EVENT_IDX;
        }
        let features = t.negotiate(wanted).map_err(FindError::Init)?;
        let c = t.device_cfg;
        let device_queues = if features & F_MQ != 0 { rd16(c + 34).max(1) } else { 1 };
        let nqueues = cfg.queues.min(device_queues).min(16);
        let irq = cfg.irq && t.enable_msix(nqueues);
        if cfg.irq && !irq {
            return Err(FindError::Init(InitError::MissingCapability("MSI-X")));
        }
        let mut queues: [Option<Virtqueue>; 16] = Default::default();
        for q in 0..nqueues {
            let vector = if irq { q } else { NO_VECTOR };
            let mut vq = t.setup_queue(q, cfg.queue_size, vector, arena).map_err(FindError::Init)?;
            vq.event_idx = features & virtio::F_EVENT_IDX != 0;
            if !irq {
                vq.suppress_interrupts();
            }
            queues[q as usize] = Some(vq);
        }
        t.driver_ok();
        Ok(Device {
            capacity_sectors: rd64(c),
            blk_size: if features & F_BLK_SIZE != 0 { rd32(c + 20) } else { 512 },
            max_discard_sectors: if features & F_DISCARD != 0 { rd32(c + 36) } else { 0 },
            max_write_zeroes_sectors: if features & F_WRITE_ZEROES != 0 { rd32(c + 48) } else { 0 },
            _transport: t,
            features,
            device_queues,
            queues,
            nqueues,
            irq,
        })
    }
}

impl core::fmt::Display for FindError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FindError::NoConfigAccess => write!(f, "no PCI configuration access (no MCFG, ports 0xcf8/0xcfc dead)"),
            FindError::NotFound { found } => write!(f, "virtio-blk device not found ({found} present on the scanned buses)"),
            FindError::Init(e) => write!(f, "virtio-blk initialisation failed: {e:?}"),
        }
    }
}
