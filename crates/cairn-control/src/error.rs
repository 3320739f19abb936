//! How an operation fails: a kind callers (and HTTP) react to, and the one-line message users
//! see. Engine and VM errors keep their kind across the crate boundary.

use cairn_engine::Error as EngineError;
use cairn_vm::VmError;
use serde::{Deserialize, Serialize};

/// What kind of failure an [`OpError`] is, so callers (and HTTP) can react without parsing text.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A volume or checkpoint that does not exist.
    NotFound,
    /// A name already taken.
    Exists,
    /// A request that cannot be done as asked (bad name, range, size...).
    Invalid,
    /// The host filesystem is full.
    NoSpace,
    /// The store is held by another process, or an object is in use by clients.
    Busy,
    /// The store's metadata is damaged.
    Corrupt,
    /// The host failed an I/O call.
    Io,
    /// The daemon could not be reached or answered nonsense.
    Daemon,
    /// The object is in the wrong state for the request (e.g. a running VM).
    State,
    /// QEMU is missing, too old, or failed.
    Vm,
    /// A passphrase is missing or wrong.
    Auth,
    /// A remote object store (S3) failed or could not be reached.
    Remote,
    /// The caller is known but may not do this (a read-only token writing, a cross-origin
    /// request, an operation only the store's owner may run).
    Forbidden,
    /// Too many failed attempts from the caller's address; try again later.
    Limited,
    /// The work was cancelled (its job was) before it finished.
    Cancelled,
}

/// A failed operation: a kind and the one-line message users see.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Kind of failure.
    pub kind: ErrorKind,
    /// What failed, on which object, and what to do.
    pub message: String,
}

impl OpError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
        }
    }
}

impl ErrorKind {
    /// The kind's name in JSON (`not_found`, `no_space`...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Exists => "exists",
            ErrorKind::Invalid => "invalid",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Busy => "busy",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "io",
            ErrorKind::Daemon => "daemon",
            ErrorKind::State => "state",
            ErrorKind::Vm => "vm",
            ErrorKind::Auth => "auth",
            ErrorKind::Remote => "remote",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Limited => "limited",
            ErrorKind::Cancelled => "cancelled",
        }
    }

    /// The kind of an engine error.
    pub fn of_engine(e: &EngineError) -> ErrorKind {
        use EngineError as E;
        match e {
            E::UnknownVolume(_) | E::UnknownCheckpoint { .. } | E::NoStore(_) => {
                ErrorKind::NotFound
            }
            E::VolumeExists(_) | E::CheckpointExists { .. } | E::StoreExists(_) => {
                ErrorKind::Exists
            }
            E::InvalidName { .. }
            | E::OutOfRange { .. }
            | E::InvalidSize { .. }
            | E::Invalid(_) => ErrorKind::Invalid,
            E::NoSpace { .. } => ErrorKind::NoSpace,
            E::Locked { .. } => ErrorKind::Busy,
            E::Corrupt { .. } | E::Format { .. } => ErrorKind::Corrupt,
            E::Io { .. } => ErrorKind::Io,
        }
    }

    /// The kind of a VM error.
    pub fn of_vm(e: &VmError) -> ErrorKind {
        match e {
            VmError::UnknownVm(_) => ErrorKind::NotFound,
            VmError::Exists(_) => ErrorKind::Exists,
            VmError::Running(_) | VmError::NotRunning(_) => ErrorKind::State,
            VmError::Invalid(_) => ErrorKind::Invalid,
            VmError::UnknownCheckpoint { .. } => ErrorKind::NotFound,
            VmError::State(_) => ErrorKind::State,
            VmError::Engine(e) => ErrorKind::of_engine(e),
            VmError::Qemu(_) | VmError::Qmp(_) => ErrorKind::Vm,
            VmError::Io { .. } => ErrorKind::Io,
            VmError::InUse(_) => ErrorKind::Busy,
            VmError::NeedsDaemon(_) => ErrorKind::State,
            VmError::Internal(_) => ErrorKind::Daemon,
            VmError::Context { source, .. } => ErrorKind::of_vm(source),
        }
    }
}

impl From<EngineError> for OpError {
    fn from(e: EngineError) -> OpError {
        OpError::new(ErrorKind::of_engine(&e), e.to_string())
    }
}

impl From<VmError> for OpError {
    fn from(e: VmError) -> OpError {
        OpError::new(ErrorKind::of_vm(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_their_json() {
        use ErrorKind as K;
        for k in [
            K::NotFound,
            K::Exists,
            K::Invalid,
            K::NoSpace,
            K::Busy,
            K::Corrupt,
            K::Io,
            K::Daemon,
            K::State,
            K::Vm,
            K::Auth,
            K::Remote,
            K::Forbidden,
            K::Limited,
            K::Cancelled,
        ] {
            assert_eq!(serde_json::to_value(k).expect("json"), k.name());
        }
    }
}
