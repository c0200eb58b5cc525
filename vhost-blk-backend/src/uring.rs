//! The hot path: one io_uring per queue, which is also its worker's only
//! wait. Every request a kick makes available is turned into reads and
//! writes straight between the layer files and guest memory, handed to the
//! kernel a few SQEs at a time as they are made (`submit_batch`) and the
//! rest at the end of the batch; the kick itself (a multishot poll of the kick eventfd: one
//! completion per kick, the eventfd never read, its count of no interest),
//! the worker's stop and every I/O complete on the same ring, and one
//! `io_uring_enter` submits a batch and sleeps until the next of them.
//! The ring has a single issuer with deferred task work: completions are
//! posted when the worker asks for them, not by interrupting it.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};
use vm_memory::GuestAddress;

use vhost_user_session::Session;

/// User data of the kick and stop polls (no request slot comes near).
const KICK: u64 = u64::MAX;
const STOP: u64 = u64::MAX - 1;
/// The rate limiter's timer (a throttled queue's wake-up).
const TIMER: u64 = u64::MAX - 2;

/// What [`QueueRing::reap`] saw besides I/O completions.
#[derive(Debug, Default, Clone, Copy)]
pub struct Events {
    /// The guest kicked the queue.
    pub kick: bool,
    /// The worker is asked to stop.
    pub stop: bool,
    /// The timer `arm_timer` set went off.
    pub timer: bool,
}

/// A layer file as the ring names it: its descriptor, and its slot in the
/// ring's table of registered files (used once the table is registered:
/// the kernel then takes no reference on the file per I/O).
#[derive(Debug, Clone, Copy)]
pub struct RingFile {
    pub fd: RawFd,
    pub slot: u32,
}

/// Largest buffer the kernel registers in one piece.
const MAX_FIXED_BUFFER: usize = 1 << 30;

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

/// A read or write SQE of `len` bytes at `offset` between the file `$fd`
/// names (a descriptor or a registered slot) and `buf`, through registered
/// buffer `fixed` if given.
macro_rules! rw_sqe {
    ($write:expr, $fd:expr, $buf:expr, $len:expr, $offset:expr, $fixed:expr) => {
        match ($write, $fixed) {
            (true, Some(i)) => opcode::WriteFixed::new($fd, $buf, $len, i)
                .offset($offset)
                .build(),
            (false, Some(i)) => opcode::ReadFixed::new($fd, $buf, $len, i)
                .offset($offset)
                .build(),
            (true, None) => opcode::Write::new($fd, $buf, $len).offset($offset).build(),
            (false, None) => opcode::Read::new($fd, $buf, $len).offset($offset).build(),
        }
    };
}

/// One queue's ring and the requests in flight on it.
pub struct QueueRing {
    ring: IoUring,
    /// Made disabled, to be enabled by the thread that submits (a
    /// single-issuer ring belongs to the task that enables it).
    disabled: bool,
    /// Completions wait for the worker to ask (deferred task work): a
    /// poller looks at the ring's task-run flag to know when to.
    deferred: bool,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// SQEs pushed since the last submit.
    unsubmitted: u32,
    /// Submit once this many are pushed (0: only when asked).
    submit_batch: u32,
    /// The kick and stop eventfds the ring polls.
    kick: Option<RawFd>,
    stop: Option<RawFd>,
    /// Whether the layer files are registered (see [`RingFile`]).
    fixed_files: bool,
    /// Guest memory registered as fixed buffers, as (host address,
    /// length) pieces in table order: I/O into them skips pinning the
    /// pages per request.
    fixed_buffers: Vec<(usize, usize)>,
    /// The armed timer's time, kept until it fires, if one is armed.
    timer: Option<Box<types::Timespec>>,
}

impl QueueRing {
    /// A ring for about `entries` I/Os at once. Made in the thread that
    /// starts the worker (errors are its to report) and enabled by the
    /// worker in [`QueueRing::start`]. A kernel without single-issuer
    /// rings and deferred task work (before 6.1) gets a plain ring.
    pub fn new(entries: u32) -> io::Result<Self> {
        let cq = entries.saturating_mul(2);
        let (ring, deferred) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_r_disabled()
            .setup_cqsize(cq)
            .build(entries)
        {
            Ok(r) => (r, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (IoUring::builder().setup_cqsize(cq).build(entries)?, false)
            }
            Err(e) => return Err(e),
        };
        Ok(QueueRing {
            ring,
            disabled: deferred,
            deferred,
            pending: Vec::new(),
            free: Vec::new(),
            unsubmitted: 0,
            submit_batch: 0,
            kick: None,
            stop: None,
            fixed_files: false,
            fixed_buffers: Vec::new(),
            timer: None,
        })
    }

