//! An in-memory filesystem that can lose power.
//!
//! Every file keeps its durable contents (as of its last `sync_data`) and the
//! writes made since. [`SimEnv::crash`] throws the volatile state away and
//! keeps, per file, a random subset of the unsynced writes, each possibly torn
//! at 512-byte sector boundaries, in any order: what a disk with a volatile
//! write cache may do on power loss. Directory operations are journaled in
//! order (as ext4 does): a crash keeps a random prefix of those not yet made
//! durable by `sync_dir`.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::storage::{Env, Storage};

const PAGE: u64 = 4096;
const SECTOR: u64 = 512;

type Pages = BTreeMap<u64, Box<[u8; PAGE as usize]>>;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
}

#[derive(Debug, Default, Clone)]
struct FileState {
    current: Pages,
    durable: Pages,
    len: u64,
    /// Operations since the last sync, in issue order.
    pending: Vec<Op>,
}

fn apply_write(pages: &mut Pages, offset: u64, data: &[u8]) {
    let mut at = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let page = at / PAGE;
        let in_page = (at % PAGE) as usize;
        let n = rest.len().min(PAGE as usize - in_page);
        let p = pages
            .entry(page)
            .or_insert_with(|| Box::new([0u8; PAGE as usize]));
        p[in_page..in_page + n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        at += n as u64;
    }
}

fn apply_punch(pages: &mut Pages, offset: u64, len: u64) {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let page = at / PAGE;
        let in_page = at % PAGE;
        let n = (end - at).min(PAGE - in_page);
        if in_page == 0 && n == PAGE {
            pages.remove(&page);
        } else if let Some(p) = pages.get_mut(&page) {
            p[in_page as usize..(in_page + n) as usize].fill(0);
        }
        at += n;
    }
}

fn read_pages(pages: &Pages, buf: &mut [u8], offset: u64) {
    let mut at = offset;
    let mut done = 0;
    while done < buf.len() {
        let page = at / PAGE;
        let in_page = (at % PAGE) as usize;
        let n = (buf.len() - done).min(PAGE as usize - in_page);
        match pages.get(&page) {
            Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
            None => buf[done..done + n].fill(0),
        }
        done += n;
        at += n as u64;
    }
}

#[derive(Debug, Clone)]
enum DirOp {
    Bind(PathBuf, u64),
    Unbind(PathBuf),
}

#[derive(Debug)]
struct State {
    files: HashMap<u64, FileState>,
    names: HashMap<PathBuf, u64>,
    durable_names: HashMap<PathBuf, u64>,
    pending_dir: Vec<DirOp>,
    next_id: u64,
    rng: StdRng,
    /// Write syscalls issued, for the harness's report.
    writes: u64,
    /// Mutating calls left before the power goes out.
    countdown: Option<u64>,
    /// The power is out: every call fails until `crash`.
    dead: bool,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl State {
    /// Counts one mutating call; fails once the power is out.
    fn tick(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(power_lost());
        }
        if let Some(n) = self.countdown.as_mut() {
            if *n == 0 {
                self.dead = true;
                return Err(power_lost());
            }
            *n -= 1;
        }
        Ok(())
    }
}

/// The simulated filesystem. Cloning shares it.
#[derive(Debug, Clone)]
pub struct SimEnv {
    state: Arc<Mutex<State>>,
}

/// One simulated open file.
#[derive(Debug)]
pub struct SimFile {
    state: Arc<Mutex<State>>,
    id: u64,
    writable: bool,
}

