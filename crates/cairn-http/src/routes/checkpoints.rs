//! Checkpoints of a target: a VM, a volume or a group, as `TARGET@NAME` names them in the CLI.
//! Replies are the operation's own [`Reply`], whose shape says which kind the target was.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cairn_control::lifecycle::LifecycleOp;
use cairn_control::{ErrorKind, Op, OpError, Reply};
use serde::{Deserialize, Serialize};

use super::{call, Answer};
use crate::{ApiError, AppState, Body, Path, Query};

/// Which page of a checkpoint list.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// Start after this cursor: the `next` of the page before; from the oldest when absent.
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many checkpoints (1 to 1000, the default; larger asks get 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// A VM's, volume's or group's checkpoints, oldest first, a page at a time: the answer carries
/// `next` while more remain. Pages keep every answer small and fast whatever the depth (a
/// volume's 10,000 checkpoints are 2 MB of JSON), as S3's listings do.
#[utoipa::path(get, path = "/api/v1/targets/{target}/checkpoints", tag = "checkpoints",
    params(("target" = String, Path, description = "VM, volume or group"), ListParams),
    responses((status = 200, body = Reply), (status = "default", body = OpError)))]
pub async fn list(
    State(st): State<AppState>,
    Path(target): Path<String>,
    Query(p): Query<ListParams>,
) -> Answer<Reply> {
    let op = Op::CheckpointList {
        volume: target,
        after: p.after,
        limit: p.limit,
    };
    Ok(Json(call(&st, op.with_page_limit()).await?))
}

/// A checkpoint to take.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewCheckpoint {
    /// Name; a timestamp when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// For a running VM: disks only, no memory.
    #[serde(default)]
    pub disk_only: bool,
    /// For a disk-only checkpoint of a running VM: freeze the guest's file systems first.
    #[serde(default)]
    pub quiesce: bool,
}

/// Takes a checkpoint (a running VM's is standard, with memory, unless `disk_only`).
#[utoipa::path(post, path = "/api/v1/targets/{target}/checkpoints", tag = "checkpoints",
    params(("target" = String, Path, description = "VM, volume or group")),
    request_body = NewCheckpoint,
    responses((status = 200, body = Reply), (status = "default", body = OpError)))]
pub async fn create(
    State(st): State<AppState>,
    Path(target): Path<String>,
    Body(c): Body<NewCheckpoint>,
) -> Answer<Reply> {
    let op = Op::CheckpointCreate {
        volume: target,
        name: c.name,
        description: c.description,
        disk_only: c.disk_only,
        quiesce: c.quiesce,
        automatic: false,
    };
    Ok(Json(call(&st, op).await?))
}

/// How to apply.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct ApplyRequest {
    /// Keep the current state as a checkpoint of this name first.
    #[serde(default)]
    pub keep_current: Option<String>,
    /// Drop the current state without keeping it.
    #[serde(default)]
    pub discard_current: bool,
}

/// Rewinds the target to a checkpoint.
#[utoipa::path(post, path = "/api/v1/targets/{target}/checkpoints/{name}/apply", tag = "checkpoints",
    params(("target" = String, Path, description = "VM, volume or group"),
           ("name" = String, Path, description = "Checkpoint")),
    request_body = ApplyRequest,
    responses((status = 200, body = Reply), (status = "default", body = OpError)))]
pub async fn apply(
    State(st): State<AppState>,
    Path((target, name)): Path<(String, String)>,
    Body(a): Body<ApplyRequest>,
) -> Answer<Reply> {
    let op = Op::CheckpointApply {
        volume: target,
        name,
        save_current: a.keep_current,
        discard_current: a.discard_current,
        force: false,
    };
    Ok(Json(call(&st, op).await?))
}

/// Whether a delete takes the checkpoint's descendants too.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct DeleteParams {
    /// Also delete every checkpoint below it.
    #[serde(default)]
    pub children: bool,
}

/// Deletes a checkpoint.
#[utoipa::path(delete, path = "/api/v1/targets/{target}/checkpoints/{name}", tag = "checkpoints",
    params(("target" = String, Path, description = "VM, volume or group"),
           ("name" = String, Path, description = "Checkpoint"), DeleteParams),
    responses((status = 200, body = Reply), (status = "default", body = OpError)))]
pub async fn delete(
    State(st): State<AppState>,
    Path((target, name)): Path<(String, String)>,
    Query(p): Query<DeleteParams>,
) -> Answer<Reply> {
    let op = Op::CheckpointDelete {
        volume: target,
        name,
        children: p.children,
    };
    Ok(Json(call(&st, op).await?))
}

/// Changes to a checkpoint; absent fields stay as they are.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct CheckpointEdit {
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
    /// Keep it whatever a retention policy says, or stop keeping it.
    #[serde(default)]
    pub pinned: Option<bool>,
    /// New name (applied last).
    #[serde(default)]
    pub new_name: Option<String>,
}

/// Describes, pins or renames a checkpoint.
#[utoipa::path(patch, path = "/api/v1/targets/{target}/checkpoints/{name}", tag = "checkpoints",
    params(("target" = String, Path, description = "VM, volume or group"),
           ("name" = String, Path, description = "Checkpoint")),
    request_body = CheckpointEdit,
    responses((status = 204), (status = "default", body = OpError)))]
