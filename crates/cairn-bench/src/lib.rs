//! `cairn bench`: Cairn measured side by side with the peers its issues name, in one run on the
//! same disk, each report a Markdown table that docs/benchmarks.md keeps verbatim. [`engine`] is
//! the store against a plain file and qcow2 backing chains; [`nbd`] the daemon against qemu-nbd
//! with fio, and import against `qemu-img convert`; [`vm`] standard checkpoints of a running
//! test guest; [`backup`] backups against restic and borg; [`backup_large`] backups of a large
//! volume: their memory, and the I/O latency the volume's user sees meanwhile; [`lifecycle`] the
//! scheduler, pruning and group checkpoints; [`api`] the HTTP API and the web UI's first paint
//! with 10,000 checkpoints; [`guest_io`] disk I/O inside the test guest on Cairn against raw and
//! qcow2 files. The `cairn bench` command parses its flags and
//! prints what these return.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cairn_engine::Options;
use std::process::Command;

pub mod api;
pub mod backup;
pub mod backup_large;
pub mod engine;
pub mod guest_io;
mod http;
pub mod lifecycle;
pub mod nbd;
pub mod vm;

/// Which benchmark, and how.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A short run (seconds; CI runs it).
    pub quick: bool,
    /// Where the scratch directory goes (the current directory by default, so that Cairn and the
    /// peers use the same disk).
    pub dir: Option<PathBuf>,
    /// Skip the engine benchmark's qcow2 chain comparison.
    pub no_qcow2: bool,
    /// The store's options (as `cairn serve` would open it).
    pub options: Options,
}

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    /// The engine against a plain file and qcow2 chains.
    Engine,
    /// The NBD daemon against qemu-nbd.
    Nbd,
    /// Checkpoints of a running VM.
    Vm,
    /// Backups against restic and borg.
    Backup,
    /// Backups of a large volume: memory, and I/O latency meanwhile.
    BackupLarge,
    /// The lifecycle: scheduler idle, pruning many checkpoints, group checkpoint pauses.
    Lifecycle,
    /// The HTTP API's reading calls and the web UI's first paint with 10,000 checkpoints.
    Api,
    /// Disk I/O inside the test guest on Cairn, a raw file and a qcow2 file.
    GuestIo,
}

/// Runs `bench` in a scratch directory removed afterwards; returns its Markdown report.
pub fn run(bench: Bench, settings: &Settings) -> Result<String> {
    let parent = settings.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let tmp = tempdir_in(&parent)?;
    eprintln!("bench: scratch directory {}", tmp.path.display());
    match bench {
        Bench::Engine => engine::run(
            &tmp.path,
            settings.quick,
            settings.no_qcow2,
            &settings.options,
        ),
        Bench::Nbd => nbd::run(&tmp.path, settings.quick, &settings.options),
        Bench::Vm => vm::run(&tmp.path, settings.quick),
        Bench::Backup => backup::run(&tmp.path, settings.quick, &settings.options),
        Bench::BackupLarge => backup_large::run(&tmp.path, settings.quick, &settings.options),
        Bench::Lifecycle => lifecycle::run(&tmp.path, settings.quick),
        Bench::Api => api::run(&tmp.path, settings),
        Bench::GuestIo => guest_io::run(&tmp.path, settings.quick, &settings.options),
    }
}

/// A scratch directory removed on drop.
struct TempDir {
    path: PathBuf,
}

fn tempdir_in(parent: &Path) -> Result<TempDir> {
    let path = parent.join(format!(".cairn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
    // qcow2 overlays record their backing file by this path: it must not be relative.
    let path = path.canonicalize()?;
    Ok(TempDir { path })
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a peer tool; it must succeed.
/// The median of `v` (the upper one of an even count; 0 for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) fn tool_ok(program: &str, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| {
            format!("cannot run {program}; is it installed? (scripts/setup.sh installs it)")
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!(
            "{program} {} failed: {}",
            args.first().unwrap_or(&""),
            err.lines().last().unwrap_or("no message")
        );
    }
    Ok(())
}

/// Runs `cairn --store STORE ARGS` (the binary running this), as a user would; it must succeed.
pub(crate) fn cairn(store: &Path, args: &[&str]) -> Result<String> {
    let exe = cairn_exe()?;
    let out = Command::new(exe)
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .context("running cairn")?;
    if !out.status.success() {
        bail!(
            "cairn {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the `cairn` binary running this is (the benchmarks start `cairn serve` and CLI commands
/// as a user would).
pub(crate) fn cairn_exe() -> Result<PathBuf> {
    std::env::current_exe().context("finding the cairn binary")
}
