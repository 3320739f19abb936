//! Volumes and checkpoints: create, list, resize, delete, checkpoint, apply, rename, clone.

use super::*;

impl Store {
    /// Creates an empty volume of `size` bytes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        validate_name(name)?;
        check_size(name, size)?;
        self.heal()?;
        let _g = self.shared();
        let mut st = self.state();
        if st.volume_ids.contains_key(name) {
            return Err(Error::VolumeExists(name.into()));
        }
        let id = st.new_id();
        let created_ms = st.opts.clock.now_ms();
        st.volumes.insert(
            id,
            VolumeRecord {
                id,
                name: name.into(),
                size,
                root: 0,
                mapped: 0,
                parent: None,
                created_ms,
                origin: None,
                origin_checkpoint: None,
            },
        );
        st.volume_ids.insert(name.into(), id);
        st.dirty_records.insert(id);
        st.commit(false)?;
        st.volume_info(id)
    }

    /// Every volume, by name.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.heal()?;
        // Mapped sizes count every acknowledged write.
        self.core.write_behind.wait_all();
        let st = self.state();
        let mut ids: Vec<(&String, &u64)> = st.volume_ids.iter().collect();
        ids.sort();
        Ok(ids
            .into_iter()
            .filter_map(|(_, id)| st.volume_info(*id).ok())
            .collect())
    }

    /// One volume.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        self.heal()?;
        self.wait_for_head(&Target::head(name))?;
        let st = self.state();
        let id = st.volume_id(name)?;
        st.volume_info(id)
    }

    /// Grows a volume; shrinking is refused since it would silently drop data.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        check_size(name, size)?;
        let (vid, vg) = self.volume_gate(name)?;
        let _g = self.shared();
        let _v = write_lock(&vg);
        self.core.write_behind.wait_volume(vid);
        let mut st = self.state();
        let id = st.volume_id(name)?;
        let v = st.volumes[&id].clone();
        if size < v.size {
            return Err(Error::InvalidSize {
                volume: name.into(),
                size,
                why: format!("smaller than its current {} bytes; volumes only grow (copy the data to a new smaller volume instead)", v.size),
            });
        }
        let mut root = v.root;
        let r = st
            .meta
            .grow(&mut root, tree_depth(v.size), tree_depth(size));
        st.poison_on(r)?;
        let vm = st.volume_mut(id);
        vm.root = root;
        vm.size = size;
        st.commit(false)?;
        st.volume_info(id)
    }

    /// Deletes a volume with all its checkpoints; clones made from it are unaffected.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.delete_volume_with_progress(name, &mut |_| {})
    }

    /// `delete_volume`, reporting bytes freed so far to `progress`.
    pub fn delete_volume_with_progress(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let (vid, vg) = self.volume_gate(name)?;
        let mut freed = 0;
        let left = {
            let _g = self.shared();
            let _v = write_lock(&vg);
            self.core.write_behind.wait_volume(vid);
            let ((), left) = self.core.commit_with_free_step(&mut freed, |st| {
                let r = st.delete_volume(name);
                st.poison_on(r)
            })?;
            left
        };
        lock(&self.volume_gates).remove(&vid);
        self.finish_drop(left, freed, progress)
    }
}

impl Store {
    /// Takes a checkpoint of a volume's head: O(1), and durable on return (it implies a flush).
    pub fn create_checkpoint(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        let vg = self.checkpoint_gate(volume, name, description)?;
        // The store gate is held from the change to its commit, so no reload can undo the
        // checkpoint in between (after a failed background commit that had sealed it) while
        // this commit finds nothing to write and reports success.
        let _g = self.shared();
        let info = self.checkpoint_holding_gate(&vg, volume, name, description)?;
        // Writes after the checkpoint go to the head, never to it, so the commit that makes it
        // durable runs with the volume open again.
        self.core.commit_concurrent()?;
        Ok(info)
    }

    /// [`Store::create_checkpoint`] without waiting for durability: O(1), and made durable by the
    /// next flush (a crash before then loses it, as it loses unflushed writes). For a caller that
    /// holds I/O back meanwhile, such as a paused VM checkpointing several disks at one instant:
    /// it resumes the guest first and flushes after.
    pub fn create_checkpoint_unflushed(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        let vg = self.checkpoint_gate(volume, name, description)?;
        let _g = self.shared();
        self.checkpoint_holding_gate(&vg, volume, name, description)
    }

