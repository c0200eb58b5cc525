//! A virtio device served by a vhost-user backend (a disk: vhost-user-blk;
//! a NIC: vhost-user-net): the frontend's whole lifecycle in one place
//! (features, configuration, memory table, inflight region, vrings,
//! reconnect, postcopy). The guest's queues never pass through this
//! process: the backend gets the kick ioeventfds and the MSI irqfds
//! directly. What differs between device types (the id, the queues, what
//! the vmm adds to the configuration and the features) is a [`Kind`].
//!
//! While a lazy restore's pager is still filling guest memory, a backend
//! that offers vhost-user's postcopy messages (PAGEFAULT) is asked to
//! register its mapping with a userfaultfd and hand it over
//! (POSTCOPY_ADVISE, POSTCOPY_LISTEN, the memory table whose reply names
//! the backend's addresses, then the table's ack): the pager serves its
//! faults, and the disk runs at once. POSTCOPY_END once memory is filled.

pub mod watch;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::deadline;
use super::io_error::{self, FailedQueue};
use super::virtio_pci::{
    BackendLink, DeviceError, Interrupts, QueueConfig, ReconnectError, VirtioDevice, NO_VECTOR,
};
use crate::config::Endpoint;
use crate::snapshot::pager::{PagerError, PagerHandle};
use cli_support::log_limit::LogLimit;
use cli_support::path_wait;
use virtio_bindings::{virtio_blk, virtio_config, virtio_ids, virtio_net};

// Feature masks, from the bits virtio-bindings names.
const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
const VIRTIO_BLK_F_RO: u64 = 1 << virtio_blk::VIRTIO_BLK_F_RO;
const VIRTIO_BLK_F_MQ: u64 = 1 << virtio_blk::VIRTIO_BLK_F_MQ;
const VIRTIO_NET_F_MAC: u64 = 1 << virtio_net::VIRTIO_NET_F_MAC;
const VIRTIO_NET_F_STATUS: u64 = 1 << virtio_net::VIRTIO_NET_F_STATUS;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << virtio_net::VIRTIO_NET_F_CTRL_VQ;
const VIRTIO_NET_F_MQ: u64 = 1 << virtio_net::VIRTIO_NET_F_MQ;
const VIRTIO_NET_S_LINK_UP: u16 = virtio_net::VIRTIO_NET_S_LINK_UP as u16;

/// What kind of virtio device a backend serves, and what the vmm adds to
/// what the backend offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk: the backend's configuration (capacity, geometry), the
    /// `queues` the vmm was given, read-only if asked.
    Block { readonly: bool, queues: u16 },
    /// virtio-net: the MAC the vmm gives it, `pairs` receive/transmit
    /// queue pairs, and the control queue if the backend serves one.
    Net { mac: [u8; 6], pairs: u16 },
    /// virtio-fs: the tag the guest mounts it by and its request queues
    /// (after the high-priority queue), both the vmm's.
    Fs { tag: String, request_queues: u16 },
}

