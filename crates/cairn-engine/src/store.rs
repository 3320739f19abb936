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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

mod defrag;
mod write_behind;
pub use defrag::{DefragReport, DEFRAG_MIN_EXTENTS};
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
/// Data file name inside a store directory.
pub const DATA_FILE: &str = "cairn.data";
/// Journal file name inside a store directory.
pub const JOURNAL_FILE: &str = "cairn.journal";
/// Lock file name inside a store directory.
pub const LOCK_FILE: &str = "cairn.lock";
/// Longest accepted name.
pub const MAX_NAME: usize = 128;
/// Longest accepted checkpoint description.
pub const MAX_DESCRIPTION: usize = 1024;
/// Largest volume: 2^50 bytes (1 PiB).
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

/// Tunables of an open store.
#[derive(Debug, Clone)]
pub struct Options {
    /// Metadata pages kept in memory (4 KiB each).
    pub cache_pages: usize,
    /// Dirty metadata pages past which a write wakes the background committer (or, without
    /// one, commits itself). At twice this a write commits itself whatever runs: back-pressure.
    pub dirty_limit: usize,
    /// Journal bytes after which a commit also resets the journal.
    pub journal_limit: u64,
    /// The data file grows by this much at a time (preallocated on the host).
    pub prealloc_bytes: u64,
    /// Run a background thread that commits once `dirty_limit` is passed, so writes do not wait
    /// for commits (tests that count device operations turn it off for determinism).
    pub background_commits: bool,
    /// References one step of freeing a deleted tree releases before committing: bounds the
    /// memory and journal space a delete needs, and how long it holds the state lock at a time.
    pub drop_step: u64,
    /// Serve short data reads from a read-only mapping of the data file instead of `pread`
    /// (`device/mapping.rs`): about a third faster from the host's cache, the same when cold.
    pub mapped_reads: bool,
    /// Send the fresh blocks of copies-on-write of 256 KiB or more straight to the disk with
    /// `O_DIRECT` (`device/direct.rs`): 1.4–5 times faster here; what they wrote is then not in the
    /// host's page cache until read.
    pub direct_writes: bool,
    /// Acknowledge long copies-on-write once their bytes are queued, and write and link them on
    /// a thread of the store's (`store/write_behind.rs`): sequential rewrites after a checkpoint
    /// then overlap the disk with the caller's next request.
    pub write_behind: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cache_pages: 16 * 1024,
            dirty_limit: 8 * 1024,
            journal_limit: 256 << 20,
            prealloc_bytes: 64 << 20,
            background_commits: true,
            drop_step: 256 * 1024,
            mapped_reads: true,
            direct_writes: true,
            write_behind: true,
        }
    }
}

impl Options {
    /// The defaults, with the read and write paths' switches as the environment sets them:
    /// `CAIRN_MAPPED_READS`, `CAIRN_DIRECT_WRITES`, `CAIRN_WRITE_BEHIND` (`0`, `off`, `false` or
    /// `no` turns one off), so every Cairn process opens a store the same way.
    pub fn from_env() -> Options {
        let on = |var: &str| {
            std::env::var(var)
                .map(|v| !matches!(v.trim(), "0" | "off" | "false" | "no"))
                .unwrap_or(true)
        };
        Options {
            mapped_reads: on("CAIRN_MAPPED_READS"),
            direct_writes: on("CAIRN_DIRECT_WRITES"),
            write_behind: on("CAIRN_WRITE_BEHIND"),
            ..Options::default()
        }
    }
}

/// A volume head (`NAME`) or one of its checkpoints (`NAME@CHECKPOINT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Volume name.
    pub volume: String,
    /// Checkpoint name; `None` means the head.
    pub checkpoint: Option<String>,
}

impl Target {
    /// Parses `NAME` or `NAME@CHECKPOINT`.
    pub fn parse(s: &str) -> Result<Self> {
        let (v, c) = match s.split_once('@') {
            Some((v, c)) => (v, Some(c)),
            None => (s, None),
        };
        validate_name(v)?;
        if let Some(c) = c {
            validate_name(c)?;
        }
        Ok(Target {
            volume: v.into(),
            checkpoint: c.map(Into::into),
        })
    }

    /// The head of a volume.
    pub fn head(volume: &str) -> Self {
        Target {
            volume: volume.into(),
            checkpoint: None,
        }
    }

    /// A checkpoint of a volume.
    pub fn checkpoint(volume: &str, name: &str) -> Self {
        Target {
            volume: volume.into(),
            checkpoint: Some(name.into()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.checkpoint {
            Some(c) => write!(f, "{}@{}", self.volume, c),
            None => write!(f, "{}", self.volume),
        }
    }
}

/// Checks a volume or checkpoint name: letters, digits, `-`, `_`, `.`; not starting with `-` or `.`.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why| {
        Err(Error::InvalidName {
            name: name.into(),
            why,
        })
    };
    if name.is_empty() {
        return bad("names cannot be empty");
    }
    if name.len() > MAX_NAME {
        return bad("names are at most 128 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return bad("use only letters, digits, '-', '_' and '.'");
    }
    if name.starts_with(['-', '.']) {
        return bad("names cannot start with '-' or '.'");
    }
    Ok(())
}

/// A description must fit in its checkpoint's catalog record.
fn check_description(description: Option<&str>) -> Result<()> {
    match description {
        Some(d) if d.len() > MAX_DESCRIPTION => Err(Error::Invalid(format!(
            "description is longer than {MAX_DESCRIPTION} bytes"
        ))),
        _ => Ok(()),
    }
}

/// A volume as reported to users.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Catalog id: never reused in this store, so (with `created_ms`) it tells this volume from
    /// one that later takes the same name.
    #[serde(default)]
    pub id: u64,
    /// Logical size in bytes.
    pub size: u64,
    /// Bytes mapped in the head.
    pub referenced: u64,
    /// Checkpoint the head was last taken or applied from.
    pub parent: Option<String>,
    /// Number of checkpoints.
    pub checkpoints: usize,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// `VOLUME@CHECKPOINT` it was cloned from.
    pub origin: Option<String>,
}

/// A checkpoint as reported to users.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Volume name.
    pub volume: String,
    /// Checkpoint name.
    pub name: String,
    /// Catalog id: never reused in this store and kept across renames, so a backup can find the
    /// very checkpoint it was taken from.
    #[serde(default)]
    pub id: u64,
    /// Volume size when taken.
    pub size: u64,
    /// Bytes mapped.
    pub referenced: u64,
    /// Parent checkpoint.
    pub parent: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Description given at creation.
    pub description: Option<String>,
    /// Whether the volume's head was last taken or applied from it.
    pub is_head_parent: bool,
    /// Taken by Cairn itself to keep the state an apply replaced, not asked for by name.
    #[serde(default)]
    pub automatic: bool,
}

/// The checkpoint an apply takes of the head it replaces.
#[derive(Debug, Clone, Copy)]
pub struct SaveCurrent<'a> {
    /// Its name.
    pub name: &'a str,
    /// Whether Cairn chose to take it (and its name) rather than the user.
    pub automatic: bool,
}

/// One byte range that differs between two states of a volume.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub length: u64,
}

/// Space held by one checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointSpace {
    /// Checkpoint name.
    pub name: String,
    /// Bytes of data it maps.
    pub referenced: u64,
    /// Bytes (data and metadata) that deleting it would free.
    pub unique: u64,
}

/// Space of one volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeSpace {
    /// Volume name.
    pub name: String,
    /// Logical size.
    pub size: u64,
    /// Bytes mapped in the head.
    pub head_referenced: u64,
    /// Bytes of the head that differ from `head_changed_since` (all of it when that is `None`).
    pub head_changed: u64,
    /// `VOLUME@CHECKPOINT` the head is compared with: its parent checkpoint, else, for a clone
    /// without checkpoints of its own, the checkpoint it was cloned from, if either still exists.
    pub head_changed_since: Option<String>,
    /// Bytes (data and metadata) only the head holds.
    pub head_unique: u64,
    /// Per checkpoint.
    pub checkpoints: Vec<CheckpointSpace>,
}

/// Space of the whole store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpaceReport {
    /// Volumes asked for.
    pub volumes: Vec<VolumeSpace>,
    /// Bytes of blocks in use (data and metadata).
    pub allocated: u64,
    /// Bytes the data file spans.
    pub file_size: u64,
    /// Bytes the data and journal files really occupy on the host.
    pub host_used: u64,
    /// Trees of deleted checkpoints and volumes not yet freed (a delete was interrupted); their
    /// blocks are in `allocated` until the background committer or the next delete frees them.
    #[serde(default)]
    pub dropped_trees: usize,
}

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
    checkpoint_ids: HashMap<(u64, String), u64>,
    dirty_records: BTreeSet<u64>,
    deleted_records: BTreeSet<u64>,
    /// Set when an operation failed after it began changing the in-memory state: that state is no
    /// longer trusted, commits refuse to run, and the next operation reloads the durable state.
    poisoned: Arc<AtomicBool>,
    stats: Stats,
}

/// Counters of an open store, for benchmarks and monitoring.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Commits made (flushes, checkpoint operations, forced commits).
    pub commits: u64,
    /// Time spent in commits, in nanoseconds (syncing data, journaling, writing metadata).
    pub commit_nanos: u64,
    /// Metadata pages written by commits.
    pub pages_committed: u64,
    /// Commits that also reset the journal (it grew past its limit, or freed blocks waited).
    pub journal_resets: u64,
    /// Transactions the background committer wrote (or tried to: a failure is reported by the next
    /// flush); wake-ups that found nothing to commit are not counted.
    pub background_commits: u64,
    /// Long copies-on-write acknowledged before their data was written (write-behind).
    #[serde(default)]
    pub writes_behind: u64,
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

