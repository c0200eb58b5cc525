//! The control API: HTTP/1.1 with JSON bodies over a Unix socket, so curl
//! drives it (`curl --unix-socket vm.sock http://localhost/api/v1/vm.info`).
//!
//! | request | does |
//! |---|---|
//! | GET /api/v1/vm.info | state, vCPUs, memory, uptime, disks |
//! | PUT /api/v1/vm.pause | parks every vCPU |
//! | PUT /api/v1/vm.resume | lets them run again |
//! | PUT /api/v1/vm.shutdown | ends the VM (body `{"force": true}`: at once) |
//! | GET /api/v1/vm.metrics | exits by reason and time in the guest, per vCPU |
//! | GET /api/v1/vm.wait | answers once the VM has ended: its exit status, how it ended, the console bytes written |
//!
//! `vm.wait` answers before the process tears the VM down: a supervisor
//! records the end without waiting for KVM to release the VM (a grace
//! period after any ioeventfd: milliseconds, measured), and has the whole
//! console once it has read `console_bytes` from the vmm's output.

pub mod client;
pub mod types;

use crossbeam_channel::Sender;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tracing::warn;

pub use client::{call, response, send};
use types::{
    Metrics, ShutdownAnswer, ShutdownRequest, SnapshotRequest, StateAnswer, VmEnd, VmInfo,
};

use crate::config::VmConfig;
use crate::control::Control;
use crate::events::VmEvent;

pub struct Api {
    pub control: Arc<Control>,
    pub config: VmConfig,
    pub events: Sender<VmEvent>,
    pub ended: Arc<EndWaiters>,
    /// Snapshots go to the thread that owns the devices.
    pub snapshots: Sender<crate::snapshot::Request>,
}

/// How long a snapshot may take (its memory copy is the bulk: seconds
/// for gigabytes) before the API answers that it did not finish.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(600);

pub const WAIT: &str = "/api/v1/vm.wait";

/// An endpoint's path: `vm.info` is `/api/v1/vm.info`.
pub fn endpoint(name: &str) -> String {
    format!("/api/v1/{name}")
}

/// A 200 with `answer` as its body.
fn ok(answer: impl Serialize) -> (u16, Value) {
    match serde_json::to_value(answer) {
        Ok(v) => (200, v),
        Err(e) => (500, json!({ "error": e.to_string() })),
    }
}

/// Whether a read of `s` would not block (data or its end), without
/// waiting.
fn readable_now(s: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own, for an open descriptor, with no
    // timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// The clients of `vm.wait`, answered when the VM has ended (at once
/// after that).
#[derive(Default)]
pub struct EndWaiters {
    state: Mutex<EndState>,
}

#[derive(Default)]
struct EndState {
    waiting: Vec<UnixStream>,
    ended: Option<Value>,
}

impl EndWaiters {
    /// Connections held open at once; more are refused (503).
    const MAX_WAITING: usize = 16;

    fn add(&self, mut stream: UnixStream) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(end) = &st.ended {
            respond(&mut stream, 200, end);
            return;
        }
        // Clients that went away (a waiter interrupted) give their place
        // up (they have nothing more to say: a connection that turned
        // readable has ended, or sent something it should not have).
        st.waiting.retain(|s| !readable_now(s));
        if st.waiting.len() >= Self::MAX_WAITING {
            respond(
                &mut stream,
                503,
                &json!({ "error": format!("{} clients wait already", Self::MAX_WAITING) }),
            );
        } else {
            st.waiting.push(stream);
        }
    }

    /// The VM has ended: `end` goes to every client waiting, and to any
    /// that asks from now on.
    pub fn answer(&self, end: &VmEnd) {
        let end = serde_json::to_value(end).unwrap_or(Value::Null);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for mut stream in st.waiting.drain(..) {
            respond(&mut stream, 200, &end);
        }
        st.ended = Some(end);
    }
}

/// A parsed request: method, path, body.
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

const MAX_BODY: usize = 64 * 1024;
const ENDPOINTS: [&str; 7] = [
    "/api/v1/vm.info",
    "/api/v1/vm.snapshot",
    "/api/v1/vm.metrics",
    "/api/v1/vm.pause",
    "/api/v1/vm.resume",
    "/api/v1/vm.shutdown",
    WAIT,
];

/// A request's JSON body, or the default when it has none.
fn body_or_default<T: Default + serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, serde_json::Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad request line {0:?}")]
    RequestLine(String),
    #[error("bad Content-Length {0:?}")]
    ContentLength(String),
    #[error("a body of {len} bytes (at most {MAX_BODY})")]
    BodyTooLarge { len: usize },
}

