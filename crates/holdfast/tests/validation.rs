//! One validation for the API and the CLI: each bad request is sent to a real server
//! raw (the admin client with hand-written JSON) and through the CLI, and both must
//! refuse it with the same message naming the field, creating nothing. VM names with
//! characters no name may hold come from a real agent's inventory.

mod common;

use common::cluster::*;
use common::*;
use protocol::*;
use serde_json::json;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// A VM folder `root/folder` with a 4 MiB raw disk, named `name` by its `vm.toml` (a
/// name no folder could hold: `..`, 5,000 bytes) or by the folder.
fn vm_folder(root: &Path, folder: &str, name: Option<&str>) {
    let dir = root.join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    make_disk(&dir.join("disk0.img"), 4 << 20, 0, 7);
    if let Some(n) = name {
        // TOML basic string: JSON's escapes are a subset.
        std::fs::write(dir.join("vm.toml"), format!("name = {}\n", json!(n))).unwrap();
    }
}

/// The API's refusal of `body` at `method path`: 400, with a message that names
/// `field`. Returns the message.
fn api_refuses(
    c: &Cluster,
    method: &str,
    path: &str,
    body: serde_json::Value,
    field: &str,
) -> String {
    let admin = c.admin();
    let r: Result<serde_json::Value, client::Error> = match method {
        "POST" => admin.post(path, &body),
        "PUT" => admin.put(path, &body),
        "PATCH" => admin.patch(path, &body),
        m => panic!("method {m}"),
    };
    match r {
        Err(client::Error::Status {
            status, message, ..
        }) => {
            assert_eq!(status, 400, "{method} {path} {body}: {message}");
            assert!(
                message.starts_with(&format!("{field}: ")),
                "{method} {path}: the message does not name {field}: {message}"
            );
            message
        }
        other => panic!("{method} {path} {body} was not refused: {other:?}"),
    }
}

/// The CLI's refusal: exit 1 with `message` (the API's very words) on stderr.
fn cli_refuses(c: &Cluster, args: &[&str], message: &str) {
    let o: Output = c.cli(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "holdfast {args:?}: {err}");
    assert!(
        err.contains(message),
        "holdfast {args:?} says something else than the API ({message}): {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn group_body(name: &str, member: &str, replica: serde_json::Value) -> serde_json::Value {
    json!({
        "name": name,
        "members": [member],
        "policy": {
            "retention_days": 7,
            "sync_frequency": {"minutes": 1440},
            "recovery_point_times": ["20:00"],
            "replica_creation": replica,
        }
    })
}

fn pg_create<'a>(name: &'a str, member: &'a str, replica: &'a str) -> Vec<&'a str> {
    vec![
        "pg",
        "create",
        name,
        "--member",
        member,
        "--retention-days",
        "7",
        "--sync-frequency",
        "1440",
        "--recovery-point-times",
        "20:00",
        "--replica",
        replica,
    ]
}

#[test]
fn bad_vm_names_are_left_out_of_the_inventory_with_an_alert() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    vm_folder(&vms, "sql", Some("SQL Server (prod) – 2019"));
    vm_folder(&vms, "web", None);
    let long = "v".repeat(5000);
    let bad_names = ["..", "a?b", "x#y", "ctl\u{1}z", long.as_str()];
    for (i, n) in bad_names.iter().enumerate() {
        vm_folder(&vms, &format!("bad{i}"), Some(n));
    }
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);

    // The inventory keeps the good VMs (a real-world Hyper-V name among them) and
    // leaves out the bad ones, with one alert naming them.
    wait_until("the bad names' alert", Duration::from_secs(30), || {
        c.alerts().iter().any(|a| a.kind == "vm-name-invalid")
    });
    let names: Vec<String> = c
        .datasources()
        .into_iter()
        .map(|d| d.name.to_string())
        .collect();
    assert_eq!(names, ["hv01/SQL Server (prod) – 2019", "hv01/web"]);
    let alert = c
        .alerts()
        .into_iter()
        .find(|a| a.kind == "vm-name-invalid")
        .unwrap();
    assert_eq!(alert.subject, "agent hv01");
    for shown in ["\"..\"", "\"a?b\"", "\"x#y\"", "\\u{1}", "(5000 bytes)"] {
        assert!(alert.message.contains(shown), "{shown}: {}", alert.message);
    }

    // Renamed, the VMs come in and the alert resolves.
    for i in 0..bad_names.len() {
        std::fs::write(
            vms.join(format!("bad{i}/vm.toml")),
            format!("name = \"fixed {i}\"\n"),
        )
        .unwrap();
    }
    c.wait_datasources(2 + bad_names.len());
    wait_until("the alert to resolve", Duration::from_secs(30), || {
        !c.alerts().iter().any(|a| a.kind == "vm-name-invalid")
    });
}

