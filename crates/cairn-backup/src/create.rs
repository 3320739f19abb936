//! Taking a backup of a volume's checkpoint.
//!
//! The blocks to read come from the engine: for the first backup of a volume, the checkpoint's
//! mapped extents; after that, the diff between the newest checkpoint of the volume already in
//! the repository (if the store still has it) and this one, so unchanged data is never read.
//! Those blocks are cut on chunk boundaries: a chunk whose blocks all changed is stored whole (so
//! it dedups with fulls, clones and other hosts); otherwise each run of changed blocks is stored
//! alone, and a scattered 4 KiB change costs 4 KiB plus about 90 bytes of record, index and map.
//!
//! Reading, hashing, compressing and sealing run on all cores (rayon), a batch at a time, at the
//! lowest CPU priority ([`crate::background`]);
//! records go into packs that uploader threads store while the next batch is read. The index
//! segment, then the map, then the manifest are written only once every pack is stored.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;
use std::time::Instant;

use cairn_engine::{CheckpointInfo, Store, Target, VolumeInfo};
use rayon::prelude::*;

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::format::{
    new_name, pack_key, record_aad, BackupStats, Image, IndexSegment, Manifest, MapRef, BLOCK,
    CHUNK_BLOCKS, FORMAT, PACK_TARGET, RECORD_COMPRESSED,
};
use crate::map::{Piece, VolumeMap};
use crate::progress::{step, Progress};
use crate::repo::{now_ms, Repository};
use crate::session::Session;

/// Volume bytes read and sealed per batch.
const BATCH_BYTES: u64 = 8 << 20;
/// Packs being uploaded at once.
const UPLOADERS: usize = 3;
/// zstd level of chunk data: level 1 keeps up with the disk on two cores.
const DATA_ZSTD: i32 = 1;
/// A chain of deltas longer than this is rebased onto a new full map.
const MAX_CHAIN: usize = 32;
/// Deltas are rebased once their pieces together outnumber the base's (and this many).
const MIN_REBASE_PIECES: u64 = 4096;

/// What to back up and from where.
pub struct Source<'a> {
    /// The store.
    pub store: &'a Store,
    /// Its id (backups of one store's volumes are incremental to each other).
    pub store_id: &'a str,
    /// `volume` or `vm`.
    pub kind: &'static str,
    /// The volume or VM name: backups of one name form a group.
    pub name: String,
    /// Checkpoint name (the same on every volume backed up).
    pub checkpoint: String,
    /// The volumes whose checkpoint of that name to back up, in order (one for a volume; a VM's
    /// disks and its state volume).
    pub volumes: Vec<String>,
    /// What else to keep with it (a VM's definition and checkpoint record).
    pub extra: Option<serde_json::Value>,
}

impl<'a> Source<'a> {
    /// A backup of one volume's checkpoint.
    pub fn volume(
        store: &'a Store,
        store_id: &'a str,
        volume: &str,
        checkpoint: &str,
    ) -> Source<'a> {
        Source {
            store,
            store_id,
            kind: "volume",
            name: volume.into(),
            checkpoint: checkpoint.into(),
            volumes: vec![volume.into()],
            extra: None,
        }
    }
}

/// A unit read: `None` if all zeros, else its chunk id and bytes.
type ReadUnit = (Unit, Option<(ChunkId, Vec<u8>)>);

/// A run of blocks to read and store as one record.
#[derive(Debug, Clone, Copy)]
struct Unit {
    start: u64,
    blocks: u32,
}

/// What one volume's image needs: its checkpoint, what it is incremental to, and what to read.
struct ImagePlan {
    volume: String,
    vinfo: VolumeInfo,
    cp: CheckpointInfo,
    /// The backup and image this one is incremental to.
    base: Option<(Manifest, usize)>,
    units: Vec<Unit>,
}

