//! Random sequences of chain operations on a family of images (create,
//! write, snapshot, clone, commit, rebase, snapshot delete and revert):
//! after every step, every image that opened before still opens and reads
//! what it read before, except where the step meant to change it (the
//! parent a commit goes into, the top a revert resets, the snapshot a
//! delete removes). A refused step changes nothing at all.
//! `FAMILY_SEQUENCES` and `FAMILY_SEED` run more or other sequences.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image_format::{ops, Disk, Env, Layer, RealEnv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 256 << 10;
const BLOCK: u64 = 4096;
const STEPS: usize = 30;

fn env() -> Arc<dyn Env> {
    Arc::new(RealEnv)
}

fn read_all(path: &Path) -> Result<Vec<u8>, String> {
    let d = Disk::open_path(path, false).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; d.virtual_size() as usize];
    d.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(buf)
}

struct Family {
    dir: tempfile::TempDir,
    /// Every image that opened, with what it must read.
    model: BTreeMap<PathBuf, Vec<u8>>,
    next: usize,
}

impl Family {
    fn paths(&self) -> Vec<PathBuf> {
        self.model.keys().cloned().collect()
    }

    fn pick(&self, rng: &mut StdRng, want_sealed: Option<bool>) -> Option<PathBuf> {
        let all: Vec<PathBuf> = self
            .paths()
            .into_iter()
            .filter(|p| match want_sealed {
                None => true,
                Some(s) => Layer::open(&RealEnv, p, false).is_ok_and(|l| l.header.sealed() == s),
            })
            .collect();
        (!all.is_empty()).then(|| all[rng.gen_range(0..all.len())].clone())
    }

    fn new_name(&mut self) -> PathBuf {
        self.next += 1;
        self.dir.path().join(format!("d{}.img", self.next))
    }

    /// A writable top with snapshots, one of their names, and its file.
    fn pick_snapshot(&self, rng: &mut StdRng) -> Option<(PathBuf, String, PathBuf)> {
        let top = self.pick(rng, Some(false))?;
        let list = ops::snapshot_list(&RealEnv, &top).unwrap_or_default();
        if list.is_empty() {
            return None;
        }
        let s = list[rng.gen_range(0..list.len())].clone();
        Some((top, s.name, s.path))
    }

    /// One random step: what it did, and the model's changes if it worked.
    fn step(&mut self, rng: &mut StdRng) -> String {
        let env = env();
        match rng.gen_range(0..9) {
            0 => {
                let p = self.new_name();
                if ops::create(env.as_ref(), &p, Some(SIZE), BLOCK as u32, None).is_ok() {
                    self.model.insert(p.clone(), vec![0; SIZE as usize]);
                }
                format!("create {}", p.display())
            }
            1 | 2 => {
                let Some(p) = self.pick(rng, Some(false)) else {
                    return "write: nothing writable".into();
                };
                let at = rng.gen_range(0..SIZE / 512) * 512;
                let len = rng.gen_range(1..=(SIZE - at).min(20_000) as usize);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let r = Disk::open_path(&p, true).and_then(|mut d| {
                    d.write_at(&data, at)?;
                    d.close()
                });
                if r.is_ok() {
                    let m = self.model.get_mut(&p).expect("modelled");
                    m[at as usize..at as usize + len].copy_from_slice(&data);
                }
                format!(
                    "write {}+{len} to {} ({:?})",
                    at,
                    p.display(),
                    r.err().map(|e| e.to_string())
                )
            }
            3 => {
                let Some(p) = self.pick(rng, Some(false)) else {
                    return "snapshot: no top".into();
                };
                let name = format!("s{}", rng.gen_range(0..4));
                let r = ops::snapshot_create(env.as_ref(), &p, &name);
                if let Ok(snap) = &r {
                    let content = self.model[&p].clone();
                    self.model.insert(snap.clone(), content);
                }
                format!(
                    "snapshot -c {name} {} ({:?})",
                    p.display(),
                    r.err().map(|e| e.to_string())
                )
            }
            4 => {
                let Some(base) = self.pick(rng, Some(true)) else {
                    return "clone: no snapshot".into();
                };
                let new = self.new_name();
                let r = ops::clone(env.as_ref(), &base, &new);
                if r.is_ok() {
                    let content = self.model[&base].clone();
                    self.model.insert(new.clone(), content);
                }
                format!(
                    "clone {} {} ({:?})",
                    base.display(),
                    new.display(),
                    r.err().map(|e| e.to_string())
                )
            }
            5 => {
                let Some(top) = self.pick(rng, None) else {
                    return "commit: nothing".into();
                };
                let parent = Layer::open(&RealEnv, &top, false)
                    .ok()
                    .and_then(|l| l.parent_path());
                let r = ops::commit(env.as_ref(), &top, false, &mut |_, _| {});
                if let (Ok(stats), Some(parent)) = (&r, parent) {
                    if stats.data_bytes + stats.zero_bytes > 0 {
                        if let Some(key) = self.key_of(&parent) {
                            let content = self.model[&top].clone();
                            self.model.insert(key, content);
                        }
                    }
                }
                format!(
                    "commit {} ({:?})",
                    top.display(),
                    r.err().map(|e| e.to_string())
                )
            }
            6 => {
                let Some(top) = self.pick(rng, Some(false)) else {
                    return "rebase: no top".into();
                };
                let base = if rng.gen_bool(0.3) {
                    None
                } else {
                    self.pick(rng, Some(true))
                };
                let r = ops::rebase(&env, &top, base.as_deref(), false, false, &mut |_, _| {});
                format!(
                    "rebase -b {:?} {} ({:?})",
                    base.as_ref().map(|b| b.display().to_string()),
                    top.display(),
                    r.err().map(|e| e.to_string())
                )
            }
            7 => {
                let Some((top, name, snap)) = self.pick_snapshot(rng) else {
                    return "snapshot -d: no top with snapshots".into();
                };
                // Its key while its file still exists.
                let key = self.key_of(&snap);
                let r = ops::snapshot_delete(&env, &top, &name, &mut |_, _| {});
                if let (Ok(()), Some(key)) = (&r, key) {
                    self.model.remove(&key);
                }
                format!(
                    "snapshot -d {name} {} ({:?})",
                    top.display(),
                    r.err().map(|e| e.to_string())
                )
            }
            _ => {
                let Some((top, name, snap)) = self.pick_snapshot(rng) else {
                    return "snapshot -a: no top with snapshots".into();
                };
                let r = ops::snapshot_apply(env.as_ref(), &top, &name);
                if r.is_ok() {
                    if let Some(content) = self.key_of(&snap).map(|k| self.model[&k].clone()) {
                        self.model.insert(top.clone(), content);
                    }
                }
                format!(
                    "snapshot -a {name} {} ({:?})",
                    top.display(),
                    r.err().map(|e| e.to_string())
                )
            }
        }
    }

