//! The backend driven by an in-process frontend (the vhost crate's) with
//! guest memory in a memfd, on a tap in a network namespace of the test's
//! own (nothing is made in the host's): a frame the guest transmits comes
//! out of the tap byte for byte, a frame sent into the tap lands in the
//! guest's receive buffer behind its header, a hostile transmit chain is
//! completed with nothing sent and the queue goes on, and the control
//! queue answers the number of pairs.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use test_infra::vhost_frontend::{NEXT, WRITE};
use test_infra::Patience;
use vhost::vhost_user::Listener;
use vhost_net_backend::connection;
use vhost_net_backend::device::NetDevice;
use vhost_net_backend::tap;
use vhost_user_session::server::StopHandle;
use vm_memory::{Bytes, GuestAddress};

const TAP: &str = "vnbtest0";

/// net-backend's device on `pairs` queues of tap `name`, served on a
/// socket in a temporary directory (kept alive by the caller).
fn serve(name: &str, pairs: usize) -> (Arc<NetDevice>, tempfile::TempDir, std::path::PathBuf) {
    let taps = tap::open(name, pairs).expect("the tap");
    let device = Arc::new(NetDevice::new(taps, QSIZE as usize));
    let dir = tempfile::tempdir().expect("dir");
    let sock = dir.path().join("net.sock");
    let listener = Listener::new(&sock, true).expect("listen");
    let served = Arc::clone(&device);
    std::thread::spawn(move || {
        vhost_user_session::server::serve(
            "net-test",
            listener,
            &StopHandle::default(),
            |session| connection::connect(&served, session),
            || {},
        )
    });
    (device, dir, sock)
}

