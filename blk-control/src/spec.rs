//! What an export serves and how: the settings every export has
//! ([`Settings`], a process's defaults from its command line), the ones an
//! export gives itself ([`ExportArgs`]: `--export`'s key=value list or
//! `export-add`'s arguments, one set of keys for both), and the one check
//! that an export's resolved settings pass ([`Settings::check`]) before
//! they become an [`ExportSpec`].

use std::num::ParseIntError;
use std::path::PathBuf;
use std::str::FromStr;

use cpu_affinity::{CpuError, CpuList};
use rate_limit::{BucketSpec, Limits};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The most queues an export offers.
pub const MAX_QUEUES: usize = 64;
/// The largest queue a frontend may set up (the smallest is 2).
pub const MAX_QUEUE_SIZE: usize = 32768;

/// Why an export's settings were refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("num_queues must be 1 to {MAX_QUEUES}, not {0}")]
    NumQueues(usize),
    #[error("queue_size must be a power of two from 2 to {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(usize),
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("{key} takes on or off, not {value:?}")]
    NotOnOff { key: String, value: String },
    #[error("{key} takes a number, not {value:?}")]
    NotANumber {
        key: String,
        value: String,
        #[source]
        source: ParseIntError,
    },
    #[error("{0}= is missing")]
    Missing(&'static str),
    #[error("worker_cpus: {0}")]
    WorkerCpus(#[from] CpuError),
    #[error("rate limits: {0}")]
    Limits(#[from] rate_limit::SpecError),
    #[error("{0} without {1}")]
    BurstAlone(&'static str, &'static str),
    #[error("limit_group {0:?}: a group's name is 1 to 64 letters, digits, '-' or '_'")]
    GroupName(String),
}

/// Checks a rate-limit group's name (`limit_group=`, `group-set`).
pub fn check_group_name(name: &str) -> Result<(), SpecError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SpecError::GroupName(name.to_string()))
    }
}

/// blk-backend's default `submit_batch`. On a virtual disk (a virtio
/// disk of a VM host, as the project's own machines have) one
/// `io_uring_enter` of a whole batch of the guest's requests becomes one
/// notification of the disk for all of them, and the disk answers them
/// late together: 32 random reads in flight took 540 µs each in the disk
/// against 370 µs with qemu-storage-daemon's one request per call
/// (`bench-storage`'s "Where a request waits", docs/benchmarks.md). Two
/// SQEs per call brought ours to 370 µs (qemu-storage-daemon's 408 in
/// the same run) with half the system calls of one per call.
pub const DEFAULT_SUBMIT_BATCH: u32 = 2;

/// How an export is served, apart from where: what a process's command
/// line sets for every export, and what each export may set for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Serve read-only (the guest sees VIRTIO_BLK_F_RO).
    pub readonly: bool,
    pub num_queues: usize,
    pub queue_size: usize,
    /// Microseconds a queue worker keeps polling after its last work
    /// before it sleeps (0: never polls).
    pub poll_us: u64,
    /// Register guest memory with each queue's io_uring as fixed buffers.
    pub fixed_buffers: bool,
    /// SQEs a queue worker hands the kernel per `io_uring_enter` at most
    /// (0: all of a batch at once).
    pub submit_batch: u32,
    /// The host CPUs of the queue workers, one each in turn (queue `k`'s
    /// on the list's `k`-th); none: wherever the kernel runs them.
    pub worker_cpus: Option<CpuList>,
}

impl Default for Settings {
    /// blk-backend's defaults (its command line's).
    fn default() -> Settings {
        Settings {
            readonly: false,
            num_queues: 1,
            queue_size: 256,
            poll_us: 50,
            fixed_buffers: false,
            submit_batch: DEFAULT_SUBMIT_BATCH,
            worker_cpus: None,
        }
    }
}

impl Settings {
    /// The one check of an export's settings (the command line's exports
    /// and the control socket's alike).
    pub fn check(&self) -> Result<(), SpecError> {
        if !(1..=MAX_QUEUES).contains(&self.num_queues) {
            return Err(SpecError::NumQueues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&self.queue_size) {
            return Err(SpecError::QueueSize(self.queue_size));
        }
        if let Some(cpus) = &self.worker_cpus {
            cpus.check_allowed()?;
        }
        Ok(())
    }
}

/// What an export serves and how, checked (made by
/// [`ExportArgs::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub readonly: bool,
    pub num_queues: usize,
    pub queue_size: usize,
    /// Microseconds a queue worker keeps polling after its last work
    /// before it sleeps (0: never polls).
    pub poll_us: u64,
    /// Register guest memory with each queue's io_uring as fixed buffers
    /// (no page pinning per O_DIRECT request, but every page of guest
    /// memory faulted in and pinned while the queue runs).
    pub fixed_buffers: bool,
    /// SQEs handed the kernel per `io_uring_enter` at most (a request in
    /// several pieces makes several): the disk starts on the first of a
    /// batch while the rest are parsed (0: the whole batch in one call).
    pub submit_batch: u32,
    /// Queue `k`'s worker runs on the list's `k`-th CPU, in turn (none:
    /// wherever the kernel runs it).
    pub worker_cpus: Option<CpuList>,
    /// The export's own rate limits (none: unlimited).
    pub limits: Limits,
    /// The rate-limit group whose budget it shares with the group's
    /// other exports (made by `group-set`).
    pub limit_group: Option<String>,
}