    /// Checks a new checkpoint's name and description, and finds its volume's gate (which may
    /// heal the store, so it comes before the store gate is taken).
    pub(super) fn checkpoint_gate(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<(u64, Arc<RwLock<()>>)> {
        validate_name(name)?;
        check_description(description)?;
        self.volume_gate(volume)
    }

    /// The in-memory part of taking a checkpoint; the caller holds the store gate shared.
    pub(super) fn checkpoint_holding_gate(
        &self,
        (vid, vg): &(u64, Arc<RwLock<()>>),
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        // Waits for the writes in flight on this volume only, and holds later ones back just for
        // the in-memory part.
        let _v = write_lock(vg);
        self.core.write_behind.wait_volume(*vid);
        let mut st = self.state();
        let vid = st.check_new_checkpoint(volume, name)?;
        let r = st.checkpoint_in_memory(vid, name, description);
        let id = st.poison_on(r)?;
        st.checkpoint_info(id)
    }

    /// Every checkpoint of a volume, oldest first.
    pub fn list_checkpoints(&self, volume: &str) -> Result<Vec<CheckpointInfo>> {
        Ok(self.list_checkpoints_page(volume, None, usize::MAX)?.0)
    }

    /// Up to `limit` checkpoints of a volume, oldest first, after the one with catalog id
    /// `after` (from the start when `None`), and the id to continue after when more remain.
    /// Only the page's records are built, so a page costs what it holds, not what the volume
    /// holds; ids are never reused, so a page boundary survives deletes and renames between calls.
    pub fn list_checkpoints_page(
        &self,
        volume: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<CheckpointInfo>, Option<u64>)> {
        let limit = limit.max(1);
        self.heal()?;
        let st = self.state();
        let vid = st.volume_id(volume)?;
        // This volume's checkpoints from the ordered names index, oldest (lowest id) first.
        let mut ids: Vec<u64> = st
            .checkpoint_ids
            .range((vid, String::new())..(vid + 1, String::new()))
            .map(|(_, id)| *id)
            .filter(|id| after.is_none_or(|a| *id > a))
            .collect();
        ids.sort_unstable();
        let next = (ids.len() > limit).then(|| ids[limit - 1]);
        let page = ids
            .into_iter()
            .take(limit)
            .map(|id| st.checkpoint_info(id))
            .collect::<Result<Vec<_>>>()?;
        Ok((page, next))
    }

    /// One checkpoint of a volume, found through the names index.
    pub fn checkpoint_info(&self, volume: &str, name: &str) -> Result<CheckpointInfo> {
        self.heal()?;
        let st = self.state();
        let vid = st.volume_id(volume)?;
        let id = st.checkpoint_id(vid, volume, name)?;
        st.checkpoint_info(id)
    }

    /// Makes a volume's head the state of one of its checkpoints; the head's own changes are dropped
    /// unless `save_current` names a checkpoint to keep them in first. Newer checkpoints remain.
    pub fn apply_checkpoint(
        &self,
        volume: &str,
        checkpoint: &str,
        save_current: Option<&str>,
    ) -> Result<VolumeInfo> {
        let save = save_current.map(|name| SaveCurrent {
            name,
            automatic: false,
        });
        self.apply_checkpoint_saving(volume, checkpoint, save)
    }

    /// [`Store::apply_checkpoint`], keeping the head it replaces as `save` in the same commit.
    pub fn apply_checkpoint_saving(
        &self,
        volume: &str,
        checkpoint: &str,
        save: Option<SaveCurrent<'_>>,
    ) -> Result<VolumeInfo> {
        if let Some(s) = save {
            validate_name(s.name)?;
        }
        let (vid, vg) = self.volume_gate(volume)?;
        let mut freed = 0;
        let (info, left) = {
            let _g = self.shared();
            let _v = write_lock(&vg);
            self.core.write_behind.wait_volume(vid);
            self.core.commit_with_free_step(&mut freed, |st| {
                let vid = st.volume_id(volume)?;
                let cid = st.checkpoint_id(vid, volume, checkpoint)?;
                if let Some(s) = save {
                    st.check_new_checkpoint(volume, s.name)?;
                }
                let r = st.apply_checkpoint(vid, cid, save);
                st.poison_on(r)
            })?
        };
        // The head's old tree is freed before returning, so `space` right after shows it gone.
        self.finish_drop(left, freed, &mut |_| {})?;
        Ok(info)
    }

    /// Deletes one checkpoint, freeing only what nothing else references; its children are
    /// re-parented to its parent.
    pub fn delete_checkpoint(&self, volume: &str, checkpoint: &str) -> Result<()> {
        self.delete_checkpoint_with_progress(volume, checkpoint, &mut |_| {})
    }

    /// `delete_checkpoint`, reporting bytes freed so far to `progress` as the delete walks.
    pub fn delete_checkpoint_with_progress(
        &self,
        volume: &str,
        checkpoint: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let (vid, vg) = self.volume_gate(volume)?;
        let mut freed = 0;
        let left = {
            let _g = self.shared();
            let _v = write_lock(&vg);
            self.core.write_behind.wait_volume(vid);
            let ((), left) = self.core.commit_with_free_step(&mut freed, |st| {
                let cid = st.checkpoint_id(vid, volume, checkpoint)?;
                let r = st.drop_checkpoint(cid);
                st.poison_on(r)
            })?;
            left
        };
        self.finish_drop(left, freed, progress)
    }

    /// Replaces a checkpoint's description (`None` removes it).
    pub fn describe_checkpoint(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        check_description(description)?;
        self.heal()?;
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let cid = st.checkpoint_id(vid, volume, name)?;
        if let Some(c) = st.checkpoints.get_mut(&cid) {
            c.description = description.map(Into::into);
        }
        st.dirty_records.insert(cid);
        st.commit(false)?;
        st.checkpoint_info(cid)
    }

    /// Sets what a lifecycle policy needs to know of a checkpoint: whether Cairn took it
    /// (`automatic`; policies expire those) and whether it is kept whatever a policy says
    /// (`pinned`). `None` leaves a flag as it is.
    pub fn set_checkpoint_flags(
        &self,
        volume: &str,
        name: &str,
        automatic: Option<bool>,
        pinned: Option<bool>,
    ) -> Result<CheckpointInfo> {
        self.heal()?;
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let cid = st.checkpoint_id(vid, volume, name)?;
        if let Some(c) = st.checkpoints.get_mut(&cid) {
            if let Some(a) = automatic {
                c.automatic = a;
            }
            if let Some(p) = pinned {
                c.pinned = p;
            }
        }
        st.dirty_records.insert(cid);
        st.commit(false)?;
        st.checkpoint_info(cid)
    }

    /// Renames a checkpoint.
    pub fn rename_checkpoint(&self, volume: &str, old: &str, new: &str) -> Result<CheckpointInfo> {
        validate_name(new)?;
        self.heal()?;
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let cid = st.checkpoint_id(vid, volume, old)?;
        if st.checkpoint_ids.contains_key(&(vid, new.to_string())) {
            return Err(Error::CheckpointExists {
                volume: volume.into(),
                name: new.into(),
            });
        }
        st.checkpoint_ids.remove(&(vid, old.to_string()));
        st.checkpoint_ids.insert((vid, new.to_string()), cid);
        if let Some(c) = st.checkpoints.get_mut(&cid) {
            c.name = new.into();
        }
        st.dirty_records.insert(cid);
        // Clones name their origin; they follow the rename in the same commit.
        let clones: Vec<u64> = st
            .volumes
            .values()
            .filter(|v| v.origin_checkpoint == Some(cid))
            .map(|v| v.id)
            .collect();
        for id in clones {
            st.volume_mut(id).origin = Some(Target::checkpoint(volume, new).to_string());
        }
        st.commit(false)?;
        st.checkpoint_info(cid)
    }

    /// Renames a volume. Clones that name it as their origin follow in the same commit; a VM that
    /// lists it as a disk does not (the VM layer renames only volumes no VM uses).
    pub fn rename_volume(&self, old: &str, new: &str) -> Result<VolumeInfo> {
        validate_name(new)?;
        self.heal()?;
        let _g = self.shared();
        let mut st = self.state();
        let vid = st.volume_id(old)?;
        if st.volume_ids.contains_key(new) {
            return Err(Error::VolumeExists(new.into()));
        }
        st.volume_ids.remove(old);
        st.volume_ids.insert(new.into(), vid);
        st.volume_mut(vid).name = new.into();
        let prefix = format!("{old}@");
        let clones: Vec<u64> = st
            .volumes
            .values()
            .filter(|v| v.origin.as_deref().is_some_and(|o| o.starts_with(&prefix)))
            .map(|v| v.id)
            .collect();
        for id in clones {
            let v = st.volume_mut(id);
            if let Some(o) = v.origin.take() {
                v.origin = Some(format!("{new}@{}", &o[prefix.len()..]));
            }
        }
        st.commit(false)?;
        st.volume_info(vid)
    }

    /// Creates a volume whose head starts as a checkpoint of another volume, sharing every block.
    pub fn clone_checkpoint(
        &self,
        volume: &str,
        checkpoint: &str,
        new_volume: &str,
    ) -> Result<VolumeInfo> {
        validate_name(new_volume)?;
        self.heal()?;
        let _g = self.shared();
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let cid = st.checkpoint_id(vid, volume, checkpoint)?;
        if st.volume_ids.contains_key(new_volume) {
            return Err(Error::VolumeExists(new_volume.into()));
        }
        let c = st.checkpoints[&cid].clone();
        if c.root != 0 {
            let r = st.meta.incref(c.root);
            st.poison_on(r)?;
        }
        let id = st.new_id();
        let created_ms = st.opts.clock.now_ms();
        st.volumes.insert(
            id,
            VolumeRecord {
                id,
                name: new_volume.into(),
                size: c.size,
                root: c.root,
                mapped: c.mapped,
                parent: None,
                created_ms,
                origin: Some(Target::checkpoint(volume, checkpoint).to_string()),
                origin_checkpoint: Some(cid),
            },
        );
        st.volume_ids.insert(new_volume.into(), id);
        st.dirty_records.insert(id);
        st.commit(false)?;
        st.volume_info(id)
    }

    /// Waits for the pending long writes of `t`'s volume if `t` is a head (see
    /// `store/write_behind.rs`); checkpoints never change.
    pub(super) fn wait_for_head(&self, t: &Target) -> Result<()> {
        if t.checkpoint.is_none() {
            let vid = self.state().volume_id(&t.volume)?;
            self.core.write_behind.wait_volume(vid);
        }
        Ok(())
    }
}
