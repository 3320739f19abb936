//! Where a store's times (checkpoints' and volumes' `created_ms`) come from: the system clock,
//! or a manual one that tests set, so that months of scheduled checkpoints and their retention
//! run in a second with the times they would really have.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch. Clones share one clock.
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<AtomicU64>>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that stands at `ms` until [`Clock::set`] or [`Clock::advance`] moves it.
    pub fn manual(ms: u64) -> Clock {
        Clock(Some(Arc::new(AtomicU64::new(ms))))
    }

    /// Now, in ms since the epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Some(t) => t.load(Ordering::SeqCst),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Moves a manual clock to `ms` (the system clock ignores it).
    pub fn set(&self, ms: u64) {
        if let Some(t) = &self.0 {
            t.store(ms, Ordering::SeqCst);
        }
    }

    /// Moves a manual clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        if let Some(t) = &self.0 {
            t.fetch_add(ms, Ordering::SeqCst);
        }
    }

    /// Whether it is a manual clock.
    pub fn is_manual(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.is_manual() {
            true => write!(f, "Clock::manual({})", self.now_ms()),
            false => f.write_str("Clock::system()"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let c = Clock::manual(1_000);
        let d = c.clone();
        c.advance(500);
        assert_eq!(d.now_ms(), 1_500);
        d.set(7);
        assert_eq!(c.now_ms(), 7);
        assert!(Clock::system().now_ms() > 1_700_000_000_000);
    }
}
