// On-disk and wire code: a length or index that does not fit its field is a corruption bug.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]
//! The metadata layer: reference counts, block allocation, and the quarantine of freed blocks.
//!
//! Every block of the data file has a reference count: the number of pointers to it from tree pages
//! plus, for tree roots, the number of volume heads and checkpoints using it. A block is free when
//! its count is 0. Freed blocks are *quarantined* until the journal is next reset, because an older
//! journal record may still hold an image of the block and would overwrite new contents on replay.

use crate::cache::PageCache;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::format::{
    entry, new_page, refcount, set_entry, set_refcount, Page, PageKind, Superblock, BLOCK_SIZE,
    FANOUT,
};
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::Arc;

/// Metadata state shared by every tree in the store.
pub struct Meta {
    /// The data file.
    pub dev: Arc<dyn Device>,
    /// Its path, for errors.
    pub path: String,
    /// Cached metadata pages.
    pub cache: PageCache,
    /// In-memory superblock, written at each commit.
    pub sb: Superblock,
    /// Blocks freed and not yet reusable: until the next journal reset, and then until no request
    /// that might still read them is in flight (see `ready`). Each with the `frees` count when it
    /// was freed, so a reset can tell the blocks freed before its seal from those freed after (or
    /// released and freed again) while it ran.
    pub quarantine: FxHashMap<u64, u64>,
    /// Freeing events so far (see `quarantine`).
    pub frees: u64,
    /// Quarantined blocks whose journal reset is done; released when the store is quiescent.
    pub ready: Vec<u64>,
    /// The token of the release whose blocks are being punched right now, if any (see
    /// [`Meta::start_release`]).
    pub releasing: Option<u64>,
    /// Tokens handed out by [`Meta::start_release`].
    pub release_tokens: u64,
    /// Blocks handed to writes in flight, linked into a tree once their data is written. Their
    /// count stays 0 on disk, so a crash before linking leaks nothing.
    pub reserved: FxHashSet<u64>,
    /// Blocks whose count dropped since the last commit: the durable state may still share them,
    /// so their data must not be overwritten in place.
    pub decremented: FxHashSet<u64>,
    /// `decremented` as it stood when a commit still in flight sealed its transaction: not
    /// durable yet, so those blocks are not safe to overwrite either.
    pub decremented_sealed: FxHashSet<u64>,
    /// Data was written since the last commit.
    pub data_written: bool,
    /// Private subtrees (root, level) that an unmap let go of, waiting to become dropped-tree
    /// records at the next commit: freeing them there and then would be unbounded work.
    pub to_drop: Vec<(u64, u32)>,
    /// Bytes of the data file known to have host storage behind them.
    pub allocated_end: u64,
    /// How far to preallocate at a time when the data file must grow.
    pub prealloc: u64,
}

/// Blocks past the end of the data kept preallocated for metadata (1 MiB).
pub const METADATA_HEADROOM: u64 = 256;

/// How much one step of freeing a dropped tree may do before its work is committed.
#[derive(Debug, Clone, Copy)]
pub struct DropStep {
    /// References to release at most.
    pub max_released: u64,
    /// Dirty metadata pages past which the step stops (once it has released something, so that
    /// every step makes progress).
    pub max_dirty: usize,
    /// References released so far.
    pub released: u64,
}

impl DropStep {
    fn spent(&self, dirty: usize) -> bool {
        self.released >= self.max_released || (self.released > 0 && dirty >= self.max_dirty)
    }
}

/// A tree node level, or `None` for a leaf's child (a data block or a catalog record).
pub type Level = Option<u32>;

/// Splits `blocks` into the runs one I/O can cover, as index ranges in order: consecutive block
/// numbers (`b, b + 1, ...`), or consecutive zeros (holes, where block numbers are optional).
pub fn block_runs(blocks: &[u64]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i == blocks.len() {
            return None;
        }
        let start = i;
        i += 1;
        while i < blocks.len()
            && (blocks[i] == blocks[i - 1] + 1 || (blocks[i] == 0 && blocks[i - 1] == 0))
        {
            i += 1;
        }
        Some(start..i)
    })
}

/// The block alignment of a fresh run of `n` blocks (see [`Meta::reserve_run`]): runs under 16
/// blocks (64 KiB) are not aligned, the gap would cost more than small folios do.
pub fn run_alignment(n: u64) -> u64 {
    if n < 16 {
        1
    } else {
        1 << n.min(512).ilog2()
    }
}

