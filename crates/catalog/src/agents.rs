//! Enrollment tokens and agents.

use rusqlite::params;
use serde::Serialize;

use crate::{Catalog, Cols, Error, Result, rfc3339};

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRow {
    pub host: String,
    pub cert_fingerprint: String,
    /// Revoked by an admin, or `cert_fingerprint` is a replaced (re-enrolled) certificate.
    pub revoked: bool,
    pub enrolled: String,
    pub last_seen: Option<String>,
    pub version: Option<String>,
}

impl AgentRow {
    /// The API form; whether the agent is connected is the server's knowledge.
    pub fn into_info(self, connected: bool) -> protocol::AgentInfo {
        protocol::AgentInfo {
            host: self.host,
            cert_fingerprint: self.cert_fingerprint,
            enrolled: self.enrolled,
            last_seen: self.last_seen,
            revoked: self.revoked,
            version: self.version,
            connected,
        }
    }
}

const AGENT_COLS: &str = "host, cert_fingerprint, revoked, enrolled, last_seen, version";

fn agent_row(r: &Cols) -> Result<AgentRow> {
    Ok(AgentRow {
        host: r.get(0, "agents.host")?,
        cert_fingerprint: r.get(1, "agents.cert_fingerprint")?,
        revoked: r.bool(2, "agents.revoked")?,
        enrolled: r.time(3, "agents.enrolled")?,
        last_seen: r.opt_time(4, "agents.last_seen")?,
        version: r.get(5, "agents.version")?,
    })
}

fn token_expired(expires: i64) -> Error {
    Error::Invalid(format!("enrollment token expired at {}", rfc3339(expires)))
}

impl Catalog {
    /// Stores a one-use enrollment token for `host` (only the secret's hash is kept, so a
    /// leaked catalog does not leak usable tokens).
    pub fn add_enroll_token(
        &self,
        now: i64,
        host: &str,
        secret_hash: &str,
        expires: i64,
    ) -> Result<()> {
        if host.is_empty() || host.contains('/') {
            return Err(Error::Invalid(format!("host name {host:?} is not valid")));
        }
        let n = self.conn.execute(
            "INSERT INTO enroll_tokens (secret_hash, host, created, expires) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (secret_hash) DO NOTHING",
            params![secret_hash, host, now, expires],
        )?;
        if n == 0 {
            return Err(Error::Conflict("enrollment token already exists".into()));
        }
        Ok(())
    }

    /// Consumes a token and returns its host. The check and the marking happen in one
    /// UPDATE, so two enrollments racing with one token cannot both win.
    pub fn use_enroll_token(&self, now: i64, secret_hash: &str) -> Result<String> {
        let tx = self.conn.unchecked_transaction()?;
        let host = self.mark_token_used(now, secret_hash)?;
        tx.commit()?;
        Ok(host)
    }

    /// The host of a token that may be used now, without using it: the enrollment
    /// request is checked against it before anything is spent.
    pub fn enroll_token_host(&self, now: i64, secret_hash: &str) -> Result<String> {
        let (host, expires, used) = self.token_row(secret_hash)?;
        if used.is_some() {
            return Err(Error::Invalid("enrollment token was already used".into()));
        }
        if expires <= now {
            return Err(token_expired(expires));
        }
        Ok(host)
    }

    /// Uses the token and records the agent of its host with this certificate, in one
    /// transaction: either both happen or neither (a refused certificate leaves the
    /// token usable). Returns the host.
    pub fn enroll_with_token(
        &self,
        now: i64,
        secret_hash: &str,
        cert_fingerprint: &str,
        version: &str,
    ) -> Result<String> {
        let tx = self.conn.unchecked_transaction()?;
        let host = self.mark_token_used(now, secret_hash)?;
        self.enroll_agent_in(now, &host, cert_fingerprint, version)?;
        tx.commit()?;
        Ok(host)
    }

    fn token_row(&self, secret_hash: &str) -> Result<(String, i64, Option<i64>)> {
        self.one(
            "SELECT host, expires, used FROM enroll_tokens WHERE secret_hash = ?1",
            [secret_hash],
            |r| {
                Ok((
                    r.get::<String>(0, "enroll_tokens.host")?,
                    r.get::<i64>(1, "enroll_tokens.expires")?,
                    r.get::<Option<i64>>(2, "enroll_tokens.used")?,
                ))
            },
        )?
        .ok_or_else(|| Error::NotFound("enrollment token".into()))
    }

