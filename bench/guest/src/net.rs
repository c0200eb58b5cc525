//! virtio-net: finding the NIC, its MAC, a receive ring kept full of
//! 2 KiB buffers and a transmit ring, polled. The guest answers ARP
//! requests and ICMP echo requests for its address, and UDP datagrams to
//! the echo port (7), so that any VM is reachable and the path testable
//! without Linux; it counts every frame. As a client (`peer=`), it sends
//! numbered, timestamped UDP datagrams to a peer's echo port, a window of
//! them in flight, and counts the echoes and their round trips.

use crate::mem::{rd16, rd8, Arena};
use crate::pci::{self, BarAllocator, ConfigAccess, Function};
use crate::virtio::{self, write_desc, InitError, Transport, Virtqueue, DESC_F_WRITE, NO_VECTOR};

const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
/// Modern virtio-net's header (num_buffers included).
const HDR: u64 = 12;
/// One buffer per frame: a header and a 1514-byte Ethernet frame fit.
const BUF: u64 = 2048;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const IP_ICMP: u8 = 1;
const IP_UDP: u8 = 17;
pub const UDP_ECHO_PORT: u16 = 7;
/// Datagrams to this port (RFC 863's discard) are counted and dropped:
/// what a one-way flood aims at.
pub const UDP_DISCARD_PORT: u16 = 9;

#[derive(Debug)]
pub enum FindError {
    NoConfigAccess,
    NotFound,
    Init(InitError),
}

impl core::fmt::Display for FindError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FindError::NoConfigAccess => write!(f, "no PCI configuration access"),
            FindError::NotFound => write!(f, "virtio-net device not found"),
            FindError::Init(e) => write!(f, "virtio-net initialisation failed: {e:?}"),
        }
    }
}

/// The NIC's MSI-X vectors (receive, transmit): apart from a disk's.
pub const NIC_IRQ_BASE: u8 = crate::virtio::IRQ_BASE + 0x20;

/// The UDP port the client sends from.
pub const CLIENT_PORT: u16 = 40_007;
const DHCP_CLIENT_PORT: u16 = 68;
const DHCP_SERVER_PORT: u16 = 67;
const DHCP_XID: u32 = 0x6265_6e63;

/// What a DHCP server said: its message type (2 offer, 5 ack, 6 nak), the
/// address offered, the server's identifier.
#[derive(Clone, Copy)]
pub struct DhcpReply {
    pub kind: u8,
    pub address: [u8; 4],
    pub server: [u8; 4],
}

/// An echo that came back to the client: its sequence number and the TSC
/// it was sent at.
#[derive(Clone, Copy)]
pub struct Echo {
    pub seq: u32,
    pub sent_tsc: u64,
}

/// What the NIC saw and did.
#[derive(Default, Clone, Copy)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub arp_replies: u64,
    pub icmp_replies: u64,
    pub udp_echoes: u64,
    /// Frames for someone else, or of a kind not answered.
    pub ignored: u64,
    /// Replies not sent: the transmit ring was full.
    pub tx_full: u64,
    /// Echoes that came back to the client port.
    pub echoes_back: u64,
    /// Datagrams to the discard port, their UDP payload bytes, and the
    /// TSC at the first and the last of them.
    pub discarded: u64,
    pub discarded_bytes: u64,
    pub first_discard_tsc: u64,
    pub last_discard_tsc: u64,
}

pub struct Nic {
    _transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    rx_bufs: u64,
    tx_bufs: u64,
    tx_in_flight: u16,
    tx_next: u16,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    /// The MTU the device gave (F_MTU), if it gave one.
    pub mtu: Option<u16>,
    pub stats: NetStats,
    /// The peer the client talks to, and its MAC once ARP told it.
    pub peer: Option<[u8; 4]>,
    pub peer_mac: Option<[u8; 6]>,
    /// Echoes that came back since the caller last took them (a poll
    /// handles at most a ring's worth of frames: they all fit).
    pub echoes: [Echo; 256],
    pub new_echoes: usize,
    /// The last DHCP reply to this NIC.
    pub dhcp: Option<DhcpReply>,
}

fn find(access: ConfigAccess, max_bus: u8) -> Option<Function> {
    let mut hit = None;
    pci::functions(access, max_bus, |f| {
        let (vendor, device) = f.vendor_device();
        // 0x1041: modern virtio-net; 0x1000: transitional.
        if hit.is_none() && vendor == 0x1af4 && (device == 0x1041 || device == 0x1000) {
            hit = Some(f);
        }
    });
    hit
}

