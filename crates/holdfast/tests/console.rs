//! The web console in a real browser (headless Chromium through chromedriver): a real
//! server and agent with a small VM in a protection group; the interim sign-in, every
//! page with its nav bar, main landmark, title, data and no console errors, the job
//! filters, the recovery calendar, a list refreshed by console.js without a reload,
//! the keyboard reaching the nav, and sign-out. `HOLDFAST_CONSOLE_SHOTS=1` also writes
//! each page's screenshot to docs/console/NAME.png (never by default: tracked files).

mod common;

use common::cluster::*;
use protocol::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use testkit::browser::Browser;

/// VM `web01` under `root`: one 4 MiB raw disk of random data, listed in a vm.toml.
fn make_vm(root: &Path) {
    let dir = root.join("web01");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk0.raw"), testkit::Rng::new(17).bytes(4 << 20)).unwrap();
    std::fs::write(
        dir.join("vm.toml"),
        "name = \"web01\"\ndisks = [\"disk0.raw\"]\n",
    )
    .unwrap();
}

fn shots_dir() -> Option<PathBuf> {
    (std::env::var("HOLDFAST_CONSOLE_SHOTS").as_deref() == Ok("1"))
        .then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/console"))
}

/// Loads `path` and checks what every page has: the nav bar, one main landmark, a
/// title, each of `expect` in the main text, and a clean browser console.
fn visit(b: &Browser, base: &str, name: Option<&str>, path: &str, expect: &[&str]) -> String {
    b.goto(&format!("{base}{path}"));
    assert!(
        !b.current_url().ends_with("/login"),
        "{path} sent us to sign in"
    );
    assert!(
        b.exists("nav[aria-label=Main] a[href='/jobs']"),
        "{path}: no nav bar"
    );
    assert_eq!(
        b.execute("return document.querySelectorAll('main').length"),
        1,
        "{path}: main"
    );
    let title = b.execute("return document.title");
    assert!(
        title.as_str().is_some_and(|t| t.ends_with("· Holdfast")),
        "{path}: title {title}"
    );
    assert!(!b.text("main h1").is_empty(), "{path}: no heading");
    let main = b.text("main");
    for e in expect {
        assert!(main.contains(e), "{path}: {e:?} missing from:\n{main}");
    }
    let errors = b.console_errors();
    assert!(errors.is_empty(), "{path}: console errors {errors:?}");
    if let (Some(dir), Some(name)) = (shots_dir(), name) {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), b.screenshot()).unwrap();
    }
    main
}

