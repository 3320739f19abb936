//! Backups are background work: they run beside the VMs whose checkpoints they read, on the
//! same cores, and a VM's disk requests must not queue behind a backup's hashing and
//! compression (`cairn bench --backup-large` measures a VM-like client's p99 latency during a
//! backup). So the threads that do a backup's heavy work run at the lowest CPU priority
//! (nice 19) and in the idle I/O class: they take whatever CPU and disk the VMs leave, and yield
//! them when a request arrives.
//! The process's other threads (the daemon's NBD requests) keep their priority; the nice value
//! is per thread on Linux.

use std::sync::OnceLock;

/// `ioprio_set` arguments: the calling thread, in the idle class.
const IOPRIO_WHO_PROCESS: libc::c_long = 1;
const IOPRIO_CLASS_IDLE: libc::c_long = 3;
const IOPRIO_CLASS_SHIFT: u32 = 13;

/// Lowers the calling thread to the lowest CPU priority (nice 19) and the idle I/O class (its
/// disk reads, page faults of the store's mapping included, wait for the VMs' requests under
/// schedulers that honour classes: mq-deadline, BFQ; mq-deadline still serves them after its
/// aging time, so a busy VM never starves a backup). Best effort: a host that refuses leaves the
/// thread as it was, which costs the VMs latency, not correctness.
#[allow(unsafe_code)] // one syscall with no safe wrapper in rustix or libc; see SAFETY below
pub fn lower_priority() {
    let _ = rustix::process::setpriority_process(None, 19);
    // SAFETY: ioprio_set takes three integers and touches no memory of ours; `who` 0 with
    // IOPRIO_WHO_PROCESS is the calling thread. Its result is only a status, ignored as above.
    // Measured need: without it, a VM's p99 read latency during a backup of a volume larger
    // than the page cache was 11.7x idle (`cairn bench --backup-large`).
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0 as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        );
    }
}

/// The pool that runs backups' parallel work, its threads at the lowest priority.
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("cairn-backup-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .expect("a thread pool for backups")
    })
}
