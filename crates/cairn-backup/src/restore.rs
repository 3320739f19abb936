//! Reading a backup back: a volume image, a window at a time.
//!
//! The map says which chunk holds each block; the index says where each chunk is. A window of
//! the volume (32 MiB) is restored by reading its records sorted by pack and offset, with nearby
//! ranges of one pack merged into one read, opening them on all cores, and writing the window
//! out. However many incrementals follow a full backup, a restore reads one map (the chain is
//! rebased once its deltas outgrow the base) and each record it needs once per window, so its
//! cost follows the volume's data, not the chain's length.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc::sync_channel;

use rayon::prelude::*;

use crate::backend::READ_PART;
use crate::crypto::{hex, ChunkId};
use crate::error::{BackupError, Result};
use crate::format::{
    pack_key, record_aad, Image, Location, Manifest, BLOCK, CHUNK_SIZE, RECORD_COMPRESSED,
};
use crate::map::{Piece, VolumeMap};
use crate::progress::{step, Progress};
use crate::repo::{ChunkIndex, Repository};

/// Volume bytes restored per window.
const WINDOW: u64 = 32 << 20;
/// Alignment of a window in its buffer: what `O_DIRECT` asks on common devices.
const WINDOW_ALIGN: usize = 4096;
/// Ranges of one pack closer than this are read as one.
const MERGE_GAP: u64 = 1 << 20;

/// A record opened (the buffer and range its data is in), or why it would not open.
type Placed = (ChunkId, Result<(usize, Range<usize>), String>);
/// One read of a pack and the records in it.
type Span = (Range<u64>, Vec<(ChunkId, Location)>);

/// Where restored bytes go.
pub trait Sink {
    /// Writes `data` at `offset`. Blocks that are all zeros are not passed (the sink starts out
    /// reading as zeros).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
}

/// Restores image `image` of backup `m` into `sink`; `progress` hears millionths done. Every
/// chunk the image needs is checked to be in the index before anything is written.
pub fn restore(
    repo: &Repository,
    m: &Manifest,
    image: usize,
    sink: &mut (dyn Sink + Send),
    progress: &mut dyn Progress,
) -> Result<()> {
    let img = m
        .images
        .get(image)
        .ok_or_else(|| BackupError::Invalid(format!("backup {} has no image {image}", m.id)))?;
    let map = repo.load_map(&img.maps)?;
    let index = index_covering(repo, m, img, &map)?;
    let blocks = img.size.div_ceil(BLOCK);
    let window_blocks = WINDOW / BLOCK;
    // Windows are read and opened here while a writer thread writes the previous one out: the
    // copy into the page cache takes a core of its own. Two window buffers go round.
    let (to_writer, windows) = sync_channel::<(u64, Vec<u8>, Range<usize>)>(1);
    let (give_back, buffers) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| -> Result<()> {
        let writer = s.spawn(move || -> Result<()> {
            for (base, buf, valid) in windows {
                write_nonzero(sink, base, &buf[valid])?;
                let _ = give_back.send(buf);
            }
            Ok(())
        });
        let read = (|| -> Result<()> {
            let mut start = 0;
            while start < blocks {
                let end = (start + window_blocks).min(blocks);
                let pieces = map.range(start, end);
                let data = read_chunks(repo, m, img, &index, &pieces)?;
                let len = usize::try_from((end - start) * BLOCK).expect("a window");
                let mut buf = buffers.try_recv().unwrap_or_default();
                // The window starts at a 4 KiB boundary of its buffer, so a sink writing with
                // O_DIRECT takes it as it is.
                buf.resize(len + WINDOW_ALIGN, 0);
                let skew = buf.as_ptr().align_offset(WINDOW_ALIGN);
                let window = &mut buf[skew..skew + len];
                // A reused window is zeroed only where no chunk lands.
                let mut zero_from = 0;
                for p in &pieces {
                    let Some((id, skip)) = p.data else { continue };
                    let chunk = data
                        .get(&id)
                        .expect("read_chunks reads every piece's chunk");
                    let from = usize::try_from(u64::from(skip) * BLOCK).expect("in a chunk");
                    let n = usize::try_from(u64::from(p.blocks) * BLOCK).expect("in a chunk");
                    let at = usize::try_from((p.start - start) * BLOCK).expect("in the window");
                    let Some(src) = chunk.get(from..from + n) else {
                        let why = "it is shorter than the map says";
                        return Err(bad_chunk(repo, m, img, &id, p, why));
                    };
                    window[zero_from..at].fill(0);
                    window[at..at + n].copy_from_slice(src);
                    zero_from = at + n;
                }
                window[zero_from..].fill(0);
                let base = start * BLOCK;
                let valid = usize::try_from(img.size.min(end * BLOCK) - base).expect("a window");
                if to_writer.send((base, buf, skew..skew + valid)).is_err() {
                    // The writer stopped on an error, which its join reports.
                    return Ok(());
                }
                start = end;
                let at = u128::from(start) * 1_000_000 / u128::from(blocks);
                step(progress, u64::try_from(at).unwrap_or(0))?;
            }
            Ok(())
        })();
        drop(to_writer);
        let written = writer
            .join()
            .map_err(|_| BackupError::Invalid("the restore's writer thread panicked".into()))?;
        read.and(written)
    })?;
    progress.report(1_000_000);
    Ok(())
}

