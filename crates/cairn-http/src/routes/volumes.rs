//! Volumes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cairn_control::{Op, OpError, Reply};
use cairn_engine::VolumeInfo;
use serde::Deserialize;

use super::{call, done, Answer};
use crate::{ApiError, AppState, Body, Path};

/// A volume to create.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewVolume {
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// Every volume.
#[utoipa::path(get, path = "/api/v1/volumes", tag = "volumes",
    responses((status = 200, body = [VolumeInfo]), (status = "default", body = OpError)))]
pub async fn list(State(st): State<AppState>) -> Answer<Vec<VolumeInfo>> {
    match call(&st, Op::VolumeList).await? {
        Reply::Volumes(v) => Ok(Json(v)),
        _ => Err(ApiError::unexpected("volume list")),
    }
}

/// Creates an empty volume.
#[utoipa::path(post, path = "/api/v1/volumes", tag = "volumes", request_body = NewVolume,
    responses((status = 200, body = VolumeInfo), (status = "default", body = OpError)))]
pub async fn create(State(st): State<AppState>, Body(v): Body<NewVolume>) -> Answer<VolumeInfo> {
    let op = Op::VolumeCreate {
        name: v.name,
        size: v.size,
    };
    match call(&st, op).await? {
        Reply::Volume(v) => Ok(Json(v)),
        _ => Err(ApiError::unexpected("volume create")),
    }
}

/// One volume.
#[utoipa::path(get, path = "/api/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 200, body = VolumeInfo), (status = "default", body = OpError)))]
pub async fn info(State(st): State<AppState>, Path(name): Path<String>) -> Answer<VolumeInfo> {
    match call(&st, Op::VolumeInfo { name }).await? {
        Reply::Volume(v) => Ok(Json(v)),
        _ => Err(ApiError::unexpected("volume info")),
    }
}

/// Deletes a volume and its checkpoints.
#[utoipa::path(delete, path = "/api/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 204), (status = "default", body = OpError)))]
pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    done(call(&st, Op::VolumeDelete { name }).await?)
}
