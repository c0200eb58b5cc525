//! A blocking client of a blk-backend's control socket: one connection,
//! a command at a time, each answer read into the type its command
//! returns.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::command::{Command, ExportRef, SnapshotArgs};
use crate::reply::{Done, ErrorClass, ExportInfo, Refusal, Reply, Sealed};
use crate::spec::ExportArgs;

/// Why a command got no answer it could use.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connecting to blk-backend's control socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command}: a path is not UTF-8")]
    Encode {
        command: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{command}: sending it to blk-backend")]
    Send {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{command}: no answer from blk-backend")]
    NoAnswer {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{command}: blk-backend answered {line:?}")]
    Answer {
        command: &'static str,
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("blk-backend refused {command}: {}", refusal.desc)]
    Refused {
        command: &'static str,
        refusal: Refusal,
    },
}

impl ClientError {
    /// The backend's refusal, when it refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            ClientError::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }

    /// Whether the backend refused with `class`.
    pub fn is_refused(&self, class: ErrorClass) -> bool {
        self.refusal().is_some_and(|r| r.class == class)
    }

    /// Whether nobody serves the socket (no file there, or nobody
    /// listening on it).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { source, .. } if matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ))
    }
}

/// One connection to a control socket.
pub struct Client {
    stream: UnixStream,
    lines: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the control socket at `path`; each answer waited for
    /// at most `timeout` (`None`: forever).
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Client, ClientError> {
        let connect = || {
            let stream = UnixStream::connect(path)?;
            stream.set_read_timeout(timeout)?;
            let lines = BufReader::new(stream.try_clone()?);
            std::io::Result::Ok(Client { stream, lines })
        };
        connect().map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })
    }

    /// How long an answer may take from now on (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// Serves `image` on `socket` (its other settings in `export`, or the
    /// backend's).
    pub fn add(&mut self, export: ExportArgs) -> Result<(), ClientError> {
        self.call::<Done>(&Command::ExportAdd(export)).map(drop)
    }

    /// Ends the export on `socket` (its image closed cleanly when this
    /// returns).
    pub fn del(&mut self, socket: &Path) -> Result<(), ClientError> {
        let socket = socket.to_path_buf();
        self.call::<Done>(&Command::ExportDel(ExportRef { socket }))
            .map(drop)
    }

    /// Every export, with its session and counters.
    pub fn list(&mut self) -> Result<Vec<ExportInfo>, ClientError> {
        self.call(&Command::ExportList)
    }

    /// The image served on `socket` sealed as `IMAGE@NAME`: that path.
    pub fn snapshot(&mut self, socket: &Path, name: &str) -> Result<PathBuf, ClientError> {
        let args = SnapshotArgs {
            socket: socket.to_path_buf(),
            name: name.to_string(),
        };
        self.call::<Sealed>(&Command::ExportSnapshot(args))
            .map(|s| s.snapshot)
    }

    /// Snapshot `name` of the image served on `socket` merged into the
    /// layer above it.
    pub fn merge(&mut self, socket: &Path, name: &str) -> Result<(), ClientError> {
        let args = SnapshotArgs {
            socket: socket.to_path_buf(),
            name: name.to_string(),
        };
        self.call::<Done>(&Command::ExportMerge(args)).map(drop)
    }

    /// The export on `socket` held to `limits` and in group `group` from
    /// its next request (what is left out: unlimited, in no group).
    pub fn set_limits(
        &mut self,
        socket: &Path,
        limits: rate_limit::Limits,
        group: Option<&str>,
    ) -> Result<(), ClientError> {
        let args = crate::SetLimitsArgs {
            socket: socket.to_path_buf(),
            limits,
            limit_group: group.map(String::from),
        };
        self.call::<Done>(&Command::ExportSetLimits(args)).map(drop)
    }

    /// Makes rate-limit group `name`, or gives it `limits` at once.
    pub fn group_set(&mut self, name: &str, limits: rate_limit::Limits) -> Result<(), ClientError> {
        let args = crate::GroupArgs {
            name: name.to_string(),
            limits,
        };
        self.call::<Done>(&Command::GroupSet(args)).map(drop)
    }

    /// Removes group `name` (refused while an export is in it).
    pub fn group_del(&mut self, name: &str) -> Result<(), ClientError> {
        let args = crate::GroupRef {
            name: name.to_string(),
        };
        self.call::<Done>(&Command::GroupDel(args)).map(drop)
    }

    /// Every rate-limit group, with its exports.
    pub fn groups(&mut self) -> Result<Vec<crate::GroupInfo>, ClientError> {
        self.call(&Command::GroupList)
    }

    /// One command; its return, read as `R` (the type `command` returns:
    /// see [`Command`]).
    pub fn call<R: DeserializeOwned>(&mut self, command: &Command) -> Result<R, ClientError> {
        let name = command.name();
        let line = command.to_line().map_err(|source| ClientError::Encode {
            command: name,
            source,
        })?;
        let answer = self.exchange(name, &line)?;
        let reply: Reply<R> =
            serde_json::from_str(&answer).map_err(|source| ClientError::Answer {
                command: name,
                line: answer.clone(),
                source,
            })?;
        Result::from(reply).map_err(|refusal| ClientError::Refused {
            command: name,
            refusal,
        })
    }

    /// `line` sent as it is (a newline added), the answer line as it came:
    /// for tests of what the backend makes of lines no [`Command`] writes.
    pub fn raw(&mut self, line: &str) -> Result<String, ClientError> {
        self.exchange("a raw line", &format!("{line}\n"))
    }

    fn exchange(&mut self, command: &'static str, line: &str) -> Result<String, ClientError> {
        // One write: written piece by piece, a command went out as dozens
        // of one-byte sends (1.4 ms, measured).
        self.stream
            .write_all(line.as_bytes())
            .map_err(|source| ClientError::Send { command, source })?;
        let mut answer = String::new();
        let read = self.lines.read_line(&mut answer);
        match read {
            Ok(0) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            Ok(_) => Ok(answer),
            Err(e) => Err(e),
        }
        .map_err(|source| ClientError::NoAnswer { command, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A backend stand-in on `dir`/ctl.sock: reads each line, answers
    /// with the next of `answers`, and hands back what it read.
    fn serve(
        dir: &Path,
        answers: &'static [&'static str],
    ) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let path = dir.join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap());
            let mut out = s;
            let mut got = Vec::new();
            for a in answers {
                let mut l = String::new();
                if lines.read_line(&mut l).unwrap() == 0 {
                    break;
                }
                got.push(l);
                out.write_all(format!("{a}\n").as_bytes()).unwrap();
            }
            // One more line read, then hang up without an answer.
            let _ = lines.read_line(&mut String::new());
            got
        });
        (path, t)
    }

    #[test]
    fn each_command_goes_as_one_line_and_its_return_comes_back_typed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(
            dir.path(),
            &[
                r#"{"return":{}}"#,
                r#"{"return":{"snapshot":"/i@s"}}"#,
                r#"{"return":[{"counters":{"failed-requests":1,"requests":2,"sessions":3},"image":"/i","num-queues":1,"queue-size":256,"readonly":false,"session":"waiting","socket":"/s"}]}"#,
                r#"{"return":{}}"#,
                r#"{"return":{}}"#,
            ],
        );
        let mut c = Client::connect(&path, Some(Duration::from_secs(60))).unwrap();
        c.add(ExportArgs::new("/s", "/i")).unwrap();
        assert_eq!(c.snapshot(Path::new("/s"), "s").unwrap(), Path::new("/i@s"));
        let list = c.list().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].counters.failed_requests, list[0].counters.sessions),
            (1, 3)
        );
        c.merge(Path::new("/s"), "s").unwrap();
        c.del(Path::new("/s")).unwrap();
        drop(c);
        assert_eq!(
            server.join().unwrap(),
            [
                "{\"execute\":\"export-add\",\"arguments\":{\"socket\":\"/s\",\"image\":\"/i\"}}\n",
                "{\"execute\":\"export-snapshot\",\"arguments\":{\"socket\":\"/s\",\"name\":\"s\"}}\n",
                "{\"execute\":\"export-list\"}\n",
                "{\"execute\":\"export-merge\",\"arguments\":{\"socket\":\"/s\",\"name\":\"s\"}}\n",
                "{\"execute\":\"export-del\",\"arguments\":{\"socket\":\"/s\"}}\n",
            ]
        );
    }

    #[test]
    fn refusals_and_bad_answers_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve(
            dir.path(),
            &[
                r#"{"error":{"class":"ExportExists","desc":"an export already listens on /s"}}"#,
                r#"{"error":{"class":"DeviceNotFound","desc":"no export on /s"}}"#,
                r#"{"return":{"surprise":1}}"#,
            ],
        );
        let mut c = Client::connect(&path, Some(Duration::from_secs(60))).unwrap();
        let e = c.add(ExportArgs::new("/s", "/i")).unwrap_err();
        assert!(e.is_refused(ErrorClass::ExportExists), "{e}");
        assert_eq!(
            e.to_string(),
            "blk-backend refused export-add: an export already listens on /s"
        );
        let e = c.del(Path::new("/s")).unwrap_err();
        assert!(e.is_refused(ErrorClass::DeviceNotFound), "{e}");
        let e = c.del(Path::new("/s")).unwrap_err();
        assert!(matches!(e, ClientError::Answer { .. }), "{e}");
        // The backend gone: no answer.
        let e = c.list().unwrap_err();
        assert!(matches!(e, ClientError::NoAnswer { .. }), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn a_socket_nobody_serves_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Client::connect(&dir.path().join("none.sock"), None)
            .err()
            .unwrap();
        assert!(missing.is_unreachable(), "{missing}");
        let path = dir.path().join("dead.sock");
        drop(UnixListener::bind(&path).unwrap());
        let refused = Client::connect(&path, None).err().unwrap();
        assert!(refused.is_unreachable(), "{refused}");
    }
}
