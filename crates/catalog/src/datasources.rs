//! Data sources: the VMs agents report, with ids that survive moves between hosts.

use std::collections::HashSet;

use protocol::{DataSourceInfo, DiskInfo, VmInfo};
use rusqlite::params;

use crate::{Catalog, Cols, Error, Result, random_id, sql_u64, to_json};

/// Data-source columns plus the group and the newest recovery point's time. The
/// correlated subquery walks `recovery_points_ds` backwards one step per data source,
/// so the listing is one statement however many recovery points there are.
pub(crate) const DS_SELECT: &str =
    "SELECT d.id, d.host, d.vm, d.vm_id, d.provider, d.disks, d.size,
        d.present, d.replica_state, m.group_name,
        (SELECT r.created FROM recovery_points r WHERE r.datasource_id = d.id
         ORDER BY r.created_unix DESC, r.id DESC LIMIT 1)
    FROM datasources d LEFT JOIN group_members m ON m.datasource_id = d.id";

fn ds_row(r: &Cols) -> Result<DataSourceInfo> {
    let host: String = r.get(1, "datasources.host")?;
    let vm: String = r.get(2, "datasources.vm")?;
    Ok(DataSourceInfo {
        id: r.get(0, "datasources.id")?,
        name: format!("{host}/{vm}"),
        host,
        vm,
        vm_id: r.get(3, "datasources.vm_id")?,
        provider: r.get(4, "datasources.provider")?,
        disks: r.json(5, "datasources.disks")?,
        size: r.u64(6, "datasources.size")?,
        present: r.bool(7, "datasources.present")?,
        replica_state: r.get(8, "datasources.replica_state")?,
        protection_group: r.get(9, "group_members.group_name")?,
        last_recovery_point: r.get(10, "recovery_points.created")?,
    })
}

/// Host and VM names follow the one name grammar (`protocol::check_name`); the server
/// leaves out VMs that break it before they get here.
fn check_name(what: &str, name: &str) -> Result<()> {
    protocol::check_name(&format!("{what} name"), name).map_err(Error::Invalid)
}

fn disks_size(disks: &[DiskInfo]) -> u64 {
    disks
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.virtual_size))
}

