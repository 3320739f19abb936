//! Model-based property tests: random sequences of engine operations, checked against a trivial
//! in-memory model. Every read, every diff, every mapped count, the exact space a delete frees, and
//! fsck after each sequence must agree.

#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::format::Layout;
use cairn_engine::{Error, Store, Target};
use common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Create {
        v: u8,
        blocks: u16,
    },
    Write {
        v: u8,
        off: u32,
        len: u32,
        byte: u8,
        aligned: bool,
    },
    Zero {
        v: u8,
        off: u32,
        len: u32,
    },
    Flush,
    Checkpoint {
        v: u8,
        c: u8,
    },
    Apply {
        v: u8,
        c: u8,
        save: Option<u8>,
    },
    DeleteCp {
        v: u8,
        c: u8,
    },
    Clone {
        v: u8,
        c: u8,
        to: u8,
    },
    Resize {
        v: u8,
        extra: u16,
    },
    DeleteVolume {
        v: u8,
    },
    Defrag {
        v: u8,
        dry_run: bool,
    },
    Read {
        v: u8,
        c: Option<u8>,
        off: u32,
        len: u32,
    },
    Diff {
        v: u8,
        a: Option<u8>,
        b: Option<u8>,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..3u8, 1..700u16).prop_map(|(v, blocks)| Op::Create { v, blocks }),
        // Now and then a write long enough to go past the page cache on real files.
        8 => (0..3u8, any::<u32>(), prop_oneof![4 => 1..20000u32, 1 => 250_000..1_100_000u32], any::<u8>(), any::<bool>())
            .prop_map(|(v, off, len, byte, aligned)| Op::Write { v, off, len, byte, aligned }),
        2 => (0..3u8, any::<u32>(), 0..3_000_000u32).prop_map(|(v, off, len)| Op::Zero { v, off, len }),
        1 => Just(Op::Flush),
        3 => (0..3u8, 0..5u8).prop_map(|(v, c)| Op::Checkpoint { v, c }),
        2 => (0..3u8, 0..5u8, proptest::option::of(0..5u8)).prop_map(|(v, c, save)| Op::Apply { v, c, save }),
        2 => (0..3u8, 0..5u8).prop_map(|(v, c)| Op::DeleteCp { v, c }),
        1 => (0..3u8, 0..5u8, 0..3u8).prop_map(|(v, c, to)| Op::Clone { v, c, to }),
        1 => (0..3u8, 0..300u16).prop_map(|(v, extra)| Op::Resize { v, extra }),
        1 => (0..3u8).prop_map(|v| Op::DeleteVolume { v }),
        2 => (0..3u8, any::<bool>()).prop_map(|(v, dry_run)| Op::Defrag { v, dry_run }),
        3 => (0..3u8, proptest::option::of(0..5u8), any::<u32>(), 0..40000u32)
            .prop_map(|(v, c, off, len)| Op::Read { v, c, off, len }),
        2 => (0..3u8, proptest::option::of(0..5u8), proptest::option::of(0..5u8))
            .prop_map(|(v, a, b)| Op::Diff { v, a, b }),
        1 => Just(Op::Reopen),
    ]
}

fn vname(v: u8) -> String {
    format!("vol{v}")
}
fn cname(c: u8) -> String {
    format!("cp{c}")
}

fn target(v: u8, c: Option<u8>) -> Target {
    Target {
        volume: vname(v),
        checkpoint: c.map(cname),
    }
}

fn model_state<'a>(m: &'a Model, t: &Target) -> Option<&'a MState> {
    let vol = m.volumes.get(&t.volume)?;
    match &t.checkpoint {
        None => vol.head.as_ref(),
        Some(c) => vol.checkpoints.get(c),
    }
}

/// Where a run keeps its store.
enum Backend {
    /// Simulated disks (no host I/O; what the crash tests build on).
    Sim,
    /// Real files in a temporary directory, read through the data file's mapping as in production.
    Files,
    /// Simulated disks holding a format-1 store, as builds before format 2 wrote them.
    SimFormat1,
}

