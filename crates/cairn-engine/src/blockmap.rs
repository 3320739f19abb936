// On-disk and wire code: a length or index that does not fit its field is a corruption bug.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]
//! The block map: a fixed-fanout copy-on-write radix tree from virtual block number to data block.
//!
//! Trees are shared between a volume's head, its checkpoints and its clones by reference counting
//! (Rodeh, "B-trees, Shadowing, and Clones"): taking a checkpoint adds one reference to the head's
//! root and touches nothing else. A write first makes its path private: a node whose count is above
//! one is *shadowed* (copied, its children each gain a reference, the original loses one). Sharing is
//! therefore broken only along paths that are written, and a read is one descent whatever the number
//! of checkpoints. The same code stores the catalog (record id -> record block).

use crate::error::Result;
use crate::format::{entry, level as page_level, new_page, set_entry, span, PageKind, FANOUT};
use crate::meta::{child_level, Meta};

/// How the rest of a block must be filled before a partial write lands in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The block is written in place: read it, merge, write back.
    InPlace,
    /// A fresh block for a previously unmapped range: the rest is zeros.
    Zero,
    /// A fresh copy of a shared block: the rest comes from this block.
    CopyFrom(u64),
}

/// A node in a diff walk: a real page, nothing, or a tree of lower depth seen from a higher level
/// (a volume that grew later has its old root as child 0 of a chain of new roots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Null,
    Page(u64),
    Lifted { root: u64, root_level: u32 },
}

impl Meta {
    /// The leaf page covering `vbn`, or 0 if that part of the tree is empty.
    pub fn leaf_of(&mut self, root: u64, depth: u32, vbn: u64) -> Result<u64> {
        let mut p = root;
        for level in (1..depth).rev() {
            if p == 0 {
                return Ok(0);
            }
            let idx = (vbn / span(level)) % FANOUT;
            let cold = level == 1 && !self.cache.contains(p);
            let page = self.cache.get(&*self.dev, p, PageKind::Tree)?;
            let child = entry(page, idx);
            if cold {
                self.read_ahead_leaves(p)?;
            }
            p = child;
        }
        Ok(p)
    }

    /// Hints the device to read every leaf under `parent` that is not cached. Without it a cold
    /// sequential read waited for one synchronous leaf read per 2 MiB: 0.53 s of a 1.8 s read
    /// of 2 GiB. A parent covers 1 GiB, so this reads at most 2 MiB of metadata per GiB touched.
    pub(crate) fn read_ahead_leaves(&mut self, parent: u64) -> Result<()> {
        let page = self.cache.get(&*self.dev, parent, PageKind::Tree)?;
        let mut leaves: Vec<u64> = (0..FANOUT).map(|i| entry(page, i)).collect();
        leaves.retain(|&l| l != 0 && !self.cache.contains(l));
        self.prefetch_pages(&mut leaves);
        Ok(())
    }

    /// Appends the data block of each of `count` blocks from `vbn` (0 where unmapped). With
    /// `transient` (background work) the leaves read do not enter the cache
    /// ([`crate::cache::PageCache::get_transient`]).
    pub fn lookup_range(
        &mut self,
        root: u64,
        depth: u32,
        mut vbn: u64,
        count: u64,
        out: &mut Vec<u64>,
        transient: bool,
    ) -> Result<()> {
        let end = vbn + count;
        while vbn < end {
            let leaf_end = (vbn / FANOUT + 1) * FANOUT;
            let stop = leaf_end.min(end);
            let leaf = self.leaf_of(root, depth, vbn)?;
            if leaf == 0 {
                out.extend(std::iter::repeat_n(0, crate::format::slot(stop - vbn)));
            } else if transient {
                let page = self.cache.get_transient(&*self.dev, leaf, PageKind::Tree)?;
                out.extend((vbn..stop).map(|v| entry(&page, v % FANOUT)));
            } else {
                let page = self.cache.get(&*self.dev, leaf, PageKind::Tree)?;
                out.extend((vbn..stop).map(|v| entry(page, v % FANOUT)));
            }
            vbn = stop;
        }
        Ok(())
    }

