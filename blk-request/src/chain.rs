//! Walking a descriptor chain from its head index alone.
//!
//! virtio-queue hands out chains only as it pops them off the available
//! ring. A request that was in flight when a previous backend process died
//! is known only by its head (the inflight region records heads), and its
//! slot in the available ring may have been reused since, so it is walked
//! here straight from the descriptor table, with the same guards against a
//! hostile guest: a bounded number of steps (no loops), indices inside the
//! table, one level of indirection with a well-formed table, and at most
//! 4 GiB in total.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const DESC_SIZE: u64 = 16;

pub struct ChainWalk<'a> {
    mem: &'a GuestMemoryMmap,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    /// Steps left: a chain cannot be longer than its table.
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a> ChainWalk<'a> {
    /// The chain starting at `head` of a queue of `queue_size` descriptors
    /// whose table is at `table`.
    pub fn new(mem: &'a GuestMemoryMmap, table: GuestAddress, queue_size: u16, head: u16) -> Self {
        ChainWalk {
            mem,
            table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl Iterator for ChainWalk<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.table_len {
            return None;
        }
        let at = self.table.checked_add(self.next as u64 * DESC_SIZE)?;
        let d: Descriptor = self.mem.read_obj(at).ok()?;
        if d.refers_to_indirect_table() {
            // Not nested, not mixed into a chain, a whole number of entries.
            if self.indirect || d.has_next() || !(d.len() as u64).is_multiple_of(DESC_SIZE) {
                return None;
            }
            let n = d.len() as u64 / DESC_SIZE;
            if n == 0 || n > u16::MAX as u64 {
                return None;
            }
            self.indirect = true;
            self.table = d.addr();
            self.table_len = n as u16;
            self.ttl = n as u16;
            self.next = 0;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(d.len())?;
        if d.has_next() {
            self.next = d.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    fn put(m: &GuestMemoryMmap, table: u64, i: u16, d: Descriptor) {
        m.write_obj(d, GuestAddress(table + 16 * i as u64))
            .expect("write");
    }

    #[test]
    fn walks_direct_and_indirect_chains_and_stops_on_loops() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        put(&m, 0x1000, 3, Descriptor::new(0x8000, 16, NEXT, 5));
        put(&m, 0x1000, 5, Descriptor::new(0x9000, 512, 0, 0));
        let lens: Vec<u32> = ChainWalk::new(&m, GuestAddress(0x1000), 8, 3)
            .map(|d| d.len())
            .collect();
        assert_eq!(lens, [16, 512]);
        // A loop ends after at most queue-size steps.
        put(&m, 0x1000, 0, Descriptor::new(0x8000, 16, NEXT, 1));
        put(&m, 0x1000, 1, Descriptor::new(0x8000, 16, NEXT, 0));
        assert_eq!(ChainWalk::new(&m, GuestAddress(0x1000), 8, 0).count(), 8);
        // Out of the table.
        put(&m, 0x1000, 2, Descriptor::new(0x8000, 16, NEXT, 9));
        assert_eq!(ChainWalk::new(&m, GuestAddress(0x1000), 8, 2).count(), 1);
        // Indirect: a table of two.
        put(&m, 0x2000, 0, Descriptor::new(0x8000, 16, NEXT, 1));
        put(&m, 0x2000, 1, Descriptor::new(0x9000, 4096, 0, 0));
        put(
            &m,
            0x1000,
            6,
            Descriptor::new(0x2000, 32, VRING_DESC_F_INDIRECT as u16, 0),
        );
        let lens: Vec<u32> = ChainWalk::new(&m, GuestAddress(0x1000), 8, 6)
            .map(|d| d.len())
            .collect();
        assert_eq!(lens, [16, 4096]);
        // A ragged indirect table is refused.
        put(
            &m,
            0x1000,
            7,
            Descriptor::new(0x2000, 20, VRING_DESC_F_INDIRECT as u16, 0),
        );
        assert_eq!(ChainWalk::new(&m, GuestAddress(0x1000), 8, 7).count(), 0);
    }
}
