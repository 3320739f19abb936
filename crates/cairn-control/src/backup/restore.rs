//! Restoring a backup: a volume image into a new volume or an image file, a VM backup into a
//! new VM. Nothing half-made ever carries the name asked for: a volume is filled as
//! `NAME.restoring` and renamed when complete (a failed restore deletes it; one left by a killed
//! process is replaced by the next restore to that name), a file is written as `FILE.partial`
//! and renamed or converted.

use cairn_backup::restore::restore;
use cairn_backup::sink::{FileSink, VolumeSink};
use cairn_backup::{BackupError, Manifest, Repository};
use cairn_engine::Store;

use super::{BackupGuards, RestoreReport, RestoreTo};
use crate::error::{ErrorKind, OpError};

/// Restores backup `m` to `to`; `progress` hears millionths done.
pub(super) fn restore_to(
    store: &Store,
    guards: &BackupGuards,
    r: &Repository,
    m: &Manifest,
    to: RestoreTo,
    progress: &mut dyn cairn_backup::Progress,
) -> Result<RestoreReport, OpError> {
    match (to, m.kind.as_str()) {
        (RestoreTo::Volume { name }, "vm") => {
            super::vm::restore_vm(store, guards, r, m, &name, progress)
        }
        (RestoreTo::File { .. }, "vm") => Err(OpError::new(
            ErrorKind::Invalid,
            format!(
                "backup {} is of VM '{}' ({} images); restore it as a new VM with --to NAME",
                m.id,
                m.name,
                m.images.len()
            ),
        )),
        (RestoreTo::Volume { name }, _) => {
            cairn_engine::validate_name(&name)?;
            if store.volume_info(&name).is_ok() {
                return Err(cairn_engine::Error::VolumeExists(name).into());
            }
            image_to_volume(store, guards, r, m, 0, &name, progress)?;
            Ok(RestoreReport {
                id: m.id.clone(),
                to: name,
                size: m.images[0].size,
                next: None,
            })
        }
        (RestoreTo::File { path, format }, _) => {
            let partial = path.with_extension(match path.extension() {
                Some(e) => format!("{}.partial", e.to_string_lossy()),
                None => "partial".into(),
            });
            let result = (|| -> Result<(), OpError> {
                let mut sink = FileSink::create(&partial, m.images[0].size)?;
                restore(r, m, 0, &mut sink, progress)?;
                sink.finish()?;
                match format.as_str() {
                    "raw" => std::fs::rename(&partial, &path)
                        .map_err(|e| BackupError::io("rename", &path, e))?,
                    f => convert(&partial, &path, f)?,
                }
                Ok(())
            })();
            let _ = std::fs::remove_file(&partial);
            result?;
            Ok(RestoreReport {
                id: m.id.clone(),
                to: path.display().to_string(),
                size: m.images[0].size,
                next: None,
            })
        }
    }
}

/// Restores image `image` of `m` into new volume `name` (through `name.restoring`).
pub(super) fn image_to_volume(
    store: &Store,
    guards: &BackupGuards,
    r: &Repository,
    m: &Manifest,
    image: usize,
    name: &str,
    progress: &mut dyn cairn_backup::Progress,
) -> Result<(), OpError> {
    let partial = format!("{name}.restoring");
    let _claim = guards.claim_restore(&partial)?;
    if store.volume_info(&partial).is_ok() {
        store.delete_volume(&partial)?;
    }
    store.create_volume(&partial, m.images[image].size)?;
    let mut sink = VolumeSink {
        store,
        volume: partial.clone(),
    };
    let done = restore(r, m, image, &mut sink, progress)
        .map_err(OpError::from)
        .and_then(|()| Ok(store.flush()?))
        .and_then(|()| Ok(store.rename_volume(&partial, name)?));
    if let Err(e) = done {
        let _ = store.delete_volume(&partial);
        return Err(e);
    }
    Ok(())
}

/// Converts a raw image to `format` with `qemu-img convert` (holes stay holes).
fn convert(raw: &std::path::Path, out: &std::path::Path, format: &str) -> Result<(), OpError> {
    let result = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", format])
        .arg(raw)
        .arg(out)
        .output();
    match result {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(OpError::new(
            ErrorKind::Io,
            format!(
                "qemu-img could not write {} as {format}: {}",
                out.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        )),
        Err(e) => Err(OpError::new(
            ErrorKind::Io,
            format!("cannot run qemu-img to write {format} ({e}); run ./scripts/setup.sh (or install qemu-utils), or restore with --to-file FILE.raw"),
        )),
    }
}
