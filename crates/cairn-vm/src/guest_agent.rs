//! A client for the QEMU guest agent (`qemu-ga`), which runs inside the guest and answers on a
//! virtio-serial port that every Cairn VM has (`org.qemu.guest_agent.0`, a unix socket
//! `qga.sock` on the host side).
//!
//! Cairn uses it for one thing: freezing the guest's file systems around a disk-only checkpoint,
//! so the checkpoint holds them clean (application-consistent, like a Hyper-V production
//! checkpoint) rather than as after a power cut.
//!
//! The channel outlives any one connection: replies to a client that went away (a timed-out
//! command, say) are still queued in it. So every connection starts with
//! `guest-sync-delimited`, whose reply is preceded by a 0xFF byte and carries a fresh id;
//! everything before it is stale and skipped. Commands carry ids too, and replies without ours
//! are skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Why the guest agent could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// No agent is there to answer.
    #[error("no guest agent answers: {0}")]
    Unavailable(String),
    /// The agent did not answer in time.
    #[error("the guest agent did not answer '{command}' within {secs} s")]
    Timeout {
        /// The command.
        command: String,
        /// Seconds waited.
        secs: u64,
    },
    /// The agent refused a command.
    #[error("the guest agent refused '{command}': {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// Error class.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// The socket failed or closed.
    #[error("guest agent socket {path}: {why}")]
    Io {
        /// Socket path.
        path: String,
        /// What failed.
        why: String,
    },
}

/// A synchronised connection to a guest agent.
pub struct GuestAgent {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    path: PathBuf,
    next_id: u64,
}

/// A number no earlier connection used, so a stale sync reply cannot pass for ours.
fn fresh_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // The agent parses ids as JSON integers; stay within i64.
    (nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(40)) & (i64::MAX as u64)
}

