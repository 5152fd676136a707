//! Users, roles, API tokens and sessions against a real `holdfast server`: every API
//! route × every kind of caller (the table below, checked against api.rs), the session
//! flow with its cookie and CSRF header, lockout, disabled users, expired tokens, and
//! that no password or token is stored in clear.

mod common;
#[path = "../../fsview/tests/support/mod.rs"]
mod support;

use common::cluster::*;
use common::*;
use protocol::*;
use reqwest::Method;
use reqwest::blocking::{Client as Http, Response};
use std::path::Path;
use std::time::Duration;

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Need {
    /// Anyone, even without credentials (the CA, enrollment, signing in).
    Open,
    /// At least this role (admin token, API token or session).
    AtLeast(Role),
    /// An enrolled agent's client certificate only.
    Agent,
}

use Need::*;

const ADMIN: Need = AtLeast(Role::Admin);
const OPERATOR: Need = AtLeast(Role::Operator);
const RESTORE: Need = AtLeast(Role::Restore);
const READ: Need = AtLeast(Role::Auditor);

const BLOB: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Every route of crates/server/src/api.rs: (method, pattern, who may call it). The
/// pattern is as api.rs spells it; `fill` gives its parameters values naming nothing.
const ROUTES: &[(&str, &str, Need)] = &[
    ("GET", "/status", READ),
    ("GET", "/ca", Open),
    ("POST", "/enroll", Open),
    ("POST", "/agent-tokens", ADMIN),
    ("GET", "/agents", READ),
    ("POST", "/agents/{host}/revoke", ADMIN),
    ("GET", "/datasources", READ),
    ("POST", "/datasources/{host}/{vm}/backup", OPERATOR),
    ("POST", "/datasources/{host}/{vm}/move", ADMIN),
    ("GET", "/clusters", READ),
    ("POST", "/clusters", ADMIN),
    ("GET", "/clusters/{name}", READ),
    ("DELETE", "/clusters/{name}", ADMIN),
    ("POST", "/clusters/{name}/hosts", ADMIN),
    ("DELETE", "/clusters/{name}/hosts/{host}", ADMIN),
    ("GET", "/storage", READ),
    ("POST", "/storage", ADMIN),
    ("GET", "/storage/{name}", READ),
    ("DELETE", "/storage/{name}", ADMIN),
    ("POST", "/storage/{name}/test", OPERATOR),
    ("GET", "/storage/{name}/key", ADMIN),
    ("POST", "/storage/{name}/attach", ADMIN),
    ("POST", "/storage/{name}/verify", OPERATOR),
    ("GET", "/datasources/{host}/{vm}/exclusions", READ),
    ("PUT", "/datasources/{host}/{vm}/exclusions", OPERATOR),
    (
        "POST",
        "/datasources/{host}/{vm}/consistency-check",
        OPERATOR,
    ),
    ("GET", "/protection-groups", READ),
    ("POST", "/protection-groups", OPERATOR),
    ("GET", "/protection-groups/{name}", READ),
    ("PATCH", "/protection-groups/{name}", OPERATOR),
    ("DELETE", "/protection-groups/{name}", OPERATOR),
    (
        "DELETE",
        "/protection-groups/{name}?delete_data=true",
        ADMIN,
    ),
    ("POST", "/protection-groups/{name}/online-copy", OPERATOR),
    ("GET", "/recovery-points", READ),
    ("GET", "/recovery-points/{id}/browse", READ),
    ("GET", "/recovery-points/{id}/file", RESTORE),
    ("GET", "/recovery-points/{id}/disks/{n}/data", RESTORE),
    ("GET", "/recovery-points/{id}/disks/{n}/map", READ),
    ("POST", "/recoveries", RESTORE),
    ("GET", "/jobs", READ),
    ("POST", "/jobs", OPERATOR),
    ("GET", "/jobs/{id}", READ),
    ("POST", "/jobs/{id}/cancel", OPERATOR),
    ("GET", "/alerts", READ),
    ("POST", "/alerts/{id}/resolve", OPERATOR),
    ("GET", "/audit", READ),
    ("GET", "/session", READ),
    ("POST", "/session", Open),
    ("DELETE", "/session", READ),
    ("GET", "/users", READ),
    ("POST", "/users", ADMIN),
    ("PATCH", "/users/{name}", ADMIN),
    ("POST", "/users/{name}/password", ADMIN),
    ("GET", "/tokens", READ),
    ("POST", "/tokens", ADMIN),
    ("DELETE", "/tokens/{id}", ADMIN),
    ("POST", "/agent/inventory", Agent),
    ("POST", "/agent/replica-params", Agent),
    ("POST", "/agent/jobs/{id}/start", Agent),
    ("GET", "/agent/jobs/{id}/blob/{blob}", Agent),
    ("GET", "/agent/jobs/{id}/recovery-blob/{blob}", Agent),
    ("POST", "/agent/jobs/{id}/recovery-blobs", Agent),
    ("POST", "/agent/jobs/{id}/recovered", Agent),
    ("POST", "/agent/jobs/{id}/progress", Agent),
    ("POST", "/agent/jobs/{id}/commit", Agent),
    ("POST", "/agent/jobs/{id}/fail", Agent),
    ("POST", "/agent/jobs/{id}/missing", Agent),
    ("POST", "/agent/jobs/{id}/blobs", Agent),
    ("POST", "/agent/poll", Agent),
];

