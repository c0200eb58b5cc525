//! The inflight region's mapping (vhost-user INFLIGHT_SHMFD): created
//! here (GET_INFLIGHT_FD) or handed back by the frontend after a restart
//! (SET_INFLIGHT_FD). Its layout and the protocol that writes and recovers
//! it are `blk_request::inflight`'s, shared with the vmm.

use std::fs::File;
use std::io;
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

use blk_request::inflight::{per_queue_bytes, QueueCells};

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
        (q < self.num_queues).then(|| {
            let cells = MappedCells {
                // SAFETY: inside the mapping: q < num_queues parts of
                // per_queue bytes each were mapped.
                base: unsafe { self.map.as_mut_ptr().add(q as usize * self.per_queue) },
                len: self.per_queue,
                _region: Arc::clone(self),
            };
            InflightQueue::new(cells, self.queue_size)
        })
    }
}

/// One queue's part of the mapped region. Accesses are volatile: the
/// memory is shared with the frontend and outlives this process.
pub struct MappedCells {
    base: *mut u8,
    len: usize,
    /// Keeps the mapping alive.
    _region: Arc<InflightRegion>,
}

// SAFETY: the pointer targets a shared mapping the Arc keeps alive; only
// the one worker that owns this value accesses its queue's part.
unsafe impl Send for MappedCells {}

impl MappedCells {
    fn at<T>(&self, off: usize) -> Option<*mut T> {
        (off + std::mem::size_of::<T>() <= self.len)
            // SAFETY: inside this queue's part (checked just above).
            .then(|| unsafe { self.base.add(off) as *mut T })
    }
    fn load<T: Copy + Default>(&self, off: usize) -> T {
        // SAFETY: inside the part (see `at`); aligned: fields sit at their
        // natural alignment in a page-aligned, 64-byte-aligned part.
        self.at::<T>(off)
            .map_or_else(T::default, |p| unsafe { std::ptr::read_volatile(p) })
    }
    fn store<T: Copy>(&mut self, off: usize, v: T) {
        if let Some(p) = self.at::<T>(off) {
            // SAFETY: as for `load`.
            unsafe { std::ptr::write_volatile(p, v) }
        }
    }
}

impl QueueCells for MappedCells {
    fn load_u8(&self, off: usize) -> u8 {
        self.load(off)
    }
    fn load_u16(&self, off: usize) -> u16 {
        u16::from_le(self.load(off))
    }
    fn load_u64(&self, off: usize) -> u64 {
        u64::from_le(self.load(off))
    }
    fn store_u8(&mut self, off: usize, v: u8) {
        self.store(off, v)
    }
    fn store_u16(&mut self, off: usize, v: u16) {
        self.store(off, v.to_le())
    }
    fn store_u64(&mut self, off: usize, v: u64) {
        self.store(off, v.to_le())
    }
}

/// A worker's queue part, kept by the shared protocol.
pub type InflightQueue = blk_request::inflight::InflightQueue<MappedCells>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol itself is tested in blk_request; here: what one
    /// mapping wrote, a region reopened from the frontend's descriptor
    /// reads back (as a restarted backend does).
    #[test]
    fn a_reopened_region_recovers_what_the_first_mapping_wrote() {
        let region = Arc::new(InflightRegion::create(2, 8).expect("create"));
        let mut q = region.queue(1).expect("queue 1");
        q.recover(0);
        for h in [5, 2] {
            q.begin(h);
        }
        drop(q);
        let (msg, file) = region.reply().expect("reply");
        let again = Arc::new(InflightRegion::open(file, &msg, 2, 256).expect("open"));
        let r = again.queue(1).expect("queue 1").recover(0);
        assert_eq!((r.resubmit, r.next_avail), (vec![5, 2], Some(2)));
        assert_eq!(again.queue(0).expect("q0").recover(9).next_avail, None);
        assert!(again.queue(2).is_none());
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