/// Level of the children of a node at `level`.
pub fn child_level(level: u32) -> Level {
    level.checked_sub(1)
}

impl Meta {
    /// Whether `b`'s count dropped since the last durable commit (so the durable state may still
    /// share it and its data must not be overwritten in place).
    pub fn dropped_since_durable(&self, b: u64) -> bool {
        self.decremented.contains(&b) || self.decremented_sealed.contains(&b)
    }

    fn check_block(&self, b: u64) -> Result<()> {
        if !self.sb.layout.is_data_block(b) || b >= self.sb.high_water {
            return Err(Error::corrupt(
                b,
                format!(
                    "pointer to block {b} outside the allocatable range (high water {})",
                    self.sb.high_water
                ),
            ));
        }
        Ok(())
    }

    /// Reference count of block `b`.
    pub fn rc(&mut self, b: u64) -> Result<u32> {
        self.check_block(b)?;
        let (pg, idx) = self.sb.layout.refcount_slot(b);
        Ok(refcount(
            self.cache.get(&*self.dev, pg, PageKind::Refcount)?,
            idx,
        ))
    }

    fn set_rc(&mut self, b: u64, v: u32) -> Result<()> {
        let (pg, idx) = self.sb.layout.refcount_slot(b);
        set_refcount(
            self.cache.get_mut(&*self.dev, pg, PageKind::Refcount)?,
            idx,
            v,
        );
        Ok(())
    }

    /// Adds one reference to `b`.
    pub fn incref(&mut self, b: u64) -> Result<()> {
        let rc = self.rc(b)?;
        let rc = rc
            .checked_add(1)
            .ok_or_else(|| Error::corrupt(b, "reference count overflow"))?;
        self.set_rc(b, rc)
    }

    /// Adds one reference to every block in `blocks` (sorted here), touching each refcount page once:
    /// shadowing a page references all its children, and they are mostly neighbours.
    pub fn incref_all(&mut self, blocks: &mut [u64]) -> Result<()> {
        self.update_counts(blocks, |b, rc| {
            rc.checked_add(1)
                .ok_or_else(|| Error::corrupt(b, "reference count overflow"))
        })
    }

    /// Sorts `blocks` and replaces each one's count `rc` with `change(block, rc)`, fetching each
    /// refcount page once for all its blocks in the batch.
    fn update_counts(
        &mut self,
        blocks: &mut [u64],
        mut change: impl FnMut(u64, u32) -> Result<u32>,
    ) -> Result<()> {
        for &b in blocks.iter() {
            self.check_block(b)?;
        }
        blocks.sort_unstable();
        let mut i = 0;
        while i < blocks.len() {
            let layout = self.sb.layout;
            let (pg, _) = layout.refcount_slot(blocks[i]);
            let page = self.cache.get_mut(&*self.dev, pg, PageKind::Refcount)?;
            while i < blocks.len() && layout.refcount_slot(blocks[i]).0 == pg {
                let (_, idx) = layout.refcount_slot(blocks[i]);
                set_refcount(page, idx, change(blocks[i], refcount(page, idx))?);
                i += 1;
            }
        }
        Ok(())
    }

    /// Drops one reference to each block in `blocks` (data blocks: no pages below them; sorted
    /// here), touching each refcount page once, as [`Meta::incref_all`] does; blocks reaching 0
    /// are freed. Freeing a leaf's worth of blocks one `decref` at a time cost two page-cache
    /// lookups per block, most of a large delete's time.
    pub(crate) fn decref_data(&mut self, blocks: &mut [u64]) -> Result<()> {
        let mut freed = Vec::new();
        self.update_counts(blocks, |b, rc| match rc {
            0 => Err(Error::corrupt(b, "reference count underflow")),
            1 => {
                freed.push(b);
                Ok(0)
            }
            _ => Ok(rc - 1),
        })?;
        self.decremented.extend(blocks.iter().copied());
        for &b in &freed {
            self.cache.remove(b);
        }
        self.sb.allocated -= freed.len() as u64;
        self.frees += 1;
        let at = self.frees;
        self.quarantine.extend(freed.into_iter().map(|b| (b, at)));
        Ok(())
    }

