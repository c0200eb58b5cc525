//! What net-backend's tests share: a tap's host side seen through a raw
//! socket, frames of the tests' own, a network namespace per test, and
//! the test frontend set up for a NIC.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use test_infra::vhost_frontend::{Setup, TestFrontend, NEXT};
use vm_memory::{Bytes, GuestAddress};

/// Queue size of the tests' queues.
pub const QSIZE: u16 = 16;

/// A frontend of `pairs` queue pairs and the control queue, every
/// feature offered acked but EVENT_IDX.
pub fn connect(sock: &Path, pairs: usize) -> TestFrontend {
    TestFrontend::connect(
        sock,
        &Setup {
            queues: 2 * pairs + 1,
            queue_size: QSIZE,
            ..Setup::default()
        },
    )
}

/// Puts `frame` behind `header` on transmit queue `q` (two buffers at
/// `at` and `at + 0x1000`, chain head 0) and kicks.
pub fn transmit(g: &mut TestFrontend, q: usize, header: &[u8; 12], frame: &[u8], at: u64) {
    g.mem.write_slice(header, GuestAddress(at)).expect("w");
    g.mem
        .write_slice(frame, GuestAddress(at + 0x1000))
        .expect("w");
    g.desc(q, 0, at, 12, NEXT, 1);
    g.desc(q, 1, at + 0x1000, frame.len() as u32, 0, 0);
    g.post(q, 0);
}

/// A raw socket on the tap's host side: what the host sees of the guest.
pub fn packet_socket(ifname: &str) -> OwnedFd {
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

/// A frame of ours: to `dst`, an experimental ethertype, `payload` bytes.
pub fn frame(dst: [u8; 6], tag: u8, payload: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..payload).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    f
}

/// Sends `f` into the tap from its host side.
pub fn send(host: &OwnedFd, f: &[u8]) {
    // SAFETY: send from our buffer.
    let n = unsafe { libc::send(host.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
}

/// The next frame of ours (by its ethertype) the host sees.
pub fn next_frame(host: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n > 0,
            "the host saw nothing: {}",
            std::io::Error::last_os_error()
        );
        if buf[12..14] == [0x88, 0xb5] {
            return buf[..n as usize].to_vec();
        }
    }
}

/// Whether this test can make taps (root, /dev/net/tun); a loud line if not.
pub fn can_make_taps(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0 && Path::new("/dev/net/tun").exists();
    if !ok {
        eprintln!("SKIPPED: net-backend {test}: needs root and /dev/net/tun");
    }
    ok
}

/// Moves this thread (and the processes it starts) into a network
/// namespace of its own, without IPv6 (whose solicitations would be
/// frames the test did not send).
pub fn in_own_netns() {
    // SAFETY: unshare of the network namespace, no memory involved.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let st = Command::new("sysctl")
        .args(["-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"])
        .status()
        .expect("sysctl");
    assert!(st.success());
}

pub fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}
