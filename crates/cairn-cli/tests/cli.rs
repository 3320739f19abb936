//! The `cairn` binary, command by command, with each bad input the engine issue lists.
#![allow(missing_docs)]

use std::path::Path;
use std::process::Command;

mod common;
use common::*;

fn read(e: &Env, src: &str, off: u64, len: u64) -> Vec<u8> {
    let o = cairn(
        e,
        &[
            "volume",
            "read",
            src,
            "--offset",
            &off.to_string(),
            "--length",
            &len.to_string(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

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
    assert_eq!(read(&e, "web", 4096, 8192), vec![0xab; 8192]);
    assert_eq!(read(&e, "web", 0, 4096), vec![0; 4096]);
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
    assert_eq!(read(&e, "web", 100, 11), b"hello cairn");
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
    assert_eq!(read(&e, "web", 4096, 4), vec![0xab; 4]);
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
    assert_eq!(read(&e, "vm", 0, 2), vec![0x11; 2]);
    assert_eq!(read(&e, "vm", 65536, 2), vec![0x11; 2]);
    assert_eq!(read(&e, "vm@mine", 0, 2), vec![0x33; 2]);
    ok(&e, &["checkpoint", "apply", "vm@patched"]);
    assert_eq!(read(&e, "vm", 65536, 2), vec![0x22; 2]);
    assert_eq!(json(&e, &["volume", "info", "vm"])["parent"], "patched");

    ok(&e, &["checkpoint", "rename", "vm@mine", "experiment"]);
    assert_eq!(read(&e, "vm@experiment", 0, 1), vec![0x33]);
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
    assert_eq!(read(e, &format!("vm@{}", auto[0]), 0, 2), vec![0x44; 2]);
    assert!(ok(e, &["checkpoint", "list", "vm"]).contains("[automatic]"));
    // ...unless the user discards it.
    fill(e, "0x55");
    let before = names(e).len();
    let r = json(e, &["checkpoint", "apply", "vm@base", "--discard-current"]);
    assert_eq!(r["saved_as"], serde_json::Value::Null);
    assert_eq!(names(e).len(), before);
    assert_eq!(read(e, "vm", 0, 2), vec![0x11; 2]);

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
    let before = read(&e, "web", 0, 2 << 20);
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
    assert_eq!(read(&e, "web", 0, 2 << 20), before);
    assert_eq!(read(&e, "web@base", 4096 * 3, 4096), vec![0x11; 4096]);
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
    assert_eq!(read(&e, "test1", 0, 1), vec![0x01]);
    assert_eq!(read(&e, "test1", 4096, 4), vec![0x5a; 4]);
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

#[test]
fn bad_inputs() {
    bad_inputs_in(env());
}

/// The same commands through the daemon's control API (and its NBD socket for import/export).
#[test]
fn bad_inputs_through_daemon() {
    bad_inputs_in(env_with_daemon());
}

fn bad_inputs_in(e: Env) {
    ok(&e, &["volume", "create", "a", "--size", "1M"]);
    ok(&e, &["checkpoint", "create", "a@one"]);
    fails(&e, &["volume", "info", "nope"], "volume 'nope' not found");
    assert_eq!(fails_json(&e, &["volume", "info", "nope"]), "not_found");
    assert_eq!(
        fails_json(&e, &["volume", "create", "a", "--size", "1M"]),
        "exists"
    );
    assert_eq!(fails_json(&e, &["volume", "info"]), "usage");
    fails(
        &e,
        &["checkpoint", "apply", "a@nope"],
        "checkpoint 'a@nope' not found",
    );
    fails(
        &e,
        &["checkpoint", "delete", "nope@one"],
        "volume 'nope' not found",
    );
    fails(
        &e,
        &["volume", "create", "a", "--size", "1M"],
        "volume 'a' already exists",
    );
    fails(
        &e,
        &["checkpoint", "create", "a@one"],
        "checkpoint 'a@one' already exists",
    );
    fails(
        &e,
        &["checkpoint", "rename", "a@one", "bad name"],
        "invalid name 'bad name'",
    );
    fails(
        &e,
        &["volume", "create", "bad/name", "--size", "1M"],
        "invalid name",
    );
    fails(
        &e,
        &["volume", "create", "--size", "1M", "--", "-x"],
        "cannot start with",
    );
    fails(
        &e,
        &["volume", "create", "b", "--size", "12Q"],
        "unknown unit",
    );
    fails(
        &e,
        &["volume", "create", "b", "--size", "1000"],
        "multiple of 512",
    );
    fails(
        &e,
        &["volume", "create", "b", "--size", "0"],
        "at least 512",
    );
    fails(&e, &["checkpoint", "apply", "a"], "names no checkpoint");
    fails(
        &e,
        &["checkpoint", "edit", "a@nope", "-m", "x"],
        "not found",
    );
    fails(
        &e,
        &["checkpoint", "rename", "a@one", "other@two"],
        "names 'other', not 'a'",
    );
    let both = [
        "checkpoint",
        "apply",
        "a@one",
        "--save-current",
        "x",
        "--discard-current",
    ];
    assert_eq!(fails_json(&e, &both), "usage");
    fails(
        &e,
        &["checkpoint", "delete", "a@nope", "--children", "--yes"],
        "checkpoint 'a@nope' not found",
    );
    fails(
        &e,
        &[
            "volume",
            "write",
            "a",
            "--offset",
            "1M",
            "--pattern",
            "0x1",
            "--length",
            "1",
        ],
        "past the end",
    );
    fails(
        &e,
        &[
            "volume",
            "write",
            "a",
            "--offset",
            "1048000",
            "--pattern",
            "0x1",
            "--length",
            "1000",
        ],
        "past the end",
    );
    fails(
        &e,
        &["volume", "read", "a", "--offset", "0", "--length", "2M"],
        "past the end",
    );
    fails(
        &e,
        &[
            "volume",
            "read",
            "a@one",
            "--offset",
            "18446744073709551615",
            "--length",
            "2",
        ],
        "past the end",
    );
    fails(
        &e,
        &["volume", "resize", "a", "--size", "512K"],
        "volumes only grow",
    );
    fails(&e, &["diff", "a", "b"], "volume 'b' not found");
    fails(&e, &["clone", "a@one", "a"], "volume 'a' already exists");
    fails(
        &e,
        &[
            "volume",
            "write",
            "a",
            "--offset",
            "0",
            "--pattern",
            "0x100",
            "--length",
            "1",
        ],
        "one byte",
    );
    // Nothing above changed the volume.
    assert_eq!(json(&e, &["volume", "info", "a"])["referenced"], 0);
    assert!(ok(&e, &["fsck"]).contains("no problems"));
}

/// A reader that goes away ends the command quietly, as for any Unix tool: the status a shell
/// gives a process ended by SIGPIPE, and nothing on stderr.
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    use std::io::Read;
    let e = env_with_daemon();
    ok(&e, &["volume", "create", "v", "--size", "16M"]);
    ok(&e, &["checkpoint", "create", "v@empty"]);
    // 2,048 separate changed ranges: a diff far longer than a pipe's buffer.
    let writes: String = (0..2048)
        .map(|i| format!("write -P 1 {} 4k\n", i * 8192))
        .collect();
    let d = e.daemon.as_ref().expect("daemon");
    let mut io = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &d.uri("v")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    use std::io::Write;
    io.stdin
        .take()
        .expect("stdin")
        .write_all(writes.as_bytes())
        .expect("commands");
    assert!(io.wait().expect("qemu-io").success());
    for args in [
        &["volume", "read", "v", "--offset", "0", "--length", "16M"][..],
        &["--json", "diff", "v@empty", "v"][..],
    ] {
        let mut child = command(&e, args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut out = child.stdout.take().expect("stdout");
        let mut first = [0u8; 1];
        out.read_exact(&mut first).expect("some output");
        drop(out);
        let o = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.is_empty(), "{args:?}: {err}");
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(o.status.code(), Some(141), "{args:?}");
    }
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

#[test]
fn missing_and_locked_store() {
    let e = env();
    let other = e.work.join("empty");
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--store", other.to_str().expect("utf8"), "volume", "list"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cairn init"));
    fails(&e, &["init"], "already exists");
    // Hold the store in this process; the CLI must name our pid.
    let held = cairn_engine::Store::open(&e.store, cairn_engine::Options::default()).expect("open");
    fails(
        &e,
        &["volume", "list"],
        &format!("in use by process {}", std::process::id()),
    );
    fails(&e, &["fsck"], "in use by process");
    drop(held);
    ok(&e, &["volume", "list"]);
    // A second daemon on a store a daemon owns is refused, naming the owner.
    let d = Daemon::start(&e);
    fails(&e, &["serve"], &format!("in use by process {}", d.pid()));
    // ...while the CLI simply talks to the first one.
    ok(&e, &["volume", "list"]);
}

/// Block numbers of the metadata pages in a data file (they start with the magic "RIAC").
fn metadata_blocks(data: &Path) -> Vec<u64> {
    let bytes = std::fs::read(data).expect("read data file");
    bytes
        .chunks(4096)
        .enumerate()
        .filter(|(_, c)| c.len() >= 4 && &c[0..4] == b"RIAC")
        .map(|(i, _)| i as u64)
        .collect()
}

#[test]
fn corruption_is_reported_not_panicked() {
    let e = env();
    ok(&e, &["volume", "create", "a", "--size", "8M"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "a",
            "--offset",
            "0",
            "--pattern",
            "0x7",
            "--length",
            "3M",
        ],
    );
    ok(&e, &["checkpoint", "create", "a@c1"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "a",
            "--offset",
            "4096",
            "--pattern",
            "0x8",
            "--length",
            "4096",
        ],
    );
    assert!(ok(&e, &["fsck"]).contains("no problems"));
    let data = e.store.join("cairn.data");
    let pristine = std::fs::read(&data).expect("read");
    let blocks = metadata_blocks(&data);
    assert!(blocks.len() >= 5, "found metadata pages {blocks:?}");
    let last_page = blocks.iter().copied().max().unwrap_or(0);
    for b in blocks {
        let mut img = pristine.clone();
        img[b as usize * 4096 + 2000] ^= 0x40;
        std::fs::write(&data, &img).expect("write");
        let o = cairn(&e, &["fsck"]);
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "flipped byte in block {b} went unnoticed: {out}"
        );
        assert!(
            !err.contains("panicked") && !out.contains("panicked"),
            "panic: {err}"
        );
        assert!(
            out.contains(&format!("block {b}")) || out.contains("superblock"),
            "block {b} not named: {out}"
        );
        // Other commands fail cleanly too, or work if they never touch the page.
        let o = cairn(
            &e,
            &["volume", "read", "a", "--offset", "0", "--length", "8M"],
        );
        assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    }
    // Truncated data file: cut before its last metadata page (the tail past it may be only
    // preallocated space, whose loss is harmless).
    std::fs::write(&data, &pristine[..last_page as usize * 4096]).expect("truncate");
    let o = cairn(&e, &["fsck"]);
    assert!(!o.status.success(), "truncation went unnoticed");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    std::fs::write(&data, &pristine).expect("restore");
    assert!(ok(&e, &["fsck"]).contains("no problems"));
}

/// `size` bytes whose 4 KiB block `i` is `(tag, i)` repeated, so any block read back names the
/// write it came from.
fn tagged(tag: u64, size: usize) -> Vec<u8> {
    (0..size / 4096)
        .flat_map(|i| (tag * 1_000_003 + i as u64).to_le_bytes().repeat(512))
        .collect()
}

/// Starts `cairn args`, kills it with SIGKILL after `delay`; says whether it was still running.
fn kill_after(e: &Env, args: &[&str], delay: std::time::Duration) -> bool {
    let mut child = command(e, args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn cairn");
    std::thread::sleep(delay);
    let running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill");
    child.wait().expect("wait");
    running
}

/// A `cairn` process killed (SIGKILL) in the middle of a long write or of a large delete, at
/// several moments: the next command gets the store (the lock died with the process), fsck is
/// clean, every checkpoint reads as it was taken, every block of the head reads as one of the
/// writes made to it, and a delete cut short either never happened or finishes.
#[test]
fn a_killed_process_leaves_a_consistent_store() {
    const SIZE: usize = 64 << 20;
    let e = env();
    ok(&e, &["volume", "create", "v", "--size", "64M"]);
    let file = |tag: u64| {
        let p = e.work.join(format!("tag{tag}.bin"));
        std::fs::write(&p, tagged(tag, SIZE)).expect("write source file");
        p
    };
    let old = file(1);
    let new = file(2);
    let (old, new) = (old.to_str().expect("utf8"), new.to_str().expect("utf8"));
    ok(
        &e,
        &["volume", "write", "v", "--offset", "0", "--from", old],
    );
    ok(&e, &["checkpoint", "create", "v@old"]);
    let delays = [5, 20, 50, 100, 200, 400].map(std::time::Duration::from_millis);
    let mut killed_running = 0;

    for delay in delays {
        let write = ["volume", "write", "v", "--offset", "0", "--from", new];
        killed_running += kill_after(&e, &write, delay) as usize;
        fsck_clean(&e);
        let head = read(&e, "v", 0, SIZE as u64);
        let (a, b) = (tagged(1, SIZE), tagged(2, SIZE));
        for (i, got) in head.chunks(4096).enumerate() {
            let r = i * 4096..(i + 1) * 4096;
            assert!(
                got == &a[r.clone()] || got == &b[r],
                "block {i} of the head after a write killed at {delay:?} is neither old nor new"
            );
        }
        assert!(
            read(&e, "v@old", 0, SIZE as u64) == a,
            "checkpoint old changed by a write killed at {delay:?}"
        );
    }

    for (round, delay) in delays.into_iter().enumerate() {
        // A checkpoint holding 64 MiB nothing else references.
        let tag = 10 + round as u64;
        let src = file(tag);
        let src = src.to_str().expect("utf8");
        ok(
            &e,
            &["volume", "write", "v", "--offset", "0", "--from", src],
        );
        let name = format!("v@c{round}");
        ok(&e, &["checkpoint", "create", &name]);
        ok(
            &e,
            &["volume", "write", "v", "--offset", "0", "--from", new],
        );
        killed_running += kill_after(&e, &["checkpoint", "delete", &name], delay) as usize;
        fsck_clean(&e);
        let listed = ok(&e, &["checkpoint", "list", "v"]);
        if listed.contains(&format!("c{round}")) {
            assert!(
                read(&e, &name, 0, SIZE as u64) == tagged(tag, SIZE),
                "checkpoint c{round} kept after a delete killed at {delay:?} lost data"
            );
            ok(&e, &["checkpoint", "delete", &name]);
        }
        assert!(read(&e, "v@old", 0, SIZE as u64) == tagged(1, SIZE));
        assert!(read(&e, "v", 0, SIZE as u64) == tagged(2, SIZE));
        // Whatever the killed delete left to free is freed now.
        let space = json(&e, &["space"]);
        assert_eq!(
            space["dropped_trees"].as_u64(),
            Some(0),
            "after a delete killed at {delay:?}: {space}"
        );
        fsck_clean(&e);
    }
    eprintln!("{killed_running} of 12 kills found the process running");
    assert!(
        killed_running >= 4,
        "only {killed_running} of 12 kills found the process still running: the test checks little"
    );
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