impl GuestAgent {
    /// Connects to the agent behind `path` and synchronises with it, giving up after `timeout`
    /// (the host side of the channel accepts connections whether or not an agent runs).
    pub async fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent, AgentError> {
        match tokio::time::timeout(timeout, Self::sync(path)).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout {
                command: "guest-sync-delimited".into(),
                secs: timeout.as_secs().max(1),
            }),
        }
    }

    async fn sync(path: &Path) -> Result<GuestAgent, AgentError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| AgentError::Io {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
        let (rd, wr) = stream.into_split();
        let mut agent = GuestAgent {
            reader: BufReader::new(rd),
            writer: wr,
            path: path.to_path_buf(),
            next_id: 1,
        };
        let id = fresh_id();
        // The leading 0xFF makes the agent drop any half-received command of an earlier client.
        let mut msg = vec![0xFF];
        msg.extend_from_slice(
            json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } })
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        agent.send(&msg).await?;
        let mut skipped = Vec::new();
        loop {
            skipped.clear();
            let n = agent
                .reader
                .read_until(0xFF, &mut skipped)
                .await
                .map_err(|e| agent.io(e))?;
            if n == 0 {
                return Err(agent.closed());
            }
            if skipped.last() != Some(&0xFF) {
                continue;
            }
            let line = agent.line().await?;
            if serde_json::from_str::<Value>(&line)
                .is_ok_and(|v| v.get("return").and_then(Value::as_u64) == Some(id))
            {
                return Ok(agent);
            }
        }
    }

    /// Runs a command and returns its `return` value, waiting at most `timeout`.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let id = format!("cairn-{}", self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let exchange = async {
            self.send(&line).await?;
            loop {
                let reply = self.line().await?;
                let Ok(v) = serde_json::from_str::<Value>(&reply) else {
                    continue;
                };
                if v.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                    continue;
                }
                if let Some(err) = v.get("error") {
                    return Err(AgentError::Command {
                        command: command.to_string(),
                        class: err["class"].as_str().unwrap_or("?").to_string(),
                        desc: err["desc"].as_str().unwrap_or("?").to_string(),
                    });
                }
                return Ok(v.get("return").cloned().unwrap_or(Value::Null));
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(AgentError::Timeout {
                command: command.to_string(),
                secs: timeout.as_secs().max(1),
            }),
        }
    }

    /// Freezes every freezable file system of the guest (flushing it first); returns how many.
    pub async fn freeze(&mut self, timeout: Duration) -> Result<u64, AgentError> {
        let n = self
            .execute("guest-fsfreeze-freeze", json!({}), timeout)
            .await?;
        Ok(n.as_u64().unwrap_or(0))
    }

    /// Thaws the guest's file systems; returns how many were thawed.
    pub async fn thaw(&mut self, timeout: Duration) -> Result<u64, AgentError> {
        let n = self
            .execute("guest-fsfreeze-thaw", json!({}), timeout)
            .await?;
        Ok(n.as_u64().unwrap_or(0))
    }

    /// Whether the guest's file systems are frozen now.
    pub async fn is_frozen(&mut self, timeout: Duration) -> Result<bool, AgentError> {
        let s = self
            .execute("guest-fsfreeze-status", json!({}), timeout)
            .await?;
        Ok(s.as_str() == Some("frozen"))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| AgentError::Io {
                path: self.path.display().to_string(),
                why: e.to_string(),
            })
    }

    /// The next line, without its newline and any 0xFF delimiters (one may precede a reply).
    async fn line(&mut self) -> Result<String, AgentError> {
        let mut buf = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(self.closed());
        }
        buf.retain(|b| *b != 0xFF);
        Ok(String::from_utf8_lossy(&buf).trim().to_string())
    }

    fn io(&self, e: std::io::Error) -> AgentError {
        AgentError::Io {
            path: self.path.display().to_string(),
            why: e.to_string(),
        }
    }

    fn closed(&self) -> AgentError {
        AgentError::Io {
            path: self.path.display().to_string(),
            why: "closed by QEMU (did the VM stop?)".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    fn sock() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("qga.sock");
        (d, p)
    }

    #[tokio::test]
    async fn sync_freeze_and_errors_with_a_scripted_agent() {
        let (_d, p) = sock();
        let l = UnixListener::bind(&p).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            // Left over from an earlier client: a reply, and a stale sync reply.
            s.write_all(b"{\"return\": 1}\n\xff{\"return\": 5}\n")
                .await
                .expect("stale");
            let mut r = BufReader::new(s);
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                line.retain(|b| *b != 0xFF);
                let req: Value = serde_json::from_slice(&line).expect("JSON");
                let reply: Vec<u8> = match req["execute"].as_str().unwrap_or("") {
                    "guest-sync-delimited" => {
                        let mut v = vec![0xFF];
                        v.extend(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).bytes());
                        v
                    }
                    "guest-fsfreeze-freeze" => format!(
                        "{{\"return\": 9, \"id\": \"other\"}}\n{{\"return\": 2, \"id\": {}}}\n",
                        req["id"]
                    )
                    .into_bytes(),
                    "guest-hang" => continue,
                    cmd => format!(
                        "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"no {cmd}\"}}, \"id\": {}}}\n",
                        req["id"]
                    )
                    .into_bytes(),
                };
                r.get_mut().write_all(&reply).await.expect("reply");
            }
        });
        let mut a = GuestAgent::connect(&p, Duration::from_secs(5))
            .await
            .expect("sync past stale replies");
        let t = Duration::from_secs(5);
        assert_eq!(a.freeze(t).await.expect("freeze"), 2);
        match a.thaw(t).await {
            Err(AgentError::Command { command, desc, .. }) => {
                assert_eq!(command, "guest-fsfreeze-thaw");
                assert!(desc.contains("no guest-fsfreeze-thaw"), "{desc}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        match a
            .execute("guest-hang", json!({}), Duration::from_millis(200))
            .await
        {
            Err(AgentError::Timeout { command, .. }) => assert_eq!(command, "guest-hang"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_channel_without_an_agent_times_out() {
        let (_d, p) = sock();
        let l = UnixListener::bind(&p).expect("bind");
        // QEMU accepts the connection whatever runs in the guest; nobody answers.
        let _keep = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let r = GuestAgent::connect(&p, Duration::from_millis(300)).await;
        assert!(
            matches!(r, Err(AgentError::Timeout { ref command, .. }) if command == "guest-sync-delimited"),
            "{:?}",
            r.err()
        );
    }

    #[tokio::test]
    async fn no_socket_is_an_io_error() {
        let (_d, p) = sock();
        let r = GuestAgent::connect(&p, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(AgentError::Io { .. })), "{:?}", r.err());
    }
}
