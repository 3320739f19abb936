//! `cairn`: the command-line face of Cairn's checkpoint engine.

mod backend;
mod bench;
mod bench_nbd;
mod bench_vm;
mod checkpoint;
mod convert;
mod output;
mod space;
mod units;
mod vm;

use anyhow::{bail, Context, Result};
use backend::Backend;
pub(crate) use cairn_control::names::time_str;
use cairn_control::{Op, Reply};
use cairn_engine::{Options, Store, Target};
use checkpoint::checkpoint_target;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use output::outln;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use units::{human, parse_number, parse_size};

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
    Volume(VolumeCmd),
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
    /// Run the engine benchmark and print the table.
    Bench(bench::BenchArgs),
    /// Walk through Cairn's main job on the store: a volume, checkpoints, a rewind, space.
    Demo,
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
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Also serve NBD on TCP: ADDR:PORT, or just PORT for loopback (127.0.0.1).
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_listen: Option<String>,
    /// PEM certificate (chain): TCP clients must then use TLS (NBD_OPT_STARTTLS).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// `PORT` alone means loopback: exposing disks to the network must be asked for explicitly.
fn parse_listen(s: &str) -> Result<std::net::SocketAddr> {
    if let Ok(port) = s.trim_start_matches(':').parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().with_context(|| {
        format!("invalid --nbd-listen '{s}': give ADDR:PORT (e.g. 127.0.0.1:10809) or a port")
    })
}

fn serve(dir: &Path, args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let nbd_listen = args.nbd_listen.as_deref().map(parse_listen).transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            if nbd_listen.is_none() {
                bail!("--tls-cert/--tls-key secure the TCP listener; add --nbd-listen ADDR:PORT");
            }
            Some(cairn_nbd::tls::server_config(c, k)?)
        }
        _ => None,
    };
    let config = cairn_daemon::DaemonConfig {
        store_dir: dir.to_path_buf(),
        options: store_options(),
        nbd_listen,
        nbd: cairn_nbd::ServerConfig {
            tls,
            ..Default::default()
        },
    };
    cairn_daemon::run(config, |l| {
        eprintln!(
            "cairn: serving {} over NBD on {}{}",
            dir.display(),
            l.nbd_socket.display(),
            l.nbd_tcp
                .map(|a| format!(" and nbd://{a}"))
                .unwrap_or_default()
        );
    })?;
    Ok(())
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create an empty volume.
    Create {
        /// Volume name.
        name: String,
        /// Logical size, e.g. 20G.
        #[arg(long)]
        size: String,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Info {
        /// Volume name.
        name: String,
    },
    /// Grow a volume.
    Resize {
        /// Volume name.
        name: String,
        /// New size (not smaller than the current one).
        #[arg(long)]
        size: String,
    },
    /// Delete a volume and all its checkpoints (clones made from it keep working).
    Delete {
        /// Volume name.
        name: String,
    },
    /// Make a head contiguous again after overwrites following checkpoints, so sequential I/O
    /// is as fast as without checkpoints. Blocks shared with checkpoints are copied: that costs
    /// space until those checkpoints are deleted (`--dry-run` says how much). Safe while the
    /// volume is in use: its I/O waits for one 2 MiB range at a time. A diff against a checkpoint
    /// taken before it reports the moved ranges as changed.
    Defrag {
        /// Volume name.
        name: String,
        /// Only report what would be moved and what it would cost.
        #[arg(long)]
        dry_run: bool,
        /// Move a 2 MiB range only when its data lies in at least this many separate extents
        /// (2: any break). Below the default, sequential reads lose under 10%.
        #[arg(long, default_value_t = cairn_engine::DEFRAG_MIN_EXTENTS)]
        min_extents: u64,
    },
    /// Create a volume from a disk image in any format qemu-img reads (raw, qcow2, vhdx, vmdk,
    /// vdi...); zero ranges stay unallocated.
    Import {
        /// New volume name.
        name: String,
        /// Image file.
        file: PathBuf,
        /// Image format (default: detected by qemu-img).
        #[arg(long, short = 'f')]
        format: Option<String>,
    },
    /// Write a head or checkpoint to an image file in any format qemu-img writes (sparse where
    /// unmapped).
    Export {
        /// VOLUME or VOLUME@CHECKPOINT.
        source: String,
        /// Image file to create (an existing one is overwritten after confirmation).
        file: PathBuf,
        /// Output format (default: from the file extension: .qcow2, .vhdx, .vmdk, .vdi, .vhd,
        /// .vpc, .qed, .raw, .img; any other extension must name its format).
        #[arg(long, short = 'f')]
        format: Option<String>,
    },
    /// Write bytes to a volume's head (for scripts and tests).
    Write(WriteArgs),
    /// Read bytes from a head or checkpoint to stdout or a file.
    Read {
        /// VOLUME or VOLUME@CHECKPOINT.
        source: String,
        /// Byte offset.
        #[arg(long, value_parser = parse_number)]
        offset: u64,
        /// Bytes to read.
        #[arg(long, value_parser = parse_number)]
        length: u64,
        /// Write here instead of stdout.
        #[arg(long)]
        to: Option<PathBuf>,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false, id = "source")]
