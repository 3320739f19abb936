//! Crash tests: a workload runs on simulated disks whose power is cut at every N-th write or sync;
//! unsynced writes are then dropped, reordered and torn at 512-byte sectors. The store must reopen,
//! pass fsck, hold every acknowledged checkpoint exactly, show each head sector as some value it had
//! at or after the last acknowledged flush, and keep working afterwards.
//!
//! CI runs a few thousand crash points; `cargo test --test crash -- --ignored` runs the long version.
#![allow(missing_docs)]

mod common;

use cairn_engine::device::{PowerSupply, SimDevice};
use cairn_engine::{Store, Target};
use common::BS;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

/// Crash points that left a tree half freed: the campaign must hit some, or it proves nothing
/// about resuming a free.
static INTERRUPTED_FREES: AtomicU64 = AtomicU64::new(0);

const VOL: &str = "v";
const BLOCKS: u64 = 600;
const SECTOR: usize = 512;

#[derive(Clone, Debug)]
enum COp {
    Write { off: u64, len: u64, tag: u32 },
    Zero { off: u64, len: u64 },
    Flush,
    Checkpoint(String),
    Delete(String),
    Apply(String),
}

fn workload(seed: u64, n: usize) -> Vec<COp> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ops = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for i in 0..n {
        let size = BLOCKS * BS;
        let op = match rng.random_range(0..20) {
            0..=9 => {
                let off = rng.random_range(0..size / 512) * 512;
                let len = (rng.random_range(1..=24u64) * 512).min(size - off);
                COp::Write {
                    off,
                    len,
                    tag: i as u32 + 1,
                }
            }
            10 => {
                let off = rng.random_range(0..size / 512) * 512;
                let len = (rng.random_range(1..=200u64) * 512).min(size - off);
                COp::Zero { off, len }
            }
            11..=12 => COp::Flush,
            13..=15 => {
                let n = format!("c{i}");
                names.push(n.clone());
                COp::Checkpoint(n)
            }
            16..=17 if !names.is_empty() => {
                let k = rng.random_range(0..names.len());
                COp::Delete(names.remove(k))
            }
            _ if !names.is_empty() => COp::Apply(names[rng.random_range(0..names.len())].clone()),
            _ => COp::Flush,
        };
        ops.push(op);
    }
    ops
}

fn pattern(tag: u32, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    for (i, s) in v.chunks_mut(SECTOR).enumerate() {
        let id = ((tag as u64) << 32) | ((off / SECTOR as u64) + i as u64);
        for c in s.chunks_mut(8) {
            c.copy_from_slice(&id.to_le_bytes());
        }
    }
    v
}

/// What the workload has been told, which is what must survive.
#[derive(Default)]
struct Expect {
    head: Vec<u8>,
    /// The head at the last acknowledged commit point.
    base: Vec<u8>,
    /// Every value each sector took since then.
    changed: HashMap<usize, Vec<Vec<u8>>>,
    checkpoints: BTreeMap<String, Vec<u8>>,
    /// Checkpoints an interrupted operation may or may not have left (with their content).
    maybe: BTreeMap<String, Vec<u8>>,
}

impl Expect {
    fn committed(&mut self) {
        self.base = self.head.clone();
        self.changed.clear();
    }

    /// The head may now also hold `state` (or still any earlier value since the commit point).
    fn may_hold(&mut self, state: &[u8], range: std::ops::Range<usize>) {
        for i in range.start / SECTOR..range.end.div_ceil(SECTOR) {
            let r = i * SECTOR..(i + 1) * SECTOR;
            if state[r.clone()] != self.base[r.clone()] {
                self.changed.entry(i).or_default().push(state[r].to_vec());
            }
        }
    }

    fn head_sector_ok(&self, i: usize, sec: &[u8]) -> bool {
        self.base[i * SECTOR..(i + 1) * SECTOR] == *sec
            || self
                .changed
                .get(&i)
                .is_some_and(|v| v.iter().any(|x| x[..] == *sec))
    }
}