/// Paths are compared lexically: "a/./b" and "a/b" are the same file.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl SimEnv {
    pub fn new(seed: u64) -> Self {
        SimEnv {
            state: Arc::new(Mutex::new(State {
                files: HashMap::new(),
                names: HashMap::new(),
                durable_names: HashMap::new(),
                pending_dir: Vec::new(),
                next_id: 1,
                rng: StdRng::seed_from_u64(seed),
                writes: 0,
                countdown: None,
                dead: false,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The power goes out after `n` more mutating calls (writes, punches,
    /// syncs, creates, renames, links, removes); `None` disarms.
    pub fn set_countdown(&self, n: Option<u64>) {
        self.lock().countdown = n;
    }

    /// Whether the countdown ran out.
    pub fn is_dead(&self) -> bool {
        self.lock().dead
    }

    /// Power loss. Open handles must not be used afterwards.
    pub fn crash(&self) {
        let mut st = self.lock();
        st.dead = false;
        st.countdown = None;
        let State {
            files,
            names,
            durable_names,
            pending_dir,
            rng,
            ..
        } = &mut *st;
        // A random prefix of the journaled directory operations survives.
        let keep = rng.gen_range(0..=pending_dir.len());
        for op in pending_dir.drain(..).take(keep) {
            match op {
                DirOp::Bind(p, id) => {
                    durable_names.insert(p, id);
                }
                DirOp::Unbind(p) => {
                    durable_names.remove(&p);
                }
            }
        }
        *names = durable_names.clone();
        for f in files.values_mut() {
            let mut pages = f.durable.clone();
            let mut ops = std::mem::take(&mut f.pending);
            // The cache may write back in any order, any subset, torn per sector.
            for i in (1..ops.len()).rev() {
                let j = rng.gen_range(0..=i);
                ops.swap(i, j);
            }
            for op in ops {
                match op {
                    Op::Write { offset, data } => {
                        let mut s = 0u64;
                        while s < data.len() as u64 {
                            let sector_end = ((offset + s) / SECTOR + 1) * SECTOR;
                            let n = (sector_end - (offset + s)).min(data.len() as u64 - s);
                            if rng.gen_bool(0.5) {
                                apply_write(
                                    &mut pages,
                                    offset + s,
                                    &data[s as usize..(s + n) as usize],
                                );
                            }
                            s += n;
                        }
                    }
                    Op::Punch { offset, len } => {
                        if rng.gen_bool(0.5) {
                            apply_punch(&mut pages, offset, len);
                        }
                    }
                }
            }
            f.durable = pages.clone();
            f.current = pages;
        }
    }

    /// Write calls issued so far.
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }

    /// Names that exist now, for tests.
    pub fn list(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = self.lock().names.keys().cloned().collect();
        v.sort();
        v
    }
}

impl Env for SimEnv {
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let dir = normalize(dir);
        let dir = if dir.as_os_str() == "." {
            PathBuf::new()
        } else {
            dir
        };
        let mut v: Vec<PathBuf> = self
            .lock()
            .names
            .keys()
            .filter(|p| p.parent().unwrap_or(Path::new("")) == dir)
            .cloned()
            .collect();
        v.sort();
        Ok(v)
    }
    fn open(&self, path: &Path, writable: bool) -> io::Result<Arc<dyn Storage>> {
        let st = self.lock();
        let id = *st
            .names
            .get(&normalize(path))
            .ok_or_else(|| not_found(path))?;
        Ok(Arc::new(SimFile {
            state: self.state.clone(),
            id,
            writable,
        }))
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn Storage>> {
        let mut st = self.lock();
        st.tick()?;
        let path = normalize(path);
        let id = st.next_id;
        st.next_id += 1;
        st.files.insert(id, FileState::default());
        st.names.insert(path.clone(), id);
        st.pending_dir.push(DirOp::Bind(path, id));
        Ok(Arc::new(SimFile {
            state: self.state.clone(),
            id,
            writable: true,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let (from, to) = (normalize(from), normalize(to));
        let id = st.names.remove(&from).ok_or_else(|| not_found(&from))?;
        st.names.insert(to.clone(), id);
        // Journaled as one transaction: a rename is atomic.
        st.pending_dir.push(DirOp::Bind(to, id));
        st.pending_dir.push(DirOp::Unbind(from));
        Ok(())
    }
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let (from, to) = (normalize(from), normalize(to));
        let id = *st.names.get(&from).ok_or_else(|| not_found(&from))?;
        if st.names.contains_key(&to) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists", to.display()),
            ));
        }
        st.names.insert(to.clone(), id);
        st.pending_dir.push(DirOp::Bind(to, id));
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let path = normalize(path);
        st.names.remove(&path).ok_or_else(|| not_found(&path))?;
        st.pending_dir.push(DirOp::Unbind(path));
        Ok(())
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.tick()?;
        let ops = std::mem::take(&mut st.pending_dir);
        for op in ops {
            match op {
                DirOp::Bind(p, id) => {
                    st.durable_names.insert(p, id);
                }
                DirOp::Unbind(p) => {
                    st.durable_names.remove(&p);
                }
            }
        }
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        self.lock().names.contains_key(&normalize(path))
    }
    fn identity(&self, path: &Path) -> io::Result<PathBuf> {
        let p = normalize(path);
        if self.lock().names.contains_key(&p) {
            Ok(p)
        } else {
            Err(not_found(path))
        }
    }
}

impl SimFile {
    fn with<R>(&self, f: impl FnOnce(&mut FileState, &mut u64) -> R) -> R {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { files, writes, .. } = &mut *st;
        let file = files.entry(self.id).or_default();
        f(file, writes)
    }

    /// Like `with`, for a call that changes the file: counts toward the
    /// power-loss countdown.
    fn mutate<R>(
        &self,
        f: impl FnOnce(&mut FileState, &mut u64) -> io::Result<R>,
    ) -> io::Result<R> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.tick()?;
        let State { files, writes, .. } = &mut *st;
        let file = files.entry(self.id).or_default();
        f(file, writes)
    }
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "file opened read-only",
            ))
        }
    }
}