/// The repository's index, checked to hold every chunk `map` (of image `img` of `m`) needs; a
/// chunk it lacks is named with the range it holds.
pub(crate) fn index_covering(
    repo: &Repository,
    m: &Manifest,
    img: &Image,
    map: &VolumeMap,
) -> Result<ChunkIndex> {
    let mut index = repo.load_index()?;
    let unindexed = |index: &ChunkIndex| {
        map.pieces()
            .find(|p| {
                p.data
                    .is_some_and(|(id, _)| !index.chunks.contains_key(&id))
            })
            .copied()
    };
    if unindexed(&index).is_some() {
        // A GC on another host may have rewritten a segment between listing and reading it.
        index = repo.load_index()?;
    }
    if let Some(p) = unindexed(&index) {
        let (id, _) = p.data.expect("a data piece");
        return Err(missing_chunk(repo, m, img, &id, &p));
    }
    Ok(index)
}

/// Writes the runs of `buf` (which starts at volume offset `base`) that are not whole zero
/// blocks: a sink starts out reading as zeros.
pub fn write_nonzero(sink: &mut (dyn Sink + Send), base: u64, buf: &[u8]) -> Result<()> {
    let bs = usize::try_from(BLOCK).expect("4 KiB");
    let mut run_start = None;
    let mut at = 0;
    while at < buf.len() {
        let end = (at + bs).min(buf.len());
        let zero = buf[at..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(s)) => {
                sink.write(base + s as u64, &buf[s..at])?;
                run_start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(s) = run_start {
        sink.write(base + s as u64, &buf[s..])?;
    }
    Ok(())
}

/// Chunks read for a set of pieces, opened where they were read: the buffers the packs were read
/// into (and the decompressed chunks), and where each chunk's data lies in them.
#[derive(Default)]
pub(crate) struct ReadChunks {
    buffers: Vec<Vec<u8>>,
    at: HashMap<ChunkId, (usize, Range<usize>)>,
}

impl ReadChunks {
    /// Chunk `id`'s data, if it was read.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<&[u8]> {
        let (b, r) = self.at.get(id)?;
        Some(&self.buffers[*b][r.clone()])
    }

    /// Every chunk read, with its data.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ChunkId, &[u8])> + '_ {
        self.at
            .iter()
            .map(|(id, (b, r))| (id, &self.buffers[*b][r.clone()]))
    }
}

/// Reads and opens the chunks `pieces` need: per pack, merged ranges; packs in parallel. Records
/// are decrypted in the buffers they were read into, so a chunk's bytes are copied once, into
/// the restored volume.
pub(crate) fn read_chunks(
    repo: &Repository,
    m: &Manifest,
    img: &Image,
    index: &ChunkIndex,
    pieces: &[Piece],
) -> Result<ReadChunks> {
    let mut by_pack: HashMap<u32, Vec<(ChunkId, Location)>> = HashMap::new();
    let mut wanted: HashMap<ChunkId, &Piece> = HashMap::new();
    for p in pieces {
        if let Some((id, _)) = p.data {
            if wanted.insert(id, p).is_none() {
                let loc = index.chunks[&id];
                by_pack.entry(loc.pack).or_default().push((id, loc));
            }
        }
    }
    let packs: Vec<(u32, Vec<(ChunkId, Location)>)> = by_pack.into_iter().collect();
    let opened: Vec<(Vec<Vec<u8>>, Vec<Placed>)> = packs
        .into_par_iter()
        .map(|(pack, mut recs)| {
            recs.sort_by_key(|(_, l)| l.offset);
            let ranges = merged_ranges(&recs);
            let key = pack_key(&index.packs[pack as usize]);
            let spans: Vec<Range<u64>> = ranges.iter().map(|(r, _)| r.clone()).collect();
            let mut buffers = repo.backend().get_ranges(&key, &spans)?;
            let mut placed: Vec<Placed> = Vec::new();
            for (i, (span, members)) in ranges.iter().enumerate() {
                // Records of a pack never overlap; an index that says otherwise gets its later
                // records opened from copies, so one record's opening cannot spoil another's.
                let mut free_from = 0;
                for (id, loc) in members {
                    let from = usize::try_from(u64::from(loc.offset) - span.start).expect("inside");
                    let to = from + loc.len as usize;
                    let (opened, copy) = match buffers[i].get_mut(from..to) {
                        Some(rec) if from >= free_from => {
                            (open_record_in_place(repo, id, rec), None)
                        }
                        _ => {
                            let got = buffers[i].get(from..to);
                            let mut copy = got.map(<[u8]>::to_vec).unwrap_or_default();
                            (open_record_in_place(repo, id, &mut copy), Some(copy))
                        }
                    };
                    free_from = free_from.max(to);
                    // Data opened in a read buffer stays there; any other gets a buffer of its own.
                    let at = opened.map(|data| {
                        let (own, range) = match (data, copy) {
                            (ChunkData::Within(r), None) => {
                                return (i, from + r.start..from + r.end)
                            }
                            (ChunkData::Within(r), Some(copy)) => (copy, r),
                            (ChunkData::Owned(v), _) => {
                                let n = v.len();
                                (v, 0..n)
                            }
                        };
                        buffers.push(own);
                        (buffers.len() - 1, range)
                    });
                    placed.push((*id, at));
                }
            }
            Ok((buffers, placed))
        })
        .collect::<Result<_>>()?;
    let mut read = ReadChunks::default();
    for (buffers, placed) in opened {
        let base = read.buffers.len();
        read.buffers.extend(buffers);
        for (id, r) in placed {
            match r {
                Ok((b, range)) => {
                    read.at.insert(id, (base + b, range));
                }
                Err(why) => return Err(bad_chunk(repo, m, img, &id, wanted[&id], &why)),
            }
        }
    }
    Ok(read)
}