/// The pattern with its parameters filled with values that name nothing, so allowed
/// calls fail on their input (400/404/409) and change nothing.
fn fill(pattern: &str) -> String {
    pattern
        .replace("{host}", "nohost")
        .replace("{vm}", "novm")
        .replace("{name}", "nothing")
        .replace("{id}", "999999")
        .replace("{n}", "0")
        .replace("{blob}", BLOB)
}

/// The table holds exactly the route patterns api.rs registers.
#[test]
fn the_table_covers_every_route() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../server/src/api.rs"))
        .unwrap();
    let mut in_code: Vec<String> = src
        .split(".route(")
        .skip(1)
        .filter_map(|r| r.split('"').nth(1).map(str::to_string))
        .collect();
    in_code.sort();
    in_code.dedup();
    let mut in_table: Vec<String> = ROUTES
        .iter()
        .map(|(_, p, _)| p.split('?').next().unwrap().to_string())
        .collect();
    in_table.sort();
    in_table.dedup();
    assert_eq!(in_code, in_table);
    // And every method each pattern answers: a GET and POST route is two rows.
    let methods = |p: &str| {
        let after = src.split(&format!("\"{p}\"")).nth(1).unwrap();
        let upto = after.split(".route(").next().unwrap();
        let mut m: Vec<&str> = [
            ("get(", "GET"),
            ("post(", "POST"),
            ("put(", "PUT"),
            ("patch(", "PATCH"),
            ("delete(", "DELETE"),
        ]
        .iter()
        .filter(|(f, _)| upto.contains(f))
        .map(|(_, m)| *m)
        .collect();
        m.sort();
        m
    };
    for p in &in_code {
        let mut rows: Vec<&str> = ROUTES
            .iter()
            .filter(|(_, q, _)| q.split('?').next() == Some(p.as_str()))
            .map(|(m, _, _)| *m)
            .collect();
        rows.sort();
        rows.dedup();
        assert_eq!(rows, methods(p), "methods of {p}");
    }
}

