//! Lifecycle policies, the prune preview, and the lifecycle's events (listed, or streamed as
//! server-sent events as they land).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use cairn_control::lifecycle::events::Event;
use cairn_control::lifecycle::prune::PruneReport;
use cairn_control::lifecycle::{LifecycleOp, LifecycleReply, Policy, PolicyInfo};
use cairn_control::{Op, OpError, Reply};
use futures_util::Stream;
use serde::Deserialize;

use super::{call, Answer};
use crate::{ApiError, AppState, Body, Path, Query};

async fn lifecycle(st: &AppState, op: LifecycleOp) -> Result<LifecycleReply, ApiError> {
    match call(st, Op::Lifecycle(op)).await? {
        Reply::Lifecycle(r) => Ok(r),
        _ => Err(ApiError::unexpected("a lifecycle operation")),
    }
}

async fn policies_of(st: &AppState, op: LifecycleOp) -> Answer<Vec<PolicyInfo>> {
    match lifecycle(st, op).await? {
        LifecycleReply::Policies(p) => Ok(Json(p)),
        _ => Err(ApiError::unexpected("a policy operation")),
    }
}

/// Every policy set (the store's default is the target `default`).
#[utoipa::path(get, path = "/api/v1/policies", tag = "lifecycle",
    responses((status = 200, body = [PolicyInfo]), (status = "default", body = OpError)))]
pub async fn policies(State(st): State<AppState>) -> Answer<Vec<PolicyInfo>> {
    policies_of(&st, LifecycleOp::PolicyList).await
}

/// Sets (replaces) a VM's, a volume's or the default policy; its `target` must match the path.
#[utoipa::path(put, path = "/api/v1/policies/{target}", tag = "lifecycle",
    params(("target" = String, Path, description = "VM, volume or `default`")),
    request_body = Policy,
    responses((status = 200, body = [PolicyInfo]), (status = "default", body = OpError)))]
pub async fn set_policy(
    State(st): State<AppState>,
    Path(target): Path<String>,
    Body(mut p): Body<Policy>,
) -> Answer<Vec<PolicyInfo>> {
    p.target = target;
    policies_of(&st, LifecycleOp::PolicySet(p)).await
}

/// Removes a policy.
#[utoipa::path(delete, path = "/api/v1/policies/{target}", tag = "lifecycle",
    params(("target" = String, Path, description = "VM, volume or `default`")),
    responses((status = 200, body = [PolicyInfo]), (status = "default", body = OpError)))]
pub async fn clear_policy(
    State(st): State<AppState>,
    Path(target): Path<String>,
) -> Answer<Vec<PolicyInfo>> {
    policies_of(&st, LifecycleOp::PolicyClear { target }).await
}

/// What the prune preview covers.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct PruneParams {
    /// One VM or volume; every one with a policy when absent.
    #[serde(default)]
    pub target: Option<String>,
}

/// What retention would delete now, with the exact space it frees (nothing is deleted).
#[utoipa::path(get, path = "/api/v1/prune", tag = "lifecycle", params(PruneParams),
    responses((status = 200, body = PruneReport), (status = "default", body = OpError)))]
pub async fn prune_preview(
    State(st): State<AppState>,
    Query(p): Query<PruneParams>,
) -> Answer<PruneReport> {
    let op = LifecycleOp::Prune {
        target: p.target,
        dry_run: true,
    };
    match lifecycle(&st, op).await? {
        LifecycleReply::Pruned(r) => Ok(Json(r)),
        _ => Err(ApiError::unexpected("prune preview")),
    }
}

/// Which events.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct EventParams {
    /// Only events with a sequence number above this.
    #[serde(default)]
    pub after: u64,
    /// At most this many, the newest (default 100).
    #[serde(default = "default_limit")]
    pub limit: usize,
}

fn default_limit() -> usize {
    100
}

async fn read_events(st: &AppState, after: u64, limit: usize) -> Result<Vec<Event>, ApiError> {
    match lifecycle(st, LifecycleOp::Events { after, limit }).await? {
        LifecycleReply::Events(e) => Ok(e),
        _ => Err(ApiError::unexpected("events")),
    }
}

/// What the lifecycle did: checkpoints taken and pruned, skips, backups.
#[utoipa::path(get, path = "/api/v1/events", tag = "lifecycle", params(EventParams),
    responses((status = 200, body = [Event]), (status = "default", body = OpError)))]
pub async fn events(
    State(st): State<AppState>,
    Query(p): Query<EventParams>,
) -> Answer<Vec<Event>> {
    Ok(Json(read_events(&st, p.after, p.limit).await?))
}

/// How often the stream looks for new events.
const EVENT_POLL: Duration = Duration::from_millis(500);

/// Events as they land, as server-sent events (`event: lifecycle`, data: one event's JSON),
/// starting after `after`.
#[utoipa::path(get, path = "/api/v1/events/stream", tag = "lifecycle", params(EventParams),
    responses((status = 200, content_type = "text/event-stream", body = String,
        description = "One `lifecycle` event per lifecycle event, data its JSON"),
        (status = "default", body = OpError)))]
pub async fn event_stream(
    State(st): State<AppState>,
    Query(p): Query<EventParams>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    // The first read answers errors (no store directory...) as a status, not a dead stream.
    let first = read_events(&st, p.after, p.limit).await?;
    let stream = futures_util::stream::unfold(
        (st, p.after, first),
        |(st, mut after, mut pending)| async move {
            loop {
                if !pending.is_empty() {
                    let e = pending.remove(0);
                    after = after.max(e.seq);
                    let data = serde_json::to_string(&e).unwrap_or_default();
                    let ev = SseEvent::default().event("lifecycle").id(e.seq.to_string());
                    return Some((Ok(ev.data(data)), (st, after, pending)));
                }
                tokio::time::sleep(EVENT_POLL).await;
                // A failed read (the file being rotated) is tried again at the next poll.
                pending = read_events(&st, after, 1000).await.unwrap_or_default();
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
