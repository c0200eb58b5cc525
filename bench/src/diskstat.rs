//! What a block device did during a run, from its `/sys/block/DEV/stat`
//! counters read before and after: how many requests it completed and
//! how long each spent in the block layer and the device on average
//! (queued in the scheduler, then on the disk). With the I/O rate a
//! benchmark measured, Little's law gives how many requests were at the
//! device on average, so a run that keeps fewer of its requests in flight
//! there than its queue depth shows how long each waits outside the
//! device: in the guest, the frontend or the backend.
//!
//! Field order: Documentation/block/stat.rst (read I/Os, merges,
//! sectors, ticks; the same for writes; in flight; io_ticks;
//! time_in_queue; then discards and flushes). The read and write ticks
//! are taken, not time_in_queue, which counts flushes too (a journal's,
//! say) that the I/O count does not; the kernel prints ticks as 32-bit
//! milliseconds, which wrap (at 32 requests in flight, every 1.5 days),
//! so they are subtracted modulo 2^32.

use serde::Serialize;

/// A device's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Reads and writes completed.
    pub ios: u64,
    /// Milliseconds reads and writes spent in the block layer and the
    /// device, summed over every request, modulo 2^32.
    pub queue_ms: u32,
}

impl Counters {
    /// The counters of block device `name` (as "vda"); None if it has none.
    pub fn read(name: &str) -> Option<Counters> {
        let text = std::fs::read_to_string(format!("/sys/block/{name}/stat")).ok()?;
        Counters::parse(&text)
    }

    fn parse(text: &str) -> Option<Counters> {
        let f: Vec<u64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        // Up to time_in_queue, so that a line cut short is refused.
        f.get(10)?;
        let ticks = |i: usize| f[i] as u32;
        Some(Counters {
            ios: f[0] + f[4],
            queue_ms: ticks(3).wrapping_add(ticks(7)),
        })
    }

    /// What happened between `before` and these counters; None when the
    /// device completed nothing (or the counters went back: another
    /// device, a reset).
    pub fn since(&self, before: &Counters) -> Option<Activity> {
        let ios = self.ios.checked_sub(before.ios).filter(|n| *n > 0)?;
        let queue_ms = self.queue_ms.wrapping_sub(before.queue_ms);
        Some(Activity {
            ios,
            mean_us: queue_ms as f64 * 1000.0 / ios as f64,
        })
    }
}

/// A device's work over a run.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Activity {
    /// Requests it completed (every process's: a run on an idle machine
    /// is nearly all of them).
    pub ios: u64,
    /// Their mean time in the block layer and the device, µs.
    pub mean_us: f64,
}

impl Activity {
    /// Requests at the device on average while requests completed at
    /// `iops` (Little's law).
    pub fn in_flight(&self, iops: f64) -> f64 {
        self.mean_us * iops / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_the_reads_and_writes_and_the_weighted_time() {
        // 40 ms of reads and 960 of writes; time_in_queue (1020) also
        // counts the flushes' 20.
        let line = "  100  5  800  40   300  7  2400  960    2   500   1020  0 0 0 0  9 20\n";
        let c = Counters::parse(line).unwrap();
        assert_eq!(
            c,
            Counters {
                ios: 400,
                queue_ms: 1000
            }
        );
        let later = Counters {
            ios: 2400,
            queue_ms: 1500,
        };
        let a = later.since(&c).unwrap();
        assert_eq!(a.ios, 2000);
        assert!((a.mean_us - 250.0).abs() < 1e-9);
        // 100k requests a second, each 250 µs in the device: 25 there at once.
        assert!((a.in_flight(100_000.0) - 25.0).abs() < 1e-9);
    }

    #[test]
    fn nothing_completed_or_counters_reset_is_no_activity() {
        let c = Counters {
            ios: 10,
            queue_ms: 5,
        };
        assert_eq!(c.since(&c), None);
        let reset = Counters {
            ios: 3,
            queue_ms: 1,
        };
        assert_eq!(reset.since(&c), None);
        // Ticks that wrapped past 2^32 ms still give the time between.
        let before = Counters {
            ios: 10,
            queue_ms: u32::MAX - 99,
        };
        let after = Counters {
            ios: 110,
            queue_ms: 400,
        };
        assert_eq!(after.since(&before).unwrap().mean_us, 5000.0);
        assert_eq!(Counters::parse("1 2 3"), None);
        assert_eq!(Counters::parse("a b c d e f g h i j k"), None);
    }

    #[test]
    fn this_machines_disks_can_be_read() {
        // Every disk under /sys/block has counters in this format.
        let mut any = false;
        for d in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            assert!(Counters::read(&name).is_some(), "{name}");
            any = true;
        }
        assert!(any);
    }
}
