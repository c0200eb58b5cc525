//! The bench guest: a bare-metal virtio-blk workload generator. Boots through
//! PVH (boot.S), does the minimum at CPL0 and runs everything here at CPL3.
//! The workload comes from the command line (config.rs); the result is one
//! JSON line on the serial console and the debug-exit status.
#![no_std]

use core::arch::global_asm;

global_asm!(include_str!("boot.S"), options(att_syntax));

mod acpi;
mod blk;
mod boot_info;
mod config;
mod console;
mod fs;
mod fuzz;
mod mem;
mod net;
mod pci;
mod rt;
mod serial;
mod time;
mod virtio;
mod workload;

use config::{Check, Mode};
use workload::{Engine, Expect, Op, Phase, Stats};

/// Exit statuses (the host sees `(status << 1) | 1` from QEMU's debug exit).
pub(crate) const EXIT_OK: u8 = 0;
const EXIT_FAILED: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;
const EXIT_NO_DEVICE: u8 = 3;
const EXIT_TIMEOUT: u8 = 4;

pub(crate) fn fail(status: u8, error: core::fmt::Arguments) -> ! {
    println!("ERROR: {}", error);
    println!("{{\"bench_guest\":1,\"result\":\"fail\",\"exit\":{},\"error\":\"{}\"}}", status, JsonText(error));
    rt::exit(status);
}

/// Text shown as the inside of a JSON string: quotes, backslashes and
/// control characters escaped (a bad argument's own quotes made the
/// report unreadable JSON).
pub(crate) struct JsonText<'a>(pub core::fmt::Arguments<'a>);

impl core::fmt::Display for JsonText<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        struct Escaping<'a, 'b>(&'a mut core::fmt::Formatter<'b>);
        impl core::fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> core::fmt::Result {
                for c in s.chars() {
                    match c {
                        '"' => self.0.write_str("\\\"")?,
                        '\\' => self.0.write_str("\\\\")?,
                        c if (c as u32) < 0x20 => write!(self.0, "\\u{:04x}", c as u32)?,
                        c => core::fmt::Write::write_char(self.0, c)?,
                    }
                }
                Ok(())
            }
        }
        core::fmt::write(&mut Escaping(f), self.0)
    }
}

/// mode=echo: the serial port's input said back a line at a time, until
/// a line `quit` or `duration_ms` (0: none). Between empty looks at the
/// UART (each a trap into the VMM) it waits a millisecond on the TSC.
fn echo_console(cfg: &config::Config, clock: &time::Clock) -> ! {
    let start = time::tsc();
    let pause = clock.ticks(1_000_000);
    let mut line = [0u8; 256];
    let (mut len, mut lines, mut bytes) = (0usize, 0u64, 0u64);
    println!("echo: ready");
    let quit = loop {
        if cfg.duration_ms > 0 && clock.ns(time::tsc() - start) > cfg.duration_ms * 1_000_000 {
            break false;
        }
        let Some(b) = serial::read_byte() else {
            let until = time::tsc() + pause;
            while time::tsc() < until {
                core::hint::spin_loop();
            }
            continue;
        };
        bytes += 1;
        if b != b'\n' && b != b'\r' {
            if len < line.len() {
                line[len] = b;
                len += 1;
            }
            continue;
        }
        if len == 0 {
            continue;
        }
        let text = core::str::from_utf8(&line[..len]).unwrap_or("(not UTF-8)");
        println!("echo: {}", text);
        lines += 1;
        if text == "quit" {
            break true;
        }
        len = 0;
    };
    println!(
        "{{\"bench_guest\":1,\"result\":\"ok\",\"mode\":\"echo\",\"lines\":{},\"bytes\":{},\"quit\":{}}}",
        lines, bytes, quit
    );
    rt::exit(EXIT_OK);
}

