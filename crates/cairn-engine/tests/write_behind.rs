//! Write-behind (`store/write_behind.rs`): a long copy-on-write is acknowledged once its bytes
//! are queued, and a thread of the store writes and links them; a short one is parked until a
//! flush (or whatever needs it) writes it, together with the others. Whatever looks at those
//! blocks must see the write: reads, checkpoints, diffs, a flush, a reopen. A write that fails
//! after its acknowledgement is reported by the next flush, and a power cut loses at most what
//! was not flushed.

#![allow(missing_docs)]

mod common;

use cairn_engine::device::{Device, PowerSupply, SimDevice};
use cairn_engine::{Options, Store, Target};
use common::{recovered_checkpoints, reopen_crashed, sim_store, BS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn pattern(tag: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_add((i / 4096) as u8))
        .collect()
}

fn read(s: &Store, t: &Target, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    s.read(t, off, &mut buf).expect("read");
    buf
}

#[test]
fn acknowledged_long_rewrites_are_seen_by_reads_checkpoints_diffs_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = Target::head("v");
    {
        let s = Store::init(dir.path(), Options::default()).expect("init");
        s.create_volume("v", 16 * MIB).expect("create");
        s.write("v", 0, &pattern(1, 16 * MIB)).expect("fill");
        s.create_checkpoint("v", "c", None).expect("checkpoint");
        for k in 0..16u64 {
            s.write("v", k * MIB, &pattern(10 + k as u8, MIB))
                .expect("rewrite");
            // Read back at once: the read waits for the write it overlaps.
            assert!(
                read(&s, &head, k * MIB, MIB) == pattern(10 + k as u8, MIB),
                "read right after the write of MiB {k}"
            );
        }
        assert!(
            s.stats().writes_behind > 0,
            "no write went behind: the test tests nothing"
        );
        // A long write over blocks the head already owns alone (written in place) and shared
        // ones (copied) goes behind as a whole.
        s.create_checkpoint("v", "e", None).expect("checkpoint");
        s.write("v", 4 * MIB + 8 * BS, &pattern(80, 4 * BS))
            .expect("short write");
        let behind = s.stats().writes_behind;
        s.write("v", 4 * MIB, &pattern(90, MIB))
            .expect("mixed write");
        assert_eq!(
            s.stats().writes_behind,
            behind + 1,
            "the mixed write went behind"
        );
        assert!(read(&s, &head, 4 * MIB, MIB) == pattern(90, MIB));
        let e = Target::checkpoint("v", "e");
        assert!(read(&s, &e, 4 * MIB, MIB) == pattern(14, MIB));
        // A checkpoint taken right after a write holds it, and the head can move on.
        s.write("v", 0, &pattern(50, MIB)).expect("rewrite");
        s.create_checkpoint("v", "d", None).expect("checkpoint");
        s.write("v", 0, &pattern(60, MIB)).expect("rewrite");
        let d = Target::checkpoint("v", "d");
        assert!(read(&s, &d, 0, MIB) == pattern(50, MIB));
        assert!(read(&s, &head, 0, MIB) == pattern(60, MIB));
        let changed: u64 = s
            .diff(&d, &head)
            .expect("diff")
            .iter()
            .map(|e| e.length)
            .sum();
        assert_eq!(changed, MIB, "the diff sees the write just acknowledged");
        // A trim of a range being written waits for the write, then wins.
        s.write("v", 2 * MIB, &pattern(70, MIB)).expect("rewrite");
        s.trim("v", 2 * MIB, MIB).expect("trim");
        assert!(read(&s, &head, 2 * MIB, MIB) == vec![0u8; MIB as usize]);
        // Closing the store is a flush: no flush here.
    }
    let s = Store::open(dir.path(), Options::default()).expect("reopen");
    assert!(read(&s, &head, 0, MIB) == pattern(60, MIB));
    assert!(read(&s, &head, MIB, MIB) == pattern(11, MIB));
    assert!(read(&s, &head, 2 * MIB, MIB) == vec![0u8; MIB as usize]);
    assert!(read(&s, &head, 4 * MIB, MIB) == pattern(90, MIB));
    for k in (3..16u64).filter(|&k| k != 4) {
        assert!(read(&s, &head, k * MIB, MIB) == pattern(10 + k as u8, MIB));
    }
    assert!(read(&s, &Target::checkpoint("v", "c"), 0, 16 * MIB) == pattern(1, 16 * MIB));
    assert!(read(&s, &Target::checkpoint("v", "d"), 0, MIB) == pattern(50, MIB));
    assert!(s.fsck().expect("fsck").ok());
}