    /// The model's key for a path as a layer names it (relative or not).
    fn key_of(&self, p: &Path) -> Option<PathBuf> {
        let want = std::fs::canonicalize(p).ok()?;
        self.model
            .keys()
            .find(|k| std::fs::canonicalize(k).ok().as_ref() == Some(&want))
            .cloned()
    }

    fn verify(&self, after: &str, seed: u64, history: &[String]) {
        for (p, want) in &self.model {
            match read_all(p) {
                Ok(got) => assert!(
                    &got == want,
                    "seed {seed}: {} reads other data after {after}\nhistory:\n{}",
                    p.display(),
                    history.join("\n")
                ),
                Err(e) => panic!(
                    "seed {seed}: {} no longer opens after {after}: {e}\nhistory:\n{}",
                    p.display(),
                    history.join("\n")
                ),
            }
        }
    }
}

#[test]
fn no_sequence_of_chain_operations_breaks_an_image_it_did_not_mean_to_change() {
    let sequences: u64 = std::env::var("FAMILY_SEQUENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let first: u64 = std::env::var("FAMILY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut steps_run = 0;
    // (verb, worked) -> count: proof the sequences do more than get refused.
    let mut outcomes: BTreeMap<(String, bool), u64> = BTreeMap::new();
    for seed in first..first + sequences {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fam = Family {
            dir: tempfile::tempdir().expect("tempdir"),
            model: BTreeMap::new(),
            next: 0,
        };
        let mut history = Vec::new();
        for _ in 0..STEPS {
            let what = fam.step(&mut rng);
            if what.ends_with(')') {
                let verb = what.split_whitespace().take(2).collect::<Vec<_>>();
                let verb = if verb[0] == "snapshot" {
                    verb.join(" ")
                } else {
                    verb[0].to_string()
                };
                *outcomes
                    .entry((verb, what.ends_with("(None)")))
                    .or_default() += 1;
            }
            history.push(what.clone());
            fam.verify(&what, seed, &history);
            steps_run += 1;
        }
    }
    eprintln!("{sequences} sequences, {steps_run} steps, every image checked after each");
    for ((verb, worked), n) in &outcomes {
        eprintln!("  {verb}: {n} {}", if *worked { "done" } else { "refused" });
    }
    if first == 1 && sequences >= 60 {
        for verb in [
            "write",
            "snapshot -c",
            "clone",
            "commit",
            "rebase",
            "snapshot -d",
            "snapshot -a",
        ] {
            assert!(
                outcomes
                    .get(&(verb.to_string(), true))
                    .is_some_and(|&n| n > 0),
                "no {verb} ever went through: the sequences test nothing there"
            );
        }
    }
}