fn plan(backups: &[Manifest], src: &Source, volume: &str) -> Result<ImagePlan> {
    let store = src.store;
    let vinfo = store.volume_info(volume)?;
    let cp = store.checkpoint_info(volume, &src.checkpoint)?;
    let checkpoints = store.list_checkpoints(volume)?;
    let base = find_base(backups, src.store_id, &vinfo, &checkpoints);
    let target = Target::checkpoint(volume, &cp.name);
    let base_target = base
        .as_ref()
        .map(|(_, _, b)| Target::checkpoint(volume, &b.name));
    let extents = store.extents_to_back_up(base_target.as_ref(), &target)?;
    let units = units(&extents, cp.size, base.is_none());
    Ok(ImagePlan {
        volume: volume.into(),
        vinfo,
        cp,
        base: base.map(|(m, i, _)| (m, i)),
        units,
    })
}

/// Backs up `src` into `repo`; `progress` hears the fraction done in millionths.
pub fn create(repo: &Repository, src: &Source, progress: &mut dyn Progress) -> Result<Manifest> {
    let began = Instant::now();
    let store = src.store;
    // The session first: a GC that condemns anything after this waits for it; what was
    // condemned before is read next and not reused.
    let session = Session::begin(repo, &format!("backup {}@{}", src.name, src.checkpoint))?;
    let backups = repo.backups()?;
    let plans: Vec<ImagePlan> = src
        .volumes
        .iter()
        .map(|v| plan(&backups, src, v))
        .collect::<Result<_>>()?;
    let total: u64 = plans
        .iter()
        .flat_map(|p| &p.units)
        .map(|u| u64::from(u.blocks) * BLOCK)
        .sum();
    let condemned = crate::gc::condemned_packs(repo)?;
    let index = repo.load_index()?;
    let reusable = |id: &ChunkId| {
        index
            .chunks
            .get(id)
            .is_some_and(|l| !condemned.contains(&index.packs[l.pack as usize]))
    };
    let mut stats = BackupStats::default();
    let mut maps: Vec<VolumeMap> = Vec::new();
    let mut segment = IndexSegment::default();
    let upload_error: Mutex<Option<BackupError>> = Mutex::new(None);
    let (tx, rx) = sync_channel::<(String, Vec<u8>)>(1);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..UPLOADERS {
            s.spawn(|| {
                crate::background::lower_priority();
                loop {
                    let job = rx.lock().map(|r| r.recv());
                    let Ok(Ok((name, bytes))) = job else {
                        return;
                    };
                    if let Err(e) = repo.backend().put(&pack_key(&name), bytes) {
                        let mut slot = upload_error.lock().unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(e);
                    }
                }
            });
        }
        let mut packer = Packer::new(repo, tx);
        let mut seen: HashMap<ChunkId, ()> = HashMap::new();
        let mut done = 0u64;
        for plan in &plans {
            let target = Target::checkpoint(&plan.volume, &plan.cp.name);
            // One piece a unit, so the map never grows past what it holds.
            let mut map = VolumeMap::with_capacity(plan.units.len());
            for batch in batches(&plan.units) {
                if upload_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    break;
                }
                session.refresh_if_due()?;
                let read: Vec<ReadUnit> = crate::background::pool().install(|| {
                    batch
                        .par_iter()
                        .map(|u| read_unit(repo, store, &target, plan.cp.size, *u).map(|d| (*u, d)))
                        .collect::<Result<_>>()
                })?;
                let mut fresh = Vec::new();
                for (u, d) in read {
                    let data = d.as_ref().map(|(id, _)| (*id, 0));
                    map.push(Piece {
                        start: u.start,
                        blocks: u.blocks,
                        data,
                    });
                    stats.read_bytes += u64::from(u.blocks) * BLOCK;
                    if let Some((id, bytes)) = d {
                        if reusable(&id) || seen.insert(id, ()).is_some() {
                            stats.reused_chunks += 1;
                        } else {
                            stats.new_chunks += 1;
                            stats.new_bytes += bytes.len() as u64;
                            fresh.push((id, bytes));
                        }
                    }
                }
                let sealed: Vec<(ChunkId, Vec<u8>)> = crate::background::pool().install(|| {
                    fresh
                        .par_iter()
                        .map(|(id, bytes)| (*id, seal_record(repo, id, bytes)))
                        .collect()
                });
                for (id, rec) in sealed {
                    packer.add(id, &rec, &mut segment);
                }
                done += batch
                    .iter()
                    .map(|u| u64::from(u.blocks) * BLOCK)
                    .sum::<u64>();
                step(progress, millionths(done, total))?;
            }
            maps.push(map);
        }
        packer.finish(&mut segment);
        stats.stored_bytes += packer.stored;
        Ok(())
    })?;
    if let Some(e) = upload_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }

    let mut index_names = Vec::new();
    if !segment.packs.is_empty() {
        let (name, n) = repo.put_index(&segment)?;
        stats.stored_bytes += n;
        index_names.push(name);
    }
    // Its 24 bytes a chunk are not needed while the maps are encoded and stored.
    drop(segment);
    let mut images = Vec::new();
    for (plan, map) in plans.iter().zip(&maps) {
        let base_maps = plan.base.as_ref().map(|(m, i)| &m.images[*i].maps[..]);
        images.push(Image {
            volume: plan.volume.clone(),
            volume_id: plan.vinfo.id,
            volume_created_ms: plan.vinfo.created_ms,
            checkpoint: plan.cp.name.clone(),
            checkpoint_id: plan.cp.id,
            checkpoint_created_ms: plan.cp.created_ms,
            size: plan.cp.size,
            maps: store_map(repo, base_maps, map, &mut stats)?,
        });
    }
    let first = &plans[0];
    let manifest = Manifest {
        format: FORMAT,
        id: crate::crypto::hex(&rand::random::<[u8; 8]>()),
        time_ms: first.cp.created_ms,
        finished_ms: now_ms(),
        kind: src.kind.into(),
        name: src.name.clone(),
        checkpoint: src.checkpoint.clone(),
        description: first.cp.description.clone(),
        host: host_name(),
        store: src.store_id.into(),
        images,
        parent: first.base.as_ref().map(|(m, _)| m.id.clone()),
        index: index_names,
        stats: BackupStats {
            duration_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..stats
        },
        extra: src.extra.clone(),
    };
    // The manifest's own few hundred bytes are not in its stats (it cannot count itself).
    session.check_fresh()?;
    repo.put_manifest(&manifest)?;
    drop(session);
    progress.report(1_000_000);
    Ok(manifest)
}

