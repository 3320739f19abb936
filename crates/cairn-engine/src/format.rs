// On-disk and wire code: a length or index that does not fit its field is a corruption bug.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]
//! The on-disk format: block geometry, page headers with checksums, the superblock and catalog records.
//! docs/design.md explains the layout; this module is its single source of truth in code.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Every block in the data file, data or metadata, is this many bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Bytes at the start of every metadata page: magic, kind, level, checksum.
pub const HEADER_SIZE: usize = 16;
/// Child pointers per mapping-tree page (8 bytes each after the header).
pub const FANOUT: u64 = ((BLOCK_SIZE - HEADER_SIZE) / 8) as u64;
/// Reference counts per refcount page (4 bytes each after the header).
pub const REFS_PER_PAGE: u64 = ((BLOCK_SIZE - HEADER_SIZE) / 4) as u64;
/// Blocks at the start of every cluster that hold its refcount pages (and, in cluster 0, the
/// superblock), never data: 2 MiB, so that the data area after it starts 2 MiB-aligned.
pub const CLUSTER_HEADER_BLOCKS: u64 = 512;
/// Data blocks of a cluster: a multiple of 512 (so every cluster keeps 2 MiB alignment), and as
/// many as the header's refcount pages can count (511 pages of 1,020 counts).
pub const CLUSTER_DATA_BLOCKS: u64 = 1018 * 512;
/// A cluster: its header, then its data area. The data file is a sequence of clusters.
pub const CLUSTER_BLOCKS: u64 = CLUSTER_HEADER_BLOCKS + CLUSTER_DATA_BLOCKS;
/// Block holding the superblock; block 0 is cluster 0's first refcount page, so address 0 can
/// mean "none".
pub const SUPERBLOCK: u64 = 1;
/// The first block that can hold data or tree pages: where an empty store's high water starts.
pub const FIRST_DATA_BLOCK: u64 = CLUSTER_HEADER_BLOCKS;
/// Format version written by this code. Version 1 put a refcount page every 1,021 blocks, so no
/// data run could sit at an aligned file offset (docs/design.md, "Blocks and pages").
pub const FORMAT_VERSION: u32 = 2;

const _: () = assert!(CLUSTER_DATA_BLOCKS.div_ceil(REFS_PER_PAGE) < CLUSTER_HEADER_BLOCKS);
const _: () = assert!(CLUSTER_BLOCKS.is_multiple_of(512));

const MAGIC: u32 = 0x4341_4952; // "CAIR"

/// One block in memory.
pub type Page = [u8; BLOCK_SIZE];

/// What a metadata page holds; stored in its header so a misdirected read is caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// The superblock.
    Super = 1,
    /// A node of a mapping tree (volume, checkpoint or catalog).
    Tree = 2,
    /// Reference counts of one group.
    Refcount = 3,
    /// One catalog record (a volume or a checkpoint), JSON encoded.
    Record = 4,
    /// Journal header.
    JournalHeader = 5,
    /// Journal transaction descriptor.
    JournalDesc = 6,
}

impl PageKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Super,
            2 => Self::Tree,
            3 => Self::Refcount,
            4 => Self::Record,
            5 => Self::JournalHeader,
            6 => Self::JournalDesc,
            _ => return None,
        })
    }
}