/// `len` bytes of guest RAM at `addr` as a slice.
fn bytes(addr: u64, len: u64) -> &'static mut [u8] {
    // SAFETY: the callers pass buffers the arena gave the NIC alone.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len as usize) }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum of `b`.
fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        sum += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Nic {
    /// With `irq`, the receive queue interrupts (MSI-X, NIC_IRQ_BASE): a guest
    /// that halts while nothing arrives is woken by the next frame.
    pub fn open(rsdp: u64, max_bus: u8, queue_size: u16, ip: [u8; 4], irq: bool, event_idx: bool, arena: &Arena) -> Result<Nic, FindError> {
        let access = pci::config_access(rsdp).ok_or(FindError::NoConfigAccess)?;
        let func = find(access, max_bus).ok_or(FindError::NotFound)?;
        // A window of its own: a disk's and the console's BARs are placed
        // from 0xc000_0000 and 0xd000_0000 (where firmware left them unset).
        let mut bars = BarAllocator { next32: 0xd800_0000, end32: 0xdc00_0000 };
        let t = Transport::new(func, &mut bars).map_err(FindError::Init)?;
        let mut wanted = virtio::F_VERSION_1 | F_MAC | F_MTU;
        if event_idx {
            wanted |= virtio::F_EVENT_IDX;
        }
        let features = t.negotiate(wanted).map_err(FindError::Init)?;
        let mut mac = [0x52, 0x54, 0, 0xbe, 0x9c, 0x01];
        if features & F_MAC != 0 {
            for (i, m) in mac.iter_mut().enumerate() {
                *m = rd8(t.device_cfg + i as u64);
            }
        }
        // The link's MTU, where the device tells it (virtio_net_config.mtu).
        let mtu = (features & F_MTU != 0).then(|| rd16(t.device_cfg + 10));
        if irq && !t.enable_msix_from(2, NIC_IRQ_BASE) {
            return Err(FindError::Init(InitError::MissingCapability("MSI-X")));
        }
        let mut rx = t.setup_queue(0, queue_size, if irq { 0 } else { NO_VECTOR }, arena).map_err(FindError::Init)?;
        // The transmit queue's interrupt is off but while a sender waits
        // for room (`wait_for_tx_room`).
        let mut tx = t.setup_queue(1, queue_size, if irq { 1 } else { NO_VECTOR }, arena).map_err(FindError::Init)?;
        // Event-index suppression: a kick only when the device asked for
        // one, an interrupt only past the entry the driver waits for.
        rx.event_idx = features & virtio::F_EVENT_IDX != 0;
        tx.event_idx = rx.event_idx;
        if !irq {
            rx.suppress_interrupts();
        }
        tx.suppress_interrupts();
        let rx_bufs = arena.alloc(BUF * rx.size as u64, 4096).ok_or(FindError::Init(InitError::OutOfMemory))?;
        let tx_bufs = arena.alloc(BUF * tx.size as u64, 4096).ok_or(FindError::Init(InitError::OutOfMemory))?;
        t.driver_ok();
        // Every receive buffer posted.
        for i in 0..rx.size {
            write_desc(rx.desc_table(), i, rx_bufs + BUF * i as u64, BUF as u32, DESC_F_WRITE, 0);
            rx.push(i);
        }
        rx.publish();
        Ok(Nic {
            _transport: t,
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            tx_in_flight: 0,
            tx_next: 0,
            mac,
            ip,
            mtu,
            stats: NetStats::default(),
            peer: None,
            peer_mac: None,
            echoes: [Echo { seq: 0, sent_tsc: 0 }; 256],
            new_echoes: 0,
            dhcp: None,
        })
    }

    /// The device's virtio-pci transport (what `mode=fuzz fuzz=nic` writes
    /// junk to).
    pub fn transport(&self) -> &Transport {
        &self._transport
    }

    /// Whether the device says the link is up (without STATUS: up).
    pub fn link_up(&self) -> bool {
        rd16(self._transport.device_cfg + 6) & 1 == 1
    }

    /// Handles what arrived (its replies queued, then published together)
    /// and reclaims what was sent; how many frames came in.
    pub fn poll(&mut self) -> u64 {
        while self.tx.pop_used().is_some() {
            self.tx_in_flight -= 1;
        }
        let mut n = 0;
        while let Some((id, len)) = self.rx.pop_used() {
            n += 1;
            self.stats.rx_frames += 1;
            let at = self.rx_bufs + BUF * u64::from(id);
            let len = u64::from(len).min(BUF);
            if len > HDR {
                self.answer(bytes(at + HDR, len - HDR));
            }
            self.rx.push(id);
        }
        if n > 0 {
            self.rx.publish();
            // The replies to all of them, with one kick at most.
            self.tx.publish();
        }
        n
    }

    /// Sends the frame `build` writes into the buffer it is given (its
    /// length returned); false when the transmit ring is full.
    fn send(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let queued = self.queue_frame(build);
        if queued {
            self.tx.publish();
        }
        queued
    }

    /// Makes the frames queued since the last publish available to the
    /// device (one kick at most, for all of them).
    pub fn flush_tx(&mut self) {
        self.tx.publish();
    }

    /// Puts a frame on the transmit ring without telling the device yet
    /// (Linux's xmit_more: a burst, then one publish); false when full.
    fn queue_frame(&mut self, build: impl FnOnce(&mut [u8]) -> usize) -> bool {
        if self.tx_in_flight == self.tx.size {
            self.stats.tx_full += 1;
            return false;
        }
        let slot = self.tx_next % self.tx.size;
        let at = self.tx_bufs + BUF * u64::from(slot);
        bytes(at, HDR).fill(0);
        let len = build(bytes(at + HDR, BUF - HDR)) as u64;
        write_desc(self.tx.desc_table(), slot, at, (HDR + len) as u32, 0, 0);
        self.tx.push(slot);
        self.tx_next = self.tx_next.wrapping_add(1);
        self.tx_in_flight += 1;
        self.stats.tx_frames += 1;
        true
    }

    /// Asks who has the peer's address (ARP, broadcast).
    pub fn ask_peer_mac(&mut self) -> bool {
        let (Some(peer), mac, ip) = (self.peer, self.mac, self.ip) else {
            return false;
        };
        self.send(|o| {
            o[0..6].fill(0xff);
            o[6..12].copy_from_slice(&mac);
            put16(o, 12, ETH_ARP);
            o[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            o[22..28].copy_from_slice(&mac);
            o[28..32].copy_from_slice(&ip);
            o[32..38].fill(0);
            o[38..42].copy_from_slice(&peer);
            60
        })
    }

    /// Notifications the transmit queue sent the device.
    pub fn tx_kicks(&self) -> u64 {
        self.tx.kicks
    }

    /// A full transmit ring: with interrupts (wait=halt), the vCPU sleeps
    /// until the device has taken half of it (Linux's delayed transmit
    /// callback) or `max_ns` passed; else it only reclaims what it took.
    pub fn wait_for_tx_room(&mut self, halt: bool, max_ns: u64) {
        let seen = crate::rt::irq_total();
        if halt {
            self.tx.interrupt_after(self.tx_in_flight / 2);
        }
        let before = self.tx_in_flight;
        self.poll();
        if halt && self.tx_in_flight == before {
            crate::rt::wait_for_interrupt(seen, max_ns);
            self.poll();
        }
        if halt {
            self.tx.suppress_interrupts();
        }
    }

    /// Frames sent that the device has not taken yet.
    pub fn tx_in_flight(&self) -> u16 {
        self.tx_in_flight
    }

    /// Queues datagram `seq` of `payload` bytes (at least 12: the
    /// sequence number and the TSC) to the peer's `port` (`flush_tx`
    /// publishes a burst of them); false if the ring is full or the peer's
    /// MAC is not known yet.
    pub fn queue_datagram(&mut self, port: u16, seq: u32, payload: usize, tsc: u64) -> bool {
        let (Some(peer), Some(peer_mac), mac, ip) = (self.peer, self.peer_mac, self.mac, self.ip) else {
            return false;
        };
        let payload = payload.clamp(12, 1472);
        self.queue_frame(|o| {
            o[0..6].copy_from_slice(&peer_mac);
            o[6..12].copy_from_slice(&mac);
            put16(o, 12, ETH_IPV4);
            let total = 20 + 8 + payload;
            o[14..34].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, IP_UDP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            put16(o, 16, total as u16);
            o[26..30].copy_from_slice(&ip);
            o[30..34].copy_from_slice(&peer);
            let c = checksum(&o[14..34]);
            put16(o, 24, c);
            put16(o, 34, CLIENT_PORT);
            put16(o, 36, port);
            put16(o, 38, (8 + payload) as u16);
            put16(o, 40, 0);
            o[42..46].copy_from_slice(&seq.to_le_bytes());
            o[46..54].copy_from_slice(&tsc.to_le_bytes());
            for (i, b) in o[54..42 + payload].iter_mut().enumerate() {
                *b = i as u8;
            }
            (14 + total).max(60)
        })
    }

    /// Sends a DHCP DISCOVER (`request` None) or a REQUEST for the address
    /// a server offered, broadcast from 0.0.0.0 (RFC 2131).
    pub fn send_dhcp(&mut self, request: Option<DhcpReply>) -> bool {
        let mac = self.mac;
        self.send(|o| {
            o[0..6].fill(0xff);
            o[6..12].copy_from_slice(&mac);
            put16(o, 12, ETH_IPV4);
            let b = 42; // BOOTP starts after the Ethernet, IP and UDP headers
            o[b..b + 300].fill(0);
            o[b] = 1; // BOOTREQUEST
            o[b + 1] = 1; // Ethernet
            o[b + 2] = 6;
            o[b + 4..b + 8].copy_from_slice(&DHCP_XID.to_be_bytes());
            o[b + 10] = 0x80; // replies broadcast: no address yet
            o[b + 28..b + 34].copy_from_slice(&mac);
            o[b + 236..b + 240].copy_from_slice(&[99, 130, 83, 99]);
            let mut at = b + 240;
            let mut opt = |o: &mut [u8], code: u8, value: &[u8]| {
                o[at] = code;
                o[at + 1] = value.len() as u8;
                o[at + 2..at + 2 + value.len()].copy_from_slice(value);
                at += 2 + value.len();
            };
            match request {
                None => opt(o, 53, &[1]),
                Some(r) => {
                    opt(o, 53, &[3]);
                    opt(o, 50, &r.address);
                    opt(o, 54, &r.server);
                }
            }
            opt(o, 55, &[1, 3]);
            o[at] = 255;
            let udp_len = 8 + (at + 1 - b).max(300);
            let total = 20 + udp_len;
            o[14..34].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, IP_UDP, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
            put16(o, 16, total as u16);
            let c = checksum(&o[14..34]);
            put16(o, 24, c);
            put16(o, 34, DHCP_CLIENT_PORT);
            put16(o, 36, DHCP_SERVER_PORT);
            put16(o, 38, udp_len as u16);
            put16(o, 40, 0);
            14 + total
        })
    }

    /// A DHCP reply for us: its type, the address, the server.
    fn take_dhcp(&mut self, b: &[u8]) {
        if b.len() < 240 || b[0] != 2 || b[4..8] != DHCP_XID.to_be_bytes() || b[236..240] != [99, 130, 83, 99] {
            return;
        }
        let mut reply = DhcpReply { kind: 0, address: [b[16], b[17], b[18], b[19]], server: [0; 4] };
        let mut at = 240;
        while at + 1 < b.len() && b[at] != 255 {
            if b[at] == 0 {
                at += 1;
                continue;
            }
            let (code, len) = (b[at], usize::from(b[at + 1]));
            let Some(v) = b.get(at + 2..at + 2 + len) else { break };
            match (code, len) {
                (53, 1) => reply.kind = v[0],
                (54, 4) => reply.server.copy_from_slice(v),
                _ => {}
            }
            at += 2 + len;
        }
        self.dhcp = Some(reply);
    }

    /// ARP requests and ICMP echo requests for our address, UDP to the
    /// echo port: answered; the peer's ARP reply and echoes to the client
    /// port: taken; the rest counted.
    fn answer(&mut self, f: &[u8]) {
        if f.len() < 14 {
            self.stats.ignored += 1;
            return;
        }
        let (mac, ip) = (self.mac, self.ip);
        match be16(f, 12) {
            // A DHCP reply (to our MAC or broadcast: we have no address).
            ETH_IPV4
                if f.len() >= 42
                    && f[23] == IP_UDP
                    && be16(f, 14 + usize::from(f[14] & 0x0f) * 4 + 2) == DHCP_CLIENT_PORT =>
            {
                let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
                if let Some(b) = f.get(l4 + 8..) {
                    self.take_dhcp(b);
                }
            }
            ETH_ARP if f.len() >= 42 && be16(f, 20) == 2 && Some(<[u8; 4]>::try_from(&f[28..32]).unwrap_or([0; 4])) == self.peer => {
                self.peer_mac = <[u8; 6]>::try_from(&f[22..28]).ok();
            }
            ETH_IPV4
                if f.len() >= 54
                    && f[30..34] == ip
                    && f[23] == IP_UDP
                    && be16(f, 14 + usize::from(f[14] & 0x0f) * 4 + 2) == CLIENT_PORT =>
            {
                let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
                if f.len() >= l4 + 20 {
                    let seq = u32::from_le_bytes([f[l4 + 8], f[l4 + 9], f[l4 + 10], f[l4 + 11]]);
                    let mut t = [0u8; 8];
                    t.copy_from_slice(&f[l4 + 12..l4 + 20]);
                    if let Some(slot) = self.echoes.get_mut(self.new_echoes) {
                        *slot = Echo { seq, sent_tsc: u64::from_le_bytes(t) };
                        self.new_echoes += 1;
                    }
                    self.stats.echoes_back += 1;
                }
            }
            ETH_IPV4
                if f.len() >= 42
                    && f[30..34] == ip
                    && f[23] == IP_UDP
                    && be16(f, 14 + usize::from(f[14] & 0x0f) * 4 + 2) == UDP_DISCARD_PORT =>
            {
                let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
                let now = crate::time::tsc();
                let st = &mut self.stats;
                if st.discarded == 0 {
                    st.first_discard_tsc = now;
                }
                st.last_discard_tsc = now;
                st.discarded += 1;
                st.discarded_bytes += u64::from(be16(f, l4 + 4).saturating_sub(8));
            }
            ETH_ARP if f.len() >= 42 && be16(f, 20) == 1 && f[38..42] == ip => {
                let (sha, spa) = (<[u8; 6]>::try_from(&f[22..28]).unwrap_or([0; 6]), <[u8; 4]>::try_from(&f[28..32]).unwrap_or([0; 4]));
                if self.queue_frame(|o| {
                    o[0..6].copy_from_slice(&sha);
                    o[6..12].copy_from_slice(&mac);
                    put16(o, 12, ETH_ARP);
                    o[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
                    o[22..28].copy_from_slice(&mac);
                    o[28..32].copy_from_slice(&ip);
                    o[32..38].copy_from_slice(&sha);
                    o[38..42].copy_from_slice(&spa);
                    60
                }) {
                    self.stats.arp_replies += 1;
                }
            }
            ETH_IPV4 if f.len() >= 34 && f[30..34] == ip => {
                let ihl = usize::from(f[14] & 0x0f) * 4;
                let total = usize::from(be16(f, 16));
                if ihl < 20 || total < ihl || 14 + total > f.len() {
                    self.stats.ignored += 1;
                    return;
                }
                let l4 = 14 + ihl;
                let end = 14 + total;
                let reply = match f[23] {
                    IP_ICMP if end - l4 >= 8 && f[l4] == 8 => Some(IP_ICMP),
                    IP_UDP if end - l4 >= 8 && be16(f, l4 + 2) == UDP_ECHO_PORT => Some(IP_UDP),
                    _ => None,
                };
                let Some(proto) = reply else {
                    self.stats.ignored += 1;
                    return;
                };
                let sent = self.queue_frame(|o| {
                    o[..end].copy_from_slice(&f[..end]);
                    // Back to where it came from.
                    o[0..6].copy_from_slice(&f[6..12]);
                    o[6..12].copy_from_slice(&mac);
                    o[22] = 64;
                    o[26..30].copy_from_slice(&ip);
                    o[30..34].copy_from_slice(&f[26..30]);
                    put16(o, 24, 0);
                    let c = checksum(&o[14..l4]);
                    put16(o, 24, c);
                    if proto == IP_ICMP {
                        o[l4] = 0;
                        put16(o, l4 + 2, 0);
                        let c = checksum(&o[l4..end]);
                        put16(o, l4 + 2, c);
                    } else {
                        // Ports swapped; no checksum (allowed over IPv4).
                        o[l4..l4 + 2].copy_from_slice(&f[l4 + 2..l4 + 4]);
                        o[l4 + 2..l4 + 4].copy_from_slice(&f[l4..l4 + 2]);
                        put16(o, l4 + 6, 0);
                    }
                    end.max(60)
                });
                if sent {
                    if proto == IP_ICMP {
                        self.stats.icmp_replies += 1;
                    } else {
                        self.stats.udp_echoes += 1;
                    }
                }
            }
            _ => self.stats.ignored += 1,
        }
    }
}
