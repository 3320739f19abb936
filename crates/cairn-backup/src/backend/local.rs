//! A repository in a local directory: one file per object, written to `tmp/`, synced, renamed
//! into place and the directory synced, so a crash leaves the old object, the new one, or a
//! temporary file that the next writer's [`LocalDir::clean_tmp`] removes.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use super::{Backend, ObjectInfo};
use crate::error::{BackupError, Result};
use crate::location::Location;

/// Temporary files older than this are left by a process that died.
const STALE_TMP_SECS: u64 = 3600;

/// A directory holding a repository.
pub struct LocalDir {
    root: PathBuf,
    location: Location,
}

impl LocalDir {
    /// The repository at `root` (nothing is touched yet).
    pub fn new(root: PathBuf) -> LocalDir {
        LocalDir {
            location: Location::Local { path: root.clone() },
            root,
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Removes temporary files a killed writer left (older than an hour, so a writer still
    /// running is not robbed of its file).
    pub fn clean_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > STALE_TMP_SECS);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackupError::io("sync", dir, e))
}

impl Backend for LocalDir {
    fn location(&self) -> &Location {
        &self.location
    }

    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let dest = self.path(key);
        let tmp_dir = self.root.join("tmp");
        fs::create_dir_all(&tmp_dir).map_err(|e| BackupError::io("create", &tmp_dir, e))?;
        let tmp = tmp_dir.join(format!("{:032x}", rand::random::<u128>()));
        let written = File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&data)?;
                f.sync_all()
            })
            .map_err(|e| BackupError::io("write", &tmp, e));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let parent = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(|e| BackupError::io("create", parent, e))?;
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(BackupError::io("rename", &dest, e));
        }
        sync_dir(parent)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let p = self.path(key);
        match fs::read(&p) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BackupError::io("read", &p, e)),
        }
    }

    fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>> {
        let p = self.path(key);
        let mut f = File::open(&p).map_err(|e| BackupError::io("open", &p, e))?;
        ranges
            .iter()
            .map(|r| {
                let mut buf = vec![0u8; usize::try_from(r.end - r.start).unwrap_or(usize::MAX)];
                f.seek(SeekFrom::Start(r.start))
                    .and_then(|_| f.read_exact(&mut buf))
                    .map_err(|e| BackupError::io("read", &p, e))?;
                Ok(buf)
            })
            .collect()
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Keys are `dir/.../name`: walk the directory the prefix names (or its parent).
        let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let mut out = Vec::new();
        let mut stack = vec![self.root.join(dir)];
        while let Some(d) = stack.pop() {
            let entries = match fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BackupError::io("list", &d, e)),
            };
            for e in entries {
                let e = e.map_err(|err| BackupError::io("list", &d, err))?;
                let path = e.path();
                let meta = e
                    .metadata()
                    .map_err(|err| BackupError::io("stat", &path, err))?;
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                if key.starts_with(prefix) && !key.starts_with("tmp/") {
                    let modified_ms = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    out.push(ObjectInfo {
                        key,
                        size: meta.len(),
                        modified_ms,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackupError::io("delete", &p, e)),
        }
    }
}