    /// A node at `level` that only the caller's pointer references, shadowing or creating it.
    fn private_node(&mut self, node: u64, level: u32) -> Result<u64> {
        if node == 0 {
            return self.alloc_page(new_page(PageKind::Tree, tree_level(level)));
        }
        if self.rc(node)? == 1 {
            return Ok(node);
        }
        let copy = Box::new(*self.cache.get(&*self.dev, node, PageKind::Tree)?);
        let mut children: Vec<u64> = (0..FANOUT)
            .map(|i| entry(&copy, i))
            .filter(|&e| e != 0)
            .collect();
        self.incref_all(&mut children)?;
        let shadow = self.alloc_page(copy)?;
        self.decref(node, Some(level))?;
        Ok(shadow)
    }

    /// Makes the path to `vbn` private and returns its leaf page; `root` may change.
    pub fn leaf_for_write(&mut self, root: &mut u64, depth: u32, vbn: u64) -> Result<u64> {
        *root = self.private_node(*root, depth - 1)?;
        let mut p = *root;
        for level in (1..depth).rev() {
            let idx = (vbn / span(level)) % FANOUT;
            let c = entry(self.cache.get(&*self.dev, p, PageKind::Tree)?, idx);
            let c2 = self.private_node(c, level - 1)?;
            if c2 != c {
                set_entry(self.cache.get_mut(&*self.dev, p, PageKind::Tree)?, idx, c2);
            }
            p = c2;
        }
        Ok(p)
    }

    /// First phase of a write of `count` blocks from `vbn`: for each block, where its data goes. A
    /// block only this tree references, whose sharing did not end in this transaction, is written in
    /// place; any other gets a fresh reserved block (to fill with zeros or a copy of the old one for
    /// a partial write) that [`Meta::link_writes`] links once the data is written.
    ///
    /// A `long` write's fresh blocks are reserved as one run at the end of the allocated range
    /// ([`Meta::reserve_run`]). Taken one by one they came from the lowest free blocks, and by
    /// 100 checkpoints the data area is dotted with single free blocks (metadata and catalog
    /// pages rewritten by every commit, then freed): a 1 MiB copy-on-write went to the disk as
    /// about ten writes of 4-86 KiB and left its data scattered. Single holes are left to
    /// metadata pages and short writes.
    pub fn prepare_write(
        &mut self,
        root: u64,
        depth: u32,
        vbn: u64,
        count: u64,
        long: bool,
        out: &mut Vec<(u64, Fill)>,
    ) -> Result<()> {
        let mut blocks = Vec::with_capacity(crate::format::slot(count));
        self.lookup_shared(root, depth, vbn, count, &mut blocks)?;
        let mut in_place: Vec<bool> = blocks
            .iter()
            .map(|&(x, shared)| x != 0 && !shared && !self.dropped_since_durable(x))
            .collect();
        let mut fresh = in_place.iter().filter(|&&p| !p).count();
        if long && fresh > 0 && fresh < in_place.len() {
            // A few blocks the tree owns alone amid copies would split the write into several
            // disk writes and leave its data in pieces: copy them too (their old blocks are
            // freed). At depth 100 the bench's 1 MiB rewrites met 2-3 such blocks each and went
            // out as 3-4 direct writes.
            in_place.iter_mut().for_each(|p| *p = false);
            fresh = in_place.len();
        }
        let mut run = if long && fresh > 1 {
            self.reserve_run(fresh, true)?
        } else {
            Vec::new()
        }
        .into_iter();
        for ((x, _), in_place) in blocks.into_iter().zip(in_place) {
            if in_place {
                out.push((x, Fill::InPlace));
            } else {
                let y = match run.next() {
                    Some(y) => y,
                    None => self.reserve()?,
                };
                out.push((
                    y,
                    if x == 0 {
                        Fill::Zero
                    } else {
                        Fill::CopyFrom(x)
                    },
                ));
            }
        }
        Ok(())
    }

