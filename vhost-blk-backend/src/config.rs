//! `struct virtio_blk_config` as this backend fills it.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

pub const SECTOR: u64 = 512;
pub use blk_request::SEG_MAX;
/// Discard / write-zeroes: sectors per segment, segments per request.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
pub const MAX_DISCARD_SEG: u32 = 1;

/// The virtio feature bits offered.
pub fn features(readonly: bool, multi_queue: bool) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_TOPOLOGY
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_CONFIG_WCE
        | 1 << VIRTIO_BLK_F_DISCARD
        | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    if multi_queue {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    f
}

/// The 60-byte config space.
pub fn config_space(capacity_bytes: u64, block_size: u32, num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&(capacity_bytes / SECTOR).to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    // Advertise 4 KiB logical blocks at most: smaller layer blocks still
    // serve 4 KiB I/O without copy-up.
    let blk = block_size.clamp(512, 4096);
    c[20..24].copy_from_slice(&blk.to_le_bytes());
    let exp = (block_size.max(blk) / blk).trailing_zeros() as u8;
    c[24] = exp; // physical_block_exp
    c[26..28].copy_from_slice(&((blk / 512) as u16).to_le_bytes()); // min_io_size (sectors)
    c[28..32].copy_from_slice(&(block_size / 512).to_le_bytes()); // opt_io_size (sectors)
    c[32] = 1; // writeback: a completed FLUSH is the durability point
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[44..48].copy_from_slice(&(blk / 512).to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}
