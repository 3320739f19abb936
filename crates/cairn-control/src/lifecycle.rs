//! Checkpoint lifecycle: policies on VMs and volumes (and the store's default), pins, and
//! pruning by policy with exact space figures. [`LifecycleOp`] in, [`LifecycleReply`] out.
//!
//! - [`policy`]: what a policy says and where the store keeps it.
//! - [`schedule`]: when a policy's next checkpoint is due.
//! - [`prune`]: which checkpoints a policy removes, and what that frees.
//! - [`space`]: budgets and the floor of free host space.
//! - [`scheduler`]: the daemon's loop that runs policies; [`events`]: its record.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use cairn_engine::{Store, Target};
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};
use crate::execute::vm_store;
use crate::ops::Reply;

pub mod events;
pub mod policy;
pub mod prune;
pub mod schedule;
pub mod scheduler;
pub mod space;

pub use policy::{Policy, DEFAULT};
pub use prune::{PruneItem, PruneReport, Verdict};

/// One lifecycle operation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "lifecycle", rename_all = "snake_case")]
pub enum LifecycleOp {
    /// Set (replace) a VM's, a volume's or the store's default policy.
    PolicySet(Policy),
    /// The policy that applies to a VM or volume (its own or the default), or the default.
    PolicyShow {
        /// VM, volume or [`DEFAULT`].
        target: String,
    },
    /// Every policy set.
    PolicyList,
    /// Remove a policy.
    PolicyClear {
        /// VM, volume or [`DEFAULT`].
        target: String,
    },
    /// Apply retention now.
    Prune {
        /// One VM or volume; every one with a policy if absent.
        #[serde(default)]
        target: Option<String>,
        /// Only say what would go and what it frees.
        #[serde(default)]
        dry_run: bool,
    },
    /// What retention would delete now under this policy (not saved): the preview while a
    /// policy is being edited.
    PrunePreview(Policy),
    /// The store's floor of free host space (set it if `set`), and where the file system stands.
    Floor {
        /// The new setting.
        #[serde(default)]
        set: Option<space::Floor>,
    },
    /// What the daemon's lifecycle did: events with a sequence number after `after`, at most the
    /// newest `limit`.
    Events {
        /// Only events after this sequence number.
        #[serde(default)]
        after: u64,
        /// At most this many (the newest).
        #[serde(default = "events_limit")]
        limit: usize,
    },
    /// Keep a checkpoint whatever a policy says (or stop keeping it).
    Pin {
        /// `VOLUME@CHECKPOINT` or `VM@CHECKPOINT`.
        target: String,
        /// Pin or unpin.
        pinned: bool,
    },
}

fn events_limit() -> usize {
    1000
}

/// What a policy query returns.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// The policy.
    #[serde(flatten)]
    pub policy: Policy,
    /// Whether it is the store's default applied to this target.
    pub inherited: bool,
}

/// Replies of lifecycle operations.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum LifecycleReply {
    /// Policies.
    Policies(Vec<PolicyInfo>),
    /// What a prune did or would do.
    Pruned(PruneReport),
    /// Checkpoints whose pin changed.
    Pinned(Vec<String>),
    /// The floor of free host space.
    Floor(space::FloorStatus),
    /// Lifecycle events, oldest first.
    Events(Vec<events::Event>),
}

fn store_dir(store: &Store) -> Result<&Path, OpError> {
    store.dir().ok_or_else(|| {
        OpError::new(
            ErrorKind::Invalid,
            "lifecycle policies need a store in a directory",
        )
    })
}

/// Whether `name` is a VM of `store`.
fn is_vm(store: &Store, name: &str) -> bool {
    vm_store(store).is_ok_and(|v| v.exists(name))
}

/// Checks that a policy's target exists and that its budget can hold a checkpoint.
fn check_target(store: &Store, dir: &Path, p: &Policy) -> Result<(), OpError> {
    if p.target != DEFAULT && !is_vm(store, &p.target) {
        store.volume_info(&p.target)?;
    }
    if let Some(b) = p.budget_bytes {
        if b < 1 << 20 {
            return Err(OpError::new(
                ErrorKind::Invalid,
                format!("a budget of {b} bytes cannot hold a checkpoint; give at least 1M (e.g. --budget 50G)"),
            ));
        }
        if p.target != DEFAULT {
            let volumes = parts_of(store, &p.target)?;
            for v in &volumes {
                let space = store.space(Some(v))?;
                if let Some(big) = space.volumes[0].checkpoints.iter().max_by_key(|c| c.unique) {
                    if big.unique > b {
                        return Err(OpError::new(
                            ErrorKind::Invalid,
                            format!(
                                "a budget of {} is smaller than checkpoint '{v}@{}' alone ({}); give a larger --budget",
                                cairn_engine::names::human(b),
                                big.name,
                                cairn_engine::names::human(big.unique)
                            ),
                        ));
                    }
                }
            }
        }
    }
    if let Some(r) = &p.backup_to {
        let known = crate::backup::registry::list(dir)?;
        if !known.iter().any(|e| &e.name == r) {
            return Err(OpError::new(
                ErrorKind::NotFound,
                format!("--backup-to names no registered repository '{r}'; `cairn backup repo add {r} DIR|s3://BUCKET/PREFIX` first"),
            ));
        }
    }
    Ok(())
}

/// The volumes a VM's or volume's checkpoints live on.
fn parts_of(store: &Store, target: &str) -> Result<Vec<String>, OpError> {
    match vm_store(store).ok().filter(|v| v.exists(target)) {
        Some(vms) => {
            let spec = vms.get(target)?;
            let mut parts = spec.disks.clone();
            let state = cairn_vm::checkpoint::state_volume(target);
            if store.volume_info(&state).is_ok() {
                parts.push(state);
            }
            Ok(parts)
        }
        None => Ok(vec![target.to_string()]),
    }
}