    /// Appends, for each of `count` blocks from `vbn`, its data block (0 where unmapped) and
    /// whether anyone else references it: a shared page on its path (then every block below is
    /// shared too) or a count above 1. Overwriting or moving a shared block costs a new block.
    pub fn lookup_shared(
        &mut self,
        root: u64,
        depth: u32,
        mut vbn: u64,
        count: u64,
        out: &mut Vec<(u64, bool)>,
    ) -> Result<()> {
        let end = vbn + count;
        while vbn < end {
            let stop = ((vbn / FANOUT + 1) * FANOUT).min(end);
            let mut shared = false;
            let mut p = root;
            for level in (0..depth).rev() {
                if p == 0 {
                    break;
                }
                shared |= self.rc(p)? > 1;
                if level > 0 {
                    let idx = (vbn / span(level)) % FANOUT;
                    p = entry(self.cache.get(&*self.dev, p, PageKind::Tree)?, idx);
                }
            }
            for v in vbn..stop {
                let x = if p == 0 {
                    0
                } else {
                    entry(self.cache.get(&*self.dev, p, PageKind::Tree)?, v % FANOUT)
                };
                let shared = x != 0 && (shared || self.rc(x)? > 1);
                out.push((x, shared));
            }
            vbn = stop;
        }
        Ok(())
    }

    /// Gives back the blocks a write plan reserved (a write that will not be linked).
    pub fn unreserve_plan(&mut self, plan: &[(u64, Fill)]) {
        for (b, fill) in plan {
            if *fill != Fill::InPlace {
                self.unreserve(*b);
            }
        }
    }

    /// Last phase of a write: points each `(vbn, block)` of `links` (vbns ascending, blocks
    /// reserved by [`Meta::prepare_write`], their data now written) at its block, making the paths
    /// private and dropping the blocks they replace. `mapped` counts the tree's mapped blocks.
    ///
    /// A leaf's entries are set together, and the new and replaced blocks' counts change one
    /// refcount page at a time: linking block by block cost five page-cache lookups per block,
    /// about a quarter of the CPU samples of a sequential copy-on-write once its data went
    /// straight to the disk; batched, that harness's user time halved.
    pub fn link_writes(
        &mut self,
        root: &mut u64,
        depth: u32,
        links: &[(u64, u64)],
        mapped: &mut u64,
    ) -> Result<()> {
        let mut linked = Vec::with_capacity(links.len());
        let mut replaced = Vec::new();
        let mut i = 0;
        while i < links.len() {
            let leaf_no = links[i].0 / FANOUT;
            let page = self.leaf_for_write(root, depth, links[i].0)?;
            let p = self.cache.get_mut(&*self.dev, page, PageKind::Tree)?;
            while let Some(&(vbn, block)) = links.get(i).filter(|l| l.0 / FANOUT == leaf_no) {
                let idx = vbn % FANOUT;
                // Either shared, or a concurrent write to the same block linked first: drop it.
                // A freed block stays quarantined, so a copy from it in flight still reads its
                // bytes.
                match entry(p, idx) {
                    0 => *mapped += 1,
                    old => replaced.push(old),
                }
                set_entry(p, idx, block);
                linked.push(block);
                i += 1;
            }
        }
        self.link_all(&mut linked)?;
        self.decref_data(&mut replaced)
    }

    /// Number of mapped data blocks under `node` (a page at `level`).
    pub fn count_mapped(&mut self, node: u64, level: u32) -> Result<u64> {
        let mut n = 0;
        let mut stack = vec![(node, level)];
        while let Some((p, l)) = stack.pop() {
            if l == 1 {
                self.read_ahead_leaves(p)?;
            }
            let page = self.cache.get(&*self.dev, p, PageKind::Tree)?;
            for i in 0..FANOUT {
                let e = entry(page, i);
                if e != 0 {
                    if l == 0 {
                        n += 1;
                    } else {
                        stack.push((e, l - 1));
                    }
                }
            }
        }
        Ok(n)
    }

