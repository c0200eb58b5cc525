//! Chain operations: create, clone, snapshot, commit, rebase. Each keeps the
//! chain openable with unchanged content at every step, so a crash anywhere
//! leaves a consistent image (FORMAT.md, "Operations and their crash
//! ordering").

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::info;
use uuid::Uuid;

use crate::disk::{load_valid_map, open_chain, Disk, Source};
use crate::error::{invalid, io_at, Error, Result};
use crate::header::FLAG_DIRTY;
pub use crate::layer::ensure_sealed;
use crate::layer::{relative_parent_path, Layer, NewLayer};
use crate::lock::{ImageLock, LockKind};
use crate::map::BlockState;
use crate::storage::{parent_dir, sibling, AlignedBuf, Env};

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Copy granularity of the long operations.
const CHUNK: u64 = 1 << 20;

/// `img create [-b BASE] FILE [SIZE]`.
pub fn create(
    env: &dyn Env,
    path: &Path,
    size: Option<u64>,
    block_size: u32,
    base: Option<&Path>,
) -> Result<Layer> {
    if env.exists(path) {
        return Err(invalid(path, "already exists"));
    }
    let Some(base) = base else {
        let size = size.ok_or_else(|| invalid(path, "a size is needed without a base"))?;
        // Said in the user's terms, not as a header the user never wrote.
        if let Err(crate::header::HeaderError::Inconsistent(why)) =
            crate::header::validate_geometry(size, block_size)
        {
            return Err(invalid(path, why));
        }
        return Layer::create(env, path, &NewLayer::standalone(size, block_size));
    };
    overlay(env, base, path, size)
}

/// Locks a layer about to become (or stay) a base: shared when it is
/// sealed already, exclusive when it still has to be sealed, since sealing
/// writes its header and nobody may be using it then.
fn lock_base(env: &dyn Env, base: &Path, wanted: &'static str) -> Result<ImageLock> {
    Ok(if Layer::open(env, base, false)?.header.sealed() {
        env.lock(base, LockKind::Shared, wanted)?
    } else {
        env.lock(base, LockKind::Exclusive, "seal")?
    })
}

/// A new empty writable layer on `base` (sealed first if needed); the chain
/// below is checked before anything is written.
fn overlay(env: &dyn Env, base: &Path, path: &Path, size: Option<u64>) -> Result<Layer> {
    room_for_one_more(base, open_chain(env, base, false)?.len())?;
    let _lock = lock_base(env, base, "clone")?;
    let b = ensure_sealed(env, base)?;
    let size = size.unwrap_or(b.header.virtual_size);
    if size < b.header.virtual_size {
        return Err(Error::SizeMismatch {
            path: path.to_path_buf(),
            parent: base.to_path_buf(),
            size,
            parent_size: b.header.virtual_size,
        });
    }
    Layer::create(
        env,
        path,
        &NewLayer::overlay(
            size,
            b.header.block_size,
            Some((relative_parent_path(path, base)?, b.header.uuid)),
        ),
    )
}

/// `img clone BASE NEW`: a writable overlay on a sealed base.
pub fn clone(env: &dyn Env, base: &Path, new: &Path) -> Result<Layer> {
    if env.exists(new) {
        return Err(invalid(new, "already exists"));
    }
    overlay(env, base, new, None)
}

/// `img resize FILE SIZE`: grows a working image to `new_size` bytes (the
/// new space reads as zeros: blocks past a layer's old end are absent in
/// it and beyond every parent's end). Returns the old size. A snapshot
/// does not change (resize the image standing on it); shrinking is
/// refused; growing so far that the map needs the data moved is refused
/// unless the layer holds no data yet (a fresh clone), whose data area
/// simply moves.
pub fn resize(env: &dyn Env, path: &Path, new_size: u64) -> Result<u64> {
    let _lock = env.lock(path, LockKind::Exclusive, "resize")?;
    let mut layer = Layer::open(env, path, true)?;
    let h = layer.header.clone();
    if h.sealed() {
        return Err(invalid(
            path,
            "is a snapshot (sealed): resize the image that stands on it",
        ));
    }
    if new_size < h.virtual_size {
        return Err(invalid(
            path,
            format!(
                "shrinking ({} to {new_size} bytes) is not supported",
                h.virtual_size
            ),
        ));
    }
    if let Err(crate::header::HeaderError::Inconsistent(why)) =
        crate::header::validate_geometry(new_size, h.block_size)
    {
        return Err(invalid(path, why));
    }
    let (map_len, data_offset) = crate::header::layout(new_size, h.block_size);
    if data_offset != h.data_offset {
        let (data, zero) = layer.load_map()?.counts();
        if data + zero > 0 {
            return Err(invalid(
                path,
                format!(
                    "growing to {new_size} bytes needs its data moved (the map outgrows its                      space), which resize does not do: copy it with `img convert` instead"
                ),
            ));
        }
    }
    layer.update_header(|h| {
        h.virtual_size = new_size;
        h.map_len = map_len;
        h.data_offset = data_offset;
    })?;
    layer
        .storage
        .set_len(layer.header.file_len())
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(h.virtual_size)
}

