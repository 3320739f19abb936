//! Live restore: a backup's image becomes a volume at once, served by the daemon's NBD server
//! while its data is copied in behind the clients.
//!
//! The volume is cut into units of one chunk (64 KiB). A unit is *filled* once its data from the
//! backup is written into the volume; units the backup holds no data for start filled (the new
//! volume reads zeros there already). Every NBD request on the head first fills the units it
//! touches (the [`Backfill`] hook), and a background thread fills the rest in order. A unit is
//! claimed before it is filled, by one filler only, so a client's write can never be overwritten
//! by a fill that started before it.
//!
//! What is filled is kept in `STORE/backup/live/VOLUME.fill`, written whole (temporary file,
//! fsync, rename) on every client flush after the store itself is flushed, with the set of units
//! taken *before* that flush: a unit recorded as filled always has its data committed. After a
//! crash, units not recorded are filled again from the backup; a client's write to them was not
//! flushed yet (it came after their fill, which came after the record), so losing it is what a
//! crash may do anyway. `VOLUME.json` beside it says which backup fills the volume. Both go once
//! every unit is filled and committed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cairn_backup::format::CHUNK_SIZE;
use cairn_backup::reader::ImageReader;
use cairn_backup::restore::write_nonzero;
use cairn_backup::sink::VolumeSink;
use cairn_engine::sync::lock;
use cairn_engine::Store;
use cairn_nbd::Backfill;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{ErrorKind, OpError};
use crate::files::{io_err, write_atomic};

/// Units the background thread claims at once: 4 MiB, small enough that a client waiting for
/// one of them waits little.
const BATCH_UNITS: u64 = 64;
/// The background thread records progress at least this often.
const RECORD_EVERY: Duration = Duration::from_secs(5);

/// What `VOLUME.json` holds: which backup fills the volume.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// The volume being filled.
    pub volume: String,
    /// The backup.
    pub backup: String,
    /// Which of its images.
    pub image: usize,
    /// Where the repository is (never secrets).
    pub repository: String,
    /// The volume's size.
    pub size: u64,
}

/// How far a live restore got.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStatus {
    /// Which volume from which backup.
    #[serde(flatten)]
    pub record: LiveRecord,
    /// Bytes of the backup's data copied in (or never needed).
    pub filled_bytes: u64,
    /// Whether it runs (`copying`), waits for `backup restore --live` to be run again after a
    /// daemon restart (`stalled`), or retries after an error (`retrying`).
    pub state: String,
    /// The last error, while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Which units are filled, and which are being filled.
struct Units {
    filled: Vec<u64>,
    count: u64,
    claimed: HashSet<u64>,
    /// Filled since the record was last written.
    dirty: bool,
}

impl Units {
    fn is_filled(&self, u: u64) -> bool {
        self.filled[(u / 64) as usize] & (1 << (u % 64)) != 0
    }

    fn set(&mut self, u: u64) {
        if !self.is_filled(u) {
            self.filled[(u / 64) as usize] |= 1 << (u % 64);
            self.count += 1;
            self.dirty = true;
        }
    }
}

/// One volume being filled from a backup (or, with no reader, waiting to be resumed).
pub struct LiveRestore {
    store: Arc<Store>,
    record: LiveRecord,
    reader: Option<ImageReader>,
    dir: PathBuf,
    units: Mutex<Units>,
    changed: Condvar,
    total: u64,
    complete: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
    /// Units the background thread starts its next search from.
    cursor: AtomicU64,
    /// Held through a whole commit (snapshot, flush, record), so that a flush that finds
    /// nothing new to record cannot return before an earlier one has recorded what it took.
    committing: Mutex<()>,
    /// The record is gone (the restore finished or was given up): flushes record nothing more.
    finished: AtomicBool,
    /// The restore that took over from this one (resumed after a daemon restart): connections
    /// made before it still hold this one, and are passed on.
    successor: Mutex<Option<Arc<LiveRestore>>>,
}

fn unit_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// `STORE/backup/live`.
pub fn live_dir(store_dir: &Path) -> PathBuf {
    store_dir.join("backup").join("live")
}

