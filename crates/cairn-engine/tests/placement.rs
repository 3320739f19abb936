//! Where data lands in the data file (format 2): long writes start at aligned file offsets, so
//! the host caches them in large folios; the blocks skipped to align them go to metadata and
//! short writes; a format-1 store keeps its old placement. (Crossing into the next cluster is
//! tested beside the allocator, in `meta.rs`: it takes 2 GiB of data.)
#![allow(missing_docs)]

mod common;

use cairn_engine::device::{PowerSupply, SimDevice};
use cairn_engine::format::Layout;
use cairn_engine::{Store, Target};
use common::{sim_devices_in, small_opts, BS};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// A block no other block of the test has: `tag` and the block's index, repeated.
fn block(tag: u64, b: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BS as usize);
    for i in 0..BS / 16 {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&(b * 1000 + i).to_le_bytes());
    }
    v
}

fn blocks(tag: u64, first: u64, count: u64) -> Vec<u8> {
    (first..first + count).flat_map(|b| block(tag, b)).collect()
}

/// The data-file block holding `want`, found by content.
fn where_is(data: &SimDevice, want: &[u8]) -> u64 {
    let image = data.live_image();
    let found = image
        .chunks(BS as usize)
        .position(|c| c == want)
        .expect("block is in the data file");
    found as u64
}

fn store(layout: Layout) -> (Arc<SimDevice>, Store) {
    let (data, journal) = sim_devices_in(PowerSupply::new(), layout);
    let s = Store::open_devices(data.clone(), journal, small_opts(), "sim").expect("open");
    (data, s)
}

#[test]
fn long_writes_start_aligned_and_short_ones_fill_the_gaps() {
    let (data, s) = store(Layout::Clusters);
    s.create_volume("v", 64 * MIB).expect("create");
    // A short write first, so that the next free block is not aligned.
    s.write("v", 0, &block(1, 0)).expect("short write");
    s.flush().expect("flush");
    let short = where_is(&data, &block(1, 0));

    // 1 MiB writes start at 1 MiB, 2 MiB ones at 2 MiB, 512 KiB ones at 512 KiB; each is one run.
    for (tag, vbn, count, align) in [(2, 256, 256, 256), (3, 1024, 512, 512), (4, 2048, 128, 128)] {
        s.write("v", vbn * BS, &blocks(tag, vbn, count))
            .expect("long write");
        s.flush().expect("flush");
        let first = where_is(&data, &block(tag, vbn));
        assert_eq!(
            first % align,
            0,
            "a {count}-block write starts at block {first}"
        );
        let last = where_is(&data, &block(tag, vbn + count - 1));
        assert_eq!(
            last,
            first + count - 1,
            "a {count}-block write is in pieces"
        );
    }

    // The blocks skipped before the first aligned run go to short writes (and metadata pages),
    // so the data file does not grow by the alignment.
    let first_run = where_is(&data, &block(2, 256));
    for b in 10..40 {
        s.write("v", b * BS, &block(5, b)).expect("short write");
    }
    s.flush().expect("flush");
    for b in 10..40 {
        let at = where_is(&data, &block(5, b));
        assert!(
            at > short && at < first_run,
            "short write {b} went to block {at}, not into the gap below {first_run}"
        );
    }
    let report = s.fsck().expect("fsck");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let head = Target::head("v");
    let mut back = vec![0u8; (256 * BS) as usize];
    s.read(&head, 256 * BS, &mut back).expect("read");
    assert!(back == blocks(2, 256, 256));
}

#[test]
fn a_format_1_store_keeps_its_placement() {
    let (data, s) = store(Layout::Groups);
    s.create_volume("v", 64 * MIB).expect("create");
    s.write("v", 0, &block(1, 0)).expect("short write");
    s.write("v", 256 * BS, &blocks(2, 256, 256))
        .expect("long write");
    s.flush().expect("flush");
    let short = where_is(&data, &block(1, 0));
    let first = where_is(&data, &block(2, 256));
    // Next to what came before (a leaf page or two between), not pushed to an aligned block.
    assert!(first > short && first < short + 8, "{short} .. {first}");
    let report = s.fsck().expect("fsck");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}
