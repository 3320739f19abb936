//! When a policy's next checkpoint is due: every N seconds, or on a cron schedule (five fields:
//! minute, hour, day of month, month, day of week; local time; parsed by `croner`). A slot
//! missed while the daemon was down is made up once, not once per missed slot: the next run is
//! due at the first slot after the last run, and if that has passed, now.

use std::str::FromStr;

use chrono::{Local, TimeZone};
use croner::Cron;

use super::policy::Policy;
use crate::error::{ErrorKind, OpError};

fn parse(expr: &str) -> Result<Cron, OpError> {
    if expr.split_whitespace().count() != 5 {
        return Err(OpError::new(
            ErrorKind::Invalid,
            format!("schedule '{expr}' is not five cron fields (minute hour day month weekday), e.g. \"0 */6 * * *\""),
        ));
    }
    Cron::from_str(expr).map_err(|e| {
        OpError::new(
            ErrorKind::Invalid,
            format!("schedule '{expr}' is not a cron expression: {e}"),
        )
    })
}

/// The first slot of `expr` after `after_ms` (local time), if it ever fires.
fn next_slot(cron: &Cron, after_ms: u64) -> Option<u64> {
    let t = Local
        .timestamp_millis_opt(i64::try_from(after_ms).ok()?)
        .single()?;
    let next = cron.find_next_occurrence(&t, false).ok()?;
    u64::try_from(next.timestamp_millis()).ok()
}

/// Checks that `expr` parses and fires at least once from now.
pub fn check(expr: &str) -> Result<(), OpError> {
    let cron = parse(expr)?;
    match next_slot(&cron, cairn_vm::now_ms()) {
        Some(_) => Ok(()),
        None => Err(OpError::new(
            ErrorKind::Invalid,
            format!("schedule '{expr}' never fires (no such date); check its day and month fields"),
        )),
    }
}

/// When `policy`'s next checkpoint is due (ms since the epoch), given its last one at `last_ms`
/// (`None`: never) and the time `now_ms`; `None` when it takes none.
pub fn next_due(policy: &Policy, last_ms: Option<u64>, now_ms: u64) -> Option<u64> {
    let due = match (&policy.every_secs, &policy.schedule, last_ms) {
        (Some(_), _, None) => now_ms,
        (Some(every), _, Some(last)) => last.saturating_add(every.saturating_mul(1000)),
        (None, Some(expr), last) => {
            let cron = parse(expr).ok()?;
            next_slot(&cron, last.unwrap_or(now_ms))?
        }
        (None, None, _) => return None,
    };
    // A slot that passed while nothing ran is made up now, once.
    Some(due.max(now_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every(secs: u64) -> Policy {
        Policy {
            target: "v".into(),
            every_secs: Some(secs),
            ..Policy::default()
        }
    }

    #[test]
    fn intervals_run_once_after_a_long_stop() {
        let p = every(3600);
        assert_eq!(next_due(&p, None, 10_000), Some(10_000), "never ran: now");
        assert_eq!(next_due(&p, Some(1_000), 2_000), Some(3_601_000));
        // Down for a day: one run, due at once, not 24.
        let due = next_due(&p, Some(0), 86_400_000).expect("due");
        assert!(due <= 86_400_000, "{due}");
    }

    #[test]
    fn cron_schedules_parse_and_a_never_firing_one_is_refused() {
        check("0 */6 * * *").expect("every six hours");
        let e = check("0 0 31 2 *").expect_err("February 31st");
        assert!(e.message.contains("never fires"), "{e}");
        let e = check("61 * * * *").expect_err("minute 61");
        assert_eq!(e.kind, ErrorKind::Invalid);
        let e = check("* * * *").expect_err("four fields");
        assert!(e.message.contains("five cron fields"), "{e}");
        let p = Policy {
            target: "v".into(),
            schedule: Some("*/5 * * * *".into()),
            ..Policy::default()
        };
        let now = 1_800_000_000_000;
        let due = next_due(&p, Some(now - 60_000), now).expect("due");
        assert!(due <= now + 300_000, "within five minutes: {due}");
    }
}
