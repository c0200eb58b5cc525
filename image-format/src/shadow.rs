//! The crash shadow: a copy of a writable top layer's in-memory map in a
//! tmpfs file, kept current on every map change.
//!
//! The on-disk map only learns about writes at a flush (FORMAT.md). That is
//! the right contract for power loss, but a serving process that dies
//! (kill -9, a crash) would forget writes it already completed to the
//! kernel, and a frontend that reconnects to its successor would read old
//! data where it wrote. The shadow closes that gap: it outlives the process
//! and dies with the machine, exactly the lifetime of the page cache that
//! holds those writes. Its header names the layer and the boot, so a copy
//! from another layer or an earlier boot is never taken.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use uuid::Uuid;

const MAGIC: &[u8; 8] = b"SNAPSHDW";
const VERSION: u32 = 1;
/// The map starts here; the header page before it.
const MAP_AT: usize = 4096;
/// Bytes of the header that say whose shadow it is (magic, version, layer
/// uuid, boot id, map length).
const IDENTITY: usize = 76;
/// Where the image's path is kept (u16 length, then the bytes), so that a
/// later process can tell a shadow whose image is gone.
const PATH_AT: usize = 128;
const PATH_MAX: usize = MAP_AT - PATH_AT - 2;

pub struct MapShadow {
    path: PathBuf,
    mmap: MmapMut,
}

impl std::fmt::Debug for MapShadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapShadow")
            .field("path", &self.path)
            .finish()
    }
}

/// The kernel's id of this boot; a shadow from another boot is stale.
fn boot_id() -> [u8; 36] {
    let mut id = [b'?'; 36];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let s = s.trim().as_bytes();
        let n = s.len().min(36);
        id[..n].copy_from_slice(&s[..n]);
    }
    id
}

fn header(uuid: &Uuid, map_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(MAP_AT);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&[0u8; 4]);
    h.extend_from_slice(uuid.as_bytes());
    h.extend_from_slice(&boot_id());
    h.extend_from_slice(&(map_len as u64).to_le_bytes());
    h.resize(MAP_AT, 0);
    h
}

/// The crash shadows' directory when none is given, for a process that
/// serves as `uid`: one per user under /run (a tmpfs on a systemd host)
/// when started as root, else the user's runtime directory.
pub fn default_dir(uid: u32) -> Option<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Some(PathBuf::from(format!("/run/blk-backend/{uid}")));
    }
    std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("blk-backend"))
}

/// Makes `dir` (mode 0700, and its parents) if it is missing, then checks
/// it as [`check_dir`] does.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    check_dir(dir)
}

/// A shadow is the truth about where a layer's blocks are, so only its
/// serving user may have put it there: `dir` must be a real directory (not
/// a link) that nobody else may enter (no group or other bits: /dev/shm is
/// refused), owned by this user (or, as root, by the user it serves as).
pub fn check_dir(dir: &Path) -> io::Result<()> {
    let m = std::fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid();
    let why = if !m.is_dir() {
        Some("not a directory".to_string())
    } else if m.uid() != me.as_raw() && !me.is_root() {
        Some(format!(
            "owned by uid {}, not this user ({})",
            m.uid(),
            me.as_raw()
        ))
    } else if m.mode() & 0o077 != 0 {
        Some(format!("mode {:o}: others may reach it", m.mode() & 0o7777))
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: {why}; crash shadows need a directory only the serving user can reach (mode 0700)",
                dir.display()
            ),
        )),
    }
}

/// Whether an open shadow file may be believed: a regular file owned by
/// the owner of its directory (already checked: this user or root), not
/// readable or writable by anyone else.
fn trusted(file: &File, dir: &Path) -> io::Result<bool> {
    let m = file.metadata()?;
    let owner = std::fs::symlink_metadata(dir)?.uid();
    Ok(m.is_file() && (m.uid() == owner || m.uid() == 0) && m.mode() & 0o077 == 0)
}

fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

impl MapShadow {
    /// Where the shadow of layer `uuid` lives in `dir`.
    pub fn path_for(dir: &Path, uuid: &Uuid) -> PathBuf {
        dir.join(format!("snaplayer-{}.map", uuid.simple()))
    }

