//! The lifecycle as `cairn serve` runs it: a real daemon on a two-second schedule with
//! retention, `cairn events`, a restart that makes its missed run once, and the floor of free
//! space on a small loop-mounted file system made by the test: below it checkpoints are refused,
//! the daemon deletes automatic checkpoints while a client keeps writing, and every write lands.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn events(e: &Env) -> Vec<serde_json::Value> {
    json(e, &["events", "--limit", "100000"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn of_kind(e: &Env, kind: &str) -> Vec<serde_json::Value> {
    events(e)
        .into_iter()
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// Waits until `check` holds (polling), or fails with what `what` says after `secs`.
fn wait_for(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let t = Instant::now();
    while !check() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn automatic_names(e: &Env, volume: &str) -> Vec<String> {
    checkpoints(e, volume)
        .iter()
        .filter(|c| c["automatic"] == true)
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_daemon_runs_a_two_second_schedule_and_resumes_after_a_restart() {
    let mut e = env_with_daemon();
    ok(&e, &["volume", "create", "v", "--size", "4M"]);
    ok(&e, &["checkpoint", "create", "v@mine"]);
    ok(
        &e,
        &["policy", "set", "v", "--every", "2s", "--keep-last", "2"],
    );
    wait_for(30, "five policy checkpoints", || {
        of_kind(&e, "created").len() >= 5
    });
    let names = automatic_names(&e, "v");
    assert!(
        names.len() <= 3,
        "keep-last 2 (and one just taken): {names:?}"
    );
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("auto-20") && n.ends_with('Z')),
        "{names:?}"
    );
    let pruned = of_kind(&e, "pruned");
    assert!(pruned.len() >= 2, "{pruned:?}");
    assert!(pruned[0]["bytes"].is_u64(), "{}", pruned[0]);
    let plain = ok(&e, &["events"]);
    assert!(plain.contains("taken by its policy"), "{plain}");
    assert!(
        plain.contains("no keep rule of the policy keeps it"),
        "{plain}"
    );
    let manual = json(&e, &["checkpoint", "list", "v"]).to_string();
    assert!(
        manual.contains("\"mine\""),
        "a manual checkpoint is left alone"
    );

    // Down for three slots: the first run after the restart is at once, and the next one a
    // whole interval after it, not three runs in a row.
    let mut d = e.daemon.take().expect("daemon");
    d.signal("-TERM");
    let before = of_kind(&e, "created").len();
    std::thread::sleep(Duration::from_secs(6));
    e.daemon = Some(Daemon::start(&e));
    wait_for(20, "two runs after the restart", || {
        of_kind(&e, "created").len() >= before + 2
    });
    let created = of_kind(&e, "created");
    let t = |i: usize| created[i]["time_ms"].as_u64().expect("time");
    let gap = t(before + 1) - t(before);
    assert!(
        gap >= 1_900,
        "runs after a restart {gap} ms apart: {created:?}"
    );
    let last_before = t(before - 1);
    assert!(
        t(before) - last_before >= 6_000,
        "the missed run made after the restart"
    );
    fsck_clean(&e);
}

/// A file system of `mib` MiB in an image under `work`, loop-mounted at `work/mnt`; unmounted
/// when dropped.
struct LoopFs {
    mnt: PathBuf,
}

impl LoopFs {
    fn new(work: &Path, mib: u64) -> LoopFs {
        let img = work.join("fs.img");
        let f = std::fs::File::create(&img).expect("image");
        f.set_len(mib << 20).expect("size");
        run("mkfs.ext4", &["-q", "-F", img.to_str().expect("utf8")]);
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).expect("mnt");
        run(
            "mount",
            &[
                "-o",
                "loop",
                img.to_str().expect("utf8"),
                mnt.to_str().expect("utf8"),
            ],
        );
        LoopFs { mnt }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

fn floor_status(e: &Env) -> (u64, u64) {
    let f = json(e, &["policy", "floor"]);
    (
        f["free_bytes"].as_u64().expect("free"),
        f["floor_bytes"].as_u64().expect("floor"),
    )
}

/// On a small file system, a client rewrites a volume whose policy checkpoint holds all of it,
/// more than the disk has free: below the floor new checkpoints are refused (and a pinned
/// automatic checkpoint stays), once unpinned the daemon deletes it, and every write lands. Then
/// a budget: over it, the next policy checkpoint is skipped.
#[test]
fn below_the_floor_checkpoints_are_refused_and_automatic_ones_make_room() {
    let work = tempfile::tempdir().expect("tmp");
    let fs = LoopFs::new(work.path(), 640);
    let mut e = env_at(fs.mnt.join("store"));
    e.daemon = Some(Daemon::start(&e));
    const DATA: u64 = 256 << 20;
    ok(&e, &["volume", "create", "v", "--size", "256M"]);
    let uri = e.daemon.as_ref().expect("daemon").uri("v");
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 256M", &uri],
    );
    ok(&e, &["policy", "set", "v", "--every", "1h"]);
    wait_for(20, "the policy checkpoint", || {
        !of_kind(&e, "created").is_empty()
    });
    let auto = automatic_names(&e, "v");
    assert_eq!(auto.len(), 1, "{auto:?}");
    ok(&e, &["checkpoint", "pin", &format!("v@{}", auto[0])]);
    let (free, _) = floor_status(&e);
    assert!(
        free < DATA && free > 160 << 20,
        "the test needs less free space than the volume holds, and some: {free}"
    );
    // The floor sits 64 MiB under the free space: crossed early in the rewrite.
    let floor = format!("{}M", (free >> 20) - 64);
    ok(&e, &["policy", "floor", &floor]);

    // Pinned, the checkpoint holds on: the first 96 MiB of the rewrite land (the disk has room),
    // free space is under the floor, a new checkpoint is refused, and the daemon warns.
    let first = run("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 96M", &uri]);
    assert!(!first.contains("failed"), "{first}");
    let (free, floor) = floor_status(&e);
    assert!(free < floor, "under the floor: {free} < {floor}");
    let refused = cairn(&e, &["--json", "checkpoint", "create", "v@more"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stdout);
    assert!(err.contains("no_space") && err.contains("floor"), "{err}");
    wait_for(10, "the floor warning", || {
        !of_kind(&e, "warning").is_empty()
    });

    // Unpinned, it goes while the client keeps writing: the whole rewrite, at about 20 MiB/s
    // from here, needs more than the disk had free, and every write lands.
    ok(&e, &["checkpoint", "unpin", &format!("v@{}", auto[0])]);
    let mut script = Vec::new();
    for off in (96..256).step_by(8) {
        script.push("-c".to_string());
        script.push(format!("write -P 0x22 {off}M 8M"));
        script.push("-c".to_string());
        script.push("sleep 400".to_string());
    }
    let mut args: Vec<&str> = vec!["-f", "raw"];
    args.extend(script.iter().map(String::as_str));
    args.push(&uri);
    let o = output("qemu-io", &args);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && !out.contains("failed"), "{out}");
    let reclaimed = of_kind(&e, "reclaimed");
    assert_eq!(reclaimed.len(), 1, "{reclaimed:?}");
    assert_eq!(reclaimed[0]["checkpoint"], auto[0].as_str());
    // It held what had been rewritten by then: at least the first 96 MiB.
    let freed = reclaimed[0]["bytes"].as_u64().expect("bytes");
    assert!(freed >= 96 << 20, "{freed}");
    let check = run("qemu-io", &["-f", "raw", "-c", "read -P 0x22 0 256M", &uri]);
    assert!(!check.contains("Pattern verification failed"), "{check}");
    // With room again, checkpoints are taken.
    wait_for(10, "free space above the floor", || {
        let (free, floor) = floor_status(&e);
        free >= floor
    });
    ok(&e, &["checkpoint", "create", "v@more"]);

    // A budget on the same file system: once the checkpoints hold more than it, the next policy
    // checkpoint is skipped with the reason.
    ok(
        &e,
        &[
            "policy",
            "set",
            "v",
            "--every",
            "2s",
            "--keep-last",
            "100",
            "--budget",
            "8M",
        ],
    );
    let created = of_kind(&e, "created").len();
    wait_for(20, "a policy checkpoint", || {
        of_kind(&e, "created").len() > created
    });
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 16M", &uri]);
    wait_for(20, "a checkpoint skipped over the budget", || {
        of_kind(&e, "skipped").iter().any(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("over its budget of 8.0 MiB"))
        })
    });
    fsck_clean(&e);
    drop(e);
    drop(fs);
}

