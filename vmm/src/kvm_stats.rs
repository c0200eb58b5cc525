//! KVM's own statistics of a vCPU (the binary stats of `KVM_GET_STATS_FD`,
//! Linux 5.14; what QEMU's `query-stats` reads): exits by kind, page
//! faults the (shadow) MMU fixed, instructions KVM emulated, halts. They
//! say where a vCPU's time in the kernel went, which this process's own
//! exit counts cannot (most exits never reach it), and go in the metrics
//! file beside them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{KVMIO, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// A header's and a descriptor's fixed part (linux/kvm.h).
const HEADER_LEN: usize = 24;
const DESC_LEN: usize = 16;
/// Far above what a kernel has (about 40 vCPU statistics, names under 48
/// bytes): a file that says more is not read.
const MAX_DESCRIPTORS: usize = 4096;
const MAX_NAME: usize = 1024;
/// Far above a kernel's data block (8 bytes a value, a few histograms).
const MAX_DATA: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    #[error("KVM_GET_STATS_FD: {0}")]
    Open(#[source] std::io::Error),
    #[error("reading KVM's statistics: {0}")]
    Read(#[source] std::io::Error),
    #[error("KVM's statistics header is out of bounds ({0} descriptors, names of {1} bytes)")]
    Header(usize, usize),
    #[error("KVM's statistics place a counter {0} bytes into their data")]
    Data(usize),
}

/// A vCPU's statistics file, opened while the vCPU exists; readable to the
/// end of the VM (it holds the VM).
pub struct VcpuStats(File);

impl VcpuStats {
    /// The statistics of `vcpu` (the vCPU's descriptor).
    pub fn of(vcpu: &impl AsRawFd) -> Result<VcpuStats, KvmStatsError> {
        // SAFETY: an ioctl without arguments on a vCPU descriptor; it
        // returns a new descriptor or -1.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(KvmStatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor the ioctl just made, owned by nothing else.
        Ok(VcpuStats(unsafe { File::from_raw_fd(fd) }))
    }

    /// The counters now: each cumulative or peak statistic of one value,
    /// by name (histograms and instant values left out).
    pub fn read(&self) -> Result<BTreeMap<String, u64>, KvmStatsError> {
        read_stats(&self.0)
    }
}

fn read_stats(f: &File) -> Result<BTreeMap<String, u64>, KvmStatsError> {
    let mut header = [0u8; HEADER_LEN];
    f.read_exact_at(&mut header, 0)
        .map_err(KvmStatsError::Read)?;
    let word = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let name_size = word(&header, 4) as usize;
    let count = word(&header, 8) as usize;
    let desc_offset = word(&header, 16) as u64;
    let data_offset = word(&header, 20) as u64;
    if count > MAX_DESCRIPTORS || name_size > MAX_NAME {
        return Err(KvmStatsError::Header(count, name_size));
    }
    let mut descs = vec![0u8; count * (DESC_LEN + name_size)];
    f.read_exact_at(&mut descs, desc_offset)
        .map_err(KvmStatsError::Read)?;
    // The counters wanted, by name and place in the data block.
    let wanted: Vec<(&[u8], usize)> = descs
        .chunks_exact(DESC_LEN + name_size)
        .filter_map(|d| {
            let flags = word(d, 0);
            let size = u16::from_ne_bytes([d[6], d[7]]);
            let kind = flags & KVM_STATS_TYPE_MASK;
            let counter = kind == KVM_STATS_TYPE_CUMULATIVE || kind == KVM_STATS_TYPE_PEAK;
            let name = &d[DESC_LEN..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            (size == 1 && counter).then_some((name, word(d, 8) as usize))
        })
        .collect();
    // The data block in one read, up to the last counter wanted.
    let end = wanted.iter().map(|&(_, at)| at + 8).max().unwrap_or(0);
    if end > MAX_DATA {
        return Err(KvmStatsError::Data(end));
    }
    let mut data = vec![0u8; end];
    f.read_exact_at(&mut data, data_offset)
        .map_err(KvmStatsError::Read)?;
    let mut out = BTreeMap::new();
    for (name, at) in wanted {
        let mut value = [0u8; 8];
        value.copy_from_slice(&data[at..at + 8]);
        out.insert(
            String::from_utf8_lossy(name).into_owned(),
            u64::from_ne_bytes(value),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A statistics file as KVM lays it out: header, descriptors, data.
    fn file(stats: &[(&str, u32, u16, u64)]) -> File {
        let name_size = 16usize;
        let desc_offset = HEADER_LEN as u32;
        let data_offset = desc_offset + (stats.len() * (DESC_LEN + name_size)) as u32;
        let mut b = Vec::new();
        for v in [
            0u32,
            name_size as u32,
            stats.len() as u32,
            0,
            desc_offset,
            data_offset,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        for (i, (name, flags, size, _)) in stats.iter().enumerate() {
            b.extend_from_slice(&flags.to_ne_bytes());
            b.extend_from_slice(&0i16.to_ne_bytes());
            b.extend_from_slice(&size.to_ne_bytes());
            b.extend_from_slice(&((i * 8) as u32).to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            b.extend_from_slice(&n);
        }
        for (_, _, _, v) in stats {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let mut f = tempfile::tempfile().expect("file");
        f.write_all(&b).expect("write");
        f
    }

    #[test]
    fn counters_are_read_by_name_and_histograms_left_out() {
        let f = file(&[
            ("exits", KVM_STATS_TYPE_CUMULATIVE, 1, 117),
            ("pf_fixed", KVM_STATS_TYPE_CUMULATIVE, 1, 42),
            (
                "halt_poll_ns_hist",
                kvm_bindings::KVM_STATS_TYPE_LOG_HIST,
                1,
                9,
            ),
            ("guest_mode", kvm_bindings::KVM_STATS_TYPE_INSTANT, 1, 1),
            ("max_mmu_page", KVM_STATS_TYPE_PEAK, 1, 3),
        ]);
        let s = read_stats(&f).expect("read");
        assert_eq!(s.get("exits"), Some(&117));
        assert_eq!(s.get("pf_fixed"), Some(&42));
        assert_eq!(s.get("max_mmu_page"), Some(&3));
        assert_eq!(s.len(), 3, "{s:?}");
    }

    #[test]
    fn a_header_out_of_bounds_or_a_short_file_is_an_error() {
        let mut f = tempfile::tempfile().expect("file");
        let mut b = Vec::new();
        for v in [0u32, 16, u32::MAX, 0, 24, 24] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        f.write_all(&b).expect("write");
        assert!(matches!(read_stats(&f), Err(KvmStatsError::Header(..))));
        let short = tempfile::tempfile().expect("file");
        assert!(matches!(read_stats(&short), Err(KvmStatsError::Read(_))));
    }
}