#[test]
fn console_pages_in_chromium() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    make_vm(&vms);
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("gold", &["hv01/web01"]);
    let job = c
        .jobs()
        .into_iter()
        .find(|j| j.kind == JobKind::InitialReplica)
        .unwrap();
    let point = job.recovery_point.clone().unwrap();
    let token = std::fs::read_to_string(c.server_dir().join("admin.token")).unwrap();
    let base = c.url.clone();

    let b = Browser::start(1024, 700);
    // Signed out, every page sends to the sign-in form.
    b.goto(&format!("{base}/hosts"));
    assert!(b.current_url().ends_with("/login"), "{}", b.current_url());
    // Attacker: a wrong token and one that would add cookie attributes are refused.
    for bad in ["not-the-token", "x; Domain=evil"] {
        b.fill("#token", bad);
        b.click("button[type=submit]");
        assert!(b.exists("p.error"), "{bad:?} was not refused");
        assert!(b.exists("#token"), "{bad:?} left the sign-in page");
    }
    b.console_errors(); // the 400/401 answers above are logged as failed loads
    if let Some(dir) = shots_dir() {
        b.goto(&format!("{base}/login"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("login.png"), b.screenshot()).unwrap();
    }
    b.goto(&format!("{base}/login"));
    b.fill("#token", token.trim());
    b.click("button[type=submit]");
    b.wait_for("nav[aria-label=Main]", Duration::from_secs(10));
    // The token's cookie is HttpOnly: no script on the page can read it.
    let cookies = b.execute("return document.cookie");
    assert!(
        !cookies.as_str().unwrap_or("").contains("holdfast_admin"),
        "{cookies}"
    );

    visit(
        &b,
        &base,
        Some("dashboard"),
        "/",
        &["hv01/web01", "gold", "1 OK", "Running jobs", "Datastore"],
    );
    visit(&b, &base, Some("hosts"), "/hosts", &["hv01", "yes"]);
    visit(
        &b,
        &base,
        Some("groups"),
        "/groups",
        &["gold", "hv01/web01", "7 days of retention"],
    );
    let id = job.id.to_string();
    visit(
        &b,
        &base,
        Some("jobs"),
        "/jobs",
        &["initial-replica", "hv01/web01", &format!("#{id}")],
    );
    let filtered = "/jobs?state=succeeded&kind=initial-replica";
    visit(&b, &base, None, filtered, &[&format!("#{id}")]);
    visit(&b, &base, None, "/jobs?state=failed", &["No jobs."]);
    visit(
        &b,
        &base,
        Some("job"),
        &format!("/jobs/{id}"),
        &["succeeded", "hv01/web01", &point, "Log"],
    );
    visit(&b, &base, Some("alerts"), "/alerts", &[]);
    let rp = "/recovery-points?vm=hv01%2Fweb01";
    visit(
        &b,
        &base,
        Some("recovery-points"),
        rp,
        &[&point, "1 recovery points in all"],
    );
    // The calendar: the point's day in bold, and only that one.
    let points: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points?vm=hv01/web01").unwrap();
    let day = utc::civil_from_days(points[0].created_unix.div_euclid(86_400)).2;
    assert_eq!(b.texts(".calendar strong"), vec![day.to_string()]);

    // Every page carries its security headers; the API under the same origin still
    // answers as before, and the interim cookie alone opens none of it (only the
    // console turns it into a bearer token), so a forged cross-site API call gets 401.
    let h = b.execute(
        "return fetch('/hosts').then(r => [r.status, r.headers.get('content-security-policy'), r.headers.get('x-content-type-options'), r.headers.get('cache-control')])",
    );
    assert_eq!(h[0], 200, "{h}");
    assert!(
        h[1].as_str().unwrap().starts_with("default-src 'self'"),
        "{h}"
    );
    assert!(
        h[1].as_str().unwrap().contains("frame-ancestors 'none'"),
        "{h}"
    );
    assert_eq!(h[2], "nosniff", "{h}");
    assert_eq!(h[3], "no-store", "{h}");
    let api = b.execute("return fetch('/api/v1/status').then(r => r.status)");
    assert_eq!(api, 401, "{api}");
    b.console_errors(); // the 401 above is logged as a failed load

    // An unknown filter is refused, not passed on.
    b.goto(&format!("{base}/jobs?state=bogus"));
    assert!(
        b.text("main").contains("no job state"),
        "{}",
        b.text("main")
    );
    b.console_errors();

    // console.js refreshes the job list in place: a new job shows up without a reload.
    b.goto(&format!("{base}/jobs"));
    b.execute("window.stayed = 1; return null");
    let out = c.cli_ok(&["backup-now", "hv01/web01", "--json"]);
    let new: JobInfo = serde_json::from_str(&out).unwrap();
    b.wait_for(
        &format!("#job-list a[href='/jobs/{}']", new.id),
        Duration::from_secs(20),
    );
    assert_eq!(
        b.execute("return window.stayed || 0"),
        1,
        "the page was reloaded"
    );
    c.wait_job(new.id);
    assert!(b.console_errors().is_empty());

    // Keyboard: Tab from the top reaches the skip link, then the nav links in order.
    b.goto(&format!("{base}/"));
    let mut reached = Vec::new();
    for _ in 0..4 {
        b.press_tab();
        let href = b.execute(
            "const a = document.activeElement; return a && a.closest('nav[aria-label=Main]') ? a.getAttribute('href') : null",
        );
        if let Some(h) = href.as_str() {
            reached.push(h.to_string());
        }
    }
    assert_eq!(
        reached.first().map(String::as_str),
        Some("/"),
        "{reached:?}"
    );
    assert!(reached.iter().any(|h| h == "/hosts"), "{reached:?}");

    // Sign out: the cookie is gone, pages send to sign in again.
    b.click("form.signout button");
    b.wait_for("#token", Duration::from_secs(10));
    b.goto(&format!("{base}/groups"));
    assert!(b.current_url().ends_with("/login"), "{}", b.current_url());
}
