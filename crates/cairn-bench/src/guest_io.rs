//! `cairn bench --guest-io`: disk I/O as the test guest sees it, through QEMU's own block layer
//! and virtio-blk, with its disk on Cairn (QEMU's NBD client to `cairn serve`, as `cairn vm
//! start` attaches it), on a raw file, and on a qcow2 file with as many internal snapshots as the
//! Cairn volume has checkpoints. The guest runs `cairn-load` (scripts/guest-load.c), O_DIRECT
//! inside the guest, so each request crosses into QEMU; every QEMU gets the same command line
//! (`cairn_vm::qemu_args`) but for the disk's driver. Rounds alternate the three; medians.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_engine::{Options, Store};
use cairn_vm::VmSpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::median;
use crate::nbd::{cairn_serve, random_file};

const MIB: u64 = 1 << 20;

/// The guest's jobs (`RW:BS:QD`, see scripts/guest-load.c) and how the table names them.
const JOBS: &[(&str, &str)] = &[
    ("randread:4k:1", "4 KiB random read, qd1"),
    ("randwrite:4k:1", "4 KiB random write, qd1"),
    ("randread:4k:16", "4 KiB random read, qd16"),
    ("randwrite:4k:16", "4 KiB random write, qd16"),
    ("randrw70:4k:16", "4 KiB random 70/30 read/write, qd16"),
    ("randwrite:64k:4", "64 KiB random write, qd4"),
    ("read:1m:1", "1 MiB sequential read, qd1"),
    ("write:1m:1", "1 MiB sequential write, qd1"),
];
const QUICK_JOBS: &[(&str, &str)] = &[
    ("randread:4k:1", "4 KiB random read, qd1"),
    ("randwrite:4k:16", "4 KiB random write, qd16"),
];

struct Plan {
    data: u64,
    seconds: u32,
    ramp: u32,
    rounds: usize,
    snapshots: usize,
    jobs: &'static [(&'static str, &'static str)],
}

/// How the guest's disk is attached.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disk {
    Cairn,
    Raw,
    Qcow2,
}

impl Disk {
    fn label(self) -> &'static str {
        match self {
            Disk::Cairn => "Cairn (NBD)",
            Disk::Raw => "raw file",
            Disk::Qcow2 => "qcow2 file",
        }
    }
}

/// One job's result in one boot.
#[derive(Clone, Copy)]
struct JobResult {
    iops: f64,
    mib_s: f64,
    p99_us: f64,
}

/// Runs the benchmark in `dir`; returns its Markdown report.
pub fn run(dir: &Path, quick: bool, options: &Options) -> Result<String> {
    let plan = if quick {
        Plan {
            data: 256 * MIB,
            seconds: 2,
            ramp: 1,
            rounds: 1,
            snapshots: 10,
            jobs: QUICK_JOBS,
        }
    } else {
        Plan {
            data: 1024 * MIB,
            seconds: 10,
            ramp: 2,
            rounds: 3,
            snapshots: 100,
            jobs: JOBS,
        }
    };
    let guest = crate::vm::guest_files()?;
    let started = Instant::now();

    // The same data three ways: a Cairn volume, a raw file, a qcow2 file; then the same
    // number of checkpoints / internal snapshots, each followed by the same 16 random 4 KiB
    // writes.
    let raw = dir.join("disk.raw");
    random_file(&raw, plan.data)?;
    let qcow2 = dir.join("disk.qcow2");
    let (raw_s, qcow2_s) = (raw.display().to_string(), qcow2.display().to_string());
    crate::tool_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &raw_s, &qcow2_s],
    )?;
    let store_dir = dir.join("store");
    Store::init(&store_dir, options.clone())?;
    crate::cairn(
        &store_dir,
        &["volume", "import", "bench", &raw_s, "--format", "raw"],
    )?;
    eprintln!(
        "bench: {} checkpoints and qcow2 internal snapshots",
        plan.snapshots
    );
    {
        let store = Store::open(&store_dir, options.clone())?;
        let mut rng = StdRng::seed_from_u64(11);
        let block = vec![0x5Au8; 4096];
        for s in 0..plan.snapshots {
            let offsets: Vec<u64> = (0..16)
                .map(|_| rng.random_range(0..plan.data / 4096) * 4096)
                .collect();
            store.create_checkpoint("bench", &format!("s{s}"), None)?;
            let mut io = vec!["-f".to_string(), "qcow2".into()];
            for off in &offsets {
                store.write("bench", *off, &block)?;
                io.push("-c".into());
                io.push(format!("write -P 0x5a {off} 4k"));
            }
            io.push(qcow2_s.clone());
            crate::tool_ok("qemu-img", &["snapshot", "-c", &format!("s{s}"), &qcow2_s])?;
            crate::tool_ok(
                "qemu-io",
                &io.iter().map(String::as_str).collect::<Vec<_>>(),
            )?;
        }
        store.flush()?;
    }
    let server = cairn_serve(&store_dir, "bench")?;
    let nbd_socket = cairn_daemon::nbd_socket(&store_dir);

    let (accel, why) = cairn_vm::runtime::choose_accel(None);
    let disks = [Disk::Cairn, Disk::Raw, Disk::Qcow2];
    // results[disk][job] over rounds
    let mut results: Vec<Vec<Vec<JobResult>>> = vec![vec![Vec::new(); plan.jobs.len()]; 3];
    for round in 0..plan.rounds {
        for k in 0..disks.len() {
            let d = (round + k) % disks.len();
            let file = match disks[d] {
                Disk::Cairn => None,
                Disk::Raw => Some(raw.as_path()),
                Disk::Qcow2 => Some(qcow2.as_path()),
            };
            eprintln!("bench: round {} on {}", round + 1, disks[d].label());
            let got = boot(dir, &guest, &nbd_socket, disks[d], file, &accel, &plan)
                .with_context(|| format!("the guest on {}", disks[d].label()))?;
            for (j, r) in got.into_iter().enumerate() {
                results[d][j].push(r);
            }
        }
    }
    drop(server);

    let med = |d: usize, j: usize, f: fn(&JobResult) -> f64| -> f64 {
        median(results[d][j].iter().map(f).collect())
    };
    let mut out = format!(
        "The test guest ({accel}: {why}; 1 vCPU, 512 MiB) runs cairn-load with O_DIRECT on a {} MiB virtio-blk disk: Cairn through QEMU's NBD client (as `cairn vm start` attaches it) to `cairn serve`, a raw file, a qcow2 file (both QEMU's default writeback cache, as Cairn's NBD disk); {} checkpoints / internal snapshots, each followed by 16 random 4 KiB writes; {} s per job after a {} s ramp, {} round(s) alternating, medians. IOPS (MiB/s for 1 MiB jobs), p99 in µs.\n\n\
         | job | Cairn | raw | qcow2 | Cairn / raw | Cairn / qcow2 | p99 Cairn | p99 raw | p99 qcow2 |\n|---|---|---|---|---|---|---|---|---|\n",
        plan.data / MIB,
        plan.snapshots,
        plan.seconds,
        plan.ramp,
        plan.rounds
    );
    for (j, (spec, label)) in plan.jobs.iter().enumerate() {
        let big = spec.ends_with(":1m:1");
        let val = |d: usize| {
            if big {
                med(d, j, |r| r.mib_s)
            } else {
                med(d, j, |r| r.iops)
            }
        };
        let (c, r, q) = (val(0), val(1), val(2));
        out.push_str(&format!(
            "| {label} | {c:.0} | {r:.0} | {q:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |\n",
            c / r.max(1e-9),
            c / q.max(1e-9),
            med(0, j, |r| r.p99_us),
            med(1, j, |r| r.p99_us),
            med(2, j, |r| r.p99_us),
        ));
    }
    out.push_str(&format!(
        "\ntotal guest I/O benchmark time {:.0} s\n",
        started.elapsed().as_secs_f64()
    ));
    Ok(out)
}

