//! The `cairn` binary, command by command, with each bad input the engine issue lists.
#![allow(missing_docs)]

use std::process::Command;

mod common;
use common::*;

#[test]
fn volume_lifecycle() {
    volume_lifecycle_in(env());
}

/// The same commands through the daemon's control API (and its NBD socket for import/export).
#[test]
fn volume_lifecycle_through_daemon() {
    volume_lifecycle_in(env_with_daemon());
}

fn volume_lifecycle_in(e: Env) {
    ok(&e, &["volume", "create", "web", "--size", "64M"]);
    let v = json(&e, &["volume", "info", "web"]);
    assert_eq!(v["size"], 64 << 20);
    assert_eq!(v["referenced"], 0);
    let list = json(&e, &["volume", "list"]);
    assert_eq!(list.as_array().map(|a| a.len()), Some(1));
    assert!(ok(&e, &["volume", "list"]).contains("web"));
    ok(
        &e,
        &[
            "volume",
            "write",
            "web",
            "--offset",
            "4096",
            "--pattern",
            "0xab",
            "--length",
            "8192",
        ],
    );
    assert_eq!(read_target(&e, "web", 4096, 8192), vec![0xab; 8192]);
    assert_eq!(read_target(&e, "web", 0, 4096), vec![0; 4096]);
    let f = e.work.join("in.bin");
    std::fs::write(&f, b"hello cairn").expect("write");
    ok(
        &e,
        &[
            "volume",
            "write",
            "web",
            "--offset",
            "100",
            "--from",
            f.to_str().expect("utf8"),
        ],
    );
    assert_eq!(read_target(&e, "web", 100, 11), b"hello cairn");
    let to = e.work.join("out.bin");
    ok(
        &e,
        &[
            "volume",
            "read",
            "web",
            "--offset",
            "100",
            "--length",
            "11",
            "--to",
            to.to_str().expect("utf8"),
        ],
    );
    assert_eq!(std::fs::read(&to).expect("read"), b"hello cairn");
    ok(&e, &["volume", "resize", "web", "--size", "128M"]);
    assert_eq!(json(&e, &["volume", "info", "web"])["size"], 128 << 20);
    assert_eq!(read_target(&e, "web", 4096, 4), vec![0xab; 4]);
    ok(&e, &["volume", "delete", "web"]);
    fails(&e, &["volume", "info", "web"], "volume 'web' not found");
}

#[test]
fn checkpoint_lifecycle() {
    checkpoint_lifecycle_in(env());
}

/// The same commands through the daemon's control API (and its NBD socket for import/export).
#[test]
fn checkpoint_lifecycle_through_daemon() {
    checkpoint_lifecycle_in(env_with_daemon());
}

