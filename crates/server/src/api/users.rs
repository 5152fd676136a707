//! Console users, API tokens and sign-in sessions: `/users`, `/tokens`, `/session`.
//! Passwords are checked with argon2id on blocking threads, a few at a time; every
//! failed sign-in waits a fixed delay and counts toward the lockout.

use crate::auth::{Admin, Caller, Read, SESSION_COOKIE, SESSION_LIFETIME};
use crate::http::{ApiErr, ApiResult, St, bad, forbidden, json, now, parse};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use protocol::*;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Wrong passwords in a row that lock a user, and for how long.
pub(crate) const MAX_FAILED_LOGINS: u32 = 5;
pub(crate) const LOCK_SECS: i64 = 15 * 60;
/// Every failed sign-in answers no sooner than this: guessing is slow even below the
/// lockout, and the answer's timing does not tell which check failed.
const FAIL_DELAY: Duration = Duration::from_millis(500);
/// Password hashes computed at once (argon2id takes 19 MiB each), and how long a
/// request waits for its turn.
static HASHING: Semaphore = Semaphore::const_new(4);
const HASH_WAIT: Duration = Duration::from_secs(10);

/// Waits for a turn to hash a password; 503 when the server is that busy.
async fn hash_turn() -> ApiResult<tokio::sync::SemaphorePermit<'static>> {
    let busy = || {
        ApiErr(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many sign-ins at once; try again".into(),
        )
    };
    tokio::time::timeout(HASH_WAIT, HASHING.acquire())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())
}

fn internal(e: pki::Error) -> ApiErr {
    ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// A hash to check unknown users' passwords against, so they cost what known ones do.
fn dummy_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| pki::hash_password("no such user").unwrap_or_default())
}

fn wrong() -> ApiErr {
    ApiErr(
        StatusCode::UNAUTHORIZED,
        "wrong user name or password".into(),
    )
}

fn created(r: Response) -> Response {
    let mut r = r;
    *r.status_mut() = StatusCode::CREATED;
    r
}

// ---------------------------------------------------------------------------------
// Sessions

/// `POST /session` {name, password}: signs in; the session id goes in a Secure,
/// HttpOnly, SameSite=Strict cookie, the CSRF token in the answer.
pub(crate) async fn session_create(State(st): St, body: Bytes) -> ApiResult<Response> {
    let req: Login = parse(&body)?;
    let outcome = {
        let _turn = hash_turn().await?;
        st.offload(move |st| sign_in(st, &req)).await
    };
    let (info, id) = match outcome {
        Ok(v) => v,
        Err(e) => {
            tokio::time::sleep(FAIL_DELAY).await;
            return Err(e);
        }
    };
    let cookie = format!(
        "{SESSION_COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={SESSION_LIFETIME}"
    );
    let mut r = created(json(&info));
    let v = header::HeaderValue::from_str(&cookie).map_err(|e| bad(e.to_string()))?;
    r.headers_mut().insert(header::SET_COOKIE, v);
    Ok(r)
}