impl Catalog {
    /// Records what `host`'s agent reports, in one transaction.
    ///
    /// A VM is matched first by its hypervisor id (`vm_id`, on any host: a VM that moved
    /// keeps its data source, group and recovery points), then by `(host, name)`;
    /// otherwise it is new. If the moved VM's new `host/name` is already held by another
    /// data source, that one is taken instead (names are unique). Data sources of `host`
    /// not in `vms` are kept with `present = false`: their history matters.
    pub fn upsert_inventory(&self, now: i64, host: &str, vms: &[VmInfo]) -> Result<()> {
        check_name("host", host)?;
        let mut names = HashSet::new();
        for v in vms {
            check_name("VM", &v.name)?;
            if !names.insert(v.name.as_str()) {
                return Err(Error::Invalid(format!(
                    "inventory of {host} lists VM {:?} twice",
                    v.name
                )));
            }
        }
        let tx = self.conn.unchecked_transaction()?;
        let mut seen: HashSet<String> = HashSet::new();
        for v in vms {
            // A candidate still listed under its own name on this host is a different VM
            // sharing the id (a clone), not this one moved or renamed.
            let by_vm_id = match &v.vm_id {
                Some(vid) => self
                    .all(
                        "SELECT id, host, vm FROM datasources WHERE vm_id = ?1
                         ORDER BY present DESC, last_seen DESC",
                        [vid],
                        |r| {
                            Ok((
                                r.get::<String>(0, "datasources.id")?,
                                r.get::<String>(1, "datasources.host")?,
                                r.get::<String>(2, "datasources.vm")?,
                            ))
                        },
                    )?
                    .into_iter()
                    .find(|(id, h, vm)| {
                        let clone_here = h == host && names.contains(vm.as_str());
                        !seen.contains(id) && !clone_here
                    })
                    .map(|(id, _, _)| id),
                None => None,
            };
            let by_name = self.one(
                "SELECT id FROM datasources WHERE host = ?1 AND vm = ?2",
                [host, v.name.as_str()],
                |r| r.get::<String>(0, "datasources.id"),
            )?;
            let disks = to_json(&v.disks, "disks")?;
            let size = sql_u64(disks_size(&v.disks));
            let id = match (by_vm_id, by_name) {
                (_, Some(id)) => id,
                (Some(id), None) => id,
                (None, None) => {
                    let id = random_id()?;
                    tx.execute(
                        "INSERT INTO datasources
                             (id, host, vm, vm_id, provider, disks, size, first_seen, last_seen)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
                        params![id, host, v.name, v.vm_id, v.provider, disks, size, now],
                    )?;
                    id
                }
            };
            tx.execute(
                "UPDATE datasources SET host = ?2, vm = ?3, vm_id = ?4, provider = ?5,
                     disks = ?6, size = ?7, present = 1, last_seen = ?8
                 WHERE id = ?1",
                params![id, host, v.name, v.vm_id, v.provider, disks, size, now],
            )?;
            seen.insert(id);
        }
        let here = self.all(
            "SELECT id FROM datasources WHERE host = ?1 AND present = 1",
            [host],
            |r| r.get::<String>(0, "datasources.id"),
        )?;
        for id in here.iter().filter(|id| !seen.contains(*id)) {
            tx.execute("UPDATE datasources SET present = 0 WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every data source, by `HOST/VM`.
    pub fn datasources(&self) -> Result<Vec<DataSourceInfo>> {
        self.all(&format!("{DS_SELECT} ORDER BY d.host, d.vm"), [], ds_row)
    }

    pub fn datasource(&self, id: &str) -> Result<DataSourceInfo> {
        self.one(&format!("{DS_SELECT} WHERE d.id = ?1"), [id], ds_row)?
            .ok_or_else(|| Error::NotFound(format!("data source {id:?}")))
    }

    pub fn datasource_by_name(&self, host: &str, vm: &str) -> Result<DataSourceInfo> {
        self.one(
            &format!("{DS_SELECT} WHERE d.host = ?1 AND d.vm = ?2"),
            [host, vm],
            ds_row,
        )?
        .ok_or_else(|| Error::NotFound(format!("data source {host}/{vm}")))
    }

    /// `ok`, `inconsistent`, `unprotected` (or another short lowercase word the server
    /// defines).
    pub fn set_replica_state(&self, id: &str, state: &str) -> Result<()> {
        if state.is_empty()
            || state.len() > 32
            || !state.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        {
            return Err(Error::Invalid(format!(
                "replica state {state:?} is not valid"
            )));
        }
        let n = self.conn.execute(
            "UPDATE datasources SET replica_state = ?2 WHERE id = ?1",
            [id, state],
        )?;
        if n == 0 {
            return Err(Error::NotFound(format!("data source {id:?}")));
        }
        Ok(())
    }

    /// Resolves a `HOST/VM` name to its data-source id.
    pub(crate) fn resolve_vm(&self, name: &str) -> Result<String> {
        let (host, vm) = protocol::split_vm(name)
            .ok_or_else(|| Error::Invalid(format!("{name:?} is not a HOST/VM name")))?;
        self.one(
            "SELECT id FROM datasources WHERE host = ?1 AND vm = ?2",
            [host, vm],
            |r| r.get::<String>(0, "datasources.id"),
        )?
        .ok_or_else(|| Error::NotFound(format!("data source {host}/{vm}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn inventory_inserts_updates_and_marks_absent() {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(100, "h1", &[vm("a", Some("uuid-a"), 10), vm("b", None, 20)])
            .unwrap();
        let all = c.datasources().unwrap();
        assert_eq!(all.len(), 2);
        let a = c.datasource_by_name("h1", "a").unwrap();
        assert_eq!(a.name, "h1/a");
        assert_eq!(a.size, 10);
        assert_eq!(a.id.len(), 16);
        assert!(a.present);
        assert_eq!(a.replica_state, "unprotected");
        assert_eq!(a.protection_group, None);
        assert_eq!(a.last_recovery_point, None);
        assert_eq!(c.datasource(&a.id).unwrap().name, "h1/a");

        // b disappears, a grows a disk.
        let mut a2 = vm("a", Some("uuid-a"), 10);
        a2.disks.push(disk("data.qcow2", 5));
        c.upsert_inventory(200, "h1", &[a2]).unwrap();
        let a = c.datasource_by_name("h1", "a").unwrap();
        assert_eq!(a.size, 15);
        assert_eq!(a.disks.len(), 2);
        let b = c.datasource_by_name("h1", "b").unwrap();
        assert!(!b.present);

        // b comes back with the same id.
        c.upsert_inventory(300, "h1", &[vm("b", None, 20)]).unwrap();
        let b2 = c.datasource_by_name("h1", "b").unwrap();
        assert_eq!(b2.id, b.id);
        assert!(b2.present);
        assert!(!c.datasource_by_name("h1", "a").unwrap().present);

        let e = c.datasource_by_name("h1", "zz").unwrap_err();
        assert_eq!(e.to_string(), "data source h1/zz not found");
        assert!(matches!(c.datasource("nope"), Err(Error::NotFound(_))));
        assert!(matches!(
            c.upsert_inventory(1, "h1", &[vm("x", None, 1), vm("x", None, 1)]),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            c.upsert_inventory(1, "h1", &[vm("x/y", None, 1)]),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn a_moved_vm_keeps_its_id_group_and_recovery_points() {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(100, "h1", &[vm("a", Some("uuid-a"), 10)])
            .unwrap();
        let a = c.datasource_by_name("h1", "a").unwrap();
        c.create_group(110, "pg1", &policy(), &["h1/a".into()])
            .unwrap();
        c.add_recovery_point(&rp("rp1", &a.id, "h1/a", 120))
            .unwrap();

        // Moves to h2 (and is renamed there); h1 no longer reports it.
        c.upsert_inventory(200, "h2", &[vm("a-moved", Some("uuid-a"), 10)])
            .unwrap();
        c.upsert_inventory(201, "h1", &[]).unwrap();
        let moved = c.datasource_by_name("h2", "a-moved").unwrap();
        assert_eq!(moved.id, a.id);
        assert!(moved.present, "moving away from h1 does not mark it absent");
        assert_eq!(moved.protection_group.as_deref(), Some("pg1"));
        assert_eq!(
            moved.last_recovery_point.as_deref(),
            Some("1970-01-01T00:02:00Z")
        );
        assert_eq!(c.recovery_points(Some(&a.id)).unwrap().len(), 1);
        assert!(matches!(
            c.datasource_by_name("h1", "a"),
            Err(Error::NotFound(_))
        ));
        assert_eq!(c.datasources().unwrap().len(), 1);
        assert_eq!(c.group("pg1").unwrap().members[0].name, "h2/a-moved");
    }

    #[test]
    fn clones_sharing_a_vm_id_keep_their_own_data_sources() {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(100, "h1", &[vm("y", Some("same"), 10)])
            .unwrap();
        let y = c.datasource_by_name("h1", "y").unwrap().id;
        // x is a copy of y (same hypervisor id) and is listed first.
        c.upsert_inventory(
            200,
            "h1",
            &[vm("x", Some("same"), 10), vm("y", Some("same"), 10)],
        )
        .unwrap();
        assert_eq!(c.datasource_by_name("h1", "y").unwrap().id, y);
        assert_ne!(c.datasource_by_name("h1", "x").unwrap().id, y);
        // A rename on the same host takes over one of them (no new data source); the
        // other is no longer present.
        c.upsert_inventory(300, "h1", &[vm("y2", Some("same"), 10)])
            .unwrap();
        let all = c.datasources().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all.iter().filter(|d| d.present).count(), 1);
        assert!(c.datasource_by_name("h1", "y2").unwrap().present);
    }

    #[test]
    fn replica_state() {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(100, "h1", &[vm("a", None, 10)]).unwrap();
        let a = c.datasource_by_name("h1", "a").unwrap();
        c.set_replica_state(&a.id, "inconsistent").unwrap();
        assert_eq!(c.datasource(&a.id).unwrap().replica_state, "inconsistent");
        assert!(matches!(
            c.set_replica_state(&a.id, "Bad State"),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            c.set_replica_state("nope", "ok"),
            Err(Error::NotFound(_))
        ));
    }
}