impl LiveRestore {
    /// Starts filling `record.volume` (already created, empty) from `reader`: its data units
    /// are to be filled, the rest count as filled. The record is written before this returns.
    pub fn start(
        store: Arc<Store>,
        store_dir: &Path,
        record: LiveRecord,
        reader: ImageReader,
    ) -> Result<Arc<LiveRestore>, OpError> {
        let n = unit_count(record.size);
        let mut needed = vec![0u64; n.div_ceil(64) as usize];
        for r in reader.data_ranges() {
            for u in r.start / CHUNK_SIZE..r.end.div_ceil(CHUNK_SIZE) {
                needed[(u / 64) as usize] |= 1 << (u % 64);
            }
        }
        let filled: Vec<u64> = needed.iter().map(|w| !w).collect();
        let live = LiveRestore::new(store, store_dir, record, Some(reader), filled);
        std::fs::create_dir_all(&live.dir).map_err(|e| io_err("creating", &live.dir, e))?;
        write_atomic(
            &live.json_path(),
            &serde_json::to_vec(&live.record).expect("JSON"),
        )?;
        let filled = lock(&live.units).filled.clone();
        live.write_units(&filled)?;
        Ok(Arc::new(live))
    }

    /// Picks up a live restore recorded in `store_dir`: with `reader`, to go on filling; without,
    /// to serve what is filled and refuse the rest until it is resumed.
    pub fn load(
        store: Arc<Store>,
        store_dir: &Path,
        volume: &str,
        reader: Option<ImageReader>,
    ) -> Result<Arc<LiveRestore>, OpError> {
        let dir = live_dir(store_dir);
        let json = dir.join(format!("{volume}.json"));
        let bytes = std::fs::read(&json).map_err(|e| io_err("reading", &json, e))?;
        let record: LiveRecord = serde_json::from_slice(&bytes).map_err(|e| {
            OpError::new(
                ErrorKind::Corrupt,
                format!("live restore record {} is damaged ({e}); delete volume '{volume}' and restore again", json.display()),
            )
        })?;
        let fill = dir.join(format!("{volume}.fill"));
        let raw = std::fs::read(&fill).map_err(|e| io_err("reading", &fill, e))?;
        let words = unit_count(record.size).div_ceil(64) as usize;
        if raw.len() != words * 8 {
            return Err(OpError::new(
                ErrorKind::Corrupt,
                format!("live restore progress {} has {} bytes, not {}; delete volume '{volume}' and restore again", fill.display(), raw.len(), words * 8),
            ));
        }
        let filled = raw
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        Ok(Arc::new(LiveRestore::new(
            store, store_dir, record, reader, filled,
        )))
    }

    fn new(
        store: Arc<Store>,
        store_dir: &Path,
        record: LiveRecord,
        reader: Option<ImageReader>,
        mut filled: Vec<u64>,
    ) -> LiveRestore {
        let total = unit_count(record.size);
        // Bits past the last unit count as filled, so a full word means a filled word.
        if !total.is_multiple_of(64) {
            if let Some(last) = filled.last_mut() {
                *last |= !0u64 << (total % 64);
            }
        }
        let count = filled
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>()
            - (filled.len() as u64 * 64 - total);
        let done = count == total;
        LiveRestore {
            store,
            record,
            reader,
            dir: live_dir(store_dir),
            units: Mutex::new(Units {
                filled,
                count,
                claimed: HashSet::new(),
                dirty: false,
            }),
            changed: Condvar::new(),
            total,
            complete: AtomicBool::new(done),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            cursor: AtomicU64::new(0),
            committing: Mutex::new(()),
            finished: AtomicBool::new(false),
            successor: Mutex::new(None),
        }
    }

    /// The volume.
    pub fn volume(&self) -> &str {
        &self.record.volume
    }

    /// Which backup fills it.
    pub fn record(&self) -> &LiveRecord {
        &self.record
    }

    /// How far it got.
    pub fn status(&self) -> LiveStatus {
        let filled = lock(&self.units).count;
        let error = lock(&self.error).clone();
        let state = match (&self.reader, &error) {
            (None, _) => "stalled",
            (Some(_), Some(_)) => "retrying",
            (Some(_), None) => "copying",
        };
        LiveStatus {
            record: self.record.clone(),
            filled_bytes: (filled * CHUNK_SIZE).min(self.record.size),
            state: state.into(),
            error,
        }
    }