fn checkpoint_lifecycle_in(e: Env) {
    ok(&e, &["volume", "create", "vm", "--size", "16M"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "vm",
            "--offset",
            "0",
            "--pattern",
            "0x11",
            "--length",
            "1M",
        ],
    );
    ok(
        &e,
        &["checkpoint", "create", "vm@base", "-m", "fresh install"],
    );
    ok(
        &e,
        &[
            "volume",
            "write",
            "vm",
            "--offset",
            "65536",
            "--pattern",
            "0x22",
            "--length",
            "4096",
        ],
    );
    ok(&e, &["checkpoint", "create", "vm@patched"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "vm",
            "--offset",
            "0",
            "--pattern",
            "0x33",
            "--length",
            "4096",
        ],
    );

    let cps = json(&e, &["checkpoint", "list", "vm"]);
    assert_eq!(cps[0]["name"], "base");
    assert_eq!(cps[0]["description"], "fresh install");
    assert_eq!(cps[1]["parent"], "base");
    assert_eq!(cps[1]["is_head_parent"], true);
    let tree = ok(&e, &["checkpoint", "list", "vm", "--tree"]);
    assert!(
        tree.contains("base") && tree.contains("patched") && tree.contains("now"),
        "{tree}"
    );
    // The head hangs under the checkpoint it was last taken from, as that one's last branch.
    let shape: Vec<&str> = tree
        .lines()
        .map(|l| l.split(" 20").next().unwrap_or(l))
        .collect();
    assert_eq!(
        shape,
        [
            "└─ base",
            "   └─ patched",
            "      └─ * now (the current state)"
        ],
        "{tree}"
    );

    let d = json(&e, &["diff", "vm@base", "vm@patched"]);
    assert_eq!(
        d["extents"],
        serde_json::json!([{ "offset": 65536, "length": 4096 }])
    );
    let d = json(&e, &["diff", "vm@patched", "vm"]);
    assert_eq!(d["bytes"], 4096);
    assert!(ok(&e, &["diff", "vm@base", "vm"]).contains("range(s)"));

    // Apply keeps newer checkpoints; --save-current keeps the head's state.
    ok(
        &e,
        &["checkpoint", "apply", "vm@base", "--save-current", "mine"],
    );
    assert_eq!(read_target(&e, "vm", 0, 2), vec![0x11; 2]);
    assert_eq!(read_target(&e, "vm", 65536, 2), vec![0x11; 2]);
    assert_eq!(read_target(&e, "vm@mine", 0, 2), vec![0x33; 2]);
    ok(&e, &["checkpoint", "apply", "vm@patched"]);
    assert_eq!(read_target(&e, "vm", 65536, 2), vec![0x22; 2]);
    assert_eq!(json(&e, &["volume", "info", "vm"])["parent"], "patched");

    ok(&e, &["checkpoint", "rename", "vm@mine", "experiment"]);
    assert_eq!(read_target(&e, "vm@experiment", 0, 1), vec![0x33]);
    fails(
        &e,
        &[
            "volume", "read", "vm@mine", "--offset", "0", "--length", "1",
        ],
        "checkpoint 'vm@mine' not found",
    );

    let sp = json(&e, &["space", "vm"]);
    let cps = sp["volumes"][0]["checkpoints"]
        .as_array()
        .expect("array")
        .clone();
    assert_eq!(cps.len(), 3);
    assert!(sp["allocated"].as_u64().expect("number") >= 1 << 20);
    assert!(ok(&e, &["space"]).contains("UNIQUE"));
    let unique_exp = cps
        .iter()
        .find(|c| c["name"] == "experiment")
        .expect("listed")["unique"]
        .as_u64()
        .expect("n");
    assert!(unique_exp >= 4096, "experiment holds its own 4 KiB block");
    let before = sp["allocated"].as_u64().expect("n");
    ok(&e, &["checkpoint", "delete", "vm@experiment"]);
    let after = json(&e, &["space"])["allocated"].as_u64().expect("n");
    assert_eq!(
        before - after,
        unique_exp + 4096,
        "freed = unique + its catalog record"
    );
    assert!(ok(&e, &["fsck"]).contains("no problems"));
    conventions_in(&e);
}