/// A zeroed page with a header of the given kind and level.
pub fn new_page(kind: PageKind, level: u8) -> Box<Page> {
    let mut p = Box::new([0u8; BLOCK_SIZE]);
    p[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    p[4] = kind as u8;
    p[5] = level;
    p
}

fn checksum(p: &Page) -> u32 {
    let c = crc32c::crc32c(&p[0..8]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &p[12..])
}

/// Stamps the checksum into the header; done just before a page is written.
pub fn seal(p: &mut Page) {
    let c = checksum(p);
    p[8..12].copy_from_slice(&c.to_le_bytes());
}

/// The level stored in a page header (0 = leaf).
pub fn level(p: &Page) -> u8 {
    p[5]
}

/// Checks magic, checksum and kind of a page read from `block`.
pub fn verify(p: &Page, block: u64, kind: PageKind) -> Result<()> {
    if get_u32(p, 0) != MAGIC {
        return Err(Error::corrupt(
            block,
            format!("not a Cairn metadata page (expected {kind:?})"),
        ));
    }
    if get_u32(p, 8) != checksum(p) {
        return Err(Error::corrupt(
            block,
            format!("checksum mismatch in {kind:?} page"),
        ));
    }
    match PageKind::from_u8(p[4]) {
        Some(k) if k == kind => Ok(()),
        other => Err(Error::corrupt(
            block,
            format!("expected a {kind:?} page, found {other:?}"),
        )),
    }
}

/// Little-endian u64 at a byte offset.
pub fn get_u64(p: &Page, off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[off..off + 8]);
    u64::from_le_bytes(b)
}

