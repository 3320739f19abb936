//! Which chunk holds each block of a backed-up volume. A [`VolumeMap`] is a sorted set of
//! non-overlapping pieces, each a run of 4 KiB blocks that reads from a run of a chunk's blocks
//! (or reads as zeros). A full backup's map lists every piece that is not zero; an incremental's
//! lists only what changed, zeros included, and is laid over its base's: the pieces it covers
//! are cut back to what stays visible.
//!
//! On the wire a map is a list of pieces with start deltas as varints: about 19 bytes a piece
//! before compression, so an incremental that changed one scattered block stores 19 bytes of
//! map for it. In memory it is a sorted vector (40 bytes a piece), which a full backup of a large
//! volume fills in order, one piece a chunk; laying a delta over a map merges the two in one pass.

use crate::crypto::ChunkId;

/// A run of blocks and where its data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First block (4 KiB units from the start of the volume).
    pub start: u64,
    /// Blocks.
    pub blocks: u32,
    /// The chunk and how many of its blocks to skip, or `None`: zeros.
    pub data: Option<(ChunkId, u32)>,
}

impl Piece {
    /// The block after its last.
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.blocks)
    }

    /// The part of this piece from block `from` (inside it) to its end.
    fn tail_from(&self, from: u64) -> Piece {
        let cut = u32::try_from(from - self.start).expect("inside the piece");
        Piece {
            start: from,
            blocks: self.blocks - cut,
            data: self.data.map(|(id, skip)| (id, skip + cut)),
        }
    }

    /// The part of this piece in blocks `from..to` (which overlap it).
    fn clip(&self, from: u64, to: u64) -> Piece {
        let mut q = match self.start < from {
            true => self.tail_from(from),
            false => *self,
        };
        if q.end() > to {
            q.blocks = u32::try_from(to - q.start).expect("clipped inside the piece");
        }
        q
    }
}

/// A volume's blocks as pieces, sorted and non-overlapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeMap {
    /// Sorted by start, non-overlapping.
    pieces: Vec<Piece>,
}

impl VolumeMap {
    /// An empty map (everything zero).
    pub fn new() -> VolumeMap {
        VolumeMap::default()
    }

    /// An empty map with room for `n` pieces.
    pub fn with_capacity(n: usize) -> VolumeMap {
        VolumeMap {
            pieces: Vec::with_capacity(n),
        }
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether there are no pieces.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Pieces in block order.
    pub fn pieces(&self) -> impl Iterator<Item = &Piece> + '_ {
        self.pieces.iter()
    }

    /// Pieces overlapping blocks `from..to`, clipped to it.
    pub fn range(&self, from: u64, to: u64) -> Vec<Piece> {
        let first = self.pieces.partition_point(|p| p.end() <= from);
        self.pieces[first..]
            .iter()
            .take_while(|p| p.start < to)
            .map(|p| p.clip(from, to))
            .collect()
    }

    /// Lays `p` over the map: whatever it covers is cut away. Zero pieces are kept only if
    /// `keep_zeros` (a delta must say that a range became zero; a full map need not).
    pub fn overlay(&mut self, p: Piece, keep_zeros: bool) {
        self.overlay_sorted(std::slice::from_ref(&p), keep_zeros);
    }

    /// Lays every piece of `top` over the map (as [`VolumeMap::overlay`] one by one would), in
    /// one pass over both.
    pub fn overlay_map(&mut self, top: &VolumeMap, keep_zeros: bool) {
        self.overlay_sorted(&top.pieces, keep_zeros);
    }

    /// The merge behind the overlays: `top` is sorted and non-overlapping.
    fn overlay_sorted(&mut self, top: &[Piece], keep_zeros: bool) {
        let base = std::mem::take(&mut self.pieces);
        let mut out = Vec::with_capacity(base.len() + top.len());
        let kept = |p: &Piece| p.data.is_some() || keep_zeros;
        // `top[..emitted]` are in `out` already; `top[first..]` may still cover a base piece
        // (top pieces end in order too).
        let (mut emitted, mut first) = (0, 0);
        for b in &base {
            while emitted < top.len() && top[emitted].start < b.start {
                if kept(&top[emitted]) {
                    out.push(top[emitted]);
                }
                emitted += 1;
            }
            while first < top.len() && top[first].end() <= b.start {
                first += 1;
            }
            // What of `b` no top piece covers, in order with the top pieces inside it.
            let mut at = b.start;
            for (i, p) in top.iter().enumerate().skip(first) {
                if p.start >= b.end() {
                    break;
                }
                if p.start > at {
                    out.push(b.clip(at, p.start));
                }
                if i >= emitted {
                    if kept(p) {
                        out.push(*p);
                    }
                    emitted = i + 1;
                }
                at = at.max(p.end());
            }
            if at < b.end() {
                out.push(b.clip(at, b.end()));
            }
        }
        out.extend(top[emitted..].iter().filter(|p| kept(p)));
        self.pieces = out;
    }