/// Runs `ops`, updating `exp` as each is acknowledged; stops at the first failure (power cut).
fn execute(store: &Store, ops: &[COp], exp: &mut Expect) -> bool {
    for op in ops {
        match op {
            COp::Write { off, len, tag } => {
                let data = pattern(*tag, *off, *len);
                let r = *off as usize..(*off + *len) as usize;
                exp.head[r.clone()].copy_from_slice(&data);
                let head = std::mem::take(&mut exp.head);
                exp.may_hold(&head, r);
                exp.head = head;
                if store.write(VOL, *off, &data).is_err() {
                    return false;
                }
            }
            COp::Zero { off, len } => {
                let r = *off as usize..(*off + *len) as usize;
                exp.head[r.clone()].fill(0);
                let head = std::mem::take(&mut exp.head);
                exp.may_hold(&head, r);
                exp.head = head;
                if store.write_zeroes(VOL, *off, *len).is_err() {
                    return false;
                }
            }
            COp::Flush => {
                if store.flush().is_err() {
                    return false;
                }
                exp.committed();
            }
            COp::Checkpoint(n) => {
                if store.create_checkpoint(VOL, n, None).is_err() {
                    exp.maybe.insert(n.clone(), exp.head.clone());
                    return false;
                }
                exp.checkpoints.insert(n.clone(), exp.head.clone());
                exp.committed();
            }
            COp::Delete(n) => {
                let content = exp
                    .checkpoints
                    .remove(n)
                    .expect("workload deletes existing");
                if store.delete_checkpoint(VOL, n).is_err() {
                    exp.maybe.insert(n.clone(), content);
                    return false;
                }
                exp.committed();
            }
            COp::Apply(n) => {
                let content = exp.checkpoints[n].clone();
                if store.apply_checkpoint(VOL, n, None).is_err() {
                    let len = content.len();
                    exp.may_hold(&content, 0..len);
                    return false;
                }
                exp.head = content;
                exp.committed();
            }
        }
    }
    true
}

fn setup(
    power: std::sync::Arc<PowerSupply>,
) -> (
    std::sync::Arc<SimDevice>,
    std::sync::Arc<SimDevice>,
    Store,
    Expect,
) {
    let (d, j, s) = common::sim_store(power);
    s.create_volume(VOL, BLOCKS * BS).expect("create volume");
    let head = vec![0u8; (BLOCKS * BS) as usize];
    let exp = Expect {
        base: head.clone(),
        head,
        ..Default::default()
    };
    (d, j, s, exp)
}

fn read_all(s: &Store, t: &Target) -> Vec<u8> {
    let mut buf = vec![0u8; (BLOCKS * BS) as usize];
    s.read(t, 0, &mut buf).expect("read after recovery");
    buf
}

fn verify(s: &Store, exp: &Expect, ctx: &str) {
    let listed = common::recovered_checkpoints(s, VOL, ctx);
    for (n, content) in &exp.checkpoints {
        assert!(
            listed.contains(n),
            "{ctx}: acknowledged checkpoint {n} lost"
        );
        assert!(
            read_all(s, &Target::checkpoint(VOL, n)) == *content,
            "{ctx}: checkpoint {n} content changed"
        );
    }
    for n in &listed {
        let want = exp
            .checkpoints
            .get(n)
            .or_else(|| exp.maybe.get(n))
            .unwrap_or_else(|| panic!("{ctx}: checkpoint {n} appeared from nowhere"));
        assert!(
            read_all(s, &Target::checkpoint(VOL, n)) == *want,
            "{ctx}: checkpoint {n} content wrong"
        );
    }
    let head = read_all(s, &Target::head(VOL));
    for (i, sec) in head.chunks(SECTOR).enumerate() {
        assert!(
            exp.head_sector_ok(i, sec),
            "{ctx}: head sector {i} holds a value it never had since the last flush"
        );
    }
}

