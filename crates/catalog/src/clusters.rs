//! Clusters: sets of hosts an administrator declared to share VMs (live migration).
//! A data source follows its VM id automatically only between hosts of one cluster.

use protocol::{ClusterInfo, check_host_name};
use rusqlite::params;

use crate::{Catalog, Error, Result};

fn check(what: &str, s: &str) -> Result<()> {
    check_host_name(what, s).map_err(Error::Invalid)
}

impl Catalog {
    /// Every cluster with its hosts, by name.
    pub fn clusters(&self) -> Result<Vec<ClusterInfo>> {
        let rows = self.all(
            "SELECT name, created FROM clusters ORDER BY name",
            [],
            |r| {
                Ok((
                    r.get::<String>(0, "clusters.name")?,
                    r.time(1, "clusters.created")?,
                ))
            },
        )?;
        rows.into_iter()
            .map(|(name, created)| {
                Ok(ClusterInfo {
                    hosts: self.cluster_hosts(&name)?,
                    name,
                    created,
                })
            })
            .collect()
    }

    pub fn cluster(&self, name: &str) -> Result<ClusterInfo> {
        let created = self
            .one(
                "SELECT created FROM clusters WHERE name = ?1",
                [name],
                |r| r.time(0, "clusters.created"),
            )?
            .ok_or_else(|| Error::NotFound(format!("cluster {name:?}")))?;
        Ok(ClusterInfo {
            hosts: self.cluster_hosts(name)?,
            name: name.to_string(),
            created,
        })
    }

    fn cluster_hosts(&self, name: &str) -> Result<Vec<String>> {
        self.all(
            "SELECT host FROM cluster_hosts WHERE cluster = ?1 ORDER BY host",
            [name],
            |r| r.get(0, "cluster_hosts.host"),
        )
    }

    /// The cluster `host` is in, if any.
    pub fn cluster_of(&self, host: &str) -> Result<Option<String>> {
        self.one(
            "SELECT cluster FROM cluster_hosts WHERE host = ?1",
            [host],
            |r| r.get(0, "cluster_hosts.cluster"),
        )
    }

    /// Creates a cluster of `hosts` (each in no other cluster), in one transaction.
    pub fn create_cluster(&self, now: i64, name: &str, hosts: &[String]) -> Result<ClusterInfo> {
        check("cluster name", name)?;
        if hosts.is_empty() {
            return Err(Error::Invalid(format!(
                "cluster {name:?}: name at least one host"
            )));
        }
        let tx = self.conn.unchecked_transaction()?;
        if self.exists("SELECT 1 FROM clusters WHERE name = ?1", [name])? {
            return Err(Error::Conflict(format!("cluster {name:?} already exists")));
        }
        tx.execute(
            "INSERT INTO clusters (name, created) VALUES (?1, ?2)",
            params![name, now],
        )?;
        self.insert_hosts(name, hosts)?;
        tx.commit()?;
        self.cluster(name)
    }

    /// Adds hosts to a cluster; a host already in another cluster is a conflict and
    /// nothing is added.
    pub fn add_cluster_hosts(&self, name: &str, hosts: &[String]) -> Result<ClusterInfo> {
        if hosts.is_empty() {
            return Err(Error::Invalid("hosts: name at least one host".into()));
        }
        let tx = self.conn.unchecked_transaction()?;
        self.cluster(name)?;
        self.insert_hosts(name, hosts)?;
        tx.commit()?;
        self.cluster(name)
    }

    fn insert_hosts(&self, name: &str, hosts: &[String]) -> Result<()> {
        for h in hosts {
            check("host", h)?;
            match self.cluster_of(h)? {
                Some(c) if c == name => {
                    return Err(Error::Conflict(format!(
                        "host {h:?} is already in cluster {c:?}"
                    )));
                }
                Some(c) => {
                    return Err(Error::Conflict(format!(
                        "host {h:?} is already in cluster {c:?} (a host is in at most one cluster)"
                    )));
                }
                None => {}
            }
            self.conn.execute(
                "INSERT INTO cluster_hosts (host, cluster) VALUES (?1, ?2)",
                [h, name],
            )?;
        }
        Ok(())
    }

    /// Takes a host out of a cluster.
    pub fn remove_cluster_host(&self, name: &str, host: &str) -> Result<ClusterInfo> {
        self.cluster(name)?;
        let n = self.conn.execute(
            "DELETE FROM cluster_hosts WHERE cluster = ?1 AND host = ?2",
            [name, host],
        )?;
        if n == 0 {
            return Err(Error::NotFound(format!(
                "host {host:?} in cluster {name:?}"
            )));
        }
        self.cluster(name)
    }

    /// Deletes a cluster; its hosts are in none afterwards.
    pub fn delete_cluster(&self, name: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM clusters WHERE name = ?1", [name])?;
        if n == 0 {
            return Err(Error::NotFound(format!("cluster {name:?}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_add_remove_delete() {
        let c = Catalog::open_in_memory().unwrap();
        let k = c
            .create_cluster(10, "k1", &["b".into(), "a".into()])
            .unwrap();
        assert_eq!(k.hosts, ["a", "b"]);
        assert_eq!(k.created, "1970-01-01T00:00:10Z");
        assert!(matches!(
            c.create_cluster(11, "k1", &["z".into()]),
            Err(Error::Conflict(_))
        ));
        // A host is in at most one cluster; nothing of a refused call stays.
        let e = c
            .create_cluster(12, "k2", &["c".into(), "a".into()])
            .unwrap_err();
        assert!(e.to_string().contains("already in cluster \"k1\""), "{e}");
        assert!(matches!(c.cluster("k2"), Err(Error::NotFound(_))));
        assert_eq!(c.cluster_of("c").unwrap(), None);
        assert!(matches!(
            c.create_cluster(12, "..", &["c".into()]),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            c.create_cluster(12, "k3", &["bad host".into()]),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            c.create_cluster(12, "k3", &[]),
            Err(Error::Invalid(_))
        ));
        assert_eq!(
            c.add_cluster_hosts("k1", &["c".into()]).unwrap().hosts,
            ["a", "b", "c"]
        );
        assert_eq!(c.cluster_of("c").unwrap().as_deref(), Some("k1"));
        assert_eq!(c.remove_cluster_host("k1", "a").unwrap().hosts, ["b", "c"]);
        assert!(matches!(
            c.remove_cluster_host("k1", "a"),
            Err(Error::NotFound(_))
        ));
        assert_eq!(c.clusters().unwrap().len(), 1);
        c.delete_cluster("k1").unwrap();
        assert_eq!(c.cluster_of("b").unwrap(), None);
        assert!(c.clusters().unwrap().is_empty());
        assert!(matches!(c.delete_cluster("k1"), Err(Error::NotFound(_))));
    }
}
