//! Where a restore writes: a new volume in a store, or a raw image file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cairn_engine::Store;

use crate::error::{BackupError, Result};
use crate::restore::Sink;

/// Writes into a volume's head.
pub struct VolumeSink<'a> {
    /// The store.
    pub store: &'a Store,
    /// The volume (already created, as big as the image).
    pub volume: String,
}

impl Sink for VolumeSink<'_> {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        Ok(self.store.write(&self.volume, offset, data)?)
    }
}

/// Writes into a sparse raw file.
pub struct FileSink {
    file: File,
    path: PathBuf,
}

impl FileSink {
    /// Creates (or truncates) `path` with length `size`.
    pub fn create(path: &Path, size: u64) -> Result<FileSink> {
        let file = File::create(path).map_err(|e| BackupError::io("create", path, e))?;
        file.set_len(size)
            .map_err(|e| BackupError::io("resize", path, e))?;
        Ok(FileSink {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Syncs the file.
    pub fn finish(self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| BackupError::io("sync", &self.path, e))
    }
}

impl Sink for FileSink {
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| BackupError::io("write", &self.path, e))
    }
}
