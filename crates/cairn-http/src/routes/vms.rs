//! VMs: definitions, power, and the serial console's log.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cairn_control::ops::VmDefinition;
use cairn_control::{Op, OpError, Reply};
use cairn_vm::{VmSpec, VmStatus};
use serde::Deserialize;

use super::{call, done, Answer};
use crate::{ApiError, AppState, Body, Path, Query};

/// Every VM.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    responses((status = 200, body = [VmSpec]), (status = "default", body = OpError)))]
pub async fn list(State(st): State<AppState>) -> Answer<Vec<VmSpec>> {
    match call(&st, Op::VmList).await? {
        Reply::Vms(v) => Ok(Json(v)),
        _ => Err(ApiError::unexpected("VM list")),
    }
}

/// Defines a VM on existing volumes.
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = VmDefinition,
    responses((status = 200, body = VmSpec), (status = "default", body = OpError)))]
pub async fn create(State(st): State<AppState>, Body(def): Body<VmDefinition>) -> Answer<VmSpec> {
    match call(&st, Op::VmCreate(def)).await? {
        Reply::Vm(v) => Ok(Json(v)),
        _ => Err(ApiError::unexpected("VM create")),
    }
}

/// One VM's definition.
#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmSpec), (status = "default", body = OpError)))]
pub async fn info(State(st): State<AppState>, Path(name): Path<String>) -> Answer<VmSpec> {
    match call(&st, Op::VmInfo { name }).await? {
        Reply::Vm(v) => Ok(Json(v)),
        _ => Err(ApiError::unexpected("VM info")),
    }
}

/// Deletes a stopped VM's definition (its volumes stay).
#[utoipa::path(delete, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 204), (status = "default", body = OpError)))]
pub async fn delete(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    done(call(&st, Op::VmDelete { name }).await?)
}

pub(super) async fn power(st: &AppState, op: Op) -> Answer<VmStatus> {
    match call(st, op).await? {
        Reply::VmStatus(s) => Ok(Json(s)),
        _ => Err(ApiError::unexpected("a VM power operation")),
    }
}

/// A VM's run state.
#[utoipa::path(get, path = "/api/v1/vms/{name}/status", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmStatus), (status = "default", body = OpError)))]
pub async fn status(State(st): State<AppState>, Path(name): Path<String>) -> Answer<VmStatus> {
    power(&st, Op::VmStatus { name }).await
}

/// Starts a VM.
#[utoipa::path(post, path = "/api/v1/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmStatus), (status = "default", body = OpError)))]
pub async fn start(State(st): State<AppState>, Path(name): Path<String>) -> Answer<VmStatus> {
    power(&st, Op::VmStart { name }).await
}

/// How long a stop waits for the guest.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct StopParams {
    /// Seconds to wait for the guest to power off before stopping QEMU hard (default 60).
    #[serde(default = "default_stop")]
    pub timeout_secs: u64,
}

fn default_stop() -> u64 {
    60
}

/// Asks the guest to power off (ACPI), hard after the timeout.
#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StopParams),
    responses((status = 200, body = VmStatus), (status = "default", body = OpError)))]
pub async fn stop(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<StopParams>,
) -> Answer<VmStatus> {
    let timeout_secs = p.timeout_secs;
    power(&st, Op::VmStop { name, timeout_secs }).await
}

/// Stops QEMU at once (like pulling the plug).
#[utoipa::path(post, path = "/api/v1/vms/{name}/kill", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmStatus), (status = "default", body = OpError)))]
pub async fn kill(State(st): State<AppState>, Path(name): Path<String>) -> Answer<VmStatus> {
    power(&st, Op::VmKill { name }).await
}
