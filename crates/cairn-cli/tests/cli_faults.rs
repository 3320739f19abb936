//! The `cairn` binary when things go wrong: each bad input (also as a JSON error), a closed pipe,
//! a missing or locked store, damaged metadata reported without a panic, and a process killed at
//! many points leaving a consistent store.
#![allow(missing_docs)]

use std::path::Path;
use std::process::Command;

mod common;
use common::*;

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
        let head = read_target(&e, "v", 0, SIZE as u64);
        let (a, b) = (tagged(1, SIZE), tagged(2, SIZE));
        for (i, got) in head.chunks(4096).enumerate() {
            let r = i * 4096..(i + 1) * 4096;
            assert!(
                got == &a[r.clone()] || got == &b[r],
                "block {i} of the head after a write killed at {delay:?} is neither old nor new"
            );
        }
        assert!(
            read_target(&e, "v@old", 0, SIZE as u64) == a,
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
                read_target(&e, &name, 0, SIZE as u64) == tagged(tag, SIZE),
                "checkpoint c{round} kept after a delete killed at {delay:?} lost data"
            );
            ok(&e, &["checkpoint", "delete", &name]);
        }
        assert!(read_target(&e, "v@old", 0, SIZE as u64) == tagged(1, SIZE));
        assert!(read_target(&e, "v", 0, SIZE as u64) == tagged(2, SIZE));
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
