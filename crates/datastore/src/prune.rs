//! prune: retention rules decide which recovery points to keep; the others' manifests
//! are removed (their data is reclaimed by gc).

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// Retention rules; a recovery point is kept when any rule keeps it. The newest
/// recovery point of each source is always kept (it is the base of the next backup).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep everything created within this many days.
    pub within_days: Option<u32>,
    /// Keep the newest N.
    pub last: Option<u32>,
    /// Keep the newest recovery point of each of the last N days / weeks / months /
    /// years (UTC) that have one.
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        *self == Retention::default()
    }
}

/// Maps a recovery point to its day / week / month / year bucket.
type BucketKey = dyn Fn(&Manifest) -> i64;

/// The decision for one recovery point.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: String,
    pub source: String,
    pub created: String,
    pub keep: bool,
    /// Why it is kept (empty when removed).
    pub reasons: Vec<String>,
}

/// Decides, per source, which recovery points the rules keep (`now` in Unix seconds).
/// Only sources in `sources` are considered (all when empty).
pub fn plan(
    points: &[Manifest],
    rules: &Retention,
    now: i64,
    sources: &[String],
) -> Result<Vec<Decision>> {
    if rules.is_empty() {
        return Err(Error::Invalid(
            "no retention rule given: prune needs at least one --keep-* option (it never removes everything)".into(),
        ));
    }
    let mut by_source: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in points {
        if sources.is_empty() || sources.contains(&m.source.name) {
            by_source.entry(&m.source.name).or_default().push(m);
        }
    }
    let mut out = Vec::new();
    for (_, mut list) in by_source {
        // Newest first.
        list.sort_by(|a, b| (b.created_unix, &b.id).cmp(&(a.created_unix, &a.id)));
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); list.len()];
        reasons[0].push("newest".into());
        if let Some(n) = rules.last {
            for r in reasons.iter_mut().take(n as usize) {
                r.push("last".into());
            }
        }
        if let Some(days) = rules.within_days {
            let cutoff = now - days as i64 * 86_400;
            for (r, m) in reasons.iter_mut().zip(&list) {
                if m.created_unix >= cutoff {
                    r.push(format!("within {days} days"));
                }
            }
        }
        fn day(m: &Manifest) -> i64 {
            m.created_unix.div_euclid(86_400)
        }
        let buckets: [(&str, Option<u32>, &BucketKey); 4] = [
            ("daily", rules.daily, &day),
            // Weeks start on Monday: 1970-01-01 was a Thursday.
            ("weekly", rules.weekly, &|m| (day(m) + 3).div_euclid(7)),
            ("monthly", rules.monthly, &|m| {
                let (y, mo, _) = utc::civil_from_days(day(m));
                y * 12 + mo as i64
            }),
            ("yearly", rules.yearly, &|m| utc::civil_from_days(day(m)).0),
        ];
        for (name, count, key) in buckets {
            let Some(count) = count else { continue };
            let mut seen = HashSet::new();
            for (r, m) in reasons.iter_mut().zip(&list) {
                if seen.len() >= count as usize {
                    break;
                }
                if seen.insert(key(m)) {
                    r.push(name.into());
                }
            }
        }
        for (m, r) in list.iter().zip(reasons) {
            out.push(Decision {
                id: m.id.clone(),
                source: m.source.name.clone(),
                created: m.created.clone(),
                keep: !r.is_empty(),
                reasons: r,
            });
        }
    }
    Ok(out)
}

impl crate::store::Datastore {
    /// Applies retention: removes the manifests of recovery points no rule keeps
    /// (unless `dry_run`). Returns every decision.
    pub fn prune(
        &self,
        rules: &Retention,
        sources: &[String],
        dry_run: bool,
    ) -> Result<Vec<Decision>> {
        let _lock = self.backend.lock(false, true)?;
        let (points, _) = self.points()?;
        let plan = plan(&points, rules, utc::now(), sources)?;
        if !dry_run {
            for d in plan.iter().filter(|d| !d.keep) {
                self.forget_locked(&d.id)?;
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::*;

    fn point(id: &str, t: i64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            id: id.into(),
            source: Source {
                name: "vm".into(),
                id: "vm".into(),
            },
            created: utc::rfc3339(t),
            created_unix: t,
            base: None,
            consistency: Consistency::CrashConsistent,
            disks: vec![],
            stats: Stats::default(),
        }
    }

    fn kept(points: &[Manifest], rules: Retention, now: i64) -> Vec<String> {
        let mut v: Vec<String> = plan(points, &rules, now, &[])
            .unwrap()
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rules() {
        let day = 86_400;
        let base = utc::parse("2026-11-02T10:00:00Z").unwrap(); // a Monday
        // Two points a day for 20 days: p00 (oldest) .. p39.
        let pts: Vec<Manifest> = (0..40)
            .map(|i| point(&format!("p{i:02}"), base + i / 2 * day + (i % 2) * 3600))
            .collect();
        let now = base + 20 * day;
        assert!(plan(&pts, &Retention::default(), now, &[]).is_err());
        assert_eq!(
            kept(
                &pts,
                Retention {
                    last: Some(3),
                    ..Default::default()
                },
                now
            ),
            ["p37", "p38", "p39"]
        );
        assert_eq!(
            kept(
                &pts,
                Retention {
                    daily: Some(3),
                    ..Default::default()
                },
                now
            ),
            ["p35", "p37", "p39"]
        );
        assert_eq!(
            kept(
                &pts,
                Retention {
                    within_days: Some(2),
                    ..Default::default()
                },
                now
            ),
            ["p36", "p37", "p38", "p39"]
        );
        // Weeks from Monday 2026-11-02: days 0-6, 7-13, 14-19 → newest of each.
        assert_eq!(
            kept(
                &pts,
                Retention {
                    weekly: Some(5),
                    ..Default::default()
                },
                now
            ),
            ["p13", "p27", "p39"]
        );
        assert_eq!(
            kept(
                &pts,
                Retention {
                    monthly: Some(2),
                    ..Default::default()
                },
                now
            ),
            ["p39"]
        );
        assert_eq!(
            kept(
                &pts,
                Retention {
                    yearly: Some(1),
                    ..Default::default()
                },
                now
            ),
            ["p39"]
        );
        // The newest is kept even when no rule matches it.
        assert_eq!(
            kept(
                &pts,
                Retention {
                    within_days: Some(0),
                    ..Default::default()
                },
                now + 100 * day
            ),
            ["p39"]
        );
    }
}
