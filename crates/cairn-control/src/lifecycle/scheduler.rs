//! The loop `cairn serve` runs for the lifecycle: policy checkpoints when due, retention after
//! each (and hourly for targets without a schedule, so the states applies keep expire too),
//! budgets, scheduled backups, and the floor of free host space. Every step is an [`Op`] run
//! through the daemon's one service, so it is guarded like a user's request (pins, backups
//! reading, running VMs), and every decision lands in the event log.
//!
//! Time comes from a [`Clock`], so tests run months of schedules in a second. When each target
//! last ran is kept in `STORE/lifecycle/schedule.json`, so a restarted daemon resumes where it
//! was, and a slot missed while it was down is made once ([`super::schedule::next_due`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_engine::{Clock, Store};
use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::events::{Event, EventKind, EventLog};
use super::policy::{self, Policy, DEFAULT};
use super::prune::{PruneReport, Verdict};
use super::space::{checkpoint_bytes, FloorStatus};
use super::{all_targets, is_vm, parts_of, LifecycleOp, LifecycleReply};
use crate::backup::{BackupOp, BackupReply, RepoSpec};
use crate::error::{ErrorKind, OpError};
use crate::files::{io_err, write_atomic};
use crate::ops::{Op, Reply};

/// Runs one operation the way the daemon's API would.
pub type Runner = Box<dyn Fn(Op) -> Result<Reply, OpError> + Send>;

/// How often retention runs on targets that take no checkpoints of their own.
const RETENTION_EVERY_MS: u64 = 3_600_000;

/// The longest the loop waits before looking at the policies again.
pub const MAX_WAIT_MS: u64 = 60_000;

/// When a target's steps last ran (ms since the epoch).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Last {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoint_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backup_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retention_ms: Option<u64>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Default, Serialize, Deserialize)]
struct Runs {
    targets: BTreeMap<String, Last>,
}

fn runs_file(store: &Path) -> PathBuf {
    store.join("lifecycle").join("schedule.json")
}

fn load_runs(store: &Path) -> Result<Runs, OpError> {
    let p = runs_file(store);
    match std::fs::read(&p) {
        // A damaged record only costs one early run per target: start afresh.
        Ok(b) => Ok(serde_json::from_slice(&b).unwrap_or_default()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Runs::default()),
        Err(e) => Err(io_err("reading", &p, e)),
    }
}

/// The name of a policy checkpoint taken at `ms`: `auto-2026-12-06T140000Z` (UTC; names
/// cannot hold `:`).
pub fn auto_name(ms: u64) -> String {
    let t = Utc
        .timestamp_millis_opt(i64::try_from(ms).unwrap_or(0))
        .single()
        .unwrap_or_default();
    t.format("auto-%Y-%m-%dT%H%M%SZ").to_string()
}

/// The lifecycle loop's state.
pub struct Scheduler {
    store: Arc<Store>,
    dir: PathBuf,
    clock: Clock,
    run: Runner,
    events: EventLog,
    runs: Runs,
    /// Whether the floor warning was logged since free space was last above the floor.
    floor_warned: bool,
    /// The floor setting, read again whenever the policies are.
    floor: super::space::Floor,
}

impl Scheduler {
    /// A scheduler over `store` (opened from a directory), with time from `clock`, running its
    /// operations through `run`.
    pub fn new(store: Arc<Store>, clock: Clock, run: Runner) -> Result<Scheduler, OpError> {
        let dir = super::store_dir(&store)?.to_path_buf();
        Ok(Scheduler {
            events: EventLog::open(&dir)?,
            floor: policy::floor(&dir)?,
            runs: load_runs(&dir)?,
            store,
            dir,
            clock,
            run,
            floor_warned: false,
        })
    }

    fn log(&mut self, event: Event) {
        if let Err(e) = self.events.append(event) {
            tracing::warn!("cannot record a lifecycle event: {e}");
        }
    }

    /// The policies in force: each VM's or volume's own, and the default for every other; and
    /// the floor.
    fn in_force(&self) -> Result<(Vec<Policy>, super::space::Floor), OpError> {
        let mut own = Vec::new();
        let mut default = None;
        let (policies, floor) = policy::list_with_floor(&self.dir)?;
        for p in policies {
            match p.target == DEFAULT {
                true => default = Some(p),
                false => own.push(p),
            }
        }
        if let Some(d) = default {
            let named: std::collections::HashSet<String> =
                own.iter().map(|p| p.target.clone()).collect();
            for t in all_targets(&self.store)? {
                if !named.contains(&t) {
                    own.push(Policy {
                        target: t,
                        ..d.clone()
                    });
                }
            }
        }
        Ok((own, floor))
    }

