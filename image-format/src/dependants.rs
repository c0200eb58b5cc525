//! Who stands on a layer, anywhere on the host (FORMAT.md, "Who may use a
//! layer: locks and dependants").
//!
//! A layer made on a parent leaves a note beside the parent,
//! `.PARENT.child-UUID`, holding the new layer's absolute path: a clone in
//! another directory (vmctl keeps each VM's disk in its own) is found from
//! its parent without searching the host. Notes are written before the
//! layer they name exists (under the parent's shared lock), re-written by
//! whoever opens a layer for writing and finds its note missing (layers
//! made before notes existed, or moved since), and pruned by [`find`]
//! when what they name is gone or stands on another parent now.

use std::path::{Path, PathBuf};

use tracing::warn;
use uuid::Uuid;

use crate::error::{io_at, Result};
use crate::layer::Layer;
use crate::storage::{parent_dir, sibling, Env};

/// Longest path a note holds (a layer's path, as the OS allows).
const MAX_NOTE: u64 = 4096;

/// The note beside `parent` that `child_uuid` stands on it.
fn note_path(parent: &Path, child_uuid: Uuid) -> PathBuf {
    let file = parent.file_name().unwrap_or_default().to_string_lossy();
    sibling(parent, format!(".{file}.child-{}", child_uuid.simple()))
}

/// Whether `name` is a note about a child of the layer file `parent_file`.
fn is_note_of(name: &str, parent_file: &str) -> bool {
    note_subject(name) == Some(parent_file)
}

/// Whether `name` is a note about any layer's child (not a layer itself).
pub fn is_note(name: &str) -> bool {
    note_subject(name).is_some()
}

/// The layer file name a note named `name` is about.
fn note_subject(name: &str) -> Option<&str> {
    let (subject, uuid) = name.strip_prefix('.')?.rsplit_once(".child-")?;
    Uuid::try_parse(uuid).ok().map(|_| subject)
}

/// Removes the notes beside `layer`, which has just been removed.
pub fn remove_all(env: &dyn Env, layer: &Path) {
    let Some(file) = layer.file_name().map(|f| f.to_string_lossy().into_owned()) else {
        return;
    };
    let dir = parent_dir(layer);
    for p in env.list_dir(&dir).unwrap_or_default() {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if note_subject(&name) == Some(file.as_str()) {
            let _ = env.remove(&p);
        }
    }
}

/// `child`'s absolute path, whether or not it exists yet: its directory
/// resolved, its file name kept.
fn absolute(env: &dyn Env, child: &Path) -> Result<PathBuf> {
    let dir = parent_dir(child);
    match env.identity(&dir) {
        Ok(dir) => Ok(dir.join(child.file_name().unwrap_or_default())),
        // An environment without directories of its own (the simulator):
        // its names are already whole.
        Err(_) if child.is_relative() && !env.exists(&dir) => Ok(child.to_path_buf()),
        Err(e) => Err(io_at(&dir)(e)),
    }
}

/// Notes beside `parent` that `child` (uuid `child_uuid`) stands on it.
/// Written whole or not at all (a temporary file renamed into place).
/// Returns the note's path.
pub fn record(env: &dyn Env, parent: &Path, child: &Path, child_uuid: Uuid) -> Result<PathBuf> {
    let target = absolute(env, child)?;
    let note = note_path(parent, child_uuid);
    let bytes = target.as_os_str().as_encoded_bytes();
    let tmp = sibling(&note, format!(".tmp-{}", Uuid::new_v4().simple()));
    let written = (|| {
        let f = env.create(&tmp)?;
        f.write_at(bytes, 0)?;
        f.sync_data()?;
        env.rename(&tmp, &note)?;
        env.sync_dir(&parent_dir(&note))
    })();
    if let Err(e) = written {
        let _ = env.remove(&tmp);
        return Err(io_at(&note)(e));
    }
    Ok(note)
}

/// Takes back a note [`record`] wrote for a layer that was not made after
/// all (best effort: a note naming nothing is pruned later anyway).
pub fn forget(env: &dyn Env, note: &Path) {
    let _ = env.remove(note);
}

