//! The store directory's files: the lock that makes one process own a store, and opening the
//! data and journal files.

use super::*;

/// Takes the store lock, recording our pid for whoever tries next.
pub fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io("open lock file", path.display().to_string()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(Error::Locked {
                path: dir.display().to_string(),
                holder: holder.trim().to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io("lock", path.display().to_string())(e))
        }
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// How a store file is opened: plain, or (the data file of a serving store) with the fast paths
/// the options ask for.
#[derive(Clone, Copy)]
pub(crate) struct FileAccess {
    pub(crate) mapped_reads: bool,
    pub(crate) direct_writes: bool,
}

impl FileAccess {
    pub(crate) const PLAIN: FileAccess = FileAccess {
        mapped_reads: false,
        direct_writes: false,
    };

    pub(super) fn data(opts: &Options) -> FileAccess {
        FileAccess {
            mapped_reads: opts.mapped_reads,
            direct_writes: opts.direct_writes,
        }
    }
}

/// Opens one of a store's files as a device, with the fast paths `access` asks for.
pub(crate) fn open_file(path: &Path, create: bool, access: FileAccess) -> Result<Arc<dyn Device>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(Error::io("open", path.display().to_string()))?;
    let mut dev = if access.mapped_reads {
        FileDevice::with_read_mapping(f).with_background_reads(path)
    } else {
        FileDevice::new(f)
    };
    if access.direct_writes {
        dev = dev.with_direct_writes(path);
    }
    Ok(Arc::new(dev))
}
