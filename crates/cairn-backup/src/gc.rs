//! Garbage collection: freeing the packs and maps no backup needs any more, safely while other
//! hosts back up into the same repository.
//!
//! Prune only removes manifests; GC frees space, in two phases (as duplicacy's fossil
//! collection and rustic do) because S3 has no atomic way to stop a writer from reusing a chunk
//! that a GC is about to delete:
//! 1. A run marks what every manifest reaches (maps, chunks, so packs) and **condemns** the
//!    rest: it writes the list to `gc/NAME` and deletes nothing of it.
//! 2. A later run deletes a condemned object once the condemnation is at least the grace period
//!    old, every backup session that was live when it was written has ended, and the object is
//!    still unreferenced. Index segments that listed deleted packs are rewritten without them.
//!
//! Writers load the condemned lists when they start and do not reuse chunks in condemned packs
//! (they store them again), so a backup that starts after a condemnation never depends on what
//! it condemned, and one that started before keeps it alive by its session until it commits,
//! which makes what it reuses referenced again. One GC runs at a time (the GC lock).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};
use crate::format::{new_name, pack_key, IndexSegment};
use crate::progress::{step, Progress};
use crate::repo::{now_ms, Repository};
use crate::session;

/// What one run condemned, as stored under `gc/`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condemned {
    /// When it was written, ms since the Unix epoch.
    pub written_ms: u64,
    /// Pack names.
    pub packs: Vec<String>,
    /// Map names.
    pub maps: Vec<String>,
}

/// What a GC run found and did.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Backups whose data was kept.
    pub backups: usize,
    /// Packs in the repository.
    pub packs: usize,
    /// Packs deleted (condemned earlier, still unused).
    pub packs_deleted: usize,
    /// Maps deleted.
    pub maps_deleted: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Packs and maps condemned by this run (deleted by a later one).
    pub condemned: usize,
    /// Bytes they hold.
    pub condemned_bytes: u64,
    /// Condemned objects waiting for their grace period or for sessions to end.
    pub pending: usize,
    /// Bytes of unused chunks inside packs still in use (freed only by repacking).
    pub unused_in_live_packs: u64,
    /// Dead backup sessions and locks removed.
    pub dead_sessions: usize,
    /// Why pending objects wait, if they do.
    #[serde(default)]
    pub waiting_for: Vec<String>,
}

fn condemned_aad(key: &str) -> Vec<u8> {
    format!("cairn backup condemned {key}").into_bytes()
}

/// The condemned lists, by object key.
pub fn condemned_sets(repo: &Repository) -> Result<Vec<(String, Condemned)>> {
    let mut out = Vec::new();
    for o in repo.backend().list("gc/")? {
        let plain = repo.get_sealed(&o.key, "condemned list", &condemned_aad(&o.key))?;
        let c: Condemned = serde_json::from_slice(&plain).map_err(|e| BackupError::Corrupt {
            location: repo.location().to_string(),
            what: "condemned list",
            name: o.key.clone(),
            why: e.to_string(),
        })?;
        out.push((o.key, c));
    }
    Ok(out)
}

/// Packs that writers must not reuse chunks from.
pub fn condemned_packs(repo: &Repository) -> Result<HashSet<String>> {
    Ok(condemned_sets(repo)?
        .into_iter()
        .flat_map(|(_, c)| c.packs)
        .collect())
}

