//! `cairn policy ...` and `cairn prune`: lifecycle policies on VMs and volumes (and the store's
//! default), and applying their retention now, with the exact space it frees.

use anyhow::{bail, Result};
use cairn_control::lifecycle::space::Floor;
use cairn_control::lifecycle::{
    LifecycleOp, LifecycleReply, Policy, PolicyInfo, PruneReport, Verdict, DEFAULT,
};
use cairn_control::{Op, Reply};
use cairn_retention::KeepPolicy;
use clap::{Args, Subcommand};

use crate::backend::Backend;
use crate::output::outln;
use crate::units::{human, parse_duration, parse_size};
use crate::{confirm, print_json, time_str};

/// A keep count: 1 or more (an option left out is off).
fn keep_count(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "'{s}' is not a count of 1 or more (leave the option out to turn it off)"
        )),
    }
}

/// What `policy set` takes.
#[derive(Args)]
pub struct PolicyArgs {
    /// Take a checkpoint this often (30s, 15m, 1h, 1d).
    #[arg(long, value_parser = parse_duration, conflicts_with = "schedule")]
    every: Option<u64>,
    /// Or on this cron schedule, local time: "MIN HOUR DAY MONTH WEEKDAY", e.g. "0 */6 * * *".
    #[arg(long)]
    schedule: Option<String>,
    /// Keep the newest N checkpoints.
    #[arg(long, value_parser = keep_count, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest checkpoint of each of the last N hours that have one.
    #[arg(long, value_parser = keep_count, value_name = "N")]
    keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    #[arg(long, value_parser = keep_count, value_name = "N")]
    keep_daily: Option<u32>,
    /// ... of each of the last N ISO weeks.
    #[arg(long, value_parser = keep_count, value_name = "N")]
    keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long, value_parser = keep_count, value_name = "N")]
    keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    #[arg(long, value_parser = keep_count, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Remove checkpoints older than this whatever the keep options say (e.g. 90d).
    #[arg(long, value_parser = parse_duration)]
    max_age: Option<u64>,
    /// Space the checkpoints may hold beyond the head (e.g. 50G).
    #[arg(long, value_parser = parse_size)]
    budget: Option<u64>,
    /// Back the newest policy checkpoint up into this registered repository.
    #[arg(long, value_name = "REPO")]
    backup_to: Option<String>,
    /// That often (e.g. 1d).
    #[arg(long, value_parser = parse_duration)]
    backup_every: Option<u64>,
    /// Apply retention to checkpoints taken by name too (by default only to those Cairn took).
    #[arg(long)]
    include_manual: bool,
    /// A running VM's policy checkpoints keep its memory too (standard checkpoints); without
    /// this they are disk-only (file systems frozen through the guest agent when it answers).
    #[arg(long)]
    with_memory: bool,
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Set (replace) the policy of a VM or volume, or with --default the store's default for
    /// every VM and volume without one of its own.
    Set {
        /// VM or volume.
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        name: Option<String>,
        /// Set the store's default instead.
        #[arg(long)]
        default: bool,
        #[command(flatten)]
        args: PolicyArgs,
    },
    /// The policy that applies to a VM or volume (its own, or the store's default).
    Show {
        /// VM or volume.
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        name: Option<String>,
        /// The store's default.
        #[arg(long)]
        default: bool,
    },
    /// Every policy set, the store's default first.
    List,
    /// The store's floor of free host space (default: 10% of the file system or 10 GiB,
    /// whichever is less): below it no checkpoint is taken and the daemon deletes automatic
    /// ones. Without a value, shows it.
    Floor {
        /// A size (20G), a share (15%), `default` or `off`.
        value: Option<String>,
    },
    /// Remove a VM's or volume's own policy (the default applies again), or the default.
    Clear {
        /// VM or volume.
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        name: Option<String>,
        /// The store's default.
        #[arg(long)]
        default: bool,
    },
}

fn target(name: Option<String>, default: bool) -> Result<String> {
    match (name, default) {
        (_, true) => Ok(DEFAULT.into()),
        (Some(n), false) => Ok(n),
        (None, false) => bail!("name a VM or volume, or give --default"),
    }
}