    fn json_path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.record.volume))
    }

    fn fill_path(&self) -> PathBuf {
        self.dir.join(format!("{}.fill", self.record.volume))
    }

    fn write_units(&self, filled: &[u64]) -> Result<(), OpError> {
        let bytes: Vec<u8> = filled.iter().flat_map(|w| w.to_le_bytes()).collect();
        write_atomic(&self.fill_path(), &bytes)
    }

    /// Claims the units of `units` nobody fills and that are not filled; says whether some
    /// were being filled by another.
    fn claim(&self, units: std::ops::Range<u64>, st: &mut Units) -> (Vec<u64>, bool) {
        let mut mine = Vec::new();
        let mut others = false;
        for u in units {
            if st.is_filled(u) {
                continue;
            }
            if st.claimed.contains(&u) {
                others = true;
            } else {
                mine.push(u);
            }
        }
        for u in &mine {
            st.claimed.insert(*u);
        }
        (mine, others)
    }

    /// Fills claimed units (ascending), a run of neighbours per read; then marks them.
    fn fill(&self, units: &[u64]) -> Result<(), String> {
        let reader = self.reader.as_ref().ok_or_else(|| self.stalled_message())?;
        let result = (|| -> Result<(), String> {
            let mut i = 0;
            while i < units.len() {
                let mut j = i + 1;
                while j < units.len() && units[j] == units[j - 1] + 1 {
                    j += 1;
                }
                let from = units[i] * CHUNK_SIZE;
                let to = ((units[j - 1] + 1) * CHUNK_SIZE).min(self.record.size);
                let mut buf = vec![0u8; usize::try_from(to - from).expect("a batch")];
                reader.read_at(from, &mut buf).map_err(|e| e.to_string())?;
                let mut sink = VolumeSink {
                    store: &self.store,
                    volume: self.record.volume.clone(),
                };
                write_nonzero(&mut sink, from, &buf).map_err(|e| e.to_string())?;
                i = j;
            }
            Ok(())
        })();
        let mut st = lock(&self.units);
        for u in units {
            st.claimed.remove(u);
            if result.is_ok() {
                st.set(*u);
            }
        }
        if st.count == self.total {
            self.complete.store(true, Ordering::SeqCst);
        }
        drop(st);
        self.changed.notify_all();
        result
    }

    fn stalled_message(&self) -> String {
        format!(
            "volume '{}' is being restored live from backup {} and the restore is not running (the daemon restarted); run `cairn backup restore {} --to {} --live` again to go on",
            self.record.volume, self.record.backup, self.record.backup, self.record.volume
        )
    }

    /// Fills units until none is left; records progress now and then; ends by committing and
    /// removing the record. Errors (an unreachable repository) are retried with backoff.
    pub fn run_background(
        self: &Arc<Self>,
        rate_limit: Option<u64>,
        on_complete: impl FnOnce() + Send + 'static,
    ) {
        let me = self.clone();
        std::thread::spawn(move || {
            // Background work, beside the VM that uses the volume (see cairn_backup::background).
            cairn_backup::background::lower_priority();
            let began = Instant::now();
            let mut copied = 0u64;
            let mut last_record = Instant::now();
            let mut backoff = Duration::from_secs(1);
            while !me.stop.load(Ordering::SeqCst) {
                let batch = {
                    let mut st = lock(&me.units);
                    me.next_batch(&mut st)
                };
                let Some(batch) = batch else {
                    if me.complete.load(Ordering::SeqCst) {
                        break;
                    }
                    // Everything left is being filled by clients' requests.
                    let st = lock(&me.units);
                    let _ = me.changed.wait_timeout(st, Duration::from_millis(100));
                    continue;
                };
                match cairn_backup::background::pool().install(|| me.fill(&batch)) {
                    Ok(()) => {
                        *lock(&me.error) = None;
                        backoff = Duration::from_secs(1);
                        copied += batch.len() as u64 * CHUNK_SIZE;
                        if let Some(rate) = rate_limit.filter(|&r| r > 0) {
                            let due = Duration::from_secs_f64(copied as f64 / rate as f64);
                            if let Some(wait) = due.checked_sub(began.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                    }
                    Err(e) => {
                        warn!(
                            "live restore of '{}': {e}; retrying in {backoff:?}",
                            me.volume()
                        );
                        *lock(&me.error) = Some(e);
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        continue;
                    }
                }
                if last_record.elapsed() >= RECORD_EVERY {
                    if let Err(e) = me.commit() {
                        warn!("live restore of '{}': recording progress: {e}", me.volume());
                    }
                    last_record = Instant::now();
                }
            }
            if me.complete.load(Ordering::SeqCst) {
                match me.finish() {
                    Ok(()) => {
                        info!("live restore of '{}' complete", me.volume());
                        on_complete();
                    }
                    Err(e) => warn!("live restore of '{}': finishing: {e}", me.volume()),
                }
            }
        });
    }

    /// Claims the next units to fill in the background, from the cursor on.
    fn next_batch(&self, st: &mut Units) -> Option<Vec<u64>> {
        let start = self.cursor.load(Ordering::Relaxed);
        for pass in [start..self.total, 0..start] {
            let mut u = pass.start;
            while u < pass.end {
                let word = st.filled[(u / 64) as usize];
                if u % 64 == 0 && word == !0 {
                    u += 64;
                    continue;
                }
                if !st.is_filled(u) && !st.claimed.contains(&u) {
                    let end = (u + BATCH_UNITS).min(self.total);
                    let (mine, _) = self.claim(u..end, st);
                    self.cursor.store(end, Ordering::Relaxed);
                    return Some(mine);
                }
                u += 1;
            }
        }
        None
    }

    /// Flushes the store, then records the units filled before the flush.
    fn commit(&self) -> Result<(), OpError> {
        let _one = lock(&self.committing);
        if self.finished.load(Ordering::SeqCst) {
            return Ok(self.store.flush()?);
        }
        let snapshot = {
            let mut st = lock(&self.units);
            match std::mem::take(&mut st.dirty) {
                true => Some(st.filled.clone()),
                false => None,
            }
        };
        let flushed = self.store.flush().map_err(OpError::from);
        let recorded = match (&flushed, snapshot) {
            (Ok(()), Some(bits)) => self.write_units(&bits),
            _ => Ok(()),
        };
        if flushed.is_err() || recorded.is_err() {
            lock(&self.units).dirty = true;
        }
        flushed.and(recorded)
    }

    /// Every unit is filled: commits and removes the record.
    fn finish(&self) -> Result<(), OpError> {
        let _one = lock(&self.committing);
        self.store.flush()?;
        for p in [self.fill_path(), self.json_path()] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &p, e)),
            }
        }
        self.finished.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops the background thread (a resumed restore takes over).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Gives the restore up (its volume is being deleted): stops and forgets the record.
    pub fn abandon(&self) {
        self.stop();
        let _one = lock(&self.committing);
        for p in [self.fill_path(), self.json_path()] {
            let _ = std::fs::remove_file(p);
        }
        self.finished.store(true, Ordering::SeqCst);
    }
}