#[no_mangle]
pub extern "C" fn guest_main() -> ! {
    serial::write_bytes(b"BENCH-GUEST START\n");
    let boot_tsc = time::tsc();
    let Some(si) = boot_info::BootInfo::get() else {
        fail(EXIT_USAGE, format_args!("no boot information (neither a PVH start info nor a Linux zero page)"));
    };
    // Free RAM: from the end of the image to the end of its region, below 4 GiB.
    let image_end = boot_info::image_end();
    let region_end = si
        .memory()
        .find(|r| r.kind == 1 && r.addr <= image_end && image_end < r.addr + r.size)
        .map(|r| r.addr + r.size)
        .unwrap_or(image_end + (32 << 20));
    let arena = mem::Arena::new(image_end, region_end.min(1 << 32));
    let cfg = config::parse(si.cmdline);
    // The report's lines through a virtio console from here on, when
    // there is one (before the boot information, the longest of them).
    if cfg.is_ok_and(|c| c.virtio_console) {
        console::open(si.rsdp, cfg.map_or(0, |c| c.max_bus), &arena);
    }
    si.report();
    let cfg = match cfg {
        Ok(c) => c,
        Err(word) => fail(EXIT_USAGE, format_args!("bad argument {:?}", word)),
    };
    let (hz, hz_source) = time::tsc_hz(cfg.tsc_khz);
    let clock = time::Clock { hz };
    if cfg.mode == Mode::Boot {
        // Only the boot itself was under test: report and leave.
        println!(
            "{{\"bench_guest\":1,\"result\":\"ok\",\"phase\":\"boot\",\"protocol\":\"{}\",\"init_ns\":{}}}",
            si.protocol.name(),
            clock.ns(time::tsc() - boot_tsc)
        );
        rt::exit(EXIT_OK);
    }
    if cfg.mode == Mode::Net {
        run_nic(si.rsdp, &cfg, &arena, &clock, boot_tsc);
    }
    if cfg.mode == Mode::Echo {
        echo_console(&cfg, &clock);
    }
    if cfg.mode == Mode::Fs {
        run_fs(si.rsdp, &cfg, &arena, &clock, boot_tsc);
    }
    if cfg.mode == Mode::Fuzz && cfg.fuzz == config::FuzzTarget::Nic {
        let nic = match net::Nic::open(si.rsdp, cfg.max_bus, cfg.queue_size, cfg.ip, false, cfg.event_idx, &arena) {
            Ok(n) => n,
            Err(e) => fail(EXIT_NO_DEVICE, format_args!("{}", e)),
        };
        // Receive, transmit and the control queue (when a restart acks it).
        fuzz::run(nic.transport(), 3, &cfg, &arena, &clock);
    }
    if cfg.mode == Mode::Fuzz && cfg.fuzz == config::FuzzTarget::Fs {
        let share = match fs::Share::open(si.rsdp, cfg.max_bus, b"", &arena) {
            Ok(s) => s,
            Err(e) => fail(EXIT_NO_DEVICE, format_args!("{}", e)),
        };
        // The high-priority queue and the request queues.
        fuzz::run(share.transport(), 1 + share.request_queues.min(8) as u16, &cfg, &arena, &clock);
    }
    let mut dev = match blk::Device::open(si.rsdp, &cfg, &arena) {
        Ok(d) => d,
        Err(e) => fail(EXIT_NO_DEVICE, format_args!("{}", e)),
    };
    if cfg.mode == Mode::Fuzz {
        fuzz::run(dev.transport(), 1, &cfg, &arena, &clock);
    }
    let mut nic = background_nic(si.rsdp, &cfg, &arena, &clock);
    if cfg.touch > 0 {
        // Memory in use, as a snapshot would find it: every page written
        // (a distinct word each, so none of it is a page of zeros).
        let Some(at) = arena.alloc_untouched(cfg.touch, 4096) else {
            fail(EXIT_USAGE, format_args!("touch={}: not that much free guest memory", cfg.touch));
        };
        for page in (at..at + cfg.touch).step_by(4096) {
            // SAFETY: RAM the arena gave this loop alone.
            unsafe { core::ptr::write_volatile(page as *mut u64, page ^ 0x5eed_5eed) };
        }
    }
    let ready_tsc = time::tsc();
    let disk_bytes = dev.capacity_sectors * 512;
    println!(
        "device: {} bytes, features {:#x}, {} of {} queues, blk_size {}, {}",
        disk_bytes,
        dev.features,
        dev.nqueues,
        dev.device_queues,
        dev.blk_size,
        if dev.irq { "MSI-X interrupts" } else { "polling" }
    );
    if cfg.mode == Mode::Idle {
        println!("{{\"bench_guest\":1,\"result\":\"idle\",\"disk_bytes\":{},\"init_ns\":{}}}", disk_bytes, clock.ns(ready_tsc - boot_tsc));
        let Some(nic) = nic.as_mut() else { rt::halt_forever() };
        // At rest, but reachable: woken by each frame (or polling).
        loop {
            let seen = rt::irq_total();
            if nic.poll() == 0 {
                if cfg.halt {
                    rt::wait_for_interrupt(seen, 1_000_000_000);
                } else {
                    core::hint::spin_loop();
                }
            }
        }
    }
    if cfg.offset >= disk_bytes {
        fail(EXIT_USAGE, format_args!("offset {} is past the {}-byte disk", cfg.offset, disk_bytes));
    }
    let len = if cfg.size == 0 { disk_bytes - cfg.offset } else { cfg.size };
    if cfg.offset + len > disk_bytes || len < cfg.bs as u64 {
        fail(EXIT_USAGE, format_args!("range {}+{} does not fit the {}-byte disk", cfg.offset, len, disk_bytes));
    }
    let chunk_limit = |max_sectors: u32| (len.min(1 << 20).min(max_sectors as u64 * 512) / 512 * 512) as u32;
    let max_io = cfg.bs.max(4096);
    let (nqueues, irq) = (dev.nqueues, dev.irq);
    let (max_discard, max_write_zeroes) = (dev.max_discard_sectors, dev.max_write_zeroes_sectors);
    let dev_features = dev.features;
    let Some(mut engine) = Engine::new(&mut dev, &clock, cfg, &arena, max_io) else {
        fail(EXIT_USAGE, format_args!("not enough guest memory for qd {} on {} queues", cfg.qd, nqueues));
    };
    engine.nic = nic;
    let base = Phase {
        random: false,
        read_pct: 100,
        special: None,
        io_bytes: cfg.bs,
        start: cfg.offset,
        len,
        ios: cfg.ios,
        duration_ns: cfg.duration_ms * 1_000_000,
        expect: Expect::Anything,
        gen: cfg.gen,
        flush_every: cfg.flush_every,
    };
    let pattern = Expect::Pattern { gen: cfg.expect_gen };
    let mut checks_ok = true;
    let (label, st) = match cfg.check {
        Check::None => {
            let random = matches!(cfg.mode, Mode::RandRead | Mode::RandWrite | Mode::Mixed);
            let read_pct = match cfg.mode {
                // Mode::Boot, Mode::Fuzz, Mode::Idle, Mode::Net, Mode::Fs and Mode::Echo have left above.
                Mode::Read | Mode::RandRead | Mode::Boot | Mode::Fuzz | Mode::Idle | Mode::Net | Mode::Fs | Mode::Echo => 100,
                Mode::Write | Mode::RandWrite => 0,
                Mode::Mixed => cfg.rwmix,
            };
            let duration_ns = if random && cfg.ios == 0 && cfg.duration_ms == 0 { 2_000_000_000 } else { base.duration_ns };
            let p = Phase {
                random,
                read_pct,
                duration_ns,
                expect: if cfg.verify { pattern } else { Expect::Anything },
                ..base
            };
            ("workload", engine.run(&p))
        }
        Check::Discard | Check::WriteZeroes => {
            let (op, max_sectors, feature, name) = if cfg.check == Check::Discard {
                (Op::Discard, max_discard, "discard", "discard")
            } else {
                (Op::WriteZeroes, max_write_zeroes, "write-zeroes", "write_zeroes")
            };
            if max_sectors == 0 {
                fail(EXIT_FAILED, format_args!("the device does not offer {}", feature));
            }
            let mut total = Stats::default();
            if cfg.prefill {
                let w = Phase { read_pct: 0, ios: 0, duration_ns: 0, flush_every: 0, ..base };
                add(&mut total, &engine.run(&w));
                add(&mut total, &engine.run(&Phase { special: Some(Op::Flush), ios: 1, ..base }));
            }
            let chunk = chunk_limit(max_sectors);
            let z = Phase { special: Some(op), io_bytes: chunk, ios: 0, duration_ns: 0, flush_every: 0, ..base };
            add(&mut total, &engine.run(&z));
            let r = Phase { read_pct: 100, ios: 0, duration_ns: 0, expect: Expect::Zeros, flush_every: 0, ..base };
            let rs = engine.run(&r);
            checks_ok = rs.verify_failures == 0 && rs.errors == 0;
            println!("check {}: {}", name, if checks_ok { "reads back zeros" } else { "FAILED" });
            add(&mut total, &rs);
            (name, total)
        }
    };
    let [p50, p99, p999, _] = engine.percentiles(st.samples, &[500, 990, 999, 1000]);
    let ns = clock.ns(st.elapsed_ticks).max(1);
    let iops = st.ios as u128 * 1_000_000_000 / ns as u128;
    let milli_mbs = st.bytes as u128 * 1_000_000 / ns as u128;
    let mean = if st.ios > 0 { clock.ns((st.lat_sum / st.ios as u128) as u64) } else { 0 };
    let ok = st.errors == 0 && st.verify_failures == 0 && !st.timed_out && checks_ok;
    println!(
        "{{\"bench_guest\":1,\"result\":\"{}\",\"phase\":\"{}\",\"mode\":\"{:?}\",\"bs\":{},\"qd\":{},\"queues\":{},\"irq\":{},\
\"ios\":{},\"reads\":{},\"writes\":{},\"flushes\":{},\"discards\":{},\"write_zeroes\":{},\"bytes\":{},\"elapsed_ns\":{},\
\"iops\":{},\"mb_s\":{}.{:03},\"lat_ns\":{{\"mean\":{},\"p50\":{},\"p99\":{},\"p99_9\":{},\"max\":{},\"samples\":{}}},\
\"errors\":{},\"ioerr\":{},\"unsupp\":{},\"verify_failures\":{},\"timed_out\":{},\"features\":\"{:#x}\",\
\"disk_bytes\":{},\"irqs\":{},\"halts\":{},\"kicks\":{},\"tsc_hz\":{},\"tsc_source\":\"{}\",\"init_ns\":{}}}",
        if ok { "ok" } else { "fail" },
        label,
        cfg.mode,
        cfg.bs,
        engine.per_queue_depth(),
        nqueues,
        irq,
        st.ios,
        st.reads,
        st.writes,
        st.flushes,
        st.discards,
        st.write_zeroes,
        st.bytes,
        ns,
        iops,
        milli_mbs / 1000,
        milli_mbs % 1000,
        mean,
        p50,
        p99,
        p999,
        clock.ns(st.lat_max),
        st.samples,
        st.errors,
        st.ioerr,
        st.unsupp,
        st.verify_failures,
        st.timed_out,
        dev_features,
        disk_bytes,
        st.irqs,
        rt::halts() - console::naps(),
        st.kicks,
        hz,
        hz_source,
        clock.ns(ready_tsc - boot_tsc),
    );
    rt::exit(if st.timed_out {
        EXIT_TIMEOUT
    } else if ok {
        EXIT_OK
    } else {
        EXIT_FAILED
    });
}

