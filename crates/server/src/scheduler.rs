//! The scheduler: turns protection-group policies into jobs (initial replica,
//! synchronizations, recovery points, express fulls, consistency checks), runs the
//! server's own maintenance (prune, gc, verify), hands agent jobs out on their polls
//! within the concurrency limits, and fails jobs whose agent went silent.

use crate::state::AppState;
use protocol::{AgentJob, JobKind, ReplicaCreation, Severity, SyncFrequency, parse_time_of_day};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most recent moment at or before `now` when the clock showed `hhmm` (UTC).
fn last_occurrence(now: i64, hhmm: &str) -> Option<i64> {
    let m = parse_time_of_day(hhmm)? as i64 * 60;
    let day = now.div_euclid(86_400) * 86_400;
    let t = day + m;
    Some(if t <= now { t } else { t - 86_400 })
}

/// Whether a daily time came round since the schedule `key` last fired; records it.
fn due_daily(st: &AppState, key: &str, times: &[String], now: i64) -> Result<bool, catalog::Error> {
    let cat = st.cat();
    let Some(last) = cat.schedule_last(key)? else {
        // First look: start counting from now, never fire for times already past.
        cat.set_schedule_last(key, now)?;
        return Ok(false);
    };
    let due = times
        .iter()
        .filter_map(|t| last_occurrence(now, t))
        .any(|occ| occ > last);
    if due {
        cat.set_schedule_last(key, now)?;
    }
    Ok(due)
}

fn due_every(st: &AppState, key: &str, period: i64, now: i64) -> Result<bool, catalog::Error> {
    let cat = st.cat();
    let Some(last) = cat.schedule_last(key)? else {
        cat.set_schedule_last(key, now)?;
        return Ok(false);
    };
    let due = now - last >= period;
    if due {
        cat.set_schedule_last(key, now)?;
    }
    Ok(due)
}

/// One pass over every schedule. Cheap: a few indexed queries per data source.
pub fn tick(st: &Arc<AppState>) -> Result<(), catalog::Error> {
    let now = utc::now();
    let groups = st.cat().groups()?;
    for g in &groups {
        let p = &g.policy;
        for m in &g.members {
            let ds = st.cat().datasource(&m.datasource_id)?;
            if st.cat().active_job_for(&ds.id)?.is_some() {
                continue;
            }
            if !ds.present {
                let cat = st.cat();
                // Re-read under the lock this alert is raised with: an inventory may have
                // brought the VM back or moved it since, and would not resolve it again.
                let ds = cat.datasource(&ds.id)?;
                if ds.present {
                    continue;
                }
                st.notify.raise_alert(
                    &cat,
                    now,
                    Severity::Warning,
                    &ds.name,
                    "vm-missing",
                    &format!(
                        "{} is protected by group {:?} but its agent no longer reports it",
                        ds.name, g.name
                    ),
                )?;
                continue;
            }
            if ds.last_recovery_point.is_none() {
                let start = match &p.replica_creation {
                    ReplicaCreation::Now => true,
                    ReplicaCreation::At(t) => protocol::parse_utc_time(t).is_some_and(|t| now >= t),
                    ReplicaCreation::Manual => false,
                };
                if start {
                    st.queue(
                        now,
                        JobKind::InitialReplica,
                        Some(&ds.id),
                        "replica creation",
                    )?;
                }
                continue;
            }
            if ds.replica_state == protocol::ReplicaState::Inconsistent
                && p.consistency_check_when_inconsistent
            {
                st.queue(
                    now,
                    JobKind::ConsistencyCheck,
                    Some(&ds.id),
                    "replica inconsistent",
                )?;
                continue;
            }
            let rp_kind = match p.sync_frequency {
                SyncFrequency::JustBeforeRecoveryPoint => JobKind::ExpressFull,
                SyncFrequency::Minutes(_) => JobKind::Sync,
            };
            if due_daily(st, &format!("rp:{}", ds.id), &p.recovery_point_times, now)? {
                st.queue(now, rp_kind, Some(&ds.id), "recovery point schedule")?;
                continue;
            }
            if due_daily(st, &format!("ef:{}", ds.id), &p.express_full_times, now)? {
                st.queue(
                    now,
                    JobKind::ExpressFull,
                    Some(&ds.id),
                    "express full schedule",
                )?;
                continue;
            }
            if let Some(t) = &p.consistency_check_daily
                && due_daily(st, &format!("cc:{}", ds.id), std::slice::from_ref(t), now)?
            {
                st.queue(
                    now,
                    JobKind::ConsistencyCheck,
                    Some(&ds.id),
                    "daily consistency check",
                )?;
                continue;
            }
            if let SyncFrequency::Minutes(mins) = p.sync_frequency
                && due_every(st, &format!("sync:{}", ds.id), st.config.minutes(mins), now)?
            {
                st.queue(now, JobKind::Sync, Some(&ds.id), "synchronization schedule")?;
            }
        }
    }
    for g in &groups {
        if let Some(o) = &g.policy.online
            && due_daily(st, &format!("online:{}", g.name), &o.times, now)?
        {
            crate::online::queue_group(st, now, &g.name, "online schedule")?;
        }
    }
    let mt = &st.config.maintenance;
    for (kind, time) in [
        (JobKind::Prune, &mt.prune_time),
        (JobKind::Gc, &mt.gc_time),
        (JobKind::Verify, &mt.verify_time),
    ] {
        if let Some(t) = time.as_ref().filter(|t| !t.is_empty())
            && due_daily(st, kind.as_str(), std::slice::from_ref(t), now)?
        {
            st.queue(now, kind, None, "maintenance schedule")?;
        }
    }
    watchdog(st, now)?;
    run_server_jobs(st, now)?;
    space_alert(st, now)?;
    Ok(())
}