    /// The map a shadow at `path` holds, when it belongs to layer `uuid`,
    /// this boot, and a map of `map_len` bytes. `None` when there is none
    /// or it does not fit (a foreign file is left alone, not read as ours).
    pub fn load(path: &Path, uuid: &Uuid, map_len: usize) -> io::Result<Option<Vec<u8>>> {
        check_dir(dir_of(path))?;
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                tracing::warn!(
                    "{}: a symbolic link, not a crash shadow; ignored",
                    path.display()
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if !trusted(&file, dir_of(path))? {
            tracing::warn!(
                "{}: not a file only the serving user could have written; ignored",
                path.display()
            );
            return Ok(None);
        }
        let expected = header(uuid, map_len);
        let mut got = vec![0u8; MAP_AT];
        if file.read_exact(&mut got).is_err() || got[..IDENTITY] != expected[..IDENTITY] {
            tracing::warn!(
                "{}: not a crash shadow of this layer from this boot; ignored",
                path.display()
            );
            return Ok(None);
        }
        let mut map = vec![0u8; map_len];
        if file.read_exact(&mut map).is_err() {
            tracing::warn!("{}: truncated crash shadow; ignored", path.display());
            return Ok(None);
        }
        Ok(Some(map))
    }

    /// Writes a fresh shadow holding `map` (replacing any old one) and maps
    /// it for [`MapShadow::mirror`].
    pub fn create(path: &Path, uuid: &Uuid, map: &[u8], image: &Path) -> io::Result<MapShadow> {
        check_dir(dir_of(path))?;
        // A name nobody can have prepared, made here and now (not a link
        // followed, nothing opened that was there), readable by us alone.
        let tmp = path.with_extension(format!("map.tmp-{}", Uuid::new_v4().simple()));
        {
            let mut f = OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            let mut h = header(uuid, map.len());
            let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
            let bytes = image.as_os_str().as_encoded_bytes();
            if bytes.len() <= PATH_MAX {
                h[PATH_AT..PATH_AT + 2].copy_from_slice(&(bytes.len() as u16).to_le_bytes());
                h[PATH_AT + 2..PATH_AT + 2 + bytes.len()].copy_from_slice(bytes);
            }
            f.write_all(&h)?;
            f.write_all(map)?;
        }
        // Complete before it takes the name: a crash in between leaves the
        // previous shadow (or none), never half of this one.
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // SAFETY: a private file of this process in a tmpfs; nothing else
        // truncates it while mapped (a successor only reads it after we are
        // gone), so the mapping stays valid for its lifetime.
        let mmap = unsafe { MmapMut::map_mut(&file)? };
        if mmap.len() != MAP_AT + map.len() {
            return Err(io::Error::other("crash shadow changed size under us"));
        }
        Ok(MapShadow {
            path: path.to_path_buf(),
            mmap,
        })
    }

    /// Copies the map bytes that hold blocks `[first, first + count)`.
    pub fn mirror(&mut self, map: &[u8], first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let lo = (first / 4) as usize;
        let hi = (((first + count - 1) / 4) as usize + 1).min(map.len());
        if lo < hi {
            self.mmap[MAP_AT + lo..MAP_AT + hi].copy_from_slice(&map[lo..hi]);
        }
    }

    /// Whether `dir` is due a prune in this process: the first time, then
    /// at most once a minute. Pruning reads every shadow there, and a
    /// process serving a fleet opens one export per VM: pruning at each
    /// would cost the square of the fleet.
    pub fn prune_due(dir: &Path) -> bool {
        use std::collections::HashMap;
        use std::sync::Mutex;
        use std::time::{Duration, Instant};
        static LAST: Mutex<Option<HashMap<PathBuf, Instant>>> = Mutex::new(None);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let last = last.get_or_insert_with(HashMap::new);
        let now = Instant::now();
        match last.get(dir) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(60) => false,
            _ => {
                last.insert(dir.to_path_buf(), now);
                true
            }
        }
    }

