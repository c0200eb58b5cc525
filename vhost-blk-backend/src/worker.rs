//! A queue's worker thread: one loop around its io_uring (kicks, I/O
//! completions and the stop all arrive there) that owns everything its
//! queue needs on the hot path: the ring, its copy of the chain index and
//! its part of the inflight region. Nothing here waits on another queue,
//! and nothing allocates per request or per batch.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, MemoryRegionAddress,
};

use crate::adaptive_poll::PollWindow;
use crate::export::{Export, Subscription};
use crate::inflight::InflightQueue;
use crate::uring::{Pending, QueueRing};
use blk_request::ChainWalk;
use blk_request::{Kind, Request};
pub use vhost_user_session::worker::WorkerHandle;
use vhost_user_session::{rings, Session};

pub use vhost_user_session::queues::Vring;

/// Above this many requests in flight a worker sleeps instead of polling.
const POLL_MAX_IN_FLIGHT: usize = 4;

/// The longest a throttled queue sleeps before it looks at its budget
/// again: a limit raised live is seen within this.
const MAX_THROTTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

pub struct QueueWorker {
    pub queue: u16,
    pub export: Arc<Export>,
    pub vring: Vring,
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub event_idx: bool,
    pub inflight: Option<InflightQueue>,
    /// Heads a predecessor left in flight, to run before anything else.
    pub resubmit: Vec<u16>,
    /// The longest the worker keeps polling the queue and its ring after
    /// the last work before it sleeps (0: never polls); within it, the
    /// window adapts (see `adaptive_poll`).
    pub poll: std::time::Duration,
    /// The session this queue belongs to: a worker that finds its memory
    /// taken away ends it.
    pub session: Arc<Session>,
    /// The queue's mark, set when the driver broke it (a worker started
    /// again on a broken queue leaves it alone without saying so again).
    pub broken: rings::BrokenMark,
}

/// Whether `run_heads` asks the rate limits, and counts a request held
/// back as throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Heads new to the limits: asked, and counted when held back.
    New,
    /// Heads held back before: asked again, not counted again.
    Again,
    /// Not asked (a stopping worker runs what it held back).
    Unlimited,
}

/// One finished request: its head and the used length.
struct Done {
    head: u16,
    len: u32,
}

struct Running {
    w: QueueWorker,
    ring: QueueRing,
    sub: Subscription,
    used: Vec<Done>,
    wrote: Vec<(u64, u64)>,
    /// Reused per batch: heads taken from the ring, requests finished.
    heads: Vec<u16>,
    done: Vec<Pending>,
    /// Each chain is parsed into this one (its storage reused).
    req: Request,
    /// How long to poll before sleeping (learnt, up to `poll`).
    window: PollWindow,
    /// The stop came in on the ring.
    stopping: bool,
    /// The driver put the ring in a state no driver can legally reach (its
    /// available index more than a queue's worth ahead): VIRTIO's "device
    /// needs reset". The queue is left alone until the driver sets it up
    /// again (which starts a new worker).
    broken: bool,
    /// Requests answered with an error since the last publish.
    failed: u64,
    /// Heads taken from the ring that wait for their rate limit's budget,
    /// in order (the ring is not read again until they have run; they
    /// are in flight, so a successor resubmits them).
    deferred: Vec<u16>,
}

