//! Reads of the data file served by copying from a read-only shared mapping of it, instead of one
//! `pread` each: short ones, and long ones whose pages are all in the host's page cache.
//!
//! **Why.** A random 4 KiB read that the host's page cache can serve is mostly system-call and
//! page-cache-lookup overhead: `pread` costs about 0.9 µs here, the copy itself a tenth of that.
//! Once a page of a mapping is in the process's page tables, reading it is only the copy. This is
//! what lets a volume read at random from the host's cache come near a plain file read with
//! `pread`, and what keeps a head whose blocks are scattered (after many checkpoints) from paying
//! one system call per block (docs/design.md, "Read path").
//!
//! **Why not every read.** A mapping is bad at cold data: a fault either reads ahead 128 KiB
//! around every 4 KiB (halving cold random reads) or, with `MADV_RANDOM`, never reads ahead (ruining
//! cold sequential reads). `pread` leaves that choice to the kernel's readahead, which sees the
//! pattern. So the mapping is `MADV_RANDOM` and copies a short read (at most [`MAPPED_READ_MAX`])
//! unless it continues the same thread's last one: a cold one costs the same single-page read a
//! `pread` would, and a stream of short reads marching through the file goes to `pread` and its
//! readahead. (Measured here: cold random 4 KiB reads 14.8k–18.1k IOPS both ways; a cold stream
//! of sequential 4 KiB reads through the mapping alone ran at 58 MiB/s where `pread` ran at
//! 920 MiB/s.)
//!
//! **Long reads.** A longer read is copied only when every page of it is already in
//! the host's page cache (`mincore`, one call per 2 MiB; [`ReadMapping::read_cached`]) and it does
//! not continue the same thread's last long read; one cold page, or a sequential stream, sends it
//! to `pread`, after which its pages are put into the page tables without a copy
//! ([`ReadMapping::map_after_read`], `MADV_POPULATE_READ`, once per 1 MiB). Until then long reads
//! always went to `pread` alone, so data read only with long reads (a guest's sequential pass,
//! the bench's warm-up) never entered the page tables, and the first short read of each of its
//! folios took a page fault later: 4,100 faults per 100,000 first random reads of a 4 GiB volume,
//! 0 now. Streams stay with `pread` because its readahead starts the next window when the reader
//! reaches a marked page; a copy from this `MADV_RANDOM` mapping passes the mark by, and a cold
//! stream of 1 MiB reads copied that way ran at 834–968 MiB/s where `pread` ran at 681–1423
//! (`partcold`, a harness not kept; with streams on `pread` again 776–1564).
//!
//! **Fragmented reads.** A read of a range in many runs (a head rewritten after checkpoints) is
//! different: the store first asks [`ReadMapping::is_resident`] about its first block and, if it is
//! cold, hints every run to the disk at once; either way the runs' pages are cached or on their way,
//! so runs of up to four blocks are copied from the mapping ([`ReadMapping::read_fragment`]), and
//! while one is copied the next ones are prefetched into the CPU's cache
//! ([`ReadMapping::prefetch`]). Scattered copies had seemed bound at 0.65 of a sequential read;
//! that was the latency of each block's TLB and cache misses, which the prefetch overlaps.
//!
//! **Why a signal handler.** A page the kernel cannot read (a disk I/O error, or the file cut short
//! behind Cairn's back) is reported by SIGBUS on the access, not by an error from a call; by
//! default that kills the process. The handler here marks the mapping broken, maps a page of zeros
//! over the bad page and returns, so the interrupted copy completes (with zeros). The reader then
//! sees the mark and reads the same range again with `pread`, which returns the error as usual (or
//! the data, if the error has passed); so does every later read of that file, until it is opened
//! again. Nothing jumps out of the handler, so no Rust frame is skipped; a fault anywhere else is
//! handed on to the handler installed before (Rust's own, which reports stack overflows) exactly
//! as if this one did not exist. Giving up the whole mapping at the first bad page keeps the
//! handler's bookkeeping to one flag: a file cut short has thousands of bad pages, and a failing
//! disk is no place to save a microsecond per read.
//!
//! This is the engine's only `unsafe` code: the mapping, its signal handler, `mincore` and the
//! prefetch instruction.
#![allow(unsafe_code)]

mod sigbus;
#[cfg(test)]
mod tests;

use sigbus::{install_handler, register, PAGE_SIZE, REGIONS};

use std::cell::Cell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::thread::LocalKey;

