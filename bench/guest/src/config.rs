//! The workload, from the kernel command line: `key=value` words.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Read,
    Write,
    RandRead,
    RandWrite,
    Mixed,
    /// No disk I/O: report what the loader handed over and exit.
    Boot,
    /// A hostile driver: `ios` random writes to the device's registers,
    /// its PCI configuration and its rings (fuzz.rs), then a report.
    Fuzz,
    /// A VM at rest: the device set up, then the vCPU halted until the
    /// VMM ends the VM (what an idle VM costs its host).
    Idle,
    /// No disk: the NIC answers ARP, ICMP echo and UDP echo for `ip` for
    /// `duration_ms` (0: until the VM is ended), then a report.
    Net,
    /// No disk: the virtio-fs device (`tag`) asked, over FUSE, for `file`
    /// in its root (INIT, LOOKUP, OPEN, READ), and with `out` given that
    /// file created and `out_size` bytes written to it (CREATE, WRITE,
    /// FSYNC, RELEASE); a report of what it read and wrote.
    Fs,
    /// No disk: every line typed on the serial port said back (`echo:
    /// LINE`) until a line `quit` (or `duration_ms`), then a report.
    Echo,
}

/// A short name from the command line (a tag, a file name).
#[derive(Clone, Copy, Debug)]
pub struct Name {
    bytes: [u8; 64],
    len: u8,
}

impl Name {
    const EMPTY: Name = Name { bytes: [0; 64], len: 0 };

    fn new(v: &str) -> Option<Name> {
        let b = v.as_bytes();
        if b.is_empty() || b.len() > 64 {
            return None;
        }
        let mut n = Name::EMPTY;
        n.bytes[..b.len()].copy_from_slice(b);
        n.len = b.len() as u8;
        Some(n)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Check {
    None,
    Discard,
    WriteZeroes,
}

/// The device `mode=fuzz` writes junk to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FuzzTarget {
    Disk,
    Nic,
    Fs,
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub mode: Mode,
    pub bs: u32,
    pub qd: u16,
    pub queues: u16,
    /// I/Os to issue; 0 = one pass for sequential modes, else `duration_ms`.
    pub ios: u64,
    pub duration_ms: u64,
    pub offset: u64,
    /// Bytes of the disk to use from `offset`; 0 = to the end.
    pub size: u64,
    pub verify: bool,
    /// Generation stamped into written blocks.
    pub gen: u32,
    /// Generation reads must carry (0 = any).
    pub expect_gen: u32,
    pub flush_every: u64,
    pub check: Check,
    /// Write the range before a discard/write-zeroes check.
    pub prefill: bool,
    /// Percent reads in mixed mode.
    pub rwmix: u8,
    /// Completions by MSI-X interrupt instead of polling.
    pub irq: bool,
    /// While waiting for the device, sleep in `hlt` until an interrupt
    /// (as a kernel does: the host CPU is free meanwhile) instead of
    /// spinning (exact latency figures). Implies `irq`.
    pub halt: bool,
    /// Which virtio-blk device (0 = the first found).
    pub disk: u8,
    pub tsc_khz: Option<u64>,
    pub timeout_ms: u64,
    pub queue_size: u16,
    pub seed: u64,
    /// What `mode=fuzz` attacks: `fuzz=disk` (the default), `nic` or `fs`.
    pub fuzz: FuzzTarget,
    pub progress_ms: u64,
    pub max_bus: u8,
    pub indirect: bool,
    pub event_idx: bool,
    /// Report through a virtio console when the VMM offers one (a line
    /// per doorbell), else the UART (a trap per byte).
    pub virtio_console: bool,
    /// Bytes of guest memory to write a pattern into before the workload
    /// (a guest whose memory is in use, for snapshot benchmarks).
    pub touch: u64,
    /// The guest's IPv4 address on its NIC.
    pub ip: [u8; 4],
    /// `ip=dhcp`: ask a DHCP server for it.
    pub dhcp: bool,
    /// `ip=` was given: in every mode, a NIC found answers ARP and ICMP
    /// echo (and UDP echo) on that address while the guest runs.
    pub ip_given: bool,
    /// mode=net as a UDP client of this peer's echo port.
    pub peer: Option<[u8; 4]>,
    /// Datagrams the client sends (and expects back).
    pub count: u64,
    /// Bytes of UDP payload per datagram (12 to 1472).
    pub payload: u32,
    /// Datagrams in flight at once (1: one round trip at a time).
    pub window: u32,
    /// `flood=1`: the client sends its `count` datagrams to the peer's
    /// discard port (9) as fast as the transmit ring takes them, expecting
    /// nothing back (one way: the receiver counts).
    pub flood: bool,
    /// mode=net: once datagrams to the discard port have come, the run
    /// ends after this many ms without one (0: it does not end on them).
    pub sink_idle_ms: u64,
    /// mode=fs: the device's tag (empty: the first device) and the file.
    pub tag: Name,
    pub file: Name,
    /// mode=fs: a file to create in the root and write `out_size` bytes of
    /// [`crate::fs::pattern_byte`] to (empty: none).
    pub out: Name,
    pub out_size: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mode: Mode::RandRead,
            bs: 4096,
            qd: 1,
            queues: 1,
            ios: 0,
            duration_ms: 0,
            offset: 0,
            size: 0,
            verify: false,
            gen: 1,
            expect_gen: 0,
            flush_every: 0,
            check: Check::None,
            prefill: true,
            rwmix: 70,
            irq: false,
            halt: false,
            disk: 0,
            tsc_khz: None,
            timeout_ms: 5000,
            queue_size: 0,
            seed: 1,
            fuzz: FuzzTarget::Disk,
            progress_ms: 1000,
            max_bus: 0,
            indirect: true,
            event_idx: true,
            virtio_console: true,
            touch: 0,
            ip: [10, 0, 0, 2],
            dhcp: false,
            ip_given: false,
            peer: None,
            count: 1000,
            payload: 64,
            window: 1,
            flood: false,
            sink_idle_ms: 0,
            tag: Name::EMPTY,
            file: Name::EMPTY,
            out: Name::EMPTY,
            out_size: 0,
        }
    }
}