pub(crate) fn call(
    store: &Backend,
    op: LifecycleOp,
    progress: Option<&str>,
) -> Result<LifecycleReply> {
    let pb = progress.map(crate::spinner);
    let reply = store.call_with_progress(Op::Lifecycle(op), &mut |n| {
        if let Some(pb) = &pb {
            pb.set_position(n);
        }
    });
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    match reply? {
        Reply::Lifecycle(r) => Ok(r),
        other => bail!("unexpected reply {other:?}"),
    }
}

pub fn run(store: &Backend, cmd: PolicyCmd, json: bool) -> Result<()> {
    let op = match cmd {
        PolicyCmd::Set {
            name,
            default,
            args: a,
        } => LifecycleOp::PolicySet(Policy {
            target: target(name, default)?,
            every_secs: a.every,
            schedule: a.schedule,
            keep: KeepPolicy {
                last: a.keep_last.unwrap_or(0),
                hourly: a.keep_hourly.unwrap_or(0),
                daily: a.keep_daily.unwrap_or(0),
                weekly: a.keep_weekly.unwrap_or(0),
                monthly: a.keep_monthly.unwrap_or(0),
                yearly: a.keep_yearly.unwrap_or(0),
            },
            max_age_secs: a.max_age,
            budget_bytes: a.budget,
            backup_to: a.backup_to,
            backup_every_secs: a.backup_every,
            include_manual: a.include_manual,
            with_memory: a.with_memory,
        }),
        PolicyCmd::Show { name, default } => LifecycleOp::PolicyShow {
            target: target(name, default)?,
        },
        PolicyCmd::List => LifecycleOp::PolicyList,
        PolicyCmd::Clear { name, default } => LifecycleOp::PolicyClear {
            target: target(name, default)?,
        },
        PolicyCmd::Floor { value } => {
            let set = match value {
                Some(v) => Some(Floor::parse(&v, |s| parse_size(s).ok())?),
                None => None,
            };
            return floor(store, set, json);
        }
    };
    match call(store, op, None)? {
        LifecycleReply::Policies(list) if json => print_json(&list)?,
        LifecycleReply::Policies(list) => {
            if list.is_empty() {
                outln!("no policy");
            }
            for p in &list {
                outln!("{}", describe(p));
            }
        }
        other => bail!("unexpected reply {other:?}"),
    }
    Ok(())
}

/// `cairn policy floor [VALUE]`.
fn floor(store: &Backend, set: Option<Floor>, json: bool) -> Result<()> {
    let LifecycleReply::Floor(f) = call(store, LifecycleOp::Floor { set }, None)? else {
        bail!("unexpected reply");
    };
    if json {
        return print_json(&f);
    }
    let setting = match f.floor {
        Floor::Default => "default (10% or 10 GiB, whichever is less)".to_string(),
        Floor::Bytes(b) => human(b),
        Floor::Percent(p) => format!("{p}%"),
        Floor::Off => "off".into(),
    };
    outln!(
        "floor: {setting} = {} of {}; free now: {}{}",
        human(f.floor_bytes),
        human(f.total_bytes),
        human(f.free_bytes),
        if f.below() {
            " (below: no new checkpoints)"
        } else {
            ""
        }
    );
    Ok(())
}

