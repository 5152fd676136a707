//! Data sources: the VMs agents report, with ids that survive moves between hosts.

use std::collections::HashSet;

use protocol::{DataSourceInfo, DataSourceName, ProviderKind, ReplicaState, VmDisk, VmInfo};
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
        name: DataSourceName::new(&host, &vm).ok_or_else(|| {
            Error::Corrupt(format!(
                "datasources.host, vm: {host:?}/{vm:?} is not HOST/VM"
            ))
        })?,
        host,
        vm,
        vm_id: r.get(3, "datasources.vm_id")?,
        provider: r.word(4, "datasources.provider", ProviderKind::parse)?,
        disks: r.json(5, "datasources.disks")?,
        size: r.u64(6, "datasources.size")?,
        present: r.bool(7, "datasources.present")?,
        replica_state: r.word(8, "datasources.replica_state", ReplicaState::parse)?,
        protection_group: r.get(9, "group_members.group_name")?,
        last_recovery_point: r.get(10, "recovery_points.created")?,
    })
}

/// Host and VM names follow the one name grammar (`protocol::check_name`); the server
/// leaves out VMs that break it before they get here.
fn check_name(what: &str, name: &str) -> Result<()> {
    protocol::check_name(&format!("{what} name"), name).map_err(Error::Invalid)
}

fn disks_size(disks: &[VmDisk]) -> u64 {
    disks
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.virtual_size))
}

/// A data source whose `HOST/VM` changed (moved to another host, or renamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub datasource_id: String,
    /// `HOST/VM` before.
    pub from: String,
    /// `HOST/VM` now.
    pub to: String,
    /// `renamed`, `cluster NAME` (live migration) or `administrator`.
    pub how: String,
}

/// A VM an agent reports under a VM id that another host's data source holds, where
/// that data source may not follow it: the data source stays, the claimant's VM is
/// held (not recorded as a data source) until an administrator decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// `HOSTA/VM`: what the reporting agent claims.
    pub claimant: String,
    /// `HOSTB/VM`: the data source that holds the id, left where it is.
    pub holder: String,
    /// Whether the holder's host still reports it.
    pub holder_present: bool,
    pub vm_id: String,
    /// First seen with this inventory (an earlier one did not make it).
    pub new: bool,
}

/// What [`Catalog::upsert_inventory`] did besides recording the VMs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryOutcome {
    pub moves: Vec<Move>,
    /// Every claim this inventory makes (repeats included: alerts count occurrences).
    pub conflicts: Vec<Conflict>,
    /// Data sources (`HOST/VM`) no host claims any more since this inventory.
    pub conflicts_ended: Vec<String>,
    /// This host's present data sources that have an open `vm-missing` alert.
    pub back: Vec<String>,
}

/// A data source holding a VM id.
/// One VM of an inventory, as it is written to its data source.
struct Reported<'a> {
    now: i64,
    host: &'a str,
    v: &'a VmInfo,
    /// `disks` as stored (JSON) and their total size.
    disks: String,
    size: i64,
    /// `HOST/VM` as reported.
    claimant: String,
}

/// How a reported VM got to its data source: held as a claim on another host's VM id,
/// and the move (rename, migration) that changed its name.
#[derive(Default)]
struct How {
    claimed: bool,
    moved: Option<String>,
}

impl How {
    fn moved(how: String) -> How {
        How {
            claimed: false,
            moved: Some(how),
        }
    }
}

/// The names of an inventory, each checked and listed once.
fn inventory_names<'a>(host: &str, vms: &'a [VmInfo]) -> Result<HashSet<&'a str>> {
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
    Ok(names)
}

struct Holder {
    id: String,
    host: String,
    vm: String,
    present: bool,
}

