//! Backups are background work: they run beside the VMs whose checkpoints they read, on the
//! same cores and disk, and a VM's disk requests must not queue behind a backup's hashing,
//! compression or reads (`cairn bench --backup-large` measures a VM-like client's p99 latency
//! during a backup). So the threads that do a backup's heavy work run at the lowest CPU priority
//! (`SCHED_IDLE`, and nice 19 where that is refused) and in the idle I/O class: they take whatever
//! CPU and disk the VMs leave, and give them back when a request arrives. Their reads of the
//! store go through `Store::read_background`, which neither reads ahead nor fills the page cache
//! (docs/decisions/0011-backups-run-at-idle-priority.md has the measurements).
//! The process's other threads (the daemon's NBD requests) keep their priority; these settings
//! are per thread on Linux.

use std::sync::OnceLock;

/// `ioprio_set` arguments: the calling thread, in the idle class.
const IOPRIO_WHO_PROCESS: libc::c_long = 1;
const IOPRIO_CLASS_IDLE: libc::c_long = 3;
const IOPRIO_CLASS_SHIFT: u32 = 13;

/// Lowers the calling thread to the lowest CPU priority (`SCHED_IDLE`, nice 19) and the idle I/O
/// class (its disk reads wait for the VMs' requests under schedulers that honour classes:
/// mq-deadline, BFQ; mq-deadline still serves them after its aging time, so a busy VM never
/// starves a backup). Best effort: a host that refuses leaves the thread as it was, which costs
/// the VMs latency, not correctness.
#[allow(unsafe_code)] // two syscalls with no safe wrapper in rustix; see SAFETY below
pub fn lower_priority() {
    let _ = rustix::process::setpriority_process(None, 19);
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: `idle` is a valid sched_param that outlives the call, which only reads it; pid 0
    // is the calling thread. Its result is only a status, ignored as above.
    // Measured need: with nice 19 alone a VM's p99 read latency during a backup was 3.0x idle,
    // with SCHED_IDLE 1.4x (same reads otherwise): a SCHED_IDLE thread gives way the moment
    // another wakes (docs/decisions/0011-backups-run-at-idle-priority.md).
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle);
    }
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