fn num(v: &str) -> Option<u64> {
    let (digits, mult) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&v[..v.len() - 1], 1 << 20),
        b'g' | b'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    let n = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    n.checked_mul(mult)
}

/// `a.b.c.d`.
fn ipv4(v: &str) -> Option<[u8; 4]> {
    let mut a = [0u8; 4];
    let mut parts = v.split('.');
    for o in &mut a {
        *o = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(a)
}

fn flag(v: &str) -> Option<bool> {
    match v {
        "1" | "on" | "yes" | "true" => Some(true),
        "0" | "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// Parses the command line; Err names the word it could not take.
pub fn parse(cmdline: &str) -> Result<Config, &str> {
    let mut c = Config::default();
    for word in cmdline.split_ascii_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            return Err(word);
        };
        let ok = match k {
            "mode" => {
                c.mode = match v {
                    "read" => Mode::Read,
                    "write" => Mode::Write,
                    "randread" => Mode::RandRead,
                    "randwrite" => Mode::RandWrite,
                    "mixed" | "randrw" => Mode::Mixed,
                    "boot" => Mode::Boot,
                    "fuzz" => Mode::Fuzz,
                    "idle" => Mode::Idle,
                    "net" => Mode::Net,
                    "fs" => Mode::Fs,
                    "echo" => Mode::Echo,
                    _ => return Err(word),
                };
                true
            }
            "bs" => num(v).filter(|&n| n >= 512 && n % 512 == 0 && n <= 1 << 20).map(|n| c.bs = n as u32).is_some(),
            "qd" => num(v).filter(|&n| (1..=1024).contains(&n)).map(|n| c.qd = n as u16).is_some(),
            "queues" => num(v).filter(|&n| (1..=64).contains(&n)).map(|n| c.queues = n as u16).is_some(),
            "ios" => num(v).map(|n| c.ios = n).is_some(),
            "duration_ms" => num(v).map(|n| c.duration_ms = n).is_some(),
            "offset" => num(v).filter(|n| n % 512 == 0).map(|n| c.offset = n).is_some(),
            "size" => num(v).filter(|n| n % 512 == 0).map(|n| c.size = n).is_some(),
            "verify" => flag(v).map(|b| c.verify = b).is_some(),
            "gen" => num(v).filter(|&n| n > 0 && n <= u32::MAX as u64).map(|n| c.gen = n as u32).is_some(),
            "expect_gen" => num(v).filter(|&n| n <= u32::MAX as u64).map(|n| c.expect_gen = n as u32).is_some(),
            "flush_every" => num(v).map(|n| c.flush_every = n).is_some(),
            "check" => {
                c.check = match v {
                    "none" => Check::None,
                    "discard" => Check::Discard,
                    "zeroes" | "write_zeroes" => Check::WriteZeroes,
                    _ => return Err(word),
                };
                true
            }
            "prefill" => flag(v).map(|b| c.prefill = b).is_some(),
            "rwmix" => num(v).filter(|&n| n <= 100).map(|n| c.rwmix = n as u8).is_some(),
            "irq" => flag(v).map(|b| c.irq = b).is_some(),
            "wait" => match v {
                "poll" | "halt" => {
                    c.halt = v == "halt";
                    true
                }
                _ => false,
            },
            "disk" => num(v).filter(|&n| n < 64).map(|n| c.disk = n as u8).is_some(),
            "tsc_khz" => num(v).filter(|&n| n > 0).map(|n| c.tsc_khz = Some(n)).is_some(),
            "timeout_ms" => num(v).filter(|&n| n > 0).map(|n| c.timeout_ms = n).is_some(),
            "queue_size" => num(v).filter(|&n| n <= 32768).map(|n| c.queue_size = n as u16).is_some(),
            "seed" => num(v).map(|n| c.seed = n).is_some(),
            "fuzz" => {
                c.fuzz = match v {
                    "disk" => FuzzTarget::Disk,
                    "nic" => FuzzTarget::Nic,
                    "fs" => FuzzTarget::Fs,
                    _ => return Err(word),
                };
                true
            }
            "progress_ms" => num(v).map(|n| c.progress_ms = n).is_some(),
            "touch" => num(v).map(|n| c.touch = n).is_some(),
            // Linux's form too (ip=CLIENT::GATEWAY:MASK:HOST:DEV:AUTOCONF,
            // as vmctl passes it): the client's address is the guest's.
            "ip" if v == "dhcp" => {
                c.dhcp = true;
                c.ip_given = true;
                true
            }
            "ip" => ipv4(v.split(':').next().unwrap_or(v))
                .map(|a| {
                    c.ip = a;
                    c.ip_given = true;
                })
                .is_some(),
            "peer" => ipv4(v).map(|a| c.peer = Some(a)).is_some(),
            "count" => num(v).filter(|&n| n > 0).map(|n| c.count = n).is_some(),
            "payload" => num(v).filter(|&n| (12..=1472).contains(&n)).map(|n| c.payload = n as u32).is_some(),
            "window" => num(v).filter(|&n| (1..=128).contains(&n)).map(|n| c.window = n as u32).is_some(),
            "flood" => flag(v).map(|b| c.flood = b).is_some(),
            "tag" => Name::new(v).map(|n| c.tag = n).is_some(),
            "file" => Name::new(v).map(|n| c.file = n).is_some(),
            "out" => Name::new(v).filter(|n| !n.as_bytes().contains(&b'/')).map(|n| c.out = n).is_some(),
            "out_size" => num(v).map(|n| c.out_size = n).is_some(),
            "sink_idle_ms" => num(v).filter(|&n| n > 0).map(|n| c.sink_idle_ms = n).is_some(),
            "max_bus" => num(v).filter(|&n| n < 256).map(|n| c.max_bus = n as u8).is_some(),
            "indirect" => flag(v).map(|b| c.indirect = b).is_some(),
            "event_idx" => flag(v).map(|b| c.event_idx = b).is_some(),
            "console" => match v {
                "virtio" | "serial" => {
                    c.virtio_console = v == "virtio";
                    true
                }
                _ => false,
            },
            // Words meant for someone else (a Linux-style console=ttyS0) are refused too:
            // a typo must not silently run the wrong workload.
            _ => false,
        };
        if !ok {
            return Err(word);
        }
    }
    // Halting needs something to wake it: the device's interrupts.
    c.irq |= c.halt;
    Ok(c)
}
