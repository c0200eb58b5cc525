//! The inflight region (vhost-user INFLIGHT_SHMFD): shared memory the
//! frontend keeps across backend restarts, recording which requests this
//! backend fetched and has not completed yet.
//!
//! The frontend only stores the region; its layout is the backend's. Ours
//! follows libvhost-user's split-ring layout so that the reasoning carries
//! over. Per queue, 64-byte aligned:
//!
//! ```text
//!   0  features u64 (0)    8  version u16 (0 = never used, reset)
//!  10  desc_num u16        12 last_batch_head u16    14 used_idx u16
//!  16  desc_num x { inflight u8, padding [5], next u16, counter u64 }
//! ```
//!
//! Protocol: fetching head `h` sets its counter (fetch order) and then its
//! inflight flag; completing it records `h` as the last head put, writes
//! the used element and index, clears the flag and stores the used index.
//! A successor reading the region after a crash finds the fetched but
//! uncompleted heads (flag set), repairs the one put whose used index
//! update it sees but whose flag it does not (`used_idx` differs), and
//! resubmits the rest in fetch order; the available ring resumes at
//! `used_idx + in flight`, because heads are fetched in ring order and each
//! is marked before the next is fetched.

use std::fs::File;
use std::io;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use thiserror::Error;
use vhost::vhost_user::message::VhostUserInflight;

/// Why a frontend's inflight region (SET_INFLIGHT_FD) is refused.
#[derive(Debug, Error)]
pub enum InflightError {
    #[error(
        "inflight region for {queues} queues of {size} (this export: up to {max_queues} of {max_size})"
    )]
    Shape {
        queues: u16,
        size: u16,
        max_queues: u16,
        max_size: u16,
    },
    #[error("inflight region of {given} bytes, {need} needed")]
    TooSmall { given: u64, need: u64 },
    #[error("inflight region at {offset}+{need} past the end of its {len}-byte file")]
    PastEnd { offset: u64, need: u64, len: u64 },
    #[error("inflight region: {0}")]
    Io(io::Error),
}

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;

pub struct InflightRegion {
    file: File,
    map: MmapRaw,
    num_queues: u16,
    queue_size: u16,
    per_queue: usize,
    mmap_size: u64,
    mmap_offset: u64,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

/// Bytes one queue of `queue_size` descriptors takes.
pub fn per_queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * queue_size as usize).div_ceil(ALIGN) * ALIGN
}

impl InflightRegion {
    /// A fresh, zeroed region (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<InflightRegion> {
        let per_queue = per_queue_bytes(queue_size);
        let size = per_queue * num_queues as usize;
        let name = c"blk-backend-inflight";
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just created and own alone.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        Self::map(file, num_queues, queue_size, size as u64, 0)
    }

    /// A region the frontend hands back (SET_INFLIGHT_FD), maybe written
    /// by a previous backend process.
    pub fn open(
        file: File,
        msg: &VhostUserInflight,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let (nq, qs) = (msg.num_queues, msg.queue_size);
        if nq == 0 || nq > max_queues || qs == 0 || qs > max_queue_size {
            return Err(InflightError::Shape {
                queues: nq,
                size: qs,
                max_queues,
                max_size: max_queue_size,
            });
        }
        let need = (per_queue_bytes(qs) * nq as usize) as u64;
        if msg.mmap_size < need {
            return Err(InflightError::TooSmall {
                given: msg.mmap_size,
                need,
            });
        }
        let len = file.metadata().map_err(InflightError::Io)?.len();
        if msg
            .mmap_offset
            .checked_add(need)
            .is_none_or(|end| end > len)
        {
            return Err(InflightError::PastEnd {
                offset: msg.mmap_offset,
                need,
                len,
            });
        }
        Self::map(file, nq, qs, msg.mmap_size, msg.mmap_offset).map_err(InflightError::Io)
    }

    /// Where the region is mapped in this process, and its length.
    pub fn mapping(&self) -> (*const u8, usize) {
        (self.map.as_ptr(), self.map.len())
    }

    fn map(
        file: File,
        num_queues: u16,
        queue_size: u16,
        mmap_size: u64,
        mmap_offset: u64,
    ) -> io::Result<InflightRegion> {
        let per_queue = per_queue_bytes(queue_size);
        let map = MmapOptions::new()
            .offset(mmap_offset)
            .len(per_queue * num_queues as usize)
            .map_raw(&file)?;
        Ok(InflightRegion {
            file,
            map,
            num_queues,
            queue_size,
            per_queue,
            mmap_size,
            mmap_offset,
        })
    }

    /// The GET_INFLIGHT_FD reply and the descriptor to send with it.
    pub fn reply(&self) -> io::Result<(VhostUserInflight, File)> {
        Ok((
            VhostUserInflight {
                mmap_size: self.mmap_size,
                mmap_offset: self.mmap_offset,
                num_queues: self.num_queues,
                queue_size: self.queue_size,
            },
            self.file.try_clone()?,
        ))
    }

    /// Queue `q`'s part, for the worker that serves it.
    pub fn queue(self: &Arc<Self>, q: u16) -> Option<InflightQueue> {
        (q < self.num_queues).then(|| InflightQueue {
            // SAFETY: inside the mapping: q < num_queues.
            base: unsafe { self.map.as_mut_ptr().add(q as usize * self.per_queue) },
            desc_num: self.queue_size,
            counter: 0,
            _region: Arc::clone(self),
        })
    }
}

