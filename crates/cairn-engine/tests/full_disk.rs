//! A full host filesystem: writes and checkpoints fail with a clear error, nothing committed is
//! lost, the store stays consistent, and work resumes once space is freed.
#![allow(missing_docs)]

mod common;

use cairn_engine::device::PowerSupply;
use cairn_engine::{Error, Store, Target};
use common::{sim_store, small_opts};

#[test]
fn full_disk_fails_cleanly_and_recovers() {
    let (data, journal, store) = sim_store(PowerSupply::new());
    store.create_volume("v", 64 << 20).expect("create");
    store.write("v", 0, &vec![1u8; 4 << 20]).expect("write");
    store
        .create_checkpoint("v", "kept", None)
        .expect("checkpoint");
    // The disk is now full: nothing may grow the data file any more.
    data.set_capacity(Some(data.live_image().len() as u64));
    let mut failed = None;
    for i in 0..64u64 {
        // Overwrites of shared blocks need new blocks, which no longer fit.
        match store.write("v", i << 20, &vec![2u8; 1 << 20]) {
            Ok(()) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("a write must fail on a full disk");
    assert!(
        matches!(err, Error::NoSpace { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().contains("filesystem is full"), "{err}");
    // Metadata has headroom: a checkpoint still works on the full disk.
    store
        .create_checkpoint("v", "more", None)
        .expect("checkpoint on a full disk");
    assert_eq!(store.list_checkpoints("v").expect("list").len(), 2);
    store.delete_checkpoint("v", "more").expect("delete");
    // What was committed is intact, and the store is consistent.
    let mut buf = vec![0u8; 4 << 20];
    store
        .read(&Target::checkpoint("v", "kept"), 0, &mut buf)
        .expect("read");
    assert!(buf.iter().all(|&b| b == 1));
    let report = store.fsck().expect("fsck");
    assert!(report.ok(), "{:?}", report.errors);
    // Still full: deleting the checkpoint that pins the old blocks makes them the head's alone, so
    // overwrites go in place and need no new space.
    store.delete_checkpoint("v", "kept").expect("delete frees");
    store
        .write("v", 0, &vec![3u8; 1 << 20])
        .expect("write after the delete");
    store.flush().expect("flush");
    drop(store);
    let store = Store::open_devices(data, journal, small_opts(), "sim").expect("reopen");
    let report = store.fsck().expect("fsck");
    assert!(report.ok(), "{:?}", report.errors);
    let mut b = [0u8; 1];
    store.read(&Target::head("v"), 0, &mut b).expect("read");
    assert_eq!(b[0], 3);
}

/// An I/O error in the middle of a checkpoint: the call fails, nothing half-made remains, flushed
/// data survives, and the store keeps working (its in-memory state is reloaded from disk).
#[test]
fn io_error_mid_operation_leaves_no_half_made_state() {
    for failing_op in 0..6u64 {
        let (data, journal, store) = sim_store(PowerSupply::new());
        store.create_volume("v", 8 << 20).expect("create");
        store.write("v", 0, &vec![1u8; 1 << 20]).expect("write");
        store
            .create_checkpoint("v", "base", None)
            .expect("checkpoint");
        store.write("v", 0, &vec![2u8; 4096]).expect("write");
        store.flush().expect("flush");
        // Skip `failing_op` device operations, then fail a few: somewhere inside the next commit.
        journal.fail_next(0);
        let (d, j) = (data.clone(), journal.clone());
        let target = if failing_op % 2 == 0 { d } else { j };
        store.write("v", 8192, &vec![3u8; 4096]).expect("write");
        target.fail_next(1 + failing_op / 2);
        let r = store.create_checkpoint("v", "x", None);
        target.fail_next(0);
        let names: Vec<String> = store
            .list_checkpoints("v")
            .expect("list")
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names.contains(&"x".to_string()),
            r.is_ok(),
            "op {failing_op}: {r:?} {names:?}"
        );
        let mut b = [0u8; 1];
        store.read(&Target::head("v"), 0, &mut b).expect("read");
        assert_eq!(b[0], 2, "flushed data survives");
        store
            .read(&Target::checkpoint("v", "base"), 0, &mut b)
            .expect("read");
        assert_eq!(b[0], 1);
        store
            .create_checkpoint("v", "after", None)
            .expect("store works again");
        let report = store.fsck().expect("fsck");
        assert!(report.ok(), "op {failing_op}: {:?}", report.errors);
        drop(store);
        let store = Store::open_devices(data, journal, small_opts(), "sim").expect("reopen");
        assert!(store.fsck().expect("fsck").ok());
    }
}
