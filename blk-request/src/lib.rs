//! The virtio-blk request model, in one place for the two programs that
//! answer virtio-blk requests: `blk-backend` (every request, normally) and
//! the vmm (failing requests with IOERR once a backend is gone for good).
//!
//! - `chain`: walking a descriptor chain from its head, bounded against a
//!   hostile driver.
//! - `request`: one request's header, data and status for any descriptor
//!   layout (VIRTIO 1.x), and the used-length rule.
//! - `inflight`: the vhost-user inflight region's layout and the protocol
//!   that writes and recovers it.

pub mod chain;
pub mod inflight;
pub mod request;

pub use chain::ChainWalk;
pub use request::{Kind, ParseError, Request, Segment};

/// Data segments a request may carry (advertised as `seg_max`).
pub const SEG_MAX: u32 = 126;

/// The status byte values, as the device writes them.
pub mod status {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
    pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
    pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
}

/// The used length of a finished request: every byte the device wrote into
/// the chain, the status byte included.
pub fn used_len(data_written: u32) -> u32 {
    data_written.saturating_add(1)
}
