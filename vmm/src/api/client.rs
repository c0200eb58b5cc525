//! The client side of the control API: raw requests (`vmm api ...`
//! prints what it gets) and typed ones (vmctl).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::types::{
    ApiError, RunState, ShutdownAnswer, ShutdownRequest, SnapshotAnswer, SnapshotRequest,
    StateAnswer, VmEnd, VmInfo,
};
use super::{endpoint, WAIT};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{socket}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The answer could not be read (the vmm ended while it wrote it).
    #[error("reading the vmm's answer")]
    Read(#[source] std::io::Error),
    #[error("encoding the request")]
    Encode(#[source] serde_json::Error),
    /// The vmm refused, saying why.
    #[error("the vmm answered {code}: {message}")]
    Refused { code: u16, message: String },
    #[error("the vmm's answer to {path} is not what it should be: {body:?}")]
    Answer {
        path: String,
        body: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One request, its status code and body.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    response(&mut send(socket, method, path, body)?)
}

/// Sends one request; the connection its response comes on (a `vm.wait`
/// client holds it until the VM ends, waiting for it to turn readable).
pub fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(socket)?;
    let body = body.unwrap_or("");
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    Ok(s)
}

/// A response read to its end: status code (0 when there is none) and body.
pub fn response(s: &mut UnixStream) -> std::io::Result<(u16, String)> {
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// A 200's body as `T`; any other answer as the vmm's refusal.
pub fn decode<T: DeserializeOwned>(path: &str, code: u16, body: String) -> Result<T, ClientError> {
    if code != 200 {
        let message = serde_json::from_str::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or(body);
        return Err(ClientError::Refused { code, message });
    }
    serde_json::from_str(&body).map_err(|source| ClientError::Answer {
        path: path.to_string(),
        body,
        source,
    })
}

/// A VM's control API, asked with typed requests.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    fn ask<T: DeserializeOwned>(
        &self,
        method: &str,
        name: &str,
        body: Option<String>,
    ) -> Result<T, ClientError> {
        let path = endpoint(name);
        let (code, text) =
            call(&self.socket, method, &path, body.as_deref()).map_err(|source| {
                ClientError::Io {
                    socket: self.socket.clone(),
                    source,
                }
            })?;
        decode(&path, code, text)
    }

    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.ask("GET", "vm.info", None)
    }

    /// Whether the VM is paused now.
    pub fn paused(&self) -> Result<bool, ClientError> {
        Ok(self.info()?.state == RunState::Paused)
    }

    pub fn pause(&self) -> Result<StateAnswer, ClientError> {
        self.ask("PUT", "vm.pause", None)
    }

    pub fn resume(&self) -> Result<StateAnswer, ClientError> {
        self.ask("PUT", "vm.resume", None)
    }

    pub fn shutdown(&self, request: ShutdownRequest) -> Result<ShutdownAnswer, ClientError> {
        self.ask("PUT", "vm.shutdown", Some(to_json(&request)?))
    }

    pub fn snapshot(&self, request: &SnapshotRequest) -> Result<SnapshotAnswer, ClientError> {
        self.ask("PUT", "vm.snapshot", Some(to_json(request)?))
    }

    /// Asks for the VM's end: the connection turns readable when the VM
    /// has ended (or the vmm is gone); [`read_end`] reads it.
    pub fn ask_end(&self) -> Result<UnixStream, ClientError> {
        send(&self.socket, "GET", WAIT, None).map_err(|source| ClientError::Io {
            socket: self.socket.clone(),
            source,
        })
    }
}

/// The end report on a connection from [`Client::ask_end`], once it is
/// readable.
pub fn read_end(stream: &mut UnixStream) -> Result<VmEnd, ClientError> {
    let (code, body) = response(stream).map_err(ClientError::Read)?;
    decode(WAIT, code, body)
}

fn to_json(body: &impl serde::Serialize) -> Result<String, ClientError> {
    serde_json::to_string(body).map_err(ClientError::Encode)
}
