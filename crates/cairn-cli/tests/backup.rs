//! `cairn backup ...` end to end, without and with a daemon: a repository in a directory,
//! full and incremental backups, list, info, verify, restore to a volume and to image files,
//! each bad input with its error kind, and two daemons sharing an S3 prefix (faults part-way are
//! in `backup_faults.rs`).
#![allow(missing_docs)]

mod common;
use common::backups::*;
use common::*;

#[test]
fn backups_in_a_directory() {
    backups_in(env());
}

#[test]
fn backups_in_a_directory_through_daemon() {
    backups_in(env_with_daemon());
}

fn backups_in(e: Env) {
    const SIZE: u64 = 32 << 20;
    let r = repo(&e);
    let k = ["--key-file", r.key.as_str()];
    ok(&e, &["volume", "create", "web", "--size", "32M"]);
    let bytes = data(12 << 20, 2654435761, 13);
    write_from(&e, "web", "1M", &bytes);
    ok(&e, &["checkpoint", "create", "web@one"]);

    let init = json(&e, &["backup", "init", &r.dir, "--key-file", &r.key]);
    assert_eq!(init["encrypted"], true);
    let full = json(
        &e,
        &["backup", "create", "web@one", "--repo", &r.dir, k[0], k[1]],
    );
    let full_id = full["id"].as_str().expect("id").to_string();
    assert!(full["parent"].is_null());
    assert_eq!(
        full["stats"]["read_bytes"],
        12 << 20,
        "a full backup reads the mapped data"
    );

    ok(&e, &["backup", "repo", "add", "main", &r.dir]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "web",
            "--offset",
            "20M",
            "--pattern",
            "0x5a",
            "--length",
            "4096",
        ],
    );
    ok(
        &e,
        &[
            "volume",
            "write",
            "web",
            "--offset",
            "2M",
            "--pattern",
            "0x00",
            "--length",
            "64K",
        ],
    );
    ok(&e, &["checkpoint", "create", "web@two"]);
    let inc = json(&e, &["backup", "create", "web@two", k[0], k[1]]);
    assert_eq!(
        inc["parent"],
        full_id.as_str(),
        "incremental to the full backup"
    );
    assert_eq!(
        inc["stats"]["read_bytes"],
        4096 + 65536,
        "only the changed blocks are read"
    );

    let list = json(&e, &["backup", "list", k[0], k[1]]);
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), 2);
    assert!(ok(&e, &["backup", "list", "web", k[0], k[1]]).contains("incremental to"));
    let info = ok(&e, &["backup", "info", &full_id[..8], k[0], k[1]]);
    assert!(
        info.contains("web@one") && info.contains("full backup"),
        "{info}"
    );
    let v = json(&e, &["backup", "verify", k[0], k[1]]);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");

    // Restores: a volume, a raw file, a qcow2 file; each byte-identical to its checkpoint.
    let inc_id = inc["id"].as_str().expect("id");
    ok(
        &e,
        &["backup", "restore", inc_id, "--to", "web-back", k[0], k[1]],
    );
    let want = contents(&e, "web@two", SIZE);
    assert!(
        contents(&e, "web-back", SIZE) == want,
        "restored volume differs"
    );
    let names: Vec<String> = json(&e, &["volume", "list"])
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(!names.iter().any(|n| n.contains("restoring")), "{names:?}");
    let raw = e.work.join("web.raw");
    ok(
        &e,
        &[
            "backup",
            "restore",
            &full_id,
            "--to-file",
            raw.to_str().expect("utf8"),
            k[0],
            k[1],
        ],
    );
    assert!(std::fs::read(&raw).expect("raw") == contents(&e, "web@one", SIZE));
    let qcow = e.work.join("web.qcow2");
    ok(
        &e,
        &[
            "backup",
            "restore",
            inc_id,
            "--to-file",
            qcow.to_str().expect("utf8"),
            k[0],
            k[1],
        ],
    );
    let back = e.work.join("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            qcow.to_str().expect("utf8"),
            back.to_str().expect("utf8"),
        ],
    );
    assert!(
        std::fs::read(&back).expect("converted") == want,
        "qcow2 restore differs"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&e.work)
        .expect("ls")
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Retention and GC: the data is rewritten and backed up again; keeping only the newest
    // backup leaves the old data unused, and two GC runs free it.
    let fresh: Vec<u8> = bytes.iter().map(|b| b ^ 0x5c).collect();
    write_from(&e, "web", "1M", &fresh);
    ok(&e, &["checkpoint", "create", "web@three"]);
    let third = json(&e, &["backup", "create", "web@three", k[0], k[1]]);
    let dry = json(
        &e,
        &[
            "backup",
            "prune",
            "--keep-last",
            "1",
            "--dry-run",
            k[0],
            k[1],
        ],
    );
    let marks: Vec<String> = dry
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["mark"].to_string())
        .collect();
    assert_eq!(
        marks,
        vec!["\"remove\"", "\"remove\"", "{\"keep\":\"last\"}"],
        "{dry}"
    );
    assert_eq!(
        json(&e, &["backup", "list", k[0], k[1]])
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    fails(
        &e,
        &["backup", "prune", "--keep-last", "1", k[0], k[1]],
        "--yes",
    );
    let out = ok(
        &e,
        &[
            "backup",
            "prune",
            "web",
            "--keep-last",
            "1",
            "--yes",
            k[0],
            k[1],
        ],
    );
    assert!(out.contains("removed 2 of 3"), "{out}");
    let first = json(&e, &["backup", "gc", "--grace", "0", k[0], k[1]]);
    assert!(first["condemned"].as_u64() > Some(0), "{first}");
    assert_eq!(
        first["bytes_freed"], 0,
        "the first run only condemns: {first}"
    );
    let second = json(&e, &["backup", "gc", "--grace", "0", k[0], k[1]]);
    assert!(second["packs_deleted"].as_u64() > Some(0), "{second}");
    assert!(second["bytes_freed"].as_u64() > Some(0), "{second}");
    let v = json(&e, &["backup", "verify", k[0], k[1]]);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
    let third_id = third["id"].as_str().expect("id");
    ok(
        &e,
        &[
            "backup",
            "restore",
            third_id,
            "--to",
            "web-again",
            k[0],
            k[1],
        ],
    );
    assert!(
        contents(&e, "web-again", SIZE) == contents(&e, "web@three", SIZE),
        "the kept backup restores after GC"
    );
    fsck_clean(&e);
}

