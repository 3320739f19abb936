//! The client side of the control API: JSON over HTTP/1.1 on the store's unix socket.
//!
//! `POST /v1/ops` takes an [`Op`] and answers a [`Reply`] (HTTP 200) or an [`OpError`] (4xx/5xx).
//! Long work goes to `POST /api/v1/jobs` instead, and its progress and outcome come from the
//! job's server-sent events (`GET /api/v1/jobs/ID/events`, [`JobInfo`] in each), so long work
//! shows progress bars. `GET /v1/status` answers a [`DaemonStatus`].

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};
use crate::jobs::{JobInfo, JobState};
use crate::ops::{Op, Reply};

/// File name of the control socket inside the store directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Where a store's control socket lives.
pub fn control_socket(store_dir: &Path) -> PathBuf {
    store_dir.join(CONTROL_SOCKET)
}

/// What a running daemon says about itself.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Its process id.
    pub pid: u32,
    /// The store it owns.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub store: PathBuf,
    /// Its NBD unix socket.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub nbd_socket: PathBuf,
    /// Its NBD TCP address, if any.
    pub nbd_tcp: Option<String>,
    /// Cairn version.
    pub version: String,
}

/// A connection point to a store's daemon.
pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

fn daemon_err(what: impl std::fmt::Display) -> OpError {
    OpError::new(
        ErrorKind::Daemon,
        format!("talking to the Cairn daemon: {what}"),
    )
}

impl Client {
    /// The daemon of `store_dir`, if one answers on its control socket.
    pub fn find(store_dir: &Path) -> Option<Client> {
        let socket = control_socket(store_dir);
        std::os::unix::net::UnixStream::connect(&socket).ok()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        Some(Client { socket, rt })
    }

    /// Runs `op` in the daemon.
    pub fn call(&self, op: &Op) -> Result<Reply, OpError> {
        let body = serde_json::to_vec(op).map_err(daemon_err)?;
        let (status, bytes) = self.request("POST", "/v1/ops", body)?;
        answer(status, &bytes)
    }

    /// Runs `op` in the daemon as a job, passing the progress its event stream reports to
    /// `progress` (the web UI reads the same stream). Ctrl-C cancels the job and waits for it to
    /// stop (a second Ctrl-C stops waiting); otherwise the job runs to its end even if this
    /// process goes away, so a closed terminal does not leave a delete half-done.
    pub fn call_with_progress(
        &self,
        op: &Op,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Reply, OpError> {
        let body = serde_json::to_vec(op).map_err(daemon_err)?;
        let (status, bytes) = self.request("POST", "/api/v1/jobs", body)?;
        if status != 202 {
            return Err(answer(status, &bytes)
                .err()
                .unwrap_or_else(|| daemon_err(format!("HTTP {status} when starting a job"))));
        }
        let job: JobInfo = serde_json::from_slice(&bytes).map_err(daemon_err)?;
        self.rt.block_on(async {
            let path = format!("/api/v1/jobs/{}/events", job.id);
            let resp = self
                .send("GET", &path, Vec::new(), Some("text/event-stream"))
                .await?;
            let mut body = resp.into_body();
            let mut reported = 0;
            let mut pending: Vec<u8> = Vec::new();
            let mut interrupted = false;
            loop {
                let frame = tokio::select! {
                    f = body.frame() => f,
                    _ = tokio::signal::ctrl_c() => {
                        if interrupted {
                            return Err(cancelled_job(&job, "still stopping in the daemon"));
                        }
                        interrupted = true;
                        // The cancel answers once the work has stopped; its end comes on the
                        // stream as usual.
                        let cancel = format!("/api/v1/jobs/{}", job.id);
                        self.send("DELETE", &cancel, Vec::new(), None).await?;
                        continue;
                    }
                };
                let Some(frame) = frame else { break };
                let frame = frame.map_err(daemon_err)?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.extend_from_slice(data);
                // Events end with a blank line; only their `data:` line matters here.
                while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = pending.drain(..end + 2).collect();
                    let text = String::from_utf8_lossy(&event);
                    let Some(data) = text.lines().find_map(|l| l.strip_prefix("data:")) else {
                        continue;
                    };
                    let info: JobInfo = serde_json::from_str(data.trim()).map_err(daemon_err)?;
                    if info.progress > reported {
                        reported = info.progress;
                        progress(reported);
                    }
                    match info.status {
                        JobState::Running => {}
                        JobState::Done { reply } => return Ok(*reply),
                        JobState::Failed { error } => return Err(error),
                        JobState::Cancelled => return Err(cancelled_job(&info, "it stopped")),
                    }
                }
            }
            Err(daemon_err(
                "the daemon closed the job's stream before saying how it ended; see its log",
            ))
        })
    }

    /// The daemon's own description.
    pub fn status(&self) -> Result<DaemonStatus, OpError> {
        let (status, bytes) = self.request("GET", "/v1/status", Vec::new())?;
        if status != 200 {
            return Err(daemon_err(format!("HTTP {status} from /v1/status")));
        }
        serde_json::from_slice(&bytes).map_err(daemon_err)
    }

    fn request(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, Bytes), OpError> {
        self.rt.block_on(async {
            let resp = self.send(method, path, body, None).await?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(daemon_err)?
                .to_bytes();
            Ok((status, bytes))
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        accept: Option<&str>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, OpError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(daemon_err)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(daemon_err)?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "cairn")
            .header("content-type", "application/json");
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(daemon_err)?;
        sender.send_request(req).await.map_err(daemon_err)
    }
}

/// A whole (not streamed) answer: a reply on 200, else the error the daemon described.
fn answer(status: u16, bytes: &[u8]) -> Result<Reply, OpError> {
    if status == 200 {
        return serde_json::from_slice(bytes).map_err(daemon_err);
    }
    Err(
        serde_json::from_slice::<OpError>(bytes).unwrap_or_else(|_| {
            daemon_err(format!("HTTP {status}: {}", String::from_utf8_lossy(bytes)))
        }),
    )
}

/// The error a cancelled job ends the call with.
fn cancelled_job(job: &JobInfo, how: &str) -> OpError {
    OpError::new(
        ErrorKind::Cancelled,
        format!(
            "job {} ({}) was cancelled and {how}; nothing half-made is kept",
            job.id, job.op
        ),
    )
}
