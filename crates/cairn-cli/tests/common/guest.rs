//! The test guest (the Debian cloud kernel and a busybox initramfs built by
//! scripts/build-guest.sh): defining VMs on it and reading the counter it writes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{cairn, ok, Env};

/// The test guest, built by `scripts/build-guest.sh` (which `scripts/test.sh` runs).
pub fn guest() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest");
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    assert!(
        k.exists() && i.exists(),
        "the test guest is missing; run ./scripts/build-guest.sh"
    );
    (k, i)
}

pub fn define(e: &Env, name: &str, disks: &[&str]) {
    define_with(e, name, disks, "");
}

pub const APPEND: &str = "console=ttyS0 rdinit=/init panic=-1 quiet";

/// [`define`] with more words on the guest's kernel command line.
pub fn define_with(e: &Env, name: &str, disks: &[&str], append: &str) {
    let (k, i) = guest();
    let mut args = vec![
        "vm".to_string(),
        "create".into(),
        name.into(),
        "--memory".into(),
        "256M".into(),
        "--kernel".into(),
        k.display().to_string(),
        "--initrd".into(),
        i.display().to_string(),
        "--append".into(),
        format!("{APPEND} {append}").trim_end().to_string(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.to_string());
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    ok(e, &a);
}

/// Waits until the VM's console shows `want`.
pub fn wait_console(e: &Env, vm: &str, want: &str, secs: u64) -> String {
    let t = Instant::now();
    loop {
        let log = ok(e, &["vm", "console", vm]);
        if log.contains(want) {
            return log;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "VM {vm} never printed '{want}'; console:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The counter the guest last wrote to block 0 of a volume (or checkpoint).
pub fn disk_counter(e: &Env, target: &str) -> u64 {
    let bytes = cairn(
        e,
        &["volume", "read", target, "--offset", "0", "--length", "22"],
    )
    .stdout;
    let text = String::from_utf8_lossy(&bytes);
    text.trim_start_matches("cairn-counter ")
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The first counter a resumed guest prints on its console after its first `before` bytes, and
/// that it did not boot to print it.
pub fn first_counter_after(e: &Env, vm: &str, before: usize) -> u64 {
    let t = Instant::now();
    loop {
        let log = ok(e, &["vm", "console", vm]);
        let new = &log[before.min(log.len())..];
        if let Some(line) = new.lines().find(|l| l.starts_with("cairn-counter ")) {
            assert!(
                !new.contains("cairn-guest: up"),
                "the guest rebooted:\n{new}"
            );
            return line
                .trim_start_matches("cairn-counter ")
                .trim()
                .parse::<u64>()
                .expect("counter");
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{vm} did not resume:\n{new}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The counter the guest last wrote, read from block 0 of `target` through the CLI.
pub fn counter_in(e: &Env, target: &str) -> u64 {
    disk_counter(e, target)
}
