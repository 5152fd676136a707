//! Console users, API tokens and sessions. Secrets are never stored: passwords as
//! argon2id PHC strings, tokens and session ids as SHA-256 hex (hashed by the caller).

use protocol::{Role, TokenInfo, UserInfo};
use rusqlite::params;

use crate::{Catalog, Cols, Error, Result};

fn user_row(r: &Cols) -> Result<UserInfo> {
    Ok(UserInfo {
        name: r.get(0, "users.name")?,
        role: r.word(1, "users.role", Role::parse)?,
        disabled: r.bool(2, "users.disabled")?,
        created: r.time(3, "users.created")?,
        failed_logins: r.u32(4, "users.failed_logins")?,
        locked_until: r.opt_time(5, "users.locked_until")?,
    })
}

const USER_COLS: &str = "name, role, disabled, created, failed_logins, locked_until";

fn token_row(r: &Cols) -> Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.get(0, "api_tokens.id")?,
        name: r.get(1, "api_tokens.name")?,
        role: r.word(2, "api_tokens.role", Role::parse)?,
        created: r.time(3, "api_tokens.created")?,
        expires: r.opt_time(4, "api_tokens.expires")?,
        created_by: r.get(5, "api_tokens.created_by")?,
    })
}

const TOKEN_COLS: &str = "id, name, role, created, expires, created_by";

/// What a sign-in needs to know about a user.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: UserInfo,
    pub password_hash: String,
    /// Unix seconds, while locked.
    pub locked_until: Option<i64>,
}

/// A wrong password: how many in a row now, and the lock if this one set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginFailure {
    pub failed_logins: u32,
    pub locked_until: Option<i64>,
}

/// One session, found by the hash of its id.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub user: String,
    pub role: Role,
    pub disabled: bool,
    pub csrf: String,
    pub expires: i64,
    pub last_seen: i64,
}

/// A token found by its hash, with its creator's state.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    pub info: TokenInfo,
    pub expires: Option<i64>,
    /// The user who created it is disabled (a disabled user's tokens stop working).
    pub creator_disabled: bool,
}

impl Catalog {
    /// A new user; a name in use is a conflict. `password_hash` is a PHC string.
    pub fn create_user(
        &self,
        now: i64,
        name: &str,
        role: Role,
        password_hash: &str,
    ) -> Result<UserInfo> {
        if self.exists("SELECT 1 FROM users WHERE name = ?1", [name])? {
            return Err(Error::Conflict(format!("user {name:?} already exists")));
        }
        self.conn.execute(
            "INSERT INTO users (name, role, password_hash, created) VALUES (?1, ?2, ?3, ?4)",
            params![name, role.as_str(), password_hash, now],
        )?;
        self.user(name)
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<UserInfo>> {
        self.all(
            &format!("SELECT {USER_COLS} FROM users ORDER BY name"),
            [],
            user_row,
        )
    }

    pub fn user(&self, name: &str) -> Result<UserInfo> {
        self.one(
            &format!("SELECT {USER_COLS} FROM users WHERE name = ?1"),
            [name],
            user_row,
        )?
        .ok_or_else(|| Error::NotFound(format!("user {name:?}")))
    }

    /// A user with its password hash, for signing in; none if there is no such user.
    pub fn credentials(&self, name: &str) -> Result<Option<Credentials>> {
        self.one(
            &format!("SELECT {USER_COLS}, password_hash FROM users WHERE name = ?1"),
            [name],
            |r| {
                Ok(Credentials {
                    user: user_row(r)?,
                    password_hash: r.get(6, "users.password_hash")?,
                    locked_until: r.get(5, "users.locked_until")?,
                })
            },
        )
    }

    /// Changes a user's role and/or disabled flag. Disabling ends its sessions.
    pub fn modify_user(
        &self,
        name: &str,
        role: Option<Role>,
        disabled: Option<bool>,
    ) -> Result<UserInfo> {
        self.user(name)?;
        let tx = self.conn.unchecked_transaction()?;
        if let Some(role) = role {
            tx.execute(
                "UPDATE users SET role = ?2 WHERE name = ?1",
                params![name, role.as_str()],
            )?;
        }
        if let Some(d) = disabled {
            tx.execute(
                "UPDATE users SET disabled = ?2 WHERE name = ?1",
                params![name, d],
            )?;
            if d {
                tx.execute("DELETE FROM sessions WHERE user = ?1", [name])?;
            }
        }
        tx.commit()?;
        self.user(name)
    }

    /// A new password hash; clears the lockout and ends the user's sessions (whoever
    /// held one with the old password must sign in again).
    pub fn set_password_hash(&self, name: &str, password_hash: &str) -> Result<()> {
        self.user(name)?;
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE users SET password_hash = ?2, failed_logins = 0, locked_until = NULL
             WHERE name = ?1",
            params![name, password_hash],
        )?;
        tx.execute("DELETE FROM sessions WHERE user = ?1", [name])?;
        tx.commit()?;
        Ok(())
    }

