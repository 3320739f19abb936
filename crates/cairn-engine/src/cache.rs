//! A bounded cache of metadata pages. Dirty pages stay until the next commit writes them; clean ones
//! are evicted in insertion order once the cache is over its budget, which bounds memory whatever the
//! store holds.
//!
//! Background work that reads a volume once (a backup) looks pages up without caching them
//! ([`PageCache::get_transient`]): they go into a handful of slots of their own, so a backup of a
//! large volume neither evicts the pages the VMs use nor grows a one-shot process to the cache's
//! whole budget.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::format::{verify, Page, PageKind, BLOCK_SIZE};
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Arc;

struct Cached {
    /// Shared with a commit in flight that sealed it; modified pages are copied first.
    page: Arc<Page>,
    dirty: bool,
    /// The cache epoch of the page's last modification; a commit that sealed epoch `e` may mark
    /// clean only pages not modified since (see [`PageCache::seal_dirty`]).
    epoch: u64,
}

/// Metadata pages by block number.
pub struct PageCache {
    // Fx instead of SipHash: keys are block numbers we chose, and hashing was a measured cost.
    map: FxHashMap<u64, Cached>,
    order: VecDeque<u64>,
    capacity: usize,
    dirty: usize,
    epoch: u64,
    path: String,
    /// Pages read for background work, newest last, at most [`TRANSIENT_SLOTS`]; never dirty, and
    /// never also in `map` (a page loaded or changed there is dropped here).
    transient: VecDeque<(u64, Arc<Page>)>,
}

/// Pages kept for background lookups: a few leaves, each serving 2 MiB of a volume.
const TRANSIENT_SLOTS: usize = 8;

impl PageCache {
    /// A cache holding at most `capacity` clean pages (dirty pages may exceed it until commit).
    pub fn new(capacity: usize, path: &str) -> Self {
        PageCache {
            map: FxHashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(16),
            dirty: 0,
            epoch: 0,
            path: path.into(),
            transient: VecDeque::new(),
        }
    }

    fn read_page(&self, dev: &dyn Device, b: u64, kind: PageKind) -> Result<Box<Page>> {
        let mut page = Box::new([0u8; BLOCK_SIZE]);
        dev.read_at(&mut page[..], b * BLOCK_SIZE as u64)
            .map_err(Error::io("metadata read", &self.path))?;
        verify(&page, b, kind)?;
        Ok(page)
    }

    /// Forgets a transient copy of block `b`: the cache's own copy is the one that counts now.
    fn forget_transient(&mut self, b: u64) {
        if !self.transient.is_empty() {
            self.transient.retain(|(t, _)| *t != b);
        }
    }

    /// The page in block `b` for background work: the cached one if there is one, else read
    /// (and verified) into a few slots of its own without entering the cache.
    pub fn get_transient(&mut self, dev: &dyn Device, b: u64, kind: PageKind) -> Result<Arc<Page>> {
        if let Some(c) = self.map.get(&b) {
            return Ok(c.page.clone());
        }
        if let Some((_, p)) = self.transient.iter().find(|(t, _)| *t == b) {
            return Ok(p.clone());
        }
        let page: Arc<Page> = Arc::from(self.read_page(dev, b, kind)?);
        if self.transient.len() >= TRANSIENT_SLOTS {
            self.transient.pop_front();
        }
        self.transient.push_back((b, page.clone()));
        Ok(page)
    }

    fn load(&mut self, dev: &dyn Device, b: u64, kind: PageKind) -> Result<()> {
        if self.map.contains_key(&b) {
            return Ok(());
        }
        let page = self.read_page(dev, b, kind)?;
        self.forget_transient(b);
        self.evict();
        self.map.insert(
            b,
            Cached {
                page: Arc::from(page),
                dirty: false,
                epoch: 0,
            },
        );
        self.order.push_back(b);
        Ok(())
    }

    fn evict(&mut self) {
        let mut budget = self.order.len();
        while self.map.len() >= self.capacity && budget > 0 {
            budget -= 1;
            let Some(b) = self.order.pop_front() else {
                break;
            };
            match self.map.get(&b) {
                Some(c) if c.dirty => self.order.push_back(b),
                Some(_) => {
                    self.map.remove(&b);
                }
                None => {}
            }
        }
    }

    /// The page in block `b`, read and verified if not cached.
    pub fn get(&mut self, dev: &dyn Device, b: u64, kind: PageKind) -> Result<&Page> {
        self.load(dev, b, kind)?;
        Ok(&self.map[&b].page)
    }

    /// The page in block `b` for modification; it becomes dirty.
    pub fn get_mut(&mut self, dev: &dyn Device, b: u64, kind: PageKind) -> Result<&mut Page> {
        self.load(dev, b, kind)?;
        self.forget_transient(b);
        let c = self
            .map
            .get_mut(&b)
            .ok_or_else(|| Error::corrupt(b, "page vanished"))?;
        if !c.dirty {
            c.dirty = true;
            self.dirty += 1;
        }
        c.epoch = self.epoch;
        Ok(Arc::make_mut(&mut c.page))
    }

