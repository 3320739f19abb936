//! Latency of single requests while checkpoints are taken: the stall a checkpoint causes.

use anyhow::Result;
use cairn_engine::{Store, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

use super::*;

/// Latencies of single 4 KiB requests, in seconds, sorted.
pub(super) struct Latencies(pub(super) Vec<f64>);

impl Latencies {
    pub(super) fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        Latencies(v)
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub(super) fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
        self.0[i]
    }

    /// "p50 / p99 / p99.9 / max" in microseconds.
    pub(super) fn summary(&self) -> String {
        format!(
            "{:.0} / {:.0} / {:.0} / {:.0} µs",
            self.quantile(0.5) * 1e6,
            self.quantile(0.99) * 1e6,
            self.quantile(0.999) * 1e6,
            self.quantile(1.0) * 1e6
        )
    }
}

/// How guest I/O on the head is served while checkpoints of it are taken, against the same load
/// without them.
pub(super) struct Stall {
    pub(super) checkpoints: usize,
    pub(super) quiet_reads: Latencies,
    pub(super) quiet_writes: Latencies,
    pub(super) reads: Latencies,
    pub(super) writes: Latencies,
    /// Median time of the checkpoints' own commits, seconds.
    pub(super) commit: f64,
}

/// One thread reads and another writes random 4 KiB blocks of the head, first for `quiet` with
/// nothing else going on, then while `checkpoints` checkpoints are taken (30 ms apart); every
/// request's latency is kept. A checkpoint holds back the volume's writes only for its O(1)
/// in-memory part; its commit runs beside the I/O.
pub(super) fn stall_during_checkpoints(
    store: &Store,
    blocks: u64,
    checkpoints: usize,
    quiet: std::time::Duration,
) -> Result<Stall> {
    let (quiet_reads, quiet_writes, _) = load_while(store, blocks, |_| {
        std::thread::sleep(quiet);
        Ok(())
    })?;
    let (reads, writes, mut commits) = load_while(store, blocks, |commits| {
        for i in 0..checkpoints {
            std::thread::sleep(std::time::Duration::from_millis(30));
            let before = store.stats();
            store.create_checkpoint("bench", &format!("stall{i}"), None)?;
            commits.push((store.stats().commit_nanos - before.commit_nanos) as f64 / 1e9);
        }
        Ok(())
    })?;
    Ok(Stall {
        checkpoints,
        quiet_reads,
        quiet_writes,
        reads,
        writes,
        commit: median(&mut commits),
    })
}

/// Runs a random 4 KiB reader and writer on the head while `during` runs, and returns their
/// latencies and whatever `during` collected.
pub(super) fn load_while(
    store: &Store,
    blocks: u64,
    during: impl FnOnce(&mut Vec<f64>) -> Result<()>,
) -> Result<(Latencies, Latencies, Vec<f64>)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    let head = Target::head("bench");
    let run = |write: bool| -> Result<Vec<f64>> {
        let mut rng = StdRng::seed_from_u64(if write { 7 } else { 8 });
        let mut buf = vec![0u8; BLOCK as usize];
        let mut lat = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let b = rng.random_range(0..blocks);
            let t = Instant::now();
            if write {
                buf[0] = buf[0].wrapping_add(1);
                store.write("bench", b * BLOCK, &buf)?;
            } else {
                store.read(&head, b * BLOCK, &mut buf)?;
            }
            lat.push(t.elapsed().as_secs_f64());
        }
        Ok(lat)
    };
    let mut collected = Vec::new();
    std::thread::scope(|s| {
        let r = s.spawn(|| run(false));
        let w = s.spawn(|| run(true));
        let done = during(&mut collected);
        stop.store(true, Ordering::SeqCst);
        let reads = r
            .join()
            .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
        let writes = w
            .join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        done?;
        Ok((Latencies::new(reads), Latencies::new(writes), collected))
    })
}