/// Runs GC: deletes what earlier runs condemned and may now go, and condemns what is unused
/// now. `grace_ms` is how long a condemnation waits at least.
pub fn gc(repo: &Repository, grace_ms: u64, progress: &mut dyn Progress) -> Result<GcReport> {
    let _lock = session::gc_lock(repo)?;
    let mut report = GcReport::default();
    let (live, dead) = session::list(repo, "sessions")?;
    for d in &dead {
        repo.backend().delete(d)?;
    }
    report.dead_sessions = dead.len();
    // Read the condemned lists before marking: an object condemned after the mark could be one
    // a backup committed meanwhile.
    let sets = condemned_sets(repo)?;

    // Mark. A manifest that does not open stops the run: what it references is unknown.
    let manifests = repo.backups()?;
    report.backups = manifests.len();
    let mut maps_used: HashSet<String> = HashSet::new();
    let mut chunks_used: HashSet<crate::crypto::ChunkId> = HashSet::new();
    // Chunks count as used only where a backup's merged map still shows them: a base's chunks
    // that later deltas cover entirely are garbage, though the base map object stays.
    let mut map_objects = HashMap::new();
    for m in &manifests {
        for img in &m.images {
            maps_used.extend(img.maps.iter().map(|r| r.name.clone()));
            for p in repo.load_map_cached(&img.maps, &mut map_objects)?.pieces() {
                if let Some((id, _)) = p.data {
                    chunks_used.insert(id);
                }
            }
        }
    }
    step(progress, 300_000)?;
    // Which packs hold a used chunk, per index segment.
    let mut segments: Vec<(String, IndexSegment)> = Vec::new();
    for o in repo.backend().list("index/")? {
        let name = o.key.trim_start_matches("index/").to_string();
        let plain = repo.get_sealed(
            &o.key,
            "index",
            format!("cairn backup index {name}").as_bytes(),
        )?;
        let seg = IndexSegment::decode(&plain).ok_or_else(|| BackupError::Corrupt {
            location: repo.location().to_string(),
            what: "index",
            name: o.key.clone(),
            why: "its records do not decode".into(),
        })?;
        segments.push((name, seg));
    }
    let packs: HashMap<String, u64> = repo
        .backend()
        .list("data/")?
        .into_iter()
        .filter_map(|o| Some((o.key.rsplit('/').next()?.to_string(), o.size)))
        .collect();
    report.packs = packs.len();
    // The pack that serves each used chunk: one that exists, preferably not condemned (a chunk
    // stored again because its pack was condemned is served by the new copy, so the condemned
    // pack can go).
    let condemned_before: HashSet<&String> = sets.iter().flat_map(|(_, c)| &c.packs).collect();
    let mut serving: HashMap<crate::crypto::ChunkId, &String> = HashMap::new();
    for (_, seg) in &segments {
        for (pack, recs) in &seg.packs {
            if !packs.contains_key(pack) {
                continue;
            }
            for (id, _, _) in recs {
                if !chunks_used.contains(id) {
                    continue;
                }
                match serving.get(id) {
                    Some(cur)
                        if !condemned_before.contains(cur) || condemned_before.contains(pack) => {}
                    _ => {
                        serving.insert(*id, pack);
                    }
                }
            }
        }
    }
    let pack_used: HashSet<&String> = serving.values().copied().collect();
    for (_, seg) in &segments {
        for (pack, recs) in &seg.packs {
            if pack_used.contains(pack) {
                report.unused_in_live_packs += recs
                    .iter()
                    .filter(|(id, _, _)| serving.get(id) != Some(&pack))
                    .map(|(_, _, len)| u64::from(*len))
                    .sum::<u64>();
            }
        }
    }
    let maps: HashMap<String, u64> = repo
        .backend()
        .list("maps/")?
        .into_iter()
        .map(|o| (o.key.trim_start_matches("maps/").to_string(), o.size))
        .collect();
    // Unused now: packs no used chunk is in (indexed or not), maps no manifest names.
    let unused_packs: HashSet<&String> = packs.keys().filter(|p| !pack_used.contains(p)).collect();
    let unused_maps: HashSet<&String> = maps.keys().filter(|m| !maps_used.contains(*m)).collect();
    step(progress, 600_000)?;

    // Sweep what earlier runs condemned, where allowed: first the index segments are rewritten
    // without the packs to delete (a reader in between sees entries twice, which is harmless),
    // then the packs go. A run cut short in between leaves packs no index lists, which the next
    // runs condemn and delete again; never an index entry whose pack is gone while its chunk is
    // in use.
    let now = now_ms();
    let mut deleted_packs: HashSet<String> = HashSet::new();
    let mut deleted_maps: HashSet<String> = HashSet::new();
    let mut still_pending: HashSet<String> = HashSet::new();
    let mut sweep_maps: Vec<&String> = Vec::new();
    for (key, set) in &sets {
        let old_enough = now >= set.written_ms + grace_ms;
        let writers: Vec<_> = live
            .iter()
            .filter(|s| s.started_ms <= set.written_ms)
            .collect();
        if !old_enough || !writers.is_empty() {
            still_pending.extend(set.packs.iter().chain(&set.maps).cloned());
            if !old_enough {
                report.waiting_for.push(format!(
                    "{key}: grace period until {}",
                    cairn_engine::names::time_str(set.written_ms + grace_ms)
                ));
            }
            for w in writers {
                report.waiting_for.push(format!(
                    "{key}: {} on {} (pid {}) since {}",
                    w.what,
                    w.host,
                    w.pid,
                    cairn_engine::names::time_str(w.started_ms)
                ));
            }
            continue;
        }
        deleted_packs.extend(
            set.packs
                .iter()
                .filter(|p| unused_packs.contains(p))
                .cloned(),
        );
        sweep_maps.extend(set.maps.iter().filter(|m| unused_maps.contains(m)));
    }
    for (name, seg) in &segments {
        if !seg.packs.iter().any(|(p, _)| deleted_packs.contains(p)) {
            continue;
        }
        let rest = IndexSegment {
            packs: seg
                .packs
                .iter()
                .filter(|(p, _)| !deleted_packs.contains(p))
                .cloned()
                .collect(),
        };
        if !rest.packs.is_empty() {
            repo.put_index(&rest)?;
        }
        repo.backend().delete(&format!("index/{name}"))?;
    }
    for p in &deleted_packs {
        repo.backend().delete(&pack_key(p))?;
        report.bytes_freed += packs.get(p).copied().unwrap_or(0);
        report.packs_deleted += 1;
    }
    for m in sweep_maps {
        repo.backend().delete(&format!("maps/{m}"))?;
        report.bytes_freed += maps.get(m).copied().unwrap_or(0);
        report.maps_deleted += 1;
        deleted_maps.insert(m.clone());
    }
    for (key, set) in &sets {
        let swept = set
            .packs
            .iter()
            .chain(&set.maps)
            .all(|o| !still_pending.contains(o));
        if swept {
            repo.backend().delete(key)?;
        }
    }
    report.pending = still_pending.len();
    step(progress, 900_000)?;

    // Condemn what is unused now and not already waiting.
    let condemned = Condemned {
        written_ms: now_ms(),
        packs: unused_packs
            .iter()
            .filter(|p| !deleted_packs.contains(**p) && !still_pending.contains(**p))
            .map(|p| (*p).clone())
            .collect(),
        maps: unused_maps
            .iter()
            .filter(|m| !deleted_maps.contains(**m) && !still_pending.contains(**m))
            .map(|m| (*m).clone())
            .collect(),
    };
    report.condemned = condemned.packs.len() + condemned.maps.len();
    report.condemned_bytes = condemned.packs.iter().map(|p| packs[p]).sum::<u64>()
        + condemned.maps.iter().map(|m| maps[m]).sum::<u64>();
    if report.condemned > 0 {
        let key = format!("gc/{:016x}-{}", condemned.written_ms, new_name());
        let json = serde_json::to_vec(&condemned).expect("lists serialize");
        repo.put_sealed(&key, &condemned_aad(&key), &json)?;
    }
    progress.report(1_000_000);
    Ok(report)
}
