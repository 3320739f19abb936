//! Cairn's operations as one API. [`ops`] defines every operation as data; a [`Service`] runs
//! each of them, in the daemon or, without one, in the CLI itself; [`execute`] is the part that
//! needs only the store (`vm_ops.rs` for a stopped VM's checkpoints); [`reports`] holds what
//! operations report beyond the engine's own types; [`client`] sends operations to a running
//! daemon instead.

pub mod backup;
pub mod client;
mod error;
mod execute;
mod files;
pub mod group;
pub mod jobs;
pub mod lifecycle;
pub use cairn_engine::names;
pub mod ops;
mod paging;
mod progress;
pub mod reports;
mod service;
pub mod tokens;
mod vm_ops;

pub use client::{control_socket, Client, DaemonStatus, CONTROL_SOCKET};
pub use error::{ErrorKind, OpError};
pub use execute::execute;
pub use ops::{Op, Reply, MAX_CHECKPOINT_PAGE, MAX_DATA};
pub use progress::{no_progress, Progress};
pub use service::Service;