/// One export as asked for: where (socket and image) and the settings it
/// gives itself, the others left to the process's [`Settings`]. The
/// arguments of `export-add` (keys a backend does not know are ignored, as
/// QMP clients expect) and, with the same keys, an `--export` list
/// (`socket=PATH,image=PATH[,readonly=on,...]`, parsed by `FromStr`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportArgs {
    pub socket: PathBuf,
    pub image: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readonly: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_buffers: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_batch: Option<u32>,
    /// In JSON a string, as on a command line: `"0-1,3"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_cpus: Option<CpuList>,
    /// Its own rate limits (`--export`: `iops=N[,iops_burst=N]`,
    /// `bw=BYTES[,bw_burst=BYTES]`, each per second).
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_group: Option<String>,
}

impl ExportArgs {
    /// `image` served on `socket`, every setting the process's.
    pub fn new(socket: impl Into<PathBuf>, image: impl Into<PathBuf>) -> ExportArgs {
        ExportArgs {
            socket: socket.into(),
            image: image.into(),
            ..ExportArgs::default()
        }
    }

    /// The export's settings, what it does not set taken from `defaults`,
    /// checked.
    pub fn resolve(self, defaults: &Settings) -> Result<ExportSpec, SpecError> {
        let s = Settings {
            readonly: self.readonly.unwrap_or(defaults.readonly),
            num_queues: self.num_queues.unwrap_or(defaults.num_queues),
            queue_size: self.queue_size.unwrap_or(defaults.queue_size),
            poll_us: self.poll_us.unwrap_or(defaults.poll_us),
            fixed_buffers: self.fixed_buffers.unwrap_or(defaults.fixed_buffers),
            submit_batch: self.submit_batch.unwrap_or(defaults.submit_batch),
            worker_cpus: self.worker_cpus.or_else(|| defaults.worker_cpus.clone()),
        };
        s.check()?;
        self.limits.check()?;
        if let Some(g) = &self.limit_group {
            check_group_name(g)?;
        }
        Ok(ExportSpec {
            socket: self.socket,
            image: self.image,
            readonly: s.readonly,
            num_queues: s.num_queues,
            queue_size: s.queue_size,
            poll_us: s.poll_us,
            fixed_buffers: s.fixed_buffers,
            submit_batch: s.submit_batch,
            worker_cpus: s.worker_cpus,
            limits: self.limits,
            limit_group: self.limit_group,
        })
    }
}

/// `--export`'s list: `socket=PATH,image=PATH[,readonly=on][,num_queues=N]
/// [,queue_size=N][,poll_us=N][,fixed_buffers=on][,submit_batch=N]
/// [,worker_cpus=LIST][,iops=N][,iops_burst=N][,bw=BYTES][,bw_burst=BYTES]
/// [,limit_group=NAME]` (iops and bw per second). The CPU list's own commas stay in it: what
/// follows `worker_cpus=` up to the next key is its list (`worker_cpus=0,2`).
impl FromStr for ExportArgs {
    type Err = SpecError;

    fn from_str(list: &str) -> Result<ExportArgs, SpecError> {
        let (mut socket, mut image) = (None, None);
        let mut e = ExportArgs::default();
        let mut cpus: Option<String> = None;
        let mut in_cpus = false;
        let (mut iops, mut iops_burst, mut bw, mut bw_burst) = (None, None, None, None);
        for kv in list.split(',') {
            if let (Some(c), true, false) = (&mut cpus, in_cpus, kv.contains('=')) {
                c.push(',');
                c.push_str(kv);
                continue;
            }
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(kv.to_string()))?;
            in_cpus = k == "worker_cpus";
            match k {
                "worker_cpus" => cpus = Some(v.to_string()),
                "socket" => socket = Some(PathBuf::from(v)),
                "image" => image = Some(PathBuf::from(v)),
                "readonly" => e.readonly = Some(on_off(k, v)?),
                "fixed_buffers" => e.fixed_buffers = Some(on_off(k, v)?),
                "num_queues" => e.num_queues = Some(number(k, v)?),
                "queue_size" => e.queue_size = Some(number(k, v)?),
                "poll_us" => e.poll_us = Some(number(k, v)?),
                "submit_batch" => e.submit_batch = Some(number(k, v)?),
                "iops" => iops = Some(number(k, v)?),
                "iops_burst" => iops_burst = Some(number(k, v)?),
                "bw" => bw = Some(number(k, v)?),
                "bw_burst" => bw_burst = Some(number(k, v)?),
                "limit_group" => e.limit_group = Some(v.to_string()),
                _ => return Err(SpecError::UnknownKey(k.to_string())),
            }
        }
        e.worker_cpus = cpus.map(|c| c.parse()).transpose()?;
        e.limits = Limits {
            ops: bucket(iops, iops_burst, "iops_burst", "iops")?,
            bytes: bucket(bw, bw_burst, "bw_burst", "bw")?,
        };
        e.socket = socket.ok_or(SpecError::Missing("socket"))?;
        e.image = image.ok_or(SpecError::Missing("image"))?;
        Ok(e)
    }
}

