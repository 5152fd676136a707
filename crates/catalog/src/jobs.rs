//! Jobs: the queue the scheduler feeds and the history operators read.

use protocol::{JobInfo, JobKind, JobLogLine, JobProgress, JobState};
use rusqlite::params;
use serde::Serialize;

use crate::{Catalog, Cols, Error, Result, sql_u64};

/// What the scheduler needs to queue a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub kind: JobKind,
    /// `None` for server jobs (verify, prune, gc).
    pub datasource_id: Option<String>,
    /// `schedule`, `admin`, `rerun of N`.
    pub trigger: String,
    /// Earliest start (reruns wait), Unix seconds.
    pub not_before: Option<i64>,
    /// 1 for the first run.
    pub attempt: u32,
    pub rerun_of: Option<i64>,
}

/// Which jobs [`Catalog::jobs_where`] lists (`None` = any).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    pub kind: Option<JobKind>,
    /// `HOST/VM` as recorded when the job was queued.
    pub vm: Option<String>,
}

/// A job as the dispatcher sees it, with its data source's *current* location (a VM
/// that moved since the job was queued runs on its new host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub kind: JobKind,
    pub datasource_id: Option<String>,
    /// The host the data source is on now.
    pub host: Option<String>,
    /// The VM's name on that host (not `HOST/VM`).
    pub vm: Option<String>,
    pub attempt: u32,
}

/// A job's log keeps at most this many lines ...
pub const MAX_JOB_LOG_LINES: usize = 2000;
/// ... and this many bytes of messages.
pub const MAX_JOB_LOG_BYTES: usize = 1 << 20;
/// The first lines of a log that always stay (at most this many, and at most
/// [`JOB_LOG_HEAD_BYTES`]).
pub const JOB_LOG_HEAD_LINES: usize = 100;
pub const JOB_LOG_HEAD_BYTES: usize = 64 << 10;

const MARKER_START: &str = "… ";
const MARKER_END: &str = " lines left out";

/// The number of lines a marker line `… N lines left out` stands for.
fn dropped_count(message: &str) -> Option<u64> {
    let n = message
        .strip_prefix(MARKER_START)?
        .strip_suffix(MARKER_END)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

pub(crate) const JOB_SELECT: &str =
    "SELECT id, kind, state, vm, datasource_id, trigger, created, started,
    finished, bytes_done, bytes_total, bytes_read, bytes_sent, recovery_point, error, attempt,
    not_before FROM jobs";

pub(crate) const JOB_ROW_SELECT: &str =
    "SELECT j.id, j.kind, j.datasource_id, d.host, d.vm, j.attempt
    FROM jobs j LEFT JOIN datasources d ON d.id = j.datasource_id";

fn kind(r: &Cols, i: usize) -> Result<JobKind> {
    r.word(i, "jobs.kind", JobKind::parse)
}

fn state(r: &Cols, i: usize) -> Result<JobState> {
    r.word(i, "jobs.state", JobState::parse)
}

/// Seconds a job has run: since its start, to now or to its end; `None` before a
/// whole second has passed (or unstarted).
fn run_seconds(started: Option<i64>, finished: Option<i64>) -> Option<u64> {
    let start = started?;
    let end = finished.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(start)
    });
    u64::try_from(end.saturating_sub(start))
        .ok()
        .filter(|&s| s > 0)
}

/// Bytes per second over `secs`; none before any byte.
fn rate(bytes: u64, secs: Option<u64>) -> Option<u64> {
    secs.filter(|_| bytes > 0).map(|s| bytes / s)
}

/// Time left of a running job at the pace so far: the seconds run times the share of
/// `total` not yet done over the share done.
fn eta(secs: Option<u64>, finished: bool, done: u64, total: u64) -> Option<u64> {
    let secs = secs?;
    if finished || done == 0 || total <= done {
        return None;
    }
    let left = (secs as u128 * (total - done) as u128).div_ceil(done as u128);
    Some(u64::try_from(left).unwrap_or(u64::MAX))
}

