//! The qcow2 peer: `qemu-img bench` reads and backing chains built with qemu-img and qemu-io.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::Command;

use super::*;

/// Runs `qemu-img bench` reads (queue depth 1, 4 KiB, 1 MiB + 4 KiB stride) and returns IOPS.
pub(super) fn qemu_bench(image: &Path, format: &str, count: u64) -> Result<f64> {
    let out = Command::new("qemu-img")
        .args([
            "bench",
            "-f",
            format,
            "-c",
            &count.to_string(),
            "-d",
            "1",
            "-s",
            "4096",
        ])
        .args([
            "-S",
            &(MIB + BLOCK).to_string(),
            "-t",
            "writeback",
            "-i",
            "threads",
        ])
        .arg(image)
        .output()
        .context("running qemu-img bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench failed ({}) {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let secs: f64 = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .context("unexpected qemu-img bench output")?;
    Ok(count as f64 / secs)
}

pub(super) fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Builds a qcow2 chain on a base converted from `raw`, each overlay holding a few scattered 64 KiB
/// writes, and calls `at` with the top image whenever the chain reaches one of `depths`.
pub(crate) fn qcow2_chain(
    dir: &Path,
    raw: &Path,
    depths: &[u64],
    written: u64,
    mut at: impl FnMut(u64, &Path) -> Result<()>,
) -> Result<()> {
    let base = dir.join("chain-0.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(&base),
    )?;
    let mut top = base;
    let mut rng = StdRng::seed_from_u64(7);
    let max = depths.iter().copied().max().unwrap_or(0);
    for d in 0..=max {
        if d > 0 {
            let next = dir.join(format!("chain-{d}.qcow2"));
            // `-u` and a detached backing file keep building the chain linear in its depth: the
            // writes cover whole 64 KiB clusters, so they never need to read the layers below.
            run_ok(
                Command::new("qemu-img")
                    .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(&top)
                    .arg(&next)
                    .arg(written.to_string()),
            )?;
            let mut io = Command::new("qemu-io");
            for _ in 0..4 {
                let off = rng.random_range(0..written / (64 * 1024)) * 64 * 1024;
                io.args(["-c", &format!("write -q -P {} {off} 64k", d % 256)]);
            }
            let json = serde_json::json!({
                "driver": "qcow2",
                "file": { "driver": "file", "filename": next },
                "backing": null,
            });
            run_ok(io.arg(format!("json:{json}")))?;
            top = next;
        }
        if depths.contains(&d) {
            at(d, &top)?;
        }
    }
    Ok(())
}
