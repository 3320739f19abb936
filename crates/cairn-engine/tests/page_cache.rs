//! What the engine leaves in the host's page cache, on a real file. Long copies-on-write go
//! straight to the disk with `O_DIRECT` (`device/direct.rs`), everything else through the page
//! cache: the data written either way reads back the same, from the head and from checkpoints,
//! before and after a reopen, and the direct path is really taken (its blocks are not left in the
//! page cache, which a buffered write always leaves behind). Background reads (a backup's,
//! `device/background.rs`) return what plain reads do and leave nothing cached either.

#![allow(missing_docs)]

use cairn_engine::device::{Device, FileDevice};
use cairn_engine::{Options, Store, Target};
use std::fs::File;
use std::path::Path;

const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i / 4096) * 131 + i % 251 + seed * 7) as u8)
        .collect()
}

/// Bytes of `path` in the host's page cache, asked page by page with `mincore` through the
/// engine's own read mapping. Not with reads: even a read that may not wait for the disk
/// (`RWF_NOWAIT`), starts readahead where it misses, and pulls the very blocks being counted into
/// the cache (a version of this test that read failed about one run in 40, counting 4–17 MB of
/// 16 MiB written straight to the disk).
fn cached_bytes(path: &Path) -> u64 {
    let f = File::open(path).expect("open data file");
    let len = f.metadata().expect("stat").len();
    let dev = FileDevice::with_read_mapping(f);
    assert!(
        dev.is_cached(0).is_some(),
        "the page cache cannot be asked about {}",
        path.display()
    );
    (0..len)
        .step_by(4096)
        .filter(|&off| dev.is_cached(off) == Some(true))
        .count() as u64
        * 4096
}

/// Whether the page cache is the storage itself (tmpfs), where nothing can bypass it.
fn on_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    rustix::fs::statfs(path).expect("statfs").f_type as i64 == TMPFS_MAGIC
}

fn opts(direct_writes: bool) -> Options {
    Options {
        direct_writes,
        ..Options::default()
    }
}

fn read(s: &Store, t: &Target, off: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    s.read(t, off as u64, &mut buf).expect("read");
    buf
}

/// Head and checkpoint `c` of volume `v` hold `old` and `new` (the head: `new` with 4 KiB
/// blocks of `small` at every 5th block); checked with long reads, lone blocks and unaligned bytes.
fn check(s: &Store, old: &[u8], new: &[u8], ctx: &str) {
    let head = Target::head("v");
    let cp = Target::checkpoint("v", "c");
    let mut want = new.to_vec();
    for b in (0..new.len() / 4096).step_by(5) {
        want[b * 4096..(b + 1) * 4096].copy_from_slice(&pattern(4096, 1000 + b as u64));
    }
    assert!(
        read(s, &cp, 0, old.len()) == old,
        "{ctx}: checkpoint differs"
    );
    assert!(read(s, &head, 0, want.len()) == want, "{ctx}: head differs");
    for b in (0..want.len() / 4096).step_by(3) {
        let got = read(s, &head, b * 4096, 4096);
        assert!(
            got == want[b * 4096..(b + 1) * 4096],
            "{ctx}: head block {b}"
        );
        let got = read(s, &cp, b * 4096 + 100, 300);
        assert!(
            got == old[b * 4096 + 100..][..300],
            "{ctx}: checkpoint bytes at block {b}"
        );
    }
}

fn write_and_check(direct: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_file = dir.path().join("cairn.data");
    let s = Store::init(dir.path(), opts(direct)).expect("init");
    s.create_volume("v", 64 * MIB as u64).expect("create");
    // 16 MiB of 1 MiB writes to an unwritten range: every block fresh, written through the page
    // cache.
    let old = pattern(16 * MIB, 1);
    for (i, chunk) in old.chunks(MIB).enumerate() {
        s.write("v", (i * MIB) as u64, chunk).expect("write");
    }
    s.flush().expect("flush");
    let before = cached_bytes(&data_file);
    // A checkpoint, then the same range rewritten with 1 MiB writes: copies-on-write, so direct.
    // The buffer is one byte into its allocation, so the direct path must copy it through its
    // aligned buffer. Then a 4 KiB write into every 5th block overwrites a block the head alone
    // holds (in place, buffered).
    s.create_checkpoint("v", "c", None).expect("checkpoint");
    let new = pattern(16 * MIB + 1, 2);
    let new = &new[1..];
    for (i, chunk) in new.chunks(MIB).enumerate() {
        s.write("v", (i * MIB) as u64, chunk).expect("rewrite");
    }
    s.flush().expect("flush");
    let added = cached_bytes(&data_file).saturating_sub(before);
    if on_tmpfs(dir.path()) {
        eprintln!("the test directory is on tmpfs: page-cache check skipped");
    } else if direct {
        assert!(
            added < 4 * MIB as u64,
            "{added} more bytes of the data file cached after 16 MiB of direct copies-on-write"
        );
    } else {
        assert!(
            added >= 16 * MIB as u64,
            "only {added} more bytes cached after 16 MiB of buffered copies-on-write"
        );
    }
    for b in (0..new.len() / 4096).step_by(5) {
        s.write("v", (b * 4096) as u64, &pattern(4096, 1000 + b as u64))
            .expect("small write");
    }
    check(&s, &old, new, "before reopen");
    s.flush().expect("flush");
    drop(s);
    let s = Store::open(dir.path(), opts(direct)).expect("reopen");
    check(&s, &old, new, "after reopen");
    let report = s.fsck().expect("fsck");
    assert!(report.errors.is_empty(), "fsck: {:?}", report.errors);
}