#[test]
fn backup_bad_input() {
    let e = env();
    let r = repo(&e);
    let k = ["--key-file", r.key.as_str()];
    ok(&e, &["volume", "create", "v", "--size", "4M"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "v",
            "--offset",
            "0",
            "--pattern",
            "0x17",
            "--length",
            "1M",
        ],
    );
    ok(&e, &["checkpoint", "create", "v@a"]);

    fails(&e, &["backup", "list", k[0], k[1]], "no default");
    assert_eq!(
        fails_json(&e, &["backup", "list", "--repo", &r.dir, k[0], k[1]]),
        "not_found"
    );
    fails(
        &e,
        &["backup", "list", "--repo", "ftp://x/y"],
        "not a repository location",
    );
    fails(&e, &["backup", "init", &r.dir], "CAIRN_BACKUP_PASSPHRASE");
    ok(&e, &["backup", "init", &r.dir, k[0], k[1]]);
    assert_eq!(
        fails_json(&e, &["backup", "init", &r.dir, k[0], k[1]]),
        "exists"
    );
    ok(&e, &["backup", "repo", "add", "r", &r.dir]);
    assert_eq!(
        fails_json(&e, &["backup", "repo", "add", "r", &r.dir]),
        "exists"
    );
    fails(
        &e,
        &["backup", "repo", "remove", "nope"],
        "no repository named 'nope'",
    );

    fails(
        &e,
        &["backup", "create", "v", k[0], k[1]],
        "VOLUME@CHECKPOINT",
    );
    assert_eq!(
        fails_json(&e, &["backup", "create", "v@zz", k[0], k[1]]),
        "not_found"
    );
    assert_eq!(
        fails_json(&e, &["backup", "create", "nope@a", k[0], k[1]]),
        "not_found"
    );
    let wrong = e.work.join("wrong");
    std::fs::write(&wrong, "not it\n").expect("key");
    let wrong = ["--key-file", wrong.to_str().expect("utf8")];
    fails(
        &e,
        &["backup", "create", "v@a", wrong[0], wrong[1]],
        "wrong passphrase",
    );
    assert_eq!(
        fails_json(&e, &["backup", "create", "v@a", wrong[0], wrong[1]]),
        "auth"
    );
    fails(
        &e,
        &["backup", "list", "--key-file", "/nonexistent/key"],
        "cannot read key file",
    );

    let b = json(&e, &["backup", "create", "v@a", k[0], k[1]]);
    let id = b["id"].as_str().expect("id");
    assert_eq!(
        fails_json(&e, &["backup", "info", "0123456789", k[0], k[1]]),
        "not_found"
    );
    ok(&e, &["volume", "create", "taken", "--size", "1M"]);
    assert_eq!(
        fails_json(&e, &["backup", "restore", id, "--to", "taken", k[0], k[1]]),
        "exists"
    );
    fails(
        &e,
        &[
            "backup",
            "restore",
            id,
            "--to-file",
            "x.unknownext",
            k[0],
            k[1],
        ],
        "format",
    );
    fails(
        &e,
        &["backup", "verify", "--sample", "0", k[0], k[1]],
        "percentage",
    );
    fails(
        &e,
        &["backup", "prune", "--yes", k[0], k[1]],
        "at least one --keep",
    );
    assert_eq!(
        fails_json(&e, &["backup", "gc", "--grace", "5x", k[0], k[1]]),
        "usage"
    );

    // A damaged pack: verify names it and fails; restore refuses and leaves no volume behind.
    let packs: Vec<_> = walk(&std::path::Path::new(&r.dir).join("data"));
    let mut bytes = std::fs::read(&packs[0]).expect("pack");
    bytes[30] ^= 0xff;
    std::fs::write(&packs[0], &bytes).expect("damage");
    let o = cairn(&e, &["--json", "backup", "verify", k[0], k[1]]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("damaged") && out.contains("v@a bytes"),
        "{out}"
    );
    assert_eq!(
        fails_json(&e, &["backup", "restore", id, "--to", "r2", k[0], k[1]]),
        "corrupt"
    );
    let vols = ok(&e, &["volume", "list"]);
    assert!(!vols.contains("r2"), "{vols}");

    // A damaged manifest: the list shows the other backups and warns about it.
    ok(&e, &["checkpoint", "create", "v@b"]);
    let b2 = json(&e, &["backup", "create", "v@b", k[0], k[1]]);
    let path = std::path::Path::new(&r.dir)
        .join("backups")
        .join(b2["id"].as_str().expect("id"));
    let mut bytes = std::fs::read(&path).expect("manifest");
    bytes[3] ^= 0x10;
    std::fs::write(&path, &bytes).expect("damage");
    let o = cairn(&e, &["--json", "backup", "list", k[0], k[1]]);
    assert!(o.status.success());
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("a JSON list");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning") && err.contains("damaged"), "{err}");
    fsck_clean(&e);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("ls").flatten() {
        match e.path().is_dir() {
            true => out.extend(walk(&e.path())),
            false => out.push(e.path()),
        }
    }
    out
}

