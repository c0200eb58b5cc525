//! The layer header: two 4 KiB slots, each a complete header with a
//! generation and a CRC-32C, so an update is atomic (see FORMAT.md).

use uuid::Uuid;

pub const MAGIC: &[u8; 8] = b"SNAPLAYR";
pub const VERSION: u32 = 1;
pub const SLOT_SIZE: usize = 4096;
/// The map starts right after the two header slots.
pub const MAP_OFFSET: u64 = 2 * SLOT_SIZE as u64;
/// The data area is aligned to this.
pub const DATA_ALIGN: u64 = 1 << 20;
pub const MAX_PARENT_PATH: usize = 1024;
pub const MAX_NAME: usize = 256;
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 65536;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Largest virtual size: 64 TiB keeps every offset far from u64 overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

pub const FLAG_SEALED: u64 = 1 << 0;
pub const FLAG_DIRTY: u64 = 1 << 1;
const KNOWN_FLAGS: u64 = FLAG_SEALED | FLAG_DIRTY;

const OFF_CRC: usize = SLOT_SIZE - 4;
const OFF_PARENT_PATH: usize = 128;
const OFF_NAME: usize = OFF_PARENT_PATH + MAX_PARENT_PATH;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a snapshot layer (wrong magic)")]
    WrongMagic,
    #[error("unsupported format version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("unsupported feature flags {0:#x}")]
    UnsupportedFlags(u64),
    #[error("inconsistent header: {0}")]
    Inconsistent(String),
    #[error("header slot is empty")]
    Empty,
    #[error("file too short to hold a header ({0} bytes)")]
    TooShort(u64),
}

/// A decoded, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub flags: u64,
    pub virtual_size: u64,
    pub block_size: u32,
    pub map_offset: u64,
    pub map_len: u64,
    pub data_offset: u64,
    pub uuid: Uuid,
    pub parent_uuid: Option<Uuid>,
    /// Set while a commit into the parent is under way (FORMAT.md, commit).
    pub parent_uuid_next: Option<Uuid>,
    pub parent_path: Option<String>,
    pub name: String,
}

/// Where the map and the data go for a given size.
pub fn layout(virtual_size: u64, block_size: u32) -> (u64, u64) {
    let blocks = virtual_size.div_ceil(block_size as u64);
    let map_len = blocks.div_ceil(4).div_ceil(SLOT_SIZE as u64) * SLOT_SIZE as u64;
    let data_offset = (MAP_OFFSET + map_len).div_ceil(DATA_ALIGN) * DATA_ALIGN;
    (map_len, data_offset)
}

