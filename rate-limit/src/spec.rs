//! The limits as configured: what a user writes (`iops=500`,
//! `bw=50M`), what the control protocols carry (JSON), checked once.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest refill time accepted (an hour): a bucket refilled more
/// slowly than that is a mistake, not a limit.
pub const MAX_REFILL_MS: u64 = 3_600_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("{what}: the size must be at least 1 (0 would stop everything; leave the limit out for none)")]
    ZeroSize { what: &'static str },
    #[error("{what}: the refill time must be 1 ms to {MAX_REFILL_MS} ms, not {ms}")]
    Refill { what: &'static str, ms: u64 },
}

/// One token bucket: `size` tokens come back every `refill_ms` (and the
/// bucket holds at most `size`); `one_time_burst` more are there at first
/// and are spent before the bucket's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSpec {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    #[serde(default = "one_second")]
    pub refill_ms: u64,
}

fn one_second() -> u64 {
    1000
}

impl BucketSpec {
    /// `rate` per second, no burst.
    pub fn per_second(rate: u64) -> BucketSpec {
        BucketSpec {
            size: rate,
            one_time_burst: 0,
            refill_ms: 1000,
        }
    }

    fn check(&self, what: &'static str) -> Result<(), SpecError> {
        if self.size == 0 {
            return Err(SpecError::ZeroSize { what });
        }
        if !(1..=MAX_REFILL_MS).contains(&self.refill_ms) {
            return Err(SpecError::Refill {
                what,
                ms: self.refill_ms,
            });
        }
        Ok(())
    }
}

/// A user's limits: operations and bytes (none: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<BucketSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<BucketSpec>,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        self.ops.is_none() && self.bytes.is_none()
    }

    /// The one check (every process that takes limits runs it).
    pub fn check(&self) -> Result<(), SpecError> {
        if let Some(b) = &self.ops {
            b.check("ops")?;
        }
        if let Some(b) = &self.bytes {
            b.check("bytes")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_back_and_bad_ones_are_refused_by_name() {
        let l = Limits {
            ops: Some(BucketSpec::per_second(500)),
            bytes: None,
        };
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(
            text,
            r#"{"ops":{"size":500,"one_time_burst":0,"refill_ms":1000}}"#
        );
        assert_eq!(serde_json::from_str::<Limits>(&text).unwrap(), l);
        let short: Limits = serde_json::from_str(r#"{"bytes":{"size":1048576}}"#).unwrap();
        assert_eq!(short.bytes, Some(BucketSpec::per_second(1 << 20)));
        l.check().unwrap();
        let zero = Limits {
            ops: Some(BucketSpec::per_second(0)),
            bytes: None,
        };
        assert!(zero
            .check()
            .unwrap_err()
            .to_string()
            .contains("ops: the size must be at least 1"));
        let slow = Limits {
            ops: None,
            bytes: Some(BucketSpec {
                size: 1,
                one_time_burst: 0,
                refill_ms: 0,
            }),
        };
        assert!(slow
            .check()
            .unwrap_err()
            .to_string()
            .contains("bytes: the refill time"));
        assert!(serde_json::from_str::<Limits>(r#"{"iops":5}"#).is_err());
    }
}
