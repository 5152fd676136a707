//! The server's catalog: one SQLite database that is the source of truth for policy and
//! history. The datastore stays the source of truth for data; recovery points are
//! mirrored here from its manifests and can be rebuilt from them
//! ([`Catalog::replace_recovery_points`]).
//!
//! # Schema
//!
//! Versioned by `PRAGMA user_version`; the numbered steps live in `schema.rs` and run in
//! order, each in its own transaction. A database newer than this program is refused,
//! never downgraded. Times are stored as Unix seconds and returned as RFC 3339 UTC.
//!
//! | table            | what it holds |
//! |------------------|---------------|
//! | `settings`       | key/value server settings |
//! | `audit_log`      | who did what, when (admin actions) |
//! | `enroll_tokens`  | one-use agent enrollment tokens, by hash of the secret |
//! | `agents`         | one row per host: its current client certificate fingerprint |
//! | `revoked_certs`  | every fingerprint ever revoked or replaced (refused for good) |
//! | `datasources`    | VMs reported by agents; `UNIQUE(host, vm)`, stable `id` across moves |
//! | `groups`         | protection groups and their policy (JSON) |
//! | `group_members`  | `UNIQUE(datasource_id)`: a VM is in at most one group |
//! | `recovery_points`| mirror of the datastore's manifests |
//! | `jobs`, `job_log`| every job with its progress, outcome and log lines |
//! | `alerts`         | one open alert per (subject, kind); repeats count occurrences |
//! | `schedule_runs`  | when each schedule last fired, so restarts do not re-fire |
//! | `clusters`, `cluster_hosts` | hosts VMs may move between on their own; a host in at most one |
//! | `vm_claims`      | VMs reported under another host's VM id, held for an administrator |
//! | `users`, `api_tokens`, `sessions` | console users (argon2id), script tokens and sign-ins, secrets by hash |
//! | `datasource_moves` | every change of a data source's `HOST/VM` (old names say where it went) |
//!
//! Everything is synchronous on one connection; the server wraps a [`Catalog`] in a
//! mutex. Functions that stamp a time take `now` (Unix seconds) so tests are
//! deterministic.

mod agents;
mod alerts;
mod clusters;
mod datasources;
mod groups;
mod jobs;
mod online;
mod recovery_points;
#[cfg(test)]
mod scale_tests;
mod schema;
mod storage;
mod users;

use std::path::Path;
use std::time::Duration;

use rusqlite::types::FromSql;
use rusqlite::{Connection, OptionalExtension, Params, Row, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use agents::AgentRow;
pub use alerts::Raised;
pub use datasources::{Conflict, InventoryOutcome, Move};
pub use groups::{GroupMember, GroupRow};
pub use jobs::{JobFilter, JobRow, NewJob};
pub use users::{Credentials, LoginFailure, SessionRow, TokenAuth};

/// Catalog errors. The server maps `NotFound` and `Moved` to 404, `Conflict` to 409, `Invalid` to
/// 400 and everything else to 500; messages name the thing concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A data source asked for by an old `HOST/VM` name: it moved.
    #[error("{from} moved to {to} at {when}; use {to}")]
    Moved {
        from: String,
        to: String,
        when: String,
    },
    #[error("{0}")]
    Invalid(String),
    /// A row that does not decode (bad JSON, unknown enum text, negative size): names the
    /// table and column.
    #[error("catalog is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "catalog schema version {found} is newer than this program knows ({known}); \
         refusing to open it (upgrade Holdfast, or restore a matching catalog)"
    )]
    NewerSchema { found: u32, known: u32 },
    #[error("catalog: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("catalog: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// One audit-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub time: String,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// The numbers `/status` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Counts {
    /// Enrolled agents that are not revoked.
    pub agents: u64,
    pub datasources: u64,
    pub protection_groups: u64,
    pub recovery_points: u64,
    /// Unresolved alerts.
    pub active_alerts: u64,
    pub running_jobs: u64,
}

