//! A vhost-user frontend for tests that play the vmm's part against a
//! backend (in this process or a child): the vhost crate's frontend over
//! the backend's socket, guest memory in a memfd, and each queue's rings
//! written and read by hand, so that a test can write what a driver never
//! would.

use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::memfd_guest_memory;
use crate::patience::Patience;

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = 1 << 29;

/// Queue q's rings: (descriptors, available, used), 0x3000 apart from
/// 0x1000 (below 0x10000 for up to five queues of up to 256 entries).
pub fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x1000 + 0x3000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}

/// How a test frontend sets itself up.
#[derive(Clone)]
pub struct Setup {
    /// Guest memory (one memfd region at 0).
    pub mem: usize,
    pub queue_size: u16,
    /// Queues set up and enabled: 0..queues.
    pub queues: usize,
    /// Feature bits not acked (of those offered).
    pub drop_features: u64,
    /// Each queue's call eventfd is made by this.
    pub call: fn() -> EventFd,
    /// Each queue's kick eventfd.
    pub kick: fn() -> EventFd,
}

impl Default for Setup {
    /// 1 MiB, one queue of 16, every feature but EVENT_IDX (every used
    /// entry signalled), nonblocking eventfds.
    fn default() -> Self {
        Setup {
            mem: 1 << 20,
            queue_size: 16,
            queues: 1,
            drop_features: EVENT_IDX,
            call: || EventFd::new(EFD_NONBLOCK).expect("call"),
            kick: || EventFd::new(EFD_NONBLOCK).expect("kick"),
        }
    }
}

pub struct TestQueue {
    pub kick: EventFd,
    pub call: EventFd,
    /// The driver's available index, as written last.
    pub avail_idx: u16,
    /// Used entries read so far.
    pub used_seen: u16,
}

pub struct TestFrontend {
    pub mem: GuestMemoryMmap,
    pub frontend: Frontend,
    pub queues: Vec<TestQueue>,
    queue_size: u16,
}

/// The frontend's handshake up to its features: owner, features (all
/// offered but `drop_features`), protocol features (all offered).
pub fn handshake(sock: &Path, max_queues: u64, drop_features: u64) -> Frontend {
    let mut f = Frontend::connect(sock, max_queues).expect("connect");
    f.set_owner().expect("owner");
    let features = f.get_features().expect("features");
    f.set_features(features & !drop_features)
        .expect("set features");
    let pf = f.get_protocol_features().expect("protocol features");
    f.set_protocol_features(pf).expect("set protocol features");
    f
}

impl TestFrontend {
    /// The whole set-up: handshake, memory table, `queues` queues at
    /// [`rings`], enabled.
    pub fn connect(sock: &Path, s: &Setup) -> TestFrontend {
        let mem = memfd_guest_memory(s.mem);
        let f = handshake(sock, s.queues.max(1) as u64 + 4, s.drop_features);
        let region = mem.iter().next().expect("a region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("info");
        f.set_mem_table(&[info]).expect("mem table");
        let mut t = TestFrontend {
            mem,
            frontend: f,
            queues: Vec::new(),
            queue_size: s.queue_size,
        };
        for q in 0..s.queues {
            t.place_rings(q);
            let (kick, call) = ((s.kick)(), (s.call)());
            t.frontend.set_vring_call(q, &call).expect("call");
            t.frontend.set_vring_kick(q, &kick).expect("kick");
            t.frontend.set_vring_enable(q, true).expect("enable");
            t.queues.push(TestQueue {
                kick,
                call,
                avail_idx: 0,
                used_seen: 0,
            });
        }
        t
    }

    /// Sets queue `q` up again as a driver resetting it does: the ring
    /// stopped (GET_VRING_BASE), its indices back to 0, its addresses and
    /// a new kick given again, enabled.
    pub fn reset_queue(&mut self, q: usize, kick: EventFd) {
        self.frontend.get_vring_base(q).expect("stop the ring");
        let (_, avail, used) = rings(q);
        self.mem
            .write_obj(0u16, GuestAddress(avail + 2))
            .expect("w");
        self.mem.write_obj(0u16, GuestAddress(used + 2)).expect("w");
        self.place_rings(q);
        self.frontend
            .set_vring_call(q, &self.queues[q].call)
            .expect("call");
        self.frontend.set_vring_kick(q, &kick).expect("kick");
        self.frontend.set_vring_enable(q, true).expect("enable");
        let queue = &mut self.queues[q];
        queue.kick = kick;
        queue.avail_idx = 0;
        queue.used_seen = 0;
    }

    /// Queue `q`'s size, base 0 and rings at [`rings`].
    fn place_rings(&self, q: usize) {
        let (desc, avail, used) = rings(q);
        let qs = self.queue_size;
        self.frontend.set_vring_num(q, qs).expect("num");
        self.frontend.set_vring_base(q, 0).expect("base");
        let config = VringConfigData {
            queue_max_size: qs,
            queue_size: qs,
            flags: 0,
            desc_table_addr: self.host_addr(desc),
            used_ring_addr: self.host_addr(used),
            avail_ring_addr: self.host_addr(avail),
            log_addr: None,
        };
        self.frontend.set_vring_addr(q, &config).expect("addr");
    }

    /// Where guest address `gpa` is in this process (the frontend's
    /// addresses, as ring addresses are given).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("mapped") as u64
    }