/// A thread that commits when writes have dirtied `dirty_limit` metadata pages, so the write that
/// crosses the limit does not wait for a commit (at full scale one took 165 ms, and a write that
/// found another in flight waited for both: 381 ms).
struct Committer {
    signal: Arc<(Mutex<CommitterState>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct CommitterState {
    wanted: bool,
    stop: bool,
}

impl Committer {
    fn start(core: Arc<Core>) -> Result<Committer> {
        let signal: Arc<(Mutex<CommitterState>, std::sync::Condvar)> = Arc::default();
        let sig = signal.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-commit".into())
            .spawn(move || loop {
                {
                    let mut g = lock(&sig.0);
                    while !g.wanted && !g.stop {
                        g = sig.1.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    if g.stop {
                        return;
                    }
                    g.wanted = false;
                }
                core.background_commit();
                // Trees left by a crashed delete or a large unmap: a step at a time, each
                // committed, stopping early when the store closes.
                while !lock(&sig.0).stop
                    && !core.poisoned.load(Ordering::SeqCst)
                    && core.background_free_step()
                {
                    core.try_release_space();
                }
            })
            .map_err(Error::io("start the background commit thread", "store"))?;
        Ok(Committer {
            signal,
            thread: Some(thread),
        })
    }

    fn wake(&self) {
        lock(&self.signal.0).wanted = true;
        self.signal.1.notify_one();
    }

    fn stop(&mut self) {
        lock(&self.signal.0).stop = true;
        self.signal.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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

/// Takes the store lock, recording our pid for whoever tries next.
pub fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io("open lock file", path.display().to_string()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            return Err(Error::Locked {
                path: dir.display().to_string(),
                holder: holder.trim().to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Error::io("lock", path.display().to_string())(e))
        }
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// How a store file is opened: plain, or (the data file of a serving store) with the fast paths
/// the options ask for.
#[derive(Clone, Copy)]
pub(crate) struct FileAccess {
    pub(crate) mapped_reads: bool,
    pub(crate) direct_writes: bool,
}

impl FileAccess {
    pub(crate) const PLAIN: FileAccess = FileAccess {
        mapped_reads: false,
        direct_writes: false,
    };

    fn data(opts: &Options) -> FileAccess {
        FileAccess {
            mapped_reads: opts.mapped_reads,
            direct_writes: opts.direct_writes,
        }
    }
}

/// Opens one of a store's files as a device, with the fast paths `access` asks for.
pub(crate) fn open_file(path: &Path, create: bool, access: FileAccess) -> Result<Arc<dyn Device>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(Error::io("open", path.display().to_string()))?;
    let mut dev = if access.mapped_reads {
        FileDevice::with_read_mapping(f)
    } else {
        FileDevice::new(f)
    };
    if access.direct_writes {
        dev = dev.with_direct_writes(path);
    }
    Ok(Arc::new(dev))
}

impl Store {
    /// Creates a new store in `dir` (created if missing) and opens it.
    pub fn init(dir: &Path, opts: Options) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(Error::io("create directory", dir.display().to_string()))?;
        let lockf = lock_dir(dir)?;
        let data_path = dir.join(DATA_FILE);
        if data_path.exists() {
            return Err(Error::StoreExists(dir.display().to_string()));
        }
        let data = open_file(&data_path, true, FileAccess::data(&opts))?;
        let journal = open_file(&dir.join(JOURNAL_FILE), true, FileAccess::PLAIN)?;
        Self::format(&*data, &data_path.display().to_string())?;
        let mut s = Self::open_devices(data, journal, opts, &dir.display().to_string())?;
        s.dir = Some(dir.to_path_buf());
        s._lock = Some(lockf);
        Ok(s)
    }

    /// Opens the store in `dir`, recovering from a crash if needed.
    pub fn open(dir: &Path, opts: Options) -> Result<Store> {
        let data_path = dir.join(DATA_FILE);
        if !data_path.exists() {
            return Err(Error::NoStore(dir.display().to_string()));
        }
        let lockf = lock_dir(dir)?;
        let data = open_file(&data_path, false, FileAccess::data(&opts))?;
        let journal = open_file(&dir.join(JOURNAL_FILE), true, FileAccess::PLAIN)?;
        let mut s = Self::open_devices(data, journal, opts, &dir.display().to_string())?;
        s.dir = Some(dir.to_path_buf());
        s._lock = Some(lockf);
        Ok(s)
    }

    /// Writes an empty store's first blocks to a data device (the journal starts empty).
    pub fn format(data: &dyn Device, path: &str) -> Result<()> {
        Self::format_layout(data, path, Layout::Clusters)
    }

    /// [`Store::format`] in a given layout. Format 1 ([`Layout::Groups`]) is what builds before
    /// format 2 wrote; tests create such stores to check that they keep working.
    pub fn format_layout(data: &dyn Device, path: &str, layout: Layout) -> Result<()> {
        let sb = Superblock {
            catalog_root: 0,
            catalog_depth: 1,
            next_id: 1,
            high_water: layout.first_data_block(),
            alloc_cursor: layout.first_data_block(),
            generation: 1,
            allocated: u64::from(layout.counts_superblock()),
            layout,
        };
        if layout.counts_superblock() {
            // Format 1 counts the superblock as allocated, in group 0's refcount page (block 0).
            let mut rc = new_page(PageKind::Refcount, 0);
            set_refcount(&mut rc, layout.refcount_slot(SUPERBLOCK).1, 1);
            crate::format::seal(&mut rc);
            data.write_at(&rc[..], 0)
                .map_err(Error::io("write", path))?;
        }
        // In format 2 nothing is allocated yet, so no refcount page exists: the first
        // allocation creates cluster 0's first one (`Meta::find_free`).
        data.write_at(&sb.encode()[..], SUPERBLOCK * BS)
            .map_err(Error::io("write", path))?;
        data.sync().map_err(Error::io("sync", path))
    }

    /// Opens a store on explicit devices (used for crash simulation); replays the journal first.
    pub fn open_devices(
        data: Arc<dyn Device>,
        journal_dev: Arc<dyn Device>,
        opts: Options,
        path: &str,
    ) -> Result<Store> {
        let dpath = format!("{path}/{DATA_FILE}");
        let journal = recover(&*data, journal_dev.clone(), path)?;
        let mut page = Box::new([0u8; BLOCK_SIZE]);
        data.read_at(&mut page[..], SUPERBLOCK * BS)
            .map_err(Error::io("read superblock", &dpath))?;
        let sb = Superblock::decode(&page, path)?;
        let allocated_end = data.len().map_err(Error::io("stat", &dpath))?;
        let meta = Meta {
            allocated_end,
            prealloc: opts.prealloc_bytes.max(BS) / BS * BS,
            dev: data.clone(),
            path: dpath,
            cache: PageCache::new(opts.cache_pages, path),
            sb,
            quarantine: Default::default(),
            frees: 0,
            ready: Vec::new(),
            releasing: None,
            release_tokens: 0,
            reserved: Default::default(),
            decremented: Default::default(),
            decremented_sealed: Default::default(),
            data_written: false,
            to_drop: Vec::new(),
        };
        let mut st = State {
            meta,
            journal: Arc::new(Mutex::new(journal)),
            opts,
            volumes: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            dropped: BTreeMap::new(),
            volume_ids: FxHashMap::default(),
            checkpoint_ids: HashMap::new(),
            dirty_records: BTreeSet::new(),
            deleted_records: BTreeSet::new(),
            poisoned: Arc::new(AtomicBool::new(false)),
            stats: Stats::default(),
        };
        st.load_catalog()?;
        let background = st.opts.background_commits;
        let writer_threads = if st.opts.write_behind {
            WRITE_BEHIND_THREADS
        } else {
            0
        };
        let pending = !st.dropped.is_empty();
        let core = Arc::new(Core {
            poisoned: st.poisoned.clone(),
            state: Mutex::new(st),
            commit_lock: Mutex::new(()),
            gate: RwLock::new(()),
            background_error: Mutex::new(None),
            write_behind: WriteBehind::new(),
        });
        let mut writers = Vec::new();
        for _ in 0..writer_threads {
            let (c, d) = (core.clone(), data.clone());
            writers.push(
                std::thread::Builder::new()
                    .name("cairn-write".into())
                    .spawn(move || c.write_behind.run(&c, &*d))
                    .map_err(Error::io("start the write-behind thread", "store"))?,
            );
        }
        let committer = if background {
            let c = Committer::start(core.clone())?;
            if pending {
                c.wake();
            }
            Some(c)
        } else {
            None
        };
        Ok(Store {
            core,
            committer,
            writers,
            grow_lock: Mutex::new(()),
            volume_gates: Mutex::new(FxHashMap::default()),
            data,
            journal_dev,
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
            dir: None,
            _lock: None,
        })
    }

    /// Runs `f` on the store's metadata under the state lock (unit tests of `meta`).
    #[cfg(test)]
    pub(crate) fn with_meta<R>(&self, f: impl FnOnce(&mut Meta) -> R) -> R {
        f(&mut self.state().meta)
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> Stats {
        let mut s = self.state().stats;
        s.writes_behind = self.core.write_behind.queued();
        s
    }

    /// The directory this store lives in, if it was opened from one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.core.state()
    }

    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        write_lock(&self.core.gate)
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.core.shared()
    }
    /// After a failed operation left the in-memory state untrusted: wait until nothing is in
    /// flight and reload the durable state (what a crash at that moment would have left).
    fn heal(&self) -> Result<()> {
        if !self.core.poisoned.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _g = self.exclusive();
        self.core.write_behind.wait_all();
        let mut st = self.state();
        if st.poisoned.load(Ordering::SeqCst) {
            let unflushed = st.has_changes();
            st.reload()?;
            // Writes acknowledged since the last flush are gone: the next flush must not say
            // they are durable (as fsync reports a writeback error once).
            if unflushed {
                lock(&self.core.background_error).get_or_insert(Error::Invalid(
                    "an operation failed midway and the store went back to its last commit: writes since the last flush were discarded".into(),
                ));
            }
        }
        Ok(())
    }

    /// The gate of a volume, looked up by name.
    fn volume_gate(&self, name: &str) -> Result<(u64, Arc<RwLock<()>>)> {
        self.heal()?;
        let id = self.state().volume_id(name)?;
        let g = lock(&self.volume_gates)
            .entry(id)
            .or_insert_with(|| Arc::new(RwLock::new(())))
            .clone();
        Ok((id, g))
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&self) -> Result<()> {
        self.core.write_behind.wait_all();
        self.heal()?;
        if let Some(e) = lock(&self.core.background_error).take() {
            return Err(e);
        }
        self.core.flush().map_err(|e| {
            // A background commit that failed just before this one (and made it fail) has
            // recorded why by now: that is the error to report. The reload comes now, while
            // this flush reports the loss, so that the next flush does not report it again.
            let earlier = lock(&self.core.background_error).take();
            let _ = self.heal();
            lock(&self.core.background_error).take();
            earlier.unwrap_or(e)
        })
    }
}

impl Core {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        read_lock(&self.gate)
    }

    fn flush(&self) -> Result<()> {
        let _g = self.shared();
        self.commit_concurrent()?;
        drop(_g);
        self.try_release_space();
        Ok(())
    }

    /// The background committer's work. A store left untrusted by a failed operation is left to
    /// the next caller to heal; a failure here is kept for the next flush to report.
    fn background_commit(&self) {
        if self.poisoned.load(Ordering::SeqCst) {
            return;
        }
        // The error is recorded before the gate is let go: the reload that discards the writes
        // needs the gate exclusively, so no flush can succeed in between. And before the commit
        // lock is: a flush waiting for it then fails on the poisoned store and reports this
        // error (once), not its own.
        let g = self.shared();
        let c = self.commit_lock();
        let attempted = match self.commit_holding(&c, false) {
            Ok(wrote) => wrote,
            Err(e) => {
                lock(&self.background_error).get_or_insert(Error::Invalid(format!(
                    "a background commit failed ({e}); writes since the last flush were discarded"
                )));
                true
            }
        };
        drop(c);
        drop(g);
        self.try_release_space();
        if attempted {
            self.state().stats.background_commits += 1;
        }
    }

    /// Commits without holding the state lock across the syncs, so reads and writes on every
    /// volume go on during the tens of milliseconds a commit's `fdatasync`s take. The transaction
    /// is sealed under the lock (records, superblock, shared references to the dirty pages), then
    /// synced, journaled and written in place outside it. Callers hold the store gate shared, so no
    /// reload or release of freed blocks runs meanwhile.
    ///
    /// When the journal is due for a reset, the reset (a data sync and a journal header write)
    /// also runs outside the lock, with the journal held: at full scale such commits came every
    /// few seconds and each held every volume's I/O for 20–300 ms. Only the blocks quarantined
    /// when the transaction was sealed become reusable after that reset: a block freed later was
    /// freed by a change the reset does not cover.
    /// Returns whether there was a transaction to write.
    fn commit_concurrent(&self) -> Result<bool> {
        self.commit_holding(&lock(&self.commit_lock), false)
    }

    /// The commit lock, for an operation that makes a change and then commits it with
    /// [`Core::commit_holding`]: holding it from before the change, no other concurrent commit
    /// can seal the change first and fail with it, leaving a reload to undo it while this caller
    /// finds nothing to commit and reports success. Taken after a volume's gate, never before.
    fn commit_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.commit_lock)
    }