impl QueueWorker {
    pub fn spawn(self) -> io::Result<WorkerHandle> {
        let stop = WorkerHandle::stop_event()?;
        let stop_fd = stop.as_raw_fd();
        let ring_entries = (self.vring.get_ref().get_queue().size() as u32 * 4)
            .next_power_of_two()
            .max(64);
        let mut ring = QueueRing::new(ring_entries)?;
        ring.set_submit_batch(self.export.spec.submit_batch);
        let name = format!("queue {}", self.queue);
        let kick = self
            .vring
            .get_ref()
            .get_kick()
            .as_ref()
            .map(|k| k.as_raw_fd());
        WorkerHandle::spawn(name, stop, move || {
            // Before the filter narrows (it has no sched_setaffinity).
            if let Some(cpus) = &self.export.spec.worker_cpus {
                match cpus.pin_thread(self.queue as usize) {
                    Ok(cpu) => debug!(queue = self.queue, cpu, "pinned"),
                    // Checked at start; a CPU taken offline since (or a
                    // cpuset narrowed) leaves the worker where it was.
                    Err(e) => warn!(queue = self.queue, "not pinned: {e}"),
                }
            }
            // Before the filter narrows: enabling the ring is a register
            // call the session's filter allows and the worker's does not.
            if let Err(e) = ring.start(kick, stop_fd) {
                warn!(queue = self.queue, "not serving: its io_uring: {e}");
                return;
            }
            self.register(&mut ring);
            if let Err(e) = sandbox::confine(&crate::seccomp::WORKER) {
                warn!(queue = self.queue, "not serving: {e}");
                return;
            }
            let sub = self.export.subscribe();
            let poll = self.poll;
            let broken = self.broken.is_set();
            let mut r = Running {
                w: self,
                ring,
                sub,
                used: Vec::new(),
                wrote: Vec::new(),
                heads: Vec::new(),
                done: Vec::new(),
                req: Request::default(),
                window: PollWindow::new(poll),
                stopping: false,
                broken,
                failed: 0,
                deferred: Vec::new(),
            };
            if let Err(e) = r.run() {
                warn!(queue = r.w.queue, "worker stopped: {e}");
            }
            let Running { w, sub, .. } = r;
            w.export.unsubscribe(sub);
        })
    }
}

impl QueueWorker {
    /// Registers the export's files with the ring, and guest memory as
    /// fixed buffers when the export asks for them. Either is an
    /// optimisation: a kernel or a limit that refuses leaves the ring
    /// naming files and buffers per I/O, as it otherwise would.
    fn register(&self, ring: &mut QueueRing) {
        if let Err(e) = ring.register_files(&self.export.ring_files()) {
            debug!(queue = self.queue, "layer files not registered: {e}");
        }
        if !self.export.spec.fixed_buffers || !self.export.uses_ring() {
            return;
        }
        let mem = self.mem.memory();
        let regions: Vec<(usize, usize)> = mem
            .iter()
            .filter_map(|r| {
                let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some((host as usize, r.len() as usize))
            })
            .collect();
        let mib = regions.iter().map(|r| r.1).sum::<usize>() >> 20;
        // SAFETY: guest memory stays mapped while the worker (which owns
        // the ring) runs: a memory change stops the workers first.
        let registered = unsafe { ring.register_memory(&regions) };
        // Once per queue start, and only when asked for: the pinned memory
        // is worth a line in the log.
        match registered {
            Ok(()) => info!(
                queue = self.queue,
                "{mib} MiB of guest memory registered as fixed buffers"
            ),
            Err(e) => warn!(
                queue = self.queue,
                "guest memory ({mib} MiB) not registered as fixed buffers: {e}"
            ),
        }
    }
}

impl Running {
    fn run(&mut self) -> io::Result<()> {
        // What a predecessor left in flight goes first; then whatever the
        // guest queued while nobody listened (its kicks went nowhere).
        let resubmit = std::mem::take(&mut self.w.resubmit);
        if !resubmit.is_empty() {
            debug!(queue = self.w.queue, count = resubmit.len(), "resubmitting");
            self.process_heads(&resubmit)?;
        }
        self.process_queue()?;
        // A predecessor killed between publishing used entries and
        // signalling them leaves the guest waiting for an interrupt that
        // never came; one spurious interrupt costs nothing.
        let _ = self.w.vring.signal_used_queue();
        while !self.stopping {
            if !self.window.get().is_zero() && !self.broken && self.poll()? {
                // More arrived as notifications came back on.
                continue;
            }
            if self.stopping {
                break;
            }
            // Submits what is queued and sleeps until a kick, a
            // completion or the stop; how long that took tells whether
            // polling longer would have paid.
            let slept_from = Instant::now();
            self.ring.wait()?;
            self.window.slept(slept_from.elapsed());
            if self.handle_completions()? {
                self.process_queue()?;
            }
        }
        // Stopping: requests held back by their rate limit run now (a
        // worker started after a memory change must not find them lost),
        // then in-flight I/O lands and is completed first, while the
        // guest memory is still mapped.
        let held = std::mem::take(&mut self.deferred);
        let mem = self.w.mem.memory();
        self.run_heads(&held, &mem, Admit::Unlimited)?;
        self.ring.drain(&self.w.session, &mut self.done);
        self.complete_done();
        self.publish()
    }