/// `layer` and its parent become one layer, in `layer`'s place and with
/// its identity (uuid, name, sealed or not), at the cost of copying what
/// `layer` holds (not what the parent holds): a restore of hundreds of
/// incremental backup streams keeps one layer. Only for a parent nothing
/// else stands on (refused otherwise, as `commit` refuses); not crash-safe
/// as a whole (a caller that owns both files, making something new).
pub fn merge_down(env: &dyn Env, layer: &Path) -> Result<()> {
    let parent = Layer::open(env, layer, false)?
        .parent_path()
        .ok_or_else(|| invalid(layer, "has no parent to merge into"))?;
    commit(env, layer, false, &mut |_, _| {})?;
    let me = Layer::open(env, layer, false)?.header;
    let mut p = Layer::open(env, &parent, true)?;
    p.update_header(|h| {
        h.uuid = me.uuid;
        h.name = me.name.clone();
        h.flags = me.flags;
    })?;
    drop(p);
    env.rename(&parent, layer).map_err(io_at(layer))?;
    crate::dependants::remove_all(env, &parent);
    env.sync_dir(&parent_dir(layer)).map_err(io_at(layer))
}

/// The file a snapshot named `name` of `top` lives in.
pub fn snapshot_path(top: &Path, name: &str) -> PathBuf {
    let file = top.file_name().map(|f| f.to_string_lossy().into_owned());
    sibling(top, format!("{}@{}", file.unwrap_or_default(), name))
}

/// The layers whose parent `layer` is, wherever they are
/// ([`crate::dependants::find`]): who would break if it changed or went
/// away. Call with `layer` locked exclusive.
pub fn dependants(env: &dyn Env, layer: &Path) -> Result<Vec<PathBuf>> {
    crate::dependants::find(env, layer)
}

/// Refuses a new layer on a chain of `depth` layers that would make it
/// deeper than any reader opens, naming the way out.
fn room_for_one_more(path: &Path, depth: usize) -> Result<()> {
    if depth < crate::disk::MAX_DEPTH {
        return Ok(());
    }
    Err(invalid(
        path,
        format!(
            "its chain is {depth} layers deep; one more would pass the {} that img, \
             blk-backend and vmm open. Merge layers first: `img snapshot -d NAME` folds \
             a snapshot into the layer above it, `img commit` merges a layer into its \
             parent, or `img convert` copies the disk flat",
            crate::disk::MAX_DEPTH
        ),
    ))
}

fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_snapshot_name(top: &Path, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > crate::header::MAX_NAME
        || name.contains('/')
        || name.contains('\0')
    {
        return Err(invalid(
            top,
            format!("bad snapshot name {name:?}: 1 to 256 bytes, no '/'"),
        ));
    }
    Ok(())
}

