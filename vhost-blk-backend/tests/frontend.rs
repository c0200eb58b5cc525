//! The server driven by an in-process frontend (the vhost crate's
//! frontend side) over a real socket, with fake guest memory in a memfd:
//! hostile descriptor chains fail only their request, and protocol abuse
//! drops only its connection.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use test_infra::vhost_frontend::{handshake, Setup, TestFrontend, NEXT, WRITE};
use test_infra::Patience;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, Listener, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_blk_backend::export::{BaseIo, Export, ExportSpec, SharedFiles};
use vhost_blk_backend::server::{serve, StopHandle};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

struct Guest {
    f: TestFrontend,
}

fn frontend_addr(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).expect("mapped") as u64
}

impl Guest {
    /// The full handshake of a frontend that starts queue 0.
    fn connect(sock: &Path) -> Guest {
        let mut f = TestFrontend::connect(
            sock,
            &Setup {
                mem: MEM,
                queue_size: QSIZE,
                ..Setup::default()
            },
        );
        let pf = f
            .frontend
            .get_protocol_features()
            .expect("protocol features");
        assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
        Guest { f }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.f.desc(0, i, addr, len, flags, next);
    }

    fn header(&self, at: u64, ty: u32, sector: u64) {
        self.f.mem.write_obj(ty, GuestAddress(at)).expect("w");
        self.f.mem.write_obj(0u32, GuestAddress(at + 4)).expect("w");
        self.f
            .mem
            .write_obj(sector, GuestAddress(at + 8))
            .expect("w");
    }

    /// Makes chain `head` available, kicks, and waits for its used entry:
    /// (used length, status byte at `status`).
    fn run(&mut self, head: u16, status: u64) -> (u32, u8) {
        self.f
            .mem
            .write_obj(0xffu8, GuestAddress(status))
            .expect("w");
        self.post(head);
        self.wait_used(head, status)
    }

    /// Makes chain `head` available and kicks.
    fn post(&mut self, head: u16) {
        self.f.post(0, head);
    }

    /// Waits for the used entry of `head`: (used length, status byte).
    fn wait_used(&mut self, head: u16, status: u64) -> (u32, u8) {
        let (id, len) = self.f.used(0);
        assert_eq!(id, head as u32);
        (len, self.f.mem.read_obj(GuestAddress(status)).expect("r"))
    }

    /// A plain request: header at 0x8000, data at 0x10000, status at 0x9000.
    fn request(&mut self, ty: u32, sector: u64, len: u32) -> (u32, u8) {
        self.header(0x8000, ty, sector);
        let data_flags = if ty == VIRTIO_BLK_T_IN { WRITE } else { 0 };
        self.desc(0, 0x8000, 16, NEXT, 1);
        self.desc(1, 0x10000, len, NEXT | data_flags, 2);
        self.desc(2, 0x9000, 1, WRITE, 0);
        self.run(0, 0x9000)
    }
}

type Server = (
    std::path::PathBuf,
    Arc<StopHandle>,
    std::thread::JoinHandle<()>,
);

fn start_server(dir: &Path) -> Server {
    start_named_server(dir, "disk")
}

