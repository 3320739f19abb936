//! The store's public vocabulary: file names and limits, options, targets and names, and
//! the reports operations return.

use super::*;

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

/// How long acknowledged writes may wait for a commit when no flush comes (see
/// [`Options::commit_interval`]): ext4's default journal commit interval is 5 s.
pub const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// Where checkpoints' and volumes' creation times come from (the system clock but in tests).
    pub clock: crate::Clock,
    /// With a background committer: commit writes this long after the first one not yet
    /// committed, flush or not, so that acknowledged writes reach the disk within seconds
    /// (`None`: only flushes and the dirty limit commit).
    pub commit_interval: Option<std::time::Duration>,
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
            clock: crate::Clock::system(),
            commit_interval: Some(COMMIT_INTERVAL),
        }
    }
}

impl Options {
    /// The defaults, with the read and write paths' switches as the environment sets them:
    /// `CAIRN_MAPPED_READS`, `CAIRN_DIRECT_WRITES`, `CAIRN_WRITE_BEHIND` (`0`, `off`, `false` or
    /// `no` turns one off), and `CAIRN_COMMIT_INTERVAL` (seconds, `0` for none), so every Cairn
    /// process opens a store the same way.
    pub fn from_env() -> Options {
        let on = |var: &str| {
            std::env::var(var)
                .map(|v| !matches!(v.trim(), "0" | "off" | "false" | "no"))
                .unwrap_or(true)
        };
        // Seconds; 0 turns commits by time off (writes then wait for a flush, as with a plain
        // file in the page cache).
        let commit_interval = match std::env::var("CAIRN_COMMIT_INTERVAL") {
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(s) if s > 0.0 => Some(std::time::Duration::from_secs_f64(s)),
                Ok(_) => None,
                Err(_) => Some(COMMIT_INTERVAL),
            },
            Err(_) => Some(COMMIT_INTERVAL),
        };
        Options {
            commit_interval,
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
pub(super) fn check_description(description: Option<&str>) -> Result<()> {
    match description {
        Some(d) if d.len() > MAX_DESCRIPTION => Err(Error::Invalid(format!(
            "description is longer than {MAX_DESCRIPTION} bytes"
        ))),
        _ => Ok(()),
    }
}

/// A volume as reported to users.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Taken by Cairn itself (the state an apply replaced, or a lifecycle policy's schedule),
    /// not asked for by name; retention policies expire these.
    #[serde(default)]
    pub automatic: bool,
    /// Kept whatever a retention policy says.
    #[serde(default)]
    pub pinned: bool,
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes.
    pub offset: u64,
    /// Length, in bytes.
    pub length: u64,
}

/// Space held by one checkpoint.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Counters of an open store, for benchmarks and monitoring.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
