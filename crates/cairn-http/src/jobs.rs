//! Long work as jobs: `POST /api/v1/jobs` starts an operation and answers at once with the
//! job's id; its progress and outcome stream as server-sent events; `DELETE` cancels it. The
//! newest [`KEPT`] finished jobs stay listed.
//!
//! Cancelling asks the operation to stop (see `cairn_control::Progress`): copy loops (a backup,
//! restore, verify or GC) stop at their next batch, a running VM's checkpoint where it waits, and
//! the job ends `cancelled` once they have. Steps that cannot stop half-way (the engine's deletes,
//! a prune) run to their end, and the job ends as they did: a job's state is always what happened.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::{Extension, Json};
use cairn_control::jobs::{JobInfo, JobState};
use cairn_control::{ErrorKind, Op, OpError, Progress};
use futures_util::Stream;
use tokio::sync::watch;

use crate::auth::Caller;
use crate::routes::ops::admit;
use crate::{ApiError, AppState, Body, Path};

/// Finished jobs kept for listing.
pub const KEPT: usize = 100;

/// How long a cancel waits for the work to stop before it answers (with the job still running
/// if it has not; its events tell the end).
pub const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

struct Job {
    state: watch::Sender<JobInfo>,
    /// The operation's progress, which also carries the cancel.
    progress: Progress,
}

impl Job {
    fn info(&self) -> JobInfo {
        self.state.borrow().clone()
    }

    fn finished(&self) -> bool {
        self.state.borrow().status.finished()
    }
}

/// The daemon's jobs.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<Job>>>,
}

impl Jobs {
    fn get(&self, id: u64) -> Result<Arc<Job>, ApiError> {
        cairn_engine::sync::lock(&self.map)
            .get(&id)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::NotFound,
                    format!("no job {id}; GET /api/v1/jobs lists them"),
                )
            })
    }

    fn add(&self, id: u64, job: Arc<Job>) {
        let mut m = cairn_engine::sync::lock(&self.map);
        m.insert(id, job);
        let finished: Vec<u64> = m
            .iter()
            .filter(|(_, j)| j.finished())
            .map(|(id, _)| *id)
            .collect();
        for id in finished.iter().take(finished.len().saturating_sub(KEPT)) {
            m.remove(id);
        }
    }
}

/// Starts an operation as a job.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = Op,
    responses((status = 202, body = JobInfo), (status = "default", body = OpError)))]
pub async fn start(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Body(op): Body<Op>,
) -> Result<(StatusCode, Json<JobInfo>), ApiError> {
    let op = admit(&caller, op)?;
    let name = serde_json::to_value(&op)
        .ok()
        .and_then(|v| v["op"].as_str().map(str::to_string))
        .unwrap_or_default();
    let id = st.jobs.next.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, _) = watch::channel(JobInfo {
        id,
        op: name,
        progress: 0,
        status: JobState::Running,
    });
    let state = tx.clone();
    let progress = Progress::new(move |n| {
        state.send_if_modified(|i| {
            if i.status.finished() {
                return false;
            }
            i.progress = n;
            true
        });
    });
    let job = Arc::new(Job {
        state: tx,
        progress: progress.clone(),
    });
    let service = st.service.clone();
    let runner = job.clone();
    tokio::spawn(async move {
        let end = match service.run(op, progress).await {
            Ok(r) => JobState::Done { reply: Box::new(r) },
            Err(e) if e.kind == ErrorKind::Cancelled => JobState::Cancelled,
            Err(error) => JobState::Failed { error },
        };
        runner.state.send_if_modified(|i| {
            if i.status.finished() {
                return false;
            }
            i.status = end;
            true
        });
    });
    st.jobs.add(id, job.clone());
    Ok((StatusCode::ACCEPTED, Json(job.info())))
}

/// Every job still kept, oldest first.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    responses((status = 200, body = [JobInfo]), (status = "default", body = OpError)))]
pub async fn list(State(st): State<AppState>) -> Json<Vec<JobInfo>> {
    let m = cairn_engine::sync::lock(&st.jobs.map);
    Json(m.values().map(|j| j.info()).collect())
}

/// One job.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, body = JobInfo), (status = "default", body = OpError)))]
pub async fn info(
    State(st): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Json<JobInfo>, ApiError> {
    Ok(Json(st.jobs.get(id)?.info()))
}

/// Cancels a running job and answers once it has stopped (a finished one stays as it ended;
/// one that finished before it heard the cancel ends `done`).
#[utoipa::path(delete, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, body = JobInfo), (status = "default", body = OpError)))]
pub async fn cancel(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<u64>,
) -> Result<Json<JobInfo>, ApiError> {
    caller.may_write("cancel a job")?;
    let job = st.jobs.get(id)?;
    if job.finished() {
        return Ok(Json(job.info()));
    }
    job.progress.cancel();
    let mut rx = job.state.subscribe();
    let _ = tokio::time::timeout(CANCEL_WAIT, rx.wait_for(|i| i.status.finished())).await;
    Ok(Json(job.info()))
}

/// The job's state now and at every change, as server-sent events named after the state
/// (`running`, `done`, `failed`, `cancelled`; data: the job's JSON); ends when it finishes.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = u64, Path, description = "Job id")),
    responses((status = 200, content_type = "text/event-stream", body = String,
        description = "One event per change of the job's state, data the job's JSON"),
        (status = "default", body = OpError)))]
pub async fn events(
    State(st): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let job = st.jobs.get(id)?;
    let rx = job.state.subscribe();
    // (receiver, first event still to send, finished)
    let stream =
        futures_util::stream::unfold((rx, true, false), |(mut rx, first, done)| async move {
            if done {
                return None;
            }
            if !first && rx.changed().await.is_err() {
                return None;
            }
            // Progress closer together than a tenth of a second is folded into the next event.
            if !rx.borrow().status.finished() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let info = rx.borrow_and_update().clone();
            let finished = info.status.finished();
            let ev = SseEvent::default()
                .event(info.status.name())
                .data(serde_json::to_string(&info).unwrap_or_default());
            Some((Ok(ev), (rx, false, finished)))
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
