//! Removing the backups a retention policy does not keep: [`cairn_retention`]'s selection
//! (Proxmox Backup Server's keep-* rules) applied to each group of backups in a repository.

pub use cairn_retention::{select, Candidate, KeepPolicy, Mark, Rule};
use serde::{Deserialize, Serialize};

/// One backup and what a prune does (or would do) with it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneEntry {
    /// Backup id.
    pub id: String,
    /// Volume or VM name.
    pub name: String,
    /// Checkpoint name.
    pub checkpoint: String,
    /// When it was taken.
    pub time_ms: u64,
    /// Kept (and why) or removed.
    pub mark: Mark,
}

/// Applies `policy` to each group of backups (same store, kind and name) that `wanted` accepts,
/// periods in local time; removes the manifests it marks unless `dry_run`. Space comes back
/// with the next garbage collections.
pub fn prune(
    repo: &crate::Repository,
    wanted: &dyn Fn(&crate::Manifest) -> bool,
    policy: &KeepPolicy,
    dry_run: bool,
) -> crate::Result<Vec<PruneEntry>> {
    let mut groups: std::collections::BTreeMap<(String, String, String), Vec<crate::Manifest>> =
        Default::default();
    for m in repo.backups()?.into_iter().filter(|m| wanted(m)) {
        groups
            .entry((m.store.clone(), m.kind.clone(), m.name.clone()))
            .or_default()
            .push(m);
    }
    let mut out = Vec::new();
    for list in groups.into_values() {
        let items: Vec<Candidate> = list
            .iter()
            .map(|m| Candidate {
                time_ms: m.time_ms,
                protected: false,
            })
            .collect();
        let marks = select(&items, policy, &chrono::Local);
        for (m, mark) in list.into_iter().zip(marks) {
            if mark == Mark::Remove && !dry_run {
                repo.backend().delete(&format!("backups/{}", m.id))?;
            }
            out.push(PruneEntry {
                id: m.id,
                name: m.name,
                checkpoint: m.checkpoint,
                time_ms: m.time_ms,
                mark,
            });
        }
    }
    out.sort_by(|a, b| (&a.name, a.time_ms).cmp(&(&b.name, b.time_ms)));
    Ok(out)
}