fn http(c: &Cluster, identity: Option<&Path>) -> Http {
    let ca = std::fs::read_to_string(c.server_dir().join("ca.pem")).unwrap();
    let tls = match identity {
        Some(dir) => pki::AgentIdentity::load(dir)
            .unwrap()
            .client_config()
            .unwrap(),
        None => pki::client_config_trusting(&ca).unwrap(),
    };
    Http::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn url(c: &Cluster, path: &str) -> String {
    format!("{}{}{path}", c.url, API)
}

/// A caller of the table: how it authenticates.
struct Caller {
    name: &'static str,
    role: Option<Role>,
    agent: bool,
    http: Http,
    bearer: Option<String>,
}

impl Caller {
    fn send(&self, c: &Cluster, method: &str, path: &str) -> Response {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, url(c, path));
        if let Some(t) = &self.bearer {
            rb = rb.bearer_auth(t);
        }
        if method != "GET" && method != "DELETE" {
            rb = rb.header("content-type", "application/json").body("{}");
        }
        rb.send().unwrap()
    }
}

fn create_token(c: &Cluster, name: &str, role: Role, more: &[&str]) -> String {
    let mut args = vec![
        "tokens",
        "create",
        "--name",
        name,
        "--role",
        role.as_str(),
        "--json",
    ];
    args.extend_from_slice(more);
    let t: serde_json::Value = serde_json::from_str(&c.cli_ok(&args)).unwrap();
    t["token"].as_str().unwrap().to_string()
}

/// Every route × admin token, operator, restore and auditor tokens, an agent and
/// nobody: allowed callers never get 401/403, the others get 403 (401 without
/// credentials, and on agent routes without a certificate).
#[test]
fn every_route_checks_the_callers_role() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let mut c = Cluster::start(t.path(), FAST);
    let agent_dir = c.agent("hv01", &vms);
    wait_until("the agent enrolls", Duration::from_secs(30), || {
        pki::AgentIdentity::load(&agent_dir).is_ok()
    });
    let admin_token = std::fs::read_to_string(c.server_dir().join("admin.token")).unwrap();
    let plain = http(&c, None);
    let mut callers = vec![
        Caller {
            name: "admin token",
            role: Some(Role::Admin),
            agent: false,
            http: plain.clone(),
            bearer: Some(admin_token.trim().to_string()),
        },
        Caller {
            name: "nobody",
            role: None,
            agent: false,
            http: plain.clone(),
            bearer: None,
        },
        Caller {
            name: "agent",
            role: None,
            agent: true,
            http: http(&c, Some(&agent_dir)),
            bearer: None,
        },
    ];
    for (name, role) in [
        ("admin API token", Role::Admin),
        ("operator", Role::Operator),
        ("restore", Role::Restore),
        ("auditor", Role::Auditor),
    ] {
        callers.push(Caller {
            name,
            role: Some(role),
            agent: false,
            http: plain.clone(),
            bearer: Some(create_token(&c, &name.replace(' ', "-"), role, &[])),
        });
    }
    let mut checked = 0;
    for (method, pattern, need) in ROUTES {
        let path = fill(pattern);
        for who in &callers {
            let allowed = match need {
                Open => true,
                Agent => who.agent,
                AtLeast(min) => who.role.is_some_and(|r| r >= *min),
            };
            let got = who.send(&c, method, &path).status().as_u16();
            let what = format!("{method} {pattern} as {}: {got}", who.name);
            if allowed {
                assert!(
                    got != 401 && got != 403 && got < 500,
                    "{what}, expected allowed"
                );
            } else {
                let want = match need {
                    Agent => 401,
                    _ if who.agent => 403,
                    _ if who.role.is_none() => 401,
                    _ => 403,
                };
                // An agent route answers an agent-less caller 401 (no certificate);
                // the table's agent caller has one, so it is never refused there.
                assert_eq!(got, want, "{what}, expected {want}");
            }
            checked += 1;
        }
    }
    eprintln!("{checked} route × caller checks");
    // The callers' names reach the audit log.
    let audit: Vec<serde_json::Value> = c.admin().get("/audit").unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e["actor"] == "admin" && e["action"] == "token create"),
        "{audit:?}"
    );
}

/// A raw client of its own (no cookie store): the tests set the cookie by hand.
fn login(c: &Cluster, h: &Http, name: &str, password: &str) -> Response {
    h.post(url(c, "/session"))
        .json(&serde_json::json!({ "name": name, "password": password }))
        .send()
        .unwrap()
}

