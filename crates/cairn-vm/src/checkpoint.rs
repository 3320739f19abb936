//! Checkpoints of a whole VM: one engine checkpoint of the same name on every disk, taken at one
//! instant, plus a record in `vms/NAME/checkpoints/CHECKPOINT.json` that says what was taken.
//!
//! A record is written as `pending` before any disk checkpoint exists and marked complete after
//! the last one, so a crash in between is recognised at the next start and rolled back
//! ([`VmStore::roll_back_pending`]): a half-made VM checkpoint never survives.
//!
//! [`record`] keeps the records; [`take`] takes a checkpoint of a stopped or running VM as one
//! transaction; [`apply`] makes a VM a checkpoint's state; [`state`] moves saved memory in and out
//! of the VM's state volume.

pub mod apply;
pub mod record;
pub mod running;
pub mod state;
pub mod take;
pub mod together;

pub use apply::*;
pub use record::*;
pub use running::*;
pub use state::*;
pub use take::*;
pub use together::*;

use crate::VmError;

/// Runs a short engine call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VmError> + Send + 'static,
) -> Result<T, VmError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VmError::Internal(format!("a store operation crashed: {e}")))?
}