    /// Takes what the ring completed: finished requests are answered (and
    /// published), a stop noted. Returns whether the guest kicked.
    fn handle_completions(&mut self) -> io::Result<bool> {
        let events = self.ring.reap(&self.w.session, &mut self.done);
        self.stopping |= events.stop;
        self.complete_done();
        self.publish()?;
        if events.timer && !self.stopping {
            // The budget may be there: what waited goes first.
            let held = std::mem::take(&mut self.deferred);
            let mem = self.w.mem.memory();
            self.run_heads(&held, &mem, Admit::Again)?;
            return Ok(self.deferred.is_empty());
        }
        Ok(events.kick)
    }

    /// Busy-polls the available ring and the io_uring completions while
    /// work keeps coming, with guest kicks off (each kick costs the guest
    /// an exit). Returns whether new requests showed up as notifications
    /// were turned back on.
    fn poll(&mut self) -> io::Result<bool> {
        let event_idx = self.w.event_idx;
        if event_idx {
            let _ = self.w.vring.disable_notification();
        }
        let window = self.window.get();
        let mut idle_since = Instant::now();
        let mem = self.w.mem.memory();
        let mut spins = 0u32;
        loop {
            let mut worked = false;
            if self.ring.has_completions() {
                // A kick is no news while polling (the available ring is
                // looked at below anyway).
                self.handle_completions()?;
                if self.stopping {
                    return Ok(false);
                }
                worked = true;
            }
            if self.deferred.is_empty() && self.avail_pending(&mem) {
                self.pop_and_run(&mem)?;
                worked = true;
            }
            if worked {
                idle_since = Instant::now();
                spins = 0;
            }
            spins = spins.wrapping_add(1);
            // Polling pays where the pipeline is shallow (each request
            // waits on the last: low queue depth). With many requests in
            // flight, completions and kicks batch by themselves, and on a
            // small host a spinning worker takes the CPU the guest and the
            // kernel's I/O workers need.
            // The clock is read every 32 idle turns: reading it costs more
            // than a turn.
            if self.ring.in_flight() > POLL_MAX_IN_FLIGHT
                || (spins.is_multiple_of(32) && idle_since.elapsed() >= window)
            {
                break;
            }
            if !worked {
                std::hint::spin_loop();
            }
        }
        let more = if event_idx {
            self.w.vring.enable_notification().unwrap_or(true)
        } else {
            self.avail_pending(&mem)
        };
        Ok(more)
    }

    fn avail_pending(&mut self, mem: &GuestMemoryMmap) -> bool {
        self.available(mem).is_some_and(|n| n > 0)
    }

    /// Whether the ring is sane (see [`Running::available`]).
    fn ring_sane(&mut self, mem: &GuestMemoryMmap) -> bool {
        self.available(mem).is_some()
    }

    /// How many entries the driver made available that the device has not
    /// taken; `None` once the queue is broken. A ring no driver could have
    /// written (more than a queue's worth ahead, or outside guest memory)
    /// breaks the queue the first time it is seen, in one log line; it is
    /// not read again (no spinning on it, no log per kick).
    fn available(&mut self, mem: &GuestMemoryMmap) -> Option<u16> {
        if self.broken || self.memory_lost() {
            return None;
        }
        let ahead = rings::available(self.w.vring.get_ref().get_queue(), mem);
        match ahead {
            Ok(n) => Some(n),
            Err(why) => self.declare_broken(&why),
        }
    }

