//! The recovery-point calendar (MABS's recovery wizard shows days in bold when they
//! have recovery points) and choosing a point by time, for local and server lists.

use anyhow::anyhow;
use serde::Serialize;

/// What the calendar needs of a recovery point.
pub trait Dated {
    fn vm(&self) -> &str;
    fn unix(&self) -> i64;
}

impl Dated for datastore::Manifest {
    fn vm(&self) -> &str {
        &self.source.name
    }
    fn unix(&self) -> i64 {
        self.created_unix
    }
}

impl Dated for protocol::RecoveryPointInfo {
    fn vm(&self) -> &str {
        &self.vm
    }
    fn unix(&self) -> i64 {
        self.created_unix
    }
}

/// `YYYY-MM-DD` (UTC) of a time.
pub fn day(unix: i64) -> String {
    utc::rfc3339(unix)
        .split('T')
        .next()
        .unwrap_or("")
        .to_string()
}

/// Parses `--at`.
pub fn parse_at(at: &str) -> anyhow::Result<i64> {
    utc::parse(at)
        .ok_or_else(|| anyhow!("--at {at:?} is not a time like \"2026-11-24 18:00\" (UTC)"))
}

/// For each VM, its latest recovery point at or before `at` (in the list's order).
pub fn at<T: Dated>(list: Vec<T>, at: i64) -> Vec<T> {
    let mut best: std::collections::HashMap<String, (i64, usize)> = Default::default();
    for (i, p) in list.iter().enumerate() {
        if p.unix() <= at {
            let e = best.entry(p.vm().to_string()).or_insert((p.unix(), i));
            if p.unix() >= e.0 {
                *e = (p.unix(), i);
            }
        }
    }
    let keep: std::collections::HashSet<usize> = best.values().map(|(_, i)| *i).collect();
    list.into_iter()
        .enumerate()
        .filter(|(i, _)| keep.contains(i))
        .map(|(_, p)| p)
        .collect()
}

/// One calendar day.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Day {
    pub day: String,
    pub recovery_points: usize,
    pub vms: Vec<String>,
}

/// The days with recovery points, oldest first.
pub fn days<T: Dated>(list: &[T]) -> Vec<Day> {
    let mut map: std::collections::BTreeMap<String, (usize, std::collections::BTreeSet<String>)> =
        Default::default();
    for p in list {
        let e = map.entry(day(p.unix())).or_default();
        e.0 += 1;
        e.1.insert(p.vm().to_string());
    }
    map.into_iter()
        .map(|(day, (n, vms))| Day {
            day,
            recovery_points: n,
            vms: vms.into_iter().collect(),
        })
        .collect()
}

pub fn print_days(d: &[Day]) {
    println!("{:<10} {:>6}  VMS", "DAY", "POINTS");
    for x in d {
        println!(
            "{:<10} {:>6}  {}",
            x.day,
            x.recovery_points,
            x.vms.join(", ")
        );
    }
}

/// Prints a day header before the first row of each day (rows sorted by time).
pub struct DayHeaders(Option<String>);

impl DayHeaders {
    pub fn new() -> Self {
        DayHeaders(None)
    }
    pub fn row(&mut self, unix: i64) {
        let d = day(unix);
        if self.0.as_deref() != Some(d.as_str()) {
            println!("-- {d}");
            self.0 = Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct P(&'static str, i64);
    impl Dated for P {
        fn vm(&self) -> &str {
            self.0
        }
        fn unix(&self) -> i64 {
            self.1
        }
    }

    #[test]
    fn latest_at_or_before_per_vm() {
        let t = parse_at("2026-11-24 18:00").unwrap();
        let list = vec![
            P("a", t - 100),
            P("b", t - 50),
            P("a", t),
            P("a", t + 1),
            P("c", t + 5),
        ];
        let got: Vec<_> = at(list, t).into_iter().map(|p| (p.0, p.1 - t)).collect();
        assert_eq!(got, vec![("b", -50), ("a", 0)]);
        assert!(parse_at("yesterday").is_err());
    }

    #[test]
    fn days_group_and_count() {
        let d0 = parse_at("2026-11-24 00:00").unwrap();
        let list = vec![P("b", d0 + 10), P("a", d0 + 20), P("a", d0 + 86_400)];
        let d = days(&list);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].day, "2026-11-24");
        assert_eq!(d[0].recovery_points, 2);
        assert_eq!(d[0].vms, vec!["a", "b"]);
        assert_eq!(d[1].day, "2026-11-25");
    }
}