/// `img snapshot -c NAME FILE`: seals the current contents of FILE as the
/// snapshot `FILE@NAME`; FILE becomes a new empty overlay on it.
pub fn snapshot_create(env: &dyn Env, top: &Path, name: &str) -> Result<PathBuf> {
    check_snapshot_name(top, name)?;
    let _lock = env.lock(top, LockKind::Exclusive, "snapshot")?;
    let snap = snapshot_path(top, name);
    if env.exists(&snap) {
        return Err(invalid(&snap, "a snapshot of that name exists"));
    }
    // Validates the chain and refuses a sealed top (it is already a snapshot).
    let current = open_chain(env, top, true)?;
    room_for_one_more(top, current.len())?;
    let top_layer = &current[0];
    if top_layer.header.dirty() {
        return Err(invalid(
            top,
            "the image is open for writing or was not closed cleanly (dirty); \
             close it or run `img check -r all` first",
        ));
    }
    let (size, block, uuid) = (
        top_layer.header.virtual_size,
        top_layer.header.block_size,
        top_layer.header.uuid,
    );
    let below = current.get(1).map(|l| l.path.clone());
    drop(current);
    // The name goes into the layer before it has a second name, so the
    // snapshot carries it whatever step a crash stops at.
    let mut t = Layer::open(env, top, true)?;
    t.update_header(|h| h.name = name.to_string())?;
    drop(t);
    env.hard_link(top, &snap).map_err(io_at(&snap))?;
    env.sync_dir(&parent_dir(top)).map_err(io_at(top))?;
    // The layer below learns that what stands on it goes by the
    // snapshot's name from now on (the top becomes a new layer).
    if let Some(below) = &below {
        crate::dependants::record(env, below, &snap, uuid)?;
    }
    // Built aside and renamed over the top in one step (Layer::create).
    Layer::create(
        env,
        top,
        &NewLayer::overlay(size, block, Some((relative_parent_path(top, &snap)?, uuid))),
    )?;
    // A crash before this leaves a clean unsealed parent, which the next
    // writable open seals.
    ensure_sealed(env, &snap)?;
    info!(image = %top.display(), snapshot = %snap.display(), "snapshot created");
    Ok(snap)
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub name: String,
    pub path: PathBuf,
    pub uuid: Uuid,
    /// Distance from the top (1 = the top's parent); `None` for a snapshot
    /// of FILE that is no longer below it (newer than one reverted to).
    pub depth: Option<usize>,
}

/// `img snapshot -l FILE`: the named sealed layers of the chain, newest
/// first, then the snapshots of FILE (`FILE@NAME` beside it) that are not
/// in its chain now: those newer than a snapshot FILE was reverted to.
pub fn snapshot_list(env: &dyn Env, top: &Path) -> Result<Vec<SnapshotInfo>> {
    let mut list: Vec<SnapshotInfo> = open_chain(env, top, false)?
        .into_iter()
        .enumerate()
        .filter(|(_, l)| l.header.sealed() && !l.header.name.is_empty())
        .map(|(depth, l)| SnapshotInfo {
            name: l.header.name.clone(),
            path: l.path.clone(),
            uuid: l.header.uuid,
            depth: Some(depth),
        })
        .collect();
    let prefix = format!("{}@", top.file_name().unwrap_or_default().to_string_lossy());
    let dir = parent_dir(top);
    for p in env.list_dir(&dir).map_err(io_at(&dir))? {
        let file = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some(name) = file.strip_prefix(&prefix) else {
            continue;
        };
        if list.iter().any(|s| s.name == name) {
            continue;
        }
        let Ok(l) = Layer::open(env, &p, false) else {
            continue;
        };
        if l.header.sealed() {
            list.push(SnapshotInfo {
                name: name.to_string(),
                path: snapshot_path(top, name),
                uuid: l.header.uuid,
                depth: None,
            });
        }
    }
    Ok(list)
}

fn find_snapshot(env: &dyn Env, top: &Path, name: &str) -> Result<SnapshotInfo> {
    snapshot_list(env, top)?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| invalid(top, format!("no snapshot named {name:?} in the chain")))
}

/// `img snapshot -a NAME FILE`: FILE becomes a new empty overlay on the
/// snapshot; what FILE held since is dropped.
pub fn snapshot_apply(env: &dyn Env, top: &Path, name: &str) -> Result<()> {
    let _lock = env.lock(top, LockKind::Exclusive, "revert")?;
    let snap = find_snapshot(env, top, name)?;
    let layer = Layer::open(env, &snap.path, false)?;
    let file = top.file_name().map(|f| f.to_string_lossy().into_owned());
    let tmp = sibling(
        top,
        format!(
            ".{}.apply-{}",
            file.unwrap_or_default(),
            Uuid::new_v4().simple()
        ),
    );
    Layer::create(
        env,
        &tmp,
        &NewLayer::overlay(
            Layer::open(env, top, false)?.header.virtual_size,
            layer.header.block_size,
            Some((relative_parent_path(top, &snap.path)?, layer.header.uuid)),
        ),
    )?;
    env.rename(&tmp, top).map_err(io_at(top))?;
    env.sync_dir(&parent_dir(top)).map_err(io_at(top))?;
    // The note written for the temporary name names nothing now.
    crate::dependants::record(
        env,
        &snap.path,
        top,
        Layer::open(env, top, false)?.header.uuid,
    )
    .map(drop)
}

