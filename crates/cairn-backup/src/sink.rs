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

/// Writes into a sparse raw file, with `O_DIRECT` where the file system allows it: a restore
/// writes each block once and nobody reads it back soon, so copying it through the page cache
/// only costs a core (half of a restore's samples were that copy) and evicts what the host uses.
pub struct FileSink {
    file: File,
    direct: Option<File>,
    path: PathBuf,
    aligned: Vec<u8>,
}

/// `O_DIRECT` wants buffers, offsets and lengths aligned to the device's block: 4 KiB covers
/// every common one.
const ALIGN: usize = 4096;

impl FileSink {
    /// Creates (or truncates) `path` with length `size`.
    pub fn create(path: &Path, size: u64) -> Result<FileSink> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::create(path).map_err(|e| BackupError::io("create", path, e))?;
        file.set_len(size)
            .map_err(|e| BackupError::io("resize", path, e))?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(FileSink {
            file,
            direct,
            path: path.to_path_buf(),
            aligned: Vec::new(),
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
        let whole = data.len() / ALIGN * ALIGN;
        let mut done = 0;
        if let Some(direct) = &self.direct {
            if offset.is_multiple_of(ALIGN as u64) && whole > 0 {
                let buf = match data.as_ptr().align_offset(ALIGN) {
                    0 => &data[..whole],
                    _ => {
                        // An aligned copy: this caller's buffer is not aligned.
                        if self.aligned.len() < whole + ALIGN {
                            self.aligned.resize(whole + ALIGN, 0);
                        }
                        let skew = self.aligned.as_ptr().align_offset(ALIGN);
                        let buf = &mut self.aligned[skew..skew + whole];
                        buf.copy_from_slice(&data[..whole]);
                        buf
                    }
                };
                match direct.write_all_at(buf, offset) {
                    Ok(()) => done = whole,
                    // A file system that takes O_DIRECT at open but not for this write: go
                    // through the page cache from now on.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                    Err(e) => return Err(BackupError::io("write", &self.path, e)),
                }
            }
        }
        self.file
            .write_all_at(&data[done..], offset + done as u64)
            .map_err(|e| BackupError::io("write", &self.path, e))
    }
}
