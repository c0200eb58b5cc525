//! The virtio-net device a vhost-user frontend drives: receive and
//! transmit queue pairs, each on a worker thread of its own with a queue
//! of the tap, and a control queue. Frames move between the tap and the
//! guest's buffers directly (readv and writev on guest memory): the
//! virtio-net header the guest reads or writes is the tap's own.
//!
//! A frontend's descriptor chain that breaks the rules (a transmit buffer
//! the device would have to write, a receive buffer too small for the
//! header, addresses outside guest memory) is completed with nothing done
//! and counted; the lines it causes are limited; the queue goes on.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::tap::{self, TapQueue, VNET_HDR_LEN};
use cli_support::log_limit::LogLimit;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

/// What the device counts (all queues together).
#[derive(Debug, Default)]
pub struct Counters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    pub bad_chains: AtomicU64,
}

pub struct NetDevice {
    pairs: usize,
    queue_size: usize,
    taps: Vec<TapQueue>,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    /// One lock per pair's receive side: a tap event and a receive kick
    /// may come on the same worker only, but a frontend may move queues.
    rx_locks: Vec<Mutex<()>>,
    /// Which tap queues are attached: those of the pairs the driver uses.
    attached: Mutex<Vec<bool>>,
    pub counters: Counters,
    logs: Mutex<LogLimit>,
}

impl NetDevice {
    pub fn new(taps: Vec<TapQueue>, queue_size: usize) -> NetDevice {
        let pairs = taps.len();
        NetDevice {
            pairs,
            queue_size,
            rx_locks: (0..pairs).map(|_| Mutex::new(())).collect(),
            attached: Mutex::new(vec![true; pairs]),
            taps,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            counters: Counters::default(),
            logs: Mutex::default(),
        }
    }

    /// The listener id of pair `p`'s tap (past the queues and the exit
    /// event, which vhost-user-backend reserves).
    pub fn tap_event(&self, p: usize) -> u64 {
        (2 * self.pairs + 1 + 1 + p) as u64
    }

    fn ctrl_queue(&self) -> usize {
        2 * self.pairs
    }

    /// Registers each pair's tap with its worker's event loop
    /// (edge-triggered: a tap with frames but no receive buffers waits for
    /// the guest's next kick, not in a loop).
    pub fn watch_taps(
        self: &Arc<Self>,
        handlers: &[Arc<vhost_user_backend::VringEpollHandler<Arc<NetDevice>>>],
    ) -> io::Result<()> {
        for (p, t) in self.taps.iter().enumerate() {
            let h = handlers
                .get(p)
                .ok_or_else(|| io::Error::other("fewer workers than queue pairs"))?;
            h.register_listener(
                t.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                self.tap_event(p),
            )?;
        }
        Ok(())
    }

    /// The driver uses the first `n` pairs (virtio: the first only, until
    /// it sets more on the control queue): the other pairs' tap queues
    /// are detached, so that the kernel gives them no frame.
    fn use_pairs(&self, n: usize) {
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        for (p, (tap, on)) in self.taps.iter().zip(attached.iter_mut()).enumerate() {
            let want = p < n.max(1);
            if *on != want {
                match tap.set_attached(want) {
                    Ok(()) => *on = want,
                    Err(e) => warn!("pair {p}: {e}"),
                }
            }
        }
    }