/// Stores a little-endian u64 at a byte offset.
pub fn put_u64(p: &mut Page, off: usize, v: u64) {
    p[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Little-endian u32 at a byte offset.
pub fn get_u32(p: &Page, off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&p[off..off + 4]);
    u32::from_le_bytes(b)
}

/// Stores a little-endian u32 at a byte offset.
pub fn put_u32(p: &mut Page, off: usize, v: u32) {
    p[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// An index within a page as a byte position. `usize` is 64 bits (lib.rs refuses other
/// targets), so this never truncates; it is the one place the read path converts.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn slot(idx: u64) -> usize {
    idx as usize
}

/// [`BLOCK_SIZE`] as the superblock records it.
const BLOCK_SIZE_U32: u32 = 4096;
const _: () = assert!(BLOCK_SIZE_U32 as usize == BLOCK_SIZE);

/// Child pointer `idx` of a tree page.
pub fn entry(p: &Page, idx: u64) -> u64 {
    get_u64(p, HEADER_SIZE + slot(idx) * 8)
}

/// Sets child pointer `idx` of a tree page.
pub fn set_entry(p: &mut Page, idx: u64, v: u64) {
    put_u64(p, HEADER_SIZE + slot(idx) * 8, v)
}

/// Reference count `idx` of a refcount page.
pub fn refcount(p: &Page, idx: u64) -> u32 {
    get_u32(p, HEADER_SIZE + slot(idx) * 4)
}

/// Sets reference count `idx` of a refcount page.
pub fn set_refcount(p: &mut Page, idx: u64, v: u32) {
    put_u32(p, HEADER_SIZE + slot(idx) * 4, v)
}

/// How a data file places its refcount pages, which fixes where every count lives. New stores
/// use [`Layout::Clusters`] (format 2); stores written in format 1 keep [`Layout::Groups`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Format 1: a refcount page in front of every 1,020 blocks, block 1 (the superblock)
    /// counted like any other.
    Groups,
    /// Format 2: clusters of a 2 MiB header of refcount pages and a 2 MiB-aligned data area.
    Clusters,
}

/// Format 1's group: one refcount page followed by the blocks it counts.
const GROUP_BLOCKS: u64 = REFS_PER_PAGE + 1;

impl Layout {
    /// The layout of a format version, if this build reads it.
    pub fn of_version(version: u32) -> Option<Layout> {
        match version {
            1 => Some(Layout::Groups),
            2 => Some(Layout::Clusters),
            _ => None,
        }
    }

    /// The format version that has this layout.
    pub fn version(self) -> u32 {
        match self {
            Layout::Groups => 1,
            Layout::Clusters => 2,
        }
    }

    /// Whether long runs are placed at aligned blocks ([`crate::meta::Meta::reserve_run`]):
    /// only clusters leave stretches long enough for that to cost nothing.
    pub fn aligns_runs(self) -> bool {
        self == Layout::Clusters
    }

    /// Whether the superblock has a reference count (format 1 counts it as allocated).
    pub fn counts_superblock(self) -> bool {
        self == Layout::Groups
    }

    /// The first block an empty store allocates.
    pub fn first_data_block(self) -> u64 {
        match self {
            Layout::Groups => SUPERBLOCK + 1,
            Layout::Clusters => FIRST_DATA_BLOCK,
        }
    }

    /// Whether block `b` may hold data, tree pages or catalog records (everything that has a
    /// reference count and can be pointed to).
    pub fn is_data_block(self, b: u64) -> bool {
        match self {
            Layout::Groups => b > SUPERBLOCK && !b.is_multiple_of(GROUP_BLOCKS),
            Layout::Clusters => b % CLUSTER_BLOCKS >= CLUSTER_HEADER_BLOCKS,
        }
    }

    /// The first data block at or after `b`.
    pub fn next_data_block(self, b: u64) -> u64 {
        if self.is_data_block(b) {
            b
        } else {
            match self {
                Layout::Groups => (b + 1).max(SUPERBLOCK + 1),
                Layout::Clusters => b - b % CLUSTER_BLOCKS + CLUSTER_HEADER_BLOCKS,
            }
        }
    }

    /// The refcount page counting block `b` (a data block, or format 1's superblock), and
    /// `b`'s index in it.
    pub fn refcount_slot(self, b: u64) -> (u64, u64) {
        match self {
            Layout::Groups => {
                let page = b - b % GROUP_BLOCKS;
                (page, b - page - 1)
            }
            Layout::Clusters => {
                debug_assert!(self.is_data_block(b));
                let cluster = b - b % CLUSTER_BLOCKS;
                let d = b - cluster - CLUSTER_HEADER_BLOCKS;
                // Header slot 1 is skipped: cluster 0 keeps its superblock there.
                let j = d / REFS_PER_PAGE;
                (cluster + if j == 0 { 0 } else { j + 1 }, d % REFS_PER_PAGE)
            }
        }
    }

    /// The blocks counted by the same refcount page as block `b`: `first..end`, `first`
    /// taking slot 0.
    pub fn refcount_range(self, b: u64) -> (u64, u64) {
        let (_, idx) = self.refcount_slot(b);
        let first = b - idx;
        let end = match self {
            Layout::Groups => first + REFS_PER_PAGE,
            Layout::Clusters => {
                (first + REFS_PER_PAGE).min(b - b % CLUSTER_BLOCKS + CLUSTER_BLOCKS)
            }
        };
        (first, end)
    }

    /// Every refcount page that counts a block below `end`, in block order of what they count:
    /// the page, and the blocks `first..last` it counts.
    pub fn refcount_pages_below(self, end: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let from = if self.counts_superblock() {
            SUPERBLOCK
        } else {
            self.first_data_block()
        };
        self.refcount_pages_in(from, end)
    }

    /// [`Layout::refcount_pages_below`], starting with the page that counts the first data
    /// block at or after `from` (or `from` itself, format 1's superblock).
    pub fn refcount_pages_in(self, from: u64, end: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        let start = if self.counts_superblock() && from == SUPERBLOCK {
            from
        } else {
            self.next_data_block(from)
        };
        // `b` is always a counted block: the first of its page's range.
        let mut b = self.refcount_range(start).0;
        std::iter::from_fn(move || {
            if b >= end {
                return None;
            }
            let (first, last) = self.refcount_range(b);
            b = self.next_data_block(last);
            Some((self.refcount_slot(first).0, first, last))
        })
    }
}

/// Leaves needed to address `blocks` blocks: the tree depth, at least 1.
pub fn depth_for(blocks: u64) -> u32 {
    let mut d = 1;
    let mut cap = FANOUT;
    while cap < blocks {
        d += 1;
        cap = cap.saturating_mul(FANOUT);
    }
    d
}

/// Blocks covered by one entry of a page at `level` (FANOUT^level).
pub fn span(level: u32) -> u64 {
    FANOUT.saturating_pow(level)
}

/// Store-wide state, kept in block 1 and committed with every transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Root of the catalog tree (record id -> record block), 0 if empty.
    pub catalog_root: u64,
    /// Depth of the catalog tree.
    pub catalog_depth: u32,
    /// Next record id to hand out.
    pub next_id: u64,
    /// Blocks at or past this number have never been allocated.
    pub high_water: u64,
    /// Allocation scans for free blocks from here.
    pub alloc_cursor: u64,
    /// Bumped on every commit.
    pub generation: u64,
    /// Blocks with a non-zero reference count (format 1 counts the superblock too).
    pub allocated: u64,
    /// Where refcount pages live: the store's format version.
    pub layout: Layout,
}

