//! Power cuts while several threads write, flush and take checkpoints at once. Commits run outside
//! the state lock (reads and writes go on during their syncs), so this checks that a transaction
//! sealed while others keep changing the cache still lands whole and in order: after recovery fsck
//! is clean, every acknowledged checkpoint holds one version per writer from its window, and the
//! head holds, per writer, a version at least as new as its last acknowledged flush.
#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::{Store, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const VOL: &str = "v";
const WRITERS: u64 = 3;
/// Blocks each writer owns; writer `w` writes blocks `w*STRIDE .. w*STRIDE+SPAN` in one call.
const SPAN: u64 = 4;
const STRIDE: u64 = 40;
const BS: u64 = 4096;

fn block_of(w: u64, v: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BS as usize);
    for _ in 0..BS / 16 {
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// The single version writer `w`'s blocks hold in `t`, or a description of what is wrong.
fn version(s: &Store, t: &Target, w: u64) -> Result<u64, String> {
    let mut buf = vec![0u8; (SPAN * BS) as usize];
    s.read(t, w * STRIDE * BS, &mut buf)
        .map_err(|e| format!("read: {e}"))?;
    let v = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
    if v == 0 && buf.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    for blk in buf.chunks(BS as usize) {
        if blk != block_of(w, v) {
            return Err(format!("writer {w}: blocks of different versions or torn"));
        }
    }
    Ok(v)
}

#[derive(Default)]
struct Log {
    /// Checkpoint name -> per writer (acked before, started after).
    acked_checkpoints: BTreeMap<String, Vec<(u64, u64)>>,
    /// Checkpoints whose creation was attempted, in order.
    attempted: Vec<String>,
}

fn run_once(seed: u64, cut: u64) {
    let power = PowerSupply::new();
    let (data, journal) = common::sim_devices(power.clone());
    // With the background committer: commits also start on their own, at any moment.
    let opts = cairn_engine::Options {
        background_commits: true,
        ..common::small_opts()
    };
    let store = Store::open_devices(data.clone(), journal.clone(), opts, "sim").expect("open");
    store.create_volume(VOL, 256 * BS).expect("create volume");
    store.flush().expect("flush");
    let store = Arc::new(store);
    power.cut_after(cut);
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let flushed: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let log = Arc::new(Mutex::new(Log::default()));
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (store, started, acked, flushed) = (
            store.clone(),
            started.clone(),
            acked.clone(),
            flushed.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed * 31 + w);
            for v in 1..=60u64 {
                started[w as usize].store(v, Ordering::SeqCst);
                let buf: Vec<u8> = (0..SPAN).flat_map(|_| block_of(w, v)).collect();
                if store.write(VOL, w * STRIDE * BS, &buf).is_err() {
                    return;
                }
                acked[w as usize].store(v, Ordering::SeqCst);
                if rng.random_range(0..4) == 0 {
                    if store.flush().is_err() {
                        return;
                    }
                    flushed[w as usize].fetch_max(v, Ordering::SeqCst);
                }
            }
        }));
    }
    {
        let (store, started, acked, log) =
            (store.clone(), started.clone(), acked.clone(), log.clone());
        threads.push(std::thread::spawn(move || {
            for i in 0..12 {
                let name = format!("c{i}");
                let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
                log.lock().expect("log").attempted.push(name.clone());
                if store.create_checkpoint(VOL, &name, None).is_err() {
                    return;
                }
                let after: Vec<u64> = started.iter().map(|a| a.load(Ordering::SeqCst)).collect();
                log.lock()
                    .expect("log")
                    .acked_checkpoints
                    .insert(name, before.into_iter().zip(after).collect());
                std::thread::yield_now();
            }
        }));
    }
    for t in threads {
        t.join().expect("thread");
    }
    let mut rng = StdRng::seed_from_u64(seed ^ cut.wrapping_mul(0x9E37_79B9));
    let mut r = |n: u32| rng.random_range(0..n);
    let dimg = data.crash_image(&mut r);
    let jimg = journal.crash_image(&mut r);
    let finished_flushes: Vec<u64> = flushed.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let log = std::mem::take(&mut *log.lock().expect("log"));
    drop(store);

    let ctx = format!("seed {seed} cut {cut}");
    let s = common::reopen_crashed(dimg, jimg, &ctx);
    let listed = common::recovered_checkpoints(&s, VOL, &ctx);
    for (name, window) in &log.acked_checkpoints {
        assert!(
            listed.contains(name),
            "{ctx}: acknowledged checkpoint {name} lost"
        );
        for w in 0..WRITERS {
            let v = version(&s, &Target::checkpoint(VOL, name), w)
                .unwrap_or_else(|e| panic!("{ctx}: checkpoint {name}: {e}"));
            let (lo, hi) = window[w as usize];
            assert!(
                (lo..=hi).contains(&v),
                "{ctx}: checkpoint {name}, writer {w}: version {v} outside {lo}..={hi}"
            );
        }
    }
    // Checkpoints that made it without an acknowledgement are whole and in order too.
    let mut last = vec![0u64; WRITERS as usize];
    for name in log.attempted.iter().filter(|n| listed.contains(n)) {
        for w in 0..WRITERS {
            let v = version(&s, &Target::checkpoint(VOL, name), w)
                .unwrap_or_else(|e| panic!("{ctx}: checkpoint {name}: {e}"));
            assert!(
                v >= last[w as usize],
                "{ctx}: checkpoint {name} older than its predecessor"
            );
            last[w as usize] = v;
        }
    }
    // Unflushed writes may survive in part, as on a disk (sectors are atomic, blocks are not), so
    // the head is checked sector by sector.
    for w in 0..WRITERS {
        for i in 0..SPAN {
            let mut blk = vec![0u8; BS as usize];
            s.read(&Target::head(VOL), (w * STRIDE + i) * BS, &mut blk)
                .expect("read head");
            for (j, sec) in blk.chunks(512).enumerate() {
                let v = u64::from_le_bytes(sec[8..16].try_into().expect("8 bytes"));
                let whole =
                    sec == &block_of(w, v)[..512] || (v == 0 && sec.iter().all(|&b| b == 0));
                assert!(whole, "{ctx}: head block {i} sector {j} of writer {w} torn");
                assert!(
                    v >= finished_flushes[w as usize],
                    "{ctx}: head writer {w} block {i} at version {v}, but version {} was flushed",
                    finished_flushes[w as usize]
                );
            }
        }
    }
}