/// The catalog database (one connection).
pub struct Catalog {
    conn: Connection,
}

/// How long a statement waits for another connection's lock (a CLI opening the same
/// file, a backup of it) before giving up with SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl Catalog {
    /// Opens (creating if missing) the catalog at `path` and migrates it to the current
    /// schema.
    pub fn open(path: &Path) -> Result<Catalog> {
        let conn = Connection::open(path)?;
        // WAL: readers (status pages, a CLI) do not block the writer, and commits are
        // one fsync.
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Invalid(format!(
                "catalog {}: could not switch to WAL journal mode (got {mode})",
                path.display()
            )));
        }
        Catalog::setup(conn)
    }

    /// A private in-memory catalog (tests, dry runs).
    pub fn open_in_memory() -> Result<Catalog> {
        Catalog::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Catalog> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Write transactions take the write lock up front, so two connections never
        // deadlock upgrading read locks (SQLITE_BUSY without waiting).
        conn.set_transaction_behavior(TransactionBehavior::Immediate);
        let cat = Catalog { conn };
        cat.migrate()?;
        Ok(cat)
    }

    fn migrate(&self) -> Result<()> {
        let known = schema::MIGRATIONS.len() as u32;
        let found = self.schema_version()?;
        if found > known {
            return Err(Error::NewerSchema { found, known });
        }
        for (i, step) in schema::MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = self.conn.unchecked_transaction()?;
            // Re-check under the write lock: another process may have migrated meanwhile.
            let now: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if now as usize > i {
                continue;
            }
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version of the open database (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<u32> {
        let v: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        u32::try_from(v).map_err(|_| Error::Corrupt(format!("PRAGMA user_version is {v}")))
    }

    // -----------------------------------------------------------------------------
    // Settings and audit

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.one("SELECT value FROM settings WHERE key = ?1", [key], |r| {
            r.get(0, "settings.value")
        })
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    /// Removes a setting (absent already is fine).
    pub fn delete_setting(&self, key: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM settings WHERE key = ?1", [key])?;
        Ok(())
    }

    pub fn audit(&self, now: i64, actor: &str, action: &str, detail: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO audit_log (time, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![now, actor, action, detail],
        )?;
        Ok(())
    }

    /// The newest `limit` entries, newest first.
    pub fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        self.all(
            "SELECT time, actor, action, detail FROM audit_log ORDER BY id DESC LIMIT ?1",
            [limit],
            |r| {
                Ok(AuditEntry {
                    time: rfc3339(r.get(0, "audit_log.time")?),
                    actor: r.get(1, "audit_log.actor")?,
                    action: r.get(2, "audit_log.action")?,
                    detail: r.get(3, "audit_log.detail")?,
                })
            },
        )
    }

    /// Writes a consistent copy of the whole catalog to `path` (which must not exist),
    /// e.g. to back the catalog up beside the datastore while the server runs.
    pub fn snapshot_to(&self, path: &Path) -> Result<()> {
        let p = path
            .to_str()
            .ok_or_else(|| Error::Invalid(format!("{}: path is not UTF-8", path.display())))?;
        self.conn.execute("VACUUM INTO ?1", [p])?;
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // Schedules

    /// When the schedule `key` last fired (Unix seconds).
    pub fn schedule_last(&self, key: &str) -> Result<Option<i64>> {
        self.one(
            "SELECT last_unix FROM schedule_runs WHERE key = ?1",
            [key],
            |r| r.get(0, "schedule_runs.last_unix"),
        )
    }

    pub fn set_schedule_last(&self, key: &str, unix: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO schedule_runs (key, last_unix) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET last_unix = excluded.last_unix",
            params![key, unix],
        )?;
        Ok(())
    }

    /// Counts for `/status`, in one statement.
    pub fn counts(&self) -> Result<Counts> {
        let c = self.one(
            "SELECT (SELECT count(*) FROM agents WHERE revoked = 0),
                    (SELECT count(*) FROM datasources),
                    (SELECT count(*) FROM groups),
                    (SELECT count(*) FROM recovery_points),
                    (SELECT count(*) FROM alerts WHERE resolved IS NULL),
                    (SELECT count(*) FROM jobs WHERE state = 'running')",
            [],
            |r| {
                Ok(Counts {
                    agents: r.u64(0, "agents")?,
                    datasources: r.u64(1, "datasources")?,
                    protection_groups: r.u64(2, "groups")?,
                    recovery_points: r.u64(3, "recovery_points")?,
                    active_alerts: r.u64(4, "alerts")?,
                    running_jobs: r.u64(5, "jobs")?,
                })
            },
        )?;
        Ok(c.unwrap_or_default())
    }

    // -----------------------------------------------------------------------------
    // Query helpers: rows are decoded through `Cols`, so a bad value becomes an
    // `Error::Corrupt` naming its table and column instead of a panic.

    fn all<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        f: impl Fn(&Cols) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(f(&Cols(row))?);
        }
        Ok(out)
    }

    fn one<T, P: Params>(
        &self,
        sql: &str,
        params: P,
        f: impl Fn(&Cols) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        match rows.next()? {
            Some(row) => Ok(Some(f(&Cols(row))?)),
            None => Ok(None),
        }
    }

    fn exists<P: Params>(&self, sql: &str, params: P) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(sql)?
            .query_row(params, |_| Ok(()))
            .optional()?
            .is_some())
    }
}

