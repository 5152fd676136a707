//! Protection groups: a policy and the data sources it protects.

use std::collections::BTreeMap;

use protocol::Policy;
use rusqlite::params;
use serde::Serialize;

use crate::{Catalog, Cols, Error, Result, to_json};

/// A protection group with its members.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupRow {
    pub name: String,
    pub policy: Policy,
    pub created: String,
    /// By name.
    pub members: Vec<GroupMember>,
}

impl GroupRow {
    /// The members' `HOST/VM` names (as `protocol::GroupInfo` lists them).
    pub fn member_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// Sum of the members' virtual disk sizes (the allocation review's data size).
    pub fn data_size(&self) -> u64 {
        self.members
            .iter()
            .fold(0u64, |a, m| a.saturating_add(m.size))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupMember {
    pub datasource_id: String,
    /// `HOST/VM` now (it follows a VM that moves).
    pub name: String,
    /// Sum of the virtual disk sizes.
    pub size: u64,
}

/// The one name grammar (`protocol::check_name`): safe in URLs, file names and logs.
fn check_group_name(name: &str) -> Result<()> {
    protocol::check_name("protection group name", name).map_err(Error::Invalid)
}

fn check_policy(p: &Policy) -> Result<()> {
    p.validate().map_err(Error::Invalid)
}

const MEMBER_SELECT: &str = "SELECT m.group_name, d.id, d.host || '/' || d.vm, d.size
    FROM group_members m JOIN datasources d ON d.id = m.datasource_id";

fn member_row(r: &Cols) -> Result<(String, GroupMember)> {
    Ok((
        r.get(0, "group_members.group_name")?,
        GroupMember {
            datasource_id: r.get(1, "datasources.id")?,
            name: r.get(2, "datasources.vm")?,
            size: r.u64(3, "datasources.size")?,
        },
    ))
}

impl Catalog {
    /// Creates a group. Members are `HOST/VM` names; each may belong to no other group.
    pub fn create_group(
        &self,
        now: i64,
        name: &str,
        policy: &Policy,
        members: &[String],
    ) -> Result<GroupRow> {
        check_group_name(name)?;
        check_policy(policy)?;
        self.check_online_target(policy)?;
        let tx = self.conn.unchecked_transaction()?;
        if self.exists("SELECT 1 FROM groups WHERE name = ?1", [name])? {
            return Err(Error::Conflict(format!(
                "protection group {name:?} already exists"
            )));
        }
        tx.execute(
            "INSERT INTO groups (name, policy, created) VALUES (?1, ?2, ?3)",
            params![name, to_json(policy, "policy")?, now],
        )?;
        for m in members {
            self.add_member(name, m)?;
        }
        let row = self.group(name)?;
        tx.commit()?;
        Ok(row)
    }

    /// An online policy names a storage target that exists.
    fn check_online_target(&self, p: &Policy) -> Result<()> {
        match &p.online {
            Some(o) => match self.storage(&o.storage) {
                Err(Error::NotFound(_)) => Err(Error::Invalid(format!(
                    "policy.online.storage: no storage target {:?}; add it with `holdfast storage add`",
                    o.storage
                ))),
                r => r.map(|_| ()),
            },
            None => Ok(()),
        }
    }

    /// Adds `member` (`HOST/VM`) to `group`; already a member is fine.
    fn add_member(&self, group: &str, member: &str) -> Result<()> {
        let id = self.resolve_vm(member)?;
        match self.group_of(&id)? {
            Some(g) if g == group => Ok(()),
            Some(g) => Err(Error::Conflict(format!(
                "{member} already belongs to protection group {g:?}; a VM belongs to at \
                 most one group"
            ))),
            None => {
                self.conn.execute(
                    "INSERT INTO group_members (group_name, datasource_id) VALUES (?1, ?2)",
                    [group, id.as_str()],
                )?;
                Ok(())
            }
        }
    }

    pub fn group(&self, name: &str) -> Result<GroupRow> {
        let (policy, created) = self
            .one(
                "SELECT policy, created FROM groups WHERE name = ?1",
                [name],
                |r| {
                    Ok((
                        r.json::<Policy>(0, "groups.policy")?,
                        r.time(1, "groups.created")?,
                    ))
                },
            )?
            .ok_or_else(|| Error::NotFound(format!("protection group {name:?}")))?;
        let members = self.all(
            &format!("{MEMBER_SELECT} WHERE m.group_name = ?1 ORDER BY d.host, d.vm"),
            [name],
            |r| Ok(member_row(r)?.1),
        )?;
        Ok(GroupRow {
            name: name.to_string(),
            policy,
            created,
            members,
        })
    }

    /// Every group, by name (two statements, whatever the number of groups).
    pub fn groups(&self) -> Result<Vec<GroupRow>> {
        let mut groups: BTreeMap<String, GroupRow> = BTreeMap::new();
        for g in self.all("SELECT name, policy, created FROM groups", [], |r| {
            Ok(GroupRow {
                name: r.get(0, "groups.name")?,
                policy: r.json(1, "groups.policy")?,
                created: r.time(2, "groups.created")?,
                members: Vec::new(),
            })
        })? {
            groups.insert(g.name.clone(), g);
        }
        for (group, m) in self.all(
            &format!("{MEMBER_SELECT} ORDER BY d.host, d.vm"),
            [],
            member_row,
        )? {
            if let Some(g) = groups.get_mut(&group) {
                g.members.push(m);
            }
        }
        Ok(groups.into_values().collect())
    }

    /// Adds and removes members and replaces the policy, all or nothing. Removed members
    /// become unprotected; removing a VM that is not a member is an error (a typo
    /// should not pass silently).
    pub fn modify_group(
        &self,
        name: &str,
        add: &[String],
        remove: &[String],
        policy: Option<&Policy>,
    ) -> Result<GroupRow> {
        if let Some(p) = policy {
            check_policy(p)?;
            self.check_online_target(p)?;
        }
        let tx = self.conn.unchecked_transaction()?;
        // NotFound for the group before anything about members.
        self.group(name)?;
        for m in remove {
            let id = self.resolve_vm(m)?;
            let n = tx.execute(
                "DELETE FROM group_members WHERE group_name = ?1 AND datasource_id = ?2",
                [name, id.as_str()],
            )?;
            if n == 0 {
                return Err(Error::Invalid(format!(
                    "{m} is not a member of protection group {name:?}"
                )));
            }
            tx.execute(
                "UPDATE datasources SET replica_state = 'unprotected' WHERE id = ?1",
                [&id],
            )?;
        }
        for m in add {
            self.add_member(name, m)?;
        }
        if let Some(p) = policy {
            tx.execute(
                "UPDATE groups SET policy = ?2 WHERE name = ?1",
                [name, to_json(p, "policy")?.as_str()],
            )?;
        }
        let row = self.group(name)?;
        tx.commit()?;
        Ok(row)
    }

    /// Deletes a group and returns what it was; its members become unprotected (their
    /// recovery points stay until the server prunes them).
    pub fn delete_group(&self, name: &str) -> Result<GroupRow> {
        let tx = self.conn.unchecked_transaction()?;
        let row = self.group(name)?;
        tx.execute(
            "UPDATE datasources SET replica_state = 'unprotected'
             WHERE id IN (SELECT datasource_id FROM group_members WHERE group_name = ?1)",
            [name],
        )?;
        tx.execute("DELETE FROM groups WHERE name = ?1", [name])?;
        tx.commit()?;
        Ok(row)
    }

    /// The group a data source belongs to.
    pub fn group_of(&self, datasource_id: &str) -> Result<Option<String>> {
        self.one(
            "SELECT group_name FROM group_members WHERE datasource_id = ?1",
            [datasource_id],
            |r| r.get(0, "group_members.group_name"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use protocol::ReplicaState;

    fn setup() -> Catalog {
        let c = Catalog::open_in_memory().unwrap();
        c.upsert_inventory(
            100,
            "h1",
            &[vm("a", None, 10), vm("b", None, 20), vm("c", None, 30)],
        )
        .unwrap();
        c
    }

    fn names(g: &GroupRow) -> Vec<&str> {
        g.members.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn create_with_one_group_per_vm() {
        let c = setup();
        let g = c
            .create_group(200, "pg1", &policy(), &["h1/b".into(), "h1/a".into()])
            .unwrap();
        assert_eq!(names(&g), ["h1/a", "h1/b"]);
        assert_eq!(g.member_names(), ["h1/a", "h1/b"]);
        assert_eq!(g.data_size(), 30);
        assert_eq!(g.members[1].size, 20);
        assert_eq!(g.created, "1970-01-01T00:03:20Z");
        assert_eq!(g.policy, policy());
        assert_eq!(c.group("pg1").unwrap(), g);

        let e = c
            .create_group(210, "pg2", &policy(), &["h1/c".into(), "h1/a".into()])
            .unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "h1/a already belongs to protection group \"pg1\"; a VM belongs to at most one group"
        );
        // All or nothing: pg2 was not created, c is still free.
        assert!(matches!(c.group("pg2"), Err(Error::NotFound(_))));
        let cid = c.datasource_by_name("h1", "c").unwrap().id;
        assert_eq!(c.group_of(&cid).unwrap(), None);

        let e = c.create_group(220, "pg1", &policy(), &[]).unwrap_err();
        assert!(matches!(e, Error::Conflict(_)), "{e}");
        let e = c
            .create_group(220, "pg3", &policy(), &["h9/x".into()])
            .unwrap_err();
        assert_eq!(e.to_string(), "data source h9/x not found");
        // The one name grammar (protocol::check_name): long and non-ASCII names are
        // fine, `.`, `..`, URL syntax and control characters are not.
        for good in [&"x".repeat(65), "ü (prod)"] {
            c.create_group(1, good, &policy(), &[]).unwrap();
        }
        for bad in ["", "a/b", " x", ".", "..", "a?b", "a\nb", &"x".repeat(256)] {
            assert!(
                matches!(
                    c.create_group(1, bad, &policy(), &[]),
                    Err(Error::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        let mut p = policy();
        p.retention_days = 0;
        assert!(matches!(
            c.create_group(1, "pg4", &p, &[]),
            Err(Error::Invalid(m)) if m.contains("retention_days")
        ));
        assert!(matches!(
            c.create_group(1, "pg4", &policy(), &["novm".into()]),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn modify_and_delete() {
        let c = setup();
        c.create_group(200, "pg1", &policy(), &["h1/a".into()])
            .unwrap();
        c.create_group(200, "pg2", &policy(), &["h1/c".into()])
            .unwrap();
        let aid = c.datasource_by_name("h1", "a").unwrap().id;
        c.set_replica_state(&aid, ReplicaState::Ok).unwrap();

        let mut p = policy();
        p.retention_days = 14;
        let g = c
            .modify_group("pg1", &["h1/b".into()], &["h1/a".into()], Some(&p))
            .unwrap();
        assert_eq!(names(&g), ["h1/b"]);
        assert_eq!(g.policy.retention_days, 14);
        assert_eq!(
            c.datasource(&aid).unwrap().replica_state,
            ReplicaState::Unprotected
        );
        assert_eq!(c.group_of(&aid).unwrap(), None);

        let e = c
            .modify_group("pg1", &[], &["h1/a".into()], None)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "h1/a is not a member of protection group \"pg1\""
        );
        let e = c
            .modify_group("pg1", &["h1/c".into()], &[], None)
            .unwrap_err();
        assert!(e.to_string().contains("\"pg2\""), "{e}");
        assert!(matches!(
            c.modify_group("nope", &[], &[], None),
            Err(Error::NotFound(m)) if m == "protection group \"nope\""
        ));
        // A failed modification changes nothing.
        let e = c
            .modify_group(
                "pg1",
                &["h1/a".into()],
                &["h1/b".into(), "h1/zz".into()],
                None,
            )
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)));
        assert_eq!(names(&c.group("pg1").unwrap()), ["h1/b"]);

        let all = c.groups().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].name, "pg1");
        assert_eq!(names(&all[1]), ["h1/c"]);

        let cid = c.datasource_by_name("h1", "c").unwrap().id;
        c.set_replica_state(&cid, ReplicaState::Ok).unwrap();
        let gone = c.delete_group("pg2").unwrap();
        assert_eq!(names(&gone), ["h1/c"]);
        assert_eq!(c.group_of(&cid).unwrap(), None);
        assert_eq!(
            c.datasource(&cid).unwrap().replica_state,
            ReplicaState::Unprotected
        );
        assert!(matches!(c.delete_group("pg2"), Err(Error::NotFound(_))));
        // c is free to join another group now.
        c.modify_group("pg1", &["h1/c".into()], &[], None).unwrap();
        assert_eq!(c.counts().unwrap().protection_groups, 1);
    }
}
