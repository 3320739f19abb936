//! Backups of VMs with a real QEMU and the test guest: a VM backup restores as a new VM that
//! resumes, and a live restore runs the VM before its disk is copied.
#![allow(missing_docs)]

mod common;
use common::guest::*;
use common::*;

/// Running VM `g1` (disk `d1`) with a standard checkpoint `g1@m1` backed up into an encrypted
/// repository (the daemon runs): the backup, the counter its disk holds, the repository and the
/// key-file flags.
fn backed_up_vm(e: &Env) -> (serde_json::Value, u64, String, [String; 2]) {
    ok(e, &["volume", "create", "d1", "--size", "64M"]);
    define(e, "g1", &["d1"]);
    ok(e, &["vm", "start", "g1"]);
    wait_console(e, "g1", "cairn-counter 00000003", 90);
    let cp = json(e, &["checkpoint", "create", "g1@m1"]);
    assert_eq!(cp["kind"], "standard", "{cp}");
    let at = counter_in(e, "d1@m1");
    let key = e.work.join("key");
    std::fs::write(&key, "vm backup pass\n").expect("key");
    let repo = e.work.join("repo").display().to_string();
    let k = ["--key-file".to_string(), key.display().to_string()];
    ok(e, &["backup", "init", &repo, &k[0], &k[1]]);
    let b = json(
        e,
        &["backup", "create", "g1@m1", "--repo", &repo, &k[0], &k[1]],
    );
    (b, at, repo, k)
}

/// A backup of a standard VM checkpoint holds the disks, the memory state and the definition:
/// restored as a new VM with a fresh identity, its checkpoint resumes the guest where it was
/// (the counter goes on from the value the backed-up disk holds), without a boot.
#[test]
fn a_vm_backup_restores_as_a_new_vm_that_resumes() {
    let e = env();
    let _d = Daemon::start(&e);
    let (b, at, repo, k) = backed_up_vm(&e);
    assert_eq!(b["kind"], "vm", "{b}");
    assert_eq!(
        b["images"].as_array().map(Vec::len),
        Some(2),
        "disk and memory: {b}"
    );
    ok(&e, &["vm", "kill", "g1"]);

    let id = b["id"].as_str().expect("id");
    let r = json(
        &e,
        &[
            "backup", "restore", id, "--to", "g2", "--repo", &repo, &k[0], &k[1],
        ],
    );
    assert!(
        r["next"]
            .as_str()
            .unwrap_or_default()
            .contains("checkpoint apply g2@m1"),
        "{r}"
    );
    let (g1, g2) = (
        json(&e, &["vm", "info", "g1"]),
        json(&e, &["vm", "info", "g2"]),
    );
    assert_eq!(g2["disks"], serde_json::json!(["g2-d1"]), "{g2}");
    assert_ne!(g1["mac"], g2["mac"], "a fresh MAC");
    assert_ne!(g1["uuid"], g2["uuid"], "a fresh machine UUID");
    assert_eq!(g1["memory"], g2["memory"]);
    assert_eq!(counter_in(&e, "g2-d1"), at, "the disk is the checkpoint's");
    let listed = json(&e, &["checkpoint", "list", "g2"]);
    assert!(listed.to_string().contains("\"m1\""), "{listed}");

    let applied = json(&e, &["checkpoint", "apply", "g2@m1"]);
    assert_eq!(applied["vm"], "started-from-memory", "{applied}");
    let first = first_counter_after(&e, "g2", 0);
    assert!(
        first == at + 1 || first == at + 2,
        "g2 resumed at {first}; the backed-up disk had {at}"
    );
    ok(&e, &["vm", "kill", "g2"]);
    fsck_clean(&e);
}

/// A VM backup restored live: the new VM runs at once, resumed from the backed-up memory, while
/// its disk is still being copied in (held to 1 MiB/s); the guest's counter goes on from the
/// backed-up value, and once the copy ends the disk holds what the guest wrote since.
#[test]
fn a_vm_backup_restored_live_runs_before_its_disk_is_copied() {
    let e = env();
    let _d = Daemon::start(&e);
    let (b, at, repo, k) = backed_up_vm(&e);
    ok(&e, &["vm", "kill", "g1"]);

    let id = b["id"].as_str().expect("id");
    let r = json(
        &e,
        &[
            "backup",
            "restore",
            id,
            "--to",
            "g3",
            "--live",
            "--rate-limit",
            "1M",
            "--repo",
            &repo,
            &k[0],
            &k[1],
        ],
    );
    assert!(
        r["next"].as_str().unwrap_or_default().contains("runs"),
        "{r}"
    );
    let status = json(&e, &["vm", "status", "g3"]);
    assert_eq!(status["state"], "running", "{status}");
    let first = first_counter_after(&e, "g3", 0);
    assert!(
        first == at + 1 || first == at + 2,
        "g3 resumed at {first}; the backed-up disk had {at}"
    );
    let t = std::time::Instant::now();
    while !json(&e, &["backup", "live"])
        .as_array()
        .is_some_and(Vec::is_empty)
    {
        assert!(
            t.elapsed().as_secs() < 120,
            "the disk is still being copied"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let seen = ok(&e, &["vm", "console", "g3"]).len();
    let later = first_counter_after(&e, "g3", seen);
    // The guest prints each counter before it writes and syncs it: once the next one is
    // printed, this one is on the disk.
    let seen = ok(&e, &["vm", "console", "g3"]).len();
    first_counter_after(&e, "g3", seen);
    ok(&e, &["vm", "kill", "g3"]);
    assert!(
        counter_in(&e, "g3-d1") >= later,
        "the disk holds what the guest wrote while it was filled"
    );
    fsck_clean(&e);
}