    /// Installs a freshly built page for block `b`, dirty.
    pub fn insert(&mut self, b: u64, page: Box<Page>) {
        self.forget_transient(b);
        self.evict();
        let c = Cached {
            page: Arc::from(page),
            dirty: true,
            epoch: self.epoch,
        };
        match self.map.insert(b, c) {
            Some(old) if old.dirty => {}
            _ => self.dirty += 1,
        }
        self.order.push_back(b);
    }

    /// Whether block `b` is cached.
    pub fn contains(&self, b: u64) -> bool {
        self.map.contains_key(&b)
    }

    /// Forgets block `b` (it was freed).
    pub fn remove(&mut self, b: u64) {
        self.forget_transient(b);
        if let Some(c) = self.map.remove(&b) {
            if c.dirty {
                self.dirty -= 1;
            }
        }
    }

    /// Number of dirty pages.
    pub fn dirty_count(&self) -> usize {
        self.dirty
    }

    /// Dirty pages in block order, for the commit to seal and write.
    pub fn dirty_pages_mut(&mut self) -> Vec<(u64, &mut Page)> {
        let mut v: Vec<(u64, &mut Page)> = self
            .map
            .iter_mut()
            .filter(|(_, c)| c.dirty)
            .map(|(b, c)| (*b, Arc::make_mut(&mut c.page)))
            .collect();
        v.sort_by_key(|(b, _)| *b);
        v
    }

    /// The dirty pages in block order, shared (not copied: a page modified before the commit is
    /// done gets copied then), for a commit that writes them while the cache goes on being used.
    /// Returns the epoch they belong to: [`PageCache::mark_clean_upto`] with it, once they are
    /// durable, cleans exactly the pages not modified again in between. The pages stay dirty (so
    /// never evicted and re-read from a disk that lacks them) until then.
    pub fn seal_dirty(&mut self) -> (u64, Vec<(u64, Arc<Page>)>) {
        let mut v: Vec<(u64, Arc<Page>)> = self
            .map
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(b, c)| (*b, c.page.clone()))
            .collect();
        v.sort_unstable_by_key(|(b, _)| *b);
        let sealed = self.epoch;
        self.epoch += 1;
        (sealed, v)
    }

    /// Marks clean the dirty pages last modified at or before epoch `sealed`.
    pub fn mark_clean_upto(&mut self, sealed: u64) {
        for c in self.map.values_mut() {
            if c.dirty && c.epoch <= sealed {
                c.dirty = false;
                self.dirty -= 1;
            }
        }
    }

    /// Marks every page clean after a commit.
    pub fn mark_clean(&mut self) {
        for c in self.map.values_mut() {
            c.dirty = false;
        }
        self.dirty = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{PowerSupply, SimDevice};
    use crate::format::{new_page, seal};

    /// A disk whose blocks 1..=n hold tree pages, each with its number at byte 16.
    fn disk(n: u64) -> Arc<SimDevice> {
        let mut img = vec![0u8; (n as usize + 1) * BLOCK_SIZE];
        for b in 1..=n {
            let mut p = new_page(PageKind::Tree, 0);
            p[16..24].copy_from_slice(&b.to_le_bytes());
            seal(&mut p);
            img[b as usize * BLOCK_SIZE..][..BLOCK_SIZE].copy_from_slice(&p[..]);
        }
        SimDevice::new(img, Arc::new(PowerSupply::default()))
    }

    fn tag(p: &Page) -> u64 {
        u64::from_le_bytes(p[16..24].try_into().expect("8 bytes"))
    }

    #[test]
    fn transient_reads_do_not_fill_the_cache_and_never_go_stale() {
        let dev = disk(40);
        let mut c = PageCache::new(64, "test");
        for b in 1..=40 {
            assert_eq!(
                tag(&c.get_transient(&*dev, b, PageKind::Tree).expect("read")),
                b
            );
        }
        assert_eq!(c.map.len(), 0, "transient reads stay out of the cache");
        assert!(c.transient.len() <= TRANSIENT_SLOTS);
        // Block 40 sits in a transient slot; once changed through the cache, the change is what
        // a transient read sees.
        c.get_mut(&*dev, 40, PageKind::Tree).expect("load")[16] = 99;
        assert_eq!(
            c.get_transient(&*dev, 40, PageKind::Tree).expect("read")[16],
            99
        );
        // A block freed and reused for another page: the new page, not the slot's old copy.
        let _ = c.get_transient(&*dev, 39, PageKind::Tree).expect("read");
        c.remove(39);
        let mut fresh = new_page(PageKind::Tree, 0);
        fresh[16] = 7;
        c.insert(39, fresh);
        assert_eq!(
            c.get_transient(&*dev, 39, PageKind::Tree).expect("read")[16],
            7
        );
    }
}
