//! Which host CPUs a thread runs on. A [`CpuList`] is written as
//! `taskset -c`, cgroup cpusets and `/sys/devices/system/cpu/online` write
//! it (`0-3,6`), and is the one format of every affinity setting of the
//! project: the vmm's `--vcpu-affinity`, blk-backend's `--worker-cpus`,
//! the same keys in their JSON configs and in vmctl.
//!
//! A list spreads threads one CPU each, in turn: thread `k` of a kind
//! (vCPU `k`, queue `k`'s worker) runs on the list's `k`-th CPU, modulo
//! its length, so `--vcpu-affinity 2,3` puts vCPU 0 on CPU 2 and vCPU 1 on
//! CPU 3, and a one-CPU list keeps every such thread there.

use std::fmt;
use std::str::FromStr;

use rustix::thread::CpuSet;

/// A list that is not one, or a CPU this process cannot run on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuError {
    #[error("an empty CPU list (give CPUs as 0-3,6)")]
    Empty,
    #[error("{0:?} is not a CPU number or a range of them (give CPUs as 0-3,6)")]
    NotACpu(String),
    #[error("{0:?}: a range runs from the lower CPU to the higher (0-3)")]
    BackwardRange(String),
    #[error("CPU {0} listed twice")]
    Repeated(usize),
    #[error("CPU {cpu} is beyond the {max} CPUs a thread's affinity can name")]
    TooLarge { cpu: usize, max: usize },
    #[error("CPU {cpu} is not one this process may run on (it may use {allowed})")]
    NotAllowed { cpu: usize, allowed: String },
    #[error("the CPUs this process may run on are unknown: {0}")]
    Unknown(rustix::io::Errno),
    #[error("pinning the thread to CPU {cpu}: {errno}")]
    Pin {
        cpu: usize,
        errno: rustix::io::Errno,
    },
}

/// CPUs in the order written, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// The CPUs, in the order written.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// The CPU for thread `k` of a kind: the list's `k`-th, in turn.
    pub fn for_thread(&self, k: usize) -> usize {
        self.0[k % self.0.len()]
    }

    /// Refuses a CPU the process may not run on (offline, outside its
    /// cpuset or `taskset`), so a bad list fails at start with the reason
    /// instead of at the first thread it would have pinned.
    pub fn check_allowed(&self) -> Result<(), CpuError> {
        let allowed = rustix::thread::sched_getaffinity(None).map_err(CpuError::Unknown)?;
        match self.0.iter().find(|&&c| !allowed.is_set(c)) {
            None => Ok(()),
            Some(&cpu) => Err(CpuError::NotAllowed {
                cpu,
                allowed: describe(&allowed),
            }),
        }
    }

    /// Pins the calling thread to thread `k`'s CPU; returns the CPU.
    pub fn pin_thread(&self, k: usize) -> Result<usize, CpuError> {
        let cpu = self.for_thread(k);
        pin_current_thread(cpu)?;
        Ok(cpu)
    }
}

/// Pins the calling thread to `cpu` alone.
pub fn pin_current_thread(cpu: usize) -> Result<(), CpuError> {
    let mut set = CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(|errno| CpuError::Pin { cpu, errno })
}

/// The CPUs the calling thread may run on (its affinity).
pub fn current_affinity() -> Result<CpuList, CpuError> {
    let set = rustix::thread::sched_getaffinity(None).map_err(CpuError::Unknown)?;
    Ok(CpuList(
        (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
    ))
}

fn describe(set: &CpuSet) -> String {
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect();
    if cpus.is_empty() {
        "none".into()
    } else {
        CpuList(cpus).to_string()
    }
}

impl FromStr for CpuList {
    type Err = CpuError;

    fn from_str(text: &str) -> Result<CpuList, CpuError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(CpuError::Empty);
        }
        let number = |s: &str| -> Result<usize, CpuError> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CpuError::NotACpu(s.to_string()));
            }
            let cpu: usize = s.parse().map_err(|_| CpuError::NotACpu(s.to_string()))?;
            if cpu >= CpuSet::MAX_CPU {
                return Err(CpuError::TooLarge {
                    cpu,
                    max: CpuSet::MAX_CPU,
                });
            }
            Ok(cpu)
        };
        let mut cpus = Vec::new();
        for part in t.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let c = number(part)?;
                    (c, c)
                }
            };
            if hi < lo {
                return Err(CpuError::BackwardRange(part.trim().to_string()));
            }
            for c in lo..=hi {
                if cpus.contains(&c) {
                    return Err(CpuError::Repeated(c));
                }
                cpus.push(c);
            }
        }
        Ok(CpuList(cpus))
    }
}