    /// Drops one reference to `b`; blocks reaching 0 are freed, and a freed tree page drops the
    /// references it holds in turn. Work is proportional to what gets freed: callers use it where
    /// that is at most one leaf's worth, and [`Meta::drop_step`] for whole trees.
    pub fn decref(&mut self, b: u64, level: Level) -> Result<()> {
        let mut stack = vec![(b, level)];
        while let Some((b, level)) = stack.pop() {
            let rc = self.rc(b)?;
            if rc == 0 {
                return Err(Error::corrupt(b, "reference count underflow"));
            }
            self.set_rc(b, rc - 1)?;
            self.decremented.insert(b);
            if rc > 1 {
                continue;
            }
            if let Some(l) = level {
                let page = self.cache.get(&*self.dev, b, PageKind::Tree)?;
                for i in 0..FANOUT {
                    let e = entry(page, i);
                    if e != 0 {
                        stack.push((e, child_level(l)));
                    }
                }
            }
            self.cache.remove(b);
            self.frees += 1;
            self.quarantine.insert(b, self.frees);
            self.sb.allocated -= 1;
        }
        Ok(())
    }

    /// Frees part of a dropped tree: the caller holds one reference to `root` (a page at
    /// `level`). Stops when `step` is spent; returns whether the whole tree has been let go of.
    ///
    /// Pages only the tree references are emptied in place, entry by entry, as their targets are
    /// released; a commit between two steps therefore leaves exact counts, and the next step
    /// resumes by skipping the zeroed entries. Memory and journal space per step are bounded by
    /// the step, whatever the tree holds.
    pub fn drop_step(&mut self, root: u64, level: u32, step: &mut DropStep) -> Result<bool> {
        if self.rc(root)? > 1 || self.empty_page(root, level, step)? {
            self.decref(root, Some(level))?;
            step.released += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// Releases every entry of `page` (a page at `level` that only its parent references),
    /// descending into children only it references; false if the step was spent first.
    fn empty_page(&mut self, page: u64, level: u32, step: &mut DropStep) -> Result<bool> {
        if level == 0 {
            return self.empty_leaf(page, step);
        }
        if level == 1 {
            // An old checkpoint's leaves are rarely cached: ask for all of them at once rather
            // than waiting for each in turn.
            self.read_ahead_leaves(page)?;
        }
        for i in 0..FANOUT {
            let e = entry(self.cache.get(&*self.dev, page, PageKind::Tree)?, i);
            if e == 0 {
                continue;
            }
            if step.spent(self.cache.dirty_count()) {
                return Ok(false);
            }
            if self.rc(e)? == 1 && !self.empty_page(e, level - 1, step)? {
                return Ok(false);
            }
            // Now shared or emptied: one decrement releases just `e`.
            self.decref(e, Some(level - 1))?;
            set_entry(self.cache.get_mut(&*self.dev, page, PageKind::Tree)?, i, 0);
            step.released += 1;
        }
        Ok(true)
    }

    /// [`Meta::empty_page`] for a leaf: its data blocks are released in one batch, as many as
    /// the step allows.
    fn empty_leaf(&mut self, page: u64, step: &mut DropStep) -> Result<bool> {
        if step.spent(self.cache.dirty_count()) {
            return Ok(false);
        }
        let room = usize::try_from(step.max_released - step.released).unwrap_or(usize::MAX);
        let p = self.cache.get(&*self.dev, page, PageKind::Tree)?;
        let mapped: Vec<u64> = (0..FANOUT).filter(|&i| entry(p, i) != 0).collect();
        let taken = &mapped[..mapped.len().min(room)];
        if taken.is_empty() {
            return Ok(true);
        }
        let mut blocks: Vec<u64> = taken.iter().map(|&i| entry(p, i)).collect();
        self.decref_data(&mut blocks)?;
        let p = self.cache.get_mut(&*self.dev, page, PageKind::Tree)?;
        for &i in taken {
            set_entry(p, i, 0);
        }
        let all = taken.len() == mapped.len();
        step.released += taken.len() as u64;
        Ok(all)
    }

    /// Finds a free block (count 0, not quarantined, not reserved), preferring the lowest one from the
    /// cursor so that consecutive allocations are contiguous on the host. Does not claim it. Data
    /// must leave [`METADATA_HEADROOM`] preallocated blocks free, so that when the host is full,
    /// writes fail first and commits (and so checkpoints) still find room for their metadata.
    fn find_free(&mut self, for_data: bool) -> Result<u64> {
        let hw = self.sb.high_water;
        let layout = self.sb.layout;
        let mut b = layout.next_data_block(self.sb.alloc_cursor);
        while b < hw {
            let (first, end) = layout.refcount_range(b);
            let end = end.min(hw);
            let (pg, _) = layout.refcount_slot(b);
            let page = self.cache.get(&*self.dev, pg, PageKind::Refcount)?;
            let found = (b..end).find(|&x| {
                refcount(page, x - first) == 0
                    && !self.quarantine.contains_key(&x)
                    && !self.reserved.contains(&x)
            });
            if let Some(x) = found {
                self.sb.alloc_cursor = x + 1;
                return Ok(x);
            }
            b = layout.next_data_block(end);
        }
        let b = layout.next_data_block(hw.max(b));
        // Reserve host space before handing out blocks past the end: a full disk then fails here,
        // cleanly, instead of in a later write of data or metadata already pointed to. Writes into
        // preallocated space are also several times faster on ext4 than appends.
        let headroom = if for_data { METADATA_HEADROOM } else { 0 };
        let need = (b + 2 + headroom) * BLOCK_SIZE as u64;
        if need > self.allocated_end {
            let end = need.div_ceil(self.prealloc) * self.prealloc;
            self.dev
                .allocate(self.allocated_end, end - self.allocated_end)
                .map_err(Error::io("preallocate", &self.path))?;
            self.allocated_end = end;
        }
        // Every block below the new high water must have its refcount page, including blocks
        // skipped to align a run (`reserve_run`): they are free, for later short allocations.
        for (page, first, _) in layout.refcount_pages_in(hw, b + 1) {
            if first >= hw {
                self.cache.insert(page, new_page(PageKind::Refcount, 0));
            }
        }
        self.sb.high_water = b + 1;
        self.sb.alloc_cursor = b + 1;
        Ok(b)
    }

    /// The next stretch of the data file to preallocate, once less than half a preallocation
    /// step is left past the high water mark: `(from, to)` in bytes. Growing ahead, outside the
    /// state lock, keeps `fallocate` (which waits behind a running `fdatasync` on ext4) off the
    /// write path; `find_free` still grows by itself if a burst outruns this.
    pub fn growth_due(&self) -> Option<(u64, u64)> {
        let bs = BLOCK_SIZE as u64;
        let want = (self.sb.high_water + METADATA_HEADROOM + 2) * bs + self.prealloc / 2;
        (want > self.allocated_end)
            .then(|| (self.allocated_end, self.allocated_end + self.prealloc))
    }

    /// Sorts `pages` and hints the device to read them, in runs of adjacent pages; a failed
    /// hint only costs speed.
    pub fn prefetch_pages(&self, pages: &mut [u64]) {
        let bs = BLOCK_SIZE as u64;
        pages.sort_unstable();
        for r in block_runs(pages) {
            let _ = self.dev.prefetch(pages[r.start] * bs, r.len() as u64 * bs);
        }
    }

    /// Allocates a block with reference count 1.
    pub fn alloc(&mut self) -> Result<u64> {
        let b = self.find_free(false)?;
        self.take(b)
    }

    /// Sets a free block aside for a write in flight; `link` or `unreserve` it afterwards.
    pub fn reserve(&mut self) -> Result<u64> {
        let b = self.find_free(true)?;
        self.reserved.insert(b);
        Ok(b)
    }

    /// Reserves `n` blocks from the end of the allocated range, where free space is contiguous,
    /// for a long write or data being moved to make it contiguous. The run starts at a block
    /// aligned to `n`'s largest power of two up to 512 (2 MiB): the host caches a file in folios
    /// no larger than the alignment of the writes that created them, and a large folio is both
    /// found faster by `pread` and mapped whole by one page fault (docs/design.md, "Aligned
    /// runs"). The blocks skipped stay free for metadata pages and short writes, which take the
    /// lowest free blocks. A defrag asks for no alignment (`aligned` false): its runs, one per
    /// leaf of 510 blocks, must follow each other to make the head one extent.
    pub fn reserve_run(&mut self, n: usize, aligned: bool) -> Result<Vec<u64>> {
        let cursor = self.sb.alloc_cursor;
        let align = if aligned && self.sb.layout.aligns_runs() {
            run_alignment(n as u64)
        } else {
            1
        };
        self.sb.alloc_cursor = self.sb.high_water.next_multiple_of(align);
        let mut run = Vec::with_capacity(n);
        let mut res = Ok(());
        for _ in 0..n {
            match self.reserve() {
                Ok(b) => run.push(b),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        self.sb.alloc_cursor = cursor;
        if let Err(e) = res {
            for b in run {
                self.unreserve(b);
            }
            return Err(e);
        }
        Ok(run)
    }

    /// Claims reserved blocks (reference count 1) as their pointers are stored; sorts `blocks`
    /// and touches each refcount page once.
    pub fn link_all(&mut self, blocks: &mut [u64]) -> Result<()> {
        for b in blocks.iter() {
            self.reserved.remove(b);
        }
        self.update_counts(blocks, |_, _| Ok(1))?;
        self.sb.allocated += blocks.len() as u64;
        Ok(())
    }

    /// Gives back a reserved block that will not be linked.
    pub fn unreserve(&mut self, b: u64) {
        self.reserved.remove(&b);
    }

    fn take(&mut self, b: u64) -> Result<u64> {
        self.set_rc(b, 1)?;
        self.sb.allocated += 1;
        Ok(b)
    }

    /// Allocates a block and installs `page` as its content.
    pub fn alloc_page(&mut self, page: Box<Page>) -> Result<u64> {
        let b = self.alloc()?;
        self.cache.insert(b, page);
        Ok(b)
    }

    /// Called after a journal reset: every block freed so far can no longer be overwritten by a
    /// replayed journal record.
    pub fn journal_was_reset(&mut self) {
        self.ready.extend(self.quarantine.keys().copied());
    }

    /// Called after a journal reset whose transaction was sealed when [`Meta::frees`] was `at_seal`
    /// and committed without the state lock: the blocks freed by then and still quarantined become
    /// ready. Not a list taken at the seal: a block on it may have been released by another reset
    /// meanwhile and hold a new page by now, and one freed again since was freed by a change this
    /// reset does not cover. A list once punched a live tree page (tests/defrag.rs,
    /// `writes_during_defrag_are_kept`, failed 1 run in 6).
    pub fn reset_covered(&mut self, at_seal: u64) {
        self.ready.extend(
            self.quarantine
                .iter()
                .filter(|&(_, &at)| at <= at_seal)
                .map(|(&b, _)| b),
        );
    }

    /// Punches ready blocks out of the host file and makes them allocatable again, all under
    /// the caller's locks. The caller guarantees no request that looked them up is still in
    /// flight. (The store's usual path punches without its locks: [`Meta::start_release`].)
    pub fn release_ready(&mut self) {
        if let Some((token, blocks)) = self.start_release() {
            punch_blocks(&*self.dev, &blocks);
            self.finish_release(token, &blocks);
        }
    }

    /// Takes the ready blocks (sorted, each once) for release, with a token for
    /// [`Meta::finish_release`]; `None` if there are none or another release is under way. The
    /// blocks stay quarantined, so nothing allocates them while they are punched. The caller
    /// guarantees no request that looked them up is still in flight.
    pub fn start_release(&mut self) -> Option<(u64, Vec<u64>)> {
        if self.releasing.is_some() || self.ready.is_empty() {
            return None;
        }
        let mut blocks = std::mem::take(&mut self.ready);
        blocks.sort_unstable();
        blocks.dedup();
        self.release_tokens += 1;
        self.releasing = Some(self.release_tokens);
        Some((self.release_tokens, blocks))
    }

    /// Makes the blocks of release `token` allocatable again; nothing if a reload of the durable
    /// state came in between (it started over from what is on disk).
    pub fn finish_release(&mut self, token: u64, blocks: &[u64]) {
        if self.releasing != Some(token) {
            return;
        }
        self.releasing = None;
        for b in blocks {
            self.quarantine.remove(b);
        }
        // A journal reset while they were punched made them ready a second time.
        self.ready.retain(|b| blocks.binary_search(b).is_err());
        if let Some(&first) = blocks.first() {
            self.sb.alloc_cursor = self.sb.alloc_cursor.min(first);
        }
    }
}

/// Punches `blocks` (sorted) out of the host file, a run of adjacent blocks per call. Best effort:
/// a filesystem without hole support keeps the blocks, which are reused all the same. Needs no
/// lock: the blocks are free and quarantined, so nothing reads, writes or allocates them.
pub fn punch_blocks(dev: &dyn Device, blocks: &[u64]) {
    for r in block_runs(blocks) {
        let _ = dev.punch_hole(
            blocks[r.start] * BLOCK_SIZE as u64,
            r.len() as u64 * BLOCK_SIZE as u64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::block_runs;

    /// A run reserved near a cluster's end skips the next cluster's header, gets that cluster's
    /// refcount page, and leaves the blocks it skipped free for the next allocation.
    #[test]
    fn a_run_crosses_into_the_next_cluster_over_its_header() {
        use super::Meta;
        use crate::format::{new_page, PageKind, CLUSTER_BLOCKS, CLUSTER_HEADER_BLOCKS};
        let dir = tempfile::tempdir().expect("tempdir");
        let s =
            crate::store::Store::init(dir.path(), crate::store::Options::default()).expect("init");
        s.with_meta(|m: &mut Meta| {
            // Pretend cluster 0 is allocated up to 100 blocks before its end: only the refcount
            // page of that last range has to exist for this.
            let hw = CLUSTER_BLOCKS - 100;
            let layout = m.sb.layout;
            m.cache
                .insert(layout.refcount_slot(hw).0, new_page(PageKind::Refcount, 0));
            m.sb.high_water = hw;
            m.sb.alloc_cursor = hw;
            let run = m.reserve_run(1024, true).expect("reserve");
            let start = CLUSTER_BLOCKS + CLUSTER_HEADER_BLOCKS;
            assert_eq!(run, (start..start + 1024).collect::<Vec<_>>());
            assert_eq!(m.sb.high_water, start + 1024);
            // Cluster 1's first two refcount pages exist now (header slots 0 and 2).
            assert_eq!(m.rc(start).expect("count"), 0);
            assert_eq!(m.rc(start + 1023).expect("count"), 0);
            assert_eq!(layout.refcount_slot(start + 1023).0, CLUSTER_BLOCKS + 2);
            // The skipped end of cluster 0 is what the next allocation gets.
            assert_eq!(m.alloc().expect("alloc"), hw);
            for b in run {
                m.unreserve(b);
            }
        });
    }

    #[test]
    fn a_reset_readies_only_what_was_quarantined_before_its_seal() {
        use super::Meta;
        use crate::device::{PowerSupply, SimDevice};
        let data = SimDevice::new(Vec::new(), PowerSupply::new());
        let journal = SimDevice::new(Vec::new(), PowerSupply::new());
        crate::store::Store::format(&*data, "sim").expect("format");
        let s = crate::store::Store::open_devices(
            data,
            journal,
            crate::store::Options::default(),
            "sim",
        )
        .expect("open");
        s.with_meta(|m: &mut Meta| {
            // Freed before a concurrent commit seals: 10 and 11.
            let b10 = m.alloc().expect("alloc");
            let b11 = m.alloc().expect("alloc");
            m.decref(b10, None).expect("free");
            m.decref(b11, None).expect("free");
            let at_seal = m.frees;
            // Meanwhile another reset releases 10, which is allocated again, and 11 is released
            // and freed again.
            m.journal_was_reset();
            m.release_ready();
            assert!(!m.quarantine.contains_key(&b10));
            let again = m.alloc().expect("alloc");
            assert_eq!(
                again,
                b10.min(b11),
                "the lowest released block is reused first"
            );
            let other = if again == b10 { b11 } else { b10 };
            let c = m.alloc().expect("alloc");
            assert_eq!(c, other);
            m.decref(c, None).expect("free again");
            // The concurrent commit's reset readies neither: one is live, one freed after its seal.
            m.reset_covered(at_seal);
            assert!(m.ready.is_empty(), "ready: {:?}", m.ready);
            m.journal_was_reset();
            assert_eq!(m.ready, vec![c]);
        });
    }

    #[test]
    fn block_runs_split_at_gaps_and_keep_holes_together() {
        let runs: Vec<_> = block_runs(&[5, 6, 7, 0, 0, 9, 11, 12, 0, 13]).collect();
        assert_eq!(runs, vec![0..3, 3..5, 5..6, 6..8, 8..9, 9..10]);
        assert_eq!(block_runs(&[]).count(), 0);
    }
}
