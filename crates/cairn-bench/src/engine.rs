//! `cairn bench`: the engine benchmark. Everything is measured in one run on the same disk, side by
//! side with the peers the issue names (a plain file, and qcow2 backing chains through
//! `qemu-img bench`), and printed as a Markdown table so docs/benchmarks.md can keep it verbatim.
//!
//! The workload follows the engine issue: a large volume with data written, then checkpoints, each
//! followed by random 4 KiB overwrites of a fraction of the data. Head throughput is measured at each
//! depth; checkpoint creation is timed at the 1st, 100th and 10,000th checkpoint.

use anyhow::Result;
use cairn_engine::{Options, Store, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const BLOCK: u64 = 4096;

mod host;
mod latency;
mod qemu;
mod workload;

use host::*;
use latency::*;
pub(crate) use qemu::qcow2_chain;
use qemu::*;
use workload::*;

/// Runs the engine benchmark in `dir` (scratch files) with the store's `options`; returns the
/// Markdown report.
pub fn run(dir: &Path, quick: bool, no_qcow2: bool, options: &Options) -> Result<String> {
    let plan = Plan::new(quick);
    let mut report = String::new();
    let started = Instant::now();
    let memory = MemoryPeak::start();
    let paged_at_start = damon_paged_out();
    let reported_at_start = reported_to_host();
    // (depth, bytes the host paged out while that depth's throughput was measured)
    let mut paged_out: Vec<(u64, u64)> = Vec::new();
    // (depth, bytes of free memory handed back to the host meanwhile)
    let mut reported: Vec<(u64, u64)> = Vec::new();
    // (depth, free memory when that depth's measurements began)
    let mut free_at: Vec<(u64, u64)> = Vec::new();
    eprintln!("bench: scratch directory {}", dir.display());

    // Plain file.
    let plain_path = dir.join("plain.raw");
    let plain = PlainFile(
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&plain_path)?,
    );
    plain.0.set_len(plan.written)?;
    fill(&plain, plan.written, 1)?;

    // Cairn: the volume that gets the checkpoints, and a control volume with the same data that
    // never gets any. The plain file and the control are measured again beside the head at each
    // depth, so that a ratio compares one moment of the run, not its start with its end (the
    // store and the host's caches age as the run goes on).
    let store_dir = dir.join("store");
    let store = Store::init(&store_dir, options.clone())?;
    store.create_volume("bench", plan.volume)?;
    store.create_volume("control", plan.volume)?;
    let vol = CairnVolume {
        store: &store,
        head: Target::head("bench"),
    };
    let control = CairnVolume {
        store: &store,
        head: Target::head("control"),
    };
    fill(&vol, plan.written, 1)?;
    fill(&control, plan.written, 1)?;
    let mut tps: Vec<(u64, Sample)> = Vec::new();
    // (mark, median total, median excluding the checkpoint's own commit)
    let mut creates: Vec<(u64, f64, f64)> = Vec::new();
    let mut depth = 0u64;
    let mut rng = StdRng::seed_from_u64(3);
    let blocks = plan.written / BLOCK;
    let mut buf = vec![0u8; BLOCK as usize];
    let last = *plan.create_marks.last().unwrap_or(&0);
    let mut mark_samples: Vec<f64> = Vec::new();
    let mut mark_nocommit: Vec<f64> = Vec::new();
    let mut defrag = None;
    while depth <= last {
        if plan.depths.contains(&depth) && !tps.iter().any(|(d, _)| *d == depth) {
            // The deepest head, as it is now, for the defrag comparison (measure writes to it).
            if plan.depths.last() == Some(&depth) {
                store.create_checkpoint("bench", "pre-defrag", None)?;
                store.clone_checkpoint("bench", "pre-defrag", "defragged")?;
                store.delete_checkpoint("bench", "pre-defrag")?;
            }
            let paged_before = damon_paged_out();
            let reported_before = reported_to_host();
            if let Some(f) = free_memory() {
                free_at.push((depth, f));
            }
            let t = Sample::measure(&plain, &control, &vol, &plan, 10 + depth)?;
            if let (Some(a), Some(b)) = (paged_before, damon_paged_out()) {
                paged_out.push((depth, b.saturating_sub(a)));
            }
            if let (Some(a), Some(b)) = (reported_before, reported_to_host()) {
                reported.push((depth, b.saturating_sub(a)));
            }
            eprintln!(
                "bench: cairn at depth {depth}: seq read {:.0} MiB/s, seq write {:.0} MiB/s, rand read {:.0} / {:.0} IOPS (first time / again), rand write {:.0} IOPS ({:.0?})",
                t.head.seq_read, t.head.seq_write, t.head.rand_read_first, t.head.rand_read, t.head.rand_write, started.elapsed()
            );
            tps.push((depth, t));
            if plan.depths.last() == Some(&depth) {
                defrag = Some(defrag_and_measure(&store, &plain, &control, &plan, depth)?);
                eprintln!(
                    "bench: defrag at depth {depth} done ({:.0?})",
                    started.elapsed()
                );
            }
        }
        if depth == last {
            break;
        }
        // Take checkpoint depth+1 on flushed state, so the time is the checkpoint's own.
        store.flush()?;
        let before = store.stats();
        let t = Instant::now();
        store.create_checkpoint("bench", &format!("c{}", depth + 1), None)?;
        let secs = t.elapsed().as_secs_f64();
        let commit = (store.stats().commit_nanos - before.commit_nanos) as f64 / 1e9;
        depth += 1;
        // Median over the 11 checkpoints centred on each mark (the mark itself included).
        for &m in &plan.create_marks {
            if depth + 5 >= m && depth <= m + 5 {
                mark_samples.push(secs);
                mark_nocommit.push(secs - commit);
                if depth == m + 5 || (depth == last && m == last) {
                    creates.push((m, median(&mut mark_samples), median(&mut mark_nocommit)));
                    mark_samples.clear();
                    mark_nocommit.clear();
                }
            }
        }
        let n = (blocks as f64 * plan.overwrite_at(depth)).round() as u64;
        for i in 0..n {
            let b = rng.random_range(0..blocks);
            buf[0..8].copy_from_slice(&(depth * 1_000_000 + i).to_le_bytes());
            store.write("bench", b * BLOCK, &buf)?;
        }
    }
    let stall = stall_during_checkpoints(&store, blocks, plan.stall_checkpoints, plan.quiet)?;
    eprintln!(
        "bench: during checkpoints, reads {} and writes {} (p50 / p99 / p99.9 / max), commit median {:.1} ms ({:.0?})",
        stall.reads.summary(),
        stall.writes.summary(),
        stall.commit * 1e3,
        started.elapsed()
    );
    // A checkpoint holding exactly 1% unique data: write 1%, checkpoint, overwrite the same blocks.
    let n = (blocks as f64 * 0.01).round() as u64;
    let picks: Vec<u64> = (0..n).map(|_| rng.random_range(0..blocks)).collect();
    store.create_checkpoint("bench", "x-before", None)?;
    for (i, b) in picks.iter().enumerate() {
        buf[0..8].copy_from_slice(&(i as u64).to_le_bytes());
        store.write("bench", b * BLOCK, &buf)?;
    }
    store.create_checkpoint("bench", "x-unique", None)?;
    for b in &picks {
        buf[8] ^= 1;
        store.write("bench", b * BLOCK, &buf)?;
    }
    store.create_checkpoint("bench", "x-after", None)?;
    let t = Instant::now();
    let d = store.diff(
        &Target::parse("bench@x-before")?,
        &Target::parse("bench@x-unique")?,
    )?;
    let diff_secs = t.elapsed().as_secs_f64();
    let diff_bytes: u64 = d.iter().map(|e| e.length).sum();
    let space = store.space(Some("bench"))?;
    let unique = space.volumes[0]
        .checkpoints
        .iter()
        .find(|c| c.name == "x-unique")
        .map(|c| c.unique)
        .unwrap_or(0);
    // Meanwhile another thread reads the control volume, 4 KiB every 0.2 ms: a delete must not
    // stop the other volumes (its hole punching used to run with all I/O held off).
    let stop = AtomicBool::new(false);
    let (deleted, delete_secs, other_worst) = std::thread::scope(|sc| {
        let reader = sc.spawn(|| -> Result<f64> {
            let mut one = vec![0u8; BLOCK as usize];
            let mut worst = 0f64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                store.read(
                    &Target::head("control"),
                    (i * 7919 % blocks) * BLOCK,
                    &mut one,
                )?;
                worst = worst.max(t.elapsed().as_secs_f64());
                i += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(worst)
        });
        let t = Instant::now();
        let deleted = store.delete_checkpoint("bench", "x-unique");
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let worst = reader
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the reader thread panicked")));
        (deleted, secs, worst)
    });
    deleted?;
    let other_worst = other_worst?;
    let checkpoints = store.list_checkpoints("bench")?.len();
    drop(store);
    // One untimed open first, so that "warm" means the catalog is in the host's page cache (in
    // run F it had been pushed out by the data, and the warm open took 396 ms against 72 in D).
    let mut one = [0u8; 4096];
    Store::open(&store_dir, options.clone())?.read(&Target::head("bench"), 0, &mut one)?;
    let t = Instant::now();
    let reopened = Store::open(&store_dir, options.clone())?;
    reopened.read(&Target::head("bench"), 0, &mut one)?;
    let open_secs = t.elapsed().as_secs_f64();
    drop(reopened);
    // The same from a cold page cache (as after a host reboot), where each metadata page is a
    // disk read. Dropping the host's cache needs root, and slows whatever else runs there, so
    // only full runs do it (not the quick run CI makes).
    let cold_open_secs = if !quick && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok() {
        let t = Instant::now();
        let reopened = Store::open(&store_dir, options.clone())?;
        reopened.read(&Target::head("bench"), 0, &mut one)?;
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };
    let rss = peak_rss_mib();
    eprintln!("bench: cairn done ({:.0?})", started.elapsed());

    // qcow2 chains of the same depths, and the raw file through the same tool.
    // A peer that fails (qemu-img crashes on very deep chains) is reported, not fatal.
    let mut qcow: Vec<(u64, Result<f64, String>)> = Vec::new();
    let mut qraw = None;
    if !no_qcow2 && Command::new("qemu-img").arg("--version").output().is_ok() {
        qraw = Some(qemu_bench(&plain_path, "raw", plan.qcow2_reads)?);
        qcow2_chain(dir, &plain_path, &plan.depths, plan.written, |d, top| {
            let r = qemu_bench(top, "qcow2", plan.qcow2_reads).map_err(|e| e.to_string());
            eprintln!(
                "bench: qcow2 chain depth {d}: {r:?} ({:.0?})",
                started.elapsed()
            );
            qcow.push((d, r));
            Ok(())
        })?;
    }

    report.push_str(&format!(
        "Volume {} GiB, {} MiB written; after each checkpoint, random 4 KiB overwrites of {} of the written data. At each depth the plain file, a control volume in the same store with the same data and no checkpoints, and the head are measured one after the other.\n\n",
        plan.volume / GIB,
        plan.written / MIB,
        plan.overwrite.iter().map(|(u, f)| if *u == u64::MAX { format!("{}% beyond", f * 100.0) } else { format!("{}% up to depth {u}", f * 100.0) }).collect::<Vec<_>>().join(", ")
    ));
    report.push_str(
        "| head workload | depth | plain file | cairn control (no checkpoints) | cairn head | head / control | head / file |\n|---|---|---|---|---|---|---|\n",
    );
    type Pick = fn(&Throughput) -> f64;
    let rows: [(&str, Pick, &str); 5] = [
        ("sequential 1 MiB read", |t| t.seq_read, "MiB/s"),
        ("sequential 1 MiB write (+flush)", |t| t.seq_write, "MiB/s"),
        (
            "random 4 KiB read, qd1, first time",
            |t| t.rand_read_first,
            "IOPS",
        ),
        (
            "random 4 KiB read, qd1, same blocks again",
            |t| t.rand_read,
            "IOPS",
        ),
        ("random 4 KiB write, qd1 (+flush)", |t| t.rand_write, "IOPS"),
    ];
    for (name, f, unit) in rows {
        for (d, t) in &tps {
            report.push_str(&format!(
                "| {name} | {d} | {:.0} {unit} | {:.0} | {:.0} | {:.2} | {:.2} |\n",
                f(&t.file),
                f(&t.control),
                f(&t.head),
                f(&t.head) / f(&t.control),
                f(&t.head) / f(&t.file)
            ));
        }
    }
    report.push_str(&format!(
        "\nRandom writes: the median of {} rounds of {} writes plus a flush each, the plain file, the control and the head in turn, new blocks every round. Head / control per round: {}.\n",
        plan.write_rounds,
        plan.rand_writes,
        tps.iter()
            .map(|(d, t)| format!("depth {d}: {}", round_ratios(&t.write_rounds)))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let worst = |f: Pick, by: fn(&Sample) -> &Throughput| {
        tps.iter()
            .map(|(_, t)| f(&t.head) / f(by(t)))
            .fold(f64::INFINITY, f64::min)
    };
    report.push_str(&format!(
        "\nSummary: the worst depth's head against the control and against the plain file{}.\n\n| head workload | worst head / control | worst head / file |{}\n|---|---|---|{}\n",
        if defrag.is_some() { ", and the deepest head after `cairn volume defrag`" } else { "" },
        if defrag.is_some() { " after defrag / control | after defrag / file |" } else { "" },
        if defrag.is_some() { "---|---|" } else { "" }
    ));
    for (name, f, _) in rows {
        let after = defrag
            .as_ref()
            .map(|d| {
                format!(
                    " {:.2} | {:.2} |",
                    f(&d.after.head) / f(&d.after.control),
                    f(&d.after.head) / f(&d.after.file)
                )
            })
            .unwrap_or_default();
        report.push_str(&format!(
            "| {name} | {:.2} | {:.2} |{after}\n",
            worst(f, |t| &t.control),
            worst(f, |t| &t.file)
        ));
    }
    if let Some(raw) = qraw {
        report.push_str(&format!(
            "\nqcow2 backing chain of the same depths, `qemu-img bench` 4 KiB reads at qd1 (1 MiB+4 KiB stride); raw file through the same tool: {raw:.0} IOPS\n\n| chain depth | IOPS | vs depth 0 |\n|---|---|---|\n"
        ));
        let q0 = qcow
            .first()
            .and_then(|(_, v)| v.as_ref().ok().copied())
            .unwrap_or(1.0);
        for (d, v) in &qcow {
            match v {
                Ok(v) => report.push_str(&format!("| {d} | {v:.0} | {:.2} |\n", v / q0)),
                Err(e) => report.push_str(&format!("| {d} | {e} | - |\n")),
            }
        }
    }
    if let Some(d) = &defrag {
        report.push_str(&format!(
            "\nThe head at depth {} (a clone of it), before and after `cairn volume defrag` (default threshold: 2 MiB ranges in {} or more extents). It took {:.1} s, moved {} of {} ({} -> {} extents), {} of it shared with checkpoints, so the store grew by {}. The plain file and the control were measured again beside it.\n\n| head workload | cairn @{} | plain file | control | after defrag | after / control | after / file |\n|---|---|---|---|---|---|---|\n",
            d.depth,
            cairn_engine::DEFRAG_MIN_EXTENTS,
            d.secs,
            cairn_units(d.report.moved_bytes),
            cairn_units(d.report.mapped_bytes),
            d.report.extents_before,
            d.report.extents_after,
            cairn_units(d.report.shared_bytes),
            cairn_units(d.report.space_delta.max(0) as u64),
            d.depth
        ));
        let at = tps
            .iter()
            .find(|(dd, _)| *dd == d.depth)
            .map(|(_, t)| t.head)
            .unwrap_or_default();
        for (name, f, unit) in rows {
            report.push_str(&format!(
                "| {name} | {:.0} {unit} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |\n",
                f(&at),
                f(&d.after.file),
                f(&d.after.control),
                f(&d.after.head),
                f(&d.after.head) / f(&d.after.control),
                f(&d.after.head) / f(&d.after.file)
            ));
        }
        report.push_str(&format!(
            "\nRandom writes after defrag, head / control per round: {}.\n",
            round_ratios(&d.after.write_rounds)
        ));
    }
    report.push_str("\n| operation | result |\n|---|---|\n");
    for (m, s, x) in &creates {
        report.push_str(&format!(
            "| create checkpoint #{m}: median of the 11 around it, excluding / including its own commit (flush) | {:.3} ms / {:.3} ms |\n",
            x * 1e3,
            s * 1e3
        ));
    }
    let latency_row = |what: String, reads: &Latencies, writes: &Latencies| {
        format!(
            "| {what}, {} reads, {} writes | reads {}; writes {} |\n",
            reads.0.len(),
            writes.0.len(),
            reads.summary(),
            writes.summary()
        )
    };
    report.push_str(&latency_row(
        format!(
            "4 KiB reads / writes on the head (one thread each), p50 / p99 / p99.9 / max: for {:.0} s without checkpoints",
            plan.quiet.as_secs_f64()
        ),
        &stall.quiet_reads,
        &stall.quiet_writes,
    ));
    report.push_str(&latency_row(
        format!(
            "the same while {} checkpoints of the head were taken, 30 ms apart (their commits took {:.1} ms, median)",
            stall.checkpoints,
            stall.commit * 1e3
        ),
        &stall.reads,
        &stall.writes,
    ));
    report.push_str(&format!(
        "| delete a checkpoint holding {} unique ({} blocks overwritten after it); the longest 4 KiB read of another volume meanwhile | {:.1} ms; {:.1} ms |\n",
        cairn_units(unique),
        n,
        delete_secs * 1e3,
        other_worst * 1e3
    ));
    report.push_str(&format!(
        "| diff of two checkpoints 1% apart ({} reported) | {:.1} ms |\n",
        cairn_units(diff_bytes),
        diff_secs * 1e3
    ));
    report.push_str(&format!(
        "| open the store with {checkpoints} checkpoints + first read | {:.1} ms |\n",
        open_secs * 1e3
    ));
    report.push_str(&format!(
        "| the same with the host's page cache dropped first | {} |\n",
        cold_open_secs
            .map(|s| format!("{:.1} ms", s * 1e3))
            .unwrap_or_else(|| "n/a (full runs as root only)".into())
    ));
    let (anon, page_tables) = memory.stop();
    report.push_str(&format!(
        "| peak memory of the whole benchmark process: its own (anonymous, sampled every 50 ms) / its page tables (sampled likewise) / resident, counting the pages of the data file its mapping has touched (VmHWM) | {anon:.0} MiB / {page_tables:.0} MiB / {rss:.0} MiB |\n"
    ));
    if let (Some(a), Some(b)) = (paged_at_start, damon_paged_out()) {
        report.push_str(&format!(
            "| memory the host kernel paged out (DAMON) during the whole run; during each depth's throughput measurements | {}; {} |\n",
            cairn_units(b.saturating_sub(a)),
            per_depth(&paged_out)
        ));
    }
    if let (Some(a), Some(b)) = (reported_at_start, reported_to_host()) {
        report.push_str(&format!(
            "| free memory the guest kernel handed back to the host (free page reporting) during the whole run; during each depth's throughput measurements | {}; {} |\n",
            cairn_units(b.saturating_sub(a)),
            per_depth(&reported)
        ));
    }
    if !free_at.is_empty() {
        report.push_str(&format!(
            "| free memory (`MemFree`) when each depth's throughput measurements began | {} |\n",
            per_depth(&free_at)
        ));
    }
    report.push_str(&format!(
        "\ntotal benchmark time {:.0} s\n",
        started.elapsed().as_secs_f64()
    ));
    Ok(report)
}

/// The plain file, the control volume and a head, measured one after the other with the same
/// access pattern.
#[derive(Clone)]
struct Sample {
    file: Throughput,
    control: Throughput,
    head: Throughput,
    /// Each round's random writes: plain file, control, head (IOPS).
    write_rounds: Vec<[f64; 3]>,
}

impl Sample {
    fn measure(
        file: &dyn Disk,
        control: &dyn Disk,
        head: &dyn Disk,
        plan: &Plan,
        seed: u64,
    ) -> Result<Sample> {
        let mut sample = Sample {
            file: measure(file, plan, seed)?,
            control: measure(control, plan, seed)?,
            head: measure(head, plan, seed)?,
            write_rounds: Vec::new(),
        };
        // Random writes take well under a second each, and the time a 4 KiB write into a new
        // page costs here depends on whether the kernel's free memory is still the guest's or
        // was handed back to the host (docs/benchmarks.md, "Noise"): one round swung by a factor
        // of two where the data was the same. So the three take turns, several rounds, each
        // round new blocks, and the table shows medians.
        for round in 0..plan.write_rounds {
            let seed = seed * 1000 + round;
            sample.write_rounds.push([
                rand_writes(file, plan, seed)?,
                rand_writes(control, plan, seed)?,
                rand_writes(head, plan, seed)?,
            ]);
        }
        let median_of = |k: usize| {
            let mut v: Vec<f64> = sample.write_rounds.iter().map(|r| r[k]).collect();
            median(&mut v)
        };
        sample.file.rand_write = median_of(0);
        sample.control.rand_write = median_of(1);
        sample.head.rand_write = median_of(2);
        Ok(sample)
    }
}

/// The deepest head, defragmented and measured again.
struct DefragRun {
    depth: u64,
    secs: f64,
    report: cairn_engine::DefragReport,
    after: Sample,
}

/// Defragments the clone of the head taken at `depth` and measures it as the head was measured.
fn defrag_and_measure(
    store: &Store,
    file: &dyn Disk,
    control: &dyn Disk,
    plan: &Plan,
    depth: u64,
) -> Result<DefragRun> {
    store.flush()?;
    let t = Instant::now();
    let report = store.defrag(
        "defragged",
        cairn_engine::DEFRAG_MIN_EXTENTS,
        false,
        &mut |_| {},
    )?;
    let secs = t.elapsed().as_secs_f64();
    let clone = CairnVolume {
        store,
        head: Target::head("defragged"),
    };
    let after = Sample::measure(file, control, &clone, plan, 10 + depth)?;
    store.delete_volume("defragged")?;
    Ok(DefragRun {
        depth,
        secs,
        report,
        after,
    })
}

/// `(depth, bytes)` pairs as "1.0 GiB at depth 0, ...", for the report.
fn per_depth(v: &[(u64, u64)]) -> String {
    v.iter()
        .map(|(d, bytes)| format!("{} at depth {d}", cairn_units(*bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Head / control of each round of random writes, for the report.
fn round_ratios(rounds: &[[f64; 3]]) -> String {
    rounds
        .iter()
        .map(|r| format!("{:.2}", r[2] / r[1]))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cairn_units(b: u64) -> String {
    cairn_engine::names::human(b)
}

/// The median of `v` (sorted in place); 0 for none.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}
