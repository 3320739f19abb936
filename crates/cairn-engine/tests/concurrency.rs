//! Many threads on one store: checkpoints taken while writers run contain every write acknowledged
//! before them and none started after them; concurrent partial writes to one block lose nothing.
#![allow(missing_docs)]

use cairn_engine::{Options, Store, Target};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const WRITERS: usize = 4;

fn block_of(v: u64) -> Vec<u8> {
    v.to_le_bytes().repeat(512)
}

fn value(buf: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[..8]);
    let v = u64::from_le_bytes(b);
    assert!(buf.chunks(8).all(|c| c == b), "torn block: {v}");
    v
}

#[test]
fn checkpoints_are_consistent_under_concurrent_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::init(dir.path(), Options::default()).expect("init"));
    store.create_volume("a", 64 << 20).expect("create a");
    store.create_volume("b", 64 << 20).expect("create b");
    let stop = Arc::new(AtomicBool::new(false));
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (store, stop, started, acked) =
            (store.clone(), stop.clone(), started.clone(), acked.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = 0u64;
            while !stop.load(Ordering::SeqCst) {
                c += 1;
                started[w].store(c, Ordering::SeqCst);
                // Each writer owns one block, 1 MiB apart, so some share a leaf and some do not.
                store
                    .write("a", w as u64 * (1 << 20), &block_of(c))
                    .expect("write");
                acked[w].store(c, Ordering::SeqCst);
            }
            c
        }));
    }
    // Another volume busy at the same time.
    {
        let (store, stop) = (store.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                store
                    .write("b", (i % 4096) * 4096, &block_of(i))
                    .expect("write b");
                i += 1;
            }
            i
        }));
    }
    // Two threads updating different sectors of one block, read-modify-write underneath.
    for half in 0..2u64 {
        let (store, stop) = (store.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = 0u64;
            while !stop.load(Ordering::SeqCst) {
                c += 1;
                store
                    .write("b", (32 << 20) + half * 512, &c.to_le_bytes().repeat(64))
                    .expect("partial");
            }
            c
        }));
    }
    let mut windows = Vec::new();
    for i in 0..60 {
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        store
            .create_checkpoint("a", &format!("c{i}"), None)
            .expect("checkpoint");
        let after: Vec<u64> = started.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        // What it holds right away must never change afterwards (no write lands in it late).
        let t = Target::checkpoint("a", &format!("c{i}"));
        let seen: Vec<u64> = (0..WRITERS)
            .map(|w| {
                let mut buf = vec![0u8; 4096];
                store
                    .read(&t, w as u64 * (1 << 20), &mut buf)
                    .expect("read");
                value(&buf)
            })
            .collect();
        windows.push((before, after, seen));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    stop.store(true, Ordering::SeqCst);
    let mut partial_counts = Vec::new();
    for (i, t) in threads.into_iter().enumerate() {
        let c = t.join().expect("thread");
        if i > WRITERS {
            partial_counts.push(c);
        }
    }
    for (i, (before, after, seen)) in windows.iter().enumerate() {
        let t = Target::checkpoint("a", &format!("c{i}"));
        for w in 0..WRITERS {
            let mut buf = vec![0u8; 4096];
            store
                .read(&t, w as u64 * (1 << 20), &mut buf)
                .expect("read");
            let v = value(&buf);
            assert_eq!(
                v, seen[w],
                "checkpoint c{i} changed after it was taken (writer {w})"
            );
            assert!(
                before[w] <= v && v <= after[w],
                "checkpoint c{i}, writer {w}: holds {v}, acknowledged before it {}, started by its end {}",
                before[w],
                after[w]
            );
        }
    }
    let mut sec = vec![0u8; 1024];
    store
        .read(&Target::head("b"), 32 << 20, &mut sec)
        .expect("read");
    for (half, c) in partial_counts.iter().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&sec[half * 512..half * 512 + 8]);
        assert_eq!(
            u64::from_le_bytes(b),
            *c,
            "a concurrent partial write was lost"
        );
    }
    assert!(partial_counts.iter().all(|&c| c > 10));
    let report = store.fsck().expect("fsck");
    assert!(report.ok(), "{:?}", report.errors);
}
