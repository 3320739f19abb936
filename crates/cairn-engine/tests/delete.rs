//! Freeing a deleted checkpoint's or volume's tree happens in committed steps: memory and journal
//! per step are bounded whatever the tree holds, other volumes are served between steps, a crash
//! midway leaves a consistent store, and what is left gets finished after reopening.
#![allow(missing_docs)]

mod common;

use cairn_engine::device::{PowerSupply, SimDevice};
use cairn_engine::{Options, Store, Target};
use common::BS;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BLOCKS: u64 = 4096;

fn block(tag: u64, b: u64) -> Vec<u8> {
    (tag * 1_000_003 + b).to_le_bytes().repeat(512)
}

/// A volume whose checkpoint `old` holds `BLOCKS` blocks nothing else references, and another
/// volume to read from meanwhile.
fn store_with_unique_checkpoint(
    opts: Options,
    power: Arc<PowerSupply>,
) -> (Arc<SimDevice>, Arc<SimDevice>, Store) {
    let (data, journal) = common::sim_devices(power);
    let s = Store::open_devices(data.clone(), journal.clone(), opts, "sim").expect("open");
    s.create_volume("v", BLOCKS * BS).expect("create v");
    s.create_volume("other", 16 * BS).expect("create other");
    s.write("other", 0, &block(9, 0)).expect("write other");
    for tag in [1, 2] {
        let data: Vec<u8> = (0..BLOCKS).flat_map(|b| block(tag, b)).collect();
        s.write("v", 0, &data).expect("write v");
        if tag == 1 {
            s.create_checkpoint("v", "old", None).expect("checkpoint");
        }
    }
    s.flush().expect("flush");
    (data, journal, s)
}

fn opts(drop_step: u64, background: bool) -> Options {
    Options {
        drop_step,
        background_commits: background,
        ..common::small_opts()
    }
}

#[test]
fn a_large_delete_commits_in_steps_and_serves_other_volumes_between_them() {
    let (_, _, s) = store_with_unique_checkpoint(opts(256, false), PowerSupply::new());
    let s = Arc::new(s);
    let before = s.space(None).expect("space").allocated;
    let commits_before = s.stats().commits;

    // A reader on another thread: between two steps nothing may be held that it waits for.
    let (ask, asked) = mpsc::channel::<()>();
    let (answer, answered) = mpsc::channel::<Vec<u8>>();
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || {
            for () in asked {
                let mut buf = vec![0u8; BS as usize];
                s.read(&Target::head("other"), 0, &mut buf)
                    .expect("read other");
                if answer.send(buf).is_err() {
                    return;
                }
            }
        })
    };
    let mut reports = Vec::new();
    s.delete_checkpoint_with_progress("v", "old", &mut |bytes| {
        reports.push(bytes);
        ask.send(()).expect("reader alive");
        let got = answered
            .recv_timeout(Duration::from_secs(20))
            .expect("a read of another volume waited for the delete");
        assert_eq!(got, block(9, 0));
    })
    .expect("delete");
    drop(ask);
    reader.join().expect("reader");

    let steps = BLOCKS / 256;
    assert!(
        reports.len() as u64 >= steps,
        "{} progress reports",
        reports.len()
    );
    assert!(
        reports.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {reports:?}"
    );
    let freed = before - s.space(None).expect("space").allocated;
    // The tree's blocks; the catalog record pages are freed by the commits around it.
    let reported = *reports.last().expect("reports");
    assert!(
        reported <= freed && freed - reported <= 2 * BS,
        "reported {reported} of {freed}"
    );
    assert!(freed >= BLOCKS * BS, "freed only {freed} bytes");
    assert!(
        s.stats().commits - commits_before >= steps,
        "{} commits for {steps} steps",
        s.stats().commits - commits_before
    );
    assert_eq!(s.dropped_trees(), 0);
    let report = s.fsck().expect("fsck");
    assert!(report.ok(), "{:?}", report.errors);
    assert_eq!(report.dropped_trees, 0);
}

