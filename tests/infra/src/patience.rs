//! Waits that catch hangs without betting on the machine's speed.
//!
//! A test waits for something (a socket, a console line, a guest's end)
//! only to notice when it never comes. So each wait is sized from what the
//! thing was measured to cost on the project's reference machine (2 cores,
//! PVM software virtualization, the slowest kind the project runs on),
//! times a wide margin, never below a floor that absorbs scheduling
//! hiccups on a busy machine, and times `E2E_TIME_SCALE` where a machine is
//! known to be slower still. When a wait runs out, its message says what
//! was measured and how long it waited, so a slow machine is told apart
//! from a hang at a glance.

use std::fmt;
use std::time::{Duration, Instant};

/// No hang-catching wait is shorter than this, however cheap the thing
/// awaited: a loaded 2-core machine can stall a process for seconds.
pub const FLOOR: Duration = Duration::from_secs(30);

/// The margin most waits use over their measured cost.
pub const MARGIN: u32 = 10;

/// `E2E_TIME_SCALE` (a number, default 1): stretches every wait.
pub fn time_scale() -> f64 {
    std::env::var("E2E_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|&x| x.is_finite() && x >= 1.0)
        .unwrap_or(1.0)
}

/// A wait sized to catch a hang: see the module's documentation.
#[derive(Clone, Debug)]
pub struct Patience {
    /// What is awaited, as a failure message would name it.
    pub what: String,
    /// What it cost when measured on the reference machine.
    pub measured: Duration,
    /// How many times that the wait allows.
    pub margin: u32,
}

impl Patience {
    /// `what` measured `measured` on the reference machine; the wait allows
    /// [`MARGIN`] times that (at least [`FLOOR`]).
    pub fn new(what: impl Into<String>, measured: Duration) -> Patience {
        Patience::with_margin(what, measured, MARGIN)
    }

    pub fn with_margin(what: impl Into<String>, measured: Duration, margin: u32) -> Patience {
        Patience {
            what: what.into(),
            measured,
            margin,
        }
    }

    /// How long the wait lasts.
    pub fn limit(&self) -> Duration {
        (self.measured * self.margin)
            .max(FLOOR)
            .mul_f64(time_scale())
    }

    /// Whether a wait that began at `since` has run out.
    pub fn expired(&self, since: Instant) -> bool {
        since.elapsed() > self.limit()
    }

    /// Polls `done` until it is true; Err with [`Patience::explain`] if the
    /// wait runs out first. `done` may fail the wait early by returning Err
    /// (a process it waits for has died, say).
    pub fn wait_until(
        &self,
        mut done: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if done()? {
                return Ok(t0.elapsed());
            }
            if self.expired(t0) {
                anyhow::bail!("{}", self.explain(t0.elapsed()));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The failure message: what was awaited, for how long, and why that long.
    pub fn explain(&self, waited: Duration) -> String {
        format!(
            "{self}: still not there after {:.1} s",
            waited.as_secs_f64()
        )
    }
}

impl fmt::Display for Patience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scale = time_scale();
        write!(
            f,
            "{} (measured {:.3} s on the reference machine; waiting up to {:.0} s: {}x that, at least {} s{})",
            self.what,
            self.measured.as_secs_f64(),
            self.limit().as_secs_f64(),
            self.margin,
            FLOOR.as_secs(),
            if scale > 1.0 {
                format!(", times E2E_TIME_SCALE={scale}")
            } else {
                ", E2E_TIME_SCALE stretches it".to_string()
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_the_measured_cost_times_the_margin_never_below_the_floor() {
        let p = Patience::new("a socket", Duration::from_millis(10));
        assert_eq!(p.limit(), FLOOR.mul_f64(time_scale()));
        let p = Patience::new("a 1 GiB write", Duration::from_secs(12));
        assert_eq!(p.limit(), Duration::from_secs(120).mul_f64(time_scale()));
        let msg = p.explain(Duration::from_secs(121));
        assert!(msg.contains("a 1 GiB write"), "{msg}");
        assert!(msg.contains("measured 12.000 s"), "{msg}");
        assert!(msg.contains("121.0 s"), "{msg}");
    }

    #[test]
    fn wait_until_returns_when_done_and_fails_early_on_error() {
        let p = Patience::new("a counter", Duration::from_millis(1));
        let mut n = 0;
        p.wait_until(|| {
            n += 1;
            Ok(n >= 3)
        })
        .unwrap();
        assert_eq!(n, 3);
        let err = p
            .wait_until(|| anyhow::bail!("the process died"))
            .unwrap_err();
        assert!(err.to_string().contains("died"));
    }
}
