//! Writing a standalone qcow2 v3 image.

use super::*;

/// Creates a standalone qcow2 v3 image.
///
/// Layout: cluster 0 holds the header; data clusters follow in allocation order; `finish`
/// then appends the L2 tables, the L1 table, the refcount blocks and the refcount table.
/// Nothing is ever freed, so every cluster up to the end of the file has refcount 1.
pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    virtual_size: u64,
    cluster_bits: u32,
    /// One slot per L1 entry. An L2 table maps guest clusters to host offsets (0 = unallocated).
    l2_tables: Vec<Option<Box<[u64]>>>,
    /// Host offset of the next cluster to allocate.
    next_host: u64,
}

impl fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("cluster_size", &(1u64 << self.cluster_bits))
            .field("next_host", &self.next_host)
            .finish()
    }
}

impl Qcow2Writer {
    /// Creates (or truncates) `path` as a qcow2 v3 image without backing file.
    ///
    /// `cluster_size` must be a power of two in 512..=2 MiB (65536 is QEMU's default) and
    /// `virtual_size` a multiple of 512 (QEMU refuses other sizes).
    pub fn create(path: &Path, virtual_size: u64, cluster_size: u32) -> Result<Self, Qcow2Error> {
        let invalid = |what: String| Qcow2Error::InvalidArgument {
            path: path.to_owned(),
            what,
        };
        let cs = u64::from(cluster_size);
        if !cluster_size.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_size.trailing_zeros())
        {
            return Err(invalid(format!(
                "cluster size {cluster_size} is not a power of two between 512 and 2 MiB"
            )));
        }
        if virtual_size & 511 != 0 {
            return Err(invalid(format!(
                "virtual size {virtual_size} is not a multiple of 512"
            )));
        }
        let l1_size = virtual_size.div_ceil(cs * (cs / 8));
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(invalid(format!(
                "virtual size {virtual_size} is too large for {cluster_size}-byte clusters"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        // Reserve cluster 0 for the header, written last.
        file.set_len(cs).map_err(io_err(path))?;
        Ok(Qcow2Writer {
            path: path.to_owned(),
            file,
            virtual_size,
            cluster_bits: cluster_size.trailing_zeros(),
            l2_tables: vec![None; l1_size as usize],
            next_host: cs,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// (L1 index, L2 index) of the guest cluster containing `guest`.
    fn indices(&self, guest: u64) -> (usize, usize) {
        let l2_bits = self.cluster_bits - 3;
        let l1 = guest >> (self.cluster_bits + l2_bits);
        let l2 = (guest >> self.cluster_bits) & ((1 << l2_bits) - 1);
        (l1 as usize, l2 as usize)
    }

    fn host_cluster(&self, guest: u64) -> Option<u64> {
        let (l1, l2) = self.indices(guest);
        self.l2_tables[l1]
            .as_ref()
            .map(|t| t[l2])
            .filter(|&h| h != 0)
    }

    /// Assigns a new host cluster (at the end of the file) to the guest cluster of `guest`.
    /// The cluster reads as zeros until written: it lies past the current end of the file.
    fn allocate(&mut self, guest: u64) -> Result<u64, Qcow2Error> {
        let cs = self.cluster_size();
        let host = self.next_host;
        if host + cs > OFFSET_MASK {
            return Err(Qcow2Error::InvalidArgument {
                path: self.path.clone(),
                what: "image grows past the largest host offset qcow2 can address".into(),
            });
        }
        let entries = (cs / 8) as usize;
        let (l1, l2) = self.indices(guest);
        self.l2_tables[l1].get_or_insert_with(|| vec![0u64; entries].into_boxed_slice())[l2] = host;
        self.next_host += cs;
        Ok(host)
    }

    /// Writes guest data at any offset/length (random order, partial clusters, overwrites).
    /// A newly allocated cluster starts as zeros; all-zero data for an unallocated cluster
    /// allocates nothing.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), Qcow2Error> {
        let len = buf.len() as u64;
        if !fits(offset, len, self.virtual_size) {
            return Err(Qcow2Error::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.virtual_size,
            });
        }
        let cs = self.cluster_size();
        // Pieces going to consecutive host offsets are gathered into one write:
        // (host offset, start in buf, length).
        let mut pending: Option<(u64, usize, usize)> = None;
        let mut pos = 0;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let within = guest & (cs - 1);
            let n = (cs - within).min((buf.len() - pos) as u64) as usize;
            let chunk = &buf[pos..pos + n];
            let host = match self.host_cluster(guest) {
                Some(host) => Some(host + within),
                None if is_zero(chunk) => None,
                None => Some(self.allocate(guest)? + within),
            };
            match host {
                Some(host) => match pending.as_mut() {
                    Some((start, _, plen)) if *start + *plen as u64 == host => *plen += n,
                    _ => {
                        if let Some(p) = pending.replace((host, pos, n)) {
                            self.write_piece(buf, p)?;
                        }
                    }
                },
                None => {
                    if let Some(p) = pending.take() {
                        self.write_piece(buf, p)?;
                    }
                }
            }
            pos += n;
        }
        if let Some(p) = pending {
            self.write_piece(buf, p)?;
        }
        Ok(())
    }

    fn write_piece(
        &self,
        buf: &[u8],
        (host, start, len): (u64, usize, usize),
    ) -> Result<(), Qcow2Error> {
        self.file
            .write_all_at(&buf[start..start + len], host)
            .map_err(io_err(&self.path))
    }

    /// Writes L2 tables, L1, refcount table/blocks and header, then fsyncs.
    pub fn finish(self) -> Result<(), Qcow2Error> {
        let cs = self.cluster_size();
        let mut next = self.next_host;

        // L2 tables. Every cluster has refcount 1, hence OFLAG_COPIED on all entries.
        let mut l1 = vec![0u64; self.l2_tables.len()];
        let mut table_buf = vec![0u8; cs as usize];
        for (slot, table) in l1.iter_mut().zip(&self.l2_tables) {
            let Some(table) = table else { continue };
            for (bytes, &host) in table_buf.chunks_exact_mut(8).zip(table.iter()) {
                let entry = if host == 0 { 0 } else { host | OFLAG_COPIED };
                bytes.copy_from_slice(&entry.to_be_bytes());
            }
            self.file
                .write_all_at(&table_buf, next)
                .map_err(io_err(&self.path))?;
            *slot = next | OFLAG_COPIED;
            next += cs;
        }

        // L1 table (none at all for an empty disk, like QEMU).
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_offset = if l1.is_empty() { 0 } else { next };
        if !l1.is_empty() {
            self.file
                .write_all_at(&l1_bytes, l1_offset)
                .map_err(io_err(&self.path))?;
            next += (l1_bytes.len() as u64).div_ceil(cs) * cs;
        }

        // Refcount blocks and table go last; they must count themselves, so iterate to the
        // fixed point (it converges in a couple of rounds).
        let used = next / cs;
        let per_block = (cs * 8) >> WRITER_REFCOUNT_ORDER;
        let per_table_cluster = cs / 8;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = used + blocks + table_clusters;
            let b = total.div_ceil(per_block);
            let t = b.div_ceil(per_table_cluster);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        let total = used + blocks + table_clusters;
        let blocks_offset = next;
        let table_offset = blocks_offset + blocks * cs;
        let Ok(table_clusters_u32) = u32::try_from(table_clusters) else {
            return Err(Qcow2Error::InvalidArgument {
                path: self.path.clone(),
                what: "refcount table too large".into(),
            });
        };

        let mut reftable = vec![0u8; (table_clusters * cs) as usize];
        let mut block_buf = vec![0u8; cs as usize];
        for b in 0..blocks {
            let first = b * per_block;
            let in_use = total.saturating_sub(first).min(per_block) as usize;
            block_buf.fill(0);
            for entry in block_buf.chunks_exact_mut(2).take(in_use) {
                entry.copy_from_slice(&1u16.to_be_bytes());
            }
            let offset = blocks_offset + b * cs;
            self.file
                .write_all_at(&block_buf, offset)
                .map_err(io_err(&self.path))?;
            reftable[b as usize * 8..][..8].copy_from_slice(&offset.to_be_bytes());
        }
        self.file
            .write_all_at(&reftable, table_offset)
            .map_err(io_err(&self.path))?;
        self.file.set_len(total * cs).map_err(io_err(&self.path))?;
        // Metadata must be durable before the header makes the image valid.
        self.file.sync_all().map_err(io_err(&self.path))?;

        // Header followed by the end-of-extensions marker (8 zero bytes).
        let mut header = vec![0u8; V3_HEADER_LENGTH as usize + 8];
        let mut put =
            |off: usize, bytes: &[u8]| header[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &QCOW2_MAGIC);
        put(4, &3u32.to_be_bytes()); // version
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(36, &(l1.len() as u32).to_be_bytes()); // create() capped it at 4 Mi entries
        put(40, &l1_offset.to_be_bytes());
        put(48, &table_offset.to_be_bytes());
        put(56, &table_clusters_u32.to_be_bytes());
        put(96, &WRITER_REFCOUNT_ORDER.to_be_bytes());
        put(100, &(V3_HEADER_LENGTH as u32).to_be_bytes());
        // Backing file, encryption, snapshots and feature bits all stay zero.
        self.file
            .write_all_at(&header, 0)
            .map_err(io_err(&self.path))?;
        self.file.sync_all().map_err(io_err(&self.path))
    }
}