/// An export of its own image on `name`.sock, served in this process.
fn start_named_server(dir: &Path, name: &str) -> Server {
    let image = dir.join(format!("{name}.img"));
    image_format::ops::create(&image_format::RealEnv, &image, Some(1 << 20), 4096, None)
        .expect("create");
    let sock = dir.join(format!("{name}.sock"));
    let export = Export::open(
        ExportSpec {
            socket: sock.clone(),
            image,
            readonly: false,
            num_queues: 1,
            queue_size: 64,
            poll_us: 20,
            fixed_buffers: false,
            submit_batch: blk_control::spec::DEFAULT_SUBMIT_BATCH,
            worker_cpus: None,
            limits: Default::default(),
            limit_group: None,
        },
        None,
        &SharedFiles::default(),
        BaseIo::Page,
        None,
    )
    .expect("export");
    let listener = Listener::new(&sock, true).expect("listen");
    let stop = Arc::new(StopHandle::default());
    let s2 = Arc::clone(&stop);
    let t = std::thread::spawn(move || serve(Arc::new(export), listener, s2));
    (sock, stop, t)
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn hostile_chains_fail_their_request_and_serving_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, stop, t) = start_server(dir.path());
    let mut g = Guest::connect(&sock);

    // A write and its read back, through the io_uring path.
    g.f.mem
        .write_slice(&[0x5a; 4096], GuestAddress(0x10000))
        .expect("w");
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 8, 4096), (1, OK));
    g.f.mem
        .write_slice(&[0; 4096], GuestAddress(0x10000))
        .expect("w");
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 8, 4096), (4097, OK));
    let mut back = [0u8; 4096];
    g.f.mem
        .read_slice(&mut back, GuestAddress(0x10000))
        .expect("r");
    assert_eq!(back, [0x5a; 4096]);

    // Past the end of the disk; an unknown type; a read-only-looking
    // write direction mismatch.
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 2048, 512).1, IOERR);
    assert_eq!(g.request(0x7777, 0, 512).1, VIRTIO_BLK_S_UNSUPP as u8);
    g.header(0x8000, VIRTIO_BLK_T_OUT, 0);
    g.desc(0, 0x8000, 16, NEXT, 1);
    g.desc(1, 0x10000, 512, NEXT | WRITE, 2);
    g.desc(2, 0x9000, 1, WRITE, 0);
    assert_eq!(g.run(0, 0x9000).1, IOERR);

    // Data outside guest memory.
    g.header(0x8000, VIRTIO_BLK_T_IN, 0);
    g.desc(3, 0x8000, 16, NEXT, 4);
    g.desc(4, (MEM - 256) as u64, 4096, NEXT | WRITE, 5);
    g.desc(5, 0x9000, 1, WRITE, 0);
    assert_eq!(g.run(3, 0x9000), (1, IOERR));

    // A header too short.
    g.desc(6, 0x8000, 8, NEXT, 7);
    g.desc(7, 0x9000, 1, WRITE, 0);
    assert_eq!(g.run(6, 0x9000), (1, IOERR));

    // A loop (8 -> 9 -> 8): no status descriptor to write, but the chain
    // still comes back used.
    g.desc(8, 0x8000, 16, NEXT, 9);
    g.desc(9, 0x10000, 512, NEXT, 8);
    assert_eq!(g.run(8, 0x9000), (1, 0xff));

    // A next index past the table, and an indirect table of ragged size.
    g.desc(10, 0x8000, 16, NEXT, 200);
    assert_eq!(g.run(10, 0x9000).0, 1);
    g.desc(11, 0x20000, 20, 4, 0);
    assert_eq!(g.run(11, 0x9000).0, 1);

    // Still serving: the data is intact.
    g.f.mem
        .write_slice(&[0; 4096], GuestAddress(0x10000))
        .expect("w");
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 8, 4096), (4097, OK));
    g.f.mem
        .read_slice(&mut back, GuestAddress(0x10000))
        .expect("r");
    assert_eq!(back, [0x5a; 4096]);

    drop(g);
    stop.stop();
    t.join().expect("server thread");
}

#[test]
fn protocol_abuse_drops_only_that_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, stop, t) = start_server(dir.path());

    // Garbage bytes where a message header belongs.
    {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.write_all(&[0xde; 64]).expect("write");
        let hang_up = Patience::new("the server hanging up on garbage", Duration::from_millis(1));
        s.set_read_timeout(Some(hang_up.limit())).expect("timeout");
        let mut buf = [0u8; 16];
        // The server hangs up: end of file (or a reset), not a reply, and
        // not silence until the wait runs out.
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(n) => assert_eq!(n, 0, "a reply to garbage"),
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "{}: {e}",
                hang_up.explain(hang_up.limit())
            ),
        }
    }

    // Out of order: ring addresses before any memory table.
    {
        let f = Frontend::connect(&sock, 1).expect("connect");
        f.set_owner().expect("owner");
        let r = f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: 0x1000,
                used_ring_addr: 0x3000,
                avail_ring_addr: 0x2000,
                log_addr: None,
            },
        );
        // Without REPLY_ACK the error shows as the dropped connection.
        let dropped = r.is_err() || f.get_features().is_err();
        assert!(dropped, "the connection survived an out-of-order request");
    }

    // A queue that does not exist (the frontend side would refuse to send
    // it if it knew the queue count).
    {
        let f = Frontend::connect(&sock, 8).expect("connect");
        f.set_owner().expect("owner");
        let _ = f.set_vring_num(7, 16);
        assert!(f.get_features().is_err(), "the connection survived queue 7");
    }

    // A well-behaved frontend is served as if nothing happened.
    let mut g = Guest::connect(&sock);
    g.f.mem
        .write_slice(&[0x33; 512], GuestAddress(0x10000))
        .expect("w");
    assert_eq!(g.request(VIRTIO_BLK_T_OUT, 0, 512), (1, OK));
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512), (513, OK));
    let _ = g.f.frontend.as_raw_fd();
    drop(g);
    stop.stop();
    t.join().expect("server thread");
}