impl Kind {
    /// How log lines and errors name it.
    pub fn noun(&self) -> &'static str {
        match self {
            Kind::Block { .. } => "disk",
            Kind::Net { .. } => "nic",
            Kind::Fs { .. } => "fs",
        }
    }

    fn device_id(&self) -> u16 {
        match self {
            Kind::Block { .. } => virtio_ids::VIRTIO_ID_BLOCK as u16,
            Kind::Net { .. } => virtio_ids::VIRTIO_ID_NET as u16,
            Kind::Fs { .. } => virtio_ids::VIRTIO_ID_FS as u16,
        }
    }

    /// Configuration space bytes asked of the backend: virtio-blk's up to
    /// its write-zeroes fields, virtio-net's up to its MTU.
    fn config_len(&self) -> u32 {
        match self {
            Kind::Block { .. } => 60,
            Kind::Net { .. } => 12,
            Kind::Fs { .. } => 40,
        }
    }

    /// The most virtqueues the device can have (the control queue
    /// counted).
    fn max_queues(&self) -> u16 {
        match self {
            Kind::Block { queues, .. } => *queues,
            Kind::Net { pairs, .. } => 2 * pairs + 1,
            Kind::Fs { request_queues, .. } => 1 + request_queues,
        }
    }

    /// The virtqueues the guest sees, given what the backend offers.
    fn queues(&self, backend_features: u64) -> u16 {
        match self {
            Kind::Block { queues, .. } => *queues,
            Kind::Net { pairs, .. } => {
                2 * pairs + u16::from(backend_features & VIRTIO_NET_F_CTRL_VQ != 0)
            }
            Kind::Fs { request_queues, .. } => 1 + request_queues,
        }
    }

    /// The backend's configuration as the guest sees it: a disk's queue
    /// count is the vmm's; a NIC's MAC, link state and queue pairs are
    /// the vmm's (a backend without CONFIG gives none of it).
    fn config(&self, from_backend: Option<Vec<u8>>, queues: u16) -> Vec<u8> {
        let mut c = from_backend.unwrap_or_default();
        c.resize(self.config_len() as usize, 0);
        match self {
            Kind::Block { .. } => c[34..36].copy_from_slice(&queues.to_le_bytes()),
            Kind::Net { mac, pairs } => {
                c[0..6].copy_from_slice(mac);
                c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
                c[8..10].copy_from_slice(&pairs.to_le_bytes());
            }
            Kind::Fs {
                tag,
                request_queues,
            } => {
                // The tag, NUL-padded to 36 bytes; the request queues.
                c[..36].fill(0);
                c[..tag.len().min(36)].copy_from_slice(&tag.as_bytes()[..tag.len().min(36)]);
                c[36..40].copy_from_slice(&u32::from(*request_queues).to_le_bytes());
            }
        }
        c
    }

    /// The features the guest is offered.
    fn features(&self, backend: u64, queues: u16) -> u64 {
        let mut f = backend & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        match self {
            Kind::Block { readonly, .. } => {
                if queues == 1 {
                    f &= !VIRTIO_BLK_F_MQ;
                }
                if *readonly {
                    f |= VIRTIO_BLK_F_RO;
                }
            }
            Kind::Net { pairs, .. } => {
                // Several pairs need the control queue to be chosen from.
                if *pairs == 1 || f & VIRTIO_NET_F_CTRL_VQ == 0 {
                    f &= !VIRTIO_NET_F_MQ;
                }
                f |= VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS;
            }
            Kind::Fs { .. } => {}
        }
        f | VIRTIO_F_VERSION_1
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("{socket}: cannot connect (is a backend listening there?): {err}")]
    Connect { socket: String, err: std::io::Error },
    #[error("{socket}: {what}: {err}")]
    Protocol {
        socket: String,
        what: &'static str,
        err: Exchange,
    },
    #[error(
        "{socket}: the backend came back with other features (virtio {features:#x}, \
         protocol {protocol:#x}; the session was set up with virtio {session_features:#x}, \
         protocol {session_protocol:#x})"
    )]
    Changed {
        socket: String,
        features: u64,
        protocol: u64,
        session_features: u64,
        session_protocol: u64,
    },
    #[error("{socket}: the backend offers {offered} queues, {wanted} were asked for")]
    Queues {
        socket: String,
        offered: u64,
        wanted: u16,
    },
    #[error(
        "{socket}: the backend serves {backend_pairs} queue pairs (its control queue after them), \
         this NIC has {pairs}: give num_queues={} or run the backend with {pairs} queue pair(s)",
        2 * backend_pairs
    )]
    NicPairs {
        socket: String,
        backend_pairs: u64,
        pairs: u16,
    },
    #[error("{socket}: ring address {gpa:#x} is not in guest memory")]
    RingAddress { socket: String, gpa: u64 },
    #[error("{socket}: the backend went away and was not back within {waited_ms} ms")]
    Away { socket: String, waited_ms: u128 },
    #[error("{socket}: the used ring of queue {queue}: {err}")]
    UsedRing {
        socket: String,
        queue: usize,
        err: vm_memory::GuestMemoryError,
    },
    #[error("{socket}: the {what} eventfd: {err}")]
    Eventfd {
        socket: String,
        what: &'static str,
        err: std::io::Error,
    },
    #[error("{socket}: its backend's page faults: {err}")]
    Paging { socket: String, err: PagerError },
}

