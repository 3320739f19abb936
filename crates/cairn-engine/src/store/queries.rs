//! What a store can tell about its contents: diffs, mapped ranges, space and fsck.

use super::*;

impl Store {
    /// Byte ranges that differ between two states of one volume, found by walking only the parts
    /// of the two trees that are not shared.
    pub fn diff(&self, a: &Target, b: &Target) -> Result<Vec<Extent>> {
        self.diff_range(a, b, 0, u64::MAX)
    }

    /// [`Store::diff`] limited to the bytes `offset..offset + len` (extents are clipped to it).
    pub fn diff_range(&self, a: &Target, b: &Target, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.walk_diff(Some(a), b, offset, len, false)
    }

    /// Byte ranges of a head or checkpoint that hold data (everything else reads as zeros without
    /// taking space); the cost follows the mapped size, not the volume size.
    pub fn mapped_extents(&self, target: &Target) -> Result<Vec<Extent>> {
        self.mapped_range(target, 0, u64::MAX)
    }

    /// [`Store::mapped_extents`] limited to the bytes `offset..offset + len`.
    pub fn mapped_range(&self, target: &Target, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.walk_diff(None, target, offset, len, false)
    }

    /// What a backup of `target` reads: the ranges that differ from `base` (a checkpoint of the
    /// same volume backed up before), or without one every range that holds data. Walked as
    /// [`Store::diff`] and [`Store::mapped_extents`] are, except that the leaves read do not enter
    /// the metadata cache: a backup walks a volume once, and the cache is the VMs'.
    pub fn extents_to_back_up(
        &self,
        base: Option<&Target>,
        target: &Target,
    ) -> Result<Vec<Extent>> {
        self.walk_diff(base, target, 0, u64::MAX, true)
    }

    /// The ranges of `b` that differ from `a` (from nothing: `None`) within `offset..offset +
    /// len`, walking only the parts of the two trees that are not shared.
    fn walk_diff(
        &self,
        a: Option<&Target>,
        b: &Target,
        offset: u64,
        len: u64,
        transient: bool,
    ) -> Result<Vec<Extent>> {
        self.heal()?;
        if let Some(a) = a {
            self.wait_for_head(a)?;
            if a.volume != b.volume {
                self.state().resolve(a)?;
                self.state().resolve(b)?;
                return Err(Error::Invalid(format!(
                    "diff compares two states of one volume; got '{}' and '{}'",
                    a.volume, b.volume
                )));
            }
        }
        self.wait_for_head(b)?;
        let mut st = self.state();
        // `a` first, so that an unknown name is reported in the order the caller gave them.
        let resolved_a = a.map(|a| st.resolve(a)).transpose()?;
        let (rb, db, sb) = st.resolve(b)?;
        let (ra, da, sa) = resolved_a.unwrap_or((0, db, 0));
        let end = sa.max(sb).min(offset.saturating_add(len));
        let mut runs = Vec::new();
        st.meta.diff_walk(
            (ra, da),
            (rb, db),
            offset / BS,
            end.div_ceil(BS),
            &mut runs,
            transient,
        )?;
        Ok(clip_runs(runs, offset, end))
    }

    /// Space per checkpoint and volume (all volumes if `volume` is `None`) and store totals.
    pub fn space(&self, volume: Option<&str>) -> Result<SpaceReport> {
        self.heal()?;
        // Every figure counts every acknowledged write.
        self.core.write_behind.wait_all();
        let mut st = self.state();
        let ids: Vec<u64> = match volume {
            Some(n) => vec![st.volume_id(n)?],
            None => {
                let mut v: Vec<(String, u64)> =
                    st.volume_ids.iter().map(|(n, i)| (n.clone(), *i)).collect();
                v.sort();
                v.into_iter().map(|(_, i)| i).collect()
            }
        };
        let mut volumes = Vec::new();
        for vid in ids {
            let v = st.volumes[&vid].clone();
            let depth = tree_depth(v.size);
            let base = st.head_base(&v);
            let head_changed_since = base.as_ref().map(|p| st.qualified_name(p));
            let head_changed = match base {
                Some(p) => {
                    let mut runs = Vec::new();
                    let limit = v.size.max(p.size).div_ceil(BS);
                    st.meta.diff(
                        (p.root, tree_depth(p.size)),
                        (v.root, depth),
                        limit,
                        &mut runs,
                    )?;
                    runs.iter().map(|(_, l)| l * BS).sum()
                }
                None => v.mapped * BS,
            };
            let (d, m) = st.meta.unique(v.root, depth)?;
            let cps: Vec<CheckpointRecord> = st
                .checkpoints
                .values()
                .filter(|c| c.volume == vid)
                .cloned()
                .collect();
            let mut checkpoints = Vec::new();
            for c in cps {
                let (cd, cm) = st.meta.unique(c.root, tree_depth(c.size))?;
                checkpoints.push(CheckpointSpace {
                    name: c.name.clone(),
                    referenced: c.mapped * BS,
                    unique: (cd + cm) * BS,
                });
            }
            volumes.push(VolumeSpace {
                name: v.name.clone(),
                size: v.size,
                head_referenced: v.mapped * BS,
                head_changed,
                head_changed_since,
                head_unique: (d + m) * BS,
                checkpoints,
            });
        }
        let dpath = st.meta.path.clone();
        let file_size = self.data.len().map_err(Error::io("stat", dpath.clone()))?;
        let host_used = self
            .data
            .allocated_bytes()
            .map_err(Error::io("stat", dpath))?
            + self.journal_dev.allocated_bytes().unwrap_or(0);
        Ok(SpaceReport {
            volumes,
            allocated: st.meta.sb.allocated * BS,
            file_size,
            host_used,
            dropped_trees: st.dropped.len(),
        })
    }

    /// Bytes that deleting checkpoints `names` of `volume` together would give back to the
    /// store: the data and metadata blocks no other tree (head, checkpoint, clone) references.
    /// Exact, and more than the sum of the checkpoints' own unique figures where they share
    /// blocks only with each other.
    pub fn space_freed_by_deleting(&self, volume: &str, names: &[String]) -> Result<u64> {
        self.heal()?;
        self.core.write_behind.wait_all();
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let mut roots = Vec::new();
        for n in names {
            let cid = st.checkpoint_id(vid, volume, n)?;
            let c = &st.checkpoints[&cid];
            roots.push((c.root, tree_depth(c.size)));
        }
        let (d, m) = st.meta.freed_by(&roots)?;
        Ok((d + m) * BS)
    }

    /// Checks every invariant of the store as it is on disk; see [`crate::fsck`].
    pub fn fsck(&self) -> Result<crate::fsck::FsckReport> {
        self.heal()?;
        let _g = self.exclusive();
        self.core.write_behind.wait_all();
        let mut st = self.state();
        st.commit(true)?;
        st.meta.release_ready();
        Ok(crate::fsck::check(&*self.data, &st.meta.path))
    }
}
