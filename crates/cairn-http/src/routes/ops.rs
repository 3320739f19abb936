//! The operation route (everything the CLI can do, as the same [`Op`] it sends the daemon) and
//! the daemon's status.

use axum::extract::State;
use axum::{Extension, Json};
use cairn_control::{DaemonStatus, ErrorKind, Op, OpError, Reply};

use super::Answer;
use crate::auth::Caller;
use crate::{ApiError, AppState, Body};

/// The daemon: pid, store, NBD sockets, version.
#[utoipa::path(get, path = "/api/v1/status", tag = "daemon",
    responses((status = 200, body = DaemonStatus), (status = "default", body = OpError)))]
pub async fn status(State(st): State<AppState>) -> Json<DaemonStatus> {
    Json((*st.status).clone())
}

/// Refuses what only the store's owner runs (tokens) to TCP clients, and writes by a
/// read-only token; a checkpoint list comes in pages (see [`Op::with_page_limit`]).
pub fn admit(caller: &Caller, op: Op) -> Result<Op, ApiError> {
    if matches!(op, Op::Token(_)) && !matches!(caller, Caller::Owner) {
        return Err(ApiError::new(
            ErrorKind::Forbidden,
            "tokens are managed by the store's owner with `cairn token ...`, not over HTTP",
        ));
    }
    if !op.is_read_only() {
        caller.may_write("run this operation")?;
    }
    Ok(op.with_page_limit())
}

/// Runs any operation the CLI can run and returns its reply. Long work is better started as a
/// job (`POST /api/v1/jobs`), whose progress streams.
#[utoipa::path(post, path = "/api/v1/ops", tag = "operations", request_body = Op,
    responses((status = 200, body = Reply), (status = "default", body = OpError)))]
pub async fn run(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Body(op): Body<Op>,
) -> Answer<Reply> {
    let op = admit(&caller, op)?;
    Ok(Json(st.call(op).await?))
}
