//! Checking a repository: every manifest and map opens, every chunk they need is indexed, and
//! every record read (all of them, or a sample of packs) opens and hashes to its id. Problems
//! are collected, not raised: each names the chunk, its pack, and every backup and byte range it
//! affects, so a user knows exactly what a damaged pack costs.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::crypto::{hex, ChunkId};
use crate::error::Result;
use crate::format::{pack_key, Location, BLOCK};
use crate::progress::{step, Progress};
use crate::repo::Repository;
use crate::restore::check_record;

/// A pack checked: records checked, bytes read, and each bad record with its pack and why.
type PackCheck = (u64, u64, Vec<(ChunkId, String, String)>);

/// One problem found.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `missing` or `damaged`.
    pub kind: String,
    /// What: `chunk ID in pack P`, `manifest ID`, `map NAME`.
    pub object: String,
    /// Why it failed.
    pub why: String,
    /// The backups and byte ranges it affects, e.g. `3f2a.. web@nightly bytes 0..65536`.
    pub affects: Vec<String>,
}

/// What a verify found.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Backups whose metadata was checked.
    pub backups: usize,
    /// Packs read.
    pub packs_read: usize,
    /// Packs in the index.
    pub packs_total: usize,
    /// Records opened and checked.
    pub chunks_checked: u64,
    /// Bytes read from packs.
    pub bytes_read: u64,
    /// Problems, if any.
    pub problems: Vec<Problem>,
}

/// Verifies backup `only` (an id or prefix) or all, reading `sample_percent` of the packs they
/// use (100: all). `progress` hears millionths done.
pub fn verify(
    repo: &Repository,
    only: Option<&str>,
    sample_percent: f64,
    progress: &mut dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let manifests = match only {
        Some(id) => vec![repo.manifest(id)?],
        None => {
            let mut ok = Vec::new();
            for o in repo.backend().list("backups/")? {
                let id = o.key.trim_start_matches("backups/");
                match repo.manifest(id) {
                    Ok(m) => ok.push(m),
                    Err(e) => report.problems.push(Problem {
                        kind: "damaged".into(),
                        object: format!("manifest {id}"),
                        why: e.to_string(),
                        affects: vec![format!("backup {id}")],
                    }),
                }
            }
            ok
        }
    };
    report.backups = manifests.len();
    // Which chunks each backup needs, and for what.
    let mut users: HashMap<ChunkId, Vec<String>> = HashMap::new();
    let mut map_objects = HashMap::new();
    for m in &manifests {
        for img in &m.images {
            let map = match repo.load_map_cached(&img.maps, &mut map_objects) {
                Ok(map) => map,
                Err(e) => {
                    report.problems.push(Problem {
                        kind: "damaged".into(),
                        object: format!("map of backup {}", m.id),
                        why: e.to_string(),
                        affects: vec![format!("backup {} {}@{}", m.id, img.volume, img.checkpoint)],
                    });
                    continue;
                }
            };
            for p in map.pieces() {
                if let Some((id, _)) = p.data {
                    let from = p.start * BLOCK;
                    let to = (from + u64::from(p.blocks) * BLOCK).min(img.size);
                    users.entry(id).or_default().push(format!(
                        "backup {} {}@{} bytes {from}..{to}",
                        m.id, img.volume, img.checkpoint
                    ));
                }
            }
        }
    }
    let (index, damaged) = repo.load_index_lenient()?;
    for (key, e) in damaged {
        report.problems.push(Problem {
            kind: "damaged".into(),
            object: format!("index {key}"),
            why: e.to_string(),
            affects: vec!["the chunks it locates (listed below as missing)".into()],
        });
    }
    let mut by_pack: BTreeMap<u32, Vec<(ChunkId, Location)>> = BTreeMap::new();
    for (id, affects) in &users {
        match index.chunks.get(id) {
            Some(loc) => by_pack.entry(loc.pack).or_default().push((*id, *loc)),
            None => report.problems.push(Problem {
                kind: "missing".into(),
                object: format!("chunk {}", hex(id)),
                why: "no index lists it".into(),
                affects: affects.clone(),
            }),
        }
    }
    report.packs_total = by_pack.len();
    let packs: Vec<(u32, Vec<(ChunkId, Location)>)> = by_pack
        .into_iter()
        .filter(|_| sampled(sample_percent))
        .collect();
    report.packs_read = packs.len();
    let total = packs.len().max(1) as u64;
    let mut done = 0u64;
    // A few packs at a time, in parallel, so progress moves and memory stays bounded.
    for group in packs.chunks(8) {
        let results: Vec<PackCheck> = group
            .par_iter()
            .map(|(pack, recs)| check_pack(repo, &index.packs[*pack as usize], recs))
            .collect();
        for (checked, bytes, bad) in results {
            report.chunks_checked += checked;
            report.bytes_read += bytes;
            for (id, pack, why) in bad {
                report.problems.push(Problem {
                    kind: if why == "the pack is missing" {
                        "missing"
                    } else {
                        "damaged"
                    }
                    .into(),
                    object: format!("chunk {} in pack {pack}", hex(&id)),
                    why,
                    affects: users[&id].clone(),
                });
            }
        }
        done += group.len() as u64;
        step(progress, done * 1_000_000 / total)?;
    }
    progress.report(1_000_000);
    Ok(report)
}

/// Reads one pack whole and opens each listed record: (records checked, bytes read, problems).
fn check_pack(repo: &Repository, pack: &str, recs: &[(ChunkId, Location)]) -> PackCheck {
    let fail = |why: &str| {
        recs.iter()
            .map(|(id, _)| (*id, pack.to_string(), why.to_string()))
            .collect()
    };
    let bytes = match repo.backend().get(&pack_key(pack)) {
        Ok(Some(b)) => b,
        Ok(None) => return (0, 0, fail("the pack is missing")),
        Err(e) => return (0, 0, fail(&format!("reading the pack failed: {e}"))),
    };
    let mut bad = Vec::new();
    for (id, loc) in recs {
        let from = loc.offset as usize;
        let rec = bytes.get(from..from + loc.len as usize).unwrap_or(&[]);
        if let Err(why) = check_record(repo, id, rec) {
            bad.push((*id, pack.to_string(), why));
        }
    }
    (recs.len() as u64, bytes.len() as u64, bad)
}

/// Whether to read a pack in a `percent` sample: drawn at random on each run, so repeated
/// sampled runs cover different packs over time (as `restic check --read-data-subset`).
fn sampled(percent: f64) -> bool {
    percent >= 100.0 || rand::random::<f64>() * 100.0 < percent
}