struct WriteSource {
    /// Fill with this byte (e.g. 0xAB); needs --length.
    #[arg(long, value_parser = parse_number, requires = "length")]
    pattern: Option<u64>,
    /// Write the contents of this file.
    #[arg(long)]
    from: Option<PathBuf>,
}

#[derive(Args)]
struct WriteArgs {
    /// Volume name.
    name: String,
    /// Byte offset.
    #[arg(long, value_parser = parse_number)]
    offset: u64,
    /// Bytes to write with --pattern.
    #[arg(long, value_parser = parse_number)]
    length: Option<u64>,
    #[command(flatten)]
    source: WriteSource,
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
    let on = |var: &str| {
        std::env::var(var)
            .map(|v| !matches!(v.trim(), "0" | "off" | "false" | "no"))
            .unwrap_or(true)
    };
    Options {
        mapped_reads: on("CAIRN_MAPPED_READS"),
        direct_writes: on("CAIRN_DIRECT_WRITES"),
        write_behind: on("CAIRN_WRITE_BEHIND"),
        ..Options::default()
    }
}

fn default_store() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("cairn"));
    }
    let home = std::env::var_os("HOME")
        .context("cannot find a default store: set --store, CAIRN_STORE or HOME")?;
    Ok(PathBuf::from(home).join(".local/share/cairn"))
}

/// Asks before destroying data: on a terminal the user answers; without one (a script) the
/// command is refused unless `--yes` was given, so nothing is destroyed by a default.
pub(crate) fn confirm(what: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        bail!("refusing to {what} without confirmation: there is no terminal to ask on; add --yes");
    }
    eprint!("cairn: {what}? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(())
    } else {
        bail!("cancelled: nothing was changed")
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// A spinner for operations whose total is not known up front (it shows bytes done instead).
pub(crate) fn spinner(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_message(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    pb
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
            Store::init(&dir, store_options())?;
            if json {
                print_json(&serde_json::json!({ "store": dir }))?;
            } else {
                outln!("initialised store at {}", dir.display());
            }
        }
        Cmd::Volume(cmd) => volume(open()?, cmd, json, cli.yes, &dir)?,
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
        Cmd::Demo => demo(&dir)?,
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
        Cmd::Serve(args) => serve(&dir, args)?,
        Cmd::Vm(cmd) => vm::run(&open()?, &dir, cmd, json, cli.yes)?,
    }
    Ok(())
}

