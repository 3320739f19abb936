//! Defragmenting a head fragmented by overwrites after checkpoints: contents and checkpoints stay
//! identical, the head becomes contiguous, and the space it costs is what the report says.
#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::{Store, Target};
use common::{reopen_crashed, sim_store, BS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const VOL: &str = "v";
const BLOCKS: u64 = 2048;

fn block(tag: u64, b: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BS as usize);
    for i in 0..BS / 16 {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&(b * 1000 + i).to_le_bytes());
    }
    v
}

fn read_all(s: &Store, t: &Target) -> Vec<u8> {
    let mut buf = vec![0u8; (BLOCKS * BS) as usize];
    s.read(t, 0, &mut buf).expect("read");
    buf
}

/// A volume written sequentially, then five checkpoints each followed by random overwrites of a
/// tenth of its blocks, plus a hole: every leaf of the head is fragmented and shared.
fn fragmented(s: &Store) {
    s.create_volume(VOL, BLOCKS * BS).expect("create");
    let mut all = Vec::new();
    for b in 0..BLOCKS {
        all.extend(block(0, b));
    }
    s.write(VOL, 0, &all).expect("write");
    let mut rng = StdRng::seed_from_u64(7);
    for c in 1..=5u64 {
        s.create_checkpoint(VOL, &format!("c{c}"), None)
            .expect("checkpoint");
        for _ in 0..BLOCKS / 10 {
            let b = rng.random_range(0..BLOCKS);
            s.write(VOL, b * BS, &block(c, b)).expect("overwrite");
        }
    }
    s.trim(VOL, 100 * BS, 50 * BS).expect("trim");
    s.flush().expect("flush");
}

#[test]
fn defrag_makes_the_head_contiguous_without_changing_any_content() {
    let (_, _, s) = sim_store(PowerSupply::new());
    fragmented(&s);
    let head = Target::head(VOL);
    let before = read_all(&s, &head);
    let cps: Vec<Vec<u8>> = (1..=5)
        .map(|c| read_all(&s, &Target::checkpoint(VOL, &format!("c{c}"))))
        .collect();
    let space_before = s.space(None).expect("space").allocated;

    let dry = s.defrag(VOL, 2, true, &mut |_| {}).expect("dry run");
    assert_eq!(s.space(None).expect("space").allocated, space_before);
    assert_eq!(read_all(&s, &head), before);
    assert!(dry.extents_before > 500, "not fragmented enough: {dry:?}");
    assert_eq!(dry.mapped_bytes, (BLOCKS - 50) * BS);
    assert_eq!(
        dry.moved_bytes, dry.mapped_bytes,
        "every leaf is fragmented"
    );
    assert!(dry.shared_bytes > dry.moved_bytes / 2, "{dry:?}");

    let mut seen = 0;
    let rep = s.defrag(VOL, 2, false, &mut |b| seen = b).expect("defrag");
    assert_eq!(seen, BLOCKS * BS, "progress covers the volume");
    assert_eq!(
        (rep.moved_bytes, rep.shared_bytes, rep.extents_before),
        (dry.moved_bytes, dry.shared_bytes, dry.extents_before),
        "the dry run predicts the real one"
    );
    // One run, the hole skipped.
    assert_eq!(rep.extents_after, 1, "{rep:?}");
    // The shared blocks now exist twice; the head's own old blocks are freed.
    let grown = rep.space_delta;
    assert!(
        grown >= rep.shared_bytes as i64 && grown < rep.shared_bytes as i64 + 64 * BS as i64,
        "space grew by {grown}, shared {}",
        rep.shared_bytes
    );

    assert_eq!(read_all(&s, &head), before, "head contents changed");
    for (c, want) in cps.iter().enumerate() {
        let t = Target::checkpoint(VOL, &format!("c{}", c + 1));
        assert!(read_all(&s, &t) == *want, "checkpoint {t} changed");
    }
    let again = s.defrag(VOL, 2, true, &mut |_| {}).expect("dry run");
    assert_eq!(again.moved_bytes, 0, "{again:?}");
    let report = s.fsck().expect("fsck");
    assert!(report.errors.is_empty(), "{:?}", report.errors);

    // Deleting the checkpoints now frees what the defrag copied.
    for c in 1..=5 {
        s.delete_checkpoint(VOL, &format!("c{c}")).expect("delete");
    }
    let after = s.space(None).expect("space").allocated;
    assert!(after < space_before, "{after} >= {space_before}");
}

