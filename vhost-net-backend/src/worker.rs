//! A queue pair's worker: one thread waiting (epoll) on its receive and
//! transmit kicks, the control queue's for pair 0, its tap queue and its
//! stop, and nothing else. Nothing it waits on can block it: kicks and
//! the tap are nonblocking and waited on edge-triggered, and a call
//! eventfd that is full drops a signal the guest already has pending. So
//! a stop is always answered, and the session's requests never wait on
//! a stuck worker.
//!
//! Guest input is held to its rings and buffers: a ring no driver could
//! write breaks that queue once (one line, then it is left alone until
//! the driver sets it up again); a chain that breaks a rule is completed
//! with nothing done and counted; frames too long for their buffer are
//! dropped and counted; every such line goes through the session's limit.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, warn};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX,
};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::chain::Buffers;
use crate::device::NetDevice;
use crate::tap::VNET_HDR_LEN;
use vhost_user_session::memory::still_backed;
use vhost_user_session::queues::Vring;
use vhost_user_session::rings::BrokenMark;
pub use vhost_user_session::worker::WorkerHandle;
use vhost_user_session::{rings, Session};

const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;
/// The largest frame a tap gives (64 KiB of GSO payload and headers) and
/// its virtio-net header: what a receive overflow buffer takes.
const MAX_FRAME: usize = 65_536 + VNET_HDR_LEN;

/// The epoll tokens.
const STOP: u64 = 0;
const TAP: u64 = 1;
/// Kicks: KICK + the slot (receive 0, transmit 1, control 2).
const KICK: u64 = 2;

/// A queue the worker serves.
struct Served {
    index: usize,
    vring: Vring,
    /// The driver wrote what no driver can: left alone until set up again.
    broken: BrokenMark,
}

pub struct PairWorker {
    pub pair: usize,
    pub device: Arc<NetDevice>,
    /// The pair's receive, transmit and (pair 0) control queues, those
    /// the frontend set up: (virtqueue index, its vring, its broken mark).
    pub queues: [Option<(usize, Vring, BrokenMark)>; 3],
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub event_idx: bool,
    pub session: Arc<Session>,
}

struct Running {
    pair: usize,
    device: Arc<NetDevice>,
    queues: [Option<Served>; 3],
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: bool,
    session: Arc<Session>,
    bufs: Buffers,
    /// The chain being served (its storage reused).
    descs: Vec<Desc>,
    /// Where a frame longer than its receive buffer goes (and is dropped).
    overflow: Vec<u8>,
    /// The session's memory is gone: nothing more is touched.
    lost: bool,
}

impl PairWorker {
    pub fn spawn(self) -> io::Result<WorkerHandle> {
        let stop = WorkerHandle::stop_event()?;
        let epoll = Epoll::new()?;
        let watch = |fd: i32, events: EventSet, token: u64| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        watch(stop.as_raw_fd(), EventSet::IN, STOP)?;
        for (slot, q) in self.queues.iter().enumerate() {
            let Some((_, vring, _)) = q else { continue };
            if let Some(kick) = vring.get_ref().get_kick() {
                watch(
                    kick.as_raw_fd(),
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    KICK + slot as u64,
                )?;
            }
        }
        if self.queues[0].is_some() {
            watch(
                self.device.tap(self.pair).as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                TAP,
            )?;
        }
        let PairWorker {
            pair,
            device,
            queues,
            mem,
            event_idx,
            session,
        } = self;
        WorkerHandle::spawn(format!("pair {pair}"), stop, move || {
            let mut r = Running {
                pair,
                device,
                queues: queues.map(|q| {
                    q.map(|(index, vring, broken)| Served {
                        index,
                        vring,
                        broken,
                    })
                }),
                mem,
                event_idx,
                session,
                bufs: Buffers::default(),
                descs: Vec::new(),
                overflow: vec![0; MAX_FRAME],
                lost: false,
            };
            r.run(&epoll)
        })
    }
}