#[test]
fn long_copies_on_write_go_past_the_page_cache_and_read_back() {
    write_and_check(true);
}

#[test]
fn with_direct_writes_off_the_same_writes_are_cached_and_read_back() {
    write_and_check(false);
}

/// A backup's reads (`Store::read_background`) return what `Store::read` does, holes and
/// rewritten blocks included, and what they fetch from the disk stays out of the page cache.
#[test]
fn background_reads_match_reads_and_leave_the_page_cache_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_file = dir.path().join("cairn.data");
    let s = Store::init(dir.path(), opts(true)).expect("init");
    s.create_volume("v", 64 * MIB as u64).expect("create");
    // 16 MiB of data, a 1 MiB hole at 4 MiB, then a checkpoint and every 7th block rewritten.
    let mut want = pattern(16 * MIB, 3);
    want[4 * MIB..5 * MIB].fill(0);
    for (i, chunk) in want.chunks(MIB).enumerate() {
        if i != 4 {
            s.write("v", (i * MIB) as u64, chunk).expect("write");
        }
    }
    s.create_checkpoint("v", "c", None).expect("checkpoint");
    for b in (0..16 * MIB / 4096).step_by(7) {
        s.write("v", (b * 4096) as u64, &pattern(4096, 500 + b as u64))
            .expect("rewrite");
    }
    s.flush().expect("flush");
    // Out of the page cache, as a volume larger than memory is when a backup reaches it.
    let f = File::open(&data_file).expect("open data file");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    let before = cached_bytes(&data_file);
    let cp = Target::checkpoint("v", "c");
    let mut got = vec![0u8; 16 * MIB];
    for (i, chunk) in got.chunks_mut(64 << 10).enumerate() {
        s.read_background(&cp, (i * (64 << 10)) as u64, chunk)
            .expect("background read");
    }
    assert!(got == want, "a background read of the checkpoint differs");
    let added = cached_bytes(&data_file).saturating_sub(before);
    if on_tmpfs(dir.path()) {
        eprintln!("the test directory is on tmpfs: page-cache check skipped");
    } else {
        assert!(
            added < 2 * MIB as u64,
            "{added} bytes of the data file cached after background reads of 15 MiB"
        );
    }
    // Cached blocks, unaligned ranges and the head (rewritten blocks) read the same either way.
    let head = Target::head("v");
    for (t, off, len) in [
        (&cp, 100, 9000),
        (&head, 0, MIB),
        (&head, 4 * MIB - 300, 5000),
    ] {
        let plain = read(&s, t, off, len);
        let mut bg = vec![0u8; len];
        s.read_background(t, off as u64, &mut bg)
            .expect("background read");
        assert!(bg == plain, "{t:?} at {off}+{len} differs");
    }
}

/// What a backup reads (`Store::extents_to_back_up`, walked without filling the metadata cache)
/// is exactly what `mapped_extents` and `diff` say, across several leaves and levels.
#[test]
fn extents_to_back_up_match_the_diff_and_the_mapped_extents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::init(dir.path(), opts(true)).expect("init");
    s.create_volume("v", 1 << 34).expect("create");
    for i in 0..300u64 {
        // Scattered over 16 GiB: many leaves, more than one interior page.
        let off = (i * 7919 % 4096) * (4 << 20) + (i % 5) * 4096;
        s.write("v", off, &pattern(4096 * (1 + i as usize % 3), i))
            .expect("write");
    }
    s.create_checkpoint("v", "a", None).expect("checkpoint");
    for i in 0..40u64 {
        s.write("v", i * (400 << 20), &pattern(8192, 900 + i))
            .expect("rewrite");
    }
    s.create_checkpoint("v", "b", None).expect("checkpoint");
    let (a, b) = (Target::checkpoint("v", "a"), Target::checkpoint("v", "b"));
    assert_eq!(
        s.extents_to_back_up(None, &b).expect("full"),
        s.mapped_extents(&b).expect("mapped")
    );
    let changed = s.extents_to_back_up(Some(&a), &b).expect("incremental");
    assert_eq!(changed, s.diff(&a, &b).expect("diff"));
    assert!(!changed.is_empty());
    let e = s
        .extents_to_back_up(Some(&Target::checkpoint("w", "a")), &b)
        .expect_err("another volume");
    assert!(e.to_string().contains("'w'"), "{e}");
}
