//! `fsck`: checks every invariant of a store as it is on disk, without trusting any cache.
//!
//! Checked: the superblock; every metadata page's magic, checksum, kind and level; every pointer in
//! range; every catalog record decodable and consistent (owners, parents, unique names, mapped
//! counts); no mapping past a tree's size; and every stored reference count equal to the number of
//! references recomputed from all roots (so no block is leaked or used twice). It never panics on
//! bad bytes: each problem becomes one line of the report.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::format::{
    depth_for, entry, level, refcount, span, verify, CheckpointRecord, DroppedTreeRecord, Page,
    PageKind, Record, Superblock, VolumeRecord, BLOCK_SIZE, FANOUT, REFS_PER_PAGE, SUPERBLOCK,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

const BS: u64 = BLOCK_SIZE as u64;
const MAX_ERRORS: usize = 1000;

/// What fsck found.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsckReport {
    /// One line per problem (at most 1000; `error_count` has the total).
    pub errors: Vec<String>,
    /// Total problems found.
    pub error_count: usize,
    /// Metadata pages checked.
    pub pages: u64,
    /// Distinct data blocks referenced.
    pub data_blocks: u64,
    /// Volumes found.
    pub volumes: usize,
    /// Checkpoints found.
    pub checkpoints: usize,
    /// Trees of deleted checkpoints and volumes still being freed (a delete was interrupted).
    #[serde(default)]
    pub dropped_trees: usize,
}

impl FsckReport {
    /// Whether the store passed.
    pub fn ok(&self) -> bool {
        self.error_count == 0
    }

    fn err(&mut self, msg: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(msg);
        }
    }
}

struct Checker<'a> {
    dev: &'a dyn Device,
    sb: Superblock,
    /// References found, by block number, up to the high water mark: 4 bytes per block of the
    /// store where a map of referenced blocks took about 32 (1 GiB against 8 for 1 TiB).
    refs: Vec<u32>,
    /// Pages already walked, with the number of data blocks mapped below them.
    mapped_below: HashMap<u64, u64>,
    report: FsckReport,
}

impl Checker<'_> {
    fn read(&mut self, b: u64, kind: PageKind) -> Option<Box<Page>> {
        let mut p = Box::new([0u8; BLOCK_SIZE]);
        if let Err(e) = self.dev.read_at(&mut p[..], b * BS) {
            self.report.err(format!("block {b}: read failed: {e}"));
            return None;
        }
        if let Err(e) = verify(&p, b, kind) {
            self.report.err(e.to_string());
            return None;
        }
        Some(p)
    }

    fn pointer_ok(&mut self, from: &str, b: u64) -> bool {
        if !self.sb.layout.is_data_block(b) || b >= self.sb.high_water {
            self.report.err(format!(
                "{from}: pointer to block {b} outside the allocatable range (high water {})",
                self.sb.high_water
            ));
            return false;
        }
        if b as usize >= self.refs.len() {
            self.report.err(format!(
                "{from}: pointer to block {b} past the end of the data file ({} blocks)",
                self.refs.len()
            ));
            return false;
        }
        true
    }

    /// Counts a pointer to `b`, which [`Checker::pointer_ok`] accepted (so `b` indexes `refs`).
    fn reference(&mut self, b: u64) {
        if let Some(r) = self.refs.get_mut(b as usize) {
            *r = r.saturating_add(1);
        }
    }

    fn refs_to(&self, b: u64) -> u32 {
        self.refs.get(b as usize).copied().unwrap_or(0)
    }

    /// Walks a tree page at `lvl`, counting references once per page; returns mapped leaf entries
    /// below it. `leaf_children` receives children of leaves (records, for the catalog).
    fn walk(&mut self, b: u64, lvl: u32, leaf_children: &mut Option<&mut Vec<u64>>) -> u64 {
        if let Some(&n) = self.mapped_below.get(&b) {
            return n;
        }
        self.mapped_below.insert(b, 0);
        let Some(page) = self.read(b, PageKind::Tree) else {
            return 0;
        };
        self.report.pages += 1;
        if level(&page) as u32 != lvl {
            self.report.err(format!(
                "block {b}: tree page at level {lvl} says level {}",
                level(&page)
            ));
            return 0;
        }
        let mut n = 0;
        for i in 0..FANOUT {
            let e = entry(&page, i);
            if e == 0 || !self.pointer_ok(&format!("tree page {b} entry {i}"), e) {
                continue;
            }
            self.reference(e);
            if lvl == 0 {
                n += 1;
                if let Some(v) = leaf_children.as_deref_mut() {
                    v.push(e);
                } else if self.refs_to(e) == 1 {
                    self.report.data_blocks += 1;
                }
            } else {
                n += self.walk(e, lvl - 1, leaf_children);
            }
        }
        self.mapped_below.insert(b, n);
        n
    }

    /// Checks that nothing is mapped at or past `blocks` along the tree's right edge.
    fn check_bound(&mut self, what: &str, root: u64, depth: u32, blocks: u64) {
        let mut p = root;
        for lvl in (0..depth).rev() {
            if p == 0 {
                return;
            }
            let Some(page) = self.read(p, PageKind::Tree) else {
                return;
            };
            let sp = span(lvl);
            // Index of the child holding the last valid block, relative to this page.
            let last_valid = blocks.saturating_sub(1);
            let page_base = last_valid - last_valid % span(lvl + 1).max(1);
            let idx = if blocks == 0 {
                0
            } else {
                (last_valid - page_base) / sp
            };
            for i in (idx + 1)..FANOUT {
                if entry(&page, i) != 0 {
                    self.report.err(format!(
                        "{what}: block {} is mapped past the end of the volume",
                        page_base + i * sp
                    ));
                    return;
                }
            }
            p = entry(&page, idx);
        }
    }
}