/// The newest image of this very volume (same store, same catalog id and creation time) in any
/// backup, volume or VM, whose checkpoint the store still has: the backup, the image's place in
/// it, and that checkpoint.
fn find_base(
    backups: &[Manifest],
    store_id: &str,
    vinfo: &VolumeInfo,
    checkpoints: &[CheckpointInfo],
) -> Option<(Manifest, usize, CheckpointInfo)> {
    let by_id: HashMap<_, &CheckpointInfo> = checkpoints.iter().map(|c| (c.id, c)).collect();
    let mut best: Option<(&Manifest, usize, &CheckpointInfo)> = None;
    for m in backups.iter().filter(|m| m.store == store_id) {
        for (i, img) in m.images.iter().enumerate() {
            if img.volume_id != vinfo.id || img.volume_created_ms != vinfo.created_ms {
                continue;
            }
            let Some(&cp) = by_id
                .get(&img.checkpoint_id)
                .filter(|c| c.created_ms == img.checkpoint_created_ms)
            else {
                continue;
            };
            let newer = best
                .as_ref()
                .is_none_or(|(_, _, b)| (cp.created_ms, cp.id) > (b.created_ms, b.id));
            if newer {
                best = Some((m, i, cp));
            }
        }
    }
    best.map(|(m, i, cp)| (m.clone(), i, cp.clone()))
}

