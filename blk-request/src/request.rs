//! One virtio-blk request: header, data segments, status, validated against
//! guest memory before anything touches a file.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::SEG_MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("descriptor chain too short ({0} descriptors)")]
    TooShort(usize),
    #[error("descriptor chain too long ({0} descriptors)")]
    TooLong(usize),
    #[error("request header is {0} bytes or device-writable")]
    BadHeader(u32),
    #[error("status descriptor is {0} bytes or not device-writable")]
    BadStatus(u32),
    #[error("data descriptor {0} has the wrong direction for the request type")]
    WrongDirection(usize),
    #[error("descriptor at {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// A run of data bytes in guest memory, resolved once when the request is
/// parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    /// Where `addr` is mapped in this process: valid for `len` bytes for
    /// as long as the memory the request was parsed against is mapped.
    pub host: *mut u8,
}

/// One request. A worker keeps one and parses each chain into it
/// ([`Request::parse_from`]): its vectors keep their capacity, so no
/// request allocates.
#[derive(Debug)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    pub data: Vec<Segment>,
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// The chain's descriptors, each with its host address (scratch).
    descs: Vec<(Descriptor, *mut u8)>,
}

/// The host address of a descriptor's bytes, all of which must lie in one
/// region of guest memory (null for an empty one).
fn resolve(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<*mut u8, ParseError> {
    if d.len() == 0 {
        return Ok(std::ptr::null_mut());
    }
    mem.get_slice(d.addr(), d.len() as usize)
        .map(|s| s.ptr_guard_mut().as_ptr())
        .map_err(|_| ParseError::OutsideMemory {
            addr: d.addr().0,
            len: d.len(),
        })
}

/// The request type a header names.
fn kind_of(header: &[u8; 16]) -> Kind {
    match u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) {
        VIRTIO_BLK_T_IN => Kind::In,
        VIRTIO_BLK_T_OUT => Kind::Out,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        VIRTIO_BLK_T_DISCARD => Kind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
        other => Kind::Unsupported(other),
    }
}

impl Default for Request {
    fn default() -> Self {
        Request {
            kind: Kind::Unsupported(u32::MAX),
            sector: 0,
            data: Vec::with_capacity(SEG_MAX as usize + 2),
            data_len: 0,
            status: GuestAddress(0),
            descs: Vec::with_capacity(SEG_MAX as usize + 3),
        }
    }
}

impl Request {
    /// Parses a chain. `Err` means the chain cannot even carry a status;
    /// `Ok` with `Kind::Unsupported` means it can (and gets UNSUPP).
    pub fn parse(
        chain: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
    ) -> Result<Request, (ParseError, Option<GuestAddress>)> {
        let mut r = Request::default();
        r.parse_from(chain, mem)?;
        Ok(r)
    }

