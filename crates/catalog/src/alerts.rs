//! Alerts: one open alert per (subject, kind); a repeat updates it rather than flooding
//! the list.

use protocol::{AlertInfo, Severity};
use rusqlite::params;

use crate::{Catalog, Cols, Error, Result};

const ALERT_SELECT: &str = "SELECT id, severity, subject, kind, message, raised, last_seen,
    resolved, occurrences, note FROM alerts";

fn severity_text(s: Severity) -> &'static str {
    s.as_str()
}

fn alert_row(r: &Cols) -> Result<AlertInfo> {
    let severity = r.word(1, "alerts.severity", Severity::parse)?;
    Ok(AlertInfo {
        id: r.get(0, "alerts.id")?,
        severity,
        subject: r.get(2, "alerts.subject")?,
        kind: r.get(3, "alerts.kind")?,
        message: r.get(4, "alerts.message")?,
        raised: r.time(5, "alerts.raised")?,
        last_seen: r.time(6, "alerts.last_seen")?,
        resolved: r.opt_time(7, "alerts.resolved")?,
        occurrences: r.u64(8, "alerts.occurrences")?,
        note: r.get(9, "alerts.note")?,
    })
}

/// What [`Catalog::raise`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub id: i64,
    /// A new alert; false when an open one of the same subject and kind was updated.
    pub new: bool,
}

impl Catalog {
    /// Raises an alert, or updates the open one of the same subject and kind (message,
    /// severity, last seen, one more occurrence). Returns its id.
    pub fn raise_alert(
        &self,
        now: i64,
        severity: Severity,
        subject: &str,
        kind: &str,
        message: &str,
    ) -> Result<i64> {
        self.raise(now, severity, subject, kind, message)
            .map(|r| r.id)
    }

    /// [`Catalog::raise_alert`], telling whether the alert is new.
    pub fn raise(
        &self,
        now: i64,
        severity: Severity,
        subject: &str,
        kind: &str,
        message: &str,
    ) -> Result<Raised> {
        let tx = self.conn.unchecked_transaction()?;
        let open = self.one(
            "SELECT id FROM alerts WHERE subject = ?1 AND kind = ?2 AND resolved IS NULL",
            [subject, kind],
            |r| r.get::<i64>(0, "alerts.id"),
        )?;
        let r = match open {
            Some(id) => {
                tx.execute(
                    "UPDATE alerts SET severity = ?2, message = ?3, last_seen = ?4,
                         occurrences = occurrences + 1 WHERE id = ?1",
                    params![id, severity_text(severity), message, now],
                )?;
                Raised { id, new: false }
            }
            None => {
                tx.execute(
                    "INSERT INTO alerts (severity, subject, kind, message, raised, last_seen)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                    params![severity_text(severity), subject, kind, message, now],
                )?;
                Raised {
                    id: self.conn.last_insert_rowid(),
                    new: true,
                }
            }
        };
        tx.commit()?;
        Ok(r)
    }

    /// Resolves the open alerts of `subject` (of one `kind`, or all). Returns how many.
    pub fn resolve_alerts(&self, now: i64, subject: &str, kind: Option<&str>) -> Result<u64> {
        Ok(self.resolve_alerts_listed(now, subject, kind)?.len() as u64)
    }

    /// [`Catalog::resolve_alerts`], returning the alerts it resolved (as resolved).
    pub fn resolve_alerts_listed(
        &self,
        now: i64,
        subject: &str,
        kind: Option<&str>,
    ) -> Result<Vec<AlertInfo>> {
        self.resolve_alerts_noted(now, subject, kind, None)
    }

