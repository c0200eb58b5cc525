//! The VM's run state as vCPU threads and the control API share it:
//! pause, resume and stop reach vCPUs that may be inside KVM_RUN by a
//! signal, repeated until each vCPU has acknowledged (a signal that lands
//! just before KVM_RUN is entered would otherwise be lost). Also the
//! counters behind the metrics.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::snapshot::vcpu::{VcpuState, VcpuStateError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

/// Per-vCPU counters (relaxed: they are statistics).
#[derive(Default)]
pub struct VcpuStats {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub interrupted: AtomicU64,
    pub other: AtomicU64,
    /// Nanoseconds spent inside KVM_RUN.
    pub run_ns: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct VcpuMetrics {
    pub id: usize,
    /// The exits this process handled.
    pub exits: ExitCounts,
    pub run_ms: f64,
    /// KVM's own counters for the vCPU (`kvm_stats`), those not zero: every
    /// exit, including those the kernel handled.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub kvm: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Default)]
pub struct ExitCounts {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub interrupted: u64,
    pub other: u64,
    pub total: u64,
}

/// The run state, with how many vCPUs are parked and how many have ended
/// (a vCPU that faulted or powered off never parks, and a pause must not
/// wait for it).
struct Shared {
    run: RunState,
    parked: usize,
    ended: usize,
    /// Raised to ask the parked vCPUs for their state (a snapshot); each
    /// answers once per request, in `saved`.
    save_request: u64,
    /// The MSRs the request asks for.
    msr_indices: std::sync::Arc<[u32]>,
    saved: Vec<(u64, Option<Result<VcpuState, VcpuStateError>>)>,
}

/// Why the vCPUs' state could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("the VM is {0:?}: a snapshot needs it paused")]
    NotPaused(RunState),
    #[error(
        "{0} of the VM's vCPUs ended (the guest powered off or faulted): there is no state to save"
    )]
    Ended(usize),
    #[error("the vCPUs did not hand over their state within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
}

pub struct Control {
    state: Mutex<Shared>,
    changed: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
    pub stats: Vec<VcpuStats>,
    pub started: Instant,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

impl Control {
    pub fn new(vcpus: usize) -> std::io::Result<Control> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Control {
            state: Mutex::new(Shared {
                run: RunState::Running,
                parked: 0,
                ended: 0,
                save_request: 0,
                msr_indices: std::sync::Arc::from(Vec::new()),
                saved: (0..vcpus).map(|_| (0, None)).collect(),
            }),
            changed: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            stats: (0..vcpus).map(|_| VcpuStats::default()).collect(),
            started: Instant::now(),
        })
    }

    pub fn add_thread<T>(&self, h: &JoinHandle<T>) {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h.as_pthread_t());
    }

    pub fn state(&self) -> RunState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).run
    }

    fn kick_all(&self) {
        for &t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // SAFETY: signalling a thread of this process; the handler is
            // installed and does nothing but interrupt KVM_RUN.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Called by vCPU `id` before each KVM_RUN: parks while paused
    /// (handing over its state, by `save`, whenever a snapshot asks);
    /// false when the vCPU must end.
    pub fn vcpu_may_run(
        &self,
        id: usize,
        save: &mut dyn FnMut(&[u32]) -> Result<VcpuState, VcpuStateError>,
    ) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.run == RunState::Paused {
            st.parked += 1;
            self.changed.notify_all();
            while st.run == RunState::Paused {
                let asked = st.save_request;
                if st.saved.get(id).is_some_and(|s| s.0 != asked) {
                    // Saved without the lock: the state ioctls take time,
                    // and the other vCPUs save theirs meanwhile.
                    let msrs = std::sync::Arc::clone(&st.msr_indices);
                    drop(st);
                    let state = save(&msrs);
                    st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.saved[id] = (asked, Some(state));
                    self.changed.notify_all();
                    continue;
                }
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.parked -= 1;
        }
        st.run != RunState::Stopping
    }

    /// The state of every vCPU of a paused VM (`msr_indices` the MSRs to
    /// save), each read by its own thread (where KVM's vCPU state lives).
    pub fn save_vcpus(
        &self,
        timeout: Duration,
        msr_indices: &[u32],
    ) -> Result<Vec<VcpuState>, SaveError> {
        let n = self.stats.len();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.run != RunState::Paused {
            return Err(SaveError::NotPaused(st.run));
        }
        if st.ended > 0 {
            return Err(SaveError::Ended(st.ended));
        }
        st.save_request += 1;
        st.msr_indices = std::sync::Arc::from(msr_indices);
        let asked = st.save_request;
        self.changed.notify_all();
        let (mut st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |s| {
                s.ended == 0 && s.saved.iter().take(n).any(|r| r.0 != asked)
            })
            .unwrap_or_else(|e| e.into_inner());
        if st.ended > 0 {
            return Err(SaveError::Ended(st.ended));
        }
        if st.saved.iter().any(|r| r.0 != asked) {
            return Err(SaveError::Timeout(timeout));
        }
        let mut states = Vec::with_capacity(n);
        for slot in st.saved.iter_mut() {
            match slot.1.take() {
                Some(Ok(s)) => states.push(s),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SaveError::Timeout(timeout)),
            }
        }
        Ok(states)
    }

    /// Called once by a vCPU thread as it ends, whatever ended it.
    pub fn vcpu_ended(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.ended += 1;
        self.changed.notify_all();
    }

    /// Pauses every vCPU; returns once all are parked (or `false` after
    /// `timeout`).
    pub fn pause(&self, timeout: Duration) -> bool {
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.run != RunState::Running {
                return st.run == RunState::Paused;
            }
            st.run = RunState::Paused;
        }
        let n = self.stats.len();
        let t0 = Instant::now();
        loop {
            self.kick_all();
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let (st, _) = self
                .changed
                .wait_timeout_while(st, Duration::from_millis(1), |s| s.parked + s.ended < n)
                .unwrap_or_else(|e| e.into_inner());
            if st.parked + st.ended >= n {
                return true;
            }
            if t0.elapsed() > timeout {
                return false;
            }
        }
    }

    pub fn resume(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.run != RunState::Paused {
            return false;
        }
        st.run = RunState::Running;
        self.changed.notify_all();
        true
    }

    /// Ends every vCPU loop.
    pub fn stop(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.run = RunState::Stopping;
        self.changed.notify_all();
        drop(st);
        self.kick_all();
    }

    pub fn metrics(&self) -> Vec<VcpuMetrics> {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.stats
            .iter()
            .enumerate()
            .map(|(id, s)| {
                let mut e = ExitCounts {
                    io_in: r(&s.io_in),
                    io_out: r(&s.io_out),
                    mmio_read: r(&s.mmio_read),
                    mmio_write: r(&s.mmio_write),
                    interrupted: r(&s.interrupted),
                    other: r(&s.other),
                    total: 0,
                };
                e.total = e.io_in + e.io_out + e.mmio_read + e.mmio_write + e.other;
                VcpuMetrics {
                    id,
                    exits: e,
                    run_ms: r(&s.run_ns) as f64 / 1e6,
                    kvm: Default::default(),
                }
            })
            .collect()
    }
}
