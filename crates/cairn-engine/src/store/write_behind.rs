//! Copies-on-write finished behind the caller's back (write-behind).
//!
//! **Why, for long writes.** A long copy-on-write sends its fresh blocks straight to the disk
//! (`device/direct.rs`), so a caller writing one request at a time waits for the disk on every
//! request, and then for the metadata work of linking the blocks, one after the other:
//! sequential 1 MiB rewrites of a checkpointed head ran at 0.57–0.69 of in-place rewrites of a
//! volume without checkpoints at queue depth 1, 0.76–0.90 with two writers (harness,
//! 2026-12-01). A buffered in-place write returns once its bytes are in the host's page cache,
//! which writes them back later: the control's advantage is write-behind. Disk semantics allow
//! the same here: an acknowledged write need not be durable, or even on the disk, until a flush.
//!
//! **Why, for short ones (session 12).** A 4 KiB write to a block shared with a checkpoint goes
//! to a fresh block, whose page the host's cache has never held: the copy into a new page, and
//! on this project's VM often a host fault behind it, made such a write call cost 16–21 µs
//! where an in-place overwrite cost 11–12 (docs/design.md, "Short copies-on-write pay for the
//! new page"). Handed to a thread, that cost leaves the caller's path; and since consecutive
//! short writes get consecutive fresh blocks, the thread finds them adjacent and writes a
//! batch as a few long writes, the longer ones straight to the disk, with no new page at all.
//!
//! **How.** A write that qualifies ([`WriteBehind::qualifies`]) is planned as usual, its bytes
//! copied into a buffer of this module's, and handed to the two `cairn-write` threads, which
//! write them and link the blocks; the caller returns at once. A long job is written on its
//! own, from an aligned buffer (so the direct write needs no second copy). Short jobs are taken
//! in batches by one thread at a time (a second thread would take them one by one while the
//! first writes), their blocks sorted by place in the data file and written in runs of adjacent
//! blocks, a run of `SHORT_RUN_DIRECT` or more straight to the disk. While a job is queued or
//! running, the blocks it covers are *pending*, and everything that would look at them waits
//! for it first: reads and writes of an overlapping range, and whatever reads or changes the
//! head's mapping as a whole (checkpoints, apply, diff, trim, resize, delete, defrag), each after
//! taking the volume's gate exclusively or before its lookup. A flush waits for every job, so
//! it still makes every acknowledged write durable; a job's failure (a disk error) is reported
//! by the next flush, as a failed write-back is by `fsync`. A failed run fails every job with a
//! block in it; their blocks are given back and their ranges keep what they held.
//!
//! **Bounds.** At most `MAX_BYTES` (8 MiB) are pending at once; a write that finds no room is
//! done by its caller as before, beside the threads, so several writers still write in
//! parallel. The threads need no gate: everything that could change what a job links takes a
//! gate exclusively and then waits for the job, never the other way round.

use super::*;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Condvar;

/// Bytes of writes that may be pending at once.
const MAX_BYTES: usize = 8 << 20;

/// Blocks one job covers at most (it fits in `MAX_BYTES`): how far back a range lookup looks
/// for a job that starts before the range and reaches into it.
const MAX_JOB_BLOCKS: u64 = (MAX_BYTES / BLOCK_SIZE) as u64;

/// Bytes of short jobs one thread takes at once: enough for runs long enough to go direct,
/// small enough that the other thread gets work while a batch is written.
const SHORT_BATCH_BYTES: usize = 2 << 20;

/// A run of short jobs' blocks this long or longer goes straight to the disk.
const SHORT_RUN_DIRECT: usize = 32 << 10;

/// Spare one-block buffers kept for short jobs: allocated and freed by different threads, they
/// cost the caller a freshly faulted heap page most times otherwise.
const SPARE_BLOCKS: usize = 1024;

/// Alignment of job buffers: the page size, which `O_DIRECT` accepts everywhere.
const ALIGN: usize = 4096;

/// Spare job buffers kept for reuse: a fresh 1 MiB allocation costs 256 page faults.
const SPARE_BUFFERS: usize = 4;

/// What kind of job a planned write would make, if any (see [`WriteBehind::qualifies`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobKind {
    /// A long write with copies among its blocks: written as it is, its copies direct.
    Long,
    /// A short copy-on-write: every block fresh, batched with other short jobs by where their
    /// blocks lie.
    Short,
}

