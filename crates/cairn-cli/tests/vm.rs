//! VMs on Cairn volumes with a real QEMU and a real guest (the Debian cloud kernel and a busybox
//! initramfs built by scripts/build-guest.sh), under TCG here, KVM where it works: VMs run and are
//! supervised, the console attaches, and VMs outlive a daemon restart. Their checkpoints are in
//! `vm_checkpoint.rs`, their backups in `vm_backup.rs`.
#![allow(missing_docs)]

mod common;
use common::guest::*;
use common::*;

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
