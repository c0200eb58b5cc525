//! A user's limiter (its ops bucket and its bytes bucket), shared between
//! the threads that serve it, and the taking of one request's cost from
//! several limiters at once: an export's own and its group's (QEMU's
//! throttle groups), all or nothing.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::bucket::TokenBucket;
use crate::spec::Limits;

#[derive(Debug, Clone, Default)]
pub struct Limiter {
    ops: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    /// Requests that had to wait, since the limiter was made.
    throttled: u64,
}

impl Limiter {
    pub fn new(limits: Limits, now: Instant) -> Limiter {
        Limiter {
            ops: limits.ops.map(|s| TokenBucket::new(s, now)),
            bytes: limits.bytes.map(|s| TokenBucket::new(s, now)),
            throttled: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            ops: self.ops.as_ref().map(TokenBucket::spec),
            bytes: self.bytes.as_ref().map(TokenBucket::spec),
        }
    }

    /// New limits, effective at once: fresh buckets (as Firecracker's
    /// update makes them); the throttled count goes on.
    pub fn set(&mut self, limits: Limits, now: Instant) {
        let throttled = self.throttled;
        *self = Limiter::new(limits, now);
        self.throttled = throttled;
    }

    pub fn throttled(&self) -> u64 {
        self.throttled
    }

    fn check(&mut self, ops: u64, bytes: u64, now: Instant) -> Result<(), Duration> {
        let a = match &mut self.ops {
            Some(b) if ops > 0 => b.check(ops, now),
            _ => Ok(()),
        };
        let b = match &mut self.bytes {
            Some(b) if bytes > 0 => b.check(bytes, now),
            _ => Ok(()),
        };
        match (a, b) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(x), Err(y)) => Err(x.max(y)),
            (Err(x), _) | (_, Err(x)) => Err(x),
        }
    }

    fn take(&mut self, ops: u64, bytes: u64) {
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
    }
}

/// A limiter as the threads serving its user hold it.
pub type Shared = Arc<Mutex<Limiter>>;

fn lock(l: &Shared) -> MutexGuard<'_, Limiter> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes a request's cost (`ops` operations, `bytes` bytes) from every
/// limiter in `all`, or from none: Ok, or how long until all of them
/// could give it (each limiter that could not counts a throttled
/// request). Limiters are locked in the order given: callers give them in
/// one order (own, then group) so that none waits on another in a circle.
pub fn take_all(all: &[&Shared], ops: u64, bytes: u64, now: Instant) -> Result<(), Duration> {
    let mut guards: Vec<MutexGuard<'_, Limiter>> = all.iter().map(|l| lock(l)).collect();
    let mut wait = None;
    for g in guards.iter_mut() {
        if let Err(d) = g.check(ops, bytes, now) {
            g.throttled += 1;
            wait = Some(wait.map_or(d, |w: Duration| w.max(d)));
        }
    }
    if let Some(d) = wait {
        return Err(d);
    }
    for g in guards.iter_mut() {
        g.take(ops, bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::BucketSpec;

    #[test]
    fn a_group_holds_the_sum_of_its_members_and_takes_all_or_nothing() {
        let t0 = Instant::now();
        let per = |n| Limits {
            ops: Some(BucketSpec::per_second(n)),
            bytes: None,
        };
        let a: Shared = Arc::new(Mutex::new(Limiter::new(per(100), t0)));
        let b: Shared = Arc::new(Mutex::new(Limiter::new(per(100), t0)));
        let group: Shared = Arc::new(Mutex::new(Limiter::new(per(120), t0)));
        // Each alone could do 100 in the first instant; together the group
        // lets 120 through.
        let mut done = [0, 0];
        for _ in 0..100 {
            for (k, own) in [&a, &b].iter().enumerate() {
                if take_all(&[own, &group], 1, 4096, t0).is_ok() {
                    done[k] += 1;
                }
            }
        }
        assert_eq!(done[0] + done[1], 120, "{done:?}");
        // All or nothing: a refused request took nothing from its own.
        let own_left = lock(&a).ops.as_mut().unwrap().check(100 - done[0], t0);
        assert_eq!(own_left, Ok(()));
        assert!(lock(&group).throttled() > 0);
        // Bytes limits too, and the longest wait is the answer.
        let c: Shared = Arc::new(Mutex::new(Limiter::new(
            Limits {
                ops: Some(BucketSpec::per_second(10)),
                bytes: Some(BucketSpec::per_second(1 << 20)),
            },
            t0,
        )));
        assert!(take_all(&[&c], 1, 1 << 20, t0).is_ok());
        let wait = take_all(&[&c], 1, 1 << 19, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // New limits take effect at once.
        lock(&c).set(Limits::default(), t0);
        assert!(take_all(&[&c], 1000, 1 << 30, t0).is_ok());
    }
}