/// How one vhost-user exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Exchange {
    /// The deadline passed (and shut the connection down).
    #[error(
        "no reply within {} ms (reply_timeout_ms): the backend counts as gone",
        .0.as_millis()
    )]
    NoReply(Duration),
    #[error("{0}")]
    Vhost(vhost::Error),
    #[error("the backend has no protocol features (needed for its configuration)")]
    NoProtocolFeatures,
    #[error("the backend cannot report its configuration (CONFIG), which a disk needs")]
    NoConfig,
    #[error("the backend's reply names no addresses of its mappings")]
    NoMappingAddresses,
}

pub struct VhostUserDevice {
    kind: Kind,
    config: Vec<u8>,
    /// The connection and the session on it, shared with the device's watcher
    /// (it also holds what the backend offered at connect and the disk's
    /// shape, fixed for the device's life).
    link: Arc<Link>,
    /// What waited for the socket at start, kept (closing it at once costs
    /// a grace period).
    _socket_watch: path_wait::Kept,
}

/// The connection to the backend and the session set up on it. The disk
/// watcher reconnects through it with only its own lock: the transport's
/// lock, which every vCPU exit to the device's registers takes, is never
/// held while a backend is waited for.
struct Link {
    socket: PathBuf,
    kind: Kind,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: u16,
    queue_size: u16,
    mem: GuestMemoryMmap,
    reply_timeout: Duration,
    /// A lazy restore's pager, while it may still be filling memory.
    pager: Option<PagerHandle>,
    session: Mutex<Session>,
    /// Signalled (with `session`) each time a reconnect installs a new
    /// connection.
    reconnected: std::sync::Condvar,
}

struct Session {
    frontend: Frontend,
    /// The backend's faults on guest memory go to the restore's pager.
    paging: bool,
    inflight: Option<(VhostUserInflight, File)>,
    started: Vec<usize>,
    /// A guest driver can start and stop the device at will: those lines
    /// are logged within a limit.
    activations: LogLimit,
    /// The running session, to replay after a reconnect.
    active: Option<Active>,
}