/// `mode=net`: the NIC answers for `cfg.ip` until `duration_ms` has
/// passed (forever without one), a progress line every `progress_ms`.
fn run_nic(rsdp: u64, cfg: &config::Config, arena: &mem::Arena, clock: &time::Clock, boot_tsc: u64) -> ! {
    let mut nic = match net::Nic::open(rsdp, cfg.max_bus, cfg.queue_size, cfg.ip, cfg.halt, cfg.event_idx, arena) {
        Ok(n) => n,
        Err(e) => fail(EXIT_NO_DEVICE, format_args!("{}", e)),
    };
    if cfg.dhcp {
        nic.ip = dhcp(&mut nic, cfg, clock);
    }
    announce(&nic);
    if cfg.peer.is_some() {
        run_udp_client(&mut nic, cfg, arena, clock);
    }
    let start = time::tsc();
    let mut last_progress = start;
    loop {
        // Interrupts so far, read before looking: a frame after the look
        // wakes the halt below at once.
        let seen = rt::irq_total();
        let arrived = nic.poll();
        if cfg.halt && arrived == 0 {
            // wait=halt: the vCPU sleeps until a frame comes (or the next
            // progress line is due), instead of spinning a host core.
            let next = if cfg.progress_ms > 0 { cfg.progress_ms * 1_000_000 } else { 1_000_000_000 };
            rt::wait_for_interrupt(seen, next);
        }
        let now = time::tsc();
        if cfg.progress_ms > 0 && clock.ns(now - last_progress) >= cfg.progress_ms * 1_000_000 {
            last_progress = now;
            let s = nic.stats;
            println!("progress: rx {} tx {} tx_full {} arp {} icmp {} udp {}", s.rx_frames, s.tx_frames, s.tx_full, s.arp_replies, s.icmp_replies, s.udp_echoes);
        }
        if cfg.duration_ms > 0 && clock.ns(now - start) >= cfg.duration_ms * 1_000_000 {
            break;
        }
        let s = nic.stats;
        if cfg.sink_idle_ms > 0 && s.discarded > 0 && clock.ns(now.saturating_sub(s.last_discard_tsc)) >= cfg.sink_idle_ms * 1_000_000 {
            break;
        }
        core::hint::spin_loop();
    }
    let s = nic.stats;
    // The discard port's receive rate, first datagram to last.
    let sink_ns = clock.ns(s.last_discard_tsc.saturating_sub(s.first_discard_tsc)).max(1);
    println!(
        "{{\"bench_guest\":1,\"result\":\"ok\",\"phase\":\"net\",\"rx_frames\":{},\"tx_frames\":{},\"arp_replies\":{},\"icmp_replies\":{},\"udp_echoes\":{},\"ignored\":{},\"tx_full\":{},\"discarded\":{},\"discarded_bytes\":{},\"discard_ns\":{},\"discard_pps\":{},\"init_ns\":{}}}",
        s.rx_frames, s.tx_frames, s.arp_replies, s.icmp_replies, s.udp_echoes, s.ignored, s.tx_full,
        s.discarded, s.discarded_bytes, sink_ns, s.discarded.saturating_sub(1) * 1_000_000_000 / sink_ns,
        clock.ns(start - boot_tsc)
    );
    rt::exit(EXIT_OK);
}