fn job_info(r: &Cols) -> Result<JobInfo> {
    let kind = kind(r, 1)?;
    let started = r.get(7, "jobs.started")?;
    let finished: Option<i64> = r.get(8, "jobs.finished")?;
    let done = r.u64(9, "jobs.bytes_done")?;
    let total = r.u64(10, "jobs.bytes_total")?;
    let read = r.u64(11, "jobs.bytes_read")?;
    let secs = run_seconds(started, finished);
    // A recovery's pace is what it fetches (what --throttle limits): the disk bytes it
    // writes count holes, which are never fetched. Both are reported, apart.
    let recovery = kind == JobKind::Recovery;
    Ok(JobInfo {
        rate_bytes_per_sec: rate(if recovery { read } else { done }, secs),
        eta_seconds: eta(secs, finished.is_some(), done, total),
        bytes_fetched: recovery.then_some(read),
        bytes_written: recovery.then_some(done),
        write_rate_bytes_per_sec: if recovery { rate(done, secs) } else { None },
        id: r.get(0, "jobs.id")?,
        kind,
        state: state(r, 2)?,
        vm: r.opt_name(3, "jobs.vm")?,
        datasource_id: r.get(4, "jobs.datasource_id")?,
        trigger: r.get(5, "jobs.trigger")?,
        created: r.time(6, "jobs.created")?,
        started: r.opt_time(7, "jobs.started")?,
        finished: r.opt_time(8, "jobs.finished")?,
        bytes_done: done,
        bytes_total: total,
        bytes_read: read,
        bytes_sent: r.u64(12, "jobs.bytes_sent")?,
        recovery_point: r.get(13, "jobs.recovery_point")?,
        error: r.get(14, "jobs.error")?,
        attempt: r.u32(15, "jobs.attempt")?,
        not_before: r.opt_time(16, "jobs.not_before")?,
        log: Vec::new(),
    })
}

fn job_row(r: &Cols) -> Result<JobRow> {
    Ok(JobRow {
        id: r.get(0, "jobs.id")?,
        kind: kind(r, 1)?,
        datasource_id: r.get(2, "jobs.datasource_id")?,
        host: r.get(3, "datasources.host")?,
        vm: r.get(4, "datasources.vm")?,
        attempt: r.u32(5, "jobs.attempt")?,
    })
}

fn not_found(id: i64) -> Error {
    Error::NotFound(format!("job {id}"))
}

