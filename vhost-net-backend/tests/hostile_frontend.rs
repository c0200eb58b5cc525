//! net-backend (the program) against a frontend that does what a hostile
//! guest or a buggy frontend can: impossible ring indices and heads,
//! buffers too small for what they are given, memory that is not there,
//! eventfds that would block or never run dry. Each attack runs on a
//! fresh connection in a network namespace of the test's own; after it,
//! the process must be alive, back to idle (its CPU time over a second,
//! not the wall clock), have logged a bounded number of lines, and serve
//! the next frontend byte for byte both ways.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use test_infra::vhost_frontend::{handshake, Setup, TestFrontend, EVENT_IDX, NEXT, WRITE};
use test_infra::Patience;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK, EFD_SEMAPHORE};

const MEM: usize = 1 << 20;
const TAP: &str = "vnbhostile0";
const F_MQ: u64 = 1 << 22;
/// What one attack may log at most (a few lines of its own, the limited
/// ones, the session's end).
const LINES_PER_ATTACK: usize = 40;
/// CPU ticks (of 10 ms) the process may use in a second of idling: a
/// spinning worker takes about 100 (50 sharing a busy core).
const IDLE_TICKS: u64 = 15;

/// net-backend, run as a child in the test's namespace, logging to a file.
struct Backend {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Backend {
    fn start(pairs: usize) -> Backend {
        let dir = tempfile::tempdir().expect("dir");
        let sock = dir.path().join("net.sock");
        let log = dir.path().join("net-backend.log");
        // NET_BACKEND: another build to attack (an older one, to see a
        // case fail before its fix).
        let program = std::env::var_os("NET_BACKEND")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_net-backend").into());
        let child = Command::new(program)
            .args(["--tap", TAP, "--queue-size", &QSIZE.to_string()])
            .arg("--queue-pairs")
            .arg(pairs.to_string())
            .arg("--socket")
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log"))
            .spawn()
            .expect("net-backend starts");
        let b = Backend {
            child,
            sock,
            log,
            _dir: dir,
        };
        Patience::new("net-backend's socket", Duration::from_millis(20))
            .wait_until(|| Ok(b.sock.exists()))
            .expect("listening");
        ip(&["link", "set", TAP, "up"]);
        b
    }

