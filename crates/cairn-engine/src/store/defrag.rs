//! Defragmenting a volume's head.
//!
//! Redirect-on-write puts every block overwritten after a checkpoint somewhere new, so after many
//! checkpoints with random overwrites a sequential read of the head is one host read per 4 KiB
//! block. No read path hides that: on this project's machine even `memcpy` from a mapping of
//! scattered cached blocks reaches only 0.65 of one sequential read (docs/design.md,
//! "Fragmentation"). What restores sequential speed is contiguity, so `defrag` moves the head's
//! fragmented ranges into fresh contiguous blocks at the end of the data file.
//!
//! Blocks the head shares with checkpoints or clones are copied, not moved: the others keep their
//! blocks, so that part costs space (ZFS and qcow2 offer no such trade; `btrfs filesystem
//! defragment` makes the same one, unsharing extents). A dry run reports the cost first. The
//! head's contents never change, so a crash at any point leaves the head as it was at the last
//! commit, which is readable and identical; a moved block's old copy stays quarantined until the
//! move is durable. Diff compares block identity, not bytes, so a diff across a defrag reports
//! the moved ranges as changed.

use super::*;
use crate::format::Layout;

/// Blocks examined and moved at a time: one leaf of the block map. The volume's I/O waits for
/// one chunk's copy (2 MiB), never for the whole defrag.
const CHUNK_BLOCKS: u64 = FANOUT;

/// The default threshold of [`Store::defrag`]: a 2 MiB range in fewer extents than this is left
/// alone. Each extra extent costs a sequential read about 1 µs of the 250 µs a contiguous 2 MiB
/// takes from the page cache here, so below 16 the read is within about 7% of contiguous and
/// not worth a copy that may double the range's space.
pub const DEFRAG_MIN_EXTENTS: u64 = 16;

/// What [`Store::defrag`] found and did.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DefragReport {
    /// The volume.
    pub volume: String,
    /// Nothing was changed; the figures say what a real run would do.
    pub dry_run: bool,
    /// Bytes mapped in the head.
    pub mapped_bytes: u64,
    /// Runs of the head's data that are contiguous on the host, before.
    pub extents_before: u64,
    /// The same after (on a dry run: about as it would be).
    pub extents_after: u64,
    /// Bytes moved (or that would be).
    pub moved_bytes: u64,
    /// Of those, bytes shared with checkpoints or clones: copied, so stored twice from now on.
    pub shared_bytes: u64,
    /// Change of the store's allocated bytes (data and metadata); 0 on a dry run.
    pub space_delta: i64,
}

/// Counts extents over a stream of physical blocks in logical order (0: unmapped): runs that
/// are contiguous on the host.
struct ExtentCounter {
    layout: Layout,
    prev: u64,
    extents: u64,
}

/// Whether block `next` continues a run ending at `prev` on the host. The header of refcount
/// pages that every cluster begins with does not break a run: no placement can avoid it.
fn follows(layout: Layout, prev: u64, next: u64) -> bool {
    prev != 0 && next == layout.next_data_block(prev + 1)
}

impl ExtentCounter {
    fn new(layout: Layout) -> Self {
        ExtentCounter {
            layout,
            prev: 0,
            extents: 0,
        }
    }

    /// A hole does not end an extent: it splits a read anyway, wherever the data lies.
    fn push(&mut self, phys: u64) {
        if phys == 0 {
            return;
        }
        if !follows(self.layout, self.prev, phys) {
            self.extents += 1;
        }
        self.prev = phys;
    }
}

