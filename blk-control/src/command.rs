//! The commands of the control socket, a line each:
//! `{"execute": NAME, "arguments": {...}}` (QMP's shape), and how the
//! backend reads a line as one ([`Command::from_line`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::reply::{ErrorClass, Refusal};
use crate::spec::ExportArgs;
use rate_limit::Limits;

/// One command to a blk-backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "execute", content = "arguments", rename_all = "kebab-case")]
pub enum Command {
    /// Opens the image and listens on the socket, as a `--export` at
    /// start does. Returns [`Done`](crate::Done).
    ExportAdd(ExportArgs),
    /// Ends the export's session (in-flight I/O completes), closes its
    /// image cleanly and removes its socket. Returns
    /// [`Done`](crate::Done).
    ExportDel(ExportRef),
    /// Every export with its session state and counters. Returns a list
    /// of [`ExportInfo`](crate::ExportInfo).
    ExportList,
    /// The export's image sealed as `IMAGE@NAME` (as `img snapshot -c`),
    /// the export serving a fresh top over it (its frontend reconnects).
    /// Returns [`Sealed`](crate::Sealed).
    ExportSnapshot(SnapshotArgs),
    /// Snapshot `IMAGE@NAME` folded into the layer above it and removed
    /// (as `img snapshot -d`), the export served again (its frontend
    /// reconnects). Returns [`Done`](crate::Done).
    ExportMerge(SnapshotArgs),
    /// The export's rate limits and group from now on (its next request).
    /// Returns [`Done`](crate::Done).
    ExportSetLimits(SetLimitsArgs),
    /// Makes a rate-limit group (one budget its exports share), or gives
    /// it new limits at once. Returns [`Done`](crate::Done).
    GroupSet(GroupArgs),
    /// Removes a group no export is in. Returns [`Done`](crate::Done).
    GroupDel(GroupRef),
    /// Every group with its exports. Returns a list of
    /// [`GroupInfo`](crate::GroupInfo).
    GroupList,
}

/// `export-set-limits`' arguments: the whole of the export's limits (what
/// is left out is unlimited; no `limit_group`: in none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetLimitsArgs {
    pub socket: PathBuf,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_group: Option<String>,
}

/// `group-set`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupArgs {
    pub name: String,
    #[serde(default)]
    pub limits: Limits,
}

/// The group a command is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRef {
    pub name: String,
}

/// The export a command is about: the socket it is served on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRef {
    pub socket: PathBuf,
}

/// An export and one snapshot of its image (`IMAGE@NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotArgs {
    pub socket: PathBuf,
    pub name: String,
}

impl Command {
    /// Every command's name, as `execute` gives it.
    pub const NAMES: [&'static str; 9] = [
        "export-add",
        "export-del",
        "export-list",
        "export-snapshot",
        "export-merge",
        "export-set-limits",
        "group-set",
        "group-del",
        "group-list",
    ];

    /// The command's name, as `execute` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::ExportAdd(_) => "export-add",
            Command::ExportDel(_) => "export-del",
            Command::ExportList => "export-list",
            Command::ExportSnapshot(_) => "export-snapshot",
            Command::ExportMerge(_) => "export-merge",
            Command::ExportSetLimits(_) => "export-set-limits",
            Command::GroupSet(_) => "group-set",
            Command::GroupDel(_) => "group-del",
            Command::GroupList => "group-list",
        }
    }

    /// The command a client's line asks for, or the refusal it gets: a
    /// line that is not JSON or has no `execute` is a `GenericError`, a
    /// name no command has `CommandNotFound`, arguments a command cannot
    /// take a `GenericError` that names the command and what is wrong.
    /// Keys nobody asked for are ignored (at the top and in `arguments`).
    pub fn from_line(line: &str) -> Result<Command, Refusal> {
        let Ok(request) = serde_json::from_str::<Value>(line) else {
            return Err(Refusal::generic("not a JSON object"));
        };
        let no_execute = || Refusal::generic("no \"execute\"");
        let Value::Object(mut request) = request else {
            return Err(no_execute());
        };
        let name = match request.get("execute") {
            Some(Value::String(name)) => name.clone(),
            _ => return Err(no_execute()),
        };
        if !Command::NAMES.contains(&name.as_str()) {
            return Err(Refusal {
                class: ErrorClass::CommandNotFound,
                desc: format!("no command {name:?}"),
            });
        }
        // An `arguments` of null is none, and a command that takes none
        // (it reads from its name alone) ignores any it is sent.
        let takes_none = serde_json::from_value::<Command>(json!({ "execute": name })).is_ok();
        if takes_none || request.get("arguments").is_some_and(Value::is_null) {
            request.remove("arguments");
        }
        serde_json::from_value(Value::Object(request.clone())).map_err(|e| {
            Refusal::generic(match culprit(&request, &e) {
                Some(key) => format!("{name}: {key}: {e}"),
                None => format!("{name}: {e}"),
            })
        })
    }

    /// The command as one line of the protocol (newline included); an
    /// error only for a path that is not UTF-8 (JSON cannot carry it).
    pub fn to_line(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self).map(|json| json + "\n")
    }
}