#[test]
fn power_cuts_during_concurrent_writes_flushes_and_checkpoints() {
    let seeds: u64 = std::env::var("CAIRN_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    for seed in 0..seeds {
        // Cut points spread over the run, which takes a few thousand device operations.
        let cut = (seed * 7919) % 3000;
        run_once(seed, cut);
    }
}

/// A commit that also resets the journal runs outside the state lock, so a block can be freed
/// after its transaction was sealed and before the reset. That free is not durable when the reset
/// is, so the block must stay quarantined: reusing it would let a crash leave the durable head
/// pointing at someone else's data.
#[test]
fn a_block_freed_during_a_journal_reset_commit_is_not_reused_before_its_own_commit() {
    let power = PowerSupply::new();
    let (sim, journal) = common::sim_devices(power);
    let (dev, paused_rx, resume_tx) =
        common::PausingDevice::new(sim.clone(), common::PauseAt::Sync);
    // Every commit after the first finds the journal due for a reset.
    let opts = cairn_engine::Options {
        journal_limit: 0,
        ..common::small_opts()
    };
    let store =
        Arc::new(Store::open_devices(dev.clone(), journal.clone(), opts, "sim").expect("open"));
    store.create_volume(VOL, 64 * BS).expect("create");
    store.write(VOL, 0, &block_of(1, 1)).expect("write");
    store.flush().expect("flush");
    store.write(VOL, 2 * BS, &block_of(2, 1)).expect("write");

    dev.arm();
    let s = store.clone();
    let committer = std::thread::spawn(move || s.flush());
    paused_rx.recv().expect("the commit reached its sync");
    // Freed after the seal: block 0's only reference goes away.
    store.trim(VOL, 0, BS).expect("trim");
    resume_tx.send(()).expect("resume");
    committer.join().expect("join").expect("flush");
    assert!(
        store.stats().journal_resets >= 1,
        "the commit under test must have reset the journal"
    );
    // A new block written now (never flushed) must not land where block 0's data still is.
    store.write(VOL, 5 * BS, &block_of(3, 1)).expect("write");

    // Power cut that keeps every unsynced write, in order.
    let data_img = sim.crash_image(&mut |n| n - 1);
    let journal_img = journal.crash_image(&mut |n| n - 1);
    let s = common::reopen_crashed(data_img, journal_img, "reset window");
    let t = Target::head(VOL);
    let mut buf = vec![0u8; BS as usize];
    s.read(&t, 0, &mut buf).expect("read");
    assert!(
        buf == block_of(1, 1) || buf.iter().all(|&b| b == 0),
        "block 0 after the crash holds neither its flushed data nor zeros (its trim was never \
         flushed, so its old block was reused too early)"
    );
    let report = s.fsck().expect("fsck");
    assert!(
        report.errors.is_empty(),
        "fsck after the crash: {:?}",
        report.errors
    );
}

