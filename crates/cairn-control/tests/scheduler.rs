//! The lifecycle scheduler on a manual clock: months of schedules and retention in a second,
//! checked against a model of the keep-* rules written here from their documentation; budgets;
//! a restart that made a missed run once; a policy whose volume went away.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use cairn_control::lifecycle::events::{self, EventKind};
use cairn_control::lifecycle::scheduler::Scheduler;
use cairn_control::lifecycle::{LifecycleOp, Policy};
use cairn_control::{Op, Service};
use cairn_engine::{Clock, Options};
use cairn_retention::KeepPolicy;
use chrono::{DateTime, Datelike, Local, TimeZone, Timelike};

const HOUR: u64 = 3_600_000;

/// A store on tmpfs where there is one (commits cost no disk syncs), on a manual clock.
fn store(start_ms: u64) -> (tempfile::TempDir, Arc<Service>, Clock) {
    let base = std::path::Path::new("/dev/shm");
    let dir = match base.is_dir() {
        true => tempfile::tempdir_in(base),
        false => tempfile::tempdir(),
    }
    .expect("tmp");
    let clock = Clock::manual(start_ms);
    let opts = Options {
        clock: clock.clone(),
        ..Options::default()
    };
    Service::init(dir.path(), opts.clone()).expect("init");
    let svc = Arc::new(Service::open(dir.path(), opts).expect("open"));
    (dir, svc, clock)
}

fn scheduler(svc: &Arc<Service>, clock: &Clock) -> Scheduler {
    let s = svc.clone();
    let run = Box::new(move |op| s.run_here(op, &mut |_| {}));
    Scheduler::new(svc.store().clone(), clock.clone(), run).expect("scheduler")
}

fn set_policy(svc: &Service, p: Policy) {
    svc.run_here(Op::Lifecycle(LifecycleOp::PolicySet(p)), &mut |_| {})
        .expect("policy");
}

/// The automatic checkpoints' creation times.
fn automatic(svc: &Service, volume: &str) -> BTreeSet<u64> {
    svc.store()
        .list_checkpoints(volume)
        .expect("list")
        .into_iter()
        .filter(|c| c.automatic)
        .map(|c| c.created_ms)
        .collect()
}

/// The keep-* rules as Proxmox Backup Server documents them: options in the order last,
/// hourly, daily, weekly, monthly, yearly; each keeps the newest item of each of its newest N
/// periods that have items, skipping periods an earlier option already kept an item in.
fn model(times: &[u64], keep: &KeepPolicy) -> BTreeSet<u64> {
    let at = |t: u64| -> DateTime<Local> {
        Local
            .timestamp_millis_opt(t as i64)
            .single()
            .expect("a local time")
    };
    type Key = fn(DateTime<Local>, u64) -> String;
    let rules: [(Key, u32); 6] = [
        (|_, t| t.to_string(), keep.last),
        (
            |d, _| format!("{}-{}-{}", d.date_naive(), d.hour(), 0),
            keep.hourly,
        ),
        (|d, _| d.date_naive().to_string(), keep.daily),
        (|d, _| format!("{:?}", d.iso_week()), keep.weekly),
        (|d, _| format!("{}-{}", d.year(), d.month()), keep.monthly),
        (|d, _| d.year().to_string(), keep.yearly),
    ];
    let mut newest_first = times.to_vec();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    let mut kept = BTreeSet::new();
    for (key, n) in rules {
        if n == 0 {
            continue;
        }
        let covered: HashSet<String> = kept.iter().map(|&t| key(at(t), t)).collect();
        let mut periods = HashSet::new();
        for &t in &newest_first {
            let k = key(at(t), t);
            if kept.contains(&t) || covered.contains(&k) || periods.contains(&k) {
                continue;
            }
            if periods.len() as u32 >= n {
                break;
            }
            periods.insert(k);
            kept.insert(t);
        }
    }
    kept
}

/// Eight months of checkpoints every three hours, with retention after each, end with exactly
/// the checkpoints the model keeps when it prunes after each run too (minus those past the
/// maximum age), and each run made one checkpoint.
#[test]
fn months_of_scheduled_checkpoints_keep_what_the_rules_say() {
    let start = 1_767_225_600_000 + 30 * 60_000; // 2026-01-01 00:30 UTC
    let (_dir, svc, clock) = store(start);
    svc.store().create_volume("v", 1 << 20).expect("volume");
    let keep = KeepPolicy {
        last: 4,
        hourly: 6,
        daily: 7,
        weekly: 4,
        monthly: 5,
        ..KeepPolicy::default()
    };
    set_policy(
        &svc,
        Policy {
            target: "v".into(),
            every_secs: Some(3 * 3600),
            keep,
            max_age_secs: Some(150 * 86_400),
            ..Policy::default()
        },
    );
    let mut s = scheduler(&svc, &clock);
    let end = start + 240 * 24 * HOUR;
    let mut runs = Vec::new();
    let t0 = std::time::Instant::now();
    while clock.now_ms() < end {
        let now = clock.now_ms();
        let next = s.tick();
        runs.push(now);
        assert!(next > now, "the next run is in the future");
        clock.set(next);
    }
    let took = t0.elapsed();
    let created: Vec<u64> = events::read(svc.store().dir().expect("a directory"), 0, usize::MAX)
        .expect("events")
        .iter()
        .filter(|e| e.kind == EventKind::Created)
        .map(|e| e.time_ms)
        .collect();
    assert!(created == runs, "one checkpoint per run, every three hours");
    assert_eq!(runs.len(), 240 * 8);
    // The model prunes after each run too: what one pass removed is gone for the next (so a
    // month may end up kept by a week's newest item, as repeated PBS prunes do).
    let mut model_set: Vec<u64> = Vec::new();
    for &t in &runs {
        model_set.push(t);
        let cutoff = t - 150 * 86_400_000;
        let kept = model(&model_set, &keep);
        model_set.retain(|x| kept.contains(x) && *x >= cutoff);
    }
    let want: BTreeSet<u64> = model_set.into_iter().collect();
    let have = automatic(&svc, "v");
    assert!(
        have == want,
        "kept {} checkpoints, the model {}: only kept {:?}, only in the model {:?}",
        have.len(),
        want.len(),
        have.difference(&want).collect::<Vec<_>>(),
        want.difference(&have).collect::<Vec<_>>()
    );
    assert!(want.len() > 15, "{}", want.len());
    eprintln!("{} scheduled runs with retention in {took:?}", runs.len());
}