impl Storage for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|f, _| {
            if offset + buf.len() as u64 > f.len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past end of file",
                ));
            }
            read_pages(&f.current, buf, offset);
            Ok(())
        })
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.mutate(|f, writes| {
            *writes += 1;
            apply_write(&mut f.current, offset, buf);
            f.len = f.len.max(offset + buf.len() as u64);
            f.pending.push(Op::Write {
                offset,
                data: buf.to_vec(),
            });
            Ok(())
        })
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.mutate(|f, _| {
            apply_punch(&mut f.current, offset, len);
            f.pending.push(Op::Punch { offset, len });
            Ok(())
        })
    }
    fn sync_data(&self) -> io::Result<()> {
        self.mutate(|f, _| {
            for op in std::mem::take(&mut f.pending) {
                match op {
                    Op::Write { offset, data } => apply_write(&mut f.durable, offset, &data),
                    Op::Punch { offset, len } => apply_punch(&mut f.durable, offset, len),
                }
            }
            Ok(())
        })
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.with(|f, _| f.len))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        // Size changes only happen when a layer is created, before its sync:
        // modelled as durable at once.
        self.mutate(|f, _| {
            f.len = len;
            Ok(())
        })
    }
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
        Ok(self.with(|f, _| {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for (&page, _) in f.current.range(start / PAGE..end.div_ceil(PAGE)) {
                let s = (page * PAGE).max(start);
                let e = ((page + 1) * PAGE).min(end);
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
            out
        }))
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_writes_survive_and_unsynced_names_may_vanish() {
        let env = SimEnv::new(7);
        let f = env.create(Path::new("a")).unwrap();
        f.set_len(8192).unwrap();
        f.write_at(&[1u8; 4096], 0).unwrap();
        f.sync_data().unwrap();
        env.sync_dir(Path::new(".")).unwrap();
        f.write_at(&[2u8; 4096], 4096).unwrap();
        env.crash();
        let f = env.open(Path::new("a"), false).unwrap();
        let mut b = [0u8; 4096];
        f.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1u8; 4096]);
        f.read_at(&mut b, 4096).unwrap();
        // Each sector is either written or not.
        for s in b.chunks(512) {
            assert!(s.iter().all(|&x| x == 0) || s.iter().all(|&x| x == 2));
        }
    }
}
