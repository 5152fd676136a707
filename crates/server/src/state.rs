//! What every request handler and the scheduler share: the catalog, the datastore, the
//! PKI, live ingest sessions, agent wake-ups; and the job outcomes (success, failure and
//! its rerun, alerts) that both the API and the scheduler apply.

use crate::config::Config;
use catalog::{Catalog, NewJob};
use datastore::{Datastore, Ingest};
use protocol::{JobKind, JobState, Severity};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::Notify;

/// Alert kinds a successful backup of the same data source clears.
pub const BACKUP_ALERTS: &[&str] = &[
    "backup-failed",
    "disk-missing",
    "disk-resized",
    "vm-missing",
    "io",
    "interrupted",
    "agent-lost",
    "server",
    "cancelled",
];

/// The addresses a job's end is e-mailed to (`notify:{job}`: a JSON list).
pub(crate) fn job_recipients(cat: &Catalog, key: &str) -> Result<Vec<String>, catalog::Error> {
    match cat.setting(key)? {
        Some(t) => serde_json::from_str(&t)
            .map_err(|e| catalog::Error::Corrupt(format!("setting {key}: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// The server's datastore, opened.
pub struct OpenStore {
    pub datastore: Arc<Datastore>,
    pub dir: std::path::PathBuf,
    /// The master key when the datastore is encrypted.
    pub master_key: Option<[u8; 32]>,
}

/// The watchdog's view of one running agent job.
#[derive(Debug, Clone)]
pub struct Beat {
    /// When any call of the job's agent was last seen.
    pub heard: Instant,
    /// When its figures or step last changed.
    pub moved: Instant,
    /// Bytes done, total, read and sent at `moved`.
    pub figures: [u64; 4],
    /// The step the agent last reported.
    pub step: Option<String>,
    /// The server is working on the job (commit), not the agent.
    pub server_busy: bool,
}

impl Beat {
    fn new(now: Instant) -> Beat {
        Beat {
            heard: now,
            moved: now,
            figures: [0; 4],
            step: None,
            server_busy: false,
        }
    }
}

pub struct AppState {
    pub config: Config,
    catalog: Mutex<Catalog>,
    pub datastore: Arc<Datastore>,
    pub datastore_dir: std::path::PathBuf,
    /// The datastore's URL when it is on object storage (`--datastore-url`).
    pub datastore_url: Option<String>,
    /// The datastore's master key when encrypted (agents build blobs with it).
    pub master_key: Option<[u8; 32]>,
    pub pki: pki::ServerPki,
    pub admin_token: String,
    /// Ingest sessions of running agent jobs, by job id.
    pub sessions: Mutex<HashMap<i64, Arc<Ingest>>>,
    /// What each running recovery job may read (built at its first blob request).
    pub recoveries: Mutex<HashMap<i64, Arc<crate::caches::Access>>>,
    /// Recovery-point disks opened for browsing and block reads.
    pub open_disks: crate::caches::OpenDisks,
    /// What the watchdog knows of each running agent job.
    pub heartbeats: Mutex<HashMap<i64, Beat>>,
    /// Wakes agents' long polls when jobs are queued.
    pub wake: Notify,
    /// Notified whenever a job ends (`GET /jobs/{id}?wait_seconds=N` waits on it).
    pub job_ended: Notify,
    /// Hosts with a poll in progress (for `agents list`'s "connected").
    pub polling: Mutex<HashMap<String, Instant>>,
    pub threads: usize,
    /// Duration of the scheduler's last pass (reported by /status; benchmarked).
    pub last_tick: Mutex<Option<std::time::Duration>>,
    /// Alert and job notifications; every alert is raised through it.
    pub notify: crate::notify::Notifier,
    /// Storage targets' secrets (`DIR/secrets/NAME.secret`, mode 0600).
    pub secrets: pki::SecretStore,
    /// Storage targets' online datastores opened so far.
    pub online: crate::caches::OnlineStores,
}

/// The server's own keys and the secrets it keeps for others.
pub struct ServerKeys {
    pub pki: pki::ServerPki,
    pub admin_token: String,
    pub secrets: pki::SecretStore,
}

impl AppState {
    pub fn new(
        config: Config,
        catalog: Catalog,
        store: OpenStore,
        keys: ServerKeys,
        threads: usize,
        notify: crate::notify::Notifier,
    ) -> AppState {
        AppState {
            config,
            catalog: Mutex::new(catalog),
            datastore: store.datastore,
            datastore_dir: store.dir,
            datastore_url: None,
            master_key: store.master_key,
            pki: keys.pki,
            admin_token: keys.admin_token,
            sessions: Mutex::new(HashMap::new()),
            recoveries: Mutex::new(HashMap::new()),
            open_disks: crate::caches::OpenDisks::default(),
            heartbeats: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            job_ended: Notify::new(),
            polling: Mutex::new(HashMap::new()),
            threads,
            last_tick: Mutex::new(None),
            notify,
            secrets: keys.secrets,
            online: crate::caches::OnlineStores::default(),
        }
    }

    /// The catalog; hold the guard briefly. SQLite blocks: call this on a blocking
    /// thread only (handlers go through `AppState::catalog` and `AppState::offload`).
    pub fn cat(&self) -> MutexGuard<'_, Catalog> {
        locks::lock(&self.catalog)
    }

    /// The job's agent was heard of.
    pub fn beat(&self, job: i64) {
        let now = Instant::now();
        locks::lock(&self.heartbeats)
            .entry(job)
            .and_modify(|b| b.heard = now)
            .or_insert_with(|| Beat::new(now));
    }

    /// The job's agent reported `p`: the job has moved if its figures or step did.
    pub fn progressed(&self, job: i64, p: &protocol::JobProgress) {
        let now = Instant::now();
        let mut beats = locks::lock(&self.heartbeats);
        let b = beats.entry(job).or_insert_with(|| Beat::new(now));
        b.heard = now;
        let figures = [p.bytes_done, p.bytes_total, p.bytes_read, p.bytes_sent];
        // Bounded: it ends up in an alert.
        let step: Option<String> = p
            .step
            .as_ref()
            .map(|s| protocol::cap_chars(s, protocol::MAX_STEP_CHARS).into_owned());
        if figures != b.figures || step != b.step {
            b.figures = figures;
            b.step = step;
            b.moved = now;
        }
    }

    /// The server itself is busy with the job (committing its recovery point): the
    /// agent waits, so its figures standing still is no stall.
    pub fn server_busy(&self, job: i64, busy: bool) {
        let now = Instant::now();
        let mut beats = locks::lock(&self.heartbeats);
        let b = beats.entry(job).or_insert_with(|| Beat::new(now));
        b.server_busy = busy;
        b.moved = now;
    }

    fn forget_job(&self, job: i64) {
        locks::lock(&self.heartbeats).remove(&job);
        locks::lock(&self.recoveries).remove(&job);
        // Dropping the session aborts it: staged packs go, nothing becomes visible.
        locks::lock(&self.sessions).remove(&job);
    }

    /// Records that `job`'s end is e-mailed to `to` (added to earlier recipients).
    pub fn notify_job(&self, job: i64, to: &[String]) -> Result<(), catalog::Error> {
        if to.is_empty() {
            return Ok(());
        }
        let cat = self.cat();
        let key = format!("notify:{job}");
        let mut all = job_recipients(&cat, &key)?;
        for a in to {
            if !all.contains(a) {
                all.push(a.clone());
            }
        }
        let text = serde_json::to_string(&all)
            .map_err(|e| catalog::Error::Invalid(format!("{key}: {e}")))?;
        cat.set_setting(&key, &text)?;
        // An existing job may have ended in between: tell now.
        if cat.job(job)?.state.finished() {
            self.job_ended_notify(&cat, job);
        }
        Ok(())
    }

    /// After a job ended: e-mails its summary to whoever asked (once). A problem here
    /// is logged, never fails the job's bookkeeping.
    fn job_ended_notify(&self, cat: &Catalog, job: i64) {
        let key = format!("notify:{job}");
        let r = (|| {
            let to = job_recipients(cat, &key)?;
            if !to.is_empty() {
                cat.delete_setting(&key)?;
                self.notify.job_finished(&cat.job(job)?, to);
            }
            Ok::<(), catalog::Error>(())
        })();
        if let Err(e) = r {
            eprintln!("holdfast server: notify: job {job}: {e}");
        }
    }

    /// Records a success: the job, the replica state, and alerts the success clears.
    pub fn job_succeeded(&self, job: i64, now: i64) -> Result<(), catalog::Error> {
        self.forget_job(job);
        let cat = self.cat();
        cat.delete_setting(&format!("cancel:{job}"))?;
        let info = cat.job(job)?;
        cat.finish_job(now, job, JobState::Succeeded, None)?;
        cat.job_log(now, job, "succeeded")?;
        self.job_ended.notify_waiters();
        self.job_ended_notify(&cat, job);
        if info.kind == JobKind::Recovery {
            // A recovery changes nothing of the data source's protection.
            if let Some(vm) = &info.vm {
                self.notify
                    .resolve_alerts(&cat, now, vm, Some("recovery-failed"))?;
            }
            return Ok(());
        }
        if let Some(ds) = &info.datasource_id {
            cat.set_replica_state(ds, protocol::ReplicaState::Ok)?;
            if let Some(vm) = &info.vm {
                for k in BACKUP_ALERTS {
                    self.notify.resolve_alerts(&cat, now, vm, Some(k))?;
                }
            }
        } else {
            self.notify.resolve_alerts(
                &cat,
                now,
                "datastore",
                Some(&format!("{}-failed", info.kind.as_str())),
            )?;
            self.notify
                .resolve_alerts(&cat, now, "datastore", Some("interrupted"))?;
        }
        Ok(())
    }

    /// Records a failure: alert with the reason, replica state, and the rerun (MABS
    /// auto-rerun) unless the job was cancelled or ran out of attempts. A resized or
    /// changed disk makes the replica inconsistent: a consistency check runs instead.
    pub fn job_failed(
        &self,
        job: i64,
        now: i64,
        kind: &str,
        message: &str,
    ) -> Result<(), catalog::Error> {
        self.forget_job(job);
        let cat = self.cat();
        cat.delete_setting(&format!("cancel:{job}"))?;
        let info = cat.job(job)?;
        if info.state.finished() {
            return Ok(());
        }
        let cancelled = kind == "cancelled";
        let state = if cancelled {
            JobState::Cancelled
        } else {
            JobState::Failed
        };
        cat.finish_job(now, job, state, Some((kind, message)))?;
        cat.job_log(now, job, &format!("{}: {message}", state.as_str()))?;
        self.job_ended.notify_waiters();
        self.job_ended_notify(&cat, job);
        if cancelled {
            return Ok(());
        }
        let subject = info
            .vm
            .as_ref()
            .map_or_else(|| "datastore".to_string(), |v| v.to_string());
        if info.kind == JobKind::Recovery {
            // Never rerun, and no backup alert: the data source's state is untouched.
            self.notify.raise_alert(
                &cat,
                now,
                Severity::Error,
                &subject,
                "recovery-failed",
                &format!("recovery job {job} failed: {message}"),
            )?;
            return Ok(());
        }
        let alert_kind = match kind {
            "disk-missing" | "disk-resized" | "vm-missing" | "interrupted" | "agent-lost" => {
                kind.to_string()
            }
            "stalled" => "job-stalled".to_string(),
            _ if info.datasource_id.is_none() => format!("{}-failed", info.kind.as_str()),
            _ => "backup-failed".to_string(),
        };
        self.notify.raise_alert(
            &cat,
            now,
            Severity::Error,
            &subject,
            &alert_kind,
            &format!("{} job {job} failed: {message}", info.kind.as_str()),
        )?;
        let Some(ds) = info.datasource_id.clone() else {
            return Ok(());
        };
        let policy = cat
            .group_of(&ds)?
            .and_then(|g| cat.group(&g).ok())
            .map(|g| g.policy);
        if kind == "disk-resized" {
            cat.set_replica_state(&ds, protocol::ReplicaState::Inconsistent)?;
            if policy
                .as_ref()
                .is_some_and(|p| p.consistency_check_when_inconsistent)
            {
                let id = cat.add_job(
                    now,
                    &NewJob {
                        kind: JobKind::ConsistencyCheck,
                        datasource_id: Some(ds),
                        trigger: format!("replica inconsistent after job {job}"),
                        not_before: None,
                        attempt: 1,
                        rerun_of: Some(job),
                    },
                )?;
                cat.job_log(now, id, "queued: the replica is inconsistent")?;
                drop(cat);
                self.wake.notify_waiters();
            }
            return Ok(());
        }
        if info.attempt < self.config.scheduler.max_attempts {
            let at = now + self.config.scheduler.rerun_delay_seconds as i64;
            let id = cat.add_job(
                now,
                &NewJob {
                    kind: info.kind,
                    datasource_id: Some(ds),
                    trigger: format!("rerun of {job}"),
                    not_before: Some(at),
                    attempt: info.attempt + 1,
                    rerun_of: Some(job),
                },
            )?;
            cat.job_log(
                now,
                id,
                &format!(
                    "queued: rerun {} of {} after job {job} failed",
                    info.attempt + 1,
                    self.config.scheduler.max_attempts
                ),
            )?;
        }
        Ok(())
    }

    /// Queues a job unless the data source already has one queued or running; returns
    /// the job id (the existing one when there was one).
    pub fn queue(
        &self,
        now: i64,
        kind: JobKind,
        datasource_id: Option<&str>,
        trigger: &str,
    ) -> Result<(i64, bool), catalog::Error> {
        let cat = self.cat();
        if let Some(ds) = datasource_id
            && let Some(j) = cat.active_job_for(ds)?
        {
            return Ok((j.id, false));
        }
        let id = add_job(&cat, now, kind, datasource_id, trigger)?;
        drop(cat);
        self.wake.notify_waiters();
        Ok((id, true))
    }
}

/// Adds a first attempt of a job, queued now, with its first log line.
pub fn add_job(
    cat: &Catalog,
    now: i64,
    kind: JobKind,
    datasource_id: Option<&str>,
    trigger: &str,
) -> Result<i64, catalog::Error> {
    let id = cat.add_job(
        now,
        &NewJob {
            kind,
            datasource_id: datasource_id.map(str::to_string),
            trigger: trigger.to_string(),
            not_before: None,
            attempt: 1,
            rerun_of: None,
        },
    )?;
    cat.job_log(now, id, &format!("queued ({trigger})"))?;
    Ok(id)
}
