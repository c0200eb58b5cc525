//! blk-backend's part of a session (vhost-user-session's `Device`):
//! what an export offers, its configuration, its queue workers (one per
//! queue), the inflight region that lets a restarted backend resume, and
//! postcopy's requests (their state is `postcopy`'s).

use std::fs::File;
use std::io;
use std::sync::Arc;

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Result as VuResult;
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;

use crate::config;
use crate::export::Export;
use crate::inflight::InflightRegion;
use crate::postcopy::{self, Postcopy};
use crate::worker::{QueueWorker, WorkerHandle};
use vhost_user_session::fence::GuardedRange;
use vhost_user_session::handler::{self, install_memory, Core};
use vhost_user_session::memory::MappedRegion;
use vhost_user_session::{refuse, Session};

/// One session with a frontend.
pub type Connection = handler::Connection<Disk>;

/// Starts a session on `export`.
pub fn connect(export: &Arc<Export>, session: Arc<Session>) -> io::Result<Connection> {
    let (queues, size) = (export.spec.num_queues, export.spec.queue_size as u16);
    let disk = Disk {
        export: Arc::clone(export),
        postcopy: Postcopy::default(),
        inflight: None,
    };
    Connection::new(disk, queues, size, session)
}

/// The export's part of one session.
pub struct Disk {
    export: Arc<Export>,
    postcopy: Postcopy,
    inflight: Option<(Arc<InflightRegion>, GuardedRange)>,
}

/// What is offered: the export's virtio-blk features and the vhost-user
/// protocol features (PAGEFAULT where a userfaultfd can be made).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    let f = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    if postcopy::offered() {
        f | VhostUserProtocolFeatures::PAGEFAULT
    } else {
        f
    }
}

impl Disk {
    /// Starts queue `q`'s worker when everything it needs has arrived.
    fn maybe_start(&mut self, core: &mut Core<WorkerHandle>, q: usize) -> VuResult<()> {
        if core.acked_features().is_none() {
            return Ok(());
        }
        let slot = core.queues.slot(q as u32)?;
        if slot.worker.is_some() || !slot.ready() || core.regions.is_empty() {
            return Ok(());
        }
        let (vring, broken) = (slot.vring.clone(), slot.broken.clone());
        if let Err(why) = core.queues.rings_in_memory(q) {
            // The memory table changed under rings that were fine: the
            // queue waits for new addresses instead of failing every
            // request.
            core.session
                .peer_caused(|| warn!(queue = q, "not started: {why}"));
            return Ok(());
        }
        let mut inflight = self.inflight.as_ref().and_then(|(r, _)| r.queue(q as u16));
        let mut resubmit = Vec::new();
        if let Some(inf) = &mut inflight {
            let used = vring
                .queue_used_idx()
                .map_err(|e| refuse(format!("queue {q}: used ring unreadable: {e:?}")))?;
            let rec = inf.recover(used);
            if let Some(next) = rec.next_avail {
                if !rec.resubmit.is_empty() || next != vring.queue_next_avail() {
                    info!(
                        queue = q,
                        resubmit = rec.resubmit.len(),
                        next_avail = next,
                        "resuming from the inflight region"
                    );
                }
                vring.set_queue_next_avail(next);
                vring.set_queue_next_used(used);
            }
            resubmit = rec.resubmit;
        }
        vring.set_queue_ready(true);
        let worker = QueueWorker {
            queue: q as u16,
            export: Arc::clone(&self.export),
            vring,
            mem: core.mem.clone(),
            event_idx: core.event_idx(),
            inflight,
            resubmit,
            poll: std::time::Duration::from_micros(self.export.spec.poll_us),
            session: Arc::clone(&core.session),
            broken,
        };
        let handle = worker
            .spawn()
            .map_err(|e| refuse(format!("queue {q}: cannot start its worker: {e}")))?;
        core.queues.slot(q as u32)?.worker = Some(handle);
        debug!(queue = q, "started");
        Ok(())
    }

    /// The frontend keeps the inflight region's file and can truncate it
    /// too: its mapping is guarded like guest memory.
    fn keep_inflight(&mut self, core: &Core<WorkerHandle>, region: InflightRegion) -> VuResult<()> {
        let (at, len) = region.mapping();
        let guard = core
            .session
            .guard(at, len)
            .map_err(|e| refuse(format!("inflight region: {e}")))?;
        self.inflight = Some((Arc::new(region), guard));
        Ok(())
    }
}

impl handler::Device for Disk {
    type Worker = WorkerHandle;

