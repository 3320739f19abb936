//! The store: one directory with the data file, the journal and a lock file, holding volumes and
//! their checkpoints. `Store` is the engine's public face and is safe to use from many threads.
//!
//! Concurrency: metadata lives behind one mutex that is held only for mapping work (microseconds);
//! data I/O happens outside it. A write reserves its new blocks, writes the data unlocked, then
//! links the blocks, so a commit never sees a mapping whose data is not written and needs to wait
//! for nothing in flight. Each volume has a gate (a read-write lock): reads and writes hold it
//! shared, operations that change what a tree *is* (checkpoint, apply, resize, delete) hold it
//! exclusively, so a checkpoint waits only for the writes in flight on its own volume and contains
//! exactly those acknowledged before it. A store-wide gate is taken exclusively only to release
//! freed blocks for reuse, so that no request that looked a block up can still be reading it.
//!
//! This file holds the three structures (`Store`, `Core`, `State`) and their small helpers; their
//! work is in `store/`: `open.rs` (opening and flushing), `volumes.rs` (volume and checkpoint
//! operations), `io.rs` (reads and writes), `queries.rs` (diff, space, fsck), `state.rs` (changes to
//! the catalog in memory), `commit.rs` (commits and freeing), `files.rs` (the directory's files),
//! `types.rs` (the public vocabulary), plus `defrag.rs` and `write_behind.rs`.

use crate::blockmap::Fill;
use crate::cache::PageCache;
use crate::device::{Device, FileDevice, LONG_WRITE};
use crate::error::{Error, Result};
use crate::format::{
    depth_for, entry, new_page, set_refcount, CheckpointRecord, DroppedTreeRecord, Layout, Page,
    PageKind, Record, Superblock, VolumeRecord, BLOCK_SIZE, FANOUT, SUPERBLOCK,
};
use crate::journal::Journal;
use crate::meta::{block_runs, DropStep, Meta};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

mod commit;
mod defrag;
mod files;
mod io;
mod open;
mod queries;
mod state;
mod types;
mod volumes;
mod write_behind;

use commit::{write_transaction, Committer, Sealed};
pub use defrag::{DefragReport, DEFRAG_MIN_EXTENTS};
pub use files::lock_dir;
pub(crate) use files::{open_file, FileAccess};
use io::write_runs;
pub use types::*;
use write_behind::WriteBehind;

const BS: u64 = BLOCK_SIZE as u64;

/// How many runs ahead of the one being copied [`Store::read_blocks`] hints: 2 to 8 measured
/// alike in `scripts/scatter-read-bound.c prefetch`; 1 hides less of each miss.
const PREFETCH_RUNS: usize = 4;

/// A read in at least this many runs of data is fragmented enough to check whether it is cold
/// (see [`Store::hint_if_cold`]); a shorter one costs at most this many disk reads in a row.
const COLD_CHECK_RUNS: usize = 8;

/// Blocks of a fragmented read asked about before it (see [`Store::hint_if_cold`]). One, the
/// first, missed reads that the host had paged out in part (DAMON takes idle pages here, see
/// docs/benchmarks.md, "Noise"): each of their other blocks then cost a disk read in turn.
const COLD_PROBES: usize = 4;

/// Threads that write and link acknowledged long copies-on-write (`store/write_behind.rs`).
const WRITE_BEHIND_THREADS: usize = 2;

/// The catalog in memory and what changed since the last commit, behind `Core::state`.
struct State {
    meta: Meta,
    /// Locked by commits only: the state lock to append a whole transaction in place, or from a
    /// seal to the end of a concurrent commit (see [`Store::commit_concurrent`]), which keeps
    /// transactions in the order their pages were sealed.
    journal: Arc<Mutex<Journal>>,
    opts: Options,
    volumes: BTreeMap<u64, VolumeRecord>,
    checkpoints: BTreeMap<u64, CheckpointRecord>,
    /// Trees of deleted checkpoints and volumes (and unmapped subtrees) still being freed.
    dropped: BTreeMap<u64, DroppedTreeRecord>,
    // Fx, not SipHash: looked up on every read and write; names are few and validated.
    volume_ids: FxHashMap<String, u64>,
    checkpoint_ids: BTreeMap<(u64, String), u64>,
    dirty_records: BTreeSet<u64>,
    deleted_records: BTreeSet<u64>,
    /// When the oldest write not yet committed was linked (for commits by time).
    unflushed_since: Option<std::time::Instant>,
    /// Set when an operation failed after it began changing the in-memory state: that state is no
    /// longer trusted, commits refuse to run, and the next operation reloads the durable state.
    poisoned: Arc<AtomicBool>,
    stats: Stats,
}