/// `img snapshot -d NAME FILE`: folds the snapshot into the layer above it
/// (a safe rebase of that layer onto the snapshot's parent), then removes
/// the snapshot's file.
pub fn snapshot_delete(
    env: &Arc<dyn Env>,
    top: &Path,
    name: &str,
    progress: Progress,
) -> Result<()> {
    let _top_lock = env.lock(top, LockKind::Exclusive, "change the chain of")?;
    let snap = find_snapshot(&**env, top, name)?;
    let _snap_lock = env.lock(&snap.path, LockKind::Exclusive, "delete")?;
    let chain = open_chain(&**env, top, false)?;
    // Layers other than the chain's own child that stand on the snapshot
    // would lose their parent: refused, naming them.
    let in_chain_child = snap.depth.map(|d| chain[d - 1].path.clone());
    let others: Vec<PathBuf> = dependants(&**env, &snap.path)?
        .into_iter()
        .filter(|p| {
            in_chain_child
                .as_ref()
                .is_none_or(|c| env.identity(p).ok() != env.identity(c).ok())
        })
        .collect();
    if !others.is_empty() {
        return Err(invalid(
            &snap.path,
            format!(
                "snapshot {name:?} is the parent of {}: deleting it would break them (delete or rebase them first)",
                names(&others)
            ),
        ));
    }
    let Some(depth) = snap.depth else {
        // Not below FILE any more (FILE was reverted past it), and nothing
        // else stands on it: only its file goes.
        drop(chain);
        env.remove(&snap.path).map_err(io_at(&snap.path))?;
        crate::dependants::remove_all(env.as_ref(), &snap.path);
        return env
            .sync_dir(&parent_dir(&snap.path))
            .map_err(io_at(&snap.path));
    };
    let child = chain[depth - 1].path.clone();
    let new_parent = chain[depth].parent_path();
    drop(chain);
    let _child_lock = if depth > 1 {
        Some(env.lock(&child, LockKind::Exclusive, "rebase")?)
    } else {
        None // the child is the top, locked above
    };
    rebase_locked(env, &child, new_parent.as_deref(), false, true, progress)?;
    env.remove(&snap.path).map_err(io_at(&snap.path))?;
    crate::dependants::remove_all(env.as_ref(), &snap.path);
    env.sync_dir(&parent_dir(&snap.path))
        .map_err(io_at(&snap.path))
}