/// What a worker does about the requests a predecessor left in flight.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Where the available ring resumes (`None`: as the frontend said).
    pub next_avail: Option<u16>,
    /// Heads to run again, oldest fetch first.
    pub resubmit: Vec<u16>,
}

/// One queue's part of the region. Accesses are volatile: the memory is
/// shared with the frontend and outlives this process.
pub struct InflightQueue {
    base: *mut u8,
    desc_num: u16,
    counter: u64,
    /// Keeps the mapping alive.
    _region: Arc<InflightRegion>,
}

// SAFETY: the pointer targets a shared mapping the Arc keeps alive; only
// the one worker that owns this value accesses its queue's part.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn at<T>(&self, off: usize) -> *mut T {
        // SAFETY: callers pass offsets inside this queue's part
        // (header fields, or a descriptor index checked against desc_num).
        unsafe { self.base.add(off) as *mut T }
    }
    fn get<T: Copy>(&self, off: usize) -> T {
        // SAFETY: see `at`; aligned: fields sit at their natural alignment
        // in a page-aligned, 64-byte-aligned part.
        unsafe { std::ptr::read_volatile(self.at(off)) }
    }
    fn put<T: Copy>(&self, off: usize, v: T) {
        // SAFETY: as for `get`.
        unsafe { std::ptr::write_volatile(self.at(off), v) }
    }
    fn desc(h: u16) -> usize {
        HEADER + DESC * h as usize
    }

    /// Makes sense of the region when the queue starts, given the used
    /// index the guest's ring holds now.
    pub fn recover(&mut self, used_idx: u16) -> Recovery {
        if self.get::<u16>(8) != VERSION || self.get::<u16>(10) != self.desc_num {
            // Never used, or reset by the frontend: start clean.
            for h in 0..self.desc_num {
                self.put::<u8>(Self::desc(h), 0);
                self.put::<u64>(Self::desc(h) + 8, 0);
            }
            self.put::<u16>(10, self.desc_num);
            self.put::<u16>(14, used_idx);
            fence(Ordering::SeqCst);
            self.put::<u16>(8, VERSION);
            self.counter = 0;
            return Recovery {
                next_avail: None,
                resubmit: Vec::new(),
            };
        }
        if self.get::<u16>(14) != used_idx {
            // Died between publishing a used element and clearing its flag.
            let last = self.get::<u16>(12);
            if last < self.desc_num {
                self.put::<u8>(Self::desc(last), 0);
            }
            fence(Ordering::SeqCst);
            self.put::<u16>(14, used_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.get::<u8>(Self::desc(h)) == 1)
            .map(|h| (self.get::<u64>(Self::desc(h) + 8), h))
            .collect();
        inflight.sort_unstable();
        self.counter = inflight.last().map_or(0, |&(c, _)| c);
        Recovery {
            next_avail: Some(used_idx.wrapping_add(inflight.len() as u16)),
            resubmit: inflight.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// Head `h` was fetched from the available ring.
    pub fn begin(&mut self, h: u16) {
        if h >= self.desc_num {
            return;
        }
        self.counter += 1;
        self.put::<u64>(Self::desc(h) + 8, self.counter);
        fence(Ordering::SeqCst);
        self.put::<u8>(Self::desc(h), 1);
    }

    /// Before head `h`'s used element is written.
    pub fn pre_put(&self, h: u16) {
        if h < self.desc_num {
            self.put::<u16>(12, h);
            fence(Ordering::SeqCst);
        }
    }

    /// After head `h`'s used element and the used index (now `used_idx`)
    /// are written.
    pub fn post_put(&self, h: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if h < self.desc_num {
            self.put::<u8>(Self::desc(h), 0);
        }
        fence(Ordering::SeqCst);
        self.put::<u16>(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_resubmits_what_was_in_flight_in_fetch_order() {
        let region = Arc::new(InflightRegion::create(2, 8).expect("create"));
        let mut q = region.queue(1).expect("queue 1");
        assert_eq!(q.recover(0).resubmit, Vec::<u16>::new());
        for h in [5, 2, 7, 0] {
            q.begin(h);
        }
        // 2 completes (used idx 1), then 7's used element lands but the
        // process dies before clearing its flag.
        q.pre_put(2);
        q.post_put(2, 1);
        q.pre_put(7);
        drop(q);

        let (msg, file) = region.reply().expect("reply");
        let again = Arc::new(InflightRegion::open(file, &msg, 2, 256).expect("open"));
        let mut q = again.queue(1).expect("queue 1");
        let r = q.recover(2);
        assert_eq!(r.resubmit, vec![5, 0]);
        assert_eq!(r.next_avail, Some(4));
        // New fetches continue the order.
        q.begin(3);
        drop(q);
        let mut q = again.queue(1).expect("queue 1");
        assert_eq!(q.recover(2).resubmit, vec![5, 0, 3]);
        // Queue 0 was never used.
        assert_eq!(again.queue(0).expect("q0").recover(9).next_avail, None);
    }

    #[test]
    fn regions_that_do_not_fit_are_refused() {
        let region = InflightRegion::create(1, 8).expect("create");
        let (mut msg, file) = region.reply().expect("reply");
        msg.mmap_size = 16;
        assert!(InflightRegion::open(file, &msg, 1, 256).is_err());
        let (mut msg, file) = region.reply().expect("reply");
        msg.num_queues = 4;
        assert!(InflightRegion::open(file, &msg, 2, 256).is_err());
        let (mut msg, file) = region.reply().expect("reply");
        msg.mmap_offset = 4096;
        assert!(InflightRegion::open(file, &msg, 2, 256).is_err());
    }
}
