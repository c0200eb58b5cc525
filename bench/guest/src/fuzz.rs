//! A hostile driver (`mode=fuzz`): after a normal set-up, `ios` random
//! writes (default 20000, from `seed`) to everything a guest can reach of
//! its disk (or, `fuzz=nic` / `fuzz=fs`, its NIC or shared folder): the
//! common configuration (features, queue sizes, ring addresses, status
//! with DRIVER_OK and resets), the device configuration, the notify area,
//! the MSI-X table, its PCI configuration space (BARs included), the
//! configuration ports with random targets, and ring memory filled with
//! junk. Then it resets the device and reports; that report arriving, and
//! the VM ending cleanly, is what the host checks: the VMM and the backend
//! survived.
//!
//! Ring addresses and descriptor buffers point into a scratch area (or
//! outside RAM), so whatever the device writes lands where nothing of the
//! guest lives: the guest must outlive its own attack to report it.

use crate::config::Config;
use crate::mem::{rd16, rd32, wr16, wr32, wr64, wr8, Arena};
use crate::println;
use crate::serial::{inl, outl};
use crate::time::{tsc, Clock};
use crate::virtio::Transport;

const SCRATCH: u64 = 4 << 20;

fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn write(addr: u64, width: u64, v: u64) {
    match width {
        0 => wr8(addr, v as u8),
        1 => wr16(addr & !1, v as u16),
        _ => wr32(addr & !3, v as u32),
    }
}

/// Attacks the device behind `t`, whose queues are 0..`queues` (a queue
/// past them is selected too: the device must ignore it).
pub fn run(t: &Transport, queues: u16, cfg: &Config, arena: &Arena, clock: &Clock) -> ! {
    let [common, device_cfg, notify, msix] = t.windows();
    let func = t.func;
    let Some(scratch) = arena.alloc(SCRATCH, 4096) else {
        crate::fail(crate::EXIT_USAGE, format_args!("no room for the fuzz scratch area"));
    };
    let writes = if cfg.ios == 0 { 20_000 } else { cfg.ios };
    let mut rng = cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let start = tsc();
    let mut reads = 0u64;
    let mut restarts = 0u64;
    for i in 0..writes {
        let r = next(&mut rng);
        let v = next(&mut rng);
        let width = (r >> 8) % 3;
        let in_scratch = (scratch + (v % SCRATCH)) & !0xf;
        match r % 100 {
            // A whole (re)start with junk rings: reset, a random part of
            // the device's features (EVENT_IDX, a NIC's control queue and
            // pairs among them), a queue of a random size (a power of
            // two, or anything) in the scratch area, enabled, DRIVER_OK,
            // and a kick: the backend gets the junk.
            0..=2 => {
                wr8(common.0 + 20, 0);
                wr8(common.0 + 20, 1 | 2);
                wr32(common.0, 0);
                let offered = rd32(common.0 + 4);
                wr32(common.0 + 8, 0);
                wr32(common.0 + 12, offered & (v >> 32) as u32);
                wr32(common.0 + 8, 1);
                wr32(common.0 + 12, 1); // VIRTIO_F_VERSION_1
                wr8(common.0 + 20, 1 | 2 | 8);
                // Every queue (and one past them), each its own junk.
                let mut q_rng = v;
                for q in 0..=queues {
                    let w = next(&mut q_rng);
                    let size = if w & 1 == 0 { 1u16 << ((w >> 1) % 9) } else { (w >> 1) as u16 };
                    wr16(common.0 + 22, q);
                    wr16(common.0 + 24, size);
                    for (k, field) in [0x20u64, 0x28, 0x30].iter().enumerate() {
                        let at = (scratch + ((w >> (8 * k + 16)) % SCRATCH)) & !0xf;
                        wr32(common.0 + field, at as u32);
                        wr32(common.0 + field + 4, 0);
                    }
                    wr16(common.0 + 28, 1);
                }
                wr8(common.0 + 20, 1 | 2 | 8 | 4);
                // A kick for each, where the device says its doorbell is.
                let mult = notify.1 / 16;
                for q in 0..queues {
                    wr16(common.0 + 22, q);
                    let off = (rd16(common.0 + 30) as u64 * mult).min(notify.1 - 2);
                    wr16(notify.0 + off, q);
                }
                restarts += 1;
            }
            // Ring addresses: both halves, into the scratch area.
            3..=14 => {
                let field = 0x20 + 8 * ((r >> 16) % 3);
                wr32(common.0 + field, in_scratch as u32);
                wr32(common.0 + field + 4, 0);
            }
            // Anything else there: selects, sizes, vectors, enables, status.
            15..=39 => write(common.0 + (r >> 16) % 0x20, width, v),
            40..=47 => write(device_cfg.0 + (r >> 16) % device_cfg.1, width, v),
            48..=59 => wr16(notify.0 + (((r >> 16) % notify.1.max(2)) & !1), v as u16),
            60..=69 if msix.1 > 0 => write(msix.0 + (r >> 16) % msix.1, width, v),
            // Junk in ring memory: random words, or descriptors whose
            // buffers lie in the scratch area.
            60..=84 => {
                let at = scratch + (r >> 16) % (SCRATCH / 8) * 8;
                let junk = if v & 1 == 0 { v } else { in_scratch | (v >> 48) << 32 };
                wr64(at, junk);
            }
            85..=94 => func.write32(((r >> 16) % 256) as u16 & 0xfc, v as u32),
            _ => {
                outl(0xcf8, v as u32);
                if r & 0x10000 == 0 {
                    outl(0xcfc, (v >> 32) as u32);
                } else {
                    let _ = inl(0xcfc);
                }
            }
        }
        if r & (1 << 40) != 0 {
            let _ = rd32((common.0 + (v >> 8) % 0x38) & !3);
            reads += 1;
        }
        if i % 4096 == 4095 {
            println!("progress: {} writes", i + 1);
        }
    }
    // Give up on the device, as a driver that is done with it would.
    wr8(common.0 + 20, 0);
    println!(
        "{{\"bench_guest\":1,\"result\":\"ok\",\"phase\":\"fuzz\",\"writes\":{},\"reads\":{},\"restarts\":{},\"seed\":{},\"elapsed_ns\":{}}}",
        writes,
        reads,
        restarts,
        cfg.seed,
        clock.ns(tsc() - start)
    );
    crate::rt::exit(crate::EXIT_OK);
}