    /// Unmaps blocks `[start, end)`, releasing whatever no one else references; whole subtrees in
    /// the range are dropped without visiting their leaves when they are private. Returns the number
    /// of blocks that were mapped.
    pub fn unmap(&mut self, root: &mut u64, depth: u32, start: u64, end: u64) -> Result<u64> {
        let (new_root, n) = self.unmap_node(*root, depth - 1, 0, start, end)?;
        *root = new_root;
        Ok(n)
    }

    fn unmap_node(
        &mut self,
        node: u64,
        level: u32,
        base: u64,
        start: u64,
        end: u64,
    ) -> Result<(u64, u64)> {
        if node == 0 {
            return Ok((0, 0));
        }
        let width = span(level + 1);
        if start <= base && base.saturating_add(width) <= end {
            let n = self.count_mapped(node, level)?;
            if level > 0 && self.rc(node)? == 1 {
                // Up to 510 leaves of data only this tree holds: freed in committed steps
                // through a dropped-tree record, not in one go under the state lock.
                self.to_drop.push((node, level));
            } else {
                self.decref(node, Some(level))?;
            }
            return Ok((0, n));
        }
        let p = self.private_node(node, level)?;
        let child_span = span(level);
        let first = (start.max(base) - base) / child_span;
        let last = ((end.min(base.saturating_add(width)) - base).div_ceil(child_span)).min(FANOUT);
        let mut n = 0;
        for idx in first..last {
            let c = entry(self.cache.get(&*self.dev, p, PageKind::Tree)?, idx);
            if c == 0 {
                continue;
            }
            let c2 = if level == 0 {
                self.decref(c, None)?;
                n += 1;
                0
            } else {
                let (c2, k) = self.unmap_node(c, level - 1, base + idx * child_span, start, end)?;
                n += k;
                c2
            };
            if c2 != c {
                set_entry(self.cache.get_mut(&*self.dev, p, PageKind::Tree)?, idx, c2);
            }
        }
        let page = self.cache.get(&*self.dev, p, PageKind::Tree)?;
        if (0..FANOUT).all(|i| entry(page, i) == 0) {
            self.decref(p, Some(level))?;
            return Ok((0, n));
        }
        Ok((p, n))
    }

    /// Adds levels on top of a tree so that it has depth `to`; the old root becomes child 0.
    pub fn grow(&mut self, root: &mut u64, from: u32, to: u32) -> Result<()> {
        for level in from..to {
            if *root != 0 {
                let mut page = new_page(PageKind::Tree, tree_level(level));
                set_entry(&mut page, 0, *root);
                *root = self.alloc_page(page)?;
            }
        }
        Ok(())
    }

    /// Virtual block ranges whose mapping differs between two trees, walking only what differs:
    /// identical subtree pointers are skipped, so the cost follows the size of the change.
    pub fn diff(
        &mut self,
        a: (u64, u32),
        b: (u64, u32),
        limit: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        self.diff_walk(a, b, 0, limit, out, false)
    }

    /// [`Meta::diff`] restricted to blocks `start..limit` (runs are clipped to that range); with
    /// `transient` (background work) the leaves it reads do not enter the cache
    /// ([`crate::cache::PageCache::get_transient`]).
    pub fn diff_walk(
        &mut self,
        a: (u64, u32),
        b: (u64, u32),
        start: u64,
        limit: u64,
        out: &mut Vec<(u64, u64)>,
        transient: bool,
    ) -> Result<()> {
        if start >= limit {
            return Ok(());
        }
        let depth = a.1.max(b.1);
        let node = |(root, d): (u64, u32)| {
            if root == 0 {
                Node::Null
            } else if d == depth {
                Node::Page(root)
            } else {
                Node::Lifted {
                    root,
                    root_level: d - 1,
                }
            }
        };
        let walk = Walk {
            range: start..limit,
            transient,
        };
        self.diff_node(node(a), node(b), depth - 1, 0, &walk, out)
    }

