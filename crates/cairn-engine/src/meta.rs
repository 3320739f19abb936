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
    entry, is_refcount_block, new_page, refcount, refcount_slot, set_refcount, Page, PageKind,
    Superblock, BLOCK_SIZE, FANOUT, GROUP_BLOCKS,
};
use rustc_hash::FxHashSet;
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
    /// Blocks freed since the last journal reset: not reusable yet.
    pub quarantine: FxHashSet<u64>,
    /// Blocks whose count dropped since the last commit: the durable state may still share them,
    /// so their data must not be overwritten in place.
    pub decremented: FxHashSet<u64>,
    /// Data was written since the last commit.
    pub data_written: bool,
}

/// A tree node level, or `None` for a leaf's child (a data block or a catalog record).
pub type Level = Option<u32>;

/// Level of the children of a node at `level`.
pub fn child_level(level: u32) -> Level {
    level.checked_sub(1)
}

impl Meta {
    fn check_block(&self, b: u64) -> Result<()> {
        if b < 2 || is_refcount_block(b) || b >= self.sb.high_water {
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
        let (pg, idx) = refcount_slot(b);
        Ok(refcount(
            self.cache.get(&*self.dev, pg, PageKind::Refcount)?,
            idx,
        ))
    }

    fn set_rc(&mut self, b: u64, v: u32) -> Result<()> {
        let (pg, idx) = refcount_slot(b);
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

    /// Drops one reference to `b`; blocks reaching 0 are freed, and a freed tree page drops the
    /// references it holds in turn. Work is proportional to what gets freed.
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
            self.quarantine.insert(b);
            self.sb.allocated -= 1;
        }
        Ok(())
    }

    /// Allocates a block (reference count 1), preferring the lowest free one from the cursor so
    /// that consecutive allocations are contiguous on the host.
    pub fn alloc(&mut self) -> Result<u64> {
        let hw = self.sb.high_water;
        let mut b = self.sb.alloc_cursor.max(2);
        while b < hw {
            if is_refcount_block(b) {
                b += 1;
                continue;
            }
            let (pg, _) = refcount_slot(b);
            let end = (pg + GROUP_BLOCKS).min(hw);
            let page = self.cache.get(&*self.dev, pg, PageKind::Refcount)?;
            let found = (b..end)
                .find(|&x| refcount(page, x - pg - 1) == 0 && !self.quarantine.contains(&x));
            if let Some(x) = found {
                self.sb.alloc_cursor = x + 1;
                return self.take(x);
            }
            b = end;
        }
        let mut b = hw.max(b);
        if is_refcount_block(b) {
            self.cache.insert(b, new_page(PageKind::Refcount, 0));
            b += 1;
        }
        self.sb.high_water = b + 1;
        self.sb.alloc_cursor = b + 1;
        self.take(b)
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

    /// Makes quarantined blocks allocatable again and punches them out of the host file. Call only
    /// after the journal was reset.
    pub fn release_quarantine(&mut self) -> Result<()> {
        let mut blocks: Vec<u64> = self.quarantine.drain().collect();
        blocks.sort_unstable();
        if let Some(&first) = blocks.first() {
            self.sb.alloc_cursor = self.sb.alloc_cursor.min(first);
        }
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i];
            let mut end = start + 1;
            i += 1;
            while i < blocks.len() && blocks[i] == end {
                end += 1;
                i += 1;
            }
            // Punching is best effort: a filesystem without hole support keeps the blocks, which
            // are reused all the same.
            let _ = self
                .dev
                .punch_hole(start * BLOCK_SIZE as u64, (end - start) * BLOCK_SIZE as u64);
        }
        Ok(())
    }
}