#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CopyStats {
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// `img commit FILE`: merges FILE into its parent, leaves FILE empty on it.
/// Running it again finishes an interrupted commit.
///
/// A parent that other layers stand on too (clones of the same snapshot)
/// is refused unless `force`: its new content and identity would make them
/// fail to open. A top with nothing in it commits nothing and changes
/// nothing.
pub fn commit(env: &dyn Env, top: &Path, force: bool, progress: Progress) -> Result<CopyStats> {
    let _top_lock = env.lock(top, LockKind::Exclusive, "commit")?;
    let chain = open_chain(env, top, false)?;
    let parent_path = chain[0]
        .parent_path()
        .ok_or_else(|| invalid(top, "has no parent to commit into"))?;
    let resuming = chain[0].header.parent_uuid_next.is_some();
    let (data, zero) = load_valid_map(&chain[0])?.counts();
    drop(chain);
    if data + zero == 0 && !resuming {
        progress(0, 0);
        return Ok(CopyStats::default());
    }
    let _parent_lock = env.lock(&parent_path, LockKind::Exclusive, "commit into")?;
    if !force {
        let top_id = env.identity(top).map_err(io_at(top))?;
        let others: Vec<PathBuf> = dependants(env, &parent_path)?
            .into_iter()
            .filter(|p| env.identity(p).ok().as_ref() != Some(&top_id))
            .collect();
        if !others.is_empty() {
            return Err(invalid(
                &parent_path,
                format!(
                    "{} also stand(s) on it: committing {} into it would break them \
                     (commit --force to do it anyway)",
                    names(&others),
                    top.display()
                ),
            ));
        }
    }
    let mut t = Layer::open(env, top, true)?;
    let mut p = Layer::open(env, &parent_path, true)?;
    if p.header.virtual_size != t.header.virtual_size {
        return Err(invalid(
            top,
            format!(
                "commit needs equal sizes; the parent {} is {} bytes, this layer {}",
                parent_path.display(),
                p.header.virtual_size,
                t.header.virtual_size
            ),
        ));
    }
    let new_uuid = match t.header.parent_uuid_next {
        Some(u) => u,
        None => {
            let u = Uuid::new_v4();
            t.update_header(|h| h.parent_uuid_next = Some(u))?;
            u
        }
    };
    let mut stats = CopyStats::default();
    let mut tmap = load_valid_map(&t)?;
    {
        // Copy every block the top has into the parent, then its map, then
        // its new identity. A resumed commit copies again: the top may have
        // been written since the interruption.
        let mut pmap = load_valid_map(&p)?;
        let bs = t.header.block_size as u64;
        let total = tmap.counts();
        let total = (total.0 + total.1) * bs;
        let mut done = 0;
        let mut buf = AlignedBuf::new(CHUNK as usize);
        for (start, count, state) in tmap.runs(0, tmap.blocks()).collect::<Vec<_>>() {
            let (off, len) = (start * bs, count * bs);
            match state {
                BlockState::Data => {
                    let mut at = off;
                    while at < off + len {
                        let n = (off + len - at).min(CHUNK) as usize;
                        t.storage
                            .read_at(&mut buf[..n], t.data_offset() + at)
                            .map_err(io_at(&t.path))?;
                        p.storage
                            .write_at(&buf[..n], p.data_offset() + at)
                            .map_err(io_at(&p.path))?;
                        at += n as u64;
                        done += n as u64;
                        progress(done, total);
                    }
                    stats.data_bytes += len;
                }
                BlockState::Zero => {
                    p.storage
                        .punch_hole(p.data_offset() + off, len)
                        .map_err(io_at(&p.path))?;
                    stats.zero_bytes += len;
                    done += len;
                    progress(done, total);
                }
                BlockState::Absent => continue,
            }
            pmap.set_range(start, count, state);
        }
        p.flush_map(&mut pmap)?;
        if p.header.uuid != new_uuid {
            p.update_header(|h| h.uuid = new_uuid)?;
        }
    }
    // Empty the top: its blocks are all in the parent now. The map lets go
    // of them (durably) before their space is freed, so no crash can leave
    // the map naming a punched block.
    let blocks = tmap.blocks();
    let had: Vec<_> = tmap.runs(0, blocks).collect();
    for &(start, count, _) in &had {
        tmap.set_range(start, count, BlockState::Absent);
    }
    t.flush_map(&mut tmap)?;
    let bs = t.header.block_size as u64;
    for (start, count, _) in had {
        t.storage
            .punch_hole(t.data_offset() + start * bs, count * bs)
            .map_err(io_at(&t.path))?;
    }
    t.storage.sync_data().map_err(io_at(&t.path))?;
    t.update_header(|h| {
        h.parent_uuid = Some(new_uuid);
        h.parent_uuid_next = None;
    })?;
    info!(image = %top.display(), parent = %parent_path.display(), data = stats.data_bytes, "committed");
    Ok(stats)
}

/// `img rebase [-u] -b BASE FILE`: gives FILE a new parent (or none). Safe
/// mode keeps FILE's content: it first copies into FILE every block it does
/// not own whose content differs between the old and the new chain.
pub fn rebase(
    env: &Arc<dyn Env>,
    top: &Path,
    new_base: Option<&Path>,
    unsafe_header_only: bool,
    allow_sealed_top: bool,
    progress: Progress,
) -> Result<CopyStats> {
    let _top_lock = env.lock(top, LockKind::Exclusive, "rebase")?;
    let _base_lock = new_base
        .map(|b| lock_base(&**env, b, "rebase onto"))
        .transpose()?;
    rebase_locked(
        env,
        top,
        new_base,
        unsafe_header_only,
        allow_sealed_top,
        progress,
    )
}

