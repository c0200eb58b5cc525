//! The workload engine: keeps `qd` requests in flight on each queue, times
//! every one with the TSC, verifies what it reads, and counts everything.

use core::arch::x86_64::{_mm_crc32_u32, _mm_crc32_u64};

use crate::blk::{self, Device};
use crate::config::Config;
use crate::mem::{rd32, rd64, rd8, wr32, wr64, wr8, Arena};
use crate::time::{tsc, Clock};
use crate::virtio::{write_desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, IRQ_BASE};

extern "C" {
    static irq_counts: [u64; 256];
}

fn irq_count(vector: u8) -> u64 {
    // SAFETY: counters the interrupt stub increments; read-only here.
    unsafe { core::ptr::read_volatile((&raw const irq_counts as *const u64).add(vector as usize)) }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// What a read must hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Anything,
    /// Blocks written by `write_pattern`.
    Pattern { gen: u32 },
    Zeros,
}

/// One phase: which requests, where, how many.
#[derive(Clone, Copy)]
pub struct Phase {
    pub random: bool,
    /// Percent reads (100 = reads only, 0 = writes only); for Read/Write ops.
    pub read_pct: u8,
    /// Op for non-data phases (flush/discard/write-zeroes); None = read/write.
    pub special: Option<Op>,
    pub io_bytes: u32,
    pub start: u64,
    pub len: u64,
    pub ios: u64,
    pub duration_ns: u64,
    pub expect: Expect,
    pub gen: u32,
    pub flush_every: u64,
}

#[derive(Default, Clone, Copy)]
pub struct Stats {
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub ioerr: u64,
    pub unsupp: u64,
    pub verify_failures: u64,
    pub elapsed_ticks: u64,
    pub lat_sum: u128,
    pub lat_max: u64,
    pub samples: usize,
    pub irqs: u64,
    pub kicks: u64,
    pub timed_out: bool,
}

struct Slot {
    hdr: u64,
    status: u64,
    data: u64,
    itable: u64,
    op: Op,
    sector: u64,
    bytes: u32,
    started: u64,
}

pub struct Engine<'a> {
    dev: &'a mut Device,
    clock: &'a Clock,
    slots: &'static mut [Slot],
    free: &'static mut [u16],
    free_len: [usize; 16],
    per_queue: usize,
    /// Latency samples in TSC ticks.
    lat: &'static mut [u32],
    cfg: Config,
    rng: u64,
    messages: u32,
    /// A NIC answering for the guest's address while the workload runs
    /// (`ip=` given): looked at whenever the disk is.
    pub nic: Option<crate::net::Nic>,
}

const MAGIC: u32 = u32::from_le_bytes(*b"BGV1");
const SECTOR: u64 = 512;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Every 512-byte sector: magic, generation, its own sector number, a
/// payload derived from both, the write's stamp (the TSC when it was
/// built), and a CRC-32C over it all: a read proves which write it came
/// from and where it belongs. The stamp tells apart the writes of VMs that
/// run the same workload, such as copies restored from one snapshot: a
/// sector that two disks hold alike was written once, before they parted.
fn sector_crc(addr: u64) -> u32 {
    let mut crc = !0u64;
    for w in 0..63u64 {
        // SAFETY: sse4.2 is part of the x86-64-v2 baseline this guest is built for.
        crc = unsafe { _mm_crc32_u64(crc, rd64(addr + 8 * w)) };
    }
    // SAFETY: as above.
    !(unsafe { _mm_crc32_u32(crc as u32, rd32(addr + 508)) })
}

pub fn write_pattern(addr: u64, sector: u64, gen: u32, stamp: u32) {
    wr32(addr, MAGIC);
    wr32(addr + 4, gen);
    wr64(addr + 8, sector);
    let mut s = sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((gen as u64) << 40) ^ 0x5bd1_e995;
    if s == 0 {
        s = 1;
    }
    for w in 2..63u64 {
        wr64(addr + 8 * w, xorshift(&mut s));
    }
    wr32(addr + 508, stamp);
    let crc = sector_crc(addr);
    wr32(addr + 504, crc);
}

/// Why a sector does not hold what it should, or None.
fn check_sector(addr: u64, sector: u64, expect: Expect) -> Option<(&'static str, u64)> {
    match expect {
        Expect::Anything => None,
        Expect::Zeros => (0..64).find(|&w| rd64(addr + 8 * w) != 0).map(|_| ("not zeros", 0)),
        Expect::Pattern { gen } => {
            if (0..64).all(|w| rd64(addr + 8 * w) == 0) {
                return Some(("zeros: never written", 0));
            }
            if rd32(addr) != MAGIC {
                return Some(("no block header (foreign or corrupt data)", rd32(addr) as u64));
            }
            let stored = rd32(addr + 504);
            wr32(addr + 504, 0);
            let crc = sector_crc(addr);
            wr32(addr + 504, stored);
            if crc != stored {
                return Some(("checksum mismatch (corrupt data)", stored as u64));
            }
            let lba = rd64(addr + 8);
            if lba != sector {
                return Some(("holds another sector's data, sector", lba));
            }
            let g = rd32(addr + 4) as u64;
            if gen != 0 && g != gen as u64 {
                return Some(("wrong generation", g));
            }
            None
        }
    }
}

