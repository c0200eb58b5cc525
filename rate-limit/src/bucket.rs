//! One token bucket (Firecracker's `TokenBucket`): tokens come back at
//! `size` per `refill_ms`, up to `size`; a one-time burst is spent first.
//! A cost larger than the bucket can ever hold is let through when the
//! bucket is full and leaves it in debt, which refilling pays back: a
//! large request waits its fair share of time instead of forever.

use std::time::{Duration, Instant};

use crate::spec::BucketSpec;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    spec: BucketSpec,
    /// Tokens now; below zero while a large request's debt is paid back.
    budget: i128,
    /// What is left of the one-time burst.
    burst: u64,
    /// The instant the budget was last brought up to date: refilling adds
    /// whole tokens and moves this by exactly their time, so no fraction
    /// of a token is lost.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket (as Firecracker's starts) with its whole burst.
    pub fn new(spec: BucketSpec, now: Instant) -> TokenBucket {
        TokenBucket {
            spec,
            budget: spec.size as i128,
            burst: spec.one_time_burst,
            last: now,
        }
    }

    pub fn spec(&self) -> BucketSpec {
        self.spec
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.spec.refill_ms) * 1_000_000
    }

    fn refill(&mut self, now: Instant) {
        let size = self.spec.size as i128;
        if self.budget >= size {
            self.last = now;
            return;
        }
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let tokens = elapsed * self.spec.size as u128 / self.refill_ns();
        if tokens == 0 {
            return;
        }
        let room = (size - self.budget) as u128;
        if tokens >= room {
            self.budget = size;
            self.last = now;
        } else {
            self.budget += tokens as i128;
            let spent = tokens * self.refill_ns() / self.spec.size as u128;
            self.last += Duration::from_nanos(spent as u64);
        }
    }

    /// Whether `cost` can be taken now: Ok, or how long until it can.
    pub fn check(&mut self, cost: u64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let from_budget = cost.saturating_sub(self.burst);
        if from_budget == 0 {
            return Ok(());
        }
        // A cost above the bucket's size waits only for a full bucket.
        let need = from_budget.min(self.spec.size) as i128;
        if self.budget >= need {
            return Ok(());
        }
        let missing = (need - self.budget) as u128;
        let ns = (missing * self.refill_ns()).div_ceil(self.spec.size as u128);
        Err(Duration::from_nanos(ns.min(u64::MAX as u128) as u64))
    }

    /// Takes `cost` (after a `check` that said Ok).
    pub fn take(&mut self, cost: u64) {
        let from_burst = cost.min(self.burst);
        self.burst -= from_burst;
        self.budget -= (cost - from_burst) as i128;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_bucket_gives_its_size_per_refill_time_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(BucketSpec::per_second(100), t0);
        // Full at first: 100 at once, then nothing.
        assert_eq!(b.check(100, t0), Ok(()));
        b.take(100);
        assert_eq!(b.check(1, t0), Err(ms(10)));
        // 10 ms bring 1 token back; 500 ms bring 50.
        assert_eq!(b.check(1, t0 + ms(10)), Ok(()));
        b.take(1);
        assert_eq!(b.check(50, t0 + ms(510)), Ok(()));
        b.take(50);
        // Over a long run the rate is the size per refill time, however
        // the time is sliced (no fraction lost): 3 ms steps for 3 s.
        let mut taken = 0;
        let mut now = t0 + ms(510);
        while now < t0 + ms(3510) {
            now += ms(3);
            while b.check(1, now).is_ok() {
                b.take(1);
                taken += 1;
            }
        }
        assert!((299..=301).contains(&taken), "{taken} in 3 s at 100/s");
    }

    #[test]
    fn the_burst_goes_first_and_a_large_cost_leaves_a_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            BucketSpec {
                size: 1000,
                one_time_burst: 500,
                refill_ms: 1000,
            },
            t0,
        );
        // 1500 at once: the burst, then the bucket.
        assert_eq!(b.check(1500, t0), Ok(()));
        b.take(1500);
        assert!(b.check(1, t0).is_err());
        // The burst does not come back; the bucket does.
        assert_eq!(b.check(1000, t0 + ms(1000)), Ok(()));
        b.take(1000);
        // 3000 bytes from a 1000-byte bucket: taken once it is full, then
        // 2 s of debt before anything else.
        assert_eq!(b.check(3000, t0 + ms(2000)), Ok(()));
        b.take(3000);
        assert_eq!(b.check(1, t0 + ms(2000)), Err(ms(2001)));
        assert_eq!(b.check(1, t0 + ms(4001)), Ok(()));
    }
}