#[test]
fn frames_move_between_the_guest_and_the_tap_and_hostile_chains_are_refused() {
    if !can_make_taps("frames") {
        return;
    }
    in_own_netns();
    let (device, _dir, sock) = serve(TAP, 1);
    ip(&["link", "set", TAP, "up"]);
    let host = packet_socket(TAP);
    let mut g = connect(&sock, 1);

    // Transmit: header (no offload) then the frame, in two buffers.
    let out = frame([0xff; 6], 1, 300);
    transmit(&mut g, 1, &[0; 12], &out, 0x10000);
    assert_eq!(g.used(1), (0, 0), "the frame on queue 1 completed");
    // The kernel's own frames (router solicitations) pass by.
    let seen = next_frame(&host);
    assert_eq!(seen, out, "the frame out of the tap as the guest wrote it");

    // A hostile transmit chain (a buffer the device would write) is
    // completed with nothing sent; the next frame goes out.
    g.desc(1, 2, 0x12000, 64, WRITE, 0);
    g.post(1, 2);
    assert_eq!(g.used(1), (2, 0));
    assert_eq!(device.counters.bad_chains.load(Ordering::Relaxed), 1);

    // Receive: a buffer posted, a frame sent into the tap from the host.
    g.desc(0, 0, 0x20000, 2048, WRITE, 0);
    g.post(0, 0);
    let inbound = frame([0x52, 0x54, 0, 1, 2, 3], 2, 500);
    send(&host, &inbound);
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

    // A frame longer than the buffer posted is dropped and counted; the
    // buffer takes the next frame whole.
    g.desc(0, 0, 0x20000, 112, WRITE, 0);
    g.post(0, 0);
    send(&host, &frame([0x52, 0x54, 0, 9, 9, 9], 5, 500));
    let small = frame([0x52, 0x54, 0, 1, 2, 3], 6, 60);
    send(&host, &small);
    assert_eq!(g.used(0), (0, 12 + small.len() as u32));
    assert_eq!(device.counters.rx_dropped.load(Ordering::Relaxed), 1);

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

/// The Internet checksum of `b` (folded, not inverted), from `sum`.
fn csum_fold(b: &[u8], mut sum: u32) -> u16 {
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The TCP pseudo-header's sum for an IPv4 frame's addresses and `tcp_len`.
fn pseudo_sum(ip: &[u8], tcp_len: usize) -> u32 {
    u32::from(csum_fold(&ip[12..20], 0)) + 6 + tcp_len as u32
}

/// A TCP/IPv4 frame from 10.0.0.2:40000 to 10.0.0.1:5001, `payload` bytes
/// at sequence `seq`, its IP checksum filled in and its TCP checksum the
/// pseudo-header's sum (what a checksum-offloading sender leaves there).
fn tcp_frame(dst: [u8; 6], seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42, 0x08, 0x00]);
    let total = (20 + 20 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[
        0x01, 0x00, 0x40, 0x00, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ]);
    let c = !csum_fold(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = vec![0x9c, 0x40, 0x13, 0x89];
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    let partial = csum_fold(&[], pseudo_sum(&ip, 20 + payload.len()));
    tcp[16..18].copy_from_slice(&partial.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

/// A virtio-net header for a TCPv4 frame cut into `mss`-byte segments, its
/// TCP checksum left to whoever cuts it.
fn tso_header(mss: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    h[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    h[4..6].copy_from_slice(&mss.to_le_bytes()); // gso_size
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    h
}

/// The next TCP/IPv4 frame the plain tap carries (header stripped), or
/// None when none comes within the wait.
fn next_tcp_frame(plain: &tap::TapQueue) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let mut got = None;
    // A frame crosses the bridge in microseconds.
    let _ = Patience::new("a frame on the plain tap", Duration::from_millis(5)).wait_until(|| {
        while let Some(n) = plain.read_frame(&iov)? {
            if n > 12 + 34 && buf[12 + 12..12 + 14] == [0x08, 0x00] && buf[12 + 23] == 6 {
                got = Some(buf[12..n].to_vec());
                return Ok(true);
            }
        }
        Ok(false)
    });
    got
}

#[test]
fn tso_frames_are_cut_on_the_way_out_and_arrive_whole_on_two_queue_pairs() {
    if !can_make_taps("offloads") {
        return;
    }
    in_own_netns();
    let (device, _dir, sock) = serve("vnbmq0", 2);
    // The wire: a bridge to a plain tap with no offloads (what it reads
    // has been cut into MTU-sized frames by the kernel).
    let plain = tap::open("vnbplain0", 1).expect("a plain tap").remove(0);
    plain.set_offloads(0).expect("no offloads");
    ip(&["link", "add", "br0", "type", "bridge"]);
    for dev in ["vnbmq0", "vnbplain0"] {
        ip(&["link", "set", dev, "master", "br0"]);
        ip(&["link", "set", dev, "up"]);
    }
    ip(&["link", "set", "br0", "up"]);
    let mut g = connect(&sock, 2);

    // Two pairs, asked for on the control queue (queue 4).
    g.mem
        .write_slice(&[4u8, 0], GuestAddress(0x30000))
        .expect("w");
    g.mem.write_obj(2u16, GuestAddress(0x30010)).expect("w");
    g.desc(4, 0, 0x30000, 2, NEXT, 1);
    g.desc(4, 1, 0x30010, 2, NEXT, 2);
    g.desc(4, 2, 0x30020, 1, WRITE, 0);
    g.post(4, 0);
    assert_eq!(
        g.used(4),
        (0, 1),
        "bad chains: {:?}",
        device.counters.bad_chains
    );
    let ack: u8 = g.mem.read_obj(GuestAddress(0x30020)).expect("r");
    assert_eq!(ack, 0, "two pairs accepted");

    // Out, on pair 1's transmit queue (3): one 3000-byte TCP frame with
    // a TSO header; the plain tap gets it as three 1000-byte segments
    // with their sequence numbers and both checksums computed.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13 % 251) as u8).collect();
    let big = tcp_frame([0x02, 0, 0, 0, 0, 0x99], 1000, &payload);
    transmit(&mut g, 3, &tso_header(1000), &big, 0x10000);
    assert_eq!(g.used(3), (0, 0), "the frame on queue 3 completed");
    let mut carried = Vec::new();
    for k in 0..3u32 {
        let seg = next_tcp_frame(&plain).unwrap_or_else(|| panic!("segment {k} of 3"));
        assert_eq!(seg.len(), 14 + 20 + 20 + 1000, "segment {k}'s length");
        let (ip_h, tcp) = (&seg[14..34], &seg[34..]);
        assert_eq!(!csum_fold(ip_h, 0), 0, "segment {k}'s IP checksum");
        assert_eq!(
            !csum_fold(tcp, pseudo_sum(ip_h, tcp.len())),
            0,
            "segment {k}'s TCP checksum"
        );
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        assert_eq!(seq, 1000 + 1000 * k, "segment {k}'s sequence number");
        carried.extend_from_slice(&tcp[20..]);
    }
    assert_eq!(carried, payload, "the segments carry the frame's bytes");

    // Pair 0 transmits too (queue 1): a frame whose TCP checksum is left
    // to the device (NEEDS_CSUM, no GSO) comes out whole with it computed.
    let small = tcp_frame([0x02, 0, 0, 0, 0, 0x99], 7, &payload[..100]);
    let mut csum_only = tso_header(0);
    csum_only[1] = 0; // VIRTIO_NET_HDR_GSO_NONE
    transmit(&mut g, 1, &csum_only, &small, 0x18000);
    assert_eq!(g.used(1), (0, 0), "the frame on queue 1 completed");
    let out = next_tcp_frame(&plain).expect("pair 0's frame");
    assert_eq!(out.len(), small.len());
    let (ip_h, tcp) = (&out[14..34], &out[34..]);
    assert_eq!(
        !csum_fold(tcp, pseudo_sum(ip_h, tcp.len())),
        0,
        "pair 0's frame's TCP checksum, completed"
    );
    assert_eq!(tcp[20..], payload[..100]);

    // In: a 3000-byte TSO frame written into the plain tap crosses the
    // bridge whole (the guest acked GUEST_TSO4, so net-backend's tap takes
    // it unsegmented) into a 64 KiB receive buffer of either pair, its
    // header telling the guest what it is.
    for (q, at) in [(0usize, 0x40000u64), (2, 0x60000)] {
        g.desc(q, 0, at, 65_562, WRITE, 0);
        g.post(q, 0);
    }
    let inbound = tcp_frame([0x02, 0, 0, 0, 0, 0x77], 5000, &payload);
    let hdr = tso_header(1000);
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: inbound.as_ptr() as *mut libc::c_void,
            iov_len: inbound.len(),
        },
    ];
    // What the kernel may send on a new bridge first (seen on a busy
    // machine: a 54-byte frame ahead of the test's), sent here on purpose
    // so the race is always run: a broadcast with no offload.
    let stray = frame([0xff; 6], 3, 40);
    let plain_hdr = [0u8; 12];
    let stray_iov = [
        libc::iovec {
            iov_base: plain_hdr.as_ptr() as *mut libc::c_void,
            iov_len: plain_hdr.len(),
        },
        libc::iovec {
            iov_base: stray.as_ptr() as *mut libc::c_void,
            iov_len: stray.len(),
        },
    ];
    assert!(plain.write_frame(&stray_iov).expect("into the plain tap"));
    assert!(plain.write_frame(&iov).expect("into the plain tap"));
    // The kernel's own frames on the new bridge (whatever a slow machine
    // lets it send first) are not the test's: their buffers are posted
    // again until the test's frame, known by its destination, arrives.
    let mut passed_by = Vec::new();
    let (q, at, len) = loop {
        let (q, (head, len)) = g.used_of(&[0, 2]);
        assert_eq!(head, 0);
        let at = if q == 0 { 0x40000 } else { 0x60000 };
        let mut dst = [0u8; 6];
        g.mem
            .read_slice(&mut dst, GuestAddress(at + 12))
            .expect("r");
        if dst == inbound[..6] {
            break (q, at, len);
        }
        assert!(
            passed_by.len() < 64,
            "the test's frame never came; others did: {passed_by:?}"
        );
        passed_by.push((q, len, dst));
        g.post(q, 0);
    };
    assert_eq!(
        len as usize,
        12 + inbound.len(),
        "the whole frame, once, on queue {q} (frames that passed by: {passed_by:?})"
    );
    let mut h = [0u8; 12];
    g.mem.read_slice(&mut h, GuestAddress(at)).expect("r");
    assert_eq!(h[1], 1, "gso_type TCPV4 in the guest's header: {h:?}");
    assert_eq!(u16::from_le_bytes([h[4], h[5]]), 1000, "gso_size: {h:?}");
    let mut got = vec![0u8; inbound.len()];
    g.mem
        .read_slice(&mut got, GuestAddress(at + 12))
        .expect("r");
    assert_eq!(got[54..], inbound[54..], "the payload, whole");
}