/// Runs of consecutive CPUs as ranges: `0-3,6`.
impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j > i {
                write!(f, "{}-{}", self.0[i], self.0[j])?;
            } else {
                write!(f, "{}", self.0[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// In JSON, the same text as on a command line: `"0-3,6"`.
impl serde::Serialize for CpuList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CpuList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CpuList, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_as_taskset_writes_them_and_print_back_in_ranges() {
        let l: CpuList = "0-3,6".parse().unwrap();
        assert_eq!(l.cpus(), &[0, 1, 2, 3, 6]);
        assert_eq!(l.to_string(), "0-3,6");
        let l: CpuList = " 5, 1 ,2".parse().unwrap();
        assert_eq!(l.cpus(), &[5, 1, 2]);
        assert_eq!(l.to_string(), "5,1-2");
        assert_eq!("7".parse::<CpuList>().unwrap().to_string(), "7");
    }

    #[test]
    fn bad_lists_are_refused_by_what_is_wrong() {
        assert_eq!("".parse::<CpuList>(), Err(CpuError::Empty));
        assert_eq!("a".parse::<CpuList>(), Err(CpuError::NotACpu("a".into())));
        assert_eq!("1,".parse::<CpuList>(), Err(CpuError::NotACpu("".into())));
        assert_eq!("-1".parse::<CpuList>(), Err(CpuError::NotACpu("".into())));
        assert_eq!(
            "3-1".parse::<CpuList>(),
            Err(CpuError::BackwardRange("3-1".into()))
        );
        assert_eq!("1,0-2".parse::<CpuList>(), Err(CpuError::Repeated(1)));
        assert!(matches!(
            "99999999".parse::<CpuList>(),
            Err(CpuError::TooLarge { cpu: 99999999, .. })
        ));
        assert!(matches!(
            "99999999999999999999999".parse::<CpuList>(),
            Err(CpuError::NotACpu(_))
        ));
    }

    #[test]
    fn threads_take_the_cpus_in_turn() {
        let l: CpuList = "2,3".parse().unwrap();
        let got: Vec<usize> = (0..5).map(|k| l.for_thread(k)).collect();
        assert_eq!(got, [2, 3, 2, 3, 2]);
    }

    #[test]
    fn json_carries_the_same_text() {
        let l: CpuList = "0-1,4".parse().unwrap();
        assert_eq!(serde_json::to_string(&l).unwrap(), r#""0-1,4""#);
        let back: CpuList = serde_json::from_str(r#""0-1,4""#).unwrap();
        assert_eq!(back, l);
        let bad = serde_json::from_str::<CpuList>(r#""x""#).unwrap_err();
        assert!(bad.to_string().contains("not a CPU number"), "{bad}");
    }

    #[test]
    fn a_thread_pins_to_an_allowed_cpu_and_a_cpu_it_may_not_use_is_refused() {
        let allowed = current_affinity().unwrap();
        let first = allowed.cpus()[0];
        allowed.check_allowed().unwrap();
        // A thread of its own: the test harness's threads keep theirs.
        std::thread::spawn(move || {
            let l = CpuList(vec![first]);
            assert_eq!(l.pin_thread(0).unwrap(), first);
            assert_eq!(current_affinity().unwrap().cpus(), &[first]);
        })
        .join()
        .unwrap();
        let beyond = CpuList(vec![CpuSet::MAX_CPU - 1]);
        assert!(matches!(
            beyond.check_allowed(),
            Err(CpuError::NotAllowed { .. })
        ));
    }
}