/// With a background committer, writes past the dirty limit are committed without a flush, and a
/// background commit that fails is reported by the next flush (the writes it carried are gone),
/// once; the store then works again.
#[test]
fn background_commits_run_and_their_failure_is_reported_by_the_next_flush() {
    let power = PowerSupply::new();
    let (data, journal) = common::sim_devices(power);
    let opts = cairn_engine::Options {
        background_commits: true,
        ..common::small_opts()
    };
    let s = Store::open_devices(data.clone(), journal.clone(), opts, "sim").expect("open");
    s.create_volume(VOL, 1 << 32).expect("create");
    s.flush().expect("flush");
    let mut i = 0u64;
    let mut wait_until = |done: &dyn Fn() -> bool| {
        for _ in 0..2000 {
            if done() {
                return;
            }
            // A block in a leaf of its own each time: each write dirties a page or more.
            i += 1;
            s.write(VOL, (i * 600 % (1 << 20)) * BS, &block_of(9, i))
                .expect("write");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("no background commit after 2,000 writes past the dirty limit");
    };
    wait_until(&|| s.stats().background_commits >= 1);
    s.flush()
        .expect("flush after a successful background commit");

    // The next journal write fails: only commits write the journal. Wait for the failure itself,
    // not for a commit count: a commit already past its journal write when the failure is armed
    // still counts, and then the flush below would be the one to fail.
    journal.fail_next(1);
    wait_until(&|| journal.failures_pending() == 0);
    reported_once(&s, s.flush());
}

/// A flush's result after a background commit failed: the failure, saying the writes were
/// discarded; and only once: the store works again, the next flush succeeds.
fn reported_once(s: &Store, flushed: cairn_engine::Result<()>) {
    let err = flushed.expect_err("the failed background commit must be reported");
    assert!(err.to_string().contains("discarded"), "{err}");
    s.write(VOL, 0, &block_of(1, 1))
        .expect("write after the failure");
    s.flush().expect("reported once; the store works again");
    let mut buf = vec![0u8; BS as usize];
    s.read(&Target::head(VOL), 0, &mut buf).expect("read");
    assert_eq!(buf, block_of(1, 1));
}

/// A flush that waits behind a background commit which then fails reports that failure, and the
/// loss is reported once: the flush after it succeeds. (The flush used to fail on the poisoned
/// store with its own error, and the next flush then reported the background commit's.)
#[test]
fn a_flush_behind_a_failing_background_commit_reports_it_once() {
    let (data, journal) = common::sim_devices(PowerSupply::new());
    let (dev, paused, go) = common::PausingDevice::new(data, common::PauseAt::Sync);
    let opts = cairn_engine::Options {
        background_commits: true,
        ..common::small_opts()
    };
    let s = Arc::new(Store::open_devices(dev.clone(), journal.clone(), opts, "sim").expect("open"));
    s.create_volume(VOL, 1 << 32).expect("create");
    s.flush().expect("flush");

    // Writes past the dirty limit wake the background committer, which stops in its data sync.
    dev.arm();
    let mut i = 0u64;
    loop {
        i += 1;
        s.write(VOL, (i * 600 % (1 << 20)) * BS, &block_of(9, i))
            .expect("write");
        if paused
            .recv_timeout(std::time::Duration::from_millis(1))
            .is_ok()
        {
            break;
        }
        assert!(i < 2000, "no background commit after 2,000 writes");
    }
    // Its journal write will fail; a flush meanwhile waits for it.
    journal.fail_next(1);
    let flusher = {
        let s = s.clone();
        std::thread::spawn(move || s.flush())
    };
    // Only lets the flush reach the commit lock first; if it has not, the test checks less.
    std::thread::sleep(std::time::Duration::from_millis(100));
    drop(go);
    reported_once(&s, flusher.join().expect("flush thread"));
}