/// What users bring from virsh, Hyper-V and Proxmox: unnamed checkpoints get a time-based name,
/// descriptions can be edited, a revert keeps what it replaces, subtrees can be deleted, and a
/// rename takes VOLUME@NEW.
fn conventions_in(e: &Env) {
    let fill = |e: &Env, byte: &str| {
        let args = ["volume", "write", "vm", "--offset", "0", "--pattern", byte];
        ok(e, &[&args[..], &["--length", "4096"]].concat());
    };
    let names = |e: &Env| -> Vec<(String, bool)> {
        json(e, &["checkpoint", "list", "vm"])
            .as_array()
            .expect("list")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().expect("name").to_string(),
                    c["automatic"].as_bool().expect("automatic"),
                )
            })
            .collect()
    };
    let made = json(e, &["checkpoint", "create", "vm", "-m", "no name"]);
    let unnamed = made["name"].as_str().expect("name").to_string();
    assert!(unnamed.starts_with("cp-20"), "{made}");
    assert_eq!(made["description"], "no name");
    ok(
        e,
        &[
            "checkpoint",
            "edit",
            &format!("vm@{unnamed}"),
            "-m",
            "renamed later",
        ],
    );
    let listed = json(e, &["checkpoint", "list", "vm"]);
    let row = listed
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["name"] == unnamed.as_str())
        .expect("listed")
        .clone();
    assert_eq!(row["description"], "renamed later");
    assert_eq!(row["automatic"], false);
    ok(
        e,
        &["checkpoint", "rename", &format!("vm@{unnamed}"), "vm@named"],
    );

    // The head equals `named`: applying another checkpoint keeps nothing extra.
    let before = names(e).len();
    let r = json(e, &["checkpoint", "apply", "vm@base"]);
    assert_eq!(r["saved_as"], serde_json::Value::Null, "{r}");
    assert_eq!(names(e).len(), before);
    // A changed head is kept as an automatic checkpoint, named in the output...
    fill(e, "0x44");
    let out = ok(e, &["checkpoint", "apply", "vm@named"]);
    assert!(
        out.contains("kept the replaced state as vm@auto-20"),
        "{out}"
    );
    let auto: Vec<String> = names(e)
        .into_iter()
        .filter(|(_, a)| *a)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(auto.len(), 1, "{auto:?}");
    assert!(auto[0].starts_with("auto-20"));
    assert_eq!(
        read_target(e, &format!("vm@{}", auto[0]), 0, 2),
        vec![0x44; 2]
    );
    assert!(ok(e, &["checkpoint", "list", "vm"]).contains("[automatic]"));
    // ...unless the user discards it.
    fill(e, "0x55");
    let before = names(e).len();
    let r = json(e, &["checkpoint", "apply", "vm@base", "--discard-current"]);
    assert_eq!(r["saved_as"], serde_json::Value::Null);
    assert_eq!(names(e).len(), before);
    assert_eq!(read_target(e, "vm", 0, 2), vec![0x11; 2]);

    // A subtree goes with --children (leaves first); without a terminal it needs --yes.
    ok(e, &["checkpoint", "create", "vm@t1"]);
    ok(e, &["checkpoint", "create", "vm@t2"]);
    ok(e, &["checkpoint", "apply", "vm@t1"]);
    ok(e, &["checkpoint", "create", "vm@t3"]);
    fails(
        e,
        &["checkpoint", "delete", "vm@t1", "--children"],
        "add --yes",
    );
    let gone = json(e, &["checkpoint", "delete", "vm@t1", "--children", "--yes"]);
    let gone: Vec<&str> = gone["deleted"]
        .as_array()
        .expect("deleted")
        .iter()
        .map(|v| v.as_str().expect("name"))
        .collect();
    assert_eq!(gone.len(), 3, "{gone:?}");
    assert_eq!(gone.last(), Some(&"vm@t1"), "the root goes last");
    assert!(names(e).iter().all(|(n, _)| !n.starts_with('t')));
    fsck_clean(e);
}

#[test]
fn defrag() {
    defrag_in(env());
}

/// The same commands through the daemon's control API.
#[test]
fn defrag_through_daemon() {
    defrag_in(env_with_daemon());
}