/// `mode=fs`: FUSE over the virtio-fs device: INIT, then `file` in the
/// shared folder's root looked up, opened and read whole; the report has
/// its size, the bytes read and their FNV-1a hash (the host computes the
/// same over its copy). With `out=NAME`: NAME created, `out_size` bytes of
/// the pattern written to it, fsynced and closed; the report has the
/// bytes written and their hash.
fn run_fs(rsdp: u64, cfg: &config::Config, arena: &mem::Arena, clock: &time::Clock, boot_tsc: u64) -> ! {
    let mut share = match fs::Share::open(rsdp, cfg.max_bus, cfg.tag.as_bytes(), arena) {
        Ok(s) => s,
        Err(e) => fail(EXIT_NO_DEVICE, format_args!("{}", e)),
    };
    let started = time::tsc();
    let limit = cfg.timeout_ms * 1_000_000;
    let timeout = || clock.ns(time::tsc() - started) > limit;
    let tag_len = share.tag.iter().position(|&b| b == 0).unwrap_or(36);
    let tag = core::str::from_utf8(&share.tag[..tag_len]).unwrap_or("?");
    println!("fs: tag {} with {} request queue(s)", tag, share.request_queues);
    let run = |share: &mut fs::Share| -> Result<(u32, u32, u64, u64, u64), fs::FsError> {
        let (major, minor) = share.init(&timeout)?;
        let (node, size) = share.lookup(cfg.file.as_bytes(), &timeout)?;
        let fh = share.open_file(node, &timeout)?;
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut read = 0u64;
        loop {
            let n = share.read(node, fh, read, 65536 - 16, &timeout)?;
            for &b in share.data(n) {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
            }
            read += n;
            if n == 0 || read >= size {
                break;
            }
        }
        Ok((major, minor, size, read, hash))
    };
    let write = |share: &mut fs::Share| -> Result<(u64, u64), fs::FsError> {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        if cfg.out.as_bytes().is_empty() {
            return Ok((0, hash));
        }
        let (node, fh) = share.create(cfg.out.as_bytes(), &timeout)?;
        let mut written = 0u64;
        while written < cfg.out_size {
            let len = (cfg.out_size - written).min(fs::WRITE_CHUNK);
            for (i, b) in share.write_data()[..len as usize].iter_mut().enumerate() {
                *b = fs::pattern_byte(written + i as u64);
                hash = (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
            let took = share.write(node, fh, written, len, &timeout)?;
            if took != len {
                // A short write: the report says how far it got.
                written += took;
                break;
            }
            written += len;
        }
        share.fsync(node, fh, &timeout)?;
        share.release(node, fh, fs::Share::CREATE_FLAGS, &timeout)?;
        Ok((written, hash))
    };
    match run(&mut share).and_then(|r| Ok((r, write(&mut share)?))) {
        Ok(((major, minor, size, read, hash), (written, out_hash))) => {
            println!(
                "{{\"bench_guest\":1,\"result\":\"ok\",\"phase\":\"fs\",\"fuse\":\"{}.{}\",\"size\":{},\"read\":{},\"fnv\":\"{:016x}\",\"written\":{},\"out_fnv\":\"{:016x}\",\"ns\":{},\"init_ns\":{}}}",
                major, minor, size, read, hash, written, out_hash, clock.ns(time::tsc() - started), clock.ns(started - boot_tsc)
            );
            rt::exit(EXIT_OK);
        }
        Err(e) => fail(EXIT_FAILED, format_args!("{}", e)),
    }
}

/// The NIC's line: its MAC, address and link state.
fn announce(nic: &net::Nic) {
    let [a, b, c, d] = nic.ip;
    let m = nic.mac;
    print!(
        "nic: {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} {}.{}.{}.{} link {}",
        m[0], m[1], m[2], m[3], m[4], m[5], a, b, c, d,
        if nic.link_up() { "up" } else { "down" }
    );
    match nic.mtu {
        Some(mtu) => println!(" mtu {}", mtu),
        None => println!(),
    }
}

/// In a disk mode with `ip=` given, the virtio-net device if there is
/// one, answering ARP and echoes for the guest's address for as long as
/// it runs (so that every VM of a fleet is reachable); none without it.
fn background_nic(rsdp: u64, cfg: &config::Config, arena: &mem::Arena, clock: &time::Clock) -> Option<net::Nic> {
    if !cfg.ip_given {
        return None;
    }
    let mut nic = match net::Nic::open(rsdp, cfg.max_bus, 0, cfg.ip, cfg.halt, cfg.event_idx, arena) {
        Ok(n) => n,
        Err(net::FindError::NotFound) => return None,
        Err(e) => fail(EXIT_NO_DEVICE, format_args!("{}", e)),
    };
    if cfg.dhcp {
        nic.ip = dhcp(&mut nic, cfg, clock);
    }
    announce(&nic);
    Some(nic)
}

/// `ip=dhcp`: DISCOVER until an OFFER, REQUEST it until the ACK (each
/// sent again every 200 ms); the address, or the run fails after
/// `timeout_ms`.
fn dhcp(nic: &mut net::Nic, cfg: &config::Config, clock: &time::Clock) -> [u8; 4] {
    let start = time::tsc();
    let mut offer: Option<net::DhcpReply> = None;
    let mut last_sent = 0;
    loop {
        let now = time::tsc();
        if last_sent == 0 || clock.ns(now - last_sent) >= 200_000_000 {
            nic.send_dhcp(offer);
            last_sent = now;
        }
        nic.poll();
        match nic.dhcp.take() {
            Some(r) if r.kind == 2 && offer.is_none() => {
                offer = Some(r);
                last_sent = 0;
            }
            Some(r) if r.kind == 5 && offer.is_some() => return r.address,
            Some(r) if r.kind == 6 => {
                offer = None;
                last_sent = 0;
            }
            _ => {}
        }
        if clock.ns(now - start) > cfg.timeout_ms * 1_000_000 {
            fail(EXIT_TIMEOUT, format_args!("no DHCP lease within {} ms", cfg.timeout_ms));
        }
    }
}

/// `mode=net peer=IP`: `count` datagrams to the peer's echo port, `window`
/// in flight, each echo's round trip measured; the report has the counts,
/// the rate and the round-trip percentiles. A datagram not echoed within
/// `timeout_ms` ends the run as failed, with what was counted.
fn run_udp_client(nic: &mut net::Nic, cfg: &config::Config, arena: &mem::Arena, clock: &time::Clock) -> ! {
    let timeout = cfg.timeout_ms * 1_000_000;
    nic.peer = cfg.peer;
    let asked_at = time::tsc();
    let mut last_ask = 0;
    while nic.peer_mac.is_none() {
        let now = time::tsc();
        if last_ask == 0 || clock.ns(now - last_ask) >= 100_000_000 {
            nic.ask_peer_mac();
            last_ask = now;
        }
        nic.poll();
        nic.new_echoes = 0;
        if clock.ns(now - asked_at) > timeout {
            fail(EXIT_TIMEOUT, format_args!("no ARP reply from the peer within {} ms", cfg.timeout_ms));
        }
    }
    if cfg.flood {
        run_udp_flood(nic, cfg, clock);
    }
    let n = cfg.count.min(1 << 22) as usize;
    let Some(rtts) = arena.samples(n) else {
        fail(EXIT_USAGE, format_args!("count={}: not enough guest memory for its samples", cfg.count));
    };
    let (mut sent, mut received, mut reordered, mut bogus) = (0u64, 0u64, 0u64, 0u64);
    let start = time::tsc();
    let mut last_echo = start;
    while received < cfg.count {
        let queued = sent;
        while sent < cfg.count && sent - received < u64::from(cfg.window) {
            if !nic.queue_datagram(net::UDP_ECHO_PORT, sent as u32, cfg.payload as usize, time::tsc()) {
                break;
            }
            sent += 1;
        }
        if sent > queued {
            // The window's datagrams, one kick at most.
            nic.flush_tx();
        }
        let seen = rt::irq_total();
        nic.poll();
        if cfg.halt && nic.new_echoes == 0 && (sent == cfg.count || sent - received >= u64::from(cfg.window)) {
            // Waiting for echoes only: asleep until one comes.
            rt::wait_for_interrupt(seen, timeout);
            nic.poll();
        }
        let now = time::tsc();
        for e in &nic.echoes[..nic.new_echoes] {
            // An echo of nothing sent (or sent twice) is no echo.
            if u64::from(e.seq) >= sent {
                bogus += 1;
                continue;
            }
            if u64::from(e.seq) != received {
                reordered += 1;
            }
            if (received as usize) < rtts.len() {
                rtts[received as usize] = clock.ns(now.saturating_sub(e.sent_tsc)).min(u32::MAX as u64) as u32;
            }
            received += 1;
            last_echo = now;
        }
        nic.new_echoes = 0;
        if clock.ns(now - last_echo) > timeout {
            fail(
                EXIT_TIMEOUT,
                format_args!("{} of {} datagrams echoed; none for {} ms", received, sent, cfg.timeout_ms),
            );
        }
    }
    let ns = clock.ns(time::tsc() - start).max(1);
    let got = &mut rtts[..(received as usize).min(n)];
    got.sort_unstable();
    let p = |q: usize| got.get((got.len() * q / 100).min(got.len().saturating_sub(1))).copied().unwrap_or(0);
    println!(
        "{{\"bench_guest\":1,\"result\":\"ok\",\"phase\":\"udp\",\"sent\":{},\"received\":{},\"payload\":{},\"window\":{},\"ns\":{},\"pps\":{},\"rtt_p50_ns\":{},\"rtt_p99_ns\":{},\"reordered\":{},\"bogus\":{},\"tx_full\":{}}}",
        sent, received, cfg.payload, cfg.window, ns, received * 1_000_000_000 / ns, p(50), p(99), reordered, bogus, nic.stats.tx_full
    );
    rt::exit(EXIT_OK);
}

/// `flood=1`: `count` datagrams to the peer's discard port, the transmit
/// ring kept full (with wait=halt the vCPU sleeps while it is full, else
/// it polls); the report has the rate the device took them at. The
/// receiver counts what arrived.
fn run_udp_flood(nic: &mut net::Nic, cfg: &config::Config, clock: &time::Clock) -> ! {
    // Frames queued before one publish (one kick at most): Linux's
    // xmit_more batching, as a busy sender's stack does.
    const BURST: u32 = 32;
    let timeout = cfg.timeout_ms * 1_000_000;
    let start = time::tsc();
    let mut sent = 0u64;
    let mut last_progress = start;
    while sent < cfg.count || nic.tx_in_flight() > 0 {
        let mut queued = 0;
        while sent < cfg.count && queued < BURST && nic.queue_datagram(net::UDP_DISCARD_PORT, sent as u32, cfg.payload as usize, time::tsc()) {
            sent += 1;
            queued += 1;
        }
        if queued > 0 {
            nic.flush_tx();
            last_progress = time::tsc();
        }
        if queued == BURST {
            continue;
        }
        // The ring is full (or all is queued): wait for the device.
        let before = nic.tx_in_flight();
        nic.wait_for_tx_room(cfg.halt, timeout);
        let now = time::tsc();
        if nic.tx_in_flight() < before {
            last_progress = now;
        }
        if clock.ns(now - last_progress) > timeout {
            fail(EXIT_TIMEOUT, format_args!("{} of {} datagrams sent; the device took none for {} ms", sent, cfg.count, cfg.timeout_ms));
        }
        core::hint::spin_loop();
    }
    let ns = clock.ns(time::tsc() - start).max(1);
    println!(
        "{{\"bench_guest\":1,\"result\":\"ok\",\"phase\":\"udp_flood\",\"sent\":{},\"payload\":{},\"ns\":{},\"pps\":{},\"kicks\":{}}}",
        sent, cfg.payload, ns, sent * 1_000_000_000 / ns, nic.tx_kicks()
    );
    rt::exit(EXIT_OK);
}

fn add(total: &mut Stats, s: &Stats) {
    total.ios += s.ios;
    total.reads += s.reads;
    total.writes += s.writes;
    total.flushes += s.flushes;
    total.discards += s.discards;
    total.write_zeroes += s.write_zeroes;
    total.bytes += s.bytes;
    total.errors += s.errors;
    total.ioerr += s.ioerr;
    total.unsupp += s.unsupp;
    total.verify_failures += s.verify_failures;
    total.elapsed_ticks += s.elapsed_ticks;
    total.lat_sum += s.lat_sum;
    total.lat_max = total.lat_max.max(s.lat_max);
    total.samples = s.samples;
    total.irqs += s.irqs;
    total.kicks = s.kicks;
    total.timed_out |= s.timed_out;
}

