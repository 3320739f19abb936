//! The control API the daemon serves on its unix socket: `POST /v1/ops` hands one [`Op`] to the
//! daemon's [`Service`] and renders what it answers; `GET /v1/status` describes the daemon; and
//! the HTTP API's routes without tokens (`/api/v1/...`, jobs and their progress streams among
//! them). Nothing here decides anything about an operation.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_control::{no_progress, DaemonStatus, ErrorKind, Op, OpError, Service};
use tracing::{info, warn};

#[derive(Clone)]
struct ApiState {
    service: Arc<Service>,
    status: Arc<DaemonStatus>,
}

/// The API's routes over `service`, and the HTTP API's routes for the store's owner (jobs
/// among them: the CLI's progress comes from their event streams).
pub fn router(service: Arc<Service>, status: DaemonStatus, http: cairn_http::AppState) -> Router {
    Router::new()
        .route("/v1/ops", post(ops))
        .route("/v1/status", get(daemon_status))
        // An operation carries at most MAX_DATA bytes, base64-encoded in JSON.
        .layer(axum::extract::DefaultBodyLimit::max(
            (cairn_control::MAX_DATA as usize) * 4 / 3 + (64 << 10),
        ))
        .with_state(ApiState {
            service,
            status: Arc::new(status),
        })
        .merge(cairn_http::owner_router(http))
}

/// Serves the API on `listener` until `stop` completes (calls in flight finish first).
pub async fn serve(
    listener: tokio::net::UnixListener,
    service: Arc<Service>,
    status: DaemonStatus,
    http: cairn_http::AppState,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router(service, status, http))
        .with_graceful_shutdown(stop)
        .await
    {
        warn!("control API stopped: {e}");
    }
}

fn failure(e: OpError) -> Response {
    (cairn_http::status_of(e.kind), Json(e)).into_response()
}

async fn ops(State(st): State<ApiState>, body: Bytes) -> Response {
    let op: Op = match serde_json::from_slice(&body) {
        Ok(op) => op,
        Err(e) => {
            warn!("api: malformed request refused: {e}");
            return failure(OpError::new(
                ErrorKind::Invalid,
                format!("malformed operation: {e}"),
            ));
        }
    };
    let name = serde_json::to_value(&op)
        .ok()
        .and_then(|v| v["op"].as_str().map(str::to_string))
        .unwrap_or_default();
    match st.service.run(op, no_progress()).await {
        Ok(reply) => {
            info!("api: {name}");
            (StatusCode::OK, Json(reply)).into_response()
        }
        Err(e) => {
            info!("api: {name} failed: {e}");
            failure(e)
        }
    }
}

async fn daemon_status(State(st): State<ApiState>) -> Json<DaemonStatus> {
    Json((*st.status).clone())
}