    /// Counts a wrong password; the `max`-th in a row locks the user until
    /// `now + lock_secs` and starts the count again.
    pub fn login_failed(
        &self,
        now: i64,
        name: &str,
        max: u32,
        lock_secs: i64,
    ) -> Result<LoginFailure> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE users SET failed_logins = failed_logins + 1 WHERE name = ?1",
            [name],
        )?;
        let n = self.user(name)?.failed_logins;
        let locked_until = if n >= max {
            let until = now.saturating_add(lock_secs);
            tx.execute(
                "UPDATE users SET failed_logins = 0, locked_until = ?2 WHERE name = ?1",
                params![name, until],
            )?;
            Some(until)
        } else {
            None
        };
        tx.commit()?;
        Ok(LoginFailure {
            failed_logins: n,
            locked_until,
        })
    }

    /// A good password: the count of wrong ones starts again.
    pub fn login_ok(&self, name: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE users SET failed_logins = 0, locked_until = NULL WHERE name = ?1",
            [name],
        )?;
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // Sessions

    pub fn create_session(
        &self,
        now: i64,
        id_hash: &str,
        user: &str,
        csrf: &str,
        expires: i64,
    ) -> Result<()> {
        // Sessions long over are dropped here, so the table does not grow forever.
        self.conn
            .execute("DELETE FROM sessions WHERE expires <= ?1", [now])?;
        self.conn.execute(
            "INSERT INTO sessions (id_hash, user, csrf, created, expires, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?4)",
            params![id_hash, user, csrf, now, expires],
        )?;
        Ok(())
    }

    /// The session with this id hash, with its user's role and state.
    pub fn session(&self, id_hash: &str) -> Result<Option<SessionRow>> {
        self.one(
            "SELECT s.user, u.role, u.disabled, s.csrf, s.expires, s.last_seen
             FROM sessions s JOIN users u ON u.name = s.user WHERE s.id_hash = ?1",
            [id_hash],
            |r| {
                Ok(SessionRow {
                    user: r.get(0, "sessions.user")?,
                    role: r.word(1, "users.role", Role::parse)?,
                    disabled: r.bool(2, "users.disabled")?,
                    csrf: r.get(3, "sessions.csrf")?,
                    expires: r.get(4, "sessions.expires")?,
                    last_seen: r.get(5, "sessions.last_seen")?,
                })
            },
        )
    }

    pub fn touch_session(&self, now: i64, id_hash: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE sessions SET last_seen = ?2 WHERE id_hash = ?1",
            params![id_hash, now],
        )?;
        Ok(())
    }

    /// Ends a session (absent already is fine).
    pub fn delete_session(&self, id_hash: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM sessions WHERE id_hash = ?1", [id_hash])?;
        Ok(())
    }

    // -----------------------------------------------------------------------------
    // API tokens

    pub fn create_api_token(
        &self,
        now: i64,
        name: &str,
        role: Role,
        token_hash: &str,
        expires: Option<i64>,
        created_by: &str,
    ) -> Result<TokenInfo> {
        self.conn.execute(
            "INSERT INTO api_tokens (name, role, token_hash, created, expires, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![name, role.as_str(), token_hash, now, expires, created_by],
        )?;
        let id = self.conn.last_insert_rowid();
        self.one(
            &format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE id = ?1"),
            [id],
            token_row,
        )?
        .ok_or_else(|| Error::NotFound(format!("API token {id}")))
    }

    /// Every API token, oldest first.
    pub fn api_tokens(&self) -> Result<Vec<TokenInfo>> {
        self.all(
            &format!("SELECT {TOKEN_COLS} FROM api_tokens ORDER BY id"),
            [],
            token_row,
        )
    }

    /// The token with this hash, if any.
    pub fn api_token_by_hash(&self, token_hash: &str) -> Result<Option<TokenAuth>> {
        self.one(
            "SELECT t.id, t.name, t.role, t.created, t.expires, t.created_by,
                    COALESCE(u.disabled, 0)
             FROM api_tokens t LEFT JOIN users u ON u.name = t.created_by
             WHERE t.token_hash = ?1",
            [token_hash],
            |r| {
                Ok(TokenAuth {
                    info: token_row(r)?,
                    expires: r.get(4, "api_tokens.expires")?,
                    creator_disabled: r.bool(6, "users.disabled")?,
                })
            },
        )
    }

    /// Revokes a token; an unknown id is not found.
    pub fn delete_api_token(&self, id: i64) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM api_tokens WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(Error::NotFound(format!("API token {id}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Catalog;
    use protocol::Role;

    #[test]
    fn users_lock_after_max_failures_and_unlock_on_success() {
        let c = Catalog::open_in_memory().unwrap();
        c.create_user(10, "alice", Role::Restore, "$argon2id$x")
            .unwrap();
        assert!(c.create_user(11, "alice", Role::Admin, "h").is_err());
        for i in 1..5 {
            let f = c.login_failed(20, "alice", 5, 900).unwrap();
            assert_eq!(f.failed_logins, i);
            assert_eq!(f.locked_until, None);
        }
        let f = c.login_failed(20, "alice", 5, 900).unwrap();
        assert_eq!(f.locked_until, Some(920));
        let cr = c.credentials("alice").unwrap().unwrap();
        assert_eq!(cr.locked_until, Some(920));
        assert_eq!(cr.password_hash, "$argon2id$x");
        c.login_ok("alice").unwrap();
        assert_eq!(c.credentials("alice").unwrap().unwrap().locked_until, None);
    }

    #[test]
    fn disabling_ends_sessions_and_tokens_follow_their_creator() {
        let c = Catalog::open_in_memory().unwrap();
        c.create_user(10, "bob", Role::Admin, "h").unwrap();
        c.create_session(10, "sid", "bob", "csrf", 100).unwrap();
        assert_eq!(c.session("sid").unwrap().unwrap().user, "bob");
        let t = c
            .create_api_token(10, "ci", Role::Auditor, "th", Some(50), "bob")
            .unwrap();
        assert!(!c.api_token_by_hash("th").unwrap().unwrap().creator_disabled);
        c.modify_user("bob", None, Some(true)).unwrap();
        assert!(c.session("sid").unwrap().is_none());
        let a = c.api_token_by_hash("th").unwrap().unwrap();
        assert!(a.creator_disabled);
        assert_eq!(a.expires, Some(50));
        c.delete_api_token(t.id).unwrap();
        assert!(c.api_token_by_hash("th").unwrap().is_none());
        assert!(c.delete_api_token(t.id).is_err());
    }
}
