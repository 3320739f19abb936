//! The client side of the control API: JSON over HTTP/1.1 on the store's unix socket.
//!
//! `POST /v1/ops` takes an [`Op`] and answers a [`Reply`] (HTTP 200) or an [`OpError`] (4xx/5xx);
//! with `Accept: application/x-ndjson` it answers HTTP 200 at once and streams [`StreamLine`]s
//! instead, progress first and the outcome last, so long work shows progress bars. `GET
//! /v1/status` answers a [`DaemonStatus`]. The daemon serves the same routes.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};
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

/// The media type of a streamed answer: one JSON [`StreamLine`] per line.
pub const NDJSON: &str = "application/x-ndjson";

/// One line of a streamed answer: any number of `{"progress": N}` (the operation's own measure,
/// e.g. bytes done), then exactly one `{"reply": ...}` or `{"error": ...}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    /// Work done so far.
    Progress(u64),
    /// The operation succeeded.
    Reply(Box<Reply>),
    /// The operation failed.
    Error(OpError),
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

    /// Runs `op` in the daemon, passing the progress it streams to `progress`.
    pub fn call_with_progress(
        &self,
        op: &Op,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Reply, OpError> {
        let body = serde_json::to_vec(op).map_err(daemon_err)?;
        self.rt.block_on(async {
            let resp = self.send("POST", "/v1/ops", body, Some(NDJSON)).await?;
            let status = resp.status().as_u16();
            let streamed = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(NDJSON.as_bytes()));
            let mut body = resp.into_body();
            if !streamed {
                let bytes = body.collect().await.map_err(daemon_err)?.to_bytes();
                return answer(status, &bytes);
            }
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(daemon_err)?;
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                pending.extend_from_slice(data);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    match serde_json::from_slice::<StreamLine>(&line).map_err(daemon_err)? {
                        StreamLine::Progress(n) => progress(n),
                        StreamLine::Reply(r) => return Ok(*r),
                        StreamLine::Error(e) => return Err(e),
                    }
                }
            }
            Err(daemon_err(
                "the daemon closed the answer before saying how the operation ended; see its log",
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
