//! One layer file: its header slots, its map region, its data area.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{io_at, Error, Result};
use crate::header::{self, Header, HeaderError, SLOT_SIZE};
use crate::map::{AllocationMap, MAP_PAGE};
use crate::storage::{parent_dir, sibling, Env, Storage};

/// What a new layer looks like.
#[derive(Debug, Clone)]
pub struct NewLayer {
    pub virtual_size: u64,
    pub block_size: u32,
    /// Parent path as stored (relative to the new layer's directory) and uuid.
    pub parent: Option<(String, Uuid)>,
    pub sealed: bool,
    pub name: String,
    /// A given uuid (restore keeps a snapshot's identity); fresh otherwise.
    pub uuid: Option<Uuid>,
}

impl NewLayer {
    /// An empty writable layer of its own (no parent).
    pub fn standalone(virtual_size: u64, block_size: u32) -> Self {
        NewLayer::overlay(virtual_size, block_size, None)
    }

    /// An empty writable layer on `parent` (stored path, uuid).
    pub fn overlay(virtual_size: u64, block_size: u32, parent: Option<(String, Uuid)>) -> Self {
        NewLayer {
            virtual_size,
            block_size,
            parent,
            sealed: false,
            name: String::new(),
            uuid: None,
        }
    }
}

#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    pub storage: Arc<dyn Storage>,
    pub header: Header,
    /// The slot the current header was read from.
    slot: usize,
    /// What is wrong with the other slot, if anything (reported by check).
    pub other_slot_damage: Option<HeaderError>,
    writable: bool,
}