/// Fails running agent jobs not heard of within `job_timeout_seconds` (the agent is
/// gone), and jobs whose agent reports but whose figures and step have not moved for
/// `[jobs] stall_seconds` (the job is stuck). A failed job is no longer running, so
/// its agent's next report is refused (409) and the agent cancels it, undoing its view.
fn watchdog(st: &AppState, now: i64) -> Result<(), catalog::Error> {
    let limit = Duration::from_secs(st.config.scheduler.job_timeout_seconds);
    let stall = Duration::from_secs(st.config.jobs.stall_seconds);
    let beats: Vec<(i64, crate::state::Beat)> = locks::lock(&st.heartbeats)
        .iter()
        .map(|(id, b)| (*id, b.clone()))
        .collect();
    for (id, b) in beats {
        if b.heard.elapsed() > limit {
            st.job_failed(
                id,
                now,
                "agent-lost",
                &format!("the agent has not reported for {} seconds", limit.as_secs()),
            )?;
        } else if !stall.is_zero() && !b.server_busy && b.moved.elapsed() > stall {
            let job = st.cat().job(id)?;
            let [done, total, ..] = b.figures;
            let msg = format!(
                "{} made no progress for {} seconds while {} ({done} of {total} bytes done); the agent was told to cancel",
                job.vm.as_deref().unwrap_or("the job"),
                stall.as_secs(),
                b.step.as_deref().unwrap_or("starting"),
            );
            st.job_failed(id, now, "stalled", &msg)?;
        }
    }
    Ok(())
}

fn space_alert(st: &AppState, now: i64) -> Result<(), catalog::Error> {
    // Object storage: no fixed capacity, and no file system of the datastore's to
    // measure (the data dir's is not it).
    if st.datastore_url.is_some() {
        return Ok(());
    }
    let Some((free, total)) = crate::allocation::fs_space(&st.datastore_dir) else {
        return Ok(());
    };
    let cat = st.cat();
    let pct = st.config.limits.low_space_percent;
    if low_on_space(free, total, pct) {
        st.notify.raise_alert(
            &cat,
            now,
            Severity::Warning,
            "datastore",
            "space",
            &format!("the datastore's file system has {free} of {total} bytes free (under {pct}%)"),
        )?;
    } else {
        st.notify
            .resolve_alerts(&cat, now, "datastore", Some("space"))?;
    }
    Ok(())
}

/// Under `pct` percent free (0 = never).
fn low_on_space(free: u64, total: u64, pct: u8) -> bool {
    pct > 0 && total > 0 && u128::from(free) * 100 < u128::from(total) * u128::from(pct)
}

