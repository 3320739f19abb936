//! Group checkpoints: two running test guests (and a plain volume) taken at one instant and
//! rewound together, a stopped member taken disk-only, and bad input (unknown members, names
//! taken, a member deleted) refused with nothing stored touched.
#![allow(missing_docs)]

mod common;
use common::guest::*;
use common::*;

fn kinds(cp: &serde_json::Value) -> Vec<(String, String)> {
    cp["value"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["member"].as_str().expect("member").to_string(),
                m["kind"].as_str().expect("kind").to_string(),
            )
        })
        .collect()
}

#[test]
fn a_group_checkpoint_of_two_running_guests_rewinds_both_to_one_instant() {
    let e = env();
    ok(&e, &["volume", "create", "d1", "--size", "64M"]);
    ok(&e, &["volume", "create", "d2", "--size", "64M"]);
    ok(&e, &["volume", "create", "shared", "--size", "4M"]);
    define(&e, "g1", &["d1"]);
    define(&e, "g2", &["d2"]);
    fails(&e, &["group", "create", "app", "--vm", "nosuch"], "nosuch");
    fails(
        &e,
        &["group", "create", "g1", "--vm", "g2"],
        "already a VM or volume",
    );
    fails(
        &e,
        &["group", "create", "app", "--volume", "d1", "--vm", "g2"],
        "disk of VM 'g1'",
    );
    fails(&e, &["group", "create", "app"], "needs members");
    ok(
        &e,
        &[
            "group", "create", "app", "--vm", "g1", "--vm", "g2", "--volume", "shared",
        ],
    );
    fails(
        &e,
        &["volume", "create", "app", "--size", "1M"],
        "a group's name",
    );
    // Stopped, the members are at rest: disk-only, and no daemon is needed.
    let cold = json(&e, &["checkpoint", "create", "app@cold"]);
    assert_eq!(
        kinds(&cold),
        [
            ("g1".into(), "disk-only, VM stopped".into()),
            ("g2".into(), "disk-only, VM stopped".into()),
            ("shared".into(), "volume".into())
        ],
        "{cold}"
    );

    let _d = Daemon::start(&e);
    ok(&e, &["vm", "start", "g1"]);
    ok(&e, &["vm", "start", "g2"]);
    wait_console(&e, "g1", "cairn-counter 00000003", 120);
    wait_console(&e, "g2", "cairn-counter 00000003", 120);
    let x = json(&e, &["checkpoint", "create", "app@x", "-m", "both at once"]);
    let members = x["value"]["members"].as_array().expect("members").clone();
    for m in &members[..2] {
        assert_eq!(m["kind"], "standard (memory and disks)", "{x}");
        let us = m["paused_us"].as_u64().expect("paused");
        assert!(us > 0 && us < 5_000_000, "{x}");
    }
    let (c1, c2) = (disk_counter(&e, "d1@x"), disk_counter(&e, "d2@x"));
    assert!(c1 >= 2 && c2 >= 2, "{c1} {c2}");
    wait_console(&e, "g1", &format!("cairn-counter {:08}", c1 + 3), 60);
    wait_console(&e, "g2", &format!("cairn-counter {:08}", c2 + 3), 60);
    ok(
        &e,
        &[
            "volume",
            "write",
            "shared",
            "--offset",
            "0",
            "--pattern",
            "0x77",
            "--length",
            "4k",
        ],
    );
    let applied = json(&e, &["checkpoint", "apply", "app@x"]);
    // The apply returns once both guests run again from the checkpoint's memory.
    let before1 = ok(&e, &["vm", "console", "g1"]).len();
    let before2 = ok(&e, &["vm", "console", "g2"]).len();
    let reports = applied["value"].as_array().expect("reports");
    assert_eq!(reports.len(), 3, "{applied}");
    assert_eq!(reports[0]["vm"], "resumed-from-memory", "{applied}");
    assert_eq!(reports[1]["vm"], "resumed-from-memory", "{applied}");
    // Both guests go on from the counters they had at the one instant (they were 3 past it).
    let f1 = first_counter_after(&e, "g1", before1);
    let f2 = first_counter_after(&e, "g2", before2);
    assert!(
        (c1 + 1..=c1 + 3).contains(&f1),
        "g1 resumed at {f1}, its disk had {c1}"
    );
    assert!(
        (c2 + 1..=c2 + 3).contains(&f2),
        "g2 resumed at {f2}, its disk had {c2}"
    );
    let shared = cairn(
        &e,
        &["volume", "read", "shared", "--offset", "0", "--length", "1"],
    );
    assert_eq!(shared.stdout, [0], "the plain member is rewound too");
    let listed = json(&e, &["checkpoint", "list", "app"]);
    let names: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["cold", "x"], "{listed}");

    // A running VM's policy checkpoints are disk-only, quiesced through its guest agent.
    ok(
        &e,
        &["policy", "set", "g1", "--every", "2s", "--keep-last", "1"],
    );
    let t = std::time::Instant::now();
    let auto = loop {
        let list = json(&e, &["checkpoint", "list", "g1"]);
        let auto: Vec<serde_json::Value> = list
            .as_array()
            .expect("list")
            .iter()
            .filter(|c| {
                c["automatic"] == true && c["name"].as_str().is_some_and(|n| n.ends_with('Z'))
            })
            .cloned()
            .collect();
        let events = ok(&e, &["events"]);
        if !auto.is_empty() && events.contains("pruned g1@auto-") {
            break auto;
        }
        assert!(
            t.elapsed().as_secs() < 60,
            "no policy checkpoints of g1: {list}\n{events}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(auto.len(), 1, "keep-last 1: {auto:?}");
    assert_eq!(auto[0]["kind"], "disk-only", "{auto:?}");
    assert_eq!(auto[0]["consistency"], "application", "{auto:?}");
    ok(&e, &["policy", "clear", "g1"]);

    // One running, one stopped: the stopped one is taken disk-only, at rest.
    ok(&e, &["vm", "kill", "g2"]);
    let mixed = json(&e, &["checkpoint", "create", "app@mixed"]);
    assert_eq!(
        kinds(&mixed)[0],
        ("g1".into(), "standard (memory and disks)".into()),
        "{mixed}"
    );
    assert_eq!(
        kinds(&mixed)[1],
        ("g2".into(), "disk-only, VM stopped".into()),
        "{mixed}"
    );
    fails(
        &e,
        &["checkpoint", "create", "app@mixed"],
        "already has a checkpoint 'mixed'",
    );

    // A member deleted: refused, and nothing is made on the others.
    let g1_before = checkpoint_names(&e, "g1");
    ok(&e, &["--yes", "volume", "delete", "shared"]);
    fails(
        &e,
        &["checkpoint", "create", "app@late"],
        "member volume 'shared' of group 'app' no longer exists",
    );
    assert_eq!(checkpoint_names(&e, "g1"), g1_before);
    // Deleting a group checkpoint deletes each member's.
    ok(&e, &["checkpoint", "delete", "app@cold"]);
    assert!(!checkpoint_names(&e, "g1").contains(&"cold".to_string()));
    ok(&e, &["vm", "kill", "g1"]);
    fsck_clean(&e);
}