    fn bad_chain(&self, what: String) {
        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).emit(
            || warn!("a descriptor chain refused: {what}"),
            |n| warn!("{n} more descriptor chains refused (not logged one by one)"),
        );
    }

    fn memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|m| m.memory())
    }

    /// The chain's buffers as iovecs over guest memory: all readable
    /// (`write` false) or all writable; None with the reason if not.
    fn iovecs(chain: Chain, write: bool, out: &mut Vec<libc::iovec>) -> Result<usize, String> {
        out.clear();
        let mem = chain.memory();
        let mut total = 0usize;
        for d in chain.clone() {
            if d.is_write_only() != write {
                return Err(if write {
                    "a receive buffer the device may not write".into()
                } else {
                    "a transmit buffer the device would have to write".into()
                });
            }
            let slice = mem
                .get_slice(d.addr(), d.len() as usize)
                .map_err(|e| format!("buffer at {:#x}+{}: {e}", d.addr().0, d.len()))?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            total += slice.len();
            if out.len() > 1024 {
                return Err("more than 1024 buffers in one frame".into());
            }
        }
        Ok(total)
    }

    /// Pops chains off `vring` until none is left (with EVENT_IDX,
    /// re-enabling notifications and looking once more), `each` deciding
    /// what is done with one: its used length, or None to put it back and
    /// stop (the tap has nothing, or no room).
    fn drain(
        &self,
        vring: &VringRwLock,
        mut each: impl FnMut(Chain) -> Option<u32>,
    ) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        // A tap event before the frontend set the ring up (or after it
        // stopped it): nothing to do until it kicks.
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut used_any = false;
        'outer: loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                match each(chain) {
                    Some(len) => {
                        vring
                            .add_used(head, len)
                            .map_err(|e| io::Error::other(format!("{e:?}")))?;
                        used_any = true;
                    }
                    None => {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        break 'outer;
                    }
                }
            }
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        if used_any && (!event_idx || vring.needs_notification().unwrap_or(true)) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Frames the guest queued on pair `p`: written to its tap.
    fn transmit(&self, p: usize, vring: &VringRwLock) -> io::Result<()> {
        let tap = &self.taps[p];
        let mut iov = Vec::with_capacity(8);
        let mut failed = None;
        self.drain(vring, |chain| {
            match Self::iovecs(chain, false, &mut iov) {
                Ok(n) if n >= VNET_HDR_LEN => {}
                Ok(n) => {
                    self.bad_chain(format!("a {n}-byte frame: shorter than its header"));
                    return Some(0);
                }
                Err(why) => {
                    self.bad_chain(why);
                    return Some(0);
                }
            }
            match tap.write_frame(&iov) {
                Ok(true) => {
                    self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                    Some(0)
                }
                // The tap's queue is full: the rest at the next kick.
                Ok(false) => None,
                Err(e) => {
                    failed.get_or_insert(e);
                    Some(0)
                }
            }
        })?;
        if let Some(e) = failed {
            // A frame the tap refused (too big, a bad header): dropped, as
            // a wire would.
            self.bad_chain(format!("the tap refused a frame: {e}"));
        }
        Ok(())
    }

    /// Frames waiting on pair `p`'s tap: read into the guest's receive
    /// buffers, one chain per frame.
    fn receive(&self, p: usize, vring: &VringRwLock) -> io::Result<()> {
        let _one_at_a_time = self.rx_locks[p].lock().unwrap_or_else(|e| e.into_inner());
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let tap = &self.taps[p];
        let mut iov = Vec::with_capacity(8);
        let mut failed = None;
        self.drain(vring, |chain| {
            let first = chain.clone().next();
            match Self::iovecs(chain, true, &mut iov) {
                Ok(_) if iov.first().is_some_and(|v| v.iov_len >= VNET_HDR_LEN) => {}
                Ok(_) => {
                    self.bad_chain("a receive buffer too small for the header".into());
                    return Some(0);
                }
                Err(why) => {
                    self.bad_chain(why);
                    return Some(0);
                }
            }
            match tap.read_frame(&iov) {
                Ok(Some(n)) => {
                    // One buffer per frame: num_buffers, which the tap
                    // leaves as it was, is 1.
                    if let Some(d) = first {
                        let _ = mem.write_obj(1u16.to_le(), d.addr().unchecked_add(10));
                    }
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    Some(n as u32)
                }
                Ok(None) => None,
                Err(e) => {
                    failed.get_or_insert(e);
                    None
                }
            }
        })?;
        if let Some(e) = failed {
            warn!("reading pair {p}'s tap: {e}");
        }
        Ok(())
    }

    /// The control queue: the number of pairs, receive modes and MAC
    /// filters (acknowledged: the tap takes every frame for the guest).
    fn control(&self, vring: &VringRwLock) -> io::Result<()> {
        let pairs = self.pairs;
        self.drain(vring, |chain| {
            let mem = chain.memory();
            let descs: Vec<_> = chain.clone().collect();
            let (Some(first), Some(ack)) =
                (descs.first(), descs.iter().rfind(|d| d.is_write_only()))
            else {
                self.bad_chain("a control command without a header or an ack".into());
                return Some(0);
            };
            let header: Result<[u8; 2], _> = mem.read_obj(first.addr());
            let status = match header {
                Ok([class, cmd]) => match (class as u32, cmd as u32) {
                    (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                        let asked: Result<u16, _> = descs
                            .get(1)
                            .filter(|d| !d.is_write_only())
                            .map_or(first.addr().checked_add(2).ok_or(()), |d| Ok(d.addr()))
                            .map_err(|_| ())
                            .and_then(|a: GuestAddress| mem.read_obj(a).map_err(|_| ()));
                        match asked.map(u16::from_le) {
                            Ok(n) if (1..=pairs as u16).contains(&n) => {
                                info!(pairs = n, "the driver uses {n} queue pairs");
                                self.use_pairs(n as usize);
                                VIRTIO_NET_OK
                            }
                            _ => VIRTIO_NET_ERR,
                        }
                    }
                    (VIRTIO_NET_CTRL_RX, _) | (VIRTIO_NET_CTRL_MAC, _) => VIRTIO_NET_OK,
                    _ => VIRTIO_NET_ERR,
                },
                Err(_) => VIRTIO_NET_ERR,
            };
            if mem.write_obj(status, ack.addr()).is_err() {
                self.bad_chain("a control command's ack outside guest memory".into());
                return Some(0);
            }
            Some(1)
        })
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
        if has(VIRTIO_NET_F_GUEST_ECN) {
            f |= tap::TUN_F_TSO_ECN;
        }
    }
    f
}

impl VhostUserBackend for NetDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.pairs + 1
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        features()
    }

    fn acked_features(&self, acked: u64) {
        // A driver starts on the first pair.
        self.use_pairs(1);
        let offloads = tap_offloads(acked);
        for t in &self.taps {
            if let Err(e) = t.set_offloads(offloads) {
                warn!("{e}");
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
    }

    /// virtio-net's configuration: no MAC (the frontend gives its own),
    /// link up, the pairs, the tap's MTU.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
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
        // (vhost checks a request against VHOST_USER_CONFIG_SIZE, 256.)
        out.resize((size as usize).min(256), 0);
        out
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    /// Pair p's two queues on worker p; the control queue on worker 0.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs)
            .map(|p| {
                let mut mask = 0b11u64 << (2 * p);
                if p == 0 {
                    mask |= 1 << self.ctrl_queue();
                }
                mask
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    /// vhost-user-backend numbers a worker's queues from 0 in queue order
    /// and hands it only its own vrings: worker p has pair p's receive (0)
    /// and transmit (1) queues, worker 0 the control queue (2) too; pair
    /// p's tap is watched by worker p.
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let p = thread_id;
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        if p >= self.pairs {
            return Ok(());
        }
        match u64::from(device_event) {
            0 => self.receive(p, rx),
            1 => self.transmit(p, tx),
            2 if p == 0 => vrings.get(2).map_or(Ok(()), |c| self.control(c)),
            e if e == self.tap_event(p) => self.receive(p, rx),
            _ => Ok(()),
        }
    }
}
