//! What a disk does when its backend is gone for good: the vmm itself
//! completes every request with VIRTIO_BLK_S_IOERR, so the guest sees I/O
//! errors instead of requests that never finish.
//!
//! Which requests the dead backend had fetched comes from the inflight
//! region, read and recovered by the same code blk-backend writes it with
//! (`blk_request::inflight`, the layout libvhost-user defined and
//! qemu-storage-daemon uses too); each request's status byte is found by
//! the same chain walk and parser blk-backend serves requests with. Those
//! are failed first, then everything the guest makes available after them,
//! as long as the VM lives.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};

use tracing::{info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use blk_request::inflight::{queue_part, InflightQueue};
use blk_request::{status, used_len, ChainWalk, Request};

use super::virtio_pci::QueueConfig;

/// One queue the vmm now answers.
pub struct FailedQueue {
    pub config: QueueConfig,
    pub kick: EventFd,
    pub call: EventFd,
    next_avail: u16,
    next_used: u16,
}

/// Recovers queue `q`'s part of a dead backend's inflight region: the
/// heads in flight (in fetch order) and where the available ring resumes.
fn inflight_heads(region: &[u8], q: usize, queue_size: u16, used_idx: u16) -> (Vec<u16>, u16) {
    let Some(part) = region.get(queue_part(q, queue_size)) else {
        return (Vec::new(), used_idx);
    };
    let recovery = InflightQueue::new(part.to_vec(), queue_size).recover(used_idx);
    (recovery.resubmit, recovery.next_avail.unwrap_or(used_idx))
}

impl FailedQueue {
    /// Takes a queue over from a dead backend; returns it and the heads
    /// that backend had in flight.
    pub fn take_over(
        mem: &GuestMemoryMmap,
        q: usize,
        config: QueueConfig,
        kick: EventFd,
        call: EventFd,
        inflight: Option<&(vhost::vhost_user::message::VhostUserInflight, File)>,
    ) -> (FailedQueue, Vec<u16>) {
        let used_idx: u16 = mem.read_obj(GuestAddress(config.used + 2)).unwrap_or(0);
        let (heads, next_avail) = match inflight.and_then(|(info, f)| map_region(info, f)) {
            Some(region) => inflight_heads(&region, q, config.size, used_idx),
            None => (Vec::new(), used_idx),
        };
        (
            FailedQueue {
                config,
                kick,
                call,
                next_avail,
                next_used: used_idx,
            },
            heads,
        )
    }

    /// Writes IOERR into the request's status byte, wherever the parser
    /// blk-backend uses finds it (a chain with no place for a status gets
    /// none).
    fn fail_head(&self, mem: &GuestMemoryMmap, head: u16) {
        let walk = ChainWalk::new(mem, GuestAddress(self.config.desc), self.config.size, head);
        let at = match Request::parse(walk, mem) {
            Ok(req) => Some(req.status),
            Err((_, status)) => status,
        };
        if let Some(at) = at {
            let _ = mem.write_obj(status::IOERR, at);
        }
    }

    /// Completes `head` (used length 1: the status byte).
    fn put_used(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.next_used % self.config.size;
        let e = GuestAddress(self.config.used + 4 + 8 * slot as u64);
        let _ = mem.write_obj(head as u32, e);
        let _ = mem.write_obj(used_len(0), GuestAddress(e.0 + 4));
        self.next_used = self.next_used.wrapping_add(1);
        fence(Ordering::Release);
        let _ = mem.write_obj(self.next_used, GuestAddress(self.config.used + 2));
    }

    /// Fails `heads` and everything newly available; interrupts the guest.
    fn fail_all(&mut self, mem: &GuestMemoryMmap, heads: &[u16]) -> usize {
        let mut n = 0;
        for &h in heads {
            self.fail_head(mem, h);
            self.put_used(mem, h);
            n += 1;
        }
        loop {
            fence(Ordering::Acquire);
            let avail_idx: u16 = mem
                .read_obj(GuestAddress(self.config.avail + 2))
                .unwrap_or(self.next_avail);
            if avail_idx == self.next_avail {
                // Ask for a kick at the next request (event index: the
                // dead backend's avail_event may be far behind, and a
                // driver honouring it would never kick again), then look
                // once more for one that raced with the store.
                let avail_event = GuestAddress(self.config.used + 4 + 8 * self.config.size as u64);
                let _ = mem.write_obj(self.next_avail, avail_event);
                fence(Ordering::SeqCst);
                let again: u16 = mem
                    .read_obj(GuestAddress(self.config.avail + 2))
                    .unwrap_or(self.next_avail);
                if again == self.next_avail {
                    break;
                }
                continue;
            }
            let slot = self.next_avail % self.config.size;
            let head: u16 = mem
                .read_obj(GuestAddress(self.config.avail + 4 + 2 * slot as u64))
                .unwrap_or(u16::MAX);
            self.next_avail = self.next_avail.wrapping_add(1);
            if head < self.config.size {
                self.fail_head(mem, head);
                self.put_used(mem, head);
                n += 1;
            }
        }
        if n > 0 {
            let _ = self.call.write(1);
        }
        n
    }
}

fn map_region(info: &vhost::vhost_user::message::VhostUserInflight, f: &File) -> Option<Vec<u8>> {
    let len = usize::try_from(info.mmap_size).ok()?;
    let mut buf = vec![0u8; len];
    // A copy is enough: the dead backend writes no more.
    use std::os::unix::fs::FileExt;
    f.read_exact_at(&mut buf, info.mmap_offset).ok()?;
    Some(buf)
}

/// Serves `queues` with I/O errors until the process ends.
pub fn serve(mem: GuestMemoryMmap, mut queues: Vec<(FailedQueue, Vec<u16>)>, name: String) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            warn!(disk = %name, "cannot fail requests: {e}");
            return;
        }
    };
    let mut total = 0;
    for (k, (q, heads)) in queues.iter_mut().enumerate() {
        total += q.fail_all(&mem, heads);
        heads.clear();
        let _ = epoll.ctl(
            ControlOperation::Add,
            q.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, k as u64),
        );
    }
    info!(disk = %name, failed = total, "the backend is gone: requests now fail with IOERR");
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for ev in &events[..n] {
            if let Some((q, _)) = queues.get_mut(ev.data() as usize) {
                let _ = q.kick.read();
                q.fail_all(&mem, &[]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_heads_come_out_in_fetch_order_from_the_shared_layout() {
        // Queue 1 of two queues of 8 (per queue: 16 + 128 -> 192 bytes),
        // written by hand from the layout's description.
        let mut r = vec![0u8; 384];
        let q1 = 192;
        r[q1 + 8] = 1; // version
        r[q1 + 10] = 8; // descriptors
        r[q1 + 14] = 40; // used index
        for (h, counter) in [(5u16, 3u64), (2, 1), (7, 2)] {
            let o = q1 + 16 + 16 * h as usize;
            r[o] = 1;
            r[o + 8..o + 16].copy_from_slice(&counter.to_le_bytes());
        }
        let (heads, next) = inflight_heads(&r, 1, 8, 40);
        assert_eq!(heads, [2, 7, 5]);
        assert_eq!(next, 43);
        // A never-used queue has nothing in flight.
        assert_eq!(inflight_heads(&r, 0, 8, 9), (vec![], 9));
    }
}
