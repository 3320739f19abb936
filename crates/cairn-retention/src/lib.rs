//! Which items a retention policy keeps (backups in a repository, checkpoints of a volume or VM),
//! with Proxmox Backup Server's semantics (also borg's): the options run in the order last,
//! hourly, daily, weekly, monthly, yearly. Each walks the items newest first and keeps the newest
//! one of each period (hour, day, ISO week, month, year, in the time zone given) until it has kept
//! N periods; a period already covered by an item an earlier option kept is skipped, so each
//! option reaches further back than the ones before it, and periods without items do not count.
//! A second item in a period the option already took is removed. Protected items are always kept
//! and count for nothing. With no option at all, everything is kept.
//!
//! The selection is a pure function of the items' times, so a dry run shows exactly what a run
//! would do.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, TimeZone, Timelike};
use serde::{Deserialize, Serialize};

/// How many of each period to keep (0: the option is off).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepPolicy {
    /// The newest N.
    #[serde(default)]
    pub last: u32,
    /// The newest in each of the last N hours that have items.
    #[serde(default)]
    pub hourly: u32,
    /// Days.
    #[serde(default)]
    pub daily: u32,
    /// ISO weeks (Monday to Sunday).
    #[serde(default)]
    pub weekly: u32,
    /// Months.
    #[serde(default)]
    pub monthly: u32,
    /// Years.
    #[serde(default)]
    pub yearly: u32,
}

impl KeepPolicy {
    /// Whether no option is set (then everything is kept).
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// What becomes of one item.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// Kept because it is protected.
    Protected,
    /// Kept by the option named.
    Keep(Rule),
    /// To be removed.
    Remove,
}

/// The option that kept an item.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// `--keep-last`.
    Last,
    /// `--keep-hourly`.
    Hourly,
    /// `--keep-daily`.
    Daily,
    /// `--keep-weekly`.
    Weekly,
    /// `--keep-monthly`.
    Monthly,
    /// `--keep-yearly`.
    Yearly,
    /// No option given: everything is kept.
    All,
}

/// One item to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// When it was taken, ms since the Unix epoch.
    pub time_ms: u64,
    /// Never removed.
    pub protected: bool,
}

/// The period a time falls in, for one option.
fn period<Tz: TimeZone>(rule: Rule, t: &DateTime<Tz>, index: usize) -> String {
    match rule {
        Rule::Last | Rule::All => format!("#{index}"),
        Rule::Hourly => format!("{}/{}/{}/{}", t.year(), t.month(), t.day(), t.hour()),
        Rule::Daily => format!("{}/{}/{}", t.year(), t.month(), t.day()),
        Rule::Weekly => {
            let w = t.iso_week();
            format!("{}/{}", w.year(), w.week())
        }
        Rule::Monthly => format!("{}/{}", t.year(), t.month()),
        Rule::Yearly => format!("{}", t.year()),
    }
}