/// An open store. Methods take `&self` and may be called from many threads.
pub struct Store {
    core: Arc<Core>,
    /// The background committer, if the options ask for one.
    committer: Option<Committer>,
    /// The write-behind threads, if the options ask for them.
    writers: Vec<std::thread::JoinHandle<()>>,
    /// Held while the data file is grown ahead of need (see [`Store::grow_ahead`]).
    grow_lock: Mutex<()>,
    volume_gates: Mutex<FxHashMap<u64, Arc<RwLock<()>>>>,
    data: Arc<dyn Device>,
    journal_dev: Arc<dyn Device>,
    stripes: Vec<Mutex<()>>,
    dir: Option<PathBuf>,
    _lock: Option<File>,
}

/// The part of a store that a commit needs, shared with the background committer's thread.
struct Core {
    state: Mutex<State>,
    /// Serializes concurrent commits, so a second flush waits here rather than on the journal
    /// while holding the state lock.
    commit_lock: Mutex<()>,
    poisoned: Arc<AtomicBool>,
    gate: RwLock<()>,
    /// Why a background commit failed; the next flush reports it, since the writes it was making
    /// durable were dropped when the store reloaded its durable state.
    background_error: Mutex<Option<Error>>,
    /// Long copies-on-write acknowledged and not yet linked.
    write_behind: WriteBehind,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

use crate::sync::{lock, read as read_lock, write as write_lock};

/// Block runs to byte extents within `start..end`.
fn clip_runs(runs: Vec<(u64, u64)>, start: u64, end: u64) -> Vec<Extent> {
    runs.into_iter()
        .filter_map(|(s, l)| {
            let a = (s * BS).max(start);
            let b = ((s + l) * BS).min(end);
            (a < b).then(|| Extent {
                offset: a,
                length: b - a,
            })
        })
        .collect()
}

fn tree_depth(size: u64) -> u32 {
    depth_for(size.div_ceil(BS).max(1))
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(c) = self.committer.as_mut() {
            c.stop();
        }
        // Every acknowledged write is linked before the closing commit.
        self.core.write_behind.stop();
        for t in self.writers.drain(..) {
            let _ = t.join();
        }
        // Closing a store is a flush, as closing a disk would be; errors have nowhere to go here, and
        // whatever was not committed is exactly what a crash would have lost.
        // A clean close also empties the journal, so the next open replays nothing.
        let _g = write_lock(&self.core.gate);
        let mut st = lock(&self.core.state);
        if !st.poisoned.load(Ordering::SeqCst) && st.commit(true).is_ok() {
            st.meta.release_ready();
        }
    }
}

/// Replays the journal of a store onto its data file and starts a fresh journal: after this the data
/// file alone holds the last committed state.
pub fn recover(data: &dyn Device, journal_dev: Arc<dyn Device>, path: &str) -> Result<Journal> {
    let jpath = format!("{path}/{JOURNAL_FILE}");
    let dpath = format!("{path}/{DATA_FILE}");
    let (seq, txns) = Journal::replay(&*journal_dev, &jpath, |b, img| {
        data.write_at(&img[..], b * BS)
            .map_err(Error::io("journal replay write", &dpath))
    })?;
    if txns > 0 {
        data.sync().map_err(Error::io("sync", &dpath))?;
    }
    // A torn header reads as sequence 0; records of any earlier sequence may still lie in the file,
    // so the new sequence must not collide with them: take one from the clock if it is larger.
    let seq = (seq + 1).max(now_ms() << 8);
    Journal::create(journal_dev, &jpath, seq)
}

fn check_size(name: &str, size: u64) -> Result<()> {
    let why = if size == 0 {
        "a volume needs at least 512 bytes"
    } else if !size.is_multiple_of(512) {
        "sizes must be a multiple of 512 bytes"
    } else if size > MAX_VOLUME_SIZE {
        "the largest volume is 1 PiB"
    } else {
        return Ok(());
    };
    Err(Error::InvalidSize {
        volume: name.into(),
        size,
        why: why.into(),
    })
}

fn check_range(op: &'static str, t: &Target, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            op,
            target: t.to_string(),
            offset,
            len,
            size,
        }),
    }
}
