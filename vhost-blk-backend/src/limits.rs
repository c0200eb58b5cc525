//! Rate limits in blk-backend: each export's own limiter, and the named
//! groups whose one budget several exports share (QEMU's throttle groups:
//! a fleet held to one IOPS budget). A queue worker asks its export's
//! `ExportLimits::admit` before it runs a request; a request that must
//! wait waits on a timer in the worker's own io_uring (worker.rs).
//!
//! What a request costs: a read or a write one operation and its bytes; a
//! discard or write-zeroes one operation; a flush or an id nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blk_request::{Kind, Request};
use rate_limit::{take_all, Limiter, Limits, Shared};

/// A request's cost: (operations, bytes).
pub fn cost(req: &Request) -> (u64, u64) {
    match req.kind {
        Kind::In | Kind::Out => (1, req.data_len),
        Kind::Discard | Kind::WriteZeroes => (1, 0),
        _ => (0, 0),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One export's limits: its own limiter and its group's, if it is in one.
pub struct ExportLimits {
    /// Whether any limit applies (looked at without a lock: an unlimited
    /// export's requests take no lock at all).
    limited: AtomicBool,
    own: Shared,
    group: Mutex<Option<(String, Shared)>>,
    /// Requests that had to wait for their budget.
    throttled: AtomicU64,
}

impl ExportLimits {
    pub fn new(limits: Limits, group: Option<(String, Shared)>) -> ExportLimits {
        ExportLimits {
            limited: AtomicBool::new(!limits.is_none() || group.is_some()),
            own: Arc::new(Mutex::new(Limiter::new(limits, Instant::now()))),
            group: Mutex::new(group),
            throttled: AtomicU64::new(0),
        }
    }

    /// Takes a request's cost from the export's budget and its group's,
    /// or tells how long until both have it.
    #[inline]
    pub fn admit(&self, ops: u64, bytes: u64) -> Result<(), Duration> {
        if (ops == 0 && bytes == 0) || !self.limited.load(Ordering::Relaxed) {
            return Ok(());
        }
        let group = lock(&self.group).as_ref().map(|(_, g)| Arc::clone(g));
        let now = Instant::now();
        match &group {
            Some(g) => take_all(&[&self.own, g], ops, bytes, now),
            None => take_all(&[&self.own], ops, bytes, now),
        }
    }

    /// `n` more requests waited.
    pub fn count_throttled(&self, n: u64) {
        self.throttled.fetch_add(n, Ordering::Relaxed);
    }

    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> Limits {
        lock(&self.own).limits()
    }

    pub fn group(&self) -> Option<String> {
        lock(&self.group).as_ref().map(|(n, _)| n.clone())
    }

    /// New limits and group, effective for the next request.
    pub fn set(&self, limits: Limits, group: Option<(String, Shared)>) {
        let limited = !limits.is_none() || group.is_some();
        lock(&self.own).set(limits, Instant::now());
        *lock(&self.group) = group;
        self.limited.store(limited, Ordering::Relaxed);
    }
}

/// Why a group could not be made, found or removed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("no rate-limit group {0:?} (group-set makes one)")]
    NoSuchGroup(String),
    #[error("rate-limit group {name:?} is shared by {} export(s) ({}): move them out first", exports.len(), exports.iter().map(|e| e.display().to_string()).collect::<Vec<_>>().join(", "))]
    InUse { name: String, exports: Vec<PathBuf> },
    #[error(transparent)]
    Spec(#[from] blk_control::SpecError),
    #[error(transparent)]
    Limits(#[from] rate_limit::SpecError),
}

/// The process's rate-limit groups, by name.
#[derive(Default)]
pub struct Groups {
    groups: Mutex<BTreeMap<String, Shared>>,
}

impl Groups {
    /// The group `name`, for an export that joins it.
    pub fn get(&self, name: &str) -> Result<(String, Shared), GroupError> {
        lock(&self.groups)
            .get(name)
            .map(|g| (name.to_string(), Arc::clone(g)))
            .ok_or_else(|| GroupError::NoSuchGroup(name.to_string()))
    }

    /// Makes group `name`, or gives it new limits (effective at once for
    /// every export in it).
    pub fn set(&self, name: &str, limits: Limits) -> Result<(), GroupError> {
        blk_control::spec::check_group_name(name)?;
        limits.check()?;
        let mut groups = lock(&self.groups);
        match groups.get(name) {
            Some(g) => lock(g).set(limits, Instant::now()),
            None => {
                groups.insert(
                    name.to_string(),
                    Arc::new(Mutex::new(Limiter::new(limits, Instant::now()))),
                );
            }
        }
        Ok(())
    }

    /// Removes group `name`; refused while `members` (the exports in it)
    /// is not empty.
    pub fn remove(&self, name: &str, members: Vec<PathBuf>) -> Result<(), GroupError> {
        let mut groups = lock(&self.groups);
        if !groups.contains_key(name) {
            return Err(GroupError::NoSuchGroup(name.to_string()));
        }
        if !members.is_empty() {
            return Err(GroupError::InUse {
                name: name.to_string(),
                exports: members,
            });
        }
        groups.remove(name);
        Ok(())
    }

    /// Every group: its name, limits and the requests it made wait.
    pub fn list(&self) -> Vec<(String, Limits, u64)> {
        lock(&self.groups)
            .iter()
            .map(|(n, g)| {
                let g = lock(g);
                (n.clone(), g.limits(), g.throttled())
            })
            .collect()
    }
}
