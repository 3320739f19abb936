//! Checkpoints of VMs with a real QEMU and the test guest: disk-only ones cover every disk at one
//! instant and are application-consistent when the guest agent answers, standard ones resume the
//! guest where it was, a QEMU killed mid-checkpoint leaves all or nothing, and a VM checkpoint is
//! one object that nothing breaks apart.
#![allow(missing_docs)]

mod common;
use common::guest::*;
use common::*;

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[test]
fn disk_checkpoints_of_a_running_vm_cover_every_disk_at_one_instant() {
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "64M"]);
    ok(&e, &["volume", "create", "d2", "--size", "16M"]);
    define(&e, "g1", &["d1", "d2"]);
    // On a stopped VM, a checkpoint is disk-only and needs no daemon.
    ok(
        &e,
        &[
            "checkpoint",
            "create",
            "g1@blank",
            "-m",
            "before first boot",
        ],
    );
    let d = Daemon::start(&e);
    ok(&e, &["vm", "start", "g1"]);
    wait_console(&e, "g1", "cairn-counter 00000003", 90);
    ok(&e, &["checkpoint", "create", "g1@c1", "--disk-only"]);
    // Both disks at one instant: the guest writes d1 then d2 each second, so d2 may trail d1 by
    // one tick but never more, and never lead.
    let (a, b) = (counter_in(&e, "d1@c1"), counter_in(&e, "d2@c1"));
    // The console line comes before the disk write of the same tick, hence 2, not 3.
    assert!(a >= 2 && (a == b || a == b + 1), "d1@c1 = {a}, d2@c1 = {b}");
    assert!(d.log().contains("guest paused"), "{}", d.log());
    // The guest kept running after the pause.
    wait_console(&e, "g1", &format!("cairn-counter {:08}", a + 2), 60);
    let list = json(&e, &["checkpoint", "list", "g1"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, vec!["blank", "c1"]);
    assert!(ok(&e, &["checkpoint", "list", "g1", "--tree"]).contains("c1"));
    fails(&e, &["checkpoint", "create", "g1@c1"], "already exists");
    fails(&e, &["checkpoint", "apply", "g1@nosuch"], "not found");
    // A damaged checkpoint is refused before the running VM is touched.
    let pid = json(&e, &["vm", "status", "g1"])["pid"].clone();
    let record = e.store.join("vms/g1/checkpoints/blank.json");
    let good = std::fs::read_to_string(&record).expect("record");
    std::fs::write(&record, good.replace("\"d2\"", "\"gone\"")).expect("damage");
    fails(&e, &["checkpoint", "apply", "g1@blank"], "is missing");
    std::fs::write(&record, good).expect("repair");
    let st = json(&e, &["vm", "status", "g1"]);
    assert_eq!(
        (&st["state"], &st["pid"]),
        (&"running".into(), &pid),
        "{st}"
    );
    // Applying to the running VM discards the run and boots the checkpoint's disks cold.
    let ups = |log: &str| log.matches("cairn-guest: up").count();
    let before = ups(&ok(&e, &["vm", "console", "g1"]));
    let r = json(
        &e,
        &["checkpoint", "apply", "g1@c1", "--save-current", "later"],
    );
    assert_eq!(r["vm"], "cold-boot", "{r}");
    assert_eq!(r["saved_as"], "later", "{r}");
    assert_eq!(json(&e, &["vm", "status", "g1"])["state"], "running");
    let t = Instant::now();
    while ups(&ok(&e, &["vm", "console", "g1"])) == before {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no cold boot after apply"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The cold-booted guest has written its disk, so the run differs from c1...
    while counter_in(&e, "d1") == a {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the guest wrote nothing after its cold boot"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...and stopped, an apply keeps it as an automatic checkpoint and leaves exactly the
    // checkpoint's bytes on every disk.
    ok(&e, &["vm", "kill", "g1"]);
    let r = json(&e, &["checkpoint", "apply", "g1@c1"]);
    assert_eq!(
        (&r["vm"], &r["saved_automatically"]),
        (&"stopped".into(), &true.into()),
        "{r}"
    );
    assert_eq!(counter_in(&e, "d1"), a);
    assert_eq!(counter_in(&e, "d2"), b);
    ok(&e, &["checkpoint", "rename", "g1@later", "newer"]);
    let r = json(&e, &["checkpoint", "apply", "g1@newer"]);
    assert_eq!(
        r["vm"], "started-from-memory",
        "newer is a standard checkpoint: {r}"
    );
    assert!(counter_in(&e, "d1") > a, "the newer branch is still there");
    // A VM clone: every disk cloned, a fresh MAC and machine identity, and it boots.
    let g2 = json(&e, &["clone", "g1@c1", "g2"]);
    let g1 = json(&e, &["vm", "info", "g1"]);
    assert_eq!(g2["disks"], serde_json::json!(["g2-d1", "g2-d2"]));
    assert_ne!(g2["mac"], g1["mac"]);
    assert_ne!(g2["uuid"], g1["uuid"]);
    assert_eq!(counter_in(&e, "g2-d1"), a);
    ok(&e, &["vm", "start", "g2"]);
    wait_console(&e, "g2", "cairn-counter 00000001", 90);
    ok(&e, &["vm", "kill", "g2"]);
    fails(&e, &["clone", "g1@c1", "g2"], "already exists");
    // A checkpoint of another VM (g1's) cannot be applied to the clone.
    fails(&e, &["checkpoint", "apply", "g2@blank"], "not found");
    // g1 runs (resumed from newer): its running state is kept as a standard checkpoint.
    let r = json(&e, &["checkpoint", "apply", "g1@blank"]);
    assert_eq!(
        (&r["vm"], &r["saved_automatically"]),
        (&"cold-boot".into(), &true.into()),
        "{r}"
    );
    let run = json(&e, &["vm", "status", "g1"]);
    ok(&e, &["vm", "kill", "g1"]);
    assert_eq!(run["state"], "running");
    ok(
        &e,
        &["checkpoint", "apply", "g1@blank", "--discard-current"],
    );
    assert_eq!(counter_in(&e, "d1"), 0);
    // Delete removes every disk's checkpoint; the others stay.
    ok(&e, &["checkpoint", "delete", "g1@c1"]);
    // The clone does not depend on the checkpoint it came from.
    assert!(counter_in(&e, "g2-d1") > 0);
    fails(
        &e,
        &["volume", "read", "d1@c1", "--offset", "0", "--length", "1"],
        "not found",
    );
    // Left: blank, newer, and the automatic checkpoints of the two runs applies replaced: the
    // stopped one of c1's cold boot (disk-only), the running one of newer (standard).
    let list = json(&e, &["checkpoint", "list", "g1"]);
    let auto: Vec<&serde_json::Value> = list
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["automatic"] == true)
        .collect();
    assert_eq!(list.as_array().map(|a| a.len()), Some(4), "{list}");
    let kinds: Vec<&serde_json::Value> = auto.iter().map(|c| &c["kind"]).collect();
    assert_eq!(kinds, ["disk-only", "standard"], "{list}");
    drop(d);
    fsck_clean(&e);
}

#[test]
fn standard_checkpoint_resumes_the_guest_where_it_was() {
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "64M"]);
    define(&e, "g1", &["d1"]);
    let d = Daemon::start(&e);
    ok(&e, &["vm", "start", "g1"]);
    wait_console(&e, "g1", "cairn-counter 00000003", 90);
    // A standard checkpoint: disks plus memory, taken while the guest keeps running.
    let cp = json(&e, &["checkpoint", "create", "g1@m1"]);
    assert_eq!(cp["kind"], "standard", "{cp}");
    // Its size counts its memory: disks + memory = total.
    let memory = cp["memory_referenced"].as_u64().expect("memory");
    assert!(memory > 16 << 20, "{cp}");
    assert_eq!(
        cp["referenced"].as_u64(),
        Some(cp["disks_referenced"].as_u64().expect("disks") + memory),
        "{cp}"
    );
    let at = counter_in(&e, "d1@m1");
    assert!(at >= 2);
    assert!(d.log().contains("standard checkpoint m1"), "{}", d.log());
    // Memory state is stored once: a second checkpoint of this nearly idle guest adds only
    // what changed (the state volume shares the rest), a small fraction of its 256 MiB.
    ok(&e, &["checkpoint", "create", "g1@m2"]);
    let space = json(&e, &["space", "g1.state"]);
    let cps = space["volumes"][0]["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .clone();
    let unique = |n: &str| {
        cps.iter()
            .find(|c| c["name"] == n)
            .and_then(|c| c["unique"].as_u64())
            .expect("unique")
    };
    let referenced = cps[0]["referenced"].as_u64().expect("referenced");
    assert!(
        referenced > 16 << 20,
        "the state holds the guest's memory ({referenced})"
    );
    assert!(
        unique("m1") < 16 << 20,
        "m1 shares all but {} bytes of its state with m2",
        unique("m1")
    );
    let vm_space = json(&e, &["space", "g1"]);
    let m1 = &vm_space["checkpoints"][0];
    assert_eq!(m1["name"], "m1", "{vm_space}");
    assert_eq!(m1["memory_referenced"], referenced, "{vm_space}");
    assert_eq!(
        m1["unique"].as_u64(),
        Some(m1["disks_unique"].as_u64().expect("d") + m1["memory_unique"].as_u64().expect("m")),
        "{vm_space}"
    );
    assert!(ok(&e, &["space", "g1"]).contains("MEMORY (ref / unique)"));
    // The guest runs on, then its disk is damaged behind its back.
    wait_console(&e, "g1", &format!("cairn-counter {:08}", at + 3), 60);
    ok(&e, &["vm", "kill", "g1"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "d1",
            "--offset",
            "0",
            "--pattern",
            "0",
            "--length",
            "1M",
        ],
    );
    // QEMU saved m1 for 256 MiB of memory: with another size it cannot resume, which is said
    // before anything changes.
    ok(&e, &["vm", "edit", "g1", "--memory", "512M"]);
    fails(&e, &["checkpoint", "apply", "g1@m1"], "edit the VM back");
    assert_eq!(json(&e, &["vm", "status", "g1"])["state"], "stopped");
    ok(&e, &["vm", "edit", "g1", "--memory", "256M"]);
    let before = ok(&e, &["vm", "console", "g1"]).len();
    // Apply: the disks come back and the guest resumes from its saved memory: no boot, and the
    // next counter follows the one it had when the checkpoint was taken.
    let r = json(&e, &["checkpoint", "apply", "g1@m1"]);
    assert_eq!(r["vm"], "started-from-memory", "{r}");
    assert_eq!(
        r["saved_automatically"], true,
        "the damaged disk is kept: {r}"
    );
    assert_eq!(json(&e, &["vm", "status", "g1"])["state"], "running");
    let first = first_counter_after(&e, "g1", before);
    // The disk held `at` or one less than the guest's counter at the pause.
    assert!(
        first == at + 1 || first == at + 2,
        "resumed at {first}, checkpoint disk had {at}"
    );
    assert!(
        counter_in(&e, "d1") >= at,
        "the disk is the checkpoint's again"
    );
    ok(&e, &["vm", "kill", "g1"]);
    // Without a daemon, resuming memory is refused clearly.
    drop(d);
    fails(
        &e,
        &["checkpoint", "apply", "g1@m1"],
        "needs the Cairn daemon",
    );
    fsck_clean(&e);
}