/// Longest read served from the mapping (see the module documentation for why it is short).
const MAPPED_READ_MAX: usize = 4096;

/// Longest run of a fragmented read served from the mapping ([`ReadMapping::read_fragment`]).
/// Sending runs of up to four blocks there rather than to `pread` took a harness's sequential
/// reads of a head 63% rewritten after checkpoints from 0.83-0.93 of a contiguous volume to
/// 0.95-1.01 (with the prefetch hints); longer runs gained nothing more.
const MAPPED_FRAGMENT_MAX: usize = 16384;

/// Pages asked about per `mincore` call by [`ReadMapping::read_cached`] (2 MiB of 4 KiB pages).
const RESIDENCY_CHUNK: usize = 512;

/// A 2 MiB span of the mapping's addresses: what one 4 KiB page of page tables maps.
const SPAN_SHIFT: u32 = 21;

/// 2 MiB spans of the mapping a process may touch before its page tables are dropped: 32,768
/// spans, at most 128 MiB of page tables, for 64 GiB of the data file read through the mapping.
/// Every page a copy touches stays mapped (and its page tables allocated) until then, whether or
/// not the host still caches it; without a budget a 1 TiB data file read whole would leave 2 GiB
/// of page tables behind.
const SPAN_BUDGET: usize = 32_768;

/// 1 MiB of the file: the unit [`ReadMapping::map_after_read`] remembers as populated.
const POPULATED_SHIFT: u32 = 20;

/// Address space reserved per mapped file. It costs nothing until touched; data past it (a data
/// file over 4 TiB) is read with `pread`.
const RESERVE: usize = 1 << 42;

thread_local! {
    /// The mapping and end offset of this thread's last short read.
    static LAST_READ: Cell<(usize, u64)> = const { Cell::new((0, 0)) };
    /// The mapping and end offset of this thread's last long read.
    static LAST_LONG_READ: Cell<(usize, u64)> = const { Cell::new((0, 0)) };
}

/// A read-only shared mapping of a file, registered with the SIGBUS handler.
pub(crate) struct ReadMapping {
    start: usize,
    len: usize,
    slot: usize,
    /// Bytes of the file known to exist: the file never shrinks under Cairn, so reads below this
    /// cannot fault for lack of a page, only for an I/O error.
    backed: AtomicU64,
    /// One bit per 2 MiB span of the mapping's addresses a copy has touched since its page tables
    /// were last dropped: each such span costs the process one 4 KiB page of page tables.
    spans: Box<[AtomicU64]>,
    /// Bits set in `spans`.
    touched: AtomicUsize,
    /// One bit per 1 MiB of the mapping (from its start) that [`ReadMapping::map_after_read`]
    /// populated whole since the page tables were last dropped: populating again what is mapped
    /// already costs a walk of its page tables, about a seventh of a cached sequential read.
    populated: Box<[AtomicU64]>,
    /// Spans that may be touched before the page tables are dropped ([`SPAN_BUDGET`]).
    budget: usize,
    /// How many times the page tables were dropped.
    dropped: AtomicU64,
}

