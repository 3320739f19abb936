//! Lifecycle policies from the command line: setting, showing and clearing them (a volume's
//! own and the store's default), every kind of bad input, pins, and `cairn prune` with its dry
//! run's exact figures, with and without a daemon.

mod common;

use common::*;

/// Volume `v` with five checkpoints `c0`..`c4`, each holding 1 MiB of its own data.
fn five_checkpoints(e: &Env) {
    ok(e, &["volume", "create", "v", "--size", "16M"]);
    for i in 0..5 {
        let pattern = format!("0x{:02x}", 0x11 * (i + 1));
        ok(
            e,
            &[
                "volume",
                "write",
                "v",
                "--offset",
                "0",
                "--pattern",
                &pattern,
                "--length",
                "1M",
            ],
        );
        ok(e, &["checkpoint", "create", &format!("v@c{i}")]);
    }
}

fn policies_in(e: Env) {
    five_checkpoints(&e);
    // Nothing set: prune has nothing to do.
    let none = json(&e, &["prune", "--dry-run"]);
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0), "{none}");

    ok(
        &e,
        &[
            "policy",
            "set",
            "--default",
            "--every",
            "1h",
            "--keep-daily",
            "7",
        ],
    );
    let shown = json(&e, &["policy", "show", "v"]);
    assert_eq!(shown[0]["inherited"], true, "{shown}");
    assert_eq!(shown[0]["keep"]["daily"], 7, "{shown}");
    // The default leaves checkpoints taken by name alone.
    let plan = json(&e, &["prune", "v", "--dry-run"]);
    assert!(
        plan["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|i| i["verdict"] == "manual"),
        "{plan}"
    );

    ok(
        &e,
        &["policy", "set", "v", "--keep-last", "2", "--include-manual"],
    );
    ok(&e, &["checkpoint", "pin", "v@c0"]);
    let text = ok(&e, &["policy", "list"]);
    assert!(
        text.contains("store default: every 1h, keep-daily 7"),
        "{text}"
    );
    assert!(
        text.contains("v: keep-last 2, manual checkpoints included"),
        "{text}"
    );

    let plan = json(&e, &["prune", "v", "--dry-run"]);
    let items = plan["items"].as_array().expect("items").clone();
    let verdict = |n: &str| {
        items
            .iter()
            .find(|i| i["checkpoint"] == n)
            .map(|i| i["verdict"].clone())
            .expect("listed")
    };
    assert_eq!(verdict("c0"), "pinned");
    assert_eq!(verdict("c1"), "remove");
    assert_eq!(verdict("c2"), "remove");
    assert_eq!(verdict("c3"), serde_json::json!({"keep": "last"}));
    assert_eq!(verdict("c4"), serde_json::json!({"keep": "last"}));
    let alone: u64 = items.iter().filter_map(|i| i["frees_alone"].as_u64()).sum();
    let total = plan["frees_total"].as_u64().expect("total");
    assert!(
        total >= alone && alone >= 2 << 20,
        "alone {alone}, total {total}"
    );
    assert_eq!(
        checkpoint_names(&e, "v").len(),
        5,
        "a dry run deletes nothing"
    );

    // A pinned checkpoint cannot be deleted by hand either.
    fails(&e, &["checkpoint", "delete", "v@c0"], "pinned");
    let pruned = json(&e, &["--yes", "prune", "v"]);
    assert_eq!(pruned["frees_total"], plan["frees_total"], "{pruned}");
    assert_eq!(checkpoint_names(&e, "v"), vec!["c0", "c3", "c4"]);
    ok(&e, &["checkpoint", "unpin", "v@c0"]);
    ok(&e, &["checkpoint", "delete", "v@c0"]);

    ok(&e, &["policy", "clear", "v"]);
    let shown = json(&e, &["policy", "show", "v"]);
    assert_eq!(shown[0]["inherited"], true, "the default again: {shown}");
    ok(&e, &["policy", "clear", "--default"]);
    assert_eq!(json(&e, &["policy", "list"]), serde_json::json!([]));
    fsck_clean(&e);
}

#[test]
fn policies_pins_and_prune() {
    policies_in(env());
}

#[test]
fn policies_pins_and_prune_through_daemon() {
    // The daemon's own scheduler would apply the same retention within a second of the policy
    // being set, racing the steps this test takes by hand (its own tests are in scheduler.rs).
    let mut e = env();
    e.daemon = Some(Daemon::start_with(&e, &["--no-lifecycle"]));
    policies_in(e);
}

/// Every bad input gets a one-line error and changes nothing.
#[test]
fn policy_bad_input() {
    let e = env();
    five_checkpoints(&e);
    fails(&e, &["policy", "set", "nope", "--every", "1h"], "nope");
    fails(
        &e,
        &["policy", "set", "v", "--schedule", "0 0 31 2 *"],
        "never fires",
    );
    fails(
        &e,
        &["policy", "set", "v", "--schedule", "every day"],
        "cron",
    );
    fails(&e, &["policy", "set", "v", "--budget", "1K"], "budget");
    fails(
        &e,
        &["policy", "set", "v", "--budget", "1M", "--keep-last", "3"],
        "smaller than checkpoint",
    );
    fails(
        &e,
        &["policy", "set", "v", "--backup-to", "offsite"],
        "offsite",
    );
    fails(
        &e,
        &["policy", "set", "v", "--backup-every", "1d"],
        "--backup-to",
    );
    fails(&e, &["policy", "set", "v", "--max-age", "0s"], "max-age");
    for args in [
        vec![
            "policy",
            "set",
            "v",
            "--every",
            "1h",
            "--schedule",
            "0 * * * *",
        ],
        vec!["policy", "set", "v", "--keep-last", "0"],
        vec!["policy", "set", "v", "--keep-daily", "-1"],
        vec!["policy", "set", "v", "--every", "soon"],
    ] {
        let o = cairn(&e, &args);
        assert!(!o.status.success(), "{args:?} is refused");
    }
    fails(&e, &["policy", "clear", "v"], "no policy");
    fails(&e, &["prune", "nope"], "nope");
    fails(&e, &["checkpoint", "pin", "v"], "CHECKPOINT");
    fails(&e, &["checkpoint", "pin", "v@nope"], "nope");
    assert_eq!(json(&e, &["policy", "list"]), serde_json::json!([]));
    assert_eq!(checkpoint_names(&e, "v").len(), 5);
}