/// The argument a command could not take, when `refused` is about one
/// (serde names a missing field, but of a value of the wrong type only the
/// type): the first key without which the command reads otherwise.
/// Arguments more numerous than any command takes are not searched (the
/// search reads them all again for each).
fn culprit(request: &Map<String, Value>, refused: &serde_json::Error) -> Option<String> {
    const MOST: usize = 32;
    let args = request.get("arguments")?.as_object()?;
    if args.len() > MOST {
        return None;
    }
    let refused = refused.to_string();
    args.keys()
        .find(|key| {
            let mut fewer = args.clone();
            fewer.remove(*key);
            let mut request = request.clone();
            request.insert("arguments".into(), Value::Object(fewer));
            serde_json::from_value::<Command>(Value::Object(request)).map_err(|e| e.to_string())
                != Err(refused.clone())
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `line` as JSON (literal lines compare by meaning: key order aside).
    fn json(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    /// Each command as it goes on the wire, in the literal form today's
    /// clients (vmctl, the benches, the tests) sent it, and read back.
    #[test]
    fn each_command_is_the_same_line_on_the_wire() {
        let cases = [
            (
                Command::ExportAdd(ExportArgs::new("/run/c.sock", "/var/c.img")),
                r#"{"execute":"export-add","arguments":{"socket":"/run/c.sock","image":"/var/c.img"}}"#,
            ),
            (
                Command::ExportAdd(ExportArgs {
                    num_queues: Some(2),
                    ..ExportArgs::new("/vms/a/disk.sock", "/vms/a/disk.img")
                }),
                r#"{"execute":"export-add","arguments":{"socket":"/vms/a/disk.sock","image":"/vms/a/disk.img","num_queues":2}}"#,
            ),
            (
                Command::ExportAdd(ExportArgs {
                    readonly: Some(true),
                    num_queues: Some(4),
                    queue_size: Some(128),
                    poll_us: Some(0),
                    fixed_buffers: Some(false),
                    submit_batch: Some(1),
                    ..ExportArgs::new("/s", "/i")
                }),
                r#"{"execute":"export-add","arguments":{"socket":"/s","image":"/i","readonly":true,"num_queues":4,"queue_size":128,"poll_us":0,"fixed_buffers":false,"submit_batch":1}}"#,
            ),
            (
                Command::ExportDel(ExportRef {
                    socket: "/run/c.sock".into(),
                }),
                r#"{"execute":"export-del","arguments":{"socket":"/run/c.sock"}}"#,
            ),
            (Command::ExportList, r#"{"execute":"export-list"}"#),
            (
                Command::ExportSnapshot(SnapshotArgs {
                    socket: "/run/c.sock".into(),
                    name: "s1".into(),
                }),
                r#"{"execute":"export-snapshot","arguments":{"socket":"/run/c.sock","name":"s1"}}"#,
            ),
            (
                Command::ExportMerge(SnapshotArgs {
                    socket: "/run/c.sock".into(),
                    name: "backup-3".into(),
                }),
                r#"{"execute":"export-merge","arguments":{"socket":"/run/c.sock","name":"backup-3"}}"#,
            ),
        ];
        for (command, line) in cases {
            assert_eq!(command.to_line().unwrap(), format!("{line}\n"));
            assert_eq!(serde_json::to_value(&command).unwrap(), json(line));
            assert_eq!(Command::from_line(line), Ok(command.clone()), "{line}");
            assert!(Command::NAMES.contains(&command.name()));
            assert_eq!(json(line)["execute"], command.name());
        }
    }

    /// What serde_json's `json!` wrote (keys sorted: arguments first),
    /// with a QMP `id` and keys nobody knows, reads as before.
    #[test]
    fn key_order_and_unknown_keys_change_nothing() {
        let add = Command::ExportAdd(ExportArgs::new("/s", "/i"));
        for line in [
            r#"{"arguments":{"image":"/i","socket":"/s"},"execute":"export-add"}"#,
            r#"{"execute":"export-add","id":7,"arguments":{"socket":"/s","image":"/i","colour":"red"}}"#,
            r#"{"execute":"export-add","arguments":{"socket":"/s","image":"/i","readonly":null}}"#,
        ] {
            assert_eq!(Command::from_line(line), Ok(add.clone()), "{line}");
        }
        for line in [
            r#"{"execute":"export-list","arguments":{}}"#,
            r#"{"execute":"export-list","arguments":null}"#,
            r#"{"execute":"export-list","arguments":{"verbose":true}}"#,
            r#"{"arguments":{},"execute":"export-list"}"#,
        ] {
            assert_eq!(Command::from_line(line), Ok(Command::ExportList), "{line}");
        }
    }

    #[test]
    fn bad_lines_are_refused_by_class_and_name_the_problem() {
        let refused = |line: &str| Command::from_line(line).unwrap_err();
        let generic = |line: &str, says: &str| {
            let r = refused(line);
            assert_eq!(r.class, ErrorClass::GenericError, "{line}: {r:?}");
            assert!(r.desc.contains(says), "{line}: {r:?}");
        };
        generic("{not json", "not a JSON object");
        generic("", "not a JSON object");
        generic("[1, 2]", "no \"execute\"");
        generic(r#"{"arguments": {}}"#, "no \"execute\"");
        generic(r#"{"execute": 5}"#, "no \"execute\"");
        let r = refused(r#"{"execute": "quit-now"}"#);
        assert_eq!(
            r,
            Refusal {
                class: ErrorClass::CommandNotFound,
                desc: "no command \"quit-now\"".into()
            }
        );
        generic(r#"{"execute": "export-add"}"#, "export-add");
        generic(
            r#"{"execute": "export-add", "arguments": {"socket": "/s"}}"#,
            "missing field `image`",
        );
        generic(
            r#"{"execute": "export-add", "arguments": {"socket": "/s", "image": "/i", "num_queues": "4"}}"#,
            "export-add: num_queues: invalid type: string \"4\"",
        );
        generic(
            r#"{"execute": "export-del", "arguments": {"socket": 5}}"#,
            "export-del: socket: invalid type",
        );
        generic(
            r#"{"execute": "export-add", "arguments": {"socket": "/s", "image": "/i", "readonly": "on"}}"#,
            "export-add: readonly: invalid type",
        );
        generic(
            r#"{"execute": "export-add", "arguments": {"socket": "/s", "image": "/i", "queue_size": -1}}"#,
            "export-add: queue_size: invalid value",
        );
        generic(r#"{"execute": "export-del", "arguments": {}}"#, "socket");
        generic(
            r#"{"execute": "export-snapshot", "arguments": {"socket": "/s"}}"#,
            "missing field `name`",
        );
        generic(
            r#"{"execute": "export-merge", "arguments": {"name": "n"}}"#,
            "missing field `socket`",
        );
    }

    #[test]
    fn names_are_every_commands() {
        let all = [
            Command::ExportAdd(ExportArgs::default()),
            Command::ExportDel(ExportRef {
                socket: PathBuf::new(),
            }),
            Command::ExportList,
            Command::ExportSnapshot(SnapshotArgs {
                socket: PathBuf::new(),
                name: String::new(),
            }),
            Command::ExportMerge(SnapshotArgs {
                socket: PathBuf::new(),
                name: String::new(),
            }),
            Command::ExportSetLimits(SetLimitsArgs {
                socket: PathBuf::new(),
                limits: Limits::default(),
                limit_group: None,
            }),
            Command::GroupSet(GroupArgs {
                name: String::new(),
                limits: Limits::default(),
            }),
            Command::GroupDel(GroupRef {
                name: String::new(),
            }),
            Command::GroupList,
        ];
        assert_eq!(all.map(|c| c.name()), Command::NAMES);
    }
}