impl Catalog {
    /// Records what `host`'s agent reports, in one transaction.
    ///
    /// A reported VM is matched first by `(host, name)`, then by its hypervisor id
    /// (`vm_id`) among this host's data sources (a rename), then among other hosts'
    /// data sources: such a data source follows the VM (keeping its group and recovery
    /// points) only when its host no longer reports it and both hosts are in one
    /// cluster (live migration). Any other claim on another host's VM id is a
    /// [`Conflict`]: the data source stays where it is and the claimant's VM is held
    /// in `vm_claims`, not merged, so an enrolled agent cannot take over another
    /// host's VM by reporting its (not secret) id. A VM matched by name whose new id
    /// another host's data source holds keeps its old id (also a conflict). Data
    /// sources of `host` not in `vms` are kept with `present = false`: their history
    /// matters.
    pub fn upsert_inventory(
        &self,
        now: i64,
        host: &str,
        vms: &[VmInfo],
    ) -> Result<InventoryOutcome> {
        check_name("host", host)?;
        let names = inventory_names(host, vms)?;
        let my_cluster = self.cluster_of(host)?;
        let tx = self.conn.unchecked_transaction()?;
        let mut out = InventoryOutcome::default();
        let mut seen: HashSet<String> = HashSet::new();
        let mut claimed: HashSet<&str> = HashSet::new();
        for v in vms {
            let holders = self.id_holders(host, v, &names, &seen)?;
            let r = Reported {
                now,
                host,
                v,
                disks: to_json(&v.disks, "disks")?,
                size: sql_u64(disks_size(&v.disks)),
                claimant: format!("{host}/{}", v.name),
            };
            let Some((id, vm_id, how)) =
                self.match_reported(&tx, &r, &holders, &my_cluster, &mut out)?
            else {
                claimed.insert(v.name.as_str());
                continue;
            };
            if how.claimed {
                claimed.insert(v.name.as_str());
            }
            self.record_reported(&tx, &r, &id, &vm_id, how.moved, &mut out)?;
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
        self.end_claims(&tx, host, &claimed, &mut out)?;
        out.back = self.all(
            "SELECT a.subject FROM alerts a JOIN datasources d
                 ON a.subject = d.host || '/' || d.vm
             WHERE d.host = ?1 AND d.present = 1 AND a.kind = 'vm-missing'
                 AND a.resolved IS NULL",
            [host],
            |r| r.get(0, "alerts.subject"),
        )?;
        tx.commit()?;
        Ok(out)
    }

    /// The data sources holding `v`'s hypervisor id, present ones and the most recently
    /// seen first, except those already matched in this inventory. A candidate still
    /// listed under its own name on this host is a different VM sharing the id (a
    /// clone), not this one moved or renamed.
    fn id_holders(
        &self,
        host: &str,
        v: &VmInfo,
        names: &HashSet<&str>,
        seen: &HashSet<String>,
    ) -> Result<Vec<Holder>> {
        let Some(vid) = &v.vm_id else {
            return Ok(Vec::new());
        };
        Ok(self
            .all(
                "SELECT id, host, vm, present FROM datasources WHERE vm_id = ?1
                 ORDER BY present DESC, last_seen DESC",
                [vid],
                |r| {
                    Ok(Holder {
                        id: r.get(0, "datasources.id")?,
                        host: r.get(1, "datasources.host")?,
                        vm: r.get(2, "datasources.vm")?,
                        present: r.bool(3, "datasources.present")?,
                    })
                },
            )?
            .into_iter()
            .filter(|h| {
                let clone_here = h.host == host && names.contains(h.vm.as_str());
                !seen.contains(&h.id) && !clone_here
            })
            .collect())
    }

    /// The matching rule, in order: by `(host, name)` (keeping its old id when another
    /// host's data source holds the new one: a claim); by id among this host's data
    /// sources (a rename); by id among other hosts' (a migration within one cluster
    /// when the holder's host no longer reports it, else a claim: `None`); else a new
    /// data source. Returns the data source, the id it keeps and how it got there.
    fn match_reported(
        &self,
        tx: &rusqlite::Transaction<'_>,
        r: &Reported<'_>,
        holders: &[Holder],
        my_cluster: &Option<String>,
        out: &mut InventoryOutcome,
    ) -> Result<Option<(String, Option<String>, How)>> {
        let (now, host, v) = (r.now, r.host, r.v);
        let by_name = self.one(
            "SELECT id, vm_id FROM datasources WHERE host = ?1 AND vm = ?2",
            [host, v.name.as_str()],
            |r| {
                Ok((
                    r.get::<String>(0, "datasources.id")?,
                    r.get::<Option<String>>(1, "datasources.vm_id")?,
                ))
            },
        )?;
        let same_host = holders.iter().find(|h| h.host == host);
        let foreign = holders.iter().find(|h| h.host != host);
        let stays = How::default();
        Ok(Some(match by_name {
            Some((id, old)) => match foreign {
                // Its own VM, now reporting an id another host's data source holds:
                // kept, without the id.
                Some(f) if old != v.vm_id => {
                    self.claim(now, host, v, f, &r.claimant, out)?;
                    let how = How {
                        claimed: true,
                        moved: None,
                    };
                    (id, old, how)
                }
                _ => (id, v.vm_id.clone(), stays),
            },
            None => match (same_host, foreign) {
                (Some(h), _) => (h.id.clone(), v.vm_id.clone(), How::moved("renamed".into())),
                (None, Some(f)) => {
                    let migrated = match my_cluster {
                        Some(k) if !f.present => (self.cluster_of(&f.host)?.as_ref() == Some(k))
                            .then(|| format!("cluster {k}")),
                        _ => None,
                    };
                    match migrated {
                        Some(how) => (f.id.clone(), v.vm_id.clone(), How::moved(how)),
                        None => {
                            self.claim(now, host, v, f, &r.claimant, out)?;
                            return Ok(None);
                        }
                    }
                }
                (None, None) => {
                    let id = random_id()?;
                    tx.execute(
                        "INSERT INTO datasources
                             (id, host, vm, vm_id, provider, disks, size, first_seen, last_seen)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
                        params![
                            id,
                            host,
                            v.name,
                            v.vm_id,
                            v.provider.as_str(),
                            r.disks,
                            r.size,
                            now
                        ],
                    )?;
                    (id, v.vm_id.clone(), stays)
                }
            },
        }))
    }

    /// Data source `id` is now the reported VM: its move recorded when its name
    /// changed, then its row brought up to date and present.
    fn record_reported(
        &self,
        tx: &rusqlite::Transaction<'_>,
        r: &Reported<'_>,
        id: &str,
        vm_id: &Option<String>,
        how: Option<String>,
        out: &mut InventoryOutcome,
    ) -> Result<()> {
        let v = r.v;
        if let Some(how) = how {
            let from = self.datasource(id)?.name.to_string();
            if from != r.claimant {
                self.record_move(r.now, id, &from, &r.claimant, &how)?;
                out.moves.push(Move {
                    datasource_id: id.to_string(),
                    from,
                    to: r.claimant.clone(),
                    how,
                });
            }
        }
        tx.execute(
            "UPDATE datasources SET host = ?2, vm = ?3, vm_id = ?4, provider = ?5,
                 disks = ?6, size = ?7, present = 1, last_seen = ?8
             WHERE id = ?1",
            params![
                id,
                r.host,
                v.name,
                vm_id,
                v.provider.as_str(),
                r.disks,
                r.size,
                r.now
            ],
        )?;
        Ok(())
    }

    /// Claims `host` no longer makes end; a data source nobody claims any more is out
    /// of conflict.
    fn end_claims(
        &self,
        tx: &rusqlite::Transaction<'_>,
        host: &str,
        claimed: &HashSet<&str>,
        out: &mut InventoryOutcome,
    ) -> Result<()> {
        let old_claims = self.all(
            "SELECT vm, datasource_id FROM vm_claims WHERE host = ?1",
            [host],
            |r| {
                Ok((
                    r.get::<String>(0, "vm_claims.vm")?,
                    r.get::<String>(1, "vm_claims.datasource_id")?,
                ))
            },
        )?;
        for (vm, ds) in old_claims {
            if claimed.contains(vm.as_str()) {
                continue;
            }
            tx.execute(
                "DELETE FROM vm_claims WHERE host = ?1 AND vm = ?2",
                [host, vm.as_str()],
            )?;
            if !self.exists("SELECT 1 FROM vm_claims WHERE datasource_id = ?1", [&ds])? {
                out.conflicts_ended
                    .push(self.datasource(&ds)?.name.to_string());
            }
        }
        Ok(())
    }

    /// Holds `v` (reported by `host`) as a claim on `holder`'s VM id.
    fn claim(
        &self,
        now: i64,
        host: &str,
        v: &VmInfo,
        holder: &Holder,
        claimant: &str,
        out: &mut InventoryOutcome,
    ) -> Result<()> {
        let before = self.one(
            "SELECT datasource_id FROM vm_claims WHERE host = ?1 AND vm = ?2",
            [host, v.name.as_str()],
            |r| r.get::<String>(0, "vm_claims.datasource_id"),
        )?;
        self.conn.execute(
            "INSERT INTO vm_claims (host, vm, datasource_id, info, first_seen, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (host, vm) DO UPDATE SET datasource_id = excluded.datasource_id,
                 info = excluded.info, last_seen = excluded.last_seen",
            params![host, v.name, holder.id, to_json(v, "vm")?, now],
        )?;
        out.conflicts.push(Conflict {
            claimant: claimant.to_string(),
            holder: format!("{}/{}", holder.host, holder.vm),
            holder_present: holder.present,
            vm_id: v.vm_id.clone().unwrap_or_default(),
            new: before.as_deref() != Some(holder.id.as_str()),
        });
        Ok(())
    }

    fn record_move(&self, now: i64, id: &str, from: &str, to: &str, how: &str) -> Result<()> {
        let (Some((oh, ov)), Some((nh, nv))) = (protocol::split_vm(from), protocol::split_vm(to))
        else {
            return Err(Error::Invalid(format!(
                "move {from:?} -> {to:?}: not HOST/VM"
            )));
        };
        self.conn.execute(
            "INSERT INTO datasource_moves
                 (datasource_id, old_host, old_vm, new_host, new_vm, time, how)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![id, oh, ov, nh, nv, now, how],
        )?;
        Ok(())
    }

    /// An administrator's move of the data source `HOST/VM` to the VM `to` reports
    /// under the same id (held as a claim, or recorded) or, failing that, the same name.
    /// Refused when `to` reports no such VM, or when the VM there is a data source
    /// with history of its own (recovery points, a group). The data source keeps its
    /// id, group membership and recovery points.
    pub fn move_datasource(&self, now: i64, host: &str, vm: &str, to: &str) -> Result<Move> {
        check_name("host", to)?;
        let tx = self.conn.unchecked_transaction()?;
        let d = self.datasource_by_name(host, vm)?;
        if d.host == to {
            return Err(Error::Invalid(format!("{} is already on {to}", d.name)));
        }
        let claim = self.one(
            "SELECT info FROM vm_claims WHERE host = ?1 AND datasource_id = ?2
             ORDER BY last_seen DESC LIMIT 1",
            [to, d.id.as_str()],
            |r| r.json::<VmInfo>(0, "vm_claims.info"),
        )?;
        let recorded = |sql: &str, key: &str| {
            self.one(sql, [to, key], |r| r.get::<String>(0, "datasources.id"))
        };
        let target: VmInfo = match claim {
            Some(v) => v,
            None => {
                let by_id = match &d.vm_id {
                    Some(vid) => recorded(
                        "SELECT id FROM datasources WHERE host = ?1 AND vm_id = ?2 AND present = 1",
                        vid,
                    )?,
                    None => None,
                };
                let t = match by_id {
                    Some(t) => Some(t),
                    None => recorded(
                        "SELECT id FROM datasources WHERE host = ?1 AND vm = ?2 AND present = 1",
                        &d.vm,
                    )?,
                };
                let t = t.ok_or_else(|| {
                    Error::Conflict(format!(
                        "{to} reports no VM {}named {:?}; {} stays on {}",
                        d.vm_id
                            .as_ref()
                            .map(|i| format!("with id {i} and none "))
                            .unwrap_or_default(),
                        d.vm,
                        d.name,
                        d.host
                    ))
                })?;
                let t = self.datasource(&t)?;
                VmInfo {
                    name: t.vm,
                    vm_id: t.vm_id.or_else(|| d.vm_id.clone()),
                    provider: t.provider,
                    disks: t.disks,
                    running: None,
                }
            }
        };
        // The VM there may be recorded as a data source of its own (matched by name):
        // it gives way only if it has no history.
        if let Ok(t) = self.datasource_by_name(to, &target.name)
            && t.id != d.id
        {
            let points = self.recovery_points(Some(&t.id))?.len();
            if points > 0 || t.protection_group.is_some() {
                return Err(Error::Conflict(format!(
                    "{} is a data source with its own history ({points} recovery points{}); \
                     remove it from its group and forget its recovery points first",
                    t.name,
                    t.protection_group
                        .as_ref()
                        .map(|g| format!(", group {g:?}"))
                        .unwrap_or_default()
                )));
            }
            tx.execute("DELETE FROM datasources WHERE id = ?1", [&t.id])?;
        }
        let to_name = format!("{to}/{}", target.name);
        self.record_move(now, &d.id, &d.name, &to_name, "administrator")?;
        tx.execute(
            "UPDATE datasources SET host = ?2, vm = ?3, vm_id = ?4, provider = ?5,
                 disks = ?6, size = ?7, present = 1, last_seen = ?8
             WHERE id = ?1",
            params![
                d.id,
                to,
                target.name,
                target.vm_id,
                target.provider.as_str(),
                to_json(&target.disks, "disks")?,
                sql_u64(disks_size(&target.disks)),
                now
            ],
        )?;
        // Its claims are settled: the data source is where the administrator put it.
        tx.execute("DELETE FROM vm_claims WHERE datasource_id = ?1", [&d.id])?;
        tx.commit()?;
        Ok(Move {
            datasource_id: d.id,
            from: d.name.to_string(),
            to: to_name,
            how: "administrator".into(),
        })
    }

    /// Where the data source once named `host/vm` is now: its `HOST/VM` and when it
    /// moved, if it moved and still exists.
    pub fn moved_to(&self, host: &str, vm: &str) -> Result<Option<(String, String)>> {
        let m = self.one(
            "SELECT datasource_id, time FROM datasource_moves
             WHERE old_host = ?1 AND old_vm = ?2 ORDER BY id DESC LIMIT 1",
            [host, vm],
            |r| {
                Ok((
                    r.get::<String>(0, "datasource_moves.datasource_id")?,
                    r.time(1, "datasource_moves.time")?,
                ))
            },
        )?;
        Ok(match m {
            Some((id, when)) => self
                .one(
                    "SELECT host || '/' || vm FROM datasources WHERE id = ?1",
                    [id],
                    |r| r.get::<String>(0, "datasources.host"),
                )?
                .map(|name| (name, when)),
            None => None,
        })
    }

    /// The VMs held as claims on other hosts' VM ids: `(HOSTA/VM, HOSTB/VM)` pairs.
    pub fn vm_claims(&self) -> Result<Vec<(String, String)>> {
        self.all(
            "SELECT c.host || '/' || c.vm, d.host || '/' || d.vm
             FROM vm_claims c JOIN datasources d ON d.id = c.datasource_id
             ORDER BY c.host, c.vm",
            [],
            |r| Ok((r.get(0, "vm_claims.vm")?, r.get(1, "datasources.vm")?)),
        )
    }

    /// Every data source, by `HOST/VM`.
    pub fn datasources(&self) -> Result<Vec<DataSourceInfo>> {
        self.all(&format!("{DS_SELECT} ORDER BY d.host, d.vm"), [], ds_row)
    }

    pub fn datasource(&self, id: &str) -> Result<DataSourceInfo> {
        self.one(&format!("{DS_SELECT} WHERE d.id = ?1"), [id], ds_row)?
            .ok_or_else(|| Error::NotFound(format!("data source {id:?}")))
    }

    /// A data source by its current name; an old name of a moved one is
    /// [`Error::Moved`], naming where it went.
    pub fn datasource_by_name(&self, host: &str, vm: &str) -> Result<DataSourceInfo> {
        match self.one(
            &format!("{DS_SELECT} WHERE d.host = ?1 AND d.vm = ?2"),
            [host, vm],
            ds_row,
        )? {
            Some(d) => Ok(d),
            None => Err(self.not_found(host, vm)?),
        }
    }

    fn not_found(&self, host: &str, vm: &str) -> Result<Error> {
        Ok(match self.moved_to(host, vm)? {
            Some((to, when)) => Error::Moved {
                from: format!("{host}/{vm}"),
                to,
                when,
            },
            None => Error::NotFound(format!("data source {host}/{vm}")),
        })
    }

    pub fn set_replica_state(&self, id: &str, state: ReplicaState) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE datasources SET replica_state = ?2 WHERE id = ?1",
            [id, state.as_str()],
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
        .map_or_else(|| Err(self.not_found(host, vm)?), Ok)
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
        assert_eq!(a.replica_state, ReplicaState::Unprotected);
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
        c.create_cluster(1, "k", &["h1".into(), "h2".into()])
            .unwrap();
        c.upsert_inventory(100, "h1", &[vm("a", Some("uuid-a"), 10)])
            .unwrap();
        let a = c.datasource_by_name("h1", "a").unwrap();
        c.create_group(110, "pg1", &policy(), &["h1/a".into()])
            .unwrap();
        c.add_recovery_point(&rp("rp1", &a.id, "h1/a", 120))
            .unwrap();

        // Live migration within the cluster: h1 no longer reports it, h2 does (and it
        // is renamed there).
        c.upsert_inventory(199, "h1", &[]).unwrap();
        let out = c
            .upsert_inventory(200, "h2", &[vm("a-moved", Some("uuid-a"), 10)])
            .unwrap();
        assert_eq!(
            out.moves,
            [Move {
                datasource_id: a.id.clone(),
                from: "h1/a".into(),
                to: "h2/a-moved".into(),
                how: "cluster k".into(),
            }]
        );
        assert!(out.conflicts.is_empty());
        let moved = c.datasource_by_name("h2", "a-moved").unwrap();
        assert_eq!(moved.id, a.id);
        assert!(moved.present);
        assert_eq!(moved.protection_group.as_deref(), Some("pg1"));
        assert_eq!(
            moved.last_recovery_point.as_deref(),
            Some("1970-01-01T00:02:00Z")
        );
        assert_eq!(c.recovery_points(Some(&a.id)).unwrap().len(), 1);
        // The old name says where it went.
        let e = c.datasource_by_name("h1", "a").unwrap_err();
        assert!(matches!(e, Error::Moved { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "h1/a moved to h2/a-moved at 1970-01-01T00:03:20Z; use h2/a-moved"
        );
        assert_eq!(c.datasources().unwrap().len(), 1);
        assert_eq!(c.group("pg1").unwrap().members[0].name, "h2/a-moved");
    }

    /// The matching rule against takeover: another host's VM id moves a data source
    /// only from an absent VM of a host in the claimant's cluster.
    #[test]
    fn a_vm_id_claimed_by_another_host_never_moves_the_data_source() {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(100, "hb", &[vm("web", Some("id-w"), 10)])
            .unwrap();
        let web = c.datasource_by_name("hb", "web").unwrap();
        c.create_group(101, "pg", &policy(), &["hb/web".into()])
            .unwrap();

        // ha claims hb/web's id while hb still reports it: held, alerted, not merged.
        let out = c
            .upsert_inventory(
                110,
                "ha",
                &[vm("evil", Some("id-w"), 1), vm("own", None, 1)],
            )
            .unwrap();
        assert!(out.moves.is_empty());
        assert_eq!(
            out.conflicts,
            [Conflict {
                claimant: "ha/evil".into(),
                holder: "hb/web".into(),
                holder_present: true,
                vm_id: "id-w".into(),
                new: true,
            }]
        );
        let still = c.datasource_by_name("hb", "web").unwrap();
        assert_eq!((still.id.as_str(), still.present), (web.id.as_str(), true));
        assert_eq!(still.protection_group.as_deref(), Some("pg"));
        assert!(matches!(
            c.datasource_by_name("ha", "evil"),
            Err(Error::NotFound(_))
        ));
        assert!(c.datasource_by_name("ha", "own").is_ok());
        assert_eq!(
            c.vm_claims().unwrap(),
            [("ha/evil".into(), "hb/web".into())]
        );

        // Repeats do not flip it; hb's own inventory keeps it.
        for t in 0..3 {
            let o = c
                .upsert_inventory(120 + t, "ha", &[vm("evil", Some("id-w"), 1)])
                .unwrap();
            assert!(!o.conflicts[0].new);
            c.upsert_inventory(121 + t, "hb", &[vm("web", Some("id-w"), 10)])
                .unwrap();
            assert_eq!(c.datasource_by_name("hb", "web").unwrap().id, web.id);
        }

        // hb stops reporting it, but ha is in no cluster with hb: still held.
        c.upsert_inventory(130, "hb", &[]).unwrap();
        let o = c
            .upsert_inventory(131, "ha", &[vm("evil", Some("id-w"), 1)])
            .unwrap();
        assert!(o.moves.is_empty());
        assert!(!o.conflicts[0].holder_present);
        assert_eq!(c.datasource_by_name("hb", "web").unwrap().id, web.id);

        // A cluster of other hosts does not help ha either.
        c.create_cluster(132, "k", &["ha".into(), "hc".into()])
            .unwrap();
        let o = c
            .upsert_inventory(133, "ha", &[vm("evil", Some("id-w"), 1)])
            .unwrap();
        assert!(o.moves.is_empty() && o.conflicts.len() == 1);

        // A VM known by name on ha that starts reporting hb's id keeps its own id.
        c.upsert_inventory(134, "ha", &[vm("own", Some("id-w"), 1)])
            .unwrap();
        assert_eq!(c.datasource_by_name("ha", "own").unwrap().vm_id, None);
        // The claim on "evil" ended; the one of "own" stands.
        assert_eq!(c.vm_claims().unwrap(), [("ha/own".into(), "hb/web".into())]);
        let o = c
            .upsert_inventory(135, "ha", &[vm("own", None, 1)])
            .unwrap();
        assert_eq!(o.conflicts_ended, ["hb/web"]);
        assert!(c.vm_claims().unwrap().is_empty());

        // Once hb is in ha's cluster, the absent VM follows its id (live migration).
        c.add_cluster_hosts("k", &["hb".into()]).unwrap();
        let o = c
            .upsert_inventory(
                140,
                "ha",
                &[vm("web", Some("id-w"), 10), vm("own", None, 1)],
            )
            .unwrap();
        assert_eq!(o.moves.len(), 1);
        assert_eq!(o.moves[0].how, "cluster k");
        assert_eq!(c.datasource_by_name("ha", "web").unwrap().id, web.id);
    }

    #[test]
    fn an_administrator_moves_a_held_claim_or_refuses() {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(100, "hb", &[vm("web", Some("id-w"), 10)])
            .unwrap();
        let web = c.datasource_by_name("hb", "web").unwrap();
        c.create_group(101, "pg", &policy(), &["hb/web".into()])
            .unwrap();
        c.add_recovery_point(&rp("rp1", &web.id, "hb/web", 102))
            .unwrap();
        // ha reports nothing like it: refused, nothing moves.
        c.upsert_inventory(103, "ha", &[vm("other", None, 1)])
            .unwrap();
        let e = c.move_datasource(104, "hb", "web", "ha").unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        assert!(
            e.to_string().contains("ha reports no VM with id id-w"),
            "{e}"
        );
        assert!(matches!(
            c.move_datasource(104, "hb", "web", "hb"),
            Err(Error::Invalid(_))
        ));
        // The VM really moved to ha (no cluster): held; the administrator moves it.
        c.upsert_inventory(110, "hb", &[]).unwrap();
        c.upsert_inventory(111, "ha", &[vm("web", Some("id-w"), 12)])
            .unwrap();
        let m = c.move_datasource(112, "hb", "web", "ha").unwrap();
        assert_eq!((m.from.as_str(), m.to.as_str()), ("hb/web", "ha/web"));
        let d = c.datasource_by_name("ha", "web").unwrap();
        assert_eq!(d.id, web.id);
        assert_eq!(d.size, 12);
        assert!(d.present);
        assert_eq!(d.protection_group.as_deref(), Some("pg"));
        assert_eq!(c.recovery_points(Some(&d.id)).unwrap().len(), 1);
        assert!(c.vm_claims().unwrap().is_empty());
        // ha's next inventory keeps it there, with no conflict.
        let o = c
            .upsert_inventory(113, "ha", &[vm("web", Some("id-w"), 12)])
            .unwrap();
        assert!(o.conflicts.is_empty() && o.moves.is_empty());
        let e = c.datasource_by_name("hb", "web").unwrap_err();
        assert!(e.to_string().starts_with("hb/web moved to ha/web"), "{e}");
        // A target with its own history is not overwritten.
        c.upsert_inventory(120, "hc", &[vm("web", None, 1)])
            .unwrap();
        let hc = c.datasource_by_name("hc", "web").unwrap();
        c.add_recovery_point(&rp("rp2", &hc.id, "hc/web", 121))
            .unwrap();
        let e = c.move_datasource(122, "ha", "web", "hc").unwrap_err();
        assert!(
            e.to_string().contains("its own history (1 recovery points"),
            "{e}"
        );
        assert_eq!(c.datasource_by_name("ha", "web").unwrap().id, web.id);
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
        c.set_replica_state(&a.id, ReplicaState::Inconsistent)
            .unwrap();
        assert_eq!(
            c.datasource(&a.id).unwrap().replica_state,
            ReplicaState::Inconsistent
        );
        assert!(matches!(
            c.set_replica_state("nope", ReplicaState::Ok),
            Err(Error::NotFound(_))
        ));
        // A word the code does not know, in a damaged catalog, is named when read.
        c.conn
            .execute(
                "UPDATE datasources SET replica_state = 'Bad State', provider = 'qemu'",
                [],
            )
            .unwrap();
        let e = c.datasource(&a.id).unwrap_err().to_string();
        assert!(
            e.contains("datasources.replica_state: unknown \"Bad State\""),
            "{e}"
        );
    }
}
