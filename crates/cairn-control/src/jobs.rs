//! What a job is, as clients see it: long work the daemon runs on its own (started over HTTP, on
//! TCP or on the control socket), whose progress and outcome stream as server-sent events. The
//! registry that runs them is the HTTP front end's (`cairn-http`); these are the shared shapes.

use serde::{Deserialize, Serialize};

use crate::{OpError, Reply};

/// Where a job stands.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Working.
    Running,
    /// Finished; the operation's reply.
    Done {
        /// What the operation returned.
        reply: Box<Reply>,
    },
    /// Failed.
    Failed {
        /// Why.
        error: OpError,
    },
    /// Cancelled before it finished.
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub fn finished(&self) -> bool {
        !matches!(self, JobState::Running)
    }

    /// The state's name (also the name of its server-sent event).
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done { .. } => "done",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job as listed and streamed.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Its id.
    pub id: u64,
    /// The operation's name (`backup`, `volume_defrag`...).
    pub op: String,
    /// How far it got, in the operation's own measure (bytes done for copies and deletes); kept
    /// after the end.
    pub progress: u64,
    /// Where it stands.
    pub status: JobState,
}