/// [`rebase`] for a caller that holds the locks.
fn rebase_locked(
    env: &Arc<dyn Env>,
    top: &Path,
    new_base: Option<&Path>,
    unsafe_header_only: bool,
    allow_sealed_top: bool,
    progress: Progress,
) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    let t = Layer::open(&**env, top, false)?;
    if t.header.sealed() && !allow_sealed_top {
        return Err(Error::Sealed {
            path: top.to_path_buf(),
        });
    }
    let new_parent = match new_base {
        Some(b) => {
            let l = ensure_sealed(&**env, b)?;
            if l.header.block_size != t.header.block_size
                || l.header.virtual_size > t.header.virtual_size
            {
                return Err(invalid(
                    b,
                    "the new base's block size or size does not fit this layer",
                ));
            }
            // Refuse a base that has `top` below it: that would be a cycle.
            let below = open_chain(&**env, b, false)?;
            room_for_one_more(b, below.len())?;
            for layer in below {
                if layer.header.uuid == t.header.uuid {
                    return Err(Error::Cycle {
                        path: top.to_path_buf(),
                        parent: b.to_path_buf(),
                    });
                }
            }
            Some((relative_parent_path(top, b)?, l.header.uuid))
        }
        None => None,
    };
    if !unsafe_header_only {
        // Unlocked: the caller holds what matters (the old parent may be
        // the snapshot it is deleting, locked exclusive).
        let old = match t.parent_path() {
            Some(p) => Some(Disk::open_unlocked(Arc::clone(env), &p)?),
            None => None,
        };
        let new = match new_base {
            Some(b) => Some(Disk::open_unlocked(Arc::clone(env), b)?),
            None => None,
        };
        drop(t);
        let tl = Layer::open(&**env, top, true)?;
        let mut tmap = load_valid_map(&tl)?;
        let bs = tl.header.block_size as u64;
        let size = tl.header.virtual_size;
        let mut a = AlignedBuf::new(CHUNK as usize);
        let mut b = AlignedBuf::new(CHUNK as usize);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(CHUNK);
            progress(off, size);
            let first = off / bs;
            let count = n / bs;
            let owned = tmap.runs(first, first + count).map(|r| r.1).sum::<u64>();
            if owned == count || same_source(old.as_ref(), new.as_ref(), off, n) {
                off += n;
                continue;
            }
            read_or_zero(old.as_ref(), &mut a[..n as usize], off)?;
            read_or_zero(new.as_ref(), &mut b[..n as usize], off)?;
            for k in 0..count {
                let block = first + k;
                let r = (k * bs) as usize..((k + 1) * bs) as usize;
                if tmap.get(block) != BlockState::Absent || a[r.clone()] == b[r.clone()] {
                    continue;
                }
                if a[r.clone()].iter().all(|&x| x == 0) {
                    tmap.set_range(block, 1, BlockState::Zero);
                    stats.zero_bytes += bs;
                } else {
                    tl.storage
                        .write_at(&a[r], tl.data_offset() + block * bs)
                        .map_err(io_at(&tl.path))?;
                    tmap.set_range(block, 1, BlockState::Data);
                    stats.data_bytes += bs;
                }
            }
            off += n;
        }
        progress(size, size);
        tl.flush_map(&mut tmap)?;
        drop(tl);
    } else {
        drop(t);
    }
    if let Some(b) = new_base {
        crate::dependants::record(&**env, b, top, Layer::open(&**env, top, false)?.header.uuid)?;
    }
    let mut tl = Layer::open(&**env, top, true)?;
    tl.update_header(|h| {
        h.parent_path = new_parent.as_ref().map(|p| p.0.clone());
        h.parent_uuid = new_parent.as_ref().map(|p| p.1);
        h.parent_uuid_next = None;
    })?;
    Ok(stats)
}

/// Whether both chains take `[off, off + len)` from the same sealed layers.
fn same_source(old: Option<&Disk>, new: Option<&Disk>, off: u64, len: u64) -> bool {
    let (Some(old), Some(new)) = (old, new) else {
        return false;
    };
    let mut a = old.resolve(off, len);
    let mut b = new.resolve(off, len);
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x.offset == y.offset && x.len == y.len => {
                let same = match (x.source, y.source) {
                    (Source::Zero, Source::Zero) => true,
                    (Source::Layer { layer: i, .. }, Source::Layer { layer: j, .. }) => {
                        old.layers()[i].header.uuid == new.layers()[j].header.uuid
                    }
                    _ => false,
                };
                if !same {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

fn read_or_zero(disk: Option<&Disk>, buf: &mut [u8], off: u64) -> Result<()> {
    match disk {
        Some(d) if off < d.virtual_size() => {
            let n = (d.virtual_size() - off).min(buf.len() as u64) as usize;
            d.read_at(&mut buf[..n], off)?;
            buf[n..].fill(0);
            Ok(())
        }
        _ => {
            buf.fill(0);
            Ok(())
        }
    }
}

/// Clears the dirty flag of a layer (after repair or a clean reopen).
pub fn mark_clean(layer: &mut Layer) -> Result<()> {
    if layer.header.dirty() {
        layer.update_header(|h| h.flags &= !FLAG_DIRTY)?;
    }
    Ok(())
}