#[test]
fn a_write_that_fails_after_its_acknowledgement_is_reported_by_the_next_flush() {
    let (data, _journal, s) = sim_store(PowerSupply::new());
    s.create_volume("v", 4 * MIB).expect("create");
    s.write("v", 0, &pattern(1, 4 * MIB)).expect("fill");
    s.create_checkpoint("v", "c", None).expect("checkpoint");
    let before = s.stats().writes_behind;
    data.fail_next(1);
    s.write("v", MIB, &pattern(2, MIB))
        .expect("acknowledged before it is written");
    assert_eq!(s.stats().writes_behind, before + 1, "the write went behind");
    let err = s
        .flush()
        .expect_err("the failed write must not pass for durable");
    assert!(
        err.to_string().contains("data write"),
        "the error says what failed: {err}"
    );
    assert_eq!(data.failures_pending(), 0);
    // The range keeps what it held; the store goes on.
    assert!(read(&s, &Target::head("v"), MIB, MIB) == pattern(1, MIB));
    s.write("v", MIB, &pattern(3, MIB)).expect("write");
    s.flush().expect("flush");
    assert!(read(&s, &Target::head("v"), MIB, MIB) == pattern(3, MIB));
    assert!(s.fsck().expect("fsck").ok());
}

#[test]
fn a_power_cut_behind_an_acknowledged_write_loses_only_what_was_not_flushed() {
    let power = PowerSupply::new();
    let (data, journal, s) = sim_store(power.clone());
    s.create_volume("v", 4 * MIB).expect("create");
    s.write("v", 0, &pattern(1, 4 * MIB)).expect("fill");
    s.create_checkpoint("v", "c", None).expect("checkpoint");
    s.write("v", 0, &pattern(2, MIB)).expect("rewrite");
    s.flush().expect("flush");
    for cut in 0..6 {
        power.cut_after(cut);
        let _ = s.write("v", MIB, &pattern(3, 2 * MIB));
        let _ = s.flush();
        if power.is_off() {
            break;
        }
    }
    assert!(power.is_off(), "the power was never cut");
    // Unsynced writes are dropped, torn or reordered at random.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rng = |n: u32| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as u32
    };
    let (d, j) = (data.crash_image(&mut rng), journal.crash_image(&mut rng));
    drop(s);
    let s = reopen_crashed(d, j, "cut behind a write");
    assert_eq!(recovered_checkpoints(&s, "v", "cut"), vec!["c".to_string()]);
    let head = read(&s, &Target::head("v"), 0, 4 * MIB);
    assert!(
        head[..MIB as usize] == pattern(2, MIB)[..],
        "flushed data kept"
    );
    // Each block of the unflushed rewrite holds the old or the new bytes.
    let old = pattern(1, 4 * MIB);
    let new = pattern(3, 2 * MIB);
    for b in (MIB / BS)..(3 * MIB / BS) {
        let r = (b * BS) as usize..((b + 1) * BS) as usize;
        let n = (b * BS - MIB) as usize..((b + 1) * BS - MIB) as usize;
        assert!(
            head[r.clone()] == old[r.clone()] || head[r] == new[n],
            "block {b} torn or foreign"
        );
    }
    assert!(read(&s, &Target::checkpoint("v", "c"), 0, 4 * MIB) == old);
}

/// One block whose bytes name the writer and the write.
fn block_of(tag: u64, seq: u64) -> Vec<u8> {
    (tag << 32 | seq).to_le_bytes().repeat(512)
}