/// What the driver set up, as the backend must be told again after a
/// reconnect.
struct Active {
    features: u64,
    queues: Vec<(usize, QueueConfig)>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

/// A connected session: the frontend, what the backend offered (the
/// protocol features without PAGEFAULT, which depends on the moment, not
/// on the backend), its configuration, and whether it pages through the
/// restore's pager.
struct Handshake {
    frontend: Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    /// None: the backend does not report one (a NIC may not).
    config: Option<Vec<u8>>,
    paging: bool,
}

/// A vhost-user error as the user should read it: a deadline that passed
/// (and shut the connection down) says so.
fn describe(e: vhost::Error, armed: &deadline::Armed, reply_timeout: Duration) -> Exchange {
    if armed.fired() {
        Exchange::NoReply(reply_timeout)
    } else {
        Exchange::Vhost(e)
    }
}

/// Connects, negotiates protocol features, reads the configuration and
/// sends the memory table.
fn handshake(
    path: &Path,
    kind: &Kind,
    mem: &GuestMemoryMmap,
    reply_timeout: Duration,
    pager: Option<&PagerHandle>,
) -> Result<Handshake, VhostUserError> {
    // The device named by its kind: `disk /run/vm.sock`, `nic ...`.
    let socket = format!("{} {}", kind.noun(), path.display());
    // Connected here rather than by `Frontend::connect`, which retries a
    // refused connection 5 times 100 ms apart on its own: the callers
    // decide when to look again (a start's connect timeout, a reconnect's
    // backoff).
    let stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|err| VhostUserError::Connect {
            socket: socket.clone(),
            err,
        })?;
    let mut frontend = Frontend::from_stream(stream, kind.max_queues() as u64);
    let armed = deadline::arm(frontend.as_raw_fd(), reply_timeout);
    let p = |what: &'static str| {
        let socket = socket.clone();
        let armed = &armed;
        move |e: vhost::Error| VhostUserError::Protocol {
            socket: socket.clone(),
            what,
            err: describe(e, armed, reply_timeout),
        }
    };
    frontend.set_owner().map_err(p("SET_OWNER"))?;
    let backend_features = frontend.get_features().map_err(p("GET_FEATURES"))?;
    if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(VhostUserError::Protocol {
            socket,
            what: "features",
            err: Exchange::NoProtocolFeatures,
        });
    }
    let offered = frontend
        .get_protocol_features()
        .map_err(p("GET_PROTOCOL_FEATURES"))?;
    let mut wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    let pager = pager.filter(|p| p.serving());
    if pager.is_some() {
        wanted |= VhostUserProtocolFeatures::PAGEFAULT;
    }
    let protocol = offered & wanted;
    if !protocol.contains(VhostUserProtocolFeatures::CONFIG) && matches!(kind, Kind::Block { .. }) {
        return Err(VhostUserError::Protocol {
            socket,
            what: "protocol features",
            err: Exchange::NoConfig,
        });
    }
    let num_queues = kind.queues(backend_features);
    frontend
        .set_protocol_features(protocol)
        .map_err(p("SET_PROTOCOL_FEATURES"))?;
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let n = frontend.get_queue_num().map_err(p("GET_QUEUE_NUM"))?;
        if n < num_queues as u64 {
            return Err(VhostUserError::Queues {
                socket,
                offered: n,
                wanted: num_queues,
            });
        }
        // The control queue's index is the backend's: after all its pairs.
        if let Kind::Net { pairs, .. } = kind {
            if backend_features & VIRTIO_NET_F_CTRL_VQ != 0 && n != 2 * u64::from(*pairs) + 1 {
                return Err(VhostUserError::NicPairs {
                    socket,
                    backend_pairs: n.saturating_sub(1) / 2,
                    pairs: *pairs,
                });
            }
        }
    } else if num_queues > 1 {
        return Err(VhostUserError::Queues {
            socket,
            offered: 1,
            wanted: num_queues,
        });
    }
    let config = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        let len = kind.config_len();
        let (_, config) = frontend
            .get_config(
                0,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .map_err(p("GET_CONFIG"))?;
        Some(config)
    } else {
        None
    };
    let regions: Vec<VhostUserMemoryRegionInfo> = mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<_, _>>()
        .map_err(p("memory regions"))?;
    let paging = match pager {
        Some(pager) if protocol.contains(VhostUserProtocolFeatures::PAGEFAULT) => {
            let uffd = frontend.postcopy_advise().map_err(p("POSTCOPY_ADVISE"))?;
            frontend.postcopy_listen().map_err(p("POSTCOPY_LISTEN"))?;
            let bases = frontend
                .set_mem_table(&regions)
                .map_err(p("SET_MEM_TABLE"))?
                .ok_or_else(|| VhostUserError::Protocol {
                    socket: socket.clone(),
                    what: "SET_MEM_TABLE",
                    err: Exchange::NoMappingAddresses,
                })?;
            // The pager serves its faults before the backend may touch
            // the memory (it waits for the table's ack).
            pager
                .adopt(&socket, uffd.into(), &bases)
                .map_err(|err| VhostUserError::Paging {
                    socket: socket.clone(),
                    err,
                })?;
            frontend
                .postcopy_ack_mem_regions(vhost::vhost_user::message::FrontendReq::SET_MEM_TABLE)
                .map_err(p("SET_MEM_TABLE's ack"))?;
            true
        }
        _ => {
            frontend
                .set_mem_table(&regions)
                .map_err(p("SET_MEM_TABLE"))?;
            false
        }
    };
    Ok(Handshake {
        frontend,
        features: backend_features,
        protocol: protocol - VhostUserProtocolFeatures::PAGEFAULT,
        config,
        paging,
    })
}

