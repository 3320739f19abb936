//! Write-behind (`store/write_behind.rs`): a long copy-on-write is acknowledged once its bytes
//! are queued, and a thread of the store writes and links them. Whatever looks at those blocks
//! must see the write: reads, checkpoints, diffs, a flush, a reopen. A write that fails after its
//! acknowledgement is reported by the next flush, and a power cut loses at most what was not
//! flushed.

#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::{Options, Store, Target};
use common::{recovered_checkpoints, reopen_crashed, sim_store, BS};

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
