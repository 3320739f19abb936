//! Backups into a real 3-node Garage cluster (replication 3) on 127.0.0.1: two hosts back up
//! into one prefix at once and dedup against each other, one prunes and collects garbage while
//! the other backs up, and nothing either wrote is lost; a node killed in the middle of a backup
//! does not lose it.
#![allow(missing_docs)]

mod common;

use std::path::Path;
use std::time::Duration;

use cairn_backup::create::{create, Source};
use cairn_backup::gc::gc;
use cairn_backup::prune::{prune, KeepPolicy};
use cairn_backup::restore::restore;
use cairn_backup::sink::VolumeSink;
use cairn_backup::verify::verify;
use cairn_backup::{Access, Location, Manifest, Repository, S3Options, Secret};
use cairn_engine::{Options, Store, Target};
use cairn_test_peers::garage::Garage;
use common::noise;

fn access(g: &Garage, node: usize) -> Access {
    Access {
        location: Location::S3 {
            bucket: g.bucket.clone(),
            prefix: "shared".into(),
            endpoint: Some(format!("http://127.0.0.1:{}", g.nodes[node].s3_port)),
        },
        passphrase: Some(Secret("cluster pass".into())),
        s3: S3Options {
            access_key_id: Some(g.key_id.clone()),
            secret_access_key: Some(Secret(g.secret.clone())),
            session_token: None,
            region: Some("garage".into()),
            retry_secs: Some(20),
        },
    }
}

/// A host: its own store with volume `web` holding the shared base image.
fn host(dir: &Path, name: &str, base: &[u8]) -> Store {
    let p = dir.join(name);
    Store::init(&p, Options::default()).expect("init");
    let s = Store::open(&p, Options::default()).expect("open");
    s.create_volume("web", base.len() as u64).expect("vol");
    s.write("web", 0, base).expect("base");
    s
}

fn checkpoint(s: &Store, name: &str, change: u64) {
    s.write("web", (change % 64) * 65536 + 4096, &noise(change, 8192))
        .expect("change");
    s.create_checkpoint("web", name, None).expect("cp");
}

fn backup(repo: &Repository, s: &Store, store_id: &str, cp: &str) -> Manifest {
    let src = Source::volume(s, store_id, "web", cp);
    create(repo, &src, &mut |_| {}).expect("backup")
}

fn restores_to(repo: &Repository, m: &Manifest, s: &Store, cp: &str) {
    let size = m.images[0].size;
    let name = format!("r-{}", m.id);
    s.create_volume(&name, size).expect("vol");
    let mut sink = VolumeSink {
        store: s,
        volume: name.clone(),
    };
    restore(repo, m, 0, &mut sink, &mut |_| {}).expect("restore");
    let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
    s.read(&Target::head(&name), 0, &mut a).expect("read");
    s.read(&Target::checkpoint("web", cp), 0, &mut b)
        .expect("read");
    assert!(a == b, "backup {} restores web@{cp} exactly", m.id);
    s.delete_volume(&name).expect("delete");
}

#[test]
fn two_hosts_share_a_prefix_and_gc_from_one_loses_nothing_of_the_other() {
    let dir = tempfile::tempdir().expect("tmp");
    let g = Garage::start(&dir.path().join("garage"), 3);
    let base = noise(42, 4 << 20);
    let (a, b) = (host(dir.path(), "a", &base), host(dir.path(), "b", &base));
    let repo_a = Repository::init(&access(&g, 0), true).expect("init");
    let repo_b = Repository::open(&access(&g, 1)).expect("host b opens through node 1");
    checkpoint(&a, "a1", 1);
    checkpoint(&b, "b1", 2);

    // Both back up at once.
    let (ma, mb) = std::thread::scope(|s| {
        let ta = s.spawn(|| backup(&repo_a, &a, "host-a", "a1"));
        let tb = s.spawn(|| backup(&repo_b, &b, "host-b", "b1"));
        (ta.join().expect("a"), tb.join().expect("b"))
    });
    // A third host with the same image stores almost nothing new: the chunks are there.
    let c = host(dir.path(), "c", &base);
    checkpoint(&c, "c1", 1);
    let mc = backup(&repo_a, &c, "host-c", "c1");
    assert!(
        mc.stats.reused_chunks > 60 && mc.stats.new_chunks <= 1,
        "{:?}",
        mc.stats
    );

    // Host a prunes its own backups and collects garbage twice while host b backs up again.
    checkpoint(&a, "a2", 3);
    let ma2 = backup(&repo_a, &a, "host-a", "a2");
    checkpoint(&b, "b2", 4);
    let mb2 = std::thread::scope(|s| {
        let tb = s.spawn(|| backup(&repo_b, &b, "host-b", "b2"));
        let keep = KeepPolicy {
            last: 1,
            ..KeepPolicy::default()
        };
        prune(&repo_a, &|m: &Manifest| m.store == "host-a", &keep, false).expect("prune");
        gc(&repo_a, 0, &mut |_| {}).expect("gc 1");
        gc(&repo_a, 0, &mut |_| {}).expect("gc 2");
        tb.join().expect("b2")
    });
    gc(&repo_a, 0, &mut |_| {}).expect("gc 3");
    gc(&repo_a, 0, &mut |_| {}).expect("gc 4");

    let listed: Vec<String> = repo_b
        .backups()
        .expect("list")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert!(!listed.contains(&ma.id), "a1 was pruned");
    for (m, s, cp) in [
        (&ma2, &a, "a2"),
        (&mb, &b, "b1"),
        (&mb2, &b, "b2"),
        (&mc, &c, "c1"),
    ] {
        assert!(listed.contains(&m.id), "{cp} is listed");
        restores_to(&repo_b, m, s, cp);
    }
    let v = verify(&repo_b, None, 100.0, &mut |_| {}).expect("verify");
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

#[test]
fn a_node_killed_mid_backup_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut g = Garage::start(&dir.path().join("garage"), 3);
    let base = noise(7, 48 << 20);
    let s = host(dir.path(), "a", &base);
    checkpoint(&s, "one", 5);
    let repo = Repository::init(&access(&g, 0), true).expect("init");
    // The node dies once the backup has done its first batch: mid-backup, whatever the speed.
    let (started, first_batch) = std::sync::mpsc::channel();
    let (repo_ref, store_ref) = (&repo, &s);
    let outcome = std::thread::scope(|sc| {
        let t = sc.spawn(move || {
            let src = Source::volume(store_ref, "a", "web", "one");
            let mut said = false;
            create(repo_ref, &src, &mut |n| {
                if n > 0 && n < 1_000_000 && !said {
                    said = true;
                    let _ = started.send(());
                    // Long enough for the kill to land while this backup is still running.
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        });
        first_batch
            .recv_timeout(Duration::from_secs(60))
            .expect("the backup reports progress");
        g.nodes[2].kill();
        t.join().expect("backup thread")
    });
    // With replication 3 one node down still has a quorum: the backup completes; if it failed,
    // it must say so clearly and the next one must work.
    let m = match outcome {
        Ok(m) => m,
        Err(e) => {
            assert!(e.to_string().contains("s3://cairn-test/shared"), "{e}");
            backup(&repo, &s, "a", "one")
        }
    };
    restores_to(&repo, &m, &s, "one");
    checkpoint(&s, "two", 6);
    let m2 = backup(&repo, &s, "a", "two");
    restores_to(&repo, &m2, &s, "two");
    let v = verify(&repo, None, 100.0, &mut |_| {}).expect("verify");
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}
