//! Cairn's volume engine: copy-on-write virtual disks with O(1) checkpoints, exact per-checkpoint
//! space accounting and crash safety. No async and no QEMU knowledge here; servers build on top.
//!
//! Start with [`Store`]; `docs/design.md` describes the on-disk format and why it is shaped so.

// Offsets are u64 and index memory as usize; format::slot relies on the two being the same width.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("Cairn needs a 64-bit target");

pub(crate) mod blockmap;
pub(crate) mod cache;
pub mod clock;
pub mod device;
pub mod error;
pub mod format;
pub mod fsck;
/// Public for its fuzz target (`fuzz/fuzz_targets/journal.rs`); nothing else outside uses it.
pub mod journal;
pub(crate) mod meta;
pub mod names;
pub mod store;
pub mod sync;

pub use clock::Clock;
pub use error::{Error, Result};
pub use store::{
    validate_name, CheckpointInfo, CheckpointSpace, DefragReport, Extent, Options, SaveCurrent,
    SpaceReport, Stats, Store, Target, VolumeInfo, VolumeSpace, DEFRAG_MIN_EXTENTS,
};
