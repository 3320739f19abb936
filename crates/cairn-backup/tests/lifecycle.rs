//! Prune and garbage collection on a real store and a local repository: space comes back only
//! through the two GC phases, never from under a running backup, and every backup that was not
//! pruned still restores byte-identical. Ends with a property test of random sequences (write,
//! checkpoint, backup, prune, gc, restore) against a model.
#![allow(missing_docs)]

use std::collections::HashMap;
use std::path::Path;

use cairn_backup::create::{create, Source};
use cairn_backup::gc::gc;
use cairn_backup::prune::{prune, KeepPolicy, Mark};
use cairn_backup::restore::restore;
use cairn_backup::session::{gc_lock, Session};
use cairn_backup::sink::VolumeSink;
use cairn_backup::verify::verify;
use cairn_backup::{Access, BackupError, Location, Manifest, Repository, S3Options};
use cairn_engine::{Options, Store, Target};
use proptest::prelude::*;

mod common;
use common::noise;

fn plain(dir: &Path) -> Access {
    Access {
        location: Location::Local {
            path: dir.join("repo"),
        },
        passphrase: None,
        s3: S3Options::default(),
    }
}

fn store(dir: &Path) -> Store {
    let p = dir.join("store");
    Store::init(&p, Options::default()).expect("init");
    Store::open(&p, Options::default()).expect("open")
}

fn backup(repo: &Repository, s: &Store, vol: &str, cp: &str) -> Manifest {
    let src = Source::volume(s, "st", vol, cp);
    create(repo, &src, &mut |_| {}).expect("backup")
}

fn restored(repo: &Repository, s: &Store, id: &str, name: &str) -> Vec<u8> {
    let m = repo.manifest(id).expect("manifest");
    let size = m.images[0].size;
    s.create_volume(name, size).expect("vol");
    let mut sink = VolumeSink {
        store: s,
        volume: name.into(),
    };
    restore(repo, &m, 0, &mut sink, &mut |_| {}).expect("restore");
    let mut buf = vec![0u8; size as usize];
    s.read(&Target::head(name), 0, &mut buf).expect("read");
    s.delete_volume(name).expect("delete");
    buf
}

fn read(s: &Store, t: &Target, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    s.read(t, 0, &mut buf).expect("read");
    buf
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    noise(u64::from(seed), len)
}

fn repo_bytes(dir: &Path) -> u64 {
    fn du(p: &Path) -> u64 {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => du(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
    }
    du(&dir.join("repo/data"))
}

#[test]
fn prune_then_two_gc_runs_free_space_and_keep_the_rest() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let size = 4u64 << 20;
    s.create_volume("v", size).expect("vol");
    let repo = Repository::init(&plain(dir.path()), false).expect("repo");
    let mut ids = Vec::new();
    for i in 0..4u8 {
        s.write("v", 0, &pattern(i, size as usize))
            .expect("rewrite all");
        s.create_checkpoint("v", &format!("c{i}"), None)
            .expect("cp");
        ids.push(backup(&repo, &s, "v", &format!("c{i}")).id);
    }
    let full = repo_bytes(dir.path());
    let keep_last = KeepPolicy {
        last: 1,
        ..KeepPolicy::default()
    };
    let dry = prune(&repo, &|_| true, &keep_last, true).expect("dry run");
    assert_eq!(dry.iter().filter(|e| e.mark == Mark::Remove).count(), 3);
    assert_eq!(
        repo.backups().expect("list").len(),
        4,
        "a dry run removes nothing"
    );
    prune(&repo, &|_| true, &keep_last, false).expect("prune");
    assert_eq!(repo.backups().expect("list").len(), 1);

    let first = gc(&repo, 0, &mut |_| {}).expect("gc 1");
    assert_eq!(first.packs_deleted, 0, "the first run only condemns");
    assert!(first.condemned >= 3, "{first:?}");
    assert_eq!(repo_bytes(dir.path()), full);
    let second = gc(&repo, 0, &mut |_| {}).expect("gc 2");
    assert!(
        second.packs_deleted >= 3 && second.bytes_freed > 0,
        "{second:?}"
    );
    assert!(repo_bytes(dir.path()) < full / 3, "space came back");
    let third = gc(&repo, 0, &mut |_| {}).expect("gc 3");
    assert_eq!((third.condemned, third.packs_deleted), (0, 0), "{third:?}");

    let report = verify(&repo, None, 100.0, &mut |_| {}).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let last = ids.last().expect("one");
    assert!(restored(&repo, &s, last, "r") == read(&s, &Target::checkpoint("v", "c3"), size));
}

#[test]
fn gc_waits_for_backups_that_started_before_it_condemned() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    s.create_volume("v", 1 << 20).expect("vol");
    s.write("v", 0, &pattern(1, 1 << 20)).expect("write");
    s.create_checkpoint("v", "a", None).expect("cp");
    let repo = Repository::init(&plain(dir.path()), false).expect("repo");
    let m = backup(&repo, &s, "v", "a");
    repo.backend()
        .delete(&format!("backups/{}", m.id))
        .expect("prune it by hand");

    // A backup on another host starts, then GC condemns the old data.
    let writer = Session::begin(&repo, "backup other@x").expect("session");
    let first = gc(&repo, 0, &mut |_| {}).expect("gc 1");
    assert!(first.condemned > 0);
    let second = gc(&repo, 0, &mut |_| {}).expect("gc 2");
    assert_eq!(
        second.packs_deleted, 0,
        "a live writer that started earlier holds it"
    );
    assert!(
        second
            .waiting_for
            .iter()
            .any(|w| w.contains("backup other@x")),
        "{second:?}"
    );
    drop(writer);
    let third = gc(&repo, 0, &mut |_| {}).expect("gc 3");
    assert!(third.packs_deleted > 0, "{third:?}");

    // One GC at a time.
    let held = gc_lock(&repo).expect("lock");
    let e = gc(&repo, 0, &mut |_| {}).expect_err("busy");
    assert!(
        matches!(e, BackupError::Busy(_)) && e.to_string().contains("another garbage collection"),
        "{e}"
    );
    drop(held);
    gc(&repo, 0, &mut |_| {}).expect("free again");
}