impl ReadMapping {
    /// Maps `file` for reading; `None` when that is impossible (no address space, too many
    /// mappings, the handler could not be installed): the caller then uses `pread` only.
    pub(crate) fn new(file: &File) -> Option<Self> {
        if !install_handler() {
            return None;
        }
        let len = file.metadata().ok()?.len();
        // SAFETY: a new mapping at an address the kernel chooses, so it overlaps nothing of ours;
        // a read-only shared file mapping has no other effect on the process.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                RESERVE,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        // SAFETY: `p..p + RESERVE` is the mapping just created; advice changes no contents.
        unsafe { libc::madvise(p, RESERVE, libc::MADV_RANDOM) };
        let Some(slot) = register(start, start + RESERVE) else {
            // SAFETY: the mapping just created, not yet visible to anyone else.
            unsafe { libc::munmap(p, RESERVE) };
            return None;
        };
        let spans = ((start + RESERVE - 1) >> SPAN_SHIFT) - (start >> SPAN_SHIFT) + 1;
        Some(ReadMapping {
            start,
            len: RESERVE,
            slot,
            backed: AtomicU64::new(len),
            spans: (0..spans.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            touched: AtomicUsize::new(0),
            populated: (0..(RESERVE >> POPULATED_SHIFT).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            budget: SPAN_BUDGET,
            dropped: AtomicU64::new(0),
        })
    }

    /// [`ReadMapping::new`] with a page-table budget of `spans` 2 MiB spans, for tests.
    #[cfg(test)]
    fn with_budget(file: &File, spans: usize) -> Option<Self> {
        let mut m = Self::new(file)?;
        m.budget = spans;
        Some(m)
    }

    /// How many times the mapping's page tables were dropped to keep them under budget.
    #[cfg(test)]
    fn page_tables_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts the 2 MiB spans of addresses a copy of `len` bytes at `offset` touched, and drops
    /// the mapping's page tables once [`ReadMapping::budget`] spans have been touched.
    fn note_touched(&self, offset: u64, len: usize) {
        let base = self.start >> SPAN_SHIFT;
        let first = ((self.start + offset as usize) >> SPAN_SHIFT) - base;
        let last = ((self.start + offset as usize + len.max(1) - 1) >> SPAN_SHIFT) - base;
        for span in first..=last {
            let (word, bit) = bit_of(&self.spans, span);
            if word.load(Ordering::Relaxed) & bit == 0
                && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
                && self.touched.fetch_add(1, Ordering::Relaxed) + 1 == self.budget
            {
                self.drop_page_tables();
            }
        }
    }

    /// Unmaps every page of the mapping from the process (not from the host's page cache) and so
    /// frees its page tables; the next copy of a page faults it in again. Only the thread whose
    /// touch reached the budget gets here, so no two run at once.
    fn drop_page_tables(&self) {
        // The count first, then the bits: a span another copy marks in between is then counted
        // twice at worst (an early drop), never set without being counted, which could leave
        // every span set, the count under budget and the page tables never dropped again.
        self.touched.store(0, Ordering::SeqCst);
        for word in self.spans.iter().chain(self.populated.iter()) {
            word.store(0, Ordering::SeqCst);
        }
        if REGIONS[self.slot].broken.load(Ordering::Acquire) {
            // Zero pages the handler put in must stay: nothing reads the mapping any more anyway.
            return;
        }
        // SAFETY: our own mapping, whole. MADV_DONTNEED on a shared file mapping drops only the
        // process's page table entries: the file's pages stay in the page cache, and a copy
        // running meanwhile faults the same bytes in again (it can never see anything else,
        // and the mapping itself stays in place). The kernel frees page-table pages left empty
        // (CONFIG_PT_RECLAIM, Linux 6.15 and later); older kernels only clear them.
        unsafe {
            libc::madvise(
                self.start as *mut libc::c_void,
                self.len,
                libc::MADV_DONTNEED,
            )
        };
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that the file now has at least `end` bytes (after a write or an allocation).
    pub(crate) fn note_len(&self, end: u64) {
        self.backed.fetch_max(end, Ordering::Release);
    }

    /// Copies `buf.len()` bytes at `offset` from the mapping; false when the caller must use
    /// `pread` instead. A read of up to [`MAPPED_READ_MAX`] is copied unless it continues this
    /// thread's last one (a sequential stream, which wants readahead); a longer one only if it
    /// does not continue this thread's last long read, for the same reason, and every page of it
    /// is in the host's page cache ([`ReadMapping::read_cached`]). Either way not past
    /// the known end of the file or the mapping, nor after a page was unreadable.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> bool {
        if buf.len() <= MAPPED_READ_MAX {
            return self.copy(buf, offset);
        }
        let end = offset.saturating_add(buf.len() as u64);
        !self.continues(&LAST_LONG_READ, offset, end) && self.read_cached(buf, offset)
    }

    /// After the caller read `len` bytes at `offset` with `pread` (a long read this mapping
    /// declined), puts their pages into the process's page tables (`MADV_POPULATE_READ`: no
    /// copy, and no I/O, since the `pread` just cached them), unless every 1 MiB chunk it
    /// touches was populated whole before. A sequential stream of long reads must go to `pread`,
    /// whose readahead keeps the disk busy ahead of it (copied from the mapping, a cold stream
    /// lost about a quarter of its speed), and this way its pages are still mapped when they are
    /// read again at random.
    pub(crate) fn map_after_read(&self, offset: u64, len: usize) {
        let Some(end) = offset.checked_add(len as u64) else {
            return;
        };
        if len <= MAPPED_READ_MAX
            || !self.in_bounds(end)
            || REGIONS[self.slot].broken.load(Ordering::Acquire)
        {
            return;
        }
        let first = (offset >> POPULATED_SHIFT) as usize;
        let last = ((end - 1) >> POPULATED_SHIFT) as usize;
        if (first..=last).all(|c| {
            let (word, mask) = bit_of(&self.populated, c);
            word.load(Ordering::Relaxed) & mask != 0
        }) {
            return;
        }
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let addr = (self.start + offset as usize) & !(page - 1);
        let stop = (self.start + end as usize).div_ceil(page) * page;
        // SAFETY: `addr..stop` lies inside this mapping (`end` was checked against its length,
        // a multiple of the page size). Populating only fills page tables for pages the file
        // has; it reports a page it cannot read as an error instead of raising SIGBUS, and an
        // error here only means a later copy faults as it would have anyway.
        let r = unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                stop - addr,
                libc::MADV_POPULATE_READ,
            )
        };
        if r == 0 {
            self.note_touched(offset, len);
            // Only chunks the range covers whole count as populated.
            let whole = |c: usize| {
                (c as u64) << POPULATED_SHIFT >= offset
                    && ((c as u64 + 1) << POPULATED_SHIFT) <= end
            };
            for c in (first..=last).filter(|&c| whole(c)) {
                let (word, mask) = bit_of(&self.populated, c);
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
    }

    /// [`ReadMapping::read`] for one run of a fragmented read, which the caller found cached or
    /// hinted to the disk whole: runs up to [`MAPPED_FRAGMENT_MAX`] are copied, since there a
    /// cold page costs no more than the hinted read already under way; longer ones as
    /// [`ReadMapping::read_cached`] decides.
    pub(crate) fn read_fragment(&self, buf: &mut [u8], offset: u64) -> bool {
        if buf.len() <= MAPPED_FRAGMENT_MAX {
            self.copy(buf, offset)
        } else {
            self.read_cached(buf, offset)
        }
    }

    /// Copies a read of any length from the mapping if every page of it is in the host's page
    /// cache, asked with `mincore` (one call per [`RESIDENCY_CHUNK`] pages); false, having
    /// copied nothing, if one is not: a cold page read through this `MADV_RANDOM` mapping would
    /// come in alone, where `pread` hands the range to readahead. Copying cached long reads
    /// puts their pages in the page tables, so a later short read of them costs no fault (see
    /// the module documentation, "Long reads").
    pub(crate) fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return false;
        };
        self.in_bounds(end) && self.all_resident(offset, end) && self.copy_in_bounds(buf, offset)
    }