/// Checks the store on a data device (journal already replayed).
pub fn check(dev: &dyn Device, path: &str) -> FsckReport {
    let mut sbp = Box::new([0u8; BLOCK_SIZE]);
    let mut report = FsckReport::default();
    if let Err(e) = dev.read_at(&mut sbp[..], SUPERBLOCK * BS) {
        report.err(format!("superblock: read failed: {e}"));
        return report;
    }
    let sb = match Superblock::decode(&sbp, path) {
        Ok(sb) => sb,
        Err(e) => {
            report.err(format!("superblock: {e}"));
            return report;
        }
    };
    let file_blocks = match dev.len() {
        Ok(len) => len / BS,
        Err(e) => {
            report.err(format!("data file: size unknown: {e}"));
            return report;
        }
    };
    // The last blocks below the high water mark may never have been written (reserved for a
    // write a crash cut short), so the file can end before it; but nothing may point past the
    // file's end, and the file's size, not a number read from it, bounds the memory used here.
    let mut c = Checker {
        dev,
        sb: sb.clone(),
        refs: vec![0; sb.high_water.min(file_blocks) as usize],
        mapped_below: HashMap::new(),
        report,
    };

    // Catalog.
    let mut record_blocks = Vec::new();
    if sb.catalog_root != 0 && c.pointer_ok("superblock catalog root", sb.catalog_root) {
        c.reference(sb.catalog_root);
        if depth_for(sb.next_id) > sb.catalog_depth {
            c.report.err(format!(
                "superblock: catalog depth {} cannot hold id {}",
                sb.catalog_depth, sb.next_id
            ));
        }
        c.walk(
            sb.catalog_root,
            sb.catalog_depth.max(1) - 1,
            &mut Some(&mut record_blocks),
        );
    }
    let mut volumes: HashMap<u64, VolumeRecord> = HashMap::new();
    let mut checkpoints: HashMap<u64, CheckpointRecord> = HashMap::new();
    let mut dropped: Vec<DroppedTreeRecord> = Vec::new();
    for b in record_blocks {
        let Some(p) = c.read(b, PageKind::Record) else {
            continue;
        };
        c.report.pages += 1;
        match Record::decode(&p, b) {
            Ok(Record::Volume(v)) => {
                volumes.insert(v.id, v);
            }
            Ok(Record::Checkpoint(cp)) => {
                checkpoints.insert(cp.id, cp);
            }
            Ok(Record::Dropped(d)) => dropped.push(d),
            Err(e) => c.report.err(e.to_string()),
        }
    }
    c.report.volumes = volumes.len();
    c.report.checkpoints = checkpoints.len();
    c.report.dropped_trees = dropped.len();

    // Records: identity and relations.
    let mut names = HashSet::new();
    for v in volumes.values() {
        if !names.insert(v.name.clone()) {
            c.report
                .err(format!("volume name '{}' is used twice", v.name));
        }
        if v.id >= sb.next_id {
            c.report.err(format!(
                "volume '{}' has id {} >= next id {}",
                v.name, v.id, sb.next_id
            ));
        }
        if let Some(p) = v.parent {
            if checkpoints.get(&p).map(|x| x.volume) != Some(v.id) {
                c.report.err(format!(
                    "volume '{}': parent checkpoint {p} is not one of its checkpoints",
                    v.name
                ));
            }
        }
    }
    let mut cp_names = HashSet::new();
    for cp in checkpoints.values() {
        let vname = volumes.get(&cp.volume).map(|v| v.name.clone());
        let Some(vname) = vname else {
            c.report.err(format!(
                "checkpoint '{}' (id {}) belongs to missing volume {}",
                cp.name, cp.id, cp.volume
            ));
            continue;
        };
        if !cp_names.insert((cp.volume, cp.name.clone())) {
            c.report.err(format!(
                "checkpoint name '{vname}@{}' is used twice",
                cp.name
            ));
        }
        if cp.id >= sb.next_id {
            c.report.err(format!(
                "checkpoint '{vname}@{}' has id {} >= next id {}",
                cp.name, cp.id, sb.next_id
            ));
        }
        if let Some(p) = cp.parent {
            if checkpoints.get(&p).map(|x| x.volume) != Some(cp.volume) {
                c.report.err(format!(
                    "checkpoint '{vname}@{}': parent {p} is not a checkpoint of the same volume",
                    cp.name
                ));
            }
        }
    }

    // Mapping trees.
    let mut trees: Vec<(String, u64, u64, u64)> = volumes
        .values()
        .map(|v| (format!("volume '{}'", v.name), v.root, v.size, v.mapped))
        .collect();
    trees.extend(checkpoints.values().map(|cp| {
        let vname = volumes
            .get(&cp.volume)
            .map(|v| v.name.as_str())
            .unwrap_or("?");
        (
            format!("checkpoint '{vname}@{}'", cp.name),
            cp.root,
            cp.size,
            cp.mapped,
        )
    }));
    for (what, root, size, mapped) in trees {
        if root == 0 {
            if mapped != 0 {
                c.report.err(format!(
                    "{what}: records {mapped} mapped blocks but has no tree"
                ));
            }
            continue;
        }
        if !c.pointer_ok(&what, root) {
            continue;
        }
        c.reference(root);
        let blocks = size.div_ceil(BS).max(1);
        let depth = depth_for(blocks);
        let n = c.walk(root, depth - 1, &mut None);
        if n != mapped {
            c.report.err(format!(
                "{what}: records {mapped} mapped blocks, its tree maps {n}"
            ));
        }
        c.check_bound(&what, root, depth, size.div_ceil(BS));
    }

    // Trees being freed hold one reference to their root, like a checkpoint, and whatever is
    // left under it; what a step already released is gone from their pages.
    for d in &dropped {
        let what = format!("tree being freed (record {})", d.id);
        if d.id >= sb.next_id {
            c.report
                .err(format!("{what}: id {} >= next id {}", d.id, sb.next_id));
        }
        if d.level >= depth_for(u64::MAX) {
            c.report
                .err(format!("{what}: root level {} is impossible", d.level));
            continue;
        }
        if c.pointer_ok(&what, d.root) {
            c.reference(d.root);
            c.walk(d.root, d.level, &mut None);
        }
    }

    // Reference counts.
    let mut allocated = 0u64;
    if sb.layout.counts_superblock() {
        c.reference(SUPERBLOCK);
    }
    for (pg, first, last) in sb.layout.refcount_pages_below(sb.high_water) {
        let page = c.read(pg, PageKind::Refcount);
        for idx in 0..REFS_PER_PAGE {
            let b = first + idx;
            let stored = page.as_ref().map(|p| refcount(p, idx)).unwrap_or(0);
            if b >= last || b >= sb.high_water {
                if stored != 0 {
                    let why = if b >= last {
                        format!("a slot of refcount page {pg} that counts no block")
                    } else {
                        format!("past the high water mark {}", sb.high_water)
                    };
                    c.report
                        .err(format!("block {b}: refcount {stored} in {why}"));
                }
                continue;
            }
            let want = c.refs_to(b);
            if stored != 0 {
                allocated += 1;
            }
            if page.is_some() && stored != want {
                let kind = if want == 0 {
                    " (leaked)"
                } else if stored < want {
                    " (would be freed while in use)"
                } else {
                    ""
                };
                c.report.err(format!(
                    "block {b}: stored refcount {stored}, {want} references found{kind}"
                ));
            }
        }
    }
    if allocated != sb.allocated {
        c.report.err(format!(
            "superblock counts {} allocated blocks, refcounts say {allocated}",
            sb.allocated
        ));
    }
    c.report
}