    fn features(&self) -> u64 {
        config::features(self.export.readonly(), self.export.spec.num_queues > 1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.export.get_config(offset, size)
    }

    /// Only `writeback` (offset 32) is writable, and this device always
    /// caches writes until FLUSH: the driver's choice is accepted quietly.
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> VuResult<()> {
        if offset == 32 && buf.len() == 1 {
            return Ok(());
        }
        Err(refuse(format!(
            "SET_CONFIG of {} bytes at {offset}",
            buf.len()
        )))
    }

    /// Stops queue `q`'s worker (its in-flight I/O completes first).
    fn stop(&mut self, core: &mut Core<WorkerHandle>, q: usize) {
        if let Some(w) = core
            .queues
            .slot(q as u32)
            .ok()
            .and_then(|s| s.worker.take())
        {
            w.stop();
        }
    }

    fn start(&mut self, core: &mut Core<WorkerHandle>, q: usize) -> VuResult<()> {
        self.maybe_start(core, q)
    }

    /// Ends the session: workers complete their in-flight I/O and stop.
    /// Paging through a vmm that is gone, its faults would never be
    /// served: postcopy ends first then (the memory went with the vmm).
    fn close(&mut self, core: &mut Core<WorkerHandle>) {
        if self.postcopy.active() && core.session.frontend_gone() {
            self.postcopy.end(&core.regions);
        }
        handler::Device::stop_all(self, core);
        self.postcopy.end(&core.regions);
    }

    fn memory_table(
        &mut self,
        core: &mut Core<WorkerHandle>,
        regions: Vec<MappedRegion>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening == Some(true) {
            for r in &regions {
                self.postcopy.register(r)?;
            }
            let bases = regions.iter().map(|r| r.region.as_ptr() as u64).collect();
            self.postcopy.pending = Some(regions);
            return Ok(Some(bases));
        }
        install_memory(core, self, regions)?;
        Ok(None)
    }

    fn memory_region_added(
        &mut self,
        core: &mut Core<WorkerHandle>,
        added: MappedRegion,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let mut regions = self
            .postcopy
            .pending
            .take()
            .unwrap_or_else(|| core.regions.clone());
        if postcopy_listening == Some(true) {
            self.postcopy.register(&added)?;
            let base = added.region.as_ptr() as u64;
            regions.push(added);
            self.postcopy.pending = Some(regions);
            return Ok(Some(base));
        }
        regions.push(added);
        install_memory(core, self, regions)?;
        Ok(None)
    }

    fn get_inflight_fd(
        &mut self,
        core: &mut Core<WorkerHandle>,
        msg: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let nq = core.queues.len() as u16;
        let max = self.export.spec.queue_size as u16;
        if msg.num_queues == 0 || msg.num_queues > nq || msg.queue_size == 0 || msg.queue_size > max
        {
            return Err(refuse(format!(
                "GET_INFLIGHT_FD for {} queues of {} (up to {nq} of {max})",
                msg.num_queues, msg.queue_size
            )));
        }
        let region = InflightRegion::create(msg.num_queues, msg.queue_size)
            .map_err(|e| refuse(format!("cannot create the inflight region: {e}")))?;
        let reply = region
            .reply()
            .map_err(|e| refuse(format!("inflight region: {e}")))?;
        self.keep_inflight(core, region)?;
        Ok(reply)
    }

    fn set_inflight_fd(
        &mut self,
        core: &mut Core<WorkerHandle>,
        msg: &VhostUserInflight,
        file: File,
    ) -> VuResult<()> {
        let region = InflightRegion::open(
            file,
            msg,
            core.queues.len() as u16,
            self.export.spec.queue_size as u16,
        )
        .map_err(|e| refuse(e.to_string()))?;
        self.keep_inflight(core, region)
    }

    fn postcopy_advice(&mut self, _core: &mut Core<WorkerHandle>) -> VuResult<File> {
        self.postcopy.advise()
    }

    fn postcopy_listen(&mut self, _core: &mut Core<WorkerHandle>) -> VuResult<()> {
        self.postcopy.listen()
    }

    fn postcopy_end(&mut self, core: &mut Core<WorkerHandle>) -> VuResult<()> {
        if let Some(pending) = self.postcopy.pending.take() {
            // Never acked: used as it is now (the pager filled it all).
            install_memory(core, self, pending)?;
        }
        self.postcopy.end(&core.regions);
        Ok(())
    }

    fn postcopy_ack_mem_regions(&mut self, core: &mut Core<WorkerHandle>) -> VuResult<()> {
        let Some(regions) = self.postcopy.pending.take() else {
            return Err(refuse("a memory table ack with no table waiting".into()));
        };
        info!("guest memory mapped; its missing pages are paged in by the vmm");
        install_memory(core, self, regions)
    }
}