    /// [`Core::commit_concurrent`] with the commit lock already held; `reset` resets the journal
    /// even if it is not due, so that the blocks freed so far go back to the host (deletes).
    fn commit_holding(&self, _c: &MutexGuard<'_, ()>, reset: bool) -> Result<bool> {
        let t = std::time::Instant::now();
        let mut st = self.state();
        let journal = st.journal.clone();
        let mut journal = lock(&journal);
        let reset = reset || st.reset_due(journal.used());
        let sealed = st.seal()?;
        let (epoch, pages) = match sealed {
            Some(sealed) => sealed,
            None if reset => (0, Vec::new()),
            None => return Ok(false),
        };
        let frees_at_seal = st.meta.frees;
        let dev = st.meta.dev.clone();
        let path = st.meta.path.clone();
        drop(st);
        // Checksums are computed here, on copies, outside the state lock.
        let sealed: Vec<(u64, Box<Page>)> = pages
            .iter()
            .map(|(b, p)| {
                let mut c = Box::new(**p);
                crate::format::seal(&mut c);
                (*b, c)
            })
            .collect();
        drop(pages);
        let mut r = if sealed.is_empty() {
            Ok(())
        } else {
            write_transaction(&*dev, &path, &mut journal, &sealed)
        };
        if reset && r.is_ok() {
            // The in-place writes must be durable before the journal forgets their images.
            r = dev
                .sync()
                .map_err(Error::io("sync", &path))
                .and_then(|()| journal.reset());
        }
        drop(journal);
        let mut st = self.state();
        st.stats.commits += 1;
        st.stats.commit_nanos += t.elapsed().as_nanos() as u64;
        st.stats.pages_committed += sealed.len() as u64;
        st.poison_on(r)?;
        let wrote = !sealed.is_empty();
        if wrote {
            st.meta.cache.mark_clean_upto(epoch);
            st.meta.decremented_sealed.clear();
        }
        if reset {
            st.stats.journal_resets += 1;
            st.meta.reset_covered(frees_at_seal);
        }
        Ok(wrote)
    }

    /// Makes `change` under the state lock, then one step of freeing the dropped trees, and
    /// commits both as one transaction, holding the commit lock from before the change (see
    /// [`Core::commit_lock`]); the caller holds its volume's gate, if any, and the store gate
    /// shared. Returns the change's value and whether trees are left to free. When none are,
    /// the commit also resets the journal, so the freed blocks can go back to the host: a delete
    /// that fits one step is one commit.
    fn commit_with_free_step<T>(
        &self,
        freed: &mut u64,
        change: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<(T, bool)> {
        let c = self.commit_lock();
        let (value, left) = {
            let mut st = self.state();
            let value = change(&mut st)?;
            st.drop_some(freed)?;
            (value, !st.dropped.is_empty())
        };
        self.commit_holding(&c, !left)?;
        Ok((value, left))
    }

    /// The background committer's share of [`Store::free_dropped`]: one step, committed. Says
    /// whether there was anything to free; a failure is kept for the next flush, as a failed
    /// background commit is (recorded before the gate is let go, for the same reason).
    fn background_free_step(&self) -> bool {
        let _g = self.shared();
        let c = self.commit_lock();
        let mut freed = 0;
        let r = {
            let mut st = self.state();
            if st.dropped.is_empty() {
                return false;
            }
            st.drop_some(&mut freed)
        };
        match r.and_then(|()| self.commit_holding(&c, false)) {
            Ok(_) => true,
            Err(e) => {
                lock(&self.background_error).get_or_insert(Error::Invalid(format!(
                    "freeing a deleted tree in the background failed ({e}); writes since the last flush were discarded"
                )));
                false
            }
        }
    }

    /// Releases the blocks whose journal reset is done, if the store happens to be quiescent.
    fn try_release_space(&self) {
        let taken = match self.gate.try_write() {
            Ok(_g) => self.state().meta.start_release(),
            Err(_) => None,
        };
        if let Some(taken) = taken {
            self.punch_and_release(taken);
        }
    }

    /// Releases the blocks whose journal reset is done, waiting until the store is quiescent
    /// and until a release already under way is done (a delete returns with its space back).
    fn release_space(&self) {
        loop {
            let taken = {
                let _g = write_lock(&self.gate);
                let mut st = self.state();
                if st.meta.ready.is_empty() {
                    return;
                }
                st.meta.start_release()
            };
            match taken {
                Some(taken) => return self.punch_and_release(taken),
                // Another release took its blocks and has not yet taken the gate to punch them.
                // Sleep rather than spin, so that taking the gate exclusively again and again
                // cannot keep it from the shared hold it waits for; the next turn then waits
                // for its punching.
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
    }

    /// Punches the blocks [`Meta::start_release`] took and makes them allocatable. Taking them
    /// needed the gate exclusively, for one instant: once nothing is in flight, no request can
    /// still read them, since none can look them up any more. Punching needs it only shared, so
    /// that no reload of the durable state runs meanwhile: on a filesystem that discards
    /// synchronously (this project's machine, ext4 without a journal, mounted with `discard`) a
    /// delete's punches took 0.6 s, and all that time every volume's I/O used to wait.
    fn punch_and_release(&self, (token, blocks): (u64, Vec<u64>)) {
        let _g = self.shared();
        let dev = {
            let st = self.state();
            if st.meta.releasing != Some(token) {
                return;
            }
            st.meta.dev.clone()
        };
        crate::meta::punch_blocks(&*dev, &blocks);
        self.state().meta.finish_release(token, &blocks);
    }
}

impl Store {
    /// Frees what deleted checkpoints and volumes (and large unmaps) left behind, a committed
    /// step at a time, reporting bytes freed so far to `progress`; returns when nothing is left.
    /// Other requests run between steps. Deletes call it; after a crash the background committer
    /// (or the next delete) finishes what a killed delete had started.
    pub fn free_dropped(&self, progress: &mut dyn FnMut(u64)) -> Result<()> {
        self.heal()?;
        self.free_rest(0, progress)
    }

    /// The end of a delete or apply that committed itself with a first step of freeing
    /// ([`Core::commit_with_free_step`]): frees what is `left`, or just releases the blocks.
    fn finish_drop(&self, left: bool, freed: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
        if left {
            return self.free_rest(freed, progress);
        }
        self.core.release_space();
        progress(freed * BS);
        Ok(())
    }

    /// [`Store::free_dropped`] with `freed` blocks already counted.
    fn free_rest(&self, mut freed: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
        loop {
            // The last step's commit also resets the journal, so freed blocks go back to the
            // host now, as a delete promises.
            let ((), left) = {
                let _g = self.shared();
                self.core.commit_with_free_step(&mut freed, |_| Ok(()))?
            };
            if !left {
                break;
            }
            progress(freed * BS);
            self.core.try_release_space();
        }
        self.core.release_space();
        progress(freed * BS);
        Ok(())
    }

    /// Trees waiting to be freed (see [`Store::free_dropped`]).
    pub fn dropped_trees(&self) -> usize {
        self.state().dropped.len()
    }

    /// Commits once enough metadata is dirty: in the background past `dirty_limit`, here past
    /// twice that (or past the limit without a background committer).
    fn maybe_commit(&self) -> Result<()> {
        let (dirty, limit) = {
            let st = self.state();
            (st.meta.cache.dirty_count(), st.opts.dirty_limit)
        };
        match &self.committer {
            Some(c) if dirty > limit && dirty <= 2 * limit => c.wake(),
            _ if dirty > limit => self.flush()?,
            _ => {}
        }
        Ok(())
    }

    /// Creates an empty volume of `size` bytes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        validate_name(name)?;
        check_size(name, size)?;
        self.heal()?;
        let _g = self.shared();
        let mut st = self.state();
        if st.volume_ids.contains_key(name) {
            return Err(Error::VolumeExists(name.into()));
        }
        let id = st.new_id();
        st.volumes.insert(
            id,
            VolumeRecord {
                id,
                name: name.into(),
                size,
                root: 0,
                mapped: 0,
                parent: None,
                created_ms: now_ms(),
                origin: None,
                origin_checkpoint: None,
            },
        );
        st.volume_ids.insert(name.into(), id);
        st.dirty_records.insert(id);
        st.commit(false)?;
        st.volume_info(id)
    }

    /// Every volume, by name.
    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.heal()?;
        // Mapped sizes count every acknowledged write.
        self.core.write_behind.wait_all();
        let st = self.state();
        let mut ids: Vec<(&String, &u64)> = st.volume_ids.iter().collect();
        ids.sort();
        Ok(ids
            .into_iter()
            .filter_map(|(_, id)| st.volume_info(*id).ok())
            .collect())
    }

    /// One volume.
    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        self.heal()?;
        self.wait_for_head(&Target::head(name))?;
        let st = self.state();
        let id = st.volume_id(name)?;
        st.volume_info(id)
    }