    /// [`Catalog::resolve_alerts_listed`], with a note saying what resolved them.
    pub fn resolve_alerts_noted(
        &self,
        now: i64,
        subject: &str,
        kind: Option<&str>,
        note: Option<&str>,
    ) -> Result<Vec<AlertInfo>> {
        let tx = self.conn.unchecked_transaction()?;
        let ids: Vec<i64> = self.all(
            "SELECT id FROM alerts
             WHERE subject = ?1 AND (?2 IS NULL OR kind = ?2) AND resolved IS NULL",
            params![subject, kind],
            |r| r.get::<i64>(0, "alerts.id"),
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            tx.execute(
                "UPDATE alerts SET resolved = ?1, note = ?3 WHERE id = ?2",
                params![now, id, note],
            )?;
            if let Some(a) = self.one(&format!("{ALERT_SELECT} WHERE id = ?1"), [id], alert_row)? {
                out.push(a);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// One alert by id.
    pub fn alert(&self, id: i64) -> Result<AlertInfo> {
        self.one(&format!("{ALERT_SELECT} WHERE id = ?1"), [id], alert_row)?
            .ok_or_else(|| Error::NotFound(format!("alert {id}")))
    }

    /// Resolves one alert by hand (an administrator), with an optional note. An alert
    /// already resolved is a `Conflict` naming when.
    pub fn resolve_alert(&self, now: i64, id: i64, note: Option<&str>) -> Result<AlertInfo> {
        let tx = self.conn.unchecked_transaction()?;
        let a = self.alert(id)?;
        if let Some(when) = &a.resolved {
            return Err(Error::Conflict(format!(
                "alert {id} was already resolved at {when}"
            )));
        }
        tx.execute(
            "UPDATE alerts SET resolved = ?1, note = ?3 WHERE id = ?2 AND resolved IS NULL",
            params![now, id, note],
        )?;
        let a = self.alert(id)?;
        tx.commit()?;
        Ok(a)
    }

    /// Alerts, newest first (by when they were last seen).
    pub fn alerts(&self, include_resolved: bool) -> Result<Vec<AlertInfo>> {
        let filter = if include_resolved {
            ""
        } else {
            " WHERE resolved IS NULL"
        };
        self.all(
            &format!("{ALERT_SELECT}{filter} ORDER BY last_seen DESC, id DESC"),
            [],
            alert_row,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_and_resolve() {
        let c = Catalog::open_in_memory().unwrap();
        let a1 = c
            .raise_alert(100, Severity::Warning, "h1/a", "backup-failed", "first")
            .unwrap();
        let a2 = c
            .raise_alert(110, Severity::Error, "h1/a", "backup-failed", "second")
            .unwrap();
        assert_eq!(a1, a2);
        let d = c
            .raise_alert(120, Severity::Warning, "h1/a", "disk-missing", "gone")
            .unwrap();
        let o = c
            .raise_alert(105, Severity::Info, "datastore", "space", "80% full")
            .unwrap();
        let all = c.alerts(false).unwrap();
        assert_eq!(all.iter().map(|a| a.id).collect::<Vec<_>>(), [d, a1, o]);
        let a = &all[1];
        assert_eq!(a.occurrences, 2);
        assert_eq!(a.message, "second");
        assert_eq!(a.severity, Severity::Error);
        assert_eq!(a.raised, "1970-01-01T00:01:40Z");
        assert_eq!(a.last_seen, "1970-01-01T00:01:50Z");
        assert_eq!(a.resolved, None);
        assert_eq!(c.counts().unwrap().active_alerts, 3);

        assert_eq!(
            c.resolve_alerts(200, "h1/a", Some("backup-failed"))
                .unwrap(),
            1
        );
        assert_eq!(
            c.resolve_alerts(200, "h1/a", Some("backup-failed"))
                .unwrap(),
            0
        );
        assert_eq!(c.alerts(false).unwrap().len(), 2);
        // Raised again after resolution: a new alert.
        let again = c
            .raise_alert(300, Severity::Warning, "h1/a", "backup-failed", "third")
            .unwrap();
        assert_ne!(again, a1);
        assert_eq!(c.resolve_alerts(400, "h1/a", None).unwrap(), 2);
        let open = c.alerts(false).unwrap();
        assert_eq!(open.iter().map(|a| a.id).collect::<Vec<_>>(), [o]);
        let all = c.alerts(true).unwrap();
        assert_eq!(all.len(), 4);
        let old = all.iter().find(|a| a.id == a1).unwrap();
        assert_eq!(old.resolved.as_deref(), Some("1970-01-01T00:03:20Z"));
    }

    #[test]
    fn raise_tells_new_from_repeat() {
        let c = Catalog::open_in_memory().unwrap();
        let r = c.raise(1, Severity::Error, "h1/a", "x", "m").unwrap();
        assert!(r.new);
        let again = c.raise(2, Severity::Error, "h1/a", "x", "m").unwrap();
        assert_eq!(
            again,
            Raised {
                id: r.id,
                new: false
            }
        );
        assert!(c.raise(2, Severity::Error, "h1/b", "x", "m").unwrap().new);
        c.resolve_alerts(3, "h1/a", None).unwrap();
        let after = c.raise(4, Severity::Error, "h1/a", "x", "m").unwrap();
        assert!(after.new && after.id != r.id);
    }

    #[test]
    fn resolve_by_hand_with_a_note_and_critical_round_trips() {
        let c = Catalog::open_in_memory().unwrap();
        let id = c
            .raise_alert(1, Severity::Critical, "h1/a", "vm-id-conflict", "m")
            .unwrap();
        assert_eq!(c.alert(id).unwrap().severity, Severity::Critical);
        let a = c.resolve_alert(5, id, Some("checked: a test VM")).unwrap();
        assert_eq!(a.resolved.as_deref(), Some("1970-01-01T00:00:05Z"));
        assert_eq!(a.note.as_deref(), Some("checked: a test VM"));
        let e = c.resolve_alert(6, id, None).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        assert!(e.to_string().contains("already resolved"), "{e}");
        assert!(matches!(
            c.resolve_alert(6, 999, None),
            Err(Error::NotFound(_))
        ));
        let noted = c
            .resolve_alerts_noted(7, "nothing", None, Some("x"))
            .unwrap();
        assert!(noted.is_empty());
    }
}
