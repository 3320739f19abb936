//! VMs on Cairn volumes with a real QEMU and a real guest (the Debian cloud kernel and a busybox
//! initramfs built by scripts/build-guest.sh), under TCG here, KVM where it works.
#![allow(missing_docs)]

mod common;
use common::guest::*;
use common::*;

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[test]
fn vm_runs_on_cairn_disks_and_is_supervised() {
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "64M"]);
    ok(&e, &["volume", "create", "d2", "--size", "16M"]);
    define(&e, "g1", &["d1", "d2"]);
    // Without a daemon the definition exists but nothing can run.
    fails(&e, &["vm", "start", "g1"], "needs the Cairn daemon");
    assert_eq!(json(&e, &["vm", "status", "g1"])["state"], "stopped");
    let d = Daemon::start(&e);
    let st = json(&e, &["vm", "start", "g1"]);
    assert_eq!(st["state"], "running");
    let accel = st["accel"].as_str().unwrap_or("").to_string();
    assert!(
        accel.starts_with("tcg") || accel.starts_with("kvm"),
        "{accel}"
    );
    let log = wait_console(&e, "g1", "cairn-counter 00000003", 90);
    assert!(log.contains("disks: /dev/vda /dev/vdb"), "{log}");
    // The guest's writes reach both Cairn volumes through NBD.
    assert!(disk_counter(&e, "d1") >= 2);
    assert!(disk_counter(&e, "d2") >= 2);

    // Bad input while it runs.
    fails(&e, &["vm", "start", "g1"], "already running");
    fails(&e, &["vm", "start", "nosuch"], "VM 'nosuch' not found");
    fails(&e, &["vm", "edit", "g1", "--cpus", "2"], "is running");
    fails(&e, &["vm", "delete", "g1"], "is running");
    fails(&e, &["volume", "delete", "d1"], "running VM 'g1'");
    ok(&e, &["checkpoint", "create", "d1@x"]);
    fails(&e, &["checkpoint", "apply", "d1@x"], "running VM 'g1'");
    ok(&e, &["volume", "create", "d3", "--size", "16M"]);
    let (k, i) = guest();
    let kernel = k.display().to_string();
    fails(
        &e,
        &["vm", "create", "g2", "--disk", "d1", "--kernel", &kernel],
        "attached to VM 'g1'",
    );
    fails(
        &e,
        &["vm", "create", "g2", "--disk", "nosuch"],
        "volume 'nosuch' not found",
    );
    fails(
        &e,
        &["vm", "create", "g2", "--disk", "d3", "--memory", "1M"],
        "memory",
    );
    fails(
        &e,
        &[
            "vm",
            "create",
            "g2",
            "--disk",
            "d3",
            "--kernel",
            "/nonexistent/vmlinuz",
        ],
        "cannot find /nonexistent/vmlinuz",
    );
    let _ = i;

    // A QEMU that dies is noticed and reported; the store stays consistent.
    let pid = json(&e, &["vm", "status", "g1"])["pid"]
        .as_u64()
        .expect("pid");
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    let t = Instant::now();
    loop {
        let st = json(&e, &["vm", "status", "g1"]);
        if st["state"] == "stopped" {
            let why = st["last_exit"].as_str().unwrap_or("");
            assert!(why.contains("exited unexpectedly"), "{st}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "death not noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.log().contains("exited unexpectedly"));
    fsck_clean(&e);

    // Start again; stop falls back to a hard stop when the guest ignores ACPI (busybox does).
    ok(&e, &["vm", "start", "g1"]);
    wait_console(&e, "g1", "cairn-guest: up", 90);
    let t = Instant::now();
    let st = json(&e, &["vm", "stop", "g1", "--timeout", "2"]);
    assert_eq!(st["state"], "stopped");
    assert!(t.elapsed() < Duration::from_secs(15));
    // vm kill on a stopped VM is a clear error; edit and delete work once stopped.
    fails(&e, &["vm", "kill", "g1"], "is not running");
    ok(&e, &["vm", "edit", "g1", "--cpus", "2"]);
    assert_eq!(json(&e, &["vm", "info", "g1"])["cpus"], 2);
    ok(&e, &["vm", "start", "g1"]);
    ok(&e, &["vm", "kill", "g1"]);
    ok(&e, &["vm", "delete", "g1"]);
    fails(&e, &["vm", "info", "g1"], "not found");
    // The volumes outlive the VM.
    assert!(disk_counter(&e, "d1") >= 1);
    drop(d);
    fsck_clean(&e);
}

#[test]
fn missing_qemu_is_a_clear_error() {
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "16M"]);
    define(&e, "g", &["d1"]);
    let _d = Daemon::start_env(
        &e,
        &[],
        &[("CAIRN_QEMU", "/nonexistent/qemu-system-x86_64")],
    );
    fails(&e, &["vm", "start", "g"], "setup-qemu.sh");
    assert!(_d.log().contains("VMs cannot run"), "{}", _d.log());
    drop(_d);
    // A QEMU too old for mapped-ram state files (Debian bookworm's own 7.2).
    let old = e.work.join("old-qemu");
    std::fs::write(
        &old,
        "#!/bin/sh\necho 'QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)'\n",
    )
    .expect("fake QEMU");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let _d = Daemon::start_env(&e, &[], &[("CAIRN_QEMU", old.to_str().expect("utf-8"))]);
    fails(
        &e,
        &["vm", "start", "g"],
        "QEMU 7.2.19; Cairn needs 9.0 or newer",
    );
    assert_eq!(json(&e, &["vm", "status", "g"])["state"], "stopped");
}

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

