//! `cairn bench --vm`: standard checkpoints of a running test guest (scripts/build-guest.sh),
//! through a real `cairn serve` and QEMU: how long the guest is paused, how long the whole
//! checkpoint takes, what the 1st and 2nd checkpoint cost in the store, and how long applying one
//! takes until the guest runs again.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{cairn, median};

pub(crate) fn json(store: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    Ok(serde_json::from_str(&cairn(store, &a)?)?)
}

/// Defines VM `name` on the test guest (scripts/build-guest.sh, or `CAIRN_GUEST_DIR`) with
/// `disk` and `memory`, `extra` added to its kernel command line.
pub(crate) fn define_guest(
    store: &Path,
    name: &str,
    disk: &str,
    memory: &str,
    extra: &str,
) -> Result<()> {
    let (k, i) = guest_files()?;
    cairn(
        store,
        &[
            "vm",
            "create",
            name,
            "--memory",
            memory,
            "--disk",
            disk,
            "--kernel",
            &k.display().to_string(),
            "--initrd",
            &i.display().to_string(),
            "--append",
            &format!("console=ttyS0 rdinit=/init quiet {extra}"),
        ],
    )?;
    Ok(())
}

/// The test guest's kernel and initramfs (scripts/build-guest.sh, or `CAIRN_GUEST_DIR`).
pub(crate) fn guest_files() -> Result<(PathBuf, PathBuf)> {
    let guest =
        PathBuf::from(std::env::var("CAIRN_GUEST_DIR").unwrap_or_else(|_| "target/guest".into()));
    let (kernel, initrd) = (guest.join("vmlinuz"), guest.join("initrd.img"));
    if !kernel.exists() || !initrd.exists() {
        bail!(
            "the test guest is missing in {}; run ./scripts/build-guest.sh (or set CAIRN_GUEST_DIR)",
            guest.display()
        );
    }
    Ok((
        std::fs::canonicalize(&kernel)?,
        std::fs::canonicalize(&initrd)?,
    ))
}