    /// Whether the frontend truncated memory this session had mapped (a
    /// fault there was contained, see `memory_fence`). The queue stops
    /// and the session is hung up; the server logs why, once.
    fn memory_lost(&mut self) -> bool {
        if !self.w.session.memory_lost() {
            return false;
        }
        if !self.broken {
            debug!(queue = self.w.queue, "guest memory lost: hanging up");
            self.broken = true;
            self.w.session.hang_up();
        }
        true
    }

    fn declare_broken(&mut self, why: &rings::Broken) -> Option<u16> {
        let queue = self.w.queue;
        self.w.session.peer_caused(|| {
            warn!(
                queue,
                "{why}: the queue is broken and left alone until the driver resets it"
            )
        });
        self.broken = true;
        self.w.broken.set();
        None
    }

    /// Pops every available chain and runs them (their SQEs reach the
    /// kernel `submit_batch` at a time, the rest at the end).
    fn pop_and_run(&mut self, mem: &GuestMemoryMmap) -> io::Result<()> {
        // A throttled queue takes nothing new until what waits has run.
        if !self.deferred.is_empty() || !self.ring_sane(mem) {
            return Ok(());
        }
        let mut heads = std::mem::take(&mut self.heads);
        heads.clear();
        let mut impossible_head = None;
        {
            let mut st = self.w.vring.get_mut();
            let size = st.get_queue().size();
            while let Some(chain) = st.get_queue_mut().pop_descriptor_chain(mem) {
                let head = match rings::head(chain.head_index(), size) {
                    Ok(head) => head,
                    // No used entry can name it: the ring is the
                    // driver's nonsense, not a request to answer.
                    Err(why) => {
                        impossible_head = Some(why);
                        break;
                    }
                };
                if let Some(inf) = &mut self.w.inflight {
                    inf.begin(head);
                }
                // The chain is walked again in run_heads from its head:
                // the descriptor table is the guest's and stays put until
                // the request completes (the same walk serves resubmits).
                heads.push(head);
            }
        }
        let ran = self.run_heads(&heads, mem, Admit::New);
        self.heads = heads;
        ran?;
        if let Some(why) = impossible_head {
            self.declare_broken(&why);
        }
        Ok(())
    }

    /// Pops every available chain, runs them, submits what is left.
    fn process_queue(&mut self) -> io::Result<()> {
        let mem = self.w.mem.memory();
        loop {
            if self.w.event_idx {
                let _ = self.w.vring.disable_notification();
            }
            self.pop_and_run(&mem)?;
            // Throttled: what is left in the ring waits for the timer.
            if self.broken
                || !self.deferred.is_empty()
                || !self.w.event_idx
                || !self.w.vring.enable_notification().unwrap_or(false)
            {
                break;
            }
        }
        Ok(())
    }

    /// Runs heads taken from the inflight region (not from the ring).
    fn process_heads(&mut self, heads: &[u16]) -> io::Result<()> {
        let mem = self.w.mem.memory();
        self.run_heads(heads, &mem, Admit::New)
    }

