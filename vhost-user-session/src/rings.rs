//! Checks on a queue's rings before the device reads them, so that what
//! no driver can write (a ring outside guest memory, an available index
//! more than a queue's worth ahead, a head past the descriptor table)
//! breaks the queue once, in one line, instead of failing (and logging)
//! at every kick, or spinning on a ring that never empties.
//!
//! A broken queue is VIRTIO's "device needs reset": it is left alone until
//! the driver sets it up again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

/// A queue's ring that does not lie wholly in guest memory.
#[derive(Debug, thiserror::Error)]
#[error("its {what} at {at:#x}+{len:#x} does not lie wholly in guest memory")]
pub struct RingOutside {
    what: &'static str,
    at: u64,
    len: u64,
}

/// Whether the queue's three rings lie wholly in guest memory: a table
/// that starts inside and runs past a region's end would fail every
/// request it holds, and a ring out there cannot be served at all.
pub fn rings_in_memory(queue: &Queue, mem: &GuestMemoryMmap) -> Result<(), RingOutside> {
    let n = u64::from(queue.size());
    for (what, at, len) in [
        ("descriptor table", queue.desc_table(), 16 * n),
        ("available ring", queue.avail_ring(), 6 + 2 * n),
        ("used ring", queue.used_ring(), 6 + 8 * n),
    ] {
        if !mem.check_range(
            GuestAddress(at),
            len as usize,
            vm_memory::Permissions::ReadWrite,
        ) {
            return Err(RingOutside { what, at, len });
        }
    }
    Ok(())
}

/// A queue the driver broke: left alone until the driver sets it up
/// again. It outlives the queue's workers (they restart when the memory
/// table or another queue of theirs changes), so a broken queue is said to
/// be broken once, not again by each new worker.
#[derive(Clone, Debug, Default)]
pub struct BrokenMark(Arc<AtomicBool>);

impl BrokenMark {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What breaks a queue.
#[derive(Debug, thiserror::Error)]
pub enum Broken {
    #[error("its available ring is outside guest memory")]
    AvailOutside,
    #[error(
        "the driver's available index {avail} is {ahead} entries past the device's {next}, \
         more than the queue's {size}"
    )]
    Ahead {
        avail: u16,
        ahead: u16,
        next: u16,
        size: u16,
    },
    #[error("the driver made descriptor {head} available in a queue of {size}")]
    Head { head: u16, size: u16 },
}

/// How many entries the driver made available that the device has not
/// taken yet, or why no driver could have written the ring.
pub fn available(queue: &Queue, mem: &GuestMemoryMmap) -> Result<u16, Broken> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| Broken::AvailOutside)?
        .0;
    let (next, size) = (queue.next_avail(), queue.size());
    let ahead = avail.wrapping_sub(next);
    if ahead > size {
        return Err(Broken::Ahead {
            avail,
            ahead,
            next,
            size,
        });
    }
    Ok(ahead)
}

/// A head the driver made available, checked: no used entry can name one
/// past the table.
pub fn head(head: u16, size: u16) -> Result<u16, Broken> {
    if head >= size {
        return Err(Broken::Head { head, size });
    }
    Ok(head)
}
