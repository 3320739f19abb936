//! `cairn bench`: the engine benchmark table (filled in below).

use anyhow::Result;
use clap::Args;

/// Options of `cairn bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// A short run (CI): small volume, few checkpoints.
    #[arg(long)]
    pub quick: bool,
}

/// Runs the benchmark.
pub fn run(_args: &BenchArgs, _json: bool) -> Result<()> {
    anyhow::bail!("not yet")
}
