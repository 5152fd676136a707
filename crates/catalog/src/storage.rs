//! Storage targets: where online copies go. The catalog holds where a target is; its
//! secret never enters the catalog (the server keeps it in a file of its own).

use protocol::{AddStorage, StorageInfo, StorageKind, StorageLocation};
use rusqlite::params;

use crate::{Catalog, Cols, Error, Result, to_json};

fn storage_row(r: &Cols) -> Result<StorageInfo> {
    let kind = r.word(1, "storage_targets.kind", StorageKind::parse)?;
    let location: StorageLocation = r.json(2, "storage_targets.location")?;
    Ok(StorageInfo {
        name: r.get(0, "storage_targets.name")?,
        kind,
        url: location.url(kind),
        location,
        created: r.time(3, "storage_targets.created")?,
        // Filled in by `with_users`.
        used_by: Vec::new(),
    })
}

const SELECT: &str = "SELECT name, kind, location, created FROM storage_targets";

impl Catalog {
    /// Records a new target (validated; its secret is not stored here). A name in use
    /// is a conflict.
    pub fn add_storage(&self, now: i64, req: &AddStorage) -> Result<StorageInfo> {
        req.validate().map_err(Error::Invalid)?;
        let tx = self.conn.unchecked_transaction()?;
        if self.exists("SELECT 1 FROM storage_targets WHERE name = ?1", [&req.name])? {
            return Err(Error::Conflict(format!(
                "storage target {:?} already exists",
                req.name
            )));
        }
        tx.execute(
            "INSERT INTO storage_targets (name, kind, location, created)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                req.name,
                req.kind.as_str(),
                to_json(&req.location, "storage_targets.location")?,
                now
            ],
        )?;
        tx.commit()?;
        self.storage(&req.name)
    }

    /// Every target, by name.
    pub fn storage_targets(&self) -> Result<Vec<StorageInfo>> {
        let mut all = self.all(&format!("{SELECT} ORDER BY name"), [], storage_row)?;
        self.with_users(&mut all)?;
        Ok(all)
    }

    pub fn storage(&self, name: &str) -> Result<StorageInfo> {
        let t = self
            .one(&format!("{SELECT} WHERE name = ?1"), [name], storage_row)?
            .ok_or_else(|| Error::NotFound(format!("storage target {name:?}")))?;
        let mut one = [t];
        self.with_users(&mut one)?;
        let [t] = one;
        Ok(t)
    }

    /// Fills each target's `used_by`: the groups whose online protection goes there.
    fn with_users(&self, targets: &mut [StorageInfo]) -> Result<()> {
        let groups = self.groups()?;
        for t in targets {
            t.used_by = groups
                .iter()
                .filter(|g| {
                    g.policy
                        .online
                        .as_ref()
                        .is_some_and(|o| o.storage == t.name)
                })
                .map(|g| g.name.clone())
                .collect();
        }
        Ok(())
    }

    /// Forgets a target; refused while a protection group uses it.
    pub fn remove_storage(&self, name: &str) -> Result<StorageInfo> {
        let t = self.storage(name)?;
        if !t.used_by.is_empty() {
            return Err(Error::Conflict(format!(
                "storage target {name:?} is used by protection group(s) {}",
                t.used_by.join(", ")
            )));
        }
        self.conn
            .execute("DELETE FROM storage_targets WHERE name = ?1", [name])?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(name: &str) -> AddStorage {
        AddStorage {
            name: name.into(),
            kind: StorageKind::S3,
            location: StorageLocation {
                bucket: Some("backups".into()),
                region: Some("us-east-1".into()),
                endpoint: Some("http://127.0.0.1:5000".into()),
                access_key_id: Some("AKIDEXAMPLE".into()),
                ..StorageLocation::default()
            },
            secret: Some("wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY".into()),
        }
    }

    #[test]
    fn targets_are_kept_without_their_secret() {
        let c = Catalog::open_in_memory().unwrap();
        let t = c.add_storage(100, &s3("offsite")).unwrap();
        assert_eq!(t.url, "s3://backups");
        assert_eq!(t.kind, StorageKind::S3);
        assert!(matches!(
            c.add_storage(101, &s3("offsite")),
            Err(Error::Conflict(_))
        ));
        let mut bad = s3("x");
        bad.location.bucket = None;
        assert!(matches!(c.add_storage(101, &bad), Err(Error::Invalid(_))));
        assert_eq!(c.storage_targets().unwrap(), vec![t.clone()]);
        // The secret is nowhere in the row.
        let row: String = c
            .conn
            .query_row("SELECT location FROM storage_targets", [], |r| r.get(0))
            .unwrap();
        assert!(!row.contains("EXAMPLEKEY"), "{row}");
        assert_eq!(c.remove_storage("offsite").unwrap(), t);
        assert!(matches!(c.storage("offsite"), Err(Error::NotFound(_))));
        assert!(matches!(
            c.remove_storage("offsite"),
            Err(Error::NotFound(_))
        ));
    }
}