    /// Hands the kernel what is queued as soon as `n` SQEs are (0: only
    /// at [`QueueRing::submit`] and [`QueueRing::wait`]). SQEs, not
    /// requests: a request in several pieces makes several.
    pub fn set_submit_batch(&mut self, n: u32) {
        self.submit_batch = n;
    }

    /// Registers the files I/O goes to, in [`RingFile::slot`] order. In
    /// the worker, after [`QueueRing::start`] (a single-issuer ring takes
    /// registrations from its issuer only). On failure (a kernel or a
    /// limit that refuses) I/O names the files by descriptor as before.
    pub fn register_files(&mut self, fds: &[RawFd]) -> io::Result<()> {
        self.ring.submitter().register_files(fds)?;
        self.fixed_files = true;
        Ok(())
    }

    /// Registers guest memory, `(host address, length)` per region, as
    /// fixed buffers (pieces of at most 1 GiB, the kernel's limit). This
    /// pins every page of it for the ring's life, faulting in pages the
    /// guest never touched. On failure nothing is registered.
    ///
    /// # Safety
    /// The regions must stay mapped for as long as the ring lives (guest
    /// memory of the worker that owns the ring).
    pub unsafe fn register_memory(&mut self, regions: &[(usize, usize)]) -> io::Result<()> {
        let mut pieces = Vec::new();
        for &(start, len) in regions {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(MAX_FIXED_BUFFER);
                pieces.push((start + at, n));
                at += n;
            }
        }
        if pieces.len() > usize::from(u16::MAX) {
            return Err(io::Error::other(
                "too many memory regions for the buffer table",
            ));
        }
        let iovecs: Vec<libc::iovec> = pieces
            .iter()
            .map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: the caller keeps the regions mapped while the ring lives.
        unsafe { self.ring.submitter().register_buffers(&iovecs)? };
        self.fixed_buffers = pieces;
        Ok(())
    }

    /// The registered buffer holding `buf..buf+len` whole, if any.
    #[inline]
    fn fixed_buffer(&self, buf: *mut u8, len: u32) -> Option<u16> {
        let (b, e) = (buf as usize, buf as usize + len as usize);
        self.fixed_buffers
            .iter()
            .position(|&(start, n)| start <= b && e <= start + n)
            .map(|i| i as u16)
    }

    /// In the worker's thread, before its first submission: enables the
    /// ring (making this thread its issuer) and arms the polls of the
    /// queue's kick eventfd (if the frontend gave one) and of `stop`.
    pub fn start(&mut self, kick: Option<RawFd>, stop: RawFd) -> io::Result<()> {
        if self.disabled {
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        self.kick = kick;
        self.stop = Some(stop);
        if kick.is_some() {
            self.arm(KICK)?;
        }
        self.arm(STOP)?;
        // Handed over now, while the descriptors are surely the queue's.
        self.submit()
    }

    /// Polls the kick eventfd (multishot: a completion per kick; the
    /// eventfd is not read, as a read of its nonblocking file would not
    /// wait) or the stop eventfd (once).
    fn arm(&mut self, tag: u64) -> io::Result<()> {
        let (fd, multi) = match tag {
            KICK => (self.kick, true),
            _ => (self.stop, false),
        };
        let Some(fd) = fd else {
            return Ok(());
        };
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(multi)
            .build()
            .user_data(tag);
        // SAFETY: a poll points at no memory.
        unsafe { self.push(&sqe) }
    }

    /// Arms a timer that wakes the worker's wait after `after` (a
    /// throttled queue's: it waits inside the ring, spinning nowhere); a
    /// timer already armed is left as it is.
    pub fn arm_timer(&mut self, after: std::time::Duration) -> io::Result<()> {
        if self.timer.is_some() {
            return Ok(());
        }
        let ts = Box::new(
            types::Timespec::new()
                .sec(after.as_secs())
                .nsec(after.subsec_nanos()),
        );
        let sqe = opcode::Timeout::new(&*ts).build().user_data(TIMER);
        self.timer = Some(ts);
        // SAFETY: the timespec is boxed in `self.timer` until the timer's
        // completion is reaped.
        unsafe { self.push(&sqe) }
    }

    /// Queues an SQE, handing the queue to the kernel first if it is full.
    ///
    /// # Safety
    /// What the SQE points at must stay valid until it completes.
    unsafe fn push(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller's.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.unsubmitted += 1;
                if self.submit_batch > 0 && self.unsubmitted >= self.submit_batch {
                    // The SQE is queued whatever this says: one the kernel
                    // could not take now goes with the next submit (an
                    // error here would fail a request still on the ring).
                    let _ = self.submit();
                }
                return Ok(());
            }
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
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

    /// Queues a read or write of `len` bytes between `file` at `offset`
    /// and the host address `buf` (guest memory), through the registered
    /// file and buffer tables where they hold them.
    ///
    /// # Safety
    /// `buf..buf+len` must stay mapped and untouched by others until the
    /// completion for `slot` arrives (guest memory of an in-flight request).
    pub unsafe fn push_rw(
        &mut self,
        write: bool,
        file: RingFile,
        buf: *mut u8,
        len: u32,
        offset: u64,
        slot: usize,
    ) -> io::Result<()> {
        let fixed = self.fixed_buffer(buf, len);
        let sqe = if self.fixed_files {
            rw_sqe!(write, types::Fixed(file.slot), buf, len, offset, fixed)
        } else {
            rw_sqe!(write, types::Fd(file.fd), buf, len, offset, fixed)
        }
        // The length rides along so a short transfer counts as a failure.
        .user_data(slot as u64 | (len as u64) << 32);
        // SAFETY: the buffer contract is the caller's (above).
        unsafe { self.push(&sqe) }
    }

    /// Does a read or write of `len` bytes between `fd` at `offset` and
    /// `buf` now, in this thread (for files in memory, where a copy never
    /// waits on a device and the ring would hand it to a kernel thread).
    /// A short transfer is an error, as on the ring.
    ///
    /// # Safety
    /// `buf..buf+len` must be mapped and not in use by others for the
    /// call (guest memory of a request the worker holds).
    pub unsafe fn rw_now(
        write: bool,
        fd: RawFd,
        buf: *mut u8,
        len: u32,
        offset: u64,
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < len as usize {
            let at = offset + done as u64;
            let rest = len as usize - done;
            // SAFETY: inside the caller's buffer (done < len), whose
            // contract the caller keeps; the kernel copies at most `rest`.
            let n = unsafe {
                if write {
                    libc::pwrite(fd, buf.add(done).cast(), rest, at as libc::off_t)
                } else {
                    libc::pread(fd, buf.add(done).cast(), rest, at as libc::off_t)
                }
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short transfer: {done} of {len} bytes"),
                    ))
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Submits everything queued, in one system call.
    pub fn submit(&mut self) -> io::Result<()> {
        // The queue itself says: a submit that took only part of it (or
        // failed) leaves entries the count no longer names.
        if self.unsubmitted > 0 || !self.ring.submission().is_empty() {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Submits everything queued and sleeps until something completes (a
    /// kick, a stop, an I/O), in one system call.
    pub fn wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether completions wait to be reaped. With deferred task work the
    /// kernel holds them until asked: the ring's flag says so without a
    /// system call, and only then is one made.
    pub fn has_completions(&mut self) -> bool {
        if self.deferred && self.ring.submission().taskrun() {
            let _ = self.ring.submit();
            self.unsubmitted = 0;
        }
        !self.ring.completion().is_empty()
    }

    /// Collects completions: requests that finished go to `done`; kicks
    /// and a stop are returned. A guest can make I/O fail at will
    /// (buffers in memory it took away): failures are logged within the
    /// session's limit.
    pub fn reap(&mut self, session: &Session, done: &mut Vec<Pending>) -> Events {
        let mut events = Events::default();
        let mut kick_failed = None;
        let mut rearm_kick = false;
        for cqe in self.ring.completion() {
            let (data, res) = (cqe.user_data(), cqe.result());
            if data == KICK {
                if res >= 0 {
                    events.kick = true;
                    // A multishot poll the kernel ended (its queue of
                    // completions overflowed, say) is armed again.
                    rearm_kick |= !io_uring::cqueue::more(cqe.flags());
                } else {
                    kick_failed = Some(res);
                }
                continue;
            }
            if data == STOP {
                events.stop = true;
                continue;
            }
            if data == TIMER {
                // -ETIME: it expired, as meant.
                events.timer = true;
                self.timer = None;
                continue;
            }
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
        if rearm_kick && kick_failed.is_none() && self.arm(KICK).is_err() {
            kick_failed = Some(-libc::EAGAIN);
        }
        if let Some(res) = kick_failed {
            // The kick eventfd is gone or broken: the worker hears no
            // more kicks from it, and says so once.
            tracing::warn!(
                "the queue's kick eventfd failed ({}): kicks are no longer heard",
                io::Error::from_raw_os_error(-res)
            );
            self.kick = None;
        }
        events
    }

    /// Retires a request that needed no kernel I/O (completed by the caller).
    pub fn finish_now(&mut self, slot: usize) {
        if self.pending.get_mut(slot).and_then(|p| p.take()).is_some() {
            self.free.push(slot);
        }
    }

    /// Waits for every request in flight (before guest memory goes away).
    pub fn drain(&mut self, session: &Session, done: &mut Vec<Pending>) {
        while self.in_flight() > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.unsubmitted = 0;
            self.reap(session, done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Reads or writes `buf` at 4096 in `file` through `ring`, waiting
    /// for it.
    fn one_io(ring: &mut QueueRing, write: bool, file: RingFile, buf: &mut [u8]) {
        let session = Session::start(None).expect("fence");
        let slot = ring.add(Pending {
            head: 0,
            status: GuestAddress(0),
            written: 0,
            remaining: 1,
            failed: false,
            wrote: None,
        });
        let len = buf.len() as u32;
        // SAFETY: `buf` outlives the request, which completes below.
        unsafe { ring.push_rw(write, file, buf.as_mut_ptr(), len, 4096, slot) }.expect("push");
        let mut done = Vec::new();
        while done.is_empty() {
            ring.wait().expect("wait");
            ring.reap(&session, &mut done);
        }
        assert!(!done[0].failed, "the I/O failed (write: {write})");
    }

    #[test]
    fn registered_files_and_buffers_move_the_same_bytes() {
        let dir = std::env::temp_dir().join(format!("uring-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for (registered, name) in [(false, "plain"), (true, "registered")] {
            let path = dir.join(name);
            let mut content = vec![0u8; 3 * 4096];
            content[4096..8192]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 251) as u8);
            std::fs::write(&path, &content).expect("write");
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open");
            let stop = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            let mut ring = QueueRing::new(64).expect("ring");
            ring.start(None, stop.as_raw_fd()).expect("start");
            let mut buf = vec![0u8; 4096];
            if registered {
                ring.register_files(&[stop.as_raw_fd(), f.as_raw_fd()])
                    .expect("register files");
                // SAFETY: `buf` outlives the ring (dropped first, below).
                unsafe { ring.register_memory(&[(buf.as_mut_ptr() as usize, buf.len())]) }
                    .expect("register memory");
                assert_eq!(ring.fixed_buffer(buf.as_mut_ptr(), 4096), Some(0));
                // One byte past the registered buffer is not in it.
                assert_eq!(
                    ring.fixed_buffer(buf.as_mut_ptr().wrapping_add(1), 4096),
                    None
                );
            }
            let file = RingFile {
                fd: f.as_raw_fd(),
                slot: 1,
            };
            one_io(&mut ring, false, file, &mut buf);
            assert_eq!(buf, content[4096..8192], "{name}: the block read");
            buf.fill(0x5a);
            one_io(&mut ring, true, file, &mut buf);
            drop(ring);
            let after = std::fs::read(&path).expect("read back");
            assert_eq!(&after[..4096], &content[..4096], "{name}: bytes before");
            assert_eq!(
                &after[4096..8192],
                &[0x5a; 4096][..],
                "{name}: the written block"
            );
            assert_eq!(&after[8192..], &content[8192..], "{name}: bytes after");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_submit_batch_hands_the_kernel_every_nth_request_as_it_is_queued() {
        let f = tempfile_in_temp("batch");
        let stop = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        for (batch, queued_after) in [(0, [1, 2, 3, 4]), (1, [0, 0, 0, 0]), (2, [1, 0, 1, 0])] {
            let mut ring = QueueRing::new(64).expect("ring");
            ring.set_submit_batch(batch);
            ring.start(None, stop.as_raw_fd()).expect("start");
            let mut bufs = vec![[0u8; 512]; 4];
            let mut left = Vec::new();
            for (i, buf) in bufs.iter_mut().enumerate() {
                let slot = ring.add(Pending {
                    head: i as u16,
                    status: GuestAddress(0),
                    written: 0,
                    remaining: 1,
                    failed: false,
                    wrote: None,
                });
                let file = RingFile {
                    fd: f.as_raw_fd(),
                    slot: 0,
                };
                // SAFETY: the buffers outlive the requests, which are
                // all reaped below.
                unsafe { ring.push_rw(false, file, buf.as_mut_ptr(), 512, 0, slot) }.expect("push");
                left.push(ring.ring.submission().len());
            }
            assert_eq!(left, queued_after, "submit_batch {batch}");
            let session = Session::start(None).expect("fence");
            let mut done = Vec::new();
            while done.len() < 4 {
                ring.wait().expect("wait");
                ring.reap(&session, &mut done);
            }
            assert!(done.iter().all(|p| !p.failed));
        }
    }

    /// A 4 KiB file of its own in the temporary directory, open for
    /// reading; removed at once (the open file stays).
    fn tempfile_in_temp(name: &str) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("uring-{name}-{}", std::process::id()));
        std::fs::write(&path, [7u8; 4096]).expect("write");
        let f = std::fs::File::open(&path).expect("open");
        let _ = std::fs::remove_file(&path);
        f
    }
}
