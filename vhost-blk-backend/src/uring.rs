//! The hot path: one io_uring per queue. Every request a kick makes
//! available is turned into reads and writes straight between the layer
//! files and guest memory, submitted in one batch; completions arrive on the
//! ring's eventfd in the same worker thread's event loop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::connection::Session;

/// A request waiting for its I/Os.
#[derive(Debug, Clone)]
pub struct Pending {
    pub head: u16,
    pub status: GuestAddress,
    /// Bytes the device writes into guest memory (reads), for the used length.
    pub written: u32,
    /// I/Os still outstanding.
    pub remaining: u32,
    pub failed: bool,
    /// Whole blocks written to the top, to note in the map once done.
    pub wrote: Option<(u64, u64)>,
}

/// One queue's ring and the requests in flight on it.
pub struct QueueRing {
    ring: IoUring,
    eventfd: EventFd,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// SQEs pushed since the last submit.
    unsubmitted: u32,
}

impl QueueRing {
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::new(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(QueueRing {
            ring,
            eventfd,
            pending: Vec::new(),
            free: Vec::new(),
            unsubmitted: 0,
        })
    }

    /// The descriptor the worker's event loop waits on.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len() - self.free.len()
    }

    /// Registers a request; returns its slot (the SQEs' user data).
    pub fn add(&mut self, p: Pending) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.pending[i] = Some(p);
                i
            }
            None => {
                self.pending.push(Some(p));
                self.pending.len() - 1
            }
        }
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Pending> {
        self.pending.get_mut(slot).and_then(|p| p.as_mut())
    }

    /// Queues a read or write of `len` bytes between `fd` at `offset` and
    /// the host address `buf` (guest memory).
    ///
    /// # Safety
    /// `buf..buf+len` must stay mapped and untouched by others until the
    /// completion for `slot` arrives (guest memory of an in-flight request).
    pub unsafe fn push_rw(
        &mut self,
        write: bool,
        fd: RawFd,
        buf: *mut u8,
        len: u32,
        offset: u64,
        slot: usize,
    ) -> io::Result<()> {
        let sqe = if write {
            opcode::Write::new(types::Fd(fd), buf, len)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(types::Fd(fd), buf, len)
                .offset(offset)
                .build()
        }
        // The length rides along so a short transfer counts as a failure.
        .user_data(slot as u64 | (len as u64) << 32);
        loop {
            // SAFETY: the buffer contract is the caller's (above).
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Full: hand what is queued to the kernel and retry.
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
    }

    /// Submits everything queued, in one system call.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Clears the completion eventfd (after epoll reported it).
    pub fn clear_eventfd(&self) {
        let _ = self.eventfd.read();
    }

    /// Whether completions wait to be reaped (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Whether the kernel signals the eventfd on completions; off while the
    /// worker polls the ring itself.
    pub fn set_eventfd_enabled(&mut self, on: bool) {
        let cq = self.ring.completion();
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    /// Collects completions; returns the requests that finished. A guest
    /// can make I/O fail at will (buffers in memory it took away): failures
    /// are logged within the session's limit.
    pub fn reap(&mut self, session: &Session) -> Vec<Pending> {
        let mut done = Vec::new();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (data, res) in cqes {
            let (slot, len) = ((data & 0xffff_ffff) as usize, (data >> 32) as i64);
            let Some(p) = self.pending.get_mut(slot).and_then(|p| p.as_mut()) else {
                continue;
            };
            if res < 0 {
                p.failed = true;
                session.peer_caused(|| {
                    tracing::warn!("I/O failed: {}", io::Error::from_raw_os_error(-res))
                });
            } else if res as i64 != len {
                p.failed = true;
                session.peer_caused(|| tracing::warn!("short transfer: {res} of {len} bytes"));
            }
            p.remaining -= 1;
            if p.remaining == 0 {
                if let Some(p) = self.pending[slot].take() {
                    done.push(p);
                }
                self.free.push(slot);
            }
        }
        done
    }

    /// Retires a request that needed no kernel I/O (completed by the caller).
    pub fn finish_now(&mut self, slot: usize) {
        if self.pending.get_mut(slot).and_then(|p| p.take()).is_some() {
            self.free.push(slot);
        }
    }

    /// Waits for every request in flight (before guest memory goes away).
    pub fn drain(&mut self, session: &Session) -> Vec<Pending> {
        let mut all = Vec::new();
        while self.in_flight() > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.clear_eventfd();
            all.extend(self.reap(session));
        }
        all
    }
}
