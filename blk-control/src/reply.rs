//! The answers of the control socket, a line each: `{"return": ...}`
//! ([`Answer`]: what each command returns) or `{"error": {"class": ...,
//! "desc": ...}}` ([`Refusal`], its class one of QMP's).

use std::path::PathBuf;

use rate_limit::Limits;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A refusal's QMP class: what a client tells "already there" and "not
/// there" from real failures by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Any other failure: a line that is not a command, arguments a
    /// command cannot take, an image that would not open, ...
    GenericError,
    /// No command of that name.
    CommandNotFound,
    /// An add on a socket already served.
    ExportExists,
    /// A command on an export that is not there.
    DeviceNotFound,
}

/// A command refused: its class and what went wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{desc}")]
pub struct Refusal {
    pub class: ErrorClass,
    pub desc: String,
}

impl Refusal {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Refusal {
        Refusal {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
}

/// One answer line: what the command returned, or its refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply<T> {
    Return(T),
    Error(Refusal),
}

impl<T> From<Result<T, Refusal>> for Reply<T> {
    fn from(r: Result<T, Refusal>) -> Reply<T> {
        match r {
            Ok(t) => Reply::Return(t),
            Err(e) => Reply::Error(e),
        }
    }
}

impl<T> From<Reply<T>> for Result<T, Refusal> {
    fn from(r: Reply<T>) -> Result<T, Refusal> {
        match r {
            Reply::Return(t) => Ok(t),
            Reply::Error(e) => Err(e),
        }
    }
}

impl<T: Serialize> Reply<T> {
    /// The reply as one line of the protocol (newline included). An
    /// answer JSON cannot carry (a path that is not UTF-8) goes as a
    /// `GenericError` that says so.
    pub fn to_line(&self) -> String {
        match serde_json::to_string(self) {
            Ok(json) => json + "\n",
            Err(e) => {
                let refusal = Reply::<Done>::Error(Refusal::generic(format!(
                    "the answer cannot be written as JSON: {e}"
                )));
                // Strings and a class: always written.
                serde_json::to_string(&refusal).unwrap_or_default() + "\n"
            }
        }
    }
}

/// What a command returns (the backend's side; a client reads the type
/// its command returns: [`Done`], a list of [`ExportInfo`], [`Sealed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    // A list first: serde reads an empty list as a `Done` too.
    Exports(Vec<ExportInfo>),
    Groups(Vec<GroupInfo>),
    Done(Done),
    Sealed(Sealed),
}

/// The return of a command that returns nothing: `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {}

/// `export-snapshot`'s return: the sealed layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// `IMAGE@NAME`, beside the image.
    pub snapshot: PathBuf,
}

/// One export in `export-list`'s return. (Fields in the order the
/// backend has always written them.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub counters: Counters,
    pub image: PathBuf,
    #[serde(rename = "num-queues")]
    pub num_queues: usize,
    #[serde(rename = "queue-size")]
    pub queue_size: usize,
    pub readonly: bool,
    pub session: Session,
    pub socket: PathBuf,
    /// Its own rate limits now.
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
    #[serde(
        rename = "limit-group",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub limit_group: Option<String>,
}

/// One rate-limit group in `group-list`'s return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub limits: Limits,
    /// The sockets of the exports in it.
    pub exports: Vec<PathBuf>,
    /// Times a request waited for the group's budget.
    pub throttled: u64,
}

/// Whether a frontend is connected to an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Session {
    Connected,
    Waiting,
}