impl Running {
    fn run(&mut self, epoll: &Epoll) {
        // Whatever the guest queued while nobody listened (its kicks went
        // nowhere), and frames waiting on the tap.
        for slot in 0..3 {
            self.serve(slot);
        }
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(pair = self.pair, "worker stopped: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return,
                    TAP => self.serve(0),
                    k => {
                        let slot = (k - KICK) as usize;
                        self.take_kick(slot);
                        self.serve(slot);
                    }
                }
            }
        }
    }

    /// Consumes a kick: one read, nonblocking (a semaphore eventfd gives
    /// up one at a time, and that is enough: the wait is edge-triggered).
    fn take_kick(&self, slot: usize) {
        if let Some(q) = &self.queues[slot] {
            if let Some(kick) = q.vring.get_ref().get_kick() {
                let _ = kick.consume();
            }
        }
    }

    fn serve(&mut self, slot: usize) {
        match slot {
            0 => self.receive(),
            1 => self.transmit(),
            _ => self.control(),
        }
        self.check_memory();
    }

    /// The frontend took away guest memory (a contained fault, or a kernel
    /// copy that failed on memory its files no longer back): nothing more
    /// is touched, and the session ends.
    fn check_memory(&mut self) {
        if !self.lost && self.session.memory_lost() {
            debug!(pair = self.pair, "guest memory lost: hanging up");
            self.lost = true;
            self.session.hang_up();
        }
    }

    /// A kernel copy to or from guest memory failed with EFAULT: memory
    /// the frontend took away, or (it cannot be otherwise: the buffers
    /// were checked) nothing else.
    fn fault(&mut self, mem: &GuestMemoryMmap) {
        if !still_backed(mem) {
            self.session.lose_memory();
            self.check_memory();
        }
    }

    fn bad_chain(&self, what: &str) {
        self.device
            .counters
            .bad_chains
            .fetch_add(1, Ordering::Relaxed);
        let pair = self.pair;
        self.session
            .peer_caused(|| warn!(pair, "a descriptor chain refused: {what}"));
    }

    /// Pops the chains available on `slot`'s queue, `each` deciding what
    /// is done with one: its used length, or None to put it back and stop
    /// (the tap has nothing, or no room). At most what the ring says is
    /// available is taken per look, and a ring no driver could write
    /// breaks the queue.
    fn drain(
        &mut self,
        slot: usize,
        mut each: impl FnMut(&mut Self, &GuestMemoryMmap, &[Desc], &mut Buffers) -> Option<u32>,
    ) {
        if self.lost {
            return;
        }
        let Some(q) = &self.queues[slot] else { return };
        if q.broken.is_set() || !q.vring.get_ref().get_queue().ready() {
            return;
        }
        let (vring, index) = (q.vring.clone(), q.index);
        let mem = self.mem.memory();
        let event_idx = self.event_idx;
        let mut used_any = false;
        let mut broken = None;
        'outer: loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let size = vring.get_ref().get_queue().size();
            let ahead = match rings::available(vring.get_ref().get_queue(), &mem) {
                Ok(n) => n,
                Err(why) => {
                    broken = Some(why);
                    break;
                }
            };
            for _ in 0..ahead {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break 'outer };
                let head = match rings::head(chain.head_index(), size) {
                    Ok(h) => h,
                    Err(why) => {
                        broken = Some(why);
                        break 'outer;
                    }
                };
                let mut descs = std::mem::take(&mut self.descs);
                descs.clear();
                descs.extend(chain.map(|d| (d.addr(), d.len(), d.is_write_only())));
                let mut bufs = std::mem::take(&mut self.bufs);
                let done = each(self, &mem, &descs, &mut bufs);
                self.descs = descs;
                self.bufs = bufs;
                match done {
                    Some(len) => {
                        if vring.add_used(head, len).is_err() {
                            // The used ring is checked to lie in memory:
                            // only memory taken away gets here.
                            self.fault(&mem);
                            break 'outer;
                        }
                        used_any = true;
                    }
                    None => {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        break 'outer;
                    }
                }
                if self.lost {
                    break 'outer;
                }
            }
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        if used_any && (!event_idx || vring.needs_notification().unwrap_or(true)) {
            // A full call eventfd (nonblocking) means an interrupt is
            // pending already.
            let _ = vring.signal_used_queue();
        }
        if let Some(why) = broken {
            if let Some(q) = &self.queues[slot] {
                q.broken.set();
            }
            let pair = self.pair;
            self.session.peer_caused(|| {
                warn!(
                    pair,
                    queue = index,
                    "{why}: the queue is broken and left alone until the driver resets it"
                )
            });
        }
    }

    /// Frames the guest queued: written to the tap.
    fn transmit(&mut self) {
        self.drain(1, Self::transmit_one);
    }

    fn transmit_one(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &[Desc],
        bufs: &mut Buffers,
    ) -> Option<u32> {
        if let Err(why) = bufs.fill(mem, chain.iter().copied(), false) {
            self.bad_chain(&why);
            return Some(0);
        }
        if bufs.total < VNET_HDR_LEN {
            self.bad_chain(&format!(
                "a {}-byte frame: shorter than its header",
                bufs.total
            ));
            return Some(0);
        }
        match self.device.tap(self.pair).write_frame(&bufs.iov) {
            Ok(true) => {
                self.device
                    .counters
                    .tx_frames
                    .fetch_add(1, Ordering::Relaxed);
                Some(0)
            }
            // The tap's queue is full: the rest at the next kick.
            Ok(false) => None,
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                self.fault(mem);
                Some(0)
            }
            Err(e) => {
                // A frame the tap refused (too big, a bad header): dropped,
                // as a wire would.
                self.device
                    .counters
                    .tx_dropped
                    .fetch_add(1, Ordering::Relaxed);
                let pair = self.pair;
                self.session
                    .peer_caused(|| warn!(pair, "the tap refused a frame: {e}"));
                Some(0)
            }
        }
    }

    /// Frames waiting on the tap: read into the guest's receive buffers,
    /// one chain per frame.
    fn receive(&mut self) {
        self.drain(0, Self::receive_one);
    }

    fn receive_one(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &[Desc],
        bufs: &mut Buffers,
    ) -> Option<u32> {
        if let Err(why) = bufs.fill(mem, chain.iter().copied(), true) {
            self.bad_chain(&why);
            return Some(0);
        }
        let room = bufs.total;
        if room < VNET_HDR_LEN {
            self.bad_chain(&format!(
                "a {room}-byte receive buffer: smaller than the header"
            ));
            return Some(0);
        }
        // What does not fit lands in the overflow, which tells a frame
        // too long for the buffer from one that fits.
        bufs.iov.push(libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        });
        loop {
            match self.device.tap(self.pair).read_frame(&bufs.iov) {
                Ok(Some(n)) if n > room => {
                    self.device
                        .counters
                        .rx_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    let pair = self.pair;
                    self.session.peer_caused(|| {
                        warn!(
                            pair,
                            "a {n}-byte frame dropped: the guest's receive buffer holds {room}"
                        )
                    });
                }
                Ok(Some(n)) => {
                    // One buffer per frame: num_buffers (the header's last
                    // field, wherever the driver laid the header out) is 1.
                    if !bufs.write_at(mem, 10, &1u16.to_le_bytes()) {
                        self.fault(mem);
                    }
                    self.device
                        .counters
                        .rx_frames
                        .fetch_add(1, Ordering::Relaxed);
                    return Some(n as u32);
                }
                Ok(None) => return None,
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                    self.fault(mem);
                    if self.lost {
                        return None;
                    }
                    self.bad_chain("a receive buffer the kernel could not write");
                    return Some(0);
                }
                Err(e) => {
                    let pair = self.pair;
                    self.session
                        .peer_caused(|| warn!(pair, "reading the tap: {e}"));
                    return None;
                }
            }
        }
    }

    /// The control queue: the number of pairs, receive modes and MAC
    /// filters (acknowledged: the tap takes every frame for the guest).
    fn control(&mut self) {
        self.drain(2, Self::command);
    }

    fn command(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &[Desc],
        bufs: &mut Buffers,
    ) -> Option<u32> {
        // Readable buffers (class, command, arguments), then one writable
        // byte at least for the ack.
        let Some(&(ack_at, ack_len, true)) = chain.last() else {
            self.bad_chain("a control command without an ack buffer");
            return Some(0);
        };
        if ack_len == 0 {
            self.bad_chain("a control command whose ack buffer is empty");
            return Some(0);
        }
        let read = chain[..chain.len() - 1].iter().copied();
        let filled = bufs.fill(mem, read, false);
        let mut head = [0u8; 4];
        let got = bufs.read_start(mem, &mut head);
        if let Err(why) = filled {
            self.bad_chain(&why);
            return Some(0);
        }
        let status = match (got, u32::from(head[0]), u32::from(head[1])) {
            (4.., VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                let n = u16::from_le_bytes([head[2], head[3]]);
                if (1..=self.device.pairs() as u16).contains(&n) {
                    if let Err(e) = self.device.use_pairs(n as usize) {
                        self.session.peer_caused(|| warn!("{e}"));
                    }
                    VIRTIO_NET_OK
                } else {
                    VIRTIO_NET_ERR
                }
            }
            (2.., VIRTIO_NET_CTRL_RX | VIRTIO_NET_CTRL_MAC, _) => VIRTIO_NET_OK,
            _ => VIRTIO_NET_ERR,
        };
        if mem.write_obj(status, ack_at).is_err() {
            self.bad_chain("a control command's ack outside guest memory");
            return Some(0);
        }
        Some(1)
    }
}

/// A chain's descriptor: address, length, device-writable.
type Desc = (GuestAddress, u32, bool);
