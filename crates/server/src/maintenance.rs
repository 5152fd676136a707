//! The server's own jobs on the datastore: retention (prune), gc and verify. The
//! catalog's recovery points follow what the datastore keeps.

use crate::state::AppState;
use datastore::Retention;
use protocol::{JobKind, Severity};
use std::collections::BTreeMap;

/// Runs one maintenance job; returns a one-line summary or the reason it failed.
pub fn run(st: &AppState, job: i64, kind: JobKind) -> Result<String, String> {
    match kind {
        JobKind::Prune => prune(st, job),
        JobKind::Gc => {
            let r = st
                .datastore
                .gc(&mut |m| {
                    let _ = st.cat().job_log(utc::now(), job, m);
                })
                .map_err(|e| e.to_string())?;
            if r.unhealed_blobs > 0 || r.missing_blobs > 0 {
                return Err(format!(
                    "gc kept {} damaged blobs that no backup has stored again and found {} missing; run verify",
                    r.unhealed_blobs, r.missing_blobs
                ));
            }
            // Online targets are collected on the same schedule, after the disk.
            let online = crate::online::gc_all(st, job)?;
            Ok(format!(
                "gc: {} packs deleted, {} repacked, {} bytes freed{}",
                r.packs_deleted,
                r.packs_repacked,
                r.bytes_freed,
                online.iter().map(|o| format!("; {o}")).collect::<String>()
            ))
        }
        JobKind::Verify => {
            let r = st
                .datastore
                .verify(&mut |_, _| {})
                .map_err(|e| e.to_string())?;
            let now = utc::now();
            if r.damaged_files.is_empty() && r.damaged_points.is_empty() {
                let _ = st
                    .notify
                    .resolve_alerts(&st.cat(), now, "datastore", Some("damage"));
                Ok(format!(
                    "verify: {} blobs in {} packs, {} recovery points: no damage",
                    r.blobs, r.packs, r.points
                ))
            } else {
                let names: Vec<String> = r
                    .damaged_points
                    .iter()
                    .map(|p| format!("{} ({})", p.id, p.source.as_deref().unwrap_or("unreadable")))
                    .collect();
                let msg = format!(
                    "verify found {} damaged files; recovery points needing damaged data: {}; the next backup of each heals what it still has",
                    r.damaged_files.len(),
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                );
                let _ = st.notify.raise_alert(
                    &st.cat(),
                    now,
                    Severity::Error,
                    "datastore",
                    "damage",
                    &msg,
                );
                Err(msg)
            }
        }
        JobKind::OnlineCopy => crate::online::copy(st, job),
        JobKind::OnlineVerify => crate::online::verify(st, job),
        k => Err(format!("{} is not a server job", k.as_str())),
    }
}

/// Applies each data source's retention range (its group's, or the one it had when
/// its group was deleted with "keep data"). The newest recovery point of a data
/// source is always kept, so a source that stopped backing up keeps its last copy.
fn prune(st: &AppState, job: i64) -> Result<String, String> {
    let e = |e: catalog::Error| e.to_string();
    let mut by_days: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    {
        let cat = st.cat();
        let groups = cat.groups().map_err(e)?;
        let mut days_of = BTreeMap::new();
        for g in &groups {
            for m in &g.members {
                days_of.insert(m.datasource_id.clone(), g.policy.retention_days);
            }
        }
        for ds in cat.datasources().map_err(e)? {
            let days = match days_of.get(&ds.id) {
                Some(d) => Some(*d),
                None => cat
                    .setting(&format!("retention:{}", ds.id))
                    .map_err(e)?
                    .and_then(|v| v.parse().ok()),
            };
            let Some(days) = days else { continue };
            let names = by_days.entry(days).or_default();
            for rp in cat.recovery_points(Some(&ds.id)).map_err(e)? {
                if !names.contains(&rp.vm) {
                    names.push(rp.vm);
                }
            }
        }
    }
    let mut removed = 0u64;
    for (days, names) in by_days {
        if names.is_empty() {
            continue;
        }
        let rules = Retention {
            within_days: Some(days),
            last: Some(1),
            ..Retention::default()
        };
        let plan = st
            .datastore
            .prune(&rules, &names, false)
            .map_err(|e| e.to_string())?;
        let cat = st.cat();
        for d in plan.iter().filter(|d| !d.keep) {
            cat.delete_recovery_point(&d.id).map_err(e)?;
            cat.job_log(
                utc::now(),
                job,
                &format!(
                    "removed recovery point {} of {} (older than {days} days)",
                    d.id, d.source
                ),
            )
            .map_err(e)?;
            removed += 1;
        }
    }
    Ok(format!("prune: {removed} recovery points removed"))
}