    /// Grows a volume; shrinking is refused since it would silently drop data.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo> {
        check_size(name, size)?;
        let (vid, vg) = self.volume_gate(name)?;
        let _g = self.shared();
        let _v = write_lock(&vg);
        self.core.write_behind.wait_volume(vid);
        let mut st = self.state();
        let id = st.volume_id(name)?;
        let v = st.volumes[&id].clone();
        if size < v.size {
            return Err(Error::InvalidSize {
                volume: name.into(),
                size,
                why: format!("smaller than its current {} bytes; volumes only grow (copy the data to a new smaller volume instead)", v.size),
            });
        }
        let mut root = v.root;
        let r = st
            .meta
            .grow(&mut root, tree_depth(v.size), tree_depth(size));
        st.poison_on(r)?;
        let vm = st.volume_mut(id);
        vm.root = root;
        vm.size = size;
        st.commit(false)?;
        st.volume_info(id)
    }

    /// Deletes a volume with all its checkpoints; clones made from it are unaffected.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.delete_volume_with_progress(name, &mut |_| {})
    }

    /// `delete_volume`, reporting bytes freed so far to `progress`.
    pub fn delete_volume_with_progress(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let (vid, vg) = self.volume_gate(name)?;
        let mut freed = 0;
        let left = {
            let _g = self.shared();
            let _v = write_lock(&vg);
            self.core.write_behind.wait_volume(vid);
            let ((), left) = self.core.commit_with_free_step(&mut freed, |st| {
                let r = st.delete_volume(name);
                st.poison_on(r)
            })?;
            left
        };
        lock(&self.volume_gates).remove(&vid);
        self.finish_drop(left, freed, progress)
    }
    /// Writes `data` at byte `offset` of a volume's head. Not durable until `flush`.
    pub fn write(&self, volume: &str, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return self.check_range("write", &Target::head(volume), offset, 0);
        }
        self.maybe_commit()?;
        let (vid, vg) = self.volume_gate(volume)?;
        let _g = self.shared();
        let _v = read_lock(&vg);
        let first = offset / BS;
        let end = offset + data.len() as u64;
        let last = (end - 1) / BS;
        self.core
            .write_behind
            .wait_range(vid, first, last - first + 1);
        let partial = |vbn: u64| offset > vbn * BS || end < (vbn + 1) * BS;
        // Partial blocks are read-modify-write: serialize them per block.
        let mut stripe_ids: Vec<usize> = [first, last]
            .into_iter()
            .filter(|&v| partial(v))
            .map(|v| self.stripe(vid, v))
            .collect();
        stripe_ids.sort_unstable();
        stripe_ids.dedup();
        let _stripes: Vec<_> = stripe_ids.iter().map(|&i| lock(&self.stripes[i])).collect();
        let mut plan = self
            .state()
            .prepare_write(vid, volume, offset, data.len() as u64)?;
        if !self.writers.is_empty() && WriteBehind::qualifies(offset, data, &plan) {
            match self.core.write_behind.try_queue(vid, first, plan, data) {
                Ok(()) => {
                    self.grow_ahead();
                    return Ok(());
                }
                Err(p) => plan = p,
            }
        }
        let io = self.write_planned(&plan, first, offset, data);
        let mut st = self.state();
        if io.is_err() {
            st.meta.unreserve_plan(&plan);
            return io;
        }
        let r = st.link_write(vid, first, &plan);
        st.poison_on(r)?;
        drop(st);
        self.grow_ahead();
        Ok(())
    }

    /// Preallocates the next stretch of the data file when it is due, without the state lock.
    /// Best effort: on failure (a full disk) the allocator's own growth reports `NoSpace`.
    fn grow_ahead(&self) {
        let Ok(_g) = self.grow_lock.try_lock() else {
            return;
        };
        let Some((from, to)) = self.state().meta.growth_due() else {
            return;
        };
        if self.data.allocate(from, to - from).is_ok() {
            let mut st = self.state();
            st.meta.allocated_end = st.meta.allocated_end.max(to);
        }
    }

    fn write_planned(
        &self,
        plan: &[(u64, Fill)],
        first: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        let partial = |vbn: u64| offset > vbn * BS || end < (vbn + 1) * BS;
        // Only the first and the last block can be partial.
        let (mut lo, mut hi) = (0, plan.len());
        if partial(first) {
            self.write_partial(plan[0], first, offset, data)?;
            lo = 1;
        }
        if hi > lo && partial(first + hi as u64 - 1) {
            self.write_partial(plan[hi - 1], first + hi as u64 - 1, offset, data)?;
            hi -= 1;
        }
        if lo == hi {
            return Ok(());
        }
        let src = ((first + lo as u64) * BS - offset) as usize;
        write_runs(
            &*self.data,
            &plan[lo..hi],
            &data[src..src + (hi - lo) * BLOCK_SIZE],
            data.len() >= LONG_WRITE,
        )
    }

    /// Read-modify-write of block `vbn`, which the write of `data` at `offset` covers in part.
    fn write_partial(
        &self,
        (phys, fill): (u64, Fill),
        vbn: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        let mut buf = [0u8; BLOCK_SIZE];
        match fill {
            Fill::Zero => {}
            Fill::InPlace => self.read_data(&mut buf, phys)?,
            Fill::CopyFrom(src) => self.read_data(&mut buf, src)?,
        }
        let bstart = vbn * BS;
        let lo = offset.max(bstart);
        let hi = end.min(bstart + BS);
        buf[(lo - bstart) as usize..(hi - bstart) as usize]
            .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
        self.write_data(&buf, phys)
    }

    /// The lock stripe of block `vbn` of volume `vid`: a cheap multiplicative mix, since this is
    /// on the write path and the inputs are our own numbers.
    fn stripe(&self, vid: u64, vbn: u64) -> usize {
        let h = (vid ^ vbn.rotate_left(20)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 32) % self.stripes.len() as u64) as usize
    }

    fn read_data(&self, buf: &mut [u8], block: u64) -> Result<()> {
        self.data_read_result(block, self.data.read_data_at(buf, block * BS))
    }

    /// [`Store::read_data`] for one run of a fragmented read (see [`Device::read_fragment_at`]).
    fn read_fragment(&self, buf: &mut [u8], block: u64) -> Result<()> {
        self.data_read_result(block, self.data.read_fragment_at(buf, block * BS))
    }

    fn data_read_result(&self, block: u64, r: std::io::Result<()>) -> Result<()> {
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::corrupt(
                block,
                "volume data lies past the end of the data file (the file was cut short)",
            ),
            _ => Error::io("data read", "data file")(e),
        })
    }

    fn write_data(&self, buf: &[u8], block: u64) -> Result<()> {
        self.data
            .write_at(buf, block * BS)
            .map_err(Error::io("data write", "data file"))
    }

    fn check_range(&self, op: &'static str, t: &Target, offset: u64, len: u64) -> Result<()> {
        let st = self.state();
        let (_, _, size) = st.resolve(t)?;
        check_range(op, t, offset, len, size)
    }

    /// Reads `buf.len()` bytes at `offset` from a head or checkpoint; unwritten ranges read as zeros.
    pub fn read(&self, target: &Target, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_into(target, offset, buf, None)
    }

    /// [`Store::read`] that also says which parts of `buf` are holes (read as zeros, no data
    /// stored): runs of `(length, is_hole)` covering `buf` in order. Servers use it to send holes
    /// without their zeros.
    pub fn read_sparse(
        &self,
        target: &Target,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Vec<(u64, bool)>> {
        let mut runs = Vec::new();
        self.read_into(target, offset, buf, Some(&mut runs))?;
        Ok(runs)
    }

    fn read_into(
        &self,
        target: &Target,
        offset: u64,
        buf: &mut [u8],
        runs: Option<&mut Vec<(u64, bool)>>,
    ) -> Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return self.check_range("read", target, offset, 0);
        }
        let (vid, vg) = self.volume_gate(&target.volume)?;
        let _g = self.shared();
        let _v = read_lock(&vg);
        let first = offset / BS;
        let nblocks = (offset + len).div_ceil(BS) - first;
        if target.checkpoint.is_none() {
            self.core.write_behind.wait_range(vid, first, nblocks);
        }
        let phys = {
            let mut st = self.state();
            let (root, depth, size) = st.resolve_id(vid, target)?;
            check_range("read", target, offset, len, size)?;
            let mut v = Vec::with_capacity(nblocks as usize);
            st.meta.lookup_range(root, depth, first, nblocks, &mut v)?;
            v
        };
        if let Some(runs) = runs {
            for (i, p) in phys.iter().enumerate() {
                let b = first + i as u64;
                let l = ((b + 1) * BS).min(offset + len) - (b * BS).max(offset);
                match runs.last_mut() {
                    Some((rl, hole)) if *hole == (*p == 0) => *rl += l,
                    _ => runs.push((l, *p == 0)),
                }
            }
        }
        if offset.is_multiple_of(BS) && len.is_multiple_of(BS) {
            return self.read_blocks(&phys, buf);
        }
        let mut tmp = vec![0u8; nblocks as usize * BLOCK_SIZE];
        self.read_blocks(&phys, &mut tmp)?;
        let skip = (offset - first * BS) as usize;
        buf.copy_from_slice(&tmp[skip..skip + len as usize]);
        Ok(())
    }

    /// Reads the blocks `phys` (0: a hole) into `out`, one run of adjacent blocks at a time. The
    /// runs [`PREFETCH_RUNS`] ahead are hinted to the device while one is copied: in a fragmented
    /// range most runs are lone blocks copied from a mapping, and the hints overlap their cache
    /// misses (docs/design.md, "Read path").
    fn read_blocks(&self, phys: &[u64], out: &mut [u8]) -> Result<()> {
        let fragmented = self.hint_if_cold(phys);
        let hint = |r: std::ops::Range<usize>| match phys[r.start] {
            0 => {}
            b => self.data.prefetch_block(b * BS),
        };
        let mut ahead = block_runs(phys).skip(1);
        ahead.by_ref().take(PREFETCH_RUNS).for_each(hint);
        for r in block_runs(phys) {
            let dst = &mut out[r.start * BLOCK_SIZE..r.end * BLOCK_SIZE];
            match phys[r.start] {
                0 => dst.fill(0),
                b if fragmented => self.read_fragment(dst, b)?,
                b => self.read_data(dst, b)?,
            }
            if let Some(n) = ahead.next() {
                hint(n);
            }
        }
        Ok(())
    }

    /// Before a fragmented read, asks the device whether a few of its blocks are in the host's
    /// cache ([`COLD_PROBES`], spread over the read); if one is not, hints every run of it to the
    /// device at once. Without that a cold fragmented read waited for one disk read per run, one
    /// after the other, since no readahead follows scattered blocks: 66-78 MiB/s for a head 63%
    /// rewritten after checkpoints. Returns whether the read is fragmented (then the probes
    /// were cached, or every run has been hinted).
    fn hint_if_cold(&self, phys: &[u64]) -> bool {
        let data_runs = || block_runs(phys).filter(|r| phys[r.start] != 0);
        let runs = data_runs().count();
        if runs < COLD_CHECK_RUNS {
            return false;
        }
        let mut probes = (0..COLD_PROBES).map(|k| k * runs / COLD_PROBES).peekable();
        let cold = data_runs().enumerate().any(|(i, r)| {
            probes.next_if_eq(&i).is_some()
                && self.data.is_cached(phys[r.start] * BS) == Some(false)
        });
        if cold {
            for r in data_runs() {
                let _ = self.data.prefetch(phys[r.start] * BS, r.len() as u64 * BS);
            }
        }
        true
    }

    /// Writes `data` to the blocks `phys` (one per 4 KiB, none 0), a run of adjacent blocks at a
    /// time, through the page cache: the write-side twin of [`Store::read_blocks`]. A defrag's
    /// copies go this way: sent straight to the disk they came back into the page cache in small
    /// folios, and the defragmented head read sequentially at 0.80 of the control instead of 1.00.
    fn write_blocks(&self, phys: &[u64], data: &[u8]) -> Result<()> {
        for r in block_runs(phys) {
            self.write_data(
                &data[r.start * BLOCK_SIZE..r.end * BLOCK_SIZE],
                phys[r.start],
            )?;
        }
        Ok(())
    }

    /// Makes a range read as zeros and releases the whole blocks in it (trim and write-zeroes).
    pub fn write_zeroes(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        self.check_range("write-zeroes", &Target::head(volume), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let full_start = offset.div_ceil(BS);
        let full_end = end / BS;
        if full_start >= full_end {
            return self.write(volume, offset, &vec![0; len as usize]);
        }
        if offset < full_start * BS {
            self.write(
                volume,
                offset,
                &vec![0; (full_start * BS - offset) as usize],
            )?;
        }
        if full_end * BS < end {
            self.write(
                volume,
                full_end * BS,
                &vec![0; (end - full_end * BS) as usize],
            )?;
        }
        self.maybe_commit()?;
        // Freed blocks stay quarantined while reads that looked them up may be in flight.
        let (vid, vg) = self.volume_gate(volume)?;
        let _g = self.shared();
        let _v = read_lock(&vg);
        self.core
            .write_behind
            .wait_range(vid, full_start, full_end - full_start);
        let mut st = self.state();
        let id = st.volume_id(volume)?;
        let v = st.volumes[&id].clone();
        let mut root = v.root;
        let r = st
            .meta
            .unmap(&mut root, tree_depth(v.size), full_start, full_end);
        let n = st.poison_on(r)?;
        let vm = st.volume_mut(id);
        vm.root = root;
        vm.mapped -= n;
        let handed_over = !st.meta.to_drop.is_empty();
        drop(st);
        if handed_over {
            // Its commit turns the subtree into a dropped tree, which it then frees.
            if let Some(c) = &self.committer {
                c.wake();
            }
        }
        Ok(())
    }

    /// Discards a range: Cairn always releases it, so it reads as zeros afterwards.
    pub fn trim(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(volume, offset, len)
    }

    /// Takes a checkpoint of a volume's head: O(1), and durable on return (it implies a flush).
    pub fn create_checkpoint(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        let vg = self.checkpoint_gate(volume, name, description)?;
        // The store gate is held from the change to its commit, so no reload can undo the
        // checkpoint in between (after a failed background commit that had sealed it) while
        // this commit finds nothing to write and reports success.
        let _g = self.shared();
        let info = self.checkpoint_holding_gate(&vg, volume, name, description)?;
        // Writes after the checkpoint go to the head, never to it, so the commit that makes it
        // durable runs with the volume open again.
        self.core.commit_concurrent()?;
        Ok(info)
    }

    /// [`Store::create_checkpoint`] without waiting for durability: O(1), and made durable by the
    /// next flush (a crash before then loses it, as it loses unflushed writes). For a caller that
    /// holds I/O back meanwhile, such as a paused VM checkpointing several disks at one instant:
    /// it resumes the guest first and flushes after.
    pub fn create_checkpoint_unflushed(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        let vg = self.checkpoint_gate(volume, name, description)?;
        let _g = self.shared();
        self.checkpoint_holding_gate(&vg, volume, name, description)
    }

    /// Checks a new checkpoint's name and description, and finds its volume's gate (which may
    /// heal the store, so it comes before the store gate is taken).
    fn checkpoint_gate(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<(u64, Arc<RwLock<()>>)> {
        validate_name(name)?;
        check_description(description)?;
        self.volume_gate(volume)
    }

    /// The in-memory part of taking a checkpoint; the caller holds the store gate shared.
    fn checkpoint_holding_gate(
        &self,
        (vid, vg): &(u64, Arc<RwLock<()>>),
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        // Waits for the writes in flight on this volume only, and holds later ones back just for
        // the in-memory part.
        let _v = write_lock(vg);
        self.core.write_behind.wait_volume(*vid);
        let mut st = self.state();
        let vid = st.check_new_checkpoint(volume, name)?;
        let r = st.checkpoint_in_memory(vid, name, description);
        let id = st.poison_on(r)?;
        st.checkpoint_info(id)
    }

    /// Every checkpoint of a volume, oldest first.
    pub fn list_checkpoints(&self, volume: &str) -> Result<Vec<CheckpointInfo>> {
        self.heal()?;
        let st = self.state();
        let vid = st.volume_id(volume)?;
        st.checkpoints
            .values()
            .filter(|c| c.volume == vid)
            .map(|c| st.checkpoint_info(c.id))
            .collect()
    }

    /// Makes a volume's head the state of one of its checkpoints; the head's own changes are dropped
    /// unless `save_current` names a checkpoint to keep them in first. Newer checkpoints remain.
    pub fn apply_checkpoint(
        &self,
        volume: &str,
        checkpoint: &str,
        save_current: Option<&str>,
    ) -> Result<VolumeInfo> {
        let save = save_current.map(|name| SaveCurrent {
            name,
            automatic: false,
        });
        self.apply_checkpoint_saving(volume, checkpoint, save)
    }

    /// [`Store::apply_checkpoint`], keeping the head it replaces as `save` in the same commit.
    pub fn apply_checkpoint_saving(
        &self,
        volume: &str,
        checkpoint: &str,
        save: Option<SaveCurrent<'_>>,
    ) -> Result<VolumeInfo> {
        if let Some(s) = save {
            validate_name(s.name)?;
        }
        let (vid, vg) = self.volume_gate(volume)?;
        let mut freed = 0;
        let (info, left) = {
            let _g = self.shared();
            let _v = write_lock(&vg);
            self.core.write_behind.wait_volume(vid);
            self.core.commit_with_free_step(&mut freed, |st| {
                let vid = st.volume_id(volume)?;
                let cid = st.checkpoint_id(vid, volume, checkpoint)?;
                if let Some(s) = save {
                    st.check_new_checkpoint(volume, s.name)?;
                }
                let r = st.apply_checkpoint(vid, cid, save);
                st.poison_on(r)
            })?
        };
        // The head's old tree is freed before returning, so `space` right after shows it gone.
        self.finish_drop(left, freed, &mut |_| {})?;
        Ok(info)
    }

    /// Deletes one checkpoint, freeing only what nothing else references; its children are
    /// re-parented to its parent.
    pub fn delete_checkpoint(&self, volume: &str, checkpoint: &str) -> Result<()> {
        self.delete_checkpoint_with_progress(volume, checkpoint, &mut |_| {})
    }

    /// `delete_checkpoint`, reporting bytes freed so far to `progress` as the delete walks.
    pub fn delete_checkpoint_with_progress(
        &self,
        volume: &str,
        checkpoint: &str,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let (vid, vg) = self.volume_gate(volume)?;
        let mut freed = 0;
        let left = {
            let _g = self.shared();
            let _v = write_lock(&vg);
            self.core.write_behind.wait_volume(vid);
            let ((), left) = self.core.commit_with_free_step(&mut freed, |st| {
                let cid = st.checkpoint_id(vid, volume, checkpoint)?;
                let r = st.drop_checkpoint(cid);
                st.poison_on(r)
            })?;
            left
        };
        self.finish_drop(left, freed, progress)
    }

    /// Replaces a checkpoint's description (`None` removes it).
    pub fn describe_checkpoint(
        &self,
        volume: &str,
        name: &str,
        description: Option<&str>,
    ) -> Result<CheckpointInfo> {
        check_description(description)?;
        self.heal()?;
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let cid = st.checkpoint_id(vid, volume, name)?;
        if let Some(c) = st.checkpoints.get_mut(&cid) {
            c.description = description.map(Into::into);
        }
        st.dirty_records.insert(cid);
        st.commit(false)?;
        st.checkpoint_info(cid)
    }

    /// Renames a checkpoint.
    pub fn rename_checkpoint(&self, volume: &str, old: &str, new: &str) -> Result<CheckpointInfo> {
        validate_name(new)?;
        self.heal()?;
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let cid = st.checkpoint_id(vid, volume, old)?;
        if st.checkpoint_ids.contains_key(&(vid, new.to_string())) {
            return Err(Error::CheckpointExists {
                volume: volume.into(),
                name: new.into(),
            });
        }
        st.checkpoint_ids.remove(&(vid, old.to_string()));
        st.checkpoint_ids.insert((vid, new.to_string()), cid);
        if let Some(c) = st.checkpoints.get_mut(&cid) {
            c.name = new.into();
        }
        st.dirty_records.insert(cid);
        // Clones name their origin; they follow the rename in the same commit.
        let clones: Vec<u64> = st
            .volumes
            .values()
            .filter(|v| v.origin_checkpoint == Some(cid))
            .map(|v| v.id)
            .collect();
        for id in clones {
            st.volume_mut(id).origin = Some(Target::checkpoint(volume, new).to_string());
        }
        st.commit(false)?;
        st.checkpoint_info(cid)
    }

    /// Renames a volume. Clones that name it as their origin follow in the same commit; a VM that
    /// lists it as a disk does not (the VM layer renames only volumes no VM uses).
    pub fn rename_volume(&self, old: &str, new: &str) -> Result<VolumeInfo> {
        validate_name(new)?;
        self.heal()?;
        let _g = self.shared();
        let mut st = self.state();
        let vid = st.volume_id(old)?;
        if st.volume_ids.contains_key(new) {
            return Err(Error::VolumeExists(new.into()));
        }
        st.volume_ids.remove(old);
        st.volume_ids.insert(new.into(), vid);
        st.volume_mut(vid).name = new.into();
        let prefix = format!("{old}@");
        let clones: Vec<u64> = st
            .volumes
            .values()
            .filter(|v| v.origin.as_deref().is_some_and(|o| o.starts_with(&prefix)))
            .map(|v| v.id)
            .collect();
        for id in clones {
            let v = st.volume_mut(id);
            if let Some(o) = v.origin.take() {
                v.origin = Some(format!("{new}@{}", &o[prefix.len()..]));
            }
        }
        st.commit(false)?;
        st.volume_info(vid)
    }

    /// Creates a volume whose head starts as a checkpoint of another volume, sharing every block.
    pub fn clone_checkpoint(
        &self,
        volume: &str,
        checkpoint: &str,
        new_volume: &str,
    ) -> Result<VolumeInfo> {
        validate_name(new_volume)?;
        self.heal()?;
        let _g = self.shared();
        let mut st = self.state();
        let vid = st.volume_id(volume)?;
        let cid = st.checkpoint_id(vid, volume, checkpoint)?;
        if st.volume_ids.contains_key(new_volume) {
            return Err(Error::VolumeExists(new_volume.into()));
        }
        let c = st.checkpoints[&cid].clone();
        if c.root != 0 {
            let r = st.meta.incref(c.root);
            st.poison_on(r)?;
        }
        let id = st.new_id();
        st.volumes.insert(
            id,
            VolumeRecord {
                id,
                name: new_volume.into(),
                size: c.size,
                root: c.root,
                mapped: c.mapped,
                parent: None,
                created_ms: now_ms(),
                origin: Some(Target::checkpoint(volume, checkpoint).to_string()),
                origin_checkpoint: Some(cid),
            },
        );
        st.volume_ids.insert(new_volume.into(), id);
        st.dirty_records.insert(id);
        st.commit(false)?;
        st.volume_info(id)
    }

    /// Waits for the pending long writes of `t`'s volume if `t` is a head (see
    /// `store/write_behind.rs`); checkpoints never change.
    fn wait_for_head(&self, t: &Target) -> Result<()> {
        if t.checkpoint.is_none() {
            let vid = self.state().volume_id(&t.volume)?;
            self.core.write_behind.wait_volume(vid);
        }
        Ok(())
    }

    /// Byte ranges that differ between two states of one volume, found by walking only the parts
    /// of the two trees that are not shared.
    pub fn diff(&self, a: &Target, b: &Target) -> Result<Vec<Extent>> {
        self.diff_range(a, b, 0, u64::MAX)
    }

    /// [`Store::diff`] limited to the bytes `offset..offset + len` (extents are clipped to it).
    pub fn diff_range(&self, a: &Target, b: &Target, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.heal()?;
        self.wait_for_head(a)?;
        self.wait_for_head(b)?;
        {
            let st = self.state();
            st.resolve(a)?;
            st.resolve(b)?;
        }
        if a.volume != b.volume {
            return Err(Error::Invalid(format!(
                "diff compares two states of one volume; got '{}' and '{}'",
                a.volume, b.volume
            )));
        }
        let mut st = self.state();
        let (ra, da, sa) = st.resolve(a)?;
        let (rb, db, sb) = st.resolve(b)?;
        let end = sa.max(sb).min(offset.saturating_add(len));
        let mut runs = Vec::new();
        st.meta
            .diff_range((ra, da), (rb, db), offset / BS, end.div_ceil(BS), &mut runs)?;
        Ok(clip_runs(runs, offset, end))
    }

    /// Byte ranges of a head or checkpoint that hold data (everything else reads as zeros without
    /// taking space); the cost follows the mapped size, not the volume size.
    pub fn mapped_extents(&self, target: &Target) -> Result<Vec<Extent>> {
        self.mapped_range(target, 0, u64::MAX)
    }

    /// [`Store::mapped_extents`] limited to the bytes `offset..offset + len`.
    pub fn mapped_range(&self, target: &Target, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.heal()?;
        self.wait_for_head(target)?;
        let mut st = self.state();
        let (root, depth, size) = st.resolve(target)?;
        let end = size.min(offset.saturating_add(len));
        let mut runs = Vec::new();
        st.meta.diff_range(
            (0, depth),
            (root, depth),
            offset / BS,
            end.div_ceil(BS),
            &mut runs,
        )?;
        Ok(clip_runs(runs, offset, end))
    }

    /// Space per checkpoint and volume (all volumes if `volume` is `None`) and store totals.
    pub fn space(&self, volume: Option<&str>) -> Result<SpaceReport> {
        self.heal()?;
        // Every figure counts every acknowledged write.
        self.core.write_behind.wait_all();
        let mut st = self.state();
        let ids: Vec<u64> = match volume {
            Some(n) => vec![st.volume_id(n)?],
            None => {
                let mut v: Vec<(String, u64)> =
                    st.volume_ids.iter().map(|(n, i)| (n.clone(), *i)).collect();
                v.sort();
                v.into_iter().map(|(_, i)| i).collect()
            }
        };
        let mut volumes = Vec::new();
        for vid in ids {
            let v = st.volumes[&vid].clone();
            let depth = tree_depth(v.size);
            let base = st.head_base(&v);
            let head_changed_since = base.as_ref().map(|p| st.qualified_name(p));
            let head_changed = match base {
                Some(p) => {
                    let mut runs = Vec::new();
                    let limit = v.size.max(p.size).div_ceil(BS);
                    st.meta.diff(
                        (p.root, tree_depth(p.size)),
                        (v.root, depth),
                        limit,
                        &mut runs,
                    )?;
                    runs.iter().map(|(_, l)| l * BS).sum()
                }
                None => v.mapped * BS,
            };
            let (d, m) = st.meta.unique(v.root, depth)?;
            let cps: Vec<CheckpointRecord> = st
                .checkpoints
                .values()
                .filter(|c| c.volume == vid)
                .cloned()
                .collect();
            let mut checkpoints = Vec::new();
            for c in cps {
                let (cd, cm) = st.meta.unique(c.root, tree_depth(c.size))?;
                checkpoints.push(CheckpointSpace {
                    name: c.name.clone(),
                    referenced: c.mapped * BS,
                    unique: (cd + cm) * BS,
                });
            }
            volumes.push(VolumeSpace {
                name: v.name.clone(),
                size: v.size,
                head_referenced: v.mapped * BS,
                head_changed,
                head_changed_since,
                head_unique: (d + m) * BS,
                checkpoints,
            });
        }
        let dpath = st.meta.path.clone();
        let file_size = self.data.len().map_err(Error::io("stat", dpath.clone()))?;
        let host_used = self
            .data
            .allocated_bytes()
            .map_err(Error::io("stat", dpath))?
            + self.journal_dev.allocated_bytes().unwrap_or(0);
        Ok(SpaceReport {
            volumes,
            allocated: st.meta.sb.allocated * BS,
            file_size,
            host_used,
            dropped_trees: st.dropped.len(),
        })
    }

    /// Checks every invariant of the store as it is on disk; see [`crate::fsck`].
    pub fn fsck(&self) -> Result<crate::fsck::FsckReport> {
        self.heal()?;
        let _g = self.exclusive();
        self.core.write_behind.wait_all();
        let mut st = self.state();
        st.commit(true)?;
        st.meta.release_ready();
        Ok(crate::fsck::check(&*self.data, &st.meta.path))
    }
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

impl State {
    fn delete_volume(&mut self, name: &str) -> Result<()> {
        let id = self.volume_id(name)?;
        let cps: Vec<u64> = self
            .checkpoints
            .values()
            .filter(|c| c.volume == id)
            .map(|c| c.id)
            .collect();
        for c in cps {
            self.drop_checkpoint(c)?;
        }
        let v = self
            .volumes
            .remove(&id)
            .ok_or_else(|| Error::UnknownVolume(name.into()))?;
        self.volume_ids.remove(&v.name);
        if v.root != 0 {
            self.queue_drop(v.root, tree_depth(v.size) - 1);
        }
        self.dirty_records.remove(&id);
        self.deleted_records.insert(id);
        Ok(())
    }
    /// Applies checkpoint `cid` to volume `vid` (both validated by the caller).
    fn apply_checkpoint(
        &mut self,
        vid: u64,
        cid: u64,
        save: Option<SaveCurrent<'_>>,
    ) -> Result<VolumeInfo> {
        if let Some(s) = save {
            let id = self.checkpoint_in_memory(vid, s.name, None)?;
            if let Some(c) = self.checkpoints.get_mut(&id) {
                c.automatic = s.automatic;
            }
        }
        let c = self.checkpoints[&cid].clone();
        let v = self.volumes[&vid].clone();
        if c.root != 0 {
            self.meta.incref(c.root)?;
        }
        if v.root != 0 {
            self.queue_drop(v.root, tree_depth(v.size) - 1);
        }
        let vm = self.volume_mut(vid);
        vm.root = c.root;
        vm.size = c.size;
        vm.mapped = c.mapped;
        vm.parent = Some(cid);
        self.volume_info(vid)
    }

    fn new_id(&mut self) -> u64 {
        let id = self.meta.sb.next_id;
        self.meta.sb.next_id += 1;
        id
    }

    /// One step of freeing the oldest dropped tree, if any (not committed); adds the blocks it
    /// freed to `freed`.
    fn drop_some(&mut self, freed: &mut u64) -> Result<()> {
        let Some(rec) = self.dropped.values().next().cloned() else {
            return Ok(());
        };
        let mut step = DropStep {
            max_released: self.opts.drop_step.max(1),
            max_dirty: self.opts.dirty_limit,
            released: 0,
        };
        let before = self.meta.sb.allocated;
        let r = self.meta.drop_step(rec.root, rec.level, &mut step);
        if self.poison_on(r)? {
            self.dropped.remove(&rec.id);
            self.deleted_records.insert(rec.id);
        }
        *freed += before.saturating_sub(self.meta.sb.allocated);
        Ok(())
    }

    /// Hands a reference to a tree (a page at `level`) over to a dropped-tree record, to be
    /// freed a step at a time (see [`Store::free_dropped`]).
    fn queue_drop(&mut self, root: u64, level: u32) {
        let id = self.new_id();
        self.dropped
            .insert(id, DroppedTreeRecord { id, root, level });
        self.dirty_records.insert(id);
    }

    fn volume_id(&self, name: &str) -> Result<u64> {
        self.volume_ids
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownVolume(name.into()))
    }

    fn checkpoint_id(&self, vid: u64, volume: &str, name: &str) -> Result<u64> {
        self.checkpoint_ids
            .get(&(vid, name.to_string()))
            .copied()
            .ok_or_else(|| Error::UnknownCheckpoint {
                volume: volume.into(),
                name: name.into(),
            })
    }

    fn volume_mut(&mut self, id: u64) -> &mut VolumeRecord {
        self.dirty_records.insert(id);
        self.volumes
            .get_mut(&id)
            .expect("volume ids come from the map")
    }

    /// Root, depth and size of a head or checkpoint.
    fn resolve(&self, t: &Target) -> Result<(u64, u32, u64)> {
        self.resolve_id(self.volume_id(&t.volume)?, t)
    }

    /// [`State::resolve`] for a volume already looked up by name (its gate held, say); fails if
    /// the volume was deleted since.
    fn resolve_id(&self, vid: u64, t: &Target) -> Result<(u64, u32, u64)> {
        match &t.checkpoint {
            None => {
                let v = self
                    .volumes
                    .get(&vid)
                    .ok_or_else(|| Error::UnknownVolume(t.volume.clone()))?;
                Ok((v.root, tree_depth(v.size), v.size))
            }
            Some(c) => {
                let cid = self.checkpoint_id(vid, &t.volume, c)?;
                let c = &self.checkpoints[&cid];
                Ok((c.root, tree_depth(c.size), c.size))
            }
        }
    }

    fn volume_info(&self, id: u64) -> Result<VolumeInfo> {
        let v = self
            .volumes
            .get(&id)
            .ok_or_else(|| Error::Invalid(format!("no volume with id {id}")))?;
        Ok(VolumeInfo {
            name: v.name.clone(),
            id: v.id,
            size: v.size,
            referenced: v.mapped * BS,
            parent: v
                .parent
                .and_then(|p| self.checkpoints.get(&p))
                .map(|c| c.name.clone()),
            checkpoints: self.checkpoints.values().filter(|c| c.volume == id).count(),
            created_ms: v.created_ms,
            origin: v.origin.clone(),
        })
    }

    /// What a head's changes are counted from (see [`VolumeSpace::head_changed_since`]).
    fn head_base(&self, v: &VolumeRecord) -> Option<CheckpointRecord> {
        v.parent
            .or(v.origin_checkpoint)
            .and_then(|c| self.checkpoints.get(&c))
            .cloned()
    }

    /// `VOLUME@CHECKPOINT` for a checkpoint of this store.
    fn qualified_name(&self, c: &CheckpointRecord) -> String {
        let volume = self.volumes.get(&c.volume).map_or("?", |v| v.name.as_str());
        Target::checkpoint(volume, &c.name).to_string()
    }

    fn checkpoint_info(&self, id: u64) -> Result<CheckpointInfo> {
        let c = self
            .checkpoints
            .get(&id)
            .ok_or_else(|| Error::Invalid(format!("no checkpoint with id {id}")))?;
        let v = &self.volumes[&c.volume];
        Ok(CheckpointInfo {
            volume: v.name.clone(),
            name: c.name.clone(),
            id,
            size: c.size,
            referenced: c.mapped * BS,
            parent: c
                .parent
                .and_then(|p| self.checkpoints.get(&p))
                .map(|p| p.name.clone()),
            created_ms: c.created_ms,
            description: c.description.clone(),
            is_head_parent: v.parent == Some(id),
            automatic: c.automatic,
        })
    }

    /// Checks that checkpoint `name` can be created on `volume`; returns the volume id.
    fn check_new_checkpoint(&self, volume: &str, name: &str) -> Result<u64> {
        let vid = self.volume_id(volume)?;
        if self.checkpoint_ids.contains_key(&(vid, name.to_string())) {
            return Err(Error::CheckpointExists {
                volume: volume.into(),
                name: name.into(),
            });
        }
        Ok(vid)
    }

    /// Records a checkpoint of the head of `vid` (validated by `check_new_checkpoint`).
    fn checkpoint_in_memory(
        &mut self,
        vid: u64,
        name: &str,
        description: Option<&str>,
    ) -> Result<u64> {
        let v = self.volumes[&vid].clone();
        if v.root != 0 {
            self.meta.incref(v.root)?;
        }
        let id = self.new_id();
        self.checkpoints.insert(
            id,
            CheckpointRecord {
                id,
                volume: vid,
                name: name.into(),
                size: v.size,
                root: v.root,
                mapped: v.mapped,
                parent: v.parent,
                created_ms: now_ms(),
                description: description.map(Into::into),
                automatic: false,
            },
        );
        self.checkpoint_ids.insert((vid, name.into()), id);
        self.dirty_records.insert(id);
        self.volume_mut(vid).parent = Some(id);
        Ok(id)
    }

    fn drop_checkpoint(&mut self, cid: u64) -> Result<()> {
        let c = self
            .checkpoints
            .remove(&cid)
            .ok_or_else(|| Error::Invalid(format!("no checkpoint with id {cid}")))?;
        self.checkpoint_ids.remove(&(c.volume, c.name.clone()));
        let children: Vec<u64> = self
            .checkpoints
            .values()
            .filter(|x| x.parent == Some(cid))
            .map(|x| x.id)
            .collect();
        for ch in children {
            if let Some(x) = self.checkpoints.get_mut(&ch) {
                x.parent = c.parent;
            }
            self.dirty_records.insert(ch);
        }
        let heads: Vec<u64> = self
            .volumes
            .values()
            .filter(|v| v.parent == Some(cid))
            .map(|v| v.id)
            .collect();
        for h in heads {
            self.volume_mut(h).parent = c.parent;
        }
        if c.root != 0 {
            self.queue_drop(c.root, tree_depth(c.size) - 1);
        }
        self.dirty_records.remove(&cid);
        self.deleted_records.insert(cid);
        Ok(())
    }

    fn prepare_write(
        &mut self,
        vid: u64,
        volume: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, Fill)>> {
        let v = self
            .volumes
            .get(&vid)
            .ok_or_else(|| Error::UnknownVolume(volume.into()))?;
        check_range("write", &Target::head(volume), offset, len, v.size)?;
        let (root, depth) = (v.root, tree_depth(v.size));
        let first = offset / BS;
        let count = (offset + len - 1) / BS - first + 1;
        let mut plan = Vec::with_capacity(count as usize);
        let long = len >= LONG_WRITE as u64;
        if let Err(e) = self
            .meta
            .prepare_write(root, depth, first, count, long, &mut plan)
        {
            self.meta.unreserve_plan(&plan);
            return Err(e);
        }
        Ok(plan)
    }

    fn link_write(&mut self, vid: u64, first: u64, plan: &[(u64, Fill)]) -> Result<()> {
        let links: Vec<(u64, u64)> = plan
            .iter()
            .enumerate()
            .filter(|(_, (_, fill))| *fill != Fill::InPlace)
            .map(|(i, (b, _))| (first + i as u64, *b))
            .collect();
        self.link_blocks(vid, &links)
    }

    /// Points each `(vbn, block)` of a volume's head at its reserved block, now written (vbns
    /// ascending). After a failure the blocks not linked are given back.
    fn link_blocks(&mut self, vid: u64, links: &[(u64, u64)]) -> Result<()> {
        self.meta.data_written = true;
        let v = &self.volumes[&vid];
        let (mut root, depth, mut mapped) = (v.root, tree_depth(v.size), v.mapped);
        let res = self.meta.link_writes(&mut root, depth, links, &mut mapped);
        if res.is_err() {
            for &(_, b) in links {
                self.meta.unreserve(b);
            }
        }
        let vm = self.volume_mut(vid);
        vm.root = root;
        vm.mapped = mapped;
        res
    }

    fn load_catalog(&mut self) -> Result<()> {
        let sb = self.meta.sb.clone();
        // Level by level, each level's pages hinted to the device before any is read: on a
        // cold page cache, one record page per checkpoint read one at a time was one disk
        // round trip each (10,000 checkpoints: ~150 ms here, more on slower disks).
        let mut level_pages = Vec::new();
        if sb.catalog_root != 0 {
            level_pages.push(sb.catalog_root);
        }
        for _ in 0..sb.catalog_depth {
            self.meta.prefetch_pages(&mut level_pages);
            let mut next = Vec::new();
            for &p in &level_pages {
                let page = self.meta.cache.get(&*self.meta.dev, p, PageKind::Tree)?;
                next.extend((0..FANOUT).map(|i| entry(page, i)).filter(|&e| e != 0));
            }
            level_pages = next;
        }
        let mut ids = level_pages;
        self.meta.prefetch_pages(&mut ids);
        for b in ids {
            let rec = Record::decode(
                self.meta.cache.get(&*self.meta.dev, b, PageKind::Record)?,
                b,
            )?;
            match rec {
                Record::Volume(v) => {
                    self.volume_ids.insert(v.name.clone(), v.id);
                    self.volumes.insert(v.id, v);
                }
                Record::Checkpoint(c) => {
                    self.checkpoint_ids.insert((c.volume, c.name.clone()), c.id);
                    self.checkpoints.insert(c.id, c);
                }
                Record::Dropped(d) => {
                    self.dropped.insert(d.id, d);
                }
            }
            self.meta.cache.remove(b);
        }
        Ok(())
    }

    fn store_records(&mut self) -> Result<()> {
        for (root, level) in std::mem::take(&mut self.meta.to_drop) {
            self.queue_drop(root, level);
        }
        let needed = depth_for(self.meta.sb.next_id);
        if needed > self.meta.sb.catalog_depth {
            let mut root = self.meta.sb.catalog_root;
            self.meta
                .grow(&mut root, self.meta.sb.catalog_depth, needed)?;
            self.meta.sb.catalog_root = root;
            self.meta.sb.catalog_depth = needed;
        }
        let depth = self.meta.sb.catalog_depth;
        for id in std::mem::take(&mut self.deleted_records) {
            let mut root = self.meta.sb.catalog_root;
            self.meta.unmap(&mut root, depth, id, id + 1)?;
            self.meta.sb.catalog_root = root;
        }
        for id in std::mem::take(&mut self.dirty_records) {
            let rec = if let Some(v) = self.volumes.get(&id) {
                Record::Volume(v.clone())
            } else if let Some(c) = self.checkpoints.get(&id) {
                Record::Checkpoint(c.clone())
            } else if let Some(d) = self.dropped.get(&id) {
                Record::Dropped(d.clone())
            } else {
                continue;
            };
            let page = rec.encode()?;
            let mut root = self.meta.sb.catalog_root;
            let leaf = self.meta.leaf_for_write(&mut root, depth, id)?;
            self.meta.sb.catalog_root = root;
            let idx = id % FANOUT;
            let dev = self.meta.dev.clone();
            let b = entry(self.meta.cache.get(&*dev, leaf, PageKind::Tree)?, idx);
            if b == 0 {
                let nb = self.meta.alloc_page(page)?;
                crate::format::set_entry(
                    self.meta.cache.get_mut(&*dev, leaf, PageKind::Tree)?,
                    idx,
                    nb,
                );
            } else {
                self.meta.cache.insert(b, page);
            }
        }
        Ok(())
    }

    /// Makes the current state durable: data first, then all metadata through the journal.
    /// Refuses to commit an in-memory state that a failed operation left untrusted.
    fn check_not_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Invalid(
                "an earlier operation failed midway; its unsaved changes are being discarded, retry".into(),
            ));
        }
        Ok(())
    }

    /// Whether anything changed since the last commit.
    fn has_changes(&self) -> bool {
        self.meta.cache.dirty_count() != 0
            || !self.meta.to_drop.is_empty()
            || !self.dirty_records.is_empty()
            || !self.deleted_records.is_empty()
            || self.meta.data_written
    }

    /// Writes changed catalog records and a new-generation superblock into their pages, the
    /// first step of every commit.
    fn stage_records(&mut self) -> Result<()> {
        self.store_records()?;
        self.meta.sb.generation += 1;
        let sb_page = self.meta.sb.encode();
        self.meta.cache.insert(SUPERBLOCK, sb_page);
        Ok(())
    }

    fn commit(&mut self, release_space: bool) -> Result<()> {
        self.check_not_poisoned()?;
        let t = std::time::Instant::now();
        let r = self.commit_inner(release_space);
        self.stats.commits += 1;
        self.stats.commit_nanos += t.elapsed().as_nanos() as u64;
        self.poison_on(r)
    }

    fn poison_on<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        r
    }

    /// Drops every in-memory change and reloads the last committed state from disk.
    fn reload(&mut self) -> Result<()> {
        let dpath = self.meta.path.clone();
        let base = dpath
            .trim_end_matches(DATA_FILE)
            .trim_end_matches('/')
            .to_string();
        let journal_dev = lock(&self.journal).device();
        *lock(&self.journal) = recover(&*self.meta.dev, journal_dev, &base)?;
        let mut page = Box::new([0u8; BLOCK_SIZE]);
        self.meta
            .dev
            .read_at(&mut page[..], SUPERBLOCK * BS)
            .map_err(Error::io("read superblock", &dpath))?;
        self.meta.sb = Superblock::decode(&page, &base)?;
        self.meta.cache = PageCache::new(self.opts.cache_pages, &base);
        self.meta.quarantine.clear();
        self.meta.ready.clear();
        // A release punching outside the locks finds its token gone and leaves the blocks be.
        self.meta.releasing = None;
        self.meta.reserved.clear();
        self.meta.decremented.clear();
        self.meta.decremented_sealed.clear();
        self.meta.data_written = false;
        self.meta.allocated_end = self.meta.dev.len().map_err(Error::io("stat", &dpath))?;
        self.volumes.clear();
        self.checkpoints.clear();
        self.dropped.clear();
        self.meta.to_drop.clear();
        self.volume_ids.clear();
        self.checkpoint_ids.clear();
        self.dirty_records.clear();
        self.deleted_records.clear();
        self.load_catalog()?;
        self.poisoned.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the next commit must also reset the journal (too long, or too many blocks waiting
    /// for a reset to become reusable); the caller holds the journal.
    fn reset_due(&self, journal_used: u64) -> bool {
        journal_used > self.opts.journal_limit
            || self.meta.quarantine.len() as u64 * BS > self.opts.journal_limit
    }

    /// The first half of a concurrent commit: writes records and the superblock into their pages
    /// and takes a shared reference to every dirty page. `None` when there is nothing to commit.
    fn seal(&mut self) -> Result<Option<Sealed>> {
        self.check_not_poisoned()?;
        if !self.has_changes() {
            return Ok(None);
        }
        let r = self.stage_records();
        self.poison_on(r)?;
        let (epoch, pages) = self.meta.cache.seal_dirty();
        let dropped = std::mem::take(&mut self.meta.decremented);
        self.meta.decremented_sealed.extend(dropped);
        self.meta.data_written = false;
        Ok(Some((epoch, pages)))
    }

    fn commit_inner(&mut self, release_space: bool) -> Result<()> {
        if !self.has_changes() && !release_space {
            return Ok(());
        }
        let dpath = self.meta.path.clone();
        // Waits for a concurrent commit in flight, whose transaction must come first.
        let journal = self.journal.clone();
        let mut journal = lock(&journal);
        self.stage_records()?;
        let mut pages = self.meta.cache.dirty_pages_mut();
        for (_, p) in pages.iter_mut() {
            crate::format::seal(p);
        }
        let list: Vec<(u64, &Page)> = pages.iter().map(|(b, p)| (*b, &**p)).collect();
        write_transaction(&*self.meta.dev, &dpath, &mut journal, &list)?;
        self.stats.pages_committed += list.len() as u64;
        drop(pages);
        self.meta.cache.mark_clean();
        self.meta.decremented.clear();
        self.meta.decremented_sealed.clear();
        self.meta.data_written = false;
        if release_space || self.reset_due(journal.used()) {
            self.meta.dev.sync().map_err(Error::io("sync", &dpath))?;
            journal.reset()?;
            self.meta.journal_was_reset();
            self.stats.journal_resets += 1;
        }
        Ok(())
    }
}

/// A transaction sealed by a concurrent commit: the page cache epoch it covers and its pages.
type Sealed = (u64, Vec<(u64, Arc<Page>)>);

/// Writes whole blocks `data` to their planned blocks, one write per run of host-adjacent blocks
/// of one kind: the fresh copies of shared blocks in a `long` write straight to the disk
/// ([`Device::write_new_at`]; `device/direct.rs` says why only those, not first writes to
/// unwritten ranges), the rest through the page cache. Shared by [`Store::write_planned`] and the
/// write-behind threads.
fn write_runs(dev: &dyn Device, plan: &[(u64, Fill)], data: &[u8], long: bool) -> Result<()> {
    let direct = |i: usize| long && matches!(plan[i].1, Fill::CopyFrom(_));
    let mut i = 0;
    while i < plan.len() {
        let mut j = i + 1;
        while j < plan.len() && plan[j].0 == plan[j - 1].0 + 1 && direct(j) == direct(i) {
            j += 1;
        }
        let run = &data[i * BLOCK_SIZE..j * BLOCK_SIZE];
        let at = plan[i].0 * BS;
        if direct(i) {
            dev.write_new_at(run, at)
        } else {
            dev.write_at(run, at)
        }
        .map_err(Error::io("data write", "data file"))?;
        i = j;
    }
    Ok(())
}

/// Makes one transaction durable: the data file is synced first (every data block the pages point
/// to is on disk), then the page images are journaled and synced (the commit point), then written
/// in place, coalesced into runs of adjacent blocks (no sync: the journal covers them).
fn write_transaction<P: std::ops::Deref<Target = Page>>(
    dev: &dyn Device,
    path: &str,
    journal: &mut Journal,
    pages: &[(u64, P)],
) -> Result<()> {
    dev.sync().map_err(Error::io("sync", path))?;
    let list: Vec<(u64, &Page)> = pages.iter().map(|(b, p)| (*b, &**p)).collect();
    journal.append(&list)?;
    let mut i = 0;
    while i < list.len() {
        let mut j = i + 1;
        while j < list.len() && list[j].0 == list[j - 1].0 + 1 {
            j += 1;
        }
        let mut buf = Vec::with_capacity((j - i) * BLOCK_SIZE);
        for (_, p) in &list[i..j] {
            buf.extend_from_slice(&p[..]);
        }
        dev.write_at(&buf, list[i].0 * BS)
            .map_err(Error::io("metadata write", path))?;
        i = j;
    }
    Ok(())
}
