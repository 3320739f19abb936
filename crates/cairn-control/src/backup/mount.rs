//! Mounted backups: every image of a backup served read-only by the daemon's NBD server, read
//! from the repository as clients ask, so a VM can boot from a backup before a byte of it is
//! copied back. Mounts live as long as the daemon (a restarted daemon serves none).

use std::sync::Arc;

use cairn_backup::reader::ImageReader;
use cairn_backup::{Manifest, Repository};
use cairn_nbd::ImageSource;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};

/// One image of a backup as an NBD image source.
pub struct BackupImage {
    reader: ImageReader,
}

impl ImageSource for BackupImage {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.reader.read_at(offset, buf).map_err(|e| e.to_string())
    }

    fn description(&self) -> String {
        let m = self.reader.manifest();
        let img = &m.images[self.reader.image()];
        format!(
            "Cairn backup {} of {}@{} (read-only)",
            m.id, img.volume, img.checkpoint
        )
    }
}

/// An export a mount made.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountedExport {
    /// The NBD export name.
    pub export: String,
    /// The backup.
    pub backup: String,
    /// The volume the image was taken of (a VM's disk or its memory state).
    pub volume: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The export name of image `image` of backup `m`: `backup:ID` for a volume's backup,
/// `backup:ID:VOLUME` for each part of a VM's. The `:` keeps it apart from every volume name.
pub fn export_name(m: &Manifest, image: usize) -> String {
    match m.kind.as_str() {
        "vm" => format!("backup:{}:{}", m.id, m.images[image].volume),
        _ => format!("backup:{}", m.id),
    }
}

/// An export to make, and what it serves.
pub type Served = (MountedExport, Arc<dyn ImageSource>);

/// Opens every image of backup `m` for serving.
pub fn open_images(repo: Arc<Repository>, m: &Manifest) -> Result<Vec<Served>, OpError> {
    let mut out = Vec::new();
    for (i, img) in m.images.iter().enumerate() {
        let reader = ImageReader::open(repo.clone(), m.clone(), i)?;
        out.push((
            MountedExport {
                export: export_name(m, i),
                backup: m.id.clone(),
                volume: img.volume.clone(),
                size: img.size,
            },
            Arc::new(BackupImage { reader }) as Arc<dyn ImageSource>,
        ));
    }
    Ok(out)
}

/// The exports a mount serves, for `unmount`: those of backup `id` (a unique prefix is enough),
/// or the one export named `id`.
pub fn matching(attached: &[String], id: &str) -> Result<Vec<String>, OpError> {
    if attached.iter().any(|e| e == id) {
        return Ok(vec![id.to_string()]);
    }
    let bare = id.strip_prefix("backup:").unwrap_or(id);
    let mut backups: Vec<&str> = attached
        .iter()
        .filter_map(|e| e.strip_prefix("backup:"))
        .map(|rest| rest.split(':').next().unwrap_or(rest))
        .filter(|b| b.starts_with(bare))
        .collect();
    backups.sort_unstable();
    backups.dedup();
    match backups.as_slice() {
        [] => Err(OpError::new(
            ErrorKind::NotFound,
            format!("no mounted backup matches '{id}'; `cairn backup mounts` lists them"),
        )),
        [one] => Ok(attached
            .iter()
            .filter(|e| {
                e.strip_prefix("backup:")
                    .is_some_and(|r| r.split(':').next() == Some(*one))
            })
            .cloned()
            .collect()),
        many => Err(OpError::new(
            ErrorKind::Invalid,
            format!(
                "'{id}' matches {} mounted backups; give more of the id",
                many.len()
            ),
        )),
    }
}