impl VhostUserDevice {
    /// Connects and learns what the backend offers; the memory table goes
    /// over now, the rings when the driver is ready.
    /// `pager`: a lazy restore's, whose faults a capable backend's go to.
    pub fn connect(
        cfg: &Endpoint,
        kind: Kind,
        mem: &GuestMemoryMmap,
        pager: Option<PagerHandle>,
    ) -> Result<Self, VhostUserError> {
        let reply_timeout = Duration::from_millis(cfg.reply_timeout_ms);
        // A backend still starting (its socket absent or not listening) is
        // waited for up to `connect_timeout_ms`, looking again after 1, 2,
        // 4 ms (at most 5 ms apart); any other failure (a socket this user
        // may not open, a path that is no socket) ends the wait at once.
        let give_up = std::time::Instant::now() + Duration::from_millis(cfg.connect_timeout_ms);
        let mut pause = Duration::from_millis(1);
        let mut socket_watch = path_wait::Kept::default();
        let shook = loop {
            // No socket yet: waited for (an inotify watch), not a socket
            // made, refused and closed in a loop (a fleet's vmms waited
            // through 10-20 such attempts each, 3 % of the fleet's CPU).
            if !cfg.socket.exists() && std::time::Instant::now() < give_up {
                socket_watch = path_wait::wait_for(&cfg.socket, Some(give_up), &[]).1;
            }
            match handshake(&cfg.socket, &kind, mem, reply_timeout, pager.as_ref()) {
                Err(VhostUserError::Connect { err, .. })
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && std::time::Instant::now() < give_up =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
                r => break r?,
            }
        };
        let Handshake {
            frontend,
            features: backend_features,
            protocol,
            config,
            paging,
        } = shook;
        let noun = kind.noun();
        info!(socket = %cfg.socket.display(), features = format_args!("{backend_features:#x}"), paging, "{noun} connected");
        let num_queues = kind.queues(backend_features);
        Ok(VhostUserDevice {
            config: kind.config(config, num_queues),
            link: Arc::new(Link {
                socket: cfg.socket.clone(),
                kind: kind.clone(),
                backend_features,
                protocol,
                num_queues,
                queue_size: cfg.queue_size,
                mem: mem.clone(),
                reply_timeout,
                pager,
                session: Mutex::new(Session {
                    frontend,
                    paging,
                    inflight: None,
                    started: Vec::new(),
                    activations: LogLimit::default(),
                    active: None,
                }),
                reconnected: std::sync::Condvar::new(),
            }),
            kind,
            _socket_watch: socket_watch,
        })
    }
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session, once its connection is up: a backend that hung up
    /// (a disk sealed live ends its session; a restarted backend) is
    /// waited for while the device's watcher reconnects, up to `limit`.
    /// Without this, a second snapshot right after a first met the
    /// sealed disk's dead connection (GET_VRING_BASE: socket is broken).
    fn connected(
        &self,
        limit: Duration,
    ) -> Result<std::sync::MutexGuard<'_, Session>, VhostUserError> {
        let until = std::time::Instant::now() + limit;
        let mut s = self.lock();
        loop {
            if !hung_up(&s.frontend) {
                return Ok(s);
            }
            let now = std::time::Instant::now();
            if now >= until {
                return Err(VhostUserError::Away {
                    socket: self.socket_name(),
                    waited_ms: limit.as_millis(),
                });
            }
            s = self
                .reconnected
                .wait_timeout(s, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The device as errors name it: its kind and its socket.
    fn socket_name(&self) -> String {
        format!("{} {}", self.kind.noun(), self.socket.display())
    }

    fn err<'a>(
        &'a self,
        what: &'static str,
        armed: &'a deadline::Armed,
    ) -> impl Fn(vhost::Error) -> VhostUserError + 'a {
        move |e| VhostUserError::Protocol {
            socket: self.socket_name(),
            what,
            err: describe(e, armed, self.reply_timeout),
        }
    }

    fn host_addr(&self, gpa: u64) -> Result<u64, VhostUserError> {
        self.mem
            .get_host_address(vm_memory::GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| VhostUserError::RingAddress {
                socket: self.socket_name(),
                gpa,
            })
    }

