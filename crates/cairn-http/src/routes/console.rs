//! A VM's serial console, read-only: a piece of its log from an offset, or the log as it grows,
//! streamed as server-sent events. QEMU appends everything the guest prints to the log whether or
//! not anyone watches, so both read that file and never touch the guest's serial port.

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use cairn_control::{ErrorKind, Op, OpError};
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::vms::power;
use super::Answer;
use crate::{ApiError, AppState, Path, Query};

/// Where to read the console log from.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct ConsoleParams {
    /// Byte offset to read from; the last 64 KiB when absent.
    pub from: Option<u64>,
}

/// A piece of the serial console's log.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ConsoleText {
    /// Offset of `text` in the log (0 after the log began again, for a new run of the VM).
    pub offset: u64,
    /// Offset to ask for next (the log's length now).
    pub next: u64,
    /// What the guest printed (invalid UTF-8 replaced).
    pub text: String,
}

/// Most a console read returns.
const CONSOLE_CHUNK: u64 = 64 << 10;

/// How often a console stream looks for new output.
const CONSOLE_POLL: Duration = Duration::from_millis(100);

/// Reads the log from `from` (its last 64 KiB when `None`). A `from` past the end means the log
/// began again (a new run of the VM), so the read starts over at 0.
fn read_log(path: &std::path::Path, from: Option<u64>) -> std::io::Result<ConsoleText> {
    use std::io::{Read, Seek};
    let mut f = match std::fs::File::open(path) {
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
    let offset = match from {
        Some(n) if n > len => 0,
        Some(n) => n,
        None => len.saturating_sub(CONSOLE_CHUNK),
    };
    let end = (offset + CONSOLE_CHUNK).min(len);
    f.seek(std::io::SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; usize::try_from(end - offset).unwrap_or(0)];
    f.read_exact(&mut buf)?;
    Ok(ConsoleText {
        offset,
        next: end,
        text: String::from_utf8_lossy(&buf).into_owned(),
    })
}

/// Reads the log on the blocking pool.
async fn read(path: PathBuf, from: Option<u64>) -> Result<ConsoleText, ApiError> {
    tokio::task::spawn_blocking(move || read_log(&path, from))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Daemon, format!("console read failed: {e}")))?
        .map_err(|e| ApiError::new(ErrorKind::Io, format!("cannot read the console log: {e}")))
}

/// The log file of VM `name` (which must exist).
async fn log_of(st: &AppState, name: String) -> Result<PathBuf, ApiError> {
    let Json(status) = power(st, Op::VmStatus { name }).await?;
    Ok(status.console)
}

/// The serial console's log from an offset (`from=next` follows it; the stream does that for
/// you).
#[utoipa::path(get, path = "/api/v1/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleParams),
    responses((status = 200, body = ConsoleText), (status = "default", body = OpError)))]
pub async fn console(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<ConsoleParams>,
) -> Answer<ConsoleText> {
    let path = log_of(&st, name).await?;
    read(path, p.from).await.map(Json)
}

/// The serial console as it grows: a `console` event (data: a [`ConsoleText`]) with what is
/// there from `from` (the last 64 KiB when absent), then one for each new piece of output within
/// a tenth of a second of its writing, until the client goes away.
#[utoipa::path(get, path = "/api/v1/vms/{name}/console/stream", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleParams),
    responses((status = 200, content_type = "text/event-stream", body = String,
        description = "`console` events, each a ConsoleText"),
        (status = "default", body = OpError)))]
pub async fn console_stream(
    State(st): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<ConsoleParams>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let path = log_of(&st, name).await?;
    // The first read answers errors as a status, not a dead stream.
    let first = read(path.clone(), p.from).await?;
    let stream = futures_util::stream::unfold(
        (path, Some(first), 0u64),
        |(path, mut pending, mut next)| async move {
            loop {
                if let Some(t) = pending.take() {
                    next = t.next;
                    let data = serde_json::to_string(&t).unwrap_or_default();
                    let ev = SseEvent::default().event("console").data(data);
                    return Some((Ok(ev), (path, None, next)));
                }
                tokio::time::sleep(CONSOLE_POLL).await;
                // A failed read (the log being replaced) is tried again at the next poll.
                if let Ok(t) = read(path.clone(), Some(next)).await {
                    if !t.text.is_empty() || t.offset < next {
                        pending = Some(t);
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_follow_the_log_and_start_over_when_it_begins_again() {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("console.log");
        let none = read_log(&log, None).expect("no log yet");
        assert_eq!((none.offset, none.next, none.text.as_str()), (0, 0, ""));
        std::fs::write(&log, "boot\n").expect("write");
        let a = read_log(&log, None).expect("tail");
        assert_eq!((a.offset, a.next, a.text.as_str()), (0, 5, "boot\n"));
        std::fs::write(&log, "boot\ncount 1\n").expect("grow");
        let b = read_log(&log, Some(a.next)).expect("follow");
        assert_eq!((b.offset, b.next, b.text.as_str()), (5, 13, "count 1\n"));
        std::fs::write(&log, "new\n").expect("a new run");
        let c = read_log(&log, Some(b.next)).expect("restart");
        assert_eq!((c.offset, c.next, c.text.as_str()), (0, 4, "new\n"));
    }
}
