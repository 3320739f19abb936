//! Metadata readahead: the first cold lookup under a leaf's parent hints the device to read all
//! of that parent's leaves, so a cold sequential read does not wait for one leaf at a time.

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::{Store, Target};
use common::{sim_devices, small_opts, RecordingDevice, BS};

#[test]
fn a_cold_read_hints_every_leaf_under_its_parent_once() {
    let (data, journal) = sim_devices(PowerSupply::new());
    // 64 MiB: 16,384 blocks in 33 leaves under one parent (the root).
    let size = 64 << 20;
    {
        let s =
            Store::open_devices(data.clone(), journal.clone(), small_opts(), "sim").expect("open");
        s.create_volume("v", size).expect("create");
        s.write("v", 0, &vec![0x5A; size as usize]).expect("write");
        s.flush().expect("flush");
    }
    let dev = RecordingDevice::new(data);
    let s = Store::open_devices(dev.clone(), journal, small_opts(), "sim").expect("reopen");
    dev.take();

    let head = Target::head("v");
    let mut buf = vec![0; BS as usize];
    s.read(&head, 0, &mut buf).expect("read");
    assert_eq!(buf, vec![0x5A; BS as usize]);
    let leaves = size / BS / 510 + 1;
    // The first leaf was being read anyway; it may or may not be among the hinted.
    let hinted = dev.hinted_blocks();
    assert!(
        hinted >= leaves - 1,
        "a cold read hinted {hinted} metadata blocks, want every one of the {leaves} leaves"
    );

    // The parent is now cached: reading under other leaves hints nothing more.
    s.read(&head, size - BS, &mut buf).expect("read");
    s.read(&head, size / 2, &mut buf).expect("read");
    assert_eq!(
        dev.hinted_blocks(),
        hinted,
        "a warm parent hinted its leaves again"
    );
}
