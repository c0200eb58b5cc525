//! Reading a qcow2 image and its backing chain (qcow2 or raw files).

use super::*;

/// Where a backing file reference in a qcow2 header points.
struct BackingRef {
    path: PathBuf,
    format: Option<String>,
}

/// How one guest cluster (or a run of them) of a single qcow2 layer is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Stored in this file at the given host offset.
    Data(u64),
    /// Reads as zeros (zero flag).
    Zero,
    /// Not allocated in this layer: defer to the backing file.
    Unallocated,
}

/// One qcow2 file of a chain.
struct Qcow2Image {
    path: PathBuf,
    file: File,
    file_size: u64,
    cluster_bits: u32,
    virtual_size: u64,
    l1: Vec<u64>,
    /// L2 tables by host offset. Cleared wholesale when full: conversions read sequentially,
    /// so anything smarter buys little.
    l2_cache: HashMap<u64, Box<[u64]>>,
    l2_cache_max: usize,
}

impl Qcow2Image {
    fn corrupt(&self, what: String) -> Qcow2Error {
        Qcow2Error::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Opens and validates one qcow2 file; returns it and its backing file reference.
    fn open(path: &Path) -> Result<(Self, Option<BackingRef>), Qcow2Error> {
        let corrupt = |what: String| Qcow2Error::Corrupt {
            path: path.to_owned(),
            what,
        };
        let unsupported = |what: String| Qcow2Error::Unsupported {
            path: path.to_owned(),
            what,
        };

        let file = File::open(path).map_err(io_err(path))?;
        let file_size = file.metadata().map_err(io_err(path))?.len();

        let mut magic = [0u8; 4];
        if file_size < 4 {
            return Err(Qcow2Error::NotQcow2 {
                path: path.to_owned(),
            });
        }
        file.read_exact_at(&mut magic, 0).map_err(io_err(path))?;
        if magic != QCOW2_MAGIC {
            return Err(Qcow2Error::NotQcow2 {
                path: path.to_owned(),
            });
        }
        if file_size < V2_HEADER_LENGTH {
            return Err(corrupt(format!(
                "file is truncated inside the header ({file_size} bytes)"
            )));
        }

        let mut hdr = [0u8; V3_HEADER_LENGTH as usize];
        let hdr_len = file_size.min(V3_HEADER_LENGTH) as usize;
        file.read_exact_at(&mut hdr[..hdr_len], 0)
            .map_err(io_err(path))?;

        let version = be_u32(&hdr, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("version {version}")));
        }
        if version == 3 && file_size < V3_HEADER_LENGTH {
            return Err(corrupt(format!(
                "file is truncated inside the header ({file_size} bytes)"
            )));
        }
        let backing_file_offset = be_u64(&hdr, 8);
        let backing_file_size = u64::from(be_u32(&hdr, 16));
        let cluster_bits = be_u32(&hdr, 20);
        let virtual_size = be_u64(&hdr, 24);
        let crypt_method = be_u32(&hdr, 32);
        let l1_size = u64::from(be_u32(&hdr, 36));
        let l1_table_offset = be_u64(&hdr, 40);
        let (incompatible, header_length) = if version == 3 {
            (be_u64(&hdr, 72), u64::from(be_u32(&hdr, 100)))
        } else {
            (0, V2_HEADER_LENGTH)
        };

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "invalid cluster_bits {cluster_bits} (must be {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if header_length
            < if version == 3 {
                V3_HEADER_LENGTH
            } else {
                V2_HEADER_LENGTH
            }
        {
            return Err(corrupt(format!(
                "header_length {header_length} is too small"
            )));
        }
        if header_length > cluster_size {
            return Err(corrupt(format!(
                "header_length {header_length} exceeds the cluster size"
            )));
        }

