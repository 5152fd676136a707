//! VM ids are not secrets: an enrolled agent that reports another host's VM id must
//! not take that host's data source over. Data sources follow a VM id on their own
//! only within a cluster, once the old host stops reporting the VM (live migration);
//! otherwise an administrator decides (`datasources move`). Alerts about a moved or
//! returned VM resolve themselves; any alert can be resolved by hand.

mod common;

use client::{Auth, Client};
use common::cluster::*;
use common::*;
use protocol::*;

use std::path::{Path, PathBuf};
use std::time::Duration;

const ID: &str = "5e0c1a7e-0000-4000-8000-0000000000b1";
const LIMIT: Duration = Duration::from_secs(60);

/// A VM folder `root/folder` named `name` with VM id `id` and one raw disk of `size`
/// bytes; returns the disk's path.
fn vm_folder(root: &Path, folder: &str, name: &str, id: &str, size: u64, seed: u64) -> PathBuf {
    let dir = root.join(folder);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.raw");
    make_disk(&disk, size, 1 << 20, seed);
    std::fs::write(
        dir.join("vm.toml"),
        format!("name = \"{name}\"\nid = \"{id}\"\ndisks = [\"disk.raw\"]\n"),
    )
    .unwrap();
    disk
}

fn find_ds(c: &Cluster, name: &str) -> Option<DataSourceInfo> {
    c.datasources().into_iter().find(|d| d.name == name)
}

fn all_alerts(c: &Cluster) -> Vec<AlertInfo> {
    c.admin().get("/alerts?all=true").unwrap()
}

/// Waits for an open alert of `kind` on `subject` that passes `f`.
fn wait_alert(c: &Cluster, subject: &str, kind: &str, f: impl Fn(&AlertInfo) -> bool) -> AlertInfo {
    let mut found = None;
    wait_until(&format!("a {kind} alert on {subject}"), LIMIT, || {
        found = c
            .alerts()
            .into_iter()
            .find(|a| a.subject == subject && a.kind == kind && f(a));
        found.is_some()
    });
    found.unwrap()
}

fn audit(c: &Cluster, action: &str) -> Vec<serde_json::Value> {
    let all: Vec<serde_json::Value> = c.admin().get("/audit").unwrap();
    all.into_iter().filter(|e| e["action"] == action).collect()
}

/// `backup-now VM --wait`: the job, which must have succeeded.
fn backup_now(c: &Cluster, vm: &str) -> JobInfo {
    let j: JobInfo =
        serde_json::from_str(&c.cli_ok(&["backup-now", vm, "--wait", "--json"])).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    c.job(j.id)
}

fn points(c: &Cluster, vm: &str) -> Vec<RecoveryPointInfo> {
    serde_json::from_str(&c.cli_ok(&["recovery-points", "list", "--vm", vm, "--json"])).unwrap()
}

fn members(c: &Cluster, group: &str) -> Vec<String> {
    let g: GroupInfo = serde_json::from_str(&c.cli_ok(&["pg", "show", group, "--json"])).unwrap();
    g.members
}

/// hv-b with VM `web` (id [`ID`]) protected by group `gold`, and hv-a's agent over
/// `vms-a` (empty unless the test put something there first).
fn setup(t: &Path) -> (Cluster, DataSourceInfo, PathBuf) {
    let vb = t.join("vms-b");
    let disk = vm_folder(&vb, "web", "web", ID, 4 << 20, 1);
    std::fs::create_dir_all(t.join("vms-a")).unwrap();
    let mut c = Cluster::start(t, FAST);
    c.agent("hv-b", &vb);
    c.wait_datasources(1);
    c.protect_daily("gold", &["hv-b/web"]);
    let web = find_ds(&c, "hv-b/web").unwrap();
    (c, web, disk)
}

/// Moves hv-b's VM folder to `to` and waits until the server marks hv-b/web absent.
fn leave_hv_b(c: &Cluster, t: &Path, to: &Path) {
    std::fs::rename(t.join("vms-b/web"), to).unwrap();
    wait_until("hv-b/web no longer reported", LIMIT, || {
        find_ds(c, "hv-b/web").is_some_and(|d| !d.present)
    });
}

