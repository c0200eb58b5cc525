//! The inflight region (vhost-user INFLIGHT_SHMFD): shared memory the
//! frontend keeps across backend restarts, recording which requests the
//! backend fetched and has not completed yet.
//!
//! The frontend only stores the region; its layout is the backend's. Ours
//! follows libvhost-user's split-ring layout (qemu-storage-daemon writes
//! the same), so that the reasoning carries over. Per queue, 64-byte
//! aligned, little-endian:
//!
//! ```text
//!   0  features u64 (0)    8  version u16 (0 = never used, reset)
//!  10  desc_num u16        12 last_batch_head u16    14 used_idx u16
//!  16  desc_num x { inflight u8, padding [5], next u16, counter u64 }
//! ```
//!
//! Protocol: fetching head `h` sets its counter (fetch order) and then its
//! inflight flag; completing it records `h` as the last head put, writes
//! the used element and index, clears the flag and stores the used index.
//! A successor reading the region after a crash finds the fetched but
//! uncompleted heads (flag set), repairs the one put whose used index
//! update it sees but whose flag it does not (`used_idx` differs), and
//! resubmits the rest in fetch order; the available ring resumes at
//! `used_idx + in flight`, because heads are fetched in ring order and each
//! is marked before the next is fetched.
//!
//! [`InflightQueue`] is that protocol over any [`QueueCells`]: the live
//! shared mapping in `blk-backend`, a copy of a dead backend's region in the
//! vmm.

use std::ops::Range;
use std::sync::atomic::{fence, Ordering};

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
/// The version a written region carries.
pub const VERSION: u16 = 1;

const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;

/// Bytes one queue of `queue_size` descriptors takes.
pub fn per_queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * queue_size as usize).div_ceil(ALIGN) * ALIGN
}

/// Where queue `q`'s part lies in a region of queues of `queue_size`.
pub fn queue_part(q: usize, queue_size: u16) -> Range<usize> {
    let n = per_queue_bytes(queue_size);
    q * n..(q + 1) * n
}

/// One queue's part of a region, as fields to load and store. The offsets
/// passed lie inside the part.
pub trait QueueCells {
    fn load_u8(&self, off: usize) -> u8;
    fn load_u16(&self, off: usize) -> u16;
    fn load_u64(&self, off: usize) -> u64;
    fn store_u8(&mut self, off: usize, v: u8);
    fn store_u16(&mut self, off: usize, v: u16);
    fn store_u64(&mut self, off: usize, v: u64);
}