#[test]
fn api_and_cli_refuse_the_same_bad_requests_and_create_nothing() {
    let t = tempfile::tempdir().unwrap();
    let vms = t.path().join("vms");
    vm_folder(&vms, "sql", Some("SQL Server (prod) – 2019"));
    vm_folder(&vms, "web", None);
    let mut c = Cluster::start(t.path(), FAST);
    c.agent("hv01", &vms);
    c.wait_datasources(2);

    // Protection groups: impossible times, `.` and `..`, a member that is no name.
    for (at, name) in [
        ("9999-99-99T99:99:99Z", "g1"),
        ("2026-02-30T22:00:00Z", "g1"),
    ] {
        let m = api_refuses(
            &c,
            "POST",
            "/protection-groups",
            group_body(name, "hv01/web", json!({ "at": at })),
            "policy.replica_creation",
        );
        cli_refuses(&c, &pg_create(name, "hv01/web", at), &m);
    }
    for name in [".", ".."] {
        let m = api_refuses(
            &c,
            "POST",
            "/protection-groups",
            group_body(name, "hv01/web", json!("now")),
            "name",
        );
        cli_refuses(&c, &pg_create(name, "hv01/web", "now"), &m);
    }
    let m = api_refuses(
        &c,
        "POST",
        "/protection-groups",
        group_body("g1", "hv01/..", json!("now")),
        "members[0]",
    );
    cli_refuses(&c, &pg_create("g1", "hv01/..", "now"), &m);

    // Exclusions: not whole sectors; inside the partition table.
    for (range, json_range) in [("1049000+4096", [1049000u64, 4096]), ("0+4096", [0, 4096])] {
        let m = api_refuses(
            &c,
            "PUT",
            "/datasources/hv01/web/exclusions",
            json!({ "disks": [[json_range]] }),
            "exclusions.disks[0]",
        );
        cli_refuses(
            &c,
            &["datasources", "exclude", "hv01/web", "--range", range],
            &m,
        );
    }

    // Recoveries: a target folder with a newline, an impossible time.
    let m = api_refuses(
        &c,
        "POST",
        "/recoveries",
        json!({"vm": "hv01/web", "target": {"mode": "copy-to", "host": "hv01", "dir": "/tmp/a\nb"}}),
        "target.dir",
    );
    cli_refuses(
        &c,
        &["recover", "hv01/web", "--copy-to", "hv01:/tmp/a\nb"],
        &m,
    );
    cli_refuses(
        &c,
        &[
            "ilr",
            "get",
            "hv01/web",
            "/etc",
            "--to-folder",
            "hv01:/tmp/a\nb",
        ],
        &m,
    );
    let m = api_refuses(
        &c,
        "POST",
        "/recoveries",
        json!({"vm": "hv01/web", "at": "2026-02-30 10:00", "target": {"mode": "original"}}),
        "at",
    );
    cli_refuses(
        &c,
        &[
            "recover",
            "hv01/web",
            "--original",
            "--at",
            "2026-02-30 10:00",
        ],
        &m,
    );

    // Enrollment tokens: a host named `..`.
    let m = api_refuses(&c, "POST", "/agent-tokens", json!({"host": ".."}), "host");
    cli_refuses(&c, &["agent-token", "create", "--host", ".."], &m);

    // Nothing was created: no group, no exclusion, no recovery job, no other agent.
    let admin = c.admin();
    let groups: Vec<GroupInfo> = admin.get("/protection-groups").unwrap();
    assert!(groups.is_empty(), "{groups:?}");
    let ex: Exclusions = admin.get("/datasources/hv01/web/exclusions").unwrap();
    assert_eq!(ex, Exclusions::default());
    let jobs = c.jobs();
    assert!(
        jobs.iter()
            .all(|j| !matches!(j.kind, JobKind::Recovery | JobKind::InitialReplica)),
        "{jobs:?}"
    );
    let audit: Vec<serde_json::Value> = admin.get("/audit").unwrap();
    assert!(
        !audit
            .iter()
            .any(|a| a["action"] == "agent-token create" && a["detail"] == ".."),
        "{audit:?}"
    );

    // What is right still passes: a whole-sector range past the first MiB; a group
    // with a real time and a real-world VM name.
    c.cli_ok(&[
        "datasources",
        "exclude",
        "hv01/web",
        "--range",
        "1048576+65536",
    ]);
    let ex: Exclusions = admin.get("/datasources/hv01/web/exclusions").unwrap();
    assert_eq!(ex.disks, [vec![(1048576, 65536)]]);
    c.cli_ok(&pg_create(
        "gold (prod)",
        "hv01/SQL Server (prod) – 2019",
        "2099-12-31T23:00:00Z",
    ));
}
