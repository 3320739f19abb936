//! What the host says about memory: this process's peak, free memory, and pages the host
//! reclaimed or paged out while the benchmark ran.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(super) fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// The peaks of the process's anonymous memory and of its page tables, sampled by a thread: the
/// kernel keeps a peak of the resident set (VmHWM) only, and that counts every page of the data
/// file that Cairn's read mapping has touched, which is the host's page cache, not memory Cairn
/// holds. The page tables are what that mapping does cost: 8 bytes per mapped 4 KiB page.
pub(super) struct MemoryPeak {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: std::thread::JoinHandle<(f64, f64)>,
}

impl MemoryPeak {
    pub(super) fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut anon, mut pte) = (0f64, 0f64);
            loop {
                anon = anon.max(status_mib("RssAnon:"));
                pte = pte.max(status_mib("VmPTE:"));
                if s.load(Ordering::Relaxed) {
                    return (anon, pte);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        MemoryPeak { stop, thread }
    }

    /// MiB of anonymous memory and of page tables.
    pub(super) fn stop(self) -> (f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0.0, 0.0))
    }
}

/// Bytes the kernel's DAMON has paged out so far, summed over every running `pageout` scheme;
/// `None` without DAMON, or without the permission to refresh its counters. The VMs this project
/// runs on page out whatever has been idle for about a minute, the page cache included, at up to
/// 128 MiB/s: a file the bench read into the cache may be partly back on disk when it is timed,
/// and runs differ by how much (docs/benchmarks.md, "Noise").
pub(super) fn damon_paged_out() -> Option<u64> {
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let mut total = None;
    for kdamond in dirs(Path::new("/sys/kernel/mm/damon/admin/kdamonds")) {
        if read(kdamond.join("state")).trim() != "on" {
            continue;
        }
        // The counters are refreshed on request only.
        std::fs::write(kdamond.join("state"), "update_schemes_stats").ok()?;
        for context in dirs(&kdamond.join("contexts")) {
            for scheme in dirs(&context.join("schemes")) {
                if read(scheme.join("action")).trim() == "pageout" {
                    let bytes = read(scheme.join("stats/sz_applied")).trim().parse::<u64>();
                    *total.get_or_insert(0) += bytes.unwrap_or(0);
                }
            }
        }
    }
    total
}

/// Bytes of free memory the guest kernel has handed back to the host so far (free page
/// reporting), or `None` where the kernel does not count them. On this project's VMs a page handed
/// back costs a fault in the host when the guest uses it again, so a workload that needs new
/// pages (Cairn's writes to fresh blocks) runs slower while the guest has plenty of free memory
/// than when its page cache fills it (docs/benchmarks.md, "Noise").
pub(super) fn reported_to_host() -> Option<u64> {
    std::fs::read_to_string("/sys/module/page_reporting/parameters/reported_kib")
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// Free memory (`MemFree`), in bytes: where the kernel takes new pages from before it
/// reclaims its cache, and on this project's VMs mostly memory handed back to the host
/// ([`reported_to_host`]).
pub(super) fn free_memory() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemFree:").map(|kib| kib * 1024)
}

/// A field given in kB in a `/proc` file of `Name: value kB` lines.
pub(super) fn proc_kib(path: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
}

/// A `/proc/self/status` field given in kB, in MiB (0 if missing).
pub(super) fn status_mib(field: &str) -> f64 {
    proc_kib("/proc/self/status", field).map_or(0.0, |kib| kib as f64 / 1024.0)
}