/// Every VM, and every volume that is no VM's part: what pruning everything looks at.
fn all_targets(store: &Store) -> Result<Vec<String>, OpError> {
    let mut out = Vec::new();
    let mut parts = std::collections::HashSet::new();
    if let Ok(vms) = vm_store(store) {
        for spec in vms.list()? {
            parts.extend(parts_of(store, &spec.name)?);
            out.push(spec.name);
        }
    }
    for v in store.list_volumes()? {
        if !parts.contains(&v.name) {
            out.push(v.name);
        }
    }
    Ok(out)
}

/// Runs a lifecycle operation; `busy` says whether a backup reads a checkpoint (volume, name);
/// `progress` hears bytes freed.
pub fn run(
    store: &Arc<Store>,
    op: LifecycleOp,
    busy: &dyn Fn(&str, &str) -> bool,
    progress: &mut dyn FnMut(u64),
) -> Result<Reply, OpError> {
    let dir = store_dir(store)?;
    let reply = match op {
        LifecycleOp::PolicySet(p) => {
            p.validate()?;
            check_target(store, dir, &p)?;
            policy::set(dir, p.clone())?;
            LifecycleReply::Policies(vec![PolicyInfo {
                policy: p,
                inherited: false,
            }])
        }
        LifecycleOp::PolicyShow { target } => {
            if target != DEFAULT && !is_vm(store, &target) {
                store.volume_info(&target)?;
            }
            let own = policy::list(dir)?.into_iter().any(|p| p.target == target);
            match policy::effective(dir, &target)? {
                Some(p) => LifecycleReply::Policies(vec![PolicyInfo {
                    policy: p,
                    inherited: !own,
                }]),
                None => LifecycleReply::Policies(Vec::new()),
            }
        }
        LifecycleOp::PolicyList => LifecycleReply::Policies(
            policy::list(dir)?
                .into_iter()
                .map(|p| PolicyInfo {
                    policy: p,
                    inherited: false,
                })
                .collect(),
        ),
        LifecycleOp::PolicyClear { target } => {
            if !policy::clear(dir, &target)? {
                return Err(OpError::new(
                    ErrorKind::NotFound,
                    format!("'{target}' has no policy of its own; `cairn policy list` shows them"),
                ));
            }
            LifecycleReply::Policies(Vec::new())
        }
        LifecycleOp::Prune { target, dry_run } => {
            let targets = match target {
                Some(t) => {
                    if !is_vm(store, &t) {
                        store.volume_info(&t)?;
                    }
                    vec![t]
                }
                None => all_targets(store)?,
            };
            let now = store.clock().now_ms();
            let mut total = PruneReport {
                dry_run,
                ..PruneReport::default()
            };
            for t in targets {
                let Some(p) = policy::effective(dir, &t)? else {
                    continue;
                };
                if p.keeps_everything() {
                    continue;
                }
                let plan = prune::plan(store, &p, now, busy)?;
                let done = match dry_run {
                    true => plan,
                    false => prune::run(store, plan, progress)?,
                };
                total.items.extend(done.items);
                total.frees_total += done.frees_total;
            }
            LifecycleReply::Pruned(total)
        }
        LifecycleOp::PrunePreview(p) => {
            p.validate()?;
            check_target(store, dir, &p)?;
            let now = store.clock().now_ms();
            LifecycleReply::Pruned(prune::plan(store, &p, now, busy)?)
        }
        LifecycleOp::Floor { set } => {
            if let Some(f) = set {
                policy::set_floor(dir, f)?;
            }
            LifecycleReply::Floor(space::FloorStatus::of(dir)?)
        }
        LifecycleOp::Events { after, limit } => {
            LifecycleReply::Events(events::read(dir, after, limit)?)
        }
        LifecycleOp::Pin { target, pinned } => {
            let t = Target::parse(&target)?;
            let Some(name) = t.checkpoint else {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    format!("pin a checkpoint: give NAME@CHECKPOINT, not '{target}'"),
                ));
            };
            for p in &checkpoint_parts(store, &t.volume, &name)? {
                store.set_checkpoint_flags(p, &name, None, Some(pinned))?;
            }
            LifecycleReply::Pinned(vec![format!("{}@{name}", t.volume)])
        }
    };
    Ok(Reply::Lifecycle(reply))
}

/// The volumes that hold checkpoint `name` of `target`: a VM checkpoint's parts, or the volume.
fn checkpoint_parts(store: &Store, target: &str, name: &str) -> Result<Vec<String>, OpError> {
    match vm_store(store).ok().filter(|v| v.exists(target)) {
        Some(vms) => Ok(vms.checkpoint(target, name)?.parts()),
        None => Ok(vec![target.to_string()]),
    }
}

/// Names of the pinned checkpoints of `volume` (none if it does not exist).
pub(crate) fn pinned_on(store: &Store, volume: &str) -> HashSet<String> {
    store
        .list_checkpoints(volume)
        .map(|l| l.into_iter().filter(|c| c.pinned).map(|c| c.name).collect())
        .unwrap_or_default()
}

/// Refuses to delete a pinned checkpoint by hand (an unknown one is left to the delete to name).
pub fn check_not_pinned(store: &Store, volume: &str, name: &str) -> Result<(), OpError> {
    let Ok(parts) = checkpoint_parts(store, volume, name) else {
        return Ok(());
    };
    for p in parts {
        if store.checkpoint_info(&p, name).is_ok_and(|c| c.pinned) {
            return Err(OpError::new(
                ErrorKind::State,
                format!("checkpoint '{volume}@{name}' is pinned; `cairn checkpoint unpin {volume}@{name}` first"),
            ));
        }
    }
    Ok(())
}
