//! Times the catalog's list queries on a busy server's worth of rows: 200 data sources,
//! 10,000 jobs, 10,000 recovery points. Filled in memory, then snapshotted to a file so
//! the timings are of a real on-disk (page-cached) database.
//!
//! `cargo run --release -p catalog --example catalog_scale`

use std::time::Instant;

use catalog::{Catalog, NewJob};
use protocol::{
    Consistency, JobKind, JobState, Policy, RecoveryPointInfo, Stats, SyncFrequency, VmDisk, VmInfo,
};

const BASE: i64 = 1_780_000_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem = Catalog::open_in_memory()?;
    let t = Instant::now();
    let mut ids = Vec::new();
    for h in 0..20 {
        let host = format!("h{h:02}");
        let vms: Vec<VmInfo> = (0..10)
            .map(|v| VmInfo {
                name: format!("vm{v}"),
                vm_id: Some(format!("uuid-{h}-{v}")),
                provider: protocol::ProviderKind::Qemu,
                disks: vec![VmDisk {
                    name: "d.qcow2".into(),
                    format: "qcow2".into(),
                    virtual_size: 1 << 30,
                }],
                running: Some(true),
            })
            .collect();
        mem.upsert_inventory(BASE, &host, &vms)?;
        for v in 0..10 {
            let d = mem.datasource_by_name(&host, &format!("vm{v}"))?;
            ids.push((d.id, d.name.to_string()));
        }
    }
    let policy = Policy::daily_at(14, SyncFrequency::Minutes(60), "20:00");
    for g in 0..4 {
        let members: Vec<String> = ids
            .iter()
            .skip(g)
            .step_by(4)
            .map(|(_, n)| n.clone())
            .collect();
        mem.create_group(BASE, &format!("g{g}"), &policy, &members)?;
    }
    let mut rps = Vec::new();
    for (i, (ds, name)) in ids.iter().enumerate() {
        for k in 0..50i64 {
            let unix = BASE + k * 3600 + i as i64;
            rps.push(RecoveryPointInfo {
                id: format!("{ds}-{k:03}"),
                vm: name.clone(),
                datasource_id: ds.clone(),
                created: utc::rfc3339(unix),
                created_unix: unix,
                consistency: Consistency::CrashConsistent,
                base: None,
                disks: vec![],
                stats: Stats::default(),
                job_id: None,
                volumes: None,
                locations: vec!["disk".into()],
            });
        }
    }
    mem.replace_recovery_points(&rps)?;
    for k in 0..50i64 {
        for (i, (ds, _)) in ids.iter().enumerate() {
            let now = BASE + k * 3600 + i as i64;
            let id = mem.add_job(
                now,
                &NewJob {
                    kind: JobKind::Sync,
                    datasource_id: Some(ds.clone()),
                    trigger: "schedule".into(),
                    not_before: None,
                    attempt: 1,
                    rerun_of: None,
                },
            )?;
            if k < 49 {
                mem.start_job(now + 1, id)?;
                mem.finish_job(now + 60, id, JobState::Succeeded, None)?;
            }
        }
    }
    println!("fill: {:?}", t.elapsed());

    let dir = std::env::temp_dir().join(format!("catalog-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("catalog.db");
    mem.snapshot_to(&path)?;
    let c = Catalog::open(&path)?;
    let ds = &ids[77].0;

    macro_rules! time {
        ($name:expr, $e:expr) => {{
            let mut best = std::time::Duration::MAX;
            let mut n = 0;
            for _ in 0..20 {
                let t = Instant::now();
                n = $e?.len();
                best = best.min(t.elapsed());
            }
            println!("{:<40} {:>6} rows  best of 20: {:?}", $name, n, best);
        }};
    }
    time!("datasources()", c.datasources());
    time!("groups()", c.groups());
    time!("recovery_points(None)", c.recovery_points(None));
    time!("recovery_points(Some(ds))", c.recovery_points(Some(ds)));
    time!("jobs(None, 100)", c.jobs(None, 100));
    time!(
        "jobs(Some(Queued), 1000)",
        c.jobs(Some(JobState::Queued), 1000)
    );
    time!("runnable_jobs(now)", c.runnable_jobs(BASE + 1_000_000));
    time!("alerts(true)", c.alerts(true));
    time!(
        "active_job_for(ds)",
        c.active_job_for(ds)
            .map(|o| o.into_iter().collect::<Vec<_>>())
    );
    time!(
        "last_success_unix(ds)",
        c.last_success_unix(ds)
            .map(|o| o.into_iter().collect::<Vec<_>>())
    );
    time!("counts()", c.counts().map(|x| vec![x]));
    drop(c);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
