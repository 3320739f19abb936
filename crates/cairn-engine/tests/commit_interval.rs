//! Acknowledged writes and write-zeroes reach the disk within the commit interval, flush or not:
//! after a power cut that loses every write not synced, what was written an interval earlier is
//! there; without the interval it is not (so the test can tell).

mod common;

use std::time::Duration;

use cairn_engine::device::PowerSupply;
use cairn_engine::{Options, Store, Target};

const MIB: usize = 1 << 20;

/// Runs `work` on a fresh store with volume `v` (4 MiB) and commits by time every `interval`,
/// waits `wait`, cuts the power losing every write not synced, and returns `len` bytes of `v`
/// from `at` after recovery.
fn cut_after(
    interval: Option<Duration>,
    wait: Duration,
    work: impl FnOnce(&Store),
    at: u64,
    len: usize,
) -> Vec<u8> {
    let power = PowerSupply::new();
    let (data, journal) = common::sim_devices(power);
    let opts = Options {
        background_commits: true,
        commit_interval: interval,
        ..common::small_opts()
    };
    let s = Store::open_devices(data.clone(), journal.clone(), opts, "sim").expect("open");
    s.create_volume("v", 4 * MIB as u64).expect("volume");
    work(&s);
    std::thread::sleep(wait);
    // Every write not synced is lost (the worst a power cut can do).
    let lose_all = &mut |_| 0;
    let (d, j) = (data.crash_image(lose_all), journal.crash_image(lose_all));
    drop(s);
    let s = common::reopen_crashed(d, j, "after the cut");
    let mut out = vec![1u8; len];
    s.read(&Target::head("v"), at, &mut out).expect("read");
    let report = s.fsck().expect("fsck");
    assert!(report.ok(), "{:?}", report.errors);
    out
}

/// Writes 1 MiB in 4 KiB and 256 KiB pieces without a flush, then [`cut_after`]; returns the MiB.
fn written_then_cut(interval: Option<Duration>, wait: Duration) -> Vec<u8> {
    let work = |s: &Store| {
        let bytes: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
        s.write("v", 0, &bytes[..MIB / 2]).expect("write");
        for (i, chunk) in bytes[MIB / 2..].chunks(4096).enumerate() {
            s.write("v", (MIB / 2 + i * 4096) as u64, chunk)
                .expect("write");
        }
    };
    cut_after(interval, wait, work, 0, MIB)
}

#[test]
fn writes_are_committed_by_time_without_a_flush() {
    let want: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    let kept = written_then_cut(Some(Duration::from_millis(200)), Duration::from_millis(800));
    assert!(kept == want, "written 600 ms past the interval, and lost");
    let lost = written_then_cut(None, Duration::from_millis(800));
    assert!(
        lost.iter().all(|&b| b == 0),
        "without the interval nothing was committed"
    );
}

/// Writes 256 KiB and flushes, then zeroes 8 KiB of it without a flush, then [`cut_after`];
/// returns those 8 KiB.
fn zeroed_then_cut(interval: Option<Duration>, wait: Duration) -> Vec<u8> {
    let work = |s: &Store| {
        s.write("v", 0, &[7; 256 << 10]).expect("write");
        s.flush().expect("flush");
        s.write_zeroes("v", 64 << 10, 8192).expect("write-zeroes");
    };
    cut_after(interval, wait, work, 64 << 10, 8192)
}

#[test]
fn write_zeroes_are_committed_by_time_without_a_flush() {
    let kept = zeroed_then_cut(Some(Duration::from_millis(200)), Duration::from_millis(800));
    assert!(
        kept.iter().all(|&b| b == 0),
        "zeroed 600 ms past the interval, and lost"
    );
    let lost = zeroed_then_cut(None, Duration::from_millis(800));
    assert!(
        lost.iter().all(|&b| b == 7),
        "without the interval nothing was committed"
    );
}
