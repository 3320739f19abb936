//! What the daemon's lifecycle did and why, kept in `STORE/lifecycle/events.jsonl`: one JSON
//! object per line, appended and synced. The log is bounded: past [`MAX_BYTES`] the file is
//! renamed to `events.old.jsonl` (replacing the one before) and a new one starts, so at most two
//! files' worth is kept. A line a crash cut short is skipped when read.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::OpError;
use crate::files::io_err;

/// Bytes one events file grows to before it is rotated.
pub const MAX_BYTES: u64 = 1 << 20;

/// What happened.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A policy checkpoint was taken.
    Created,
    /// A checkpoint was pruned by its policy (`bytes`: what deleting it freed).
    Pruned,
    /// A checkpoint was deleted because free host space fell below the floor.
    Reclaimed,
    /// A scheduled checkpoint was not taken (over budget, below the floor).
    Skipped,
    /// A scheduled backup finished.
    BackupDone,
    /// A scheduled backup failed.
    BackupFailed,
    /// A scheduled step failed or a policy cannot run (an unknown target, say).
    Failed,
    /// Free host space is below the floor and nothing automatic is left to free.
    Warning,
}

/// One entry of the log.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event over the store's life.
    pub seq: u64,
    /// When, ms since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// The VM or volume.
    pub target: String,
    /// The checkpoint concerned, if one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Bytes freed (pruned, reclaimed) or stored (backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// What happened and why, in a sentence.
    pub message: String,
}

impl Event {
    /// An event with no checkpoint or bytes (the log sets `seq`).
    pub fn new(time_ms: u64, kind: EventKind, target: &str, message: impl Into<String>) -> Event {
        Event {
            seq: 0,
            time_ms,
            kind,
            target: target.into(),
            checkpoint: None,
            bytes: None,
            message: message.into(),
        }
    }

    /// With the checkpoint concerned.
    pub fn checkpoint(mut self, name: &str) -> Event {
        self.checkpoint = Some(name.into());
        self
    }

    /// With a byte count.
    pub fn bytes(mut self, n: u64) -> Event {
        self.bytes = Some(n);
        self
    }
}

fn current(store: &Path) -> PathBuf {
    store.join("lifecycle").join("events.jsonl")
}

fn old(store: &Path) -> PathBuf {
    store.join("lifecycle").join("events.old.jsonl")
}

/// The store's event log, for appending (one writer: the daemon).
pub struct EventLog {
    store: PathBuf,
    next_seq: u64,
    max_bytes: u64,
}

impl EventLog {
    /// Opens the log of the store in `store` (the next `seq` follows the last one written).
    pub fn open(store: &Path) -> Result<EventLog, OpError> {
        let last = read(store, 0, usize::MAX)?.last().map_or(0, |e| e.seq);
        end_torn_line(&current(store))?;
        Ok(EventLog {
            store: store.to_path_buf(),
            next_seq: last + 1,
            max_bytes: MAX_BYTES,
        })
    }

    /// Rotates at `bytes` instead of [`MAX_BYTES`] (tests).
    pub fn with_max_bytes(mut self, bytes: u64) -> EventLog {
        self.max_bytes = bytes;
        self
    }

    /// Appends `event` (its `seq` is set here) and syncs it; logs it with `tracing` too.
    pub fn append(&mut self, mut event: Event) -> Result<Event, OpError> {
        event.seq = self.next_seq;
        tracing::info!(target: "cairn::lifecycle", "{:?} {}: {}", event.kind, event.target, event.message);
        let path = current(&self.store);
        let dir = path.parent().expect("in lifecycle/");
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= self.max_bytes) {
            std::fs::rename(&path, old(&self.store)).map_err(|e| io_err("rotating", &path, e))?;
        }
        let mut line = serde_json::to_vec(&event).expect("events serialize");
        line.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&line)?;
                f.sync_data()
            })
            .map_err(|e| io_err("appending to", &path, e))?;
        self.next_seq += 1;
        Ok(event)
    }
}

/// Ends a line a crash cut short, so the next event starts on a line of its own.
fn end_torn_line(path: &Path) -> Result<(), OpError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("opening", path, e)),
    };
    let mut last = [0u8; 1];
    let torn =
        f.seek(SeekFrom::End(-1)).is_ok() && f.read_exact(&mut last).is_ok() && last[0] != b'\n';
    if torn {
        f.write_all(b"\n")
            .map_err(|e| io_err("appending to", path, e))?;
    }
    Ok(())
}

/// Events with `seq` greater than `after`, oldest first, at most the newest `limit` of them.
pub fn read(store: &Path, after: u64, limit: usize) -> Result<Vec<Event>, OpError> {
    let mut out = Vec::new();
    for path in [old(store), current(store)] {
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("reading", &path, e)),
        };
        for line in std::io::BufReader::new(f).lines() {
            let line = line.map_err(|e| io_err("reading", &path, e))?;
            // A line a crash cut short (or damaged) is skipped, not fatal: the log is a record.
            if let Ok(e) = serde_json::from_str::<Event>(&line) {
                if e.seq > after {
                    out.push(e);
                }
            }
        }
    }
    out.sort_by_key(|e| e.seq);
    out.dedup_by_key(|e| e.seq);
    if out.len() > limit {
        out.drain(..out.len() - limit);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_numbers_events_rotates_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut log = EventLog::open(dir.path())
            .expect("open")
            .with_max_bytes(2_000);
        for i in 0..100 {
            log.append(Event::new(i, EventKind::Created, "v", format!("event {i}")))
                .expect("append");
        }
        let all = read(dir.path(), 0, usize::MAX).expect("read");
        assert!(all.len() < 100, "bounded: {}", all.len());
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(*seqs.last().expect("some"), 100);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let size = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        assert!(size(current(dir.path())) + size(old(dir.path())) < 4_200);
        // A torn last line (a crash mid-append) is skipped, and numbering goes on after it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(current(dir.path()))
            .expect("open");
        f.write_all(b"{\"seq\":101,\"ti").expect("torn");
        drop(f);
        let mut log = EventLog::open(dir.path()).expect("reopen");
        let e = log
            .append(Event::new(0, EventKind::Skipped, "v", "after a crash"))
            .expect("append");
        assert_eq!(e.seq, 101);
        let tail = read(dir.path(), 99, 10).expect("read");
        assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [100, 101]);
        assert_eq!(read(dir.path(), 0, 1).expect("read").len(), 1, "limit");
    }
}