        // Incompatible features. The dirty bit only means refcounts may be stale (lazy
        // refcounts); the reader never uses refcounts, so such an image reads fine.
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                "the image is marked corrupt (incompatible feature bit 1); \
                 repair it with `qemu-img check -r all`"
                    .into(),
            ));
        }
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "external data file (incompatible feature bit 2)".into(),
            ));
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(unsupported(
                "extended L2 entries / subclusters (incompatible feature bit 4)".into(),
            ));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        // Bit 3 (compression type) is accepted: compressed clusters are refused when met.
        if crypt_method != 0 {
            return Err(unsupported(format!(
                "encryption (crypt_method {crypt_method})"
            )));
        }

        // Header extensions and the backing file name live in the first cluster.
        let first_len = file_size.min(cluster_size) as usize;
        let mut first = vec![0u8; first_len];
        file.read_exact_at(&mut first, 0).map_err(io_err(path))?;

        // Like QEMU: extensions end where the backing file name starts, if there is one.
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cluster_size
        };
        let backing_format = parse_extensions(&first, header_length, ext_end.min(first_len as u64))
            .map_err(|d| corrupt(d.to_string()))?;

        let backing = if backing_file_offset != 0 && backing_file_size != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name is {backing_file_size} bytes long (at most {MAX_BACKING_NAME})"
                )));
            }
            let name_end = backing_file_offset
                .checked_add(backing_file_size)
                .filter(|&end| end <= first_len as u64)
                .ok_or_else(|| {
                    corrupt(format!(
                        "backing file name at offset {backing_file_offset:#x} lies outside the first cluster"
                    ))
                })?;
            let name = &first[backing_file_offset as usize..name_end as usize];
            if name.starts_with(b"json:") {
                return Err(unsupported(
                    "backing file given as a json: specification".into(),
                ));
            }
            let name = Path::new(OsStr::from_bytes(name));
            // A relative backing file name is relative to the directory of this image.
            let resolved = match path.parent() {
                Some(dir) if name.is_relative() => dir.join(name),
                _ => name.to_owned(),
            };
            Some(BackingRef {
                path: resolved,
                format: backing_format,
            })
        } else {
            None
        };

        // The L1 table must cover the whole virtual disk and lie inside the file.
        let l2_entries = cluster_size / 8;
        let l2_coverage = cluster_size * l2_entries; // at most 2^39
        let l1_needed = virtual_size.div_ceil(l2_coverage);
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table has {l1_size} entries, more than the {} allowed",
                MAX_L1_BYTES / 8
            )));
        }
        if l1_size < l1_needed {
            return Err(corrupt(format!(
                "L1 table has {l1_size} entries but the {virtual_size}-byte virtual size needs {l1_needed}"
            )));
        }
        let mut l1 = Vec::new();
        if l1_size > 0 {
            if l1_table_offset & (cluster_size - 1) != 0 {
                return Err(corrupt(format!(
                    "L1 table offset {l1_table_offset:#x} is not cluster aligned"
                )));
            }
            if !fits(l1_table_offset, l1_bytes, file_size) {
                return Err(corrupt(format!(
                    "L1 table at offset {l1_table_offset:#x} ({l1_bytes} bytes) extends past the end \
                     of the file ({file_size} bytes)"
                )));
            }
            let mut raw = vec![0u8; l1_bytes as usize];
            file.read_exact_at(&mut raw, l1_table_offset)
                .map_err(io_err(path))?;
            l1 = raw
                .chunks_exact(8)
                .map(|c| be_u64(c, 0))
                .collect::<Vec<u64>>();
            check_l2_offsets(&l1, cluster_size, file_size).map_err(|d| corrupt(d.to_string()))?;
        }

        let image = Qcow2Image {
            path: path.to_owned(),
            file,
            file_size,
            cluster_bits,
            virtual_size,
            l1,
            l2_cache: HashMap::new(),
            l2_cache_max: (L2_CACHE_BYTES / cluster_size).max(4) as usize,
        };
        Ok((image, backing))
    }

    /// Returns entry `l2_index` of the L2 table at host offset `l2_offset`, reading the table
    /// into the cache if needed.
    fn l2_entry(
        &mut self,
        l2_offset: u64,
        l1_index: usize,
        l2_index: usize,
    ) -> Result<u64, Qcow2Error> {
        if let Some(table) = self.l2_cache.get(&l2_offset) {
            return Ok(table[l2_index]);
        }
        let cs = self.cluster_size();
        if l2_offset & (cs - 1) != 0 {
            return Err(self.corrupt(format!(
                "L2 table offset {l2_offset:#x} (L1 index {l1_index}) is not cluster aligned"
            )));
        }
        if !fits(l2_offset, cs, self.file_size) {
            return Err(self.corrupt(format!(
                "L2 table at offset {l2_offset:#x} (L1 index {l1_index}) extends past the end \
                 of the file ({} bytes)",
                self.file_size
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file
            .read_exact_at(&mut raw, l2_offset)
            .map_err(io_err(&self.path))?;
        let table: Box<[u64]> = raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
        let entry = table[l2_index];
        if self.l2_cache.len() >= self.l2_cache_max {
            self.l2_cache.clear();
        }
        self.l2_cache.insert(l2_offset, table);
        Ok(entry)
    }

    /// Maps the guest cluster containing `guest`. Also returns how many bytes from the start
    /// of that cluster are known to share the mapping kind (more than one cluster when a whole
    /// L2 table is missing), so sparse regions are skipped quickly.
    fn map_cluster(&mut self, guest: u64) -> Result<(Mapping, u64), Qcow2Error> {
        let cs = self.cluster_size();
        let l2_bits = self.cluster_bits - 3;
        let l2_entries = 1u64 << l2_bits;
        let l1_index = (guest >> (self.cluster_bits + l2_bits)) as usize;
        let l2_index = ((guest >> self.cluster_bits) & (l2_entries - 1)) as usize;

        // Guest offsets are below the virtual size and `open` checked that L1 covers it.
        let Some(&l1_entry) = self.l1.get(l1_index) else {
            return Err(self.corrupt(format!(
                "guest offset {guest:#x} is not covered by the L1 table"
            )));
        };
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok((Mapping::Unallocated, (l2_entries - l2_index as u64) * cs));
        }
        let entry = self.l2_entry(l2_offset, l1_index, l2_index)?;

        let cluster_start = guest & !(cs - 1);
        if entry & OFLAG_COMPRESSED != 0 {
            return Err(Qcow2Error::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "compressed cluster at guest offset {cluster_start} ({cluster_start:#x}); \
                     compressed images cannot be read, decompress with `qemu-img convert -O qcow2`"
                ),
            });
        }
        // The zero flag wins even when a host cluster is preallocated behind it.
        if entry & OFLAG_ZERO != 0 {
            return Ok((Mapping::Zero, cs));
        }
        let host = entry & OFFSET_MASK;
        if host == 0 {
            return Ok((Mapping::Unallocated, cs));
        }
        if host & (cs - 1) != 0 {
            return Err(self.corrupt(format!(
                "data cluster offset {host:#x} for guest offset {cluster_start:#x} is not cluster aligned"
            )));
        }
        // A partly present last cluster is fine (its tail reads as zeros); one starting at or
        // past the end of the file is not.
        if host >= self.file_size {
            return Err(self.corrupt(format!(
                "data cluster at offset {host:#x} for guest offset {cluster_start:#x} lies past \
                 the end of the file ({} bytes)",
                self.file_size
            )));
        }
        Ok((Mapping::Data(host), cs))
    }

    /// Maps the longest run starting at `guest` (at most `max_len` bytes) with a uniform
    /// mapping: physically contiguous data, zeros, or unallocated. For data the returned host
    /// offset corresponds to `guest` itself.
    fn map_run(&mut self, guest: u64, max_len: u64) -> Result<(Mapping, u64), Qcow2Error> {
        let cs = self.cluster_size();
        let within = guest & (cs - 1);
        let (first, span) = self.map_cluster(guest)?;
        let first = match first {
            Mapping::Data(host) => Mapping::Data(host + within),
            other => other,
        };
        let mut len = (span - within).min(max_len);
        while len < max_len {
            let (next, span) = self.map_cluster(guest + len)?;
            let contiguous = match (first, next) {
                (Mapping::Data(h0), Mapping::Data(h)) => h == h0 + len,
                (a, b) => a == b,
            };
            if !contiguous {
                break;
            }
            len += span.min(max_len - len);
        }
        Ok((first, len))
    }
}