    /// Marks the token used (inside the caller's transaction) and returns its host.
    fn mark_token_used(&self, now: i64, secret_hash: &str) -> Result<String> {
        let n = self.conn.execute(
            "UPDATE enroll_tokens SET used = ?2
             WHERE secret_hash = ?1 AND used IS NULL AND expires > ?2",
            params![secret_hash, now],
        )?;
        let (host, expires, used) = self.token_row(secret_hash)?;
        if n == 1 {
            return Ok(host);
        }
        if used.is_some() {
            return Err(Error::Invalid("enrollment token was already used".into()));
        }
        Err(token_expired(expires))
    }

    /// Records a new agent, or a re-enrollment of `host` with a new certificate: the old
    /// certificate is revoked for good and the agent is no longer marked revoked.
    /// A fingerprint that was ever revoked, or belongs to another host, is refused.
    pub fn enroll_agent(
        &self,
        now: i64,
        host: &str,
        cert_fingerprint: &str,
        version: &str,
    ) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        self.enroll_agent_in(now, host, cert_fingerprint, version)?;
        tx.commit()?;
        Ok(())
    }

    /// [`Catalog::enroll_agent`] inside the caller's transaction.
    fn enroll_agent_in(
        &self,
        now: i64,
        host: &str,
        cert_fingerprint: &str,
        version: &str,
    ) -> Result<()> {
        if self.exists(
            "SELECT 1 FROM revoked_certs WHERE fingerprint = ?1",
            [cert_fingerprint],
        )? {
            return Err(Error::Conflict(format!(
                "certificate {cert_fingerprint} was revoked"
            )));
        }
        if let Some(other) = self.one(
            "SELECT host FROM agents WHERE cert_fingerprint = ?1 AND host <> ?2",
            [cert_fingerprint, host],
            |r| r.get::<String>(0, "agents.host"),
        )? {
            return Err(Error::Conflict(format!(
                "certificate {cert_fingerprint} belongs to agent {other:?}"
            )));
        }
        let old = self.one(
            "SELECT cert_fingerprint FROM agents WHERE host = ?1",
            [host],
            |r| r.get::<String>(0, "agents.cert_fingerprint"),
        )?;
        if let Some(old) = old.filter(|old| old != cert_fingerprint) {
            self.conn.execute(
                "INSERT INTO revoked_certs (fingerprint, host, revoked) VALUES (?1, ?2, ?3)
                 ON CONFLICT (fingerprint) DO NOTHING",
                params![old, host, now],
            )?;
        }
        self.conn.execute(
            "INSERT INTO agents (host, cert_fingerprint, enrolled, revoked, version)
             VALUES (?1, ?2, ?3, 0, ?4)
             ON CONFLICT (host) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint,
                 enrolled = excluded.enrolled, revoked = 0, version = excluded.version",
            params![host, cert_fingerprint, now, version],
        )?;
        Ok(())
    }

    /// The agent a client certificate belongs to. A replaced or revoked certificate still
    /// finds its agent, with `revoked: true`, so the server can say why it refuses.
    pub fn agent_by_fingerprint(&self, fp: &str) -> Result<Option<AgentRow>> {
        let current = self.one(
            &format!(
                "SELECT {AGENT_COLS} FROM agents WHERE cert_fingerprint = ?1
                 UNION ALL
                 SELECT a.host, r.fingerprint, 1, a.enrolled, a.last_seen, a.version
                 FROM revoked_certs r JOIN agents a ON a.host = r.host
                 WHERE r.fingerprint = ?1
                 ORDER BY 3 DESC LIMIT 1"
            ),
            [fp],
            agent_row,
        )?;
        Ok(current)
    }

    /// Every agent, by host name.
    pub fn agents(&self) -> Result<Vec<AgentRow>> {
        self.all(
            &format!("SELECT {AGENT_COLS} FROM agents ORDER BY host"),
            [],
            agent_row,
        )
    }

    /// Revokes `host`'s certificate; it stays refused even if the host re-enrolls.
    pub fn revoke_agent(&self, now: i64, host: &str) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        let fp = self
            .one(
                "SELECT cert_fingerprint FROM agents WHERE host = ?1",
                [host],
                |r| r.get::<String>(0, "agents.cert_fingerprint"),
            )?
            .ok_or_else(|| Error::NotFound(format!("agent {host:?}")))?;
        tx.execute("UPDATE agents SET revoked = 1 WHERE host = ?1", [host])?;
        tx.execute(
            "INSERT INTO revoked_certs (fingerprint, host, revoked) VALUES (?1, ?2, ?3)
             ON CONFLICT (fingerprint) DO NOTHING",
            params![fp, host, now],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Notes that `host` was heard from.
    pub fn touch_agent(&self, now: i64, host: &str) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE agents SET last_seen = ?2 WHERE host = ?1",
            params![host, now],
        )?;
        if n == 0 {
            return Err(Error::NotFound(format!("agent {host:?}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_use_and_expire() {
        let c = Catalog::open_in_memory().unwrap();
        c.add_enroll_token(1000, "h1", "hash1", 2000).unwrap();
        c.add_enroll_token(1000, "h2", "hash2", 1500).unwrap();
        assert!(matches!(
            c.add_enroll_token(1000, "h3", "hash1", 2000),
            Err(Error::Conflict(_))
        ));

        assert_eq!(c.use_enroll_token(1100, "hash1").unwrap(), "h1");
        let e = c.use_enroll_token(1101, "hash1").unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert_eq!(e.to_string(), "enrollment token was already used");

        let e = c.use_enroll_token(1500, "hash2").unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "enrollment token expired at 1970-01-01T00:25:00Z"
        );
        // The refused attempt did not consume it: before its expiry it still works.
        assert!(matches!(
            c.use_enroll_token(1400, "hash2"),
            Ok(h) if h == "h2"
        ));

        let e = c.use_enroll_token(1100, "nope").unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        assert_eq!(e.to_string(), "enrollment token not found");
    }

    #[test]
    fn re_enrollment_revokes_the_old_certificate() {
        let c = Catalog::open_in_memory().unwrap();
        c.enroll_agent(100, "h1", "fp-a", "0.1").unwrap();
        c.touch_agent(150, "h1").unwrap();
        let a = c.agent_by_fingerprint("fp-a").unwrap().unwrap();
        assert_eq!(a.host, "h1");
        assert!(!a.revoked);
        assert_eq!(a.last_seen.as_deref(), Some("1970-01-01T00:02:30Z"));
        assert_eq!(a.version.as_deref(), Some("0.1"));

        c.enroll_agent(200, "h1", "fp-b", "0.2").unwrap();
        let old = c.agent_by_fingerprint("fp-a").unwrap().unwrap();
        assert!(old.revoked);
        assert_eq!(old.cert_fingerprint, "fp-a");
        let new = c.agent_by_fingerprint("fp-b").unwrap().unwrap();
        assert!(!new.revoked);
        assert_eq!(new.version.as_deref(), Some("0.2"));
        assert_eq!(c.agents().unwrap(), vec![new.clone()]);
        let info = new.into_info(true);
        assert_eq!((info.host.as_str(), info.connected), ("h1", true));

        // The replaced certificate can never come back.
        assert!(matches!(
            c.enroll_agent(300, "h1", "fp-a", "0.2"),
            Err(Error::Conflict(_))
        ));
        // Nor can another host take a live certificate.
        assert!(matches!(
            c.enroll_agent(300, "h2", "fp-b", "0.2"),
            Err(Error::Conflict(_))
        ));
        assert_eq!(c.agent_by_fingerprint("unknown").unwrap(), None);
    }

    #[test]
    fn revoked_agents_stay_refused_after_re_enrollment() {
        let c = Catalog::open_in_memory().unwrap();
        c.enroll_agent(100, "h1", "fp-a", "0.1").unwrap();
        assert!(matches!(
            c.revoke_agent(110, "nope"),
            Err(Error::NotFound(m)) if m == "agent \"nope\""
        ));
        assert!(matches!(
            c.touch_agent(110, "nope"),
            Err(Error::NotFound(_))
        ));
        c.revoke_agent(110, "h1").unwrap();
        assert!(c.agent_by_fingerprint("fp-a").unwrap().unwrap().revoked);
        assert_eq!(c.counts().unwrap().agents, 0);

        c.enroll_agent(120, "h1", "fp-b", "0.1").unwrap();
        assert!(!c.agent_by_fingerprint("fp-b").unwrap().unwrap().revoked);
        assert!(c.agent_by_fingerprint("fp-a").unwrap().unwrap().revoked);
        assert_eq!(c.counts().unwrap().agents, 1);
    }
}