#[test]
fn a_backup_does_not_reuse_condemned_chunks() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let size = 2u64 << 20;
    s.create_volume("v", size).expect("vol");
    s.write("v", 0, &pattern(9, size as usize)).expect("write");
    s.create_checkpoint("v", "a", None).expect("cp");
    let repo = Repository::init(&plain(dir.path()), false).expect("repo");
    let old = backup(&repo, &s, "v", "a");
    repo.backend()
        .delete(&format!("backups/{}", old.id))
        .expect("pruned");
    gc(&repo, 0, &mut |_| {}).expect("condemns the old packs");
    // The same data again: its chunks sit in condemned packs, so they are stored anew.
    let again = backup(&repo, &s, "v", "a");
    assert!(
        again.stats.new_chunks > 0 && again.stats.reused_chunks == 0,
        "{:?}",
        again.stats
    );
    let r = gc(&repo, 0, &mut |_| {}).expect("deletes the old packs");
    assert!(r.packs_deleted > 0, "{r:?}");
    assert!(restored(&repo, &s, &again.id, "r") == read(&s, &Target::checkpoint("v", "a"), size));
    assert!(verify(&repo, None, 100.0, &mut |_| {})
        .expect("verify")
        .problems
        .is_empty());
}

#[derive(Debug, Clone)]
enum Step {
    Write { block: u64, blocks: u64, seed: u8 },
    Zero { block: u64, blocks: u64 },
    Checkpoint,
    Backup,
    Prune { last: u32 },
    Gc,
    Restore { which: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u64..60, 1u64..12, any::<u8>()).prop_map(|(block, blocks, seed)| Step::Write { block, blocks, seed }),
        1 => (0u64..60, 1u64..20).prop_map(|(block, blocks)| Step::Zero { block, blocks }),
        2 => Just(Step::Checkpoint),
        3 => Just(Step::Backup),
        1 => (1u32..3).prop_map(|last| Step::Prune { last }),
        2 => Just(Step::Gc),
        2 => (0usize..8).prop_map(|which| Step::Restore { which }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Every backup not pruned restores to exactly the bytes its checkpoint had when it was
    /// backed up (the model), through any sequence of writes, checkpoints, backups, prunes and
    /// GCs; and the repository always verifies clean.
    #[test]
    fn every_backup_not_pruned_restores_byte_identical(steps in prop::collection::vec(step(), 1..40)) {
        const BLOCKS: u64 = 64;
        let size = BLOCKS * 4096;
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(dir.path());
        s.create_volume("v", size).expect("vol");
        let repo = Repository::init(&plain(dir.path()), false).expect("repo");
        let mut head = vec![0u8; size as usize];
        let mut checkpoints: Vec<(String, Vec<u8>)> = Vec::new();
        let mut model: HashMap<String, Vec<u8>> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        for st in steps {
            match st {
                Step::Write { block, blocks, seed } => {
                    let blocks = blocks.min(BLOCKS - block);
                    let data = pattern(seed, (blocks * 4096) as usize);
                    s.write("v", block * 4096, &data).expect("write");
                    head[(block * 4096) as usize..((block + blocks) * 4096) as usize].copy_from_slice(&data);
                }
                Step::Zero { block, blocks } => {
                    let blocks = blocks.min(BLOCKS - block);
                    s.write_zeroes("v", block * 4096, blocks * 4096).expect("zero");
                    head[(block * 4096) as usize..((block + blocks) * 4096) as usize].fill(0);
                }
                Step::Checkpoint => {
                    let name = format!("c{}", checkpoints.len());
                    s.create_checkpoint("v", &name, None).expect("cp");
                    checkpoints.push((name, head.clone()));
                }
                Step::Backup => {
                    if let Some((name, data)) = checkpoints.last() {
                        let m = backup(&repo, &s, "v", name);
                        model.insert(m.id.clone(), data.clone());
                        order.push(m.id);
                    }
                }
                Step::Prune { last } => {
                    let policy = KeepPolicy { last, ..KeepPolicy::default() };
                    for e in prune(&repo, &|_| true, &policy, false).expect("prune") {
                        if e.mark == Mark::Remove {
                            model.remove(&e.id);
                        }
                    }
                }
                Step::Gc => {
                    gc(&repo, 0, &mut |_| {}).expect("gc");
                }
                Step::Restore { which } => {
                    let live: Vec<&String> = order.iter().filter(|id| model.contains_key(*id)).collect();
                    if let Some(id) = live.get(which % live.len().max(1)) {
                        let got = restored(&repo, &s, id, "r");
                        prop_assert!(got == model[*id], "backup {} restored different bytes", id);
                    }
                }
            }
        }
        gc(&repo, 0, &mut |_| {}).expect("gc");
        gc(&repo, 0, &mut |_| {}).expect("gc");
        let listed: Vec<String> = repo.backups().expect("list").into_iter().map(|m| m.id).collect();
        prop_assert_eq!(listed.len(), model.len());
        for id in listed {
            prop_assert!(restored(&repo, &s, &id, "r") == model[&id], "backup {} after GC", id);
        }
        let v = verify(&repo, None, 100.0, &mut |_| {}).expect("verify");
        prop_assert!(v.problems.is_empty(), "{:?}", v.problems);
    }
}