impl Store {
    /// Moves the fragmented ranges of a volume's head into contiguous blocks, so that sequential
    /// reads and writes of it run at the speed of a volume without checkpoints again. A range of
    /// one leaf (2 MiB) is moved when its data lies in at least `min_extents` separate extents
    /// on the host (2: any break; see [`DEFRAG_MIN_EXTENTS`]). `progress` hears bytes examined.
    pub fn defrag(
        &self,
        volume: &str,
        min_extents: u64,
        dry_run: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<DefragReport> {
        let (vid, vg) = self.volume_gate(volume)?;
        let head = Target::head(volume);
        let allocated_before = self.state().meta.sb.allocated;
        let mut rep = DefragReport {
            volume: volume.to_string(),
            dry_run,
            ..DefragReport::default()
        };
        let layout = self.state().meta.sb.layout;
        let (mut before, mut after) = (ExtentCounter::new(layout), ExtentCounter::new(layout));
        let mut vbn = 0u64;
        loop {
            {
                let _g = self.shared();
                // Writes and reads of this volume wait for one chunk; other volumes go on.
                let _v = write_lock(&vg);
                self.core.write_behind.wait_volume(vid);
                let mut st = self.state();
                let (root, depth, size) = st.resolve(&head)?;
                let nblocks = size.div_ceil(BS);
                if vbn >= nblocks {
                    break;
                }
                let count = CHUNK_BLOCKS.min(nblocks - vbn);
                let mut blocks = Vec::with_capacity(count as usize);
                st.meta
                    .lookup_shared(root, depth, vbn, count, &mut blocks)?;
                let mut chunk = ExtentCounter::new(layout);
                for &(x, _) in &blocks {
                    chunk.push(x);
                }
                let fragmented = chunk.extents >= min_extents.max(2);
                for &(x, shared) in &blocks {
                    before.push(x);
                    if x != 0 {
                        rep.mapped_bytes += BS;
                        if fragmented {
                            rep.moved_bytes += BS;
                            rep.shared_bytes += if shared { BS } else { 0 };
                        }
                    }
                }
                if !fragmented || dry_run {
                    // A dry run assumes moved chunks land contiguously, as a real run's do.
                    let mut next = after.prev;
                    for &(x, _) in &blocks {
                        after.push(if fragmented && x != 0 {
                            next = layout.next_data_block(next + 1);
                            next
                        } else {
                            x
                        });
                    }
                } else {
                    for y in self.move_blocks(st, vid, vbn, &blocks)? {
                        after.push(y);
                    }
                }
                vbn += count;
            }
            progress(vbn * BS);
            if !dry_run {
                self.maybe_commit()?;
                self.grow_ahead();
            }
        }
        rep.extents_before = before.extents;
        rep.extents_after = after.extents;
        if !dry_run {
            self.flush()?;
            let allocated_after = self.state().meta.sb.allocated;
            rep.space_delta = (allocated_after as i64 - allocated_before as i64) * BS as i64;
        }
        Ok(rep)
    }

    /// Copies the mapped blocks of a chunk (from `vbn`) into one fresh run and points the head at
    /// the copies; returns the new block of each (0 for holes). The state lock is let go for the
    /// copy; the caller's hold of the volume gate keeps the head's mapping as it was.
    fn move_blocks(
        &self,
        mut st: MutexGuard<'_, State>,
        vid: u64,
        vbn: u64,
        blocks: &[(u64, bool)],
    ) -> Result<Vec<u64>> {
        let old: Vec<u64> = blocks.iter().map(|b| b.0).filter(|&x| x != 0).collect();
        let new = st.meta.reserve_run(old.len(), false)?;
        drop(st);
        let mut buf = vec![0u8; old.len() * BLOCK_SIZE];
        let copy = self
            .read_blocks(&old, &mut buf)
            .and_then(|()| self.write_blocks(&new, &buf));
        let mut st = self.state();
        if let Err(e) = copy {
            for &b in &new {
                st.meta.unreserve(b);
            }
            return Err(e);
        }
        let mut links = Vec::with_capacity(new.len());
        let mut placed = Vec::with_capacity(blocks.len());
        let mut next = new.iter();
        for (i, &(x, _)) in blocks.iter().enumerate() {
            // `new` holds one block per mapped block, in order.
            let y = if x == 0 { None } else { next.next() };
            match y {
                Some(&y) => {
                    links.push((vbn + i as u64, y));
                    placed.push(y);
                }
                None => placed.push(0),
            }
        }
        let r = st.link_blocks(vid, &links);
        st.poison_on(r)?;
        Ok(placed)
    }
}
