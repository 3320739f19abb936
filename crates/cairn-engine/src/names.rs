//! Names Cairn chooses itself, and the one way times and sizes are written for users: times in
//! UTC, so that a name or a listing reads the same on every host (local time would need a
//! time-zone database), sizes with binary units.

/// `YYYY-MM-DD HH:MM:SSZ` for a time in ms since the Unix epoch.
pub fn time_str(ms: u64) -> String {
    let (y, mo, d, h, mi, s) = utc(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z")
}

/// Prints a byte count with a binary unit (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A checkpoint name from a time, `PREFIX-YYYYMMDD-HHMMSS`, made unique among `taken` by a
/// `-2`, `-3`... suffix (two in the same second). Only letters, digits and `-`, so it is a
/// valid name everywhere.
pub fn timestamp_name(prefix: &str, ms: u64, taken: &[String]) -> String {
    let (y, mo, d, h, mi, s) = utc(ms);
    let base = format!("{prefix}-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}");
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// (year, month, day, hour, minute, second) in UTC.
fn utc(ms: u64) -> (i64, u32, u32, u64, u64, u64) {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let tod = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    (y, m, d, tod / 3600, tod % 3600 / 60, tod % 60)
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic Gregorian calendar (Howard
/// Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(time_str(0), "1970-01-01 00:00:00Z");
        // 2024-02-29 23:59:59 UTC, a leap day.
        assert_eq!(time_str(1_709_251_199_000), "2024-02-29 23:59:59Z");
        assert_eq!(time_str(1_798_761_600_000), "2027-01-01 00:00:00Z");
    }

    #[test]
    fn names_are_valid_and_unique() {
        let ms = 1_709_251_199_000;
        let first = timestamp_name("auto", ms, &[]);
        assert_eq!(first, "auto-20240229-235959");
        crate::validate_name(&first).expect("valid");
        let second = timestamp_name("auto", ms, std::slice::from_ref(&first));
        assert_eq!(second, "auto-20240229-235959-2");
        let third = timestamp_name("auto", ms, &[first, second]);
        assert_eq!(third, "auto-20240229-235959-3");
    }
}
