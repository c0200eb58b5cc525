//! A disk served by a vhost-user-blk backend: the frontend's whole
//! lifecycle in one place (features, configuration, memory table, inflight
//! region, vrings). The guest's queues never pass through this process:
//! the backend gets the kick ioeventfds and the MSI irqfds directly.
//!
//! While a lazy restore's pager is still filling guest memory, a backend
//! that offers vhost-user's postcopy messages (PAGEFAULT) is asked to
//! register its mapping with a userfaultfd and hand it over
//! (POSTCOPY_ADVISE, POSTCOPY_LISTEN, the memory table whose reply names
//! the backend's addresses, then the table's ack): the pager serves its
//! faults, and the disk runs at once. POSTCOPY_END once memory is filled.

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
use crate::config::DiskConfig;
use crate::snapshot::pager::{PagerError, PagerHandle};
use cli_support::log_limit::LogLimit;
use cli_support::path_wait;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// virtio-blk configuration space bytes the backend is asked for.
const CONFIG_LEN: u32 = 60;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {socket}: cannot connect (is a backend listening there?): {err}")]
    Connect { socket: String, err: std::io::Error },
    #[error("disk {socket}: {what}: {err}")]
    Protocol {
        socket: String,
        what: &'static str,
        err: Exchange,
    },
    #[error(
        "disk {socket}: the backend came back with other features (virtio {features:#x}, \
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
    #[error("disk {socket}: the backend offers {offered} queues, {wanted} were asked for")]
    Queues {
        socket: String,
        offered: u64,
        wanted: u16,
    },
    #[error("disk {socket}: ring address {gpa:#x} is not in guest memory")]
    RingAddress { socket: String, gpa: u64 },
    #[error("disk {socket}: the used ring of queue {queue}: {err}")]
    UsedRing {
        socket: String,
        queue: usize,
        err: vm_memory::GuestMemoryError,
    },
    #[error("disk {socket}: the {what} eventfd: {err}")]
    Eventfd {
        socket: String,
        what: &'static str,
        err: std::io::Error,
    },
    #[error("disk {socket}: its backend's page faults: {err}")]
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
    #[error("the backend cannot report its configuration (CONFIG)")]
    NoConfig,
    #[error("the backend's reply names no addresses of its mappings")]
    NoMappingAddresses,
}