    /// Deletes the shadows in `dir` that no process can ever adopt: from an
    /// earlier boot, or whose image is gone or is now another layer (a
    /// killed writer whose image was deleted leaves one behind). `layer_uuid`
    /// reads the uuid of the image at a path. Returns how many went.
    pub fn prune(dir: &Path, layer_uuid: impl Fn(&Path) -> Option<Uuid>) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let boot = boot_id();
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with("snaplayer-") && name.ends_with(".map")) {
                continue;
            }
            let mut h = vec![0u8; MAP_AT];
            let Ok(mut f) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(e.path())
            else {
                continue;
            };
            if f.read_exact(&mut h).is_err() || &h[..8] != MAGIC {
                continue;
            }
            let stale = if h[32..68] != boot {
                true
            } else {
                let len = u16::from_le_bytes([h[PATH_AT], h[PATH_AT + 1]]) as usize;
                if len == 0 || len > PATH_MAX {
                    false
                } else {
                    // SAFETY: bytes this module wrote from an OsStr.
                    let os = unsafe {
                        std::ffi::OsStr::from_encoded_bytes_unchecked(
                            &h[PATH_AT + 2..PATH_AT + 2 + len],
                        )
                    };
                    let image = Path::new(os);
                    let uuid = Uuid::from_slice(&h[16..32]).ok();
                    !image.exists() || layer_uuid(image).is_some_and(|u| Some(u) != uuid)
                }
            };
            if stale && std::fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Deletes the shadow (the on-disk map is complete).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_round_trips_and_refuses_other_layers_and_sizes() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("shadows");
        prepare_dir(&dir).expect("prepared");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let path = MapShadow::path_for(&dir, &a);
        let mut map = vec![0u8; 64];
        let image = dir.join("image");
        std::fs::write(&image, b"x").expect("image");
        let mut s = MapShadow::create(&path, &a, &map, &image).expect("create");
        map[3] = 0b0100_0001;
        s.mirror(&map, 12, 4);
        drop(s);
        let back = MapShadow::load(&path, &a, 64).expect("load").expect("some");
        assert_eq!(back, map);
        assert!(MapShadow::load(&path, &b, 64).expect("load").is_none());
        assert!(MapShadow::load(&path, &a, 65).expect("load").is_none());
        // Kept while its image is there and is that layer; pruned when
        // the image is gone or is another layer now.
        assert_eq!(MapShadow::prune(&dir, |_| Some(a)), 0);
        assert_eq!(MapShadow::prune(&dir, |_| Some(b)), 1);
        assert!(!path.exists());
        MapShadow::create(&path, &a, &map, &image).expect("create");
        std::fs::remove_file(&image).expect("rm");
        assert_eq!(MapShadow::prune(&dir, |_| Some(a)), 1);
        std::fs::write(&path, b"garbage").expect("write");
        assert!(MapShadow::load(&path, &a, 64).expect("load").is_none());
        assert_eq!(MapShadow::prune(&dir, |_| None), 0, "not ours: left alone");
    }

    /// Only the serving user can have put a shadow where it is believed
    /// (issue 28): a directory others may write is refused, and a planted
    /// link, a file of another user or one others may write is ignored.
    #[test]
    fn only_the_serving_user_s_shadows_are_believed() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("tempdir");
        let a = Uuid::new_v4();
        let map = vec![0b0101_0101u8; 64];
        let image = root.path().join("image");
        std::fs::write(&image, b"x").expect("image");

        // /dev/shm's kind of directory: refused, by name and reason.
        let open = root.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let err = MapShadow::create(&MapShadow::path_for(&open, &a), &a, &map, &image)
            .expect_err("refused");
        assert!(err.to_string().contains("others may reach it"), "{err}");
        let err = MapShadow::load(&MapShadow::path_for(&open, &a), &a, 64).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        // A link to a good directory is not one.
        let good = root.path().join("good");
        prepare_dir(&good).expect("prepared");
        assert_eq!(
            std::fs::metadata(&good).expect("stat").mode() & 0o777,
            0o700
        );
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&good, &link).expect("symlink");
        assert!(check_dir(&link).is_err());

        // A shadow of ours is believed ...
        let path = MapShadow::path_for(&good, &a);
        MapShadow::create(&path, &a, &map, &image).expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").mode() & 0o777,
            0o600
        );
        assert!(MapShadow::load(&path, &a, 64).expect("load").is_some());
        // ... not once others may write it ...
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(MapShadow::load(&path, &a, 64).expect("load").is_none());
        // ... nor as a link to a valid one ...
        let elsewhere = root.path().join("elsewhere.map");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::rename(&path, &elsewhere).expect("mv");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        assert!(MapShadow::load(&path, &a, 64).expect("load").is_none());
        // ... and a new shadow replaces the link, never writes through it.
        std::fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        let before = std::fs::read(&elsewhere).expect("read");
        MapShadow::create(&path, &a, &[0u8; 64], &image).expect("create");
        assert_eq!(std::fs::read(&elsewhere).expect("read"), before);
        assert!(!std::fs::symlink_metadata(&path).expect("stat").is_symlink());
        // A file another user owns (root can make one): ignored.
        if rustix::process::geteuid().is_root() {
            std::fs::remove_file(&path).expect("rm");
            std::fs::copy(&elsewhere, &path).expect("copy");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            rustix::fs::chown(&path, Some(rustix::process::Uid::from_raw(65534)), None)
                .expect("chown");
            assert!(MapShadow::load(&path, &a, 64).expect("load").is_none());
        }
    }
}
