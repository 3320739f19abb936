//! The control API the daemon serves: `POST /v1/ops` hands one [`Op`] to the daemon's
//! [`Service`] and renders what it answers (whole, or streamed with progress); `GET /v1/status`
//! describes the daemon. Nothing here decides anything about an operation.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_control::{
    no_progress, DaemonStatus, ErrorKind, Op, OpError, Progress, Service, StreamLine,
};
use tracing::{info, warn};

#[derive(Clone)]
struct ApiState {
    service: Arc<Service>,
    status: Arc<DaemonStatus>,
}

/// The API's routes over `service`.
pub fn router(service: Arc<Service>, status: DaemonStatus) -> Router {
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
}

/// Serves the API on `listener` until `stop` completes (calls in flight finish first).
pub async fn serve(
    listener: tokio::net::UnixListener,
    service: Arc<Service>,
    status: DaemonStatus,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router(service, status))
        .with_graceful_shutdown(stop)
        .await
    {
        warn!("control API stopped: {e}");
    }
}

fn failure(e: OpError) -> Response {
    (cairn_http::status_of(e.kind), Json(e)).into_response()
}

async fn ops(State(st): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
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
    let streamed = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(cairn_control::NDJSON));
    if streamed {
        return streamed_run(st, op, name);
    }
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

/// Answers at once and streams the operation's progress, then its outcome, one JSON line each
/// ([`StreamLine`]). The operation runs to its end even if the client goes away: work such as a
/// delete is not left half-done because a terminal closed.
fn streamed_run(st: ApiState, op: Op, name: String) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let line = |l: &StreamLine| {
        let mut v = serde_json::to_vec(l).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    };
    let progress = progress_to(tx.clone(), line);
    tokio::spawn(async move {
        let end = match st.service.run(op, progress).await {
            Ok(reply) => {
                info!("api: {name}");
                StreamLine::Reply(Box::new(reply))
            }
            Err(e) => {
                info!("api: {name} failed: {e}");
                StreamLine::Error(e)
            }
        };
        let _ = tx.send(line(&end));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, cairn_control::NDJSON)],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Progress for a streamed answer's channel: reports closer together than a tenth of a second
/// are dropped; the outcome follows anyway.
fn progress_to(
    tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
    line: impl Fn(&StreamLine) -> Bytes + Send + Sync + 'static,
) -> Progress {
    let last = std::sync::Mutex::new(None::<std::time::Instant>);
    Arc::new(move |n| {
        let mut last = cairn_engine::sync::lock(&last);
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let _ = tx.send(line(&StreamLine::Progress(n)));
    })
}

async fn daemon_status(State(st): State<ApiState>) -> Json<DaemonStatus> {
    Json((*st.status).clone())
}