    /// Runs whatever is due now; returns when something is next due (ms since the epoch;
    /// `u64::MAX` if nothing ever is). A VM or volume the store's default policy newly covers
    /// is seen at the next tick, which the daemon's loop makes at least every [`MAX_WAIT_MS`].
    pub fn tick(&mut self) -> u64 {
        let now = self.clock.now_ms();
        let policies = match self.in_force() {
            Ok((p, floor)) => {
                self.floor = floor;
                p
            }
            Err(e) => {
                self.log(Event::new(now, EventKind::Failed, DEFAULT, e.message));
                return now.saturating_add(MAX_WAIT_MS);
            }
        };
        let mut next = u64::MAX;
        let before = self.runs.targets.clone();
        let mut targets = BTreeMap::new();
        for p in &policies {
            let mut last = self
                .runs
                .targets
                .get(&p.target)
                .copied()
                .unwrap_or_default();
            next = next.min(self.run_target(p, &mut last, now));
            targets.insert(p.target.clone(), last);
        }
        // Targets no longer under a policy are forgotten.
        self.runs.targets = targets;
        if self.runs.targets != before {
            let json = serde_json::to_vec_pretty(&self.runs).expect("runs serialize");
            if let Err(e) = write_atomic(&runs_file(&self.dir), &json) {
                tracing::warn!("cannot record the schedule: {e}");
            }
        }
        next
    }

    /// Runs what is due of one target's policy; returns when its next step is due.
    fn run_target(&mut self, p: &Policy, last: &mut Last, now: u64) -> u64 {
        let exists = is_vm(&self.store, &p.target) || self.store.volume_info(&p.target).is_ok();
        let takes = p.every_secs.is_some() || p.schedule.is_some();
        let mut took = false;
        if takes {
            match super::schedule::next_due(p, last.checkpoint_ms, now) {
                Some(due) if due <= now => {
                    last.checkpoint_ms = Some(now);
                    if !exists {
                        self.log(Event::new(now, EventKind::Failed, &p.target, format!(
                            "the policy on '{}' names no VM or volume; `cairn policy clear {}` removes it", p.target, p.target)));
                    } else {
                        took = self.take(p, now);
                        last.retention_ms = Some(now);
                    }
                }
                _ => {}
            }
        } else if exists
            && !p.keeps_everything()
            && last
                .retention_ms
                .is_none_or(|r| r + RETENTION_EVERY_MS <= now)
        {
            last.retention_ms = Some(now);
            self.retain(p, now);
        }
        if exists && p.backup_to.is_some() {
            let due = match (p.backup_every_secs, last.backup_ms) {
                (Some(every), Some(b)) => b.saturating_add(every * 1000) <= now,
                (Some(_), None) => true,
                // Without an interval, each policy checkpoint is backed up.
                (None, _) => took,
            };
            if due {
                last.backup_ms = Some(now);
                self.backup(p, now);
            }
        }
        let mut next = u64::MAX;
        if takes {
            if let Some(d) = super::schedule::next_due(p, last.checkpoint_ms, now) {
                next = next.min(d);
            }
        } else if !p.keeps_everything() {
            next = next.min(last.retention_ms.unwrap_or(now) + RETENTION_EVERY_MS);
        }
        if let (Some(every), Some(b)) = (p.backup_every_secs, last.backup_ms) {
            next = next.min(b.saturating_add(every * 1000));
        }
        next
    }

