//! `cairn`: the command-line face of Cairn's checkpoint engine.

mod backend;
mod backup;
mod bench;
mod checkpoint;
mod console;
mod convert;
mod demo;
mod events;
mod group;
mod output;
mod policy;
mod serve;
mod space;
mod terminal;
mod token;
mod units;
mod vm;
mod volume;

use anyhow::{bail, Context, Result};
use backend::Backend;
pub(crate) use cairn_control::names::time_str;
use cairn_control::{Op, Reply};
use cairn_engine::Options;
use checkpoint::checkpoint_target;
use clap::{Parser, Subcommand};
use output::outln;
pub(crate) use output::print_json;
use std::io::Write;
use std::path::PathBuf;
pub(crate) use terminal::{confirm, progress, spinner};
use units::human;

/// Copy-on-write virtual disks with O(1) checkpoints.
#[derive(Parser)]
#[command(name = "cairn", version, about)]
struct Cli {
    /// Store directory (default: $CAIRN_STORE, else $XDG_DATA_HOME/cairn or ~/.local/share/cairn).
    #[arg(long, global = true, env = "CAIRN_STORE")]
    store: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables (errors too: {"error": {"kind", "message"}}).
    #[arg(long, global = true)]
    json: bool,
    /// Answer yes to confirmations (deleting a volume or VM with checkpoints, overwriting a
    /// file); without a terminal to ask on, such commands need it.
    #[arg(long, short = 'y', global = true)]
    yes: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an empty store.
    Init,
    /// Manage volumes (virtual disks).
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Manage checkpoints of a volume or VM.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCmd),
    /// Create a volume whose head starts as a checkpoint of another (a linked clone).
    Clone {
        /// Source, as VOLUME@CHECKPOINT.
        source: String,
        /// Name of the new volume.
        new_name: String,
    },
    /// List the byte ranges that differ between two states of a volume (NAME alone is the head).
    Diff {
        /// First state: VOLUME or VOLUME@CHECKPOINT.
        a: String,
        /// Second state.
        b: String,
    },
    /// Show space per checkpoint and volume, and store totals.
    Space {
        /// Only this volume.
        name: Option<String>,
    },
    /// Verify every invariant of the store: checksums, references, records.
    Fsck,
    /// Back up checkpoints into a deduplicated, encrypted repository (a directory or S3), and
    /// verify and restore them.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// Groups of VMs and volumes checkpointed at one instant and applied together.
    #[command(subcommand)]
    Group(group::GroupCmd),
    /// Bearer tokens for the HTTP API (`cairn serve --http`).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Lifecycle policies: scheduled checkpoints, retention, space budgets, scheduled backups.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Apply retention now: delete the checkpoints the policies do not keep (pinned and, unless
    /// a policy says --include-manual, named ones stay), after showing each with the exact
    /// space it frees and the total.
    Prune {
        /// Only this VM or volume (default: every one with a policy).
        name: Option<String>,
        /// Only show what would go and what it frees.
        #[arg(long)]
        dry_run: bool,
    },
    /// What the daemon's lifecycle did and why: checkpoints taken and pruned (with the bytes
    /// freed), skipped over a budget or the floor, backups done or failed.
    Events {
        /// Keep printing events as they land.
        #[arg(short, long)]
        follow: bool,
        /// Show at most the newest N.
        #[arg(long, default_value_t = 50, value_name = "N")]
        limit: usize,
    },
    /// Run a benchmark (the engine by default, --nbd, --vm) and print its table.
    Bench(bench::BenchArgs),
    /// Cairn's main job in under a minute, on a store of its own: the test guest booted on a
    /// Cairn volume, a standard checkpoint while it runs, its disk broken, the checkpoint applied,
    /// the guest running again; then the tree and the space. Cleans up after itself.
    Demo {
        /// Keep the demo's store (its path is printed) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// Define, run and inspect VMs whose disks are Cairn volumes.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Print a shell completion script (e.g. `cairn completions bash > /etc/bash_completion.d/cairn`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages: cairn.1 and one per command (cairn-checkpoint-apply.1...) into DIR, or
    /// cairn.1 alone to stdout.
    Man {
        /// Directory to write every page into.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Run the daemon: own the store and serve every volume (read-write) and checkpoint
    /// (read-only) over NBD on STORE/nbd.sock until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
}

/// The engine's options for this process: the defaults, except for two switches meant for
/// comparisons and for hosts where a fast path misbehaves. `CAIRN_MAPPED_READS=0` turns off serving
/// short reads from a mapping of the data file (docs/design.md, "Read path"): the mapped pages then
/// no longer count in this process's resident memory, at the cost of a third of the speed of random
/// reads from the host's cache. `CAIRN_DIRECT_WRITES=0` sends long copies-on-write through the
/// page cache like every other write (docs/design.md, "Write path"). `CAIRN_WRITE_BEHIND=0` makes
/// long copies-on-write wait for their data and metadata before they are acknowledged
/// (`store/write_behind.rs` in the engine).
pub(crate) fn store_options() -> Options {
    Options::from_env()
}

fn default_store() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("cairn"));
    }
    let home = std::env::var_os("HOME")
        .context("cannot find a default store: set --store, CAIRN_STORE or HOME")?;
    Ok(PathBuf::from(home).join(".local/share/cairn"))
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Known before parsing, so that a malformed command line is reported as JSON too.
    let json = args.iter().any(|a| a == "--json");
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            // clap's text up to its usage lines, on one line.
            let text = e.to_string();
            let what = text.split("\nUsage:").next().unwrap_or_default();
            let message: Vec<&str> = what.split_whitespace().collect();
            let message = message.join(" ");
            output::json_error("usage", message.trim_start_matches("error: "));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    if let Err(e) = run(cli) {
        if output::is_broken_pipe(&e) {
            std::process::exit(output::BROKEN_PIPE_STATUS);
        }
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        if json {
            output::json_error(output::error_kind(&e), &msg.join(": "));
        } else {
            eprintln!("cairn: error: {}", msg.join(": "));
        }
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let dir = match &cli.store {
        Some(d) => d.clone(),
        None => default_store()?,
    };
    let json = cli.json;
    let open = || Backend::open(&dir);
    match cli.cmd {
        Cmd::Init => {
            cairn_control::Service::init(&dir, store_options())?;
            if json {
                print_json(&serde_json::json!({ "store": dir }))?;
            } else {
                outln!("initialised store at {}", dir.display());
            }
        }
        Cmd::Volume(cmd) => volume::run(open()?, cmd, json, cli.yes, &dir)?,
        Cmd::Checkpoint(cmd) => checkpoint::run(&open()?, cmd, json, cli.yes)?,
        Cmd::Clone { source, new_name } => {
            let (v, c) = checkpoint_target(&source)?;
            let reply = open()?.call(Op::Clone {
                volume: v,
                checkpoint: c,
                new_name: new_name.clone(),
            })?;
            match (&reply, json) {
                (Reply::Volume(i), true) => print_json(i)?,
                (Reply::Vm(i), true) => print_json(i)?,
                (Reply::Vm(i), false) => outln!(
                    "cloned {source} as VM '{new_name}' with disks {} (fresh MAC {} and UUID)",
                    i.disks.join(", "),
                    i.mac
                ),
                (Reply::Volume(_), false) => outln!("cloned {source} as volume '{new_name}'"),
                (other, _) => bail!("unexpected reply {other:?}"),
            }
        }
        Cmd::Diff { a, b } => {
            let extents = open()?.extents(Op::Diff {
                a: a.clone(),
                b: b.clone(),
            })?;
            let total: u64 = extents.iter().map(|e| e.length).sum();
            if json {
                print_json(
                    &serde_json::json!({ "a": a, "b": b, "bytes": total, "extents": extents }),
                )?;
            } else {
                outln!("{:>16} {:>12}", "OFFSET", "LENGTH");
                for e in &extents {
                    outln!("{:>16} {:>12}", e.offset, e.length);
                }
                outln!(
                    "{} range(s), {} differ between {a} and {b}",
                    extents.len(),
                    human(total)
                );
            }
        }
        Cmd::Space { name } => space::run(&open()?, name, json)?,
        Cmd::Backup(cmd) => backup::run(&open()?, cmd, json, cli.yes)?,
        Cmd::Policy(cmd) => policy::run(&open()?, cmd, json)?,
        Cmd::Group(cmd) => group::run(&open()?, cmd, json)?,
        Cmd::Token(cmd) => token::run(&open()?, cmd, json)?,
        Cmd::Prune { name, dry_run } => policy::prune(&open()?, name, dry_run, json, cli.yes)?,
        Cmd::Events { follow, limit } => events::run(&open()?, limit, follow, json)?,
        Cmd::Fsck => {
            // Without a daemon, fsck reads the files itself: it must report on a store that does
            // not even open. With one, the daemon checks the store it has open.
            let report = match cairn_control::Client::find(&dir) {
                Some(c) => match c.call(&Op::Fsck)? {
                    Reply::Fsck(r) => r,
                    other => bail!("unexpected reply {other:?}"),
                },
                None => cairn_engine::fsck::check_dir(&dir)?,
            };
            if json {
                print_json(&report)?;
            } else {
                for e in &report.errors {
                    outln!("error: {e}");
                }
                let pending = match report.dropped_trees {
                    0 => String::new(),
                    n => format!(", {n} deleted tree(s) still being freed"),
                };
                outln!(
                    "checked {} metadata pages, {} data blocks, {} volumes, {} checkpoints{pending}: {}",
                    report.pages,
                    report.data_blocks,
                    report.volumes,
                    report.checkpoints,
                    if report.ok() {
                        "no problems".to_string()
                    } else {
                        format!("{} problem(s)", report.error_count)
                    }
                );
            }
            if !report.ok() {
                bail!(
                    "fsck found {} problem(s) in {}",
                    report.error_count,
                    dir.display()
                );
            }
        }
        Cmd::Bench(args) => bench::run(&args, json)?,
        Cmd::Demo { keep } => demo::run(keep)?,
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Rendered first: clap_complete panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "cairn", &mut script);
            std::io::stdout().write_all(&script)?;
        }
        Cmd::Man { dir: out } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match out {
                Some(out) => {
                    std::fs::create_dir_all(&out)
                        .with_context(|| format!("cannot create {}", out.display()))?;
                    clap_mangen::generate_to(cmd, &out).with_context(|| {
                        format!("cannot write man pages into {}", out.display())
                    })?;
                    outln!("wrote man pages into {}", out.display());
                }
                None => {
                    let mut page = Vec::new();
                    clap_mangen::Man::new(cmd).render(&mut page)?;
                    std::io::stdout().write_all(&page)?;
                }
            }
        }
        Cmd::Serve(args) => serve::run(&dir, args)?,
        Cmd::Vm(cmd) => vm::run(&open()?, &dir, cmd, json, cli.yes)?,
    }
    Ok(())
}