impl Layer {
    pub fn open(env: &dyn Env, path: &Path, writable: bool) -> Result<Layer> {
        let storage = env.open(path, writable).map_err(io_at(path))?;
        let len = storage.len().map_err(io_at(path))?;
        if len < 2 * SLOT_SIZE as u64 {
            // Decode what is there for the better message (wrong magic vs short).
            let mut head = vec![0u8; len.min(SLOT_SIZE as u64) as usize];
            storage.read_at(&mut head, 0).map_err(io_at(path))?;
            let err = if head.len() >= 8 && &head[..8] != header::MAGIC {
                HeaderError::WrongMagic
            } else {
                HeaderError::TooShort(len)
            };
            return Err(Error::Header {
                path: path.to_path_buf(),
                source: err,
            });
        }
        let mut slots = vec![0u8; 2 * SLOT_SIZE];
        storage.read_at(&mut slots, 0).map_err(io_at(path))?;
        let choice =
            header::choose(&slots[..SLOT_SIZE], &slots[SLOT_SIZE..]).map_err(|source| {
                Error::Header {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        let needed = choice.header.file_len();
        if len < needed {
            return Err(Error::Truncated {
                path: path.to_path_buf(),
                actual: len,
                needed,
            });
        }
        Ok(Layer {
            path: path.to_path_buf(),
            storage,
            header: choice.header,
            slot: choice.slot,
            other_slot_damage: choice.other_damage,
            writable,
        })
    }

    /// Creates a complete layer atomically: a temporary file, synced, renamed
    /// into place, directory synced.
    pub fn create(env: &dyn Env, path: &Path, spec: &NewLayer) -> Result<Layer> {
        let mut h =
            Header::new(spec.virtual_size, spec.block_size).map_err(|source| Error::Header {
                path: path.to_path_buf(),
                source,
            })?;
        if let Some(u) = spec.uuid {
            h.uuid = u;
        }
        if let Some((p, u)) = &spec.parent {
            h.parent_path = Some(p.clone());
            h.parent_uuid = Some(*u);
        }
        if spec.sealed {
            h.flags |= header::FLAG_SEALED;
        }
        h.name = spec.name.clone();
        let slot = h.encode().map_err(|source| Error::Header {
            path: path.to_path_buf(),
            source,
        })?;
        let file_name = path
            .file_name()
            .ok_or_else(|| crate::error::invalid(path, "not a file name"))?;
        let tmp = sibling(
            path,
            format!(".{}.tmp-{}", file_name.to_string_lossy(), h.uuid.simple()),
        );
        // The parent learns of its new dependant before the dependant
        // exists: a crash between leaves a note that names nothing, which
        // the next look at the parent's dependants removes.
        let note = match &spec.parent {
            Some((p, _)) => {
                let p = Path::new(p);
                let parent = if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    sibling(path, p)
                };
                Some(crate::dependants::record(env, &parent, path, h.uuid)?)
            }
            None => None,
        };
        let forget = || {
            if let Some(n) = &note {
                crate::dependants::forget(env, n);
            }
        };
        // Errors name the file asked for, not the temporary one.
        let storage = env
            .create(&tmp)
            .map_err(io_at(path))
            .inspect_err(|_| forget())?;
        let result = (|| {
            storage.set_len(h.file_len())?;
            storage.write_at(&slot, 0)?;
            storage.sync_data()?;
            env.rename(&tmp, path)?;
            env.sync_dir(&parent_dir(path))
        })();
        if let Err(e) = result {
            let _ = env.remove(&tmp);
            forget();
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
        Ok(Layer {
            path: path.to_path_buf(),
            storage,
            header: h,
            slot: 0,
            other_slot_damage: None,
            writable: true,
        })
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Atomically replaces the header: the other slot gets generation + 1.
    pub fn update_header(&mut self, change: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = self.header.clone();
        change(&mut h);
        h.generation = self.header.generation + 1;
        let slot = h.encode().map_err(|source| Error::Header {
            path: self.path.clone(),
            source,
        })?;
        let target = 1 - self.slot;
        self.storage
            .write_at(&slot, (target * SLOT_SIZE) as u64)
            .and_then(|_| self.storage.sync_data())
            .map_err(io_at(&self.path))?;
        self.header = h;
        self.slot = target;
        self.other_slot_damage = None;
        Ok(())
    }

    /// Reads the map, skipping holes. Not validated: see `AllocationMap::validate`.
    pub fn load_map(&self) -> Result<AllocationMap> {
        let h = &self.header;
        let mut map = AllocationMap::new(h.blocks(), h.map_len);
        let start = h.map_offset;
        let end = h.map_offset + h.map_len;
        let ranges = self
            .storage
            .data_ranges(start, end)
            .map_err(io_at(&self.path))?;
        let raw = map.raw_mut();
        for (s, e) in ranges {
            let (s, e) = (s.max(start), e.min(end));
            if s >= e {
                continue;
            }
            self.storage
                .read_at(&mut raw[(s - start) as usize..(e - start) as usize], s)
                .map_err(io_at(&self.path))?;
        }
        Ok(map)
    }

    /// Writes map pages (taken with `AllocationMap::take_dirty`); all-absent
    /// pages are punched out so the map stays sparse. Does not sync.
    pub fn write_map_pages(&self, pages: &[(u64, Vec<u8>)]) -> Result<()> {
        for (page, bytes) in pages {
            let at = self.header.map_offset + page * MAP_PAGE as u64;
            let r = if bytes.iter().all(|&b| b == 0) {
                self.storage.punch_hole(at, MAP_PAGE as u64)
            } else {
                self.storage.write_at(bytes, at)
            };
            r.map_err(io_at(&self.path))?;
        }
        Ok(())
    }

    /// Persists dirty map pages under the crash contract: copy, sync data,
    /// write the copies, sync.
    pub fn flush_map(&self, map: &mut AllocationMap) -> Result<()> {
        let pages = map.take_dirty();
        let r = (|| {
            self.storage.sync_data().map_err(io_at(&self.path))?;
            if !pages.is_empty() {
                self.write_map_pages(&pages)?;
                self.storage.sync_data().map_err(io_at(&self.path))?;
            }
            Ok(())
        })();
        if r.is_err() {
            map.redirty(pages.iter().map(|p| p.0));
        }
        r
    }

    /// The parent's path as the filesystem sees it.
    pub fn parent_path(&self) -> Option<PathBuf> {
        let p = Path::new(self.header.parent_path.as_deref()?);
        Some(if p.is_absolute() {
            p.to_path_buf()
        } else {
            sibling(&self.path, p)
        })
    }

    /// Guest offset -> file offset in the data area.
    pub fn data_offset(&self) -> u64 {
        self.header.data_offset
    }
}

/// Seals `path` if it is not sealed yet, so it can serve as a parent.
/// Refuses a dirty layer: it may be open for writing somewhere.
pub fn ensure_sealed(env: &dyn Env, path: &Path) -> Result<Layer> {
    let layer = Layer::open(env, path, false)?;
    if layer.header.sealed() {
        return Ok(layer);
    }
    if layer.header.dirty() {
        return Err(crate::error::invalid(
            path,
            "the layer is open for writing or was not closed cleanly (dirty); \
             close it or run `img check -r all` before using it as a base",
        ));
    }
    drop(layer);
    let mut layer = Layer::open(env, path, true)?;
    layer.update_header(|h| h.flags |= header::FLAG_SEALED)?;
    tracing::info!(path = %path.display(), "sealed");
    Ok(layer)
}

/// The path to store in a child at `child` for its parent at `parent`:
/// relative to the child's directory, so a directory of layers can move.
pub fn relative_parent_path(child: &Path, parent: &Path) -> Result<String> {
    let child_dir = parent_dir(child);
    let parent_dir_ = parent_dir(parent);
    let name = parent
        .file_name()
        .ok_or_else(|| crate::error::invalid(parent, "not a file name"))?
        .to_string_lossy()
        .into_owned();
    if lexical(&child_dir) == lexical(&parent_dir_) {
        return Ok(name);
    }
    let (Ok(from), Ok(to)) = (
        std::fs::canonicalize(&child_dir),
        std::fs::canonicalize(&parent_dir_),
    ) else {
        // Not on the real filesystem (or not there yet): keep it as given.
        return Ok(parent.to_string_lossy().into_owned());
    };
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c.as_os_str());
    }
    rel.push(name);
    Ok(rel.to_string_lossy().into_owned())
}

fn lexical(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}