/// Cuts byte extents into records: whole chunks where every block of the chunk is to be read
/// (always, for a full backup), else runs of blocks within a chunk.
fn units(extents: &[cairn_engine::Extent], size: u64, full: bool) -> Vec<Unit> {
    let nblocks = size.div_ceil(BLOCK);
    // Changed blocks per chunk, as a bitmask (16 blocks a chunk).
    let mut chunks: Vec<(u64, u16)> = Vec::new();
    for e in extents {
        let first = e.offset / BLOCK;
        let end = (e.offset + e.length).div_ceil(BLOCK).min(nblocks);
        for b in first..end {
            let c = b / CHUNK_BLOCKS;
            let bit = 1u16 << (b % CHUNK_BLOCKS);
            match chunks.last_mut() {
                Some((lc, mask)) if *lc == c => *mask |= bit,
                _ => chunks.push((c, bit)),
            }
        }
    }
    chunks.sort_by_key(|(c, _)| *c);
    chunks.dedup_by(|b, a| {
        if a.0 == b.0 {
            a.1 |= b.1;
            true
        } else {
            false
        }
    });
    let mut out = Vec::new();
    for (c, mask) in chunks {
        let start = c * CHUNK_BLOCKS;
        let in_chunk = (nblocks - start).min(CHUNK_BLOCKS);
        let all = u16::try_from((1u32 << in_chunk) - 1).unwrap_or(u16::MAX);
        if full || mask & all == all {
            out.push(Unit {
                start,
                blocks: u32::try_from(in_chunk).expect("at most 16"),
            });
            continue;
        }
        let mut b = 0u64;
        while b < in_chunk {
            if mask & (1 << b) == 0 {
                b += 1;
                continue;
            }
            let run = (b..in_chunk).take_while(|i| mask & (1 << i) != 0).count() as u64;
            out.push(Unit {
                start: start + b,
                blocks: u32::try_from(run).expect("at most 16"),
            });
            b += run;
        }
    }
    out
}

fn batches(units: &[Unit]) -> impl Iterator<Item = &[Unit]> + '_ {
    let mut rest = units;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .take_while(|u| {
                bytes += u64::from(u.blocks) * BLOCK;
                bytes <= BATCH_BYTES
            })
            .count()
            .max(1);
        let (b, r) = rest.split_at(n);
        rest = r;
        Some(b)
    })
}

/// Reads a unit; `None` if it is all zeros, else its chunk id and bytes.
fn read_unit(
    repo: &Repository,
    store: &Store,
    target: &Target,
    size: u64,
    u: Unit,
) -> Result<Option<(ChunkId, Vec<u8>)>> {
    let off = u.start * BLOCK;
    let len = u64::from(u.blocks) * BLOCK;
    let mut buf = vec![0u8; usize::try_from(len).expect("a unit is at most a chunk")];
    let avail = usize::try_from(len.min(size - off)).expect("at most a chunk");
    store.read_background(target, off, &mut buf[..avail])?;
    if buf.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    Ok(Some((repo.keys().chunk_id(&buf), buf)))
}

/// A record: a flag byte (compressed or not), then the sealed payload, bound to the chunk id.
fn seal_record(repo: &Repository, id: &ChunkId, data: &[u8]) -> Vec<u8> {
    let packed = zstd::bulk::compress(data, DATA_ZSTD)
        .ok()
        .filter(|c| c.len() < data.len());
    let (flags, payload) = match &packed {
        Some(c) => (RECORD_COMPRESSED, &c[..]),
        None => (0, data),
    };
    let sealed = repo.keys().seal(&record_aad(id, flags), payload);
    let mut rec = Vec::with_capacity(1 + sealed.len());
    rec.push(flags);
    rec.extend_from_slice(&sealed);
    rec
}

/// Fills packs and hands full ones to the uploaders.
struct Packer<'a> {
    repo: &'a Repository,
    tx: Option<SyncSender<(String, Vec<u8>)>>,
    name: String,
    bytes: Vec<u8>,
    records: Vec<(ChunkId, u32, u32)>,
    stored: u64,
}

