//! An open chain: the layers, the merged index, and the synchronous
//! read/write/discard/flush path (used by the tool, the crash harness and
//! the tests; the backend's io_uring path uses [`Disk::resolve`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{io_at, Error, Result};
use crate::header::FLAG_DIRTY;
use crate::index::{Index, Owner, ZERO_OWNER};
use crate::layer::Layer;
use crate::lock::{ImageLock, LockKind};
use crate::map::{AllocationMap, BlockState};
use crate::shadow::MapShadow;
use crate::storage::{Env, RealEnv};

/// Deepest chain accepted (owners are one byte).
pub const MAX_DEPTH: usize = 250;

/// Where a piece of a guest range lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reads as zeros.
    Zero,
    /// Layer `layer` (0 = base) at `file_offset` of its file.
    Layer { layer: usize, file_offset: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// Why a crash shadow is not this layer's latest map.
#[derive(Debug, thiserror::Error)]
enum ShadowRefused {
    #[error("its map has another length")]
    Length,
    #[error("block {0} would go back to absent or invalid")]
    BackToAbsent(u64),
    #[error("block {0} lies past the end")]
    PastEnd(u64),
}

#[derive(Debug)]
pub struct Disk {
    env: Arc<dyn Env>,
    /// Base first, top last.
    layers: Vec<Layer>,
    /// The top layer's own map (its states, not the chain's).
    top_map: AllocationMap,
    index: Index,
    /// Per layer, where guest offset 0 sits in its file.
    data_offsets: Vec<u64>,
    /// `Some` while a caller collects index changes for its copies.
    index_changes: Option<Vec<IndexChange>>,
    /// A copy of the top map that survives this process (not a reboot).
    shadow: Option<MapShadow>,
    writable: bool,
    /// The top is marked dirty on disk: from the first write on (or it
    /// was found so). A chain opened for writing that is only read (a
    /// fleet's VM that reads its golden image) costs no header update and
    /// no sync at open or close.
    writes_begun: bool,
    block_size: u64,
    virtual_size: u64,
    /// Held for the Disk's life (dropped after everything else).
    locks: Vec<ImageLock>,
}

/// Opens the chain below `path`, top first, checking every link.
pub fn open_chain(env: &dyn Env, path: &Path, writable_top: bool) -> Result<Vec<Layer>> {
    let top = Layer::open(env, path, writable_top)?;
    if writable_top && top.header.sealed() {
        return Err(Error::Sealed {
            path: path.to_path_buf(),
        });
    }
    let mut seen = HashSet::new();
    seen.insert(env.identity(path).map_err(io_at(path))?);
    let mut chain = vec![top];
    loop {
        let child = chain.last().expect("chain starts with the top");
        let Some(parent_path) = child.parent_path() else {
            break;
        };
        if chain.len() >= MAX_DEPTH {
            return Err(Error::ChainTooDeep {
                path: path.to_path_buf(),
                max: MAX_DEPTH,
                skip_to: chain
                    .get(1)
                    .and_then(|p| p.parent_path())
                    .unwrap_or_else(|| parent_path.clone()),
            });
        }
        let id = env
            .identity(&parent_path)
            .map_err(|source| Error::MissingParent {
                path: child.path.clone(),
                parent: parent_path.clone(),
                source,
            })?;
        if !seen.insert(id) {
            return Err(Error::Cycle {
                path: child.path.clone(),
                parent: parent_path,
            });
        }
        let parent = match Layer::open(env, &parent_path, false) {
            Err(Error::Io { source, .. }) => {
                return Err(Error::MissingParent {
                    path: child.path.clone(),
                    parent: parent_path,
                    source,
                })
            }
            other => other?,
        };
        check_link(child, &parent, writable_top)?;
        chain.push(parent);
    }
    if writable_top {
        // Whoever writes a layer makes sure its parent knows of it (a
        // layer made before notes existed, or moved since).
        if let Some(parent) = chain.get(1) {
            crate::dependants::ensure_recorded(env, &parent.path, path, chain[0].header.uuid);
        }
        // A clean parent that is not sealed yet (a snapshot interrupted
        // before its last step) is sealed now, as clone and create -b do;
        // only once every link checked out, so a refused chain is untouched.
        for layer in chain.iter_mut().skip(1) {
            if !layer.header.sealed() {
                let path = layer.path.clone();
                *layer = crate::layer::ensure_sealed(env, &path)?;
            }
        }
    }
    Ok(chain)
}

/// Can `parent` serve under `child`?
fn check_link(child: &Layer, parent: &Layer, writable_top: bool) -> Result<()> {
    let (c, p) = (&child.header, &parent.header);
    let expected = c.parent_uuid.unwrap_or_default();
    if p.uuid != expected && Some(p.uuid) != c.parent_uuid_next {
        return Err(Error::ParentUuidMismatch {
            path: child.path.clone(),
            parent: parent.path.clone(),
            expected,
            found: p.uuid,
        });
    }
    if p.block_size != c.block_size {
        return Err(Error::BlockSizeMismatch {
            path: child.path.clone(),
            parent: parent.path.clone(),
            block: c.block_size,
            parent_block: p.block_size,
        });
    }
    if p.virtual_size > c.virtual_size {
        return Err(Error::SizeMismatch {
            path: child.path.clone(),
            parent: parent.path.clone(),
            size: c.virtual_size,
            parent_size: p.virtual_size,
        });
    }
    if writable_top && !p.sealed() && p.dirty() {
        return Err(Error::ParentNotSealed {
            path: child.path.clone(),
            parent: parent.path.clone(),
        });
    }
    Ok(())
}

/// Loads a layer's map, refusing invalid entries.
pub fn load_valid_map(layer: &Layer) -> Result<AllocationMap> {
    let map = layer.load_map()?;
    map.validate().map_err(|source| Error::CorruptMap {
        path: layer.path.clone(),
        source,
    })?;
    Ok(map)
}

impl Disk {
    /// Opens the image at `path` on the real filesystem.
    pub fn open_path(path: &Path, writable: bool) -> Result<Disk> {
        Disk::open(Arc::new(RealEnv), path, writable)
    }

    /// Opens the chain at `path` and locks it for as long as the Disk
    /// lives: the top exclusive when `writable` (shared otherwise), every
    /// layer below shared. A user the locks conflict with is named in the
    /// refusal.
    pub fn open(env: Arc<dyn Env>, path: &Path, writable: bool) -> Result<Disk> {
        let (kind, wanted) = if writable {
            (LockKind::Exclusive, "write")
        } else {
            (LockKind::Shared, "read")
        };
        let mut locks = vec![env.lock(path, kind, wanted)?];
        let mut disk = Disk::open_chain_unlocked(env, path, writable)?;
        // The top's is taken before the chain is read; the layers below it
        // are named by the chain.
        for layer in disk.layers.iter().rev().skip(1) {
            locks.push(disk.env.lock(&layer.path, LockKind::Shared, "read")?);
        }
        disk.locks = locks;
        Ok(disk)
    }

    /// Opens the chain read-only without locking it: for inspecting an
    /// image that may be in use (`img info`, `map`, `check`, `convert -U`).
    /// What it reads may be changing under it.
    pub fn open_unlocked(env: Arc<dyn Env>, path: &Path) -> Result<Disk> {
        Disk::open_chain_unlocked(env, path, false)
    }

    fn open_chain_unlocked(env: Arc<dyn Env>, path: &Path, writable: bool) -> Result<Disk> {
        let mut layers = open_chain(env.as_ref(), path, writable)?;
        layers.reverse();
        let top = layers.last().expect("a chain has a top");
        let block_size = top.header.block_size as u64;
        let virtual_size = top.header.virtual_size;
        let mut index = Index::new(top.header.blocks());
        let mut top_map = None;
        let depth = layers.len();
        for (k, layer) in layers.iter().enumerate() {
            let map = load_valid_map(layer)?;
            for (start, count, state) in map.runs(0, map.blocks()) {
                let owner = match state {
                    BlockState::Data => (k + 1) as Owner,
                    _ => ZERO_OWNER,
                };
                index.set_range(start, count, owner);
            }
            if k + 1 == depth {
                top_map = Some(map);
            }
        }
        index.shrink();
        let data_offsets = layers.iter().map(|l| l.header.data_offset).collect();
        let mut disk = Disk {
            env,
            layers,
            top_map: top_map.expect("a chain has a top"),
            index,
            data_offsets,
            index_changes: None,
            shadow: None,
            locks: Vec::new(),
            writable,
            writes_begun: false,
            block_size,
            virtual_size,
        };
        disk.writes_begun = disk.top().header.dirty();
        Ok(disk)
    }

    /// What a kill -9 leaves behind, for tests that play it in one
    /// process: nothing flushed, nothing cleaned up (the crash shadow
    /// stays), only the locks released, as the kernel does for a dead
    /// process.
    pub fn simulate_kill(mut self) {
        let locks = std::mem::take(&mut self.locks);
        std::mem::forget(self);
        drop(locks);
    }

    pub fn env(&self) -> &Arc<dyn Env> {
        &self.env
    }
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
    pub fn top(&self) -> &Layer {
        self.layers.last().expect("a chain has a top")
    }
    pub fn top_mut(&mut self) -> &mut Layer {
        self.layers.last_mut().expect("a chain has a top")
    }
    pub fn top_map(&self) -> &AllocationMap {
        &self.top_map
    }
    pub fn index(&self) -> &Index {
        &self.index
    }
    pub fn path(&self) -> &Path {
        &self.top().path
    }
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => Ok(()),
            _ => Err(Error::OutOfRange {
                path: self.path().to_path_buf(),
                offset,
                len,
                size: self.virtual_size,
            }),
        }
    }

    /// Where the bytes of `[offset, offset + len)` live, as extents; no
    /// allocation. The range must be inside the disk.
    pub fn resolve(&self, offset: u64, len: u64) -> Extents<'_> {
        Extents::new(
            &self.index,
            &self.data_offsets,
            self.block_size,
            self.virtual_size,
            offset,
            len,
        )
    }

    /// Reads guest data. Page-aligned buffers (see `storage::AlignedBuf`)
    /// copy out of the page cache about twice as fast.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for e in self.resolve(offset, buf.len() as u64) {
            let part = &mut buf[(e.offset - offset) as usize..(e.offset - offset + e.len) as usize];
            match e.source {
                Source::Zero => part.fill(0),
                Source::Layer { layer, file_offset } => {
                    let l = &self.layers[layer];
                    l.storage
                        .read_at(part, file_offset)
                        .map_err(io_at(&l.path))?;
                }
            }
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                path: self.path().to_path_buf(),
            })
        }
    }

    fn top_owner(&self) -> Owner {
        self.layers.len() as Owner
    }

    /// Sets blocks of the top to `state` in its map, the merged index, the
    /// change log and the crash shadow.
    fn set_top_state(&mut self, first: u64, count: u64, state: BlockState) {
        self.top_map.set_range(first, count, state);
        let owner = match state {
            BlockState::Data => self.top_owner(),
            BlockState::Zero => ZERO_OWNER,
            // Only `check -r` and `commit` make blocks absent again, and
            // they rebuild the index from the maps.
            BlockState::Absent => unreachable!("the write path never makes blocks absent"),
        };
        self.index.set_range(first, count, owner);
        if let Some(log) = &mut self.index_changes {
            log.push(IndexChange {
                first_block: first,
                blocks: count,
                owner,
            });
        }
        if let Some(shadow) = &mut self.shadow {
            shadow.mirror(self.top_map.raw(), first, count);
        }
    }

    /// A copy of the index for a thread that resolves reads on its own;
    /// call [`Disk::track_index_changes`] first so that no change is missed.
    pub fn view(&self) -> ChainView {
        ChainView {
            index: self.index.clone(),
            data_offsets: self.data_offsets.clone(),
            block_size: self.block_size,
            virtual_size: self.virtual_size,
            top_owner: self.top_owner(),
            writable: self.writable,
        }
    }

    /// From now on, record every index change for [`Disk::take_index_changes`].
    pub fn track_index_changes(&mut self) {
        self.index_changes.get_or_insert_with(Vec::new);
    }

    /// The index changes since the last call (empty when not tracking).
    pub fn take_index_changes(&mut self) -> Vec<IndexChange> {
        self.index_changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Keeps a copy of the top map in `dir` (a tmpfs such as /dev/shm) that
    /// outlives this process but not the machine, and first adopts the copy
    /// a crashed process left there. Writes that process completed are in
    /// the kernel (page cache or device), so its map is the truth after a
    /// process crash; after a reboot the copy is gone and the on-disk map
    /// stands, as the crash contract says. Returns the blocks adopted.
    pub fn attach_crash_shadow(&mut self, dir: &Path) -> Result<u64> {
        if !self.writable {
            return Ok(0);
        }
        let uuid = self.top().header.uuid;
        if MapShadow::prune_due(dir) {
            let pruned = MapShadow::prune(dir, |image| {
                Layer::open(&RealEnv, image, false)
                    .ok()
                    .map(|l| l.header.uuid)
            });
            if pruned > 0 {
                tracing::info!("removed {pruned} crash shadows of images that are gone");
            }
        }
        let path = MapShadow::path_for(dir, &uuid);
        let mut adopted = 0;
        if let Some(bytes) =
            MapShadow::load(&path, &uuid, self.top_map.raw().len()).map_err(io_at(&path))?
        {
            match self.adopt_map(&bytes) {
                Ok(n) => {
                    adopted = n;
                    tracing::info!(
                        "{}: adopted {n} blocks written before a crash from {}",
                        self.path().display(),
                        path.display()
                    );
                }
                Err(why) => tracing::warn!(
                    "{}: ignoring crash shadow {}: {why}",
                    self.path().display(),
                    path.display()
                ),
            }
        }
        let image = self.path().to_path_buf();
        self.shadow = Some(
            MapShadow::create(&path, &uuid, self.top_map.raw(), &image).map_err(io_at(&path))?,
        );
        Ok(adopted)
    }

    /// Takes the states of a shadow map where they differ from ours. A
    /// block only ever moves from absent to data or zero, or between data
    /// and zero, while a layer is open; a shadow that says otherwise is not
    /// this layer's latest map and is refused whole.
    fn adopt_map(&mut self, shadow: &[u8]) -> std::result::Result<u64, ShadowRefused> {
        let mine = self.top_map.raw();
        if mine.len() != shadow.len() {
            return Err(ShadowRefused::Length);
        }
        let mut changes = Vec::new();
        for (i, (&a, &b)) in mine.iter().zip(shadow).enumerate() {
            if a == b {
                continue;
            }
            for k in 0..4u64 {
                let block = i as u64 * 4 + k;
                let (old, new) = ((a >> (2 * k)) & 3, (b >> (2 * k)) & 3);
                if old == new {
                    continue;
                }
                let state = match new {
                    1 => BlockState::Data,
                    2 => BlockState::Zero,
                    _ => return Err(ShadowRefused::BackToAbsent(block)),
                };
                if block >= self.top_map.blocks() {
                    return Err(ShadowRefused::PastEnd(block));
                }
                changes.push((block, state));
            }
        }
        for &(block, state) in &changes {
            self.set_top_state(block, 1, state);
        }
        Ok(changes.len() as u64)
    }

    /// Writes one whole block of the top: `part` at `in_block` over the
    /// block's current content (a copy-up of this block only).
    fn write_partial_block(&mut self, block: u64, in_block: usize, part: &[u8]) -> Result<()> {
        let mut full = vec![0u8; self.block_size as usize];
        self.read_at(&mut full, block * self.block_size)?;
        full[in_block..in_block + part.len()].copy_from_slice(part);
        let top = self.top();
        top.storage
            .write_at(&full, top.data_offset() + block * self.block_size)
            .map_err(io_at(&top.path))
    }

    /// Marks the top dirty, durably, before its first write: a crash after
    /// it leaves a mark that leaked blocks may exist (check counts them).
    /// Callers that write the top themselves ([`Disk::direct_write_target`])
    /// call this first; the writes here do.
    pub fn begin_writes(&mut self) -> Result<()> {
        self.check_writable()?;
        if !self.writes_begun {
            self.top_mut().update_header(|h| h.flags |= FLAG_DIRTY)?;
            self.writes_begun = true;
        }
        Ok(())
    }

    /// Whether [`Disk::begin_writes`] has been done.
    pub fn writes_begun(&self) -> bool {
        self.writes_begun
    }

    /// Writes guest data. Aligned blocks are written in place with no copy;
    /// a partly covered block the top does not own yet is completed from
    /// the chain first.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.begin_writes()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.block_size;
        let end = offset + buf.len() as u64;
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mut direct_start = offset;
        let mut direct_end = end;
        if !offset.is_multiple_of(bs) && self.top_map.get(first) != BlockState::Data {
            let upto = end.min((first + 1) * bs);
            self.write_partial_block(
                first,
                (offset % bs) as usize,
                &buf[..(upto - offset) as usize],
            )?;
            direct_start = upto;
        }
        if !end.is_multiple_of(bs)
            && direct_start < end
            && self.top_map.get(last) != BlockState::Data
        {
            let from = (last * bs).max(direct_start);
            self.write_partial_block(last, (from % bs) as usize, &buf[(from - offset) as usize..])?;
            direct_end = from;
        }
        if direct_start < direct_end {
            let top = self.top();
            top.storage
                .write_at(
                    &buf[(direct_start - offset) as usize..(direct_end - offset) as usize],
                    top.data_offset() + direct_start,
                )
                .map_err(io_at(&top.path))?;
        }
        self.set_top_state(first, last - first + 1, BlockState::Data);
        Ok(())
    }

    /// Where an aligned write of `[offset, offset + len)` goes when the
    /// caller does the I/O itself (the backend's io_uring path): the top
    /// layer's index and the file offset. `None` when the range is not
    /// whole blocks (the caller uses `write_at`, which completes partial
    /// blocks from the chain). Call [`Disk::begin_writes`] before the
    /// first such write and [`Disk::note_written`] after each.
    pub fn direct_write_target(&self, offset: u64, len: u64) -> Option<(usize, u64)> {
        let bs = self.block_size;
        let aligned = offset.is_multiple_of(bs) && len.is_multiple_of(bs) && len > 0;
        (self.writable && aligned && self.check_range(offset, len).is_ok())
            .then(|| (self.layers.len() - 1, self.top().data_offset() + offset))
    }

    /// Where `[offset, offset + len)` is in the top's file when the top
    /// already owns every block it touches (any alignment): a write there
    /// changes no map state, so the caller may do it without holding the
    /// disk. `None` otherwise (a copy-on-write first).
    pub fn in_place_target(&self, offset: u64, len: u64) -> Option<u64> {
        let inside = self.check_range(offset, len).is_ok();
        (inside
            && top_owns(
                &self.index,
                self.top_owner(),
                self.writable,
                self.block_size,
                offset,
                len,
            ))
        .then(|| self.top().data_offset() + offset)
    }

    /// Records that the caller wrote whole blocks `[offset, offset + len)`
    /// of the top itself: the map (persisted at the next flush) and the
    /// index now name the top.
    pub fn note_written(&mut self, offset: u64, len: u64) {
        let bs = self.block_size;
        let (first, count) = (offset / bs, len.div_ceil(bs));
        self.set_top_state(first, count, BlockState::Data);
    }

    /// Records as written every block of the top whose file holds data
    /// (SEEK_DATA): for a caller that had a tool of its own write the
    /// top's data area in place (mkfs at the data offset), after
    /// [`Disk::begin_writes`]. Holes stay as they were.
    pub fn note_data_in_top(&mut self) -> Result<()> {
        let bs = self.block_size;
        let top = self.top();
        let start = top.data_offset();
        let ranges = top
            .storage
            .data_ranges(start, start + self.virtual_size)
            .map_err(io_at(&top.path))?;
        for (from, to) in ranges {
            let first = (from.max(start) - start) / bs * bs;
            let end = (to - start).min(self.virtual_size).div_ceil(bs) * bs;
            if first < end {
                self.note_written(first, end - first);
            }
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros: whole blocks become
    /// `zero` in the map and are punched out of the data area; partial
    /// blocks are written with zeros. (Discard does the same: reads after a
    /// discard are deterministic zeros.)
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.begin_writes()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size;
        let end = offset + len;
        let whole_first = offset.div_ceil(bs);
        let whole_end = end / bs;
        if whole_first >= whole_end {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        if offset < whole_first * bs {
            self.write_at(&vec![0u8; (whole_first * bs - offset) as usize], offset)?;
        }
        if whole_end * bs < end {
            self.write_at(&vec![0u8; (end - whole_end * bs) as usize], whole_end * bs)?;
        }
        let count = whole_end - whole_first;
        let top = self.top();
        top.storage
            .punch_hole(top.data_offset() + whole_first * bs, count * bs)
            .map_err(io_at(&top.path))?;
        self.set_top_state(whole_first, count, BlockState::Zero);
        Ok(())
    }

    /// Same as [`Disk::write_zeroes`].
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    /// Makes every completed write durable (the crash contract's FLUSH).
    /// Nothing written since the chain was opened: nothing to do (a VM
    /// that only read cost a sync as its session ended).
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable || !self.writes_begun {
            return Ok(());
        }
        let top = self.layers.last().expect("a chain has a top");
        top.flush_map(&mut self.top_map)
    }

    /// Flushes and marks the top clean.
    pub fn close(mut self) -> Result<()> {
        self.mark_clean()
    }

    /// Flushes and marks the top clean, for a process about to exit while
    /// others may still hold `&self` (no further writes may follow).
    pub fn mark_clean(&mut self) -> Result<()> {
        if self.writable && !self.writes_begun {
            // Nothing was written: nothing to make durable or to clear.
            if let Some(shadow) = self.shadow.take() {
                shadow.remove();
            }
            return Ok(());
        }
        if self.writable {
            self.flush()?;
            if self.top().header.dirty() {
                self.top_mut().update_header(|h| h.flags &= !FLAG_DIRTY)?;
            }
            if let Some(shadow) = self.shadow.take() {
                // The on-disk map is complete now.
                shadow.remove();
            }
        }
        Ok(())
    }

    /// The path of layer `k`.
    pub fn layer_path(&self, k: usize) -> &PathBuf {
        &self.layers[k].path
    }
}