/// A row, decoded column by column with the column's `table.column` name for errors.
struct Cols<'a>(&'a Row<'a>);

impl Cols<'_> {
    fn get<T: FromSql>(&self, i: usize, what: &str) -> Result<T> {
        self.0
            .get(i)
            .map_err(|e| Error::Corrupt(format!("{what}: {e}")))
    }

    fn u64(&self, i: usize, what: &str) -> Result<u64> {
        let v: i64 = self.get(i, what)?;
        u64::try_from(v).map_err(|_| Error::Corrupt(format!("{what}: negative value {v}")))
    }

    fn u32(&self, i: usize, what: &str) -> Result<u32> {
        let v: i64 = self.get(i, what)?;
        u32::try_from(v).map_err(|_| Error::Corrupt(format!("{what}: {v} is out of range")))
    }

    fn bool(&self, i: usize, what: &str) -> Result<bool> {
        Ok(self.get::<i64>(i, what)? != 0)
    }

    fn time(&self, i: usize, what: &str) -> Result<String> {
        Ok(rfc3339(self.get(i, what)?))
    }

    fn opt_time(&self, i: usize, what: &str) -> Result<Option<String>> {
        Ok(self.get::<Option<i64>>(i, what)?.map(rfc3339))
    }

    /// A protocol word (`JobKind`, `Severity`, ...) stored as its name.
    fn word<T>(&self, i: usize, what: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
        let s: String = self.get(i, what)?;
        parse(&s).ok_or_else(|| Error::Corrupt(format!("{what}: unknown {s:?}")))
    }

    fn opt_name(&self, i: usize, what: &str) -> Result<Option<protocol::DataSourceName>> {
        let s: Option<String> = self.get(i, what)?;
        s.map(|s| {
            protocol::DataSourceName::parse(&s)
                .ok_or_else(|| Error::Corrupt(format!("{what}: {s:?} is not HOST/VM")))
        })
        .transpose()
    }

    fn json<T: DeserializeOwned>(&self, i: usize, what: &str) -> Result<T> {
        let s: String = self.get(i, what)?;
        serde_json::from_str(&s).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
    }
}

fn rfc3339(unix: i64) -> String {
    utc::rfc3339(unix)
}

/// JSON text for a column. Protocol types always serialize; a failure would be a bug.
fn to_json<T: Serialize>(v: &T, what: &str) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Invalid(format!("{what}: {e}")))
}