fn defrag_in(e: Env) {
    ok(&e, &["volume", "create", "web", "--size", "8M"]);
    let w = |off: u64, pat: &str, len: &str| {
        let off = off.to_string();
        ok(
            &e,
            &[
                "volume",
                "write",
                "web",
                "--offset",
                &off,
                "--pattern",
                pat,
                "--length",
                len,
            ],
        );
    };
    w(0, "0x11", "2M");
    ok(&e, &["checkpoint", "create", "web@base"]);
    // Scattered overwrites after the checkpoint land in new blocks elsewhere.
    for b in [3u64, 40, 41, 200, 333] {
        w(b * 4096, "0x22", "4096");
    }
    let before = read_target(&e, "web", 0, 2 << 20);
    let space = json(&e, &["space"])["allocated"]
        .as_u64()
        .expect("allocated");

    // Ten extents in a 2 MiB range cost sequential reads little: the default leaves them.
    let out = ok(&e, &["volume", "defrag", "web"]);
    assert!(out.contains("nothing to move"), "{out}");
    assert_eq!(json(&e, &["space"])["allocated"].as_u64(), Some(space));
    let any = ["--min-extents", "2"];
    let dry = json(
        &e,
        &["volume", "defrag", "web", "--dry-run", any[0], any[1]],
    );
    assert_eq!(dry["dry_run"], true);
    assert!(dry["moved_bytes"].as_u64() > Some(0), "{dry}");
    assert!(dry["shared_bytes"].as_u64() > Some(0), "{dry}");
    assert!(
        dry["extents_before"].as_u64() > dry["extents_after"].as_u64(),
        "{dry}"
    );
    assert_eq!(json(&e, &["space"])["allocated"].as_u64(), Some(space));
    assert!(ok(
        &e,
        &["volume", "defrag", "web", "--dry-run", any[0], any[1]]
    )
    .contains("would move"));

    let out = ok(&e, &["volume", "defrag", "web", any[0], any[1]]);
    assert!(out.contains("defragmented 'web'"), "{out}");
    assert!(out.contains("stored twice"), "{out}");
    assert_eq!(read_target(&e, "web", 0, 2 << 20), before);
    assert_eq!(
        read_target(&e, "web@base", 4096 * 3, 4096),
        vec![0x11; 4096]
    );
    let grown = json(&e, &["space"])["allocated"]
        .as_u64()
        .expect("allocated")
        - space;
    assert!(
        grown >= dry["shared_bytes"].as_u64().expect("shared"),
        "grew {grown}"
    );
    assert!(ok(&e, &["volume", "defrag", "web", any[0], any[1]]).contains("nothing to move"));
    fails(&e, &["volume", "defrag", "nope"], "nope");
    assert!(ok(&e, &["fsck"]).contains("no problems"));
}

#[test]
fn clone_survives_source_deletion() {
    clone_survives_source_deletion_in(env());
}

/// The same commands through the daemon's control API (and its NBD socket for import/export).
#[test]
fn clone_survives_source_deletion_through_daemon() {
    clone_survives_source_deletion_in(env_with_daemon());
}

fn clone_survives_source_deletion_in(e: Env) {
    ok(&e, &["volume", "create", "gold", "--size", "8M"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "gold",
            "--offset",
            "0",
            "--pattern",
            "0x5a",
            "--length",
            "2M",
        ],
    );
    ok(&e, &["checkpoint", "create", "gold@v1"]);
    ok(&e, &["clone", "gold@v1", "test1"]);
    assert_eq!(json(&e, &["volume", "info", "test1"])["origin"], "gold@v1");
    ok(
        &e,
        &[
            "volume",
            "write",
            "test1",
            "--offset",
            "0",
            "--pattern",
            "0x01",
            "--length",
            "4096",
        ],
    );
    // Before it has checkpoints of its own, a clone's changes are counted from its origin.
    let space = json(&e, &["space", "test1"]);
    assert_eq!(space["volumes"][0]["head_changed"], 4096, "{space}");
    assert_eq!(space["volumes"][0]["head_changed_since"], "gold@v1");
    ok(&e, &["checkpoint", "rename", "gold@v1", "golden"]);
    assert_eq!(
        json(&e, &["volume", "info", "test1"])["origin"],
        "gold@golden"
    );
    assert!(ok(&e, &["space", "test1"]).contains("4.0 KiB changed since gold@golden"));
    ok(&e, &["checkpoint", "delete", "gold@golden"]);
    let space = json(&e, &["space", "test1"]);
    assert_eq!(space["volumes"][0]["head_changed"], 2 << 20, "{space}");
    assert!(space["volumes"][0]["head_changed_since"].is_null());
    ok(&e, &["volume", "delete", "gold"]);
    assert_eq!(
        json(&e, &["volume", "info", "test1"])["origin"],
        "gold@golden"
    );
    assert_eq!(read_target(&e, "test1", 0, 1), vec![0x01]);
    assert_eq!(read_target(&e, "test1", 4096, 4), vec![0x5a; 4]);
    assert!(ok(&e, &["fsck"]).contains("no problems"));
}

#[test]
fn import_export_roundtrip() {
    import_export_roundtrip_in(env());
}