/// What a structure check found wrong (reported as the image's corruption).
#[derive(Debug, thiserror::Error)]
enum Damage {
    #[error("L2 table offset {offset:#x} (L1 index {index}) is not cluster aligned")]
    UnalignedL2 { offset: u64, index: usize },
    #[error(
        "L2 table at offset {offset:#x} (L1 index {index}) extends past the end of the file \
         ({file_size} bytes)"
    )]
    L2PastEnd {
        offset: u64,
        index: usize,
        file_size: u64,
    },
    #[error("L2 table at offset {0:#x} is used by several L1 entries")]
    SharedL2(u64),
    #[error(
        "header extension {kind:#x} at offset {offset:#x} ({len} bytes) overflows the header area"
    )]
    ExtensionOverflow { kind: u32, offset: u64, len: u64 },
}

/// Checks the L2 table offsets of an L1 table: cluster aligned, inside the file, and no table
/// used twice. The last rule bounds the work a hostile image can cause to its size: without
/// it, millions of L1 entries could point at one crafted L2 table.
fn check_l2_offsets(l1: &[u64], cluster_size: u64, file_size: u64) -> Result<(), Damage> {
    let mut offsets = Vec::new();
    for (index, entry) in l1.iter().enumerate() {
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            continue;
        }
        if offset & (cluster_size - 1) != 0 {
            return Err(Damage::UnalignedL2 { offset, index });
        }
        if !fits(offset, cluster_size, file_size) {
            return Err(Damage::L2PastEnd {
                offset,
                index,
                file_size,
            });
        }
        offsets.push(offset);
    }
    offsets.sort_unstable();
    if let Some(pair) = offsets.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(Damage::SharedL2(pair[0]));
    }
    Ok(())
}