    /// Tells the backend about every ring of `a` and starts them.
    fn start_rings(&self, s: &mut Session, a: &Active) -> Result<(), VhostUserError> {
        let armed = deadline::arm(s.frontend.as_raw_fd(), self.reply_timeout);
        // What the driver took of what the backend offered: the features
        // the vmm adds itself (a NIC's MAC and link status, a disk's
        // read-only bit) are not the backend's to be told.
        let f = (a.features & self.backend_features)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        s.frontend
            .set_features(f)
            .map_err(self.err("SET_FEATURES", &armed))?;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            && s.inflight.is_none()
        {
            let want = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: self.num_queues,
                queue_size: self.queue_size,
            };
            let got = s
                .frontend
                .get_inflight_fd(&want)
                .map_err(self.err("GET_INFLIGHT_FD", &armed))?;
            s.inflight = Some(got);
        }
        if let Some((info, file)) = &s.inflight {
            s.frontend
                .set_inflight_fd(info, file.as_raw_fd())
                .map_err(self.err("SET_INFLIGHT_FD", &armed))?;
        }
        s.started.clear();
        for (k, (i, q)) in a.queues.iter().enumerate() {
            let (i, q) = (*i, *q);
            let data = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: self.host_addr(q.desc)?,
                used_ring_addr: self.host_addr(q.used)?,
                avail_ring_addr: self.host_addr(q.avail)?,
                log_addr: None,
            };
            // Where the ring resumes: what the guest has seen completed
            // (the backend adds what its inflight region says was fetched).
            let used_idx: u16 = self
                .mem
                .read_obj(vm_memory::GuestAddress(q.used + 2))
                .map_err(|err| VhostUserError::UsedRing {
                    socket: self.socket_name(),
                    queue: i,
                    err,
                })?;
            let fe = &mut s.frontend;
            fe.set_vring_num(i, q.size)
                .map_err(self.err("SET_VRING_NUM", &armed))?;
            fe.set_vring_base(i, used_idx)
                .map_err(self.err("SET_VRING_BASE", &armed))?;
            fe.set_vring_addr(i, &data)
                .map_err(self.err("SET_VRING_ADDR", &armed))?;
            fe.set_vring_call(i, &a.calls[k])
                .map_err(self.err("SET_VRING_CALL", &armed))?;
            fe.set_vring_kick(i, &a.kicks[k])
                .map_err(self.err("SET_VRING_KICK", &armed))?;
            fe.set_vring_enable(i, true)
                .map_err(self.err("SET_VRING_ENABLE", &armed))?;
            s.started.push(i);
        }
        Ok(())
    }
}

impl Link {
    /// Stops every started ring (GET_VRING_BASE: the backend completes
    /// what it has in flight first). A backend that fails one is hung up
    /// on (one deadline for all the rings, not one each): the error names
    /// the ring.
    fn stop_rings(&self, s: &mut Session) -> Result<(), (usize, VhostUserError)> {
        let armed = deadline::arm(s.frontend.as_raw_fd(), self.reply_timeout);
        for i in std::mem::take(&mut s.started) {
            if let Err(e) = s.frontend.get_vring_base(i) {
                let err = describe(e, &armed, self.reply_timeout);
                hang_up(&s.frontend);
                return Err((
                    i,
                    VhostUserError::Protocol {
                        socket: self.socket_name(),
                        what: "GET_VRING_BASE",
                        err,
                    },
                ));
            }
        }
        Ok(())
    }
}

