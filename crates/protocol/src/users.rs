//! Console users, their roles, API tokens and sign-in sessions (`/api/v1/users`,
//! `/tokens`, `/session`). Passwords travel only in requests; answers never carry a
//! password hash, and a token's secret only once, in [`CreatedToken`].

use crate::validate::check_host_name;
use serde::{Deserialize, Serialize};

/// What a caller may do. Ordered: each role may do everything the ones before it may
/// (`auditor` reads, `restore` also browses files and recovers, `operator` also runs
/// protection, `admin` everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Auditor,
    Restore,
    Operator,
    Admin,
}

string_enum!(Role {
    Auditor => "auditor",
    Restore => "restore",
    Operator => "operator",
    Admin => "admin",
});

/// The longest name of a user or token.
pub const MAX_USER_NAME: usize = 64;

/// A user or token name: host-name characters (no spaces, no slashes), at most 64.
pub fn check_user_name(field: &str, name: &str) -> Result<(), String> {
    check_host_name(field, name)?;
    if name.len() > MAX_USER_NAME {
        return Err(format!("{field}: at most {MAX_USER_NAME} characters"));
    }
    Ok(())
}

/// The shortest password accepted.
pub const MIN_PASSWORD: usize = 8;

/// A new password: 8 to 1024 bytes.
pub fn check_password(pw: &str) -> Result<(), String> {
    if pw.len() < MIN_PASSWORD {
        return Err(format!("password: at least {MIN_PASSWORD} characters"));
    }
    if pw.len() > 1024 {
        return Err("password: at most 1024 bytes".into());
    }
    Ok(())
}

/// One user as `GET /users` lists it (never its password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub role: Role,
    pub disabled: bool,
    pub created: String,
    /// Wrong passwords in a row since the last good one.
    pub failed_logins: u32,
    /// Set while the user is locked out after too many wrong passwords.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
}

/// `POST /users` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateUser {
    pub name: String,
    pub role: Role,
    pub password: String,
}

impl CreateUser {
    pub fn validate(&self) -> Result<(), String> {
        check_user_name("name", &self.name)?;
        check_password(&self.password)
    }
}

/// `PATCH /users/{name}` (admin): what to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModifyUser {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

/// `POST /users/{name}/password`: an admin resets any user's password (`old` not
/// needed); a user changes its own with `old`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPassword {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    pub new: String,
}

/// `POST /session`: sign in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    pub name: String,
    pub password: String,
}

/// The answer to `POST /session`; the session id itself is only in the cookie.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub user: String,
    pub role: Role,
    /// To send as `X-CSRF-Token` with every call that changes something.
    pub csrf: String,
    pub expires: String,
}

/// `GET /session`: who the caller is (any way of signing in).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Whoami {
    pub name: String,
    pub role: Role,
    /// With a session cookie: its CSRF token, so a reloaded page can find it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
}

/// One API token as `GET /tokens` lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    pub created_by: String,
}

/// `POST /tokens` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// Days until it stops working; none = never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_days: Option<u32>,
}

/// The longest token lifetime, in days (ten years).
pub const MAX_TOKEN_DAYS: u32 = 3650;

impl CreateToken {
    pub fn validate(&self) -> Result<(), String> {
        check_user_name("name", &self.name)?;
        match self.expires_days {
            Some(0) => Err("expires_days: at least 1".into()),
            Some(d) if d > MAX_TOKEN_DAYS => Err(format!("expires_days: at most {MAX_TOKEN_DAYS}")),
            _ => Ok(()),
        }
    }
}

/// The answer to `POST /tokens`: the only time the token is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named_as_serde_names_them() {
        assert!(Role::Auditor < Role::Restore);
        assert!(Role::Restore < Role::Operator);
        assert!(Role::Operator < Role::Admin);
        for r in Role::ALL {
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(Role::parse(r.as_str()), Some(*r));
        }
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert!(check_user_name("name", "alice").is_ok());
        assert!(check_user_name("name", "a b").is_err());
        assert!(check_user_name("name", &"a".repeat(65)).is_err());
        assert!(check_password("short").is_err());
        assert!(check_password("long enough").is_ok());
        let t = CreateToken {
            name: "ci".into(),
            role: Role::Auditor,
            expires_days: Some(0),
        };
        assert!(t.validate().is_err());
    }
}
