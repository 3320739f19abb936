//! Copies-on-write acknowledged before their data is written: long ones finished by a thread
//! of the store (write-behind), short ones parked until a flush (delayed writing).
//!
//! **Why, long.** A long copy-on-write sends its fresh blocks straight to the disk
//! (`device/direct.rs`), so a caller writing one request at a time waits for the disk on every
//! request, and then for the metadata work of linking the blocks, one after the other:
//! sequential 1 MiB rewrites of a checkpointed head ran at 0.57–0.69 of in-place rewrites of a
//! volume without checkpoints at queue depth 1, 0.76–0.90 with two writers (harness,
//! 2026-12-01). A buffered in-place write returns once its bytes are in the host's page cache,
//! which writes them back later: the control's advantage is write-behind. Disk semantics allow
//! the same here: an acknowledged write need not be durable, or even on the disk, until a flush.
//!
//! **Why, short.** A short copy-on-write goes to a fresh block, a file offset the host's page
//! cache holds no page for; through the cache it needs a new page, and on this project's VM a
//! new page costs a fault in the host too (free-page reporting). `perf` put 65% of a
//! checkpointed head's random 4 KiB writes in the kernel's copy into those pages (session 13).
//! Parked, the write costs a copy into a buffer the process already has, and the flush writes
//! the parked blocks together: consecutive writes get adjacent blocks from the allocator, so
//! they go out as long runs, straight to the disk, with no page at all. Session 12 tried
//! handing short writes to the threads at once instead; a third busy thread on two cores slowed
//! the callers down (docs/design.md, "Tried and reverted").
//!
//! **How.** A write that qualifies ([`WriteBehind::qualifies`]) is planned as usual. A long one
//! is copied into an aligned buffer of this module's (so the direct write needs no second
//! copy) and handed to the two `cairn-write` threads, which write it and link its blocks. A
//! short one is copied into a one-block buffer kept from earlier parked writes and left there.
//! The caller returns at once either way. While a job is queued, parked or running, the blocks
//! it covers are *pending*, and everything that would look at them first makes sure the job is
//! done: reads and writes of an overlapping range, and whatever reads or changes the head's
//! mapping as a whole (checkpoints, apply, diff, trim, resize, delete, defrag, a flush, a
//! close), each after taking the volume's gate exclusively or before its lookup. It writes
//! and links the parked jobs it needs itself (a read of one parked block writes that block
//! alone; a flush writes them all, in runs) and waits for the threads' jobs. A flush therefore
//! still makes every acknowledged write durable; a job's failure (a disk error) is reported by
//! the next flush, as a failed write-back is by `fsync`, and its blocks keep what they held.
//!
//! **Bounds.** At most `MAX_BYTES` (8 MiB) of long jobs are pending at once; a long write that
//! finds no room is done by its caller as before, beside the threads, so several writers still
//! write in parallel. At most `MAX_PARKED_BYTES` (16 MiB) are parked; the short write that
//! would pass it writes every parked job first (one stall per 4,096 parked 4 KiB writes, about
//! 20 ms here), and the one-block buffers are kept for reuse, so parking holds at most 16 MiB
//! plus a 1 MiB staging buffer per store. Nothing needs a gate to finish a job: everything that
//! could change what a job links takes a gate exclusively and then finishes the job, never the
//! other way round.

use super::*;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Condvar;

/// Bytes of long writes that may be pending at once.
const MAX_BYTES: usize = 8 << 20;

/// Bytes of short copies-on-write that may be parked at once; the write that would pass it
/// writes every parked one first.
pub(super) const MAX_PARKED_BYTES: usize = 16 << 20;

/// Blocks one job covers at most: how far back a range lookup looks for a job that starts
/// before the range and reaches into it.
const MAX_JOB_BLOCKS: u64 = (MAX_BYTES / BLOCK_SIZE) as u64;

/// A run of parked blocks this long or longer goes straight to the disk.
const PARKED_RUN_DIRECT: usize = 64 << 10;

/// Parked blocks are written in runs of at most this many bytes, the size of the staging buffer.
const PARKED_RUN_MAX: usize = 1 << 20;

/// Alignment of job buffers: the page size, which `O_DIRECT` accepts everywhere.
const ALIGN: usize = 4096;

/// Spare job buffers kept for reuse: a fresh 1 MiB allocation costs 256 page faults.
const SPARE_BUFFERS: usize = 4;

/// What a planned write would become, if anything (see [`WriteBehind::qualifies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobKind {
    /// A long write with copies among its blocks: a thread writes it, its copies direct.
    Long,
    /// A short copy-on-write, every block fresh: parked until something needs it written.
    Short,
}