/// Parses header extensions in `first[start..end]`; returns the backing format, if any.
/// Unknown extensions are skipped.
fn parse_extensions(first: &[u8], start: u64, end: u64) -> Result<Option<String>, Damage> {
    let mut format = None;
    let mut off = start;
    while off + 8 <= end {
        let at = off as usize;
        let kind = be_u32(first, at);
        let len = u64::from(be_u32(first, at + 4));
        if kind == EXT_END {
            break;
        }
        let data_start = off + 8;
        let data_end = data_start + len;
        if data_end > end {
            return Err(Damage::ExtensionOverflow {
                kind,
                offset: off,
                len,
            });
        }
        if kind == EXT_BACKING_FORMAT {
            let data = &first[data_start as usize..data_end as usize];
            let name = data.split(|&b| b == 0).next().unwrap_or_default();
            format = Some(String::from_utf8_lossy(name).into_owned());
        }
        // Extension data is padded to a multiple of 8 bytes.
        off = data_start + len.next_multiple_of(8);
    }
    Ok(format)
}

/// A raw backing file: its bytes are the guest bytes.
struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
}

enum Layer {
    Qcow2(Qcow2Image),
    Raw(RawImage),
}

impl Layer {
    fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(img) => img.virtual_size,
            Layer::Raw(raw) => raw.size,
        }
    }

    fn path(&self) -> &Path {
        match self {
            Layer::Qcow2(img) => &img.path,
            Layer::Raw(raw) => &raw.path,
        }
    }
}

/// Reads `buf.len()` guest bytes at `offset` from `layers[0]`, falling through to
/// `layers[1..]` for unallocated clusters. The caller keeps the range inside `layers[0]`.
fn read_layers(layers: &mut [Layer], buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
    let Some((layer, backing)) = layers.split_first_mut() else {
        buf.fill(0);
        return Ok(());
    };
    match layer {
        Layer::Raw(raw) => read_full_at(&raw.file, buf, offset).map_err(io_err(&raw.path)),
        Layer::Qcow2(img) => {
            let mut pos = 0;
            while pos < buf.len() {
                let guest = offset + pos as u64;
                let (mapping, len) = img.map_run(guest, (buf.len() - pos) as u64)?;
                let chunk = &mut buf[pos..pos + len as usize];
                match mapping {
                    Mapping::Data(host) => {
                        read_full_at(&img.file, chunk, host).map_err(io_err(&img.path))?
                    }
                    Mapping::Zero => chunk.fill(0),
                    Mapping::Unallocated => read_backing(backing, chunk, guest)?,
                }
                pos += len as usize;
            }
            Ok(())
        }
    }
}

/// Reads from a backing chain (possibly empty); bytes past its virtual size read as zeros.
fn read_backing(backing: &mut [Layer], buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
    let avail = match backing.first() {
        Some(layer) => layer
            .virtual_size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize,
        None => 0,
    };
    let (inside, past_end) = buf.split_at_mut(avail);
    if !inside.is_empty() {
        read_layers(backing, inside, offset)?;
    }
    past_end.fill(0);
    Ok(())
}

/// Appends a run to `out`, merging it with the previous one when adjacent and of the same kind.
fn push_extent(out: &mut Vec<(u64, u64, Qcow2Extent)>, start: u64, len: u64, kind: Qcow2Extent) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.2 == kind && last.0 + last.1 == start {
            last.1 += len;
            return;
        }
    }
    out.push((start, len, kind));
}

/// Appends the extents of `[offset, offset + len)` of `layers[0]` (with its backing chain).
fn layer_extents(
    layers: &mut [Layer],
    offset: u64,
    len: u64,
    out: &mut Vec<(u64, u64, Qcow2Extent)>,
) -> Result<(), Qcow2Error> {
    let Some((layer, backing)) = layers.split_first_mut() else {
        push_extent(out, offset, len, Qcow2Extent::Zero);
        return Ok(());
    };
    let img = match layer {
        // Raw files are reported as data throughout: holes are not worth probing for here.
        Layer::Raw(_) => {
            push_extent(out, offset, len, Qcow2Extent::Data);
            return Ok(());
        }
        Layer::Qcow2(img) => img,
    };
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let (mapping, run) = img.map_run(pos, end - pos)?;
        match mapping {
            Mapping::Data(_) => push_extent(out, pos, run, Qcow2Extent::Data),
            Mapping::Zero => push_extent(out, pos, run, Qcow2Extent::Zero),
            Mapping::Unallocated => {
                let avail = match backing.first() {
                    Some(b) => b.virtual_size().saturating_sub(pos).min(run),
                    None => 0,
                };
                if avail > 0 {
                    layer_extents(backing, pos, avail, out)?;
                }
                push_extent(out, pos + avail, run - avail, Qcow2Extent::Zero);
            }
        }
        pos += run;
    }
    Ok(())
}