    /// Writes descriptor `i` of queue `q`'s table.
    pub fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = rings(q).0 + 16 * i as u64;
        self.mem.write_obj(addr, GuestAddress(at)).expect("w");
        self.mem.write_obj(len, GuestAddress(at + 8)).expect("w");
        self.mem.write_obj(flags, GuestAddress(at + 12)).expect("w");
        self.mem.write_obj(next, GuestAddress(at + 14)).expect("w");
    }

    /// Makes `head` available on queue `q` without a kick.
    pub fn offer(&mut self, q: usize, head: u16) {
        let avail = rings(q).1;
        let size = self.queue_size;
        let queue = &mut self.queues[q];
        let slot = avail + 4 + 2 * (queue.avail_idx % size) as u64;
        self.mem.write_obj(head, GuestAddress(slot)).expect("w");
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(queue.avail_idx, GuestAddress(avail + 2))
            .expect("w");
    }

    /// Makes `head` available on queue `q` and kicks.
    pub fn post(&mut self, q: usize, head: u16) {
        self.offer(q, head);
        self.queues[q].kick.write(1).expect("kick");
    }

    /// Writes an available index `ahead` entries past the driver's own
    /// (what no driver writes when `ahead` is more than the queue size).
    pub fn avail_ahead(&mut self, q: usize, ahead: u16) {
        let idx = self.queues[q].avail_idx.wrapping_add(ahead);
        self.mem
            .write_obj(idx, GuestAddress(rings(q).1 + 2))
            .expect("w");
    }

    /// The next used entry of queue `q` within `wait`: (head, length).
    pub fn used_within(&mut self, q: usize, wait: Duration) -> Option<(u32, u32)> {
        let t0 = std::time::Instant::now();
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(rings(q).2 + 2)).ok()?;
            if idx != self.queues[q].used_seen {
                break;
            }
            if t0.elapsed() > wait {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Some(self.take_used(q))
    }

    fn take_used(&mut self, q: usize) -> (u32, u32) {
        let seen = self.queues[q].used_seen;
        let e = rings(q).2 + 4 + 8 * (seen % self.queue_size) as u64;
        self.queues[q].used_seen = seen.wrapping_add(1);
        (
            self.mem.read_obj(GuestAddress(e)).expect("r"),
            self.mem.read_obj(GuestAddress(e + 4)).expect("r"),
        )
    }

    /// The next used entry of queue `q`, which must come (the wait only
    /// catches a hang: one takes microseconds).
    pub fn used(&mut self, q: usize) -> (u32, u32) {
        self.used_of(&[q]).1
    }

    /// The next used entry of whichever of `qs` has one first: (queue,
    /// (head, length)).
    pub fn used_of(&mut self, qs: &[usize]) -> (usize, (u32, u32)) {
        let mut found = None;
        Patience::new(
            format!("a used entry on queues {qs:?}"),
            Duration::from_millis(1),
        )
        .wait_until(|| {
            for &q in qs {
                let idx: u16 = self.mem.read_obj(GuestAddress(rings(q).2 + 2))?;
                if idx != self.queues[q].used_seen {
                    found = Some(q);
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .expect("a used entry");
        let q = found.expect("a queue with a used entry");
        (q, self.take_used(q))
    }
}
