//! Backups into a local repository, end to end on a real store: full and incremental backups
//! restore byte-identical, an incremental reads only what changed, and bad input (a wrong
//! passphrase, a damaged or missing pack, a newer format) gets a clear error and loses nothing;
//! cancelled work stops at its next batch and keeps nothing half-made.
#![allow(missing_docs)]

use std::path::Path;

use cairn_backup::create::{create, Source};
use cairn_backup::gc::gc;
use cairn_backup::restore::restore;
use cairn_backup::sink::VolumeSink;
use cairn_backup::verify::verify;
use cairn_backup::{Access, BackupError, Location, Progress, Repository, S3Options, Secret};
use cairn_engine::{Options, Store, Target};

const MIB: u64 = 1 << 20;

fn access(dir: &Path, pass: &str) -> Access {
    Access {
        location: Location::Local {
            path: dir.join("repo"),
        },
        passphrase: Some(Secret(pass.into())),
        s3: S3Options::default(),
    }
}

fn store(dir: &Path) -> Store {
    let p = dir.join("store");
    Store::init(&p, Options::default()).expect("init");
    Store::open(&p, Options::default()).expect("open")
}

/// Fills a volume with a mix of what disks hold: random, text, zeros, holes.
fn fill(s: &Store, vol: &str, size: u64, seed: u64) {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut off = 0;
    while off < size {
        let len = (64 * 1024).min(size - off);
        let kind = rnd() % 4;
        let buf: Vec<u8> = match kind {
            0 => (0..len).map(|_| rnd() as u8).collect(),
            1 => b"the quick brown fox jumps over the lazy dog. "
                .iter()
                .cycle()
                .take(len as usize)
                .copied()
                .collect(),
            2 => vec![0; len as usize],
            _ => {
                off += len;
                continue;
            }
        };
        s.write(vol, off, &buf).expect("write");
        off += len;
    }
}

fn read_all(s: &Store, t: &Target, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    s.read(t, 0, &mut buf).expect("read");
    buf
}

fn restore_into(repo: &Repository, s: &Store, id: &str, name: &str) -> Result<(), BackupError> {
    let m = repo.manifest(id)?;
    s.create_volume(name, m.images[0].size)?;
    let mut sink = VolumeSink {
        store: s,
        volume: name.into(),
    };
    restore(repo, &m, 0, &mut sink, &mut |_| {})
}