    /// Runs `heads` in order. Each asks its export's rate limits first
    /// (unless `admit` says not to): the first that must wait is held
    /// back with all after it, and a timer in the ring wakes the worker
    /// when its budget is due.
    fn run_heads(&mut self, heads: &[u16], mem: &GuestMemoryMmap, admit: Admit) -> io::Result<()> {
        if heads.is_empty() {
            return Ok(());
        }
        // Index changes other queues made before the guest queued these.
        self.sub.catch_up();
        let (table, size) = {
            let st = self.w.vring.get_ref();
            let q = st.get_queue();
            (GuestAddress(q.desc_table()), q.size())
        };
        for (i, &head) in heads.iter().enumerate() {
            let walk = ChainWalk::new(mem, table, size, head);
            match self.req.parse_from(walk, mem) {
                Ok(()) => {
                    if admit != Admit::Unlimited {
                        let (ops, bytes) = crate::limits::cost(&self.req);
                        if let Err(wait) = self.w.export.limits.admit(ops, bytes) {
                            let held = &heads[i..];
                            if admit == Admit::New {
                                self.w.export.limits.count_throttled(held.len() as u64);
                            }
                            self.deferred.extend_from_slice(held);
                            self.ring.arm_timer(wait.min(MAX_THROTTLE_WAIT))?;
                            break;
                        }
                    }
                    let req = &self.req;
                    let ring_path = if matches!(req.kind, Kind::In | Kind::Out) {
                        self.w
                            .export
                            .submit_rw(&mut self.ring, &self.sub.view, req, head)
                    } else {
                        None
                    };
                    match ring_path {
                        Some(Some(p)) => {
                            self.done.push(p);
                            self.complete_done();
                        }
                        Some(None) => {}
                        None => {
                            let (s, written) = self.w.export.execute(req, mem);
                            self.failed += u64::from(s != VIRTIO_BLK_S_OK as u8);
                            let _ = mem.write_obj(s, req.status);
                            self.used_push(head, written + 1);
                        }
                    }
                }
                Err((e, status_addr)) => {
                    let queue = self.w.queue;
                    self.w
                        .session
                        .peer_caused(|| warn!(queue, "bad request (head {head}): {e}"));
                    if let Some(a) = status_addr {
                        let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, a);
                    }
                    self.failed += 1;
                    self.used_push(head, 1);
                }
            }
        }
        // What the early submits (`submit_batch`) left of this batch.
        self.ring.submit()?;
        self.publish()
    }

    fn used_push(&mut self, head: u16, len: u32) {
        self.used.push(Done { head, len });
    }

    /// Writes statuses for finished ring requests (in `self.done`) and
    /// queues their used entries; allocating writes go to the map first.
    fn complete_done(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let mem = self.w.mem.memory();
        self.wrote.clear();
        for p in &self.done {
            if let (false, Some((off, len))) = (p.failed, p.wrote) {
                if !self.sub.view.top_owns(off, len) {
                    self.wrote.push((off, len));
                }
            }
        }
        if !self.wrote.is_empty() {
            // Before the guest hears of it: a read it then issues on any
            // queue must find the data in the top.
            self.w.export.note_written(&self.wrote);
        }
        for p in self.done.drain(..) {
            let (status, len) = if p.failed {
                self.failed += 1;
                (VIRTIO_BLK_S_IOERR as u8, 1)
            } else {
                (VIRTIO_BLK_S_OK as u8, p.written + 1)
            };
            let _ = mem.write_obj(status, p.status);
            self.used.push(Done { head: p.head, len });
        }
    }

    /// Puts queued used entries on the ring (each bracketed in the inflight
    /// region) and notifies the guest once if it asked.
    fn publish(&mut self) -> io::Result<()> {
        if self.memory_lost() {
            // The rings may lie in the lost pages: nothing more goes there.
            self.used.clear();
            return Ok(());
        }
        if self.used.is_empty() {
            return Ok(());
        }
        let mut st = self.w.vring.get_mut();
        tracing::trace!(
            queue = self.w.queue,
            count = self.used.len(),
            next_used = st.get_queue().next_used(),
            "publishing"
        );
        self.w
            .export
            .count_requests(self.used.len() as u64, std::mem::take(&mut self.failed));
        for d in self.used.drain(..) {
            if let Some(inf) = &mut self.w.inflight {
                inf.pre_put(d.head);
            }
            if let Err(e) = st.add_used(d.head, d.len) {
                warn!(queue = self.w.queue, "add_used: {e}");
                continue;
            }
            if let Some(inf) = &mut self.w.inflight {
                inf.post_put(d.head, st.get_queue().next_used());
            }
        }
        let notify = st.needs_notification().unwrap_or(true);
        tracing::trace!(
            queue = self.w.queue,
            notify,
            next_used = st.get_queue().next_used(),
            "published"
        );
        if notify {
            st.signal_used_queue()?;
        }
        Ok(())
    }
}
