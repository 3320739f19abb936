//! Cairn's operations as one API. [`ops`] defines every operation as data, [`execute`] performs
//! it on a store (`vm_ops.rs` for a VM's checkpoints), [`reports`] holds what operations report
//! beyond the engine's own types, and [`client`] sends operations to a running daemon instead.
//! The CLI picks one of the two; the daemon serves [`execute`] over HTTP.

pub mod client;
mod error;
mod execute;
pub mod names;
pub mod ops;
pub mod reports;
mod vm_ops;

pub use client::{control_socket, Client, DaemonStatus, StreamLine, CONTROL_SOCKET, NDJSON};
pub use error::{ErrorKind, OpError};
pub use execute::execute;
pub use ops::{Op, Reply, MAX_DATA};
pub use vm_ops::{
    apply_disks_or_restore, keep_before_apply, new_vm_checkpoint_name, put_back_error,
    vm_checkpoint_stopped, AUTOMATIC_PREFIX, UNNAMED_PREFIX,
};