/// Over its budget, the scheduler prunes per policy, then skips the checkpoint and says why;
/// nothing stored is touched.
#[test]
fn over_budget_the_next_checkpoint_is_skipped_with_a_reason() {
    let (_dir, svc, clock) = store(1_800_000_000_000);
    let st = svc.store().clone();
    st.create_volume("v", 8 << 20).expect("volume");
    set_policy(
        &svc,
        Policy {
            target: "v".into(),
            every_secs: Some(3600),
            keep: KeepPolicy {
                last: 100,
                ..KeepPolicy::default()
            },
            budget_bytes: Some(3 << 20),
            ..Policy::default()
        },
    );
    let mut s = scheduler(&svc, &clock);
    let mut seed = 1u64;
    for _ in 0..6 {
        // A fresh MiB each hour: each checkpoint holds one MiB of its own.
        let data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        st.write("v", 0, &data).expect("write");
        st.flush().expect("flush");
        let next = s.tick();
        clock.set(next);
    }
    let log = events::read(st.dir().expect("a directory"), 0, usize::MAX).expect("events");
    let created = log.iter().filter(|e| e.kind == EventKind::Created).count();
    let skipped: Vec<_> = log
        .iter()
        .filter(|e| e.kind == EventKind::Skipped)
        .collect();
    // The third checkpoint brings the first two to 1 MiB each of their own; after the next
    // write the three hold 3 MiB: the budget.
    assert_eq!(created, 3, "{log:#?}");
    assert_eq!(skipped.len(), 3, "{log:#?}");
    assert!(
        skipped[0].message.contains("over its budget of 3.0 MiB"),
        "{}",
        skipped[0].message
    );
    assert_eq!(automatic(&svc, "v").len(), 3, "nothing was pruned or lost");
}

/// A daemon down for ten hours makes the hourly checkpoint it missed once, then goes on hourly.
#[test]
fn a_restart_makes_a_missed_run_once() {
    let start = 1_800_000_000_000;
    let (_dir, svc, clock) = store(start);
    svc.store().create_volume("v", 1 << 20).expect("volume");
    set_policy(
        &svc,
        Policy {
            target: "v".into(),
            every_secs: Some(3600),
            ..Policy::default()
        },
    );
    let mut s = scheduler(&svc, &clock);
    assert_eq!(s.tick(), start + HOUR);
    drop(s);
    clock.set(start + 10 * HOUR + 5);
    let mut s = scheduler(&svc, &clock);
    let next = s.tick();
    assert_eq!(next, start + 11 * HOUR + 5, "hourly from the run it made");
    assert_eq!(s.tick(), next, "nothing more is due now");
    assert_eq!(
        automatic(&svc, "v").len(),
        2,
        "one run for the ten missed slots"
    );
}

/// A policy whose volume was deleted logs one failure per slot and touches nothing else.
#[test]
fn a_policy_on_a_deleted_volume_says_so() {
    let (_dir, svc, clock) = store(1_800_000_000_000);
    let st = svc.store().clone();
    st.create_volume("gone", 1 << 20).expect("volume");
    st.create_volume("kept", 1 << 20).expect("volume");
    st.create_checkpoint("kept", "mine", None)
        .expect("checkpoint");
    set_policy(
        &svc,
        Policy {
            target: "gone".into(),
            every_secs: Some(60),
            keep: KeepPolicy {
                last: 1,
                ..KeepPolicy::default()
            },
            ..Policy::default()
        },
    );
    st.delete_volume("gone").expect("delete");
    let mut s = scheduler(&svc, &clock);
    let next = s.tick();
    assert_eq!(s.tick(), next, "one failure per slot, not per tick");
    let log = events::read(st.dir().expect("a directory"), 0, usize::MAX).expect("events");
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0].kind, EventKind::Failed);
    assert!(
        log[0].message.contains("cairn policy clear gone"),
        "{}",
        log[0].message
    );
    assert_eq!(st.list_checkpoints("kept").expect("list").len(), 1);
}