/// A queue's part held as bytes (a copy of a region nobody writes any
/// more). Fields past the end read as zero.
impl QueueCells for Vec<u8> {
    fn load_u8(&self, off: usize) -> u8 {
        self.get(off).copied().unwrap_or(0)
    }
    fn load_u16(&self, off: usize) -> u16 {
        self.get(off..off + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn load_u64(&self, off: usize) -> u64 {
        self.get(off..off + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }
    fn store_u8(&mut self, off: usize, v: u8) {
        if let Some(b) = self.get_mut(off) {
            *b = v;
        }
    }
    fn store_u16(&mut self, off: usize, v: u16) {
        if let Some(b) = self.get_mut(off..off + 2) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
    fn store_u64(&mut self, off: usize, v: u64) {
        if let Some(b) = self.get_mut(off..off + 8) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// What to do about the requests a predecessor left in flight.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Where the available ring resumes (`None`: as the frontend said).
    pub next_avail: Option<u16>,
    /// Heads to run again, oldest fetch first.
    pub resubmit: Vec<u16>,
}

/// One queue's part of the region and the protocol that keeps it.
pub struct InflightQueue<C> {
    cells: C,
    desc_num: u16,
    counter: u64,
}

fn desc(h: u16) -> usize {
    HEADER + DESC * h as usize
}

impl<C: QueueCells> InflightQueue<C> {
    /// Queue part `cells` of a queue of `desc_num` descriptors.
    pub fn new(cells: C, desc_num: u16) -> Self {
        InflightQueue {
            cells,
            desc_num,
            counter: 0,
        }
    }

    /// Makes sense of the region when the queue starts, given the used
    /// index the guest's ring holds now.
    pub fn recover(&mut self, used_idx: u16) -> Recovery {
        let c = &mut self.cells;
        if c.load_u16(VERSION_AT) != VERSION || c.load_u16(DESC_NUM_AT) != self.desc_num {
            // Never used, or reset by the frontend: start clean.
            for h in 0..self.desc_num {
                c.store_u8(desc(h), 0);
                c.store_u64(desc(h) + 8, 0);
            }
            c.store_u16(DESC_NUM_AT, self.desc_num);
            c.store_u16(USED_IDX_AT, used_idx);
            fence(Ordering::SeqCst);
            c.store_u16(VERSION_AT, VERSION);
            self.counter = 0;
            return Recovery {
                next_avail: None,
                resubmit: Vec::new(),
            };
        }
        if c.load_u16(USED_IDX_AT) != used_idx {
            // Died between publishing a used element and clearing its flag.
            let last = c.load_u16(LAST_BATCH_HEAD_AT);
            if last < self.desc_num {
                c.store_u8(desc(last), 0);
            }
            fence(Ordering::SeqCst);
            c.store_u16(USED_IDX_AT, used_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| c.load_u8(desc(h)) == 1)
            .map(|h| (c.load_u64(desc(h) + 8), h))
            .collect();
        inflight.sort_unstable();
        self.counter = inflight.last().map_or(0, |&(c, _)| c);
        Recovery {
            next_avail: Some(used_idx.wrapping_add(inflight.len() as u16)),
            resubmit: inflight.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// Head `h` was fetched from the available ring.
    pub fn begin(&mut self, h: u16) {
        if h >= self.desc_num {
            return;
        }
        self.counter += 1;
        self.cells.store_u64(desc(h) + 8, self.counter);
        fence(Ordering::SeqCst);
        self.cells.store_u8(desc(h), 1);
    }

    /// Before head `h`'s used element is written.
    pub fn pre_put(&mut self, h: u16) {
        if h < self.desc_num {
            self.cells.store_u16(LAST_BATCH_HEAD_AT, h);
            fence(Ordering::SeqCst);
        }
    }

    /// After head `h`'s used element and the used index (now `used_idx`)
    /// are written.
    pub fn post_put(&mut self, h: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if h < self.desc_num {
            self.cells.store_u8(desc(h), 0);
        }
        fence(Ordering::SeqCst);
        self.cells.store_u16(USED_IDX_AT, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_resubmits_what_was_in_flight_in_fetch_order() {
        let mut q = InflightQueue::new(vec![0u8; per_queue_bytes(8)], 8);
        assert_eq!(q.recover(0).resubmit, Vec::<u16>::new());
        for h in [5, 2, 7, 0] {
            q.begin(h);
        }
        // 2 completes (used idx 1), then 7's used element lands but the
        // writer dies before clearing its flag.
        q.pre_put(2);
        q.post_put(2, 1);
        q.pre_put(7);
        let mut again = InflightQueue::new(q.cells, 8);
        let r = again.recover(2);
        assert_eq!(r.resubmit, vec![5, 0]);
        assert_eq!(r.next_avail, Some(4));
        // New fetches continue the order.
        again.begin(3);
        let mut third = InflightQueue::new(again.cells, 8);
        assert_eq!(third.recover(2).resubmit, vec![5, 0, 3]);
        // A part never written has nothing in flight.
        let mut fresh = InflightQueue::new(vec![0u8; per_queue_bytes(8)], 8);
        assert_eq!(fresh.recover(9).next_avail, None);
    }

    #[test]
    fn queue_parts_are_64_byte_aligned() {
        assert_eq!(per_queue_bytes(8), 192);
        assert_eq!(queue_part(1, 8), 192..384);
        assert_eq!(per_queue_bytes(256), 4160);
    }
}