pub async fn edit(
    State(st): State<AppState>,
    Path((target, name)): Path<(String, String)>,
    Body(e): Body<CheckpointEdit>,
) -> Result<StatusCode, ApiError> {
    if let Some(description) = e.description {
        let op = Op::CheckpointEdit {
            volume: target.clone(),
            name: name.clone(),
            description: Some(description),
        };
        call(&st, op).await?;
    }
    if let Some(pinned) = e.pinned {
        let op = Op::Lifecycle(LifecycleOp::Pin {
            target: format!("{target}@{name}"),
            pinned,
        });
        call(&st, op).await?;
    }
    if let Some(new_name) = e.new_name {
        let op = Op::CheckpointRename {
            volume: target,
            name,
            new_name,
        };
        call(&st, op).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The new VM or volume a clone makes.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct CloneRequest {
    /// Its name.
    pub new_name: String,
}

/// Makes a new VM (fresh identity) or volume starting from a checkpoint.
#[utoipa::path(post, path = "/api/v1/targets/{target}/checkpoints/{name}/clone", tag = "checkpoints",
    params(("target" = String, Path, description = "VM or volume"),
           ("name" = String, Path, description = "Checkpoint")),
    request_body = CloneRequest,
    responses((status = 200, body = Reply), (status = "default", body = OpError)))]
pub async fn clone(
    State(st): State<AppState>,
    Path((target, name)): Path<(String, String)>,
    Body(c): Body<CloneRequest>,
) -> Answer<Reply> {
    let op = Op::Clone {
        volume: target,
        checkpoint: name,
        new_name: c.new_name,
    };
    Ok(Json(call(&st, op).await?))
}

/// The space of a VM (per VM checkpoint) or a volume (per checkpoint): referenced and unique.
#[utoipa::path(get, path = "/api/v1/targets/{target}/space", tag = "space",
    params(("target" = String, Path, description = "VM or volume")),
    responses((status = 200, body = Reply), (status = "default", body = OpError)))]
pub async fn space(State(st): State<AppState>, Path(target): Path<String>) -> Answer<Reply> {
    let op = Op::Space {
        volume: Some(target),
    };
    Ok(Json(call(&st, op).await?))
}

/// Which checkpoints a delete would take.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct FreedParams {
    /// Checkpoint names, comma-separated.
    pub checkpoints: String,
}

/// What deleting a selection frees.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Freed {
    /// Exact bytes freed by deleting them all together.
    pub bytes: u64,
}

/// The exact space deleting these checkpoints together would free.
#[utoipa::path(get, path = "/api/v1/targets/{target}/space/freed", tag = "space",
    params(("target" = String, Path, description = "VM or volume"), FreedParams),
    responses((status = 200, body = Freed), (status = "default", body = OpError)))]
pub async fn freed(
    State(st): State<AppState>,
    Path(target): Path<String>,
    Query(p): Query<FreedParams>,
) -> Answer<Freed> {
    let checkpoints: Vec<String> = p
        .checkpoints
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    match call(
        &st,
        Op::SpaceFreed {
            target,
            checkpoints,
        },
    )
    .await?
    {
        Reply::Freed { bytes } => Ok(Json(Freed { bytes })),
        _ => Err(ApiError::unexpected("space freed")),
    }
}

/// Two states of a target.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct DiffParams {
    /// A checkpoint.
    pub from: String,
    /// A checkpoint; the current state when absent.
    #[serde(default)]
    pub to: Option<String>,
}

/// The change between two states.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Change {
    /// Bytes that differ (summed over a VM's disks).
    pub bytes: u64,
    /// Byte ranges that differ.
    pub ranges: u64,
}

/// The size of the change between two checkpoints (or one and now) of a volume or a VM's disks.
#[utoipa::path(get, path = "/api/v1/targets/{target}/diff", tag = "space",
    params(("target" = String, Path, description = "VM or volume"), DiffParams),
    responses((status = 200, body = Change), (status = "default", body = OpError)))]
pub async fn diff(
    State(st): State<AppState>,
    Path(target): Path<String>,
    Query(p): Query<DiffParams>,
) -> Answer<Change> {
    // A VM's change is its disks' (the memory state is not a disk the guest sees).
    let disks = match call(
        &st,
        Op::VmInfo {
            name: target.clone(),
        },
    )
    .await
    {
        Ok(Reply::Vm(vm)) => vm.disks,
        Err(ApiError(e)) if e.kind != ErrorKind::NotFound => return Err(ApiError(e)),
        _ => vec![target],
    };
    let mut change = Change {
        bytes: 0,
        ranges: 0,
    };
    for d in disks {
        let a = format!("{d}@{}", p.from);
        let b = p.to.as_ref().map_or(d.clone(), |t| format!("{d}@{t}"));
        match call(&st, Op::Diff { a, b }).await? {
            Reply::Extents(e) => {
                change.bytes += e.iter().map(|x| x.length).sum::<u64>();
                change.ranges += e.len() as u64;
            }
            _ => return Err(ApiError::unexpected("diff")),
        }
    }
    Ok(Json(change))
}
