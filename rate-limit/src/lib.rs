//! Rate limits as Firecracker defines them: a token bucket for operations
//! and one for bytes, each with a size (what a refill time brings back),
//! a one-time burst (spent first, never refilled) and a refill time.
//!
//! - `spec`: the limits as configured and carried between processes (one
//!   definition for blk-backend, net-backend, their control protocols and
//!   vmctl);
//! - `bucket`: one token bucket;
//! - `limiter`: the ops and bytes buckets of one user, and the taking of
//!   a request's cost from several limiters at once (an export's own and
//!   its group's: QEMU's throttle groups), all or nothing, with the time
//!   to wait when it cannot be had.

pub mod bucket;
pub mod limiter;
pub mod spec;

pub use bucket::TokenBucket;
pub use limiter::{take_all, Limiter, Shared};
pub use spec::{BucketSpec, Limits, SpecError};
