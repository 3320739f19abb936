//! The VM runtime in process, over a real store served by Cairn's NBD server, with QEMU and the
//! test guest (the Debian cloud kernel and a busybox initramfs built by scripts/build-guest.sh,
//! which prints and writes to its disk a counter each second): a standard checkpoint of the
//! running guest holds its disk and memory at one instant, and applying it to the running VM keeps
//! the replaced state as a checkpoint and resumes the guest from memory, its counter back, without
//! a boot. `cairn-cli/tests/vm*.rs` test the same through `cairn vm` and the daemon.
#![allow(missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::{Options, Store, Target};
use cairn_nbd::{Server, ServerConfig};
use cairn_vm::checkpoint::{Keep, NoUsers, Take, VmOutcome};
use cairn_vm::spec::{fresh_mac, fresh_uuid};
use cairn_vm::{now_ms, Runtime, VmSpec};

/// The test guest's kernel and initramfs.
fn guest() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest");
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    assert!(
        k.exists() && i.exists(),
        "the test guest is missing; run ./scripts/build-guest.sh"
    );
    (k, i)
}

/// The counters the guest printed on its console after its first `from` bytes, and whether it
/// booted there.
fn counters(console: &std::path::Path, from: usize) -> (Vec<u64>, bool) {
    let log = std::fs::read(console).unwrap_or_default();
    let text = String::from_utf8_lossy(&log[from.min(log.len())..]).into_owned();
    let n = text
        .lines()
        .filter_map(|l| l.strip_prefix("cairn-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    (n, text.contains("cairn-guest: up"))
}

/// Waits until the console shows a counter of at least `n` after `from`; returns the counters.
async fn wait_counter(console: &std::path::Path, from: usize, n: u64) -> Vec<u64> {
    let t = Instant::now();
    loop {
        let (c, _) = counters(console, from);
        if c.last().is_some_and(|&last| last >= n) {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no counter {n} yet: {c:?}\n{}",
            String::from_utf8_lossy(&std::fs::read(console).unwrap_or_default())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The counter the guest last wrote to block 0 of `target`.
fn disk_counter(store: &Store, target: &Target) -> u64 {
    let mut buf = [0u8; 22];
    store.read(target, 0, &mut buf).expect("read");
    String::from_utf8_lossy(&buf)
        .trim_start_matches("cairn-counter ")
        .trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_checkpoint_applied_to_the_running_guest_resumes_it_where_it_was() {
    let (kernel, initrd) = guest();
    let dir = tempfile::tempdir().expect("tempdir");
    Store::init(dir.path(), Options::default()).expect("init");
    let store = Arc::new(Store::open(dir.path(), Options::default()).expect("open"));
    store.create_volume("disk", 64 << 20).expect("volume");
    let socket = dir.path().join("nbd.sock");
    let server = Server::new(store.clone(), ServerConfig::default());
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    tokio::spawn(server.clone().serve_unix(listener));
    let rt = Arc::new(Runtime::new(dir.path(), &socket));
    let spec = VmSpec {
        name: "t".into(),
        memory: 256 << 20,
        cpus: 1,
        disks: vec!["disk".into()],
        kernel: Some(kernel),
        initrd: Some(initrd),
        append: Some("console=ttyS0 rdinit=/init panic=-1 quiet".into()),
        net: None,
        mac: fresh_mac(),
        uuid: fresh_uuid(),
        accel: None,
        created_ms: now_ms(),
        parent: None,
    };
    spec.validate().expect("a valid definition");
    rt.definitions().save(&spec).expect("define");
    let console = rt.start("t").await.expect("start").console;
    wait_counter(&console, 0, 3).await;

    // A standard checkpoint while the guest runs. QEMU announces every stop and resume of the
    // guest: one of each means the guest stayed paused from its disk checkpoints until QEMU had
    // captured its memory. A guest resumed before QEMU's snapshot thread stopped it would be
    // stopped and resumed a second time, and its memory saved later than its disks.
    let mut events = rt.qmp("t").expect("qmp").events();
    let cp = rt
        .take_checkpoint(&store, "t", "one", None, Take::Standard, false, &|_| {})
        .await
        .expect("checkpoint");
    assert_eq!(cp.disks, ["disk"]);
    let mut runstate = Vec::new();
    loop {
        match events.try_recv() {
            Ok(e) if e.name == "STOP" || e.name == "RESUME" => runstate.push(e.name),
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
            Err(e) => panic!("QMP events lost: {e}"),
        }
    }
    assert_eq!(
        runstate,
        ["STOP", "RESUME"],
        "the guest was paused once, from its disk checkpoints until QEMU captured its memory"
    );
    let at = disk_counter(&store, &Target::checkpoint("disk", "one"));
    assert!(at >= 2, "the checkpoint holds the guest's disk ({at})");
    assert!(rt.is_running("t"), "the guest runs on");

    // The guest runs on, then the checkpoint is applied to it while it runs.
    wait_counter(&console, 0, at + 4).await;
    // The console from here on: the guest before the apply, then the resumed one.
    let before = std::fs::metadata(&console).expect("console").len() as usize;
    wait_counter(&console, before, 0).await;
    let keep = Keep {
        save_current: Some("later".into()),
        discard_current: false,
    };
    let applied = rt
        .apply_checkpoint(&store, "t", "one", &keep, &NoUsers, &|_| {})
        .await
        .expect("apply");
    assert_eq!(applied.outcome, VmOutcome::ResumedFromMemory);
    assert_eq!(applied.kept.map(|k| k.name).as_deref(), Some("later"));

    // It resumes from the checkpoint's memory: the counter goes back to follow the checkpoint's,
    // with no boot in between, and its disk is the checkpoint's again.
    let t = Instant::now();
    let first = loop {
        let (c, _) = counters(&console, before);
        if let Some(w) = c.windows(2).find(|w| w[1] < w[0]) {
            break w[1];
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the counter never went back: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        first == at + 1 || first == at + 2,
        "resumed at {first}, the checkpoint's disk had {at}"
    );
    assert!(!counters(&console, before).1, "the guest booted again");
    let later = disk_counter(&store, &Target::checkpoint("disk", "later"));
    assert!(later >= at + 3, "the replaced state is kept ({later})");

    rt.kill("t").await.expect("kill");
    server.shutdown().await;
    store.flush().expect("flush");
    let report = store.fsck().expect("fsck");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}