#[test]
fn full_and_incremental_backups_restore_byte_identical_and_read_only_changes() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let size = 16 * MIB;
    s.create_volume("web", size).expect("vol");
    fill(&s, "web", size, 7);
    s.create_checkpoint("web", "one", None).expect("cp");
    let repo = Repository::init(&access(dir.path(), "pw"), true).expect("init");
    let src = |cp: &'static str| Source::volume(&s, "st1", "web", cp);
    let full = create(&repo, &src("one"), &mut |_| {}).expect("full");
    assert!(full.parent.is_none());
    let mapped = s.volume_info("web").expect("info").referenced;
    assert!(
        full.stats.read_bytes <= mapped.next_multiple_of(65536) + 65536,
        "{:?}",
        full.stats
    );

    // 1% of the blocks, scattered, plus a range that becomes zeros.
    let blocks = size / 4096;
    for i in 0..blocks / 100 {
        let b = (i * 7919) % blocks;
        s.write("web", b * 4096, &[i as u8 | 1; 4096])
            .expect("scatter");
    }
    s.write_zeroes("web", 3 * MIB, 256 * 1024).expect("zeroes");
    s.create_checkpoint("web", "two", None).expect("cp2");
    let inc = create(&repo, &src("two"), &mut |_| {}).expect("incremental");
    assert_eq!(inc.parent.as_deref(), Some(full.id.as_str()));
    let changed: u64 = s
        .diff(
            &Target::checkpoint("web", "one"),
            &Target::checkpoint("web", "two"),
        )
        .expect("diff")
        .iter()
        .map(|e| e.length)
        .sum();
    assert_eq!(
        inc.stats.read_bytes, changed,
        "an incremental reads exactly the changed blocks"
    );
    let scattered = blocks / 100 * 4096;
    assert!(
        inc.stats.stored_bytes < scattered * 12 / 10,
        "repository grew {} for {scattered} changed bytes",
        inc.stats.stored_bytes
    );

    // Reopen (a new process would), restore both, compare.
    drop(repo);
    let repo = Repository::open(&access(dir.path(), "pw")).expect("open");
    let list = repo.backups().expect("list");
    assert_eq!(list.len(), 2);
    for (id, cp, vol) in [(&full.id, "one", "r1"), (&inc.id, "two", "r2")] {
        restore_into(&repo, &s, &id[..6], vol).expect("restore");
        assert!(
            read_all(&s, &Target::head(vol), size)
                == read_all(&s, &Target::checkpoint("web", cp), size),
            "{vol} differs from web@{cp}"
        );
    }
    let report = verify(&repo, None, 100.0, &mut |_| {}).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.chunks_checked > 0);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    s.create_volume("db", 4 * MIB).expect("vol");
    fill(&s, "db", 4 * MIB, 3);
    s.create_checkpoint("db", "a", None).expect("cp");

    let e = Repository::open(&access(dir.path(), "pw"))
        .err()
        .expect("no repo yet");
    assert!(matches!(e, BackupError::NotARepository(_)), "{e}");
    let no_pass = Access {
        passphrase: None,
        ..access(dir.path(), "")
    };
    let e = Repository::init(&no_pass, true)
        .err()
        .expect("needs a passphrase");
    assert!(e.to_string().contains("CAIRN_BACKUP_PASSPHRASE"), "{e}");

    let repo = Repository::init(&access(dir.path(), "right"), true).expect("init");
    let e = Repository::init(&access(dir.path(), "right"), true)
        .err()
        .expect("exists");
    assert!(matches!(e, BackupError::RepositoryExists(_)), "{e}");
    let m = create(&repo, &Source::volume(&s, "x", "db", "a"), &mut |_| {}).expect("backup");
    let e = Repository::open(&access(dir.path(), "wrong"))
        .err()
        .expect("wrong passphrase");
    assert!(matches!(e, BackupError::WrongPassphrase(_)), "{e}");
    assert!(e.to_string().contains("nothing was decrypted"), "{e}");
    let e = repo.manifest("ffff0000ffff").expect_err("unknown id");
    assert!(e.to_string().contains("backup list"), "{e}");

    // Damage one byte of one pack: verify names the chunk and what it affects; restore refuses
    // and leaves the target volume with nothing written.
    let packs = repo.backend().list("data/").expect("list");
    let victim = dir.path().join("repo").join(&packs[0].key);
    let mut bytes = std::fs::read(&victim).expect("read pack");
    bytes[100] ^= 0x40;
    std::fs::write(&victim, &bytes).expect("damage");
    let report = verify(&repo, Some(&m.id), 100.0, &mut |_| {}).expect("verify runs");
    let p = report.problems.first().expect("a problem is found");
    assert_eq!(p.kind, "damaged");
    assert!(p.object.contains(&packs[0].key[8..]), "{p:?}");
    assert!(p.affects.iter().any(|a| a.contains("db@a bytes ")), "{p:?}");
    let e = restore_into(&repo, &s, &m.id, "back").expect_err("damaged");
    assert!(
        e.to_string().contains("damaged") && e.to_string().contains("db@a"),
        "{e}"
    );
    assert_eq!(
        s.volume_info("back").expect("made").referenced,
        0,
        "nothing restored"
    );

    // A missing pack.
    std::fs::remove_file(&victim).expect("remove");
    let report = verify(&repo, None, 100.0, &mut |_| {}).expect("verify runs");
    assert!(
        report.problems.iter().any(|p| p.kind == "missing"),
        "{:?}",
        report.problems
    );

    // A damaged index segment and a damaged manifest: verify names both and what they affect.
    let index = repo.backend().list("index/").expect("list");
    let key = dir.path().join("repo").join(&index[0].key);
    let mut bytes = std::fs::read(&key).expect("read index");
    bytes[5] ^= 1;
    std::fs::write(&key, &bytes).expect("damage");
    let manifest = dir.path().join("repo/backups").join(&m.id);
    let mut bytes = std::fs::read(&manifest).expect("read manifest");
    bytes[7] ^= 1;
    std::fs::write(&manifest, &bytes).expect("damage");
    let report = verify(&repo, None, 100.0, &mut |_| {}).expect("verify runs");
    let objects: Vec<&str> = report.problems.iter().map(|p| p.object.as_str()).collect();
    assert!(
        objects.iter().any(|o| o.starts_with("index ")),
        "{objects:?}"
    );
    assert!(
        objects
            .iter()
            .any(|o| o.starts_with(&format!("manifest {}", m.id))),
        "{objects:?}"
    );
    let e = repo.manifest(&m.id).expect_err("damaged");
    assert!(
        e.to_string().contains("damaged") && e.to_string().contains("verify"),
        "{e}"
    );

    // A repository from a newer Cairn.
    let cfg = dir.path().join("repo/config");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace("\"format\": 1", "\"format\": 9")).expect("edit");
    let e = Repository::open(&access(dir.path(), "right"))
        .err()
        .expect("newer");
    assert!(
        e.to_string().contains("format 9") && e.to_string().contains("upgrade"),
        "{e}"
    );
}

