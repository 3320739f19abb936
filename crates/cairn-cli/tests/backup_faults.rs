//! `cairn backup ...` when things go wrong part-way: a backup or restore killed at several moments,
//! cancelled with Ctrl-C, a restore onto a full disk, a killed GC or prune. Nothing half-made is
//! ever kept and the repository verifies clean afterwards.
#![allow(missing_docs)]

use std::process::Stdio;
use std::time::Duration;

mod common;
use common::backups::*;
use common::*;

/// `cairn backup create` and `restore` killed with SIGKILL at several moments: no backup shows
/// up half-made, the repository verifies clean, no partial volume takes the name asked for, and
/// the next backup and restore work.
#[test]
fn a_killed_backup_or_restore_leaves_nothing_half_made() {
    let e = env();
    let r = volume_and_repo(&e, "big", "256M", &data(192 << 20, 2246822519, 11));
    let k = ["--key-file", r.key.as_str()];
    ok(&e, &["backup", "repo", "add", "r", &r.dir]);
    for delay in [300, 900, 1500] {
        let mut child = command(&e, &["backup", "create", "big@a", k[0], k[1]])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        let v = json(&e, &["backup", "verify", k[0], k[1]]);
        assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
        fsck_clean(&e);
    }
    let b = json(&e, &["backup", "create", "big@a", k[0], k[1]]);
    let id = b["id"].as_str().expect("id").to_string();
    for delay in [200, 700] {
        let mut child = command(&e, &["backup", "restore", &id, "--to", "back", k[0], k[1]])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        let vols = ok(&e, &["volume", "list"]);
        let done = vols
            .lines()
            .any(|l| l.split_whitespace().next() == Some("back"));
        if done {
            assert!(contents(&e, "back", 256 << 20) == contents(&e, "big@a", 256 << 20));
            ok(&e, &["volume", "delete", "back", "--yes"]);
        }
    }
    ok(&e, &["backup", "restore", &id, "--to", "back", k[0], k[1]]);
    assert!(contents(&e, "back", 256 << 20) == contents(&e, "big@a", 256 << 20));
    let vols = ok(&e, &["volume", "list"]);
    assert!(
        !vols.contains("restoring"),
        "the killed restores' partial volume is gone: {vols}"
    );
    fsck_clean(&e);
}

/// The daemon's jobs, as its control socket lists them.
fn daemon_jobs(e: &Env) -> serde_json::Value {
    let socket = e.store.join("control.sock");
    let out = run(
        "curl",
        &[
            "-sf",
            "--unix-socket",
            &socket.display().to_string(),
            "http://cairn/api/v1/jobs",
        ],
    );
    serde_json::from_str(&out).expect("jobs JSON")
}

