//! Cairn's operations as one API. [`ops`] defines every operation and the single function that
//! performs it on a store; [`client`] sends operations to a running daemon instead. The CLI
//! picks one of the two; the daemon serves [`ops::execute`] over HTTP.

pub mod client;
pub mod names;
pub mod ops;
pub mod reports;
mod vm_ops;

pub use client::{control_socket, Client, DaemonStatus, CONTROL_SOCKET};
pub use ops::{execute, ErrorKind, Op, OpError, Reply, MAX_DATA};
pub use vm_ops::{
    apply_disks_or_restore, keep_before_apply, new_vm_checkpoint_name, put_back_error,
    vm_checkpoint_stopped, AUTOMATIC_PREFIX, UNNAMED_PREFIX,
};