#[test]
fn qemu_killed_mid_checkpoint_leaves_all_or_nothing() {
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "64M"]);
    ok(&e, &["volume", "create", "d2", "--size", "16M"]);
    define(&e, "g1", &["d1", "d2"]);
    let d = Daemon::start(&e);
    ok(&e, &["vm", "start", "g1"]);
    wait_console(&e, "g1", "cairn-counter 00000002", 90);
    let pid = json(&e, &["vm", "status", "g1"])["pid"]
        .as_u64()
        .expect("pid");
    // Start a standard checkpoint and kill QEMU while its memory snapshot is being written.
    let store = e.store.clone();
    let taker = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("--store")
            .arg(&store)
            .args(["checkpoint", "create", "g1@k"])
            .output()
            .expect("run")
    });
    std::thread::sleep(Duration::from_millis(150));
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    let out = taker.join().expect("taker");
    eprintln!(
        "checkpoint during the kill: {}",
        if out.status.success() {
            "completed".to_string()
        } else {
            String::from_utf8_lossy(&out.stderr).trim().to_string()
        }
    );
    let listed = json(&e, &["checkpoint", "list", "g1"])
        .as_array()
        .map(|a| a.iter().any(|c| c["name"] == "k"))
        .unwrap_or(false);
    let on_disk = |v: &str| {
        json(&e, &["checkpoint", "list", v])
            .as_array()
            .map(|a| a.iter().any(|c| c["name"] == "k"))
            .unwrap_or(false)
    };
    if out.status.success() {
        // QEMU died after the snapshot was complete: the checkpoint is whole.
        assert!(listed && on_disk("d1") && on_disk("d2"));
    } else {
        // Otherwise nothing of it remains, on any disk or in the records.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert!(!listed, "half-made checkpoint listed");
        assert!(
            !on_disk("d1") && !on_disk("d2"),
            "disk checkpoints left behind"
        );
    }
    // The death was noticed, the disks still hold what the guest wrote, the store is sound.
    let t = Instant::now();
    while json(&e, &["vm", "status", "g1"])["state"] != "stopped" {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(counter_in(&e, "d1") >= 1);
    drop(d);
    fsck_clean(&e);
}

