//! `cairn bench`: flags in, the report of the `cairn-bench` crate out.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

use crate::output::outln;

/// Options of `cairn bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// A short run (seconds; CI runs it): 1 GiB volume, 64 MiB written, depths 0/10/50.
    #[arg(long)]
    pub quick: bool,
    /// Directory for the scratch files (default: a temporary directory in the current one, so
    /// that Cairn and the peers use the same disk).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Skip the qcow2 chain comparison.
    #[arg(long)]
    pub no_qcow2: bool,
    /// Benchmark the NBD daemon against qemu-nbd (raw file and qcow2 chain) and import against
    /// qemu-img convert, instead of the engine.
    #[arg(long, conflicts_with = "vm")]
    pub nbd: bool,
    /// Benchmark standard checkpoints of a running test guest (pause, cost, apply time).
    #[arg(long, conflicts_with = "backup")]
    pub vm: bool,
    /// Benchmark backups (full, incremental after 1% change, restore) against restic and borg.
    #[arg(long, conflicts_with = "nbd")]
    pub backup: bool,
    /// Benchmark backups of a large volume (64 GiB; --quick: 1 GiB): their peak memory, and the
    /// 4 KiB I/O latency a VM on the volume sees while its checkpoint is backed up.
    #[arg(long, conflicts_with_all = ["nbd", "vm", "backup"])]
    pub backup_large: bool,
    /// Benchmark the lifecycle: the scheduler idle with 1,000 volumes on hourly policies,
    /// pruning 1,000 checkpoints, and group checkpoints of 4 running test guests against one.
    #[arg(long, conflicts_with_all = ["nbd", "vm", "backup", "backup_large"])]
    pub lifecycle: bool,
    /// Benchmark the HTTP API's reading calls (p50/p99) and the web UI's first paint in
    /// Chromium, with 10,000 checkpoints on one volume.
    #[arg(long, conflicts_with_all = ["nbd", "vm", "backup", "backup_large", "lifecycle"])]
    pub api: bool,
    /// Benchmark disk I/O inside the test guest (cairn-load, O_DIRECT, virtio-blk) with its disk
    /// on Cairn through QEMU's NBD client, on a raw file and on a qcow2 file with as many
    /// internal snapshots as the volume has checkpoints.
    #[arg(long, conflicts_with_all = ["nbd", "vm", "backup", "backup_large", "lifecycle", "api"])]
    pub guest_io: bool,
}

/// Runs the benchmark and prints its report (Markdown, or `{"report": ...}` with `--json`).
pub fn run(args: &BenchArgs, json: bool) -> Result<()> {
    let which = match (args.nbd, args.vm, args.backup, args.backup_large) {
        _ if args.lifecycle => cairn_bench::Bench::Lifecycle,
        _ if args.api => cairn_bench::Bench::Api,
        _ if args.guest_io => cairn_bench::Bench::GuestIo,
        (true, ..) => cairn_bench::Bench::Nbd,
        (_, true, ..) => cairn_bench::Bench::Vm,
        (_, _, true, _) => cairn_bench::Bench::Backup,
        (.., true) => cairn_bench::Bench::BackupLarge,
        _ => cairn_bench::Bench::Engine,
    };
    let settings = cairn_bench::Settings {
        quick: args.quick,
        dir: args.dir.clone(),
        no_qcow2: args.no_qcow2,
        options: crate::store_options(),
    };
    let report = cairn_bench::run(which, &settings)?;
    if json {
        crate::print_json(&serde_json::json!({ "report": report }))?;
    } else {
        outln!("{report}");
    }
    Ok(())
}
