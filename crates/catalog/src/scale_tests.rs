//! A catalog the size of a busy server (200 data sources, 10,000 jobs, 10,000 recovery
//! points): the list queries must return the right rows, and must use indexes (checked
//! through the query plans, not timings, so the test is deterministic).
//! `examples/catalog_scale.rs` prints the timings.

use protocol::{JobKind, JobState};

use crate::datasources::DS_SELECT;
use crate::jobs::{JOB_ROW_SELECT, JOB_SELECT};
use crate::recovery_points::RP_SELECT;
use crate::test_util::*;
use crate::*;

const BASE: i64 = 1_780_000_000;
const HOSTS: usize = 20;
const VMS: usize = 10;
const PER_DS: i64 = 50;

fn created(k: i64, i: usize) -> i64 {
    BASE + k * 3600 + i as i64
}

/// Fills `c` and returns the data-source ids in index order.
fn fill(c: &Catalog) -> Vec<String> {
    let mut ids = Vec::new();
    for h in 0..HOSTS {
        let vms: Vec<_> = (0..VMS)
            .map(|v| vm(&format!("vm{v}"), Some(&format!("uuid-{h}-{v}")), 1 << 30))
            .collect();
        c.upsert_inventory(BASE, &format!("h{h:02}"), &vms).unwrap();
        for v in 0..VMS {
            ids.push(
                c.datasource_by_name(&format!("h{h:02}"), &format!("vm{v}"))
                    .unwrap()
                    .id,
            );
        }
    }
    // Every fifth data source stays unprotected; the others go round-robin to 4 groups.
    for g in 0..4 {
        let members: Vec<String> = (0..ids.len())
            .filter(|i| i % 5 != 4 && i % 4 == g)
            .map(|i| format!("h{:02}/vm{}", i / VMS, i % VMS))
            .collect();
        c.create_group(BASE, &format!("g{g}"), &policy(), &members)
            .unwrap();
    }
    let mut rps = Vec::new();
    for (i, ds) in ids.iter().enumerate() {
        for k in 0..PER_DS {
            let name = format!("h{:02}/vm{}", i / VMS, i % VMS);
            rps.push(rp(&format!("{ds}-{k:03}"), ds, &name, created(k, i)));
        }
    }
    c.replace_recovery_points(&rps).unwrap();

    c.conn.execute_batch("BEGIN").unwrap();
    for k in 0..PER_DS {
        for (i, ds) in ids.iter().enumerate() {
            let t = created(k, i);
            let not_before = (i % 2 == 1).then_some(BASE + 1_000_000);
            let id = c
                .add_job(
                    t,
                    &NewJob {
                        kind: JobKind::Sync,
                        datasource_id: Some(ds.clone()),
                        trigger: "schedule".into(),
                        not_before: if k == PER_DS - 1 { not_before } else { None },
                        attempt: 1,
                        rerun_of: None,
                    },
                )
                .unwrap();
            if k == PER_DS - 1 && i % 3 == 0 {
                continue; // stays queued
            }
            c.start_job(t + 1, id).unwrap();
            if k == PER_DS - 1 && i % 3 == 1 {
                continue; // stays running
            }
            let failed = k % 10 == 3;
            c.finish_job(
                t + 60,
                id,
                if failed {
                    JobState::Failed
                } else {
                    JobState::Succeeded
                },
                failed.then_some(("io", "read error")),
            )
            .unwrap();
        }
    }
    c.conn.execute_batch("COMMIT").unwrap();
    ids
}