    fn child(&mut self, n: Node, level: u32, idx: u64, transient: bool) -> Result<Node> {
        let e = |m: &mut Meta, p: u64| -> Result<u64> {
            Ok(match transient && level == 0 {
                true => entry(&*m.cache.get_transient(&*m.dev, p, PageKind::Tree)?, idx),
                false => entry(m.cache.get(&*m.dev, p, PageKind::Tree)?, idx),
            })
        };
        Ok(match n {
            Node::Null => Node::Null,
            Node::Page(p) => match e(self, p)? {
                0 => Node::Null,
                e => Node::Page(e),
            },
            Node::Lifted { root, root_level } => {
                if idx != 0 {
                    Node::Null
                } else if level - 1 == root_level {
                    Node::Page(root)
                } else {
                    n
                }
            }
        })
    }

    fn diff_node(
        &mut self,
        a: Node,
        b: Node,
        level: u32,
        base: u64,
        walk: &Walk,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let range = &walk.range;
        if a == b || base >= range.end {
            return Ok(());
        }
        let child_span = span(level);
        // Children wholly before the range are skipped without being read.
        let first = range.start.saturating_sub(base) / child_span;
        for idx in first.min(FANOUT)..FANOUT {
            let cbase = base + idx * child_span;
            if cbase >= range.end {
                break;
            }
            let ca = self.child(a, level, idx, walk.transient)?;
            let cb = self.child(b, level, idx, walk.transient)?;
            if ca == cb {
                continue;
            }
            if level == 0 {
                match out.last_mut() {
                    Some((s, l)) if *s + *l == cbase => *l += 1,
                    _ => out.push((cbase, 1)),
                }
            } else {
                self.diff_node(ca, cb, level - 1, cbase, walk, out)?;
            }
        }
        Ok(())
    }

    /// Blocks (data, metadata) that dropping one reference to `root` would free: the exact space
    /// unique to a tree. Visits only what it counts.
    pub fn unique(&mut self, root: u64, depth: u32) -> Result<(u64, u64)> {
        self.freed_by(&[(root, depth)])
    }

    /// Blocks (data, metadata) that dropping one reference to each of `roots` (root, depth)
    /// together would free: the exact space deleting several checkpoints at once gives back,
    /// which is more than the sum of their [`Meta::unique`] figures when they share blocks with
    /// each other only. Simulates the drop with pending decrements; visits only the blocks it
    /// frees and the ones just below them.
    pub fn freed_by(&mut self, roots: &[(u64, u32)]) -> Result<(u64, u64)> {
        let (mut data, mut meta) = (0, 0);
        let mut dropped: std::collections::HashMap<u64, u64> = Default::default();
        let mut stack: Vec<(u64, Option<u32>)> = roots
            .iter()
            .filter(|(r, _)| *r != 0)
            .map(|&(r, depth)| (r, Some(depth - 1)))
            .collect();
        while let Some((b, level)) = stack.pop() {
            let d = dropped.entry(b).or_insert(0);
            *d += 1;
            if u64::from(self.rc(b)?) != *d {
                continue;
            }
            match level {
                None => data += 1,
                Some(l) => {
                    meta += 1;
                    let page = self.cache.get(&*self.dev, b, PageKind::Tree)?;
                    debug_assert_eq!(page_level(page) as u32, l);
                    for i in 0..FANOUT {
                        let e = entry(page, i);
                        if e != 0 {
                            stack.push((e, child_level(l)));
                        }
                    }
                }
            }
        }
        Ok((data, meta))
    }
}

/// A tree level as its page header stores it; trees are at most a few levels deep.
fn tree_level(level: u32) -> u8 {
    u8::try_from(level).expect("block map trees are far shallower than 256 levels")
}

/// What a diff walks: a range of blocks, and whether its leaves enter the cache.
struct Walk {
    range: std::ops::Range<u64>,
    transient: bool,
}