fn create_user(c: &Cluster, dir: &Path, name: &str, role: Role, password: &str) {
    let f = dir.join(format!("{name}.pw"));
    std::fs::write(&f, format!("{password}\n")).unwrap();
    c.cli_ok(&[
        "users",
        "create",
        name,
        "--role",
        role.as_str(),
        "--password-file",
        s(&f),
    ]);
}

/// Sign-in, the cookie's flags, CSRF on changes, sign-out.
fn session_flow(c: &Cluster, h: &Http) {
    // Sign in: the cookie's flags, the CSRF token in the answer.
    let r = login(c, h, "olive", "olive-secret-pw");
    assert_eq!(r.status().as_u16(), 201);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(
            set.split("; ").any(|f| f == flag),
            "{flag} missing in {set}"
        );
    }
    let cookie = set.split(';').next().unwrap().to_string();
    assert!(cookie.starts_with("holdfast_session="));
    let info: SessionInfo = r.json().unwrap();
    assert_eq!((info.user.as_str(), info.role), ("olive", Role::Operator));
    let who: Whoami = h
        .get(url(c, "/session"))
        .header("cookie", &cookie)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(who.name, "olive");
    assert_eq!(who.csrf.as_deref(), Some(info.csrf.as_str()));

    // A change without the CSRF header, or with a wrong one: 403. With it: done.
    let body = serde_json::json!({ "kind": "gc" });
    let job = |csrf: Option<&str>| {
        let mut rb = h
            .post(url(c, "/jobs"))
            .header("cookie", &cookie)
            .json(&body);
        if let Some(x) = csrf {
            rb = rb.header("x-csrf-token", x);
        }
        rb.send().unwrap()
    };
    let r = job(None);
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().unwrap().contains("CSRF token missing or wrong"));
    assert_eq!(job(Some(&"0".repeat(64))).status().as_u16(), 403);
    let r = job(Some(&info.csrf));
    assert_eq!(r.status().as_u16(), 201);
    let j: JobInfo = r.json().unwrap();
    assert_eq!(j.trigger, "olive");
    let audit: Vec<AuditEntryJson> = c.admin().get("/audit").unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.actor == "olive" && e.action == "sign-in")
    );

    // Sign out (a change: CSRF needed), then the cookie is worth nothing.
    let out = |csrf: Option<&str>| {
        let mut rb = h.delete(url(c, "/session")).header("cookie", &cookie);
        if let Some(x) = csrf {
            rb = rb.header("x-csrf-token", x);
        }
        rb.send().unwrap()
    };
    assert_eq!(out(None).status().as_u16(), 403);
    let r = out(Some(&info.csrf));
    assert_eq!(r.status().as_u16(), 204);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let r = h
        .get(url(c, "/jobs"))
        .header("cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

/// Five wrong passwords lock a user; an admin's reset unlocks it.
fn lockout(c: &Cluster, h: &Http, dir: &Path) {
    // Five wrong passwords in a row lock the user; the right one is refused meanwhile.
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(
            login(c, h, "olive", "wrong-password").status().as_u16(),
            401
        );
    }
    // Each failure is slowed down.
    assert!(
        started.elapsed() >= Duration::from_millis(5 * 450),
        "{:?}",
        started.elapsed()
    );
    let r = login(c, h, "olive", "olive-secret-pw");
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.text().unwrap().contains("locked until"));
    let users: Vec<UserInfo> = c.admin().get("/users").unwrap();
    assert!(users[0].locked_until.is_some(), "{users:?}");
    let audit: Vec<AuditEntryJson> = c.admin().get("/audit").unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.actor == "olive" && e.action == "user locked")
    );
    // An admin's reset ends the lock.
    let pw = dir.join("new.pw");
    std::fs::write(&pw, "olive-new-password\n").unwrap();
    c.cli_ok(&[
        "users",
        "reset-password",
        "olive",
        "--password-file",
        s(&pw),
    ]);
    assert_eq!(
        login(c, h, "olive", "olive-new-password").status().as_u16(),
        201
    );

    // Unknown users answer like wrong passwords.
    assert_eq!(login(c, h, "nobody", "whatever-pw").status().as_u16(), 401);
}