fn volume(store: Backend, cmd: VolumeCmd, json: bool, yes: bool, dir: &Path) -> Result<()> {
    match cmd {
        VolumeCmd::Create { name, size } => {
            let info = store.volume(Op::VolumeCreate {
                name,
                size: parse_size(&size)?,
            })?;
            if json {
                print_json(&info)?;
            } else {
                outln!("created volume '{}' of {}", info.name, human(info.size));
            }
        }
        VolumeCmd::List => {
            let vols = match store.call(Op::VolumeList)? {
                Reply::Volumes(v) => v,
                other => bail!("unexpected reply {other:?}"),
            };
            if json {
                print_json(&vols)?;
            } else {
                outln!(
                    "{:<24} {:>12} {:>12} {:>12}  {:<20} CREATED",
                    "NAME",
                    "SIZE",
                    "REFERENCED",
                    "CHECKPOINTS",
                    "PARENT"
                );
                for v in vols {
                    outln!(
                        "{:<24} {:>12} {:>12} {:>12}  {:<20} {}",
                        v.name,
                        human(v.size),
                        human(v.referenced),
                        v.checkpoints,
                        v.parent.as_deref().unwrap_or("-"),
                        time_str(v.created_ms)
                    );
                }
            }
        }
        VolumeCmd::Info { name } => {
            let v = store.volume(Op::VolumeInfo { name })?;
            let uri = cairn_daemon::nbd_uri(dir, &v.name);
            if json {
                let mut j = serde_json::to_value(&v)?;
                j["nbd_uri"] = serde_json::Value::String(uri);
                print_json(&j)?;
            } else {
                outln!("name:        {}", v.name);
                outln!("size:        {} ({} bytes)", human(v.size), v.size);
                outln!("referenced:  {}", human(v.referenced));
                outln!("checkpoints: {}", v.checkpoints);
                outln!("parent:      {}", v.parent.as_deref().unwrap_or("-"));
                outln!("origin:      {}", v.origin.as_deref().unwrap_or("-"));
                outln!("created:     {}", time_str(v.created_ms));
                outln!("nbd:         {uri}  (while `cairn serve` runs)");
            }
        }
        VolumeCmd::Resize { name, size } => {
            let v = store.volume(Op::VolumeResize {
                name,
                size: parse_size(&size)?,
            })?;
            if json {
                print_json(&v)?;
            } else {
                outln!("volume '{}' is now {}", v.name, human(v.size));
            }
        }
        VolumeCmd::Delete { name } => {
            let checkpoints = store
                .volume(Op::VolumeInfo { name: name.clone() })?
                .checkpoints;
            if checkpoints > 0 {
                confirm(
                    &format!("delete volume '{name}' and its {checkpoints} checkpoint(s)"),
                    yes,
                )?;
            }
            let sp = spinner("deleting");
            store.call_with_progress(Op::VolumeDelete { name: name.clone() }, &mut |n| {
                sp.set_message(format!("deleting '{name}': {} freed", human(n)))
            })?;
            sp.finish_and_clear();
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                outln!("deleted volume '{name}'");
            }
        }
        VolumeCmd::Defrag {
            name,
            dry_run,
            min_extents,
        } => {
            let size = store.volume(Op::VolumeInfo { name: name.clone() })?.size;
            let pb = progress(
                size,
                if dry_run {
                    "examining"
                } else {
                    "defragmenting"
                },
            );
            let reply = store.call_with_progress(
                Op::VolumeDefrag {
                    name: name.clone(),
                    dry_run,
                    min_extents,
                },
                &mut |n| pb.set_position(n),
            )?;
            pb.finish_and_clear();
            let Reply::Defrag(r) = reply else {
                bail!("the daemon answered a defrag with something else: {reply:?}");
            };
            if json {
                print_json(&r)?;
            } else if r.moved_bytes == 0 {
                outln!(
                    "nothing to move: no 2 MiB range of '{name}' lies in {min_extents} or more extents ({} in {} extents in all)",
                    human(r.mapped_bytes),
                    r.extents_before
                );
            } else if dry_run {
                outln!(
                    "defrag of '{name}' would move {} of {} ({} extents -> about {}); {} of it is shared with checkpoints or clones and would be stored twice",
                    human(r.moved_bytes),
                    human(r.mapped_bytes),
                    r.extents_before,
                    r.extents_after,
                    human(r.shared_bytes)
                );
            } else {
                outln!(
                    "defragmented '{name}': moved {} ({} extents -> {}); {} shared with checkpoints or clones is now stored twice; the store grew by {}",
                    human(r.moved_bytes),
                    r.extents_before,
                    r.extents_after,
                    human(r.shared_bytes),
                    human(r.space_delta.max(0) as u64)
                );
            }
        }
        VolumeCmd::Import { name, file, format } => {
            cairn_engine::validate_name(&name)?;
            let info = convert::import(&store, &name, &file, format.as_deref())?;
            if json {
                print_json(&info)?;
            } else {
                outln!(
                    "imported {} as volume '{name}' ({}, {} allocated)",
                    file.display(),
                    human(info.size),
                    human(info.referenced)
                );
            }
        }
        VolumeCmd::Export {
            source,
            file,
            format,
        } => {
            let t = Target::parse(&source)?;
            let format = convert::export_format(&file, format.as_deref())?;
            if file.exists() {
                confirm(&format!("overwrite {}", file.display()), yes)?;
            }
            let bytes = convert::export(&store, &t, &file, &format)?;
            if json {
                print_json(&serde_json::json!({
                    "source": source, "file": file, "format": format, "bytes": bytes
                }))?;
            } else {
                outln!(
                    "exported {source} to {} ({format}, {})",
                    file.display(),
                    human(bytes)
                );
            }
        }
        VolumeCmd::Write(a) => {
            let data = match (a.source.pattern, &a.source.from) {
                (Some(p), _) => {
                    if p > 0xFF {
                        bail!("--pattern takes one byte, 0x00 to 0xFF");
                    }
                    vec![p as u8; a.length.unwrap_or(0) as usize]
                }
                (None, Some(f)) => {
                    std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?
                }
                (None, None) => bail!("give --pattern BYTE --length L or --from FILE"),
            };
            // Split into operations of at most MAX_DATA; each is written and flushed.
            let mut at = 0usize;
            loop {
                let n = (data.len() - at).min(cairn_control::MAX_DATA as usize);
                store.done(Op::VolumeWrite {
                    name: a.name.clone(),
                    offset: a.offset + at as u64,
                    data: data[at..at + n].to_vec(),
                })?;
                at += n;
                if at >= data.len() {
                    break;
                }
            }
            if json {
                print_json(
                    &serde_json::json!({ "volume": a.name, "offset": a.offset, "length": data.len() }),
                )?;
            } else {
                outln!(
                    "wrote {} bytes to '{}' at offset {}",
                    data.len(),
                    a.name,
                    a.offset
                );
            }
        }
        VolumeCmd::Read {
            source,
            offset,
            length,
            to,
        } => {
            Target::parse(&source)?;
            let mut out: Box<dyn Write> = match &to {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut off = offset;
            let end = offset.checked_add(length).with_context(|| {
                format!(
                    "read of {length} bytes at offset {offset} reaches past the end of any volume"
                )
            })?;
            let read = |offset: u64, length: u64| {
                store.bytes(Op::VolumeRead {
                    target: source.clone(),
                    offset,
                    length,
                })
            };
            // Check the whole range first so that a bad request writes nothing.
            read(offset, length.min(1))?;
            read(end.saturating_sub(length.min(1)), length.min(1))?;
            while off < end {
                let n = (end - off).min(cairn_control::MAX_DATA);
                out.write_all(&read(off, n)?)?;
                off += n;
            }
            out.flush()?;
        }
    }
    Ok(())
}