/// A host tool from e2fsprogs (in /sbin, which a user's PATH may lack).
fn e2fs(tool: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{tool} is missing; ./scripts/setup.sh installs e2fsprogs"))
}

/// Exports a volume or checkpoint holding an ext4 file system and inspects it on the host:
/// whether it needs journal recovery (set on disk while mounted read-write, cleared by a
/// freeze or an unmount), whether `e2fsck -fn` finds it clean, and its /counter.
fn inspect_ext4(e: &Env, target: &str) -> (bool, bool, u64) {
    let img = e.work.join(format!("{}.img", target.replace('@', "_")));
    ok(
        e,
        &["volume", "export", target, img.to_str().expect("utf-8")],
    );
    let out = |cmd: &mut std::process::Command| {
        let o = cmd.output().expect("run e2fsprogs");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (_, header) = out(std::process::Command::new(e2fs("dumpe2fs"))
        .arg("-h")
        .arg(&img));
    let needs_recovery = header
        .lines()
        .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery"));
    let (clean, _) = out(std::process::Command::new(e2fs("e2fsck"))
        .arg("-fn")
        .arg(&img));
    let (_, counter) = out(std::process::Command::new(e2fs("debugfs"))
        .arg("-R")
        .arg("cat /counter")
        .arg(&img));
    let counter = counter
        .trim()
        .trim_start_matches("cairn-counter ")
        .parse()
        .unwrap_or(0);
    (needs_recovery, clean, counter)
}

/// The last counter the guest printed on its console.
fn console_counter(e: &Env, vm: &str) -> u64 {
    ok(e, &["vm", "console", vm])
        .lines()
        .filter_map(|l| l.trim_start_matches('.').strip_prefix("cairn-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn disk_only_checkpoints_are_application_consistent_when_the_guest_agent_answers() {
    let e = env();
    // A data disk with an ext4 file system made on the host, as an admin would bring one.
    let fs = e.work.join("data.img");
    std::fs::File::create(&fs)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image");
    let mk = std::process::Command::new(e2fs("mkfs.ext4"))
        .args(["-q", "-F"])
        .arg(&fs)
        .status()
        .expect("mkfs.ext4");
    assert!(mk.success());
    ok(&e, &["volume", "create", "root", "--size", "16M"]);
    ok(
        &e,
        &["volume", "import", "data", fs.to_str().expect("utf-8")],
    );
    define_with(&e, "app", &["root", "data"], "cairn.datafs=/dev/vdb");
    fails(
        &e,
        &["checkpoint", "create", "app@q", "--disk-only", "--quiesce"],
        "not running",
    );
    fails(
        &e,
        &["checkpoint", "create", "data@q", "--disk-only", "--quiesce"],
        "not a VM",
    );
    let d = Daemon::start(&e);
    ok(&e, &["vm", "start", "app"]);
    wait_console(&e, "app", "cairn-guest: guest agent on", 90);
    wait_console(&e, "app", "cairn-counter 00000003", 90);
    // The data disk while mounted: a crash-consistent copy would need journal recovery.
    let before = console_counter(&e, "app");
    let out = ok(
        &e,
        &[
            "checkpoint",
            "create",
            "app@frozen",
            "--disk-only",
            "--quiesce",
        ],
    );
    assert!(
        out.contains("application-consistent") && out.contains("froze 1 file system"),
        "{out}"
    );
    let (needs_recovery, clean, counter) = inspect_ext4(&e, "data@frozen");
    assert!(!needs_recovery, "a frozen ext4 needs no journal recovery");
    assert!(clean, "e2fsck -fn finds the frozen file system clean");
    // The counter the guest wrote to /data through its page cache (never synced by it) is on
    // the disk: the freeze flushed it.
    assert!(
        counter >= before,
        "/counter = {counter}, console showed {before}"
    );
    // Thawed: the guest goes on writing /data (a frozen /data would block its loop).
    wait_console(&e, "app", &format!("cairn-counter {:08}", before + 3), 60);
    let rec = json(&e, &["checkpoint", "list", "app"]);
    let frozen = rec
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "frozen"))
        .expect("listed");
    assert_eq!(frozen["kind"], "disk-only", "{frozen}");
    assert_eq!(frozen["consistency"], "application", "{frozen}");
    assert!(ok(&e, &["checkpoint", "list", "app"]).contains("disk-only, application-consistent"));
    assert!(d.log().contains("file systems frozen"), "{}", d.log());
    fails(
        &e,
        &["checkpoint", "create", "app@q", "--quiesce"],
        "--disk-only",
    );

    // The same guest without its agent: Cairn says so, and takes a crash-consistent checkpoint
    // unless told to require quiescing.
    ok(&e, &["vm", "kill", "app"]);
    ok(
        &e,
        &[
            "vm",
            "edit",
            "app",
            "--append",
            &format!("{APPEND} cairn.datafs=/dev/vdb cairn.noagent"),
        ],
    );
    ok(&e, &["vm", "start", "app"]);
    wait_console(&e, "app", "cairn-guest: no guest agent", 90);
    let t = Instant::now();
    let out = ok(&e, &["checkpoint", "create", "app@crash", "--disk-only"]);
    assert!(
        out.contains("crash-consistent") && out.contains("has not opened its agent port"),
        "{out}"
    );
    // Known at once from QEMU, not by waiting for an agent that is not there.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let (needs_recovery, _, _) = inspect_ext4(&e, "data@crash");
    assert!(needs_recovery, "a mounted ext4 copied as is needs recovery");
    fails(
        &e,
        &["checkpoint", "create", "app@q", "--disk-only", "--quiesce"],
        "cannot quiesce VM 'app'",
    );
    // Nothing of the refused checkpoint remains.
    let names: Vec<String> = json(&e, &["checkpoint", "list", "app"])
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, vec!["frozen", "crash"]);
    fails(
        &e,
        &["volume", "read", "root@q", "--offset", "0", "--length", "1"],
        "not found",
    );
    ok(&e, &["vm", "kill", "app"]);
    drop(d);
    fsck_clean(&e);
}