/// The same commands through the daemon's control API (and its NBD socket for import/export).
#[test]
fn import_export_roundtrip_through_daemon() {
    import_export_roundtrip_in(env_with_daemon());
}

fn import_export_roundtrip_in(e: Env) {
    let src = e.work.join("disk.raw");
    let mut img = vec![0u8; 5 << 20];
    for (i, b) in img.iter_mut().enumerate().skip(1 << 20).take(1 << 20) {
        *b = (i % 251) as u8;
    }
    img[(4 << 20) + 7] = 9;
    std::fs::write(&src, &img).expect("write image");
    ok(
        &e,
        &["volume", "import", "disk", src.to_str().expect("utf8")],
    );
    let info = json(&e, &["volume", "info", "disk"]);
    assert_eq!(info["size"], 5 << 20);
    assert_eq!(
        info["referenced"],
        (1 << 20) + 4096,
        "zero ranges take no space"
    );
    ok(&e, &["checkpoint", "create", "disk@imported"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "disk",
            "--offset",
            "0",
            "--pattern",
            "0xff",
            "--length",
            "4096",
        ],
    );
    let out = e.work.join("out.raw");
    ok(
        &e,
        &[
            "volume",
            "export",
            "disk@imported",
            out.to_str().expect("utf8"),
        ],
    );
    assert!(
        std::fs::read(&out).expect("read") == img,
        "export of the checkpoint differs"
    );
    // A real peer agrees.
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&out)
        .output()
        .expect("qemu-img is installed by scripts/setup.sh");
    assert!(
        o.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&out).expect("stat").blocks() * 512;
    assert!(used < 3 << 20, "export is sparse ({used} bytes used)");
    fails(
        &e,
        &["volume", "import", "x", "/nonexistent/file.raw"],
        "cannot import /nonexistent/file.raw: no such file",
    );
    fails(
        &e,
        &["volume", "import", "disk", src.to_str().expect("utf8")],
        "already exists",
    );
}

/// Completions and man pages come from the CLI's own definition, so they name every command.
#[test]
fn completions_and_man_pages() {
    let e = env();
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&e, &["completions", shell]);
        assert!(
            script.contains("checkpoint") && script.contains("discard-current"),
            "{shell}"
        );
    }
    assert_eq!(fails_json(&e, &["completions", "tcsh"]), "usage");
    let dir = e.work.join("man");
    ok(&e, &["man", "--dir", dir.to_str().expect("utf-8")]);
    let page = std::fs::read_to_string(dir.join("cairn-checkpoint-apply.1")).expect("page");
    assert!(page.contains("discard\\-current"), "{page}");
    assert!(ok(&e, &["man"]).contains(".TH cairn 1"));
}

/// Through the daemon, long operations stream their progress before their outcome (what the
/// CLI's progress bars show); a failure arrives the same way, typed.
#[test]
fn the_daemon_streams_progress_then_the_outcome() {
    use cairn_control::{Client, ErrorKind, Op, Reply};
    let e = env_with_daemon();
    ok(&e, &["volume", "create", "big", "--size", "64M"]);
    let args = [
        "volume",
        "write",
        "big",
        "--pattern",
        "0x5a",
        "--length",
        "32M",
    ];
    ok(&e, &args);
    ok(&e, &["checkpoint", "create", "big@a"]);
    ok(&e, &args);
    let client = Client::find(&e.store).expect("the daemon answers");
    let mut seen = Vec::new();
    let reply = client
        .call_with_progress(
            &Op::VolumeDefrag {
                name: "big".into(),
                dry_run: true,
                min_extents: 1,
            },
            &mut |n| seen.push(n),
        )
        .expect("defrag");
    assert!(matches!(reply, Reply::Defrag(_)), "{reply:?}");
    assert!(!seen.is_empty(), "no progress arrived");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let mut calls = 0;
    let err = client
        .call_with_progress(
            &Op::VolumeDelete {
                name: "nosuch".into(),
            },
            &mut |_| calls += 1,
        )
        .expect_err("unknown volume");
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(err.message.contains("nosuch"), "{err}");
}