impl Superblock {
    /// Encodes into a sealed page.
    pub fn encode(&self) -> Box<Page> {
        let mut p = new_page(PageKind::Super, 0);
        put_u32(&mut p, 16, self.layout.version());
        put_u32(&mut p, 20, BLOCK_SIZE_U32);
        put_u64(&mut p, 24, self.catalog_root);
        put_u32(&mut p, 32, self.catalog_depth);
        put_u64(&mut p, 40, self.next_id);
        put_u64(&mut p, 48, self.high_water);
        put_u64(&mut p, 56, self.alloc_cursor);
        put_u64(&mut p, 64, self.generation);
        put_u64(&mut p, 72, self.allocated);
        seal(&mut p);
        p
    }

    /// Decodes and validates a superblock page.
    pub fn decode(p: &Page, path: &str) -> Result<Self> {
        verify(p, SUPERBLOCK, PageKind::Super)?;
        let version = get_u32(p, 16);
        let bs = get_u32(p, 20);
        let layout = Layout::of_version(version);
        let Some(layout) = layout.filter(|_| bs as usize == BLOCK_SIZE) else {
            return Err(Error::Format {
                path: path.into(),
                what: format!("format version {version} block size {bs}, this build reads versions 1 and {FORMAT_VERSION} with {BLOCK_SIZE}-byte blocks"),
            });
        };
        Ok(Superblock {
            catalog_root: get_u64(p, 24),
            catalog_depth: get_u32(p, 32),
            next_id: get_u64(p, 40),
            high_water: get_u64(p, 48),
            alloc_cursor: get_u64(p, 56),
            generation: get_u64(p, 64),
            allocated: get_u64(p, 72),
            layout,
        })
    }
}

/// A volume as stored in the catalog: its head is the writable tree.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Catalog id.
    pub id: u64,
    /// User-visible name.
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Root of the head's mapping tree (0 = nothing mapped).
    pub root: u64,
    /// Blocks mapped in the head.
    pub mapped: u64,
    /// Checkpoint the head was last taken or applied from.
    pub parent: Option<u64>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// `VOLUME@CHECKPOINT` this volume was cloned from, if any: renamed with it, and its last
    /// name once it is deleted.
    pub origin: Option<String>,
    /// Catalog id of the checkpoint this volume was cloned from: what a clone's head is compared
    /// with before it has checkpoints of its own. Absent in older records, and left dangling when that checkpoint is deleted (the clone owns its references;
    /// nothing else follows this id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_checkpoint: Option<u64>,
}

/// A checkpoint as stored in the catalog: an immutable tree root plus its metadata.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointRecord {
    /// Catalog id (also orders checkpoints by creation).
    pub id: u64,
    /// Owning volume id.
    pub volume: u64,
    /// Name, unique within its volume.
    pub name: String,
    /// Volume size when taken.
    pub size: u64,
    /// Root of its mapping tree.
    pub root: u64,
    /// Blocks mapped.
    pub mapped: u64,
    /// Parent checkpoint in the tree.
    pub parent: Option<u64>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Optional description.
    pub description: Option<String>,
    /// Taken by Cairn itself (the state an apply replaced), not asked for by name. Absent in
    /// older records, which were all taken by name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub automatic: bool,
    /// Kept whatever a retention policy says (`checkpoint pin`). Absent in older records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// A mapping tree that no volume or checkpoint uses any more and that is being freed a step