/// Groups a pack's records (sorted by offset) into ranges to read, each at most the backend's
/// [`READ_PART`] unless one record is longer.
fn merged_ranges(recs: &[(ChunkId, Location)]) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for (id, l) in recs {
        let r = u64::from(l.offset)..u64::from(l.offset) + u64::from(l.len);
        match out.last_mut() {
            Some((span, members))
                if r.start <= span.end + MERGE_GAP && r.end - span.start <= READ_PART =>
            {
                span.end = span.end.max(r.end);
                members.push((*id, *l));
            }
            _ => out.push((r, vec![(*id, *l)])),
        }
    }
    out
}

/// Checks a record as a restore opens it (authentication or checksum, decompression, the id
/// recomputed from the data), on a copy, leaving `rec` as it is.
pub fn check_record(repo: &Repository, id: &ChunkId, rec: &[u8]) -> Result<(), String> {
    open_record_in_place(repo, id, &mut rec.to_vec()).map(drop)
}

/// Where [`open_record_in_place`] left a chunk's data.
pub(crate) enum ChunkData {
    /// In the record's own bytes, at this range.
    Within(Range<usize>),
    /// Decompressed into a buffer of its own.
    Owned(Vec<u8>),
}

/// A record's chunk data, checked: authentication (or checksum), decompression, and the id
/// recomputed from the data. The record is decrypted where it lies, without a copy.
pub(crate) fn open_record_in_place(
    repo: &Repository,
    id: &ChunkId,
    rec: &mut [u8],
) -> Result<ChunkData, String> {
    let (&mut flags, sealed) = rec.split_first_mut().ok_or("the record is empty")?;
    let plain = repo
        .keys()
        .open_in_place(&record_aad(id, flags), sealed)
        .ok_or("it fails authentication")?;
    let payload = &sealed[plain.clone()];
    let data = match flags & RECORD_COMPRESSED != 0 {
        true => ChunkData::Owned(
            zstd::bulk::decompress(payload, usize::try_from(CHUNK_SIZE).expect("64 KiB"))
                .map_err(|_| "it does not decompress")?,
        ),
        false => ChunkData::Within(plain.start + 1..plain.end + 1),
    };
    let bytes = match &data {
        ChunkData::Within(r) => &rec[r.clone()],
        ChunkData::Owned(v) => v.as_slice(),
    };
    if repo.keys().chunk_id(bytes) != *id {
        return Err("its data does not hash to its id".into());
    }
    Ok(data)
}

fn range_of(img: &Image, p: &Piece) -> String {
    let from = p.start * BLOCK;
    let to = (from + u64::from(p.blocks) * BLOCK).min(img.size);
    format!("bytes {from}..{to} of {}@{}", img.volume, img.checkpoint)
}

fn missing_chunk(
    repo: &Repository,
    m: &Manifest,
    img: &Image,
    id: &ChunkId,
    p: &Piece,
) -> BackupError {
    BackupError::Missing {
        location: repo.location().to_string(),
        what: "chunk",
        name: format!(
            "{} (needed for {} in backup {})",
            hex(id),
            range_of(img, p),
            m.id
        ),
    }
}

fn bad_chunk(
    repo: &Repository,
    m: &Manifest,
    img: &Image,
    id: &ChunkId,
    p: &Piece,
    why: &str,
) -> BackupError {
    BackupError::Corrupt {
        location: repo.location().to_string(),
        what: "chunk",
        name: format!(
            "{} (holding {} in backup {})",
            hex(id),
            range_of(img, p),
            m.id
        ),
        why: why.into(),
    }
}

/// A map's pieces that read from chunk data (for callers that walk a backup's chunks).
pub fn data_pieces(map: &VolumeMap) -> impl Iterator<Item = &Piece> + '_ {
    map.pieces().filter(|p| p.data.is_some())
}
