//! Backups of a large volume (64 GiB in a full run, 1 GiB quick; three quarters of it data).
//! Every 4 KiB block of data holds its own number and compressible text, so every 64 KiB chunk
//! is new and the repository's index holds one entry per chunk (the most memory a volume of that
//! size can ask for), while the repository stays small enough to fit beside the store.
//!
//! Memory: a full backup, an incremental after 0.01% of the blocks changed, and a verify of
//! everything, each as `cairn` in its own process; their time and peak anonymous memory.
//!
//! I/O meanwhile: `cairn serve` serves the volume, and fio (nbd engine, random 4 KiB, 70% reads,
//! depth 4, as a VM's disk sees it) runs on its head while nothing else runs, and while the
//! daemon backs the checkpoint up (again and again, into fresh repositories, for as long as fio
//! runs), alternating, three rounds each; the table holds the medians of the 99th percentile
//! completion latencies.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use cairn_engine::{Options, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backup::{cairn_command, measured};
use crate::median;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One 4 KiB block: its number, then text that compresses well but differs a little per block.
fn block(n: u64, out: &mut [u8]) {
    const TEXT: &[u8] = b"Cairn keeps checkpoints of virtual machines; this line stands for the text, logs and configuration a disk holds. ";
    for (i, b) in out.iter_mut().enumerate() {
        *b = TEXT[i % TEXT.len()];
    }
    out[..8].copy_from_slice(&n.to_le_bytes());
}

/// Fills three of every four 4 MiB stretches of volume `disk` of a new store with distinct
/// blocks (the fourth stays a hole: a full run's 64 GiB volume then fits this machine's disk
/// beside its repository) and takes checkpoint `full`. Returns the bytes written.
fn load(store: &Path, size: u64, options: &Options) -> Result<u64> {
    Store::init(store, options.clone())?;
    let s = Store::open(store, options.clone())?;
    s.create_volume("disk", size)?;
    let mut buf = vec![0u8; 4 * MIB as usize];
    let (mut off, mut written) = (0, 0);
    while off < size {
        if (off / buf.len() as u64) % 4 != 3 {
            for (i, b) in buf.chunks_mut(4096).enumerate() {
                block(off / 4096 + i as u64, b);
            }
            s.write("disk", off, &buf)?;
            written += buf.len() as u64;
        }
        off += buf.len() as u64;
    }
    s.create_checkpoint("disk", "full", None)?;
    s.flush()?;
    Ok(written)
}

/// Runs the benchmark in `dir`; returns its Markdown report.
pub fn run(dir: &Path, quick: bool, options: &Options) -> Result<String> {
    let size = if quick { GIB } else { 64 * GIB };
    let started = Instant::now();
    let store = dir.join("store");
    let repo = dir.join("repo");
    let repo_arg = repo.display().to_string();
    eprintln!("bench: filling a {} GiB volume", size / GIB);
    let written = load(&store, size, options)?;
    let mut rows = Vec::new();
    let init = ["backup", "init", repo_arg.as_str()];
    measured(&mut cairn_command(&store, &init)?, "cairn backup init")?;
    let repo_args = ["--repo", repo_arg.as_str()];
    eprintln!("bench: full backup");
    let full = [&["backup", "create", "disk@full"][..], &repo_args].concat();
    rows.push((
        "full backup",
        measured(&mut cairn_command(&store, &full)?, "cairn backup create")?,
    ));
    {
        let s = Store::open(&store, options.clone())?;
        let mut rng = StdRng::seed_from_u64(7);
        let blocks = size / 4096;
        let mut b = vec![0u8; 4096];
        for _ in 0..blocks / 10_000 {
            let n = rng.random_range(0..blocks);
            block(n + blocks, &mut b);
            s.write("disk", n * 4096, &b)?;
        }
        s.create_checkpoint("disk", "inc", None)?;
        s.flush()?;
    }
    eprintln!("bench: incremental backup");
    let inc = [&["backup", "create", "disk@inc"][..], &repo_args].concat();
    rows.push((
        "incremental after 0.01% change",
        measured(&mut cairn_command(&store, &inc)?, "cairn backup create")?,
    ));
    eprintln!("bench: verify");
    let verify = [&["backup", "verify"][..], &repo_args].concat();
    rows.push((
        "verify (every chunk)",
        measured(&mut cairn_command(&store, &verify)?, "cairn backup verify")?,
    ));
    let io = io_impact(dir, &store, quick)?;
    let mut out = format!(
        "Volume {} GiB, {} GiB of it data: distinct compressible 4 KiB blocks ({} chunks, all different); repository {:.1} GiB. Run took {:.0} s.\n\n| step | time | peak anonymous memory |\n|---|---|---|\n",
        size / GIB,
        written / GIB,
        written / (64 << 10),
        crate::backup::du(&repo) as f64 / GIB as f64,
        started.elapsed().as_secs_f64()
    );
    for (what, (secs, kib)) in rows {
        out.push_str(&format!("| {what} | {secs:.1} s | {} MiB |\n", kib / 1024));
    }
    out.push_str(&io);
    Ok(out)
}