/// at a time: the record holds one reference to `root`, and the pages under it that only it
/// references lose their entries as those are released (so every step leaves counts exact).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DroppedTreeRecord {
    /// Catalog id.
    pub id: u64,
    /// Root page of what is left of the tree.
    pub root: u64,
    /// Level of the root page (0 = leaf).
    pub level: u32,
}

/// Any catalog record.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Record {
    /// A volume.
    Volume(VolumeRecord),
    /// A checkpoint.
    Checkpoint(CheckpointRecord),
    /// A tree being freed.
    Dropped(DroppedTreeRecord),
}

/// Largest encoded record that fits a block.
pub const MAX_RECORD: usize = BLOCK_SIZE - HEADER_SIZE - 4;

impl Record {
    /// Encodes into a sealed record page; fails if too large.
    pub fn encode(&self) -> Result<Box<Page>> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::Invalid(format!("cannot encode catalog record: {e}")))?;
        if json.len() > MAX_RECORD {
            return Err(Error::Invalid(format!(
                "catalog record is {} bytes, at most {MAX_RECORD} fit; shorten the description",
                json.len()
            )));
        }
        let mut p = new_page(PageKind::Record, 0);
        // At most MAX_RECORD bytes (checked above).
        put_u32(
            &mut p,
            HEADER_SIZE,
            json.len().try_into().unwrap_or(u32::MAX),
        );
        p[HEADER_SIZE + 4..HEADER_SIZE + 4 + json.len()].copy_from_slice(&json);
        seal(&mut p);
        Ok(p)
    }

    /// Decodes a record page read from `block`.
    pub fn decode(p: &Page, block: u64) -> Result<Self> {
        verify(p, block, PageKind::Record)?;
        let len = get_u32(p, HEADER_SIZE) as usize;
        if len > MAX_RECORD {
            return Err(Error::corrupt(block, "record length out of range"));
        }
        serde_json::from_slice(&p[HEADER_SIZE + 4..HEADER_SIZE + 4 + len])
            .map_err(|e| Error::corrupt(block, format!("undecodable record: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert_eq!(FANOUT, 510);
        assert_eq!(REFS_PER_PAGE, 1020);
        assert_eq!(depth_for(1), 1);
        assert_eq!(depth_for(510), 1);
        assert_eq!(depth_for(511), 2);
        assert_eq!(CLUSTER_BLOCKS, 521_728);
        let l = Layout::Clusters;
        assert_eq!(l.refcount_slot(512), (0, 0));
        assert_eq!(l.refcount_slot(512 + 1020), (2, 0));
        assert_eq!(l.refcount_slot(512 + 1020 * 2 + 5), (3, 5));
        let last = CLUSTER_BLOCKS - 1;
        assert_eq!(
            l.refcount_slot(last),
            (511, CLUSTER_DATA_BLOCKS - 1 - 510 * 1020)
        );
        assert_eq!(l.refcount_slot(CLUSTER_BLOCKS + 512), (CLUSTER_BLOCKS, 0));
        assert!(!l.is_data_block(0) && !l.is_data_block(SUPERBLOCK) && !l.is_data_block(511));
        assert!(l.is_data_block(512) && l.is_data_block(last));
        assert!(!l.is_data_block(CLUSTER_BLOCKS + 300));
        assert_eq!(l.next_data_block(CLUSTER_BLOCKS + 3), CLUSTER_BLOCKS + 512);
        assert_eq!(l.next_data_block(700), 700);
        assert_eq!(l.refcount_range(700), (512, 1532));
        assert_eq!(l.refcount_range(last), (512 + 510 * 1020, CLUSTER_BLOCKS));
        assert_eq!(l.first_data_block(), 512);

        // Format 1, as builds before format 2 wrote it.
        let g = Layout::Groups;
        assert_eq!(g.refcount_slot(SUPERBLOCK), (0, 0));
        assert_eq!(g.refcount_slot(GROUP_BLOCKS + 5), (GROUP_BLOCKS, 4));
        assert!(!g.is_data_block(GROUP_BLOCKS * 3) && !g.is_data_block(SUPERBLOCK));
        assert_eq!(g.next_data_block(GROUP_BLOCKS * 3), GROUP_BLOCKS * 3 + 1);
        assert_eq!(g.next_data_block(0), 2);
        assert_eq!(g.first_data_block(), 2);
        for v in [1, 2] {
            assert_eq!(Layout::of_version(v).map(Layout::version), Some(v));
        }
        assert_eq!(Layout::of_version(3), None);
    }

    /// Every block with a count is counted exactly once, by one page that is never a data block;
    /// in format 2 by a page of its own cluster, and data areas start 2 MiB-aligned (why the
    /// format has clusters).
    #[test]
    fn refcount_pages_cover_every_counted_block_once() {
        for l in [Layout::Clusters, Layout::Groups] {
            let end = 2 * CLUSTER_BLOCKS + 5000;
            let mut next = if l.counts_superblock() {
                SUPERBLOCK
            } else {
                l.first_data_block()
            };
            let mut pages = std::collections::HashSet::new();
            for (page, first, last) in l.refcount_pages_below(end) {
                assert!(!l.is_data_block(page) && page != SUPERBLOCK, "{l:?}");
                assert!(pages.insert(page), "{l:?}: page {page} counts two ranges");
                assert_eq!(
                    first,
                    if first == SUPERBLOCK {
                        first
                    } else {
                        l.next_data_block(next)
                    }
                );
                assert!(last - first <= REFS_PER_PAGE);
                for b in [first, last - 1] {
                    assert_eq!(l.refcount_slot(b).0, page);
                }
                next = last;
            }
            assert!(next >= end, "{l:?}");
            // Starting in the middle finds the page of the range it starts in.
            let (p, first, _) = l.refcount_pages_in(700, end).next().expect("a page");
            assert_eq!(
                (p, first),
                (l.refcount_slot(700).0, l.refcount_range(700).0)
            );
        }
        for c in 0..3 {
            assert!((c * CLUSTER_BLOCKS + FIRST_DATA_BLOCK).is_multiple_of(512));
        }
    }

    #[test]
    fn checksum_catches_flips() {
        let mut p = new_page(PageKind::Tree, 2);
        set_entry(&mut p, 7, 1234);
        seal(&mut p);
        verify(&p, 9, PageKind::Tree).expect("sealed page verifies");
        assert!(verify(&p, 9, PageKind::Record).is_err());
        p[100] ^= 1;
        assert!(verify(&p, 9, PageKind::Tree).is_err());
    }

    #[test]
    fn superblock_roundtrip() {
        for layout in [Layout::Groups, Layout::Clusters] {
            let sb = Superblock {
                catalog_root: 5,
                catalog_depth: 1,
                next_id: 9,
                high_water: 77,
                alloc_cursor: 3,
                generation: 11,
                allocated: 4,
                layout,
            };
            assert_eq!(Superblock::decode(&sb.encode(), "x").expect("decodes"), sb);
        }
    }

    /// A store from a later build is refused with both versions named, not misread.
    #[test]
    fn an_unknown_format_version_is_refused_clearly() {
        let mut p = new_page(PageKind::Super, 0);
        put_u32(&mut p, 16, 3);
        put_u32(&mut p, 20, BLOCK_SIZE_U32);
        seal(&mut p);
        let e = Superblock::decode(&p, "/s")
            .expect_err("version 3")
            .to_string();
        assert!(
            e.contains("format version 3") && e.contains("versions 1 and 2"),
            "{e}"
        );
    }
}
