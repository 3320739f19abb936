//! VMs: definitions, power, and the serial console's log.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cairn_control::ops::VmDefinition;
use cairn_control::{ErrorKind, Op, OpError, Reply};
use cairn_vm::{VmSpec, VmStatus};
use serde::{Deserialize, Serialize};

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

async fn power(st: &AppState, op: Op) -> Answer<VmStatus> {
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

/// Where to read the console log from.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct ConsoleParams {
    /// Byte offset to read from; the last 64 KiB when absent.
    pub from: Option<u64>,
}

/// A piece of the serial console's log.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ConsoleText {
    /// Offset of `text` in the log.
    pub offset: u64,
    /// Offset to ask for next (the log's length now).
    pub next: u64,
    /// What the guest printed (invalid UTF-8 replaced).
    pub text: String,
}

/// Most a console read returns.
const CONSOLE_CHUNK: u64 = 64 << 10;

/// The serial console's log from an offset: poll with `from=next` to follow it.
#[utoipa::path(get, path = "/api/v1/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleParams),
    responses((status = 200, body = ConsoleText), (status = "default", body = OpError)))]
pub async fn console(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<ConsoleParams>,
) -> Answer<ConsoleText> {
    let Json(status) = power(&st, Op::VmStatus { name }).await?;
    let path = status.console;
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<ConsoleText> {
        use std::io::{Read, Seek};
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ConsoleText {
                    offset: 0,
                    next: 0,
                    text: String::new(),
                })
            }
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let offset = p.from.unwrap_or(len.saturating_sub(CONSOLE_CHUNK)).min(len);
        let end = (offset + CONSOLE_CHUNK).min(len);
        f.seek(std::io::SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; (end - offset) as usize];
        f.read_exact(&mut buf)?;
        Ok(ConsoleText {
            offset,
            next: end,
            text: String::from_utf8_lossy(&buf).into_owned(),
        })
    })
    .await
    .map_err(|e| ApiError::new(ErrorKind::Daemon, format!("console read failed: {e}")))?;
    read.map(Json)
        .map_err(|e| ApiError::new(ErrorKind::Io, format!("cannot read the console log: {e}")))
}
