//! Lifecycle policies as the store keeps them: one per VM or volume, and the store's default for
//! the rest, in `STORE/lifecycle/policies.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_retention::KeepPolicy;
use serde::{Deserialize, Serialize};

use super::space::Floor;
use crate::error::{ErrorKind, OpError};
use crate::files::{load_json, write_atomic};

/// The name a store's default policy is kept under (not a valid volume or VM name).
pub const DEFAULT: &str = "*";

/// What Cairn does by itself with one VM's or volume's checkpoints.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The VM or volume, or [`DEFAULT`] for the store's default.
    pub target: String,
    /// Take a checkpoint this often (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_secs: Option<u64>,
    /// Or on this cron schedule (minute hour day month weekday, local time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Which checkpoints to keep (Proxmox Backup Server's keep-* rules).
    #[serde(default)]
    pub keep: KeepPolicy,
    /// Checkpoints older than this go whatever `keep` says (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    /// Bytes the checkpoints (all of them, beyond the head) may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    /// Back the newest policy checkpoint up into this repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_to: Option<String>,
    /// That often (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_every_secs: Option<u64>,
    /// Apply retention to checkpoints taken by name too, not only to those Cairn took.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_manual: bool,
    /// A running VM's policy checkpoints keep its memory too (standard); otherwise they are
    /// disk-only (file systems frozen through the guest agent when it answers).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub with_memory: bool,
}

impl Policy {
    /// Whether it keeps everything (no keep-* option and no maximum age).
    pub fn keeps_everything(&self) -> bool {
        self.keep.is_empty() && self.max_age_secs.is_none()
    }

    /// Checks what a policy can check alone.
    pub fn validate(&self) -> Result<(), OpError> {
        let bad = |m: String| Err(OpError::new(ErrorKind::Invalid, m));
        if self.every_secs.is_some() && self.schedule.is_some() {
            return bad("give --every or --schedule, not both".into());
        }
        if self.every_secs == Some(0) || self.backup_every_secs == Some(0) {
            return bad("an interval must be longer than zero (e.g. 15m, 1h, 1d)".into());
        }
        if self.max_age_secs == Some(0) {
            return bad(
                "--max-age 0 would remove every checkpoint; give a duration such as 90d".into(),
            );
        }
        if let Some(s) = &self.schedule {
            super::schedule::check(s)?;
        }
        if self.backup_every_secs.is_some() && self.backup_to.is_none() {
            return bad("--backup-every needs --backup-to REPO".into());
        }
        Ok(())
    }
}

/// The policies of a store.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Default, Serialize, Deserialize)]
struct Policies {
    policies: BTreeMap<String, Policy>,
    /// The free space kept on the store's file system.
    #[serde(default)]
    floor: Floor,
}

fn file(store: &Path) -> PathBuf {
    store.join("lifecycle").join("policies.json")
}

fn load(store: &Path) -> Result<Policies, OpError> {
    load_json(&file(store), "set the policies again")
}

fn save(store: &Path, p: &Policies) -> Result<(), OpError> {
    let json = serde_json::to_vec_pretty(p).expect("policies serialize");
    write_atomic(&file(store), &json)
}

/// Sets (replaces) the policy of `policy.target`.
pub fn set(store: &Path, policy: Policy) -> Result<(), OpError> {
    let mut all = load(store)?;
    all.policies.insert(policy.target.clone(), policy);
    save(store, &all)
}

/// Removes the policy of `target`; says whether there was one.
pub fn clear(store: &Path, target: &str) -> Result<bool, OpError> {
    let mut all = load(store)?;
    let had = all.policies.remove(target).is_some();
    if had {
        save(store, &all)?;
    }
    Ok(had)
}

/// Every policy, the default first.
pub fn list(store: &Path) -> Result<Vec<Policy>, OpError> {
    Ok(list_with_floor(store)?.0)
}

/// Every policy, the default first, and the floor: one read of the file.
pub fn list_with_floor(store: &Path) -> Result<(Vec<Policy>, Floor), OpError> {
    let all = load(store)?;
    Ok((all.policies.into_values().collect(), all.floor))
}

/// The policy that applies to `target`: its own, else the store's default (with `target` set
/// to it), else none.
pub fn effective(store: &Path, target: &str) -> Result<Option<Policy>, OpError> {
    let all = load(store)?;
    Ok(match all.policies.get(target) {
        Some(p) => Some(p.clone()),
        None => all.policies.get(DEFAULT).map(|d| Policy {
            target: target.into(),
            ..d.clone()
        }),
    })
}

/// The store's floor of free host space.
pub fn floor(store: &Path) -> Result<Floor, OpError> {
    Ok(load(store)?.floor)
}

/// Sets the store's floor of free host space.
pub fn set_floor(store: &Path, floor: Floor) -> Result<(), OpError> {
    let mut all = load(store)?;
    all.floor = floor;
    save(store, &all)
}