impl<'a> Packer<'a> {
    fn new(repo: &'a Repository, tx: SyncSender<(String, Vec<u8>)>) -> Packer<'a> {
        Packer {
            repo,
            tx: Some(tx),
            name: new_name(),
            bytes: Vec::with_capacity(PACK_TARGET + (1 << 20)),
            records: Vec::new(),
            stored: 0,
        }
    }

    fn add(&mut self, id: ChunkId, rec: &[u8], segment: &mut IndexSegment) {
        let off = u32::try_from(self.bytes.len()).expect("packs stay far below 4 GiB");
        let len = u32::try_from(rec.len()).expect("records are at most a chunk");
        self.bytes.extend_from_slice(rec);
        self.records.push((id, off, len));
        if self.bytes.len() >= PACK_TARGET {
            self.close(segment);
        }
    }

    /// Appends the pack's sealed table of records (so an index can be rebuilt from the packs
    /// alone) and its length, and sends it to be stored.
    fn close(&mut self, segment: &mut IndexSegment) {
        if self.records.is_empty() {
            return;
        }
        let name = std::mem::replace(&mut self.name, new_name());
        let mut records = std::mem::take(&mut self.records);
        // The segment keeps these until the backup ends: without the room they grew into.
        records.shrink_to_fit();
        let table = IndexSegment {
            packs: vec![(name.clone(), records.clone())],
        };
        let sealed = self.repo.keys().seal(
            format!("cairn backup pack {name}").as_bytes(),
            &table.encode(),
        );
        let mut bytes =
            std::mem::replace(&mut self.bytes, Vec::with_capacity(PACK_TARGET + (1 << 20)));
        bytes.extend_from_slice(&sealed);
        bytes.extend_from_slice(&u32::try_from(sealed.len()).expect("small").to_le_bytes());
        self.stored += bytes.len() as u64;
        segment.packs.push((name.clone(), records));
        if let Some(tx) = &self.tx {
            // A send fails only once every uploader has stopped, which they do after an error
            // that `create` reports.
            let _ = tx.send((name, bytes));
        }
    }

    fn finish(&mut self, segment: &mut IndexSegment) {
        self.close(segment);
        self.tx = None;
    }
}

/// Stores the new map: a full map for a first backup; for an incremental, its delta added to
/// the base's chain, or the merged chain as a new full map once the deltas outgrow the base.
fn store_map(
    repo: &Repository,
    base: Option<&[MapRef]>,
    map: &VolumeMap,
    stats: &mut BackupStats,
) -> Result<Vec<MapRef>> {
    let Some(base) = base else {
        let (name, n) = repo.put_map(map)?;
        stats.stored_bytes += n;
        return Ok(vec![MapRef {
            name,
            pieces: map.len() as u64,
        }]);
    };
    let mut chain = base.to_vec();
    let delta_pieces: u64 = chain.iter().skip(1).map(|m| m.pieces).sum::<u64>() + map.len() as u64;
    let base_pieces = chain.first().map_or(0, |m| m.pieces);
    if chain.len() + 1 > MAX_CHAIN || delta_pieces > base_pieces.max(MIN_REBASE_PIECES) {
        let mut merged = repo.load_map(&chain)?;
        merged.overlay_map(map, false);
        let (name, n) = repo.put_map(&merged)?;
        stats.stored_bytes += n;
        return Ok(vec![MapRef {
            name,
            pieces: merged.len() as u64,
        }]);
    }
    let (name, n) = repo.put_map(map)?;
    stats.stored_bytes += n;
    chain.push(MapRef {
        name,
        pieces: map.len() as u64,
    });
    Ok(chain)
}

fn millionths(done: u64, total: u64) -> u64 {
    match total {
        0 => 1_000_000,
        t => u64::try_from(u128::from(done) * 1_000_000 / u128::from(t)).unwrap_or(1_000_000),
    }
}

/// This host's name, as backups and sessions record it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::Extent;

    fn ext(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn changes_are_cut_into_whole_chunks_or_runs() {
        // One block changed, and a whole chunk plus one more block.
        let u = units(&[ext(4096, 4096), ext(65536, 65536 + 8192)], 1 << 20, false);
        let got: Vec<(u64, u32)> = u.iter().map(|u| (u.start, u.blocks)).collect();
        assert_eq!(got, vec![(1, 1), (16, 16), (32, 2)]);
        // A full backup reads whole chunks, and the volume's short last chunk.
        let u = units(
            &[ext(4096, 4096), ext(65536 + 4096, 4096)],
            65536 + 8192,
            true,
        );
        let got: Vec<(u64, u32)> = u.iter().map(|u| (u.start, u.blocks)).collect();
        assert_eq!(got, vec![(0, 16), (16, 2)]);
    }
}