/// CPU ticks (utime + stime) of this process's threads named `name`.
fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|r| r.1.split_whitespace().collect())
            .unwrap_or_default();
        total += fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
    }
    total
}

/// An available index more than a queue's worth ahead of the device (no
/// driver can write that) breaks the queue once: its worker stops reading
/// it instead of spinning (and logging) on it, and a driver that sets the
/// queue up again is served.
#[test]
fn an_impossible_available_index_breaks_the_queue_once_and_a_reset_serves_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, stop, t) = start_server(dir.path());
    let mut g = Guest::connect(&sock);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512).1, OK);
    g.f.mem
        .write_obj(
            g.f.queues[0].avail_idx.wrapping_add(QSIZE + 7),
            GuestAddress(AVAIL + 2),
        )
        .expect("w");
    let before = thread_ticks("queue 0");
    for _ in 0..10 {
        g.f.queues[0].kick.write(1).expect("kick");
        std::thread::sleep(Duration::from_millis(30));
    }
    // 300 ms: a worker spinning on the queue would take most of it (about
    // 30 ticks of 10 ms, even sharing a busy CPU, well over 10); one that
    // left it alone takes next to nothing.
    let spent = thread_ticks("queue 0") - before;
    assert!(
        spent <= 10,
        "the worker spent {spent} ticks of 10 ms on a broken queue"
    );
    drop(g);
    // The driver starts over: served again.
    let mut g = Guest::connect(&sock);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512).1, OK);
    drop(g);
    stop.stop();
    t.join().expect("server");
}

/// What the server logs in this test process.
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Log lines so far that contain `text` (logging is captured from the
/// first call on).
fn log_lines(text: &str) -> usize {
    static CAPTURE: std::sync::Once = std::sync::Once::new();
    CAPTURE.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .init();
    });
    String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|e| e.into_inner()))
        .lines()
        .filter(|l| l.contains(text))
        .count()
}

/// A guest that sends bad requests by the thousand gets each one answered,
/// and the log a bounded number of lines, not one per request.
#[test]
fn bad_requests_by_the_thousand_are_answered_but_logged_a_few_times() {
    let before = log_lines("bad request");
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, stop, t) = start_server(dir.path());
    let mut g = Guest::connect(&sock);
    const BAD: usize = 2000;
    let t0 = std::time::Instant::now();
    for _ in 0..BAD {
        // A header too short.
        g.desc(6, 0x8000, 8, NEXT, 7);
        g.desc(7, 0x9000, 1, WRITE, 0);
        assert_eq!(g.run(6, 0x9000), (1, IOERR));
    }
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512).1, OK, "still serving");
    drop(g);
    stop.stop();
    t.join().expect("server");
    let seconds = t0.elapsed().as_secs() + 1;
    let lines = log_lines("bad request") - before;
    eprintln!("{BAD} bad requests in {seconds} s or less, {lines} log lines");
    // Ten in full, then a count a second, however long the run took (other
    // tests in this process may add their own ten and counts).
    let bound = 2 * (10 + seconds as usize);
    assert!(
        (1..=bound).contains(&lines),
        "{lines} log lines for {BAD} bad requests over {seconds} s"
    );
}

/// A frontend past feature negotiation whose every request asks for its
/// acknowledgement (REPLY_ACK): a refusal is an error at the call, not a
/// closed connection found later.
fn acknowledging_frontend(sock: &Path) -> Frontend {
    let f = handshake(sock, 1, 0);
    f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    f
}

/// A memory table whose region reaches past the end of the file behind it
/// is refused by name before anything is mapped: touching such a mapping
/// would kill the whole process (SIGBUS). The next frontend is served.
#[test]
fn a_memory_region_larger_than_its_file_is_refused_before_it_is_mapped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, stop, t) = start_server(dir.path());
    let mem = test_infra::memfd_guest_memory(MEM);
    let f = acknowledging_frontend(&sock);
    let region = mem.iter().next().expect("a region");
    for bad in [
        // Twice the file's size.
        VhostUserMemoryRegionInfo {
            memory_size: 2 * MEM as u64,
            ..VhostUserMemoryRegionInfo::from_guest_region(region).expect("info")
        },
        // The right size, but from an offset past the file's start.
        VhostUserMemoryRegionInfo {
            mmap_offset: 4096,
            ..VhostUserMemoryRegionInfo::from_guest_region(region).expect("info")
        },
    ] {
        let r = f.set_mem_table(&[bad]);
        assert!(r.is_err(), "an oversized region was accepted");
    }
    drop(f);
    let mut g = Guest::connect(&sock);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512).1, OK);
    drop(g);
    stop.stop();
    t.join().expect("server");
}