/// Write-behind state of a store: the queue of jobs and the ranges they cover.
pub(super) struct WriteBehind {
    inner: Mutex<Inner>,
    /// Signalled when a job finishes: callers waiting for a range, a volume or everything.
    changed: Condvar,
    /// Signalled when a job is queued and a thread is idle.
    work: Condvar,
    /// Jobs queued or running; read without the lock on every read and write, which skip the
    /// rest when it is 0.
    pending: AtomicUsize,
    /// Writes acknowledged this way since the store was opened.
    queued: AtomicU64,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Job>,
    /// `(volume id, first block, job number)` to the block count of every job queued or
    /// running; ordered so that a range lookup visits only the jobs that can overlap it.
    ranges: BTreeMap<(u64, u64, u64), u64>,
    bytes: usize,
    spare: Vec<Vec<u8>>,
    /// Spare one-block buffers for short jobs.
    spare_blocks: Vec<Vec<u8>>,
    /// Jobs numbered so far.
    jobs: u64,
    /// Threads waiting for work: a queued job signals `work` only when one is.
    idle: usize,
    /// A thread is writing a batch of short jobs.
    short_busy: bool,
    stop: bool,
}

/// One acknowledged write: where its blocks go and the bytes, at `buf[start..start + len]`.
struct Job {
    vid: u64,
    first: u64,
    seq: u64,
    kind: JobKind,
    plan: Vec<(u64, Fill)>,
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Job {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl WriteBehind {
    pub(super) fn new() -> Self {
        WriteBehind {
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            work: Condvar::new(),
            pending: AtomicUsize::new(0),
            queued: AtomicU64::new(0),
        }
    }

    /// Writes acknowledged before their data was written, since the store was opened.
    pub(super) fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether a planned write may be handed to the threads, and as what. Only whole blocks
    /// (nothing to read first) with copies of shared blocks among them qualify:
    ///
    /// - a long one ([`JobKind::Long`]), whose copies go straight to the disk; blocks written in
    ///   place may be among them: until the job is done nothing can make them shared, since a
    ///   checkpoint of the volume waits for it;
    /// - a short one whose blocks are all fresh ([`JobKind::Short`]): each needs a new page of
    ///   the host's cache, which costs the caller more than the copy itself (see the module
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

    /// Waits until `keep_waiting` is false for the pending ranges.
    fn wait_while(&self, keep_waiting: impl Fn(&BTreeMap<(u64, u64, u64), u64>) -> bool) {
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut g = lock(&self.inner);
        while keep_waiting(&g.ranges) {
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits for every job of volume `vid` that overlaps `count` blocks from `first`.
    pub(super) fn wait_range(&self, vid: u64, first: u64, count: u64) {
        let from = (vid, first.saturating_sub(MAX_JOB_BLOCKS), 0);
        self.wait_while(|r| {
            r.range(from..(vid, first + count, 0))
                .any(|(&(_, f, _), &c)| first < f + c)
        });
    }

    /// Waits for every job of volume `vid`.
    pub(super) fn wait_volume(&self, vid: u64) {
        self.wait_while(|r| {
            r.range((vid, 0, 0)..=(vid, u64::MAX, u64::MAX))
                .next()
                .is_some()
        });
    }

    /// Waits for every job.
    pub(super) fn wait_all(&self) {
        self.wait_while(|r| !r.is_empty());
    }

    /// Queues a planned write (see [`WriteBehind::qualifies`]); gives the plan back if there is
    /// no room, for the caller to do the write itself.
    pub(super) fn try_queue(
        &self,
        kind: JobKind,
        vid: u64,
        first: u64,
        plan: Vec<(u64, Fill)>,
        data: &[u8],
    ) -> std::result::Result<(), Vec<(u64, Fill)>> {
        let mut g = lock(&self.inner);
        if g.stop || g.bytes + data.len() > MAX_BYTES {
            return Err(plan);
        }
        let mut buf = match kind {
            JobKind::Long => match g.spare.iter().position(|b| b.len() >= data.len() + ALIGN) {
                Some(i) => g.spare.swap_remove(i),
                None => Vec::new(),
            },
            JobKind::Short if data.len() == BLOCK_SIZE => g.spare_blocks.pop().unwrap_or_default(),
            JobKind::Short => Vec::new(),
        };
        g.bytes += data.len();
        g.jobs += 1;
        let seq = g.jobs;
        g.ranges.insert((vid, first, seq), plan.len() as u64);
        self.pending.fetch_add(1, Ordering::AcqRel);
        drop(g);
        // The copy runs without the lock: other writers may queue meanwhile.
        let start = match kind {
            JobKind::Long => {
                if buf.len() < data.len() + ALIGN {
                    buf = vec![0u8; data.len() + ALIGN];
                }
                let start = buf.as_ptr().align_offset(ALIGN);
                buf[start..start + data.len()].copy_from_slice(data);
                start
            }
            // Copied again into a run's buffer by the thread, so no alignment and no zeroing.
            JobKind::Short => {
                buf.clear();
                buf.extend_from_slice(data);
                0
            }
        };
        let job = Job {
            vid,
            first,
            seq,
            kind,
            plan,
            buf,
            start,
            len: data.len(),
        };
        let mut g = lock(&self.inner);
        g.queue.push_back(job);
        let idle = g.idle > 0;
        drop(g);
        self.queued.fetch_add(1, Ordering::Relaxed);
        if idle {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Waits for every job and stops the thread's loop.
    pub(super) fn stop(&self) {
        self.wait_all();
        lock(&self.inner).stop = true;
        self.work.notify_all();
    }

    /// The next work for a thread: the oldest job, and if it is short, every other short job
    /// queued, up to `SHORT_BATCH_BYTES`. `None` once the store stops.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut g = lock(&self.inner);
        let first = loop {
            // One thread at a time takes short jobs: while it writes a batch the next one
            // gathers, where a second thread would take them one by one.
            let short_free = !g.short_busy;
            if let Some(i) = g
                .queue
                .iter()
                .position(|j| short_free || j.kind == JobKind::Long)
            {
                if let Some(j) = g.queue.remove(i) {
                    break j;
                }
            }
            if g.stop && g.queue.is_empty() {
                return None;
            }
            g.idle += 1;
            g = self.work.wait(g).unwrap_or_else(|e| e.into_inner());
            g.idle -= 1;
        };
        let mut bytes = first.len;
        let short = first.kind == JobKind::Short;
        let mut batch = vec![first];
        if short {
            g.short_busy = true;
            let mut i = 0;
            while i < g.queue.len() && bytes < SHORT_BATCH_BYTES {
                if g.queue[i].kind == JobKind::Short {
                    if let Some(j) = g.queue.remove(i) {
                        bytes += j.len;
                        batch.push(j);
                    }
                } else {
                    i += 1;
                }
            }
        }
        Some(batch)
    }

    /// One `cairn-write` thread: takes jobs in the order they were queued and writes and links
    /// them. With two threads, two jobs may finish in either order; only jobs of concurrent
    /// callers can overlap (a caller's next write waits for its last), and their order is
    /// unspecified anyway.
    pub(super) fn run(&self, core: &Core, data: &dyn Device) {
        let mut staging = Vec::new();
        while let Some(batch) = self.next_batch() {
            let (written, mut error) = match batch[0].kind {
                JobKind::Long => match write_runs(data, &batch[0].plan, batch[0].data(), true) {
                    Ok(()) => (vec![true], None),
                    Err(e) => (vec![false], Some(e)),
                },
                JobKind::Short => write_short_jobs(data, &batch, &mut staging),
            };
            // The state lock is taken per job: a batch's links held for once kept the callers
            // from planning their next writes for as long.
            for (job, written) in batch.iter().zip(written) {
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
            if batch[0].kind == JobKind::Short {
                g.short_busy = false;
                if g.idle > 0 && !g.queue.is_empty() {
                    self.work.notify_one();
                }
            }
            for job in batch {
                g.ranges.remove(&(job.vid, job.first, job.seq));
                g.bytes -= job.len;
                match job.kind {
                    JobKind::Long if g.spare.len() < SPARE_BUFFERS => g.spare.push(job.buf),
                    JobKind::Short
                        if job.len == BLOCK_SIZE && g.spare_blocks.len() < SPARE_BLOCKS =>
                    {
                        g.spare_blocks.push(job.buf)
                    }
                    _ => {}
                }
                self.pending.fetch_sub(1, Ordering::AcqRel);
            }
            drop(g);
            self.changed.notify_all();
        }
    }
}

/// Writes the blocks of a batch of short jobs in runs of adjacent blocks, wherever jobs meet in
/// the data file, copied into `staging` (an aligned buffer kept by the thread): a run of
/// `LONG_WRITE` or more goes straight to the disk, a shorter one through the page cache. Returns
/// whether each job was written (a job fails if any run holding one of its blocks failed) and
/// the first failure.
fn write_short_jobs(
    dev: &dyn Device,
    batch: &[Job],
    staging: &mut Vec<u8>,
) -> (Vec<bool>, Option<Error>) {
    // (data file block, job, block of the job), in file order.
    let mut blocks: Vec<(u64, usize, usize)> = batch
        .iter()
        .enumerate()
        .flat_map(|(j, job)| job.plan.iter().enumerate().map(move |(k, p)| (p.0, j, k)))
        .collect();
    blocks.sort_unstable();
    let mut written = vec![true; batch.len()];
    let mut error = None;
    let mut i = 0;
    while i < blocks.len() {
        let mut n = 1;
        while i + n < blocks.len() && blocks[i + n].0 == blocks[i].0 + n as u64 {
            n += 1;
        }
        let run = &blocks[i..i + n];
        let len = n * BLOCK_SIZE;
        if staging.len() < len + ALIGN {
            staging.resize(len + ALIGN, 0);
        }
        let start = staging.as_ptr().align_offset(ALIGN);
        let buf = &mut staging[start..start + len];
        for (slot, &(_, j, k)) in buf.chunks_exact_mut(BLOCK_SIZE).zip(run) {
            slot.copy_from_slice(&batch[j].data()[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE]);
        }
        let at = blocks[i].0 * BS;
        let r = if len >= SHORT_RUN_DIRECT {
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
