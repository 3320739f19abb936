//! Backups of Cairn checkpoints: a repository of deduplicated, compressed, encrypted chunks on a
//! local disk or in S3, filled incrementally from the engine's exact changed blocks.
//!
//! - [`location`]: where a repository is and what opens it; [`backend`]: its object storage.
//! - [`crypto`]: keys, chunk ids and sealing; [`format`]: the objects and their encodings;
//!   [`map`]: which chunk holds each block of a backed-up volume.
//! - [`prune`]: which backups a retention policy keeps; [`session`] and [`gc`]: freeing unused
//!   data while other hosts write.
//! - [`repo`]: an open repository; [`create`], [`restore`], [`verify`]: what runs on it, telling
//!   a [`progress::Progress`] how far it got and stopping when it is cancelled;
//!   [`reader`]: one image read at any offset, for serving a backup where it lies.
//!
//! A backup's threads run at the lowest CPU priority ([`background`]), so the VMs beside it keep
//! their I/O. Everything here is synchronous, like the engine; S3 requests run on a small runtime of the
//! S3 backend's own.

pub mod backend;
pub mod background;
pub mod create;
pub mod crypto;
pub mod error;
pub mod format;
pub mod gc;
pub mod location;
pub mod map;
pub mod progress;
pub mod prune;
pub mod reader;
pub mod repo;
pub mod restore;
pub mod session;
pub mod sink;
pub mod verify;

pub use error::{BackupError, Result};
pub use format::Manifest;
pub use location::{Access, Location, S3Options, Secret};
pub use progress::Progress;
pub use repo::Repository;
