//! `cairn volume ...`: create, list, inspect, grow, delete, defrag, import, export, and raw
//! reads and writes for scripts and tests.

use anyhow::{bail, Context, Result};
use cairn_control::{Op, Reply};
use cairn_engine::Target;
use clap::{Args, Subcommand};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::output::outln;
use crate::units::{human, parse_number, parse_size};
use crate::{confirm, convert, print_json, progress, spinner, time_str};

#[derive(Subcommand)]
pub enum VolumeCmd {
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
        #[arg(long, value_parser = parse_number, default_value = "0")]
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
pub struct WriteSource {
    /// Fill with this byte (e.g. 0xAB); needs --length.
    #[arg(long, value_parser = parse_number, requires = "length")]
    pattern: Option<u64>,
    /// Write the contents of this file.
    #[arg(long)]
    from: Option<PathBuf>,
}

#[derive(Args)]
pub struct WriteArgs {
    /// Volume name.
    name: String,
    /// Byte offset.
    #[arg(long, value_parser = parse_number, default_value = "0")]
    offset: u64,
    /// Bytes to write with --pattern.
    #[arg(long, value_parser = parse_number)]
    length: Option<u64>,
    #[command(flatten)]
    source: WriteSource,
}

pub fn run(store: Backend, cmd: VolumeCmd, json: bool, yes: bool, dir: &Path) -> Result<()> {
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
            // A file is streamed in operations of at most MAX_DATA, each written and flushed.
            let (mut input, len): (Box<dyn Read>, u64) = match (a.source.pattern, &a.source.from) {
                (Some(p), _) => {
                    if p > 0xFF {
                        bail!("--pattern takes one byte, 0x00 to 0xFF");
                    }
                    let len = a.length.unwrap_or(0);
                    (Box::new(std::io::repeat(p as u8).take(len)), len)
                }
                (None, Some(f)) => {
                    let file = std::fs::File::open(f)
                        .with_context(|| format!("cannot read {}", f.display()))?;
                    let len = file.metadata()?.len();
                    (Box::new(file), len)
                }
                (None, None) => bail!("give --pattern BYTE --length L or --from FILE"),
            };
            let pb = progress(len, &format!("writing '{}'", a.name));
            let mut at = 0u64;
            let mut buf = vec![0u8; len.min(cairn_control::MAX_DATA) as usize];
            while at < len {
                let n = (len - at).min(buf.len() as u64) as usize;
                input
                    .read_exact(&mut buf[..n])
                    .context("the input ended before its length (did the file shrink?)")?;
                store.done(Op::VolumeWrite {
                    name: a.name.clone(),
                    offset: a.offset + at,
                    data: buf[..n].to_vec(),
                })?;
                at += n as u64;
                pb.set_position(at);
            }
            pb.finish_and_clear();
            if json {
                print_json(
                    &serde_json::json!({ "volume": a.name, "offset": a.offset, "length": len }),
                )?;
            } else {
                outln!("wrote {len} bytes to '{}' at offset {}", a.name, a.offset);
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
            // Not over bytes going to the same terminal.
            let pb = match to.is_some() || !std::io::stdout().is_terminal() {
                true => progress(length, &format!("reading '{source}'")),
                false => indicatif::ProgressBar::hidden(),
            };
            while off < end {
                let n = (end - off).min(cairn_control::MAX_DATA);
                out.write_all(&read(off, n)?)?;
                off += n;
                pb.set_position(off - offset);
            }
            pb.finish_and_clear();
            out.flush()?;
        }
    }
    Ok(())
}