#[test]
fn a_crash_midway_through_a_delete_is_finished_after_reopening() {
    // Count the device operations a whole delete takes, then cut the power halfway through one.
    let power = PowerSupply::new();
    let (_, _, s) = store_with_unique_checkpoint(opts(64, false), power.clone());
    let start = power.ops();
    s.delete_checkpoint("v", "old").expect("delete");
    let total = power.ops() - start;
    let full = s.space(None).expect("space").allocated;
    drop(s);

    let power = PowerSupply::new();
    let (data, journal, s) = store_with_unique_checkpoint(opts(64, false), power.clone());
    power.cut_after(power.ops() + total / 2);
    assert!(
        s.delete_checkpoint("v", "old").is_err(),
        "the cut did not interrupt the delete"
    );
    let mut r = |_: u32| 0;
    let (dimg, jimg) = (data.crash_image(&mut r), journal.crash_image(&mut r));
    drop(s);

    // Reopened with a background committer, which takes over what the delete left.
    let power = PowerSupply::new();
    let s = Store::open_devices(
        SimDevice::new(dimg, power.clone()),
        SimDevice::new(jimg, power),
        opts(64, true),
        "sim",
    )
    .expect("reopen");
    let report = s.fsck().expect("fsck");
    assert!(report.ok(), "after the crash: {:?}", report.errors);
    assert!(
        s.list_checkpoints("v").expect("list").is_empty(),
        "the checkpoint came back although its delete had committed before freeing began"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.dropped_trees() > 0 {
        assert!(
            Instant::now() < deadline,
            "the background committer left the tree"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    s.flush().expect("flush");
    let report = s.fsck().expect("fsck");
    assert!(report.ok(), "after finishing: {:?}", report.errors);
    assert_eq!(s.space(None).expect("space").allocated, full);
    let mut buf = vec![0u8; BS as usize];
    s.read(&Target::head("v"), 7 * BS, &mut buf).expect("read");
    assert_eq!(buf, block(2, 7));
}

#[test]
fn trimming_a_whole_subtree_hands_it_to_a_dropped_tree() {
    // 2 GiB of address space: the first level-1 subtree covers 510 * 510 blocks (about 1 GiB).
    let (_, _, s) = common::sim_store(PowerSupply::new());
    let span = 510 * 510 * BS;
    s.create_volume("v", 2 * span).expect("create");
    let empty = s.space(None).expect("space").allocated;
    for i in 0..40 {
        s.write("v", i * 3 * 510 * BS, &block(3, i)).expect("write");
    }
    s.write("v", span + BS, &block(4, 0))
        .expect("write past the subtree");
    s.flush().expect("flush");
    s.trim("v", 0, span).expect("trim");
    s.flush().expect("flush");
    assert_eq!(
        s.dropped_trees(),
        1,
        "the trimmed subtree was not handed over"
    );
    let mut buf = vec![0u8; BS as usize];
    s.read(&Target::head("v"), 3 * 510 * BS, &mut buf)
        .expect("read");
    assert_eq!(buf, vec![0u8; BS as usize]);
    let report = s.fsck().expect("fsck");
    assert!(report.ok(), "with the subtree pending: {:?}", report.errors);
    assert_eq!(report.dropped_trees, 1);

    s.free_dropped(&mut |_| {}).expect("free");
    assert_eq!(s.dropped_trees(), 0);
    let report = s.fsck().expect("fsck");
    assert!(report.ok(), "after freeing: {:?}", report.errors);
    s.read(&Target::head("v"), span + BS, &mut buf)
        .expect("read");
    assert_eq!(buf, block(4, 0));
    // Left: the root, the second subtree's path and its one block.
    let left = s.space(None).expect("space").allocated - empty;
    assert!(left <= 4 * BS, "{left} bytes still allocated");
}

#[test]
fn the_background_committer_frees_a_trimmed_subtree_by_itself() {
    let (data, journal) = common::sim_devices(PowerSupply::new());
    let s = Store::open_devices(data, journal, opts(64, true), "sim").expect("open");
    let span = 510 * 510 * BS;
    s.create_volume("v", 2 * span).expect("create");
    s.flush().expect("flush");
    let empty = s.space(None).expect("space").allocated;
    for i in 0..40 {
        s.write("v", i * 3 * 510 * BS, &block(5, i)).expect("write");
    }
    s.flush().expect("flush");
    // No flush, no delete after the trim: the committer has to notice on its own.
    s.trim("v", 0, span).expect("trim");
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.space(None).expect("space").allocated > empty + 2 * BS {
        assert!(
            Instant::now() < deadline,
            "trimmed blocks still allocated: {} trees waiting",
            s.dropped_trees()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.dropped_trees(), 0);
    s.flush().expect("flush");
    let report = s.fsck().expect("fsck");
    assert!(report.ok(), "{:?}", report.errors);
}

/// A store on a disk that stops at `at` once armed: volume `v` with checkpoint `old` holding 64
/// blocks nothing else references, and volume `other`.
fn pausing_store(
    at: common::PauseAt,
) -> (
    Arc<common::PausingDevice>,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
    Arc<Store>,
) {
    let (data, journal) = common::sim_devices(PowerSupply::new());
    let (dev, started, go) = common::PausingDevice::new(data, at);
    let s = Arc::new(
        Store::open_devices(dev.clone(), journal, opts(1 << 20, false), "sim").expect("open"),
    );
    s.create_volume("v", 64 * BS).expect("create v");
    s.create_volume("other", 16 * BS).expect("create other");
    s.write("other", 0, &block(9, 0)).expect("write other");
    s.write("v", 0, &vec![1u8; 64 * BS as usize])
        .expect("write v");
    s.create_checkpoint("v", "old", None).expect("checkpoint");
    s.write("v", 0, &vec![2u8; 64 * BS as usize])
        .expect("overwrite v");
    s.flush().expect("flush");
    (dev, started, go, s)
}

/// Runs `op` until the disk stops it, then reads and writes volume `other`: both must be done
/// while `op` is still stopped. Returns `op`'s result.
fn other_volume_served_while<T: Send + 'static>(
    started: mpsc::Receiver<()>,
    go: mpsc::Sender<()>,
    s: &Arc<Store>,
    what: &str,
    op: impl FnOnce() -> cairn_engine::Result<T> + Send + 'static,
) -> cairn_engine::Result<T> {
    let worker = std::thread::spawn(op);
    started
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{what} never reached the pause point"));
    let (done_tx, done) = mpsc::channel();
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; BS as usize];
            let r = s.read(&Target::head("other"), 0, &mut buf);
            let w = s.write("other", BS, &block(9, 1));
            let _ = done_tx.send((r.is_ok() && buf == block(9, 0), w.is_ok()));
        })
    };
    let served = done.recv_timeout(Duration::from_secs(10));
    drop(go); // the disk may go on now
    let r = worker.join().expect("worker thread");
    reader.join().expect("reader thread");
    assert_eq!(
        served.unwrap_or_else(|_| panic!("a read and a write of another volume waited for {what}")),
        (true, true)
    );
    r
}