/// `cairn --store STORE args` with S3 credentials and the passphrase in its environment, as a
/// user's shell has them; must succeed; returns stdout.
fn ok_s3(e: &Env, args: &[&str]) -> String {
    use cairn_test_peers::s3s_fs::{KEY_ID, SECRET};
    let o = command(e, args)
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("CAIRN_BACKUP_PASSPHRASE", "two hosts")
        .output()
        .expect("run cairn");
    assert!(
        o.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_s3(e: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok_s3(e, &a)).expect("valid JSON")
}

/// Two `cairn serve` daemons on two stores back up into one S3 prefix at once (the credentials
/// and passphrase travel from each command to its daemon); one prunes and collects garbage, and
/// every backup of the other still restores byte-identical and verifies clean.
#[test]
fn two_daemons_share_an_s3_prefix() {
    let (a, b) = (env_with_daemon(), env_with_daemon());
    let s3 = cairn_test_peers::s3s_fs::S3Server::start(&a.work.join("s3"), "cairn-test");
    let url = "s3://cairn-test/hosts";
    let endpoint = s3.endpoint();
    let base = data(8 << 20, 2654435761, 7);
    for e in [&a, &b] {
        ok(e, &["volume", "create", "web", "--size", "32M"]);
        write_from(e, "web", "0", &base);
    }
    // Host a also has data of its own, which its later backups no longer hold: incompressible
    // and three packs long, so however the two concurrent first backups share out the base
    // image's chunks, at least one of host a's packs holds only its own data.
    write_from(&a, "web", "8M", &noise(24 << 20, 0x9e37_79b9_7f4a_7c15));
    for e in [&a, &b] {
        ok(e, &["checkpoint", "create", "web@one"]);
    }
    ok_s3(&a, &["backup", "init", url, "--s3-endpoint", &endpoint]);
    for e in [&a, &b] {
        ok(
            e,
            &[
                "backup",
                "repo",
                "add",
                "s3",
                url,
                "--s3-endpoint",
                &endpoint,
            ],
        );
    }
    // Both at once.
    let (ba, bb) = std::thread::scope(|s| {
        let ta = s.spawn(|| json_s3(&a, &["backup", "create", "web@one"]));
        let tb = s.spawn(|| json_s3(&b, &["backup", "create", "web@one"]));
        (ta.join().expect("a"), tb.join().expect("b"))
    });
    assert_ne!(ba["store"], bb["store"], "two stores, two groups");
    ok(
        &b,
        &[
            "volume",
            "write",
            "web",
            "--offset",
            "4M",
            "--pattern",
            "0x33",
            "--length",
            "8K",
        ],
    );
    ok(&b, &["checkpoint", "create", "web@two"]);
    let bb2 = json_s3(&b, &["backup", "create", "web@two"]);
    assert_eq!(
        bb2["parent"], bb["id"],
        "incremental on its own host's backup"
    );

    // Host a replaces all its data, keeps only its newest backup and collects garbage: its own
    // old data goes, the base image host b shares stays.
    write_from(&a, "web", "0", &data(32 << 20, 40503, 2));
    ok(&a, &["checkpoint", "create", "web@two"]);
    let ba2 = json_s3(&a, &["backup", "create", "web@two"]);
    let pruned = json_s3(&a, &["backup", "prune", "--keep-last", "1", "--yes"]);
    let removed: Vec<&str> = pruned
        .as_array()
        .expect("list")
        .iter()
        .filter(|p| p["mark"] == "remove")
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(
        removed,
        vec![ba["id"].as_str().expect("id")],
        "only host a's older backup goes"
    );
    json_s3(&a, &["backup", "gc", "--grace", "0"]);
    let gc = json_s3(&a, &["backup", "gc", "--grace", "0"]);
    assert!(gc["packs_deleted"].as_u64() > Some(0), "{gc}");

    let listed = json_s3(&b, &["backup", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    for (e, backup, cp) in [
        (&b, &bb, "web@one"),
        (&b, &bb2, "web@two"),
        (&a, &ba2, "web@two"),
    ] {
        let id = backup["id"].as_str().expect("id");
        let to = format!("r{}", &id[..6]);
        ok_s3(e, &["backup", "restore", id, "--to", &to]);
        assert!(
            contents(e, &to, 32 << 20) == contents(e, cp, 32 << 20),
            "{id} restores {cp}"
        );
    }
    let v = json_s3(&b, &["backup", "verify"]);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
}