impl<'a> Engine<'a> {
    pub fn new(dev: &'a mut Device, clock: &'a Clock, cfg: Config, arena: &Arena, max_io: u32) -> Option<Self> {
        let nq = dev.nqueues as usize;
        let indirect = dev.features & crate::virtio::F_INDIRECT_DESC != 0;
        let qsize = dev.queues[0].as_ref()?.size as usize;
        let per_queue = (cfg.qd as usize).min(if indirect { qsize } else { qsize / 3 }).max(1);
        let n = nq * per_queue;
        let base = arena.alloc((n * core::mem::size_of::<Slot>()) as u64, 64)?;
        // SAFETY: fresh memory for n slots, initialised right below before use.
        let slots: &'static mut [Slot] = unsafe { core::slice::from_raw_parts_mut(base as *mut Slot, n) };
        for s in slots.iter_mut() {
            let hdr = arena.alloc(64, 64)?;
            *s = Slot {
                hdr,
                status: hdr + 16,
                data: arena.alloc(max_io as u64, 4096)?,
                itable: arena.alloc(48, 16)?,
                op: Op::Read,
                sector: 0,
                bytes: 0,
                started: 0,
            };
        }
        let free = arena.slice::<u16>(n)?;
        let mut free_len = [0usize; 16];
        for q in 0..nq {
            for i in 0..per_queue {
                free[q * per_queue + i] = i as u16;
            }
            free_len[q] = per_queue;
        }
        // Up to 8M samples, or what memory allows with room to spare; not
        // cleared (a sample is written before it is read), so its pages
        // are touched only as samples fill them: a 1-I/O guest no longer
        // spends 150 ms faulting in 28 MiB it never uses.
        let cap = ((arena.free_bytes() / 2 / 4) as usize).min(8 << 20);
        let lat = arena.samples(cap)?;
        Some(Engine { dev, clock, slots, free, free_len, per_queue, lat, cfg, rng: cfg.seed | 1, messages: 0, nic: None })
    }

    pub fn per_queue_depth(&self) -> usize {
        self.per_queue
    }

    fn report(&mut self, args: core::fmt::Arguments) {
        if self.messages < 10 {
            crate::println!("{}", args);
        } else if self.messages == 10 {
            crate::println!("(further messages suppressed)");
        }
        self.messages += 1;
    }

    /// Builds slot `i` of queue `q` and makes it available.
    fn submit(&mut self, q: usize, i: u16, op: Op, sector: u64, bytes: u32, gen: u32) {
        let indirect = self.dev.features & crate::virtio::F_INDIRECT_DESC != 0;
        let s = &mut self.slots[q * self.per_queue + i as usize];
        let (kind, data_len, data_flags) = match op {
            Op::Read => (blk::T_IN, bytes, DESC_F_WRITE),
            Op::Write => {
                let stamp = crate::time::raw_tsc() as u32;
                for k in 0..(bytes as u64 / SECTOR) {
                    write_pattern(s.data + k * SECTOR, sector + k, gen, stamp);
                }
                (blk::T_OUT, bytes, 0)
            }
            Op::Flush => (blk::T_FLUSH, 0, 0),
            Op::Discard | Op::WriteZeroes => {
                wr64(s.data, sector);
                wr32(s.data + 8, bytes / SECTOR as u32);
                wr32(s.data + 12, 0);
                let t = if op == Op::Discard { blk::T_DISCARD } else { blk::T_WRITE_ZEROES };
                (t, 16, 0)
            }
        };
        wr32(s.hdr, kind);
        wr32(s.hdr + 4, 0);
        wr64(s.hdr + 8, if op == Op::Flush { 0 } else { sector });
        wr8(s.status, 0xff);
        s.op = op;
        s.sector = sector;
        s.bytes = bytes;
        let vq = self.dev.queues[q].as_mut().expect("queue set up");
        let (table, first) = if indirect { (s.itable, 0u16) } else { (vq.desc_table(), 3 * i) };
        let mut n = 0u16;
        write_desc(table, first, s.hdr, 16, DESC_F_NEXT, first + 1);
        n += 1;
        if data_len > 0 {
            write_desc(table, first + n, s.data, data_len, data_flags | DESC_F_NEXT, first + n + 1);
            n += 1;
        }
        write_desc(table, first + n, s.status, 1, DESC_F_WRITE, 0);
        n += 1;
        let head = if indirect {
            write_desc(vq.desc_table(), i, s.itable, 16 * n as u32, DESC_F_INDIRECT, 0);
            i
        } else {
            first
        };
        s.started = tsc();
        vq.push(head);
    }