#[test]
fn another_hosts_vm_id_does_not_take_over_its_data_source() {
    let t = tempfile::tempdir().unwrap();
    let va = t.path().join("vms-a");
    // The claimant: a VM of hv-a's own, named alike, under hv-b/web's VM id.
    vm_folder(&va, "web", "web", ID, 2 << 20, 2);
    let (mut c, web, disk_b) = setup(t.path());
    c.agent("hv-a", &va);

    // Several of hv-a's inventories repeat the claim (hv-b's come in between).
    let alert = wait_alert(&c, "hv-b/web", "vm-id-conflict", |a| a.occurrences >= 3);
    assert_eq!(alert.severity, Severity::Critical);
    assert!(
        alert.message.contains("hv-a/web") && alert.message.contains("hv-b/web"),
        "{}",
        alert.message
    );
    assert!(
        alert.message.contains("still reported by its host"),
        "{}",
        alert.message
    );
    let now = find_ds(&c, "hv-b/web").expect("hv-b/web still exists");
    assert_eq!(now.id, web.id);
    assert!(now.present);
    assert_eq!(now.protection_group.as_deref(), Some("gold"));
    assert!(find_ds(&c, "hv-a/web").is_none(), "{:?}", c.datasources());
    assert_eq!(members(&c, "gold"), ["hv-b/web"]);
    // One audit entry for the claim, not one per inventory.
    let a = audit(&c, "vm-id conflict");
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0]["actor"], "agent hv-a");
    let detail = a[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("hv-a/web") && detail.contains("hv-b/web"),
        "{detail}"
    );
    let listed = c.cli_ok(&["alerts", "list"]);
    assert!(listed.contains("critical"), "{listed}");

    // The schedule and backup-now run on hv-b, with hv-b's disk.
    let j = backup_now(&c, "hv-b/web");
    assert!(
        j.log.iter().any(|l| l.message == "handed to agent hv-b"),
        "{:?}",
        j.log
    );
    let pts = points(&c, "hv-b/web");
    assert_eq!(pts.len(), 2, "{pts:?}");
    for p in &pts {
        assert_eq!(p.vm, "hv-b/web");
        assert_eq!(p.datasource_id, web.id);
        assert_eq!(p.disks[0].virtual_size, 4 << 20, "hv-a's disk is 2 MiB");
    }
    // And a recovery restores hv-b's disk on hv-b.
    let copies = t.path().join("copies");
    c.cli_ok(&[
        "recover",
        "hv-b/web",
        "--copy-to",
        &format!("hv-b:{}", s(&copies)),
        "--wait",
    ]);
    let folder = std::fs::read_dir(&copies)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(hash_file(&folder.join("disk.raw")), hash_file(&disk_b));
    assert_eq!(find_ds(&c, "hv-b/web").unwrap().id, web.id);

    // An administrator dismisses the alert, with a note; audited; not twice.
    let id = alert.id.to_string();
    let out = c.cli_ok(&["alerts", "resolve", &id, "--note", "hv-a is a test host"]);
    assert!(
        out.contains(&format!("alert {id} (hv-b/web vm-id-conflict) resolved")),
        "{out}"
    );
    let done = all_alerts(&c)
        .into_iter()
        .find(|a| a.id == alert.id)
        .unwrap();
    assert!(done.resolved.is_some());
    assert_eq!(done.note.as_deref(), Some("hv-a is a test host"));
    let listed = c.cli_ok(&["alerts", "list", "--all"]);
    assert!(listed.contains(": hv-a is a test host)"), "{listed}");
    let r = audit(&c, "alert resolve");
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(
        r[0]["detail"]
            .as_str()
            .unwrap()
            .contains("hv-a is a test host")
    );
    let o = c.cli(&["alerts", "resolve", &id]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("alert {id} was already resolved")),
        "{err}"
    );
    let o = c.cli(&["alerts", "resolve", "99999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("alert 99999 not found"));
    // The claim goes on, so it is alerted again, as a new alert.
    let again = wait_alert(&c, "hv-b/web", "vm-id-conflict", |_| true);
    assert_ne!(again.id, alert.id);
    assert_eq!(find_ds(&c, "hv-b/web").unwrap().id, web.id);
}

#[test]
fn a_vm_that_migrates_within_a_cluster_takes_its_data_source_along() {
    let t = tempfile::tempdir().unwrap();
    let (mut c, web, _) = setup(t.path());
    c.agent("hv-a", &t.path().join("vms-a"));
    let out = c.cli_ok(&[
        "clusters", "create", "k1", "--host", "hv-b", "--host", "hv-a",
    ]);
    assert_eq!(out.trim(), "cluster k1: hv-a, hv-b");
    let k: Vec<ClusterInfo> =
        serde_json::from_str(&c.cli_ok(&["clusters", "list", "--json"])).unwrap();
    assert_eq!(
        (k[0].name.as_str(), k[0].hosts.clone()),
        ("k1", vec!["hv-a".to_string(), "hv-b".to_string()])
    );
    let o = c.cli(&["clusters", "create", "k2", "--host", "hv-a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in cluster \"k1\""));

    // The VM goes away and comes back: its vm-missing alert resolves itself.
    let parked = t.path().join("parked");
    leave_hv_b(&c, t.path(), &parked);
    let missing = wait_alert(&c, "hv-b/web", "vm-missing", |_| true);
    std::fs::rename(&parked, t.path().join("vms-b/web")).unwrap();
    wait_until("the vm-missing alert to resolve", LIMIT, || {
        !c.alerts().iter().any(|a| a.id == missing.id)
    });
    let done = all_alerts(&c)
        .into_iter()
        .find(|a| a.id == missing.id)
        .unwrap();
    assert_eq!(done.note.as_deref(), Some("its agent reports it again"));

    // Live migration: hv-b stops reporting it, then hv-a reports it.
    leave_hv_b(&c, t.path(), &parked);
    let missing = wait_alert(&c, "hv-b/web", "vm-missing", |_| true);
    std::fs::rename(&parked, t.path().join("vms-a/web")).unwrap();
    wait_until("hv-a/web", LIMIT, || find_ds(&c, "hv-a/web").is_some());
    let moved = find_ds(&c, "hv-a/web").unwrap();
    assert_eq!(moved.id, web.id);
    assert!(moved.present);
    assert!(find_ds(&c, "hv-b/web").is_none());
    assert_eq!(members(&c, "gold"), ["hv-a/web"]);
    // The old name's vm-missing alert is resolved, saying where it went.
    let all = all_alerts(&c);
    let done = all.iter().find(|a| a.id == missing.id).unwrap();
    assert!(done.resolved.is_some(), "{done:?}");
    assert_eq!(
        done.note.as_deref(),
        Some("hv-b/web moved to hv-a/web (cluster k1)")
    );
    assert!(
        c.alerts().iter().all(|a| a.subject != "hv-b/web"),
        "{:?}",
        c.alerts()
    );
    assert!(all.iter().all(|a| a.kind != "vm-id-conflict"), "{all:?}");
    let m = audit(&c, "datasource move");
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["detail"], "hv-b/web -> hv-a/web (cluster k1)");

    // The old name says where it went; the new one has the points.
    let o = c.cli(&["recovery-points", "list", "--vm", "hv-b/web"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hv-b/web moved to hv-a/web at "), "{err}");
    assert!(err.contains("use hv-a/web"), "{err}");
    assert_eq!(points(&c, "hv-a/web").len(), 1);
    let j = backup_now(&c, "hv-a/web");
    assert!(
        j.log.iter().any(|l| l.message == "handed to agent hv-a"),
        "{:?}",
        j.log
    );
    assert_eq!(points(&c, "hv-a/web").len(), 2);

    // Membership changes.
    let out = c.cli_ok(&["clusters", "remove-host", "k1", "--host", "hv-b"]);
    assert_eq!(out.trim(), "cluster k1: hv-a");
    let out = c.cli_ok(&["clusters", "add-host", "k1", "--host", "hv-c"]);
    assert_eq!(out.trim(), "cluster k1: hv-a, hv-c");
    c.cli_ok(&["clusters", "delete", "k1"]);
    assert_eq!(c.cli_ok(&["clusters", "list"]).trim(), "no clusters");
    assert_eq!(audit(&c, "cluster create").len(), 1);
}

#[test]
fn outside_a_cluster_an_administrator_moves_the_data_source() {
    let t = tempfile::tempdir().unwrap();
    let (mut c, web, _) = setup(t.path());
    let adir = c.agent("hv-a", &t.path().join("vms-a"));

    // The VM really moved to hv-a, but hv-a and hv-b share no cluster: held.
    leave_hv_b(&c, t.path(), &t.path().join("vms-a/web"));
    let alert = wait_alert(&c, "hv-b/web", "vm-id-conflict", |a| a.occurrences >= 2);
    assert_eq!(alert.severity, Severity::Critical);
    assert!(
        alert.message.contains("no longer reported"),
        "{}",
        alert.message
    );
    assert!(
        alert
            .message
            .contains("holdfast datasources move hv-b/web --to hv-a"),
        "{}",
        alert.message
    );
    assert_eq!(find_ds(&c, "hv-b/web").unwrap().id, web.id);
    assert!(find_ds(&c, "hv-a/web").is_none());

    // Agents may not decide it.
    let id = pki::AgentIdentity::load(&adir).unwrap();
    let agent = Client::new(&c.url, id.client_config().unwrap(), Auth::ClientCert).unwrap();
    let e = agent
        .post::<_, DataSourceInfo>(
            "/datasources/hv-b/web/move",
            &MoveDataSource { to: "hv-a".into() },
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = agent
        .post::<_, ClusterInfo>(
            "/clusters",
            &CreateCluster {
                name: "mine".into(),
                hosts: vec!["hv-a".into(), "hv-b".into()],
            },
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = agent
        .post::<_, AlertInfo>(
            &format!("/alerts/{}/resolve", alert.id),
            &ResolveAlert::default(),
        )
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // A host that reports no such VM is refused; nothing moves.
    let o = c.cli(&["datasources", "move", "hv-b/web", "--to", "hv-c"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hv-c reports no VM with id"), "{err}");
    assert_eq!(find_ds(&c, "hv-b/web").unwrap().id, web.id);

    let out = c.cli_ok(&["datasources", "move", "hv-b/web", "--to", "hv-a"]);
    assert_eq!(
        out.trim(),
        "hv-b/web moved to hv-a/web with its group (gold) and recovery points"
    );
    let moved = find_ds(&c, "hv-a/web").unwrap();
    assert_eq!(moved.id, web.id);
    assert_eq!(moved.protection_group.as_deref(), Some("gold"));
    assert!(find_ds(&c, "hv-b/web").is_none());
    let m = audit(&c, "datasource move");
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["actor"], "admin");
    assert_eq!(m[0]["detail"], "hv-b/web -> hv-a/web (administrator)");
    let done = all_alerts(&c)
        .into_iter()
        .find(|a| a.id == alert.id)
        .unwrap();
    assert!(done.resolved.is_some(), "{done:?}");

    // It stays there through later inventories, with no new conflict.
    let j = backup_now(&c, "hv-a/web");
    assert!(
        j.log.iter().any(|l| l.message == "handed to agent hv-a"),
        "{:?}",
        j.log
    );
    assert_eq!(points(&c, "hv-a/web").len(), 2);
    assert_eq!(find_ds(&c, "hv-a/web").unwrap().id, web.id);
    assert!(
        c.alerts().iter().all(|a| a.kind != "vm-id-conflict"),
        "{:?}",
        c.alerts()
    );
    let o = c.cli(&["recovery-points", "list", "--vm", "hv-b/web"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("hv-b/web moved to hv-a/web"));
}