fn crash_at(seed: u64, ops: &[COp], cut: u64) {
    let power = PowerSupply::new();
    let (data, journal, store, mut exp) = setup(power.clone());
    power.cut_after(cut);
    let finished = execute(&store, ops, &mut exp);
    if finished {
        // The cut fell after the workload: crash at the end.
        if store.flush().is_ok() {
            exp.committed();
        }
    }
    let mut rng = StdRng::seed_from_u64(seed ^ cut.wrapping_mul(0x9E37_79B9));
    let mut r = |n: u32| rng.random_range(0..n);
    let dimg = data.crash_image(&mut r);
    let jimg = journal.crash_image(&mut r);
    if std::env::var("CAIRN_CRASH_DEBUG").is_ok() {
        eprintln!("images {} {}", dimg.len(), jimg.len());
    }
    drop(store);
    let ctx = format!("seed {seed} cut {cut}");
    let s = common::reopen_crashed(dimg, jimg, &ctx);
    verify(&s, &exp, &ctx);
    // A delete or apply the cut interrupted while it freed a tree finishes now, as the
    // background committer or the next delete would finish it.
    if s.dropped_trees() > 0 {
        INTERRUPTED_FREES.fetch_add(1, Ordering::Relaxed);
    }
    s.free_dropped(&mut |_| {})
        .unwrap_or_else(|e| panic!("{ctx}: finishing an interrupted free: {e}"));
    assert_eq!(s.dropped_trees(), 0, "{ctx}: trees left to free");
    // The recovered store keeps working: new writes and checkpoints leave old ones intact.
    s.write(VOL, 0, &pattern(0xFFFF, 0, 64 * 1024))
        .expect("write after recovery");
    s.create_checkpoint(VOL, "after-crash", None)
        .expect("checkpoint after recovery");
    s.write(VOL, 8192, &pattern(0xFFFE, 8192, 8192))
        .expect("write after recovery");
    let report = s.fsck().expect("fsck");
    assert!(
        report.ok(),
        "{ctx}: fsck after continuing: {:?}",
        report.errors
    );
    let mut exp2 = Expect {
        checkpoints: exp.checkpoints.clone(),
        ..Default::default()
    };
    exp2.checkpoints.retain(|n, _| {
        s.list_checkpoints(VOL)
            .expect("list")
            .iter()
            .any(|c| &c.name == n)
    });
    for (n, content) in &exp2.checkpoints {
        assert!(
            read_all(&s, &Target::checkpoint(VOL, n)) == *content,
            "{ctx}: checkpoint {n} damaged by writes after recovery"
        );
    }
}

fn total_ops(ops: &[COp]) -> u64 {
    let power = PowerSupply::new();
    let (_, _, store, mut exp) = setup(power.clone());
    let start = power.ops();
    assert!(execute(&store, ops, &mut exp));
    store.flush().expect("flush");
    power.ops() - start
}

fn campaign(seeds: std::ops::Range<u64>, points_per_seed: u64, ops_per_seed: usize) -> u64 {
    let mut points = 0;
    for seed in seeds {
        let ops = workload(seed, ops_per_seed);
        let total = total_ops(&ops);
        let step = (total / points_per_seed).max(1);
        let mut cut = seed % step;
        while cut <= total {
            crash_at(seed, &ops, cut);
            points += 1;
            cut += step;
        }
    }
    points
}

#[test]
fn crash_points_short() {
    let n: u64 = std::env::var("CAIRN_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    let points = campaign(0..n, 150, 60);
    let interrupted = INTERRUPTED_FREES.load(Ordering::Relaxed);
    eprintln!("crash points checked: {points}, {interrupted} of them in the middle of a free");
    assert!(points >= n * 100);
    assert!(
        interrupted > 0,
        "no crash point fell while a tree was being freed"
    );
}

#[test]
#[ignore = "long crash campaign; run with --ignored"]
fn crash_points_long() {
    let points = campaign(1000..1200, 400, 200);
    eprintln!("crash points checked: {points}");
}
