//! Small files the control layer keeps in a store directory (repository registry, live restore
//! progress, lifecycle policies), written so that a crash leaves the old contents or the new,
//! never a mix.

use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, OpError};

/// An I/O error on `path` while doing `what` (a full disk is kind `no_space`).
pub(crate) fn io_err(what: &str, path: &Path, e: std::io::Error) -> OpError {
    let kind = match e.raw_os_error() {
        Some(28) => ErrorKind::NoSpace,
        _ => ErrorKind::Io,
    };
    OpError::new(kind, format!("{what} {} failed: {e}", path.display()))
}

/// Writes `bytes` to `path` through a synced temporary file beside it and a rename, then syncs
/// the directory; creates the directory if needed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OpError> {
    use std::io::Write;
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| io_err("creating", parent, e))?;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| io_err("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("renaming", path, e))?;
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing", parent, e))
}

/// Reads the JSON file `path`: its default when there is none; a damaged one is kind `corrupt`,
/// with `remedy` (what to do, e.g. "set the policies again") in the message.
pub(crate) fn load_json<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
    remedy: &str,
) -> Result<T, OpError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            OpError::new(
                ErrorKind::Corrupt,
                format!(
                    "{} is damaged ({e}); fix or remove it, then {remedy}",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(io_err("reading", path, e)),
    }
}