    /// The short-read copy; false when the caller must use `pread`.
    fn copy(&self, buf: &mut [u8], offset: u64) -> bool {
        let Some(end) = offset.checked_add(buf.len() as u64) else {
            return false;
        };
        !self.continues(&LAST_READ, offset, end)
            && self.in_bounds(end)
            && self.copy_in_bounds(buf, offset)
    }

    /// Whether a read of `[offset, end)` starts where this thread's last read of the same kind
    /// (`last`: short or long) ended in this mapping; it becomes that last read.
    fn continues(
        &self,
        last: &'static LocalKey<Cell<(usize, u64)>>,
        offset: u64,
        end: u64,
    ) -> bool {
        last.with(|last| last.replace((self.start, end)) == (self.start, offset))
    }

    /// Whether a read ending at `end` lies inside the mapping and below the file's known end.
    fn in_bounds(&self, end: u64) -> bool {
        end <= self.backed.load(Ordering::Acquire) && end <= self.len as u64
    }

    /// Whether every page of `[offset, end)` is in the host's page cache (`end` in bounds).
    fn all_resident(&self, offset: u64, end: u64) -> bool {
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let mut addr = (self.start + offset as usize) & !(page - 1);
        let stop = self.start + end as usize;
        let mut vec = [0u8; RESIDENCY_CHUNK];
        while addr < stop {
            let pages = (stop - addr).div_ceil(page).min(RESIDENCY_CHUNK);
            if !self.residency(addr, &mut vec[..pages]) || vec[..pages].iter().any(|v| v & 1 == 0) {
                return false;
            }
            addr += pages * page;
        }
        true
    }

