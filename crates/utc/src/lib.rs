//! UTC calendar arithmetic for recovery-point times and retention buckets (no time-zone
//! database: recovery points are recorded and bucketed in UTC).

/// Days since 1970-01-01 → (year, month 1-12, day 1-31). Howard Hinnant's algorithm.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-25T19:04:05Z`.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// `20261125T190405Z`, for recovery-point ids (sorts by time).
pub fn compact(unix: i64) -> String {
    rfc3339(unix).replace(['-', ':'], "")
}

/// The largest year (and, negated, the smallest) [`parse`] takes.
const MAX_YEAR: i64 = 1_000_000_000;

/// Parses `YYYY-MM-DD[ T]HH:MM[:SS][Z]` (UTC) into seconds since the epoch.
pub fn parse(s: &str) -> Option<i64> {
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = s.split_once(['T', ' ']).unwrap_or((s, "00:00:00"));
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    // A year this far out is a typo; refusing it keeps the arithmetic below in range.
    if !(-MAX_YEAR..=MAX_YEAR).contains(&y) {
        return None;
    }
    if dp.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut tp = time.split(':');
    let hh: i64 = tp.next()?.parse().ok()?;
    let mm: i64 = tp.next()?.parse().ok()?;
    let ss: i64 = tp.next().map(|x| x.parse().ok()).unwrap_or(Some(0))?;
    if tp.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// A recovery-point id's time part: `20261125T190405.123456Z` (sorts by time, to the
/// microsecond, so "latest" is well defined for backups taken in the same second).
pub fn id_stamp(unix: i64, micros: u32) -> String {
    format!("{}.{micros:06}Z", compact(unix).trim_end_matches('Z'))
}

/// Seconds and microseconds since the epoch now.
pub fn now_micros() -> (i64, u32) {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() as i64, d.subsec_micros()))
        .unwrap_or((0, 0))
}

/// Seconds since the epoch now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_round_trips() {
        for z in [
            -800_000i64,
            -1,
            0,
            1,
            59,
            60,
            365,
            10_957,
            20_000,
            2_000_000,
        ] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(parse("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(parse("2026-11-24 18:00"), parse("2026-11-24T18:00:00Z"));
        assert_eq!(compact(0), "19700101T000000Z");
        assert_eq!(id_stamp(0, 42), "19700101T000000.000042Z");
        assert_eq!(parse("2026-13-01"), None);
        // Years that would overflow the seconds are refused, not wrapped.
        assert_eq!(parse("99999999999999-01-01"), None);
        assert_eq!(parse("-9223372036854775808-01-01"), None);
        assert!(parse("1000000000-12-31T23:59:59Z").is_some());
    }
}