/// An export's counters since it was added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Counters {
    /// Requests answered with an error (IOERR/UNSUPP).
    pub failed_requests: u64,
    /// Requests answered.
    pub requests: u64,
    /// Frontend sessions it has served.
    pub sessions: u64,
    /// Requests that waited for their rate limit's budget.
    #[serde(default)]
    pub throttled: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExportInfo {
        ExportInfo {
            counters: Counters {
                failed_requests: 0,
                requests: 2048,
                sessions: 1,
                throttled: 0,
            },
            image: "/vms/a/disk.img".into(),
            num_queues: 2,
            queue_size: 256,
            readonly: false,
            session: Session::Connected,
            socket: "/vms/a/disk.sock".into(),
            limits: Limits::default(),
            limit_group: None,
        }
    }

    /// The exact lines blk-backend writes (as it wrote them before its
    /// answers were typed, serde_json's `json!`, keys sorted; since then
    /// `throttled` among the counters, and limits when an export has any).
    #[test]
    fn each_answer_is_the_same_line_on_the_wire() {
        let cases = [
            (Reply::Return(Answer::Done(Done {})), r#"{"return":{}}"#),
            (Reply::Return(Answer::Exports(vec![])), r#"{"return":[]}"#),
            (
                Reply::Return(Answer::Exports(vec![
                    info(),
                    ExportInfo {
                        session: Session::Waiting,
                        readonly: true,
                        ..info()
                    },
                ])),
                concat!(
                    r#"{"return":[{"counters":{"failed-requests":0,"requests":2048,"sessions":1,"throttled":0},"image":"/vms/a/disk.img","num-queues":2,"queue-size":256,"readonly":false,"session":"connected","socket":"/vms/a/disk.sock"},"#,
                    r#"{"counters":{"failed-requests":0,"requests":2048,"sessions":1,"throttled":0},"image":"/vms/a/disk.img","num-queues":2,"queue-size":256,"readonly":true,"session":"waiting","socket":"/vms/a/disk.sock"}]}"#
                ),
            ),
            (
                Reply::Return(Answer::Sealed(Sealed {
                    snapshot: "/vms/a/disk.img@s1".into(),
                })),
                r#"{"return":{"snapshot":"/vms/a/disk.img@s1"}}"#,
            ),
            (
                Reply::Error(Refusal {
                    class: ErrorClass::ExportExists,
                    desc: "an export already listens on /s".into(),
                }),
                r#"{"error":{"class":"ExportExists","desc":"an export already listens on /s"}}"#,
            ),
            (
                Reply::Error(Refusal {
                    class: ErrorClass::DeviceNotFound,
                    desc: "no export on /s".into(),
                }),
                r#"{"error":{"class":"DeviceNotFound","desc":"no export on /s"}}"#,
            ),
            (
                Reply::Error(Refusal::generic("line too long")),
                r#"{"error":{"class":"GenericError","desc":"line too long"}}"#,
            ),
            (
                Reply::Error(Refusal {
                    class: ErrorClass::CommandNotFound,
                    desc: "no command \"quit-now\"".into(),
                }),
                r#"{"error":{"class":"CommandNotFound","desc":"no command \"quit-now\""}}"#,
            ),
        ];
        for (reply, line) in cases {
            assert_eq!(reply.to_line(), format!("{line}\n"));
            assert_eq!(serde_json::from_str::<Reply<Answer>>(line).unwrap(), reply);
        }
    }

    /// A client reads the return its command has, and nothing else.
    #[test]
    fn a_client_reads_the_return_its_command_has() {
        let done: Reply<Done> = serde_json::from_str(r#"{"return":{}}"#).unwrap();
        assert_eq!(done, Reply::Return(Done {}));
        assert!(serde_json::from_str::<Reply<Done>>(r#"{"return":{"x":1}}"#).is_err());
        let sealed: Reply<Sealed> =
            serde_json::from_str(r#"{"return":{"snapshot":"/i@s"}}"#).unwrap();
        assert_eq!(
            Result::from(sealed),
            Ok(Sealed {
                snapshot: "/i@s".into()
            })
        );
        let refused: Reply<Vec<ExportInfo>> =
            serde_json::from_str(r#"{"error":{"class":"GenericError","desc":"no"}}"#).unwrap();
        assert_eq!(Result::from(refused), Err(Refusal::generic("no")));
    }

    #[test]
    fn an_answer_json_cannot_carry_is_refused_instead() {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::OsStr::from_bytes(b"/vms/\xff.img@s");
        let reply = Reply::Return(Answer::Sealed(Sealed {
            snapshot: path.into(),
        }));
        let line = reply.to_line();
        let back: Reply<Done> = serde_json::from_str(&line).unwrap();
        assert!(
            matches!(&back, Reply::Error(r) if r.class == ErrorClass::GenericError && r.desc.contains("UTF-8")),
            "{line}"
        );
    }
}