    /// Runs one phase to completion (or timeout). Returns its statistics.
    pub fn run(&mut self, p: &Phase) -> Stats {
        let mut st = Stats::default();
        let nq = self.dev.nqueues as usize;
        let indirect = self.dev.features & crate::virtio::F_INDIRECT_DESC != 0;
        let sectors_per_io = (p.io_bytes as u64 / SECTOR).max(1);
        let units = (p.len / SECTOR / sectors_per_io).max(1);
        let target = if p.ios > 0 {
            p.ios
        } else if p.duration_ns > 0 {
            u64::MAX
        } else {
            units
        };
        let start = tsc();
        let end = if p.duration_ns > 0 { start + self.clock.ticks(p.duration_ns) } else { u64::MAX };
        let timeout = self.clock.ticks(self.cfg.timeout_ms * 1_000_000);
        let progress_every = self.clock.ticks(self.cfg.progress_ms.max(1) * 1_000_000);
        let mut next_progress = start + progress_every;
        let mut last_activity = start;
        let mut issued = 0u64;
        let mut seq_unit = 0u64;
        let mut writes_since_flush = 0u64;
        let mut flush_pending = false;
        let mut inflight = [0usize; 16];
        let mut irq_seen = [0u64; 16];
        for (q, seen) in irq_seen.iter_mut().enumerate().take(nq) {
            *seen = irq_count(IRQ_BASE + q as u8);
        }
        let mut samples = 0usize;
        let halt = self.cfg.halt && self.dev.irq;
        loop {
            // Interrupts so far, read before looking at the rings: a
            // completion after this look wakes the halt below at once.
            let irqs_before_look = if halt { crate::rt::irq_total() } else { 0 };
            if let Some(nic) = self.nic.as_mut() {
                // Frames answered between I/Os (a frame after this look
                // wakes the halt below: its interrupt counts).
                nic.poll();
            }
            let mut progressed = false;
            let now = tsc();
            let stop_issuing = issued >= target || now >= end;
            let total_inflight: usize = inflight[..nq].iter().sum();
            if stop_issuing && total_inflight == 0 && !flush_pending {
                break;
            }
            if total_inflight > 0 && now - last_activity > timeout {
                let (ms, why) = (
                    self.cfg.timeout_ms,
                    if self.dev.irq { " (or its interrupts do not arrive)" } else { "" },
                );
                self.report(format_args!(
                    "ERROR: device stopped answering: {total_inflight} requests outstanding for {ms} ms{why}"
                ));
                st.timed_out = true;
                break;
            }
            for q in 0..nq {
                // Completions. In interrupt mode only after an interrupt came.
                let reap = if self.dev.irq {
                    let c = irq_count(IRQ_BASE + q as u8);
                    let fresh = c != irq_seen[q];
                    st.irqs += c - irq_seen[q];
                    irq_seen[q] = c;
                    fresh
                } else {
                    true
                };
                // (A loop of its own: `continue` takes the next completion.)
                if reap {
                    loop {
                        let vq = self.dev.queues[q].as_mut().expect("queue set up");
                        let Some((head, _)) = vq.pop_used() else { break };
                        progressed = true;
                        let done = tsc();
                        last_activity = done;
                        let i = if indirect { head } else { head / 3 };
                        if i as usize >= self.per_queue {
                            self.report(format_args!("ERROR: device returned unknown descriptor {head}"));
                            st.errors += 1;
                            continue;
                        }
                        let idx = q * self.per_queue + i as usize;
                        let (op, sector, bytes, data, started, status) = {
                            let s = &self.slots[idx];
                            (s.op, s.sector, s.bytes, s.data, s.started, rd8(s.status))
                        };
                        inflight[q] -= 1;
                        self.free[q * self.per_queue + self.free_len[q]] = i;
                        self.free_len[q] += 1;
                        let lat = done - started;
                        st.lat_sum += lat as u128;
                        st.lat_max = st.lat_max.max(lat);
                        if samples < self.lat.len() {
                            self.lat[samples] = lat.min(u32::MAX as u64) as u32;
                            samples += 1;
                        }
                        st.ios += 1;
                        match op {
                            Op::Read => st.reads += 1,
                            Op::Write => st.writes += 1,
                            Op::Flush => {
                                st.flushes += 1;
                                flush_pending = false;
                            }
                            Op::Discard => st.discards += 1,
                            Op::WriteZeroes => st.write_zeroes += 1,
                        }
                        if matches!(op, Op::Read | Op::Write) {
                            st.bytes += bytes as u64;
                        }
                        if status != blk::S_OK {
                            st.errors += 1;
                            let what = match status {
                                blk::S_IOERR => {
                                    st.ioerr += 1;
                                    "IOERR"
                                }
                                blk::S_UNSUPP => {
                                    st.unsupp += 1;
                                    "UNSUPP"
                                }
                                0xff => "no status written",
                                _ => "unknown status",
                            };
                            self.report(format_args!(
                                "ERROR: {op:?} of {bytes} bytes at sector {sector} failed: {what} ({status})"
                            ));
                            continue;
                        }
                        if op == Op::Read && p.expect != Expect::Anything {
                            for k in 0..(bytes as u64 / SECTOR) {
                                if let Some((why, v)) = check_sector(data + k * SECTOR, sector + k, p.expect) {
                                    st.verify_failures += 1;
                                    self.report(format_args!(
                                        "VERIFY FAILED: sector {} (byte offset {:#x}): {} {:#x}",
                                        sector + k,
                                        (sector + k) * SECTOR,
                                        why,
                                        v
                                    ));
                                }
                            }
                        }
                        if op == Op::Write {
                            writes_since_flush += 1;
                        }
                    }
                }
                // Submissions.
                let mut pushed = false;
                let want_flush = p.flush_every > 0 && writes_since_flush >= p.flush_every && !flush_pending;
                if want_flush && self.free_len[q] > 0 {
                    self.free_len[q] -= 1;
                    let i = self.free[q * self.per_queue + self.free_len[q]];
                    self.submit(q, i, Op::Flush, 0, 0, 0);
                    inflight[q] += 1;
                    flush_pending = true;
                    writes_since_flush = 0;
                    pushed = true;
                }
                while !stop_issuing && issued < target && self.free_len[q] > 0 && tsc() < end {
                    let unit = if p.random {
                        xorshift(&mut self.rng) % units
                    } else {
                        let u = seq_unit % units;
                        seq_unit += 1;
                        u
                    };
                    let sector = p.start / SECTOR + unit * sectors_per_io;
                    let op = match p.special {
                        Some(op) => op,
                        None if p.read_pct >= 100 => Op::Read,
                        None if p.read_pct == 0 => Op::Write,
                        None => {
                            if xorshift(&mut self.rng) % 100 < p.read_pct as u64 {
                                Op::Read
                            } else {
                                Op::Write
                            }
                        }
                    };
                    self.free_len[q] -= 1;
                    let i = self.free[q * self.per_queue + self.free_len[q]];
                    self.submit(q, i, op, sector, p.io_bytes, p.gen);
                    inflight[q] += 1;
                    issued += 1;
                    pushed = true;
                    if issued >= target {
                        break;
                    }
                }
                if pushed {
                    self.dev.queues[q].as_mut().expect("queue set up").publish();
                    progressed = true;
                }
            }
            let now = tsc();
            if self.cfg.progress_ms > 0 && now >= next_progress {
                next_progress = now + progress_every;
                crate::println!(
                    "progress: {} ms, {} I/Os, {} errors",
                    self.clock.ns(now - start) / 1_000_000,
                    st.ios,
                    st.errors
                );
            }
            if halt && !progressed {
                // Nothing to do until the device answers: sleep, woken by
                // its interrupt or at the next deadline this loop keeps.
                let now = tsc();
                let mut until = last_activity.saturating_add(timeout);
                if end != u64::MAX {
                    until = until.min(end);
                }
                if self.cfg.progress_ms > 0 {
                    until = until.min(next_progress);
                }
                crate::rt::wait_for_interrupt(irqs_before_look, self.clock.ns(until.saturating_sub(now)));
            }
        }
        st.elapsed_ticks = tsc() - start;
        st.samples = samples;
        st.kicks = (0..nq).map(|q| self.dev.queues[q].as_ref().map_or(0, |v| v.kicks)).sum();
        st
    }

    /// Latency percentiles (ns) over the last run's samples.
    pub fn percentiles(&mut self, samples: usize, ps: &[u32]) -> [u64; 4] {
        let s = &mut self.lat[..samples];
        s.sort_unstable();
        let mut out = [0u64; 4];
        for (o, &p) in out.iter_mut().zip(ps) {
            if s.is_empty() {
                break;
            }
            // p in tenths of a percent: 500 = p50, 999 = p99.9.
            let idx = ((s.len() as u64 * p as u64).div_ceil(1000)).clamp(1, s.len() as u64) as usize - 1;
            *o = self.clock.ns(s[idx] as u64);
        }
        out
    }
}

