//! The backend driven by an in-process frontend (the vhost crate's) with
//! guest memory in a memfd, on a tap in a network namespace of the test's
//! own (nothing is made in the host's): a frame the guest transmits comes
//! out of the tap byte for byte, a frame sent into the tap lands in the
//! guest's receive buffer behind its header, a hostile transmit chain is
//! completed with nothing sent and the queue goes on, and the control
//! queue answers the number of pairs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use test_infra::Patience;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_net_backend::device::NetDevice;
use vhost_net_backend::tap;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Each queue's rings: (descriptors, available, used).
const RINGS: [(u64, u64, u64); 3] = [
    (0x1000, 0x2000, 0x3000),
    (0x4000, 0x5000, 0x6000),
    (0x7000, 0x8000, 0x9000),
];
const TAP: &str = "vnbtest0";

struct Queue {
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

struct Guest {
    mem: GuestMemoryMmap,
    _frontend: Frontend,
    queues: Vec<Queue>,
}

impl Guest {
    fn connect(sock: &Path) -> Guest {
        let mem = test_infra::memfd_guest_memory(MEM);
        let mut f = Frontend::connect(sock, 3).expect("connect");
        f.set_owner().expect("owner");
        let features = f.get_features().expect("features");
        // No EVENT_IDX: every used entry signalled.
        f.set_features(features & !(1 << 29)).expect("set features");
        let pf = f.get_protocol_features().expect("protocol features");
        f.set_protocol_features(pf).expect("set protocol features");
        let region = mem.iter().next().expect("a region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("info");
        f.set_mem_table(&[info]).expect("mem table");
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).expect("mapped") as u64;
        let mut queues = Vec::new();
        for (q, (desc, avail, used)) in RINGS.iter().enumerate() {
            f.set_vring_num(q, QSIZE).expect("num");
            f.set_vring_base(q, 0).expect("base");
            f.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host(*desc),
                    used_ring_addr: host(*used),
                    avail_ring_addr: host(*avail),
                    log_addr: None,
                },
            )
            .expect("addr");
            let kick = EventFd::new(EFD_NONBLOCK).expect("kick");
            let call = EventFd::new(EFD_NONBLOCK).expect("call");
            f.set_vring_call(q, &call).expect("call");
            f.set_vring_kick(q, &kick).expect("kick");
            f.set_vring_enable(q, true).expect("enable");
            queues.push(Queue {
                kick,
                _call: call,
                avail_idx: 0,
                used_seen: 0,
            });
        }
        Guest {
            mem,
            _frontend: f,
            queues,
        }
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = RINGS[q].0 + 16 * i as u64;
        self.mem.write_obj(addr, GuestAddress(at)).expect("w");
        self.mem.write_obj(len, GuestAddress(at + 8)).expect("w");
        self.mem.write_obj(flags, GuestAddress(at + 12)).expect("w");
        self.mem.write_obj(next, GuestAddress(at + 14)).expect("w");
    }

    fn post(&mut self, q: usize, head: u16) {
        let avail = RINGS[q].1;
        let queue = &mut self.queues[q];
        let slot = avail + 4 + 2 * (queue.avail_idx % QSIZE) as u64;
        self.mem.write_obj(head, GuestAddress(slot)).expect("w");
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(queue.avail_idx, GuestAddress(avail + 2))
            .expect("w");
        queue.kick.write(1).expect("kick");
    }

    /// The next used entry of queue `q`: (head, length).
    fn used(&mut self, q: usize) -> (u32, u32) {
        let used = RINGS[q].2;
        let seen = self.queues[q].used_seen;
        // A frame moves in microseconds here.
        Patience::new("a used entry", Duration::from_millis(1))
            .wait_until(|| {
                let idx: u16 = self.mem.read_obj(GuestAddress(used + 2))?;
                Ok(idx != seen)
            })
            .expect("a used entry");
        let e = used + 4 + 8 * (seen % QSIZE) as u64;
        self.queues[q].used_seen = seen.wrapping_add(1);
        (
            self.mem.read_obj(GuestAddress(e)).expect("r"),
            self.mem.read_obj(GuestAddress(e + 4)).expect("r"),
        )
    }
}

/// A raw socket on the tap's host side: what the host sees of the guest.
fn packet_socket(ifname: &str) -> OwnedFd {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just made, owned from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("name");
    // SAFETY: if_nametoindex on a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no interface {ifname}");
    // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: bind with a sockaddr_ll of the right size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO with a timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

/// A frame of ours: to `dst` from a fixed source, an experimental
/// ethertype, `payload` bytes.
fn frame(dst: [u8; 6], tag: u8, payload: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..payload).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    f
}