#[test]
fn commits_that_release_space_do_not_hold_up_other_volumes() {
    // Each operation's own commit syncs the data file first; the disk stops in that sync.
    type Op = fn(&Store) -> cairn_engine::Result<()>;
    let ops: [(&str, Op); 4] = [
        ("a checkpoint delete's commit", |s| {
            s.delete_checkpoint("v", "old")
        }),
        ("an apply's commit", |s| {
            s.apply_checkpoint("v", "old", None).map(|_| ())
        }),
        ("an apply saving the head's commit", |s| {
            s.apply_checkpoint("v", "old", Some("saved")).map(|_| ())
        }),
        ("a volume delete's commit", |s| s.delete_volume("v")),
    ];
    for (what, op) in ops {
        let (dev, started, go, s) = pausing_store(common::PauseAt::Sync);
        let before = s.space(None).expect("space").host_used;
        dev.arm();
        let worker = s.clone();
        other_volume_served_while(started, go, &s, what, move || op(&worker))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut buf = vec![0u8; BS as usize];
        s.read(&Target::head("other"), BS, &mut buf)
            .expect("read other");
        assert_eq!(buf, block(9, 1), "{what}: the write made meanwhile");
        if what != "an apply saving the head's commit" {
            let after = s.space(None).expect("space").host_used;
            assert!(
                after + 32 * BS <= before,
                "{what} returned before its blocks were released: {before} -> {after}"
            );
        }
        assert!(s.fsck().expect("fsck").ok(), "{what}");
    }
}

#[test]
fn a_delete_punching_holes_does_not_hold_up_other_volumes() {
    let (dev, started, go, s) = pausing_store(common::PauseAt::PunchHole);
    let before = s.space(None).expect("space").host_used;
    dev.arm();
    let deleter = s.clone();
    let deleted =
        other_volume_served_while(started, go, &s, "the delete's hole punching", move || {
            deleter.delete_checkpoint("v", "old")
        });
    deleted.expect("delete");
    let after = s.space(None).expect("space").host_used;
    assert!(
        after + 32 * BS <= before,
        "the delete returned before its blocks were released: {before} -> {after}"
    );
    assert!(s.fsck().expect("fsck").ok());
}
