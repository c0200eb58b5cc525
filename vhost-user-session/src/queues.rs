//! A session's queues as the vring messages set them up: size, ring
//! addresses, base, kick and call eventfds, enabled. Each backend runs
//! its workers its own way; a slot's `worker` (what serves the queue, if
//! anything does) is what says the queue is running, and a running queue
//! is not resized, moved or rebased under its worker.

use std::fs::File;

use vhost::vhost_user::Result as VuResult;
use vhost_user_backend::{VringMutex, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::memory::{frontend_to_guest, MappedRegion};
use crate::refuse;
use crate::rings::{rings_in_memory, BrokenMark, RingOutside};

pub type Vring = VringMutex<GuestMemoryAtomic<GuestMemoryMmap>>;

pub struct QueueSlot<W> {
    pub vring: Vring,
    pub addresses_set: bool,
    pub kick_set: bool,
    /// Set by a worker that found the ring broken; cleared when the driver
    /// sets the queue up again (its size, addresses, base or kick).
    pub broken: BrokenMark,
    pub worker: Option<W>,
}

impl<W> QueueSlot<W> {
    /// Whether the frontend gave the queue everything it needs to run.
    pub fn ready(&self) -> bool {
        self.addresses_set && self.kick_set && self.vring.get_ref().is_enabled()
    }
}

pub struct Queues<W> {
    slots: Vec<QueueSlot<W>>,
    max_size: u16,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl<W> Queues<W> {
    /// `n` queues of up to `max_size` entries over `mem`.
    pub fn new(
        n: usize,
        max_size: u16,
        mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> std::io::Result<Queues<W>> {
        let slots = (0..n)
            .map(|_| {
                Ok(QueueSlot {
                    vring: Vring::new(mem.clone(), max_size)
                        .map_err(|e| std::io::Error::other(format!("{e:?}")))?,
                    addresses_set: false,
                    kick_set: false,
                    broken: BrokenMark::default(),
                    worker: None,
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Queues {
            slots,
            max_size,
            mem: mem.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Queue `index`, or the refusal naming it.
    pub fn slot(&mut self, index: u32) -> VuResult<&mut QueueSlot<W>> {
        let n = self.slots.len();
        self.slots.get_mut(index as usize).ok_or_else(|| {
            refuse(format!(
                "queue {index} does not exist (this device has {n})"
            ))
        })
    }

    pub fn get(&self, index: usize) -> Option<&QueueSlot<W>> {
        self.slots.get(index)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut QueueSlot<W>> {
        self.slots.iter_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = &QueueSlot<W>> {
        self.slots.iter()
    }

    fn idle(&mut self, index: u32, what: &str) -> VuResult<&mut QueueSlot<W>> {
        let slot = self.slot(index)?;
        if slot.worker.is_some() {
            return Err(refuse(format!("queue {index}: {what} while running")));
        }
        Ok(slot)
    }

    /// SET_VRING_NUM.
    pub fn set_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.max_size);
        let slot = self.idle(index, "resized")?;
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(refuse(format!(
                "queue {index}: size {num} (a power of two up to {max})"
            )));
        }
        slot.vring.set_queue_size(num as u16);
        slot.broken.clear();
        Ok(())
    }

    /// SET_VRING_ADDR, the addresses in the frontend's address space.
    pub fn set_addr(
        &mut self,
        index: u32,
        regions: &[MappedRegion],
        descriptor: u64,
        used: u64,
        available: u64,
    ) -> VuResult<()> {
        if regions.is_empty() {
            return Err(refuse(format!(
                "queue {index}: ring addresses before any memory table"
            )));
        }
        let translate = |what, a| {
            frontend_to_guest(regions, a).ok_or_else(|| {
                refuse(format!(
                    "queue {index}: {what} at {a:#x} is not in guest memory"
                ))
            })
        };
        let (d, u, a) = (
            translate("descriptor table", descriptor)?,
            translate("used ring", used)?,
            translate("available ring", available)?,
        );
        let slot = self.idle(index, "moved")?;
        slot.vring
            .set_queue_info(d, a, u)
            .map_err(|e| refuse(format!("queue {index}: ring addresses refused: {e:?}")))?;
        if let Err(why) = self.rings_in_memory(index as usize) {
            self.slot(index)?.addresses_set = false;
            return Err(refuse(format!("queue {index}: {why}")));
        }
        let slot = self.slot(index)?;
        // The used index as the guest's ring has it (a reconnect or a
        // driver reset may have moved it).
        let idx = slot
            .vring
            .queue_used_idx()
            .map_err(|e| refuse(format!("queue {index}: used ring unreadable: {e:?}")))?;
        slot.vring.set_queue_next_used(idx);
        slot.addresses_set = true;
        slot.broken.clear();
        Ok(())
    }

    /// Whether queue `q`'s rings lie wholly in the current guest memory.
    pub fn rings_in_memory(&self, q: usize) -> Result<(), RingOutside> {
        let Some(slot) = self.slots.get(q) else {
            return Ok(());
        };
        let st = slot.vring.get_ref();
        rings_in_memory(st.get_queue(), &self.mem.memory())
    }

    /// SET_VRING_BASE.
    pub fn set_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let slot = self.idle(index, "SET_VRING_BASE")?;
        slot.vring.set_queue_next_avail(base as u16);
        slot.broken.clear();
        Ok(())
    }

    /// GET_VRING_BASE, once the caller stopped the queue's worker: the
    /// ring stops until the frontend starts it again.
    pub fn take_base(&mut self, index: u32) -> VuResult<u16> {
        let slot = self.idle(index, "GET_VRING_BASE")?;
        slot.vring.set_queue_ready(false);
        let next = slot.vring.queue_next_avail();
        slot.vring.set_kick(None);
        slot.vring.set_call(None);
        slot.kick_set = false;
        Ok(next)
    }

    /// SET_VRING_KICK, once the caller stopped the queue's worker (it
    /// waits on the old descriptor).
    pub fn set_kick(&mut self, index: u32, fd: Option<File>) -> VuResult<()> {
        let slot = self.idle(index, "SET_VRING_KICK")?;
        let fd = fd.map(nonblocking).transpose()?;
        slot.kick_set = fd.is_some();
        slot.vring.set_kick(fd);
        slot.broken.clear();
        Ok(())
    }

    /// SET_VRING_CALL: workers signal through the vring state, under its
    /// lock, so a new descriptor takes effect with the next completion.
    pub fn set_call(&mut self, index: u32, fd: Option<File>) -> VuResult<()> {
        let fd = fd.map(nonblocking).transpose()?;
        let slot = self.slot(index)?;
        slot.vring.set_call(fd);
        if slot.worker.is_some() {
            // Completions published while the old descriptor (or none)
            // was in place may have raised no interrupt the guest saw:
            // after a reconnect QEMU sends the call descriptor after the
            // kick, and the resubmitted requests may be done by then. One
            // extra interrupt is harmless; a lost one hangs the guest.
            let _ = slot.vring.signal_used_queue();
        }
        Ok(())
    }

    /// SET_VRING_ERR.
    pub fn set_err(&mut self, index: u32, fd: Option<File>) -> VuResult<()> {
        let fd = fd.map(nonblocking).transpose()?;
        self.slot(index)?.vring.set_err(fd);
        Ok(())
    }

    /// The features acked: EVENT_IDX for every ring; without protocol
    /// features, rings start enabled.
    pub fn set_features(&mut self, event_idx: bool, protocol_features: bool) {
        for slot in &self.slots {
            slot.vring.set_queue_event_idx(event_idx);
            if !protocol_features {
                slot.vring.set_enabled(true);
            }
        }
    }

    /// RESET_DEVICE, once the caller stopped every worker.
    pub fn reset(&mut self) {
        for slot in &mut self.slots {
            slot.vring.set_enabled(false);
            slot.vring.set_queue_ready(false);
            slot.broken.clear();
        }
    }
}

/// A frontend's eventfd made nonblocking (see `eventfd`); one that cannot
/// be is refused.
fn nonblocking(f: File) -> VuResult<File> {
    crate::eventfd::nonblocking(&f)
        .map_err(|e| refuse(format!("an eventfd that cannot be made nonblocking: {e}")))?;
    Ok(f)
}
