//! Where long work reports how far it got, and learns that it should stop.
//!
//! A copy loop reports after each batch; when its [`Progress`] says it is cancelled, it returns
//! [`BackupError::Cancelled`] there, leaving what a killed process would (a backup without a
//! manifest, whose chunks GC frees; a restore whose half-made target its caller removes).

use crate::{BackupError, Result};

/// Hears how far work got (in millionths of the whole) and answers whether to stop.
pub trait Progress {
    /// Work is `millionths` / 1,000,000 done.
    fn report(&mut self, millionths: u64);

    /// Whether the work should stop at its next report.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A closure hears the progress and never cancels.
impl<F: FnMut(u64)> Progress for F {
    fn report(&mut self, millionths: u64) {
        self(millionths)
    }
}

/// Reports `millionths` to `progress`, then stops the work if it was cancelled.
pub fn step(progress: &mut dyn Progress, millionths: u64) -> Result<()> {
    progress.report(millionths);
    match progress.cancelled() {
        true => Err(BackupError::Cancelled),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct StopAfter(u32);

    impl Progress for StopAfter {
        fn report(&mut self, _: u64) {
            self.0 = self.0.saturating_sub(1);
        }
        fn cancelled(&self) -> bool {
            self.0 == 0
        }
    }

    #[test]
    fn a_closure_never_cancels_and_a_cancelled_progress_stops_at_its_report() {
        let mut heard = Vec::new();
        step(&mut |n| heard.push(n), 5).expect("closures never cancel");
        assert_eq!(heard, [5]);
        let mut p = StopAfter(2);
        step(&mut p, 1).expect("first report");
        assert!(matches!(step(&mut p, 2), Err(BackupError::Cancelled)));
    }
}