/// u64 → INTEGER (SQLite integers are signed; sizes beyond i64 are clamped, not wrapped).
fn sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// 16 random hex characters from the kernel's generator, for data-source ids.
fn random_id() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn disk(name: &str, size: u64) -> protocol::VmDisk {
        protocol::VmDisk {
            name: name.into(),
            format: "qcow2".into(),
            virtual_size: size,
        }
    }

    pub fn vm(name: &str, vm_id: Option<&str>, size: u64) -> protocol::VmInfo {
        protocol::VmInfo {
            name: name.into(),
            vm_id: vm_id.map(String::from),
            provider: protocol::ProviderKind::Qemu,
            disks: vec![disk(&format!("{name}.qcow2"), size)],
            running: Some(true),
        }
    }

    pub fn policy() -> protocol::Policy {
        protocol::Policy::daily_at(5, protocol::SyncFrequency::Minutes(15), "20:00")
    }

    pub fn rp(id: &str, ds: &str, vm: &str, unix: i64) -> protocol::RecoveryPointInfo {
        protocol::RecoveryPointInfo {
            id: id.into(),
            vm: vm.into(),
            datasource_id: ds.into(),
            created: rfc3339(unix),
            created_unix: unix,
            consistency: protocol::Consistency::CrashConsistent,
            base: None,
            disks: vec![disk("d.qcow2", 1 << 30)],
            stats: protocol::Stats::default(),
            job_id: None,
            volumes: None,
            locations: vec!["disk".into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_a_fresh_file_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        {
            let c = Catalog::open(&path).unwrap();
            assert_eq!(c.schema_version().unwrap(), schema::MIGRATIONS.len() as u32);
            c.set_setting("k", "v1").unwrap();
            c.set_setting("k", "v2").unwrap();
            let fk: i64 = c
                .conn
                .pragma_query_value(None, "foreign_keys", |r| r.get(0))
                .unwrap();
            assert_eq!(fk, 1);
            let mode: String = c
                .conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.schema_version().unwrap(), schema::MIGRATIONS.len() as u32);
        assert_eq!(c.setting("k").unwrap().as_deref(), Some("v2"));
        assert_eq!(c.setting("missing").unwrap(), None);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        drop(Catalog::open(&path).unwrap());
        let future = schema::MIGRATIONS.len() as i64 + 1;
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", future).unwrap();
        }
        match Catalog::open(&path) {
            Err(e @ Error::NewerSchema { .. }) => {
                assert!(e.to_string().contains("newer"), "{e}");
            }
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("opened a newer catalog"),
        }
        // Not downgraded.
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, future);
    }

    #[test]
    fn audit_log_newest_first_and_schedules() {
        let c = Catalog::open_in_memory().unwrap();
        c.audit(100, "admin", "create-group", "pg1").unwrap();
        c.audit(200, "admin", "delete-group", "pg1").unwrap();
        c.audit(300, "agent h1", "enroll", "").unwrap();
        let log = c.audit_log(2).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].action, "enroll");
        assert_eq!(log[0].time, "1970-01-01T00:05:00Z");
        assert_eq!(log[1].action, "delete-group");

        assert_eq!(c.schedule_last("pg1/rp").unwrap(), None);
        c.set_schedule_last("pg1/rp", 42).unwrap();
        c.set_schedule_last("pg1/rp", 43).unwrap();
        assert_eq!(c.schedule_last("pg1/rp").unwrap(), Some(43));
    }

    #[test]
    fn corrupt_rows_are_errors_naming_the_column() {
        let c = Catalog::open_in_memory().unwrap();
        c.conn
            .execute(
                "INSERT INTO audit_log (time, actor, action, detail) VALUES ('x', 'a', 'b', 'c')",
                [],
            )
            .unwrap();
        let e = c.audit_log(10).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        assert!(e.to_string().contains("audit_log.time"), "{e}");
    }

    #[test]
    fn random_ids_are_16_hex() {
        let a = random_id().unwrap();
        let b = random_id().unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
