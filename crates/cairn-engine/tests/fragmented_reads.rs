//! Reads of a fragmented range (a head whose blocks were rewritten after checkpoints lies in many
//! runs on the host). A read in many runs first asks whether a few of its blocks are cached; if
//! one is not, it hints every run to the device at once instead of waiting for one disk read per
//! run, and while it copies one run it hints the next ones to the CPU. These tests check what the
//! store asks of the device, and that the bytes are right on real files, cold and warm.

#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::{Options, Store, Target};
use common::{sim_devices, small_opts, Event, RecordingDevice, BS};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn block(i: u64, round: u64) -> Vec<u8> {
    (0..BS).map(|j| (i * 31 + j + round * 101) as u8).collect()
}

/// What block `i` holds after [`fragment`]: every other block rewritten.
fn expected(i: u64) -> Vec<u8> {
    block(i, i % 2)
}

/// Writes `blocks` blocks, takes a checkpoint and rewrites every other block, so the head lies
/// in one run per block.
fn fragment(s: &Store, blocks: u64) {
    s.create_volume("v", 64 * MIB).expect("create");
    let all: Vec<u8> = (0..blocks).flat_map(|i| block(i, 0)).collect();
    s.write("v", 0, &all).expect("write");
    s.create_checkpoint("v", "c", None).expect("checkpoint");
    for i in (1..blocks).step_by(2) {
        s.write("v", i * BS, &block(i, 1)).expect("rewrite");
    }
    s.flush().expect("flush");
}

fn recording_store() -> (Arc<RecordingDevice>, Store) {
    let (data, journal) = sim_devices(PowerSupply::new());
    let dev = RecordingDevice::new(data);
    let s = Store::open_devices(dev.clone(), journal, small_opts(), "sim").expect("open");
    (dev, s)
}

fn read_head(s: &Store, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    s.read(&Target::head("v"), offset, &mut buf).expect("read");
    buf
}

#[test]
fn a_cold_fragmented_read_hints_every_run_before_reading_any() {
    let (dev, s) = recording_store();
    fragment(&s, 512);
    dev.cached.store(2, Ordering::SeqCst);
    dev.take();
    // 64 blocks from block 8: 64 runs of one block.
    let got = read_head(&s, 8 * BS, 64 * BS);
    let want: Vec<u8> = (8..72).flat_map(expected).collect();
    assert!(got == want, "the cold fragmented read returned wrong bytes");
    let events = dev.take();
    assert_hinted_whole_before_reading(&events, 64);
}

/// Checks that a read in `runs` runs of one block hinted each run to the disk exactly once, and
/// every hint before the first read.
fn assert_hinted_whole_before_reading(events: &[Event], runs: usize) {
    let hints: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match *e {
            Event::Hint(o, l) => Some((o, l)),
            _ => None,
        })
        .collect();
    let reads: Vec<(usize, u64)> = events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match *e {
            Event::Read(o, _) => Some((i, o)),
            _ => None,
        })
        .collect();
    assert_eq!(reads.len(), runs, "one read per run: {events:?}");
    assert_eq!(hints.len(), runs, "one hint per run: {events:?}");
    assert!(hints.iter().all(|h| h.1 == BS));
    let mut hinted: Vec<u64> = hints.iter().map(|h| h.0).collect();
    let mut read: Vec<u64> = reads.iter().map(|r| r.1).collect();
    hinted.sort_unstable();
    read.sort_unstable();
    assert_eq!(hinted, read, "the hints name exactly the runs read");
    let last_hint = events
        .iter()
        .rposition(|e| matches!(e, Event::Hint(..)))
        .expect("hints");
    assert!(
        reads[0].0 > last_hint,
        "every hint comes before the first read: {events:?}"
    );
}

#[test]
fn a_cached_or_short_read_gives_the_disk_no_hints() {
    let (dev, s) = recording_store();
    fragment(&s, 512);
    for cached in [0, 1] {
        dev.cached.store(cached, Ordering::SeqCst);
        dev.take();
        let got = read_head(&s, 0, 256 * BS);
        let want: Vec<u8> = (0..256).flat_map(expected).collect();
        assert!(got == want, "wrong bytes (cached = {cached})");
        let events = dev.take();
        assert!(
            !events.iter().any(|e| matches!(e, Event::Hint(..))),
            "no disk hints when the blocks asked about are cached or nobody can tell: {events:?}"
        );
        // While a run is copied, the CPU is asked to fetch later ones: each run but the first
        // is hinted exactly once, before it is read.
        let warm: Vec<u64> = events
            .iter()
            .filter_map(|e| match *e {
                Event::Warm(o) => Some(o),
                _ => None,
            })
            .collect();
        assert_eq!(warm.len(), 255, "{events:?}");
        for (i, e) in events.iter().enumerate() {
            if let Event::Read(o, _) = *e {
                let first = events.iter().position(|x| matches!(*x, Event::Read(..)));
                assert!(
                    Some(i) == first || events[..i].contains(&Event::Warm(o)),
                    "run at {o} read before it was hinted"
                );
            }
        }
    }
    // Seven runs are too few to be worth asking.
    dev.cached.store(2, Ordering::SeqCst);
    dev.take();
    let got = read_head(&s, 0, 7 * BS);
    let want: Vec<u8> = (0..7).flat_map(expected).collect();
    assert!(got == want);
    assert!(!dev.take().iter().any(|e| matches!(e, Event::Hint(..))));
}