/// Whether the backend's end of the connection is gone (its session
/// ended): the socket reads end-of-stream or errs.
fn hung_up(frontend: &Frontend) -> bool {
    let mut p = libc::pollfd {
        fd: frontend.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one pollfd of an open socket, not waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Ends a session whose backend stopped answering or broke the protocol
/// mid-way (the stream is out of step after that): the device's watcher sees
/// the connection end and reconnects, replaying what the driver set up,
/// or fails the guest's requests past its timeout.
fn hang_up(frontend: &Frontend) {
    // SAFETY: shutdown on the connection's socket, which stays open (a
    // reconnect replaces it).
    unsafe { libc::shutdown(frontend.as_raw_fd(), libc::SHUT_RDWR) };
}

impl BackendLink for Link {
    fn connection_fd(&self) -> Option<RawFd> {
        Some(self.lock().frontend.as_raw_fd())
    }

    /// One attempt to reconnect to a backend that went away and to replay
    /// the session: same features, the same inflight region (so it
    /// resumes what was in flight), the same rings, kicks and interrupts,
    /// each ring resuming at the used index the guest's memory holds. The
    /// handshake (where a slow backend is waited for) holds no lock.
    fn reconnect(&self) -> Result<(), ReconnectError> {
        let Handshake {
            frontend,
            features,
            protocol,
            paging,
            ..
        } = handshake(
            &self.socket,
            &self.kind,
            &self.mem,
            self.reply_timeout,
            self.pager.as_ref(),
        )
        .map_err(|e| ReconnectError::NotYet(e.into()))?;
        if features != self.backend_features || protocol != self.protocol {
            return Err(ReconnectError::Incompatible(Box::new(
                VhostUserError::Changed {
                    socket: self.socket_name(),
                    features,
                    protocol: protocol.bits(),
                    session_features: self.backend_features,
                    session_protocol: self.protocol.bits(),
                },
            )));
        }
        let mut s = self.lock();
        s.frontend = frontend;
        s.paging = paging;
        let Some(active) = s.active.take() else {
            self.reconnected.notify_all();
            return Ok(());
        };
        let r = self.start_rings(&mut s, &active);
        s.active = Some(active);
        r.map_err(|e| ReconnectError::NotYet(e.into()))?;
        self.reconnected.notify_all();
        let noun = self.kind.noun();
        info!(socket = %self.socket.display(), "{noun} reconnected");
        Ok(())
    }

    fn pages_through_pager(&self) -> bool {
        self.lock().paging
    }

    fn end_paging(&self) -> Result<(), DeviceError> {
        let mut s = self.lock();
        if !s.paging {
            return Ok(());
        }
        let armed = deadline::arm(s.frontend.as_raw_fd(), self.reply_timeout);
        s.frontend
            .postcopy_end()
            .map_err(self.err("POSTCOPY_END", &armed))?;
        s.paging = false;
        Ok(())
    }

    fn give_up(&self) -> bool {
        // A NIC whose backend is gone is a link that stays down: its
        // frames wait in their rings, nothing fails.
        if !matches!(self.kind, Kind::Block { .. }) {
            return false;
        }
        let s = self.lock();
        let Some(active) = &s.active else {
            return false;
        };
        let mut queues = Vec::new();
        for (k, (i, q)) in active.queues.iter().enumerate() {
            let (Ok(kick), Ok(call)) = (active.kicks[k].try_clone(), active.calls[k].try_clone())
            else {
                return false;
            };
            queues.push(FailedQueue::take_over(
                &self.mem,
                *i,
                *q,
                kick,
                call,
                s.inflight.as_ref(),
            ));
        }
        let mem = self.mem.clone();
        let name = self.socket_name();
        std::thread::Builder::new()
            .name("disk-ioerr".into())
            .spawn(move || io_error::serve(mem, queues, name))
            .is_ok()
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_id(&self) -> u16 {
        self.kind.device_id()
    }

    fn features(&self) -> u64 {
        self.kind
            .features(self.link.backend_features, self.link.num_queues)
    }

    fn num_queues(&self) -> u16 {
        self.link.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.link.queue_size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // A disk's `writeback` (offset 32) is the only writable field.
        if matches!(self.kind, Kind::Block { .. }) && offset == 32 && data.len() == 1 {
            let _ = self
                .link
                .lock()
                .frontend
                .set_config(32, VhostUserConfigFlags::WRITABLE, data);
        }
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueConfig],
        kicks: &[EventFd],
        interrupts: &dyn Interrupts,
    ) -> Result<(), DeviceError> {
        let mut active = Active {
            features,
            queues: Vec::new(),
            kicks: Vec::new(),
            calls: Vec::new(),
        };
        for (i, q) in queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            // A queue without a vector (a polling driver) still gets a
            // call descriptor, one nobody reads: backends such as
            // libvhost-user's write it unconditionally.
            let call = match interrupts
                .notifier(q.vector)
                .filter(|_| q.vector != NO_VECTOR)
            {
                Some(fd) => fd.try_clone(),
                None => EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK),
            }
            .map_err(|err| VhostUserError::Eventfd {
                socket: self.link.socket_name(),
                what: "call",
                err,
            })?;
            let kick = kicks[i]
                .try_clone()
                .map_err(|err| VhostUserError::Eventfd {
                    socket: self.link.socket_name(),
                    what: "kick",
                    err,
                })?;
            active.queues.push((i, *q));
            active.kicks.push(kick);
            active.calls.push(call);
        }
        let link = &self.link;
        let mut s = link.lock();
        match link.start_rings(&mut s, &active) {
            Ok(()) => {
                let (socket, queues) = (self.link.socket.display(), s.started.len());
                s.activations.emit(
                    || info!(%socket, queues, "{} started", self.kind.noun()),
                    |n| info!(%socket, "the driver started the disk {n} more times"),
                );
            }
            Err(e) => {
                // Not the driver's fault: the device is live as far as the
                // guest knows, and its requests wait for the reconnect.
                s.activations.emit(
                    || warn!("{e}: reconnecting"),
                    |n| warn!("{n} more failed starts (not logged one by one)"),
                );
                hang_up(&s.frontend);
            }
        }
        s.active = Some(active);
        Ok(())
    }

    /// Stops the rings (GET_VRING_BASE: the backend completes what it has
    /// in flight first), keeping the session to start them again.
    fn pause(&mut self) -> Result<(), DeviceError> {
        // A backend that ended its session on purpose (a disk sealed
        // live) is back within milliseconds; one that stays away longer
        // than this is gone, and the snapshot says so instead of waiting
        // for it.
        let patience = self.link.reply_timeout.min(Duration::from_secs(5));
        let mut s = self
            .link
            .connected(patience)
            .map_err(|e| Box::new(e) as DeviceError)?;
        self.link
            .stop_rings(&mut s)
            .map_err(|(_, e)| Box::new(e) as DeviceError)
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        let link = &self.link;
        let mut s = link.lock();
        // Started already: the device's watcher reconnected a backend that had
        // gone away (and replayed the rings) since the pause.
        if !s.started.is_empty() {
            return Ok(());
        }
        let Some(active) = s.active.take() else {
            return Ok(());
        };
        let r = link.start_rings(&mut s, &active);
        s.active = Some(active);
        r.map_err(|e| {
            hang_up(&s.frontend);
            Box::new(e) as DeviceError
        })
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "backend_features": self.link.backend_features })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        let saved = state["backend_features"]
            .as_u64()
            .unwrap_or(self.link.backend_features);
        if saved != self.link.backend_features {
            return Err(Box::new(VhostUserError::Changed {
                socket: self.link.socket_name(),
                features: self.link.backend_features,
                protocol: self.link.protocol.bits(),
                session_features: saved,
                session_protocol: self.link.protocol.bits(),
            }));
        }
        Ok(())
    }

    fn backend_link(&self) -> Option<Arc<dyn BackendLink>> {
        Some(Arc::clone(&self.link) as Arc<dyn BackendLink>)
    }

    fn reset(&mut self) {
        let mut s = self.link.lock();
        if let Err((i, e)) = self.link.stop_rings(&mut s) {
            let socket = self.link.socket.display();
            s.activations.emit(
                || warn!(%socket, "stopping queue {i}: {e}"),
                |n| warn!(%socket, "{n} more failed stops (not logged one by one)"),
            );
        }
        s.active = None;
        // A reset device starts with a fresh inflight region.
        s.inflight = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a disk and a NIC show the guest of what their backends offer.
    #[test]
    fn each_kind_shows_its_configuration_queues_and_features() {
        let disk = Kind::Block {
            readonly: true,
            queues: 4,
        };
        let backend = (1 << 30) | VIRTIO_BLK_F_MQ | (1 << 9);
        let c = disk.config(Some(vec![7u8; 60]), 1);
        assert_eq!((c.len(), &c[34..36], c[0]), (60, &[1u8, 0][..], 7));
        let f = disk.features(backend, 1);
        assert_eq!(f & VIRTIO_BLK_F_MQ, 0, "one queue: no MQ");
        assert_ne!(f & VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_eq!(f & (1 << 30), 0, "PROTOCOL_FEATURES is vhost-user's");
        assert_eq!(disk.queues(backend), 4);

        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let nic = Kind::Net { mac, pairs: 2 };
        let offered = VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ | (1 << 0);
        assert_eq!(nic.queues(offered), 5, "two pairs and the control queue");
        assert_eq!(nic.queues(0), 4, "no control queue offered");
        let f = nic.features(offered, 5);
        assert_ne!(f & VIRTIO_NET_F_MQ, 0);
        assert_ne!(f & VIRTIO_NET_F_MAC, 0);
        assert_ne!(f & VIRTIO_NET_F_STATUS, 0);
        assert_eq!(
            nic.features(VIRTIO_NET_F_MQ, 4) & VIRTIO_NET_F_MQ,
            0,
            "pairs are chosen through the control queue: none, no MQ"
        );
        // A backend without a configuration: the vmm makes it.
        let c = nic.config(None, 5);
        assert_eq!(c.len(), 12);
        assert_eq!(&c[0..6], &mac);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        // The backend's MTU is kept, its MAC replaced.
        let mut theirs = vec![0xffu8; 12];
        theirs[10..12].copy_from_slice(&1500u16.to_le_bytes());
        let c = nic.config(Some(theirs), 5);
        assert_eq!(&c[0..6], &mac);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        assert_eq!((disk.device_id(), nic.device_id()), (2, 1));
    }
}