/// Picks this host's next runnable job within the limits and marks it running.
pub fn dispatch(st: &AppState, host: &str) -> Result<Option<AgentJob>, catalog::Error> {
    let now = utc::now();
    let cat = st.cat();
    let s = &st.config.scheduler;
    if cat.running_jobs()? >= s.max_jobs || cat.running_jobs_on_host(host)? >= s.max_jobs_per_host {
        return Ok(None);
    }
    for j in cat.runnable_jobs(now)? {
        if !j.kind.on_agent() {
            continue;
        }
        // A recovery runs on its target host, which may be another than the VM's.
        let stored = if j.kind == JobKind::Recovery {
            match crate::recovery_plan::stored(&cat, j.id) {
                Ok(s) if s.host == host => Some(s),
                Ok(_) => continue,
                Err(e) => {
                    drop(cat);
                    st.job_failed(j.id, now, "server", &e.to_string())?;
                    return Ok(None);
                }
            }
        } else if j.host.as_deref() != Some(host) {
            continue;
        } else {
            None
        };
        let (Some(ds), Some(vm)) = (j.datasource_id.clone(), j.vm.clone()) else {
            continue;
        };
        let recovery = match stored
            .map(|s| crate::recovery_plan::plan(st, &s))
            .transpose()
        {
            Ok(p) => p,
            Err(e) => {
                drop(cat);
                st.job_failed(j.id, now, "server", &e)?;
                return Ok(None);
            }
        };
        cat.start_job(now, j.id)?;
        cat.job_log(now, j.id, &format!("handed to agent {host}"))?;
        drop(cat);
        st.beat(j.id);
        return Ok(Some(AgentJob {
            job_id: j.id,
            kind: j.kind,
            vm,
            datasource_id: ds,
            recovery,
        }));
    }
    Ok(None)
}

/// Starts queued server-side jobs (verify, prune, gc), one at a time.
fn run_server_jobs(st: &Arc<AppState>, now: i64) -> Result<(), catalog::Error> {
    let running = st
        .cat()
        .jobs(Some(protocol::JobState::Running), 1000)?
        .iter()
        .any(|j| !j.kind.on_agent());
    if running {
        return Ok(());
    }
    let Some(j) = st
        .cat()
        .runnable_jobs(now)?
        .into_iter()
        .find(|j| !j.kind.on_agent())
    else {
        return Ok(());
    };
    st.cat().start_job(now, j.id)?;
    let st = st.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        let r = crate::maintenance::run(&st, j.id, j.kind);
        let now = utc::now();
        let res = match r {
            Ok(summary) => {
                let _ = st.cat().job_log(
                    now,
                    j.id,
                    &format!("{summary} in {:.1} s", started.elapsed().as_secs_f64()),
                );
                st.job_succeeded(j.id, now)
            }
            Err(e) => st.job_failed(j.id, now, "server", &e),
        };
        if let Err(e) = res {
            eprintln!(
                "holdfast server: job {}: recording the outcome failed: {e}",
                j.id
            );
        }
    });
    Ok(())
}

/// The scheduler's loop; runs until the process ends.
pub async fn run(st: Arc<AppState>) {
    let every = Duration::from_secs(st.config.scheduler.tick_seconds);
    loop {
        let s = st.clone();
        let t = Instant::now();
        let r = tokio::task::spawn_blocking(move || tick(&s)).await;
        *locks::lock(&st.last_tick) = Some(t.elapsed());
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("holdfast server: scheduler: {e}"),
            Err(e) => eprintln!("holdfast server: scheduler: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{last_occurrence, low_on_space};

    #[test]
    fn low_space_threshold() {
        assert!(low_on_space(4, 100, 5));
        assert!(!low_on_space(5, 100, 5));
        assert!(!low_on_space(0, 100, 0));
        assert!(!low_on_space(0, 0, 5));
        assert!(low_on_space(u64::MAX / 2, u64::MAX, 99));
    }

    #[test]
    fn occurrences() {
        let day = 20_000 * 86_400;
        assert_eq!(last_occurrence(day + 3600, "00:30"), Some(day + 1800));
        assert_eq!(
            last_occurrence(day + 3600, "02:00"),
            Some(day - 86_400 + 7200)
        );
        assert_eq!(last_occurrence(day + 7200, "02:00"), Some(day + 7200));
        assert_eq!(last_occurrence(day, "2:00"), None);
    }
}
