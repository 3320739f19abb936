//! A QMP client (QEMU Machine Protocol: JSON objects, one per line, over a unix socket).
//!
//! One task reads the socket: replies are matched to their command by `id`, events go to a
//! broadcast channel. Commands may be sent from many tasks at once.

use std::collections::HashMap;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};

/// Why a QMP exchange failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be used.
    #[error("QMP socket {path}: {why}")]
    Io {
        /// Socket path.
        path: String,
        /// What failed.
        why: String,
    },
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QEMU refused '{command}': {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection closed (QEMU exited) before the reply.
    #[error("QEMU closed its QMP connection (did it exit?)")]
    Closed,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event name, e.g. `SHUTDOWN`, `MIGRATION`.
    pub name: String,
    /// Its data.
    pub data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

/// A negotiated QMP connection.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    next_id: AtomicU64,
}

use cairn_engine::sync::lock;

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Arc<Qmp>, QmpError> {
        let io = |e: std::io::Error| QmpError::Io {
            path: path.display().to_string(),
            why: e.to_string(),
        };
        let stream = tokio::net::UnixStream::connect(path).await.map_err(io)?;
        let (rd, wr) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        let greeting = lines
            .next_line()
            .await
            .map_err(io)?
            .ok_or(QmpError::Closed)?;
        let g: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Protocol(format!("greeting is not JSON: {e}")))?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        let qmp = Arc::new(Qmp {
            writer: tokio::sync::Mutex::new(wr),
            pending: Arc::new(Mutex::new(HashMap::new())),
            events: broadcast::channel(256).0,
            next_id: AtomicU64::new(1),
        });
        let pending = qmp.pending.clone();
        let events = qmp.events.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    let _ = events.send(Event {
                        name: name.to_string(),
                        data: v.get("data").cloned().unwrap_or(Value::Null),
                    });
                    continue;
                }
                let Some(id) = v.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(tx) = lock(&pending).remove(&id) else {
                    continue;
                };
                let r = if let Some(ret) = v.get("return") {
                    Ok(ret.clone())
                } else if let Some(err) = v.get("error") {
                    Err(QmpError::Command {
                        command: String::new(),
                        class: err["class"].as_str().unwrap_or("?").to_string(),
                        desc: err["desc"].as_str().unwrap_or("?").to_string(),
                    })
                } else {
                    Err(QmpError::Protocol(format!(
                        "reply without return or error: {line}"
                    )))
                };
                let _ = tx.send(r);
            }
            // QEMU went away: fail everything still waiting.
            for (_, tx) in lock(&pending).drain() {
                let _ = tx.send(Err(QmpError::Closed));
            }
        });
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_passing(command, arguments, None).await
    }

    /// Runs a command with a file descriptor attached (`SCM_RIGHTS`), as `getfd` and `add-fd`
    /// expect; QEMU receives its own copy of `fd`.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        self.execute_passing(command, arguments, Some(fd)).await
    }

    async fn execute_passing(
        &self,
        command: &str,
        arguments: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            let mut rest = line.as_bytes();
            if let Some(fd) = fd {
                match send_with_fd(&w, rest, fd).await {
                    Ok(n) => rest = &rest[n..],
                    Err(_) => {
                        lock(&self.pending).remove(&id);
                        return Err(QmpError::Closed);
                    }
                }
            }
            if w.write_all(rest).await.is_err() {
                lock(&self.pending).remove(&id);
                return Err(QmpError::Closed);
            }
        }
        match rx.await {
            Ok(Err(QmpError::Command { class, desc, .. })) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(r) => r,
            Err(_) => Err(QmpError::Closed),
        }
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// Sends the start of `bytes` with `fd` attached; returns how many bytes went out (at least one
/// on success: the descriptor travels with the first byte).
async fn send_with_fd(
    w: &OwnedWriteHalf,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let stream: &tokio::net::UnixStream = w.as_ref();
    loop {
        stream.writable().await?;
        // try_io clears the readiness on EAGAIN, so the next writable() really waits.
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let fds = [fd];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            sendmsg(
                stream,
                &[IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
