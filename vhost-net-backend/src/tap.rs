//! A multi-queue tap: one descriptor per queue pair, each carrying frames
//! behind a 12-byte virtio-net header (the guest's own header, so a frame
//! moves between guest memory and the tap without being rewritten), with
//! the offloads the guest negotiated turned on.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const TUNSETIFF: u64 = 0x4004_54ca;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
const TUNSETQUEUE: u64 = 0x4004_54d9;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;

/// The tap's offloads (linux/if_tun.h TUN_F_*).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// The virtio-net header of a modern device (num_buffers included).
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap name {0:?}: 1 to 15 bytes, no '/' or NUL")]
    BadName(String),
    #[error("opening /dev/net/tun: {0}")]
    Open(io::Error),
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// struct ifreq: the name, then a union of which the flags are used.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// One queue of the tap.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
    name: String,
}

/// Opens `queues` queues of tap `name` (made if it does not exist; as a
/// persistent tap made by `ip tuntap add ... multi_queue vnet_hdr`, it is
/// used as it is), each nonblocking, with 12-byte virtio-net headers.
pub fn open(name: &str, queues: usize) -> Result<Vec<TapQueue>, TapError> {
    if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains('\0') {
        return Err(TapError::BadName(name.to_string()));
    }
    (0..queues).map(|_| TapQueue::open(name)).collect()
}

impl TapQueue {
    fn open(name: &str) -> Result<TapQueue, TapError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let q = TapQueue {
            fd: OwnedFd::from(file),
            name: name.to_string(),
        };
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        q.ioctl("TUNSETIFF", TUNSETIFF, (&raw mut req).cast())?;
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        q.ioctl(
            "TUNSETVNETHDRSZ",
            TUNSETVNETHDRSZ,
            (&raw mut hdr_len).cast(),
        )?;
        Ok(q)
    }

    fn ioctl(&self, what: &'static str, req: u64, arg: *mut libc::c_void) -> Result<(), TapError> {
        // SAFETY: a tun ioctl with the argument its number names, alive
        // for the call (every caller passes one).
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg) } < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Attaches this queue to the tap (the kernel spreads frames for the
    /// guest over attached queues only) or detaches it: a pair the driver
    /// does not use must not be given frames nobody reads.
    pub fn set_attached(&self, attached: bool) -> Result<(), TapError> {
        let mut req = IfReq {
            name: [0; 16],
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        self.ioctl("TUNSETQUEUE", TUNSETQUEUE, (&raw mut req).cast())
    }

    /// The tap's MTU (the host's setting, `ip link set NAME mtu N`): what
    /// the guest is told its link carries.
    pub fn mtu(&self) -> Result<u16, TapError> {
        let err = |source: io::Error| TapError::Ioctl {
            name: self.name.clone(),
            what: "SIOCGIFMTU",
            source,
        };
        // SAFETY: socket(2) with constant arguments; the result is checked
        // and owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just made, owned from here.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..self.name.len()].copy_from_slice(self.name.as_bytes());
        // SAFETY: SIOCGIFMTU fills ifr_mtu, an int at the union's start
        // (where `flags` and `_pad` lie), inside the struct.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU as _, &raw mut req) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let mut mtu = [0u8; 4];
        mtu[..2].copy_from_slice(&req.flags.to_ne_bytes());
        mtu[2..].copy_from_slice(&req._pad[..2]);
        Ok(i32::from_ne_bytes(mtu).clamp(68, 65535) as u16)
    }

    /// Turns on the offloads the guest can take in (TUN_F_*): frames to
    /// it may then carry partial checksums and be larger than the MTU.
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags as the argument itself.
        // SAFETY: TUNSETOFFLOAD with a value argument.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame (header first) into `iov`: its length, or None when
    /// none is waiting.
    pub fn read_frame(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: readv into buffers the caller vouches for (guest memory
        // it holds mapped, or its own).
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        match n {
            n if n >= 0 => Ok(Some(n as usize)),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Writes one frame (header first) from `iov`: false when the tap's
    /// queue is full (try again later).
    pub fn write_frame(&self, iov: &[libc::iovec]) -> io::Result<bool> {
        // SAFETY: writev from buffers the caller vouches for.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        match n {
            n if n >= 0 => Ok(true),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                e => Err(e),
            },
        }
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