/// Runs `ops` after creating volume 0, so that most operations have something to act on.
fn run(ops: Vec<Op>, backend: Backend) -> Result<(), TestCaseError> {
    let ops = std::iter::once(Op::Create { v: 0, blocks: 600 }).chain(ops);
    let power = PowerSupply::new();
    let layout = match backend {
        Backend::SimFormat1 => Layout::Groups,
        _ => Layout::Clusters,
    };
    let (data, journal) = sim_devices_in(power, layout);
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let open = |fresh: bool| match backend {
        Backend::Sim | Backend::SimFormat1 => {
            Store::open_devices(data.clone(), journal.clone(), small_opts(), "sim")
        }
        Backend::Files if fresh => Store::init(dir.path(), small_opts()),
        Backend::Files => Store::open(dir.path(), small_opts()),
    };
    let mut store = Some(open(true).map_err(|e| TestCaseError::fail(e.to_string()))?);
    let mut m = Model::default();
    for op in ops {
        let s = store.as_ref().expect("store open");
        match op {
            Op::Create { v, blocks } => {
                let size = blocks as u64 * BS - if blocks % 3 == 0 { 512 } else { 0 };
                let r = s.create_volume(&vname(v), size);
                match m.volumes.entry(vname(v)) {
                    std::collections::btree_map::Entry::Occupied(_) => {
                        prop_assert!(matches!(r, Err(Error::VolumeExists(_))));
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                        e.insert(MVolume {
                            head: Some(MState::new(size)),
                            ..Default::default()
                        });
                    }
                }
            }
            Op::Write {
                v,
                off,
                len,
                byte,
                aligned,
            } => {
                let Some(size) = m
                    .volumes
                    .get(&vname(v))
                    .map(|x| x.head.as_ref().expect("head").size())
                else {
                    prop_assert!(s.write(&vname(v), 0, &[1]).is_err());
                    continue;
                };
                let (mut off, mut len) = (off as u64 % size, len as u64);
                // Long writes are mostly whole blocks, as a guest's are: those can go behind
                // (store/write_behind.rs).
                if aligned || (len >= 250_000 && byte % 4 != 0) {
                    off -= off % BS;
                    len = len.div_ceil(BS) * BS;
                }
                let len = len.min(size - off);
                let buf: Vec<u8> = (0..len)
                    .map(|i| byte.wrapping_add((i / 512) as u8))
                    .collect();
                s.write(&vname(v), off, &buf)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.write(&vname(v), off, &buf);
                // Past the end must fail and change nothing.
                let past = matches!(
                    s.write(&vname(v), size - 1, &[1, 2]),
                    Err(Error::OutOfRange { .. })
                );
                prop_assert!(past, "write past the end accepted");
            }
            Op::Zero { v, off, len } => {
                let Some(size) = m
                    .volumes
                    .get(&vname(v))
                    .map(|x| x.head.as_ref().expect("head").size())
                else {
                    continue;
                };
                let off = off as u64 % size;
                let len = (len as u64).min(size - off);
                s.write_zeroes(&vname(v), off, len)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.zero(&vname(v), off, len);
            }
            Op::Flush => s.flush().map_err(|e| TestCaseError::fail(e.to_string()))?,
            Op::Checkpoint { v, c } => {
                let r = s.create_checkpoint(&vname(v), &cname(c), Some("model"));
                match m.volumes.get_mut(&vname(v)) {
                    None => prop_assert!(matches!(r, Err(Error::UnknownVolume(_)))),
                    Some(vol) if vol.checkpoints.contains_key(&cname(c)) => {
                        let dup = matches!(r, Err(Error::CheckpointExists { .. }));
                        prop_assert!(dup, "duplicate checkpoint accepted")
                    }
                    Some(vol) => {
                        let info = r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let head = vol.head.as_mut().expect("head");
                        prop_assert_eq!(&info.parent, &head.parent);
                        let snap = head.clone();
                        head.parent = Some(cname(c));
                        vol.checkpoints.insert(cname(c), snap);
                    }
                }
            }
            Op::Apply { v, c, save } => {
                let save_name = save.map(cname);
                let r = s.apply_checkpoint(&vname(v), &cname(c), save_name.as_deref());
                let Some(vol) = m.volumes.get_mut(&vname(v)) else {
                    prop_assert!(r.is_err());
                    continue;
                };
                let ok = vol.checkpoints.contains_key(&cname(c))
                    && save_name
                        .as_ref()
                        .is_none_or(|s| !vol.checkpoints.contains_key(s));
                if !ok {
                    prop_assert!(r.is_err());
                    continue;
                }
                r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                if let Some(sn) = save_name {
                    let head = vol.head.as_mut().expect("head");
                    let snap = head.clone();
                    vol.checkpoints.insert(sn, snap);
                }
                let mut st = vol.checkpoints[&cname(c)].clone();
                st.parent = Some(cname(c));
                vol.head = Some(st);
            }
            Op::DeleteCp { v, c } => {
                let exists = m
                    .volumes
                    .get(&vname(v))
                    .is_some_and(|x| x.checkpoints.contains_key(&cname(c)));
                if !exists {
                    prop_assert!(s.delete_checkpoint(&vname(v), &cname(c)).is_err());
                    continue;
                }
                let before = s
                    .space(Some(&vname(v)))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let unique = before.volumes[0]
                    .checkpoints
                    .iter()
                    .find(|x| x.name == cname(c))
                    .expect("listed")
                    .unique;
                s.delete_checkpoint(&vname(v), &cname(c))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let after = s
                    .space(None)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // The unique figure is exactly what the delete freed (catalog record block aside).
                prop_assert_eq!(before.allocated - after.allocated, unique + BS);
                let vol = m.volumes.get_mut(&vname(v)).expect("model volume");
                let gone = vol.checkpoints.remove(&cname(c)).expect("exists");
                for st in vol.checkpoints.values_mut().chain(vol.head.iter_mut()) {
                    if st.parent.as_deref() == Some(cname(c).as_str()) {
                        st.parent = gone.parent.clone();
                    }
                }
            }
            Op::Clone { v, c, to } => {
                let r = s.clone_checkpoint(&vname(v), &cname(c), &vname(to));
                let src = m
                    .volumes
                    .get(&vname(v))
                    .and_then(|x| x.checkpoints.get(&cname(c)))
                    .cloned();
                match src {
                    Some(mut st) if !m.volumes.contains_key(&vname(to)) => {
                        r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                        st.parent = None;
                        m.volumes.insert(
                            vname(to),
                            MVolume {
                                head: Some(st),
                                ..Default::default()
                            },
                        );
                    }
                    _ => prop_assert!(r.is_err()),
                }
            }
            Op::Resize { v, extra } => {
                let Some(vol) = m.volumes.get_mut(&vname(v)) else {
                    continue;
                };
                let head = vol.head.as_mut().expect("head");
                let new = head.size() + extra as u64 * BS;
                s.resize_volume(&vname(v), new)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                head.resize(new);
                if head.size() > 512 {
                    prop_assert!(s.resize_volume(&vname(v), head.size() - 512).is_err());
                }
            }
            Op::DeleteVolume { v } => {
                let r = s.delete_volume(&vname(v));
                prop_assert_eq!(r.is_ok(), m.volumes.remove(&vname(v)).is_some());
            }
            Op::Defrag { v, dry_run } => {
                // Contents never change (the reads and diffs after it check that); the report
                // must add up.
                let r = s.defrag(&vname(v), 2, dry_run, &mut |_| {});
                let Some(vol) = m.volumes.get(&vname(v)) else {
                    prop_assert!(matches!(r, Err(Error::UnknownVolume(_))));
                    continue;
                };
                let rep = r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                let head = vol.head.as_ref().expect("head");
                let moved = rep.moved_bytes > 0 && !dry_run;
                let mapped = head.versions.iter().filter(|&&x| x != 0).count() as u64;
                prop_assert_eq!(rep.mapped_bytes, mapped * BS);
                prop_assert!(rep.shared_bytes <= rep.moved_bytes);
                prop_assert!(rep.moved_bytes <= rep.mapped_bytes);
                prop_assert!(rep.extents_after <= rep.extents_before);
                if dry_run {
                    prop_assert_eq!(rep.space_delta, 0);
                } else {
                    // A second pass finds nothing left to move.
                    let again = s
                        .defrag(&vname(v), 2, true, &mut |_| {})
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(again.moved_bytes, 0, "after {:?}", rep);
                }
                if moved {
                    m.volumes.get_mut(&vname(v)).expect("volume").defragged = true;
                }
            }
            Op::Read { v, c, off, len } => {
                let t = target(v, c);
                let Some(st) = model_state(&m, &t) else {
                    prop_assert!(s.read(&t, 0, &mut [0u8; 1]).is_err());
                    continue;
                };
                let off = off as u64 % st.size();
                let len = (len as u64).min(st.size() - off);
                let mut buf = vec![0xEE; len as usize];
                let runs = s
                    .read_sparse(&t, off, &mut buf)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Holes are exactly the unmapped blocks, clipped to the request.
                let mut at = off;
                for (l, hole) in &runs {
                    let blocks = at / BS..(at + l).div_ceil(BS);
                    prop_assert!(
                        blocks
                            .clone()
                            .all(|b| (st.versions[b as usize] == 0) == *hole),
                        "hole run {}+{} (hole {}) wrong on {}",
                        at,
                        l,
                        hole,
                        t
                    );
                    at += l;
                }
                prop_assert_eq!(at, off + len, "read runs must cover the request");
                prop_assert!(
                    buf[..] == st.bytes[off as usize..(off + len) as usize],
                    "read mismatch on {} at {}+{}",
                    t,
                    off,
                    len
                );
                let mut over = vec![0; 2];
                prop_assert!(s.read(&t, st.size() - 1, &mut over).is_err());
            }
            Op::Diff { v, a, b } => {
                let (ta, tb) = (target(v, a), target(v, b));
                let (Some(sa), Some(sb)) = (model_state(&m, &ta), model_state(&m, &tb)) else {
                    prop_assert!(s.diff(&ta, &tb).is_err());
                    continue;
                };
                let got: Vec<(u64, u64)> = s
                    .diff(&ta, &tb)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .map(|e| (e.offset, e.length))
                    .collect();
                let want = Model::diff(sa, sb);
                let defragged = m.volumes[&vname(v)].defragged;
                if defragged {
                    // Diff follows block identity: a range a defrag moved counts as changed
                    // (never less than what changed).
                    prop_assert!(
                        want.iter()
                            .all(|&(o, l)| clip(&got, o, o + l) == vec![(o, l)]),
                        "diff {} {} after a defrag: {:?} does not cover {:?}",
                        ta,
                        tb,
                        got,
                        want
                    );
                } else {
                    prop_assert_eq!(got.clone(), want.clone(), "diff {} {}", ta, tb);
                }
                let want = if defragged { got } else { want };
                // A sub-range (unaligned on purpose) must give the same runs, clipped.
                let max = sa.size().max(sb.size());
                let start =
                    (a.map_or(3, u64::from) * 7919 + b.map_or(5, u64::from) * 104_729) % max;
                let len = (max - start) / 2 + 1;
                let got: Vec<(u64, u64)> = s
                    .diff_range(&ta, &tb, start, len)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .map(|e| (e.offset, e.length))
                    .collect();
                prop_assert_eq!(
                    got,
                    clip(&want, start, start + len),
                    "diff_range {} {}",
                    ta,
                    tb
                );
                let mapped: Vec<(u64, u64)> = s
                    .mapped_range(&tb, start, len)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .map(|e| (e.offset, e.length))
                    .collect();
                let empty = MState::new(sb.size());
                prop_assert_eq!(
                    mapped,
                    clip(&Model::diff(&empty, sb), start, start + len),
                    "mapped_range {}",
                    tb
                );
            }
            Op::Reopen => {
                drop(store.take());
                store = Some(open(false).map_err(|e| TestCaseError::fail(e.to_string()))?);
            }
        }
    }
    // Final: every state reads back whole, mapped counts and parents match, fsck is clean.
    let s = store.as_ref().expect("store open");
    for (vn, vol) in &m.volumes {
        let info = s
            .volume_info(vn)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let head = vol.head.as_ref().expect("head");
        prop_assert_eq!(info.referenced, head.mapped() * BS);
        prop_assert_eq!(&info.parent, &head.parent);
        let mut buf = vec![0; head.size() as usize];
        s.read(&Target::head(vn), 0, &mut buf)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(buf == head.bytes, "head {} differs", vn);
        let cps = s
            .list_checkpoints(vn)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(cps.len(), vol.checkpoints.len());
        for cp in cps {
            let st = &vol.checkpoints[&cp.name];
            prop_assert_eq!(cp.referenced, st.mapped() * BS);
            prop_assert_eq!(&cp.parent, &st.parent);
            let mut buf = vec![0; st.size() as usize];
            s.read(&Target::checkpoint(vn, &cp.name), 0, &mut buf)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(buf == st.bytes, "checkpoint {}@{} differs", vn, cp.name);
        }
    }
    let report = s.fsck().map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(report.ok(), "fsck: {:?}", report.errors);
    // Deleting everything returns every block (only the superblock stays allocated).
    let names: Vec<String> = m.volumes.keys().cloned().collect();
    for n in names {
        s.delete_volume(&n)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    let space = s
        .space(None)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        space.allocated <= 4 * BS,
        "blocks leaked: {} bytes still allocated",
        space.allocated
    );
    let report = s.fsck().map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(report.ok(), "fsck after deleting all: {:?}", report.errors);
    Ok(())
}

/// `CAIRN_PROPTEST_CASES` (64 by default) divided by `share`.
fn config(share: u32) -> ProptestConfig {
    let cases: u32 = std::env::var("CAIRN_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases: cases / share,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Backend::Sim)?;
    }
}

proptest! {
    // A quarter as many: each case formats a store on the host's disk.
    #![proptest_config(config(4))]

    /// The same on real files, where short reads are copied from a mapping of the data file
    /// while writes, hole punches and file growth go through system calls.
    #[test]
    fn engine_on_files_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Backend::Files)?;
    }
}

proptest! {
    #![proptest_config(config(4))]

    /// A store in format 1 (a refcount page every 1,021 blocks), as builds before format 2
    /// wrote it, still works in every operation.
    #[test]
    fn format_1_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops, Backend::SimFormat1)?;
    }
}

/// Runs clipped to `start..end`.
fn clip(runs: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    runs.iter()
        .filter_map(|&(s, l)| {
            let (a, b) = (s.max(start), (s + l).min(end));
            (a < b).then(|| (a, b - a))
        })
        .collect()
}
