//! `cairn bench --lifecycle`: what the lifecycle costs. The scheduler idle with 1,000 volumes on
//! hourly policies (the CPU share of its loop, measured two ways); pruning 1,000 checkpoints
//! (the decision, and the deletes that free their data); and group checkpoints of 4 running
//! test guests against a checkpoint of one, by the pause each guest sees.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_control::lifecycle::scheduler::Scheduler;
use cairn_control::lifecycle::{LifecycleOp, LifecycleReply, Policy};
use cairn_control::{Op, Reply, Service};
use cairn_engine::{Clock, Options};
use cairn_retention::KeepPolicy;

use crate::median;
use crate::vm::{define_guest, json, wait_booted};

/// This process's CPU time (user and system), from /proc.
fn cpu_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("odd /proc/self/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = rustix::param::clock_ticks_per_second();
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run_op(svc: &Service, op: Op) -> Result<Reply> {
    Ok(svc.run_here(op, &mut |_| {})?)
}

/// The scheduler with `n` volumes on hourly policies: (first run, idle tick, floor check, CPU
/// share of the idle loop measured over `idle`).
fn scheduler_idle(dir: &Path, n: usize, idle: Duration) -> Result<[f64; 4]> {
    let store_dir = dir.join("sched");
    let opts = Options::default();
    Service::init(&store_dir, opts.clone())?;
    let svc = Arc::new(Service::open(&store_dir, opts)?);
    for i in 0..n {
        let v = format!("v{i:04}");
        svc.store().create_volume(&v, 1 << 20)?;
        let p = Policy {
            target: v,
            every_secs: Some(3600),
            keep: KeepPolicy {
                last: 24,
                ..KeepPolicy::default()
            },
            ..Policy::default()
        };
        run_op(&svc, Op::Lifecycle(LifecycleOp::PolicySet(p)))?;
    }
    let s2 = svc.clone();
    let run = Box::new(move |op| s2.run_here(op, &mut |_| {}));
    let mut sched = Scheduler::new(svc.store().clone(), Clock::system(), run)?;
    let t = Instant::now();
    sched.tick();
    let first = t.elapsed();
    let mut ticks = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        sched.tick();
        ticks.push(ms(t.elapsed()));
    }
    let mut floors = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        sched.guard_floor();
        floors.push(ms(t.elapsed()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let before = cpu_time()?;
    let started = Instant::now();
    let looping = std::thread::spawn(move || sched.run_until(&flag));
    std::thread::sleep(idle);
    stop.store(true, Ordering::Relaxed);
    looping
        .join()
        .map_err(|_| anyhow::anyhow!("the scheduler loop panicked"))?;
    let share = (cpu_time()? - before).as_secs_f64() / started.elapsed().as_secs_f64() * 100.0;
    Ok([first.as_secs_f64(), median(ticks), median(floors), share])
}

/// `n` automatic checkpoints on one volume (4 KiB of its own each), pruned to the newest:
/// (decision ms, deletes s, MiB freed).
fn prune_many(dir: &Path, n: usize) -> Result<[f64; 3]> {
    let store_dir = dir.join("prune");
    let opts = Options::default();
    Service::init(&store_dir, opts.clone())?;
    let svc = Service::open(&store_dir, opts)?;
    let st = svc.store().clone();
    st.create_volume("p", 64 << 20)?;
    let block = vec![0x5au8; 4096];
    for i in 0..n {
        st.write("p", (i as u64 % 16_000) * 4096, &block)?;
        run_op(
            &svc,
            Op::CheckpointCreate {
                volume: "p".into(),
                name: Some(format!("a{i:05}")),
                description: None,
                disk_only: false,
                quiesce: false,
                automatic: true,
            },
        )?;
    }
    let p = Policy {
        target: "p".into(),
        keep: KeepPolicy {
            last: 1,
            ..KeepPolicy::default()
        },
        ..Policy::default()
    };
    run_op(&svc, Op::Lifecycle(LifecycleOp::PolicySet(p)))?;
    let prune = |dry_run| {
        Op::Lifecycle(LifecycleOp::Prune {
            target: Some("p".into()),
            dry_run,
        })
    };
    let t = Instant::now();
    let plan = run_op(&svc, prune(true))?;
    let decide = t.elapsed();
    let t = Instant::now();
    run_op(&svc, prune(false))?;
    let delete = t.elapsed().saturating_sub(decide);
    let freed = match plan {
        Reply::Lifecycle(LifecycleReply::Pruned(r)) => r.frees_total,
        _ => 0,
    };
    Ok([
        ms(decide),
        delete.as_secs_f64(),
        freed as f64 / (1 << 20) as f64,
    ])
}

/// Pauses of checkpoints of one running guest, then of `n` guests as a group, standard then
/// disk-only: (single median ms, group median of each checkpoint's longest pause ms, group
/// median of all) for each kind.
fn group_pauses(dir: &Path, n: usize, rounds: usize) -> Result<[f64; 6]> {
    let store = dir.join("vms");
    crate::cairn(&store, &["init"])?;
    let mut args = vec!["group".to_string(), "create".into(), "app".into()];
    for i in 0..n {
        let (vm, disk) = (format!("g{i}"), format!("d{i}"));
        crate::cairn(&store, &["volume", "create", &disk, "--size", "64M"])?;
        define_guest(&store, &vm, &disk, "256M", "")?;
        args.extend(["--vm".into(), vm]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::cairn(&store, &a)?;
    let _daemon = crate::nbd::cairn_serve(&store, "d0")?;
    let result = (|| -> Result<[f64; 6]> {
        for i in 0..n {
            crate::cairn(&store, &["vm", "start", &format!("g{i}")])?;
        }
        for i in 0..n {
            wait_booted(&store, &format!("g{i}"))?;
        }
        // Standard checkpoints, then disk-only ones: one guest alone, then the group.
        let mut out = [0.0; 6];
        for (k, extra) in [(0, None), (3, Some("--disk-only"))] {
            let mut single = Vec::new();
            for r in 0..rounds {
                let mut a = vec!["checkpoint", "create"];
                let target = format!("g0@s{k}{r}");
                a.push(&target);
                a.extend(extra);
                json(&store, &a)?;
                let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(
                    store.join(format!("vms/g0/checkpoints/s{k}{r}.json")),
                )?)?;
                single.push(rec["timings"]["paused_us"].as_f64().unwrap_or(0.0) / 1000.0);
            }
            let (mut longest, mut all) = (Vec::new(), Vec::new());
            for r in 0..rounds {
                let target = format!("app@t{k}{r}");
                let mut a = vec!["checkpoint", "create", target.as_str()];
                a.extend(extra);
                let cp = json(&store, &a)?;
                let pauses: Vec<f64> = cp["value"]["members"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|m| m["paused_us"].as_f64())
                            .map(|us| us / 1000.0)
                            .collect()
                    })
                    .unwrap_or_default();
                longest.push(pauses.iter().copied().fold(0.0, f64::max));
                all.extend(pauses);
            }
            out[k] = median(single);
            out[k + 1] = median(longest);
            out[k + 2] = median(all);
        }
        for i in 0..n {
            crate::cairn(&store, &["vm", "kill", &format!("g{i}")])?;
        }
        Ok(out)
    })();
    result
}

/// Runs the lifecycle benchmark in `dir`; returns the Markdown report.
pub fn run(dir: &Path, quick: bool) -> Result<String> {
    let (volumes, idle, checkpoints, guests, rounds) = match quick {
        true => (200, Duration::from_secs(3), 200, 2, 3),
        false => (1000, Duration::from_secs(65), 1000, 4, 5),
    };
    eprintln!("bench: scheduler with {volumes} volumes");
    let [first, tick, floor, share] = scheduler_idle(dir, volumes, idle)?;
    eprintln!("bench: pruning {checkpoints} checkpoints");
    let [decide, delete, freed] = prune_many(dir, checkpoints)?;
    eprintln!("bench: group checkpoints of {guests} running guests");
    let [single, longest, all, d_single, d_longest, d_all] = group_pauses(dir, guests, rounds)?;
    // The loop ticks once a minute when nothing is due and checks the floor (and the policy
    // file's time) once a second.
    let computed = (tick / 60_000.0 + floor / 1_000.0) * 100.0;
    Ok(format!(
        "Lifecycle: {volumes} volumes with their own hourly policies (keep-last 24); {checkpoints} automatic checkpoints on one volume pruned to the newest; {guests} running test guests (256 MiB) checkpointed as a group against one alone, {rounds} rounds each.\n\n\
         | measure | result |\n|---|---|\n\
         | scheduler, first run: one checkpoint of each of {volumes} volumes | {first:.2} s |\n\
         | scheduler, a tick with nothing due (every 60 s), median | {tick:.2} ms |\n\
         | scheduler, a floor check (every 1 s), median | {floor:.3} ms |\n\
         | scheduler idle: CPU share of one core, from the two above / measured over {} s | {computed:.3}% / {share:.2}% |\n\
         | prune {checkpoints} checkpoints to 1: deciding, with the exact total freed | {decide:.0} ms |\n\
         | prune: the deletes that free their data ({freed:.1} MiB) | {delete:.2} s |\n\
         | standard checkpoint of one running guest: guest paused, median | {single:.1} ms |\n\
         | group checkpoint of {guests} running guests: longest pause of any guest, median | {longest:.1} ms |\n\
         | group checkpoint: every guest's pause, median | {all:.1} ms |\n\
         | disk-only: one guest paused / group's longest pause / every guest's, median | {d_single:.1} / {d_longest:.1} / {d_all:.1} ms |\n",
        idle.as_secs(),
    ))
}
