//! The in-memory state of the catalog and its changes, made under the state lock.

use super::*;

impl State {
    pub(super) fn delete_volume(&mut self, name: &str) -> Result<()> {
        let id = self.volume_id(name)?;
        let cps: Vec<u64> = self
            .checkpoints
            .values()
            .filter(|c| c.volume == id)
            .map(|c| c.id)
            .collect();
        for c in cps {
            self.drop_checkpoint(c)?;
        }
        let v = self
            .volumes
            .remove(&id)
            .ok_or_else(|| Error::UnknownVolume(name.into()))?;
        self.volume_ids.remove(&v.name);
        if v.root != 0 {
            self.queue_drop(v.root, tree_depth(v.size) - 1);
        }
        self.dirty_records.remove(&id);
        self.deleted_records.insert(id);
        Ok(())
    }
    /// Applies checkpoint `cid` to volume `vid` (both validated by the caller).
    pub(super) fn apply_checkpoint(
        &mut self,
        vid: u64,
        cid: u64,
        save: Option<SaveCurrent<'_>>,
    ) -> Result<VolumeInfo> {
        if let Some(s) = save {
            let id = self.checkpoint_in_memory(vid, s.name, None)?;
            if let Some(c) = self.checkpoints.get_mut(&id) {
                c.automatic = s.automatic;
            }
        }
        let c = self.checkpoints[&cid].clone();
        let v = self.volumes[&vid].clone();
        if c.root != 0 {
            self.meta.incref(c.root)?;
        }
        if v.root != 0 {
            self.queue_drop(v.root, tree_depth(v.size) - 1);
        }
        let vm = self.volume_mut(vid);
        vm.root = c.root;
        vm.size = c.size;
        vm.mapped = c.mapped;
        vm.parent = Some(cid);
        self.volume_info(vid)
    }

    pub(super) fn new_id(&mut self) -> u64 {
        let id = self.meta.sb.next_id;
        self.meta.sb.next_id += 1;
        id
    }

    /// One step of freeing the oldest dropped tree, if any (not committed); adds the blocks it
    /// freed to `freed`.
    pub(super) fn drop_some(&mut self, freed: &mut u64) -> Result<()> {
        let Some(rec) = self.dropped.values().next().cloned() else {
            return Ok(());
        };
        let mut step = DropStep {
            max_released: self.opts.drop_step.max(1),
            max_dirty: self.opts.dirty_limit,
            released: 0,
        };
        let before = self.meta.sb.allocated;
        let r = self.meta.drop_step(rec.root, rec.level, &mut step);
        if self.poison_on(r)? {
            self.dropped.remove(&rec.id);
            self.deleted_records.insert(rec.id);
        }
        *freed += before.saturating_sub(self.meta.sb.allocated);
        Ok(())
    }

    /// Hands a reference to a tree (a page at `level`) over to a dropped-tree record, to be
    /// freed a step at a time (see [`Store::free_dropped`]).
    pub(super) fn queue_drop(&mut self, root: u64, level: u32) {
        let id = self.new_id();
        self.dropped
            .insert(id, DroppedTreeRecord { id, root, level });
        self.dirty_records.insert(id);
    }