/// 99th percentile completion latencies of a VM-like fio job, read and write, in µs.
fn fio_p99(uri: &str, seconds: u64) -> Result<(f64, f64)> {
    let job: Vec<String> = [
        "--rw=randrw",
        "--rwmixread=70",
        "--bs=4k",
        "--iodepth=4",
        "--size=1g",
    ]
    .map(String::from)
    .to_vec();
    let v = crate::nbd::fio_json(uri, &job, seconds)?;
    let p99 = |side: &str| {
        v["jobs"][0][side]["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0
    };
    Ok((p99("read"), p99("write")))
}

/// fio's p99 latencies on the volume, idle and while the daemon backs its checkpoint up.
fn io_impact(dir: &Path, store: &Path, quick: bool) -> Result<String> {
    let seconds = if quick { 3 } else { 15 };
    let rounds = if quick { 1 } else { 3 };
    let server = crate::nbd::cairn_serve(store, "disk")?;
    let (mut idle, mut busy) = (Vec::new(), Vec::new());
    let mut backups = 0;
    for round in 0..rounds {
        eprintln!("bench: I/O latency round {}/{rounds}", round + 1);
        idle.push(fio_p99(&server.uri, seconds)?);
        let stop = AtomicBool::new(false);
        let (io, made) = std::thread::scope(|s| -> Result<((f64, f64), u32)> {
            let worker = s.spawn(|| -> Result<u32> {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let repo: PathBuf = dir.join(format!("impact-repo-{round}-{n}"));
                    let r = repo.display().to_string();
                    measured(
                        &mut cairn_command(store, &["backup", "init", &r])?,
                        "cairn backup init",
                    )?;
                    let args = ["backup", "create", "disk@full", "--repo", r.as_str()];
                    measured(&mut cairn_command(store, &args)?, "cairn backup create")?;
                    std::fs::remove_dir_all(&repo)?;
                    n += 1;
                }
                Ok(n)
            });
            // The backup is under way before fio starts measuring.
            std::thread::sleep(std::time::Duration::from_secs(1));
            let io = fio_p99(&server.uri, seconds);
            stop.store(true, Ordering::SeqCst);
            let made = worker
                .join()
                .map_err(|_| anyhow::anyhow!("backup thread panicked"))?;
            Ok((io?, made?))
        })?;
        busy.push(io);
        backups += made;
    }
    drop(server);
    let med = |v: &[(f64, f64)], read: bool| {
        median(v.iter().map(|x| if read { x.0 } else { x.1 }).collect())
    };
    let (ir, iw, br, bw) = (
        med(&idle, true),
        med(&idle, false),
        med(&busy, true),
        med(&busy, false),
    );
    Ok(format!(
        "\nI/O on the volume's head through `cairn serve` (fio nbd engine, random 4 KiB, 70% reads, depth 4, {seconds} s per run, {rounds} rounds alternating), idle and while the daemon backs the checkpoint up ({backups} backups ran):\n\n| p99 completion latency | idle | during backup | ratio (goal: at most 2) |\n|---|---|---|---|\n| read | {ir:.0} µs | {br:.0} µs | {:.2} |\n| write | {iw:.0} µs | {bw:.0} µs | {:.2} |\n",
        br / ir.max(1.0),
        bw / iw.max(1.0)
    ))
}