/// Waits until running VM `name` has booted (its second counter on the console).
pub(crate) fn wait_booted(store: &Path, name: &str) -> Result<()> {
    let console = store.join(format!("vms/{name}/console.log"));
    let t = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("cairn-counter 00000002")
    {
        if t.elapsed() > Duration::from_secs(180) {
            bail!("guest {name} did not boot within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs the VM benchmark in `dir`; returns the Markdown report.
pub fn run(dir: &Path, quick: bool) -> Result<String> {
    let (memory, count) = if quick { ("256M", 3) } else { ("1G", 7) };
    let store = dir.join("store");
    cairn(&store, &["init"])?;
    cairn(&store, &["volume", "create", "d1", "--size", "1G"])?;
    define_guest(&store, "g", "d1", memory, "cairn.heartbeat")?;
    // Stopped (SIGTERM, then waited for) when dropped at the end.
    let _daemon = crate::nbd::cairn_serve(&store, "d1")?;
    (|| -> Result<String> {
        let st = json(&store, &["vm", "start", "g"])?;
        let accel = st["accel"].as_str().unwrap_or("?").to_string();
        let console = store.join("vms/g/console.log");
        wait_booted(&store, "g")?;
        let beats = Heartbeat::watch(console.clone());
        let allocated =
            || -> Result<u64> { Ok(json(&store, &["space"])?["allocated"].as_u64().unwrap_or(0)) };
        let mut costs = Vec::new();
        let (mut gaps, mut quiet) = (Vec::new(), Vec::new());
        let (mut paused, mut downtime, mut total) = (Vec::new(), Vec::new(), Vec::new());
        let mut phases = [Vec::new(), Vec::new(), Vec::new()];
        for n in 1..=count {
            let before = allocated()?;
            let t0 = Instant::now();
            cairn(&store, &["checkpoint", "create", &format!("g@c{n}")])?;
            let t1 = Instant::now();
            costs.push(allocated()?.saturating_sub(before));
            let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(
                store.join(format!("vms/g/checkpoints/c{n}.json")),
            )?)?;
            let tm = &rec["timings"];
            paused.push(tm["paused_us"].as_f64().unwrap_or(0.0) / 1000.0);
            downtime.push(tm["snapshot_downtime_ms"].as_f64().unwrap_or(0.0));
            total.push(tm["total_us"].as_f64().unwrap_or(0.0) / 1000.0);
            for (i, k) in ["snapshot_us", "relayout_us", "store_us"]
                .iter()
                .enumerate()
            {
                phases[i].push(tm[k].as_f64().unwrap_or(0.0) / 1000.0);
            }
            std::thread::sleep(Duration::from_secs(1));
            gaps.push(beats.longest_gap(t0, t1)?);
            // The same length of quiet time, as the reference for the guest's own jitter.
            let q = Instant::now() - Duration::from_millis(900);
            quiet.push(beats.longest_gap(q, q + (t1 - t0).min(Duration::from_millis(800)))?);
        }
        drop(beats);
        // Disk-only checkpoints: the test guest runs qemu-guest-agent, so each is quiesced
        // (its file systems frozen) around the pause.
        let (mut frozen, mut disk_paused, mut disk_total) = (Vec::new(), Vec::new(), Vec::new());
        let mut kind = String::new();
        for n in 1..=count.min(5) {
            let out = json(
                &store,
                &["checkpoint", "create", &format!("g@d{n}"), "--disk-only"],
            )?;
            kind = out["kind"].as_str().unwrap_or("?").to_string();
            let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(
                store.join(format!("vms/g/checkpoints/d{n}.json")),
            )?)?;
            let tm = &rec["timings"];
            frozen.push(tm["frozen_us"].as_f64().unwrap_or(0.0) / 1000.0);
            disk_paused.push(tm["paused_us"].as_f64().unwrap_or(0.0) / 1000.0);
            disk_total.push(tm["total_us"].as_f64().unwrap_or(0.0) / 1000.0);
        }
        let mut applies = Vec::new();
        for n in 1..=count.min(3) {
            let t = Instant::now();
            // The apply alone: by default it first keeps the running state as a standard
            // checkpoint, which the checkpoint rows above already measure.
            let target = format!("g@c{n}");
            cairn(
                &store,
                &["checkpoint", "apply", &target, "--discard-current"],
            )?;
            applies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        cairn(&store, &["vm", "kill", "g"])?;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        Ok(format!(
            "VM: the test guest with {memory} of RAM and one 1 GiB disk, on {accel}; {count} standard checkpoints 1 s apart, then {} applies.\n\n\
             | measure | result |\n|---|---|\n\
             | guest paused by Cairn (QMP stop → disk checkpoints → snapshot start → cont), median | {:.1} ms (max {:.1}) |\n\
             | snapshot downtime reported by QEMU, median | {:.0} ms |\n\
             | seen from the guest: longest gap in its console heartbeat during the whole checkpoint, median (the same in quiet time) | {:.0} ms ({:.0} ms) |\n\
             | whole checkpoint, median: memory snapshot + re-layout with fixed page offsets + store in the state volume | {:.0} ms = {:.0} + {:.0} + {:.0} ms |\n\
             | store growth for the 1st / 2nd checkpoint | {:.1} MiB / {:.1} MiB |\n\
             | apply of a standard checkpoint to the running VM until the guest runs again, median | {:.0} ms |\n\
             | disk-only checkpoint ({}): file systems frozen / guest paused / whole, median | {:.1} / {:.1} / {:.0} ms |\n",
            applies.len(),
            median(paused.clone()),
            paused.iter().copied().fold(0.0, f64::max),
            median(downtime),
            median(gaps),
            median(quiet),
            median(total),
            median(phases[0].clone()),
            median(phases[1].clone()),
            median(phases[2].clone()),
            mib(costs[0]),
            mib(costs.get(1).copied().unwrap_or(0)),
            median(applies),
            kind,
            median(frozen),
            median(disk_paused),
            median(disk_total),
        ))
    })()
}

/// Arrival times of the guest's console heartbeat (a dot written in a busy loop when the kernel
/// command line says `cairn.heartbeat`): a thread polls the console log's length every 200 µs and
/// records when it grows. The longest gap between growths is how long the guest stood still, as
/// anything outside it would see.
struct Heartbeat {
    times: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Heartbeat {
    fn watch(console: PathBuf) -> Heartbeat {
        let times = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (t, s) = (times.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let len = std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
                if len != last {
                    last = len;
                    if let Ok(mut v) = t.lock() {
                        v.push(Instant::now());
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        Heartbeat { times, stop }
    }

    /// The longest time without a heartbeat between `from` and `to`, in milliseconds.
    fn longest_gap(&self, from: Instant, to: Instant) -> Result<f64> {
        let v = self
            .times
            .lock()
            .map_err(|_| anyhow::anyhow!("heartbeat watcher panicked"))?;
        let mut prev = from;
        let mut longest = Duration::ZERO;
        for &t in v.iter().filter(|&&t| t > from && t < to) {
            longest = longest.max(t - prev);
            prev = t;
        }
        if prev == from {
            bail!("the guest's heartbeat stopped (no console output during a checkpoint)");
        }
        Ok((longest.max(to - prev)).as_secs_f64() * 1000.0)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