/// Waits until the guest has written its counter past `n` on `disk`.
fn wait_counter_past(e: &Env, disk: &str, n: u64, secs: u64) -> u64 {
    let t = Instant::now();
    loop {
        let now = disk_counter(e, disk);
        if now > n {
            return now;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "the guest's counter on {disk} stayed at {now}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a process runs (a zombie no one has reaped yet counts as gone).
fn alive(pid: u64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses.
    match stat.rsplit_once(") ") {
        Some((_, rest)) => !rest.starts_with('Z'),
        None => false,
    }
}

/// A daemon that stops (an upgrade, a restart) leaves its VMs running: QEMU's disk requests wait
/// for the NBD socket, the next daemon reattaches the QEMU, and the guest goes on writing and can
/// be checkpointed and stopped as before. `--vms-on-exit stop` powers them off instead.
#[test]
fn a_daemon_restart_leaves_vms_running_and_the_next_daemon_reattaches_them() {
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "64M"]);
    define(&e, "g1", &["d1"]);
    let mut d = Daemon::start(&e);
    let pid = json(&e, &["vm", "start", "g1"])["pid"]
        .as_u64()
        .expect("pid");
    wait_console(&e, "g1", "cairn-counter 00000003", 90);
    assert!(d.signal("-TERM").success(), "{}", d.log());
    assert!(d.log().contains("left running"), "{}", d.log());
    assert!(alive(pid), "QEMU outlives the daemon");

    let mut d = Daemon::start(&e);
    let st = json(&e, &["vm", "status", "g1"]);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["pid"], pid, "{st}");
    assert!(d.log().contains("reattached to QEMU"), "{}", d.log());
    // The guest's writes reach the disk through the new daemon.
    let before = disk_counter(&e, "d1");
    wait_counter_past(&e, "d1", before + 1, 60);
    // QMP is back: a checkpoint of the running VM works, and the guest goes on after it.
    ok(
        &e,
        &["checkpoint", "create", "g1@after-restart", "--disk-only"],
    );
    let at = disk_counter(&e, "d1@after-restart");
    assert!(at > before, "the checkpoint holds the guest's newer writes");
    wait_counter_past(&e, "d1", at, 60);

    // A QEMU that dies while no daemon watches is reported, not reattached.
    assert!(d.signal("-TERM").success(), "{}", d.log());
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    while alive(pid) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut d = Daemon::start(&e);
    let st = json(&e, &["vm", "status", "g1"]);
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(
        st["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("while no daemon watched"),
        "{st}"
    );
    assert!(d.signal("-TERM").success());

    // Asked to, the daemon stops its VMs when it stops.
    let mut d = Daemon::start_with(&e, &["--vms-on-exit", "stop"]);
    let pid = json(&e, &["vm", "start", "g1"])["pid"]
        .as_u64()
        .expect("pid");
    assert!(d.signal("-TERM").success(), "{}", d.log());
    assert!(!alive(pid), "QEMU stopped with the daemon");
    assert!(!e.store.join("vms/g1/run.json").exists());
    fsck_clean(&e);
}

/// `vm console --attach` connects to the guest's serial console both ways: what is typed reaches
/// the guest's shell, its answer comes back, Ctrl-] detaches, and the log goes on meanwhile. One
/// session at a time; a stopped VM has no console to attach to.
#[test]
fn vm_console_attach_reaches_the_guest_and_ctrl_bracket_detaches() {
    use std::io::{BufRead, Write};
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "16M"]);
    define(&e, "g1", &["d1"]);
    let _d = Daemon::start(&e);
    fails(&e, &["vm", "console", "g1", "--attach"], "is not running");
    ok(&e, &["vm", "start", "g1"]);
    wait_console(&e, "g1", "cairn-counter 00000002", 90);
    let mut session = command(&e, &["vm", "console", "g1", "--attach"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("attach");
    let stdin = session.stdin.as_mut().expect("stdin");
    // The shell computes the answer, so it cannot be an echo of the input.
    stdin
        .write_all(b"echo attached-$((6 * 7))\n")
        .expect("type");
    let mut out = std::io::BufReader::new(session.stdout.take().expect("stdout"));
    let t = Instant::now();
    let mut seen = String::new();
    while !seen.contains("attached-42") {
        let mut line = String::new();
        if out.read_line(&mut line).expect("read") == 0 {
            panic!("the console closed; it showed:\n{seen}");
        }
        seen.push_str(&line);
        assert!(t.elapsed() < Duration::from_secs(60), "no answer:\n{seen}");
    }
    // Meanwhile, one session at a time.
    fails(
        &e,
        &["vm", "console", "g1", "--attach"],
        "attached in another session",
    );
    let stdin = session.stdin.as_mut().expect("stdin");
    stdin.write_all(&[0x1d]).expect("Ctrl-]");
    let done = session.wait_with_output().expect("wait");
    assert!(done.status.success());
    let said = String::from_utf8_lossy(&done.stderr);
    assert!(
        said.contains("detached from the console of VM 'g1'"),
        "{said}"
    );
    // The log has it all, and the VM runs on.
    let log = wait_console(&e, "g1", "attached-42", 10);
    assert!(log.contains("cairn-counter"));
    assert_eq!(json(&e, &["vm", "status", "g1"])["state"], "running");
    // Once detached, another session may attach.
    let mut again = command(&e, &["vm", "console", "g1", "--attach"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("attach again");
    again
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(&[0x1d])
        .expect("Ctrl-]");
    assert!(again.wait().expect("wait").success());
}

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
    ok(&e, &["vm", "kill", "g3"]);
    assert!(
        counter_in(&e, "g3-d1") >= later,
        "the disk holds what the guest wrote while it was filled"
    );
    fsck_clean(&e);
}