/// Checks the password and opens a session: (the answer, the session id).
fn sign_in(st: &AppState, req: &Login) -> ApiResult<(SessionInfo, String)> {
    let now = now();
    let audit =
        |actor: &str, action: &str, detail: &str| st.cat().audit(now, actor, action, detail);
    let creds = if check_user_name("name", &req.name).is_ok() {
        st.cat().credentials(&req.name)?
    } else {
        None
    };
    let Some(c) = creds else {
        pki::verify_password(&req.password, dummy_hash());
        let shown = if req.name.len() <= MAX_USER_NAME {
            req.name.as_str()
        } else {
            "(a long name)"
        };
        audit(shown, "sign-in failed", "no such user")?;
        return Err(wrong());
    };
    let name = c.user.name.as_str();
    if let Some(until) = c.locked_until.filter(|&u| u > now) {
        let msg = format!(
            "user {name:?} is locked until {} after {MAX_FAILED_LOGINS} wrong passwords",
            utc::rfc3339(until)
        );
        audit(name, "sign-in refused", &msg)?;
        return Err(ApiErr(StatusCode::TOO_MANY_REQUESTS, msg));
    }
    if !pki::verify_password(&req.password, &c.password_hash) {
        let f = st
            .cat()
            .login_failed(now, name, MAX_FAILED_LOGINS, LOCK_SECS)?;
        audit(
            name,
            "sign-in failed",
            &format!("wrong password ({} in a row)", f.failed_logins),
        )?;
        if let Some(until) = f.locked_until {
            audit(
                name,
                "user locked",
                &format!("until {}", utc::rfc3339(until)),
            )?;
        }
        return Err(wrong());
    }
    if c.user.disabled {
        audit(name, "sign-in refused", "user disabled")?;
        return Err(forbidden(format!("user {name:?} is disabled")));
    }
    let id = pki::random_secret().map_err(internal)?;
    let csrf = pki::random_secret().map_err(internal)?;
    let expires = now.saturating_add(SESSION_LIFETIME);
    {
        let cat = st.cat();
        cat.login_ok(name)?;
        cat.create_session(now, &pki::secret_hash(&id), name, &csrf, expires)?;
        cat.audit(now, name, "sign-in", "")?;
    }
    Ok((
        SessionInfo {
            user: name.to_string(),
            role: c.user.role,
            csrf,
            expires: utc::rfc3339(expires),
        },
        id,
    ))
}

/// `GET /session`: who is calling.
pub(crate) async fn session_show(Read(caller): Read) -> ApiResult<Response> {
    Ok(json(&Whoami {
        name: caller.name,
        role: caller.role,
        csrf: caller.csrf,
    }))
}

/// `DELETE /session`: signs out (ends the session of the cookie; CSRF header needed
/// like any change) and clears the cookie.
pub(crate) async fn session_delete(State(st): St, Read(caller): Read) -> ApiResult<Response> {
    if let Some(h) = caller.session {
        let name = caller.name;
        st.catalog(move |c| {
            c.delete_session(&h)?;
            c.audit(now(), &name, "sign-out", "")
        })
        .await?;
    }
    let clear = format!("{SESSION_COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0");
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, clear)]).into_response())
}

// ---------------------------------------------------------------------------------
// Users

pub(crate) async fn users_list(State(st): St, _: Read) -> ApiResult<Response> {
    Ok(json(&st.catalog(|c| c.users()).await?))
}

/// Hashes a new password on a blocking thread, in turn.
async fn hash_new(pw: String) -> ApiResult<String> {
    check_password(&pw).map_err(bad)?;
    let _turn = hash_turn().await?;
    crate::http::blocking(move || pki::hash_password(&pw).map_err(internal)).await
}

/// `POST /users` (admin).
pub(crate) async fn user_create(
    State(st): St,
    Admin(caller): Admin,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateUser = parse(&body)?;
    req.validate().map_err(bad)?;
    let hash = hash_new(req.password).await?;
    let (name, role) = (req.name, req.role);
    let u = st
        .catalog(move |c| {
            let u = c.create_user(now(), &name, role, &hash)?;
            c.audit(
                now(),
                &caller.name,
                "user create",
                &format!("{name} role {role}"),
            )?;
            Ok::<_, catalog::Error>(u)
        })
        .await?;
    Ok(created(json(&u)))
}

/// `PATCH /users/{name}` (admin): role and/or disabled.
pub(crate) async fn user_modify(
    State(st): St,
    Admin(caller): Admin,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ModifyUser = parse(&body)?;
    if req.role.is_none() && req.disabled.is_none() {
        return Err(bad("nothing to change: give role and/or disabled"));
    }
    let u = st
        .catalog(move |c| {
            let u = c.modify_user(&name, req.role, req.disabled)?;
            let mut what = Vec::new();
            if let Some(r) = req.role {
                what.push(format!("role {r}"));
            }
            if let Some(d) = req.disabled {
                what.push(if d { "disabled" } else { "enabled" }.to_string());
            }
            c.audit(
                now(),
                &caller.name,
                "user modify",
                &format!("{name}: {}", what.join(", ")),
            )?;
            Ok::<_, catalog::Error>(u)
        })
        .await?;
    Ok(json(&u))
}