/// Checks a store directory that may not even open: takes the lock, replays the journal, checks.
pub fn check_dir(dir: &std::path::Path) -> Result<FsckReport> {
    use crate::store::{open_file, recover, FileAccess, DATA_FILE, JOURNAL_FILE};
    let data_path = dir.join(DATA_FILE);
    if !data_path.exists() {
        return Err(Error::NoStore(dir.display().to_string()));
    }
    let _lock = crate::store::lock_dir(dir)?;
    let data = open_file(&data_path, false, FileAccess::PLAIN)?;
    let journal = open_file(&dir.join(JOURNAL_FILE), true, FileAccess::PLAIN)?;
    let path = dir.display().to_string();
    recover(&*data, journal, &path)?;
    Ok(check(&*data, &path))
}

#[cfg(test)]
mod tests {
    use super::{check, Page, Superblock};
    use crate::device::{PowerSupply, SimDevice};
    use crate::store::{Options, Store};

    #[test]
    fn a_pointer_past_the_end_of_the_data_file_is_reported() {
        let power = PowerSupply::new();
        let data = SimDevice::new(Vec::new(), power.clone());
        let journal = SimDevice::new(Vec::new(), power.clone());
        Store::format(&*data, "sim").expect("format");
        let opts = Options {
            background_commits: false,
            ..Options::default()
        };
        let s = Store::open_devices(data.clone(), journal, opts, "sim").expect("open");
        s.create_volume("v", 1 << 20).expect("create");
        s.write("v", 0, &[7u8; 4096]).expect("write");
        // A clean close leaves every page in place in the data file.
        drop(s);
        let mut img = data.live_image();
        assert!(check(&*SimDevice::new(img.clone(), power.clone()), "sim").ok());

        // Cut the file just before the last block handed out, which something points to.
        let sb_page: &Page = img[4096..8192].try_into().expect("a superblock page");
        let hw = Superblock::decode(sb_page, "sim")
            .expect("superblock")
            .high_water;
        img.truncate(((hw - 1) * 4096) as usize);
        let report = check(&*SimDevice::new(img, power), "sim");
        assert!(
            report
                .errors
                .iter()
                .any(|e| e.contains("past the end of the data file")),
            "{:?}",
            report.errors
        );
    }
}