#[test]
fn parked_short_copies_on_write_are_seen_by_every_reader_and_survive_a_close() {
    const BLOCKS: u64 = 8192;
    const THREADS: u64 = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let head = Target::head("v");
    let c = Target::checkpoint("v", "c");
    let mut model = vec![block_of(0, 0); BLOCKS as usize];
    {
        let s = Arc::new(Store::init(dir.path(), Options::default()).expect("init"));
        s.create_volume("v", BLOCKS * BS).expect("create");
        s.write("v", 0, &model.concat()).expect("fill");
        s.create_checkpoint("v", "c", None).expect("checkpoint");
        let before = s.stats().writes_behind;
        // Each thread rewrites blocks of its own (block % THREADS), in a random order, some
        // twice, and reads every write back at once: the read writes the parked write first.
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (s, head) = (s.clone(), head.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                    let mut written = Vec::new();
                    for seq in 1..=400u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let b = (x % (BLOCKS / THREADS)) * THREADS + t;
                        let data = block_of(t + 1, seq);
                        s.write("v", b * BS, &data).expect("write");
                        if seq % 2 == 0 {
                            assert!(read(&s, &head, b * BS, BS) == data, "block {b} read back");
                        }
                        written.push((b, data));
                    }
                    written
                })
            })
            .collect();
        for w in workers {
            for (b, data) in w.join().expect("writer") {
                model[b as usize] = data;
            }
        }
        let parked = s.stats().writes_behind - before;
        assert!(
            parked >= 1000,
            "only {parked} of 1,600 short copies-on-write were parked"
        );
        // More short copies than may be parked at once (16 MiB): the writes past the bound
        // write the parked ones first, and nothing is lost on the way.
        s.create_checkpoint("v", "d", None).expect("checkpoint");
        for b in 0..BLOCKS {
            let data = block_of(5, b);
            s.write("v", b * BS, &data).expect("write");
            model[b as usize] = data;
        }
        // A checkpoint right after holds every acknowledged write; the diff sees them all.
        s.create_checkpoint("v", "e", None).expect("checkpoint");
        let e = Target::checkpoint("v", "e");
        assert!(read(&s, &e, 0, BLOCKS * BS) == model.concat());
        let changed: u64 = s.diff(&c, &e).expect("diff").iter().map(|x| x.length).sum();
        assert_eq!(changed, BLOCKS * BS, "the diff covers every block written");
        // More short rewrites, then the store is closed without a flush: closing is one.
        for b in 0..32u64 {
            let data = block_of(7, b);
            s.write("v", b * 3 * BS, &data).expect("write");
            model[(b * 3) as usize] = data;
        }
    }
    let s = Store::open(dir.path(), Options::default()).expect("reopen");
    assert!(
        read(&s, &head, 0, BLOCKS * BS) == model.concat(),
        "head after reopen"
    );
    assert!(read(&s, &c, 0, BLOCKS * BS) == vec![block_of(0, 0); BLOCKS as usize].concat());
    assert!(s.fsck().expect("fsck").ok());
}

/// A data device that counts the writes that reach it.
struct CountingDevice {
    inner: Arc<SimDevice>,
    writes: AtomicU64,
}