/// Ctrl-C on `cairn backup create` run by a daemon cancels the daemon's job: the command says
/// so and fails, no backup is listed, the checkpoint it read is free at once, and the
/// repository verifies clean.
#[test]
fn ctrl_c_cancels_a_backup_the_daemon_runs() {
    // Incompressible data, written before the daemon starts (writing is quicker without it),
    // so the backup copies for a while.
    let mut e = env();
    let r = volume_and_repo(&e, "big", "384M", &noise(384 << 20, 29));
    let k = ["--key-file", r.key.as_str()];
    ok(&e, &["backup", "repo", "add", "r", &r.dir]);
    e.daemon = Some(Daemon::start(&e));
    let child = command(&e, &["backup", "create", "big@a", k[0], k[1]])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = std::time::Instant::now();
    loop {
        let jobs = daemon_jobs(&e);
        let job = jobs.as_array().and_then(|j| j.last()).cloned();
        if let Some(job) = job.filter(|j| j["op"] == "backup") {
            assert_eq!(
                job["status"]["state"], "running",
                "it ended too soon: {job}"
            );
            if job["progress"].as_u64().unwrap_or(0) > 0 {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{jobs}");
        std::thread::sleep(Duration::from_millis(10));
    }
    run("kill", &["-INT", &child.id().to_string()]);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cancelled"), "{err}");
    let jobs = daemon_jobs(&e);
    let last = jobs.as_array().and_then(|j| j.last()).expect("a job");
    assert_eq!(last["status"]["state"], "cancelled", "{last}");
    let list = json(&e, &["backup", "list", k[0], k[1]]);
    assert_eq!(list, serde_json::json!([]), "{list}");
    let v = json(&e, &["backup", "verify", k[0], k[1]]);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
    ok(&e, &["checkpoint", "delete", "big@a", "--yes"]);
    fsck_clean(&e);
}

/// Unmounts a test file system when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A restore onto a file system too small for it fails with a clear `no_space` error and leaves
/// neither the file nor its partial copy behind; the same restore elsewhere then works.
#[test]
fn a_restore_onto_a_full_disk_fails_clearly_and_leaves_nothing() {
    let e = env();
    let r = volume_and_repo(&e, "v", "16M", &data(12 << 20, 2246822519, 3));
    let k = ["--key-file", r.key.as_str()];
    let id = json(
        &e,
        &["backup", "create", "v@a", "--repo", &r.dir, k[0], k[1]],
    )["id"]
        .as_str()
        .expect("id")
        .to_string();
    let small = e.work.join("small");
    std::fs::create_dir_all(&small).expect("mount point");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "mounting a 4 MiB tmpfs for this test needs root"
    );
    let _m = Mount(small.clone());
    let out = small.join("v.raw");
    let args = [
        "backup",
        "restore",
        &id,
        "--to-file",
        out.to_str().expect("utf8"),
        "--repo",
        &r.dir,
        k[0],
        k[1],
    ];
    assert_eq!(fails_json(&e, &args), "no_space");
    fails(&e, &args, "full");
    let left: Vec<_> = std::fs::read_dir(&small).expect("ls").flatten().collect();
    assert!(
        left.is_empty(),
        "nothing is left on the full disk: {left:?}"
    );
    let elsewhere = e.work.join("v.raw");
    let args = [
        "backup",
        "restore",
        &id,
        "--to-file",
        elsewhere.to_str().expect("utf8"),
        "--repo",
        &r.dir,
        k[0],
        k[1],
    ];
    ok(&e, &args);
    assert!(std::fs::read(&elsewhere).expect("restored") == contents(&e, "v@a", 16 << 20));
}

/// `backup gc` and `backup prune` killed with SIGKILL at several moments: the repository verifies
/// clean after each, every backup the prune kept restores byte-identical, and the next runs
/// finish the work.
#[test]
fn a_killed_gc_or_prune_loses_nothing() {
    let e = env();
    let dir = e.work.join("repo").display().to_string();
    ok(&e, &["volume", "create", "v", "--size", "32M"]);
    ok(&e, &["backup", "init", &dir, "--no-encryption"]);
    ok(&e, &["backup", "repo", "add", "r", &dir]);
    for i in 0..6u32 {
        write_from(&e, "v", "0", &data(16 << 20, 2654435761 + 2 * i, 5));
        ok(&e, &["checkpoint", "create", &format!("v@c{i}")]);
        ok(&e, &["backup", "create", &format!("v@c{i}")]);
    }
    let prune = ["backup", "prune", "--keep-last", "2", "--yes"];
    let gc = ["backup", "gc", "--grace", "0"];
    let kill_at = |args: &[&str], ms: u64| {
        let mut child = command(&e, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill();
        let _ = child.wait();
    };
    let check = |e: &Env| {
        let v = json(e, &["backup", "verify"]);
        assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
    };
    kill_at(&prune, 15);
    check(&e);
    ok(&e, &prune);
    for ms in [5, 15, 30, 60, 120] {
        kill_at(&gc, ms);
        check(&e);
    }
    ok(&e, &gc);
    ok(&e, &gc);
    check(&e);
    let list = json(&e, &["backup", "list"]);
    let kept: Vec<(String, String)> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|b| {
            (
                b["id"].as_str().expect("id").into(),
                b["checkpoint"].as_str().expect("cp").into(),
            )
        })
        .collect();
    assert_eq!(kept.len(), 2, "{list}");
    for (id, cp) in kept {
        ok(&e, &["backup", "restore", &id, "--to", &format!("r-{cp}")]);
        assert!(
            contents(&e, &format!("r-{cp}"), 32 << 20)
                == contents(&e, &format!("v@{cp}"), 32 << 20)
        );
    }
}
