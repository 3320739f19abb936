//! The repository's objects and their encodings.
//!
//! | key | what | written |
//! |---|---|---|
//! | `config` | format, chunk size, the wrapped master key (JSON, not secret) | once, by `init` |
//! | `data/XX/NAME` | a pack: sealed records, then a sealed table of its records | by backups |
//! | `index/NAME` | where each new chunk of one backup is: pack, offset, length | after its packs |
//! | `maps/NAME` | a backup's volume map or delta ([`crate::map`]) | after its index |
//! | `backups/ID` | the manifest: what was backed up, its maps; the commit point | last |
//!
//! NAMEs are 128 random bits in hex, so writers on different hosts never choose the same name
//! and no object is ever overwritten; a backup is visible once its manifest exists, and a
//! writer that dies before that leaves only objects no manifest reaches (garbage for GC).

use serde::{Deserialize, Serialize};

use crate::crypto::{ChunkId, WrappedKey};
use crate::map::{get_varint, put_varint};

/// The repository format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Volume bytes per chunk of a full backup: chunks are aligned to the volume, so the same data
/// at the same place in two volumes (clones, VMs from one image) is one chunk.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Engine block size: the unit of change an incremental stores.
pub const BLOCK: u64 = 4096;
/// Blocks per chunk.
pub const CHUNK_BLOCKS: u64 = CHUNK_SIZE / BLOCK;
/// A pack is closed once its records reach this size (S3 charges per request; restore reads
/// ranges of it).
pub const PACK_TARGET: usize = 8 << 20;

/// The `config` object.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Repository format.
    pub format: u32,
    /// Random repository id (hex).
    pub id: String,
    /// When it was made, ms since the Unix epoch.
    pub created_ms: u64,
    /// Chunk size of full backups, bytes.
    pub chunk_size: u64,
    /// The master key, wrapped by the passphrase; absent when unencrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<WrappedKey>,
    /// Unencrypted repositories only: the chunk id key (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_id_key: Option<String>,
}

/// One volume image in a backup.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Volume name when backed up.
    pub volume: String,
    /// The volume's catalog id in its store.
    pub volume_id: u64,
    /// The volume's creation time (tells it from a later volume with the same id after a store
    /// is re-made).
    pub volume_created_ms: u64,
    /// Checkpoint name when backed up.
    pub checkpoint: String,
    /// The checkpoint's catalog id in its store.
    pub checkpoint_id: u64,
    /// The checkpoint's creation time.
    pub checkpoint_created_ms: u64,
    /// Volume size at the checkpoint, bytes.
    pub size: u64,
    /// The map, as a base and the deltas laid over it in order.
    pub maps: Vec<MapRef>,
}

/// One map object of an image's chain.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRef {
    /// Object name under `maps/`.
    pub name: String,
    /// Its pieces (chains are rebased when the deltas outgrow the base).
    pub pieces: u64,
}

/// What a backup read and stored.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Volume bytes read from the checkpoint.
    pub read_bytes: u64,
    /// Chunks (or partial chunks) that were new to the repository.
    pub new_chunks: u64,
    /// Their bytes before compression.
    pub new_bytes: u64,
    /// Bytes added to the repository (packs, index, maps, manifest).
    pub stored_bytes: u64,
    /// Chunks read that the repository already had.
    pub reused_chunks: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// A backup's manifest: sealed JSON under `backups/ID`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Repository format it was written with.
    pub format: u32,
    /// Backup id.
    pub id: String,
    /// When the backup was taken (its checkpoint's time), ms since the Unix epoch.
    pub time_ms: u64,
    /// When the backup finished, ms since the Unix epoch.
    pub finished_ms: u64,
    /// `volume` (one image) or `vm`.
    pub kind: String,
    /// The volume or VM name: backups of the same name form a group (listing, pruning).
    pub name: String,
    /// Checkpoint name.
    pub checkpoint: String,
    /// The checkpoint's description.
    #[serde(default)]
    pub description: Option<String>,
    /// Host name of the writer.
    pub host: String,
    /// Id of the store it came from.
    pub store: String,
    /// The volume images.
    pub images: Vec<Image>,
    /// The backup this one is incremental to.
    #[serde(default)]
    pub parent: Option<String>,
    /// Index objects this backup wrote.
    pub index: Vec<String>,
    /// What it read and stored.
    pub stats: BackupStats,
    /// What else the front end kept with it: for a VM, its definition and checkpoint record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

/// Where a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Which pack (a number into [`IndexSegment::packs`] or the repository's pack table).
    pub pack: u32,
    /// Byte offset of the record in the pack.
    pub offset: u32,
    /// Record length.
    pub len: u32,
}

/// A pack's records: `(chunk id, offset, length)`.
pub type PackRecords = Vec<(ChunkId, u32, u32)>;

/// The records one backup added: per pack, `(chunk id, offset, length)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSegment {
    /// Packs, by name, with their records.
    pub packs: Vec<(String, PackRecords)>,
}

impl IndexSegment {
    /// Encodes the segment (varint counts, 16-byte ids, fixed offsets).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, self.packs.len() as u64);
        for (name, recs) in &self.packs {
            put_varint(&mut out, name.len() as u64);
            out.extend_from_slice(name.as_bytes());
            put_varint(&mut out, recs.len() as u64);
            for (id, off, len) in recs {
                out.extend_from_slice(id);
                out.extend_from_slice(&off.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
        }
        out
    }

    /// Decodes [`IndexSegment::encode`]; `None` if damaged.
    pub fn decode(mut b: &[u8]) -> Option<IndexSegment> {
        let n = get_varint(&mut b)?;
        let mut packs = Vec::new();
        for _ in 0..n {
            let l = usize::try_from(get_varint(&mut b)?).ok()?;
            let name = std::str::from_utf8(b.get(..l)?).ok()?.to_string();
            b = &b[l..];
            let count = get_varint(&mut b)?;
            let mut recs = Vec::new();
            for _ in 0..count {
                let r = b.get(..24)?;
                let id: ChunkId = r[..16].try_into().ok()?;
                let off = u32::from_le_bytes(r[16..20].try_into().ok()?);
                let len = u32::from_le_bytes(r[20..24].try_into().ok()?);
                recs.push((id, off, len));
                b = &b[24..];
            }
            packs.push((name, recs));
        }
        b.is_empty().then_some(IndexSegment { packs })
    }
}

/// Record flag: the payload is zstd-compressed.
pub const RECORD_COMPRESSED: u8 = 1;

/// Object key of a pack.
pub fn pack_key(name: &str) -> String {
    format!("data/{}/{name}", &name[..2])
}

/// A fresh object name.
pub fn new_name() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Associated data of a record: it is bound to its chunk id and flags.
pub fn record_aad(id: &ChunkId, flags: u8) -> [u8; 17] {
    let mut a = [0u8; 17];
    a[..16].copy_from_slice(id);
    a[16] = flags;
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_segments_round_trip_and_reject_damage() {
        let s = IndexSegment {
            packs: vec![
                ("ab".repeat(16), vec![([1; 16], 0, 100), ([2; 16], 100, 7)]),
                ("cd".repeat(16), vec![]),
            ],
        };
        let e = s.encode();
        assert_eq!(IndexSegment::decode(&e), Some(s));
        assert!(IndexSegment::decode(&e[..e.len() - 3]).is_none());
    }
}