/// A descriptor table that starts inside guest memory and runs past its
/// end (and an available ring wholly outside it) is refused by name when
/// the addresses arrive, before any request could fail on it; the next
/// frontend is served.
#[test]
fn rings_that_run_past_guest_memory_are_refused_by_name() {
    let lines_before = log_lines("does not lie wholly in guest memory");
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, stop, t) = start_server(dir.path());
    let mem = test_infra::memfd_guest_memory(MEM);
    let f = acknowledging_frontend(&sock);
    let region = mem.iter().next().expect("a region");
    let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("info");
    f.set_mem_table(&[info]).expect("mem table");
    f.set_vring_num(0, QSIZE).expect("num");
    // 16 descriptors of 16 bytes from 128 bytes before the end.
    let straddling = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: frontend_addr(&mem, MEM as u64 - 0x80),
        used_ring_addr: frontend_addr(&mem, USED),
        avail_ring_addr: frontend_addr(&mem, AVAIL),
        log_addr: None,
    };
    assert!(f.set_vring_addr(0, &straddling).is_err());
    drop(f);
    let mut g = Guest::connect(&sock);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512).1, OK);
    drop(g);
    // The server logged why it closed the first session before it took
    // the second: one line.
    assert_eq!(
        log_lines("does not lie wholly in guest memory") - lines_before,
        1
    );
    stop.stop();
    t.join().expect("server");
}

/// A verifying workload on another export of the same process: writes a
/// pattern per round, reads it back; returns the rounds and mismatches.
fn verify_rounds(sock: &Path, until: &std::sync::atomic::AtomicBool) -> (u32, u32) {
    let mut g = Guest::connect(sock);
    let (mut rounds, mut errors) = (0u32, 0u32);
    while !until.load(std::sync::atomic::Ordering::SeqCst) || rounds < 20 {
        let byte = (rounds % 251) as u8 + 1;
        let sector = 8 * (rounds % 64) as u64;
        g.f.mem
            .write_slice(&[byte; 4096], GuestAddress(0x10000))
            .expect("w");
        let wrote = g.request(VIRTIO_BLK_T_OUT, sector, 4096);
        g.f.mem
            .write_slice(&[0; 4096], GuestAddress(0x10000))
            .expect("w");
        let read = g.request(VIRTIO_BLK_T_IN, sector, 4096);
        let mut back = [0u8; 4096];
        g.f.mem
            .read_slice(&mut back, GuestAddress(0x10000))
            .expect("r");
        if wrote != (1, OK) || read != (4097, OK) || back != [byte; 4096] {
            errors += 1;
        }
        rounds += 1;
    }
    (rounds, errors)
}