    /// The process's CPU ticks (utime + stime).
    fn ticks(&self) -> u64 {
        test_infra::process_ticks(self.child.id())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_lines(&self) -> usize {
        self.log_text().lines().count()
    }

    /// Asserts the process lives and is idle: what it spends over a
    /// second of nothing to do.
    fn assert_alive_and_idle(&mut self, what: &str) {
        assert!(
            self.child.try_wait().expect("wait").is_none(),
            "{what}: net-backend died:\n{}",
            tail(&self.log_text())
        );
        let before = self.ticks();
        std::thread::sleep(Duration::from_secs(1));
        let spent = self.ticks() - before;
        assert!(
            spent <= IDLE_TICKS,
            "{what}: net-backend used {spent} ticks of 10 ms in an idle second:\n{}",
            tail(&self.log_text())
        );
        assert!(
            self.child.try_wait().expect("wait").is_none(),
            "{what}: net-backend died:\n{}",
            tail(&self.log_text())
        );
    }

    /// An attack, then the checks: alive, idle, its lines bounded, the
    /// next frontend served byte for byte.
    fn survives(&mut self, what: &str, attack: impl FnOnce(&Backend)) {
        let before = self.log_lines();
        attack(self);
        self.assert_alive_and_idle(what);
        let lines = self.log_lines() - before;
        eprintln!("{what}: {lines} log lines");
        assert!(
            lines <= LINES_PER_ATTACK,
            "{what}: {lines} log lines:\n{}",
            tail(&self.log_text())
        );
        served_byte_exact(&self.sock, what);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A NIC's frontend with three queues (a pair and the control queue)
/// set up as `setup` says otherwise.
fn nic(sock: &Path, setup: Setup) -> TestFrontend {
    TestFrontend::connect(
        sock,
        &Setup {
            queues: 3,
            queue_size: QSIZE,
            ..setup
        },
    )
}

/// A control command on queue `q`: `parts` read-only buffers at
/// 0x30000, 0x30100, ..., then an ack buffer of `ack_len` at 0x30f00
/// holding 0xee; returns (used length, the ack byte).
fn command(g: &mut TestFrontend, q: usize, parts: &[&[u8]], ack_len: u32) -> (u32, u8) {
    let n = parts.len() as u16;
    for (i, p) in parts.iter().enumerate() {
        let at = 0x30000 + 0x100 * i as u64;
        g.mem.write_slice(p, GuestAddress(at)).expect("w");
        g.desc(q, i as u16, at, p.len() as u32, NEXT, i as u16 + 1);
    }
    g.mem.write_obj(0xeeu8, GuestAddress(0x30f00)).expect("w");
    g.desc(q, n, 0x30f00, ack_len, WRITE, 0);
    g.post(q, 0);
    let (head, len) = g.used(q);
    assert_eq!(head, 0);
    (len, g.mem.read_obj(GuestAddress(0x30f00)).expect("r"))
}

/// A fresh, well-behaved frontend is served: a frame out of the guest
/// comes out of the tap as written, and one into the tap lands whole in
/// the guest's buffer.
fn served_byte_exact(sock: &Path, what: &str) {
    let host = packet_socket(TAP);
    let mut g = connect(sock, 1);
    let out = frame([0xff; 6], 9, 700);
    transmit(&mut g, 1, &[0; 12], &out, 0x10000);
    assert_eq!(g.used(1), (0, 0), "{what}: the next frontend's frame");
    assert_eq!(next_frame(&host), out, "{what}: out of the tap as sent");
    receive_one(&mut g, &host, what);
}

/// A frame sent into the tap lands in a 2 KiB receive buffer whole.
fn receive_one(g: &mut TestFrontend, host: &OwnedFd, what: &str) {
    g.desc(0, 0, 0x20000, 2048, WRITE, 0);
    g.post(0, 0);
    // Its own destination: frames an attack left in the tap come first.
    let inbound = frame([0x52, 0x54, 0, 0xcc, 0xcc, 0xcc], 4, 900);
    send(host, &inbound);
    let len = await_frame(g, 0x20000, &inbound[..6]);
    assert_eq!(len as usize, 12 + inbound.len(), "{what}: the used length");
    let mut got = vec![0u8; inbound.len()];
    g.mem
        .read_slice(&mut got, GuestAddress(0x20000 + 12))
        .expect("r");
    assert_eq!(got, inbound, "{what}: the frame in the guest's buffer");
}

/// Waits for the frame to `dst` in buffer `at` (head 0 of queue 0),
/// reposting it for the frames before it (those an attack left in the
/// tap's queue, up to its length, and any the kernel sent); its used
/// length.
fn await_frame(g: &mut TestFrontend, at: u64, dst: &[u8]) -> u32 {
    for _ in 0..2048 {
        let (head, len) = g.used(0);
        assert_eq!(head, 0);
        let mut seen = [0u8; 6];
        g.mem
            .read_slice(&mut seen, GuestAddress(at + 12))
            .expect("r");
        if seen == dst {
            return len;
        }
        g.post(0, 0);
    }
    panic!("the test's frame never came")
}

/// A backend for test `test` in a namespace of the test's own, or None
/// (with a loud line) where taps cannot be made.
fn target(test: &str, pairs: usize) -> Option<Backend> {
    if !can_make_taps(test) {
        return None;
    }
    in_own_netns();
    Some(Backend::start(pairs))
}

/// An available index no driver can write, on either side, kicked 200
/// times (or 200 frames coming in).
fn impossible_index(b: &mut Backend, event_idx: bool) {
    for (q, side) in [(1usize, "transmit"), (0, "receive")] {
        let what = format!("{side} queue, event_idx {event_idx}");
        b.survives(&what, |b| {
            let host = packet_socket(TAP);
            let drop_features = if event_idx { 0 } else { EVENT_IDX };
            let mut g = nic(
                &b.sock,
                Setup {
                    drop_features,
                    ..Setup::default()
                },
            );
            // A buffer the device could use, then nonsense.
            g.desc(q, 0, 0x20000, 2048, if q == 0 { WRITE } else { 0 }, 0);
            g.offer(q, 0);
            g.avail_ahead(q, QSIZE + 5);
            // Each kick taken before the next: one wake-up each.
            for i in 0..200u32 {
                if q == 0 {
                    send(&host, &frame([0x52, 0x54, 0, 1, 2, 3], i as u8, 60));
                }
                kick_and_wait_taken(&g.queues[q].kick);
            }
            drop(g);
        });
    }
}

/// Kicks and waits until the backend took the kick (the eventfd is no
/// longer readable): each kick is its own wake-up, however fast the
/// machine.
fn kick_and_wait_taken(kick: &EventFd) {
    kick.write(1).expect("kick");
    Patience::new("the backend to take a kick", Duration::from_millis(1))
        .wait_until(|| {
            let mut p = libc::pollfd {
                fd: kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd of ours, no wait.
            Ok(unsafe { libc::poll(&raw mut p, 1, 0) } == 0)
        })
        .expect("the kick taken");
}

/// Class 1: with EVENT_IDX, an impossible index breaks its queue once, in
/// a line, with no spinning (it spun and logged millions of lines, and
/// the next frontend was never served).
#[test]
fn an_impossible_available_index_with_event_idx_breaks_its_queue_once() {
    let Some(mut b) = target("impossible index, EVENT_IDX", 1) else {
        return;
    };
    impossible_index(&mut b, true);
}

/// Class 2: without EVENT_IDX, the same is said once, not at every kick or
/// frame.
#[test]
fn an_impossible_available_index_without_event_idx_is_said_once() {
    let Some(mut b) = target("impossible index, no EVENT_IDX", 1) else {
        return;
    };
    impossible_index(&mut b, false);
}

/// Class 3: an available head at or past the queue size breaks that queue
/// only (it ended the pair's worker, the control queue with it): the
/// control queue on the same worker still answers, and the queue, set up
/// again by the driver, serves again.
#[test]
fn a_head_past_the_queue_breaks_that_queue_only() {
    let Some(mut b) = target("head past the queue", 1) else {
        return;
    };
    b.survives("head 100 of 16", |b| {
        let mut g = connect(&b.sock, 1);
        g.desc(1, 0, 0x10000, 64, 0, 0);
        g.post(1, 100);
        g.post(1, 0);
        std::thread::sleep(Duration::from_millis(200));
        // The control queue (2) answers on the same session.
        let (len, ack) = command(&mut g, 2, &[&[0, 0], &[1]], 1);
        assert_eq!((len, ack), (1, 0), "the control queue still answers");
        // The driver resets the broken queue: it is served again.
        let host = packet_socket(TAP);
        g.reset_queue(1, EventFd::new(EFD_NONBLOCK).expect("kick"));
        let out = frame([0xff; 6], 7, 200);
        transmit(&mut g, 1, &[0; 12], &out, 0x10000);
        assert_eq!(g.used(1), (0, 0), "the reset queue serves again");
        assert_eq!(next_frame(&host), out);
        drop(g);
    });
}

/// Class 4a: a frame longer than its receive buffer is dropped and
/// counted, the buffer kept for the next (it was delivered cut, as if
/// whole).
#[test]
fn frames_longer_than_their_buffer_are_dropped() {
    let Some(mut b) = target("frames too long", 1) else {
        return;
    };
    b.survives("frames larger than their buffer", |b| {
        let host = packet_socket(TAP);
        let mut g = connect(&b.sock, 1);
        // A 112-byte buffer: a 500-byte frame does not fit and is dropped;
        // the 60-byte frame after it lands whole.
        g.desc(0, 0, 0x20000, 112, WRITE, 0);
        g.post(0, 0);
        send(&host, &frame([0x52, 0x54, 0, 9, 9, 9], 1, 500));
        let small = frame([0x52, 0x54, 0, 1, 2, 3], 2, 60);
        send(&host, &small);
        let big_dst = [0x52, 0x54, 0, 9, 9, 9];
        let len = loop {
            let (head, len) = g.used(0);
            assert_eq!(head, 0);
            let mut dst = [0u8; 6];
            g.mem
                .read_slice(&mut dst, GuestAddress(0x20000 + 12))
                .expect("r");
            assert_ne!(
                dst, big_dst,
                "a frame cut to its buffer was delivered ({len} bytes)"
            );
            if dst == small[..6] {
                break len;
            }
            g.post(0, 0);
        };
        assert_eq!(len as usize, 12 + small.len(), "the small frame, whole");
        let mut got = vec![0u8; small.len()];
        g.mem
            .read_slice(&mut got, GuestAddress(0x20000 + 12))
            .expect("r");
        assert_eq!(got, small);
    });
}

/// Class 4b: a control command is read within its buffers and its ack
/// written into one that holds it (commands were read past 1- and 2-byte
/// buffers and answered OK, the ack written into a 0-byte buffer).
#[test]
fn control_commands_are_held_to_their_buffers() {
    let Some(mut b) = target("control command lengths", 1) else {
        return;
    };
    b.survives("control commands short of their buffers", |b| {
        let mut g = connect(&b.sock, 1);
        // RX class, its command byte missing (a 1-byte header): refused.
        assert_eq!(command(&mut g, 2, &[&[0]], 1), (1, 1), "a 1-byte header");
        // MQ pairs set, its 2-byte argument in a 1-byte buffer.
        assert_eq!(
            command(&mut g, 2, &[&[4, 0], &[1]], 1),
            (1, 1),
            "a 1-byte argument"
        );
        // A good command whose ack buffer is 0 bytes: nothing written.
        assert_eq!(
            command(&mut g, 2, &[&[0, 0], &[1]], 0),
            (0, 0xee),
            "a 0-byte ack"
        );
        // And a good one is answered.
        assert_eq!(
            command(&mut g, 2, &[&[0, 0], &[1]], 1),
            (1, 0),
            "a good command"
        );
    });
}

/// Class 4c: the receive header may be laid out over any descriptors
/// (VERSION_1); num_buffers goes at its offset 10 wherever that is (a
/// 6 + 6 split was refused).
#[test]
fn a_receive_header_split_over_descriptors_is_served() {
    let Some(mut b) = target("split receive header", 1) else {
        return;
    };
    b.survives("a receive header split 6 + 6", |b| {
        let host = packet_socket(TAP);
        let mut g = connect(&b.sock, 1);
        g.mem
            .write_slice(&[0xaa; 16], GuestAddress(0x21000))
            .expect("w");
        g.desc(0, 0, 0x20000, 6, WRITE | NEXT, 1);
        g.desc(0, 1, 0x21000, 6, WRITE | NEXT, 2);
        g.desc(0, 2, 0x22000, 2048, WRITE, 0);
        g.post(0, 0);
        let inbound = frame([0x52, 0x54, 0, 1, 2, 3], 3, 300);
        send(&host, &inbound);
        let mut len = 0;
        for _ in 0..64 {
            let (head, l) = g.used(0);
            assert_eq!(head, 0);
            let mut dst = [0u8; 6];
            g.mem
                .read_slice(&mut dst, GuestAddress(0x22000))
                .expect("r");
            if dst == inbound[..6] {
                len = l;
                break;
            }
            g.post(0, 0);
        }
        assert_eq!(len as usize, 12 + inbound.len(), "the split header's frame");
        let num_buffers: u16 = g.mem.read_obj(GuestAddress(0x21004)).expect("r");
        assert_eq!(num_buffers, 1, "num_buffers at the header's offset 10");
        let mut got = vec![0u8; inbound.len()];
        g.mem
            .read_slice(&mut got, GuestAddress(0x22000))
            .expect("r");
        assert_eq!(got, inbound);
    });
}

/// Class 5a: a memory region its file does not back is refused before it
/// is mapped (the first access killed the process with SIGBUS).
#[test]
fn memory_regions_their_files_do_not_back_are_refused() {
    let Some(mut b) = target("memory tricks", 1) else {
        return;
    };
    for (name, size_times, offset) in [
        ("a region twice its file", 2u64, 0u64),
        ("a region from past its file's start", 1, 4096),
    ] {
        b.survives(name, |b| {
            let mem = test_infra::memfd_guest_memory(MEM);
            let mut f = handshake(&b.sock, 3, 0);
            f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            let region = mem.iter().next().expect("a region");
            let info = VhostUserMemoryRegionInfo {
                memory_size: size_times * MEM as u64,
                mmap_offset: offset,
                ..VhostUserMemoryRegionInfo::from_guest_region(region).expect("info")
            };
            if f.set_mem_table(&[info]).is_err() {
                return;
            }
            // Accepted: rings at the end of the region, kicked.
            let at = (size_times * MEM as u64) - 0x4000;
            let base = region.as_ptr() as u64;
            let _ = f.set_vring_num(1, QSIZE);
            let _ = f.set_vring_addr(
                1,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: base + at,
                    used_ring_addr: base + at + 0x2000,
                    avail_ring_addr: base + at + 0x1000,
                    log_addr: None,
                },
            );
            let kick = EventFd::new(EFD_NONBLOCK).expect("kick");
            let _ = f.set_vring_kick(1, &kick);
            let _ = f.set_vring_enable(1, true);
            let _ = kick.write(1);
            std::thread::sleep(Duration::from_millis(300));
        });
    }
}

/// Class 5b: memory truncated after the table ends that session only:
/// faults are contained, a tap copy that fails on it ends the session
/// instead of failing frame after frame.
#[test]
fn memory_truncated_after_the_table_ends_that_session_only() {
    let Some(mut b) = target("memory truncated", 1) else {
        return;
    };
    b.survives("memory truncated after the table", |b| {
        let host = packet_socket(TAP);
        let mut g = connect(&b.sock, 1);
        g.desc(0, 0, 0x80000, 2048, WRITE, 0);
        g.post(0, 0);
        test_infra::memory::memory_file(&g.mem)
            .set_len(0)
            .expect("truncate");
        // Frames into buffers that are gone, and a transmit kick whose
        // rings are gone.
        for i in 0..100 {
            send(&host, &frame([0x52, 0x54, 0, 1, 2, 3], i, 60));
        }
        let _ = g.queues[1].kick.write(1);
        std::thread::sleep(Duration::from_millis(300));
        drop(g);
    });
}

/// Class 6a: a call eventfd at its maximum count does not block a worker
/// (it blocked it for good).
#[test]
fn a_full_call_eventfd_does_not_block_a_worker() {
    let Some(mut b) = target("eventfds", 1) else {
        return;
    };
    b.survives("a blocking call eventfd at its maximum", |b| {
        let mut g = nic(
            &b.sock,
            Setup {
                call: || {
                    let e = EventFd::new(0).expect("call");
                    e.write(u64::MAX - 1).expect("fill");
                    e
                },
                ..Setup::default()
            },
        );
        for k in 0..3 {
            transmit(&mut g, 1, &[0; 12], &frame([0xff; 6], k, 100), 0x10000);
            assert_eq!(g.used(1), (0, 0), "frame {k} completed");
        }
    });
}

/// Class 6b: a kick eventfd in semaphore mode with a huge count does not
/// keep a worker busy (it kept one at about 73 % of a core).
#[test]
fn a_semaphore_kick_eventfd_does_not_spin_a_worker() {
    let Some(mut b) = target("semaphore kick", 1) else {
        return;
    };
    b.survives("a semaphore kick eventfd with a huge count", |b| {
        let mut g = nic(
            &b.sock,
            Setup {
                kick: || EventFd::new(EFD_NONBLOCK | EFD_SEMAPHORE).expect("kick"),
                ..Setup::default()
            },
        );
        transmit(&mut g, 1, &[0; 12], &frame([0xff; 6], 1, 100), 0x10000);
        assert_eq!(g.used(1), (0, 0));
        g.queues[1].kick.write(1 << 40).expect("kick");
        // Connected, with the count still huge: idle all the same.
        idle_while(b, "connected with a semaphore kick");
        drop(g);
    });
}

fn idle_while(b: &Backend, what: &str) {
    let before = b.ticks();
    std::thread::sleep(Duration::from_secs(1));
    let spent = b.ticks() - before;
    assert!(
        spent <= IDLE_TICKS,
        "{what}: net-backend used {spent} ticks of 10 ms in a second"
    );
}

/// Class 7: without MQ the control queue is virtqueue 2, whatever the
/// number of pairs the backend has.
#[test]
fn without_mq_the_control_queue_is_the_third() {
    let Some(mut b) = target("control queue without MQ", 2) else {
        return;
    };
    b.survives("no MQ", |b| {
        let mut g = nic(
            &b.sock,
            Setup {
                drop_features: EVENT_IDX | F_MQ,
                ..Setup::default()
            },
        );
        assert_eq!(
            command(&mut g, 2, &[&[0, 0], &[1]], 1),
            (1, 0),
            "queue 2 answers"
        );
    });
}
