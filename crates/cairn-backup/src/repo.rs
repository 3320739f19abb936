//! An open repository: its storage, its keys, and reading and writing its sealed objects.

use std::collections::HashMap;

use crate::backend::{self, Backend};
use crate::crypto::{self, ChunkId, Keys, WrappedKey};
use crate::error::{BackupError, Result};
use crate::format::{
    Config, IndexSegment, Location as RecordLocation, Manifest, CHUNK_SIZE, FORMAT,
};
use crate::location::{Access, Location};
use crate::map::VolumeMap;

/// Objects that would not open (their key), with why.
pub type Damaged = Vec<(String, BackupError)>;

/// zstd level of metadata objects (maps, index segments, manifests).
const META_ZSTD: i32 = 3;

/// An open repository.
pub struct Repository {
    backend: Box<dyn Backend>,
    keys: Keys,
    config: Config,
}

/// Where every chunk of the repository is.
#[derive(Debug, Default)]
pub struct ChunkIndex {
    /// Pack names; [`RecordLocation::pack`] numbers into it.
    pub packs: Vec<String>,
    /// Chunk id to record.
    pub chunks: HashMap<ChunkId, RecordLocation>,
    /// Index objects read.
    pub segments: Vec<String>,
}

impl ChunkIndex {
    /// Adds a segment's records (a chunk stored twice keeps its first place).
    pub fn add(&mut self, seg: &IndexSegment) {
        for (name, recs) in &seg.packs {
            let pack = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
            self.packs.push(name.clone());
            for (id, offset, len) in recs {
                self.chunks.entry(*id).or_insert(RecordLocation {
                    pack,
                    offset: *offset,
                    len: *len,
                });
            }
        }
    }
}