/// Read-only access to a qcow2 image and its backing chain.
pub struct Qcow2Reader {
    /// `layers[0]` is the opened image; `layers[i + 1]` is the backing file of `layers[i]`.
    layers: Vec<Layer>,
    virtual_size: u64,
    cluster_size: u64,
}

impl fmt::Debug for Qcow2Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Reader")
            .field(
                "chain",
                &self.layers.iter().map(Layer::path).collect::<Vec<_>>(),
            )
            .field("virtual_size", &self.virtual_size)
            .field("cluster_size", &self.cluster_size)
            .finish()
    }
}

impl Qcow2Reader {
    /// Opens a qcow2 file read-only, following its backing file (relative to the file's directory;
    /// a backing file that is qcow2 or raw; backing_fmt honoured if present, else probe by magic).
    /// Detects backing cycles and limits the chain to 64 backing files.
    pub fn open(path: &Path) -> Result<Self, Qcow2Error> {
        let (top, mut next) = Qcow2Image::open(path)?;
        let virtual_size = top.virtual_size;
        let cluster_size = top.cluster_size();
        let mut seen = HashSet::new();
        seen.insert(fs::canonicalize(path).map_err(io_err(path))?);
        let mut layers = vec![Layer::Qcow2(top)];

        while let Some(backing) = next.take() {
            let referrer = layers.last().map_or(path, Layer::path).to_owned();
            if layers.len() > MAX_BACKING_DEPTH {
                return Err(Qcow2Error::Unsupported {
                    path: path.to_owned(),
                    what: format!("backing chain longer than {MAX_BACKING_DEPTH} files"),
                });
            }
            let canonical = fs::canonicalize(&backing.path).map_err(io_err(&backing.path))?;
            if !seen.insert(canonical) {
                return Err(Qcow2Error::Corrupt {
                    path: referrer,
                    what: format!("backing chain loops back to {}", backing.path.display()),
                });
            }
            let is_qcow2 = match backing.format.as_deref() {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(other) => {
                    return Err(Qcow2Error::Unsupported {
                        path: referrer,
                        what: format!(
                            "backing file format {other:?} (only qcow2 and raw are supported)"
                        ),
                    })
                }
                None => probe_qcow2(&backing.path)?,
            };
            if is_qcow2 {
                let (image, further) = Qcow2Image::open(&backing.path)?;
                layers.push(Layer::Qcow2(image));
                next = further;
            } else {
                let file = File::open(&backing.path).map_err(io_err(&backing.path))?;
                let size = file.metadata().map_err(io_err(&backing.path))?.len();
                layers.push(Layer::Raw(RawImage {
                    path: backing.path,
                    file,
                    size,
                }));
            }
        }
        Ok(Qcow2Reader {
            layers,
            virtual_size,
            cluster_size,
        })
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Cluster size of the opened (top) image.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Qcow2Error> {
        if !fits(offset, len, self.virtual_size) {
            return Err(Qcow2Error::OutOfRange {
                path: self.layers[0].path().to_owned(),
                offset,
                len,
                size: self.virtual_size,
            });
        }
        Ok(())
    }

    /// Fills `buf` with guest bytes at `offset` (any alignment). Past the end: error.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
        self.check_range(offset, buf.len() as u64)?;
        read_layers(&mut self.layers, buf, offset)
    }

    /// Describes [offset, offset+len) as consecutive runs (start, len, kind), merged where
    /// adjacent runs have the same kind. Data = some layer of the chain has a data cluster
    /// there (a raw backing file counts as data throughout); Zero otherwise.
    pub fn extents(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, Qcow2Extent)>, Qcow2Error> {
        self.check_range(offset, len)?;
        let mut out = Vec::new();
        layer_extents(&mut self.layers, offset, len, &mut out)?;
        Ok(out)
    }
}

/// Probes a backing file without a recorded format: qcow2 if it has the magic, raw otherwise.
fn probe_qcow2(path: &Path) -> Result<bool, Qcow2Error> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut magic = [0u8; 4];
    read_full_at(&file, &mut magic, 0).map_err(io_err(path))?;
    Ok(magic == QCOW2_MAGIC)
}
