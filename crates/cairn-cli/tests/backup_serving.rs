//! Backups served where they lie: `backup mount` (read-only NBD exports read from the
//! repository, checked with qemu-img and qemu-io) and `backup restore --live` (a volume usable at
//! once, filled behind its clients; a daemon killed half-way and the restore resumed).

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Every `cairn` these tests run opens the repository with this passphrase.
fn with_passphrase() {
    std::env::set_var("CAIRN_BACKUP_PASSPHRASE", "serving test");
}

/// `len` bytes no compressor shrinks, as a file the CLI writes from.
fn noise_file(e: &Env, name: &str, len: usize, seed: u64) -> String {
    let f = e.work.join(name);
    std::fs::write(&f, noise(len, seed)).expect("data file");
    f.display().to_string()
}

/// Volume `web` (32 MiB) with 12 MiB of data in three places and a hole, its checkpoint
/// `web@one`, an encrypted repository `repo` registered as the default, and a backup of the
/// checkpoint. Returns the backup's id.
fn backed_up(e: &Env) -> String {
    ok(e, &["volume", "create", "web", "--size", "32M"]);
    for (at, seed) in [("0", 1), ("12M", 2), ("28M", 3)] {
        let f = noise_file(e, &format!("d{seed}"), 4 << 20, seed);
        ok(e, &["volume", "write", "web", "--offset", at, "--from", &f]);
    }
    ok(e, &["checkpoint", "create", "web@one"]);
    let repo = e.work.join("repo").display().to_string();
    ok(e, &["backup", "init", &repo]);
    ok(e, &["backup", "repo", "add", "main", &repo]);
    let b = json(e, &["backup", "create", "web@one"]);
    b["id"].as_str().expect("id").to_string()
}

fn daemon(e: &Env) -> &Daemon {
    e.daemon.as_ref().expect("a daemon")
}

/// Whether two NBD exports hold the same bytes, by `qemu-img compare`.
fn same(a: &str, b: &str) -> bool {
    let o = output(
        "qemu-img",
        &["compare", "-q", "-f", "raw", "-F", "raw", a, b],
    );
    o.status.success()
}

/// Waits until `backup live` lists nothing.
fn wait_live_done(e: &Env) {
    let t = Instant::now();
    loop {
        let l = json(e, &["backup", "live"]);
        if l.as_array().is_some_and(Vec::is_empty) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "still live: {l}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A mounted backup is an NBD export that reads exactly the checkpoint it was taken of
/// (qemu-img compares them byte for byte) and refuses writes; unmounting ends it; without a
/// daemon, mounting says what is needed; an unknown backup is named.
#[test]
fn a_mounted_backup_serves_its_checkpoint_over_nbd() {
    with_passphrase();
    let e = env_with_daemon();
    let id = backed_up(&e);
    let m = json(&e, &["backup", "mount", &id[..8]]);
    let export = m[0]["export"].as_str().expect("export");
    assert_eq!(export, format!("backup:{id}"), "{m}");
    let uri = m[0]["uri"].as_str().expect("uri").to_string();
    assert!(
        same(&uri, &daemon(&e).uri("web@one")),
        "the mount reads as the checkpoint"
    );
    let listed = ok(&e, &["backup", "mounts"]);
    assert!(listed.contains(export), "{listed}");
    let w = output("qemu-io", &["-f", "raw", "-c", "write 0 4k", &uri]);
    let said = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success() || said.contains("ermission") || said.contains("read-only"),
        "a write to a mounted backup is refused: {said}"
    );
    fails(&e, &["backup", "mount", "ffffffff"], "ffffffff");
    ok(&e, &["backup", "unmount", &id[..8]]);
    assert!(!same(&uri, &daemon(&e).uri("web@one")), "unmounted");
    fails(&e, &["backup", "unmount", &id[..8]], "no mounted backup");

    let plain = env();
    fails(&plain, &["backup", "mount", &id], "cairn serve");
}

/// A live restore makes the volume usable at once: a client writes into it while the rest is
/// still being copied (the background copy held to 1 MiB/s), a daemon killed with -9 half-way
/// serves what was filled and refuses the rest with a clear error, the same command resumes it,
/// and the finished volume is the backup with the client's write on top.
#[test]
fn a_live_restore_is_usable_at_once_and_survives_a_killed_daemon() {
    with_passphrase();
    let mut e = env_with_daemon();
    let id = backed_up(&e);
    let args = [
        "backup",
        "restore",
        &id,
        "--to",
        "back",
        "--live",
        "--rate-limit",
        "1M",
    ];
    let r = json(&e, &args);
    assert!(
        r["next"]
            .as_str()
            .unwrap_or_default()
            .contains("usable now"),
        "{r}"
    );
    let uri = daemon(&e).uri("back");
    // Written at once, into the part the background copy reaches last.
    let w = output(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 28M 64k",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    let live = json(&e, &["backup", "live"]);
    assert_eq!(live[0]["volume"], "back", "{live}");
    assert_eq!(live[0]["state"], "copying", "{live}");
    let refused = fails_json(&e, &["checkpoint", "create", "back@early"]);
    assert_eq!(refused, "state");

    // A power cut of the daemon: what was filled is served, the rest waits for the command.
    e.daemon.as_mut().expect("daemon").signal("-KILL");
    e.daemon = Some(Daemon::start(&e));
    let live = json(&e, &["backup", "live"]);
    assert_eq!(live[0]["state"], "stalled", "{live}");
    let r = output(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read 13M 64k",
            &daemon(&e).uri("back"),
        ],
    );
    let said = String::from_utf8_lossy(&r.stdout).to_string() + &String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() || said.contains("error"),
        "an unfilled range is refused while stalled: {said}"
    );
    let again = json(&e, &args);
    assert!(
        again["next"]
            .as_str()
            .unwrap_or_default()
            .contains("goes on"),
        "{again}"
    );
    wait_live_done(&e);

    // The backup, with the client's write over it.
    let d = daemon(&e);
    let cmp = output(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0x5a 28M 64k",
            &d.uri("back"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&cmp.stdout).contains("read 65536/65536"),
        "the client's write survived: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    ok(
        &e,
        &[
            "volume",
            "write",
            "web",
            "--offset",
            "28M",
            "--pattern",
            "0x5a",
            "--length",
            "64K",
        ],
    );
    assert!(
        same(&d.uri("back"), &d.uri("web")),
        "the rest is the backup"
    );
    assert!(!e.store.join("backup/live/back.json").exists());
    ok(&e, &["checkpoint", "create", "back@done"]);
    fsck_clean(&e);
}

/// Bad input: --live onto a volume that exists, into a file, or without a daemon.
#[test]
fn live_restore_bad_input() {
    with_passphrase();
    let e = env_with_daemon();
    let id = backed_up(&e);
    fails(
        &e,
        &["backup", "restore", &id, "--to", "web", "--live"],
        "'web'",
    );
    let file = e.work.join("x.raw").display().to_string();
    let o = cairn(
        &e,
        &["backup", "restore", &id, "--to-file", &file, "--live"],
    );
    assert!(!o.status.success(), "--live takes no --to-file");
    let o = cairn(
        &e,
        &["backup", "restore", &id, "--to", "y", "--rate-limit", "1M"],
    );
    assert!(!o.status.success(), "--rate-limit goes with --live");
    let plain = env();
    fails(
        &plain,
        &["backup", "restore", &id, "--to", "x", "--live"],
        "cairn serve",
    );
}
