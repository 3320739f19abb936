//! The API's routes, one file per kind of object. Each handler builds an [`Op`], runs it on the
//! service and returns the reply's content; the OpenAPI annotations beside them are the
//! document.

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_control::{Op, Reply};

use crate::{ApiError, AppState};

pub mod checkpoints;
pub mod console;
pub mod lifecycle;
pub mod ops;
pub mod vms;
pub mod volumes;

/// Every `/api/v1` route (the caller adds the token check).
pub fn api() -> Router<AppState> {
    Router::new()
        .route("/api/v1/status", get(ops::status))
        .route("/api/v1/ops", post(ops::run))
        .route("/api/v1/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/api/v1/volumes/{name}",
            get(volumes::info).delete(volumes::delete),
        )
        .route("/api/v1/vms", get(vms::list).post(vms::create))
        .route("/api/v1/vms/{name}", get(vms::info).delete(vms::delete))
        .route("/api/v1/vms/{name}/status", get(vms::status))
        .route("/api/v1/vms/{name}/start", post(vms::start))
        .route("/api/v1/vms/{name}/stop", post(vms::stop))
        .route("/api/v1/vms/{name}/kill", post(vms::kill))
        .route("/api/v1/vms/{name}/console", get(console::console))
        .route(
            "/api/v1/vms/{name}/console/stream",
            get(console::console_stream),
        )
        .route(
            "/api/v1/targets/{target}/checkpoints",
            get(checkpoints::list).post(checkpoints::create),
        )
        .route(
            "/api/v1/targets/{target}/checkpoints/{name}",
            axum::routing::delete(checkpoints::delete).patch(checkpoints::edit),
        )
        .route(
            "/api/v1/targets/{target}/checkpoints/{name}/apply",
            post(checkpoints::apply),
        )
        .route(
            "/api/v1/targets/{target}/checkpoints/{name}/clone",
            post(checkpoints::clone),
        )
        .route("/api/v1/targets/{target}/space", get(checkpoints::space))
        .route(
            "/api/v1/targets/{target}/space/freed",
            get(checkpoints::freed),
        )
        .route("/api/v1/targets/{target}/diff", get(checkpoints::diff))
        .route("/api/v1/policies", get(lifecycle::policies))
        .route(
            "/api/v1/policies/{target}",
            axum::routing::put(lifecycle::set_policy).delete(lifecycle::clear_policy),
        )
        .route("/api/v1/prune", get(lifecycle::prune_preview))
        .route("/api/v1/events", get(lifecycle::events))
        .route("/api/v1/events/stream", get(lifecycle::event_stream))
        .route(
            "/api/v1/jobs",
            post(crate::jobs::start).get(crate::jobs::list),
        )
        .route(
            "/api/v1/jobs/{id}",
            get(crate::jobs::info).delete(crate::jobs::cancel),
        )
        .route("/api/v1/jobs/{id}/events", get(crate::jobs::events))
}

/// What a route returns: a JSON value, or an error.
pub type Answer<T> = Result<Json<T>, ApiError>;

/// Runs `op` and hands back its reply.
pub async fn call(st: &AppState, op: Op) -> Result<Reply, ApiError> {
    st.call(op).await
}

/// 204 for operations that return nothing.
pub fn done(r: Reply) -> Result<StatusCode, ApiError> {
    match r {
        Reply::Done => Ok(StatusCode::NO_CONTENT),
        _ => Err(ApiError::unexpected("an operation that returns nothing")),
    }
}