impl Catalog {
    /// Queues a job. `vm` is recorded as the data source's `HOST/VM` now, so the history
    /// shows where the job ran even after the VM moves.
    pub fn add_job(&self, now: i64, j: &NewJob) -> Result<i64> {
        let vm = match &j.datasource_id {
            Some(ds) => Some(
                self.one(
                    "SELECT host || '/' || vm FROM datasources WHERE id = ?1",
                    [ds],
                    |r| r.get::<String>(0, "datasources.vm"),
                )?
                .ok_or_else(|| Error::NotFound(format!("data source {ds:?}")))?,
            ),
            None => None,
        };
        self.conn.execute(
            "INSERT INTO jobs (kind, state, datasource_id, vm, trigger, created, not_before,
                 attempt, rerun_of)
             VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                j.kind.as_str(),
                j.datasource_id,
                vm,
                j.trigger,
                now,
                j.not_before,
                j.attempt,
                j.rerun_of
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// One job with its log.
    pub fn job(&self, id: i64) -> Result<JobInfo> {
        let mut job = self
            .one(&format!("{JOB_SELECT} WHERE id = ?1"), [id], job_info)?
            .ok_or_else(|| not_found(id))?;
        job.log = self.all(
            "SELECT time, message FROM job_log WHERE job_id = ?1 ORDER BY id",
            [id],
            |r| {
                Ok(JobLogLine {
                    time: r.time(0, "job_log.time")?,
                    message: r.get(1, "job_log.message")?,
                })
            },
        )?;
        Ok(job)
    }

    /// The newest `limit` jobs (in `state`, if given), newest first, without logs.
    pub fn jobs(&self, state: Option<JobState>, limit: u32) -> Result<Vec<JobInfo>> {
        self.jobs_where(
            &JobFilter {
                state,
                ..JobFilter::default()
            },
            limit,
        )
    }

    /// The newest `limit` jobs that match every condition of `f`, newest first,
    /// without logs (the recovery history of a VM: kind recovery, its `HOST/VM`).
    pub fn jobs_where(&self, f: &JobFilter, limit: u32) -> Result<Vec<JobInfo>> {
        // Each condition compares with its parameter, or is true when that is NULL.
        self.all(
            &format!(
                "{JOB_SELECT} WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR kind = ?2)
                 AND (?3 IS NULL OR vm = ?3) ORDER BY id DESC LIMIT ?4"
            ),
            params![
                f.state.map(|s| s.as_str()),
                f.kind.map(|k| k.as_str()),
                f.vm.as_deref(),
                limit
            ],
            job_info,
        )
    }

    /// Queued jobs whose `not_before` has come, oldest first.
    pub fn runnable_jobs(&self, now: i64) -> Result<Vec<JobRow>> {
        self.all(
            &format!(
                "{JOB_ROW_SELECT} WHERE j.state = 'queued'
                 AND (j.not_before IS NULL OR j.not_before <= ?1) ORDER BY j.id"
            ),
            [now],
            job_row,
        )
    }

    /// The queued or running job of a data source (at most one is expected; the newest
    /// is returned).
    pub fn active_job_for(&self, datasource_id: &str) -> Result<Option<JobInfo>> {
        self.one(
            &format!(
                "{JOB_SELECT} WHERE datasource_id = ?1 AND state IN ('queued', 'running')
                 ORDER BY id DESC LIMIT 1"
            ),
            [datasource_id],
            job_info,
        )
    }

    /// queued → running. Conflict if the job is not queued (already taken, cancelled).
    pub fn start_job(&self, now: i64, id: i64) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE jobs SET state = 'running', started = ?2 WHERE id = ?1 AND state = 'queued'",
            params![id, now],
        )?;
        if n == 0 {
            let s = self.job_state(id)?;
            return Err(Error::Conflict(format!(
                "job {id} is {}, not queued",
                s.as_str()
            )));
        }
        Ok(())
    }

    /// Ends a queued or running job in a finished state; `error` is `(kind, message)`.
    pub fn finish_job(
        &self,
        now: i64,
        id: i64,
        state: JobState,
        error: Option<(&str, &str)>,
    ) -> Result<()> {
        if !state.finished() {
            return Err(Error::Invalid(format!(
                "{} is not a finished job state",
                state.as_str()
            )));
        }
        let (kind, msg) = error.unzip();
        let msg = msg.map(|m| protocol::cap_chars(m, protocol::MAX_MESSAGE_CHARS));
        let n = self.conn.execute(
            "UPDATE jobs SET state = ?2, finished = ?3, error_kind = ?4, error = ?5
             WHERE id = ?1 AND state IN ('queued', 'running')",
            params![id, state.as_str(), now, kind, msg],
        )?;
        if n == 0 {
            let s = self.job_state(id)?;
            return Err(Error::Conflict(format!(
                "job {id} is already {}",
                s.as_str()
            )));
        }
        Ok(())
    }

    pub fn set_job_progress(&self, id: i64, p: &JobProgress) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE jobs SET bytes_done = ?2, bytes_total = ?3, bytes_read = ?4, bytes_sent = ?5
             WHERE id = ?1",
            params![
                id,
                sql_u64(p.bytes_done),
                sql_u64(p.bytes_total),
                sql_u64(p.bytes_read),
                sql_u64(p.bytes_sent)
            ],
        )?;
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    pub fn set_job_recovery_point(&self, id: i64, rp: &str) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE jobs SET recovery_point = ?2 WHERE id = ?1",
            params![id, rp],
        )?;
        if n == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    /// Appends a line to a job's log: cut to [`protocol::MAX_MESSAGE_CHARS`]; a log
    /// past [`MAX_JOB_LOG_LINES`] or [`MAX_JOB_LOG_BYTES`] drops its oldest lines
    /// after the first ones (see [`Catalog::trim_job_log`]).
    pub fn job_log(&self, now: i64, id: i64, message: &str) -> Result<()> {
        if !self.exists("SELECT 1 FROM jobs WHERE id = ?1", [id])? {
            return Err(not_found(id));
        }
        let mut message = protocol::cap_chars(message, protocol::MAX_MESSAGE_CHARS);
        // Only the catalog writes the marker: a line that looks like one is reworded.
        if dropped_count(&message).is_some() {
            message = format!("...{}", message.strip_prefix('…').unwrap_or(&message)).into();
        }
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO job_log (job_id, time, message) VALUES (?1, ?2, ?3)",
            params![id, now, message],
        )?;
        self.trim_job_log(id)?;
        tx.commit()?;
        Ok(())
    }

    /// Keeps a job's log within [`MAX_JOB_LOG_LINES`] lines and [`MAX_JOB_LOG_BYTES`]
    /// bytes: the first lines (up to [`JOB_LOG_HEAD_LINES`], how the job began) and
    /// the newest (why it ended) stay; the lines between give way, oldest first, to
    /// one marker line `… N lines left out` in their place.
    fn trim_job_log(&self, id: i64) -> Result<()> {
        let (lines, bytes) = self
            .one(
                "SELECT count(*), coalesce(sum(octet_length(message)), 0) FROM job_log
                 WHERE job_id = ?1",
                [id],
                |r| Ok((r.u64(0, "job_log")?, r.u64(1, "job_log.message")?)),
            )?
            .unwrap_or((0, 0));
        if lines <= MAX_JOB_LOG_LINES as u64 && bytes <= MAX_JOB_LOG_BYTES as u64 {
            return Ok(());
        }
        // (id, bytes, lines an existing marker stands for)
        let rows = self.all(
            "SELECT id, octet_length(message),
                 CASE WHEN substr(message, 1, 2) = '… ' THEN message END
             FROM job_log WHERE job_id = ?1 ORDER BY id",
            [id],
            |r| {
                let text: Option<String> = r.get(2, "job_log.message")?;
                Ok((
                    r.get::<i64>(0, "job_log.id")?,
                    r.u64(1, "job_log.message")?,
                    text.as_deref().and_then(dropped_count),
                ))
            },
        )?;
        let marker = rows.iter().position(|r| r.2.is_some());
        // The head: the lines before the marker, or the first ones when there is none.
        let head_len = marker.unwrap_or_else(|| {
            let mut sum = 0u64;
            rows.iter()
                .take(JOB_LOG_HEAD_LINES)
                .take_while(|r| {
                    sum = sum.saturating_add(r.1);
                    sum <= JOB_LOG_HEAD_BYTES as u64
                })
                .count()
        });
        let head_bytes: u64 = rows.iter().take(head_len).map(|r| r.1).sum();
        let tail_from = head_len + usize::from(marker.is_some());
        let tail = rows.get(tail_from..).unwrap_or_default();
        // Room for the tail: what the head and the marker (at most ~40 bytes) leave.
        let max_lines = MAX_JOB_LOG_LINES.saturating_sub(head_len + 1);
        let max_bytes = (MAX_JOB_LOG_BYTES as u64).saturating_sub(head_bytes + 64);
        let mut tail_bytes: u64 = tail.iter().map(|r| r.1).sum();
        let mut drop_n = 0usize;
        // The newest line always stays.
        while drop_n + 1 < tail.len() && (tail.len() - drop_n > max_lines || tail_bytes > max_bytes)
        {
            tail_bytes = tail_bytes.saturating_sub(tail[drop_n].1);
            drop_n += 1;
        }
        if drop_n == 0 {
            return Ok(());
        }
        let (marker_id, before, gone) = match marker {
            Some(m) => (rows[m].0, rows[m].2.unwrap_or(0), &tail[..drop_n]),
            // The first dropped line becomes the marker, so it sits where they were.
            None => (tail[0].0, 0, &tail[1..drop_n]),
        };
        let total = before.saturating_add(drop_n as u64);
        self.conn.execute(
            "UPDATE job_log SET message = ?2 WHERE id = ?1",
            params![marker_id, format!("{MARKER_START}{total}{MARKER_END}")],
        )?;
        let mut del = self
            .conn
            .prepare_cached("DELETE FROM job_log WHERE id = ?1")?;
        for r in gone {
            del.execute([r.0])?;
        }
        Ok(())
    }

    /// At server start: every job still `running` was cut off by the restart. They fail
    /// (error kind `interrupted`, `reason` logged) and are returned for rerunning.
    pub fn fail_interrupted_jobs(&self, now: i64, reason: &str) -> Result<Vec<JobRow>> {
        let tx = self.conn.unchecked_transaction()?;
        let rows = self.all(
            &format!("{JOB_ROW_SELECT} WHERE j.state = 'running' ORDER BY j.id"),
            [],
            job_row,
        )?;
        for r in &rows {
            tx.execute(
                "UPDATE jobs SET state = 'failed', finished = ?2, error_kind = 'interrupted',
                     error = ?3 WHERE id = ?1",
                params![r.id, now, reason],
            )?;
            tx.execute(
                "INSERT INTO job_log (job_id, time, message) VALUES (?1, ?2, ?3)",
                params![r.id, now, reason],
            )?;
        }
        tx.commit()?;
        Ok(rows)
    }

    pub fn job_state(&self, id: i64) -> Result<JobState> {
        self.one("SELECT state FROM jobs WHERE id = ?1", [id], |r| {
            state(r, 0)
        })?
        .ok_or_else(|| not_found(id))
    }

    /// Running jobs of data sources now on `host` (for per-agent concurrency limits).
    pub fn running_jobs_on_host(&self, host: &str) -> Result<u32> {
        self.one(
            "SELECT count(*) FROM jobs j JOIN datasources d ON d.id = j.datasource_id
             WHERE j.state = 'running' AND d.host = ?1",
            [host],
            |r| r.u32(0, "jobs"),
        )
        .map(|n| n.unwrap_or(0))
    }

    pub fn running_jobs(&self) -> Result<u32> {
        self.one(
            "SELECT count(*) FROM jobs WHERE state = 'running'",
            [],
            |r| r.u32(0, "jobs"),
        )
        .map(|n| n.unwrap_or(0))
    }

    /// The newest job of a data source of one of `kinds` (any kind if empty).
    pub fn last_job(&self, datasource_id: &str, kinds: &[JobKind]) -> Result<Option<JobInfo>> {
        let mut sql = format!("{JOB_SELECT} WHERE datasource_id = ?1");
        if !kinds.is_empty() {
            let list: Vec<String> = kinds.iter().map(|k| format!("'{}'", k.as_str())).collect();
            sql.push_str(&format!(" AND kind IN ({})", list.join(", ")));
        }
        sql.push_str(" ORDER BY created DESC, id DESC LIMIT 1");
        self.one(&sql, [datasource_id], job_info)
    }

    /// When the newest succeeded job of a data source finished (Unix seconds).
    pub fn last_success_unix(&self, datasource_id: &str) -> Result<Option<i64>> {
        self.one(
            "SELECT max(finished) FROM jobs WHERE datasource_id = ?1 AND state = 'succeeded'",
            [datasource_id],
            |r| r.get::<Option<i64>>(0, "jobs.finished"),
        )
        .map(Option::flatten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn rate_and_eta_follow_bytes_and_time() {
        // Finished: rate over the job's run, no ETA.
        let secs = run_seconds(Some(100), Some(110));
        assert_eq!(secs, Some(10));
        assert_eq!(rate(1000, secs), Some(100));
        assert_eq!(eta(secs, true, 1000, 1000), None);
        // Running: ETA from what is left at the pace so far (rounded up).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let secs = run_seconds(Some(now - 10), None);
        assert_eq!(rate(1000, secs), Some(100));
        assert_eq!(eta(secs, false, 1000, 3050), Some(21));
        // Nothing to say before a second has passed, before any byte, or unstarted.
        assert_eq!(run_seconds(Some(now + 5), None), None);
        assert_eq!(rate(0, secs), None);
        assert_eq!(eta(secs, false, 0, 2000), None);
        assert_eq!(run_seconds(None, None), None);
    }

    #[test]
    fn a_recovery_is_paced_by_what_it_fetches() {
        let (c, a, _) = setup();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let id = c
            .add_job(now - 20, &new_job(JobKind::Recovery, Some(&a)))
            .unwrap();
        c.start_job(now - 10, id).unwrap();
        // 64 MiB of disk written, mostly holes; 1 MiB fetched.
        let p = JobProgress {
            bytes_done: 64 << 20,
            bytes_total: 128 << 20,
            bytes_read: 1 << 20,
            bytes_sent: 0,
            message: None,
            step: None,
        };
        c.set_job_progress(id, &p).unwrap();
        let j = c.job(id).unwrap();
        // Ten seconds run (eleven if the clock ticked meanwhile).
        let r = j.rate_bytes_per_sec.unwrap();
        assert!(((1 << 20) / 11..=(1 << 20) / 10).contains(&r), "{r}");
        let w = j.write_rate_bytes_per_sec.unwrap();
        assert!(((64 << 20) / 11..=(64 << 20) / 10).contains(&w), "{w}");
        assert_eq!(j.bytes_fetched, Some(1 << 20));
        assert_eq!(j.bytes_written, Some(64 << 20));
        // Half written in ten seconds: ten more.
        assert!(
            matches!(j.eta_seconds, Some(10 | 11)),
            "{:?}",
            j.eta_seconds
        );
        // Other jobs keep their pace in bytes done, with no recovery fields.
        let b = c
            .add_job(now - 20, &new_job(JobKind::Sync, Some(&a)))
            .unwrap();
        c.start_job(now - 10, b).unwrap();
        c.set_job_progress(b, &p).unwrap();
        let j = c.job(b).unwrap();
        let r = j.rate_bytes_per_sec.unwrap();
        assert!(((64 << 20) / 11..=(64 << 20) / 10).contains(&r), "{r}");
        assert_eq!((j.bytes_fetched, j.bytes_written), (None, None));
        assert_eq!(j.write_rate_bytes_per_sec, None);
    }

    fn new_job(kind: JobKind, ds: Option<&str>) -> NewJob {
        NewJob {
            kind,
            datasource_id: ds.map(String::from),
            trigger: "schedule".into(),
            not_before: None,
            attempt: 1,
            rerun_of: None,
        }
    }

    fn setup() -> (Catalog, String, String) {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(10, "h1", &[vm("a", Some("ua"), 10)])
            .unwrap();
        c.upsert_inventory(10, "h2", &[vm("b", None, 10)]).unwrap();
        let a = c.datasource_by_name("h1", "a").unwrap().id;
        let b = c.datasource_by_name("h2", "b").unwrap().id;
        (c, a, b)
    }

    fn log_of(c: &Catalog, id: i64) -> Vec<String> {
        c.job(id)
            .unwrap()
            .log
            .into_iter()
            .map(|l| l.message)
            .collect()
    }

    #[test]
    fn job_log_keeps_the_first_and_newest_lines_with_one_marker() {
        let (c, a, _) = setup();
        let id = c.add_job(100, &new_job(JobKind::Sync, Some(&a))).unwrap();
        let other = c.add_job(100, &new_job(JobKind::Sync, Some(&a))).unwrap();
        // An oversized line is cut on a character boundary, with the marker.
        c.job_log(101, id, &"é".repeat(5000)).unwrap();
        let first = &log_of(&c, id)[0];
        let kept = protocol::MAX_MESSAGE_CHARS - "… (10000 bytes cut)".chars().count();
        assert_eq!(
            first,
            &format!("{}… ({} bytes cut)", "é".repeat(kept), 10000 - 2 * kept)
        );
        // A line that mimics the marker is reworded, never taken for one.
        c.job_log(101, id, "… 7 lines left out").unwrap();
        assert_eq!(log_of(&c, id)[1], "... 7 lines left out");
        c.job_log(101, other, "another job's line").unwrap();
        // Far past the line cap: the head stays, the newest lines stay, one marker
        // says how many went.
        let n = MAX_JOB_LOG_LINES + 1500;
        for i in 0..n {
            c.job_log(102, id, &format!("line {i}")).unwrap();
        }
        let log = log_of(&c, id);
        assert_eq!(log.len(), MAX_JOB_LOG_LINES);
        assert_eq!(log[0], *first);
        assert_eq!(log[1], "... 7 lines left out");
        assert_eq!(
            log[JOB_LOG_HEAD_LINES - 1],
            format!("line {}", JOB_LOG_HEAD_LINES - 3)
        );
        let kept_tail = MAX_JOB_LOG_LINES - JOB_LOG_HEAD_LINES - 1;
        let left_out = n + 2 - JOB_LOG_HEAD_LINES - kept_tail;
        assert_eq!(
            log[JOB_LOG_HEAD_LINES],
            format!("… {left_out} lines left out")
        );
        assert_eq!(
            log[JOB_LOG_HEAD_LINES + 1],
            format!("line {}", n - kept_tail)
        );
        assert_eq!(log.last().unwrap(), &format!("line {}", n - 1));
        assert_eq!(
            log.iter().filter(|l| l.contains("lines left out")).count(),
            2
        );
        // Other jobs' logs are untouched.
        assert_eq!(log_of(&c, other), ["another job's line"]);

        // The byte cap: long lines trim the log by size before it reaches the line cap.
        let big = c.add_job(100, &new_job(JobKind::Sync, Some(&a))).unwrap();
        let line = "z".repeat(protocol::MAX_MESSAGE_CHARS);
        for i in 0..1000 {
            c.job_log(103, big, &format!("{i:04}{line}")).unwrap();
        }
        let log = log_of(&c, big);
        let bytes: usize = log.iter().map(|l| l.len()).sum();
        assert!(bytes <= MAX_JOB_LOG_BYTES, "{bytes}");
        assert!(bytes > MAX_JOB_LOG_BYTES - 2 * (line.len() + 4), "{bytes}");
        assert!(log[0].starts_with("0000"));
        assert!(log.last().unwrap().starts_with("0999"));
        let markers: Vec<_> = log.iter().filter_map(|l| dropped_count(l)).collect();
        assert_eq!(markers.len(), 1);
        assert_eq!(markers[0] as usize + log.len() - 1, 1000);

        // A job's error is capped as its log lines are.
        c.finish_job(
            104,
            big,
            JobState::Failed,
            Some(("io", &"e".repeat(1 << 20))),
        )
        .unwrap();
        let e = c.job(big).unwrap().error.unwrap();
        assert_eq!(e.chars().count(), protocol::MAX_MESSAGE_CHARS);
        assert!(e.starts_with("eee") && e.ends_with(" bytes cut)"), "{e}");
    }

    #[test]
    fn lifecycle() {
        let (c, a, _) = setup();
        let id = c.add_job(100, &new_job(JobKind::Sync, Some(&a))).unwrap();
        let j = c.job(id).unwrap();
        assert_eq!(j.state, JobState::Queued);
        assert_eq!(j.vm.as_deref(), Some("h1/a"));
        assert_eq!(j.created, "1970-01-01T00:01:40Z");
        assert_eq!(c.active_job_for(&a).unwrap().unwrap().id, id);

        c.start_job(110, id).unwrap();
        assert!(matches!(c.start_job(111, id), Err(Error::Conflict(_))));
        assert_eq!(c.running_jobs().unwrap(), 1);
        assert_eq!(c.running_jobs_on_host("h1").unwrap(), 1);
        assert_eq!(c.running_jobs_on_host("h2").unwrap(), 0);
        c.set_job_progress(
            id,
            &JobProgress {
                bytes_done: 5,
                bytes_total: 10,
                bytes_read: 6,
                bytes_sent: 2,
                message: None,
                step: None,
            },
        )
        .unwrap();
        c.job_log(112, id, "reading disk a.qcow2").unwrap();
        c.set_job_recovery_point(id, "rp1").unwrap();
        c.finish_job(120, id, JobState::Succeeded, None).unwrap();
        assert!(matches!(
            c.finish_job(121, id, JobState::Failed, None),
            Err(Error::Conflict(m)) if m == "job 1 is already succeeded"
        ));
        assert!(matches!(
            c.finish_job(121, id, JobState::Running, None),
            Err(Error::Invalid(_))
        ));

        let j = c.job(id).unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.started.as_deref(), Some("1970-01-01T00:01:50Z"));
        assert_eq!(j.finished.as_deref(), Some("1970-01-01T00:02:00Z"));
        assert_eq!(
            (j.bytes_done, j.bytes_total, j.bytes_read, j.bytes_sent),
            (5, 10, 6, 2)
        );
        assert_eq!(j.recovery_point.as_deref(), Some("rp1"));
        assert_eq!(j.log.len(), 1);
        assert_eq!(j.log[0].message, "reading disk a.qcow2");
        assert_eq!(c.active_job_for(&a).unwrap().map(|j| j.id), None);
        assert_eq!(c.last_success_unix(&a).unwrap(), Some(120));
        assert_eq!(c.running_jobs().unwrap(), 0);

        let f = c
            .add_job(130, &new_job(JobKind::ExpressFull, Some(&a)))
            .unwrap();
        c.start_job(131, f).unwrap();
        c.finish_job(
            140,
            f,
            JobState::Failed,
            Some(("disk-missing", "a.qcow2 is gone")),
        )
        .unwrap();
        let j = c.job(f).unwrap();
        assert_eq!(j.error.as_deref(), Some("a.qcow2 is gone"));
        assert_eq!(c.last_success_unix(&a).unwrap(), Some(120));
        assert_eq!(c.last_job(&a, &[]).unwrap().unwrap().id, f);
        assert_eq!(c.last_job(&a, &[JobKind::Sync]).unwrap().unwrap().id, id);
        assert_eq!(
            c.last_job(&a, &[JobKind::Sync, JobKind::ExpressFull])
                .unwrap()
                .unwrap()
                .id,
            f
        );
        assert!(c.last_job(&a, &[JobKind::Verify]).unwrap().is_none());

        let states: Vec<_> = c.jobs(None, 10).unwrap().iter().map(|j| j.id).collect();
        assert_eq!(states, [f, id]);
        let failed = c.jobs(Some(JobState::Failed), 10).unwrap();
        let by_kind = c
            .jobs_where(
                &JobFilter {
                    kind: Some(failed[0].kind),
                    vm: failed[0].vm.as_ref().map(|v| v.to_string()),
                    ..JobFilter::default()
                },
                10,
            )
            .unwrap();
        assert!(by_kind.iter().any(|j| j.id == failed[0].id));
        assert!(
            by_kind
                .iter()
                .all(|j| j.kind == failed[0].kind && j.vm == failed[0].vm)
        );
        let none = JobFilter {
            vm: Some("nowhere/none".into()),
            ..JobFilter::default()
        };
        assert!(c.jobs_where(&none, 10).unwrap().is_empty());
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].id, f);
        assert!(failed[0].log.is_empty());

        assert!(matches!(c.job(999), Err(Error::NotFound(m)) if m == "job 999"));
        assert!(matches!(c.job_state(999), Err(Error::NotFound(_))));
        assert!(matches!(c.start_job(1, 999), Err(Error::NotFound(_))));
        assert!(matches!(c.job_log(1, 999, "x"), Err(Error::NotFound(_))));
        assert!(matches!(
            c.add_job(1, &new_job(JobKind::Sync, Some("nope"))),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn runnable_jobs_honor_not_before_and_follow_moves() {
        let (c, a, b) = setup();
        let j1 = c.add_job(100, &new_job(JobKind::Sync, Some(&a))).unwrap();
        let mut later = new_job(JobKind::Sync, Some(&b));
        later.not_before = Some(500);
        later.attempt = 2;
        later.rerun_of = Some(j1);
        later.trigger = format!("rerun of {j1}");
        let j2 = c.add_job(101, &later).unwrap();
        let j3 = c.add_job(102, &new_job(JobKind::Gc, None)).unwrap();

        let ids = |v: Vec<JobRow>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(c.runnable_jobs(499).unwrap()), [j1, j3]);
        let all = c.runnable_jobs(500).unwrap();
        assert_eq!(ids(all.clone()), [j1, j2, j3]);
        assert_eq!(all[1].attempt, 2);
        assert_eq!(all[1].host.as_deref(), Some("h2"));
        assert_eq!(all[2].host, None);
        assert_eq!(
            c.job(j2).unwrap().not_before.as_deref(),
            Some("1970-01-01T00:08:20Z")
        );

        // a moves to h3 (same cluster, h1 no longer reports it): the queued job goes there.
        c.create_cluster(199, "k", &["h1".into(), "h3".into()])
            .unwrap();
        c.upsert_inventory(199, "h1", &[]).unwrap();
        c.upsert_inventory(200, "h3", &[vm("a2", Some("ua"), 10)])
            .unwrap();
        let r = &c.runnable_jobs(200).unwrap()[0];
        assert_eq!(
            (r.host.as_deref(), r.vm.as_deref()),
            (Some("h3"), Some("a2"))
        );
        assert_eq!(c.job(j1).unwrap().vm.as_deref(), Some("h1/a"));

        c.start_job(210, j1).unwrap();
        assert_eq!(ids(c.runnable_jobs(600).unwrap()), [j2, j3]);
    }

    #[test]
    fn interrupted_jobs_fail_and_are_returned() {
        let (c, a, b) = setup();
        let j1 = c.add_job(100, &new_job(JobKind::Sync, Some(&a))).unwrap();
        let j2 = c.add_job(100, &new_job(JobKind::Sync, Some(&b))).unwrap();
        let j3 = c.add_job(100, &new_job(JobKind::Verify, None)).unwrap();
        c.start_job(101, j1).unwrap();
        c.start_job(101, j3).unwrap();

        let rows = c.fail_interrupted_jobs(200, "server restarted").unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), [j1, j3]);
        assert_eq!(rows[0].kind, JobKind::Sync);
        assert_eq!(rows[0].datasource_id.as_deref(), Some(a.as_str()));
        assert_eq!(rows[0].host.as_deref(), Some("h1"));
        assert_eq!(rows[0].vm.as_deref(), Some("a"));
        let j = c.job(j1).unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.as_deref(), Some("server restarted"));
        assert_eq!(
            j.log.last().map(|l| l.message.as_str()),
            Some("server restarted")
        );
        assert_eq!(c.job_state(j2).unwrap(), JobState::Queued);
        assert_eq!(c.running_jobs().unwrap(), 0);
        assert!(c.fail_interrupted_jobs(300, "again").unwrap().is_empty());
    }
}
