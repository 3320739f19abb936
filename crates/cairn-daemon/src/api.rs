//! The control API the daemon serves: `POST /v1/ops` runs one [`Op`] through the same
//! [`execute`] the CLI uses without a daemon; `GET /v1/status` describes the daemon. Operations
//! run on tokio's blocking pool, since the engine does synchronous I/O.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_control::{execute, DaemonStatus, ErrorKind, Op, OpError, Reply};
use cairn_engine::Store;
use cairn_vm::{Runtime, VmError};
use tracing::{info, warn};

#[derive(Clone)]
struct ApiState {
    store: Arc<Store>,
    runtime: Arc<Runtime>,
    status: Arc<DaemonStatus>,
}

/// The API's routes over `store` and its VMs.
pub fn router(store: Arc<Store>, runtime: Arc<Runtime>, status: DaemonStatus) -> Router {
    Router::new()
        .route("/v1/ops", post(ops))
        .route("/v1/status", get(daemon_status))
        // An operation carries at most MAX_DATA bytes, base64-encoded in JSON.
        .layer(axum::extract::DefaultBodyLimit::max(
            (cairn_control::MAX_DATA as usize) * 4 / 3 + (64 << 10),
        ))
        .with_state(ApiState {
            store,
            runtime,
            status: Arc::new(status),
        })
}

/// Serves the API on `listener` until `stop` completes (calls in flight finish first).
pub async fn serve(
    listener: tokio::net::UnixListener,
    store: Arc<Store>,
    runtime: Arc<Runtime>,
    status: DaemonStatus,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router(store, runtime, status))
        .with_graceful_shutdown(stop)
        .await
    {
        warn!("control API stopped: {e}");
    }
}

fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Exists => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Busy => StatusCode::LOCKED,
        ErrorKind::Corrupt | ErrorKind::Io => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Daemon => StatusCode::BAD_GATEWAY,
        ErrorKind::State => StatusCode::CONFLICT,
        ErrorKind::Vm => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn failure(e: OpError) -> Response {
    (http_status(e.kind), Json(e)).into_response()
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
    let store = st.store.clone();
    // Operations on running VMs, and the checks that need to know what runs, happen here; all
    // else is the same `execute` the CLI runs without a daemon.
    let rt = &st.runtime;
    let vm_reply = match &op {
        Op::VmStart { name } => Some(rt.start(name).await.map(Reply::VmStatus)),
        Op::VmStop { name, timeout_secs } => Some(
            rt.stop(name, std::time::Duration::from_secs(*timeout_secs))
                .await
                .map(Reply::VmStatus),
        ),
        Op::VmKill { name } => Some(rt.kill(name).await.map(Reply::VmStatus)),
        Op::VmStatus { name } => Some(
            rt.definitions()
                .get(name)
                .map(|_| Reply::VmStatus(rt.status(name))),
        ),
        Op::VmDelete { name } if rt.is_running(name) => Some(Err(VmError::Running(name.clone()))),
        Op::VmEdit(def) if rt.is_running(&def.name) => {
            Some(Err(VmError::Running(def.name.clone())))
        }
        Op::CheckpointApply { volume, .. } | Op::VolumeDelete { name: volume } => {
            rt.user_of(volume).map(|vm| {
                Err(VmError::Invalid(format!(
                    "volume '{volume}' is a disk of running VM '{vm}'; stop the VM first"
                )))
            })
        }
        _ => None,
    };
    if let Some(r) = vm_reply {
        return match r {
            Ok(reply) => {
                info!("api: {name}");
                (StatusCode::OK, Json(reply)).into_response()
            }
            Err(e) => {
                info!("api: {name} failed: {e}");
                failure(e.into())
            }
        };
    }
    match tokio::task::spawn_blocking(move || execute(&store, op, &mut |_| {})).await {
        Ok(Ok(reply)) => {
            info!("api: {name}");
            (StatusCode::OK, Json(reply)).into_response()
        }
        Ok(Err(e)) => {
            info!("api: {name} failed: {e}");
            failure(e)
        }
        Err(e) => failure(OpError::new(
            ErrorKind::Daemon,
            format!("operation {name} crashed in the daemon: {e}"),
        )),
    }
}

async fn daemon_status(State(st): State<ApiState>) -> Json<DaemonStatus> {
    Json((*st.status).clone())
}
