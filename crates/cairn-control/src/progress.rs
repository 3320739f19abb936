//! How far a running operation got, and a way to stop it: what a job hands the service.
//!
//! Copy loops (backups, restores, verifies, GC) report after each batch and stop there once the
//! job is cancelled, leaving what a killed process would and nothing half-made that Cairn keeps;
//! a running VM's checkpoint stops where it waits (its guard abandons the half-made checkpoint);
//! the engine's own steps (deleting, defragmenting, pruning) run to their end.

use std::sync::Arc;

use tokio::sync::watch;

/// Where an operation reports how far it got (its own measure, e.g. bytes done or millionths),
/// and whether it was asked to stop. Clones share both.
#[derive(Clone)]
pub struct Progress {
    sink: Arc<dyn Fn(u64) + Send + Sync>,
    cancelled: Arc<watch::Sender<bool>>,
}

impl Progress {
    /// Progress that goes to `sink`.
    pub fn new(sink: impl Fn(u64) + Send + Sync + 'static) -> Progress {
        Progress {
            sink: Arc::new(sink),
            cancelled: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Passes `n` on.
    pub fn report(&self, n: u64) {
        (self.sink)(n)
    }

    /// Asks the work to stop at its next report.
    pub fn cancel(&self) {
        self.cancelled.send_replace(true);
    }

    /// Whether [`Progress::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.cancelled.borrow()
    }

    /// Returns once [`Progress::cancel`] is called (for async work to stop where it waits).
    pub async fn until_cancelled(&self) {
        // The sender lives in `self`, so the wait ends only by a cancel.
        let _ = self.cancelled.subscribe().wait_for(|c| *c).await;
    }
}

/// The error cancelled work ends with.
pub fn cancelled(what: &str) -> crate::OpError {
    crate::OpError::new(
        crate::ErrorKind::Cancelled,
        format!("{what} was cancelled before it finished; nothing half-made is kept"),
    )
}

impl cairn_backup::Progress for Progress {
    fn report(&mut self, millionths: u64) {
        Progress::report(self, millionths)
    }

    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }
}

/// A [`Progress`] that goes nowhere.
pub fn no_progress() -> Progress {
    Progress::new(|_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_sink_and_the_cancel() {
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = heard.clone();
        let p = Progress::new(move |n| h.lock().expect("lock").push(n));
        let q = p.clone();
        q.report(7);
        assert!(!p.is_cancelled());
        q.cancel();
        assert!(p.is_cancelled());
        let waited = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(5), p.until_cancelled()).await
            });
        assert!(waited.is_ok(), "a cancelled progress stops waiting");
        let mut as_backup: Box<dyn cairn_backup::Progress> = Box::new(p);
        as_backup.report(9);
        assert!(as_backup.cancelled());
        assert_eq!(*heard.lock().expect("lock"), [7, 9]);
    }
}