/// A policy that backs each of its checkpoints up: the daemon reads the passphrase from the key
/// file the repository was registered with; a repository it cannot open is a logged failure, and
/// the checkpoints go on.
#[test]
fn scheduled_backups_use_the_registered_key_file_and_failures_are_events() {
    let e = env_with_daemon();
    let key = e.work.join("key");
    std::fs::write(&key, "correct horse\n").expect("key");
    let (repo, key) = (
        e.work.join("repo").display().to_string(),
        key.display().to_string(),
    );
    ok(&e, &["backup", "init", &repo, "--key-file", &key]);
    ok(
        &e,
        &["backup", "repo", "add", "r", &repo, "--key-file", &key],
    );
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
            "0x5a",
            "--length",
            "1M",
        ],
    );
    ok(
        &e,
        &[
            "policy",
            "set",
            "v",
            "--every",
            "2s",
            "--keep-last",
            "2",
            "--backup-to",
            "r",
        ],
    );
    wait_for(30, "two scheduled backups", || {
        of_kind(&e, "backup_done").len() >= 2
    });
    let listed = json(&e, &["backup", "list", "--repo", "r", "--key-file", &key]);
    let n = listed["backups"]
        .as_array()
        .or(listed.as_array())
        .map_or(0, Vec::len);
    assert!(n >= 2, "{listed}");
    // The key file gone: the next backups fail with a reason, and checkpoints go on.
    std::fs::remove_file(&key).expect("rm");
    let created = of_kind(&e, "created").len();
    wait_for(30, "a failed scheduled backup", || {
        !of_kind(&e, "backup_failed").is_empty()
    });
    let failed = of_kind(&e, "backup_failed");
    let msg = failed[0]["message"].as_str().expect("message");
    assert!(
        msg.contains("key file") && msg.contains("backup of v@auto-"),
        "{msg}"
    );
    wait_for(10, "checkpoints after the failure", || {
        of_kind(&e, "created").len() > created + 1
    });
    fsck_clean(&e);
}
