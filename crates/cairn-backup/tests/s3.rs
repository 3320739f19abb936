//! Backups into S3, against a real S3 server: `s3s-fs` (installed by scripts/setup.sh), started
//! on a free port of 127.0.0.1 with a bucket in a temporary directory. Full and incremental
//! backups restore byte-identical and verify clean; an unreachable endpoint fails after its
//! retries with a clear error and leaves no manifest.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use cairn_backup::create::{create, Source};
use cairn_backup::restore::restore;
use cairn_backup::sink::VolumeSink;
use cairn_backup::verify::verify;
use cairn_backup::{Access, BackupError, Location, Repository, S3Options, Secret};
use cairn_engine::{Options, Store, Target};
use cairn_test_peers::s3s_fs::{S3Server, KEY_ID, SECRET};

fn access(port: u16, prefix: &str, retry_secs: u64) -> Access {
    Access {
        location: Location::S3 {
            bucket: "cairn-test".into(),
            prefix: prefix.into(),
            endpoint: Some(format!("http://127.0.0.1:{port}")),
        },
        passphrase: Some(Secret("s3 pass".into())),
        s3: S3Options {
            access_key_id: Some(KEY_ID.into()),
            secret_access_key: Some(Secret(SECRET.into())),
            session_token: None,
            region: Some("us-east-1".into()),
            retry_secs: Some(retry_secs),
        },
    }
}

fn read_all(s: &Store, t: &Target, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    s.read(t, 0, &mut buf).expect("read");
    buf
}

#[test]
fn backups_round_trip_through_s3() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(&dir.path().join("s3"), "cairn-test");
    let sp = dir.path().join("store");
    Store::init(&sp, Options::default()).expect("init");
    let s = Store::open(&sp, Options::default()).expect("open");
    let size = 24u64 << 20;
    s.create_volume("v", size).expect("vol");
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 9) as u8)
        .collect();
    s.write("v", 4 << 20, &data).expect("write");
    s.create_checkpoint("v", "a", None).expect("cp");
    let a = access(server.port, "hosts/one", 30);
    let repo = Repository::init(&a, true).expect("init on S3");
    let src = |cp: &'static str| Source::volume(&s, "s", "v", cp);
    let full = create(&repo, &src("a"), &mut |_| {}).expect("full");
    for i in 0..200u64 {
        s.write("v", (i * 104_729 % (size / 4096)) * 4096, &[7; 4096])
            .expect("scatter");
    }
    s.create_checkpoint("v", "b", None).expect("cp");
    let inc = create(&repo, &src("b"), &mut |_| {}).expect("incremental");
    assert_eq!(inc.parent.as_deref(), Some(full.id.as_str()));
    assert!(inc.stats.read_bytes <= 200 * 4096);

    let repo = Repository::open(&a).expect("reopen");
    assert_eq!(repo.backups().expect("list").len(), 2);
    for (m, cp, name) in [(&full, "a", "ra"), (&inc, "b", "rb")] {
        let m = repo.manifest(&m.id).expect("manifest");
        s.create_volume(name, size).expect("vol");
        let mut sink = VolumeSink {
            store: &s,
            volume: name.into(),
        };
        restore(&repo, &m, 0, &mut sink, &mut |_| {}).expect("restore");
        assert!(
            read_all(&s, &Target::head(name), size)
                == read_all(&s, &Target::checkpoint("v", cp), size)
        );
    }
    let report = verify(&repo, None, 100.0, &mut |_| {}).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Objects really are in the bucket, under the prefix.
    assert!(dir.path().join("s3/cairn-test/hosts/one/config").exists());
    let e = Repository::open(&access(server.port, "hosts/none", 30))
        .err()
        .expect("no repo");
    assert!(matches!(e, BackupError::NotARepository(_)), "{e}");
}

#[test]
fn an_unreachable_s3_fails_clearly_and_leaves_no_manifest() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = S3Server::start(&dir.path().join("s3"), "cairn-test");
    let sp = dir.path().join("store");
    Store::init(&sp, Options::default()).expect("init");
    let s = Store::open(&sp, Options::default()).expect("open");
    s.create_volume("v", 8 << 20).expect("vol");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    s.write("v", 0, &data).expect("write");
    s.create_checkpoint("v", "a", None).expect("cp");
    let a = access(server.port, "p", 2);
    let repo = Repository::init(&a, true).expect("init");
    let port = server.port;
    drop(server);
    let began = Instant::now();
    let src = Source::volume(&s, "s", "v", "a");
    let e = create(&repo, &src, &mut |_| {}).expect_err("the server is gone");
    assert!(matches!(e, BackupError::Store { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("s3://cairn-test/p") && msg.contains("reachable"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("retries"),
        "{msg}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "gave up after its retries"
    );
    // The server comes back on the same data: no backup is listed, and the next one works.
    let server = S3Server::on_port(&dir.path().join("s3"), port);
    let repo = Repository::open(&a).expect("reopen");
    assert!(
        repo.backups().expect("list").is_empty(),
        "no manifest for a failed backup"
    );
    create(&repo, &src, &mut |_| {}).expect("the next backup works");
    drop(server);
}