    /// Parses a chain into this request, reusing its storage (see
    /// [`Request::parse`]).
    pub fn parse_from(
        &mut self,
        chain: impl Iterator<Item = Descriptor>,
        mem: &GuestMemoryMmap,
    ) -> Result<(), (ParseError, Option<GuestAddress>)> {
        self.data.clear();
        self.data_len = 0;
        self.kind = Kind::Unsupported(u32::MAX);
        let descs = &mut self.descs;
        descs.clear();
        // Each descriptor is looked up in guest memory once, here; an
        // error is kept until the status is known (a refused request
        // still gets its IOERR there).
        let mut outside = None;
        for d in chain.take(SEG_MAX as usize + 3) {
            let host = match resolve(mem, &d) {
                Ok(h) => h,
                Err(e) => {
                    outside.get_or_insert(e);
                    std::ptr::null_mut()
                }
            };
            descs.push((d, host));
        }
        // The status goes in the last descriptor when it is writable.
        let status = descs
            .last()
            .filter(|(d, host)| d.is_write_only() && d.len() >= 1 && !host.is_null())
            .map(|(d, _)| d.addr().unchecked_add(d.len() as u64 - 1));
        let fail = |e| Err((e, status));
        if descs.len() > SEG_MAX as usize + 2 {
            return fail(ParseError::TooLong(descs.len()));
        }
        if descs.len() < 2 {
            return fail(ParseError::TooShort(descs.len()));
        }
        if let Some(e) = outside {
            return fail(e);
        }
        // Any layout (VIRTIO 1.x, VERSION_1 implies ANY_LAYOUT): the
        // device-readable bytes come first and start with the 16-byte
        // header, however the driver cut them into descriptors; the
        // device-writable bytes follow and end with the status byte. Data
        // is what lies between, on the side the request type says.
        let first_writable = descs
            .iter()
            .position(|(d, _)| d.is_write_only())
            .unwrap_or(descs.len());
        if let Some(i) = descs[first_writable..]
            .iter()
            .position(|(d, _)| !d.is_write_only())
        {
            return fail(ParseError::WrongDirection(first_writable + i));
        }
        let readable: u64 = descs[..first_writable]
            .iter()
            .map(|(d, _)| d.len() as u64)
            .sum();
        if readable < 16 {
            return fail(ParseError::BadHeader(readable as u32));
        }
        let last = descs.last().expect("len >= 2").0;
        let Some(status) = status else {
            return fail(ParseError::BadStatus(last.len()));
        };
        // The header, then every byte run but the header and the status,
        // each checked to lie on the side the request type says. The
        // readable bytes come first and hold at least the header, so the
        // type is known before the first run.
        let mut header = [0u8; 16];
        let mut header_got = 0usize;
        let mut kind = None;
        let n = descs.len();
        for (i, &(d, host)) in descs.iter().enumerate() {
            let (mut addr, mut host, mut len) = (d.addr(), host, d.len());
            if header_got < 16 && !d.is_write_only() {
                let take = (16 - header_got).min(len as usize);
                mem.read_slice(&mut header[header_got..header_got + take], addr)
                    .map_err(|_| (ParseError::BadHeader(16), Some(status)))?;
                header_got += take;
                addr = addr.unchecked_add(take as u64);
                // Inside the descriptor's bytes (take <= len).
                host = host.wrapping_add(take);
                len -= take as u32;
            }
            if i == n - 1 {
                len -= 1; // the status byte
            }
            if len > 0 {
                let k = *kind.get_or_insert_with(|| kind_of(&header));
                let device_writes = matches!(k, Kind::In | Kind::GetId);
                if !matches!(k, Kind::Unsupported(_)) && d.is_write_only() != device_writes {
                    return fail(ParseError::WrongDirection(i));
                }
                self.data.push(Segment { addr, len, host });
            }
        }
        let kind = kind.unwrap_or_else(|| kind_of(&header));
        let sector = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        self.data_len = self.data.iter().map(|s| s.len as u64).sum();
        self.kind = kind;
        self.sector = sector;
        self.status = status;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
            addr, len, flags, 0,
        ))
    }

    fn header(m: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
        m.write_obj(ty, GuestAddress(at)).expect("write");
        m.write_obj(sector, GuestAddress(at + 8)).expect("write");
    }

    fn parse(
        m: &GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> Result<Request, (ParseError, Option<GuestAddress>)> {
        let q = MockSplitQueue::new(m, 256);
        let chain = q.build_desc_chain(descs).expect("chain");
        Request::parse(chain, m)
    }

    #[test]
    fn a_well_formed_read() {
        let m = mem();
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 8);
        let r = parse(&m, &[d(0x8000, 16, 0), d(0x9000, 4096, W), d(0xa000, 1, W)]).expect("valid");
        assert_eq!(r.kind, Kind::In);
        assert_eq!((r.sector, r.data_len), (8, 4096));
        assert_eq!(r.status, GuestAddress(0xa000));
    }

    #[test]
    fn one_request_reused_parses_each_chain_as_a_fresh_one_would() {
        let m = mem();
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 8);
        header(&m, 0xb000, VIRTIO_BLK_T_OUT, 16);
        let chains = [
            vec![d(0x8000, 16, 0), d(0x9000, 4096, W), d(0xa000, 1, W)],
            // Refused: a readable descriptor after a writable one.
            vec![d(0x8000, 16, W), d(0x9000, 512, 0), d(0xa000, 1, W)],
            vec![d(0xb000, 16 + 512, 0), d(0xc000, 1024, 0), d(0xa000, 1, W)],
            vec![d(0x8000, 16, 0), d(0xa000, 1, W)],
        ];
        let mut reused = Request::default();
        for descs in &chains {
            let q = MockSplitQueue::new(&m, 256);
            let fresh = parse(&m, descs);
            let got = reused.parse_from(q.build_desc_chain(descs).expect("chain"), &m);
            match (fresh, got) {
                (Ok(f), Ok(())) => {
                    assert_eq!(
                        (f.kind, f.sector, f.data_len, f.status, &f.data),
                        (
                            reused.kind,
                            reused.sector,
                            reused.data_len,
                            reused.status,
                            &reused.data
                        )
                    );
                    // Each segment's host address is where its guest
                    // address is mapped.
                    for s in &reused.data {
                        let host = m.get_host_address(s.addr).expect("mapped");
                        assert_eq!(s.host, host);
                    }
                }
                (Err(f), Err(g)) => assert_eq!(f, g),
                (f, g) => panic!("fresh {f:?}, reused {g:?}"),
            }
        }
        // The write's data: its header's descriptor's tail, then the next.
        let q = MockSplitQueue::new(&m, 256);
        reused
            .parse_from(q.build_desc_chain(&chains[2]).expect("chain"), &m)
            .expect("valid");
        let runs: Vec<(u64, u32)> = reused.data.iter().map(|s| (s.addr.0, s.len)).collect();
        assert_eq!(runs, [(0xb010, 512), (0xc000, 1024)]);
    }

    #[test]
    fn hostile_chains_are_refused_with_a_reason() {
        let m = mem();
        header(&m, 0x8000, VIRTIO_BLK_T_OUT, 0);
        let cases: Vec<(Vec<RawDescriptor>, ParseError, bool)> = vec![
            // A device-readable descriptor after a device-writable one.
            (
                vec![d(0x8000, 16, W), d(0x9000, 512, 0), d(0xa000, 1, W)],
                ParseError::WrongDirection(1),
                true,
            ),
            // Fewer than 16 readable bytes: no header.
            (
                vec![d(0x8000, 8, 0), d(0xa000, 1, W)],
                ParseError::BadHeader(8),
                true,
            ),
            (
                vec![d(0x8000, 16, 0), d(0x9000, 512, 0), d(0xa000, 1, 0)],
                ParseError::BadStatus(1),
                false,
            ),
            (
                vec![d(0x8000, 16, 0), d(0x9000, 512, W), d(0xa000, 1, W)],
                ParseError::WrongDirection(1),
                true,
            ),
            (vec![d(0x8000, 16, 0)], ParseError::TooShort(1), false),
            (
                vec![d(0x8000, 16, 0), d(0xfff00, 4096, 0), d(0xa000, 1, W)],
                ParseError::OutsideMemory {
                    addr: 0xfff00,
                    len: 4096,
                },
                true,
            ),
            (
                vec![d(0x8000, 16, 0), d(0x9000, 512, 0), d(1 << 40, 1, W)],
                ParseError::OutsideMemory {
                    addr: 1 << 40,
                    len: 1,
                },
                false,
            ),
        ];
        for (descs, expect, has_status) in cases {
            let (e, status) = parse(&m, &descs).expect_err("refused");
            assert_eq!(e, expect);
            assert_eq!(status.is_some(), has_status, "{expect}");
        }
        // Too many descriptors.
        let mut long = vec![d(0x8000, 16, 0)];
        for i in 0..(SEG_MAX as u64 + 2) {
            long.push(d(0x10000 + i * 512, 512, 0));
        }
        long.push(d(0xa000, 1, W));
        let (e, _) = parse(&m, &long).expect_err("too long");
        assert!(matches!(e, ParseError::TooLong(_)), "{e}");
    }

    /// VIRTIO 1.x leaves the framing to the driver: a header split over
    /// two descriptors, header and data in one, data and status in one.
    #[test]
    fn any_layout_parses_the_same_request() {
        let m = mem();
        // A write of 1024 bytes at sector 8: header at 0x8000, data at 0x8010.
        header(&m, 0x8000, VIRTIO_BLK_T_OUT, 8);
        let layouts: Vec<Vec<RawDescriptor>> = vec![
            vec![d(0x8000, 16, 0), d(0x8010, 1024, 0), d(0xa000, 1, W)],
            vec![
                d(0x8000, 8, 0),
                d(0x8008, 8, 0),
                d(0x8010, 1024, 0),
                d(0xa000, 1, W),
            ],
            vec![d(0x8000, 16 + 1024, 0), d(0xa000, 1, W)],
            vec![d(0x8000, 12, 0), d(0x800c, 4 + 1024, 0), d(0xa000, 1, W)],
        ];
        for descs in layouts {
            let r = parse(&m, &descs).expect("a legal layout");
            assert_eq!((r.kind, r.sector, r.data_len), (Kind::Out, 8, 1024));
            let bytes: u64 = r.data.iter().map(|s| s.len as u64).sum();
            assert_eq!(bytes, 1024);
            assert_eq!(r.data[0].addr, GuestAddress(0x8010));
            assert_eq!(r.status, GuestAddress(0xa000));
        }
        // A read whose data and status share the last descriptor, with a
        // split header.
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 2);
        let r = parse(
            &m,
            &[d(0x8000, 4, 0), d(0x8004, 12, 0), d(0x9000, 4096 + 1, W)],
        )
        .expect("legal");
        assert_eq!((r.kind, r.sector, r.data_len), (Kind::In, 2, 4096));
        assert_eq!(r.status, GuestAddress(0x9000 + 4096));
    }

    #[test]
    fn unknown_types_parse_as_unsupported() {
        let m = mem();
        header(&m, 0x8000, 0x7777, 0);
        let r = parse(&m, &[d(0x8000, 16, 0), d(0xa000, 1, W)]).expect("parses");
        assert_eq!(r.kind, Kind::Unsupported(0x7777));
    }
}
