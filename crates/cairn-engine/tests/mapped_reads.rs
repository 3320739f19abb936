//! Short volume reads are copied from a mapping of the data file (`device/mapping.rs`). What a
//! mapping adds over `pread` is the way it fails: a page the kernel cannot provide raises SIGBUS
//! in the reading thread. These tests cut the data file short under an open store and check that
//! reads then fail with an error that names the cause, and that the process lives on.

#![allow(missing_docs)]

use cairn_engine::{Error, Options, Store, Target};
use std::fs::OpenOptions;

const MIB: u64 = 1 << 20;

fn block(i: u64) -> Vec<u8> {
    (0..4096u64).map(|j| (i * 31 + j) as u8).collect()
}

/// A store on real files (so with the read mapping) whose volume `v` holds `block(i)` in each of
/// its first `blocks` blocks, flushed.
fn store_with_blocks(blocks: u64) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::init(dir.path(), Options::default()).expect("init");
    s.create_volume("v", 64 * MIB).expect("create");
    for i in 0..blocks {
        s.write("v", i * 4096, &block(i)).expect("write");
    }
    s.flush().expect("flush");
    (dir, s)
}

#[test]
fn short_reads_return_what_was_written() {
    let (_dir, s) = store_with_blocks(2048);
    // Relocate every third block, so that reads mix runs and lone blocks.
    s.create_checkpoint("v", "c", None).expect("checkpoint");
    for i in (0..2048).step_by(3) {
        s.write("v", i * 4096, &block(i + 7)).expect("overwrite");
    }
    let expect = |i: u64| {
        if i.is_multiple_of(3) {
            block(i + 7)
        } else {
            block(i)
        }
    };
    let mut buf = vec![0u8; 4096];
    for i in (0..2048).rev() {
        s.read(&Target::head("v"), i * 4096, &mut buf)
            .expect("read");
        assert_eq!(buf, expect(i), "block {i}");
    }
    // Unaligned short reads straddle two blocks.
    for i in 1..100 {
        let mut two = vec![0u8; 100];
        s.read(&Target::head("v"), i * 4096 - 50, &mut two)
            .expect("read");
        assert_eq!(&two[..50], &expect(i - 1)[4046..]);
        assert_eq!(&two[50..], &expect(i)[..50]);
    }
    let mut big = vec![0u8; 8 * MIB as usize];
    s.read(&Target::checkpoint("v", "c"), 0, &mut big)
        .expect("read checkpoint");
    for i in 0..2048 {
        assert_eq!(
            &big[i as usize * 4096..][..4096],
            &block(i)[..],
            "cp block {i}"
        );
    }
}

#[test]
fn a_data_file_cut_short_under_an_open_store_gives_errors_not_a_crash() {
    let (dir, s) = store_with_blocks(4096);
    let mut buf = vec![0u8; 4096];
    // Read everything once through the mapping, so that its pages are in the page tables.
    for i in 0..4096 {
        s.read(&Target::head("v"), i * 4096, &mut buf)
            .expect("read");
        assert_eq!(buf, block(i));
    }
    let data = OpenOptions::new()
        .write(true)
        .open(dir.path().join(cairn_engine::store::DATA_FILE))
        .expect("open data file");
    data.set_len(MIB).expect("truncate");
    let mut failed = 0;
    for i in (0..4096).rev() {
        match s.read(&Target::head("v"), i * 4096, &mut buf) {
            Ok(()) => assert_eq!(buf, block(i), "block {i} read wrong data after the cut"),
            Err(Error::Corrupt { what, .. }) => {
                assert!(what.contains("cut short"), "unexpected reason: {what}");
                failed += 1;
            }
            Err(e) => panic!("block {i}: unexpected error {e}"),
        }
    }
    // The data file's first MiB holds its metadata pages and the first volume blocks; nearly
    // all of the 16 MiB written lay past the cut.
    assert!(failed > 3500, "only {failed} reads failed");
    // Long reads (pread) say the same.
    let mut long = vec![0u8; 4 * MIB as usize];
    let e = s
        .read(&Target::head("v"), 8 * MIB, &mut long)
        .expect_err("long read past the cut");
    assert!(e.to_string().contains("cut short"), "{e}");
}