impl Device for CountingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[test]
fn parked_writes_go_out_together_at_the_flush_and_a_failure_loses_all_of_them_once() {
    let (data, journal) = common::sim_devices(PowerSupply::new());
    let dev = Arc::new(CountingDevice {
        inner: data.clone(),
        writes: AtomicU64::new(0),
    });
    let opts = Options {
        background_commits: false,
        ..Options::default()
    };
    let s = Store::open_devices(dev.clone(), journal, opts, "sim").expect("open");
    let head = Target::head("v");
    let writes = || dev.writes.load(Ordering::SeqCst);
    s.create_volume("v", 64 * BS).expect("create");
    s.write("v", 0, &block_of(1, 0).repeat(64)).expect("fill");
    s.create_checkpoint("v", "c", None).expect("checkpoint");
    let before = (s.stats().writes_behind, writes());
    // Nine short copies-on-write are acknowledged without a write to the disk.
    for b in [0].into_iter().chain(10..18u64) {
        s.write("v", b * BS, &block_of(2, b)).expect("acknowledged");
    }
    assert_eq!(
        s.stats().writes_behind,
        before.0 + 9,
        "all nine were parked"
    );
    assert_eq!(
        writes(),
        before.1,
        "nothing reached the disk before a flush"
    );
    // A read of a block nobody rewrote writes nothing either.
    assert!(read(&s, &head, 5 * BS, BS) == block_of(1, 0));
    assert_eq!(writes(), before.1);
    // Their fresh blocks follow each other, so they go out as one write: failing it fails all
    // nine, where one by one eight would land.
    data.fail_next(1);
    let err = s
        .flush()
        .expect_err("failed writes must not pass for durable");
    assert!(
        err.to_string().contains("data write"),
        "the error says what failed: {err}"
    );
    assert_eq!(data.failures_pending(), 0, "the failure happened");
    s.flush().expect("the loss is reported once");
    for b in [0].into_iter().chain(10..18) {
        assert!(
            read(&s, &head, b * BS, BS) == block_of(1, 0),
            "block {b} keeps what it held"
        );
    }
    // A read of a parked block writes that block alone, and sees it.
    s.write("v", 20 * BS, &block_of(3, 20)).expect("parked");
    s.write("v", 30 * BS, &block_of(3, 30)).expect("parked");
    let w = writes();
    assert!(read(&s, &head, 20 * BS, BS) == block_of(3, 20));
    assert_eq!(
        writes(),
        w + 1,
        "the read wrote the one parked block it needed"
    );
    s.flush().expect("flush");
    assert!(read(&s, &head, 30 * BS, BS) == block_of(3, 30));
    assert!(read(&s, &Target::checkpoint("v", "c"), 0, 64 * BS) == block_of(1, 0).repeat(64));
    assert!(s.fsck().expect("fsck").ok());
}

#[test]
fn a_power_cut_with_short_writes_parked_loses_only_what_was_not_flushed() {
    // The cut comes at several points of the flush that writes the parked blocks and commits.
    for cut in [0, 1, 2, 3, 5, 8, 13] {
        let power = PowerSupply::new();
        let (data, journal, s) = sim_store(power.clone());
        let blocks = 256u64;
        s.create_volume("v", blocks * BS).expect("create");
        s.write("v", 0, &block_of(1, 0).repeat(blocks as usize))
            .expect("fill");
        s.create_checkpoint("v", "c", None).expect("checkpoint");
        for b in (0..blocks).step_by(2) {
            s.write("v", b * BS, &block_of(2, b)).expect("parked");
        }
        s.flush().expect("flush");
        for b in (1..blocks).step_by(2) {
            s.write("v", b * BS, &block_of(3, b)).expect("parked");
        }
        power.cut_after(cut);
        let flushed = s.flush().is_ok();
        assert!(
            power.is_off() || flushed,
            "cut {cut}: the flush failed with the power on"
        );
        let mut x = 0x2545_F491_4F6C_DD1Du64 ^ cut;
        let mut rng = |n: u32| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as u32
        };
        let (d, j) = (data.crash_image(&mut rng), journal.crash_image(&mut rng));
        drop(s);
        let s = reopen_crashed(d, j, "cut with parked writes");
        assert_eq!(recovered_checkpoints(&s, "v", "cut"), vec!["c".to_string()]);
        for b in 0..blocks {
            let got = read(&s, &Target::head("v"), b * BS, BS);
            if b % 2 == 0 {
                assert!(got == block_of(2, b), "cut {cut}: flushed block {b} kept");
            } else if flushed {
                assert!(got == block_of(3, b), "cut {cut}: block {b} flushed");
            } else {
                assert!(
                    got == block_of(1, 0) || got == block_of(3, b),
                    "cut {cut}: block {b} holds the old or the new bytes"
                );
            }
        }
        assert!(
            read(&s, &Target::checkpoint("v", "c"), 0, blocks * BS)
                == block_of(1, 0).repeat(blocks as usize)
        );
    }
}
