//! The mirror of the datastore's recovery points.

use protocol::{Consistency, RecoveryPointInfo};
use rusqlite::params;

use crate::{Catalog, Cols, Error, Result, to_json};

pub(crate) const RP_SELECT: &str =
    "SELECT id, vm, datasource_id, created, created_unix, consistency,
    base, disks, stats, job_id, volumes FROM recovery_points";

/// Consistency as its protocol text (`crash-consistent`), not JSON-quoted.
fn consistency_text(c: Consistency) -> Result<String> {
    match serde_json::to_value(c) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        _ => Err(Error::Invalid(format!("consistency {c:?}"))),
    }
}

fn rp_row(r: &Cols) -> Result<RecoveryPointInfo> {
    let c: String = r.get(5, "recovery_points.consistency")?;
    let consistency = serde_json::from_value(serde_json::Value::String(c.clone()))
        .map_err(|_| Error::Corrupt(format!("recovery_points.consistency: unknown {c:?}")))?;
    Ok(RecoveryPointInfo {
        id: r.get(0, "recovery_points.id")?,
        vm: r.get(1, "recovery_points.vm")?,
        datasource_id: r.get(2, "recovery_points.datasource_id")?,
        created: r.get(3, "recovery_points.created")?,
        created_unix: r.get(4, "recovery_points.created_unix")?,
        consistency,
        base: r.get(6, "recovery_points.base")?,
        disks: r.json(7, "recovery_points.disks")?,
        stats: r.json(8, "recovery_points.stats")?,
        job_id: r.get(9, "recovery_points.job_id")?,
        volumes: match r.get::<Option<String>>(10, "recovery_points.volumes")? {
            Some(t) => Some(
                serde_json::from_str(&t)
                    .map_err(|e| Error::Corrupt(format!("recovery_points.volumes: {e}")))?,
            ),
            None => None,
        },
        locations: vec!["disk".into()],
    })
}

impl Catalog {
    /// Records a recovery point; one already recorded (same id) is left as it is, so the
    /// server can mirror the datastore again without care.
    pub fn add_recovery_point(&self, rp: &RecoveryPointInfo) -> Result<()> {
        self.insert_rp(rp)
    }

    fn insert_rp(&self, rp: &RecoveryPointInfo) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO recovery_points (id, vm, datasource_id, created, created_unix,
                     consistency, base, disks, stats, job_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (id) DO NOTHING",
            )?
            .execute(params![
                rp.id,
                rp.vm,
                rp.datasource_id,
                rp.created,
                rp.created_unix,
                consistency_text(rp.consistency)?,
                rp.base,
                to_json(&rp.disks, "disks")?,
                to_json(&rp.stats, "stats")?,
                rp.job_id,
            ])?;
        Ok(())
    }

    /// Recovery points, oldest first; of one data source, or all.
    pub fn recovery_points(&self, datasource_id: Option<&str>) -> Result<Vec<RecoveryPointInfo>> {
        match datasource_id {
            Some(ds) => self.all(
                &format!("{RP_SELECT} WHERE datasource_id = ?1 ORDER BY created_unix, id"),
                [ds],
                rp_row,
            ),
            None => self.all(
                &format!("{RP_SELECT} ORDER BY created_unix, id"),
                [],
                rp_row,
            ),
        }
    }

    pub fn recovery_point(&self, id: &str) -> Result<RecoveryPointInfo> {
        self.one(&format!("{RP_SELECT} WHERE id = ?1"), [id], rp_row)?
            .ok_or_else(|| Error::NotFound(format!("recovery point {id:?}")))
    }

    /// Records what opening the point's volumes found (see [`protocol::VolumeCheck`]).
    pub fn set_recovery_point_volumes(&self, id: &str, v: &[protocol::VolumeCheck]) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE recovery_points SET volumes = ?2 WHERE id = ?1",
            params![id, to_json(&v, "volumes")?],
        )?;
        if n == 0 {
            return Err(Error::NotFound(format!("recovery point {id:?}")));
        }
        Ok(())
    }

    pub fn delete_recovery_point(&self, id: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM recovery_points WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(Error::NotFound(format!("recovery point {id:?}")));
        }
        Ok(())
    }

    /// Replaces the whole mirror (rebuilding the catalog from the datastore), in one
    /// transaction: readers see the old list or the new one, never half.
    pub fn replace_recovery_points(&self, rps: &[RecoveryPointInfo]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute("DELETE FROM recovery_points", [])?;
        for rp in rps {
            self.insert_rp(rp)?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn add_list_delete_replace() {
        let c = Catalog::open_in_memory().unwrap();
        let mut r2 = rp("r2", "ds1", "h1/a", 200);
        r2.consistency = Consistency::ApplicationConsistent;
        r2.base = Some("r1".into());
        r2.job_id = Some(7);
        r2.stats.bytes_read = 123;
        c.add_recovery_point(&r2).unwrap();
        c.add_recovery_point(&rp("r1", "ds1", "h1/a", 100)).unwrap();
        c.add_recovery_point(&rp("r3", "ds2", "h1/b", 150)).unwrap();
        // Idempotent: the second add of r2 (different content) changes nothing.
        c.add_recovery_point(&rp("r2", "dsX", "x/y", 1)).unwrap();

        let ids = |v: Vec<RecoveryPointInfo>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(c.recovery_points(None).unwrap()), ["r1", "r3", "r2"]);
        assert_eq!(ids(c.recovery_points(Some("ds1")).unwrap()), ["r1", "r2"]);
        let got = c.recovery_point("r2").unwrap();
        assert_eq!(got.consistency, Consistency::ApplicationConsistent);
        assert_eq!(got.base.as_deref(), Some("r1"));
        assert_eq!(got.job_id, Some(7));
        assert_eq!(got.stats.bytes_read, 123);
        assert_eq!(got.disks, r2.disks);
        assert_eq!(got.created, "1970-01-01T00:03:20Z");

        c.delete_recovery_point("r1").unwrap();
        assert!(matches!(
            c.delete_recovery_point("r1"),
            Err(Error::NotFound(m)) if m == "recovery point \"r1\""
        ));
        assert!(matches!(c.recovery_point("r1"), Err(Error::NotFound(_))));

        c.replace_recovery_points(&[rp("n1", "ds9", "h9/z", 5), rp("n2", "ds9", "h9/z", 6)])
            .unwrap();
        assert_eq!(ids(c.recovery_points(None).unwrap()), ["n1", "n2"]);
        assert_eq!(c.counts().unwrap().recovery_points, 2);
    }

    #[test]
    fn a_corrupt_consistency_is_named() {
        let c = Catalog::open_in_memory().unwrap();
        c.add_recovery_point(&rp("r1", "ds1", "h1/a", 100)).unwrap();
        c.conn
            .execute("UPDATE recovery_points SET consistency = 'bogus'", [])
            .unwrap();
        let e = c.recovery_point("r1").unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)));
        assert!(e.to_string().contains("recovery_points.consistency"), "{e}");
    }
}
