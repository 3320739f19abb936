//! Cairn's VM runtime: VM definitions kept in the store ([`spec`]), QEMU processes supervised by
//! the daemon ([`runtime`]) and the QMP client that drives them ([`qmp`]). Disks are always
//! attached through Cairn's own NBD exports.

use std::path::Path;

pub mod checkpoint;
pub mod guest_agent;
pub mod qmp;
pub mod runtime;
pub mod spec;

pub use runtime::{find_qemu, now_ms, Runtime, VmStatus};
pub use spec::{VmSpec, VmStore};

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No VM of that name.
    #[error("VM '{0}' not found; `cairn vm list` shows the VMs")]
    UnknownVm(String),
    /// A VM of that name exists.
    #[error("VM '{0}' already exists; pick another name or delete it first")]
    Exists(String),
    /// The VM is running and the operation needs it stopped.
    #[error("VM '{0}' is running; stop it first (`cairn vm stop {0}`)")]
    Running(String),
    /// The VM is not running and the operation needs it running.
    #[error("VM '{0}' is not running; start it with `cairn vm start {0}`")]
    NotRunning(String),
    /// A request that cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
    /// No checkpoint of that name on the VM.
    #[error("checkpoint '{vm}@{name}' not found; `cairn checkpoint list {vm}` shows the VM's checkpoints")]
    UnknownCheckpoint {
        /// VM name.
        vm: String,
        /// Checkpoint name.
        name: String,
    },
    /// Something the request would change is protected or in use (a part of a VM checkpoint,
    /// a disk of another VM...); the message says what and how to proceed.
    #[error("{0}")]
    State(String),
    /// The store failed or refused an operation on one of the VM's volumes.
    #[error(transparent)]
    Engine(#[from] cairn_engine::Error),
    /// QEMU is missing, too old, or failed.
    #[error("{0}")]
    Qemu(String),
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    /// Something else holds what the operation would change (NBD clients on a disk...); the
    /// message names them and says how to proceed.
    #[error("{0}")]
    InUse(String),
    /// The operation needs a running daemon (it starts or drives QEMU).
    #[error(
        "{0} needs the Cairn daemon, which runs and supervises VMs; start it with `cairn serve`"
    )]
    NeedsDaemon(String),
    /// An error with what was being done when it happened, and what became of the VM; its kind
    /// is that of `source`.
    #[error("{source}; {context}")]
    Context {
        /// The error itself.
        source: Box<VmError>,
        /// What it meant for the operation.
        context: String,
    },
    /// A step of the operation crashed (a bug); the message says which.
    #[error("{0}")]
    Internal(String),
    /// A file of the VM could not be read or written.
    #[error("{op} failed on {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// This error, with what it meant for the operation.
    pub fn context(self, context: impl Into<String>) -> VmError {
        VmError::Context {
            source: Box::new(self),
            context: context.into(),
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> VmError {
        VmError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}