/// A frontend that truncates its guest memory after the backend mapped
/// it: a request whose buffers the kernel reads (io_uring) fails with
/// IOERR; one whose header the backend itself reads faults, the fault is
/// contained and that session is hung up with one log line. The process
/// lives on, and a verifying workload on another export in the same
/// process finishes with no error.
#[test]
fn memory_truncated_under_the_backend_ends_that_session_only() {
    let lines_before = log_lines("took away memory");
    let dir = tempfile::tempdir().expect("tempdir");
    let (victim_sock, victim_stop, victim_thread) = start_named_server(dir.path(), "victim");
    let (other_sock, other_stop, other_thread) = start_named_server(dir.path(), "other");
    let attack_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let done = Arc::clone(&attack_done);
        std::thread::spawn(move || verify_rounds(&other_sock, &done))
    };

    let mut g = Guest::connect(&victim_sock);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512).1, OK);
    // Only the first 128 KiB stay: rings (0x1000-0x3fff), header (0x8000)
    // and status (0x9000) among them.
    test_infra::memory::memory_file(&g.f.mem)
        .set_len(0x20000)
        .expect("truncate");
    // A write whose data lies past the new end: the kernel finds no page
    // there and the request fails; nothing in the backend faulted.
    let faults = vhost_user_session::fence::contained_faults();
    g.header(0x8000, VIRTIO_BLK_T_OUT, 0);
    g.desc(0, 0x8000, 16, NEXT, 1);
    g.desc(1, 0x40000, 4096, NEXT, 2);
    g.desc(2, 0x9000, 1, WRITE, 0);
    assert_eq!(g.run(0, 0x9000), (1, IOERR));
    // A header past the end: the backend reads it itself; the fault is
    // contained and the session ends.
    g.desc(3, 0x30000, 16, NEXT, 4);
    g.desc(4, 0x9000, 1, WRITE, 0);
    g.post(3);
    let hang_up = Patience::new("the backend hanging up", Duration::from_millis(1));
    hang_up
        .wait_until(|| Ok(g.f.frontend.get_features().is_err()))
        .expect("the session ended");
    assert!(vhost_user_session::fence::contained_faults() > faults);
    drop(g);

    // The export itself goes on: a new frontend is served.
    let mut g = Guest::connect(&victim_sock);
    assert_eq!(g.request(VIRTIO_BLK_T_IN, 0, 512).1, OK);
    drop(g);

    attack_done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (rounds, errors) = workload.join().expect("workload");
    eprintln!("other export: {rounds} verified rounds, {errors} errors");
    assert_eq!(errors, 0);
    for (stop, t) in [(victim_stop, victim_thread), (other_stop, other_thread)] {
        stop.stop();
        t.join().expect("server");
    }
    assert_eq!(log_lines("took away memory") - lines_before, 1);
}

/// Requests framed any legal way (VIRTIO 1.x) are served: a header split
/// over two descriptors, header and data in one, data and status in one,
/// direct descriptors followed by an indirect table; the used length is
/// what the device wrote, status included.
#[test]
fn any_legal_descriptor_layout_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sock, stop, t) = start_server(dir.path());
    let mut g = Guest::connect(&sock);
    // A write with the header split 8 + 8 and the data right after it in
    // the second descriptor.
    g.header(0x8000, VIRTIO_BLK_T_OUT, 16);
    g.f.mem
        .write_slice(&[0x3c; 4096], GuestAddress(0x8010))
        .expect("w");
    g.desc(0, 0x8000, 8, NEXT, 1);
    g.desc(1, 0x8008, 8 + 4096, NEXT, 2);
    g.desc(2, 0xa000, 1, WRITE, 0);
    assert_eq!(g.run(0, 0xa000), (1, OK));
    // Read it back: header in one descriptor cut 12 + 4, data and status
    // sharing the last one.
    g.header(0x8000, VIRTIO_BLK_T_IN, 16);
    g.desc(3, 0x8000, 12, NEXT, 4);
    g.desc(4, 0x800c, 4, NEXT, 5);
    g.desc(5, 0x20000, 4096 + 1, WRITE, 0);
    assert_eq!(g.run(3, 0x20000 + 4096), (4097, OK));
    let mut back = [0u8; 4096];
    g.f.mem
        .read_slice(&mut back, GuestAddress(0x20000))
        .expect("r");
    assert_eq!(back, [0x3c; 4096]);
    // Direct then indirect: the header in the queue's table, the data and
    // the status in an indirect table the chain's last descriptor points
    // to (an indirect descriptor ends a chain, which the spec allows).
    const INDIRECT: u16 = 4;
    g.header(0x8000, VIRTIO_BLK_T_IN, 16);
    let table = 0x30000u64;
    for (i, (addr, len, flags, next)) in [
        (0x40000u64, 4096u32, NEXT | WRITE, 1u16),
        (0xb000, 1, WRITE, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let at = GuestAddress(table + 16 * i as u64);
        g.f.mem.write_obj(addr, at).expect("w");
        g.f.mem.write_obj(len, GuestAddress(at.0 + 8)).expect("w");
        g.f.mem
            .write_obj(flags, GuestAddress(at.0 + 12))
            .expect("w");
        g.f.mem.write_obj(next, GuestAddress(at.0 + 14)).expect("w");
    }
    g.desc(6, 0x8000, 16, NEXT, 7);
    g.desc(7, table, 32, INDIRECT, 0);
    assert_eq!(g.run(6, 0xb000), (4097, OK));
    g.f.mem
        .read_slice(&mut back, GuestAddress(0x40000))
        .expect("r");
    assert_eq!(back, [0x3c; 4096]);
    drop(g);
    stop.stop();
    t.join().expect("server");
}