/// Write-behind state of a store: long jobs queued for the threads, short ones parked, and the
/// ranges they all cover.
pub(super) struct WriteBehind {
    inner: Mutex<Inner>,
    /// Signalled when jobs finish (callers waiting for a range, a volume or everything) and when
    /// a long job is queued (the threads).
    changed: Condvar,
    /// Jobs queued, parked or running; read without the lock on every read and write, which
    /// skip the rest when it is 0.
    pending: AtomicUsize,
    /// Writes acknowledged this way since the store was opened.
    queued: AtomicU64,
    /// Where parked blocks are gathered into runs; kept, since a fresh allocation would cost a
    /// page fault per page, the very cost parking avoids.
    staging: Mutex<Vec<u8>>,
    /// The data file.
    dev: Arc<dyn Device>,
}

type Key = (u64, u64, u64);

#[derive(Default)]
struct Inner {
    /// Long jobs, for the threads.
    queue: VecDeque<Job>,
    /// Short jobs not yet written, by `(volume id, first block, job number)`.
    parked: BTreeMap<Key, Job>,
    /// `(volume id, first block, job number)` to the block count of every job queued, parked
    /// or running; ordered so that a range lookup visits only the jobs that can overlap it.
    ranges: BTreeMap<Key, u64>,
    /// Bytes of long jobs queued or running.
    bytes: usize,
    /// Bytes of parked jobs.
    parked_bytes: usize,
    spare: Vec<Vec<u8>>,
    /// Spare one-block buffers for short jobs, kept so that parking a write touches memory
    /// the process already has.
    spare_blocks: Vec<Vec<u8>>,
    /// Jobs numbered so far.
    jobs: u64,
    stop: bool,
}

/// One acknowledged write: where its blocks go and the bytes, at `buf[start..start + len]`.
struct Job {
    vid: u64,
    first: u64,
    seq: u64,
    plan: Vec<(u64, Fill)>,
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Job {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    fn key(&self) -> Key {
        (self.vid, self.first, self.seq)
    }
}

/// Which pending jobs a caller waits for: the keys from `from` to `to` (inclusive) whose blocks
/// reach `first` or beyond.
#[derive(Clone, Copy)]
struct Span {
    from: Key,
    to: Key,
    first: u64,
}

impl Span {
    fn hits(&self, key: &Key, count: u64) -> bool {
        key.1 + count > self.first
    }
}

impl WriteBehind {
    pub(super) fn new(dev: Arc<dyn Device>) -> Self {
        WriteBehind {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            pending: AtomicUsize::new(0),
            queued: AtomicU64::new(0),
            staging: Mutex::new(Vec::new()),
            dev,
        }
    }

    /// Writes acknowledged before their data was written, since the store was opened.
    pub(super) fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether a planned write may be acknowledged before its data is written, and as what.
    /// Only whole blocks (nothing to read first) with copies of shared blocks among them
    /// qualify:
    ///
    /// - a long one ([`JobKind::Long`]), whose copies go straight to the disk; blocks written in
    ///   place may be among them: until the job is done nothing can make them shared, since a
    ///   checkpoint of the volume waits for it;
    /// - a short one whose blocks are all fresh ([`JobKind::Short`]): through the page cache
    ///   each would need a new page, which costs more than the copy itself (module
    ///   documentation).
    ///
    /// A write with no copies (a first write, or an overwrite in place) goes through the page
    /// cache and is quick anyway.
    pub(super) fn qualifies(offset: u64, data: &[u8], plan: &[(u64, Fill)]) -> Option<JobKind> {
        let whole = offset.is_multiple_of(BS) && data.len().is_multiple_of(BLOCK_SIZE);
        if !whole || !plan.iter().any(|(_, f)| matches!(f, Fill::CopyFrom(_))) {
            None
        } else if data.len() >= LONG_WRITE {
            Some(JobKind::Long)
        } else if plan.iter().all(|(_, f)| *f != Fill::InPlace) {
            Some(JobKind::Short)
        } else {
            None
        }
    }