/// Iterator behind [`Disk::resolve`] and [`ChainView::resolve`].
pub struct Extents<'a> {
    index: &'a Index,
    data_offsets: &'a [u64],
    block_size: u64,
    at: u64,
    end: u64,
}

impl<'a> Extents<'a> {
    fn new(
        index: &'a Index,
        data_offsets: &'a [u64],
        block_size: u64,
        virtual_size: u64,
        offset: u64,
        len: u64,
    ) -> Self {
        Extents {
            index,
            data_offsets,
            block_size,
            at: offset,
            end: offset.saturating_add(len).min(virtual_size),
        }
    }
}

impl Iterator for Extents<'_> {
    type Item = Extent;

    #[inline]
    fn next(&mut self) -> Option<Extent> {
        if self.at >= self.end {
            return None;
        }
        let bs = self.block_size;
        let block = self.at / bs;
        let last = (self.end - 1) / bs;
        let (owner, n) = self.index.run(block, last + 1);
        let run_end = ((block + n) * bs).min(self.end);
        let source = if owner == ZERO_OWNER {
            Source::Zero
        } else {
            let layer = owner as usize - 1;
            // Past a smaller parent's end nothing is there: the index never
            // names a layer for blocks it does not have.
            Source::Layer {
                layer,
                file_offset: self.data_offsets[layer] + self.at,
            }
        };
        let e = Extent {
            offset: self.at,
            len: run_end - self.at,
            source,
        };
        self.at = run_end;
        Some(e)
    }
}