#[test]
fn a_full_catalog_answers_correctly() {
    let mem = Catalog::open_in_memory().unwrap();
    let ids = fill(&mem);
    // Run the checks on a real file (a snapshot of the filled catalog).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    mem.snapshot_to(&path).unwrap();
    drop(mem);
    let c = Catalog::open(&path).unwrap();
    let n = ids.len();

    assert_eq!(
        c.counts().unwrap(),
        Counts {
            agents: 0,
            datasources: 200,
            protection_groups: 4,
            recovery_points: 10_000,
            active_alerts: 0,
            running_jobs: 67,
        }
    );

    let all = c.datasources().unwrap();
    assert_eq!(all.len(), n);
    for ds in &all {
        let i = ids.iter().position(|x| *x == ds.id).unwrap();
        assert_eq!(ds.name, format!("h{:02}/vm{}", i / VMS, i % VMS));
        assert_eq!(
            ds.last_recovery_point.as_deref(),
            Some(utc::rfc3339(created(PER_DS - 1, i)).as_str())
        );
        let group = (i % 5 != 4).then(|| format!("g{}", i % 4));
        assert_eq!(ds.protection_group, group, "{}", ds.name);
        assert_eq!(ds.size, 1 << 30);
    }

    let groups = c.groups().unwrap();
    assert_eq!(groups.len(), 4);
    assert!(groups.iter().all(|g| g.members.len() == 40));

    let rps = c.recovery_points(Some(&ids[7])).unwrap();
    assert_eq!(rps.len(), PER_DS as usize);
    assert!(
        rps.windows(2)
            .all(|w| w[0].created_unix < w[1].created_unix)
    );
    assert_eq!(rps[0].id, format!("{}-000", ids[7]));
    let every = c.recovery_points(None).unwrap();
    assert_eq!(every.len(), 10_000);
    assert!(
        every
            .windows(2)
            .all(|w| w[0].created_unix <= w[1].created_unix)
    );

    let newest = c.jobs(None, 20).unwrap();
    assert_eq!(
        newest.iter().map(|j| j.id).collect::<Vec<_>>(),
        (9_981..=10_000).rev().collect::<Vec<i64>>()
    );
    assert_eq!(c.jobs(Some(JobState::Failed), 100_000).unwrap().len(), 1000);
    assert_eq!(c.jobs(Some(JobState::Running), 100_000).unwrap().len(), 67);
    assert_eq!(c.jobs(Some(JobState::Queued), 100_000).unwrap().len(), 67);

    let runnable = c.runnable_jobs(BASE + 200 * 3600).unwrap();
    assert_eq!(runnable.len(), 34);
    assert!(runnable.windows(2).all(|w| w[0].id < w[1].id));
    for r in &runnable {
        let i = ids
            .iter()
            .position(|x| Some(x) == r.datasource_id.as_ref())
            .unwrap();
        assert_eq!(i % 6, 0);
        assert_eq!(r.host.as_deref(), Some(format!("h{:02}", i / VMS).as_str()));
    }
    assert_eq!(c.runnable_jobs(BASE + 2_000_000).unwrap().len(), 67);
    assert_eq!(c.running_jobs_on_host("h00").unwrap(), 3);
    assert_eq!(c.running_jobs().unwrap(), 67);

    for (i, ds) in ids.iter().enumerate() {
        let active = c.active_job_for(ds).unwrap().map(|j| j.state);
        let expect = match i % 3 {
            0 => Some(JobState::Queued),
            1 => Some(JobState::Running),
            _ => None,
        };
        assert_eq!(active, expect);
        let last_ok = if i % 3 == 2 { PER_DS - 1 } else { PER_DS - 2 };
        assert_eq!(
            c.last_success_unix(ds).unwrap(),
            Some(created(last_ok, i) + 60)
        );
        let last = c.last_job(ds, &[JobKind::Sync]).unwrap().unwrap();
        assert_eq!(last.created, utc::rfc3339(created(PER_DS - 1, i)));
    }
}

/// The query plan of `sql`, one line per step.
fn plan(c: &Catalog, sql: &str) -> Vec<String> {
    let mut stmt = c
        .conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap();
    let n = stmt.parameter_count();
    let params: Vec<rusqlite::types::Value> = (0..n)
        .map(|_| rusqlite::types::Value::Text("x".into()))
        .collect();
    stmt.query_map(rusqlite::params_from_iter(params), |r| {
        r.get::<_, String>(3)
    })
    .unwrap()
    .map(|r| r.unwrap())
    .collect()
}

#[test]
fn hot_queries_use_indexes() {
    let c = Catalog::open_in_memory().unwrap();
    fill(&c);
    c.conn.execute_batch("ANALYZE").unwrap();
    let cases = [
        // The per-data-source subquery must seek, not scan, recovery points.
        (format!("{DS_SELECT} ORDER BY d.host, d.vm"), "SCAN r"),
        (
            format!("{RP_SELECT} WHERE datasource_id = ?1 ORDER BY created_unix, id"),
            "SCAN recovery_points",
        ),
        (
            format!(
                "{JOB_ROW_SELECT} WHERE j.state = 'queued'
                 AND (j.not_before IS NULL OR j.not_before <= ?1) ORDER BY j.id"
            ),
            "SCAN j",
        ),
        (
            format!(
                "{JOB_SELECT} WHERE datasource_id = ?1 AND state IN ('queued', 'running')
                 ORDER BY id DESC LIMIT 1"
            ),
            "SCAN jobs",
        ),
        (
            "SELECT max(finished) FROM jobs WHERE datasource_id = ?1 AND state = 'succeeded'"
                .to_string(),
            "SCAN jobs",
        ),
        (
            format!(
                "{JOB_SELECT} WHERE datasource_id = ?1 AND kind IN ('sync')
                 ORDER BY created DESC, id DESC LIMIT 1"
            ),
            "SCAN jobs",
        ),
        (
            "SELECT id FROM alerts WHERE subject = ?1 AND kind = ?2 AND resolved IS NULL"
                .to_string(),
            "SCAN alerts",
        ),
    ];
    for (sql, bad) in &cases {
        let p = plan(&c, sql);
        assert!(
            !p.iter()
                .any(|l| l == bad || l.starts_with(&format!("{bad} "))),
            "{sql}\n{p:#?}"
        );
    }
}
