//! Writer sessions and the GC lock: what lets garbage collection run while other hosts back up
//! into the same repository, without conditional writes.
//!
//! A backup writes `sessions/NAME` when it starts and rewrites it every few minutes while it
//! runs; GC never deletes what it condemned while a session that started before the
//! condemnation is still live (see `gc.rs`). A session not refreshed for [`SESSION_STALE_MS`] is
//! dead (its writer was killed), and so is one of this host whose process is gone (its pid free,
//! or taken by a process that started at another time); a writer that could not refresh in time
//! gives up before it commits rather than commit a backup that GC may have raced.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};
use crate::format::new_name;
use crate::repo::{now_ms, Repository};

/// A session or lock older than this (since its last refresh) is dead.
pub const SESSION_STALE_MS: u64 = 60 * 60 * 1000;
/// How often a running backup refreshes its session.
const REFRESH_MS: u64 = 5 * 60 * 1000;

/// A session or lock record.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Object name under `sessions/` or `locks/`.
    #[serde(default)]
    pub name: String,
    /// What runs (`backup web@nightly`, `gc`).
    pub what: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// When it started, ms since the Unix epoch.
    pub started_ms: u64,
    /// When it was last refreshed.
    pub refreshed_ms: u64,
    /// The process's start time on its host (clock ticks since boot), so a record whose pid
    /// now belongs to another process is known dead.
    #[serde(default)]
    pub proc_start: Option<u64>,
}

/// Start time of process `pid` on this host (field 22 of `/proc/PID/stat`), if it runs.
fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis count
    // from 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl SessionRecord {
    /// Whether this record's process is known gone: it ran on this host, and its pid is free
    /// or belongs to a process started at another time. Records of other hosts are judged by
    /// their age alone.
    fn process_gone(&self) -> bool {
        if self.host != crate::create::host_name() {
            return false;
        }
        match (proc_start(self.pid), self.proc_start) {
            (None, _) => true,
            (Some(now), Some(then)) => now != then,
            (Some(_), None) => false,
        }
    }
}

fn aad(key: &str) -> Vec<u8> {
    format!("cairn backup {key}").into_bytes()
}

fn put(repo: &Repository, key: &str, r: &SessionRecord) -> Result<()> {
    let json = serde_json::to_vec(r).expect("records serialize");
    repo.put_sealed(key, &aad(key), &json)?;
    Ok(())
}

/// The live records under `dir` (`sessions` or `locks`); dead ones are returned apart.
pub fn list(repo: &Repository, dir: &str) -> Result<(Vec<SessionRecord>, Vec<String>)> {
    let now = now_ms();
    let (mut live, mut dead) = (Vec::new(), Vec::new());
    for o in repo.backend().list(&format!("{dir}/"))? {
        let r = repo
            .get_sealed(&o.key, "session", &aad(&o.key))
            .ok()
            .and_then(|p| serde_json::from_slice::<SessionRecord>(&p).ok());
        match r {
            Some(mut r) if r.refreshed_ms + SESSION_STALE_MS > now && !r.process_gone() => {
                r.name = o.key.clone();
                live.push(r);
            }
            // A record that does not open is treated as dead once it is old enough.
            None if o.modified_ms + SESSION_STALE_MS > now => {}
            _ => dead.push(o.key),
        }
    }
    Ok((live, dead))
}

/// A running backup's session; removed when dropped.
pub struct Session<'a> {
    repo: &'a Repository,
    record: Mutex<SessionRecord>,
}

impl<'a> Session<'a> {
    /// Starts a session for `what`.
    pub fn begin(repo: &'a Repository, what: &str) -> Result<Session<'a>> {
        Self::begin_in(repo, "sessions", what)
    }

    fn begin_in(repo: &'a Repository, dir: &str, what: &str) -> Result<Session<'a>> {
        let now = now_ms();
        let record = SessionRecord {
            name: format!("{dir}/{:016x}-{}", now, new_name()),
            what: what.into(),
            host: crate::create::host_name(),
            pid: std::process::id(),
            started_ms: now,
            refreshed_ms: now,
            proc_start: proc_start(std::process::id()),
        };
        put(repo, &record.name, &record)?;
        Ok(Session {
            repo,
            record: Mutex::new(record),
        })
    }

    /// When it started.
    pub fn started_ms(&self) -> u64 {
        self.lock().started_ms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rewrites the record if the last refresh is old enough.
    pub fn refresh_if_due(&self) -> Result<()> {
        let now = now_ms();
        let mut r = self.lock();
        if now < r.refreshed_ms + REFRESH_MS {
            return Ok(());
        }
        let mut next = r.clone();
        next.refreshed_ms = now;
        put(self.repo, &next.name, &next)?;
        *r = next;
        Ok(())
    }

    /// Refreshes now and fails if the session went stale meanwhile (a GC may then have deleted
    /// what this writer meant to reference): called right before the commit.
    pub fn check_fresh(&self) -> Result<()> {
        let now = now_ms();
        let mut r = self.lock();
        if now >= r.refreshed_ms + SESSION_STALE_MS / 2 {
            return Err(BackupError::Invalid(format!(
                "this backup could not refresh its session in repository {} for {} minutes, so garbage collection may have removed data it reuses; nothing was committed, run it again",
                self.repo.location(),
                (now - r.refreshed_ms) / 60_000
            )));
        }
        let mut next = r.clone();
        next.refreshed_ms = now;
        put(self.repo, &next.name, &next)?;
        *r = next;
        Ok(())
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let name = self.lock().name.clone();
        let _ = self.repo.backend().delete(&name);
    }
}

/// Takes the repository's GC lock: one GC at a time. Without conditional writes the lock is a
/// record plus a check: write ours, list the others, and back off if a live one exists (two
/// that start together may both back off; neither deletes anything then).
pub fn gc_lock(repo: &Repository) -> Result<Session<'_>> {
    let ours = Session::begin_in(repo, "locks", "gc")?;
    let ours_name = ours.lock().name.clone();
    let (live, dead) = list(repo, "locks")?;
    for d in dead {
        let _ = repo.backend().delete(&d);
    }
    if let Some(other) = live.iter().find(|r| r.name != ours_name) {
        return Err(BackupError::Busy(format!(
            "another garbage collection holds repository {} ({} pid {} since {}); wait for it to end (a lock of a process that died on another host expires an hour after its last refresh)",
            repo.location(),
            other.host,
            other.pid,
            cairn_engine::names::time_str(other.started_ms)
        )));
    }
    Ok(ours)
}