/// Disabled users and changing one's own password.
fn disabled_users_and_own_password(c: &Cluster, h: &Http, dir: &Path) {
    // A disabled user cannot sign in, and its open session stops working.
    create_user(c, dir, "dora", Role::Auditor, "dora-secret-pw");
    let r = login(c, h, "dora", "dora-secret-pw");
    let dora = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    c.cli_ok(&["users", "disable", "dora"]);
    assert_eq!(login(c, h, "dora", "dora-secret-pw").status().as_u16(), 403);
    let r = h
        .get(url(c, "/status"))
        .header("cookie", &dora)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    c.cli_ok(&["users", "enable", "dora"]);
    assert_eq!(login(c, h, "dora", "dora-secret-pw").status().as_u16(), 201);

    // A user changes its own password only with the old one; not another's.
    let r = login(c, h, "dora", "dora-secret-pw");
    let dc = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let di: SessionInfo = r.json().unwrap();
    let change = |who: &str, old: &str| {
        h.post(url(c, &format!("/users/{who}/password")))
            .header("cookie", &dc)
            .header("x-csrf-token", &di.csrf)
            .json(&serde_json::json!({ "old": old, "new": "dora-second-pw" }))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(change("olive", "dora-secret-pw"), 403);
    assert_eq!(change("dora", "not-the-old-one"), 403);
    assert_eq!(change("dora", "dora-secret-pw"), 204);
    assert_eq!(login(c, h, "dora", "dora-second-pw").status().as_u16(), 201);
}

/// API tokens: shown once, expired, revoked, stopped with their creator. Returns the
/// tokens made, to search the catalog for.
fn tokens(c: &Cluster, h: &Http, dir: &Path) -> Vec<String> {
    // Tokens: shown once (the list has no secret); an expired one is refused.
    let out = c.cli_ok(&[
        "tokens",
        "create",
        "--name",
        "ci",
        "--role",
        "auditor",
        "--expires",
        "1",
    ]);
    let tok = out.trim().to_string();
    assert!(tok.starts_with("hft_"), "{out}");
    let list = c.cli_ok(&["tokens", "list", "--json"]);
    assert!(!list.contains(&tok[4..]), "{list}");
    let as_tok = |tok: &str| {
        h.get(url(c, "/status"))
            .bearer_auth(tok)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(as_tok(&tok), 200);
    let db = rusqlite::Connection::open(c.server_dir().join("catalog.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute("UPDATE api_tokens SET expires = 1000 WHERE name = 'ci'", [])
        .unwrap();
    assert_eq!(as_tok(&tok), 401);
    // Revoked: refused too.
    let t2 = create_token(c, "ci2", Role::Auditor, &[]);
    assert_eq!(as_tok(&t2), 200);
    let tokens: Vec<TokenInfo> = c.admin().get("/tokens").unwrap();
    let id = tokens.iter().find(|t| t.name == "ci2").unwrap().id;
    c.cli_ok(&["tokens", "revoke", &id.to_string()]);
    assert_eq!(as_tok(&t2), 401);
    drop(db);

    // A token made by an admin user (through its session) stops with its creator.
    create_user(c, dir, "ada", Role::Admin, "ada-secret-pw");
    let r = login(c, h, "ada", "ada-secret-pw");
    let ac = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let ai: SessionInfo = r.json().unwrap();
    let made: CreatedToken = h
        .post(url(c, "/tokens"))
        .header("cookie", &ac)
        .header("x-csrf-token", &ai.csrf)
        .json(&serde_json::json!({ "name": "ada-script", "role": "operator" }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(made.info.created_by, "ada");
    assert_eq!(as_tok(&made.token), 200);
    c.cli_ok(&["users", "disable", "ada"]);
    assert_eq!(as_tok(&made.token), 401);
    c.cli_ok(&["users", "enable", "ada"]);
    assert_eq!(as_tok(&made.token), 200);
    let audit: Vec<AuditEntryJson> = c.admin().get("/audit").unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.actor == "ada" && e.action == "token create")
    );

    vec![tok, t2, made.token]
}

#[test]
fn sessions_csrf_lockout_disabled_users_and_expired_tokens() {
    let t = tempfile::tempdir().unwrap();
    let c = Cluster::start(t.path(), FAST);
    let h = http(&c, None);
    create_user(&c, t.path(), "olive", Role::Operator, "olive-secret-pw");
    session_flow(&c, &h);
    lockout(&c, &h, t.path());
    disabled_users_and_own_password(&c, &h, t.path());
    let made = tokens(&c, &h, t.path());

    // Nothing secret is in the catalog in clear: not the passwords, not the tokens.
    let mut bytes = Vec::new();
    for f in std::fs::read_dir(c.server_dir()).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("catalog.db")
        {
            bytes.extend(std::fs::read(&p).unwrap());
        }
    }
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("$argon2id$"),
        "password hashes are argon2id PHC strings"
    );
    for secret in [
        "olive-secret-pw",
        "olive-new-password",
        "dora-secret-pw",
        "dora-second-pw",
        "ada-secret-pw",
        &made[0],
        &made[1],
        &made[2],
    ] {
        assert!(
            !text.contains(secret),
            "{secret} is in the catalog in clear"
        );
    }
}

#[derive(serde::Deserialize, Debug)]
struct AuditEntryJson {
    actor: String,
    action: String,
}

/// A `restore` user browses a real recovery point but may not delete its data; an
/// operator may delete the group but not with its recovery points.
#[test]
fn a_restore_user_browses_but_deletes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    let src = t.path().join("src");
    std::fs::create_dir_all(vms.join("a")).unwrap();
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello from the recovery point\n").unwrap();
    support::mke2fs(&vms.join("a/a-disk0.raw"), "ext4", 16, "RP", &src, None);
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("pg1", &["hv01/a"]);
    let h = http(&c, None);
    create_user(&c, t.path(), "rita", Role::Restore, "rita-secret-pw");
    let r = login(&c, &h, "rita", "rita-secret-pw");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let info: SessionInfo = r.json().unwrap();
    let points: Vec<RecoveryPointInfo> = h
        .get(url(&c, "/recovery-points"))
        .header("cookie", &cookie)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(points.len(), 1);
    let r = h
        .get(url(
            &c,
            &format!("/recovery-points/{}/browse", points[0].id),
        ))
        .header("cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let listing = r.text().unwrap();
    assert!(listing.contains("hello.txt"), "{listing}");
    // The file itself: restore may download it, an auditor may not.
    let file = url(
        &c,
        &format!("/recovery-points/{}/file?path=/hello.txt", points[0].id),
    );
    let r = h.get(&file).header("cookie", &cookie).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.bytes().unwrap().as_ref(),
        b"hello from the recovery point\n"
    );
    let aud = create_token(&c, "aud", Role::Auditor, &[]);
    assert_eq!(
        h.get(&file)
            .bearer_auth(&aud)
            .send()
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    for path in [
        "/protection-groups/pg1?delete_data=true",
        "/protection-groups/pg1",
    ] {
        let r = h
            .delete(url(&c, path))
            .header("cookie", &cookie)
            .header("x-csrf-token", &info.csrf)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path}");
    }
    let op = create_token(&c, "op", Role::Operator, &[]);
    let r = h
        .delete(url(&c, "/protection-groups/pg1?delete_data=true"))
        .bearer_auth(&op)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Nothing was deleted.
    let groups: Vec<serde_json::Value> = c.admin().get("/protection-groups").unwrap();
    assert_eq!(groups.len(), 1);
    let points: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    assert_eq!(points.len(), 1);
}