fn demo(dir: &Path) -> Result<()> {
    if !dir.join(cairn_engine::store::DATA_FILE).exists() {
        Store::init(dir, store_options())?;
        outln!("initialised store at {}", dir.display());
    }
    let store = Store::open(dir, store_options())?;
    let name = "demo";
    if store.volume_info(name).is_ok() {
        store.delete_volume(name)?;
    }
    store.create_volume(name, 1 << 30)?;
    outln!("created volume '{name}' (1 GiB, nothing allocated)");
    store.write(name, 0, &vec![b'A'; 4 << 20])?;
    let clean = store.create_checkpoint(name, "clean", Some("freshly installed"))?;
    outln!(
        "wrote 4 MiB of 'A' and took checkpoint {name}@{} (O(1))",
        clean.name
    );
    store.write(name, 1 << 20, &vec![b'B'; 64 << 10])?;
    store.create_checkpoint(name, "patched", Some("after an update"))?;
    outln!("overwrote 64 KiB with 'B' and took checkpoint {name}@patched");
    let d = store.diff(
        &Target::parse("demo@clean")?,
        &Target::parse("demo@patched")?,
    )?;
    outln!(
        "diff clean..patched: {} range(s), {} bytes",
        d.len(),
        d.iter().map(|e| e.length).sum::<u64>()
    );
    store.write(name, 0, &vec![b'X'; 8192])?;
    store.apply_checkpoint(name, "clean", None)?;
    let mut b = [0u8; 1];
    store.read(&Target::head(name), 1 << 20, &mut b)?;
    outln!(
        "broke the disk, then applied {name}@clean: byte at 1 MiB reads '{}' again",
        b[0] as char
    );
    let sp = store.space(Some(name))?;
    for c in &sp.volumes[0].checkpoints {
        outln!(
            "  checkpoint {:<8} references {:>9}, unique {:>9}",
            c.name,
            human(c.referenced),
            human(c.unique)
        );
    }
    let report = store.fsck()?;
    outln!(
        "fsck: {}",
        if report.ok() {
            "no problems"
        } else {
            "PROBLEMS"
        }
    );
    outln!(
        "\nnext: cairn --store {} checkpoint list demo --tree",
        dir.display()
    );
    Ok(())
}
