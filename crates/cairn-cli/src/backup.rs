//! `cairn backup ...`: repositories (init, register), and backups of checkpoints (create, list,
//! info, verify, restore). The passphrase comes from `CAIRN_BACKUP_PASSPHRASE` or `--key-file`,
//! S3 credentials from the `AWS_*` variables; both travel with the operation, so a daemon acts
//! with the caller's secrets and keeps none.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cairn_backup::format::BackupStats;
use cairn_backup::gc::GcReport;
use cairn_backup::prune::{KeepPolicy, Mark, PruneEntry, Rule};
use cairn_backup::verify::VerifyReport;
use cairn_backup::{S3Options, Secret};
use cairn_control::backup::{BackupInfo, BackupOp, BackupReply, RepoSpec, RestoreTo};
use cairn_control::{Op, Reply};
use clap::{Args, Subcommand};

use crate::backend::Backend;
use crate::output::outln;
use crate::terminal::fraction_bar;
use crate::units::human;
use crate::{confirm, print_json, time_str};

/// Which repository, and how to open it.
#[derive(Args, Clone, Default)]
pub struct RepoArgs {
    /// Repository: a name from `backup repo list`, a directory, or s3://BUCKET/PREFIX (default:
    /// the store's default repository).
    #[arg(long)]
    repo: Option<String>,
    /// S3 endpoint URL for S3-compatible servers (Garage, MinIO, Ceph), e.g. http://127.0.0.1:3900.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Read the passphrase from this file's first line instead of CAIRN_BACKUP_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Make a new repository: a directory or s3://BUCKET/PREFIX; encrypted unless --no-encryption.
    Init {
        /// Where.
        repo: String,
        /// Store data in the clear (still checksummed).
        #[arg(long)]
        no_encryption: bool,
        /// S3 endpoint URL for S3-compatible servers.
        #[arg(long, value_name = "URL")]
        s3_endpoint: Option<String>,
        /// Read the passphrase from this file's first line instead of CAIRN_BACKUP_PASSPHRASE.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Register repositories under names (kept in the store; no secrets are kept).
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Back up a checkpoint: only the blocks changed since the newest checkpoint of the volume
    /// already in the repository are read.
    Create {
        /// VOLUME@CHECKPOINT.
        target: String,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// List backups, oldest first.
    List {
        /// Only backups of this volume.
        name: Option<String>,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// Show one backup.
    Info {
        /// Backup id (or a unique prefix).
        id: String,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// Read back and check every chunk of a backup (or of all), naming what any damage affects.
    Verify {
        /// Backup id (or prefix); every backup when absent.
        id: Option<String>,
        /// Read only this share of the packs, in percent (a different random share each run).
        #[arg(long, value_name = "PERCENT", default_value_t = 100.0)]
        sample: f64,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// Remove this store's backups that a retention policy does not keep: the options run in
    /// the order last, hourly, daily, weekly, monthly, yearly, each keeping the newest backup of
    /// each period (local time) not already covered (Proxmox Backup Server's rules). Space comes
    /// back with `backup gc`.
    Prune {
        /// Only backups of this volume.
        name: Option<String>,
        /// Keep the newest N.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_last: u32,
        /// Keep the newest of each of the last N hours that have backups.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_hourly: u32,
        /// Days.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_daily: u32,
        /// ISO weeks (Monday to Sunday).
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_weekly: u32,
        /// Months.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_monthly: u32,
        /// Years.
        #[arg(long, default_value_t = 0, value_name = "N")]
        keep_yearly: u32,
        /// Only show what would be removed and why each other backup is kept.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// Free the space no backup needs: unused data is condemned by one run and deleted by a later
    /// one after the grace period, once backups that were running have ended (safe while other
    /// hosts back up into the repository).
    Gc {
        /// How long condemned data waits at least before a later run deletes it (30s, 15m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = crate::units::parse_duration)]
        grace: u64,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// Restore a backup as a new volume or an image file.
    Restore {
        /// Backup id (or a unique prefix).
        id: String,
        /// Name of the new volume.
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with = "to_file",
            required_unless_present = "to_file"
        )]
        to: Option<String>,
        /// Image file to write instead (format from the extension, or --format).
        #[arg(long, value_name = "FILE")]
        to_file: Option<PathBuf>,
        /// Image format for --to-file (raw, qcow2, vmdk, vhdx, vdi...).
        #[arg(long, requires = "to_file")]
        format: Option<String>,
        /// Make the volume (or start the VM) at once and copy the data in behind it, reading
        /// from the repository whatever is used first (needs `cairn serve`). After a daemon
        /// restart, run the same command again to go on.
        #[arg(long, conflicts_with = "to_file")]
        live: bool,
        /// With --live: copy in the background at most this many bytes per second (e.g. 50M),
        /// so the restore leaves the network or disk to the running VM.
        #[arg(long, requires = "live", value_parser = crate::units::parse_size, value_name = "BYTES")]
        rate_limit: Option<u64>,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// Serve a backup read-only over NBD, straight from the repository (needs `cairn serve`):
    /// one export per image, named in the output, until `backup unmount` or the daemon stops.
    Mount {
        /// Backup id (or a unique prefix).
        id: String,
        #[command(flatten)]
        access: RepoArgs,
    },
    /// Stop serving a mounted backup (clients already connected keep reading until they close).
    Unmount {
        /// Backup id (or a unique prefix), or one export's name.
        id: String,
    },
    /// Mounted backups' NBD exports.
    Mounts,
    /// Live restores under way, and how far each got.
    Live,
}

#[derive(Subcommand)]
pub enum RepoCmd {
    /// Register REPO as NAME (the first one registered becomes the default).
    Add {
        /// Name for --repo.
        name: String,
        /// A directory or s3://BUCKET/PREFIX.
        repo: String,
        /// Make it the store's default.
        #[arg(long)]
        default: bool,
        /// S3 endpoint URL.
        #[arg(long, value_name = "URL")]
        s3_endpoint: Option<String>,
        /// The file holding its passphrase: its path (never the secret) is kept, so that the
        /// daemon's scheduled backups (`policy set --backup-to NAME`) can read it.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Registered repositories.
    List,
    /// Forget a registered repository (its backups stay where they are).
    Remove {
        /// Its name.
        name: String,
    },
}

impl RepoArgs {
    fn spec(&self, repo: Option<String>) -> Result<RepoSpec> {
        let passphrase = match &self.key_file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read key file {}", f.display()))?;
                let line = text.lines().next().unwrap_or_default().to_string();
                if line.is_empty() {
                    bail!(
                        "key file {} is empty; put the passphrase on its first line",
                        f.display()
                    );
                }
                Some(Secret(line))
            }
            None => std::env::var("CAIRN_BACKUP_PASSPHRASE").ok().map(Secret),
        };
        Ok(RepoSpec {
            repo: repo.or_else(|| self.repo.clone()),
            s3_endpoint: self.s3_endpoint.clone(),
            cwd: std::env::current_dir().context("cannot read the working directory")?,
            passphrase,
            s3: S3Options::from_env(),
            key_file: match &self.key_file {
                Some(f) => Some(
                    std::path::absolute(f)
                        .with_context(|| format!("cannot resolve key file {}", f.display()))?,
                ),
                None => None,
            },
        })
    }
}

fn call(store: &Backend, op: BackupOp, bar: Option<&str>) -> Result<BackupReply> {
    let pb = bar.map(fraction_bar);
    let reply = store.call_with_progress(Op::Backup(op), &mut |n| {
        if let Some(pb) = &pb {
            pb.set_position(n);
        }
    });
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    match reply? {
        Reply::Backup(r) => Ok(r),
        other => bail!("unexpected reply {other:?}"),
    }
}

pub fn run(store: &Backend, cmd: BackupCmd, json: bool, yes: bool) -> Result<()> {
    match cmd {
        BackupCmd::Init {
            repo,
            no_encryption,
            s3_endpoint,
            key_file,
        } => {
            let access = RepoArgs {
                repo: None,
                s3_endpoint,
                key_file,
            };
            let op = BackupOp::Init {
                repo: access.spec(Some(repo))?,
                encrypt: !no_encryption,
            };
            match call(store, op, None)? {
                BackupReply::Repo(r) if json => print_json(&r)?,
                BackupReply::Repo(r) => outln!(
                    "initialised backup repository {} ({})",
                    r.location,
                    match r.encrypted {
                        true =>
                            "encrypted; keep the passphrase: without it nothing can be restored",
                        false => "not encrypted",
                    }
                ),
                other => bail!("unexpected reply {other:?}"),
            }
        }
        BackupCmd::Repo(cmd) => {
            let op = match cmd {
                RepoCmd::Add {
                    name,
                    repo,
                    default,
                    s3_endpoint,
                    key_file,
                } => {
                    let args = RepoArgs {
                        s3_endpoint,
                        key_file,
                        ..RepoArgs::default()
                    };
                    let mut spec = args.spec(Some(repo))?;
                    spec.passphrase = None;
                    spec.s3 = S3Options::default();
                    BackupOp::RepoAdd {
                        name,
                        repo: spec,
                        default,
                    }
                }
                RepoCmd::List => BackupOp::RepoList,
                RepoCmd::Remove { name } => BackupOp::RepoRemove { name },
            };
            match call(store, op, None)? {
                BackupReply::Repos(r) if json => print_json(&r)?,
                BackupReply::Repos(r) if r.is_empty() => outln!("no repositories registered"),
                BackupReply::Repos(r) => {
                    outln!("{:<16} {:<8} LOCATION", "NAME", "DEFAULT");
                    for e in r {
                        outln!(
                            "{:<16} {:<8} {}",
                            e.name,
                            if e.default { "yes" } else { "" },
                            e.location
                        );
                    }
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        BackupCmd::Create { target, access } => {
            let op = BackupOp::Create {
                target: target.clone(),
                repo: access.spec(None)?,
            };
            match call(store, op, Some(&format!("backing up {target}")))? {
                BackupReply::Backup(b) if json => print_json(&b)?,
                BackupReply::Backup(b) => {
                    let s = &b.manifest.stats;
                    let how = match &b.manifest.parent {
                        Some(p) => format!("incremental to {p}"),
                        None => "full".into(),
                    };
                    outln!(
                        "backup {} of {target} in {} ({how}): {}",
                        b.manifest.id,
                        b.repository,
                        stats_text(s)
                    );
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        BackupCmd::List { name, access } => {
            let op = BackupOp::List {
                repo: access.spec(None)?,
                name,
            };
            let BackupReply::Backups { backups, damaged } = call(store, op, None)? else {
                bail!("unexpected reply to backup list");
            };
            // The list stays a list (for scripts); damaged manifests are warnings on stderr.
            for d in &damaged {
                eprintln!("cairn: warning: {d}");
            }
            match (json, backups.is_empty()) {
                (true, _) => print_json(&backups)?,
                (false, true) => outln!("no backups"),
                (false, false) => table(&backups),
            }
        }
        BackupCmd::Info { id, access } => {
            let op = BackupOp::Info {
                repo: access.spec(None)?,
                id,
            };
            match call(store, op, None)? {
                BackupReply::Backup(b) if json => print_json(&b)?,
                BackupReply::Backup(b) => info(&b),
                other => bail!("unexpected reply {other:?}"),
            }
        }
        BackupCmd::Verify { id, sample, access } => {
            let op = BackupOp::Verify {
                repo: access.spec(None)?,
                id,
                sample_percent: sample,
            };
            let r = match call(store, op, Some("verifying"))? {
                BackupReply::Verify(r) => r,
                other => bail!("unexpected reply {other:?}"),
            };
            if json {
                print_json(&r)?;
            } else {
                verify_text(&r);
            }
            if !r.problems.is_empty() {
                bail!("verify found {} problem(s)", r.problems.len());
            }
        }
        BackupCmd::Prune {
            name,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            dry_run,
            access,
        } => {
            let policy = KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
            };
            let repo = access.spec(None)?;
            if !dry_run {
                confirm("remove the backups this policy does not keep?", yes)?;
            }
            let op = BackupOp::Prune {
                repo,
                name,
                policy,
                dry_run,
            };
            match call(store, op, None)? {
                BackupReply::Pruned(list) if json => print_json(&list)?,
                BackupReply::Pruned(list) => pruned(&list, dry_run),
                other => bail!("unexpected reply {other:?}"),
            }
        }
        BackupCmd::Gc { grace, access } => {
            let op = BackupOp::Gc {
                repo: access.spec(None)?,
                grace_secs: grace,
            };
            match call(store, op, Some("collecting garbage"))? {
                BackupReply::Gc(r) if json => print_json(&r)?,
                BackupReply::Gc(r) => gc_text(&r),
                other => bail!("unexpected reply {other:?}"),
            }
        }
        BackupCmd::Restore {
            id,
            to,
            to_file,
            format,
            live,
            rate_limit,
            access,
        } => {
            let to = match (to, to_file) {
                (Some(name), _) => RestoreTo::Volume { name },
                (None, Some(file)) => {
                    let format = crate::convert::export_format(&file, format.as_deref())?;
                    if file.exists() {
                        confirm(&format!("{} exists; overwrite it?", file.display()), yes)?;
                    }
                    let path = std::env::current_dir()?.join(file);
                    RestoreTo::File { path, format }
                }
                (None, None) => bail!("give --to NAME or --to-file FILE"),
            };
            let op = BackupOp::Restore {
                repo: access.spec(None)?,
                id: id.clone(),
                to,
                live,
                rate_limit,
            };
            match call(store, op, Some(&format!("restoring {id}")))? {
                BackupReply::Restored(r) if json => print_json(&r)?,
                BackupReply::Restored(r) => {
                    outln!("restored backup {} to {} ({})", r.id, r.to, human(r.size));
                    if let Some(next) = &r.next {
                        outln!("{next}");
                    }
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        BackupCmd::Mount { id, access } => {
            let op = BackupOp::Mount {
                repo: access.spec(None)?,
                id,
            };
            mounted(store, call(store, op, None)?, json, "serving")?;
        }
        BackupCmd::Unmount { id } => {
            mounted(
                store,
                call(store, BackupOp::Unmount { id }, None)?,
                json,
                "stopped",
            )?;
        }
        BackupCmd::Mounts => {
            mounted(store, call(store, BackupOp::Mounts, None)?, json, "serving")?;
        }
        BackupCmd::Live => match call(store, BackupOp::Live, None)? {
            BackupReply::Live(list) if json => print_json(&list)?,
            BackupReply::Live(list) => {
                if list.is_empty() {
                    outln!("no live restores under way");
                }
                for l in list {
                    let pct = l.filled_bytes as f64 * 100.0 / l.record.size.max(1) as f64;
                    outln!(
                        "{}  from backup {}  {pct:.1}% of {}  {}{}",
                        l.record.volume,
                        l.record.backup,
                        human(l.record.size),
                        l.state,
                        l.error.map(|e| format!(": {e}")).unwrap_or_default()
                    );
                }
            }
            other => bail!("unexpected reply {other:?}"),
        },
    }
    Ok(())
}

/// Prints mounted exports with the URI a client connects to.
fn mounted(store: &Backend, reply: BackupReply, json: bool, verb: &str) -> Result<()> {
    let BackupReply::Mounted(list) = reply else {
        bail!("unexpected reply {reply:?}");
    };
    let socket = match store {
        Backend::Daemon(c) => Some(c.status()?.nbd_socket),
        Backend::Local(_) => None,
    };
    let uri = |export: &str| match &socket {
        Some(s) => format!("nbd+unix:///{export}?socket={}", s.display()),
        None => String::new(),
    };
    if json {
        let out: Vec<serde_json::Value> = list
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).expect("JSON");
                v["uri"] = uri(&e.export).into();
                v
            })
            .collect();
        return print_json(&out);
    }
    if list.is_empty() {
        outln!("no backups mounted");
    }
    for e in &list {
        outln!(
            "{verb} {} ({}, {}): {}",
            e.export,
            e.volume,
            human(e.size),
            uri(&e.export)
        );
    }
    Ok(())
}

fn table(list: &[BackupInfo]) {
    outln!(
        "{:<17} {:<20} {:<28} {:>10} {:>10}  FROM",
        "ID",
        "TIME (UTC)",
        "SOURCE",
        "SIZE",
        "ADDED"
    );
    for b in list {
        let m = &b.manifest;
        let from = match &m.parent {
            Some(p) => format!("incremental to {}", &p[..p.len().min(8)]),
            None => "full".into(),
        };
        outln!(
            "{:<17} {:<20} {:<28} {:>10} {:>10}  {from}",
            b.manifest.id,
            time_str(m.time_ms),
            format!("{}@{}", m.name, m.checkpoint),
            human(m.images.iter().map(|i| i.size).sum()),
            human(m.stats.stored_bytes),
        );
    }
}

fn info(b: &BackupInfo) {
    let m = &b.manifest;
    outln!("backup      {}", m.id);
    outln!("repository  {}", b.repository);
    outln!("source      {}@{} ({})", m.name, m.checkpoint, m.kind);
    if let Some(d) = &m.description {
        outln!("description {d}");
    }
    outln!("taken       {} (checkpoint time, UTC)", time_str(m.time_ms));
    outln!("finished    {}", time_str(m.finished_ms));
    outln!("host        {}", m.host);
    match &m.parent {
        Some(p) => outln!("incremental to {p}"),
        None => outln!("full backup"),
    }
    for i in &m.images {
        outln!(
            "image       {}@{}: {}, map of {} object(s)",
            i.volume,
            i.checkpoint,
            human(i.size),
            i.maps.len()
        );
    }
    outln!("{}", stats_text(&m.stats));
}

/// What a backup read and stored, in one line.
fn stats_text(s: &BackupStats) -> String {
    format!(
        "read {}, {} new in {} chunk(s), {} reused; repository grew {} in {:.1} s",
        human(s.read_bytes),
        human(s.new_bytes),
        s.new_chunks,
        s.reused_chunks,
        human(s.stored_bytes),
        s.duration_ms as f64 / 1000.0
    )
}

fn verify_text(r: &VerifyReport) {
    for p in &r.problems {
        outln!("{}: {} ({})", p.kind, p.object, p.why);
        for a in &p.affects {
            outln!("    affects {a}");
        }
    }
    outln!(
        "checked {} backup(s), {} chunk(s) in {} of {} pack(s), {} read: {}",
        r.backups,
        r.chunks_checked,
        r.packs_read,
        r.packs_total,
        human(r.bytes_read),
        match r.problems.len() {
            0 => "no problems".to_string(),
            n => format!("{n} problem(s)"),
        }
    );
}

fn pruned(list: &[PruneEntry], dry_run: bool) {
    let mut removed = 0;
    for e in list {
        let what = match e.mark {
            Mark::Remove => {
                removed += 1;
                match dry_run {
                    true => "would remove".to_string(),
                    false => "removed".to_string(),
                }
            }
            Mark::Protected => "keep (protected)".into(),
            Mark::Keep(rule) => format!("keep ({})", rule_name(rule)),
        };
        outln!(
            "{:<17} {:<20} {:<28} {what}",
            e.id,
            time_str(e.time_ms),
            format!("{}@{}", e.name, e.checkpoint)
        );
    }
    outln!(
        "{} {removed} of {} backup(s); `cairn backup gc` frees their space",
        if dry_run { "would remove" } else { "removed" },
        list.len()
    );
}

/// The option a retention rule is given by (`keep-daily`...).
pub(crate) fn rule_name(r: Rule) -> &'static str {
    match r {
        Rule::Last => "keep-last",
        Rule::Hourly => "keep-hourly",
        Rule::Daily => "keep-daily",
        Rule::Weekly => "keep-weekly",
        Rule::Monthly => "keep-monthly",
        Rule::Yearly => "keep-yearly",
        Rule::All => "no policy",
    }
}

fn gc_text(r: &GcReport) {
    outln!(
        "{} backup(s) keep their data; deleted {} pack(s) and {} map(s) condemned earlier, freeing {}",
        r.backups,
        r.packs_deleted,
        r.maps_deleted,
        human(r.bytes_freed)
    );
    if r.condemned > 0 {
        outln!(
            "condemned {} unused object(s) holding {}: a later `backup gc` deletes them after the grace period",
            r.condemned,
            human(r.condemned_bytes)
        );
    }
    if r.pending > 0 {
        outln!("{} condemned object(s) wait:", r.pending);
        for w in &r.waiting_for {
            outln!("    {w}");
        }
    }
    if r.unused_in_live_packs > 0 {
        outln!(
            "{} of unused chunks sit in packs still in use",
            human(r.unused_in_live_packs)
        );
    }
}
