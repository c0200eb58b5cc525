//! blk-backend's control protocol, one definition for both ends: the
//! backend that answers it and the programs that speak it (vmctl, the
//! benchmarks, the tests). Newline-delimited JSON in the shape of QEMU's
//! QMP: `{"execute": "export-add", "arguments": {...}}` ->
//! `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`.
//!
//! - `spec`: what an export serves and how ([`ExportSpec`]), the settings
//!   an export may give itself ([`ExportArgs`], from `--export`'s
//!   key=value list or `export-add`'s arguments) and their one check.
//! - `command`: the commands ([`Command`]) and how a line is read as one.
//! - `reply`: the answers ([`Reply`], [`Answer`], [`ExportInfo`]) and the
//!   refusals with their QMP classes ([`Refusal`], [`ErrorClass`]).
//! - `client`: a blocking client of the control socket ([`Client`]).
//!
//! Light on purpose (serde, serde_json, thiserror): a program that only
//! speaks the protocol needs nothing of the backend's io_uring or vhost.

pub mod client;
pub mod command;
pub mod reply;
pub mod spec;

pub use client::{Client, ClientError};
pub use command::{Command, ExportRef, GroupArgs, GroupRef, SetLimitsArgs, SnapshotArgs};
pub use reply::{
    Answer, Counters, Done, ErrorClass, ExportInfo, GroupInfo, Refusal, Reply, Sealed, Session,
};
pub use spec::{ExportArgs, ExportSpec, Settings, SpecError};