    /// Asks the kernel which of the `vec.len()` pages from `addr` (page-aligned, the range inside
    /// the mapping: both callers check) are in the host's page cache, one byte each in `vec`;
    /// false if the call failed.
    fn residency(&self, addr: usize, vec: &mut [u8]) -> bool {
        let len = vec.len() * PAGE_SIZE.load(Ordering::Relaxed);
        debug_assert!(addr >= self.start && addr + len <= self.start + self.len);
        // SAFETY: `addr..addr + len` lies inside this mapping (the callers checked it against
        // its length, a multiple of the page size, and aligned `addr` down to a page), and `vec`
        // has one entry per page asked about. mincore only reports.
        unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) == 0 }
    }

    /// The copy behind every read, once the range is known to be in bounds; false when a page
    /// was unreadable and the caller must use `pread`.
    fn copy_in_bounds(&self, buf: &mut [u8], offset: u64) -> bool {
        let region = &REGIONS[self.slot];
        if region.broken.load(Ordering::Acquire) {
            return false;
        }
        let src = self.start + offset as usize;
        // SAFETY: `src..src + buf.len()` lies inside this mapping (the callers checked it with
        // `in_bounds`), which stays mapped as long as `self` lives, and below the file's known
        // end. A page that still cannot be read raises SIGBUS, which `on_sigbus` answers with a
        // page of zeros and the broken mark checked below, so the copy always completes. The
        // source is the kernel's page cache, never a Rust object, and `buf` is a distinct
        // allocation: no overlap and no aliasing. The bytes are plain `u8`, so a concurrent
        // `pwrite` of the same block (a guest racing its own read, unspecified with `pread` too)
        // can only make them stale, never invalid.
        unsafe { ptr::copy_nonoverlapping(src as *const u8, buf.as_mut_ptr(), buf.len()) };
        // The copy's loads must happen before the look at the mark: a zero page read by the copy
        // was put there after the mark was set.
        fence(Ordering::Acquire);
        if region.broken.load(Ordering::SeqCst) {
            return false;
        }
        self.note_touched(offset, buf.len());
        true
    }

    /// Whether the page holding `offset` is in the host's page cache; `None` if the mapping
    /// cannot tell (past the file's known end, or the call failed). One system call: cheap next
    /// to a fragmented read, which asks once for all its blocks.
    pub(crate) fn is_resident(&self, offset: u64) -> Option<bool> {
        if offset >= self.backed.load(Ordering::Acquire) || offset >= self.len as u64 {
            return None;
        }
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let addr = (self.start + offset as usize) & !(page - 1);
        let mut vec = [0u8; 1];
        self.residency(addr, &mut vec).then_some(vec[0] & 1 == 1)
    }

    /// Asks the CPU to start loading the first bytes of the block at `offset` into its caches, if
    /// the mapping can serve it. A read of a fragmented range copies one scattered block after
    /// another, and each copy starts with a TLB miss and cache misses that the hardware
    /// prefetcher, which stops at page boundaries, cannot see coming; hinting the next blocks
    /// while one is copied overlaps those misses. `scripts/scatter-read-bound.c prefetch`
    /// measures it (docs/design.md, "Read path").
    pub(crate) fn prefetch(&self, offset: u64) {
        if offset.saturating_add(PREFETCH_BYTES as u64) > self.backed.load(Ordering::Relaxed)
            || offset >= self.len as u64
        {
            return;
        }
        let p = self.start + offset as usize;
        for line in (0..PREFETCH_BYTES).step_by(64) {
            prefetch_line(p + line);
        }
    }
}

/// Bytes of a block [`ReadMapping::prefetch`] hints: its first two cache lines (the adjacent-line
/// and streaming prefetchers take it from there).
const PREFETCH_BYTES: usize = 128;

/// Hints the cache line at `addr` into every level of the CPU's cache.
#[cfg(target_arch = "x86_64")]
fn prefetch_line(addr: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: a prefetch is only a hint: it reads nothing into the program, and the CPU drops it
    // rather than fault when the address is unmapped, not present or not readable (Intel SDM,
    // PREFETCHh), so no address can make it unsound. SSE, which it needs, is part of x86_64.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(addr as *const i8) };
}

/// No prefetch on other architectures.
#[cfg(not(target_arch = "x86_64"))]
fn prefetch_line(_addr: usize) {}

impl Drop for ReadMapping {
    fn drop(&mut self) {
        // No read can be running: they all borrow `self`.
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        REGIONS[self.slot].end.store(0, Ordering::SeqCst);
        REGIONS[self.slot].broken.store(false, Ordering::SeqCst);
        REGIONS[self.slot].start.store(0, Ordering::SeqCst);
        debug_assert!(self.start.is_multiple_of(page));
        // SAFETY: our own mapping (with any zero pages the handler put into it), which no
        // borrow can reach any more.
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
    }
}

/// The word of a bit set holding bit `i`, and the mask of that bit in it.
fn bit_of(words: &[AtomicU64], i: usize) -> (&AtomicU64, u64) {
    (&words[i / 64], 1u64 << (i % 64))
}