#[test]
fn frames_move_between_the_guest_and_the_tap_and_hostile_chains_are_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: net-backend frames: needs root and /dev/net/tun");
        return;
    }
    // A network namespace of this test's own (this process's thread).
    // SAFETY: unshare of the network namespace, no memory involved.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let taps = tap::open(TAP, 1).expect("the tap");
    let up = Command::new("ip")
        .args(["link", "set", TAP, "up"])
        .status()
        .expect("ip");
    assert!(up.success());
    let device = Arc::new(NetDevice::new(taps, QSIZE as usize));
    let dir = tempfile::tempdir().expect("dir");
    let sock = dir.path().join("net.sock");
    let mut daemon = VhostUserDaemon::new(
        "net-test".into(),
        Arc::clone(&device),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .expect("daemon");
    device
        .watch_taps(&daemon.get_epoll_handlers())
        .expect("watch");
    let listener_sock = sock.clone();
    std::thread::spawn(move || daemon.serve(&listener_sock));
    Patience::new("the socket", Duration::from_millis(10))
        .wait_until(|| Ok(sock.exists()))
        .expect("listening");
    let host = packet_socket(TAP);
    let mut g = Guest::connect(&sock);

    // Transmit: header (no offload) then the frame, in two buffers.
    let out = frame([0xff; 6], 1, 300);
    g.mem
        .write_slice(&[0u8; 12], GuestAddress(0x10000))
        .expect("w");
    g.mem.write_slice(&out, GuestAddress(0x11000)).expect("w");
    g.desc(1, 0, 0x10000, 12, NEXT, 1);
    g.desc(1, 1, 0x11000, out.len() as u32, 0, 0);
    g.post(1, 0);
    assert_eq!(g.used(1), (0, 0));
    let mut buf = vec![0u8; 2048];
    let seen = loop {
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n > 0,
            "the host saw nothing: {}",
            std::io::Error::last_os_error()
        );
        // The kernel's own frames (router solicitations) pass by.
        if buf[12..14] == [0x88, 0xb5] {
            break buf[..n as usize].to_vec();
        }
    };
    assert_eq!(seen, out, "the frame out of the tap as the guest wrote it");

    // A hostile transmit chain (a buffer the device would write) is
    // completed with nothing sent; the next frame goes out.
    g.desc(1, 2, 0x12000, 64, WRITE, 0);
    g.post(1, 2);
    assert_eq!(g.used(1), (2, 0));
    assert_eq!(
        device
            .counters
            .bad_chains
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Receive: a buffer posted, a frame sent into the tap from the host.
    g.desc(0, 0, 0x20000, 2048, WRITE, 0);
    g.post(0, 0);
    let inbound = frame([0x52, 0x54, 0, 1, 2, 3], 2, 500);
    // SAFETY: send from our buffer.
    let n = unsafe { libc::send(host.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
    assert_eq!(n, inbound.len() as isize);
    let (head, len) = loop {
        let (head, len) = g.used(0);
        let mut ty = [0u8; 2];
        g.mem
            .read_slice(&mut ty, GuestAddress(0x20000 + 12 + 12))
            .expect("r");
        if ty == [0x88, 0xb5] {
            break (head, len);
        }
        // Another frame the kernel sent (IPv6 solicitations): repost.
        g.post(0, 0);
    };
    assert_eq!(head, 0);
    assert_eq!(len as usize, 12 + inbound.len());
    let mut got = vec![0u8; inbound.len()];
    g.mem
        .read_slice(&mut got, GuestAddress(0x20000 + 12))
        .expect("r");
    assert_eq!(got, inbound, "the frame in the guest's buffer");
    let num_buffers: u16 = g.mem.read_obj(GuestAddress(0x20000 + 10)).expect("r");
    assert_eq!(num_buffers, 1);

    // The control queue: one pair is fine, five are refused.
    for (pairs, want) in [(1u16, 0u8), (5, 1)] {
        g.mem
            .write_slice(&[4u8, 0], GuestAddress(0x30000))
            .expect("w");
        g.mem.write_obj(pairs, GuestAddress(0x30010)).expect("w");
        g.mem.write_obj(0xffu8, GuestAddress(0x30020)).expect("w");
        g.desc(2, 0, 0x30000, 2, NEXT, 1);
        g.desc(2, 1, 0x30010, 2, NEXT, 2);
        g.desc(2, 2, 0x30020, 1, WRITE, 0);
        g.post(2, 0);
        assert_eq!(g.used(2), (0, 1));
        let ack: u8 = g.mem.read_obj(GuestAddress(0x30020)).expect("r");
        assert_eq!(ack, want, "{pairs} pairs");
    }
}