#[test]
fn unencrypted_repositories_detect_damage_too() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    s.create_volume("v", MIB).expect("vol");
    fill(&s, "v", MIB, 11);
    s.create_checkpoint("v", "c", None).expect("cp");
    let a = Access {
        passphrase: None,
        ..access(dir.path(), "")
    };
    let repo = Repository::init(&a, false).expect("init");
    let m = create(&repo, &Source::volume(&s, "x", "v", "c"), &mut |_| {}).expect("backup");
    restore_into(&repo, &s, &m.id, "r").expect("restore");
    assert!(
        read_all(&s, &Target::head("r"), MIB) == read_all(&s, &Target::checkpoint("v", "c"), MIB)
    );
    let packs = repo.backend().list("data/").expect("list");
    let victim = dir.path().join("repo").join(&packs[0].key);
    let mut bytes = std::fs::read(&victim).expect("read");
    bytes[10] ^= 1;
    std::fs::write(&victim, &bytes).expect("damage");
    let report = verify(&repo, None, 100.0, &mut |_| {}).expect("verify");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
}

/// Counts reports and asks to stop once it has heard `at` of them.
struct CancelAfter {
    reports: u32,
    at: u32,
}

impl Progress for CancelAfter {
    fn report(&mut self, _: u64) {
        self.reports += 1;
    }
    fn cancelled(&self) -> bool {
        self.reports >= self.at
    }
}

#[test]
fn cancelled_work_stops_at_its_next_batch_and_keeps_nothing_half_made() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = store(dir.path());
    let size = 96 * MIB;
    s.create_volume("web", size).expect("vol");
    fill(&s, "web", size, 11);
    s.create_checkpoint("web", "one", None).expect("cp");
    let repo = Repository::init(&access(dir.path(), "pw"), true).expect("init");
    let src = Source::volume(&s, "st1", "web", "one");

    // A backup cancelled after its first batch: no manifest, so no backup.
    let mut p = CancelAfter { reports: 0, at: 1 };
    let e = create(&repo, &src, &mut p).expect_err("a cancelled backup");
    assert!(matches!(e, BackupError::Cancelled), "{e}");
    assert_eq!(
        p.reports, 1,
        "it stopped at the batch that heard the cancel"
    );
    assert!(repo.backups().expect("list").is_empty());

    // The repository works on as before; a restore and a verify stop the same way.
    let full = create(&repo, &src, &mut |_| {}).expect("backup");
    let m = repo.manifest(&full.id).expect("manifest");
    s.create_volume("back", size).expect("target");
    let mut sink = VolumeSink {
        store: &s,
        volume: "back".into(),
    };
    let mut p = CancelAfter { reports: 0, at: 1 };
    let e = restore(&repo, &m, 0, &mut sink, &mut p).expect_err("a cancelled restore");
    assert!(matches!(e, BackupError::Cancelled), "{e}");
    let mut p = CancelAfter { reports: 0, at: 1 };
    let e = verify(&repo, None, 100.0, &mut p).expect_err("a cancelled verify");
    assert!(matches!(e, BackupError::Cancelled), "{e}");

    // What the cancelled backup uploaded is garbage GC frees; the finished one stays whole.
    let first = gc(&repo, 0, &mut |_| {}).expect("gc condemns");
    let second = gc(&repo, 0, &mut |_| {}).expect("gc sweeps");
    assert_eq!(second.backups, 1);
    assert_eq!(
        second.packs_deleted, first.condemned,
        "{first:?} {second:?}"
    );
    assert_eq!(second.condemned, 0, "nothing unused is left: {second:?}");
    let report = verify(&repo, None, 100.0, &mut |_| {}).expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    restore_into(&repo, &s, &full.id, "again").expect("restore");
    assert!(
        read_all(&s, &Target::head("again"), size)
            == read_all(&s, &Target::checkpoint("web", "one"), size),
        "the restore differs from its checkpoint"
    );
}