    /// Returns once no job in `span` is pending: parked ones are written and linked here, by
    /// the caller, the others (long jobs on a thread, parked ones another caller took) waited
    /// for.
    fn wait_span(&self, core: &Core, span: Span) {
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut g = lock(&self.inner);
        loop {
            let keys: Vec<Key> = g
                .parked
                .range(span.from..=span.to)
                .filter(|(k, j)| span.hits(k, j.plan.len() as u64))
                .map(|(k, _)| *k)
                .collect();
            if !keys.is_empty() {
                let jobs: Vec<Job> = keys.iter().filter_map(|k| g.parked.remove(k)).collect();
                g.parked_bytes -= jobs.iter().map(|j| j.len).sum::<usize>();
                drop(g);
                self.finish_parked(core, jobs);
                g = lock(&self.inner);
                continue;
            }
            if !g
                .ranges
                .range(span.from..=span.to)
                .any(|(k, &c)| span.hits(k, c))
            {
                return;
            }
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Returns once no job of volume `vid` that overlaps `count` blocks from `first` is pending.
    pub(super) fn wait_range(&self, core: &Core, vid: u64, first: u64, count: u64) {
        let span = Span {
            from: (vid, first.saturating_sub(MAX_JOB_BLOCKS), 0),
            to: (vid, (first + count).saturating_sub(1), u64::MAX),
            first,
        };
        self.wait_span(core, span);
    }

    /// Returns once no job of volume `vid` is pending.
    pub(super) fn wait_volume(&self, core: &Core, vid: u64) {
        let span = Span {
            from: (vid, 0, 0),
            to: (vid, u64::MAX, u64::MAX),
            first: 0,
        };
        self.wait_span(core, span);
    }

    /// Returns once no job is pending.
    pub(super) fn wait_all(&self, core: &Core) {
        let span = Span {
            from: (0, 0, 0),
            to: (u64::MAX, u64::MAX, u64::MAX),
            first: 0,
        };
        self.wait_span(core, span);
    }

    /// Writes every parked job first if `len` more bytes would not fit beside them.
    pub(super) fn make_room(&self, core: &Core, len: usize) {
        let mut g = lock(&self.inner);
        if g.parked_bytes + len <= MAX_PARKED_BYTES {
            return;
        }
        let jobs: Vec<Job> = std::mem::take(&mut g.parked).into_values().collect();
        g.parked_bytes = 0;
        drop(g);
        self.finish_parked(core, jobs);
    }

    /// Queues (long) or parks (short) a planned write (see [`WriteBehind::qualifies`]); gives
    /// the plan back if there is no room, for the caller to do the write itself.
    pub(super) fn try_queue(
        &self,
        kind: JobKind,
        vid: u64,
        first: u64,
        plan: Vec<(u64, Fill)>,
        data: &[u8],
    ) -> std::result::Result<(), Vec<(u64, Fill)>> {
        let mut g = lock(&self.inner);
        if g.stop {
            return Err(plan);
        }
        if kind == JobKind::Short {
            if g.parked_bytes + data.len() > MAX_PARKED_BYTES {
                return Err(plan);
            }
            // A 4 KiB copy: cheaper under the lock than a second round trip through it.
            let mut buf = match data.len() {
                BLOCK_SIZE => g.spare_blocks.pop().unwrap_or_default(),
                _ => Vec::new(),
            };
            buf.clear();
            buf.extend_from_slice(data);
            g.jobs += 1;
            let job = Job {
                vid,
                first,
                seq: g.jobs,
                plan,
                buf,
                start: 0,
                len: data.len(),
            };
            g.parked_bytes += job.len;
            g.ranges.insert(job.key(), job.plan.len() as u64);
            g.parked.insert(job.key(), job);
            self.pending.fetch_add(1, Ordering::AcqRel);
            self.queued.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if g.bytes + data.len() > MAX_BYTES {
            return Err(plan);
        }
        let mut buf = match g.spare.iter().position(|b| b.len() >= data.len() + ALIGN) {
            Some(i) => g.spare.swap_remove(i),
            None => Vec::new(),
        };
        g.bytes += data.len();
        g.jobs += 1;
        let seq = g.jobs;
        g.ranges.insert((vid, first, seq), plan.len() as u64);
        self.pending.fetch_add(1, Ordering::AcqRel);
        drop(g);
        // The copy runs without the lock: other writers may queue meanwhile.
        if buf.len() < data.len() + ALIGN {
            buf = vec![0u8; data.len() + ALIGN];
        }
        let start = buf.as_ptr().align_offset(ALIGN);
        buf[start..start + data.len()].copy_from_slice(data);
        let job = Job {
            vid,
            first,
            seq,
            plan,
            buf,
            start,
            len: data.len(),
        };
        lock(&self.inner).queue.push_back(job);
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_all();
        Ok(())
    }

    /// Writes every parked job, waits for every other, and stops the threads' loop.
    pub(super) fn stop(&self, core: &Core) {
        self.wait_all(core);
        lock(&self.inner).stop = true;
        self.changed.notify_all();
    }

    /// Writes parked jobs taken out of `parked` (their blocks gathered into runs wherever jobs
    /// meet in the data file), links each, and ends them.
    fn finish_parked(&self, core: &Core, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let (written, mut error) = {
            let mut staging = lock(&self.staging);
            write_parked(&*self.dev, &jobs, &mut staging)
        };
        // The state lock is taken per job, so readers and writers get in between.
        for (job, written) in jobs.iter().zip(written) {
            let mut st = core.state();
            if written {
                let r = st.link_write(job.vid, job.first, &job.plan);
                if let Err(e) = st.poison_on(r) {
                    error.get_or_insert(e);
                }
            } else {
                st.meta.unreserve_plan(&job.plan);
            }
        }
        if let Some(e) = error {
            lock(&core.background_error).get_or_insert(e);
        }
        let mut g = lock(&self.inner);
        for job in jobs {
            g.ranges.remove(&job.key());
            if job.len == BLOCK_SIZE && g.spare_blocks.len() < MAX_PARKED_BYTES / BLOCK_SIZE {
                g.spare_blocks.push(job.buf);
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
        drop(g);
        self.changed.notify_all();
    }

    /// One `cairn-write` thread: takes long jobs in the order they were queued and writes and
    /// links each. With two threads, two jobs may finish in either order; only jobs of
    /// concurrent callers can overlap (a caller's next write waits for its last), and their
    /// order is unspecified anyway.
    pub(super) fn run(&self, core: &Core, data: &dyn Device) {
        loop {
            let job = {
                let mut g = lock(&self.inner);
                loop {
                    if let Some(j) = g.queue.pop_front() {
                        break j;
                    }
                    if g.stop {
                        return;
                    }
                    g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            };
            let written = write_runs(data, &job.plan, job.data(), true);
            let mut st = core.state();
            let r = match written {
                Ok(()) => {
                    let r = st.link_write(job.vid, job.first, &job.plan);
                    st.poison_on(r)
                }
                Err(e) => {
                    st.meta.unreserve_plan(&job.plan);
                    Err(e)
                }
            };
            drop(st);
            if let Err(e) = r {
                lock(&core.background_error).get_or_insert(e);
            }
            let mut g = lock(&self.inner);
            g.ranges.remove(&job.key());
            g.bytes -= job.len;
            if g.spare.len() < SPARE_BUFFERS {
                g.spare.push(job.buf);
            }
            self.pending.fetch_sub(1, Ordering::AcqRel);
            drop(g);
            self.changed.notify_all();
        }
    }
}

/// Writes the blocks of parked jobs in runs of adjacent blocks (at most `PARKED_RUN_MAX`),
/// wherever jobs meet in the data file, copied into `staging`: a run of `PARKED_RUN_DIRECT` or
/// more goes straight to the disk, a shorter one through the page cache. Returns whether each
/// job was written (a job fails if any run holding one of its blocks failed) and the first
/// failure.
fn write_parked(
    dev: &dyn Device,
    jobs: &[Job],
    staging: &mut Vec<u8>,
) -> (Vec<bool>, Option<Error>) {
    // (data file block, job, block of the job), in file order.
    let mut blocks: Vec<(u64, usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| job.plan.iter().enumerate().map(move |(k, p)| (p.0, j, k)))
        .collect();
    blocks.sort_unstable();
    let mut written = vec![true; jobs.len()];
    let mut error = None;
    if staging.len() < PARKED_RUN_MAX + ALIGN {
        staging.resize(PARKED_RUN_MAX + ALIGN, 0);
    }
    let start = staging.as_ptr().align_offset(ALIGN);
    let max = PARKED_RUN_MAX / BLOCK_SIZE;
    let mut i = 0;
    while i < blocks.len() {
        let mut n = 1;
        while i + n < blocks.len() && n < max && blocks[i + n].0 == blocks[i].0 + n as u64 {
            n += 1;
        }
        let run = &blocks[i..i + n];
        let len = n * BLOCK_SIZE;
        let buf = &mut staging[start..start + len];
        for (slot, &(_, j, k)) in buf.chunks_exact_mut(BLOCK_SIZE).zip(run) {
            slot.copy_from_slice(&jobs[j].data()[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]);
        }
        let at = blocks[i].0 * BS;
        let r = if len >= PARKED_RUN_DIRECT {
            dev.write_new_at(buf, at)
        } else {
            dev.write_at(buf, at)
        };
        if let Err(e) = r {
            error.get_or_insert(Error::io("data write", "data file")(e));
            for &(_, j, _) in run {
                written[j] = false;
            }
        }
        i += n;
    }
    (written, error)
}