/// [`record`] when the note is missing: called by whoever opens `child`
/// for writing, so layers made before notes existed (or moved since) are
/// known from then on. A parent whose directory this process may not
/// write is left as it is, with a warning: nobody without that right can
/// delete the parent either.
pub fn ensure_recorded(env: &dyn Env, parent: &Path, child: &Path, child_uuid: Uuid) {
    let note = note_path(parent, child_uuid);
    let current = read_note(env, &note);
    let wanted = absolute(env, child).ok();
    if current.is_some() && current == wanted {
        return;
    }
    if let Err(e) = record(env, parent, child, child_uuid) {
        warn!(parent = %parent.display(), child = %child.display(), error = %e,
            "could not note a layer beside its parent; it is found there only from its own directory");
    }
}

/// The path a note holds, if it can be read.
fn read_note(env: &dyn Env, note: &Path) -> Option<PathBuf> {
    let f = env.open(note, false).ok()?;
    let len = f.len().ok()?;
    if len == 0 || len > MAX_NOTE {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    f.read_at(&mut buf, 0).ok()?;
    let s = String::from_utf8(buf).ok()?;
    Some(PathBuf::from(s))
}

/// Whether the layer at `p` names `me` (uuid `my_uuid`, identity `my_id`)
/// as its parent: by uuid (or the uuid a commit into it will give it) and
/// by path.
fn stands_on(env: &dyn Env, l: &Layer, my_uuid: Uuid, my_id: &Path) -> bool {
    let Some(parent) = l.parent_path() else {
        return false;
    };
    (l.header.parent_uuid == Some(my_uuid) || l.header.parent_uuid_next == Some(my_uuid))
        && env.identity(&parent).ok().as_deref() == Some(my_id)
}

/// The layers whose parent `layer` is, by path and uuid, wherever they
/// are: those in its own directory and those its notes name. Who would
/// break if it changed or went away. A note naming nothing, or a layer
/// that stands elsewhere now, is removed; a note naming a file that is
/// not a readable layer is kept and that file counted (it may be a
/// damaged clone: refusing is the safe side). Call with `layer` locked
/// exclusive, so no clone is being made on it meanwhile.
pub fn find(env: &dyn Env, layer: &Path) -> Result<Vec<PathBuf>> {
    let me = Layer::open(env, layer, false)?;
    let my_id = env.identity(layer).map_err(io_at(layer))?;
    let my_file = layer
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let dir = parent_dir(layer);
    let mut out: Vec<PathBuf> = Vec::new();
    let mut ids: Vec<PathBuf> = Vec::new();
    let mut add = |env: &dyn Env, p: PathBuf| {
        let id = env.identity(&p).unwrap_or_else(|_| p.clone());
        if id != my_id && !ids.contains(&id) {
            ids.push(id);
            out.push(p);
        }
    };
    let mut notes = Vec::new();
    for p in env.list_dir(&dir).map_err(io_at(&dir))? {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if is_note_of(&name, &my_file) {
            notes.push(p);
            continue;
        }
        // A note about a layer that was removed by hand names nothing.
        if let Some(subject) = note_subject(&name) {
            if !env.exists(&dir.join(subject)) {
                let _ = env.remove(&p);
            }
            continue;
        }
        if name.starts_with('.') {
            continue;
        }
        let Ok(l) = Layer::open(env, &p, false) else {
            continue;
        };
        if stands_on(env, &l, me.header.uuid, &my_id) {
            add(env, p);
        }
    }
    for note in notes {
        let Some(target) = read_note(env, &note) else {
            // Unreadable or empty: a write cut short. Nothing to go by.
            let _ = env.remove(&note);
            continue;
        };
        if !env.exists(&target) {
            let _ = env.remove(&note);
            continue;
        }
        match Layer::open(env, &target, false) {
            Ok(l) if stands_on(env, &l, me.header.uuid, &my_id) => add(env, target),
            Ok(_) => {
                let _ = env.remove(&note);
            }
            Err(_) => add(env, target),
        }
    }
    Ok(out)
}