impl LiveRestore {
    fn successor(&self) -> Option<Arc<LiveRestore>> {
        lock(&self.successor).clone()
    }
}

impl Backfill for LiveRestore {
    fn ensure(&self, offset: u64, len: u64) -> Result<(), String> {
        // Checked first: every request of a completed restore passes here, with no lock.
        if self.complete.load(Ordering::Relaxed) || len == 0 {
            return Ok(());
        }
        if let Some(next) = self.successor() {
            return next.ensure(offset, len);
        }
        let units = offset / CHUNK_SIZE..(offset + len).div_ceil(CHUNK_SIZE).min(self.total);
        loop {
            let (mine, others) = {
                let mut st = lock(&self.units);
                loop {
                    let (mine, others) = self.claim(units.clone(), &mut st);
                    if mine.is_empty() && others {
                        st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    break (mine, others);
                }
            };
            if mine.is_empty() {
                return Ok(());
            }
            self.fill(&mine)?;
            if !others {
                return Ok(());
            }
        }
    }

    fn flush(&self) -> Result<(), String> {
        if let Some(next) = self.successor() {
            return next.flush();
        }
        self.commit().map_err(|e| e.to_string())
    }

    fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed) || self.successor().is_some_and(|n| n.is_complete())
    }
}

/// The live restores of a store, by volume.
#[derive(Default, Clone)]
pub struct LiveRestores(Arc<Mutex<BTreeMap<String, Arc<LiveRestore>>>>);

impl LiveRestores {
    /// Adds (or replaces) one.
    pub fn insert(&self, live: Arc<LiveRestore>) {
        let old = lock(&self.0).insert(live.volume().to_string(), live.clone());
        if let Some(old) = old.filter(|o| !Arc::ptr_eq(o, &live)) {
            old.stop();
            *lock(&old.successor) = Some(live);
        }
    }

    /// Removes one.
    pub fn remove(&self, volume: &str) {
        lock(&self.0).remove(volume);
    }

    /// One, by volume.
    pub fn get(&self, volume: &str) -> Option<Arc<LiveRestore>> {
        lock(&self.0).get(volume).cloned()
    }

    /// All, by volume.
    pub fn status(&self) -> Vec<LiveStatus> {
        lock(&self.0).values().map(|l| l.status()).collect()
    }

    /// Whether any volume of `volumes` is being filled.
    pub fn any_of(&self, volumes: &[String]) -> Option<String> {
        let m = lock(&self.0);
        volumes.iter().find(|v| m.contains_key(*v)).cloned()
    }
}

/// Volumes with a live restore recorded in `store_dir` (a daemon stopped before they finished).
pub fn recorded(store_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(live_dir(store_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".json").map(str::to_string)
        })
        .collect();
    out.sort();
    out
}