/// The names in `checkpoint list --tree`, in drawing order, without the tree's lines and times.
fn tree_names(e: &Env, vm: &str) -> Vec<String> {
    ok(e, &["checkpoint", "list", vm, "--tree"])
        .lines()
        .filter_map(|l| {
            l.trim_start_matches(|c: char| " │├└─".contains(c))
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn a_vm_checkpoint_is_one_object() {
    a_vm_checkpoint_is_one_object_in(env());
}

#[test]
fn a_vm_checkpoint_is_one_object_through_daemon() {
    a_vm_checkpoint_is_one_object_in(env_with_daemon());
}

/// A stopped VM's checkpoints: deleting one re-parents its children, its parts cannot be broken
/// one by one, a damaged one is refused before anything changes, and deleting the VM keeps its
/// disks' checkpoints usable.
fn a_vm_checkpoint_is_one_object_in(e: Env) {
    ok(&e, &["volume", "create", "d", "--size", "16M"]);
    ok(&e, &["volume", "create", "other", "--size", "16M"]);
    define(&e, "v", &["d"]);
    let write = |byte: &str| {
        ok(
            &e,
            &[
                "volume",
                "write",
                "d",
                "--offset",
                "0",
                "--pattern",
                byte,
                "--length",
                "4096",
            ],
        )
    };
    write("0x0a");
    ok(&e, &["checkpoint", "create", "v@a"]);
    write("0x0b");
    ok(&e, &["checkpoint", "create", "v@b"]);
    write("0x0c");
    ok(&e, &["checkpoint", "create", "v@c"]);
    let list = json(&e, &["checkpoint", "list", "v"]);
    assert_eq!(list[0]["kind"], "disk-only", "{list}");
    assert_eq!(list[0]["consistency"], "vm-stopped", "{list}");
    assert_eq!(list[0]["referenced"], 4096);
    assert_eq!(list[0]["memory_referenced"], 0);

    // Deleting a middle checkpoint hands its child to its parent, in the record and the tree.
    ok(&e, &["checkpoint", "delete", "v@b"]);
    let list = json(&e, &["checkpoint", "list", "v"]);
    assert_eq!(list[1]["name"], "c");
    assert_eq!(list[1]["parent"], "a", "{list}");
    assert_eq!(tree_names(&e, "v"), ["a", "c", "*"]);
    ok(&e, &["checkpoint", "delete", "v@a"]);
    assert_eq!(tree_names(&e, "v"), ["c", "*"]);
    let list = json(&e, &["checkpoint", "list", "v"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["parent"], serde_json::Value::Null);

    // Its parts are protected: refused with the VM checkpoint's name, through the VM allowed.
    fails(
        &e,
        &["checkpoint", "delete", "d@c"],
        "part of VM checkpoint 'v@c'",
    );
    fails(
        &e,
        &["checkpoint", "rename", "d@c", "x"],
        "part of VM checkpoint 'v@c'",
    );
    assert_eq!(fails_json(&e, &["checkpoint", "delete", "d@c"]), "state");
    // A disk detached from the VM still holds the VM checkpoint's part.
    ok(&e, &["vm", "edit", "v", "--disk", "other"]);
    fails(
        &e,
        &["volume", "delete", "d", "--yes"],
        "part of VM checkpoint(s) v@c",
    );
    // ...and the VM checkpoint cannot be applied while its disk is detached.
    fails(&e, &["checkpoint", "apply", "v@c"], "no longer attached");
    ok(&e, &["vm", "edit", "v", "--disk", "d"]);

    // A damaged checkpoint (a part gone behind Cairn's back) is refused before anything changes.
    let record = e.store.join("vms/v/checkpoints/c.json");
    let good = std::fs::read_to_string(&record).expect("record");
    let mut damaged: serde_json::Value = serde_json::from_str(&good).expect("json");
    damaged["disks"] = serde_json::json!(["d", "other"]);
    std::fs::write(&record, damaged.to_string()).expect("damage");
    write("0x0d");
    fails(&e, &["checkpoint", "apply", "v@c"], "is missing");
    let kept = ok(
        &e,
        &["volume", "read", "d", "--offset", "0", "--length", "1"],
    );
    assert_eq!(kept.as_bytes(), [0x0d], "nothing was changed");
    assert_eq!(
        json(&e, &["checkpoint", "list", "v"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    std::fs::write(&record, good).expect("repair");

    // An apply over changed disks keeps them as an automatic checkpoint and says so.
    let r = json(&e, &["checkpoint", "apply", "v@c"]);
    assert_eq!(r["vm"], "stopped", "{r}");
    assert_eq!(r["saved_automatically"], true, "{r}");
    let auto = r["saved_as"].as_str().expect("saved").to_string();
    let list = json(&e, &["checkpoint", "list", "v"]);
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .any(|c| c["name"] == auto.as_str() && c["automatic"] == true),
        "{list}"
    );
    let out = ok(&e, &["checkpoint", "apply", &format!("v@{auto}")]);
    assert!(out.contains("the VM: stopped"), "{out}");
    assert_eq!(
        ok(
            &e,
            &["volume", "read", "d", "--offset", "0", "--length", "1"]
        )
        .as_bytes(),
        [0x0d]
    );
    // Unnamed, edited, renamed as VM@NEW.
    let made = json(&e, &["checkpoint", "create", "v"]);
    let name = made["name"].as_str().expect("name").to_string();
    assert!(name.starts_with("cp-20"), "{made}");
    ok(
        &e,
        &[
            "checkpoint",
            "edit",
            &format!("v@{name}"),
            "-m",
            "described",
        ],
    );
    ok(
        &e,
        &["checkpoint", "rename", &format!("v@{name}"), "v@named"],
    );
    let list = json(&e, &["checkpoint", "list", "v"]);
    let named = list
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["name"] == "named")
        .expect("renamed")
        .clone();
    assert_eq!(named["description"], "described");

    // Deleting the VM (confirmed) keeps its disk and the disk's own checkpoints, now plain ones.
    fails(&e, &["vm", "delete", "v"], "add --yes");
    let out = json(&e, &["vm", "delete", "v", "--yes"]);
    assert_eq!(out["disks_kept"], serde_json::json!(["d"]));
    ok(&e, &["checkpoint", "apply", "d@c", "--discard-current"]);
    assert_eq!(
        ok(
            &e,
            &["volume", "read", "d", "--offset", "0", "--length", "1"]
        )
        .as_bytes(),
        [0x0c]
    );
    ok(&e, &["checkpoint", "delete", "d@named"]);
    fails(&e, &["volume", "info", "v.state"], "not found");
    fsck_clean(&e);
}
