//! The virtio-net device behind every session: the tap's queues (one per
//! queue pair, kept across sessions), what the device offers, its
//! configuration space, which virtqueue is what for the features a driver
//! acked, and what it counts.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use tracing::{info, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::tap::{self, TapError, TapQueue};

/// What the device counts (all queues, all sessions).
#[derive(Debug, Default)]
pub struct Counters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Descriptor chains completed with nothing done (they broke a rule).
    pub bad_chains: AtomicU64,
    /// Frames from the tap that did not fit the receive buffer they were
    /// read into, dropped (as a wire drops a frame too long).
    pub rx_dropped: AtomicU64,
    /// Frames the guest sent that the tap refused (a bad header), dropped.
    pub tx_dropped: AtomicU64,
}

pub struct NetDevice {
    pairs: usize,
    queue_size: usize,
    taps: Vec<TapQueue>,
    /// Which tap queues are attached: those of the pairs the driver uses.
    attached: Mutex<Vec<bool>>,
    pub counters: Counters,
}

impl NetDevice {
    pub fn new(taps: Vec<TapQueue>, queue_size: usize) -> NetDevice {
        let pairs = taps.len();
        NetDevice {
            pairs,
            queue_size,
            attached: Mutex::new(vec![true; pairs]),
            taps,
            counters: Counters::default(),
        }
    }

    /// The queue pairs the device has (as many as tap queues).
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    pub fn queue_size(&self) -> usize {
        self.queue_size
    }

    /// Pair `p`'s tap queue.
    pub fn tap(&self, p: usize) -> &TapQueue {
        &self.taps[p]
    }

    /// The driver uses the first `n` pairs (virtio: the first only, until
    /// it sets more on the control queue): the other pairs' tap queues
    /// are detached, so that the kernel gives them no frame. The first
    /// failure is returned (the caller logs it within its limit).
    pub fn use_pairs(&self, n: usize) -> Result<(), TapError> {
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let mut failed = None;
        for (p, (tap, on)) in self.taps.iter().zip(attached.iter_mut()).enumerate() {
            let want = p < n.max(1);
            if *on != want {
                match tap.set_attached(want) {
                    Ok(()) => *on = want,
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
        }
        info!(pairs = n, "the driver uses {n} queue pairs");
        failed.map_or(Ok(()), Err)
    }

    /// A driver acked `acked`: it starts on the first pair, and the tap
    /// offloads follow its receive features. The first failure is
    /// returned (the caller logs it within its limit).
    pub fn acked_features(&self, acked: u64) -> Result<(), TapError> {
        let mut failed = self.use_pairs(1).err();
        let offloads = tap_offloads(acked);
        for t in &self.taps {
            if let Err(e) = t.set_offloads(offloads) {
                failed = failed.or(Some(e));
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// virtio-net's configuration: no MAC (the frontend gives its own),
    /// link up, the pairs, the tap's MTU.
    pub fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut c = [0u8; 12];
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs as u16).to_le_bytes());
        let mtu = self.taps[0].mtu().unwrap_or_else(|e| {
            warn!("{e}; telling the guest 1500");
            1500
        });
        c[10..12].copy_from_slice(&mtu.to_le_bytes());
        let start = (offset as usize).min(c.len());
        let mut out = c[start..].to_vec();
        out.resize(size as usize, 0);
        out
    }
}

/// The features offered: modern virtio, the offloads a tap carries both
/// ways, several pairs with their control queue, the tap's MTU, and the
/// ring features.
pub fn features() -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_CSUM)
        | (1 << VIRTIO_NET_F_GUEST_TSO4)
        | (1 << VIRTIO_NET_F_GUEST_TSO6)
        | (1 << VIRTIO_NET_F_GUEST_ECN)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_ECN)
        | (1 << VIRTIO_NET_F_CTRL_VQ)
        | (1 << VIRTIO_NET_F_MQ)
        | (1 << VIRTIO_NET_F_MTU)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The tap offloads that the guest's receive features allow.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= tap::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= tap::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= tap::TUN_F_TSO6;
        }
        // ECN goes with segmentation only (a tap refuses it alone, and
        // VIRTIO asks a driver for GUEST_TSO4 or 6 with GUEST_ECN).
        if has(VIRTIO_NET_F_GUEST_ECN) && f & (tap::TUN_F_TSO4 | tap::TUN_F_TSO6) != 0 {
            f |= tap::TUN_F_TSO_ECN;
        }
    }
    f
}

/// What a virtqueue is, for the features a driver acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Receive(usize),
    Transmit(usize),
    Control,
    /// A queue the driver may set up but that carries nothing (past the
    /// pairs a driver without MQ has).
    Unused,
}

/// Which virtqueue is what (VIRTIO 1.x 5.1.2): receiveq1, transmitq1, ...
/// receiveqN, transmitqN, then controlq, N being the device's pairs with
/// VIRTIO_NET_F_MQ and 1 without it.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub pairs: usize,
    pub control: Option<usize>,
}

impl Layout {
    pub fn new(device_pairs: usize, acked: u64) -> Layout {
        let pairs = if acked & (1 << VIRTIO_NET_F_MQ) != 0 {
            device_pairs
        } else {
            1
        };
        let control = (acked & (1 << VIRTIO_NET_F_CTRL_VQ) != 0).then_some(2 * pairs);
        Layout { pairs, control }
    }

    pub fn role(&self, q: usize) -> Role {
        if q < 2 * self.pairs {
            if q.is_multiple_of(2) {
                Role::Receive(q / 2)
            } else {
                Role::Transmit(q / 2)
            }
        } else if Some(q) == self.control {
            Role::Control
        } else {
            Role::Unused
        }
    }

    /// The pair whose worker serves queue `q` (the control queue is pair
    /// 0's).
    pub fn pair_of(&self, q: usize) -> Option<usize> {
        match self.role(q) {
            Role::Receive(p) | Role::Transmit(p) => Some(p),
            Role::Control => Some(0),
            Role::Unused => None,
        }
    }

    /// The queues pair `p`'s worker serves: receive, transmit, control.
    pub fn queues_of(&self, p: usize) -> [Option<usize>; 3] {
        [
            Some(2 * p),
            Some(2 * p + 1),
            if p == 0 { self.control } else { None },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecn_goes_to_the_tap_with_segmentation_only() {
        let bit = |b: u32| 1u64 << b;
        let csum_ecn = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(tap_offloads(csum_ecn), tap::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(csum_ecn | bit(VIRTIO_NET_F_GUEST_TSO6)),
            tap::TUN_F_CSUM | tap::TUN_F_TSO6 | tap::TUN_F_TSO_ECN
        );
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    }

    #[test]
    fn the_control_queue_follows_mq() {
        let mq = features();
        let l = Layout::new(4, mq);
        assert_eq!(l.role(8), Role::Control);
        assert_eq!(l.role(7), Role::Transmit(3));
        let l = Layout::new(4, mq & !(1 << VIRTIO_NET_F_MQ));
        assert_eq!(l.role(2), Role::Control);
        assert_eq!(l.role(3), Role::Unused);
        assert_eq!(l.pair_of(2), Some(0));
        let l = Layout::new(4, mq & !(1 << VIRTIO_NET_F_CTRL_VQ));
        assert_eq!(l.role(8), Role::Unused);
    }
}