fn secs(s: u64) -> String {
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// One policy on one line.
fn describe(i: &PolicyInfo) -> String {
    let p = &i.policy;
    let mut parts = Vec::new();
    if let Some(e) = p.every_secs {
        parts.push(format!("every {}", secs(e)));
    }
    if let Some(s) = &p.schedule {
        parts.push(format!("schedule \"{s}\""));
    }
    let k = &p.keep;
    for (n, what) in [
        (k.last, "last"),
        (k.hourly, "hourly"),
        (k.daily, "daily"),
        (k.weekly, "weekly"),
        (k.monthly, "monthly"),
        (k.yearly, "yearly"),
    ] {
        if n > 0 {
            parts.push(format!("keep-{what} {n}"));
        }
    }
    if let Some(a) = p.max_age_secs {
        parts.push(format!("max-age {}", secs(a)));
    }
    if let Some(b) = p.budget_bytes {
        parts.push(format!("budget {}", human(b)));
    }
    if let Some(r) = &p.backup_to {
        let every = p.backup_every_secs.map(|e| format!(" every {}", secs(e)));
        parts.push(format!("backup to {r}{}", every.unwrap_or_default()));
    }
    if p.include_manual {
        parts.push("manual checkpoints included".into());
    }
    if p.with_memory {
        parts.push("with memory".into());
    }
    let who = match (p.target.as_str(), i.inherited) {
        (DEFAULT, _) => "store default".to_string(),
        (t, true) => format!("{t} (store default)"),
        (t, false) => t.to_string(),
    };
    match parts.is_empty() {
        true => format!("{who}: keeps everything"),
        false => format!("{who}: {}", parts.join(", ")),
    }
}

/// `cairn prune [NAME] [--dry-run]`.
pub fn prune(
    store: &Backend,
    name: Option<String>,
    dry_run: bool,
    json: bool,
    yes: bool,
) -> Result<()> {
    let plan = match call(
        store,
        LifecycleOp::Prune {
            target: name.clone(),
            dry_run: true,
        },
        None,
    )? {
        LifecycleReply::Pruned(r) => r,
        other => bail!("unexpected reply {other:?}"),
    };
    let going = plan.items.iter().filter(|i| i.verdict.goes()).count();
    if dry_run || going == 0 {
        return report(&plan, json, true);
    }
    if !json {
        report(&plan, false, false)?;
    }
    confirm(
        &format!(
            "delete {going} checkpoint{} ({})?",
            if going == 1 { "" } else { "s" },
            human(plan.frees_total)
        ),
        yes,
    )?;
    let done = match call(
        store,
        LifecycleOp::Prune {
            target: name,
            dry_run: false,
        },
        Some("pruning"),
    )? {
        LifecycleReply::Pruned(r) => r,
        other => bail!("unexpected reply {other:?}"),
    };
    match json {
        true => print_json(&done),
        false => {
            outln!(
                "deleted {} checkpoint(s), {} freed",
                done.items.iter().filter(|i| i.verdict.goes()).count(),
                human(done.frees_total)
            );
            Ok(())
        }
    }
}

/// Prints what a prune does with each checkpoint; `summary` adds the closing line.
fn report(r: &PruneReport, json: bool, summary: bool) -> Result<()> {
    if json {
        return print_json(r);
    }
    if r.items.is_empty() {
        outln!("nothing to prune: no VM or volume has a policy that removes checkpoints");
        return Ok(());
    }
    outln!(
        "{:<24} {:<32} {:<20} {:<16} {:>10}",
        "NAME",
        "CHECKPOINT",
        "TAKEN",
        "",
        "FREES"
    );
    for i in &r.items {
        let what = match i.verdict {
            Verdict::Keep(rule) => format!("keep ({})", crate::backup::rule_name(rule)),
            Verdict::Pinned => "keep (pinned)".into(),
            Verdict::Manual => "keep (manual)".into(),
            Verdict::Busy => "keep (backing up)".into(),
            Verdict::Remove => "remove".into(),
            Verdict::Expired => "remove (max-age)".into(),
        };
        let frees = i.frees_alone.map(human).unwrap_or_default();
        outln!(
            "{:<24} {:<32} {:<20} {:<16} {:>10}",
            i.target,
            i.checkpoint,
            time_str(i.created_ms),
            what,
            frees
        );
    }
    if !summary {
        return Ok(());
    }
    let going = r.items.iter().filter(|i| i.verdict.goes()).count();
    outln!(
        "{} {going} checkpoint(s), freeing {} in all{}",
        if r.dry_run { "would remove" } else { "removed" },
        human(r.frees_total),
        if r.dry_run { " (dry run)" } else { "" }
    );
    Ok(())
}