/// A per-second bucket of `rate` with `burst` on top (a burst needs a
/// rate).
fn bucket(
    rate: Option<u64>,
    burst: Option<u64>,
    burst_key: &'static str,
    rate_key: &'static str,
) -> Result<Option<BucketSpec>, SpecError> {
    match (rate, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(SpecError::BurstAlone(burst_key, rate_key)),
        (Some(r), b) => Ok(Some(BucketSpec {
            one_time_burst: b.unwrap_or(0),
            ..BucketSpec::per_second(r)
        })),
    }
}

fn on_off(key: &str, value: &str) -> Result<bool, SpecError> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(SpecError::NotOnOff {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

fn number<T: FromStr<Err = ParseIntError>>(key: &str, value: &str) -> Result<T, SpecError> {
    value.parse().map_err(|source| SpecError::NotANumber {
        key: key.to_string(),
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(num_queues: usize, queue_size: usize) -> Settings {
        Settings {
            num_queues,
            queue_size,
            ..Settings::default()
        }
    }

    #[test]
    fn the_check_refuses_what_blk_backend_refused() {
        assert_eq!(Settings::default().check(), Ok(()));
        assert_eq!(settings(1, 2).check(), Ok(()));
        assert_eq!(settings(64, 32768).check(), Ok(()));
        assert_eq!(settings(0, 256).check(), Err(SpecError::NumQueues(0)));
        assert_eq!(settings(65, 256).check(), Err(SpecError::NumQueues(65)));
        for size in [0, 1, 3, 100, 65536] {
            assert_eq!(
                settings(1, size).check(),
                Err(SpecError::QueueSize(size)),
                "{size}"
            );
        }
        assert_eq!(
            SpecError::NumQueues(0).to_string(),
            "num_queues must be 1 to 64, not 0"
        );
        assert_eq!(
            SpecError::QueueSize(100).to_string(),
            "queue_size must be a power of two from 2 to 32768, not 100"
        );
    }

    #[test]
    fn an_export_takes_the_defaults_it_does_not_set_and_is_checked() {
        let defaults = Settings {
            readonly: true,
            num_queues: 2,
            queue_size: 128,
            poll_us: 7,
            fixed_buffers: true,
            submit_batch: 3,
            worker_cpus: None,
        };
        let spec = ExportArgs::new("/s", "/i").resolve(&defaults).unwrap();
        assert_eq!(
            spec,
            ExportSpec {
                socket: "/s".into(),
                image: "/i".into(),
                readonly: true,
                num_queues: 2,
                queue_size: 128,
                poll_us: 7,
                fixed_buffers: true,
                submit_batch: 3,
                worker_cpus: None,
                limits: Limits::default(),
                limit_group: None,
            }
        );
        let own = ExportArgs {
            readonly: Some(false),
            num_queues: Some(4),
            queue_size: Some(64),
            poll_us: Some(0),
            fixed_buffers: Some(false),
            submit_batch: Some(0),
            ..ExportArgs::new("/s", "/i")
        };
        let spec = own.resolve(&defaults).unwrap();
        assert_eq!(
            (
                spec.readonly,
                spec.num_queues,
                spec.queue_size,
                spec.poll_us,
                spec.fixed_buffers,
                spec.submit_batch
            ),
            (false, 4, 64, 0, false, 0)
        );
        let bad = ExportArgs {
            queue_size: Some(100),
            ..ExportArgs::new("/s", "/i")
        };
        assert_eq!(bad.resolve(&defaults), Err(SpecError::QueueSize(100)));
        // A default that fails the check fails every export that takes it.
        assert_eq!(
            ExportArgs::new("/s", "/i").resolve(&settings(0, 256)),
            Err(SpecError::NumQueues(0))
        );
    }

    #[test]
    fn export_lists_read_as_before() {
        let e: ExportArgs =
            "socket=/run/a.sock,image=a.img,readonly=on,num_queues=4,queue_size=64,poll_us=0,fixed_buffers=true,submit_batch=8"
                .parse()
                .unwrap();
        assert_eq!(
            e,
            ExportArgs {
                socket: "/run/a.sock".into(),
                image: "a.img".into(),
                readonly: Some(true),
                num_queues: Some(4),
                queue_size: Some(64),
                poll_us: Some(0),
                fixed_buffers: Some(true),
                submit_batch: Some(8),
                worker_cpus: None,
                limits: Limits::default(),
                limit_group: None,
            }
        );
        let e: ExportArgs = "image=b.img,socket=b.sock,readonly=0".parse().unwrap();
        assert_eq!(e.readonly, Some(false));
        assert_eq!(e.num_queues, None);
        assert_eq!(e.worker_cpus, None);
    }

    #[test]
    fn worker_cpus_keep_their_commas_in_a_list_and_are_checked_against_the_host() {
        let e: ExportArgs = "socket=s,worker_cpus=0,2-3,image=i,readonly=on"
            .parse()
            .unwrap();
        assert_eq!(e.worker_cpus.as_ref().unwrap().cpus(), &[0, 2, 3]);
        assert_eq!((e.image.to_str(), e.readonly), (Some("i"), Some(true)));
        // The process's default, when the export gives none; its own wins.
        let here = cpu_affinity::current_affinity().unwrap();
        let defaults = Settings {
            worker_cpus: Some(here.clone()),
            ..Settings::default()
        };
        let spec = ExportArgs::new("/s", "/i").resolve(&defaults).unwrap();
        assert_eq!(spec.worker_cpus, Some(here.clone()));
        let first: CpuList = here.cpus()[0].to_string().parse().unwrap();
        let own = ExportArgs {
            worker_cpus: Some(first.clone()),
            ..ExportArgs::new("/s", "/i")
        };
        assert_eq!(own.resolve(&defaults).unwrap().worker_cpus, Some(first));
        // A CPU the process may not run on is refused, by number.
        let beyond = ExportArgs {
            worker_cpus: Some("1000".parse().unwrap()),
            ..ExportArgs::new("/s", "/i")
        };
        let err = beyond.resolve(&defaults).unwrap_err().to_string();
        assert!(
            err.starts_with("worker_cpus: CPU 1000 is not one this process may run on"),
            "{err}"
        );
    }

    #[test]
    fn bad_export_lists_are_refused_by_name() {
        let err = |s: &str| s.parse::<ExportArgs>().unwrap_err().to_string();
        assert_eq!(err("socket=s,image=i,junk"), "\"junk\" is not key=value");
        assert_eq!(err(""), "\"\" is not key=value");
        assert_eq!(err("socket=s,image=i,colour=red"), "unknown key \"colour\"");
        assert_eq!(
            err("socket=s,image=i,readonly=yes"),
            "readonly takes on or off, not \"yes\""
        );
        assert_eq!(
            err("socket=s,image=i,num_queues=four"),
            "num_queues takes a number, not \"four\""
        );
        assert_eq!(
            err("socket=s,image=i,poll_us=-1"),
            "poll_us takes a number, not \"-1\""
        );
        assert_eq!(
            err("socket=s,image=i,worker_cpus=1,x"),
            "worker_cpus: \"x\" is not a CPU number or a range of them (give CPUs as 0-3,6)"
        );
        assert_eq!(
            err("socket=s,worker_cpus=1,readonly=on,2,image=i"),
            "\"2\" is not key=value"
        );
        assert_eq!(err("image=i"), "socket= is missing");
        assert_eq!(err("socket=s,num_queues=2"), "image= is missing");
    }

    #[test]
    fn rate_limits_come_from_the_list_and_bad_ones_are_refused_by_name() {
        let e: ExportArgs = "socket=s,image=i,iops=500,iops_burst=100,bw=1048576,limit_group=fleet"
            .parse()
            .unwrap();
        assert_eq!(
            e.limits,
            Limits {
                ops: Some(BucketSpec {
                    one_time_burst: 100,
                    ..BucketSpec::per_second(500)
                }),
                bytes: Some(BucketSpec::per_second(1 << 20)),
            }
        );
        let spec = e.resolve(&Settings::default()).unwrap();
        assert_eq!(spec.limit_group.as_deref(), Some("fleet"));
        let err = |l: &str| {
            l.parse::<ExportArgs>()
                .and_then(|e| e.resolve(&Settings::default()))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(err("socket=s,image=i,iops=0"), "rate limits: ops: the size must be at least 1 (0 would stop everything; leave the limit out for none)");
        assert_eq!(err("socket=s,image=i,bw_burst=5"), "bw_burst without bw");
        assert!(err("socket=s,image=i,iops=-3").contains("iops takes a number"));
        assert!(err("socket=s,image=i,limit_group=a/b").contains("limit_group \"a/b\""));
    }
}