pub struct VhostUserBlk {
    config: Vec<u8>,
    readonly: bool,
    /// The connection and the session on it, shared with the disk watcher
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
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: u16,
    queue_size: u16,
    mem: GuestMemoryMmap,
    reply_timeout: Duration,
    /// A lazy restore's pager, while it may still be filling memory.
    pager: Option<PagerHandle>,
    session: Mutex<Session>,
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
    config: Vec<u8>,
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
    num_queues: u16,
    mem: &GuestMemoryMmap,
    reply_timeout: Duration,
    pager: Option<&PagerHandle>,
) -> Result<Handshake, DiskError> {
    let socket = path.display().to_string();
    // Connected here rather than by `Frontend::connect`, which retries a
    // refused connection 5 times 100 ms apart on its own: the callers
    // decide when to look again (a start's connect timeout, a reconnect's
    // backoff).
    let stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|err| DiskError::Connect {
            socket: socket.clone(),
            err,
        })?;
    let mut frontend = Frontend::from_stream(stream, num_queues as u64);
    let armed = deadline::arm(frontend.as_raw_fd(), reply_timeout);
    let p = |what: &'static str| {
        let socket = socket.clone();
        let armed = &armed;
        move |e: vhost::Error| DiskError::Protocol {
            socket: socket.clone(),
            what,
            err: describe(e, armed, reply_timeout),
        }
    };
    frontend.set_owner().map_err(p("SET_OWNER"))?;
    let backend_features = frontend.get_features().map_err(p("GET_FEATURES"))?;
    if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(DiskError::Protocol {
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
    if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(DiskError::Protocol {
            socket,
            what: "protocol features",
            err: Exchange::NoConfig,
        });
    }
    frontend
        .set_protocol_features(protocol)
        .map_err(p("SET_PROTOCOL_FEATURES"))?;
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let n = frontend.get_queue_num().map_err(p("GET_QUEUE_NUM"))?;
        if n < num_queues as u64 {
            return Err(DiskError::Queues {
                socket,
                offered: n,
                wanted: num_queues,
            });
        }
    } else if num_queues > 1 {
        return Err(DiskError::Queues {
            socket,
            offered: 1,
            wanted: num_queues,
        });
    }
    let (_, config) = frontend
        .get_config(
            0,
            CONFIG_LEN,
            VhostUserConfigFlags::WRITABLE,
            &[0u8; CONFIG_LEN as usize],
        )
        .map_err(p("GET_CONFIG"))?;
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
                .ok_or_else(|| DiskError::Protocol {
                    socket: socket.clone(),
                    what: "SET_MEM_TABLE",
                    err: Exchange::NoMappingAddresses,
                })?;
            // The pager serves its faults before the backend may touch
            // the memory (it waits for the table's ack).
            pager
                .adopt(&socket, uffd.into(), &bases)
                .map_err(|err| DiskError::Paging {
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

impl VhostUserBlk {
    /// Connects and learns what the backend offers; the memory table goes
    /// over now, the rings when the driver is ready.
    /// `pager`: a lazy restore's, whose faults a capable backend's go to.
    pub fn connect(
        cfg: &DiskConfig,
        mem: &GuestMemoryMmap,
        pager: Option<PagerHandle>,
    ) -> Result<Self, DiskError> {
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
            match handshake(
                &cfg.socket,
                cfg.num_queues,
                mem,
                reply_timeout,
                pager.as_ref(),
            ) {
                Err(DiskError::Connect { err, .. })
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
            mut config,
            paging,
        } = shook;
        info!(socket = %cfg.socket.display(), features = format_args!("{backend_features:#x}"), paging, "disk connected");
        // The number of queues the guest sees is the number configured.
        if config.len() >= 36 {
            config[34..36].copy_from_slice(&cfg.num_queues.to_le_bytes());
        }
        Ok(VhostUserBlk {
            config,
            readonly: cfg.readonly,
            link: Arc::new(Link {
                socket: cfg.socket.clone(),
                backend_features,
                protocol,
                num_queues: cfg.num_queues,
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
            }),
            _socket_watch: socket_watch,
        })
    }
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn socket_name(&self) -> String {
        self.socket.display().to_string()
    }

    fn err<'a>(
        &'a self,
        what: &'static str,
        armed: &'a deadline::Armed,
    ) -> impl Fn(vhost::Error) -> DiskError + 'a {
        move |e| DiskError::Protocol {
            socket: self.socket_name(),
            what,
            err: describe(e, armed, self.reply_timeout),
        }
    }

    fn host_addr(&self, gpa: u64) -> Result<u64, DiskError> {
        self.mem
            .get_host_address(vm_memory::GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| DiskError::RingAddress {
                socket: self.socket_name(),
                gpa,
            })
    }

    /// Tells the backend about every ring of `a` and starts them.
    fn start_rings(&self, s: &mut Session, a: &Active) -> Result<(), DiskError> {
        let armed = deadline::arm(s.frontend.as_raw_fd(), self.reply_timeout);
        let f = a.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
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
                .map_err(|err| DiskError::UsedRing {
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
    fn stop_rings(&self, s: &mut Session) -> Result<(), (usize, DiskError)> {
        let armed = deadline::arm(s.frontend.as_raw_fd(), self.reply_timeout);
        for i in std::mem::take(&mut s.started) {
            if let Err(e) = s.frontend.get_vring_base(i) {
                let err = describe(e, &armed, self.reply_timeout);
                hang_up(&s.frontend);
                return Err((
                    i,
                    DiskError::Protocol {
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

/// Ends a session whose backend stopped answering or broke the protocol
/// mid-way (the stream is out of step after that): the disk watcher sees
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
            self.num_queues,
            &self.mem,
            self.reply_timeout,
            self.pager.as_ref(),
        )
        .map_err(|e| ReconnectError::NotYet(e.into()))?;
        if features != self.backend_features || protocol != self.protocol {
            return Err(ReconnectError::Incompatible(Box::new(DiskError::Changed {
                socket: self.socket_name(),
                features,
                protocol: protocol.bits(),
                session_features: self.backend_features,
                session_protocol: self.protocol.bits(),
            })));
        }
        let mut s = self.lock();
        s.frontend = frontend;
        s.paging = paging;
        let Some(active) = s.active.take() else {
            return Ok(());
        };
        let r = self.start_rings(&mut s, &active);
        s.active = Some(active);
        r.map_err(|e| ReconnectError::NotYet(e.into()))?;
        info!(socket = %self.socket.display(), "disk reconnected");
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

impl VirtioDevice for VhostUserBlk {
    fn device_id(&self) -> u16 {
        2
    }

    fn features(&self) -> u64 {
        let mut f = self.link.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.link.num_queues == 1 {
            f &= !VIRTIO_BLK_F_MQ;
        }
        if self.readonly {
            f |= VIRTIO_BLK_F_RO;
        }
        f | VIRTIO_F_VERSION_1
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
        // `writeback` (offset 32) is the only writable field.
        if offset == 32 && data.len() == 1 {
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
            .map_err(|err| DiskError::Eventfd {
                socket: self.link.socket_name(),
                what: "call",
                err,
            })?;
            let kick = kicks[i].try_clone().map_err(|err| DiskError::Eventfd {
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
                    || info!(%socket, queues, "disk started"),
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
        let mut s = self.link.lock();
        self.link
            .stop_rings(&mut s)
            .map_err(|(_, e)| Box::new(e) as DeviceError)
    }

    fn resume(&mut self) -> Result<(), DeviceError> {
        let link = &self.link;
        let mut s = link.lock();
        // Started already: the disk watcher reconnected a backend that had
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
            return Err(Box::new(DiskError::Changed {
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
