//! The daemon's lifecycle thread: the scheduler of `cairn-control` on the system clock, running
//! each step through the daemon's service like an API request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cairn_control::lifecycle::scheduler::Scheduler;
use cairn_control::{no_progress, Service};
use tracing::warn;

/// The running lifecycle thread.
pub struct Lifecycle {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts the scheduler over `service`'s store; `None` (logged) if it cannot start.
pub fn start(service: Arc<Service>) -> Option<Lifecycle> {
    let handle = tokio::runtime::Handle::current();
    let store = service.store().clone();
    let clock = store.clock();
    let run = Box::new(move |op| handle.block_on(service.run(op, no_progress())));
    let mut scheduler = match Scheduler::new(store, clock, run) {
        Ok(s) => s,
        Err(e) => {
            warn!("lifecycle policies will not run: {e}");
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("cairn-lifecycle".into())
        .spawn(move || scheduler.run_until(&flag))
        .map_err(|e| warn!("lifecycle policies will not run: cannot start their thread: {e}"))
        .ok()?;
    Some(Lifecycle { stop, thread })
}

impl Lifecycle {
    /// Asks the thread to stop and waits for the step it runs (a backup may take long: after
    /// 10 s the daemon goes on, and the step ends with the process).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for _ in 0..100 {
            if self.thread.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        warn!("a lifecycle step is still running at shutdown; it ends with the daemon");
    }
}
