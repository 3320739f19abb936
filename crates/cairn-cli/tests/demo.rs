//! `cairn demo` (what ./scripts/demo.sh runs) tells the VM story end to end on the real test
//! guest and leaves nothing behind: no store, no daemon, no QEMU.

mod common;

use std::process::Command;

#[test]
fn the_demo_rewinds_a_running_guest_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("demo")
        .env_remove("CAIRN_STORE")
        .output()
        .expect("run cairn demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checkpoint = text
        .lines()
        .find(|l| l.contains("the checkpoint's disk holds"))
        .expect("the checkpoint line");
    let at: u64 = checkpoint
        .rsplit("cairn-counter ")
        .next()
        .and_then(|n| n.trim_end_matches('"').parse().ok())
        .expect("the counter at the checkpoint");
    let resumed = text
        .lines()
        .find(|l| l.contains("counting from"))
        .expect("the resume line");
    let from: u64 = resumed
        .split("counting from ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the counter after the apply");
    assert!(
        from > at && from <= at + 3,
        "{resumed} (checkpoint at {at})"
    );
    assert!(
        text.contains("block 0 of web-disk now reads zeros"),
        "{text}"
    );
    let disk = text
        .lines()
        .find(|l| l.contains("no longer zeros"))
        .expect("the disk after the apply");
    let n: u64 = disk
        .split("cairn-counter ")
        .nth(1)
        .and_then(|r| r.get(..8))
        .and_then(|n| n.parse().ok())
        .expect("a counter on the disk");
    assert!(n >= at && n <= at + 4, "{disk} (checkpoint at {at})");
    assert!(
        text.contains("└─ before") && text.contains("* now"),
        "{text}"
    );
    let store = text
        .split("a new store in ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .expect("the store's path");
    assert!(!std::path::Path::new(store).exists(), "{store} left behind");
    let qemu = Command::new("pgrep")
        .args(["-f", store])
        .output()
        .expect("pgrep");
    assert!(qemu.stdout.is_empty(), "a process of the demo is left");
}