    /// Adds a piece that lies after every piece already there (how maps are built and decoded).
    pub fn push(&mut self, p: Piece) {
        debug_assert!(self.pieces.last().is_none_or(|l| l.end() <= p.start));
        self.pieces.push(p);
    }

    /// Encodes the pieces (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pieces.len() * 20 + 8);
        put_varint(&mut out, self.pieces.len() as u64);
        let mut at = 0u64;
        for p in &self.pieces {
            put_varint(&mut out, p.start - at);
            put_varint(&mut out, u64::from(p.blocks));
            match p.data {
                None => out.push(0),
                Some((id, skip)) => {
                    out.push(1);
                    out.extend_from_slice(&id);
                    put_varint(&mut out, u64::from(skip));
                }
            }
            at = p.end();
        }
        out
    }

    /// Decodes [`VolumeMap::encode`]; `None` if the bytes are not a valid map.
    pub fn decode(mut b: &[u8]) -> Option<VolumeMap> {
        let n = get_varint(&mut b)?;
        let mut m = VolumeMap::new();
        let mut at = 0u64;
        for _ in 0..n {
            let start = at.checked_add(get_varint(&mut b)?)?;
            let blocks = u32::try_from(get_varint(&mut b)?).ok().filter(|&n| n > 0)?;
            let (&tag, rest) = b.split_first()?;
            b = rest;
            let data = match tag {
                0 => None,
                1 => {
                    let id: ChunkId = b.get(..16)?.try_into().ok()?;
                    b = &b[16..];
                    Some((id, u32::try_from(get_varint(&mut b)?).ok()?))
                }
                _ => return None,
            };
            let p = Piece {
                start,
                blocks,
                data,
            };
            at = p.start.checked_add(u64::from(blocks))?;
            m.push(p);
        }
        b.is_empty().then_some(m)
    }
}

/// Appends `v` as a LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint from the front of `b`.
pub fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn piece(start: u64, blocks: u32, id: Option<u8>) -> Piece {
        Piece {
            start,
            blocks,
            data: id.map(|i| ([i; 16], 0)),
        }
    }

    /// The map as one entry per block: (chunk id byte, block within the chunk).
    fn blocks(m: &VolumeMap, n: u64) -> Vec<Option<(u8, u32)>> {
        let mut out = vec![None; n as usize];
        for p in m.pieces() {
            for b in 0..p.blocks {
                out[(p.start + u64::from(b)) as usize] = p.data.map(|(id, skip)| (id[0], skip + b));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn overlays_match_a_per_block_model(ops in prop::collection::vec((0u64..64, 1u32..20, prop::option::of(1u8..9)), 1..40)) {
            let mut m = VolumeMap::new();
            let mut model = vec![None; 100];
            for (start, len, id) in ops {
                m.overlay(piece(start, len, id), false);
                for b in 0..len {
                    model[(start + u64::from(b)) as usize] = id.map(|i| (i, b));
                }
            }
            prop_assert_eq!(blocks(&m, 100), model.clone());
            let back = VolumeMap::decode(&m.encode()).expect("decodes");
            prop_assert_eq!(blocks(&back, 100), model);
            let r = m.range(10, 30);
            prop_assert!(r.iter().all(|p| p.start >= 10 && p.start + u64::from(p.blocks) <= 30));
        }
    }

    /// Pieces from `ops` laid one by one into a sorted, non-overlapping delta (as an incremental
    /// backup's map is).
    fn delta(ops: &[(u64, u32, Option<u8>)]) -> VolumeMap {
        let mut d = VolumeMap::new();
        for &(start, len, id) in ops {
            d.overlay(piece(start, len, id), true);
        }
        d
    }

    proptest! {
        #[test]
        fn a_whole_delta_laid_at_once_is_the_delta_laid_piece_by_piece(
            base in prop::collection::vec((0u64..64, 1u32..20, prop::option::of(1u8..9)), 0..30),
            top in prop::collection::vec((0u64..64, 1u32..20, prop::option::of(1u8..9)), 0..30),
            keep_zeros: bool,
        ) {
            let (base, top) = (delta(&base), delta(&top));
            let mut one_by_one = base.clone();
            for p in top.pieces() {
                one_by_one.overlay(*p, keep_zeros);
            }
            let mut at_once = base.clone();
            at_once.overlay_map(&top, keep_zeros);
            prop_assert_eq!(&at_once, &one_by_one);
            prop_assert!(at_once.pieces.windows(2).all(|w| w[0].end() <= w[1].start));
        }
    }

    #[test]
    fn damaged_maps_do_not_decode() {
        let mut m = VolumeMap::new();
        m.push(piece(3, 2, Some(1)));
        let e = m.encode();
        assert!(VolumeMap::decode(&e[..e.len() - 1]).is_none());
        let mut more = e.clone();
        more.push(0);
        assert!(VolumeMap::decode(&more).is_none());
    }
}