/// Power cut at every write or sync of a defrag: the store opens clean and the head and the
/// checkpoints read exactly as before.
#[test]
fn a_power_cut_during_defrag_loses_nothing() {
    let (data, journal, s) = sim_store(PowerSupply::new());
    fragmented(&s);
    let head = read_all(&s, &Target::head(VOL));
    let c3 = read_all(&s, &Target::checkpoint(VOL, "c3"));
    drop(s);
    let base = (data.live_image(), journal.live_image());
    let mut cut = 1;
    loop {
        let power = PowerSupply::new();
        let d = cairn_engine::device::SimDevice::new(base.0.clone(), power.clone());
        let j = cairn_engine::device::SimDevice::new(base.1.clone(), power.clone());
        let s =
            Store::open_devices(d.clone(), j.clone(), common::small_opts(), "sim").expect("open");
        power.cut_after(cut);
        let done = s.defrag(VOL, 2, false, &mut |_| {}).is_ok();
        drop(s);
        let mut rng = StdRng::seed_from_u64(cut);
        let mut pick = |n: u32| rng.random_range(0..n);
        let s = reopen_crashed(d.crash_image(&mut pick), j.crash_image(&mut pick), "defrag");
        let report = s.fsck().expect("fsck");
        assert!(report.errors.is_empty(), "cut {cut}: {:?}", report.errors);
        assert!(
            read_all(&s, &Target::head(VOL)) == head,
            "cut {cut}: head changed"
        );
        assert!(
            read_all(&s, &Target::checkpoint(VOL, "c3")) == c3,
            "cut {cut}: checkpoint changed"
        );
        if done {
            break;
        }
        cut += 1;
    }
    // Format 2 gathers the metadata pages a commit writes into fewer runs, so this defrag makes
    // fewer writes than the 20 that format 1 made.
    assert!(cut > 15, "the defrag made too few writes to test: {cut}");
}

/// Writes racing a defrag of the same volume are never lost or overwritten by a stale copy.
#[test]
fn writes_during_defrag_are_kept() {
    let (_, _, s) = sim_store(PowerSupply::new());
    fragmented(&s);
    let s = std::sync::Arc::new(s);
    let mut want: Vec<Vec<u8>> = {
        let all = read_all(&s, &Target::head(VOL));
        all.chunks(BS as usize).map(|c| c.to_vec()).collect()
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let defragger = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) || runs < 2 {
                s.defrag(VOL, 2, false, &mut |_| {}).expect("defrag");
                runs += 1;
            }
            runs
        })
    };
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..3000u64 {
        let b = rng.random_range(0..BLOCKS);
        let data = block(100 + i, b);
        s.write(VOL, b * BS, &data).expect("write");
        want[b as usize] = data;
        if i % 500 == 0 {
            s.create_checkpoint(VOL, &format!("w{i}"), None)
                .expect("checkpoint");
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = defragger.join().expect("join");
    assert!(runs >= 2);
    let got = read_all(&s, &Target::head(VOL));
    for (b, w) in want.iter().enumerate() {
        assert!(
            got[b * BS as usize..(b + 1) * BS as usize] == w[..],
            "block {b} lost its last write"
        );
    }
    let report = s.fsck().expect("fsck");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

/// A long rewrite over a range that holds a few blocks the head owns alone, amid blocks shared
/// with a checkpoint, lands in one run: those few are copied too rather than written in place,
/// which split each 1 MiB write into several disk writes and left its data in pieces.
#[test]
fn a_long_rewrite_lands_in_one_run() {
    let (_, _, s) = sim_store(PowerSupply::new());
    s.create_volume(VOL, BLOCKS * BS).expect("create");
    s.write(VOL, 0, &vec![1u8; (BLOCKS * BS) as usize])
        .expect("fill");
    s.create_checkpoint(VOL, "c", None).expect("checkpoint");
    for b in [3u64, 100, 200] {
        s.write(VOL, b * BS, &block(1, b)).expect("short write");
    }
    s.write(VOL, 0, &vec![2u8; (256 * BS) as usize])
        .expect("long rewrite");
    let extents = |s: &Store| {
        s.defrag(VOL, 2, true, &mut |_| {})
            .expect("dry run")
            .extents_before
    };
    // The rewritten first MiB is one run; the rest of the volume is the original run, and the
    // two need not touch.
    assert!(
        extents(&s) <= 2,
        "the long rewrite is in pieces: {} extents",
        extents(&s)
    );
    assert!(
        read_all(&s, &Target::head(VOL))[..(256 * BS) as usize] == vec![2u8; (256 * BS) as usize]
    );
    assert!(read_all(&s, &Target::checkpoint(VOL, "c")) == vec![1u8; (BLOCKS * BS) as usize]);
    assert!(s.fsck().expect("fsck").ok());
}
