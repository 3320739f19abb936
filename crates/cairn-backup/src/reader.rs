//! Random reads of one image of a backup, for serving it where it lies (a mounted backup, the
//! part of a live restore not yet copied back).
//!
//! The map and the index are loaded once, when the image is opened, and every chunk it needs is
//! checked to be indexed then, so a read fails only on a damaged or vanished pack. Opened chunks
//! stay in a small first-in-first-out cache: a client that reads 4 KiB usually reads the next
//! 4 KiB next, and one 64 KiB chunk answers sixteen of those reads.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cairn_engine::sync::lock;

use crate::crypto::ChunkId;
use crate::error::{BackupError, Result};
use crate::format::{Manifest, BLOCK};
use crate::map::VolumeMap;
use crate::repo::{ChunkIndex, Repository};
use crate::restore::{index_covering, read_chunks};

/// Opened chunks kept: 512 of 64 KiB, 32 MiB.
const CACHED_CHUNKS: usize = 512;

/// Chunks opened recently, oldest out first.
#[derive(Default)]
struct ChunkCache {
    chunks: HashMap<ChunkId, Arc<Vec<u8>>>,
    order: VecDeque<ChunkId>,
}

impl ChunkCache {
    fn insert(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        if self.chunks.insert(id, data).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > CACHED_CHUNKS {
            if let Some(old) = self.order.pop_front() {
                self.chunks.remove(&old);
            }
        }
    }
}

/// One image of a backup, open for reads at any offset.
pub struct ImageReader {
    repo: Arc<Repository>,
    manifest: Manifest,
    image: usize,
    map: VolumeMap,
    index: ChunkIndex,
    cache: Mutex<ChunkCache>,
}

impl ImageReader {
    /// Opens image `image` of backup `manifest`.
    pub fn open(repo: Arc<Repository>, manifest: Manifest, image: usize) -> Result<ImageReader> {
        let img = manifest.images.get(image).ok_or_else(|| {
            BackupError::Invalid(format!("backup {} has no image {image}", manifest.id))
        })?;
        let map = repo.load_map(&img.maps)?;
        let index = index_covering(&repo, &manifest, img, &map)?;
        Ok(ImageReader {
            repo,
            manifest,
            image,
            map,
            index,
            cache: Mutex::default(),
        })
    }

    /// The backup.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Which of the backup's images this is.
    pub fn image(&self) -> usize {
        self.image
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.manifest.images[self.image].size
    }

    /// Byte ranges that hold data (everything else reads as zeros), in order.
    pub fn data_ranges(&self) -> Vec<Range<u64>> {
        let size = self.size();
        let mut out: Vec<Range<u64>> = Vec::new();
        for p in self.map.pieces().filter(|p| p.data.is_some()) {
            let r = p.start * BLOCK..((p.start + u64::from(p.blocks)) * BLOCK).min(size);
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }

    /// Reads `buf.len()` bytes at `offset` (any alignment; the range must lie inside the image).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                BackupError::Invalid(format!(
                    "{offset}+{} reaches past the end of the image ({} bytes)",
                    buf.len(),
                    self.size()
                ))
            })?;
        buf.fill(0);
        if buf.is_empty() {
            return Ok(());
        }
        let pieces = self.map.range(offset / BLOCK, end.div_ceil(BLOCK));
        let mut have: HashMap<ChunkId, Arc<Vec<u8>>> = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = lock(&self.cache);
            for p in &pieces {
                let Some((id, _)) = p.data else { continue };
                match cache.chunks.get(&id) {
                    Some(d) => {
                        have.insert(id, d.clone());
                    }
                    None => missing.push(*p),
                }
            }
        }
        if !missing.is_empty() {
            let img = &self.manifest.images[self.image];
            let read = read_chunks(&self.repo, &self.manifest, img, &self.index, &missing)?;
            let mut cache = lock(&self.cache);
            for (id, data) in read.iter() {
                let data = Arc::new(data.to_vec());
                cache.insert(*id, data.clone());
                have.insert(*id, data);
            }
        }
        for p in &pieces {
            let Some((id, skip)) = p.data else { continue };
            let chunk = &have[&id];
            // The piece's bytes in the volume, clipped to the read.
            let from = (p.start * BLOCK).max(offset);
            let to = ((p.start + u64::from(p.blocks)) * BLOCK).min(end);
            let in_chunk = u64::from(skip) * BLOCK + (from - p.start * BLOCK);
            let n = usize::try_from(to - from).expect("inside a read");
            let src = usize::try_from(in_chunk).expect("inside a chunk");
            let Some(src) = chunk.get(src..src + n) else {
                return Err(BackupError::Corrupt {
                    location: self.repo.location().to_string(),
                    what: "chunk",
                    name: crate::crypto::hex(&id),
                    why: "it is shorter than the map says".into(),
                });
            };
            let at = usize::try_from(from - offset).expect("inside a read");
            buf[at..at + n].copy_from_slice(src);
        }
        Ok(())
    }
}
