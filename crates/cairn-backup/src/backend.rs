//! The repository's object storage: named, immutable objects put whole, read whole or by byte
//! ranges, listed by prefix and deleted. A local directory and S3 implement it; everything above
//! sees only [`Backend`].
//!
//! A put is atomic: readers see the whole object or none (a local put writes a temporary file,
//! syncs it and renames it into place; an S3 PUT is all-or-nothing).

use std::ops::Range;

use crate::error::Result;
use crate::location::{Access, Location};

mod local;
mod s3;

pub use local::LocalDir;
pub use s3::S3Bucket;

/// Longest range a backend reads with one request. Callers that can, ask for ranges no longer
/// than this: each is then one request whose reply becomes the returned buffer without a copy.
pub const READ_PART: u64 = 2 << 20;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository root, `/`-separated.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modified, ms since the Unix epoch.
    pub modified_ms: u64,
}

/// A repository's object storage.
pub trait Backend: Send + Sync {
    /// Where it is, for messages.
    fn location(&self) -> &Location;
    /// Stores `data` under `key`, replacing any object there, atomically and durably.
    fn put(&self, key: &str, data: Vec<u8>) -> Result<()>;
    /// The whole object, or `None` if there is none.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Byte ranges of one object, in the order asked (see [`READ_PART`]).
    fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>>;
    /// Every object whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Removes an object; removing a missing one is not an error.
    fn delete(&self, key: &str) -> Result<()>;
}

/// Opens the storage `access` names (nothing is read yet).
pub fn open(access: &Access) -> Result<Box<dyn Backend>> {
    match &access.location {
        Location::Local { path } => Ok(Box::new(LocalDir::new(path.clone()))),
        Location::S3 { .. } => Ok(Box::new(S3Bucket::new(access)?)),
    }
}