impl Repository {
    /// Makes a new repository at `access.location`: encrypted with `access.passphrase` unless
    /// `encrypt` is false.
    pub fn init(access: &Access, encrypt: bool) -> Result<Repository> {
        let backend = backend::open(access)?;
        let loc = access.location.to_string();
        if let Location::Local { path } = &access.location {
            if path.exists() && !path.is_dir() {
                return Err(BackupError::BadLocation {
                    location: loc,
                    why: "it is a file, not a directory".into(),
                });
            }
            let non_empty = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some());
            if non_empty && backend.get("config")?.is_none() {
                return Err(BackupError::BadLocation {
                    location: loc,
                    why: "the directory is not empty; give an empty or new directory".into(),
                });
            }
        }
        if backend.get("config")?.is_some() {
            return Err(BackupError::RepositoryExists(loc));
        }
        let (key, plain_id_key, keys) = match encrypt {
            true => {
                let pass = access
                    .passphrase
                    .as_ref()
                    .filter(|p| !p.0.is_empty())
                    .ok_or_else(|| BackupError::NeedPassphrase(loc.clone()))?;
                let master: [u8; 32] = rand::random();
                let wrapped = WrappedKey::wrap(&master, pass.0.as_bytes());
                (Some(wrapped), None, Keys::encrypted(&master))
            }
            false => {
                let id_key: [u8; 32] = rand::random();
                (None, Some(crypto::b64(&id_key)), Keys::plain(id_key))
            }
        };
        let config = Config {
            format: FORMAT,
            id: crypto::hex(&rand::random::<[u8; 8]>()),
            created_ms: now_ms(),
            chunk_size: CHUNK_SIZE,
            key,
            plain_id_key,
        };
        let json = serde_json::to_vec_pretty(&config).expect("config serializes");
        backend.put("config", json)?;
        Ok(Repository {
            backend,
            keys,
            config,
        })
    }

    /// Opens the repository at `access.location`.
    pub fn open(access: &Access) -> Result<Repository> {
        let backend = backend::open(access)?;
        let loc = access.location.to_string();
        let raw = backend
            .get("config")?
            .ok_or_else(|| BackupError::NotARepository(loc.clone()))?;
        #[derive(serde::Deserialize)]
        struct Version {
            format: u32,
        }
        let v: Version =
            serde_json::from_slice(&raw).map_err(|_| BackupError::NotARepository(loc.clone()))?;
        if v.format > FORMAT {
            return Err(BackupError::NewerFormat {
                location: loc,
                found: v.format,
                supported: FORMAT,
            });
        }
        let config: Config = serde_json::from_slice(&raw).map_err(|e| BackupError::Corrupt {
            location: loc.clone(),
            what: "config",
            name: "config".into(),
            why: e.to_string(),
        })?;
        let corrupt = |why: &str| BackupError::Corrupt {
            location: loc.clone(),
            what: "config",
            name: "config".into(),
            why: why.into(),
        };
        let keys = match (&config.key, &config.plain_id_key) {
            (Some(wrapped), _) => {
                let pass = access
                    .passphrase
                    .as_ref()
                    .ok_or_else(|| BackupError::NeedPassphrase(loc.clone()))?;
                let master = wrapped
                    .unwrap(pass.0.as_bytes())
                    .ok_or_else(|| BackupError::WrongPassphrase(loc.clone()))?;
                Keys::encrypted(&master)
            }
            (None, Some(k)) => {
                let k = crypto::unb64(k)
                    .and_then(|k| <[u8; 32]>::try_from(k).ok())
                    .ok_or_else(|| corrupt("its id key is not 32 bytes of base64"))?;
                Keys::plain(k)
            }
            (None, None) => return Err(corrupt("it has neither a wrapped key nor an id key")),
        };
        if let Location::Local { path } = &access.location {
            backend::LocalDir::new(path.clone()).clean_tmp();
        }
        Ok(Repository {
            backend,
            keys,
            config,
        })
    }

    /// Where it is.
    pub fn location(&self) -> &Location {
        self.backend.location()
    }

    /// Its config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Its keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Its storage.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// Compresses, seals (bound to `aad`) and stores `plain` under `key`; returns the bytes
    /// stored.
    pub fn put_sealed(&self, key: &str, aad: &[u8], plain: &[u8]) -> Result<u64> {
        let packed = zstd::bulk::compress(plain, META_ZSTD)
            .map_err(|e| BackupError::Invalid(format!("compressing {key} failed: {e}")))?;
        let sealed = self.keys.seal(aad, &packed);
        let n = sealed.len() as u64;
        self.backend.put(key, sealed)?;
        Ok(n)
    }

    /// Reads back what [`Repository::put_sealed`] stored.
    pub fn get_sealed(&self, key: &str, what: &'static str, aad: &[u8]) -> Result<Vec<u8>> {
        let sealed = self.backend.get(key)?.ok_or_else(|| BackupError::Missing {
            location: self.location().to_string(),
            what,
            name: key.into(),
        })?;
        let corrupt = |why: &str| BackupError::Corrupt {
            location: self.location().to_string(),
            what,
            name: key.into(),
            why: why.into(),
        };
        let packed = self
            .keys
            .open(aad, &sealed)
            .ok_or_else(|| corrupt("it fails authentication"))?;
        zstd::stream::decode_all(&packed[..]).map_err(|_| corrupt("it does not decompress"))
    }

    /// Every backup, oldest first; a damaged manifest is an error (GC must know every one).
    pub fn backups(&self) -> Result<Vec<Manifest>> {
        let (list, mut damaged) = self.backups_lenient()?;
        match damaged.pop() {
            Some((_, e)) => Err(e),
            None => Ok(list),
        }
    }

    /// Every backup whose manifest opens, oldest first, and the damaged ones with their errors. A
    /// manifest listed and then gone was pruned meanwhile (by another host): it is left out.
    pub fn backups_lenient(&self) -> Result<(Vec<Manifest>, Damaged)> {
        let (mut out, mut damaged) = (Vec::new(), Vec::new());
        for o in self.backend.list("backups/")? {
            let id = o.key.trim_start_matches("backups/");
            match self.manifest_exact(id) {
                Ok(m) => out.push(m),
                // Listed, then gone: another host pruned it meanwhile.
                Err(BackupError::Missing { .. }) => {}
                Err(e @ BackupError::Corrupt { .. }) => damaged.push((id.to_string(), e)),
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)));
        Ok((out, damaged))
    }

    /// The backup whose id is `id` or starts with it.
    pub fn manifest(&self, id: &str) -> Result<Manifest> {
        let loc = self.location().to_string();
        let valid = !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit());
        if !valid {
            return Err(BackupError::UnknownBackup {
                location: loc,
                id: id.into(),
            });
        }
        let found = self.backend.list(&format!("backups/{id}"))?;
        match found.len() {
            0 => Err(BackupError::UnknownBackup {
                location: loc,
                id: id.into(),
            }),
            1 => self.manifest_exact(found[0].key.trim_start_matches("backups/")),
            n => Err(BackupError::AmbiguousBackup {
                location: loc,
                id: id.into(),
                matches: n,
            }),
        }
    }

    fn manifest_exact(&self, id: &str) -> Result<Manifest> {
        let key = format!("backups/{id}");
        let plain = self.get_sealed(&key, "backup manifest", &manifest_aad(id))?;
        let m: Manifest = serde_json::from_slice(&plain).map_err(|e| BackupError::Corrupt {
            location: self.location().to_string(),
            what: "backup manifest",
            name: key.clone(),
            why: e.to_string(),
        })?;
        if m.id != id {
            return Err(BackupError::Corrupt {
                location: self.location().to_string(),
                what: "backup manifest",
                name: key,
                why: format!("it names backup {}", m.id),
            });
        }
        Ok(m)
    }

    /// Writes a manifest: the commit point of a backup.
    pub fn put_manifest(&self, m: &Manifest) -> Result<u64> {
        let json = serde_json::to_vec(m).expect("manifests serialize");
        self.put_sealed(&format!("backups/{}", m.id), &manifest_aad(&m.id), &json)
    }

    /// Reads every index segment; a damaged one is an error (writers and restores need them all).
    pub fn load_index(&self) -> Result<ChunkIndex> {
        let (index, mut damaged) = self.load_index_lenient()?;
        match damaged.pop() {
            Some((_, e)) => Err(e),
            None => Ok(index),
        }
    }

    /// Reads every index segment that opens; returns the others with their errors apart (verify
    /// reports them, and the chunks only they located show up as missing).
    pub fn load_index_lenient(&self) -> Result<(ChunkIndex, Damaged)> {
        let mut index = ChunkIndex::default();
        let mut damaged = Vec::new();
        for o in self.backend.list("index/")? {
            let name = o.key.trim_start_matches("index/").to_string();
            let seg = self
                .get_sealed(&o.key, "index", &index_aad(&name))
                .and_then(|plain| {
                    IndexSegment::decode(&plain).ok_or_else(|| BackupError::Corrupt {
                        location: self.location().to_string(),
                        what: "index",
                        name: o.key.clone(),
                        why: "its records do not decode".into(),
                    })
                });
            match seg {
                Ok(seg) => {
                    index.add(&seg);
                    index.segments.push(name);
                }
                // Listed, then gone: a GC rewrote it meanwhile (its entries live on in a newer
                // segment; readers that miss one load the index again).
                Err(BackupError::Missing { .. }) => {}
                Err(e @ BackupError::Corrupt { .. }) => damaged.push((o.key, e)),
                Err(e) => return Err(e),
            }
        }
        Ok((index, damaged))
    }

    /// Writes an index segment under a new name; returns the name and bytes stored.
    pub fn put_index(&self, seg: &IndexSegment) -> Result<(String, u64)> {
        let name = crate::format::new_name();
        let n = self.put_sealed(&format!("index/{name}"), &index_aad(&name), &seg.encode())?;
        Ok((name, n))
    }

    /// Reads one map object.
    pub fn load_map_object(&self, name: &str) -> Result<VolumeMap> {
        let key = format!("maps/{name}");
        let plain = self.get_sealed(&key, "map", &map_aad(name))?;
        VolumeMap::decode(&plain).ok_or_else(|| BackupError::Corrupt {
            location: self.location().to_string(),
            what: "map",
            name: key,
            why: "its pieces do not decode".into(),
        })
    }

    /// An image's whole map: its base with each delta laid over it.
    pub fn load_map(&self, maps: &[crate::format::MapRef]) -> Result<VolumeMap> {
        self.load_map_cached(maps, &mut HashMap::new())
    }

    /// [`Repository::load_map`] reading each map object once across calls: the backups of one
    /// chain share its base and earlier deltas, so a caller walking many backups (GC) reads each
    /// object once instead of once per backup.
    pub fn load_map_cached(
        &self,
        maps: &[crate::format::MapRef],
        cache: &mut HashMap<String, VolumeMap>,
    ) -> Result<VolumeMap> {
        let mut map = VolumeMap::new();
        for (i, r) in maps.iter().enumerate() {
            if !cache.contains_key(&r.name) {
                cache.insert(r.name.clone(), self.load_map_object(&r.name)?);
            }
            let part = &cache[&r.name];
            match i {
                0 => map = part.clone(),
                _ => map.overlay_map(part, false),
            }
        }
        Ok(map)
    }

    /// Writes a map under a new name; returns the name and bytes stored.
    pub fn put_map(&self, map: &VolumeMap) -> Result<(String, u64)> {
        let name = crate::format::new_name();
        let n = self.put_sealed(&format!("maps/{name}"), &map_aad(&name), &map.encode())?;
        Ok((name, n))
    }
}

fn manifest_aad(id: &str) -> Vec<u8> {
    format!("cairn backup manifest {id}").into_bytes()
}

fn index_aad(name: &str) -> Vec<u8> {
    format!("cairn backup index {name}").into_bytes()
}

fn map_aad(name: &str) -> Vec<u8> {
    format!("cairn backup map {name}").into_bytes()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
