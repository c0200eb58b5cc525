//! The exports one process serves, and the control socket that changes
//! them at runtime (`--control PATH`), the way qemu-storage-daemon's
//! `block-export-add` / `block-export-del` work. The protocol (QMP-shaped
//! JSON lines: `export-add`, `export-del`, `export-list`,
//! `export-snapshot`, `export-merge`, their answers and error classes) is
//! the `blk-control` crate's, shared with its clients; here each command
//! is carried out on [`Exports`].

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blk_control::{
    Answer, Command, Counters, Done, ErrorClass, ExportInfo, GroupInfo, Refusal, Reply, Sealed,
    Session, Settings,
};
use thiserror::Error;
use vhost::vhost_user::Listener;

use crate::export::{BaseIo, Export, ExportSpec, SharedFiles};
use crate::server::{self, StopHandle};

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("--socket {socket}: {what}")]
    Socket {
        socket: PathBuf,
        what: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("opening the image")]
    Open {
        image: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no export on {0}")]
    NoSuchExport(PathBuf),
    #[error("an export already listens on {0}")]
    Exists(PathBuf),
    #[error("closing {image}")]
    Close {
        image: PathBuf,
        #[source]
        source: image_format::Error,
    },
    #[error("starting its thread")]
    Thread(#[source] std::io::Error),
    #[error("snapshot {name:?} of {image}")]
    Snapshot {
        image: PathBuf,
        name: String,
        #[source]
        source: Box<image_format::Error>,
    },
    #[error("merging snapshot {name:?} of {image} into the layer above it")]
    Merge {
        image: PathBuf,
        name: String,
        #[source]
        source: Box<image_format::Error>,
    },
    #[error(transparent)]
    Group(#[from] crate::limits::GroupError),
}

/// An export whose image is open and whose socket listens.
pub struct Prepared {
    export: Arc<Export>,
    listener: Listener,
}

impl Prepared {
    /// Closes the image again (a start that failed half-way).
    pub fn abandon(self) {
        let _ = self.export.shutdown().map(drop);
        let _ = std::fs::remove_file(&self.export.spec.socket);
    }
}

struct Running {
    export: Arc<Export>,
    stop: Arc<StopHandle>,
    thread: JoinHandle<()>,
}

/// Every export of the process.
pub struct Exports {
    shared: SharedFiles,
    base_io: BaseIo,
    shadow_dir: Option<PathBuf>,
    running: Mutex<BTreeMap<PathBuf, Running>>,
    /// Sockets an add is opening right now: clients are served in
    /// parallel, and a second add of one socket is refused as existing
    /// (not left to fail later on the image's lock or the bound socket).
    adding: Mutex<std::collections::BTreeSet<PathBuf>>,
    /// The rate-limit groups exports share.
    groups: crate::limits::Groups,
    /// Held across an export's close, change and serve-again (a seal, a
    /// merge): another client's seal of the same export waits for it
    /// instead of finding no export in between (a client that died
    /// mid-way leaves its change running here).
    closing: Mutex<()>,
}

/// Makes way for a listening socket at `path`: only a socket nobody listens
/// on (one a dead process left: connecting is refused) is removed. A live
/// socket, a regular file, a directory or anything else there is an error,
/// so a mistyped `--socket` never destroys a file or steals another
/// backend's socket.
pub fn clear_stale_socket(path: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |what: &str, source| ControlError::Socket {
        socket: path.to_path_buf(),
        what: what.to_string(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("cannot look at it", Some(e))),
    };
    let kind = meta.file_type();
    if !kind.is_socket() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_file() {
            "a regular file"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else {
            "not a socket"
        };
        return Err(err(
            &format!("{what} is there; refusing to replace it (give a path for the socket)"),
            None,
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(err(
            "another process is listening on it (a backend already serving there?)",
            None,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing a stale socket nobody listens on");
            std::fs::remove_file(path).map_err(|e| err("removing the stale socket", Some(e)))
        }
        Err(e) => Err(err("probing it", Some(e))),
    }
}

impl Exports {
    pub fn new(base_io: BaseIo, shadow_dir: Option<PathBuf>) -> Exports {
        Exports {
            shared: SharedFiles::default(),
            base_io,
            shadow_dir,
            running: Mutex::new(BTreeMap::new()),
            adding: Mutex::default(),
            groups: Default::default(),
            closing: Mutex::default(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `spec.image`, listens on `spec.socket` and serves it.
    pub fn add(&self, spec: ExportSpec) -> Result<(), ControlError> {
        let socket = spec.socket.clone();
        {
            let running = self.running();
            let mut adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
            if running.contains_key(&socket) || !adding.insert(socket.clone()) {
                return Err(ControlError::Exists(socket));
            }
        }
        let added = self.prepare(spec).and_then(|p| self.serve(p));
        // After serve: the export is in `running` before its claim goes.
        self.adding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&socket);
        added
    }

    /// Opens the image and listens, serving nothing yet (a process drops
    /// its privileges and confines itself between the two steps).
    pub fn prepare(&self, spec: ExportSpec) -> Result<Prepared, ControlError> {
        let socket = spec.socket.clone();
        if self.running().contains_key(&socket) {
            return Err(ControlError::Exists(socket));
        }
        let group = spec
            .limit_group
            .as_deref()
            .map(|g| self.groups.get(g))
            .transpose()?;
        clear_stale_socket(&socket)?;
        let image = spec.image.clone();
        let export = Arc::new(
            Export::open(
                spec,
                group,
                &self.shared,
                self.base_io,
                self.shadow_dir.as_deref(),
            )
            .map_err(|e| ControlError::Open {
                image: image.clone(),
                source: e.into(),
            })?,
        );
        let listener = Listener::new(&socket, false).map_err(|e| ControlError::Socket {
            socket: socket.clone(),
            what: format!("cannot listen on it: {e}"),
            source: None,
        })?;
        tracing::info!(socket = %socket.display(), image = %image.display(), "serving");
        Ok(Prepared { export, listener })
    }

    /// Starts serving a prepared export (its session thread).
    pub fn serve(&self, p: Prepared) -> Result<(), ControlError> {
        let Prepared { export, listener } = p;
        let socket = export.spec.socket.clone();
        let stop = Arc::new(StopHandle::default());
        let (e2, s2) = (Arc::clone(&export), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name(format!("export {}", socket.display()))
            .spawn(move || {
                if let Err(e) = sandbox::confine(&crate::seccomp::SESSION) {
                    tracing::error!("not serving {}: {e}", e2.spec.socket.display());
                    return;
                }
                server::serve(e2, listener, s2)
            })
            .map_err(ControlError::Thread)?;
        self.running().insert(
            socket,
            Running {
                export,
                stop,
                thread,
            },
        );
        Ok(())
    }

    /// Ends the export's session, closes its image, removes its socket.
    pub fn remove(&self, socket: &Path) -> Result<(), ControlError> {
        let r = self
            .running()
            .remove(socket)
            .ok_or_else(|| ControlError::NoSuchExport(socket.to_path_buf()))?;
        r.stop.stop();
        let _ = r.thread.join();
        let closed = r.export.shutdown().map(drop);
        let _ = std::fs::remove_file(socket);
        closed.map_err(|source| ControlError::Close {
            image: r.export.spec.image.clone(),
            source,
        })
    }

    /// The export's image as it is now, sealed as snapshot `name`
    /// (`IMAGE@NAME`, as `img snapshot -c`), the export serving on a fresh
    /// top over it: the session ends (what is in flight completes; a
    /// vhost-user frontend reconnects and carries on), the image closes
    /// clean, the snapshot is taken, and the export is served again,
    /// whether the snapshot could be taken or not. Meant for a paused VM
    /// (a snapshot of the VM and its disks at one instant).
    pub fn snapshot(&self, socket: &Path, name: &str) -> Result<PathBuf, ControlError> {
        self.while_closed(socket, |spec| {
            image_format::ops::snapshot_create(&image_format::RealEnv, &spec.image, name).map_err(
                |source| ControlError::Snapshot {
                    image: spec.image.clone(),
                    name: name.to_string(),
                    source: Box::new(source),
                },
            )
        })
    }

    /// `change` done to the export's image while nothing serves it: the
    /// session ended (in-flight I/O completes; a frontend reconnects),
    /// the image closed clean, then served again whatever `change` did.
    fn while_closed<T>(
        &self,
        socket: &Path,
        change: impl FnOnce(&ExportSpec) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let _one_at_a_time = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        let spec = self
            .running()
            .get(socket)
            .map(|r| r.export.current_spec())
            .ok_or_else(|| ControlError::NoSuchExport(socket.to_path_buf()))?;
        self.remove(socket)?;
        let changed = change(&spec);
        let served = self.add(spec);
        let out = changed?;
        served?;
        Ok(out)
    }

    /// Snapshot `name` of the export's image folded into the layer above
    /// it and removed (as `img snapshot -d`), so a chain that a VM's
    /// backups and snapshots lengthen stays short while it runs: the
    /// session ends (in-flight I/O completes; the frontend reconnects),
    /// the image closes clean, the layer above takes what the snapshot
    /// held that it lacks, and the export is served again, merged or not.
    /// Refused (nothing changed) while another layer stands on the
    /// snapshot.
    pub fn merge(&self, socket: &Path, name: &str) -> Result<(), ControlError> {
        self.while_closed(socket, |spec| {
            let env: Arc<dyn image_format::Env> = Arc::new(image_format::RealEnv);
            image_format::ops::snapshot_delete(&env, &spec.image, name, &mut |_, _| {}).map_err(
                |source| ControlError::Merge {
                    image: spec.image.clone(),
                    name: name.to_string(),
                    source: Box::new(source),
                },
            )
        })
    }

    /// Every export, with its session state and counters.
    pub fn list(&self) -> Vec<ExportInfo> {
        let running = self.running();
        running
            .iter()
            .map(|(socket, r)| {
                let s = &r.export.spec;
                ExportInfo {
                    socket: socket.clone(),
                    image: s.image.clone(),
                    readonly: s.readonly,
                    num_queues: s.num_queues,
                    queue_size: s.queue_size,
                    session: if r.stop.connected() {
                        Session::Connected
                    } else {
                        Session::Waiting
                    },
                    counters: Counters {
                        sessions: r.stop.sessions(),
                        requests: r.export.requests(),
                        failed_requests: r.export.failed_requests(),
                        throttled: r.export.limits.throttled(),
                    },
                    limits: r.export.limits.limits(),
                    limit_group: r.export.limits.group(),
                }
            })
            .collect()
    }

    /// New rate limits and group for the export on `socket`, effective
    /// for its next request.
    pub fn set_limits(
        &self,
        socket: &Path,
        limits: rate_limit::Limits,
        group: Option<String>,
    ) -> Result<(), ControlError> {
        limits.check().map_err(crate::limits::GroupError::from)?;
        let group = group.as_deref().map(|g| self.groups.get(g)).transpose()?;
        let running = self.running();
        let r = running
            .get(socket)
            .ok_or_else(|| ControlError::NoSuchExport(socket.to_path_buf()))?;
        r.export.limits.set(limits, group);
        Ok(())
    }

    /// Makes rate-limit group `name` or gives it new limits.
    pub fn set_group(&self, name: &str, limits: rate_limit::Limits) -> Result<(), ControlError> {
        Ok(self.groups.set(name, limits)?)
    }

    /// Removes group `name` (refused while an export is in it).
    pub fn remove_group(&self, name: &str) -> Result<(), ControlError> {
        let members = self
            .running()
            .iter()
            .filter(|(_, r)| r.export.limits.group().as_deref() == Some(name))
            .map(|(s, _)| s.clone())
            .collect();
        Ok(self.groups.remove(name, members)?)
    }

    /// Every group, with the exports in it.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let running = self.running();
        self.groups
            .list()
            .into_iter()
            .map(|(name, limits, throttled)| GroupInfo {
                exports: running
                    .iter()
                    .filter(|(_, r)| r.export.limits.group().as_deref() == Some(name.as_str()))
                    .map(|(s, _)| s.clone())
                    .collect(),
                name,
                limits,
                throttled,
            })
            .collect()
    }

    /// Ends every session (in parallel), then closes every image; whether
    /// every image closed cleanly.
    pub fn shutdown_all(&self) -> bool {
        let all: Vec<(PathBuf, Running)> =
            std::mem::take(&mut *self.running()).into_iter().collect();
        for (_, r) in &all {
            r.stop.stop();
        }
        let mut clean = true;
        for (_, r) in all {
            let _ = r.thread.join();
            if let Err(e) = r.export.shutdown() {
                cli_support::say!(
                    "blk-backend: error: closing {}: {e}",
                    r.export.spec.image.display()
                );
                clean = false;
            }
        }
        clean
    }
}

/// A command's paths, refused unless absolute: the backend's working
/// directory is not its client's, so a relative path would name some other
/// file (and resolving one needs getcwd, which the control thread's
/// sandbox forbids).
fn absolute(command: &str, paths: &[&Path]) -> Result<(), Refusal> {
    match paths.iter().find(|p| p.is_relative()) {
        Some(rel) => Err(Refusal::generic(format!(
            "{} is a relative path: {command} takes absolute paths",
            rel.display()
        ))),
        None => Ok(()),
    }
}

/// A command the exports refused, with its QMP error class (a client tells
/// "already there" and "not there" from real failures by it).
fn refusal(e: ControlError) -> Refusal {
    let class = match e {
        ControlError::Exists(_) => ErrorClass::ExportExists,
        ControlError::NoSuchExport(_) => ErrorClass::DeviceNotFound,
        _ => ErrorClass::GenericError,
    };
    Refusal {
        class,
        desc: cli_support::report(&e.into()),
    }
}

/// One command line: its reply.
pub fn execute(exports: &Exports, defaults: &Settings, line: &str) -> Reply<Answer> {
    Command::from_line(line)
        .and_then(|command| run(exports, defaults, command))
        .into()
}

/// One command, done: what it returns.
fn run(exports: &Exports, defaults: &Settings, command: Command) -> Result<Answer, Refusal> {
    let done = |r: Result<(), ControlError>| r.map(|()| Answer::Done(Done {})).map_err(refusal);
    let name = command.name();
    match command {
        Command::ExportAdd(args) => {
            absolute(name, &[&args.socket, &args.image])?;
            let spec = args
                .resolve(defaults)
                .map_err(|e| Refusal::generic(e.to_string()))?;
            done(exports.add(spec))
        }
        Command::ExportDel(e) => {
            absolute(name, &[&e.socket])?;
            done(exports.remove(&e.socket))
        }
        Command::ExportList => Ok(Answer::Exports(exports.list())),
        Command::ExportSnapshot(s) => {
            absolute(name, &[&s.socket])?;
            let snapshot = exports.snapshot(&s.socket, &s.name).map_err(refusal)?;
            Ok(Answer::Sealed(Sealed { snapshot }))
        }
        Command::ExportMerge(s) => {
            absolute(name, &[&s.socket])?;
            done(exports.merge(&s.socket, &s.name))
        }
        Command::ExportSetLimits(l) => {
            absolute(name, &[&l.socket])?;
            done(exports.set_limits(&l.socket, l.limits, l.limit_group))
        }
        Command::GroupSet(g) => done(exports.set_group(&g.name, g.limits)),
        Command::GroupDel(g) => done(exports.remove_group(&g.name)),
        Command::GroupList => Ok(Answer::Groups(exports.groups())),
    }
}

/// Clients served at once; more wait to be accepted (a client that
/// connects and says nothing holds one of them, not the socket).
const MAX_CLIENTS: usize = 64;

/// Serves the control socket: each client on a thread of its own, so that
/// a client that connects and says nothing (or a slow one) keeps no other
/// waiting, a line per command. The threads run under this thread's
/// filter, which they inherit.
pub fn serve_control(exports: Arc<Exports>, defaults: Settings, listener: UnixListener) {
    let clients = Arc::new(Clients::default());
    let mut spawn_failures = cli_support::log_limit::LogLimit::default();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let seat = Clients::seat(&clients);
        let (exports, defaults) = (Arc::clone(&exports), defaults.clone());
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let _seat = seat;
                sandbox::inherited(&crate::seccomp::CONTROL);
                serve_client(&exports, &defaults, stream);
            });
        // The seat went back with the closure; the client is dropped.
        if let Err(e) = spawned {
            spawn_failures.emit(
                || tracing::warn!("control socket: cannot start a thread for a client: {e}"),
                |n| tracing::warn!("control socket: {n} more clients dropped the same way"),
            );
        }
    }
}

/// How many clients are being served, waited on when all seats are taken.
#[derive(Default)]
struct Clients {
    count: Mutex<usize>,
    freed: std::sync::Condvar,
}

/// One client's place, given back when dropped (whatever ends its thread).
struct Seat(Arc<Clients>);

impl Clients {
    fn seat(clients: &Arc<Clients>) -> Seat {
        let mut n = clients.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_CLIENTS {
            n = clients.freed.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Seat(Arc::clone(clients))
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        *self.0.count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// One client's commands, a line each, until it hangs up.
fn serve_client(exports: &Exports, defaults: &Settings, stream: UnixStream) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        // Bounded lines: a client cannot make this thread hold more.
        let mut line = String::new();
        match (&mut reader).take(1 << 16).read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= 1 << 16 {
            let too_long = Reply::<Done>::Error(Refusal::generic("line too long"));
            let _ = out.write_all(too_long.to_line().as_bytes());
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = execute(exports, defaults, &line).to_line();
        // One write per reply (formatted in place it is many sends).
        if out.write_all(reply.as_bytes()).is_err() {
            break;
        }
    }
}
