//! `cairn bench --nbd`: Cairn's NBD daemon side by side with `qemu-nbd`, in one run, driven by the
//! same client (fio's nbd engine) against the same disk:
//!
//! - `qemu-nbd` serving a raw file (the reference the issue sets: Cairn must reach 90% of it);
//! - `cairn serve` serving a volume at depth 0 and after N checkpoints (each followed by scattered
//!   4 KiB overwrites, so the head really shares its tree with the checkpoints);
//! - `qemu-nbd` serving a qcow2 backing chain of the same depth;
//! - import of a qcow2 image with `cairn volume import` against `qemu-img convert` to a raw file.
//!
//! Both servers use the host page cache (`qemu-nbd --cache=writeback`, Cairn's buffered I/O), so
//! the comparison is like for like.

use anyhow::{bail, Context, Result};
use cairn_engine::{Options, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Plan {
    data: u64,
    depth: u64,
    /// Random 4 KiB overwrites after each checkpoint.
    overwrites: u64,
    /// Seconds each fio job measures, after `ramp` seconds it does not.
    seconds: u64,
    ramp: u64,
    /// Rounds of each job, qemu-nbd and Cairn in turn; the tables give medians.
    rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                data: 256 * MIB,
                depth: 50,
                overwrites: 64,
                seconds: 2,
                ramp: 0,
                rounds: 1,
            }
        } else {
            Plan {
                data: 1024 * MIB,
                depth: 1000,
                overwrites: 256,
                seconds: 10,
                ramp: 2,
                rounds: 3,
            }
        }
    }
}

/// One fio job: name, rw mode, block size, queue depth.
const JOBS: &[(&str, &str, &str, u32)] = &[
    ("random 4 KiB write, qd1", "randwrite", "4k", 1),
    ("random 4 KiB write, qd16", "randwrite", "4k", 16),
    ("random 4 KiB write, qd32", "randwrite", "4k", 32),
    ("random 4 KiB read, qd1", "randread", "4k", 1),
    ("random 4 KiB read, qd16", "randread", "4k", 16),
    ("random 4 KiB read, qd32", "randread", "4k", 32),
    ("random 4 KiB 70/30 read/write, qd16", "randrw", "4k", 16),
    ("random 64 KiB write, qd16", "randwrite", "64k", 16),
    ("sequential 1 MiB read, qd8", "read", "1M", 8),
    ("sequential 1 MiB write, qd8", "write", "1M", 8),
];

/// What one fio job measured: MiB/s for 1 MiB jobs, IOPS otherwise (reads and writes together
/// for a mix), and the 99th percentile completion latency in µs (the worse side for a mix).
#[derive(Debug, Clone, Copy)]
struct Measure {
    value: f64,
    p99_us: f64,
}

/// A server process that is stopped on drop.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) uri: String,
    what: String,
    /// The file it serves from (the raw image, or the store's data file).
    file: std::path::PathBuf,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SIGTERM so that cairn flushes and exits cleanly; qemu-nbd exits on it too.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(p: &Path, child: &mut Child, what: &str) -> Result<()> {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("{what} exited with {st} before listening");
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{what} did not listen on {} within 60 s", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn qemu_nbd(dir: &Path, image: &Path, format: &str, tag: &str) -> Result<ServerProcess> {
    let sock = dir.join(format!("qemu-nbd-{tag}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-t", "-k"])
        .arg(&sock)
        .args([
            "-f",
            format,
            "--cache=writeback",
            "--aio=threads",
            "-x",
            "b",
        ])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running qemu-nbd (install qemu-utils: ./scripts/setup.sh)")?;
    let what = format!("qemu-nbd ({format})");
    wait_for_socket(&sock, &mut child, &what)?;
    Ok(ServerProcess {
        child,
        uri: format!("nbd+unix:///b?socket={}", sock.display()),
        what,
        file: image.to_path_buf(),
    })
}