/// QEMU, killed on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the guest once on `disk` and returns each job's result.
fn boot(
    dir: &Path,
    guest: &(PathBuf, PathBuf),
    nbd_socket: &Path,
    disk: Disk,
    file: Option<&Path>,
    accel: &str,
    plan: &Plan,
) -> Result<Vec<JobResult>> {
    let vm_dir = dir.join("vm");
    let _ = std::fs::remove_dir_all(&vm_dir);
    std::fs::create_dir_all(&vm_dir)?;
    let jobs: Vec<&str> = plan.jobs.iter().map(|j| j.0).collect();
    let spec = VmSpec {
        name: "guest-io".into(),
        memory: 512 * MIB,
        cpus: 1,
        disks: vec!["bench".into()],
        kernel: Some(guest.0.clone()),
        initrd: Some(guest.1.clone()),
        append: Some(format!(
            "console=ttyS0 rdinit=/init quiet cairn.noagent cairn.load={} cairn.loadsecs={} cairn.loadramp={}",
            jobs.join(","),
            plan.seconds,
            plan.ramp
        )),
        net: None,
        mac: cairn_vm::spec::fresh_mac(),
        uuid: cairn_vm::spec::fresh_uuid(),
        accel: None,
        created_ms: 0,
        parent: None,
    };
    let mut args = cairn_vm::runtime::qemu_args(&spec, &vm_dir, nbd_socket, accel);
    if disk != Disk::Cairn {
        let file = file.context("a file to attach")?;
        let i = args
            .iter()
            .position(|a| a == "-blockdev")
            .context("no -blockdev in the VM's command line")?;
        let mut node: Value = serde_json::from_str(&args[i + 1])?;
        let proto = serde_json::json!({"driver": "file", "filename": file});
        node["file"] = match disk {
            Disk::Qcow2 => serde_json::json!({"driver": "qcow2", "file": proto}),
            _ => proto,
        };
        args[i + 1] = node.to_string();
    }
    let qemu = cairn_vm::find_qemu().context("finding QEMU")?;
    let _vm = Qemu(
        Command::new(qemu.program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting QEMU")?,
    );
    let console = vm_dir.join("console.log");
    let limit =
        Duration::from_secs(120 + plan.jobs.len() as u64 * (plan.seconds + plan.ramp + 30) as u64);
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("cairn-load: done") {
            return parse(&text, plan);
        }
        if t.elapsed() > limit {
            bail!(
                "the guest did not finish its jobs within {} s",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The jobs' results from the guest's console.
fn parse(console: &str, plan: &Plan) -> Result<Vec<JobResult>> {
    let lines: Vec<Value> = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("cairn-load: "))
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    plan.jobs
        .iter()
        .map(|(spec, _)| {
            let v = lines
                .iter()
                .find(|v| v["job"] == *spec)
                .with_context(|| format!("no result for job {spec} on the guest's console"))?;
            if let Some(e) = v["error"].as_str() {
                bail!("job {spec}: {e}");
            }
            if v["errors"].as_u64() != Some(0) {
                bail!("job {spec}: {} I/O errors in the guest", v["errors"]);
            }
            Ok(JobResult {
                iops: v["iops"].as_f64().unwrap_or(0.0),
                mib_s: v["mib_s"].as_f64().unwrap_or(0.0),
                p99_us: v["p99_us"].as_f64().unwrap_or(0.0),
            })
        })
        .collect()
}