    /// Takes a policy checkpoint of `p.target` (unless over budget), then applies retention;
    /// says whether one was taken.
    fn take(&mut self, p: &Policy, now: u64) -> bool {
        let t = p.target.clone();
        if let Some(budget) = p.budget_bytes {
            let used = parts_of(&self.store, &t).and_then(|v| checkpoint_bytes(&self.store, &v));
            match used {
                Ok(used) if used >= budget => {
                    self.retain(p, now);
                    let used = parts_of(&self.store, &t)
                        .and_then(|v| checkpoint_bytes(&self.store, &v))
                        .unwrap_or(used);
                    if used >= budget {
                        self.log(Event::new(now, EventKind::Skipped, &t, format!(
                            "checkpoint skipped: the checkpoints of '{t}' hold {}, over its budget of {} even after pruning; raise --budget, loosen the keep rules, or delete checkpoints",
                            human(used), human(budget))).bytes(used));
                        return false;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.log(Event::new(
                        now,
                        EventKind::Failed,
                        &t,
                        format!(
                            "cannot measure the checkpoint space of '{t}': {}",
                            e.message
                        ),
                    ));
                    return false;
                }
            }
        }
        let base = auto_name(now);
        let mut name = base.clone();
        let mut result = self.create(&t, &name, p);
        for n in 2..10 {
            match &result {
                Err(e) if e.kind == ErrorKind::Exists => {
                    name = format!("{base}-{n}");
                    result = self.create(&t, &name, p);
                }
                _ => break,
            }
        }
        let taken = match result {
            Ok(()) => {
                self.log(
                    Event::new(
                        now,
                        EventKind::Created,
                        &t,
                        format!("checkpoint {t}@{name} taken by its policy"),
                    )
                    .checkpoint(&name),
                );
                true
            }
            Err(e) if e.kind == ErrorKind::NoSpace => {
                self.log(Event::new(now, EventKind::Skipped, &t, e.message));
                false
            }
            Err(e) => {
                self.log(Event::new(
                    now,
                    EventKind::Failed,
                    &t,
                    format!("policy checkpoint {t}@{name} failed: {}", e.message),
                ));
                false
            }
        };
        self.retain(p, now);
        taken
    }

    fn create(&self, target: &str, name: &str, p: &Policy) -> Result<(), OpError> {
        (self.run)(Op::CheckpointCreate {
            volume: target.into(),
            name: Some(name.into()),
            description: Some("taken by its lifecycle policy".into()),
            disk_only: !p.with_memory,
            quiesce: false,
            automatic: true,
        })
        .map(|_| ())
    }

    /// Applies `p`'s retention now and logs what went.
    fn retain(&mut self, p: &Policy, now: u64) {
        if p.keeps_everything() {
            return;
        }
        let op = Op::Lifecycle(LifecycleOp::Prune {
            target: Some(p.target.clone()),
            dry_run: false,
        });
        match (self.run)(op) {
            Ok(Reply::Lifecycle(LifecycleReply::Pruned(report))) => self.log_pruned(&report, now),
            Ok(_) => {}
            Err(e) => self.log(Event::new(
                now,
                EventKind::Failed,
                &p.target,
                format!("pruning '{}' by its policy failed: {}", p.target, e.message),
            )),
        }
    }

    fn log_pruned(&mut self, report: &PruneReport, now: u64) {
        for i in report.items.iter().filter(|i| i.verdict.goes()) {
            let why = match i.verdict {
                Verdict::Expired => "older than the policy's --max-age",
                _ => "no keep rule of the policy keeps it",
            };
            let freed = i.frees_alone.unwrap_or(0);
            self.log(
                Event::new(
                    now,
                    EventKind::Pruned,
                    &i.target,
                    format!(
                        "pruned {}@{}: {why}; freed {}",
                        i.target,
                        i.checkpoint,
                        human(freed)
                    ),
                )
                .checkpoint(&i.checkpoint)
                .bytes(freed),
            );
        }
    }

    /// Backs the newest policy checkpoint of `p.target` up into `p.backup_to`.
    fn backup(&mut self, p: &Policy, now: u64) {
        let t = p.target.clone();
        let Some(repo) = p.backup_to.clone() else {
            return;
        };
        let fail = |m: String| Event::new(now, EventKind::BackupFailed, &t, m);
        let newest = super::prune::checkpoints_of(&self.store, &t).map(|cs| {
            cs.into_iter()
                .filter(|c| c.automatic)
                .max_by_key(|c| c.created_ms)
                .map(|c| c.name)
        });
        let cp = match newest {
            Ok(Some(cp)) => cp,
            Ok(None) => {
                let e = fail(format!(
                    "no backup of '{t}' into '{repo}': it has no policy checkpoint yet"
                ));
                return self.log(e);
            }
            Err(e) => return self.log(fail(format!("no backup of '{t}': {}", e.message))),
        };
        let spec = match self.repo_spec(&repo) {
            Ok(s) => s,
            Err(e) => {
                let m = format!("backup of {t}@{cp} into '{repo}' failed: {}; the daemon needs the key file the repository was registered with (`cairn backup repo remove {repo}`, then `backup repo add {repo} LOCATION --key-file FILE`)", e.message);
                return self.log(fail(m).checkpoint(&cp));
            }
        };
        let op = Op::Backup(BackupOp::Create {
            target: format!("{t}@{cp}"),
            repo: spec,
        });
        let event = match (self.run)(op) {
            Ok(Reply::Backup(BackupReply::Backup(info))) => {
                let stored = info.manifest.stats.stored_bytes;
                Event::new(
                    now,
                    EventKind::BackupDone,
                    &t,
                    format!(
                        "backed up {t}@{cp} into '{repo}' as {} ({} new)",
                        info.manifest.id,
                        human(stored)
                    ),
                )
                .checkpoint(&cp)
                .bytes(stored)
            }
            Ok(_) => Event::new(
                now,
                EventKind::BackupDone,
                &t,
                format!("backed up {t}@{cp} into '{repo}'"),
            )
            .checkpoint(&cp),
            Err(e) => fail(format!(
                "backup of {t}@{cp} into '{repo}' failed: {}",
                e.message
            ))
            .checkpoint(&cp),
        };
        self.log(event);
    }

    /// How the daemon opens a registered repository: its recorded key file, else the daemon's
    /// own `CAIRN_BACKUP_PASSPHRASE`, and its own `AWS_*` credentials.
    fn repo_spec(&self, repo: &str) -> Result<RepoSpec, OpError> {
        let entry = crate::backup::registry::list(&self.dir)?
            .into_iter()
            .find(|e| e.name == repo)
            .ok_or_else(|| OpError::new(ErrorKind::NotFound, format!(
                "the policy backs up into '{repo}', which is no longer registered; `cairn backup repo add {repo} ...` again or change the policy")))?;
        let passphrase = match &entry.key_file {
            Some(f) => {
                let text =
                    std::fs::read_to_string(f).map_err(|e| io_err("reading the key file", f, e))?;
                Some(cairn_backup::Secret(
                    text.lines().next().unwrap_or_default().to_string(),
                ))
            }
            None => std::env::var("CAIRN_BACKUP_PASSPHRASE")
                .ok()
                .map(cairn_backup::Secret),
        };
        Ok(RepoSpec {
            repo: Some(repo.into()),
            cwd: self.dir.clone(),
            passphrase,
            s3: cairn_backup::S3Options::from_env(),
            ..RepoSpec::default()
        })
    }

    /// When free host space is under the floor, deletes automatic checkpoints (unpinned, not
    /// being backed up), oldest first, until it is above again; logs each. Manual and pinned
    /// checkpoints are the user's: if only they are left, a warning is logged once.
    pub fn guard_floor(&mut self) {
        let now = self.clock.now_ms();
        let Ok(status) = FloorStatus::with(&self.dir, self.floor) else {
            return;
        };
        if !status.below() {
            self.floor_warned = false;
            return;
        }
        let mut candidates = Vec::new();
        if let Ok(targets) = all_targets(&self.store) {
            for t in targets {
                if let Ok(cs) = super::prune::checkpoints_of(&self.store, &t) {
                    candidates.extend(
                        cs.into_iter()
                            .filter(|c| c.automatic && !c.pinned)
                            .map(|c| (c.created_ms, t.clone(), c.name, c.parts)),
                    );
                }
            }
        }
        candidates.sort();
        for (_, target, name, parts) in candidates {
            let frees: u64 = parts
                .iter()
                .filter_map(|v| {
                    self.store
                        .space_freed_by_deleting(v, std::slice::from_ref(&name))
                        .ok()
                })
                .sum();
            let op = Op::CheckpointDelete {
                volume: target.clone(),
                name: name.clone(),
                children: false,
            };
            if (self.run)(op).is_ok() {
                self.log(
                    Event::new(now, EventKind::Reclaimed, &target, format!(
                        "deleted automatic checkpoint {target}@{name}: the store's file system had {} free, under its floor of {}; freed {}",
                        human(status.free_bytes), human(status.floor_bytes), human(frees)))
                    .checkpoint(&name)
                    .bytes(frees),
                );
            }
            if FloorStatus::with(&self.dir, self.floor).is_ok_and(|s| !s.below()) {
                return;
            }
        }
        if !self.floor_warned {
            self.floor_warned = true;
            self.log(Event::new(now, EventKind::Warning, DEFAULT, format!(
                "the store's file system has {} free, under its floor of {}, and no automatic checkpoint is left to delete; delete checkpoints by hand (`cairn space` shows what each frees) or free space on the host",
                human(status.free_bytes), human(status.floor_bytes))));
        }
    }
}

impl Scheduler {
    /// The daemon's loop: runs what is due, and every [`FLOOR_CHECK`] guards the floor and
    /// looks whether the policies changed (then runs at once what they make due), until `stop`.
    pub fn run_until(&mut self, stop: &std::sync::atomic::AtomicBool) {
        use std::sync::atomic::Ordering;
        let policies = self.dir.join("lifecycle").join("policies.json");
        let changed = || std::fs::metadata(&policies).and_then(|m| m.modified()).ok();
        let mut seen = changed();
        let mut ticked = self.clock.now_ms();
        let mut next = self.tick();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(FLOOR_CHECK);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.guard_floor();
            let now_seen = changed();
            let now = self.clock.now_ms();
            if now >= next.min(ticked + MAX_WAIT_MS) || now_seen != seen {
                seen = now_seen;
                ticked = now;
                next = self.tick();
            }
        }
    }
}

/// How often the daemon's loop looks at free space and at the policies.
pub const FLOOR_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

fn human(b: u64) -> String {
    cairn_engine::names::human(b)
}
