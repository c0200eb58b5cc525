//! Stats: the CPU time and resident memory of a VM's processes (its vmm,
//! and its own disk backend if it has one), as the cgroups v2 metrics the
//! CRI reads, from /proc.

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};

/// utime and stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from
    // the last ')'. After it: state, ppid, ... utime is the 12th, stime
    // the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// `pid`'s resident set, in bytes.
fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The metrics of `pids` together (a process that is gone counts nothing).
pub fn of(pids: &[u32]) -> Metrics {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let usec = |ticks: u64| ticks * 1_000_000 / hz;
    let (mut user, mut system, mut memory, mut alive) = (0, 0, 0, 0);
    for &pid in pids {
        if let Some((u, s)) = cpu_ticks(pid) {
            user += usec(u);
            system += usec(s);
            alive += 1;
        }
        memory += rss(pid).unwrap_or(0);
    }
    let mut m = Metrics::new();
    let mut cpu = CPUStat::new();
    cpu.user_usec = user;
    cpu.system_usec = system;
    cpu.usage_usec = user + system;
    m.cpu = Some(cpu).into();
    let mut mem = MemoryStat::new();
    mem.usage = memory;
    m.memory = Some(mem).into();
    let mut p = PidsStat::new();
    p.current = alive;
    m.pids = Some(p).into();
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_is_measured_and_a_missing_one_counts_nothing() {
        let me = std::process::id();
        let m = super::of(&[me]);
        assert!(m.memory.usage > 0);
        assert_eq!(m.pids.current, 1);
        let gone = super::of(&[u32::MAX]);
        assert_eq!(
            (gone.memory.usage, gone.pids.current, gone.cpu.usage_usec),
            (0, 0, 0)
        );
    }
}