pub fn read_request(stream: &mut impl Read) -> Result<Request, RequestError> {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(RequestError::RequestLine(line.trim_end().to_string()));
    };
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().map_err(|_| {
                    // A hostile header is not echoed whole.
                    RequestError::ContentLength(v.trim().chars().take(32).collect())
                })?;
            }
        }
    }
    if len > MAX_BODY {
        return Err(RequestError::BodyTooLarge { len });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
    })
}

fn respond(stream: &mut UnixStream, code: u16, body: &Value) {
    let reason = match code {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Internal Server Error",
    };
    let text = body.to_string();
    // One write: a client reading up to the end gets it in one piece.
    let _ = stream.write_all(
        format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        )
        .as_bytes(),
    );
}

impl Api {
    /// Answers one request: (status code, JSON body).
    pub fn handle(&self, req: &Request) -> (u16, Value) {
        let err = |code, msg: String| (code, json!({ "error": msg }));
        let c = &self.control;
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/api/v1/vm.info") => ok(VmInfo {
                state: c.state(),
                cpus: self.config.cpus,
                memory_bytes: self.config.memory,
                kernel: self.config.kernel.clone(),
                disks: self.config.disks.clone(),
                uptime_ms: c.started.elapsed().as_millis() as u64,
            }),
            ("GET", "/api/v1/vm.metrics") => ok(Metrics { vcpus: c.metrics() }),
            ("PUT", "/api/v1/vm.pause") => {
                if c.pause(Duration::from_secs(5)) {
                    ok(StateAnswer { state: c.state() })
                } else {
                    err(409, format!("cannot pause a VM that is {:?}", c.state()))
                }
            }
            ("PUT", "/api/v1/vm.resume") => {
                if c.resume() {
                    ok(StateAnswer { state: c.state() })
                } else {
                    err(409, format!("cannot resume a VM that is {:?}", c.state()))
                }
            }
            ("PUT", "/api/v1/vm.shutdown") => {
                let ShutdownRequest { force } = match body_or_default(&req.body) {
                    Ok(r) => r,
                    Err(e) => {
                        return err(
                            400,
                            format!("vm.shutdown takes {{\"force\": true|false}}: {e}"),
                        )
                    }
                };
                // Told to the VM once the answer is out (see `serve`): a
                // forced end exits at once, and a client must not find the
                // connection closed without its answer.
                ok(ShutdownAnswer {
                    state: crate::control::RunState::Stopping,
                    force,
                })
            }
            ("PUT", "/api/v1/vm.snapshot") => {
                let Ok(SnapshotRequest { dir }) = serde_json::from_slice(&req.body) else {
                    return err(
                        400,
                        "vm.snapshot takes {\"dir\": \"/absolute/path\"}".into(),
                    );
                };
                if !dir.is_absolute() {
                    return err(
                        400,
                        format!(
                            "{}: the snapshot directory must be an absolute path",
                            dir.display()
                        ),
                    );
                }
                if c.state() != crate::control::RunState::Paused {
                    return err(
                        409,
                        format!(
                            "cannot snapshot a VM that is {:?}: pause it first",
                            c.state()
                        ),
                    );
                }
                let (reply, answer) = crossbeam_channel::bounded(1);
                if self
                    .snapshots
                    .send(crate::snapshot::Request { dir, reply })
                    .is_err()
                {
                    return err(409, "the VM is ending".into());
                }
                match answer.recv_timeout(SNAPSHOT_DEADLINE) {
                    Ok(Ok(answer)) => ok(answer),
                    Ok(Err(e)) => err(500, cli_support::report(&anyhow::Error::new(e))),
                    Err(_) => err(
                        500,
                        format!("the snapshot did not finish within {SNAPSHOT_DEADLINE:?}"),
                    ),
                }
            }
            (_, p) if ENDPOINTS.contains(&p) => {
                err(405, format!("{} is not allowed on {p}", req.method))
            }
            (_, p) => err(404, format!("no such endpoint: {p}")),
        }
    }

    /// Serves the socket until the process ends.
    pub fn serve(self, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::confine(&crate::seccomp::API) {
                    warn!("api: {e}: the control API is off");
                    return;
                }
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    match read_request(&mut stream) {
                        Ok(req) if req.method == "GET" && req.path == WAIT => {
                            self.ended.add(stream);
                        }
                        Ok(req) => {
                            let (code, body) = self.handle(&req);
                            respond(&mut stream, code, &body);
                            if req.path == "/api/v1/vm.shutdown" && code == 200 {
                                let force = body["force"].as_bool().unwrap_or(false);
                                let _ = self.events.send(VmEvent::Shutdown { force });
                            }
                        }
                        Err(e) => {
                            warn!("api: {e}");
                            respond(&mut stream, 400, &json!({ "error": e.to_string() }));
                        }
                    }
                }
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: Vec::new(),
        }
    }

    #[test]
    fn unknown_endpoints_and_wrong_methods_are_refused_by_name() {
        let (tx, _rx) = crossbeam_channel::unbounded();
        let api = Api {
            control: Arc::new(Control::new(1).expect("control")),
            config: VmConfig {
                kernel: "k".into(),
                initrd: None,
                cmdline: String::new(),
                cpus: 1,
                vcpu_affinity: None,
                memory: 1 << 30,
                disks: Vec::new(),
                nets: Vec::new(),
                fs: Vec::new(),
                api_socket: None,
                serial: crate::config::SerialOut::None,
                virtio_console: true,
                serial_input: false,
                seccomp: true,
                restore: None,
                restore_memory: Default::default(),
            },
            events: tx,
            ended: Arc::default(),
            snapshots: crossbeam_channel::unbounded().0,
        };
        // Every answer is what the typed client reads.
        let (code, body) = api.handle(&req("GET", "/api/v1/vm.info"));
        let info: VmInfo = client::decode("vm.info", code, body.to_string()).expect("vm.info");
        assert_eq!((info.cpus, info.memory_bytes), (1, 1 << 30));
        let shutdown = |body: &str| {
            let mut r = req("PUT", "/api/v1/vm.shutdown");
            r.body = body.into();
            let (code, body) = api.handle(&r);
            client::decode::<ShutdownAnswer>("vm.shutdown", code, body.to_string())
        };
        assert!(!shutdown("").expect("no body").force);
        assert!(shutdown(r#"{"force": true}"#).expect("forced").force);
        // A body it cannot read is refused by name, not taken as "not forced".
        let e = shutdown(r#"{"force": "yes"}"#).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("force"), "{e}");
        assert_eq!(api.handle(&req("PUT", WAIT)).0, 405);
        let (code, body) = api.handle(&req("DELETE", "/api/v1/vm.info"));
        assert_eq!(code, 405);
        assert!(body["error"].as_str().unwrap().contains("DELETE"));
        assert_eq!(api.handle(&req("GET", "/api/v1/vm.explode")).0, 404);
        // Resuming what runs is a conflict, not a success.
        assert_eq!(api.handle(&req("PUT", "/api/v1/vm.resume")).0, 409);
    }

    /// Waiters that went away give their place up; past the limit a new
    /// one is refused; at the end every waiter hears it, and later ones at
    /// once.
    #[test]
    fn end_waiters_are_bounded_pruned_and_all_answered() {
        let ended = EndWaiters::default();
        let answer = |c: &mut UnixStream| {
            let mut text = String::new();
            c.read_to_string(&mut text).expect("answer");
            text
        };
        // As many as allowed, then gone: their places are free again.
        for _ in 0..EndWaiters::MAX_WAITING {
            let (server, client) = UnixStream::pair().expect("pair");
            ended.add(server);
            drop(client);
        }
        let mut kept = Vec::new();
        for _ in 0..EndWaiters::MAX_WAITING {
            let (server, client) = UnixStream::pair().expect("pair");
            ended.add(server);
            kept.push(client);
        }
        // One too many, all of them still there: refused.
        let (server, mut refused) = UnixStream::pair().expect("pair");
        ended.add(server);
        assert!(answer(&mut refused).starts_with("HTTP/1.1 503"));
        ended.answer(&VmEnd {
            exit_status: 3,
            ended: "the guest exited with 3".into(),
            console_bytes: 0,
        });
        for c in &mut kept {
            let text = answer(c);
            assert!(
                text.starts_with("HTTP/1.1 200") && text.contains("\"exit_status\":3"),
                "{text}"
            );
        }
        let (server, mut late) = UnixStream::pair().expect("pair");
        ended.add(server);
        assert!(answer(&mut late).contains("\"exit_status\":3"));
    }

    #[test]
    fn requests_parse_and_oversized_or_broken_ones_are_refused() {
        let r = read_request(&mut &b"PUT /api/v1/vm.shutdown HTTP/1.1\r\nContent-Length: 15\r\n\r\n{\"force\": true}"[..]).unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("PUT", "/api/v1/vm.shutdown")
        );
        assert_eq!(r.body, b"{\"force\": true}");
        assert!(read_request(&mut &b"garbage\r\n\r\n"[..]).is_err());
        assert!(
            read_request(&mut &b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"[..]).is_err()
        );
    }
}
