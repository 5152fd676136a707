//! Online copies: which recovery points each storage target holds. A copy keeps the
//! point's record, because long-term retention keeps it after the point on disk is gone
//! (and a server rebuilt after a disaster knows its points only from the targets).

use protocol::RecoveryPointInfo;
use rusqlite::params;
use std::collections::BTreeMap;

use crate::{Catalog, Cols, Result, to_json};

fn online_row(r: &Cols) -> Result<(String, RecoveryPointInfo)> {
    Ok((
        r.get(0, "online_points.storage")?,
        r.json(1, "online_points.info")?,
    ))
}

/// `online:NAME`, as `locations` lists a target.
pub fn online_location(storage: &str) -> String {
    format!("online:{storage}")
}

impl Catalog {
    /// Records that `storage` holds a copy of `rp` (again is fine: the record is
    /// replaced).
    pub fn add_online_point(&self, storage: &str, rp: &RecoveryPointInfo, now: i64) -> Result<()> {
        let mut info = rp.clone();
        info.locations.clear();
        self.conn.execute(
            "INSERT INTO online_points (storage, id, vm, created_unix, info, copied)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (storage, id) DO UPDATE SET info = excluded.info",
            params![
                storage,
                rp.id,
                rp.vm,
                rp.created_unix,
                to_json(&info, "online_points.info")?,
                now
            ],
        )?;
        Ok(())
    }

    /// The copies on `storage` (or on every target), oldest first, as (target, point).
    pub fn online_points(&self, storage: Option<&str>) -> Result<Vec<(String, RecoveryPointInfo)>> {
        match storage {
            Some(s) => self.all(
                "SELECT storage, info FROM online_points WHERE storage = ?1
                 ORDER BY created_unix, id, storage",
                [s],
                online_row,
            ),
            None => self.all(
                "SELECT storage, info FROM online_points ORDER BY created_unix, id, storage",
                [],
                online_row,
            ),
        }
    }

    /// The copy of point `id` on `storage`, if the catalog knows of one.
    pub fn online_point(&self, storage: &str, id: &str) -> Result<Option<RecoveryPointInfo>> {
        Ok(self
            .one(
                "SELECT storage, info FROM online_points WHERE storage = ?1 AND id = ?2",
                [storage, id],
                online_row,
            )?
            .map(|(_, rp)| rp))
    }

    /// Forgets copies `ids` on `storage` (pruned there).
    pub fn remove_online_points(&self, storage: &str, ids: &[String]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        for id in ids {
            tx.execute(
                "DELETE FROM online_points WHERE storage = ?1 AND id = ?2",
                [storage, id.as_str()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces what the catalog knows of `storage`'s copies (attaching a target, or
    /// reading its list again), in one transaction.
    pub fn replace_online_points(
        &self,
        storage: &str,
        rps: &[RecoveryPointInfo],
        now: i64,
    ) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute("DELETE FROM online_points WHERE storage = ?1", [storage])?;
        for rp in rps {
            self.add_online_point(storage, rp, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Recovery points wherever they live, oldest first, each with its `locations`:
    /// those on disk (of data source `datasource_id`, or all) and the online copies
    /// (of source name `vm`, or all) that are no longer on disk. With a data source but
    /// no `vm`, online copies are matched by the data source's id.
    pub fn recovery_points_everywhere(
        &self,
        datasource_id: Option<&str>,
        vm: Option<&str>,
    ) -> Result<Vec<RecoveryPointInfo>> {
        let mut by_id: BTreeMap<String, RecoveryPointInfo> = BTreeMap::new();
        let local = match (datasource_id, vm) {
            (None, Some(_)) => Vec::new(),
            (ds, _) => self.recovery_points(ds)?,
        };
        for rp in local {
            by_id.insert(rp.id.clone(), rp);
        }
        for (storage, rp) in self.online_points(None)? {
            let wanted = match (vm, datasource_id) {
                (Some(v), _) => rp.vm == v,
                (None, Some(ds)) => rp.datasource_id == ds,
                (None, None) => true,
            };
            if !wanted {
                continue;
            }
            by_id
                .entry(rp.id.clone())
                .or_insert_with(|| RecoveryPointInfo {
                    locations: Vec::new(),
                    ..rp
                })
                .locations
                .push(online_location(&storage));
        }
        let mut all: Vec<RecoveryPointInfo> = by_id.into_values().collect();
        all.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;
    use protocol::{AddStorage, StorageKind, StorageLocation};

    fn rp(id: &str, vm: &str, ds: &str, t: i64) -> RecoveryPointInfo {
        crate::test_util::rp(id, ds, vm, t)
    }

    fn folder(c: &Catalog, name: &str) {
        c.add_storage(
            1,
            &AddStorage {
                name: name.into(),
                kind: StorageKind::Folder,
                location: StorageLocation {
                    path: Some(format!("/srv/{name}")),
                    ..StorageLocation::default()
                },
                secret: None,
            },
        )
        .unwrap();
    }

    #[test]
    fn locations_merge_disk_and_targets() {
        let c = Catalog::open_in_memory().unwrap();
        folder(&c, "nas");
        folder(&c, "cloud");
        let a = rp("a", "h1/vm1", "ds1", 10);
        let b = rp("b", "h1/vm1", "ds1", 20);
        let old = rp("old", "h1/vm1", "ds1", 5);
        c.add_recovery_point(&a).unwrap();
        c.add_recovery_point(&b).unwrap();
        c.add_online_point("nas", &a, 30).unwrap();
        c.add_online_point("cloud", &a, 30).unwrap();
        // Pruned on disk, kept online.
        c.add_online_point("cloud", &old, 30).unwrap();
        // Another VM's copy.
        c.add_online_point("cloud", &rp("z", "h2/vm9", "ds9", 7), 30)
            .unwrap();

        let ids = |all: Vec<RecoveryPointInfo>| -> Vec<(String, Vec<String>)> {
            all.into_iter().map(|r| (r.id, r.locations)).collect()
        };
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            ids(c
                .recovery_points_everywhere(Some("ds1"), Some("h1/vm1"))
                .unwrap()),
            vec![
                ("old".into(), l(&["online:cloud"])),
                ("a".into(), l(&["disk", "online:cloud", "online:nas"])),
                ("b".into(), l(&["disk"])),
            ]
        );
        // A server that knows the VM only from its online copies (after a disaster).
        assert_eq!(
            ids(c.recovery_points_everywhere(None, Some("h1/vm1")).unwrap()),
            vec![
                ("old".into(), l(&["online:cloud"])),
                ("a".into(), l(&["online:cloud", "online:nas"])),
            ]
        );
        assert_eq!(c.recovery_points_everywhere(None, None).unwrap().len(), 4);
        c.remove_online_points("cloud", &["old".into()]).unwrap();
        assert!(c.online_point("cloud", "old").unwrap().is_none());
        c.replace_online_points("nas", std::slice::from_ref(&b), 40)
            .unwrap();
        let nas: Vec<String> = c
            .online_points(Some("nas"))
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.id)
            .collect();
        assert_eq!(nas, vec!["b".to_string()]);
    }
}
