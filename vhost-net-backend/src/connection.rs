//! net-backend's part of a session (vhost-user-session's `Device`): what
//! the device offers, its configuration, and its pair workers. Pair p's
//! worker serves its receive and transmit queues (and pair 0's the
//! control queue) that the frontend set up; any change to one of them
//! stops the worker and starts it again on what is ready.

use std::sync::Arc;

use tracing::warn;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Result as VuResult;
use vhost_user_backend::VringT;

use crate::device::{self, Layout, NetDevice};
use crate::worker::{PairWorker, WorkerHandle};
use vhost_user_session::handler::{self, Core};
use vhost_user_session::queues::Vring;
use vhost_user_session::rings::BrokenMark;
use vhost_user_session::{refuse, Session};

/// A queue served by its pair's worker.
pub struct InService;

/// One session with a frontend.
pub type Connection = handler::Connection<Nic>;

/// Starts a session on `device`.
pub fn connect(device: &Arc<NetDevice>, session: Arc<Session>) -> std::io::Result<Connection> {
    let queues = 2 * device.pairs() + 1;
    let max = device.queue_size().min(usize::from(u16::MAX)) as u16;
    let nic = Nic {
        workers: (0..device.pairs()).map(|_| None).collect(),
        device: Arc::clone(device),
    };
    Connection::new(nic, queues, max, session)
}

/// The device's part of one session: each pair's worker, when one runs.
pub struct Nic {
    device: Arc<NetDevice>,
    workers: Vec<Option<WorkerHandle>>,
}

impl Nic {
    fn layout(core: &Core<InService>) -> Layout {
        Layout::new(core.queues.len() / 2, core.acked_features().unwrap_or(0))
    }

    fn stop_pair(&mut self, core: &mut Core<InService>, p: usize) {
        if let Some(w) = self.workers.get_mut(p).and_then(Option::take) {
            w.stop();
        }
        for q in Self::layout(core).queues_of(p).into_iter().flatten() {
            if let Ok(slot) = core.queues.slot(q as u32) {
                slot.worker = None;
            }
        }
    }

    /// Starts pair `p`'s worker on its queues that are ready, if any.
    fn start_pair(&mut self, core: &mut Core<InService>, p: usize) -> VuResult<()> {
        let layout = Self::layout(core);
        if core.acked_features().is_none()
            || core.regions.is_empty()
            || p >= layout.pairs
            || self.workers[p].is_some()
        {
            return Ok(());
        }
        let mut queues: [Option<(usize, Vring, BrokenMark)>; 3] = Default::default();
        for (k, q) in layout.queues_of(p).into_iter().enumerate() {
            let Some(q) = q else { continue };
            let Some(slot) = core.queues.get(q) else {
                continue;
            };
            if !slot.ready() {
                continue;
            }
            if let Err(why) = core.queues.rings_in_memory(q) {
                // The memory table changed under rings that were fine: the
                // queue waits for new addresses.
                core.session
                    .peer_caused(|| warn!(queue = q, "not started: {why}"));
                continue;
            }
            queues[k] = Some((q, slot.vring.clone(), slot.broken.clone()));
        }
        if queues.iter().all(Option::is_none) {
            return Ok(());
        }
        for (q, vring, _) in queues.iter().flatten() {
            vring.set_queue_ready(true);
            core.queues.slot(*q as u32)?.worker = Some(InService);
        }
        let worker = PairWorker {
            pair: p,
            device: Arc::clone(&self.device),
            queues,
            mem: core.mem.clone(),
            event_idx: core.event_idx(),
            session: Arc::clone(&core.session),
        };
        let handle = worker
            .spawn()
            .map_err(|e| refuse(format!("pair {p}: cannot start its worker: {e}")))?;
        self.workers[p] = Some(handle);
        Ok(())
    }
}

impl handler::Device for Nic {
    type Worker = InService;

    fn features(&self) -> u64 {
        device::features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::CONFIG
    }

    fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config(offset, size)
    }

    /// The MAC is the frontend's own (VIRTIO_NET_F_MAC is not offered): a
    /// driver writing it is told nothing changed here.
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> VuResult<()> {
        if offset as usize + buf.len() <= 6 {
            return Ok(());
        }
        Err(refuse(format!(
            "SET_CONFIG of {} bytes at {offset}",
            buf.len()
        )))
    }

    fn features_acked(&mut self, core: &Core<InService>, features: u64) {
        if let Err(e) = self.device.acked_features(features) {
            core.session.peer_caused(|| warn!("{e}"));
        }
    }

    fn stop(&mut self, core: &mut Core<InService>, q: usize) {
        if let Some(p) = Self::layout(core).pair_of(q) {
            self.stop_pair(core, p);
        }
    }

    fn start(&mut self, core: &mut Core<InService>, q: usize) -> VuResult<()> {
        let Some(p) = Self::layout(core).pair_of(q) else {
            return Ok(());
        };
        // The worker takes the pair's queues as they are when it starts.
        self.stop_pair(core, p);
        self.start_pair(core, p)
    }

    fn stop_all(&mut self, core: &mut Core<InService>) {
        for p in 0..self.workers.len() {
            self.stop_pair(core, p);
        }
    }

    fn start_all(&mut self, core: &mut Core<InService>) -> VuResult<()> {
        for p in 0..self.workers.len() {
            self.start_pair(core, p)?;
        }
        Ok(())
    }
}
