//! Long copies-on-write finished behind the caller's back (write-behind).
//!
//! **Why.** A long copy-on-write sends its fresh blocks straight to the disk (`device/direct.rs`),
//! so a caller writing one request at a time waits for the disk on every request, and then for
//! the metadata work of linking the blocks, one after the other: sequential 1 MiB rewrites of a
//! checkpointed head ran at 0.57–0.69 of in-place rewrites of a volume without checkpoints at
//! queue depth 1, 0.76–0.90 with two writers (harness, 2026-12-01). A buffered in-place write
//! returns once its bytes are in the host's page cache, which writes them back later: the
//! control's advantage is write-behind. Disk semantics allow the same here: an acknowledged
//! write need not be durable, or even on the disk, until a flush.
//!
//! **How.** A write that qualifies (whole blocks, at least `LONG_WRITE` bytes, some of them
//! copies of shared blocks) is planned as usual, its bytes copied into an aligned buffer of this
//! module's (so the direct write needs no second copy), and handed to the two `cairn-write`
//! threads, which write them and link the blocks; the caller returns at once. While a job is queued or
//! running, the blocks it covers are *pending*, and everything that would look at them waits
//! for it first: reads and writes of an overlapping range, and whatever reads or changes the
//! head's mapping as a whole (checkpoints, apply, diff, trim, resize, delete, defrag), each after
//! taking the volume's gate exclusively or before its lookup. A flush waits for every job, so
//! it still makes every acknowledged write durable; a job's failure (a disk error) is reported
//! by the next flush, as a failed write-back is by `fsync`.
//!
//! **Bounds.** At most `MAX_BYTES` (8 MiB) are pending at once; a write that finds no room is
//! done by its caller as before, beside the threads, so several writers still write in
//! parallel. The threads need no gate: everything that could change what a job links takes a
//! gate exclusively and then waits for the job, never the other way round.

use super::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Condvar;

/// Bytes of writes that may be pending at once.
const MAX_BYTES: usize = 8 << 20;

/// Alignment of job buffers: the page size, which `O_DIRECT` accepts everywhere.
const ALIGN: usize = 4096;

/// Spare job buffers kept for reuse: a fresh 1 MiB allocation costs 256 page faults.
const SPARE_BUFFERS: usize = 4;

/// Write-behind state of a store: the queue of jobs and the ranges they cover.
pub(super) struct WriteBehind {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Jobs queued or running; read without the lock on every read and write, which skip the
    /// rest when it is 0.
    pending: AtomicUsize,
    /// Writes acknowledged this way since the store was opened.
    queued: AtomicU64,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Job>,
    /// `(volume id, first block, blocks)` of every job queued or running.
    ranges: Vec<(u64, u64, u64)>,
    bytes: usize,
    spare: Vec<Vec<u8>>,
    stop: bool,
}

/// One acknowledged write: where its blocks go and the bytes, at `buf[start..start + len]`.
struct Job {
    vid: u64,
    first: u64,
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
            pending: AtomicUsize::new(0),
            queued: AtomicU64::new(0),
        }
    }

    /// Writes acknowledged before their data was written, since the store was opened.
    pub(super) fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether a planned write may be handed to the thread: whole blocks (nothing to read
    /// first), long, and some of them copies of shared blocks, the ones that go straight to the
    /// disk. A write with none (a first write, or an overwrite in place) goes through the page
    /// cache and is quick anyway. Blocks written in place may be among them: until the job is
    /// done nothing can make them shared, since a checkpoint of the volume waits for it.
    pub(super) fn qualifies(offset: u64, data: &[u8], plan: &[(u64, Fill)]) -> bool {
        data.len() >= LONG_WRITE
            && offset.is_multiple_of(BS)
            && data.len().is_multiple_of(BLOCK_SIZE)
            && plan.iter().any(|(_, f)| matches!(f, Fill::CopyFrom(_)))
    }

    /// Waits until `keep_waiting` is false for the pending ranges.
    fn wait_while(&self, keep_waiting: impl Fn(&[(u64, u64, u64)]) -> bool) {
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
        self.wait_while(|r| {
            r.iter()
                .any(|&(v, f, c)| v == vid && f < first + count && first < f + c)
        });
    }

    /// Waits for every job of volume `vid`.
    pub(super) fn wait_volume(&self, vid: u64) {
        self.wait_while(|r| r.iter().any(|&(v, _, _)| v == vid));
    }

    /// Waits for every job.
    pub(super) fn wait_all(&self) {
        self.wait_while(|r| !r.is_empty());
    }

    /// Queues a planned write (see [`WriteBehind::qualifies`]); gives the plan back if there is
    /// no room, for the caller to do the write itself.
    pub(super) fn try_queue(
        &self,
        vid: u64,
        first: u64,
        plan: Vec<(u64, Fill)>,
        data: &[u8],
    ) -> std::result::Result<(), Vec<(u64, Fill)>> {
        let mut g = lock(&self.inner);
        if g.stop || g.bytes + data.len() > MAX_BYTES {
            return Err(plan);
        }
        let mut buf = match g.spare.iter().position(|b| b.len() >= data.len() + ALIGN) {
            Some(i) => g.spare.swap_remove(i),
            None => Vec::new(),
        };
        g.bytes += data.len();
        g.ranges.push((vid, first, plan.len() as u64));
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

    /// Waits for every job and stops the thread's loop.
    pub(super) fn stop(&self) {
        self.wait_all();
        lock(&self.inner).stop = true;
        self.changed.notify_all();
    }

    /// One `cairn-write` thread: takes jobs in the order they were queued and writes and links
    /// each. With two threads, two jobs may finish in either order; only jobs of concurrent
    /// callers can overlap (a caller's next write waits for its last), and their order is
    /// unspecified anyway.
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
            if let Some(i) = g
                .ranges
                .iter()
                .position(|&(v, f, _)| v == job.vid && f == job.first)
            {
                g.ranges.swap_remove(i);
            }
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