/// Checks a size and block size a user asked for.
pub fn validate_geometry(virtual_size: u64, block_size: u32) -> Result<(), HeaderError> {
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(HeaderError::Inconsistent(format!(
            "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )));
    }
    if virtual_size == 0 || !virtual_size.is_multiple_of(block_size as u64) {
        return Err(HeaderError::Inconsistent(format!(
            "virtual size {virtual_size} is not a non-zero multiple of the block size {block_size}"
        )));
    }
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(HeaderError::Inconsistent(format!(
            "virtual size {virtual_size} exceeds the maximum {MAX_VIRTUAL_SIZE}"
        )));
    }
    Ok(())
}

fn uuid_opt(bytes: &[u8]) -> Option<Uuid> {
    let u = Uuid::from_slice(bytes).ok()?;
    (!u.is_nil()).then_some(u)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn text(b: &[u8], what: &str) -> Result<String, HeaderError> {
    String::from_utf8(b.to_vec())
        .map_err(|_| HeaderError::Inconsistent(format!("{what} is not UTF-8")))
}

impl Header {
    /// A fresh header for a new layer.
    pub fn new(virtual_size: u64, block_size: u32) -> Result<Header, HeaderError> {
        validate_geometry(virtual_size, block_size)?;
        let (map_len, data_offset) = layout(virtual_size, block_size);
        Ok(Header {
            generation: 1,
            flags: 0,
            virtual_size,
            block_size,
            map_offset: MAP_OFFSET,
            map_len,
            data_offset,
            uuid: Uuid::new_v4(),
            parent_uuid: None,
            parent_uuid_next: None,
            parent_path: None,
            name: String::new(),
        })
    }

    pub fn blocks(&self) -> u64 {
        self.virtual_size / self.block_size as u64
    }
    pub fn sealed(&self) -> bool {
        self.flags & FLAG_SEALED != 0
    }
    pub fn dirty(&self) -> bool {
        self.flags & FLAG_DIRTY != 0
    }
    /// The file length this header needs.
    pub fn file_len(&self) -> u64 {
        self.data_offset + self.virtual_size
    }

    /// Serializes into one slot. Fails on a path or name that does not fit.
    pub fn encode(&self) -> Result<[u8; SLOT_SIZE], HeaderError> {
        let parent_path = self.parent_path.as_deref().unwrap_or("");
        if parent_path.len() > MAX_PARENT_PATH {
            return Err(HeaderError::Inconsistent(format!(
                "parent path is {} bytes, at most {MAX_PARENT_PATH} fit",
                parent_path.len()
            )));
        }
        if self.name.len() > MAX_NAME {
            return Err(HeaderError::Inconsistent(format!(
                "name is {} bytes, at most {MAX_NAME} fit",
                self.name.len()
            )));
        }
        let mut b = [0u8; SLOT_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[40..44].copy_from_slice(&self.block_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.map_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.map_len.to_le_bytes());
        b[64..72].copy_from_slice(&self.data_offset.to_le_bytes());
        b[72..88].copy_from_slice(self.uuid.as_bytes());
        if let Some(u) = self.parent_uuid {
            b[88..104].copy_from_slice(u.as_bytes());
        }
        if let Some(u) = self.parent_uuid_next {
            b[104..120].copy_from_slice(u.as_bytes());
        }
        b[120..122].copy_from_slice(&(parent_path.len() as u16).to_le_bytes());
        b[122..124].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        b[OFF_PARENT_PATH..OFF_PARENT_PATH + parent_path.len()]
            .copy_from_slice(parent_path.as_bytes());
        b[OFF_NAME..OFF_NAME + self.name.len()].copy_from_slice(self.name.as_bytes());
        let crc = crc32c::crc32c(&b[..OFF_CRC]);
        b[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Parses and validates one slot.
    pub fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        if b.len() < SLOT_SIZE {
            return Err(HeaderError::TooShort(b.len() as u64));
        }
        let b = &b[..SLOT_SIZE];
        if b.iter().all(|&x| x == 0) {
            return Err(HeaderError::Empty);
        }
        if &b[0..8] != MAGIC {
            return Err(HeaderError::WrongMagic);
        }
        let version = le_u32(b, 8);
        if version != VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let stored = le_u32(b, OFF_CRC);
        let computed = crc32c::crc32c(&b[..OFF_CRC]);
        if stored != computed {
            return Err(HeaderError::BadChecksum { stored, computed });
        }
        let flags = le_u64(b, 24);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(HeaderError::UnsupportedFlags(flags & !KNOWN_FLAGS));
        }
        let virtual_size = le_u64(b, 32);
        let block_size = le_u32(b, 40);
        validate_geometry(virtual_size, block_size)?;
        let (map_len, data_offset) = layout(virtual_size, block_size);
        let h = Header {
            generation: le_u64(b, 16),
            flags,
            virtual_size,
            block_size,
            map_offset: le_u64(b, 48),
            map_len: le_u64(b, 56),
            data_offset: le_u64(b, 64),
            uuid: Uuid::from_slice(&b[72..88])
                .map_err(|_| HeaderError::Inconsistent("uuid".into()))?,
            parent_uuid: uuid_opt(&b[88..104]),
            parent_uuid_next: uuid_opt(&b[104..120]),
            parent_path: None,
            name: String::new(),
        };
        // Version 1 fixes the layout; anything else is damage or a newer writer.
        if h.map_offset != MAP_OFFSET || h.map_len != map_len || h.data_offset != data_offset {
            return Err(HeaderError::Inconsistent(format!(
                "layout (map at {} len {}, data at {}) does not match the size (expected {MAP_OFFSET}, {map_len}, {data_offset})",
                h.map_offset, h.map_len, h.data_offset
            )));
        }
        if h.uuid.is_nil() {
            return Err(HeaderError::Inconsistent("layer uuid is nil".into()));
        }
        let path_len = u16::from_le_bytes([b[120], b[121]]) as usize;
        let name_len = u16::from_le_bytes([b[122], b[123]]) as usize;
        if path_len > MAX_PARENT_PATH || name_len > MAX_NAME {
            return Err(HeaderError::Inconsistent(format!(
                "parent path length {path_len} or name length {name_len} too long"
            )));
        }
        let parent_path = text(
            &b[OFF_PARENT_PATH..OFF_PARENT_PATH + path_len],
            "parent path",
        )?;
        let name = text(&b[OFF_NAME..OFF_NAME + name_len], "name")?;
        match (h.parent_uuid.is_some(), path_len > 0) {
            (true, false) => {
                return Err(HeaderError::Inconsistent(
                    "parent uuid without a parent path".into(),
                ))
            }
            (false, true) => {
                return Err(HeaderError::Inconsistent(
                    "parent path without a parent uuid".into(),
                ))
            }
            _ => {}
        }
        Ok(Header {
            parent_path: (path_len > 0).then_some(parent_path),
            name,
            ..h
        })
    }
}

/// Which slot holds the current header.
#[derive(Debug, Clone)]
pub struct SlotChoice {
    pub header: Header,
    pub slot: usize,
    /// The other slot's problem, if it is neither valid nor empty.
    pub other_damage: Option<HeaderError>,
}

/// Picks the valid slot with the higher generation.
pub fn choose(slot_a: &[u8], slot_b: &[u8]) -> Result<SlotChoice, HeaderError> {
    let a = Header::decode(slot_a);
    let b = Header::decode(slot_b);
    let damage = |e: &HeaderError| (*e != HeaderError::Empty).then(|| e.clone());
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation {
            SlotChoice {
                header: b,
                slot: 1,
                other_damage: None,
            }
        } else {
            SlotChoice {
                header: a,
                slot: 0,
                other_damage: None,
            }
        }),
        (Ok(a), Err(e)) => Ok(SlotChoice {
            header: a,
            slot: 0,
            other_damage: damage(&e),
        }),
        (Err(e), Ok(b)) => Ok(SlotChoice {
            header: b,
            slot: 1,
            other_damage: damage(&e),
        }),
        // Slot A's reason is the one users recognise (wrong magic: not ours).
        (Err(HeaderError::Empty), Err(e)) | (Err(e), Err(_)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        let mut h = Header::new(1 << 30, 4096).unwrap();
        h.parent_uuid = Some(Uuid::new_v4());
        h.parent_path = Some("../base.img".into());
        h.name = "snap1".into();
        h.flags = FLAG_SEALED;
        h
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode().unwrap()).unwrap(), h);
    }

    #[test]
    fn newer_generation_wins_and_torn_slot_falls_back() {
        let mut h = sample();
        let a = h.encode().unwrap();
        h.generation += 1;
        h.flags = 0;
        let mut b = h.encode().unwrap();
        assert_eq!(choose(&a, &b).unwrap().slot, 1);
        b[700] ^= 1; // torn write of slot B
        let c = choose(&a, &b).unwrap();
        assert_eq!(c.slot, 0);
        assert!(matches!(
            c.other_damage,
            Some(HeaderError::BadChecksum { .. })
        ));
    }

    #[test]
    fn rejects_wrong_magic_and_unknown_flags() {
        let zero = [0u8; SLOT_SIZE];
        let mut raw = [0xabu8; SLOT_SIZE];
        assert_eq!(choose(&raw, &zero).unwrap_err(), HeaderError::WrongMagic);
        let mut h = sample();
        h.flags |= 1 << 9;
        raw = h.encode().unwrap();
        assert_eq!(
            Header::decode(&raw).unwrap_err(),
            HeaderError::UnsupportedFlags(1 << 9)
        );
    }

    #[test]
    fn layout_of_a_terabyte() {
        let (map_len, data_offset) = layout(1 << 40, 4096);
        assert_eq!(map_len, 64 << 20);
        assert_eq!(data_offset, 65 << 20);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Header::decode(&bytes);
        }

        #[test]
        fn choose_never_panics_on_mutations(flips in proptest::collection::vec((0usize..SLOT_SIZE, any::<u8>()), 0..16)) {
            let mut a = sample().encode().unwrap();
            for (at, v) in flips { a[at] = v; }
            // Any damaged header is refused or decoded to a self-consistent one.
            if let Ok(c) = choose(&a, &[0u8; SLOT_SIZE]) {
                prop_assert!(c.header.map_offset == MAP_OFFSET);
                prop_assert!(c.header.encode().is_ok());
            }
        }
    }
}
