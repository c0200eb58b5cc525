//! Log lines a peer can cause, bounded: one blk-backend serves many VMs,
//! and no guest (nor a frontend, for blk-backend; nor a guest driver, for
//! the vmm) may fill the host's disk with our logs by misbehaving.

use std::time::{Duration, Instant};

/// The first `burst` lines go out; after that, at most one summary line a
/// second says how many were left out.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    logged: u32,
    suppressed: u64,
    last_summary: Instant,
}

/// Lines logged in full per limit (a session, a device).
pub const BURST: u32 = 10;
const SUMMARY_EVERY: Duration = Duration::from_secs(1);

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(BURST)
    }
}

impl LogLimit {
    pub fn new(burst: u32) -> LogLimit {
        LogLimit {
            burst,
            logged: 0,
            suppressed: 0,
            last_summary: Instant::now(),
        }
    }

    /// Whether this line may be logged; if not, it is counted.
    pub fn allow(&mut self) -> bool {
        if self.logged < self.burst {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Logs one line through the limit: `line` runs while within the
    /// burst; `more(n)` reports, at most once a second, how many were left
    /// out since.
    pub fn emit(&mut self, line: impl FnOnce(), more: impl FnOnce(u64)) {
        if self.allow() {
            line();
        }
        if let Some(n) = self.summary() {
            more(n);
        }
    }

    /// What was left out and not reported yet (when the session ends).
    pub fn remaining(&mut self) -> Option<u64> {
        Some(std::mem::take(&mut self.suppressed)).filter(|&n| n > 0)
    }

    /// How many lines were left out since the last summary, once a second
    /// has passed since it (None otherwise, or when none were).
    pub fn summary(&mut self) -> Option<u64> {
        if self.suppressed == 0 || self.last_summary.elapsed() < SUMMARY_EVERY {
            return None;
        }
        self.last_summary = Instant::now();
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_only_counts() {
        let mut l = LogLimit::new(3);
        let allowed = (0..1000).filter(|_| l.allow()).count();
        assert_eq!(allowed, 3);
        // Within the first second: no summary yet.
        assert_eq!(l.summary(), None);
        l.last_summary -= SUMMARY_EVERY;
        assert_eq!(l.summary(), Some(997));
        assert_eq!(l.summary(), None);
    }
}