    pub(super) fn volume_id(&self, name: &str) -> Result<u64> {
        self.volume_ids
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownVolume(name.into()))
    }

    pub(super) fn checkpoint_id(&self, vid: u64, volume: &str, name: &str) -> Result<u64> {
        self.checkpoint_ids
            .get(&(vid, name.to_string()))
            .copied()
            .ok_or_else(|| Error::UnknownCheckpoint {
                volume: volume.into(),
                name: name.into(),
            })
    }

    pub(super) fn volume_mut(&mut self, id: u64) -> &mut VolumeRecord {
        self.dirty_records.insert(id);
        self.volumes
            .get_mut(&id)
            .expect("volume ids come from the map")
    }

    /// Root, depth and size of a head or checkpoint.
    pub(super) fn resolve(&self, t: &Target) -> Result<(u64, u32, u64)> {
        self.resolve_id(self.volume_id(&t.volume)?, t)
    }

    /// [`State::resolve`] for a volume already looked up by name (its gate held, say); fails if
    /// the volume was deleted since.
    pub(super) fn resolve_id(&self, vid: u64, t: &Target) -> Result<(u64, u32, u64)> {
        match &t.checkpoint {
            None => {
                let v = self
                    .volumes
                    .get(&vid)
                    .ok_or_else(|| Error::UnknownVolume(t.volume.clone()))?;
                Ok((v.root, tree_depth(v.size), v.size))
            }
            Some(c) => {
                let cid = self.checkpoint_id(vid, &t.volume, c)?;
                let c = &self.checkpoints[&cid];
                Ok((c.root, tree_depth(c.size), c.size))
            }
        }
    }

    pub(super) fn volume_info(&self, id: u64) -> Result<VolumeInfo> {
        let v = self
            .volumes
            .get(&id)
            .ok_or_else(|| Error::Invalid(format!("no volume with id {id}")))?;
        Ok(VolumeInfo {
            name: v.name.clone(),
            id: v.id,
            size: v.size,
            referenced: v.mapped * BS,
            parent: v
                .parent
                .and_then(|p| self.checkpoints.get(&p))
                .map(|c| c.name.clone()),
            // The names index is ordered by volume, so only this volume's checkpoints are counted.
            checkpoints: self
                .checkpoint_ids
                .range((id, String::new())..(id + 1, String::new()))
                .count(),
            created_ms: v.created_ms,
            origin: v.origin.clone(),
        })
    }

    /// What a head's changes are counted from (see [`VolumeSpace::head_changed_since`]).
    pub(super) fn head_base(&self, v: &VolumeRecord) -> Option<CheckpointRecord> {
        v.parent
            .or(v.origin_checkpoint)
            .and_then(|c| self.checkpoints.get(&c))
            .cloned()
    }

    /// `VOLUME@CHECKPOINT` for a checkpoint of this store.
    pub(super) fn qualified_name(&self, c: &CheckpointRecord) -> String {
        let volume = self.volumes.get(&c.volume).map_or("?", |v| v.name.as_str());
        Target::checkpoint(volume, &c.name).to_string()
    }

    pub(super) fn checkpoint_info(&self, id: u64) -> Result<CheckpointInfo> {
        let c = self
            .checkpoints
            .get(&id)
            .ok_or_else(|| Error::Invalid(format!("no checkpoint with id {id}")))?;
        let v = &self.volumes[&c.volume];
        Ok(CheckpointInfo {
            volume: v.name.clone(),
            name: c.name.clone(),
            id,
            size: c.size,
            referenced: c.mapped * BS,
            parent: c
                .parent
                .and_then(|p| self.checkpoints.get(&p))
                .map(|p| p.name.clone()),
            created_ms: c.created_ms,
            description: c.description.clone(),
            is_head_parent: v.parent == Some(id),
            automatic: c.automatic,
            pinned: c.pinned,
        })
    }

    /// Checks that checkpoint `name` can be created on `volume`; returns the volume id.
    pub(super) fn check_new_checkpoint(&self, volume: &str, name: &str) -> Result<u64> {
        let vid = self.volume_id(volume)?;
        if self.checkpoint_ids.contains_key(&(vid, name.to_string())) {
            return Err(Error::CheckpointExists {
                volume: volume.into(),
                name: name.into(),
            });
        }
        Ok(vid)
    }

    /// Records a checkpoint of the head of `vid` (validated by `check_new_checkpoint`).
    pub(super) fn checkpoint_in_memory(
        &mut self,
        vid: u64,
        name: &str,
        description: Option<&str>,
    ) -> Result<u64> {
        let v = self.volumes[&vid].clone();
        if v.root != 0 {
            self.meta.incref(v.root)?;
        }
        let id = self.new_id();
        self.checkpoints.insert(
            id,
            CheckpointRecord {
                id,
                volume: vid,
                name: name.into(),
                size: v.size,
                root: v.root,
                mapped: v.mapped,
                parent: v.parent,
                created_ms: self.opts.clock.now_ms(),
                description: description.map(Into::into),
                automatic: false,
                pinned: false,
            },
        );
        self.checkpoint_ids.insert((vid, name.into()), id);
        self.dirty_records.insert(id);
        self.volume_mut(vid).parent = Some(id);
        Ok(id)
    }

    pub(super) fn drop_checkpoint(&mut self, cid: u64) -> Result<()> {
        let c = self
            .checkpoints
            .remove(&cid)
            .ok_or_else(|| Error::Invalid(format!("no checkpoint with id {cid}")))?;
        self.checkpoint_ids.remove(&(c.volume, c.name.clone()));
        let children: Vec<u64> = self
            .checkpoints
            .values()
            .filter(|x| x.parent == Some(cid))
            .map(|x| x.id)
            .collect();
        for ch in children {
            if let Some(x) = self.checkpoints.get_mut(&ch) {
                x.parent = c.parent;
            }
            self.dirty_records.insert(ch);
        }
        let heads: Vec<u64> = self
            .volumes
            .values()
            .filter(|v| v.parent == Some(cid))
            .map(|v| v.id)
            .collect();
        for h in heads {
            self.volume_mut(h).parent = c.parent;
        }
        if c.root != 0 {
            self.queue_drop(c.root, tree_depth(c.size) - 1);
        }
        self.dirty_records.remove(&cid);
        self.deleted_records.insert(cid);
        Ok(())
    }

    pub(super) fn prepare_write(
        &mut self,
        vid: u64,
        volume: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, Fill)>> {
        let v = self
            .volumes
            .get(&vid)
            .ok_or_else(|| Error::UnknownVolume(volume.into()))?;
        check_range("write", &Target::head(volume), offset, len, v.size)?;
        let (root, depth) = (v.root, tree_depth(v.size));
        let first = offset / BS;
        let count = (offset + len - 1) / BS - first + 1;
        let mut plan = Vec::with_capacity(count as usize);
        let long = len >= LONG_WRITE as u64;
        if let Err(e) = self
            .meta
            .prepare_write(root, depth, first, count, long, &mut plan)
        {
            self.meta.unreserve_plan(&plan);
            return Err(e);
        }
        Ok(plan)
    }

    /// Starts the commit-by-time clock at the first change of a head's contents (a write or a
    /// zeroing) since the last commit.
    pub(super) fn note_unflushed(&mut self) {
        self.unflushed_since
            .get_or_insert_with(std::time::Instant::now);
    }

    pub(super) fn link_write(&mut self, vid: u64, first: u64, plan: &[(u64, Fill)]) -> Result<()> {
        let links: Vec<(u64, u64)> = plan
            .iter()
            .enumerate()
            .filter(|(_, (_, fill))| *fill != Fill::InPlace)
            .map(|(i, (b, _))| (first + i as u64, *b))
            .collect();
        self.link_blocks(vid, &links)
    }

    /// Points each `(vbn, block)` of a volume's head at its reserved block, now written (vbns
    /// ascending). After a failure the blocks not linked are given back.
    pub(super) fn link_blocks(&mut self, vid: u64, links: &[(u64, u64)]) -> Result<()> {
        self.meta.data_written = true;
        self.note_unflushed();
        let v = &self.volumes[&vid];
        let (mut root, depth, mut mapped) = (v.root, tree_depth(v.size), v.mapped);
        let res = self.meta.link_writes(&mut root, depth, links, &mut mapped);
        if res.is_err() {
            for &(_, b) in links {
                self.meta.unreserve(b);
            }
        }
        let vm = self.volume_mut(vid);
        vm.root = root;
        vm.mapped = mapped;
        res
    }

    pub(super) fn load_catalog(&mut self) -> Result<()> {
        let sb = self.meta.sb.clone();
        // Level by level, each level's pages hinted to the device before any is read: on a
        // cold page cache, one record page per checkpoint read one at a time was one disk
        // round trip each (10,000 checkpoints: ~150 ms here, more on slower disks).
        let mut level_pages = Vec::new();
        if sb.catalog_root != 0 {
            level_pages.push(sb.catalog_root);
        }
        for _ in 0..sb.catalog_depth {
            self.meta.prefetch_pages(&mut level_pages);
            let mut next = Vec::new();
            for &p in &level_pages {
                let page = self.meta.cache.get(&*self.meta.dev, p, PageKind::Tree)?;
                next.extend((0..FANOUT).map(|i| entry(page, i)).filter(|&e| e != 0));
            }
            level_pages = next;
        }
        let mut ids = level_pages;
        self.meta.prefetch_pages(&mut ids);
        for b in ids {
            let rec = Record::decode(
                self.meta.cache.get(&*self.meta.dev, b, PageKind::Record)?,
                b,
            )?;
            match rec {
                Record::Volume(v) => {
                    self.volume_ids.insert(v.name.clone(), v.id);
                    self.volumes.insert(v.id, v);
                }
                Record::Checkpoint(c) => {
                    self.checkpoint_ids.insert((c.volume, c.name.clone()), c.id);
                    self.checkpoints.insert(c.id, c);
                }
                Record::Dropped(d) => {
                    self.dropped.insert(d.id, d);
                }
            }
            self.meta.cache.remove(b);
        }
        Ok(())
    }

    pub(super) fn store_records(&mut self) -> Result<()> {
        for (root, level) in std::mem::take(&mut self.meta.to_drop) {
            self.queue_drop(root, level);
        }
        let needed = depth_for(self.meta.sb.next_id);
        if needed > self.meta.sb.catalog_depth {
            let mut root = self.meta.sb.catalog_root;
            self.meta
                .grow(&mut root, self.meta.sb.catalog_depth, needed)?;
            self.meta.sb.catalog_root = root;
            self.meta.sb.catalog_depth = needed;
        }
        let depth = self.meta.sb.catalog_depth;
        for id in std::mem::take(&mut self.deleted_records) {
            let mut root = self.meta.sb.catalog_root;
            self.meta.unmap(&mut root, depth, id, id + 1)?;
            self.meta.sb.catalog_root = root;
        }
        for id in std::mem::take(&mut self.dirty_records) {
            let rec = if let Some(v) = self.volumes.get(&id) {
                Record::Volume(v.clone())
            } else if let Some(c) = self.checkpoints.get(&id) {
                Record::Checkpoint(c.clone())
            } else if let Some(d) = self.dropped.get(&id) {
                Record::Dropped(d.clone())
            } else {
                continue;
            };
            let page = rec.encode()?;
            let mut root = self.meta.sb.catalog_root;
            let leaf = self.meta.leaf_for_write(&mut root, depth, id)?;
            self.meta.sb.catalog_root = root;
            let idx = id % FANOUT;
            let dev = self.meta.dev.clone();
            let b = entry(self.meta.cache.get(&*dev, leaf, PageKind::Tree)?, idx);
            if b == 0 {
                let nb = self.meta.alloc_page(page)?;
                crate::format::set_entry(
                    self.meta.cache.get_mut(&*dev, leaf, PageKind::Tree)?,
                    idx,
                    nb,
                );
            } else {
                self.meta.cache.insert(b, page);
            }
        }
        Ok(())
    }

    /// Makes the current state durable: data first, then all metadata through the journal.
    /// Refuses to commit an in-memory state that a failed operation left untrusted.
    pub(super) fn check_not_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Invalid(
                "an earlier operation failed midway; its unsaved changes are being discarded, retry".into(),
            ));
        }
        Ok(())
    }

    /// Whether anything changed since the last commit.
    pub(super) fn has_changes(&self) -> bool {
        self.meta.cache.dirty_count() != 0
            || !self.meta.to_drop.is_empty()
            || !self.dirty_records.is_empty()
            || !self.deleted_records.is_empty()
            || self.meta.data_written
    }

    /// Writes changed catalog records and a new-generation superblock into their pages, the
    /// first step of every commit.
    pub(super) fn stage_records(&mut self) -> Result<()> {
        self.store_records()?;
        self.meta.sb.generation += 1;
        let sb_page = self.meta.sb.encode();
        self.meta.cache.insert(SUPERBLOCK, sb_page);
        Ok(())
    }

    pub(super) fn commit(&mut self, release_space: bool) -> Result<()> {
        self.check_not_poisoned()?;
        let t = std::time::Instant::now();
        let r = self.commit_inner(release_space);
        self.stats.commits += 1;
        self.stats.commit_nanos += t.elapsed().as_nanos() as u64;
        self.poison_on(r)
    }

    pub(super) fn poison_on<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        r
    }

    /// Drops every in-memory change and reloads the last committed state from disk.
    pub(super) fn reload(&mut self) -> Result<()> {
        let dpath = self.meta.path.clone();
        let base = dpath
            .trim_end_matches(DATA_FILE)
            .trim_end_matches('/')
            .to_string();
        let journal_dev = lock(&self.journal).device();
        *lock(&self.journal) = recover(&*self.meta.dev, journal_dev, &base)?;
        let mut page = Box::new([0u8; BLOCK_SIZE]);
        self.meta
            .dev
            .read_at(&mut page[..], SUPERBLOCK * BS)
            .map_err(Error::io("read superblock", &dpath))?;
        self.meta.sb = Superblock::decode(&page, &base)?;
        self.meta.cache = PageCache::new(self.opts.cache_pages, &base);
        self.meta.quarantine.clear();
        self.meta.ready.clear();
        // A release punching outside the locks finds its token gone and leaves the blocks be.
        self.meta.releasing = None;
        self.meta.reserved.clear();
        self.meta.decremented.clear();
        self.meta.decremented_sealed.clear();
        self.meta.data_written = false;
        self.meta.allocated_end = self.meta.dev.len().map_err(Error::io("stat", &dpath))?;
        self.volumes.clear();
        self.checkpoints.clear();
        self.dropped.clear();
        self.meta.to_drop.clear();
        self.volume_ids.clear();
        self.checkpoint_ids.clear();
        self.dirty_records.clear();
        self.deleted_records.clear();
        self.load_catalog()?;
        self.poisoned.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the next commit must also reset the journal (too long, or too many blocks waiting
    /// for a reset to become reusable); the caller holds the journal.
    pub(super) fn reset_due(&self, journal_used: u64) -> bool {
        journal_used > self.opts.journal_limit
            || self.meta.quarantine.len() as u64 * BS > self.opts.journal_limit
    }

    /// The first half of a concurrent commit: writes records and the superblock into their pages
    /// and takes a shared reference to every dirty page. `None` when there is nothing to commit.
    pub(super) fn seal(&mut self) -> Result<Option<Sealed>> {
        self.check_not_poisoned()?;
        if !self.has_changes() {
            return Ok(None);
        }
        let r = self.stage_records();
        self.poison_on(r)?;
        let (epoch, pages) = self.meta.cache.seal_dirty();
        let dropped = std::mem::take(&mut self.meta.decremented);
        self.meta.decremented_sealed.extend(dropped);
        self.meta.data_written = false;
        self.unflushed_since = None;
        Ok(Some((epoch, pages)))
    }

    pub(super) fn commit_inner(&mut self, release_space: bool) -> Result<()> {
        if !self.has_changes() && !release_space {
            return Ok(());
        }
        let dpath = self.meta.path.clone();
        // Waits for a concurrent commit in flight, whose transaction must come first.
        let journal = self.journal.clone();
        let mut journal = lock(&journal);
        self.stage_records()?;
        let mut pages = self.meta.cache.dirty_pages_mut();
        for (_, p) in pages.iter_mut() {
            crate::format::seal(p);
        }
        let list: Vec<(u64, &Page)> = pages.iter().map(|(b, p)| (*b, &**p)).collect();
        write_transaction(&*self.meta.dev, &dpath, &mut journal, &list)?;
        self.stats.pages_committed += list.len() as u64;
        drop(pages);
        self.meta.cache.mark_clean();
        self.meta.decremented.clear();
        self.meta.decremented_sealed.clear();
        self.meta.data_written = false;
        if release_space || self.reset_due(journal.used()) {
            self.meta.dev.sync().map_err(Error::io("sync", &dpath))?;
            journal.reset()?;
            self.meta.journal_was_reset();
            self.stats.journal_resets += 1;
        }
        Ok(())
    }
}
