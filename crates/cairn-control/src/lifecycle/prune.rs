//! Pruning checkpoints by policy: which go, what each frees alone, and what they free together.
//!
//! The candidates are the checkpoints Cairn took (a policy's, and the states applies kept), or
//! every checkpoint with `include_manual`; pinned ones stay and count for nothing. The keep-*
//! rules pick what stays among the candidates (local time), then a maximum age removes whatever
//! is older, kept or not. The figures are the engine's exact ones: deleting several checkpoints
//! frees more than the sum of what each frees alone where they share blocks only with each other,
//! so the total is computed for the set, per volume.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use cairn_engine::Store;
use cairn_retention::{select, Candidate, Mark, Rule};
use serde::{Deserialize, Serialize};

use super::policy::Policy;
use crate::error::OpError;
use crate::execute::{execute, vm_store};
use crate::ops::Op;

/// Why a checkpoint stays or goes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Kept by a keep-* option.
    Keep(Rule),
    /// Kept: pinned.
    Pinned,
    /// Kept: taken by name, and the policy leaves those alone.
    Manual,
    /// Kept this time: a backup is reading it.
    Busy,
    /// Goes: no option keeps it.
    Remove,
    /// Goes: older than the policy's maximum age.
    Expired,
}

impl Verdict {
    /// Whether the checkpoint goes.
    pub fn goes(self) -> bool {
        matches!(self, Verdict::Remove | Verdict::Expired)
    }
}

/// One checkpoint and what pruning does with it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneItem {
    /// The VM or volume.
    pub target: String,
    /// The checkpoint.
    pub checkpoint: String,
    /// When it was taken, ms since the Unix epoch.
    pub created_ms: u64,
    /// Kept (and why) or removed (and why).
    pub verdict: Verdict,
    /// Bytes deleting it alone would free (for those that go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frees_alone: Option<u64>,
}

/// What a prune did or would do.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Every checkpoint looked at, by target and age.
    pub items: Vec<PruneItem>,
    /// Bytes deleting all that go frees (exact, for the set).
    pub frees_total: u64,
    /// Whether nothing was deleted.
    pub dry_run: bool,
}

/// A checkpoint as pruning sees it: a VM's (all its parts) or a volume's.
pub(crate) struct Seen {
    pub(crate) name: String,
    pub(crate) created_ms: u64,
    pub(crate) automatic: bool,
    pub(crate) pinned: bool,
    /// The volumes holding it.
    pub(crate) parts: Vec<String>,
}

/// The checkpoints of `target` (a VM or a volume).
pub(crate) fn checkpoints_of(store: &Store, target: &str) -> Result<Vec<Seen>, OpError> {
    if let Ok(vms) = vm_store(store) {
        if vms.exists(target) {
            let mut out = Vec::new();
            // Each part's pins are listed once, not once per checkpoint.
            let mut pins: HashMap<String, HashSet<String>> = HashMap::new();
            for c in vms.checkpoints(target)?.into_iter().filter(|c| !c.pending) {
                let parts = c.parts();
                let pinned = parts.iter().any(|p| {
                    pins.entry(p.clone())
                        .or_insert_with(|| super::pinned_on(store, p))
                        .contains(&c.name)
                });
                out.push(Seen {
                    name: c.name.clone(),
                    created_ms: c.created_ms,
                    automatic: c.automatic,
                    pinned,
                    parts,
                });
            }
            return Ok(out);
        }
    }
    Ok(store
        .list_checkpoints(target)?
        .into_iter()
        .map(|c| Seen {
            name: c.name,
            created_ms: c.created_ms,
            automatic: c.automatic,
            pinned: c.pinned,
            parts: vec![target.to_string()],
        })
        .collect())
}

/// Decides on every checkpoint of `policy.target` at time `now_ms`; `busy` says whether a
/// backup is reading one (volume, checkpoint).
pub fn plan(
    store: &Store,
    policy: &Policy,
    now_ms: u64,
    busy: &dyn Fn(&str, &str) -> bool,
) -> Result<PruneReport, OpError> {
    let seen = checkpoints_of(store, &policy.target)?;
    let candidate = |s: &Seen| s.automatic || policy.include_manual;
    let pool: Vec<usize> = (0..seen.len()).filter(|&i| candidate(&seen[i])).collect();
    let items: Vec<Candidate> = pool
        .iter()
        .map(|&i| Candidate {
            time_ms: seen[i].created_ms,
            protected: seen[i].pinned,
        })
        .collect();
    let marks = select(&items, &policy.keep, &chrono::Local);
    let mut verdicts: Vec<Verdict> = vec![Verdict::Manual; seen.len()];
    for (&i, m) in pool.iter().zip(marks) {
        verdicts[i] = match m {
            Mark::Protected => Verdict::Pinned,
            Mark::Keep(r) => Verdict::Keep(r),
            Mark::Remove => Verdict::Remove,
        };
    }
    let cutoff = policy
        .max_age_secs
        .map(|a| now_ms.saturating_sub(a.saturating_mul(1000)));
    for (i, s) in seen.iter().enumerate() {
        if s.pinned {
            verdicts[i] = Verdict::Pinned;
            continue;
        }
        if !candidate(s) {
            continue;
        }
        if cutoff.is_some_and(|c| s.created_ms < c) {
            verdicts[i] = Verdict::Expired;
        }
        if verdicts[i].goes() && s.parts.iter().any(|p| busy(p, &s.name)) {
            verdicts[i] = Verdict::Busy;
        }
    }
    // What goes, per volume, for the set's exact figure.
    let mut per_volume: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut items = Vec::new();
    for (s, v) in seen.iter().zip(&verdicts) {
        let mut frees_alone = None;
        if v.goes() {
            let mut alone = 0;
            for p in &s.parts {
                alone += store.space_freed_by_deleting(p, std::slice::from_ref(&s.name))?;
                per_volume.entry(p).or_default().push(s.name.clone());
            }
            frees_alone = Some(alone);
        }
        items.push(PruneItem {
            target: policy.target.clone(),
            checkpoint: s.name.clone(),
            created_ms: s.created_ms,
            verdict: *v,
            frees_alone,
        });
    }
    let mut frees_total = 0;
    for (volume, names) in per_volume {
        frees_total += store.space_freed_by_deleting(volume, &names)?;
    }
    items.sort_by_key(|i| i.created_ms);
    Ok(PruneReport {
        items,
        frees_total,
        dry_run: true,
    })
}

/// Deletes what `report` says goes (oldest first); `progress` hears bytes freed.
pub fn run(
    store: &Arc<Store>,
    mut report: PruneReport,
    progress: &mut dyn FnMut(u64),
) -> Result<PruneReport, OpError> {
    let mut freed = 0;
    for item in report.items.iter().filter(|i| i.verdict.goes()) {
        let op = Op::CheckpointDelete {
            volume: item.target.clone(),
            name: item.checkpoint.clone(),
            children: false,
        };
        let before = freed;
        execute(store, op, &mut |b| progress(before + b))?;
        freed += item.frees_alone.unwrap_or(0);
    }
    report.dry_run = false;
    Ok(report)
}