/// Whether the page cache is the storage itself (tmpfs), where nothing can be evicted.
fn on_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    rustix::fs::statfs(path).expect("statfs").f_type as i64 == TMPFS_MAGIC
}

/// Drops a closed store's data file from the host's page cache.
fn evict(dir: &Path) {
    let f = std::fs::File::open(dir.join(cairn_engine::store::DATA_FILE)).expect("data file");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
}

/// The round of [`block`] block `i` holds in the real-file test's head (`second`) or in its
/// checkpoint `d` (the first rewrite only).
fn round(i: u64, second: bool) -> u64 {
    if second && i.is_multiple_of(6) && i < 1024 {
        2
    } else if i % 5 == 1 && i < 1536 {
        1
    } else {
        0
    }
}

#[test]
fn fragmented_reads_on_real_files_return_what_was_written_cold_and_warm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = 2048;
    {
        let s = Store::init(dir.path(), Options::default()).expect("init");
        s.create_volume("v", 64 * MIB).expect("create");
        let all: Vec<u8> = (0..blocks).flat_map(|i| block(i, 0)).collect();
        s.write("v", 0, &all).expect("write");
        // Two rewrites after checkpoints leave runs of one to four blocks (which a fragmented
        // read copies from the mapping whole) below block 1536, and one long run above.
        for (name, second) in [("c", false), ("d", true)] {
            s.create_checkpoint("v", name, None).expect("checkpoint");
            for i in 0..blocks {
                if round(i, second) == 2 || (!second && round(i, false) == 1) {
                    s.write("v", i * BS, &block(i, round(i, second)))
                        .expect("rewrite");
                }
            }
        }
        s.flush().expect("flush");
    }
    let head = |i: u64| block(i, round(i, true));
    if on_tmpfs(dir.path()) {
        eprintln!("the test directory is on tmpfs: the cold read is warm");
    }
    evict(dir.path());
    let s = Store::open(dir.path(), Options::default()).expect("open");
    for pass in ["cold", "warm"] {
        // 1 MiB reads, and a read starting and ending mid-block across the long run's start.
        for start in (0..blocks * BS).step_by(MIB as usize) {
            let got = read_head(&s, start, MIB);
            let want: Vec<u8> = (start / BS..(start + MIB) / BS).flat_map(head).collect();
            assert!(got == want, "{pass} read of the head at {start}");
        }
        let got = read_head(&s, 1400 * BS + 100, 300 * BS);
        let want: Vec<u8> = (1400..1701).flat_map(head).collect();
        assert!(
            got[..] == want[100..100 + 300 * BS as usize],
            "{pass} unaligned read"
        );
        let mut c = vec![0u8; (blocks * BS) as usize];
        s.read(&Target::checkpoint("v", "d"), 0, &mut c)
            .expect("read checkpoint");
        let want: Vec<u8> = (0..blocks)
            .flat_map(|i| block(i, round(i, false)))
            .collect();
        assert!(c == want, "{pass} read of the checkpoint");
    }
    assert!(s.fsck().expect("fsck").ok());
}

#[test]
fn a_fragmented_read_the_host_dropped_in_part_is_hinted_whole() {
    let (dev, s) = recording_store();
    fragment(&s, 512);
    // Where each of 256 runs lies, from a read the device can say nothing about.
    dev.cached.store(0, Ordering::SeqCst);
    dev.take();
    let want: Vec<u8> = (0..256).flat_map(expected).collect();
    assert!(read_head(&s, 0, 256 * BS) == want);
    let runs: Vec<u64> = dev
        .take()
        .iter()
        .filter_map(|e| match *e {
            Event::Read(o, _) => Some(o),
            _ => None,
        })
        .collect();
    assert_eq!(runs.len(), 256);
    // The host dropped one block half-way through the read, not the first: the read is
    // hinted whole before any run is read.
    dev.cached.store(3, Ordering::SeqCst);
    dev.cold_offset.store(runs[128], Ordering::SeqCst);
    assert!(read_head(&s, 0, 256 * BS) == want);
    let events = dev.take();
    let asked = events
        .iter()
        .filter(|e| matches!(e, Event::Asked(_)))
        .count();
    assert!(
        asked <= 4,
        "a few blocks are asked about, not every one: {asked}"
    );
    assert_hinted_whole_before_reading(&events, 256);
}