/// Whether the writable top (`top_owner`) owns every block of
/// `[offset, offset + len)`, which must be inside the disk.
fn top_owns(
    index: &Index,
    top_owner: Owner,
    writable: bool,
    bs: u64,
    offset: u64,
    len: u64,
) -> bool {
    if !writable || len == 0 {
        return false;
    }
    let (first, end) = (offset / bs, (offset + len).div_ceil(bs));
    let (owner, n) = index.run(first, end);
    owner == top_owner && first + n >= end
}

/// A change of owner for a run of blocks, as recorded by
/// [`Disk::take_index_changes`] and replayed by [`ChainView::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexChange {
    pub first_block: u64,
    pub blocks: u64,
    pub owner: Owner,
}

/// A copy of an open chain's index with what `resolve` needs and nothing
/// else: a thread that holds one resolves reads without sharing a lock
/// with anyone. The owner of the [`Disk`] forwards its
/// [`IndexChange`]s to every copy.
#[derive(Debug, Clone)]
pub struct ChainView {
    index: Index,
    data_offsets: Vec<u64>,
    block_size: u64,
    virtual_size: u64,
    top_owner: Owner,
    writable: bool,
}

impl ChainView {
    /// Same as [`Disk::resolve`], on this copy.
    pub fn resolve(&self, offset: u64, len: u64) -> Extents<'_> {
        Extents::new(
            &self.index,
            &self.data_offsets,
            self.block_size,
            self.virtual_size,
            offset,
            len,
        )
    }

    pub fn apply(&mut self, change: IndexChange) {
        self.index
            .set_range(change.first_block, change.blocks, change.owner);
    }

    /// Whether the writable top already owns every block of the range, so
    /// a write there changes no map state.
    pub fn top_owns(&self, offset: u64, len: u64) -> bool {
        top_owns(
            &self.index,
            self.top_owner,
            self.writable,
            self.block_size,
            offset,
            len,
        )
    }

    /// Same as [`Disk::direct_write_target`].
    pub fn direct_write_target(&self, offset: u64, len: u64) -> Option<(usize, u64)> {
        let bs = self.block_size;
        let aligned = offset.is_multiple_of(bs) && len.is_multiple_of(bs) && len > 0;
        let inside = offset
            .checked_add(len)
            .is_some_and(|e| e <= self.virtual_size);
        (self.writable && aligned && inside).then(|| {
            let top = self.data_offsets.len() - 1;
            (top, self.data_offsets[top] + offset)
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
}
