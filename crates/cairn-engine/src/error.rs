//! The engine's one error type: each variant says what failed, on which object, and what to do.

use std::io;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host I/O call failed.
    #[error("{op} failed on {path}: {source}")]
    Io {
        /// What the engine was doing.
        op: &'static str,
        /// The file involved.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The host filesystem is full.
    #[error("{op} failed on {path}: the host filesystem is full; free space on it, or delete checkpoints (`cairn space` shows what each would free)")]
    NoSpace {
        /// What the engine was doing.
        op: &'static str,
        /// The file involved.
        path: String,
    },
    /// Another process owns the store.
    #[error("store {path} is in use by process {holder}; stop it (or talk to its daemon) before opening the store again")]
    Locked {
        /// Store directory.
        path: String,
        /// The pid written by the holder.
        holder: String,
    },
    /// No store was initialised at this path.
    #[error("no Cairn store at {0}; run `cairn init` (or pass --store DIR)")]
    NoStore(String),
    /// `init` on a directory that already holds a store.
    #[error("a Cairn store already exists at {0}")]
    StoreExists(String),
    /// A volume name that no volume has.
    #[error("volume '{0}' not found; `cairn volume list` shows the volumes")]
    UnknownVolume(String),
    /// A checkpoint name that the volume does not have.
    #[error("checkpoint '{volume}@{name}' not found; `cairn checkpoint list {volume}` shows its checkpoints")]
    UnknownCheckpoint {
        /// Volume name.
        volume: String,
        /// Checkpoint name.
        name: String,
    },
    /// Creating a volume whose name is taken.
    #[error("volume '{0}' already exists; pick another name or delete it first")]
    VolumeExists(String),
    /// Creating a checkpoint whose name is taken on that volume.
    #[error("checkpoint '{volume}@{name}' already exists; pick another name or delete it first")]
    CheckpointExists {
        /// Volume name.
        volume: String,
        /// Checkpoint name.
        name: String,
    },
    /// A name with characters Cairn does not accept.
    #[error("invalid name '{name}': {why}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        why: &'static str,
    },
    /// I/O that reaches past the end of a volume.
    #[error(
        "{op} of {len} bytes at offset {offset} reaches past the end of '{target}' ({size} bytes)"
    )]
    OutOfRange {
        /// `read`, `write`, `trim`...
        op: &'static str,
        /// Volume or checkpoint.
        target: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Size of the target.
        size: u64,
    },
    /// A size that is not acceptable for a volume.
    #[error("invalid size {size} for volume '{volume}': {why}")]
    InvalidSize {
        /// Volume name.
        volume: String,
        /// Requested size.
        size: u64,
        /// Why.
        why: String,
    },
    /// On-disk metadata failed its checks.
    #[error("corrupt metadata in block {block}: {what}; run `cairn fsck` for a full report")]
    Corrupt {
        /// Block number in the data file.
        block: u64,
        /// What was wrong.
        what: String,
    },
    /// The store was written by an incompatible version.
    #[error("unsupported store format at {path}: {what}")]
    Format {
        /// Store path.
        path: String,
        /// What did not match.
        what: String,
    },
    /// A request that makes no sense, e.g. writing to a checkpoint.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| {
            if source.kind() == io::ErrorKind::StorageFull {
                Error::NoSpace { op, path }
            } else {
                Error::Io { op, path, source }
            }
        }
    }

    pub(crate) fn corrupt(block: u64, what: impl Into<String>) -> Error {
        Error::Corrupt {
            block,
            what: what.into(),
        }
    }
}