/// `POST /users/{name}/password`: an admin sets anyone's; a user changes its own with
/// the old one. Either way the user's sessions end.
pub(crate) async fn user_password(
    State(st): St,
    Read(caller): Read,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let own = caller.name == name && caller.session.is_some();
    if caller.role < Role::Admin && !own {
        return Err(forbidden(format!(
            "{} (role {}) may change only its own password, signed in",
            caller.name, caller.role
        )));
    }
    let req: SetPassword = parse(&body)?;
    check_password(&req.new).map_err(bad)?;
    if caller.role < Role::Admin
        && let Err(e) = check_old(&st, &caller, req.old.clone()).await
    {
        tokio::time::sleep(FAIL_DELAY).await;
        return Err(e);
    }
    let hash = hash_new(req.new).await?;
    st.catalog(move |c| {
        c.set_password_hash(&name, &hash)?;
        let what = if caller.name == name {
            "changed"
        } else {
            "reset"
        };
        c.audit(
            now(),
            &caller.name,
            "user password",
            &format!("{name}: {what}"),
        )
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The caller's old password must match (a stolen session alone cannot change it).
async fn check_old(
    st: &std::sync::Arc<AppState>,
    caller: &Caller,
    old: Option<String>,
) -> ApiResult<()> {
    let old = old.ok_or_else(|| bad("old: your current password is needed"))?;
    let name = caller.name.clone();
    let _turn = hash_turn().await?;
    st.offload(move |st| {
        let c = st
            .cat()
            .credentials(&name)?
            .ok_or_else(|| forbidden("no such user"))?;
        if pki::verify_password(&old, &c.password_hash) {
            return Ok(());
        }
        st.cat().audit(
            now(),
            &name,
            "password change refused",
            "wrong old password",
        )?;
        Err(forbidden("the old password is wrong"))
    })
    .await
}

// ---------------------------------------------------------------------------------
// API tokens

pub(crate) async fn tokens_list(State(st): St, _: Read) -> ApiResult<Response> {
    Ok(json(&st.catalog(|c| c.api_tokens()).await?))
}

/// `POST /tokens` (admin): the token is in this answer and nowhere else, ever.
pub(crate) async fn token_create(
    State(st): St,
    Admin(caller): Admin,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateToken = parse(&body)?;
    req.validate().map_err(bad)?;
    let token = pki::make_api_token().map_err(internal)?;
    let hash = pki::secret_hash(&token);
    let now = now();
    let expires = req
        .expires_days
        .map(|d| now.saturating_add(i64::from(d).saturating_mul(86_400)));
    let info = st
        .catalog(move |c| {
            let t = c.create_api_token(now, &req.name, req.role, &hash, expires, &caller.name)?;
            c.audit(
                now,
                &caller.name,
                "token create",
                &format!("{} ({}) role {}", t.name, t.id, t.role),
            )?;
            Ok::<_, catalog::Error>(t)
        })
        .await?;
    Ok(created(json(&CreatedToken { info, token })))
}

/// `DELETE /tokens/{id}` (admin): answers `{id, revoked: true}`.
pub(crate) async fn token_delete(
    State(st): St,
    Admin(caller): Admin,
    Path(id): Path<i64>,
) -> ApiResult<Response> {
    st.catalog(move |c| {
        c.delete_api_token(id)?;
        c.audit(now(), &caller.name, "token revoke", &id.to_string())
    })
    .await?;
    Ok(json(&serde_json::json!({ "id": id, "revoked": true })))
}
