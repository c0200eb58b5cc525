//! How long a queue worker polls before it sleeps, learnt from how long
//! its sleeps turn out to be (the rule of QEMU's adaptive AioContext
//! polling). Polling only pays when the next kick or completion comes
//! within the window: a worker whose sleeps end sooner than its window
//! would have lasted widens it (up to the export's `poll_us`), one whose
//! sleeps outlast the widest window halves it (down to not polling at all,
//! where an idle or a sparse queue costs no CPU). The ring's own flags
//! keep a polling worker from making system calls, so a window that pays
//! makes the round trip of a shallow queue free of wake-ups.

use std::time::Duration;

/// The window's first step when it grows from nothing.
const START: Duration = Duration::from_micros(4);

#[derive(Debug, Clone, Copy)]
pub struct PollWindow {
    now: Duration,
    max: Duration,
}

impl PollWindow {
    /// A window starting at its widest, `max` (zero: never polls).
    pub fn new(max: Duration) -> PollWindow {
        PollWindow { now: max, max }
    }

    /// How long to poll now.
    pub fn get(&self) -> Duration {
        self.now
    }

    /// Learns from a sleep that lasted `slept` (after polling for the
    /// current window, or not polling at all).
    pub fn slept(&mut self, slept: Duration) {
        if self.max.is_zero() {
            return;
        }
        if slept <= self.max {
            // A longer poll would have caught it without the sleep.
            if slept > self.now {
                self.now = (self.now * 2).max(START).min(self.max);
            }
        } else {
            // Nothing came within the widest window: polling was wasted.
            self.now /= 2;
            if self.now < START {
                self.now = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn sparse_work_stops_the_polling_and_close_work_brings_it_back() {
        let mut w = PollWindow::new(50 * US);
        assert_eq!(w.get(), 50 * US);
        // Sleeps longer than the widest window: halved down to nothing.
        let mut steps = 0;
        while !w.get().is_zero() {
            w.slept(1000 * US);
            steps += 1;
            assert!(steps < 10, "the window never closed: {:?}", w.get());
        }
        assert_eq!(steps, 4, "50 -> 25 -> 12.5 -> 6.25 -> 0 us");
        // Work that comes 20 us apart: the window grows until it covers it.
        let mut sizes = Vec::new();
        for _ in 0..6 {
            w.slept(20 * US);
            sizes.push(w.get().as_micros());
        }
        assert_eq!(sizes, [4, 8, 16, 32, 32, 32]);
        // Never past the maximum.
        for _ in 0..4 {
            w.slept(49 * US);
        }
        assert_eq!(w.get(), 50 * US);
    }

    #[test]
    fn a_window_of_zero_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        w.slept(US);
        assert!(w.get().is_zero());
    }
}