/// Marks each of `items` (any order) under `policy`, periods taken in time zone `tz`.
pub fn select<Tz: TimeZone>(items: &[Candidate], policy: &KeepPolicy, tz: &Tz) -> Vec<Mark> {
    let mut marks: Vec<Option<Mark>> = vec![None; items.len()];
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].time_ms.cmp(&items[a].time_ms).then(b.cmp(&a)));
    if policy.is_empty() {
        return items
            .iter()
            .map(|c| match c.protected {
                true => Mark::Protected,
                false => Mark::Keep(Rule::All),
            })
            .collect();
    }
    let time = |i: usize| {
        let ms = i64::try_from(items[i].time_ms).unwrap_or(i64::MAX);
        tz.timestamp_millis_opt(ms).single().unwrap_or_else(|| {
            tz.timestamp_millis_opt(0)
                .single()
                .expect("the epoch exists")
        })
    };
    let options = [
        (Rule::Last, policy.last),
        (Rule::Hourly, policy.hourly),
        (Rule::Daily, policy.daily),
        (Rule::Weekly, policy.weekly),
        (Rule::Monthly, policy.monthly),
        (Rule::Yearly, policy.yearly),
    ];
    for (rule, keep) in options {
        if keep == 0 {
            continue;
        }
        let already: HashSet<String> = order
            .iter()
            .filter(|&&i| matches!(marks[i], Some(Mark::Keep(_))))
            .map(|&i| period(rule, &time(i), i))
            .collect();
        let mut taken: HashSet<String> = HashSet::new();
        for &i in &order {
            if marks[i].is_some() {
                continue;
            }
            if items[i].protected {
                marks[i] = Some(Mark::Protected);
                continue;
            }
            let p = period(rule, &time(i), i);
            if already.contains(&p) {
                continue;
            }
            if taken.contains(&p) {
                marks[i] = Some(Mark::Remove);
                continue;
            }
            if taken.len() as u64 >= u64::from(keep) {
                break;
            }
            taken.insert(p);
            marks[i] = Some(Mark::Keep(rule));
        }
    }
    marks
        .into_iter()
        .zip(items)
        .map(|(m, c)| match (m, c.protected) {
            (_, true) => Mark::Protected,
            (Some(m), _) => m,
            (None, _) => Mark::Remove,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, Utc};

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
        let t = NaiveDate::from_ymd_opt(y, mo, d)
            .and_then(|d| d.and_hms_opt(h, mi, 0))
            .expect("a valid time")
            .and_utc();
        u64::try_from(t.timestamp_millis()).expect("after 1970")
    }

    fn kept(items: &[u64], policy: KeepPolicy) -> Vec<u64> {
        let c: Vec<Candidate> = items
            .iter()
            .map(|&t| Candidate {
                time_ms: t,
                protected: false,
            })
            .collect();
        let marks = select(&c, &policy, &Utc);
        let mut k: Vec<u64> = items
            .iter()
            .zip(&marks)
            .filter(|(_, m)| matches!(m, Mark::Keep(_)))
            .map(|(t, _)| *t)
            .collect();
        k.sort_unstable();
        k
    }

    /// Proxmox Backup Server's documented cases (its prune tests): four backups over three days.
    #[test]
    fn pbs_examples_last_and_daily() {
        let b = [
            at(2019, 12, 2, 11, 59),
            at(2019, 12, 3, 11, 59),
            at(2019, 12, 4, 11, 59),
            at(2019, 12, 4, 12, 59),
        ];
        let p = |last, daily| KeepPolicy {
            last,
            daily,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&b, p(1, 0)), vec![b[3]]);
        assert_eq!(kept(&b, p(0, 1)), vec![b[3]]);
        assert_eq!(
            kept(&b, p(1, 1)),
            vec![b[1], b[3]],
            "daily skips the day last already covers"
        );
        assert_eq!(kept(&b, p(2, 1)), vec![b[1], b[2], b[3]]);
        assert_eq!(kept(&b, p(2, 2)), b.to_vec());
        assert_eq!(
            kept(&b, p(0, 3)),
            vec![b[0], b[1], b[3]],
            "one a day, the newest"
        );
    }

    /// keep-daily 1, keep-weekly 1 over daily backups from 2019-11-15 to 2019-12-04: the day's
    /// and the one of the ISO week before (Sunday 2019-12-01), as PBS keeps.
    #[test]
    fn pbs_examples_daily_and_weekly() {
        let days: Vec<u64> = (15..=30)
            .map(|d| at(2019, 11, d, 10, 0))
            .chain((1..=4).map(|d| at(2019, 12, d, 10, 0)))
            .collect();
        let p = KeepPolicy {
            daily: 1,
            weekly: 1,
            ..KeepPolicy::default()
        };
        assert_eq!(
            kept(&days, p),
            vec![at(2019, 12, 1, 10, 0), at(2019, 12, 4, 10, 0)]
        );
        let p = KeepPolicy {
            weekly: 2,
            monthly: 1,
            ..KeepPolicy::default()
        };
        assert_eq!(
            kept(&days, p),
            vec![
                at(2019, 11, 24, 10, 0),
                at(2019, 12, 1, 10, 0),
                at(2019, 12, 4, 10, 0)
            ],
            "weekly keeps Dec 4 (week 49) and Dec 1 (week 48) and removes the rest of both weeks; \
             monthly then takes November's newest left, Nov 24"
        );
    }

    #[test]
    fn periods_without_backups_do_not_count_and_years_reach_back() {
        let b = [
            at(2015, 6, 1, 0, 0),
            at(2020, 6, 1, 0, 0),
            at(2024, 6, 1, 0, 0),
        ];
        let p = KeepPolicy {
            yearly: 3,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&b, p), b.to_vec());
        let p = KeepPolicy {
            monthly: 2,
            ..KeepPolicy::default()
        };
        assert_eq!(kept(&b, p), vec![b[1], b[2]]);
    }

    #[test]
    fn protected_backups_stay_and_count_for_nothing() {
        let c = [
            Candidate {
                time_ms: at(2026, 1, 1, 0, 0),
                protected: true,
            },
            Candidate {
                time_ms: at(2026, 1, 2, 0, 0),
                protected: false,
            },
            Candidate {
                time_ms: at(2026, 1, 3, 0, 0),
                protected: true,
            },
            Candidate {
                time_ms: at(2026, 1, 4, 0, 0),
                protected: false,
            },
        ];
        let p = KeepPolicy {
            last: 1,
            ..KeepPolicy::default()
        };
        let m = select(&c, &p, &Utc);
        assert_eq!(
            m,
            vec![
                Mark::Protected,
                Mark::Remove,
                Mark::Protected,
                Mark::Keep(Rule::Last)
            ]
        );
        let all = select(&c, &KeepPolicy::default(), &Utc);
        assert!(
            all.iter().all(|m| *m != Mark::Remove),
            "no option keeps everything"
        );
    }

    #[test]
    fn hours_are_local_time() {
        // 22:30, 23:30 and 00:30 UTC span two days in UTC, one day (00:30 to 02:30) in UTC+2.
        let b = [
            at(2026, 3, 1, 22, 30),
            at(2026, 3, 1, 23, 30),
            at(2026, 3, 2, 0, 30),
        ];
        let c: Vec<Candidate> = b
            .iter()
            .map(|&t| Candidate {
                time_ms: t,
                protected: false,
            })
            .collect();
        let p = KeepPolicy {
            daily: 2,
            ..KeepPolicy::default()
        };
        let plus2 = chrono::FixedOffset::east_opt(2 * 3600).expect("offset");
        let in_utc = select(&c, &p, &Utc);
        let in_plus2 = select(&c, &p, &plus2);
        assert_eq!(
            in_utc,
            vec![
                Mark::Remove,
                Mark::Keep(Rule::Daily),
                Mark::Keep(Rule::Daily)
            ]
        );
        assert_eq!(
            in_plus2,
            vec![Mark::Remove, Mark::Remove, Mark::Keep(Rule::Daily)]
        );
    }
}