pub(crate) fn cairn_serve(store: &Path, volume: &str) -> Result<ServerProcess> {
    let mut child = Command::new(crate::cairn_exe()?)
        .arg("--store")
        .arg(store)
        .arg("serve")
        .env("CAIRN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running cairn serve")?;
    wait_for_socket(
        &cairn_control::control_socket(store),
        &mut child,
        "cairn serve",
    )?;
    Ok(ServerProcess {
        child,
        uri: cairn_daemon::nbd_uri(store, volume),
        what: "cairn serve".into(),
        file: store.join(cairn_engine::store::DATA_FILE),
    })
}

/// Runs one time-based fio job (nbd engine) against an NBD URI with `job` options
/// (`--rw=...`, `--bs=...`); returns fio's JSON report.
pub(crate) fn fio_json(uri: &str, job: &[String], seconds: u64) -> Result<serde_json::Value> {
    let out = Command::new("fio")
        .args([
            "--name=bench".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            format!("--runtime={seconds}"),
            "--time_based".into(),
            "--randrepeat=0".into(),
            "--output-format=json".into(),
        ])
        .args(job)
        .output()
        .context("running fio (install it: ./scripts/setup-tests.sh)")?;
    if !out.status.success() {
        bail!(
            "fio {} failed: {}",
            job.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before its JSON.
    let start = text.find('{').context("fio printed no JSON")?;
    serde_json::from_str(&text[start..]).context("fio JSON")
}

/// Runs one fio job against an NBD URI.
fn fio(uri: &str, job: &(&str, &str, &str, u32), plan: &Plan) -> Result<Measure> {
    let (_, rw, bs, qd) = *job;
    let mut args = vec![
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={qd}"),
        format!("--size={}", plan.data),
        format!("--ramp_time={}", plan.ramp),
    ];
    if rw == "randrw" {
        args.push("--rwmixread=70".into());
    }
    let v = fio_json(uri, &args, plan.seconds)?;
    let mut m = Measure {
        value: 0.0,
        p99_us: 0.0,
    };
    for side in ["read", "write"] {
        let j = &v["jobs"][0][side];
        if j["total_ios"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        m.value += if bs == "1M" {
            j["bw_bytes"].as_f64().unwrap_or(0.0) / MIB as f64
        } else {
            j["iops"].as_f64().unwrap_or(0.0)
        };
        let p99 = j["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0;
        m.p99_us = m.p99_us.max(p99);
    }
    Ok(m)
}

/// Puts a server's file in the same page-cache state before every job, whichever server and
/// whatever ran before: written back, evicted, then the whole export read once through the server
/// (`nbdcopy` to `null:`), as a VM's disk is after the guest read it. The state matters more than
/// the server: on this machine (Linux 6.18, ext4) 4 KiB writes into pages a read brought into the
/// cache run at about half the rate of writes into pages not cached, for qemu-nbd and Cairn alike
/// (qemu-nbd at qd16: 23,638 against 47,022 IOPS). Reading the export, not the file, leaves
/// what no guest reads (Cairn's free preallocated space) out of the cache, as it would be.
fn settle(server: &ServerProcess) -> Result<()> {
    let f = std::fs::File::open(&server.file)?;
    f.sync_data()?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
    crate::tool_ok("nbdcopy", &[&server.uri, "null:"])
}

/// Runs one job on `server`, telling a server that died from a job that failed.
fn job_on(
    server: &mut ServerProcess,
    job: &(&str, &str, &str, u32),
    plan: &Plan,
) -> Result<Measure> {
    if let Ok(Some(st)) = server.child.try_wait() {
        bail!("{} died ({st})", server.what);
    }
    settle(server)?;
    let r = fio(&server.uri, job, plan);
    match (r, server.child.try_wait()) {
        (Err(_), Ok(Some(st))) => bail!("{} died ({st})", server.what),
        (r, _) => r,
    }
}

/// Every job on both servers, `plan.rounds` times, the servers in turn within each job; the
/// median of each (value and p99 taken separately).
fn compare(
    peer: &mut ServerProcess,
    ours: &mut ServerProcess,
    plan: &Plan,
) -> Vec<[Result<Measure>; 2]> {
    eprintln!(
        "bench: fio against {} and {}, {} round(s)",
        peer.what, ours.what, plan.rounds
    );
    JOBS.iter()
        .map(|j| {
            let mut got: [Vec<Measure>; 2] = [Vec::new(), Vec::new()];
            let mut err: [Option<anyhow::Error>; 2] = [None, None];
            for _ in 0..plan.rounds {
                for (k, server) in [&mut *peer, &mut *ours].into_iter().enumerate() {
                    if err[k].is_some() {
                        continue;
                    }
                    match job_on(server, j, plan) {
                        Ok(m) => got[k].push(m),
                        Err(e) => err[k] = Some(e),
                    }
                }
            }
            let summary = |k: usize, err: &mut [Option<anyhow::Error>; 2]| match err[k].take() {
                Some(e) => Err(e),
                None => Ok(Measure {
                    value: crate::median(got[k].iter().map(|m| m.value).collect()),
                    p99_us: crate::median(got[k].iter().map(|m| m.p99_us).collect()),
                }),
            };
            [summary(0, &mut err), summary(1, &mut err)]
        })
        .collect()
}

/// One table: each job on qemu-nbd and Cairn, their ratio, and their p99 latencies.
fn table(results: &[[Result<Measure>; 2]], peer: &str, ours: &str) -> String {
    let mut t = format!(
        "| workload | {peer} | {ours} | {ours} / {peer} | p99 µs, {peer} | p99 µs, {ours} |\n|---|---|---|---|---|---|\n"
    );
    for (job, [p, o]) in JOBS.iter().zip(results) {
        let v = |r: &Result<Measure>| {
            r.as_ref()
                .map(|m| m.value)
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        let l = |r: &Result<Measure>| match r {
            Ok(m) => format!("{:.0}", m.p99_us),
            Err(_) => "-".into(),
        };
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            job.0,
            cell(&v(p)),
            cell(&v(o)),
            ratio(&v(o), &v(p)),
            l(p),
            l(o)
        ));
    }
    t
}

fn cell(r: &Result<f64>) -> String {
    match r {
        Ok(v) => format!("{v:.0}"),
        Err(e) => format!("failed: {}", e.to_string().lines().next().unwrap_or("")),
    }
}

fn ratio(a: &Result<f64>, b: &Result<f64>) -> String {
    match (a, b) {
        (Ok(a), Ok(b)) if *b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

pub(crate) fn random_file(path: &Path, bytes: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..bytes / MIB {
        rng.fill(&mut buf[..]);
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

fn time_it(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Runs the NBD benchmark in `dir` and returns the Markdown report.
pub fn run(dir: &Path, quick: bool, options: &Options) -> Result<String> {
    let plan = Plan::new(quick);
    let started = Instant::now();
    let mut report = format!(
        "NBD: {} MiB of data; fio (nbd engine) {} s per job after a {} s ramp, {} round(s) with qemu-nbd and Cairn in turn, medians; checkpoint depth {} with {} random 4 KiB overwrites after each checkpoint. Units: MiB/s for 1 MiB jobs, IOPS otherwise.\n\n",
        plan.data / MIB,
        plan.seconds,
        plan.ramp,
        plan.rounds,
        plan.depth,
        plan.overwrites
    );

    // Source data, and the qcow2 image both importers read.
    let raw = dir.join("data.raw");
    random_file(&raw, plan.data)?;
    let qcow2 = dir.join("source.qcow2");
    crate::tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &raw.display().to_string(),
            &qcow2.display().to_string(),
        ],
    )?;
    let _ = std::fs::read(&qcow2).map(drop); // both importers start from a cached source

    // Import: qemu-img convert to a raw file with the flags Cairn's import uses (parallel
    // out-of-order writes, flushed at the end) against cairn volume import, in turn for
    // `plan.rounds` rounds, each started with nothing left to write back; medians. The last
    // round's store is the one the jobs run on.
    eprintln!("bench: import of a {} MiB qcow2", plan.data / MIB);
    let peer_out = dir.join("convert-out.raw");
    let store_dir = dir.join("store");
    let (mut peer_s, mut ours_s) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        crate::tool_ok("sync", &[])?;
        peer_s.push(time_it(|| {
            crate::tool_ok(
                "qemu-img",
                &[
                    "convert",
                    "-t",
                    "writeback",
                    "-W",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    &qcow2.display().to_string(),
                    &peer_out.display().to_string(),
                ],
            )
        })?);
        let _ = std::fs::remove_file(&peer_out);
        if store_dir.exists() {
            std::fs::remove_dir_all(&store_dir)?;
        }
        Store::init(&store_dir, options.clone())?;
        crate::tool_ok("sync", &[])?;
        ours_s.push(time_it(|| {
            let file = qcow2.display().to_string();
            crate::cairn(
                &store_dir,
                &["volume", "import", "bench", &file, "--format", "qcow2"],
            )
            .map(drop)
        })?);
    }
    report.push_str("| import | qemu-img convert to raw | cairn volume import | cairn / qemu-img |\n|---|---|---|---|\n");
    let mbs = |secs: Vec<f64>| Ok(plan.data as f64 / MIB as f64 / crate::median(secs));
    let (p, o) = (mbs(peer_s), mbs(ours_s));
    report.push_str(&format!(
        "| {} MiB qcow2, MiB/s | {} | {} | {} |\n\n",
        plan.data / MIB,
        cell(&p),
        cell(&o),
        ratio(&o, &p)
    ));

    // Depth 0: qemu-nbd on the raw file and Cairn on the imported volume, in turn.
    let depth0 = {
        let mut peer = qemu_nbd(dir, &raw, "raw", "raw0")?;
        let mut ours = cairn_serve(&store_dir, "bench")?;
        compare(&mut peer, &mut ours, &plan)
    };
    report.push_str(&format!(
        "Depth 0 (no checkpoints):\n\n{}\n",
        table(&depth0, "qemu-nbd raw", "cairn")
    ));

    // Depth N: checkpoints with overwrites in between, made through the engine directly.
    eprintln!("bench: making {} checkpoints", plan.depth);
    {
        let store = Store::open(&store_dir, options.clone())?;
        let mut rng = StdRng::seed_from_u64(9);
        let block = vec![0x5Au8; 4096];
        for d in 1..=plan.depth {
            store.create_checkpoint("bench", &format!("c{d}"), None)?;
            for _ in 0..plan.overwrites {
                let off = rng.random_range(0..plan.data / 4096) * 4096;
                store.write("bench", off, &block)?;
            }
        }
        store.flush()?;
    }
    let n = plan.depth;
    let depthn = {
        let mut peer = qemu_nbd(dir, &raw, "raw", "rawn")?;
        let mut ours = cairn_serve(&store_dir, "bench")?;
        compare(&mut peer, &mut ours, &plan)
    };
    report.push_str(&format!(
        "Depth {n} (each checkpoint followed by {} random 4 KiB overwrites):\n\n{}\n",
        plan.overwrites,
        table(&depthn, "qemu-nbd raw", &format!("cairn @{n}"))
    ));
    // The same depth as a qcow2 backing chain, once per job (qemu-nbd 10 crashes on deep ones).
    let mut chain_top = None;
    crate::engine::qcow2_chain(dir, &raw, &[plan.depth], plan.data, |_, top| {
        chain_top = Some(top.to_path_buf());
        Ok(())
    })?;
    let once = Plan { rounds: 1, ..plan };
    let chain: Vec<String> = match chain_top
        .as_deref()
        .map(|top: &Path| qemu_nbd(dir, top, "qcow2", "chain"))
    {
        Some(Ok(mut s)) => JOBS
            .iter()
            .map(|j| cell(&job_on(&mut s, j, &once).map(|m| m.value)))
            .collect(),
        Some(Err(e)) => JOBS.iter().map(|_| format!("failed: {e}")).collect(),
        None => JOBS.iter().map(|_| "no chain".to_string()).collect(),
    };
    report.push_str(&format!("qemu-nbd on a qcow2 chain of {n}, one round: "));
    let cells: Vec<String> = JOBS
        .iter()
        .zip(&chain)
        .map(|(j, c)| format!("{} {c}", j.0))
        .collect();
    report.push_str(&cells.join("; "));
    report.push('\n');
    report.push_str(&format!(
        "\ntotal NBD benchmark time {:.0} s\n",
        started.elapsed().as_secs_f64()
    ));
    Ok(report)
}
